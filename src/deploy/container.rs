//! Starting and stopping one container of a release: its id, address, netns, environment and
//! command, and the store record that says it exists (written before the container starts, so a
//! crash never leaves a container nobody knows of). The runtime crate does the OS work.

use std::net::{Ipv4Addr, SocketAddr};

use berth_runtime::{ContainerSpec, IdMap, LogTarget, State};
use rand::Rng;
use tracing::{info, warn};

use super::{DeployError, Deployer};
use crate::image::Image;
use crate::limits::Limits;
use crate::network::Attachment;
use crate::store::{ContainerRow, ContainerState, Release, Store};

/// The port every container's app listens on, inside its own netns, unless its image exposes
/// one TCP port (a Dockerfile's `EXPOSE`).
pub const PORT: u16 = 5000;
/// How long a stopping container gets between SIGTERM and SIGKILL.
pub const STOP_GRACE_SECS: u64 = 10;

/// The command line that runs a process type: sources `.profile.d/*.sh`, then execs `command`.
fn launcher(command: &str) -> Vec<String> {
    after_profile(&format!("exec {command}"))
}

/// The command line of a one-off run: sources `.profile.d/*.sh`, then runs `line`, a shell
/// command line of any shape (`a; b`), and exits with its status.
pub(super) fn run_launcher(line: &str) -> Vec<String> {
    after_profile(line)
}

/// `/bin/sh -c` sourcing `.profile.d/*.sh`, then running `script`.
fn after_profile(script: &str) -> Vec<String> {
    let script =
        format!("for f in /app/.profile.d/*.sh; do [ -r \"$f\" ] && . \"$f\"; done; {script}");
    vec!["/bin/sh".into(), "-c".into(), script]
}

/// A container id: readable, unique, at most 64 characters.
pub(super) fn container_id(app: &str, process_type: &str, number: u32) -> String {
    let suffix: u32 = rand::thread_rng().gen();
    // 36 + 1 + 12 + 1 + up to 5 digits + 1 + 8 = 64 at most.
    let app = &app[..app.len().min(36)];
    let process_type: String = process_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(12)
        .collect();
    format!("{app}-{process_type}-{number}-{suffix:08x}")
}

impl ContainerRow {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.ip.parse().expect("stored IPs are valid"),
            self.port as u16,
        )
    }
}

/// One container of a process type: `web.1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dyno {
    pub process_type: String,
    pub number: u32,
    /// How often this dyno was restarted after a crash, and the crashed one's exit code.
    pub restarts: i64,
    pub last_exit: Option<i64>,
    pub last_exit_oom: bool,
}

impl Dyno {
    pub fn new(process_type: &str, number: u32) -> Self {
        Self {
            process_type: process_type.to_string(),
            number,
            restarts: 0,
            last_exit: None,
            last_exit_oom: false,
        }
    }
}

impl std::fmt::Display for Dyno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.process_type, self.number)
    }
}

/// The limits the containers of `app`'s `process_type` start with.
pub async fn limits(d: &Deployer, app: &str, process_type: &str) -> Result<Limits, DeployError> {
    let set = d.store.resources(app).await?;
    Ok(Limits::for_app(&set, process_type))
}

/// What confines the containers of one process type of an app: its cgroup limits, the host
/// uid range of its user namespace, and whether it may open connections out of the bridge.
pub(super) struct Confinement {
    pub limits: Limits,
    pub users: IdMap,
    pub egress: bool,
}

pub(super) async fn confinement(
    d: &Deployer,
    app: &str,
    process_type: &str,
) -> Result<Confinement, DeployError> {
    Ok(Confinement {
        limits: limits(d, app, process_type).await?,
        users: users(d, app).await?,
        egress: d.store.egress(app).await?,
    })
}

