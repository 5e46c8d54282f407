//! Apps: list, create, show, destroy, and who may use them (grants).

use serde::{Deserialize, Serialize};

use super::{Caller, Error, Kind, Result, Service};
use crate::store::ContainerRow;
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
