//! The local admin socket (`DATA/berth.sock`, root only): how the CLI and the git hook talk to the
//! daemon. One JSON request line in; a stream of JSON event lines out (text for stdout/stderr,
//! then `done` or `error`). Owns the wire types and [`Handles`], what the handlers get;
//! [`client`] is the CLI side, [`server`] accepts connections and adapts the handlers'
//! [`crate::progress::Progress`] lines to events, and [`handlers`] turns each request into calls
//! on the store and `deploy`. `berth run` switches to a framed exchange of its own after its
//! request line ([`run`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod client;
pub mod handlers;
mod images;
pub mod run;
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
        process_type: Option<String>,
        json: bool,
    },
    Domains {
        name: String,
        json: bool,
    },
    DomainsAdd {
        name: String,
        host: String,
    },
    DomainsRemove {
        name: String,
        host: String,
    },
    Certs {
        name: String,
        json: bool,
    },
    CertsAdd {
        name: String,
        /// PEM chain, server certificate first.
        chain: String,
        /// PEM private key.
        key: String,
        redirect_https: bool,
    },
    Builds {
        name: String,
        json: bool,
    },
    Network {
        name: String,
        json: bool,
    },
    NetworkSet {
        name: String,
        egress: bool,
    },
    Resources {
        name: String,
        json: bool,
    },
    ResourcesSet {
        name: String,
        process_type: String,
        memory: Option<String>,
        cpus: Option<String>,
        pids: Option<String>,
    },
    BuildsSet {
        name: String,
        memory: Option<String>,
        cpus: Option<String>,
        pids: Option<String>,
        timeout: Option<String>,
    },
    CertsAuto {
        name: String,
        redirect_https: bool,
    },
    CertsRemove {
        name: String,
    },
    StackBuild {
        force: bool,
        /// The stack's suite (`trixie`, `bookworm`); the default stack when empty.
        #[serde(default)]
        stack: String,
    },
    ImagesImport {
        /// An absolute path on the server (the admin socket is local).
        file: std::path::PathBuf,
        name: Option<String>,
    },
    Images {
        json: bool,
    },
    /// The archive comes back as [`Event::Data`].
    ImagesExport {
        image: String,
    },
    Gc {
        json: bool,
    },
    Info {
        json: bool,
    },
    PsScale {
        name: String,
        /// `TYPE=N` pairs.
        pairs: Vec<String>,
    },
    PsRestart {
        name: String,
        process_type: Option<String>,
    },
    ReleasesRollback {
        name: String,
        version: Option<String>,
    },
    /// From the pre-receive hook: build `source` (a checkout of the pushed commit), start it
    /// and check it; it goes live on [`Request::Promote`] with the same `push`.
    Deploy {
        app: String,
        source: PathBuf,
        description: String,
        /// The name of the SSH key that pushed.
        key: String,
        /// The push's id (`BERTH_PUSH_ID`).
        push: String,
        /// The pushed commit (the build's `SOURCE_VERSION`).
        #[serde(default)]
        commit: String,
    },
    /// `berth run`: after this line both sides switch to [`run`]'s frames.
    Run {
        name: String,
        /// A shell command line.
        command: String,
        /// `Some`: run it with a terminal of this size.
        terminal: Option<crate::attach::WindowSize>,
    },
    /// From the post-receive hook: git updated the branch; make the push's release live.
    Promote {
        app: String,
        push: String,
    },
}

/// What the admin handlers are given: the store, the deployer and the few facts they print.
pub struct Handles {
    pub store: crate::store::Store,
    pub deployer: std::sync::Arc<crate::deploy::Deployer>,
    pub acme: std::sync::Arc<crate::acme::Acme>,
    pub paths: crate::paths::Paths,
    /// The git hook command installed into each app's repo (the hook's name follows).
    pub hook_command: String,
    /// The port of the SSH git endpoint, for the remotes berth prints.
    pub ssh_port: u16,
}

/// One line of the daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// Text for the client's stdout.
    Out(String),
    /// Text for the client's stderr.
    Err(String),
    /// Bytes for the client's stdout (an exported image), base64.
    Data(String),
    /// The command succeeded; nothing follows.
    Done,
    /// The command failed with this one-line message (what went wrong and what to do).
    Error(String),
}

/// The socket's path in a data directory.
pub fn socket_path(data: &std::path::Path) -> PathBuf {
    data.join("berth.sock")
}
