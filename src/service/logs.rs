//! App logs: the last lines, and following new ones as they are written.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{Caller, Result, Service};
use crate::logs;

/// Which lines `logs` sends.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// How many past lines (default 100).
    #[serde(default = "hundred")]
    pub num: usize,
    /// Only lines of this process type's containers, e.g. web.
    pub process: Option<String>,
    /// Keep sending new lines as they are written.
    #[serde(default)]
    pub follow: bool,
}

fn hundred() -> usize {
    100
}

/// One log line taken apart (`time source[process]: text`); a line in no known form has only
/// its text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    pub time: String,
    /// `app` for the app's own output, `berth` for berth's lines about it.
    pub source: String,
    /// The container, e.g. `web.1`; empty for a line about the whole app.
    pub process: String,
    pub text: String,
}

impl LogLine {
    fn of(line: &str) -> Self {
        match logs::Line::parse(line) {
            Some(l) => Self {
                time: l.time.into(),
                source: l.source.into(),
                process: l.process.into(),
                text: l.text.into(),
            },
            None => Self {
                time: String::new(),
                source: String::new(),
                process: String::new(),
                text: line.into(),
            },
        }
    }

    /// The line as the log file has it.
    pub fn raw(&self) -> String {
        match (self.time.is_empty(), self.process.is_empty()) {
            (true, _) => self.text.clone(),
            (false, true) => format!("{} {}: {}", self.time, self.source, self.text),
            (false, false) => format!(
                "{} {}[{}]: {}",
                self.time, self.source, self.process, self.text
            ),
        }
    }
}

impl Service {
    /// Sends the app's last lines to `to`, then, when following, each new line until `to` is
    /// dropped.
    pub async fn logs(
        &self,
        who: &Caller,
        app: &str,
        query: &LogQuery,
        to: mpsc::Sender<LogLine>,
    ) -> Result<()> {
        self.app(who, app).await?;
        let keep = |line: &str| {
            query.process.as_deref().is_none_or(|kind| {
                logs::Line::parse(line).is_some_and(|line| line.is_of_type(kind))
            })
        };
        let path = self.paths.log(app);
        let mut offset = logs::end(&path);
        for line in logs::tail_where(&path, query.num, keep) {
            if to.send(LogLine::of(&line)).await.is_err() {
                return Ok(());
            }
        }
        if !query.follow {
            return Ok(());
        }
        // Woken by inotify as lines arrive; the timeout only notices a client that went away.
        let (_watcher, mut woken) = logs::watch(&path).map_err(super::failed)?;
        while !to.is_closed() {
            let _ = tokio::time::timeout(Duration::from_secs(1), woken.recv()).await;
            let (lines, next) = logs::read_from(&path, offset);
            offset = next;
            for line in lines.into_iter().filter(|l| keep(l)) {
                if to.send(LogLine::of(&line)).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
