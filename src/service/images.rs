//! The image store and disk, for admins: list, export, import, collect, the stacks, `info`.
//! What is kept is `deploy`'s to decide.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{failed, Caller, Error, Kind, Result, Service};
use crate::deploy::gc::GcReport;
use crate::disk::usage;
use crate::progress::Progress;

/// A release using an image.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageUser {
    pub app: String,
    pub version: i64,
    pub status: String,
}

/// An image in the store.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageRow {
    pub digest: String,
    pub tags: Vec<String>,
    pub size: u64,
    /// Its layer digests, bottom-most first.
    pub layers: Vec<String>,
    pub used_by: Vec<ImageUser>,
    /// Whether `gc` keeps it.
    pub kept: bool,
}

/// An image picked for export: its digest and the name it gets in the archive.
#[derive(Debug, Clone)]
pub struct ExportTarget {
    digest: String,
    name: Option<String>,
}

/// An archive being uploaded for import: where to write it. Dropping it removes it.
pub struct Upload {
    pub path: PathBuf,
    dir: PathBuf,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What an import stored.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Imported {
    pub name: String,
    pub digest: String,
}

/// The stack images a `stack:build` left in the store.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StackImages {
    pub build_tag: String,
    pub build: String,
    pub run_tag: String,
    pub run: String,
}

/// What `info` shows.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Info {
    pub version: String,
    pub data_dir: String,
    pub images_bytes: u64,
    pub images: usize,
    pub build_caches_bytes: u64,
    pub logs_bytes: u64,
    pub keep_releases: usize,
}

