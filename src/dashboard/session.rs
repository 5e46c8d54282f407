//! The dashboard's sessions and login rate limit, kept in memory (a server restart logs
//! everyone out).
//!
//! A session is a random id in a cookie, with its own CSRF token; it starts anonymous (the login
//! form's token), and a successful login replaces it with a new one that names the user (so an
//! id seen before login is worth nothing after). Sessions end after [`IDLE`] without a request,
//! or on logout. Owns no user data: who the user is and what they may do is asked of the
//! service on every request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

/// How long a session lives without a request.
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Failed logins allowed per user name and per client address within [`WINDOW`].
pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// At most this many sessions are kept; past it, anonymous ones go first.
const MAX_SESSIONS: usize = 10_000;
/// The longest user name the rate limit keeps (longer ones are cut).
const MAX_NAME: usize = 64;
/// At most this many names and addresses are tracked for the rate limit.
const MAX_TRACKED: usize = 10_000;

/// What a form did, shown on the page it redirects to.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Flash {
    pub error: bool,
    pub text: String,
    /// The operation's last progress lines (a deploy's output).
    pub detail: Vec<String>,
}

/// A session as a request sees it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    /// The logged-in user; None before login.
    pub user: Option<String>,
    pub csrf: String,
    /// A message for the next page shown (after a form's redirect).
    pub flash: Option<Flash>,
    seen: Instant,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// The live session with this id, marked as seen now.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.map.lock().expect("sessions lock");
        let session = map.get_mut(id)?;
        if session.seen.elapsed() > IDLE {
            map.remove(id);
            return None;
        }
        session.seen = Instant::now();
        Some(session.clone())
    }

    /// A new session, anonymous or for `user`.
    pub fn create(&self, user: Option<String>) -> Session {
        let session = Session {
            id: random(32),
            user,
            csrf: random(32),
            flash: None,
            seen: Instant::now(),
        };
        let mut map = self.map.lock().expect("sessions lock");
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.seen.elapsed() <= IDLE);
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.user.is_some());
        }
        map.insert(session.id.clone(), session.clone());
        session
    }

    pub fn remove(&self, id: &str) {
        self.map.lock().expect("sessions lock").remove(id);
    }

    /// Keeps a message for the session's next page.
    pub fn flash(&self, id: &str, flash: Flash) {
        if let Some(s) = self.map.lock().expect("sessions lock").get_mut(id) {
            s.flash = Some(flash);
        }
    }

    /// Takes the message kept for this page.
    pub fn take_flash(&self, id: &str) -> Option<Flash> {
        self.map
            .lock()
            .expect("sessions lock")
            .get_mut(id)
            .and_then(|s| s.flash.take())
    }
}

/// Failed logins per user name and per client address, each in a sliding window.
#[derive(Default)]
pub struct LoginLimit {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

impl LoginLimit {
    fn keys(user: &str, addr: IpAddr) -> [String; 2] {
        // Bounded: a name is what a client sends.
        let user: String = user.chars().take(MAX_NAME).collect();
        [format!("user {user}"), format!("addr {addr}")]
    }

    /// Whether another attempt for `user` from `addr` is refused now.
    pub fn blocked(&self, user: &str, addr: IpAddr) -> bool {
        let mut failures = self.failures.lock().expect("login limit lock");
        Self::keys(user, addr).iter().any(|key| {
            failures.get_mut(key).is_some_and(|times| {
                times.retain(|t| t.elapsed() < WINDOW);
                times.len() >= MAX_FAILURES
            })
        })
    }

    pub fn failed(&self, user: &str, addr: IpAddr) {
        let mut failures = self.failures.lock().expect("login limit lock");
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, times| times.iter().any(|t| t.elapsed() < WINDOW));
        }
        for key in Self::keys(user, addr) {
            if failures.len() < MAX_TRACKED || failures.contains_key(&key) {
                failures.entry(key).or_default().push(Instant::now());
            }
        }
    }
}

/// `bytes` random bytes, hex.
fn random(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Compares two secrets in time that does not depend on where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_start_anonymous_and_end_on_removal() {
        let sessions = Sessions::default();
        let anon = sessions.create(None);
        assert_eq!(sessions.get(&anon.id).unwrap().user, None);
        let user = sessions.create(Some("alice".into()));
        assert_ne!(anon.id, user.id);
        assert_ne!(anon.csrf, user.csrf);
        let done = Flash {
            error: false,
            text: "done".into(),
            detail: vec![],
        };
        sessions.flash(&user.id, done.clone());
        assert_eq!(sessions.take_flash(&user.id), Some(done));
        assert_eq!(sessions.take_flash(&user.id), None);
        sessions.remove(&user.id);
        assert!(sessions.get(&user.id).is_none());
        assert!(sessions.get("nonsense").is_none());
    }

    #[test]
    fn login_limit_counts_per_user_and_per_address() {
        let limit = LoginLimit::default();
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for _ in 0..MAX_FAILURES {
            assert!(!limit.blocked("alice", a));
            limit.failed("alice", a);
        }
        assert!(limit.blocked("alice", a));
        // The name is blocked from anywhere, the address for any name.
        assert!(limit.blocked("alice", b));
        assert!(limit.blocked("bob", a));
        assert!(!limit.blocked("bob", b));
    }

    #[test]
    fn secrets_compare() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
