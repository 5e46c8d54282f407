//! The supervisor: converges each app's containers toward its live release, woken by container
//! exits (a pidfd per container's shim), by a timer, by restart backoff and on server start.
//! Converging an app: stop containers that were being started when the server died, drain
//! containers of other releases and extra ones, restart crashed ones with exponential backoff
//! (the first at once, then 1 s, 2 s, 4 s … capped at 20 minutes, as Heroku does; a container
//! that ran for 10 minutes starts over at once), start missing ones, and route to what runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::container::{self, Dyno};
use super::switch::{check, drain_deadline};
use super::{DeployError, Deployer};
use crate::progress::Progress;
use crate::store::{ContainerRow, ContainerState};
use crate::tls::Cert;

/// How often every app is converged even when nothing woke it (a safety net for lost wakes).
const TICK: Duration = Duration::from_secs(10);
/// The longest wait before restarting a crashed container.
const MAX_BACKOFF: Duration = Duration::from_secs(20 * 60);
/// A container that ran this long before crashing is restarted at once.
const STABLE: Duration = Duration::from_secs(10 * 60);

impl Deployer {
    /// On server start: marks deploys the last server left unfinished as failed, forgets
    /// containers that are gone, removes those it has no record of, finishes drains, routes to
    /// what runs and converges every app (which after a host reboot starts them all again).
    /// Then supervises until `shutdown`.
    pub async fn run(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, DeployError> {
        for (app, version) in self
            .store
            .fail_interrupted("the server stopped during this deploy")
            .await?
        {
            warn!(%app, version, "a deploy was cut short by a server stop; marked failed");
        }
        let known = self.store.containers(None).await?;
        for id in self.runtime.list() {
            if !known.iter().any(|c| c.id == id) {
                warn!(%id, "removing a container the server has no record of");
                container::remove(self, &id, None).await;
            }
        }
        for row in self.store.certs().await? {
            match Cert::parse(&row.chain, &row.key) {
                Ok(cert) => {
                    let cert = super::AppCert {
                        cert,
                        redirect_https: row.redirect_https,
                    };
                    self.app_certs
                        .lock()
                        .expect("app certs")
                        .insert(row.app, cert);
                }
                Err(err) => {
                    warn!(app = %row.app, %err, "a stored certificate no longer parses; not serving it")
                }
            }
        }
        let apps = self.store.app_names().await?;
        let mut draining = Vec::new();
        let mut no_egress = Vec::new();
        for c in &known {
            if !apps.contains(&c.app) {
                warn!(id = %c.id, app = %c.app, "stopping a container of an app that was destroyed");
                container::stop(self, c).await;
                continue;
            }
            // Taken until the record goes, running or not: stopping it frees it.
            if let Ok(ip) = c.ip.parse() {
                self.network.mark_used(ip);
                if !self.store.egress(&c.app).await? {
                    no_egress.push(ip);
                }
            }
            if container::exit_code(self, &c.id).is_none() {
                self.watch(c);
                info!(id = %c.id, "re-adopted container");
            }
            if c.state == ContainerState::Draining {
                draining.push(c.clone());
            }
        }
        // The firewall's set was emptied with its table at server start.
        self.network.set_egress(&no_egress, false).await?;
        self.drain_all(draining).await?;
        for app in &apps {
            self.route(app).await?;
            self.wake(app);
        }
        let wakes = self.wakes.lock().expect("wakes").take();
        let d = self.clone();
        Ok(tokio::spawn(async move {
            if let Some(wakes) = wakes {
                d.supervise(wakes, shutdown).await;
            }
        }))
    }

    /// Asks the supervisor to converge `app`.
    pub(super) fn wake(&self, app: &str) {
        let _ = self.wake.send(app.to_string());
    }

    /// Wakes the supervisor for `c`'s app when its shim exits.
    pub(super) fn watch(self: &Arc<Self>, c: &ContainerRow) {
        let (d, app, id) = (self.clone(), c.app.clone(), c.id.clone());
        tokio::spawn(async move {
            if let Err(err) = d.runtime.wait_exit(&id).await {
                warn!(%id, %err, "cannot watch a container; the timer will notice its exit");
                return;
            }
            d.wake(&app);
        });
    }

    async fn supervise(
        self: Arc<Self>,
        mut wakes: tokio::sync::mpsc::UnboundedReceiver<String>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(app) = wakes.recv() => self.queue(app),
                _ = tick.tick() => match self.store.apps().await {
                    Ok(apps) => apps.into_iter().for_each(|a| {
                        let log = self.paths.log(&a.name);
                        match crate::logs::rotate(&log) {
                            Ok(true) => info!(app = %a.name, "rotated the app's log"),
                            Ok(false) => {}
                            Err(err) => warn!(app = %a.name, %err, "rotating the app's log failed"),
                        }
                        self.queue(a.name)
                    }),
                    Err(err) => warn!(%err, "listing apps to converge failed"),
                },
            }
        }
    }

    /// Converges `app` in its own task, unless one is already queued.
    fn queue(self: &Arc<Self>, app: String) {
        if !self.queued.lock().expect("queued").insert(app.clone()) {
            return;
        }
        let d = self.clone();
        tokio::spawn(async move {
            let guard = d.locks.lock(&app).await;
            d.queued.lock().expect("queued").remove(&app);
            match d.converge(&app).await {
                Ok(Some(delay)) => {
                    drop(guard);
                    tokio::time::sleep(delay).await;
                    d.wake(&app);
                }
                Ok(None) => {}
                Err(err) => warn!(%app, %err, "converging failed"),
            }
        });
    }

    /// One convergence step of `app` (the caller holds its lock). Returns when to look again
    /// for a crashed container still in backoff.
    async fn converge(self: &Arc<Self>, app: &str) -> Result<Option<Duration>, DeployError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        let Some(live) = self.store.live_release(app).await? else {
            return Ok(None);
        };
        let containers = self.store.containers(Some(app)).await?;
        let wanted = |c: &ContainerRow| {
            c.release == live.version
                && live
                    .formation
                    .get(&c.process_type)
                    .is_some_and(|n| c.number <= i64::from(*n))
        };
        let mut extra = Vec::new();
        for c in &containers {
            match c.state {
                // A start the previous server died in: its switch is over.
                ContainerState::Starting => container::stop(self, c).await,
                ContainerState::Up if !wanted(c) => extra.push(c.clone()),
                _ => {}
            }
        }
        if !extra.is_empty() {
            info!(%app, count = extra.len(), "draining containers that should no longer run");
            self.drain_all(extra).await?;
        }
        self.route(app).await?;

        let mut next = None::<Duration>;
        for (process_type, count) in &live.formation {
            for number in 1..=*count {
                let current = containers.iter().find(|c| {
                    c.state == ContainerState::Up
                        && c.release == live.version
                        && c.process_type == *process_type
                        && c.number == i64::from(number)
                });
                let mut dyno = Dyno::new(process_type, number);
                if let Some(c) = current {
                    let Some(code) = container::exit_code(self, &c.id) else {
                        continue; // running
                    };
                    let wait = self.backoff(c);
                    if !wait.is_zero() {
                        next = Some(next.map_or(wait, |n| n.min(wait)));
                        continue;
                    }
                    let oom = self.runtime.oom_killed(&c.id);
                    warn!(id = %c.id, code, oom, restarts = c.restarts, "restarting a crashed container");
                    if oom {
                        let limits = container::limits(self, app, process_type).await?;
                        crate::logs::append(
                            &self.paths.log(app),
                            &format!("berth[{dyno}]"),
                            &format!(
                                "out of memory: killed at its {} limit — raise it with `berth resources:set {app} {process_type} --memory 1G`",
                                crate::limits::format_memory(limits.memory)
                            ),
                        );
                    }
                    container::stop(self, c).await;
                    self.crashed_at.lock().expect("crashes").remove(&c.id);
                    dyno.restarts = c.restarts + 1;
                    dyno.last_exit = Some(code.into());
                    dyno.last_exit_oom = oom;
                } else {
                    info!(%app, %dyno, "starting a missing container");
                }
                self.start_dyno(&live, &dyno).await?;
            }
        }
        Ok(next)
    }

    /// How long the crashed container `c` still waits before its restart.
    fn backoff(&self, c: &ContainerRow) -> Duration {
        let now = Instant::now();
        let seen = *self
            .crashed_at
            .lock()
            .expect("crashes")
            .entry(c.id.clone())
            .or_insert(now);
        let ran = chrono::DateTime::parse_from_rfc3339(&c.created_at)
            .ok()
            .and_then(|t| (chrono::Utc::now() - t.to_utc()).to_std().ok())
            .unwrap_or_default();
        let delay = if c.restarts == 0 || ran >= STABLE {
            Duration::ZERO
        } else {
            Duration::from_secs(1u64 << (c.restarts - 1).min(11)).min(MAX_BACKOFF)
        };
        delay.saturating_sub(now - seen)
    }

    /// Starts one container of the live release, checks it and puts it in service. One that
    /// fails its check stays recorded, stopped: the next convergence restarts it with backoff.
    async fn start_dyno(
        self: &Arc<Self>,
        live: &crate::store::Release,
        dyno: &Dyno,
    ) -> Result<(), DeployError> {
        let image = self.load_image(&live.image).await?;
        let c = container::start(self, live, &image, dyno).await?;
        let checked = check(self, live, &c, &Progress::discard()).await;
        self.store
            .set_container_state(&c.id, ContainerState::Up)
            .await?;
        match checked {
            Ok(()) => {
                self.watch(&c);
                self.route(&live.app).await?;
            }
            Err(err) => {
                warn!(id = %c.id, %err, "a restarted container failed its check");
                let runtime = self.runtime.clone();
                let id = c.id.clone();
                let _ = tokio::task::spawn_blocking(move || runtime.stop(&id)).await;
                self.wake(&live.app);
            }
        }
        Ok(())
    }

    /// Marks `containers` draining and drains them, each with its app's drain deadline (on
    /// server start they come from every app).
    async fn drain_all(self: &Arc<Self>, containers: Vec<ContainerRow>) -> Result<(), DeployError> {
        let mut by_app: std::collections::BTreeMap<String, Vec<ContainerRow>> = Default::default();
        for c in containers {
            self.store
                .set_container_state(&c.id, ContainerState::Draining)
                .await?;
            by_app.entry(c.app.clone()).or_default().push(c);
        }
        for (app, containers) in by_app {
            let deadline = match self.store.live_release(&app).await? {
                Some(live) => drain_deadline(&live),
                None => super::DRAIN_DEADLINE,
            };
            self.drain(containers, deadline);
        }
        Ok(())
    }
}