/// The host uid (and gid) of the first app's container root; app `n` (its store slot) gets
/// `USERS_BASE + USERS_SIZE * (n - 1)` onwards: above the host's own users, as `/etc/subuid`
/// ranges start.
const USERS_BASE: u32 = 100_000;
/// How many uids and gids each app's containers have (0..65536, Docker's and Podman's size).
const USERS_SIZE: u32 = 65_536;

/// The host uid range `app`'s containers (and its builds) map their user namespace to: one per
/// app, recorded in the store so it stays the same across restarts and no two apps share one.
pub(super) async fn users(d: &Deployer, app: &str) -> Result<IdMap, DeployError> {
    let slot = d.store.user_range(app).await?;
    range(slot).ok_or_else(|| DeployError::NoUserRange {
        app: app.to_string(),
    })
}

/// The host ids of range `slot` (1, 2, …), if they fit below `u32::MAX`.
fn range(slot: u32) -> Option<IdMap> {
    let host_id = slot
        .checked_sub(1)?
        .checked_mul(USERS_SIZE)?
        .checked_add(USERS_BASE)?;
    host_id.checked_add(USERS_SIZE)?;
    Some(IdMap {
        host_id,
        size: USERS_SIZE,
    })
}

/// Starts `dyno` of `release` (recorded as `starting`); returns once its process runs.
pub async fn start(
    d: &Deployer,
    release: &Release,
    image: &Image,
    dyno: &Dyno,
) -> Result<ContainerRow, DeployError> {
    let (process_type, number) = (dyno.process_type.as_str(), dyno.number);
    let command = release
        .process_types
        .get(process_type)
        .ok_or_else(|| DeployError::NoSuchProcessType(process_type.to_string()))?;
    let id = container_id(&release.app, process_type, number);
    let confinement = confinement(d, &release.app, process_type).await?;
    let port = image.config.port().unwrap_or(PORT);
    let net = d.network.attach(&id, confinement.egress).await?;
    let ip = net.ip;
    let row = ContainerRow {
        id: id.clone(),
        app: release.app.clone(),
        release: release.version,
        process_type: process_type.to_string(),
        number: number.into(),
        ip: ip.to_string(),
        port: port.into(),
        created_at: Store::timestamp(),
        state: ContainerState::Starting,
        restarts: dyno.restarts,
        last_exit: dyno.last_exit,
        last_exit_oom: dyno.last_exit_oom,
    };
    if let Err(err) = d.store.insert_container(&row).await {
        d.network.detach(&id, Some(ip)).await;
        return Err(err.into());
    }
    let spec = ContainerSpec {
        log: LogTarget::File {
            path: d.paths.log(&release.app),
            prefix: format!("app[{dyno}]"),
        },
        ..spec(&id, command, release, image, dyno, net, &confinement)
    };
    let runtime = d.runtime.clone();
    let started = tokio::task::spawn_blocking(move || runtime.start(&spec))
        .await
        .expect("runtime start task");
    if let Err(err) = started {
        stop(d, &row).await;
        return Err(err.into());
    }
    info!(id = %row.id, ip = %row.ip, "container started");
    Ok(row)
}

/// The spec of container `id` of `release` (whose image is `image`) running `command` as
/// `dyno` on the network as `net` (its namespace and resolv.conf): its output goes to the
/// shim's own stdout (callers set `log` otherwise).
pub(super) fn spec(
    id: &str,
    command: &str,
    release: &Release,
    image: &Image,
    dyno: &Dyno,
    net: Attachment,
    confinement: &Confinement,
) -> ContainerSpec {
    ContainerSpec {
        id: id.to_string(),
        layers: image.layer_dirs(),
        args: launcher(command),
        env: env(release, image, dyno),
        cwd: cwd(image),
        hostname: id.chars().take(63).collect(),
        binds: vec![net.resolv_conf],
        netns: Some(net.netns),
        log: LogTarget::Inherit,
        stop_grace_secs: STOP_GRACE_SECS,
        limits: confinement.limits.runtime(),
        init: true,
        user: user(image),
        users: Some(confinement.users),
        stop_signal: image.config.stop_signal(),
    }
}

