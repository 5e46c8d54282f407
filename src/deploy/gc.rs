//! Collection: which images berth keeps, and removing the rest with what only they used.
//! Kept: the images of each app's last `keep_releases` releases (`berth server
//! --keep-releases`, default 5), of its live and deploying releases and of every release a
//! container (running, starting or draining) belongs to; every tagged image (stacks, imports,
//! pulled bases); the Dockerfile step cache entries and buildpack dependency layers a kept
//! image uses (for a multi-stage Dockerfile, also its build's earlier stages). Destroyed apps'
//! buildpack caches go. Runs after each change made live, after `apps:destroy` and on
//! `berth gc`, holding the image store's collection lock, so no build, import or export is
//! between making (or reading) an image and recording (or finishing) it.
//!
//! Owns the policy; the image store owns how it deletes ([`crate::image::gc`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::Arc;

use serde::Serialize;
use tracing::{info, info_span, warn, Instrument};

use super::{DeployError, Deployer};
use crate::image::gc::Collected;
use crate::store::ReleaseStatus;

/// What a collection did.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    #[serde(flatten)]
    #[schema(inline)]
    pub collected: Collected,
    /// Buildpack dependency layer entries and destroyed apps' caches removed.
    pub buildpack_cache_entries: usize,
    /// Bytes the image store and the build caches took before and after.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

impl Deployer {
    /// The image digests collection keeps, with who uses each (`app` → versions).
    pub async fn kept_images(&self) -> Result<HashMap<String, Vec<(String, i64)>>, DeployError> {
        let mut kept: HashMap<String, Vec<(String, i64)>> = HashMap::new();
        let containers = self.store.containers(None).await?;
        for app in self.store.apps().await? {
            let app = app.name;
            let in_use: HashSet<i64> = containers
                .iter()
                .filter(|c| c.app == app)
                .map(|c| c.release)
                .collect();
            for (i, r) in self.store.releases(&app).await?.into_iter().enumerate() {
                if i < self.keep_releases
                    || matches!(r.status, ReleaseStatus::Live | ReleaseStatus::Deploying)
                    || in_use.contains(&r.version)
                {
                    kept.entry(r.image)
                        .or_default()
                        .push((app.clone(), r.version));
                }
            }
        }
        Ok(kept)
    }

    /// [`Deployer::collect`], no longer counted as queued once it holds the collection lock.
    async fn collect_starting(&self) -> Result<GcReport, DeployError> {
        self.collect_with(|| {
            self.collection_queued
                .store(false, std::sync::atomic::Ordering::Release)
        })
        .await
    }

    /// Collects what nothing keeps (see the module doc).
    pub async fn collect(&self) -> Result<GcReport, DeployError> {
        self.collect_with(|| {}).await
    }

    async fn collect_with(&self, started: impl FnOnce()) -> Result<GcReport, DeployError> {
        async {
            let _collecting = self.images.collecting().await;
            started();
            let kept: HashSet<String> = self.kept_images().await?.into_keys().collect();
            let apps: HashSet<String> = self.store.app_names().await?.into_iter().collect();
            let images = Arc::clone(&self.images);
            let paths = self.paths.clone();
            let report = tokio::task::spawn_blocking(move || {
                let measure =
                    || crate::disk::usage(&paths.images()) + crate::disk::usage(&paths.caches());
                let bytes_before = measure();
                let live = images.live_layers(&kept)?;
                let buildpack_cache_entries = prune_buildpack_caches(&paths, &apps, &live);
                let collected = images.collect(&kept)?;
                Ok::<_, DeployError>(GcReport {
                    collected,
                    buildpack_cache_entries,
                    bytes_before,
                    bytes_after: measure(),
                })
            })
            .await
            .expect("gc task")?;
            info!(?report, "collected");
            Ok(report)
        }
        .instrument(info_span!("gc"))
        .await
    }

    /// Collects in the background (after a change went live, an app was destroyed); failures
    /// are logged. Calls while one waits to start add nothing: it will see their changes too
    /// (20 changes in a row cost one or two collections, not 20 back to back).
    pub fn collect_later(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.collection_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let d = Arc::clone(self);
        tokio::spawn(async move {
            let collecting = d.collect_starting();
            let collected = collecting.await;
            if let Err(err) = collected {
                warn!(%err, "collecting unused images failed; `berth gc` retries");
            }
        });
    }
}

/// Removes the buildpack caches (`cache/APP`, `cache/APP.layers`) of apps that are gone, and
/// each app's dependency layer entries whose layer no kept image uses. Returns how many.
fn prune_buildpack_caches(
    paths: &crate::paths::Paths,
    apps: &HashSet<String>,
    live: &HashSet<String>,
) -> usize {
    let mut removed = 0;
    let Ok(entries) = fs::read_dir(paths.caches()) else {
        return 0;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let app = name.strip_suffix(".layers").unwrap_or(&name);
        let path = entry.path();
        if !apps.contains(app) {
            match fs::remove_dir_all(&path) {
                Ok(()) => removed += 1,
                Err(err) => {
                    warn!(path = %path.display(), %err, "removing a destroyed app's cache failed")
                }
            }
            continue;
        }
        if name.ends_with(".layers") {
            for memo in fs::read_dir(&path)
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
            {
                let digest = fs::read_to_string(memo.path()).unwrap_or_default();
                if !live.contains(digest.trim()) && fs::remove_file(memo.path()).is_ok() {
                    removed += 1;
                }
            }
        }
    }
    removed
}
