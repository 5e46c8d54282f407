//! Named locks: one async mutex per name (an app), made on first use. Deploys hold an app's lock
//! for each change; the SSH endpoint holds a push lock per app for a whole `git push`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct Locks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Locks {
    fn get(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.0
            .lock()
            .expect("locks")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Waits for `name`'s lock.
    pub async fn lock(&self, name: &str) -> OwnedMutexGuard<()> {
        self.get(name).lock_owned().await
    }

    /// `name`'s lock if it is free now.
    pub fn try_lock(&self, name: &str) -> Option<OwnedMutexGuard<()>> {
        self.get(name).try_lock_owned().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_name() {
        let locks = Locks::default();
        let held = locks.lock("a").await;
        assert!(locks.try_lock("a").is_none());
        assert!(locks.try_lock("b").is_some(), "names are independent");
        drop(held);
        assert!(locks.try_lock("a").is_some());
    }
}