/// The environment of `dyno`: the image's, the release's config (but the registry login),
/// `PORT`, `DYNO`, `HOME`.
fn env(release: &Release, image: &Image, dyno: &Dyno) -> Vec<String> {
    let mut env = image.config.env.clone();
    env.extend(
        release
            .config
            .iter()
            .filter(|(k, _)| !crate::config::is_registry_login(k))
            .map(|(k, v)| format!("{k}={v}")),
    );
    env.extend([
        format!("PORT={}", image.config.port().unwrap_or(PORT)),
        format!("DYNO={dyno}"),
        "HOME=/app".to_string(),
    ]);
    env
}

/// The user containers of `image` run as: its config's numeric `uid[:gid]` (Dockerfile builds
/// store `USER` so), else root.
fn user(image: &Image) -> Option<berth_runtime::User> {
    let (uid, gid) = match image.config.user.split_once(':') {
        Some((uid, gid)) => (uid.parse().ok()?, gid.parse().ok()?),
        None => {
            let uid = image.config.user.parse().ok()?;
            (uid, uid)
        }
    };
    Some(berth_runtime::User { uid, gid })
}

/// Where a container of `image` starts: its `WORKDIR`, else `/app` (buildpack images).
fn cwd(image: &Image) -> String {
    match image.config.working_dir.as_str() {
        "" => "/app".into(),
        dir => dir.into(),
    }
}

/// Whether the container has exited, and with which code.
pub fn exit_code(d: &Deployer, id: &str) -> Option<i32> {
    match d.runtime.state(id) {
        State::Running { .. } => None,
        State::Exited { code } => Some(code),
        State::Gone => Some(-1),
    }
}

/// Stops the container (SIGTERM, SIGKILL after the grace period), removes it, its netns, its
/// address and its record. Errors are logged, not returned: stopping must always make progress.
pub async fn stop(d: &Deployer, row: &ContainerRow) {
    remove(d, &row.id, row.ip.parse().ok()).await;
    if let Err(err) = d.store.delete_container(&row.id).await {
        warn!(id = %row.id, %err, "forgetting a container failed");
    }
    info!(id = %row.id, "container stopped");
}

/// Stops and removes container `id` (the runtime stops a running one first), its netns and its
/// address. Alone, for containers the store has no record of.
pub async fn remove(d: &Deployer, id: &str, ip: Option<Ipv4Addr>) {
    let runtime = d.runtime.clone();
    let owned = id.to_string();
    let removed = tokio::task::spawn_blocking(move || runtime.remove(&owned))
        .await
        .expect("runtime remove task");
    if let Err(err) = removed {
        warn!(%id, %err, "removing a container failed");
    }
    d.network.detach(id, ip).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ranges_follow_each_other_and_stop_below_u32_max() {
        let host = |slot| range(slot).map(|map| (map.host_id, map.size));
        assert_eq!(host(1), Some((100_000, 65_536)));
        assert_eq!(host(2), Some((165_536, 65_536)));
        assert_eq!(host(0), None);
        let last = host(65_534).unwrap();
        assert!(u64::from(last.0) + 65_536 <= u64::from(u32::MAX));
        assert_eq!(host(65_535), None);
    }

    #[test]
    fn ids_are_short_and_safe() {
        let long = "a".repeat(63);
        let id = container_id(&long, "Web_Server.Extra.Long", 12);
        assert!(id.len() <= 64, "{id}");
        assert!(
            id.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{id}"
        );
        assert_ne!(container_id("a", "web", 1), container_id("a", "web", 1));
    }

    #[test]
    fn launcher_sources_profile_d() {
        let args = launcher("python app.py");
        assert_eq!(args[0], "/bin/sh");
        assert!(args[2].contains(".profile.d") && args[2].ends_with("; exec python app.py"));
        let args = run_launcher("a; b");
        assert!(args[2].contains(".profile.d") && args[2].ends_with("; a; b"));
    }
}
