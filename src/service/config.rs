//! Config vars: read, and changes that make a new release (through `deploy`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Caller, Error, Kind, Result, Service};
use crate::config::{self, Config};
use crate::progress::Progress;

/// A change of config vars: each key to its new value, or to null to unset it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
pub struct ConfigPatch {
    pub vars: BTreeMap<String, Option<String>>,
    /// Make a new release and restart the app with it (default true); false only stores.
    #[serde(default = "yes")]
    pub restart: bool,
}

fn yes() -> bool {
    true
}

/// What a config change did.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigChange {
    /// e.g. "Set GREETING config vars".
    pub description: String,
    /// The release it made, if it made one (not with `restart: false` or before a first push).
    pub release: Option<i64>,
    pub restarted: bool,
    /// Keys to unset that were not set.
    pub not_set: Vec<String>,
}

impl Service {
    pub async fn config(&self, who: &Caller, app: &str) -> Result<Config> {
        self.app(who, app).await?;
        Ok(self.store.config(app).await?)
    }

    pub async fn config_get(&self, who: &Caller, app: &str, key: &str) -> Result<String> {
        let config = self.config(who, app).await?;
        config.get(key).cloned().ok_or_else(|| {
            Error::msg(
                Kind::NotFound,
                format!("{key} is not set for {app} — see `berth config {app}`"),
            )
        })
    }

    /// Sets and unsets config vars; unless `restart` is false (or nothing is deployed yet) the
    /// app switches to a new release with them, with zero downtime.
    pub async fn change_config(
        &self,
        who: &Caller,
        app: &str,
        patch: ConfigPatch,
        out: &Progress,
    ) -> Result<ConfigChange> {
        self.app(who, app).await?;
        if patch.vars.is_empty() {
            return Err(Error::msg(
                Kind::Invalid,
                "no config vars to change — pass KEY=VALUE pairs (or keys to unset)",
            ));
        }
        for (key, value) in &patch.vars {
            config::validate_key(key)?;
            if let Some(value) = value {
                config::validate_value(key, value)?;
            }
        }
        let current = self.store.config(app).await?;
        let (set, unset): (Vec<_>, Vec<_>) = patch.vars.iter().partition(|(_, v)| v.is_some());
        let not_set: Vec<String> = unset
            .iter()
            .map(|(k, _)| (*k).clone())
            .filter(|k| !current.contains_key(k))
            .collect();
        let names = |pairs: &[(&String, &Option<String>)]| {
            pairs
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let description = match (set.is_empty(), unset.is_empty()) {
            (false, true) => format!("Set {} config vars", names(&set)),
            (true, false) => format!("Unset {} config vars", names(&unset)),
            _ => format!(
                "Set {} and unset {} config vars",
                names(&set),
                names(&unset)
            ),
        };
        let release = self
            .deployer
            .change_config(app, &description, patch.restart, &who.user, out, |config| {
                for (key, value) in patch.vars {
                    match value {
                        Some(value) => config.insert(key, value),
                        None => config.remove(&key),
                    };
                }
            })
            .await?;
        Ok(ConfigChange {
            description,
            restarted: release.is_some(),
            release: release.map(|r| r.version),
            not_set,
        })
    }
}
