//! What each deploy printed: followed live while it runs ([`Journals::watch`]), and kept with
//! the release it made (`DATA/outputs/APP/vN.log`, at most [`MAX_OUTPUT`] bytes: the start, then
//! a line saying what was cut) for `releases:output` and the dashboard. A deploy is a push's
//! build, start and check, or a config change, scale or rollback. Owns those files; what a
//! deploy prints is the deploy's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::progress::Line;

/// The most of a deploy's output that is kept.
pub const MAX_OUTPUT: usize = 1 << 20;
/// How many lines a slow watcher may fall behind before it misses some.
const BACKLOG: usize = 1024;

/// The deploys in progress, one per app at most (deploys of an app hold its lock).
pub struct Journals {
    /// `DATA/outputs`.
    dir: PathBuf,
    live: Mutex<HashMap<String, Arc<Journal>>>,
}

/// One deploy's output so far, and its watchers.
pub struct Journal {
    text: Mutex<String>,
    /// Each line as it comes; None when the deploy is over.
    tx: broadcast::Sender<Option<String>>,
}

impl Journal {
    fn record(&self, line: &Line) {
        let text = match line {
            Line::Out(text) | Line::Warn(text) => text,
        };
        let mut kept = self.text.lock().expect("journal");
        if kept.len() + text.len() < MAX_OUTPUT {
            kept.push_str(text);
            kept.push('\n');
        } else if !kept.ends_with("(cut)\n") {
            kept.push_str("… (the rest of the output was longer than 1 MiB: cut)\n");
        }
        let _ = self.tx.send(Some(text.clone()));
    }
}

/// Recording an app's deploy; it stops being live when dropped.
pub struct Recording<'a> {
    journals: &'a Journals,
    app: String,
    journal: Arc<Journal>,
}

impl Recording<'_> {
    /// What to tee the deploy's progress into.
    pub fn sink(&self) -> impl Fn(&Line) + Send + Sync + 'static {
        let journal = self.journal.clone();
        move |line| journal.record(line)
    }

    /// Keeps the output as release `version`'s.
    pub fn save(&self, version: i64) {
        let path = self.journals.path(&self.app, version);
        let text = self.journal.text.lock().expect("journal").clone();
        let saved = std::fs::create_dir_all(path.parent().expect("in outputs/APP"))
            .and_then(|()| std::fs::write(&path, text));
        if let Err(err) = saved {
            tracing::warn!(path = %path.display(), %err, "keeping a deploy's output failed");
        }
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        let _ = self.journal.tx.send(None);
        let mut live = self.journals.live.lock().expect("journals");
        if live
            .get(&self.app)
            .is_some_and(|j| Arc::ptr_eq(j, &self.journal))
        {
            live.remove(&self.app);
        }
    }
}

impl Journals {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Starts recording a deploy of `app`.
    pub fn begin(&self, app: &str) -> Recording<'_> {
        let journal = Arc::new(Journal {
            text: Mutex::new(String::new()),
            tx: broadcast::channel(BACKLOG).0,
        });
        let live = &mut self.live.lock().expect("journals");
        live.insert(app.to_string(), journal.clone());
        Recording {
            journals: self,
            app: app.to_string(),
            journal,
        }
    }

    /// The deploy of `app` in progress: its output so far and each line it prints next (then
    /// None when it is over); None when none runs.
    pub fn watch(&self, app: &str) -> Option<(String, broadcast::Receiver<Option<String>>)> {
        let live = self.live.lock().expect("journals");
        let journal = live.get(app)?;
        // Subscribing under the text's lock: no line falls between the two.
        let text = journal.text.lock().expect("journal");
        Some((text.clone(), journal.tx.subscribe()))
    }

    /// The output of the deploy that made release `version` of `app`, if it was kept.
    pub fn output(&self, app: &str, version: i64) -> std::io::Result<Option<String>> {
        match std::fs::read(self.path(app, version)) {
            Ok(bytes) => Ok(Some(
                String::from_utf8_lossy(&bytes[..bytes.len().min(2 * MAX_OUTPUT)]).into_owned(),
            )),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Forgets every output of `app` (it was destroyed).
    pub fn remove(&self, app: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join(app));
    }

    fn path(&self, app: &str, version: i64) -> PathBuf {
        self.dir.join(app).join(format!("v{version}.log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deploy_is_watched_while_it_runs_and_kept_with_its_release() {
        let dir = tempfile::tempdir().unwrap();
        let journals = Journals::new(dir.path().to_path_buf());
        assert!(journals.watch("shop").is_none());
        let recording = journals.begin("shop");
        let sink = recording.sink();
        sink(&Line::Out("-----> Building".into()));
        let (so_far, mut next) = journals.watch("shop").unwrap();
        assert_eq!(so_far, "-----> Building\n");
        sink(&Line::Warn("a warning".into()));
        assert_eq!(next.try_recv().unwrap().as_deref(), Some("a warning"));
        sink(&Line::Out("x".repeat(MAX_OUTPUT)));
        recording.save(3);
        drop(recording);
        assert!(journals.watch("shop").is_none());
        assert_eq!(next.try_recv().unwrap(), Some("x".repeat(MAX_OUTPUT)));
        assert_eq!(
            next.try_recv().unwrap(),
            None,
            "the stream ends with the deploy"
        );
        let kept = journals.output("shop", 3).unwrap().unwrap();
        assert!(
            kept.starts_with("-----> Building\na warning\n… (the rest"),
            "{kept}"
        );
        assert!(kept.len() < MAX_OUTPUT);
        assert_eq!(journals.output("shop", 4).unwrap(), None);
        journals.remove("shop");
        assert_eq!(journals.output("shop", 3).unwrap(), None);
    }
}
