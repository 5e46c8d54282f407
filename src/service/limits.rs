//! What an app's containers and builds may use: memory, CPU and process limits per process
//! type, build limits, and whether its containers may reach out of berth's bridge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Caller, Error, Kind, Result, Service};
use crate::deploy::run;
use crate::limits::{self, Limits};
use crate::store::{BuildLimitsRow, ResourcesRow};

/// A change of limits, values as people write them (`512M`, `0.5`, `256`, `15m`); `default`
/// puts one back to berth's default; absent ones stay as they are.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct LimitsPatch {
    pub memory: Option<String>,
    pub cpus: Option<String>,
    pub pids: Option<String>,
    /// Builds only: how long one may run (`90s`, `30m`).
    pub timeout: Option<String>,
}

/// The limits of one process type.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TypeLimits {
    #[serde(flatten)]
    pub limits: Limits,
    /// e.g. "512 MiB, 1 CPU, 1024 pids".
    pub description: String,
}

/// The limits builds run under, and which of them are berth's defaults.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildLimits {
    pub memory: u64,
    pub cpu_millis: u64,
    pub pids: i64,
    pub timeout_secs: u64,
    /// The names of the values nobody set (memory, cpus, pids, timeout).
    pub defaults: Vec<String>,
}

/// What `network` shows.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkInfo {
    /// Whether its containers may open connections out of berth's bridge.
    pub egress: bool,
}

/// What `network:set` changed.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NetworkSet {
    pub egress: bool,
    /// The running containers it was applied to at once.
    pub applied: usize,
}

impl Service {
    /// The limits of each process type of the live release and of one-off runs.
    pub async fn resources(&self, who: &Caller, app: &str) -> Result<BTreeMap<String, TypeLimits>> {
        self.app(who, app).await?;
        let set = self.store.resources(app).await?;
        Ok(self
            .process_types(app)
            .await?
            .into_iter()
            .map(|t| {
                let limits = Limits::for_app(&set, &t);
                let description = limits.describe();
                (
                    t,
                    TypeLimits {
                        limits,
                        description,
                    },
                )
            })
            .collect())
    }

    /// Changes one process type's limits; running containers get them at their next restart.
    pub async fn set_resources(
        &self,
        who: &Caller,
        app: &str,
        process_type: &str,
        patch: LimitsPatch,
    ) -> Result<TypeLimits> {
        self.app(who, app).await?;
        let types = self.process_types(app).await?;
        if !types.iter().any(|t| t == process_type) {
            return Err(Error::msg(
                Kind::Invalid,
                format!(
                    "{app} has no process type {process_type:?} — its process types are: {}",
                    types.join(", ")
                ),
            ));
        }
        if patch.timeout.is_some() {
            return Err(Error::msg(
                Kind::Invalid,
                "a timeout applies to builds only — see `berth builds:set --help`",
            ));
        }
        if [&patch.memory, &patch.cpus, &patch.pids]
            .iter()
            .all(|v| v.is_none())
        {
            return Err(Error::msg(Kind::Invalid, "nothing to change — pass --memory, --cpus or --pids (see `berth resources:set --help`)"));
        }
        let mut set = self
            .store
            .resources(app)
            .await?
            .into_iter()
            .find(|r| r.process_type == process_type)
            .unwrap_or_else(|| ResourcesRow {
                process_type: process_type.to_string(),
                ..Default::default()
            });
        change(&mut set.memory, patch.memory, limits::parse_memory, big)?;
        change(&mut set.cpu_millis, patch.cpus, limits::parse_cpus, big)?;
        change(&mut set.pids, patch.pids, limits::parse_pids, |p| p)?;
        self.store.set_resources(app, &set).await?;
        let limits = Limits::for_app(std::slice::from_ref(&set), process_type);
        Ok(TypeLimits {
            description: limits.describe(),
            limits,
        })
    }

    pub async fn build_limits(&self, who: &Caller, app: &str) -> Result<BuildLimits> {
        self.app(who, app).await?;
        Ok(build_limits(&self.store.build_limits(app).await?))
    }

    /// Changes the limits of the app's next builds.
    pub async fn set_build_limits(
        &self,
        who: &Caller,
        app: &str,
        patch: LimitsPatch,
    ) -> Result<BuildLimits> {
        self.app(who, app).await?;
        if [&patch.memory, &patch.cpus, &patch.pids, &patch.timeout]
            .iter()
            .all(|v| v.is_none())
        {
            return Err(Error::msg(Kind::Invalid, "nothing to change — pass --memory, --cpus, --pids or --timeout (see `berth builds:set --help`)"));
        }
        let mut set = self.store.build_limits(app).await?;
        change(&mut set.memory, patch.memory, limits::parse_memory, big)?;
        change(&mut set.cpu_millis, patch.cpus, limits::parse_cpus, big)?;
        change(&mut set.pids, patch.pids, limits::parse_pids, |p| p)?;
        change(
            &mut set.timeout_secs,
            patch.timeout,
            limits::parse_duration,
            |d| big(d.as_secs()),
        )?;
        self.store.set_build_limits(app, &set).await?;
        Ok(build_limits(&set))
    }

    pub async fn network(&self, who: &Caller, app: &str) -> Result<NetworkInfo> {
        self.app(who, app).await?;
        Ok(NetworkInfo {
            egress: self.store.egress(app).await?,
        })
    }

    /// Stored, then applied to the running containers at once.
    pub async fn set_network(&self, who: &Caller, app: &str, egress: bool) -> Result<NetworkSet> {
        self.app(who, app).await?;
        let applied = self.deployer.set_egress(app, egress).await?;
        Ok(NetworkSet { egress, applied })
    }

    /// The process types of `app`'s live release and `run` (the limits of one-off runs)
    /// (none before its first deploy).
    async fn process_types(&self, app: &str) -> Result<Vec<String>> {
        let live = self.store.live_release(app).await?;
        let mut types: Vec<String> = live
            .map(|r| r.process_types.keys().cloned().collect())
            .unwrap_or_default();
        if !types.is_empty() && !types.iter().any(|t| t == run::PROCESS_TYPE) {
            types.push(run::PROCESS_TYPE.to_string());
        }
        Ok(types)
    }
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Applies one value to `field`: `default` clears it; anything else must parse.
fn change<T>(
    field: &mut Option<i64>,
    value: Option<String>,
    parse: impl Fn(&str) -> std::result::Result<T, limits::LimitsError>,
    to_i64: impl Fn(T) -> i64,
) -> std::result::Result<(), limits::LimitsError> {
    match value.as_deref() {
        None => {}
        Some("default") => *field = None,
        Some(text) => *field = Some(to_i64(parse(text)?)),
    }
    Ok(())
}

fn build_limits(set: &BuildLimitsRow) -> BuildLimits {
    let build = limits::BuildLimits::with(set);
    let defaults = [
        ("memory", set.memory),
        ("cpus", set.cpu_millis),
        ("pids", set.pids),
        ("timeout", set.timeout_secs),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_none())
    .map(|(name, _)| name.to_string())
    .collect();
    BuildLimits {
        memory: build.limits.memory,
        cpu_millis: build.limits.cpu_millis,
        pids: build.limits.pids,
        timeout_secs: build.timeout.as_secs(),
        defaults,
    }
}
