//! Deploys: the only place that decides what runs. A deploy builds (or reuses) an image, makes a
//! release `vN`, and rolls it out: start the new containers → wait until `web` answers HTTP →
//! swap the route → stop the old containers. Anything failing before the swap stops the new
//! containers and leaves the old release serving, with no release recorded.
//!
//! Must not mount, clone or touch links itself (the runtime crate does) and must not serve HTTP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tracing::{info, info_span, warn, Instrument};

use crate::admin::Out;
use crate::build::{self, BuildError};
use crate::config::Config;
use crate::image::{Image, ImageError};
use crate::logs;
use crate::server::Daemon;
use crate::store::{ContainerRow, Formation, NewRelease, Release, StoreError};

pub mod container;
mod health;

/// How long a new `web` container gets to answer HTTP.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum DeployError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0} — check `berth ps` and the server log")]
    Runtime(#[from] berth_runtime::Error),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("the release has no process type {0:?} — check the Procfile")]
    NoSuchProcessType(String),
    #[error("no web process type: add a line like `web: python app.py` (listening on $PORT) to your Procfile")]
    NoWeb,
    #[error("{dyno} exited with code {code} before answering HTTP on $PORT — fix the app; its last log lines:\n{logs}")]
    Crashed {
        dyno: String,
        code: i32,
        logs: String,
    },
    #[error("{dyno} did not answer HTTP on $PORT within {secs} s — make sure it listens on 0.0.0.0:$PORT; its last log lines:\n{logs}")]
    Timeout {
        dyno: String,
        secs: u64,
        logs: String,
    },
    #[error("app {0:?} has no release yet — push code first: git push deploy main")]
    NothingDeployed(String),
}

