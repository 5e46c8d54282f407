//! Deploys: the only place that decides what runs. Each app's desired state is its one `live`
//! release (image, config, process types, formation) in the store; [`Deployer`] converges the
//! running containers toward it.
//!
//! Every change — a push, a config change, a scale, a restart, a rollback — goes through one
//! switch ([`switch`]): record what should run first (a `deploying` release), start the new
//! containers, check them, then in one store transaction make the release live and the replaced
//! containers `draining`, swap the route, and drain and stop the old containers in the background.
//! A failed check stops the new containers and marks the release `failed`: the old one keeps
//! serving. The supervisor ([`supervisor`]) converges on every container exit, on a timer and
//! on server start: restarts crashed containers with backoff, starts missing ones (after a host
//! reboot), stops extra ones, finishes drains and routes only to what is live and running.
//!
//! Must not mount, clone or touch links itself (the runtime crate does), must not serve HTTP
//! (the proxy does) and must not know who listens to its progress ([`Progress`]).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::mpsc;
use tracing::{info_span, Instrument};

use crate::build::{BuildError, Builder};
use crate::config::Config;
use crate::image::{Image, ImageError, ImageStore};
use crate::limits::BuildLimits;
use crate::locks::Locks;
use crate::network::{Network, NetworkError};
use crate::paths::Paths;
use crate::progress::Progress;
use crate::proxy::Routes;
use crate::store::{
    CertRow, ContainerRow, Formation, NewRelease, Release, ReleaseStatus, Store, StoreError,
};
use crate::tls::{Cert, Certs};

mod container;
pub mod gc;
mod health;
pub mod journal;
mod release_phase;
pub mod run;
mod supervisor;
mod switch;

/// How long a new `web` container gets to answer HTTP.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a replaced `web` container may finish its requests before it is stopped, unless the
/// app's `BERTH_DRAIN_TIMEOUT` config var (seconds) says otherwise.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
/// The most containers of one process type `ps:scale` accepts.
pub const MAX_SCALE: u32 = 50;

#[derive(Debug, Error)]
pub enum DeployError {
    #[error(transparent)]
    Build(Box<BuildError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("{0} — check `berth ps` and the server log")]
    Runtime(#[from] berth_runtime::Error),
    #[error(transparent)]
    Domain(#[from] crate::domain::InvalidDomain),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("the certificate covers none of {app}'s hosts ({hosts}) — add its host with `berth domains:add {app} HOST` first, or use a certificate for one of them")]
    CertCoversNothing { app: String, hosts: String },
    #[error("{app} has no certificate — add one with `berth certs:add {app} CERT KEY`")]
    NoCert { app: String },
    #[error("no host uid range is left for {app}'s containers (berth hands out 65534, one per app ever created) — this needs a change in berth")]
    NoUserRange { app: String },
    #[error("the release has no process type {0:?} — check the Procfile")]
    NoSuchProcessType(String),
    #[error("no web process type: add a line like `web: python app.py` (listening on $PORT) to your Procfile")]
    NoWeb,
    #[error("{app} has no process type {process_type:?} — its process types are: {known}")]
    UnknownProcessType {
        app: String,
        process_type: String,
        known: String,
    },
    #[error("{process_type}={count} is more than berth runs of one process type ({MAX_SCALE}) — scale to {MAX_SCALE} or fewer")]
    TooMany { process_type: String, count: u32 },
    #[error("{dyno} exited with code {code} before passing its check — fix the app; its last log lines:\n{logs}")]
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
    #[error("{dyno} answered GET / with status {status} — a release goes live only when / answers below 500; its last log lines:\n{logs}")]
    BadStatus {
        dyno: String,
        status: u16,
        logs: String,
    },
    #[error("{dyno} failed its app.json check {check:?}: {reason} — fix the app or the check; its last log lines:\n{logs}")]
    CheckFailed {
        dyno: String,
        check: String,
        reason: String,
        logs: String,
    },
    #[error("app {0:?} has no release yet — push code first: git push deploy main")]
    NothingDeployed(String),
    #[error("{app} has no release v{version} — see `berth releases {app}`")]
    NoSuchRelease { app: String, version: i64 },
    #[error("{app} v{version} failed ({reason}) — roll back to a release that was live; see `berth releases {app}`")]
    RollbackToFailed {
        app: String,
        version: i64,
        reason: String,
    },
    #[error("{app} v{version}'s image was removed by gc (berth keeps the images of each app's last {keep} releases; `berth server --keep-releases N` keeps more) — roll back to a newer release (see `berth releases {app}`) or push that commit again")]
    ImageCollected {
        app: String,
        version: i64,
        keep: usize,
    },
    #[error("{app} has no earlier release to roll back to — see `berth releases {app}`")]
    NoEarlierRelease { app: String },
    #[error("no checked release of {app} is waiting for this push (it was discarded after {secs} s) — push again")]
    NoPendingPush { app: String, secs: u64 },
    #[error("the push ended before its release was checked, so nothing was deployed — push again")]
    PushEnded,
    #[error("the release command exited with code {code} — see its output above; the release did not go live and what ran before keeps serving")]
    ReleasePhaseFailed { code: i32 },
    #[error(
        "the release command ran longer than {secs} s and was stopped; the release did not go live"
    )]
    ReleasePhaseTimeout { secs: u64 },
    #[error("the release command ran out of memory (its limit is {limit}) — raise it with `berth resources:set APP release --memory 1G`; the release did not go live")]
    ReleasePhaseOutOfMemory { limit: String },
    #[error("`release` is the release command, run once per release, not a process type to scale")]
    ScaleRelease,
    #[error("the server is stopping — run it again once it is back")]
    Stopping,
}

