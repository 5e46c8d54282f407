//! The switch every change goes through: start the new containers → each passes its check →
//! (one store transaction) the release is live, the new containers `up`, the replaced ones
//! `draining` → swap the route → drain the replaced ones and stop them in the background.
//! Anything failing before the transaction stops the new containers; the old ones keep serving.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::container::{self, Dyno};
use super::{health, DeployError, Deployer, DRAIN_DEADLINE, START_DEADLINE};
use crate::logs;
use crate::progress::Progress;
use crate::proxy::Target;
use crate::store::{ContainerRow, ContainerState, Release};

/// How long a non-web container must keep running to count as up.
const SETTLE: Duration = Duration::from_secs(1);

/// Switches the app to `release`'s formation (only `only`'s containers when given: a restart of
/// one process type). The release is already recorded; on success it is live.
pub(super) async fn switch(
    d: &Arc<Deployer>,
    release: &Release,
    only: Option<&str>,
    out: &Progress,
) -> Result<(), DeployError> {
    let started = start_and_check(d, release, only, out).await?;
    if let Err(err) = commit(d, release, &started, only, out).await {
        futures::future::join_all(started.iter().map(|c| container::stop(d, c))).await;
        return Err(err);
    }
    Ok(())
}

/// Starts `release`'s containers (of `only`'s type, when given) and checks each. On failure
/// stops those it started: what ran before keeps serving.
pub(super) async fn start_and_check(
    d: &Arc<Deployer>,
    release: &Release,
    only: Option<&str>,
    out: &Progress,
) -> Result<Vec<ContainerRow>, DeployError> {
    let image = d.load_image(&release.image).await?;
    out.line(format!("-----> Starting v{}", release.version))
        .await;
    let mut started: Vec<ContainerRow> = Vec::new();
    let mut result = Ok(());
    'start: for (process_type, count) in &release.formation {
        if only.is_some_and(|t| t != process_type) {
            continue;
        }
        for number in 1..=*count {
            match container::start(d, release, &image, &Dyno::new(process_type, number)).await {
                Ok(c) => started.push(c),
                Err(err) => {
                    result = Err(err);
                    break 'start;
                }
            }
        }
    }
    if result.is_ok() {
        for c in &started {
            result = check(d, release, c, out).await;
            if result.is_err() {
                break;
            }
        }
    }
    if let Err(err) = result {
        futures::future::join_all(started.iter().map(|c| container::stop(d, c))).await;
        out.line(format!(
            "-----> v{} did not pass its checks; what ran before keeps serving",
            release.version
        ))
        .await;
        return Err(err);
    }
    Ok(started)
}

/// Makes `release` live with the `started` containers, replacing the app's `up` ones (of
/// `only`'s type, when given): one store transaction, then the route, then the drain. Fails only
/// when the transaction does (then nothing changed).
pub(super) async fn commit(
    d: &Arc<Deployer>,
    release: &Release,
    started: &[ContainerRow],
    only: Option<&str>,
    out: &Progress,
) -> Result<(), DeployError> {
    let app = &release.app;
    let replaced: Vec<ContainerRow> = d
        .store
        .containers(Some(app))
        .await?
        .into_iter()
        .filter(|c| c.state == ContainerState::Up)
        .filter(|c| only.is_none_or(|t| c.process_type == t))
        .collect();
    let ids = |cs: &[ContainerRow]| cs.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    d.store
        .promote(app, release.version, &ids(started), &ids(&replaced))
        .await?;
    for c in started {
        d.watch(c);
    }
    if let Err(err) = d.route(app).await {
        // The release is live; the supervisor routes to it on its next look.
        warn!(%app, %err, "routing to the new release failed; retrying");
        d.wake(app);
    }
    out.line(format!(
        "-----> {app} v{} is live at {}",
        release.version,
        d.app_url(app)
    ))
    .await;
    info!(%app, version = release.version, "release live");
    if !replaced.is_empty() {
        out.line(format!(
            "       Draining {} old container(s) in the background (see `berth ps {app}`)",
            replaced.len()
        ))
        .await;
        d.drain(replaced, drain_deadline(release));
    }
    d.collect_later();
    Ok(())
}

/// Checks a new container of `release`: its app.json startup checks in order, or else berth's
/// default: `web` answers `GET /` below 500; others keep running for a moment.
pub(super) async fn check(
    d: &Deployer,
    release: &Release,
    c: &ContainerRow,
    out: &Progress,
) -> Result<(), DeployError> {
    let dyno = format!("{}.{}", c.process_type, c.number);
    let exited = || container::exit_code(d, &c.id);
    let host = d.app_host(&c.app);
    let checks = crate::checks::startup(&release.checks, &c.process_type);
    let mut failed = None;
    let checked = if !checks.is_empty() {
        let mut result = Ok(());
        for check in checks {
            out.line(format!("       Checking {dyno}: {}", describe(check)))
                .await;
            result = match check.uptime {
                Some(secs) => settle(d, c, Duration::from_secs(secs)).await,
                None => health::path_check(c.addr(), &host, check, exited).await,
            };
            if result.is_err() {
                failed = Some(check.name.clone());
                break;
            }
        }
        result
    } else if c.process_type == "web" {
        out.line(format!("       Waiting for {dyno} to answer HTTP on $PORT"))
            .await;
        health::wait_until_healthy(c.addr(), &host, START_DEADLINE, exited).await
    } else {
        settle(d, c, SETTLE).await
    };
    let needle = format!("app[{dyno}]");
    let logs = || logs::tail_matching(&d.paths.log(&c.app), &needle, 20);
    match checked {
        Ok(()) => {
            out.line(format!("       {dyno} is up")).await;
            Ok(())
        }
        Err(health::Unhealthy::Exited(code)) => Err(DeployError::Crashed {
            dyno,
            code,
            logs: logs(),
        }),
        Err(health::Unhealthy::Timeout) => Err(DeployError::Timeout {
            dyno,
            secs: START_DEADLINE.as_secs(),
            logs: logs(),
        }),
        Err(health::Unhealthy::Status(status)) => Err(DeployError::BadStatus {
            dyno,
            status,
            logs: logs(),
        }),
        Err(health::Unhealthy::Check(reason)) => Err(DeployError::CheckFailed {
            dyno,
            check: failed.unwrap_or_default(),
            reason,
            logs: logs(),
        }),
    }
}