/// One lock per app: deploys, config changes and destroys of an app run one at a time.
#[derive(Default)]
pub struct AppLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl AppLocks {
    pub async fn lock(&self, app: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .0
            .lock()
            .expect("app locks")
            .entry(app.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// Builds `source` (a checkout of a push) and rolls it out as a new release.
pub async fn deploy_source(
    d: &Daemon,
    app: &str,
    source: PathBuf,
    description: &str,
    out: &Out,
) -> Result<Release, DeployError> {
    let _guard = d.locks.lock(app).await;
    let version = d.store.next_version(app).await?;
    let span = info_span!("deploy", %app, release = version);
    async {
        let config = d.store.config(app).await?;
        let built = build::build(d, app, source, &config, out).await?;
        let previous = d.store.current_release(app).await?;
        let formation = formation_for(
            &built.process_types,
            previous.as_ref().map(|r| &r.formation),
        );
        let new = NewRelease {
            image: built.image,
            config,
            process_types: built.process_types,
            formation,
            description: description.to_string(),
        };
        release(d, app, version, new, out).await
    }
    .instrument(span)
    .await
}

/// Stores `config` as the app's config. Unless `restart` is false or nothing is deployed yet,
/// makes a release with it and rolls it out first; if that fails, the config stays as it was.
pub async fn change_config(
    d: &Daemon,
    app: &str,
    config: Config,
    description: &str,
    restart: bool,
    out: &Out,
) -> Result<Option<Release>, DeployError> {
    let _guard = d.locks.lock(app).await;
    let current = d.store.current_release(app).await?;
    let released = match current.filter(|_| restart) {
        None => None,
        Some(current) => {
            let version = d.store.next_version(app).await?;
            let new = NewRelease {
                image: current.image,
                config: config.clone(),
                process_types: current.process_types,
                formation: current.formation,
                description: description.to_string(),
            };
            let span = info_span!("config", %app, release = version);
            Some(release(d, app, version, new, out).instrument(span).await?)
        }
    };
    d.store.replace_config(app, &config).await?;
    Ok(released)
}

/// The formation of a new release: the previous one's counts for types that still exist,
/// `web=1` for a first deploy.
fn formation_for(
    process_types: &crate::store::ProcessTypes,
    previous: Option<&Formation>,
) -> Formation {
    let mut formation: Formation = process_types
        .keys()
        .filter_map(|t| previous.and_then(|p| p.get(t)).map(|n| (t.clone(), *n)))
        .collect();
    if previous.is_none() && process_types.contains_key("web") {
        formation.insert("web".into(), 1);
    }
    formation
}

/// Rolls out release `version` and records it once it serves.
async fn release(
    d: &Daemon,
    app: &str,
    version: i64,
    new: NewRelease,
    out: &Out,
) -> Result<Release, DeployError> {
    if !new.process_types.contains_key("web") {
        return Err(DeployError::NoWeb);
    }
    // Not recorded yet: it becomes a release only once it serves.
    let candidate = new.release(app, version, String::new());
    roll_out(d, &candidate, out).await?;
    let recorded = d.store.insert_release(app, version, &new).await?;
    out.line(format!(
        "-----> {app} v{version} is live at {}",
        d.app_url(app)
    ))
    .await;
    info!(%app, version, "release live");
    Ok(recorded)
}

async fn load_image(d: &Daemon, digest: &str) -> Result<Image, DeployError> {
    let images = d.images.clone();
    let digest = digest.to_string();
    Ok(tokio::task::spawn_blocking(move || images.image(&digest))
        .await
        .expect("image task")?)
}

/// Start new → health check → swap route → stop old.
async fn roll_out(d: &Daemon, release: &Release, out: &Out) -> Result<(), DeployError> {
    let app = &release.app;
    let image = load_image(d, &release.image).await?;
    let old = d.store.containers(Some(app)).await?;

    out.line(format!("-----> Starting v{}", release.version))
        .await;
    let mut started: Vec<ContainerRow> = Vec::new();
    let result = start_all(d, release, &image, &mut started, out).await;
    if let Err(err) = result {
        for c in &started {
            container::stop(d, c).await;
        }
        out.line(format!(
            "-----> v{} did not start; the previous release keeps serving",
            release.version
        ))
        .await;
        return Err(err);
    }

    let web: Vec<_> = started
        .iter()
        .filter(|c| c.process_type == "web")
        .map(|c| c.addr())
        .collect();
    d.routes.set(&d.app_host(app), web);
    out.line(format!(
        "       Routed {} to v{}",
        d.app_host(app),
        release.version
    ))
    .await;

    if !old.is_empty() {
        out.line(format!("-----> Stopping {} old container(s)", old.len()))
            .await;
        for c in &old {
            container::stop(d, c).await;
        }
    }
    Ok(())
}

async fn start_all(
    d: &Daemon,
    release: &Release,
    image: &Image,
    started: &mut Vec<ContainerRow>,
    out: &Out,
) -> Result<(), DeployError> {
    for (process_type, count) in &release.formation {
        for number in 1..=*count {
            let c = container::start(d, release, image, process_type, number).await?;
            started.push(c);
        }
    }
    for c in started.iter().filter(|c| c.process_type == "web") {
        let dyno = format!("{}.{}", c.process_type, c.number);
        out.line(format!("       Waiting for {dyno} to answer HTTP on $PORT"))
            .await;
        let checked =
            health::wait_until_answers(c.addr(), &d.app_host(&c.app), START_DEADLINE, || {
                container::exit_code(d, &c.id)
            })
            .await;
        let logs = || logs::tail_matching(&d.paths.log(&c.app), &format!("app[{dyno}]"), 20);
        match checked {
            Ok(()) => out.line(format!("       {dyno} is up")).await,
            Err(health::Unhealthy::Exited(code)) => {
                let logs = logs();
                return Err(DeployError::Crashed { dyno, code, logs });
            }
            Err(health::Unhealthy::Timeout) => {
                let logs = logs();
                return Err(DeployError::Timeout {
                    dyno,
                    secs: START_DEADLINE.as_secs(),
                    logs,
                });
            }
        }
    }
    Ok(())
}

/// Stops an app's containers and removes its route (before destroying it).
pub async fn stop_app(d: &Daemon, app: &str) -> Result<(), DeployError> {
    d.routes.set(&d.app_host(app), vec![]);
    for c in d.store.containers(Some(app)).await? {
        container::stop(d, &c).await;
    }
    Ok(())
}

/// On server start: takes back the containers whose shims kept running, routes to them, and
/// cleans up those that died while the server was away and those it has no record of.
pub async fn readopt(d: &Daemon) -> Result<(), DeployError> {
    let mut routes: HashMap<String, Vec<std::net::SocketAddr>> = HashMap::new();
    let known = d.store.containers(None).await?;
    // Containers with no record: a build cut short, or a start the server died in.
    for id in d.runtime.list() {
        if !known.iter().any(|c| c.id == id) {
            warn!(%id, "removing a container the server has no record of");
            container::remove(d, &id, None).await;
        }
    }
    for c in known {
        if container::exit_code(d, &c.id).is_none() {
            d.network
                .mark_used(c.ip.parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED));
            if c.process_type == "web" {
                routes.entry(c.app.clone()).or_default().push(c.addr());
            }
            info!(id = %c.id, "re-adopted container");
        } else {
            warn!(id = %c.id, "container exited while the server was away; cleaning up");
            container::stop(d, &c).await;
        }
    }
    for (app, addrs) in routes {
        d.routes.set(&d.app_host(&app), addrs);
    }
    Ok(())
}

/// Stops every container (ephemeral servers on shutdown).
pub async fn stop_everything(d: &Daemon) {
    match d.store.containers(None).await {
        Ok(all) => {
            for c in all {
                container::stop(d, &c).await;
            }
        }
        Err(err) => warn!(%err, "listing containers to stop failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formations() {
        let types: crate::store::ProcessTypes = [
            ("web".to_string(), "a".to_string()),
            ("worker".to_string(), "b".to_string()),
        ]
        .into();
        assert_eq!(formation_for(&types, None), [("web".to_string(), 1)].into());
        let previous: Formation = [("web".to_string(), 3), ("gone".to_string(), 2)].into();
        assert_eq!(
            formation_for(&types, Some(&previous)),
            [("web".to_string(), 3)].into()
        );
    }
}