impl From<BuildError> for DeployError {
    fn from(err: BuildError) -> Self {
        Self::Build(Box::new(err))
    }
}

/// An app's certificate, parsed, and whether its hosts' plain-HTTP requests go to HTTPS.
#[derive(Clone)]
struct AppCert {
    cert: Cert,
    redirect_https: bool,
}

/// How long a checked release waits for git to update the branch (post-receive) before it is
/// discarded.
pub const PROMOTE_DEADLINE: Duration = Duration::from_secs(60);

/// A pushed release that passed its checks and waits for git to update the branch. It holds
/// the app's lock, so nothing else changes the app in between.
struct Pending {
    release: Release,
    started: Vec<ContainerRow>,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

/// Who and what a push deploys.
pub struct Push<'a> {
    /// The push's id (`BERTH_PUSH_ID`).
    pub id: &'a str,
    /// The pushed commit (`SOURCE_VERSION` in the build).
    pub commit: &'a str,
    /// The name of the SSH key that pushed.
    pub by: &'a str,
}

/// The handles deploys need, and nothing more.
pub struct DeployerParts {
    pub store: Store,
    pub images: Arc<ImageStore>,
    pub runtime: Arc<berth_runtime::Runtime>,
    pub routes: Arc<Routes>,
    /// The certificates the HTTPS listener serves, by host.
    pub certs: Arc<Certs>,
    /// The port of `--https`, when it is on.
    pub https_port: Option<u16>,
    pub network: Arc<Network>,
    pub builder: Builder,
    pub paths: Paths,
    /// Apps are served at `APP.<domain>`.
    pub domain: String,
    /// How many of each app's latest releases keep their images ([`gc`]).
    pub keep_releases: usize,
}

/// Decides and converges what runs. Shared as `Arc<Deployer>`.
pub struct Deployer {
    store: Store,
    images: Arc<ImageStore>,
    runtime: Arc<berth_runtime::Runtime>,
    routes: Arc<Routes>,
    certs: Arc<Certs>,
    /// Each app's certificate, parsed once.
    app_certs: Mutex<HashMap<String, AppCert>>,
    /// The port of `--https`, when it is on (for redirects).
    https_port: Option<u16>,
    network: Arc<Network>,
    builder: Builder,
    paths: Paths,
    domain: String,
    keep_releases: usize,
    /// One lock per app: switches and convergence of an app run one at a time.
    locks: Locks,
    /// Apps whose containers changed (an exit, a timer); the supervisor converges them.
    wake: mpsc::UnboundedSender<String>,
    wakes: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Apps with a convergence queued, so wakes do not pile up.
    queued: Mutex<HashSet<String>>,
    /// When each crashed container was first seen exited (for restart backoff).
    crashed_at: Mutex<HashMap<String, Instant>>,
    /// Set when the server stops everything: convergence starts nothing any more.
    stopping: std::sync::atomic::AtomicBool,
    /// One-off runs in progress (`berth run`).
    runs: run::Runs,
    /// Checked releases of pushes whose branch is not updated yet, by push id.
    pending: Mutex<HashMap<String, Pending>>,
    /// Pushes that ended (by id, with when), for a check that finishes after its push ended.
    ended: Mutex<HashMap<String, Instant>>,
    /// What each deploy printed: live while it runs, kept with its release.
    journals: journal::Journals,
    /// A background collection waits to start ([`Deployer::collect_later`]).
    collection_queued: std::sync::atomic::AtomicBool,
}

