//! Apps: list, create, show, destroy, and who may use them (grants).

use serde::{Deserialize, Serialize};

use super::{Caller, Error, Kind, Result, Service};
use crate::store::{ContainerRow, ReleaseStatus};
use crate::{app, git};

/// An app as `apps` lists it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppSummary {
    pub name: String,
    pub created_at: String,
}

/// What `apps:info` shows.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppInfo {
    pub name: String,
    pub url: String,
    pub git_remote: String,
    /// The live release's version, if any.
    pub release: Option<i64>,
    pub containers: Vec<ContainerRow>,
    /// The users (other than admins) who may use it.
    pub users: Vec<String>,
}

/// An app at a glance (the dashboard's overview).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppOverview {
    pub name: String,
    /// running, deploying, crashed, failed (its newest release), idle (scaled to nothing) or
    /// new (never deployed).
    pub state: String,
    /// The live release's version.
    pub release: Option<i64>,
    pub url: String,
    /// Containers running or starting (not those draining away).
    pub containers: usize,
    /// When its newest release was made; empty before the first.
    pub last_deploy: String,
}

/// What an app's releases say about its state.
pub struct ReleaseFacts {
    /// A release is being deployed.
    pub deploying: bool,
    /// The newest release failed.
    pub newest_failed: bool,
    /// A release is live.
    pub live: bool,
}

impl ReleaseFacts {
    /// From an app's releases, newest first.
    pub fn of(releases: &[crate::store::Release]) -> Self {
        Self {
            deploying: releases
                .iter()
                .any(|r| r.status == ReleaseStatus::Deploying),
            newest_failed: releases
                .first()
                .is_some_and(|r| r.status == ReleaseStatus::Failed),
            live: releases.iter().any(|r| r.status == ReleaseStatus::Live),
        }
    }
}

/// An app's state at a glance: deploying, crashed, failed (its newest release), new (never
/// live), idle (nothing running) or running; from its releases and its containers' states.
pub fn app_state(releases: &ReleaseFacts, container_states: &[String]) -> &'static str {
    if releases.deploying {
        "deploying"
    } else if container_states.iter().any(|s| s.starts_with("crashed")) {
        "crashed"
    } else if releases.newest_failed {
        "failed"
    } else if !releases.live {
        "new"
    } else if running(container_states) == 0 {
        "idle"
    } else {
        "running"
    }
}

/// How many containers run or start (not those draining away).
pub fn running(container_states: &[String]) -> usize {
    container_states.iter().filter(|s| *s != "draining").count()
}

/// What `apps:destroy` did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Destroyed {
    pub name: String,
}

impl Service {
    /// The apps `who` may see: all of them for an admin, the granted ones otherwise.
    pub async fn apps(&self, who: &Caller) -> Result<Vec<AppSummary>> {
        let granted = match who.admin {
            true => None,
            false => Some(self.store.granted_apps(&who.user).await?),
        };
        Ok(self
            .store
            .apps()
            .await?
            .into_iter()
            .filter(|a| granted.as_ref().is_none_or(|g| g.contains(&a.name)))
            .map(|a| AppSummary {
                name: a.name,
                created_at: a.created_at,
            })
            .collect())
    }

    /// Every app `who` may see, at a glance, from a handful of queries whatever their number.
    pub async fn overview(&self, who: &Caller) -> Result<Vec<AppOverview>> {
        use std::collections::HashMap;
        let apps = self.apps(who).await?;
        let mut releases: HashMap<String, crate::store::ReleaseSummary> = self
            .store
            .release_summaries()
            .await?
            .into_iter()
            .map(|r| (r.app.clone(), r))
            .collect();
        let mut states: HashMap<String, Vec<String>> = HashMap::new();
        for c in self.store.containers(None).await? {
            let state = self.deployer.container_state(&c);
            states.entry(c.app).or_default().push(state);
        }
        Ok(apps
            .into_iter()
            .map(|a| {
                let summary = releases.remove(&a.name);
                let states = states.remove(&a.name).unwrap_or_default();
                let facts = ReleaseFacts {
                    deploying: summary.as_ref().is_some_and(|r| r.deploying),
                    newest_failed: summary
                        .as_ref()
                        .is_some_and(|r| r.newest_status == ReleaseStatus::Failed),
                    live: summary.as_ref().is_some_and(|r| r.live.is_some()),
                };
                AppOverview {
                    url: self.deployer.app_url(&a.name),
                    state: app_state(&facts, &states).to_string(),
                    release: summary.as_ref().and_then(|r| r.live),
                    containers: running(&states),
                    last_deploy: summary.map(|r| r.newest_at).unwrap_or_default(),
                    name: a.name,
                }
            })
            .collect())
    }

    /// Creates an app and its repo; a user who is not an admin is granted it.
    pub async fn create_app(&self, who: &Caller, name: &str) -> Result<AppInfo> {
        app::validate(name)?;
        self.store.create_app(name).await?;
        if let Err(err) = git::create_repo(&self.paths.repos(), name, &self.hook_command) {
            self.store.delete_app(name).await?;
            return Err(super::failed(err));
        }
        if !who.admin {
            self.store.grant(name, &who.user).await?;
        }
        self.app_info(who, name).await
    }

    pub async fn app_info(&self, who: &Caller, name: &str) -> Result<AppInfo> {
        self.app(who, name).await?;
        Ok(AppInfo {
            name: name.to_string(),
            url: self.deployer.app_url(name),
            git_remote: format!("ssh://git@SERVER:{}/{name}", self.ssh_port),
            release: self.store.live_release(name).await?.map(|r| r.version),
            containers: self.store.containers(Some(name)).await?,
            users: self.store.app_users(name).await?,
        })
    }

    /// Destroys an app: containers, route, repo, config, releases, caches, log.
    pub async fn destroy_app(&self, who: &Caller, name: &str) -> Result<Destroyed> {
        self.app(who, name).await?;
        self.deployer.destroy_app(name).await?;
        git::delete_repo(&self.paths.repos(), name).map_err(super::failed)?;
        let _ = std::fs::remove_dir_all(self.paths.cache(name));
        let _ = std::fs::remove_file(self.paths.log(name));
        self.deployer.journals().remove(name);
        // Its images and dependency layers, in the background.
        self.deployer.collect_later();
        Ok(Destroyed {
            name: name.to_string(),
        })
    }

    /// Lets `user` use `app` (admins only).
    pub async fn grant(&self, who: &Caller, app: &str, user: &str) -> Result<()> {
        self.admin(who, "grant apps")?;
        self.app(who, app).await?;
        let target = self.store.user(user).await?;
        if target.admin {
            return Err(Error::msg(
                Kind::Conflict,
                format!("{user} is an admin and may already use every app"),
            ));
        }
        Ok(self.store.grant(app, user).await?)
    }

    /// Takes `app` from `user` (admins only).
    pub async fn revoke(&self, who: &Caller, app: &str, user: &str) -> Result<()> {
        self.admin(who, "revoke apps")?;
        self.app(who, app).await?;
        match self.store.revoke_grant(app, user).await? {
            true => Ok(()),
            false => Err(Error::msg(
                Kind::NotFound,
                format!("{user} was not granted {app} — see `berth apps:info {app}`"),
            )),
        }
    }
}
