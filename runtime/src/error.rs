//! The runtime's error type. Messages say what went wrong and what to do next.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid container id {0:?}: use 1 to 64 characters from a-z, 0-9 and '-'")]
    InvalidId(String),
    #[error("container {0} already exists: stop and remove it first, or use another id")]
    Exists(String),
    #[error("the container spec has no image layers: give at least one extracted layer directory")]
    NoLayers,
    #[error("image layer {0} is missing or not a directory: extract the image again")]
    MissingLayer(PathBuf),
    #[error(
        "the container init {} is missing: install Debian's tini package (apt-get install tini)",
        crate::spec::INIT_BINARY
    )]
    NoInit,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error("container {id} failed to start: {reason}")]
    StartFailed { id: String, reason: String },
    #[error("container {id} did not report running within {secs}s: see its shim's DIR/error, or check the machine's load")]
    StartTimeout { id: String, secs: u64 },
    #[error("container {id} did not exit within {secs}s of SIGTERM+SIGKILL: find its shim (`berth shim …`) and kill it")]
    StopTimeout { id: String, secs: u64 },
    #[error("{0} is still mounted: unmount it before removing the container")]
    StillMounted(PathBuf),
    /// Why the container's init could not set it up or exec its command.
    #[error("{0}")]
    Init(String),
    #[error("the seccomp profile: {0}")]
    Seccomp(String),
    #[error("invalid OCI runtime config: {0}")]
    Spec(String),
    #[error("nftables: {context}: {source} — berth needs root and the `nft` binary (apt-get install nftables); nft's own message is in the server log")]
    Firewall {
        context: String,
        #[source]
        source: nftables::helper::NftablesError,
    },
    #[error("netlink: {context}: {reason} (berth needs root to manage links)")]
    Netlink { context: String, reason: String },
}

impl Error {
    /// Maps an I/O error, naming what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Maps a syscall error, naming what was being done.
    pub(crate) fn sys(context: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
        let context = context.into();
        move |source| Error::Sys { context, source }
    }

    /// Maps a netlink error, naming what was being done.
    pub(crate) fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
        let context = context.into();
        move |err| Error::Netlink {
            context,
            reason: err.to_string(),
        }
    }
}