impl Deployer {
    pub fn new(parts: DeployerParts) -> Arc<Self> {
        let (wake, wakes) = mpsc::unbounded_channel();
        let journals = journal::Journals::new(parts.paths.outputs());
        Arc::new(Self {
            store: parts.store,
            images: parts.images,
            runtime: parts.runtime,
            routes: parts.routes,
            certs: parts.certs,
            app_certs: Mutex::new(HashMap::new()),
            https_port: parts.https_port,
            network: parts.network,
            builder: parts.builder,
            paths: parts.paths,
            domain: parts.domain,
            keep_releases: parts.keep_releases,
            locks: Locks::default(),
            wake,
            wakes: Mutex::new(Some(wakes)),
            queued: Mutex::new(HashSet::new()),
            crashed_at: Mutex::new(HashMap::new()),
            stopping: false.into(),
            runs: run::Runs::default(),
            pending: Mutex::new(HashMap::new()),
            ended: Mutex::new(HashMap::new()),
            journals,
            collection_queued: false.into(),
        })
    }

    /// What each deploy printed.
    pub fn journals(&self) -> &journal::Journals {
        &self.journals
    }

    /// Runs a deploy of `app` with its output recorded ([`journal`]): watchable while it
    /// runs, kept with the release it made, even a failed one.
    async fn recorded<T, Fut>(
        &self,
        app: &str,
        out: &Progress,
        deploy: impl FnOnce(Progress) -> Fut,
    ) -> Result<T, DeployError>
    where
        Fut: std::future::Future<Output = Result<T, DeployError>>,
    {
        let latest = |releases: Vec<Release>| releases.first().map(|r| r.version);
        let before = latest(self.store.releases(app).await?);
        let recording = self.journals.begin(app);
        let result = deploy(out.teed(recording.sink())).await;
        if let Ok(after @ Some(version)) = self.store.releases(app).await.map(latest) {
            if after > before {
                recording.save(version);
            }
        }
        result
    }

    /// How many of each app's latest releases keep their images.
    pub fn keep_releases(&self) -> usize {
        self.keep_releases
    }

    /// The builder (for `stack:build`).
    pub fn builder(&self) -> &Builder {
        &self.builder
    }

    /// The Host an app's route answers to.
    pub fn app_host(&self, app: &str) -> String {
        format!("{app}.{}", self.domain)
    }

    /// The default URL of an app.
    pub fn app_url(&self, app: &str) -> String {
        format!("http://{}", self.app_host(app))
    }

