//! What runs: `ps`, scaling, restarts, releases and rollbacks (all through `deploy`).

use serde::{Deserialize, Serialize};

use super::{Caller, Error, Kind, Result, Service};
use crate::deploy::run::{self, RunRow};
use crate::limits::Limits;
use crate::progress::Progress;
use crate::store::{ContainerRow, Formation, Release};

/// One line of `ps`: a container of the formation, or a one-off run.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PsEntry {
    Container {
        #[serde(flatten)]
        container: ContainerRow,
        /// Its state now: starting, up, crashed …
        status: String,
        /// The limits of its process type now, as people read them.
        limits: String,
        /// The memory it uses now, in bytes (from its cgroup; page cache included); null
        /// when it does not run.
        memory: Option<u64>,
        /// The CPU time it used so far, in seconds; null when it does not run.
        cpu_secs: Option<f64>,
        /// Its memory limit now, in bytes.
        memory_limit: u64,
    },
    Run {
        #[serde(flatten)]
        #[schema(value_type = Object)]
        run: RunRow,
        status: String,
        limits: String,
    },
}

/// Requests the proxy answered for an app since the server started, by status class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Traffic {
    pub requests: u64,
    /// 1xx (WebSocket upgrades are 101).
    pub informational: u64,
    /// 2xx.
    pub success: u64,
    /// 3xx.
    pub redirection: u64,
    /// 4xx.
    pub client_error: u64,
    /// 5xx, berth's own 502, 503 and 504 included.
    pub server_error: u64,
}

/// What scaling made.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Scaled {
    pub version: i64,
    pub formation: Formation,
}

impl Service {
    pub async fn ps(&self, who: &Caller, app: &str) -> Result<Vec<PsEntry>> {
        self.app(who, app).await?;
        let set = self.store.resources(app).await?;
        let limits = |t: &str| Limits::for_app(&set, t);
        let containers = self.store.containers(Some(app)).await?;
        let runs = self.deployer.runs(app);
        Ok(containers
            .into_iter()
            .map(|c| {
                let usage = self.deployer.container_usage(&c);
                let limits = limits(&c.process_type);
                PsEntry::Container {
                    status: self.deployer.container_state(&c),
                    limits: limits.describe(),
                    memory_limit: limits.memory,
                    memory: usage.memory,
                    cpu_secs: usage.cpu_usec.map(|us| us as f64 / 1e6),
                    container: c,
                }
            })
            .chain(runs.into_iter().map(|r| PsEntry::Run {
                status: self.deployer.run_status(&r).to_string(),
                limits: limits(run::PROCESS_TYPE).describe(),
                run: r,
            }))
            .collect())
    }

    pub async fn scale(
        &self,
        who: &Caller,
        app: &str,
        formation: &Formation,
        out: &Progress,
    ) -> Result<Scaled> {
        self.app(who, app).await?;
        if formation.is_empty() {
            return Err(Error::msg(
                Kind::Invalid,
                "nothing to scale — pass TYPE=COUNT pairs, e.g. web=2",
            ));
        }
        let release = self.deployer.scale(app, formation, &who.user, out).await?;
        Ok(Scaled {
            version: release.version,
            formation: release.formation,
        })
    }

    /// Restarts the app's containers (of one process type, or all), zero downtime.
    pub async fn restart(
        &self,
        who: &Caller,
        app: &str,
        process_type: Option<&str>,
        out: &Progress,
    ) -> Result<()> {
        self.app(who, app).await?;
        self.deployer.restart(app, process_type, out).await?;
        Ok(())
    }

    /// The requests the proxy answered for the app (all its hosts) since the server started,
    /// by status class.
    pub async fn traffic(&self, who: &Caller, app: &str) -> Result<Traffic> {
        self.app(who, app).await?;
        let stats = self.deployer.traffic(app).await?;
        Ok(Traffic {
            requests: stats.requests,
            informational: stats.informational,
            success: stats.success,
            redirection: stats.redirection,
            client_error: stats.client_error,
            server_error: stats.server_error,
        })
    }

    /// The app's releases, newest first.
    pub async fn releases(&self, who: &Caller, app: &str) -> Result<Vec<Release>> {
        self.app(who, app).await?;
        Ok(self.store.releases(app).await?)
    }

    /// What the deploy that made release `version` printed (its build, release command,
    /// start and check).
    pub async fn release_output(&self, who: &Caller, app: &str, version: i64) -> Result<String> {
        self.app(who, app).await?;
        let kept = self
            .deployer
            .journals()
            .output(app, version)
            .map_err(super::failed)?;
        kept.ok_or_else(|| {
            Error::msg(
                Kind::NotFound,
                format!("no output is kept for {app} v{version} — see `berth releases {app}`"),
            )
        })
    }

    /// The deploy of `app` in progress: its output so far, then each next line (None at its
    /// end).
    pub async fn watch_deploy(
        &self,
        who: &Caller,
        app: &str,
    ) -> Result<(String, tokio::sync::broadcast::Receiver<Option<String>>)> {
        self.app(who, app).await?;
        self.deployer.journals().watch(app).ok_or_else(|| {
            Error::msg(
                Kind::NotFound,
                format!("no deploy of {app} is in progress — see `berth releases {app}`"),
            )
        })
    }

    /// A new release from release `version` (default: the one live before the current).
    pub async fn rollback(
        &self,
        who: &Caller,
        app: &str,
        version: Option<i64>,
        out: &Progress,
    ) -> Result<Release> {
        self.app(who, app).await?;
        Ok(self.deployer.rollback(app, version, &who.user, out).await?)
    }
}
