//! What the image store holds ([`ImageStore::images`]) and collecting what nothing keeps
//! ([`ImageStore::collect`]). Which images to keep is the caller's policy (`deploy::gc`);
//! tagged images (stacks, imports, pulled bases) are always kept.
//!
//! Crash safety: every deletion removes the record before the files it names — a manifest
//! before its config and layers, a step cache entry before its layer, a layer's record before
//! its directory — so a crash leaves only files nothing names, which the next collection
//! removes; never a record naming missing files. An image's stage layers note
//! (`stages/<hex>`) goes after its manifest.
//!
//! Must not decide which releases are kept, nor touch anything outside the store.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;

use super::{io_err, ImageError, ImageStore, Manifest, MANIFEST_MEDIA_TYPE, SHORT_LEN};

/// One image in the store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredImage {
    pub digest: String,
    /// The tags pointing at it.
    pub tags: Vec<String>,
    /// Its layer digests, bottom-most first.
    pub layers: Vec<String>,
    /// Its layers' tar sizes plus its manifest and config (what an export holds).
    pub size: u64,
    /// The layers of the earlier stages of the Dockerfile build that made it
    /// ([`ImageStore::note_stage_layers`]): kept with it, so are their step cache entries.
    pub stage_layers: Vec<String>,
}

/// What a collection removed.
#[derive(
    Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Collected {
    pub images: usize,
    pub layers: usize,
    pub step_cache_entries: usize,
}

impl ImageStore {
    /// Every image in the store (each manifest blob), by digest.
    pub fn images(&self) -> Result<Vec<StoredImage>, ImageError> {
        let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for name in self.tag_names()? {
            if let Some(digest) = self.resolve(&name) {
                tags.entry(digest).or_default().push(name);
            }
        }
        let mut images = Vec::new();
        for (digest, len) in self.blobs()? {
            let Some(manifest) = self.manifest_blob(&digest) else {
                continue;
            };
            let mut size = len + manifest.config.size;
            for layer in &manifest.layers {
                size += self.layer_size(&layer.digest).unwrap_or(layer.size);
            }
            images.push(StoredImage {
                stage_layers: self.stage_layers(&digest),
                tags: tags.remove(&digest).unwrap_or_default(),
                layers: manifest.layers.into_iter().map(|l| l.digest).collect(),
                digest,
                size,
            });
        }
        Ok(images)
    }

    /// Waits for every writer ([`ImageStore::writing`]) to finish and keeps new ones out while
    /// the guard lives.
    pub async fn collecting(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.writers.clone().write_owned().await
    }

    /// The layers of the images [`ImageStore::collect`] keeps: those in `keep` and the tagged.
    pub fn live_layers(&self, keep: &HashSet<String>) -> Result<HashSet<String>, ImageError> {
        Ok(self
            .images()?
            .into_iter()
            .filter(|i| !i.tags.is_empty() || keep.contains(&i.digest))
            .flat_map(|i| [i.layers, i.stage_layers].concat())
            .collect())
    }

    /// Deletes every image that is neither tagged nor in `keep`, then the Dockerfile step
    /// cache entries and layers no kept image uses (its own layers and its build's earlier
    /// stages'). Hold [`ImageStore::collecting`] around the call.
    pub fn collect(&self, keep: &HashSet<String>) -> Result<Collected, ImageError> {
        let mut done = Collected::default();
        let images = self.images()?;
        let (kept, gone): (Vec<_>, Vec<_>) = images
            .into_iter()
            .partition(|i| !i.tags.is_empty() || keep.contains(&i.digest));
        let live: HashSet<String> = kept
            .iter()
            .flat_map(|i| [i.layers.clone(), i.stage_layers.clone()].concat())
            .collect();

        // Step cache entries first: each names a layer.
        let cache = self.root.join("cache");
        for entry in read_dir_or_empty(&cache)? {
            let digest = fs::read_to_string(entry.path()).unwrap_or_default();
            if !live.contains(digest.trim()) {
                remove_file(&entry.path())?;
                done.step_cache_entries += 1;
            }
        }

        // Manifests, then the blobs no kept manifest names (configs, leftovers).
        for image in &gone {
            remove_file(&self.blob_path(&image.digest)?)?;
            done.images += 1;
        }
        let mut named: HashSet<String> = HashSet::new();
        for image in &kept {
            named.insert(image.digest.clone());
            if let Some(manifest) = self.manifest_blob(&image.digest) {
                named.insert(manifest.config.digest);
            }
        }
        for dir in [self.blob_dir(), self.stages_dir()] {
            for entry in read_dir_or_empty(&dir)? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !named.contains(&format!("sha256:{name}")) {
                    remove_file(&entry.path())?;
                }
            }
        }

        // Layer records, then their directories, then directories without a record.
        let mut shorts = HashSet::new();
        for entry in read_dir_or_empty(&self.record_dir())? {
            let hex = entry.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{hex}");
            if live.contains(&digest) {
                shorts.insert(hex[..SHORT_LEN.min(hex.len())].to_string());
                continue;
            }
            remove_file(&entry.path())?;
            done.layers += 1;
        }
        for entry in read_dir_or_empty(&self.root.join("l"))? {
            if !shorts.contains(&*entry.file_name().to_string_lossy()) {
                remove_dir(&entry.path())?;
            }
        }

        // Scratch left by a crash (nothing writes while the caller holds `collecting`).
        for entry in read_dir_or_empty(&self.root)? {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                if path.is_dir() {
                    remove_dir(&path)?;
                } else {
                    remove_file(&path)?;
                }
            }
        }
        Ok(done)
    }

    /// The manifest in blob `digest`, if that blob is one.
    fn manifest_blob(&self, digest: &str) -> Option<Manifest> {
        let manifest: Manifest = self.read_json_blob("manifest", digest).ok()?;
        (manifest.media_type == MANIFEST_MEDIA_TYPE).then_some(manifest)
    }

    /// Every blob: digest and size.
    fn blobs(&self) -> Result<Vec<(String, u64)>, ImageError> {
        let mut blobs = Vec::new();
        for entry in read_dir_or_empty(&self.blob_dir())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                blobs.push((format!("sha256:{name}"), len));
            }
        }
        Ok(blobs)
    }
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<fs::DirEntry>, ImageError> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_err("listing", dir)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err("listing", dir)(e)),
    }
}

fn remove_file(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

fn remove_dir(path: &Path) -> Result<(), ImageError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}
