//! What a push does (for the git hooks, on the admin socket only) and one-off runs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Caller, Result, Service};
use crate::attach::Attach;
use crate::progress::Progress;

/// From the pre-receive hook: build `source` (a checkout of the pushed commit), start it and
/// check it; it goes live on [`Service::promote_push`] with the same `push`.
#[derive(Debug, Deserialize, Serialize)]
pub struct Deploy {
    pub app: String,
    pub source: PathBuf,
    pub description: String,
    /// The name of the SSH key that pushed.
    pub key: String,
    /// The push's id (`BERTH_PUSH_ID`).
    pub push: String,
    /// The pushed commit (the build's `SOURCE_VERSION`).
    #[serde(default)]
    pub commit: String,
}

impl Service {
    /// Builds, starts and checks a push (root's hooks only: the SSH endpoint already decided
    /// that the key may push this app).
    pub async fn prepare_push(&self, who: &Caller, deploy: Deploy, out: &Progress) -> Result<()> {
        self.admin(who, "deploy a checkout")?;
        self.store.require_app(&deploy.app).await?;
        let push = crate::deploy::Push {
            id: &deploy.push,
            commit: &deploy.commit,
            by: &deploy.key,
        };
        self.deployer
            .prepare_push(&deploy.app, deploy.source, &deploy.description, &push, out)
            .await?;
        Ok(())
    }

    /// Git moved the branch: the push's checked release goes live.
    pub async fn promote_push(
        &self,
        who: &Caller,
        app: &str,
        push: &str,
        out: &Progress,
    ) -> Result<()> {
        self.admin(who, "make a push live")?;
        self.deployer.promote_push(app, push, out).await?;
        Ok(())
    }

    /// Runs `command` (a shell command line) in a one-off container of the live release,
    /// attached to `attach`; returns its exit code.
    pub async fn run(&self, who: &Caller, app: &str, command: &str, attach: Attach) -> Result<i32> {
        self.app(who, app).await?;
        Ok(self
            .deployer
            .run_one_off(app, command, &who.user, attach)
            .await?)
    }
}
