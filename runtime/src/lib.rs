//! berth-runtime: the embedded container runtime.
//!
//! This crate is the only code in berth that clones processes into namespaces, mounts
//! filesystems, creates cgroups or touches network links and firewall rules. The rest of berth describes a
//! container with a [`ContainerSpec`] and drives it through [`Runtime`]; for networking it
//! calls [`network`].
//!
//! Every container runs under its own single-threaded **shim** ([`shim`]): for a detached
//! container a fork of the shim launcher ([`launcher`]), for an attached run the `berth` binary
//! re-executed; either way its command line reads `berth shim DIR`. The shim owns the container (rootfs, init, logs, exit
//! code) and outlives the daemon, which finds its containers again with [`Runtime::list`] and
//! [`Runtime::state`]. Containers are cloned only from a shim, never from the multithreaded
//! daemon (a clone of a multithreaded process may find malloc's locks held).
//!
//! - [`Runtime`] (daemon side): start, run attached ([`Io`]: output, pipes or a terminal),
//!   state, stop, remove, list.
//! - [`shim`]: the process that owns one container.
//! - [`launcher`]: the process that forks the shims of detached containers (they share its
//!   pages, so each costs little memory).
//! - [`rootfs`]: the overlay root filesystem of a container (id-mapped layers with `users`),
//!   and the bind sources of a container with `users`, made reachable (and id-mapped).
//! - [`ids`]: re-owning a tree between a container's ids and its range's host ids.
//! - [`spec`]: the OCI runtime config of a container.
//! - [`container`]: starting a container's init from that config (namespaces, mounts, pivot,
//!   user, capabilities, seccomp, exec): berth's own runtime core.
//! - [`cgroup`]: a container's cgroup (v1 or v2): limits, usage, OOM kills, removal.
//! - [`seccomp`]: the default seccomp profile of every container.
//! - [`terminal`]: a container's pseudo-terminal, handed from its shim to the daemon; its size.
//! - [`network`]: bridge, per-container network namespaces and veth pairs (netlink).
//! - [`firewall`]: the bridge's nftables table: NAT out, no new connections into the host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod cgroup;
mod container;
mod control;
mod error;
pub mod firewall;
pub mod ids;
pub mod launcher;
mod layout;
pub mod network;
pub mod rootfs;
pub mod seccomp;
pub mod shim;
pub mod spec;
pub mod terminal;
mod userns;

pub use control::{Attached, Io, Runtime, State};
pub use error::Error;

/// Everything needed to run one container. The daemon writes it as `DIR/shim.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// `[a-z0-9-]{1,64}`; also the cgroup name (`/berth/<id>`).
    pub id: String,
    /// Extracted image layer directories, top-most first (overlay lowerdir order).
    pub layers: Vec<PathBuf>,
    pub args: Vec<String>,
    /// `KEY=VALUE`; a default `PATH` is added when missing.
    pub env: Vec<String>,
    pub cwd: String,
    pub hostname: String,
    /// Extra bind mounts; the destination is created in the rootfs when missing.
    pub binds: Vec<Bind>,
    /// `Some(path)`: join that network namespace; `None`: share the host's network (berth
    /// gives every container, app or build, a namespace of its own).
    pub netns: Option<PathBuf>,
    pub log: LogTarget,
    /// On stop: SIGTERM (or [`ContainerSpec::stop_signal`]), then SIGKILL after this many
    /// seconds.
    pub stop_grace_secs: u64,
    /// The signal a stop sends first (an image's `STOPSIGNAL`); None for SIGTERM.
    #[serde(default)]
    pub stop_signal: Option<i32>,
    /// cgroup limits (cgroup v1 or v2, whichever the host runs).
    #[serde(default)]
    pub limits: Limits,
    /// Run `args` under a minimal init as PID 1 ([`spec::INIT_BINARY`]), which passes signals
    /// on to the command's process group and reaps orphaned processes: a command without a
    /// SIGTERM handler still stops on SIGTERM, and zombies do not pile up.
    #[serde(default)]
    pub init: bool,
    /// The user the command runs as; root (0:0) when None. Inside the container: with
    /// `users` it is `users.host_id + uid` on the host.
    #[serde(default)]
    pub user: Option<User>,
    /// `Some`: the container gets a user namespace of its own in which its uids and gids
    /// `0..size` are the host's `host_id..host_id + size`, so its root is no host root; its
    /// image layers are mounted id-mapped ([`rootfs`]), so they need no chown. `None`: the
    /// host's user namespace (container root is host root).
    #[serde(default)]
    pub users: Option<IdMap>,
}

/// A range of host uids and gids that a container's `0..size` stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    /// The host uid (and gid) of the container's uid (and gid) 0.
    pub host_id: u32,
    /// How many ids are mapped, from 0 up.
    pub size: u32,
}

/// A numeric user and group inside the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// A container's cgroup limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory in bytes; past it the kernel's OOM killer kills a process of the container.
    pub memory: Option<i64>,
    /// CPU time in thousandths of a CPU (500: half of one), as a CFS quota per 100 ms.
    pub cpu_millis: Option<u64>,
    /// Processes and threads at once; past it fork and clone fail.
    pub pids: Option<i64>,
}

/// A host path bind-mounted (recursively) into the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
    /// With `users`: mounted id-mapped (not recursively), so the ids on disk are the
    /// container's own: its root owns what host root owns there, and what it writes there is
    /// stored as its own ids (uid 0 as 0, not as its range's host ids) — for a tree berth
    /// packs as an image layer afterwards. Without `users`: no effect.
    #[serde(default)]
    pub idmapped: bool,
}

/// Where the container's stdout and stderr go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogTarget {
    /// The shim's own stdout/stderr (builds: the daemon reads the shim's piped stdout).
    Inherit,
    /// The shim appends `"<RFC3339 UTC timestamp> <prefix>: <line>\n"` to `path`, one write
    /// per line.
    File { path: PathBuf, prefix: String },
}

/// Whether `id` is a valid container id: `[a-z0-9-]{1,64}`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}
