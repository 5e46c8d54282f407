//! Health checks from an app's `app.json`, in Dokku's `healthchecks` format: per process type, a
//! list of checks a new container must pass before it gets traffic. A release keeps the checks it
//! was built with. Owns the format and its validation; must not touch the filesystem or the
//! network (`deploy` runs the checks).
//!
//! ```json
//! {"healthchecks": {"web": [{"type": "startup", "name": "ready", "path": "/health",
//!   "content": "ok", "attempts": 3, "timeout": 5, "wait": 5, "initialDelay": 0}]}}
//! ```
//! A check has a `path` (an HTTP GET on `$PORT`, or on `port`, that must answer 2xx or 3xx and,
//! with `content`, contain it) or an `uptime` (the container still runs after that many seconds).
//! Only `startup` checks (the default type) gate deploys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Process type → its checks.
pub type Checks = BTreeMap<String, Vec<Check>>;

#[derive(Debug, Error)]
pub enum ChecksError {
    #[error("app.json is not valid JSON: {0} — fix it and push again")]
    Json(#[from] serde_json::Error),
    #[error("app.json: {process_type} check {name:?}: {problem} — fix it and push again")]
    Invalid {
        process_type: String,
        name: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// Run before a new container gets traffic.
    #[default]
    Startup,
    /// Accepted in app.json; not run yet.
    Readiness,
    /// Accepted in app.json; not run yet.
    Liveness,
}

/// One check of a process type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    #[serde(default, rename = "type")]
    pub kind: CheckType,
    #[serde(default)]
    pub name: String,
    /// HTTP GET this path.
    pub path: Option<String>,
    /// … and require this text in the answer.
    pub content: Option<String>,
    /// … on this port instead of `$PORT`.
    pub port: Option<u16>,
    /// Require the container to be running after this many seconds.
    pub uptime: Option<u64>,
    /// Not supported: berth runs no command checks yet.
    pub command: Option<serde_json::Value>,
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Seconds one attempt may take.
    #[serde(default = "default_secs")]
    pub timeout: u64,
    /// Seconds between attempts.
    #[serde(default = "default_secs")]
    pub wait: u64,
    /// Seconds before the first attempt.
    #[serde(default)]
    pub initial_delay: u64,
}

fn default_attempts() -> u32 {
    3
}

fn default_secs() -> u64 {
    5
}

#[derive(Deserialize)]
struct AppJson {
    #[serde(default)]
    healthchecks: Checks,
}

/// The checks of an `app.json` (other keys are ignored), validated.
pub fn from_app_json(text: &str) -> Result<Checks, ChecksError> {
    let checks = serde_json::from_str::<AppJson>(text)?.healthchecks;
    for (process_type, list) in &checks {
        for check in list {
            let problem = |problem: &str| ChecksError::Invalid {
                process_type: process_type.clone(),
                name: check.name.clone(),
                problem: problem.to_string(),
            };
            if check.command.is_some() {
                return Err(problem(
                    "command checks are not supported; use a \"path\" or an \"uptime\" check",
                ));
            }
            match (&check.path, check.uptime) {
                (None, None) => return Err(problem("give a \"path\" or an \"uptime\"")),
                (Some(_), Some(_)) => {
                    return Err(problem("give a \"path\" or an \"uptime\", not both"))
                }
                (Some(path), None)
                    if !path.starts_with('/') || path.contains(char::is_whitespace) =>
                {
                    return Err(problem("\"path\" must start with / and hold no spaces"))
                }
                _ => {}
            }
            if !(1..=100).contains(&check.attempts)
                || !(1..=300).contains(&check.timeout)
                || check.wait > 300
                || check.initial_delay > 600
                || check.uptime.is_some_and(|u| u > 600)
            {
                return Err(problem("attempts must be 1–100, timeout 1–300 s, wait up to 300 s, initialDelay and uptime up to 600 s"));
            }
        }
    }
    Ok(checks)
}

/// The checks that gate a deploy of `process_type`'s containers (none: berth's default check).
pub fn startup<'a>(checks: &'a Checks, process_type: &str) -> Vec<&'a Check> {
    checks
        .get(process_type)
        .map(|list| {
            list.iter()
                .filter(|c| c.kind == CheckType::Startup)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dokku_format_with_defaults() {
        let checks = from_app_json(
            r#"{"name": "x", "scripts": {}, "healthchecks": {
                "web": [
                    {"type": "startup", "name": "ready", "path": "/health", "content": "ok",
                     "attempts": 2, "timeout": 3, "wait": 1, "initialDelay": 4, "description": "d"},
                    {"path": "/"},
                    {"type": "liveness", "path": "/live"}
                ],
                "worker": [{"name": "stays up", "uptime": 3}]
            }}"#,
        )
        .unwrap();
        let web = &checks["web"];
        assert_eq!(
            (
                web[0].attempts,
                web[0].timeout,
                web[0].wait,
                web[0].initial_delay
            ),
            (2, 3, 1, 4)
        );
        assert_eq!(web[0].content.as_deref(), Some("ok"));
        assert_eq!(
            (web[1].kind, web[1].attempts, web[1].timeout, web[1].wait),
            (CheckType::Startup, 3, 5, 5)
        );
        assert_eq!(
            startup(&checks, "web").len(),
            2,
            "liveness checks do not gate deploys"
        );
        assert_eq!(checks["worker"][0].uptime, Some(3));
        assert!(startup(&checks, "clock").is_empty());
        assert!(from_app_json(r#"{"name": "no checks"}"#)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_checks_say_what_to_fix() {
        let cases = [
            (
                r#"{"healthchecks": {"web": [{"name": "a"}]}}"#,
                "give a \"path\" or an \"uptime\"",
            ),
            (
                r#"{"healthchecks": {"web": [{"path": "/", "uptime": 2}]}}"#,
                "not both",
            ),
            (
                r#"{"healthchecks": {"web": [{"path": "health"}]}}"#,
                "must start with /",
            ),
            (
                r#"{"healthchecks": {"web": [{"command": ["true"]}]}}"#,
                "command checks are not supported",
            ),
            (
                r#"{"healthchecks": {"web": [{"path": "/", "attempts": 0}]}}"#,
                "attempts must be",
            ),
            (
                r#"{"healthchecks": {"web": [{"path": "/", "timeout": 9999}]}}"#,
                "timeout 1–300",
            ),
            (
                r#"{"healthchecks": {"web": [{"type": "sometimes", "path": "/"}]}}"#,
                "not valid JSON",
            ),
            (r#"{"healthchecks": "#, "not valid JSON"),
        ];
        for (text, want) in cases {
            let err = from_app_json(text).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.ends_with("push again"),
                "{text}: {err}"
            );
        }
    }
}