/// A check as the pusher sees it: `"ready": GET /health answers with "ok"`.
fn describe(check: &crate::checks::Check) -> String {
    let path = check.path.as_deref().unwrap_or("/");
    let what = match (check.uptime, &check.content) {
        (Some(secs), _) => format!("still running after {secs} s"),
        (None, Some(content)) => format!("GET {path} answers with {content:?}"),
        (None, None) => format!("GET {path} answers"),
    };
    format!("{:?}: {what}", check.name)
}

/// A container is up when it has not exited within `secs` (non-web by default: [`SETTLE`]).
async fn settle(d: &Deployer, c: &ContainerRow, secs: Duration) -> Result<(), health::Unhealthy> {
    let _ = tokio::time::timeout(secs, d.runtime.wait_exit(&c.id)).await;
    match container::exit_code(d, &c.id) {
        None => Ok(()),
        Some(code) => Err(health::Unhealthy::Exited(code)),
    }
}

/// The app's drain deadline: `BERTH_DRAIN_TIMEOUT` seconds, or [`DRAIN_DEADLINE`].
pub(super) fn drain_deadline(release: &Release) -> Duration {
    match release.config.get("BERTH_DRAIN_TIMEOUT") {
        None => DRAIN_DEADLINE,
        Some(value) => value.trim().parse().map(Duration::from_secs).unwrap_or_else(|_| {
            warn!(app = %release.app, %value, "BERTH_DRAIN_TIMEOUT is not a number of seconds; using the default");
            DRAIN_DEADLINE
        }),
    }
}

impl Deployer {
    /// In the background, for each container (already `draining` in the store and out of the
    /// route): waits until the proxy has no request in flight to it, or `deadline`, then stops
    /// it (SIGTERM, SIGKILL after the grace period). All in parallel.
    pub(super) fn drain(self: &Arc<Self>, containers: Vec<ContainerRow>, deadline: Duration) {
        for c in containers {
            let d = self.clone();
            tokio::spawn(async move {
                if c.process_type == "web" && !d.routes.wait_idle(c.addr(), deadline).await {
                    warn!(id = %c.id, secs = deadline.as_secs(), "requests still in flight at the drain deadline; stopping anyway");
                    // Streams and WebSockets still open end cleanly now, before the app goes.
                    d.routes.disconnect(c.addr());
                }
                container::stop(&d, &c).await;
                d.routes.disconnect(c.addr());
            });
        }
    }

    /// Points the app's hosts (`APP.<domain>` and its custom domains) at its live release's
    /// running `web` containers that are up.
    pub(super) async fn route(&self, app: &str) -> Result<(), DeployError> {
        let hosts = self.hosts(app).await?;
        let cert = self.app_certs.lock().expect("app certs").get(app).cloned();
        let covering = |host: &str| cert.clone().filter(|c| c.cert.covers(host));
        for host in &hosts {
            self.certs.set(host, covering(host).map(|c| c.cert));
        }
        let Some(live) = self.store.live_release(app).await? else {
            hosts.iter().for_each(|host| self.routes.remove(host));
            return Ok(());
        };
        let targets: Vec<_> = self
            .store
            .containers(Some(app))
            .await?
            .iter()
            .filter(|c| {
                c.state == ContainerState::Up
                    && c.release == live.version
                    && c.process_type == "web"
                    && container::exit_code(self, &c.id).is_none()
            })
            .map(|c| Target {
                addr: c.addr(),
                netns: Some(self.network.netns(&c.id)),
            })
            .collect();
        for host in &hosts {
            self.routes.set(host, targets.clone());
            let redirect = covering(host).is_some_and(|c| c.redirect_https);
            self.routes
                .redirect_https(host, self.https_port.filter(|_| redirect));
        }
        Ok(())
    }

    /// Every host the app answers at.
    pub async fn hosts(&self, app: &str) -> Result<Vec<String>, DeployError> {
        let mut hosts = vec![self.app_host(app)];
        hosts.extend(self.store.domains(app).await?);
        Ok(hosts)
    }

    /// The proxy's request counters of all the app's hosts, added up (since the server started).
    pub async fn traffic(&self, app: &str) -> Result<crate::proxy::HostStats, DeployError> {
        let mut total = crate::proxy::HostStats::default();
        for host in self.hosts(app).await? {
            if let Some(stats) = self.routes.stats(&host) {
                total += stats;
            }
        }
        Ok(total)
    }
}