impl Service {
    pub async fn images(&self, who: &Caller) -> Result<Vec<ImageRow>> {
        self.admin(who, "list images")?;
        let mut users: HashMap<String, Vec<ImageUser>> = HashMap::new();
        for app in self.store.apps().await? {
            for r in self.store.releases(&app.name).await? {
                users.entry(r.image).or_default().push(ImageUser {
                    app: app.name.clone(),
                    version: r.version,
                    status: r.status.as_str().to_string(),
                });
            }
        }
        let kept = self.deployer.kept_images().await?;
        let store = self.deployer.builder().images.clone();
        let mut rows: Vec<ImageRow> = tokio::task::spawn_blocking(move || store.images())
            .await
            .map_err(failed)?
            .map_err(failed)?
            .into_iter()
            .map(|i| ImageRow {
                kept: !i.tags.is_empty() || kept.contains_key(&i.digest),
                used_by: users.remove(&i.digest).unwrap_or_default(),
                digest: i.digest,
                tags: i.tags,
                size: i.size,
                layers: i.layers,
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.tags.is_empty(), &a.tags, &a.digest).cmp(&(b.tags.is_empty(), &b.tags, &b.digest))
        });
        Ok(rows)
    }

    /// Which image `image` names: a tag in the store, `APP:vN` (a release), `APP` (its live
    /// release) or a digest (`sha256:` and at least 12 hex digits, as `images` shows them).
    pub async fn export_target(&self, who: &Caller, image: &str) -> Result<ExportTarget> {
        self.admin(who, "export images")?;
        let store = &self.deployer.builder().images;
        if let Some(digest) = store.resolve(image) {
            let name = Some(image.to_string());
            return Ok(ExportTarget { digest, name });
        }
        let (app, version) = match image.split_once(":v") {
            Some((app, v)) => (app, v.parse::<i64>().ok()),
            None => (image, None),
        };
        if crate::app::validate(app).is_ok() && self.store.app_exists(app).await? {
            let release = match version {
                Some(v) => self.store.release(app, v).await?,
                None => self.store.live_release(app).await?,
            }
            .ok_or_else(|| {
                Error::msg(
                    Kind::NotFound,
                    format!("{image} names no release — see `berth releases {app}`"),
                )
            })?;
            let name = Some(format!("{app}:v{}", release.version));
            return Ok(ExportTarget {
                digest: release.image,
                name,
            });
        }
        if let Some(hex) = image.strip_prefix("sha256:").filter(|h| h.len() >= 12) {
            let listed = store.images().map_err(failed)?;
            let mut found = listed.iter().filter(|i| i.digest[7..].starts_with(hex));
            if let (Some(one), None) = (found.next(), found.next()) {
                let digest = one.digest.clone();
                return Ok(ExportTarget { digest, name: None });
            }
        }
        Err(Error::msg(
            Kind::NotFound,
            format!("no image {image:?} — name a tag, APP:vN or a digest from `berth images`"),
        ))
    }

    /// Writes the image as one tar (a `docker save` archive that is also an OCI layout).
    pub async fn export_image(
        &self,
        target: ExportTarget,
        out: impl Write + Send + 'static,
    ) -> Result<()> {
        let store = self.deployer.builder().images.clone();
        // Collection must not remove the image, or the export's scratch, meanwhile.
        let _reading = store.writing().await;
        tokio::task::spawn_blocking(move || {
            let writer = std::io::BufWriter::with_capacity(1 << 16, out);
            store.export(&target.digest, target.name.as_deref(), writer)
        })
        .await
        .map_err(failed)?
        .map_err(|e| Error::new(Kind::Failed, e))
    }

    /// Where an archive for [`Service::import_image`] is uploaded to: a file in a folder of
    /// its own under `DATA/builds/` (build scratch: cleared at start), removed with the
    /// [`Upload`].
    pub async fn upload(&self, who: &Caller) -> Result<Upload> {
        use rand::Rng;
        self.admin(who, "import images")?;
        let dir = self
            .paths
            .builds()
            .join(format!("upload-{:016x}", rand::thread_rng().gen::<u64>()));
        std::fs::create_dir_all(&dir).map_err(failed)?;
        Ok(Upload {
            path: dir.join("archive.tar"),
            dir,
        })
    }

    /// Imports the uploaded archive (a `docker save` tar or an OCI archive) for Dockerfiles'
    /// `FROM`, tagged `name` or the name it carries; the upload is removed.
    pub async fn import_image(
        &self,
        who: &Caller,
        upload: Upload,
        name: Option<String>,
    ) -> Result<Imported> {
        self.admin(who, "import images")?;
        let images = self.deployer.builder().images.clone();
        let _writing = images.writing().await;
        let file = upload.path.clone();
        let imported =
            tokio::task::spawn_blocking(move || images.import_archive(&file, name.as_deref()))
                .await
                .map_err(failed)?
                .map_err(|e| Error::new(Kind::Invalid, e));
        drop(upload);
        let (name, digest) = imported?;
        Ok(Imported { name, digest })
    }

    /// Removes what no kept release uses, now.
    pub async fn gc(&self, who: &Caller) -> Result<GcReport> {
        self.admin(who, "collect images")?;
        Ok(self.deployer.collect().await?)
    }

    pub async fn info(&self, who: &Caller) -> Result<Info> {
        self.admin(who, "see the server's disk use")?;
        let (paths, store) = (self.paths.clone(), self.deployer.builder().images.clone());
        let keep_releases = self.deployer.keep_releases();
        tokio::task::spawn_blocking(move || {
            Ok(Info {
                version: env!("CARGO_PKG_VERSION").to_string(),
                data_dir: paths.root().display().to_string(),
                images_bytes: usage(&paths.images()),
                images: store.images().map_err(failed)?.len(),
                build_caches_bytes: usage(&paths.caches()),
                logs_bytes: usage(&paths.logs()),
                keep_releases,
            })
        })
        .await
        .map_err(failed)?
    }

    /// Builds a stack's images (`trixie` when `stack` is empty) unless they exist or `force`.
    pub async fn build_stack(
        &self,
        who: &Caller,
        stack: &str,
        force: bool,
        out: &Progress,
    ) -> Result<StackImages> {
        self.admin(who, "build stacks")?;
        let builder = self.deployer.builder();
        let _writing = builder.images.writing().await;
        let stack = crate::build::buildpacks::stack_named(stack)
            .map_err(|e| Error::new(Kind::Invalid, e))?;
        let (build, run) = builder
            .ensure_stacks(&stack, force, out)
            .await
            .map_err(|e| Error::new(Kind::Failed, e))?;
        Ok(StackImages {
            build_tag: stack.build_tag(),
            build,
            run_tag: stack.run_tag(),
            run,
        })
    }
}