    /// Builds `source` (the checkout of push `push`), records it as a new release, starts it
    /// and checks it; it goes live with [`Deployer::promote_push`] once git has updated the
    /// branch, or is discarded by [`Deployer::push_ended`]. The app stays locked in between.
    pub async fn prepare_push(
        self: &Arc<Self>,
        app: &str,
        source: PathBuf,
        description: &str,
        push: &Push<'_>,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        let (by, push_id) = (push.by, push.id);
        let guard = self.locks.lock(app).await;
        let recorded = self.recorded(app, out, |out| async move {
            let out = &out;
            // Until the release naming the new image is recorded.
            let _writing = self.images.writing().await;
            let config = self.store.config(app).await?;
            let limits = BuildLimits::with(&self.store.build_limits(app).await?);
            let users = container::users(self, app).await?;
            let built = self
                .builder
                .build(
                    crate::build::Job {
                        app,
                        source_version: push.commit,
                        config: &config,
                        limits,
                        users,
                    },
                    source,
                    out,
                )
                .await?;
            let live = self.store.live_release(app).await?;
            let formation =
                formation_for(&built.process_types, live.as_ref().map(|r| &r.formation));
            let new = NewRelease {
                image: built.image,
                config,
                process_types: built.process_types,
                formation,
                description: description.to_string(),
                created_by: by.to_string(),
                checks: built.checks,
            };
            self.start_release(app, new, true, out).await
        });
        let (release, started) = recorded.instrument(info_span!("deploy", %app)).await?;
        let version = release.version;
        let pending = Pending {
            release,
            started,
            _guard: guard,
        };
        let push = push_id;
        if self.ended.lock().expect("ended").remove(push).is_some() {
            self.discard(pending, "the push ended before its release was checked")
                .await;
            return Err(DeployError::PushEnded);
        }
        let release = pending.release.clone();
        self.pending
            .lock()
            .expect("pending")
            .insert(push.to_string(), pending);
        let (d, push) = (self.clone(), push.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(PROMOTE_DEADLINE).await;
            d.push_ended(&push).await;
        });
        out.line(format!(
            "-----> v{version} passed its checks; it goes live once git has updated the branch"
        ))
        .await;
        Ok(release)
    }

    /// Git has updated the branch of push `push`: its checked release goes live.
    pub async fn promote_push(
        self: &Arc<Self>,
        app: &str,
        push: &str,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        let pending = self.pending.lock().expect("pending").remove(push);
        let Some(Pending {
            release, started, ..
        }) = pending
        else {
            return Err(DeployError::NoPendingPush {
                app: app.to_string(),
                secs: PROMOTE_DEADLINE.as_secs(),
            });
        };
        let span = info_span!("deploy", %app, release = release.version);
        self.commit(release, started, out).instrument(span).await
    }

    /// Push `push` is over (its git-receive-pack exited): a checked release it left waiting
    /// did not get its branch updated, so it is discarded and marked failed.
    pub async fn push_ended(&self, push: &str) {
        let pending = self.pending.lock().expect("pending").remove(push);
        match pending {
            Some(pending) => {
                let reason = "the push did not update the branch (rejected or cut short), so this release never went live";
                self.discard(pending, reason).await;
            }
            None => {
                let mut ended = self.ended.lock().expect("ended");
                ended.retain(|_, at| at.elapsed() < Duration::from_secs(3600));
                ended.insert(push.to_string(), Instant::now());
            }
        }
    }

    async fn discard(&self, pending: Pending, reason: &str) {
        let Pending {
            release, started, ..
        } = pending;
        tracing::warn!(app = %release.app, version = release.version, reason, "discarding a checked release");
        futures::future::join_all(started.iter().map(|c| container::stop(self, c))).await;
        if let Err(err) = self
            .store
            .fail_release(&release.app, release.version, reason)
            .await
        {
            tracing::warn!(%err, "recording a discarded release failed");
        }
    }

    /// Changes the app's config with `edit` (applied under the app's lock, so concurrent
    /// changes never lose one). Unless `restart` is false or nothing is deployed yet, switches to
    /// a release with the new config first; if that fails, the config stays as it was.
    pub async fn change_config(
        self: &Arc<Self>,
        app: &str,
        description: &str,
        restart: bool,
        by: &str,
        out: &Progress,
        edit: impl FnOnce(&mut Config),
    ) -> Result<Option<Release>, DeployError> {
        let _guard = self.locks.lock(app).await;
        let mut config = self.store.config(app).await?;
        edit(&mut config);
        let live = self.store.live_release(app).await?;
        let released = match live.filter(|_| restart) {
            None => None,
            Some(live) => {
                let new = NewRelease {
                    config: config.clone(),
                    description: description.to_string(),
                    created_by: by.to_string(),
                    ..next_of(&live)
                };
                let span = info_span!("config", %app);
                Some(self.release(app, new, true, out).instrument(span).await?)
            }
        };
        self.store.replace_config(app, &config).await?;
        Ok(released)
    }

    /// Lets `app`'s containers open connections out of the bridge (`egress`) or not: stored
    /// first, then applied at once, without a restart, to every container of the app that has
    /// an address (the firewall's set). Returns how many containers that was.
    pub async fn set_egress(&self, app: &str, egress: bool) -> Result<usize, DeployError> {
        let _guard = self.locks.lock(app).await;
        self.store.set_egress(app, egress).await?;
        let ips: Vec<std::net::Ipv4Addr> = self
            .store
            .containers(Some(app))
            .await?
            .iter()
            .filter_map(|c| c.ip.parse().ok())
            .collect();
        self.network.set_egress(&ips, egress).await?;
        Ok(ips.len())
    }

    /// Sets the number of containers of the given process types (a new release).
    pub async fn scale(
        self: &Arc<Self>,
        app: &str,
        changes: &Formation,
        by: &str,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        let _guard = self.locks.lock(app).await;
        let live = self.live(app).await?;
        for (process_type, count) in changes {
            self.require_type(&live, process_type)?;
            if process_type == release_phase::PROCESS_TYPE {
                return Err(DeployError::ScaleRelease);
            }
            if *count > MAX_SCALE {
                return Err(DeployError::TooMany {
                    process_type: process_type.clone(),
                    count: *count,
                });
            }
        }
        let mut formation = live.formation.clone();
        formation.extend(changes.iter().map(|(t, n)| (t.clone(), *n)));
        formation.retain(|_, n| *n > 0);
        let description = format!(
            "Scale {}",
            changes
                .iter()
                .map(|(t, n)| format!("{t}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let new = NewRelease {
            formation,
            description,
            created_by: by.to_string(),
            ..next_of(&live)
        };
        self.release(app, new, false, out)
            .instrument(info_span!("scale", %app))
            .await
    }

    /// Replaces the app's containers (of `process_type`, or all) with fresh ones of the live
    /// release, through the switch: zero downtime.
    pub async fn restart(
        self: &Arc<Self>,
        app: &str,
        process_type: Option<&str>,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        let _guard = self.locks.lock(app).await;
        let live = self.live(app).await?;
        if let Some(process_type) = process_type {
            self.require_type(&live, process_type)?;
        }
        switch::switch(self, &live, process_type, out)
            .instrument(info_span!("restart", %app, release = live.version))
            .await?;
        Ok(live)
    }

    /// Makes a new release from release `version`'s image, process types and config (default:
    /// the last release that was live before the current one), and restores that config.
    pub async fn rollback(
        self: &Arc<Self>,
        app: &str,
        version: Option<i64>,
        by: &str,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        let _guard = self.locks.lock(app).await;
        let live = self.live(app).await?;
        let target = match version {
            Some(version) => self.store.release(app, version).await?.ok_or_else(|| {
                DeployError::NoSuchRelease {
                    app: app.to_string(),
                    version,
                }
            })?,
            None => self
                .store
                .releases(app)
                .await?
                .into_iter()
                .find(|r| r.version < live.version && r.status == ReleaseStatus::Superseded)
                .ok_or_else(|| DeployError::NoEarlierRelease {
                    app: app.to_string(),
                })?,
        };
        if matches!(
            target.status,
            ReleaseStatus::Failed | ReleaseStatus::Deploying
        ) {
            return Err(DeployError::RollbackToFailed {
                app: app.to_string(),
                version: target.version,
                reason: target.reason,
            });
        }
        if let Err(ImageError::NotFound { .. }) = self.images.image(&target.image) {
            return Err(DeployError::ImageCollected {
                app: app.to_string(),
                version: target.version,
                keep: self.keep_releases,
            });
        }
        let new = NewRelease {
            image: target.image,
            config: target.config.clone(),
            formation: formation_for(&target.process_types, Some(&live.formation)),
            process_types: target.process_types,
            description: format!("Rollback to v{}", target.version),
            created_by: by.to_string(),
            checks: target.checks,
        };
        let release = self
            .release(app, new, true, out)
            .instrument(info_span!("rollback", %app))
            .await?;
        self.store.replace_config(app, &target.config).await?;
        Ok(release)
    }

    /// Serves the app at `host` too; returns the host as stored (lowercase).
    pub async fn add_domain(&self, app: &str, host: &str) -> Result<String, DeployError> {
        let host = crate::domain::validate(host, &self.domain)?;
        let _guard = self.locks.lock(app).await;
        self.store.add_domain(app, &host).await?;
        self.route(app).await?;
        Ok(host)
    }

    /// Stops serving the app at `host`.
    pub async fn remove_domain(&self, app: &str, host: &str) -> Result<(), DeployError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let _guard = self.locks.lock(app).await;
        self.store.remove_domain(app, &host).await?;
        self.routes.remove(&host);
        self.certs.set(&host, None);
        Ok(())
    }

    /// Serves the app's hosts that the certificate covers over HTTPS with it (and redirects
    /// their plain-HTTP requests there with `redirect_https`); returns those hosts.
    pub async fn add_cert(&self, row: &CertRow) -> Result<Vec<String>, DeployError> {
        let app = row.app.as_str();
        let cert = AppCert {
            cert: Cert::parse(&row.chain, &row.key)?,
            redirect_https: row.redirect_https,
        };
        let _guard = self.locks.lock(app).await;
        let hosts = self.hosts(app).await?;
        let covered = cert.cert.covered(&hosts);
        if covered.is_empty() {
            return Err(DeployError::CertCoversNothing {
                app: app.to_string(),
                hosts: hosts.join(", "),
            });
        }
        self.store.set_cert(app, row).await?;
        self.app_certs
            .lock()
            .expect("app certs")
            .insert(app.to_string(), cert);
        self.route(app).await?;
        Ok(covered)
    }

    /// Stops serving the app over HTTPS.
    pub async fn remove_cert(&self, app: &str) -> Result<(), DeployError> {
        let _guard = self.locks.lock(app).await;
        if !self.store.remove_cert(app).await? {
            return Err(DeployError::NoCert {
                app: app.to_string(),
            });
        }
        self.app_certs.lock().expect("app certs").remove(app);
        self.route(app).await
    }

    /// The certificate `app` is served with, if it has one.
    pub fn cert(&self, app: &str) -> Option<Cert> {
        let certs = self.app_certs.lock().expect("app certs");
        certs.get(app).map(|cert| cert.cert.clone())
    }

    /// Whether the proxy serves HTTPS (`--https`).
    pub fn serves_https(&self) -> bool {
        self.https_port.is_some()
    }

    /// The hosts of `app` its certificate covers (empty without one).
    pub async fn cert_hosts(&self, app: &str) -> Result<Vec<String>, DeployError> {
        let cert = self.app_certs.lock().expect("app certs").get(app).cloned();
        let Some(cert) = cert else {
            return Ok(Vec::new());
        };
        Ok(cert.cert.covered(&self.hosts(app).await?))
    }

    /// Destroys an app: forgets its routes, deletes it from the store (with its config,
    /// releases and domains: nothing of it should run any more), then stops its containers.
    /// A crash in between leaves containers of an app that is gone; the next start stops them.
    pub async fn destroy_app(&self, app: &str) -> Result<(), DeployError> {
        let _guard = self.locks.lock(app).await;
        for host in self.hosts(app).await? {
            self.routes.remove(&host);
            self.certs.set(&host, None);
        }
        self.app_certs.lock().expect("app certs").remove(app);
        self.store.delete_app(app).await?;
        let containers = self.store.containers(Some(app)).await?;
        futures::future::join_all(containers.iter().map(|c| container::stop(self, c))).await;
        self.stop_runs(Some(app));
        Ok(())
    }

    /// Stops every container (ephemeral servers on shutdown). Convergence stops first, and each
    /// app's change in progress finishes, so nothing starts behind this.
    pub async fn stop_everything(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let all = match self.store.containers(None).await {
            Ok(all) => all,
            Err(err) => return tracing::warn!(%err, "listing containers to stop failed"),
        };
        let mut apps: Vec<&str> = all.iter().map(|c| c.app.as_str()).collect();
        apps.dedup();
        let mut guards = Vec::new();
        for app in apps {
            guards.push(self.locks.lock(app).await);
        }
        match self.store.containers(None).await {
            Ok(all) => {
                futures::future::join_all(all.iter().map(|c| container::stop(self, c))).await;
            }
            Err(err) => tracing::warn!(%err, "listing containers to stop failed"),
        }
    }

    /// What `ps` shows as a container's state.
    /// What container `c` uses now (memory, CPU time), from its cgroup.
    pub fn container_usage(&self, c: &ContainerRow) -> berth_runtime::cgroup::Usage {
        self.runtime.usage(&c.id)
    }

    pub fn container_state(&self, c: &ContainerRow) -> String {
        use crate::store::ContainerState;
        match (c.state, container::exit_code(self, &c.id)) {
            (ContainerState::Starting, _) => "starting".into(),
            (ContainerState::Draining, _) => "draining".into(),
            (ContainerState::Up, None) => "up".into(),
            (ContainerState::Up, Some(code)) if self.runtime.oom_killed(&c.id) => {
                format!("crashed (out of memory, exit {code})")
            }
            (ContainerState::Up, Some(code)) => format!("crashed (exit {code})"),
        }
    }

    /// Records `new` as a `deploying` release and switches to it (after its release command
    /// when `release_phase`).
    async fn release(
        self: &Arc<Self>,
        app: &str,
        new: NewRelease,
        release_phase: bool,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        self.recorded(app, out, |out| async move {
            let (release, started) = self.start_release(app, new, release_phase, &out).await?;
            self.commit(release, started, &out).await
        })
        .await
    }

    /// Records `new` as a `deploying` release, runs its release command (with
    /// `release_phase`), starts and checks its containers; marks it failed if that fails.
    async fn start_release(
        self: &Arc<Self>,
        app: &str,
        new: NewRelease,
        release_phase: bool,
        out: &Progress,
    ) -> Result<(Release, Vec<ContainerRow>), DeployError> {
        if !new.process_types.contains_key("web") {
            return Err(DeployError::NoWeb);
        }
        let release = self.store.insert_release(app, &new).await?;
        let span = info_span!("start", %app, release = release.version);
        let started = async {
            if release_phase
                && release
                    .process_types
                    .contains_key(release_phase::PROCESS_TYPE)
            {
                let image = self.load_image(&release.image).await?;
                release_phase::run(self, &release, &image, out)
                    .instrument(info_span!("release_phase"))
                    .await?;
            }
            switch::start_and_check(self, &release, None, out).await
        };
        match started.instrument(span).await {
            Ok(started) => Ok((release, started)),
            Err(err) => Err(self.failed(&release, err).await),
        }
    }

    /// Makes a started and checked release live; marks it failed if that fails.
    async fn commit(
        self: &Arc<Self>,
        release: Release,
        started: Vec<ContainerRow>,
        out: &Progress,
    ) -> Result<Release, DeployError> {
        if let Err(err) = switch::commit(self, &release, &started, None, out).await {
            futures::future::join_all(started.iter().map(|c| container::stop(self, c))).await;
            return Err(self.failed(&release, err).await);
        }
        Ok(Release {
            status: ReleaseStatus::Live,
            ..release
        })
    }

    /// Marks `release` failed with `err`'s first line as the reason; returns `err`.
    async fn failed(&self, release: &Release, err: DeployError) -> DeployError {
        let reason = err.to_string();
        let reason = reason.lines().next().unwrap_or_default();
        if let Err(store) = self
            .store
            .fail_release(&release.app, release.version, reason)
            .await
        {
            tracing::warn!(%store, "recording a failed release failed");
        }
        err
    }

    async fn live(&self, app: &str) -> Result<Release, DeployError> {
        self.store.require_app(app).await?;
        self.store
            .live_release(app)
            .await?
            .ok_or_else(|| DeployError::NothingDeployed(app.to_string()))
    }

    fn require_type(&self, live: &Release, process_type: &str) -> Result<(), DeployError> {
        if live.process_types.contains_key(process_type) {
            return Ok(());
        }
        Err(DeployError::UnknownProcessType {
            app: live.app.clone(),
            process_type: process_type.to_string(),
            known: live
                .process_types
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    async fn load_image(&self, digest: &str) -> Result<Image, DeployError> {
        let images = self.images.clone();
        let digest = digest.to_string();
        Ok(tokio::task::spawn_blocking(move || images.image(&digest))
            .await
            .expect("image task")?)
    }
}

/// A new release with everything of `live` (callers override what changes).
fn next_of(live: &Release) -> NewRelease {
    NewRelease {
        image: live.image.clone(),
        config: live.config.clone(),
        process_types: live.process_types.clone(),
        formation: live.formation.clone(),
        description: String::new(),
        created_by: String::new(),
        checks: live.checks.clone(),
    }
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
