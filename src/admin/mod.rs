//! The local admin socket (`DATA/berth.sock`, root only): how the CLI and the git hook talk to the
//! daemon. One JSON request line in; a stream of JSON event lines out (text for stdout/stderr,
//! then `done` or `error`). Owns the wire types; [`client`] is the CLI side, [`server`] accepts
//! connections and [`handlers`] turns each request into calls on the daemon.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub mod client;
pub mod handlers;
pub mod server;

/// One command for the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    AppsCreate {
        name: String,
    },
    Apps {
        json: bool,
    },
    AppsInfo {
        name: String,
        json: bool,
    },
    AppsDestroy {
        name: String,
        force: bool,
    },
    Config {
        name: String,
        json: bool,
    },
    ConfigGet {
        name: String,
        key: String,
    },
    ConfigSet {
        name: String,
        pairs: Vec<String>,
        no_restart: bool,
    },
    ConfigUnset {
        name: String,
        keys: Vec<String>,
        no_restart: bool,
    },
    Keys {
        json: bool,
    },
    KeysAdd {
        name: String,
        key: String,
    },
    KeysRemove {
        name: String,
    },
    Releases {
        name: String,
        json: bool,
    },
    Ps {
        name: String,
        json: bool,
    },
    Logs {
        name: String,
        follow: bool,
        num: usize,
    },
    StackBuild {
        force: bool,
    },
    /// From the pre-receive hook: build `source` (a checkout of `rev`) and deploy it.
    Deploy {
        app: String,
        source: PathBuf,
        description: String,
    },
}

/// One line of the daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// Text for the client's stdout.
    Out(String),
    /// Text for the client's stderr.
    Err(String),
    /// The command succeeded; nothing follows.
    Done,
    /// The command failed with this one-line message (what went wrong and what to do).
    Error(String),
}

/// Where a handler writes its output; the client prints it as it arrives.
#[derive(Clone)]
pub struct Out(mpsc::Sender<Event>);

impl Out {
    pub fn new(tx: mpsc::Sender<Event>) -> Self {
        Self(tx)
    }

    /// Writes one line to the client's stdout. A gone client is not an error: the work goes on.
    pub async fn line(&self, text: impl AsRef<str>) {
        let _ = self
            .0
            .send(Event::Out(format!("{}\n", text.as_ref())))
            .await;
    }

    /// Writes one line from blocking code (build output readers).
    pub fn blocking_line(&self, text: impl AsRef<str>) {
        let _ = self
            .0
            .blocking_send(Event::Out(format!("{}\n", text.as_ref())));
    }

    /// Writes one line to the client's stderr.
    pub async fn warn(&self, text: impl AsRef<str>) {
        let _ = self
            .0
            .send(Event::Err(format!("{}\n", text.as_ref())))
            .await;
    }

    /// Whether the client has gone (for endless streams such as `logs -f`).
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    async fn send(&self, event: Event) {
        let _ = self.0.send(event).await;
    }
}

/// The socket's path in a data directory.
pub fn socket_path(data: &std::path::Path) -> PathBuf {
    data.join("berth.sock")
}
