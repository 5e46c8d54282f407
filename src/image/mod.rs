//! The OCI content-addressed image store (`DATA/images`) and, in [`stack`], the stack images.
//!
//! Owns everything under its root directory:
//! - `oci-layout`, `index.json` and `blobs/sha256/<hex>`: manifests and configs, as in an OCI
//!   image layout. Layers are uncompressed tars (`application/vnd.oci.image.layer.v1.tar`), so a
//!   layer's digest is its diff_id — but their tars are not kept: see below.
//! - `l/<first 12 hex of the layer digest>`: each layer, stored ONCE, extracted, ready to be an
//!   overlay `lowerdir`. The paths are short on purpose: overlay's mount options are capped at
//!   one page. A layer's digest is that of its *canonical tar* ([`write_dir_tar`]: sorted
//!   names, mtime 0, modes, owners and hard links kept), which is regenerated from the
//!   directory when an image is exported ([`export`]) and checked against the digest. A
//!   foreign layer (an import, a pull, a stack) is extracted and re-hashed this way, so its
//!   digest in berth differs from the one it came with.
//! - `layers/<hex>`: the record of a stored layer (its tar's size). A layer exists when its
//!   record does; the directory is moved into place before the record is written and deleted
//!   after it, so a crash leaves at most a directory without a record, which [`gc`] removes.
//! - `refs/<name, '/' escaped as %2F>`: tags, one file holding a manifest digest. `refs/` is the
//!   source of truth; `index.json` is rewritten from it on every tag for OCI tools.
//!
//! Must not touch: mounts, namespaces or containers (the runtime crate does that with the
//! directories [`ImageStore::image`] returns), and nothing outside its root.
//!
//! - `cache/<64 hex>`: the layer cache of Dockerfile build steps, one file per step key holding
//!   a layer digest ([`ImageStore::cached_layer`]); `stages/<image hex>`: the layers of the
//!   earlier stages of the Dockerfile build that made an image, kept as long as it is.
//!
//! Deletions: layer tars carry OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`); extracted layers
//! carry overlayfs's (a 0:0 character device, the `trusted.overlay.opaque` xattr), so a build
//! step's overlay upper dir is a layer as it is.

pub mod export;
pub mod gc;
mod import;
pub mod pull;
mod registry;
pub mod stack;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// How many hex digits of a layer digest name its extracted directory under `l/`.
const SHORT_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("layer tar {} has entry `{entry}` that escapes the layer root; refusing it — build the tar with relative paths inside the root", tar.display())]
    UnsafeEntry { tar: PathBuf, entry: String },
    #[error("bad layer prefix `{0}`: use a relative path such as `app`")]
    BadPrefix(String),
    #[error("bad image name `{0}`: use a non-empty name such as `berth/stack-run` or `app/web`")]
    BadName(String),
    #[error("bad digest `{0}`: expected `sha256:` and 64 hex digits")]
    BadDigest(String),
    #[error("{what} is not in the image store — rebuild the image (stacks: `berth stack:build`)")]
    NotFound { what: String },
    #[error("{what} {digest} in the image store is unreadable ({detail}); delete it and rebuild the image")]
    Corrupt {
        what: &'static str,
        digest: String,
        detail: String,
    },
    #[error("{} is not an image archive berth can import: {problem} — pass a `docker save` tar or an OCI archive", path.display())]
    BadArchive { path: PathBuf, problem: String },
    #[error("the image store {} was written by an older berth (each layer kept twice: as a tar and extracted) — move it aside (`mv {} {}.old`), start the server again and push each app again", .root.display(), .root.display(), .root.display())]
    OldFormat { root: PathBuf },
    #[error("{tool} is not installed — install it with `apt-get install {package}` and retry")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("building {image} failed: {reason}\n--- last lines of mmdebstrap ---\n{log_tail}\n--- end ---\nCheck that the Debian mirror ({mirror}) is reachable from this host, then run `berth stack:build --force`")]
    StackBuild {
        image: String,
        reason: String,
        mirror: String,
        log_tail: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        action,
        path,
        source,
    }
}

/// A stored layer: its blob digest and the directory it is extracted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub digest: String,
    pub dir: PathBuf,
}

/// The part of an OCI image config berth uses to start processes. The fields after `cmd` are
/// set by Dockerfile builds and written to the OCI config only when set, so images without
/// them keep their digests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub working_dir: String,
    pub cmd: Vec<String>,
    pub entrypoint: Vec<String>,
    pub user: String,
    /// `8000/tcp`
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: String,
    pub volumes: Vec<String>,
    pub healthcheck: Option<Healthcheck>,
}

impl ImageConfig {
    /// The signal that stops the image's processes (`STOPSIGNAL`: `SIGQUIT`, `QUIT` or `3`);
    /// None for the default (SIGTERM), or for a name that is not a signal.
    pub fn stop_signal(&self) -> Option<i32> {
        parse_signal(&self.stop_signal)
    }

    /// The one TCP port the image exposes, if it exposes exactly one.
    pub fn port(&self) -> Option<u16> {
        match self.exposed_ports.as_slice() {
            [one] => one.strip_suffix("/tcp")?.parse().ok(),
            _ => None,
        }
    }
}

/// A signal as Dockerfiles write it: `SIGQUIT`, `QUIT` (any case) or its number.
pub fn parse_signal(text: &str) -> Option<i32> {
    use std::str::FromStr;
    if let Ok(number) = text.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(number)
            .ok()
            .map(|s| s as i32);
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name)
        .ok()
        .map(|s| s as i32)
}

/// Docker's `Healthcheck` image config (durations in nanoseconds, as Docker writes them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    #[serde(rename = "Test")]
    pub test: Vec<String>,
    #[serde(rename = "Interval", default)]
    pub interval_ns: u64,
    #[serde(rename = "Timeout", default)]
    pub timeout_ns: u64,
    #[serde(rename = "StartPeriod", default)]
    pub start_period_ns: u64,
    #[serde(rename = "Retries", default)]
    pub retries: u32,
}

/// An image read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub digest: String,
    pub config: ImageConfig,
    /// The layers, bottom-most first (as [`ImageStore::put_image`] takes them), so an image can
    /// be extended: `put_image(&[stack.layers, vec![app]].concat(), …)`.
    pub layers: Vec<Layer>,
}

impl Image {
    /// The extracted layer directories, TOP-most first: the order of an overlay `lowerdir=` list.
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        self.layers.iter().rev().map(|l| l.dir.clone()).collect()
    }
}

#[derive(Serialize, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize, Deserialize)]
struct OciConfig {
    architecture: String,
    os: String,
    config: OciRunConfig,
    rootfs: RootFs,
}

#[derive(Serialize, Deserialize)]
struct OciRunConfig {
    #[serde(rename = "Env", default, deserialize_with = "null_as_default")]
    env: Vec<String>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: String,
    #[serde(rename = "Cmd", default, deserialize_with = "null_as_default")]
    cmd: Vec<String>,
    #[serde(
        rename = "Entrypoint",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    entrypoint: Vec<String>,
    #[serde(rename = "User", default, skip_serializing_if = "String::is_empty")]
    user: String,
    #[serde(
        rename = "ExposedPorts",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(
        rename = "Labels",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    labels: BTreeMap<String, String>,
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    stop_signal: String,
    #[serde(
        rename = "Volumes",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    volumes: BTreeMap<String, serde_json::Value>,
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    healthcheck: Option<Healthcheck>,
}

/// Docker writes `null` for empty lists and maps.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl OciRunConfig {
    fn from_config(config: &ImageConfig) -> Self {
        let set = |list: &[String]| -> BTreeMap<String, serde_json::Value> {
            list.iter()
                .map(|k| (k.clone(), serde_json::json!({})))
                .collect()
        };
        OciRunConfig {
            env: config.env.clone(),
            working_dir: config.working_dir.clone(),
            cmd: config.cmd.clone(),
            entrypoint: config.entrypoint.clone(),
            user: config.user.clone(),
            exposed_ports: set(&config.exposed_ports),
            labels: config.labels.clone(),
            stop_signal: config.stop_signal.clone(),
            volumes: set(&config.volumes),
            healthcheck: config.healthcheck.clone(),
        }
    }

    fn into_config(self) -> ImageConfig {
        ImageConfig {
            env: self.env,
            working_dir: self.working_dir,
            cmd: self.cmd,
            entrypoint: self.entrypoint,
            user: self.user,
            exposed_ports: self.exposed_ports.into_keys().collect(),
            labels: self.labels,
            stop_signal: self.stop_signal,
            volumes: self.volumes.into_keys().collect(),
            healthcheck: self.healthcheck,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: String,
    manifests: Vec<Descriptor>,
}

/// The image store rooted at one directory (normally `DATA/images`).
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Held shared by whatever adds to the store (a build until its release is recorded, an
    /// import, a stack build) or reads a whole image out of it (an export), and exclusively by
    /// [`gc`], so a collection never removes an image or layer that is being made but not yet
    /// referenced, nor one being exported, nor their scratch.
    writers: std::sync::Arc<tokio::sync::RwLock<()>>,
}

impl ImageStore {
    /// Opens the store, creating its layout on first use.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = ImageStore {
            root: root.to_path_buf(),
            writers: Default::default(),
        };
        let had_layers = fs::read_dir(store.root.join("l")).is_ok_and(|mut d| d.next().is_some());
        if had_layers && !store.record_dir().is_dir() {
            return Err(ImageError::OldFormat {
                root: store.root.clone(),
            });
        }
        for dir in [
            store.blob_dir(),
            store.root.join("l"),
            store.record_dir(),
            store.root.join("refs"),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !store.root.join("index.json").exists() {
            store.write_index()?;
        }
        Ok(store)
    }

    /// Stores an uncompressed layer tar: extracts it under `l/` (its digest is then that of its
    /// canonical tar, see the module doc); the tar itself is not kept.
    ///
    /// Keeps modes, ownership, symlinks and hard links; skips device nodes and fifos (the
    /// runtime provides `/dev`); refuses the whole tar if an entry would land outside the root.
    pub fn import_layer_tar(&self, tar: &Path) -> Result<Layer, ImageError> {
        check_tar_paths(tar)?;
        let staging = self.tmp_path("extract");
        let result = extract_tar(tar, &staging).and_then(|()| self.store_layer(&staging));
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Packs `dir` as a layer whose files live under `/<prefix>` (e.g. `app` → `/app`).
    ///
    /// The layer's digest is that of its canonical tar, so equal directories give equal
    /// digests. `dir` is consumed: it is moved into place as the layer (no copy), or removed if
    /// the store already holds that layer.
    pub fn layer_from_dir(&self, dir: &Path, prefix: &str) -> Result<Layer, ImageError> {
        let prefix_path = Path::new(prefix);
        if prefix.is_empty()
            || !prefix_path
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(ImageError::BadPrefix(prefix.to_string()));
        }
        self.pack_layer(dir, prefix_path)
    }

    /// Packs `dir` as a layer whose root is `dir` itself (a build step's overlay upper dir, or
    /// a staged `COPY`). Consumed like [`ImageStore::layer_from_dir`]'s `dir`.
    pub fn layer_from_root(&self, dir: &Path) -> Result<Layer, ImageError> {
        self.pack_layer(dir, Path::new(""))
    }

    /// The stored layer `digest`; an error when the store does not hold it.
    pub fn layer(&self, digest: &str) -> Result<Layer, ImageError> {
        digest_hex(digest)?;
        let dir = self.layer_dir(digest);
        if !self.record_path(digest)?.is_file() || !dir.is_dir() {
            return Err(ImageError::NotFound {
                what: format!("layer {digest}"),
            });
        }
        Ok(Layer {
            digest: digest.to_string(),
            dir,
        })
    }

    /// The size of a stored layer's canonical tar.
    fn layer_size(&self, digest: &str) -> Result<u64, ImageError> {
        let path = self.record_path(digest)?;
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound {
                    what: format!("layer {digest}"),
                })
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        text.trim().parse().map_err(|_| ImageError::Corrupt {
            what: "layer record",
            digest: digest.to_string(),
            detail: format!("{text:?} is not a size"),
        })
    }

    /// Waits until nothing collects the store, then keeps collection out while the guard
    /// lives: hold it from making layers until the image is referenced (a release, a tag), or
    /// while exporting.
    pub async fn writing(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.writers.clone().read_owned().await
    }

    /// The layer cached under `key` (`cache/<key>`: a build step's cache key, 64 hex digits),
    /// if it is still in the store. This is where Dockerfile build steps are cached.
    pub fn cached_layer(&self, key: &str) -> Option<Layer> {
        let digest = fs::read_to_string(self.cache_path(key)?).ok()?;
        self.layer(digest.trim()).ok()
    }

    /// Remembers `layer` as the result of the build step `key`.
    pub fn cache_layer(&self, key: &str, layer: &Layer) -> Result<(), ImageError> {
        let path = self
            .cache_path(key)
            .ok_or_else(|| ImageError::BadDigest(key.to_string()))?;
        let dir = path.parent().expect("cache entries sit in cache/");
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        write_atomic(&path, layer.digest.as_bytes())
    }

    fn cache_path(&self, key: &str) -> Option<PathBuf> {
        (key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.root.join("cache").join(key))
    }

    /// A fresh scratch path inside the store, on its filesystem (so layers move in by rename).
    pub fn scratch(&self, what: &str) -> PathBuf {
        self.tmp_path(what)
    }

    /// Packs `dir` as a layer under `prefix` (empty: at the root): moves it into a staging
    /// folder in the store at `prefix` (copies it when it is on another filesystem), then
    /// stores that.
    fn pack_layer(&self, dir: &Path, prefix_path: &Path) -> Result<Layer, ImageError> {
        let staging = self.tmp_path("layer");
        let target = staging.join(prefix_path);
        let result = (|| {
            if let Some(parent) = target
                .parent()
                .filter(|_| !prefix_path.as_os_str().is_empty())
            {
                fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
                // The prefix's parents are root's and 0755 whatever the umask.
                let mut fixed = staging.clone();
                chmod_755(&fixed)?;
                for c in prefix_path.parent().unwrap_or(Path::new("")).components() {
                    fixed.push(c);
                    chmod_755(&fixed)?;
                }
            }
            match fs::rename(dir, &target) {
                Ok(()) => {}
                // Another filesystem: copy it through a tar, then drop the source.
                Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
                    let tar = self.tmp_path("copy.tar");
                    let copied = File::create(&tar)
                        .map_err(io_err("creating", &tar))
                        .and_then(|file| write_dir_tar(dir, io::BufWriter::new(file)))
                        .and_then(|_| extract_tar(&tar, &target));
                    let _ = fs::remove_file(&tar);
                    copied?;
                    fs::remove_dir_all(dir).map_err(io_err("removing", dir))?;
                }
                Err(e) => return Err(io_err("moving", dir)(e)),
            }
            self.store_layer(&staging)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Stores the finished layer tree `staged` (a scratch folder in the store, consumed):
    /// hashes its canonical tar, moves it to `l/<short>` unless that is there already, then
    /// writes the record. A directory under `l/` only ever appears whole (by rename), so one
    /// that is there holds this layer.
    fn store_layer(&self, staged: &Path) -> Result<Layer, ImageError> {
        chmod_755(staged)?;
        let hashed = write_dir_tar(staged, HashingWriter::new(io::sink()))?;
        let (_, digest, size) = hashed.finish();
        let dir = self.layer_dir(&digest);
        match fs::rename(staged, &dir) {
            Ok(()) => {}
            Err(_) if dir.is_dir() => {
                fs::remove_dir_all(staged).map_err(io_err("removing", staged))?;
            }
            Err(e) => return Err(io_err("moving", &dir)(e)),
        }
        let record = self.record_path(&digest)?;
        if !record.exists() {
            write_atomic(&record, size.to_string().as_bytes())?;
        }
        Ok(Layer { digest, dir })
    }

    /// Writes the config and manifest blobs of an image made of `layers` (bottom-most first)
    /// and returns the manifest digest (`sha256:…`).
    pub fn put_image(&self, layers: &[Layer], config: &ImageConfig) -> Result<String, ImageError> {
        let mut layer_descs = Vec::new();
        for layer in layers {
            layer_descs.push(Descriptor {
                media_type: LAYER_MEDIA_TYPE.to_string(),
                digest: layer.digest.clone(),
                size: self.layer_size(&layer.digest)?,
                annotations: None,
            });
        }
        let oci_config = OciConfig {
            architecture: oci_arch().to_string(),
            os: "linux".to_string(),
            config: OciRunConfig::from_config(config),
            rootfs: RootFs {
                kind: "layers".to_string(),
                diff_ids: layers.iter().map(|l| l.digest.clone()).collect(),
            },
        };
        let config_json = serde_json::to_vec(&oci_config).expect("config serializes");
        let config_desc = Descriptor {
            media_type: CONFIG_MEDIA_TYPE.to_string(),
            digest: self.put_blob_bytes(&config_json)?,
            size: config_json.len() as u64,
            annotations: None,
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: MANIFEST_MEDIA_TYPE.to_string(),
            config: config_desc,
            layers: layer_descs,
        };
        let manifest_json = serde_json::to_vec(&manifest).expect("manifest serializes");
        self.put_blob_bytes(&manifest_json)
    }

    /// Notes the layers of the earlier stages of the Dockerfile build that made `image`: they
    /// (and the step cache entries naming them) are kept as long as the image is.
    pub fn note_stage_layers(&self, image: &str, layers: &[Layer]) -> Result<(), ImageError> {
        let dir = self.stages_dir();
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let list: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        write_atomic(&dir.join(digest_hex(image)?), list.join("\n").as_bytes())
    }

    /// What [`ImageStore::note_stage_layers`] noted for `image`.
    fn stage_layers(&self, image: &str) -> Vec<String> {
        let Ok(hex) = digest_hex(image) else {
            return Vec::new();
        };
        fs::read_to_string(self.stages_dir().join(hex))
            .map(|text| text.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// Points the tag `name` at a manifest digest (replacing what it pointed at).
    pub fn tag(&self, name: &str, digest: &str) -> Result<(), ImageError> {
        let path = self.ref_path(name)?;
        if !self.blob_path(digest)?.exists() {
            return Err(ImageError::NotFound {
                what: digest.to_string(),
            });
        }
        write_atomic(&path, digest.as_bytes())?;
        self.write_index()
    }

    /// The manifest digest a tag points at, if the tag exists.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let path = self.ref_path(name).ok()?;
        let digest = fs::read_to_string(path).ok()?;
        Some(digest.trim().to_string())
    }

    /// Reads an image back: its config and its extracted layers, bottom-most first.
    pub fn image(&self, digest: &str) -> Result<Image, ImageError> {
        let manifest: Manifest = self.read_json_blob("manifest", digest)?;
        let config: OciConfig = self.read_json_blob("image config", &manifest.config.digest)?;
        let layers = manifest
            .layers
            .iter()
            .map(|desc| self.layer(&desc.digest))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Image {
            digest: digest.to_string(),
            config: config.config.into_config(),
            layers,
        })
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// `stages/<image hex>`: the layers of a Dockerfile build's earlier stages, per image.
    fn stages_dir(&self) -> PathBuf {
        self.root.join("stages")
    }

    fn record_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    fn record_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.record_dir().join(digest_hex(digest)?))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = digest_hex(digest)?;
        Ok(self.blob_dir().join(hex))
    }

    fn blob_size(&self, digest: &str) -> Result<u64, ImageError> {
        let path = self.blob_path(digest)?;
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ImageError::NotFound {
                what: digest.to_string(),
            }),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    /// `l/<short>`; callers pass digests the store produced or read from its own manifests.
    fn layer_dir(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.root.join("l").join(&hex[..SHORT_LEN.min(hex.len())])
    }

    fn ref_path(&self, name: &str) -> Result<PathBuf, ImageError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('\0') {
            return Err(ImageError::BadName(name.to_string()));
        }
        let escaped = name.replace('%', "%25").replace('/', "%2F");
        Ok(self.root.join("refs").join(escaped))
    }

    /// A unique temporary path inside the store (same filesystem, so renames are atomic).
    fn tmp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(format!(".tmp-{}-{}-{what}", std::process::id(), n))
    }

    fn put_blob_bytes(&self, bytes: &[u8]) -> Result<String, ImageError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let path = self.blob_path(&digest)?;
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok(digest)
    }

    fn read_json_blob<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        digest: &str,
    ) -> Result<T, ImageError> {
        let path = self.blob_path(digest)?;
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound {
                    what: digest.to_string(),
                })
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
            what,
            digest: digest.to_string(),
            detail: e.to_string(),
        })
    }

    /// Every tag, sorted.
    fn tag_names(&self) -> Result<Vec<String>, ImageError> {
        let refs = self.root.join("refs");
        let mut names: Vec<_> = fs::read_dir(&refs)
            .map_err(io_err("listing", &refs))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .map(|escaped| escaped.replace("%2F", "/").replace("%25", "%"))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Rewrites `index.json` from `refs/` (for OCI tools; refs stay the source of truth).
    fn write_index(&self) -> Result<(), ImageError> {
        let mut manifests = Vec::new();
        for name in self.tag_names()? {
            let Some(digest) = self.resolve(&name) else {
                continue;
            };
            let Ok(size) = self.blob_size(&digest) else {
                continue;
            };
            manifests.push(Descriptor {
                media_type: MANIFEST_MEDIA_TYPE.to_string(),
                digest,
                size,
                annotations: Some(HashMap::from([(
                    "org.opencontainers.image.ref.name".to_string(),
                    name,
                )])),
            });
        }
        let index = Index {
            schema_version: 2,
            media_type: INDEX_MEDIA_TYPE.to_string(),
            manifests,
        };
        let json = serde_json::to_vec(&index).expect("index serializes");
        write_atomic(&self.root.join("index.json"), &json)
    }
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(hex),
        _ => Err(ImageError::BadDigest(digest.to_string())),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_file_name(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("writing", path))
}

/// Refuses a tar with any entry (or hard link target) outside the root. Done before storing
/// anything, because the `tar` crate would silently skip such entries.
fn check_tar_paths(tar: &Path) -> Result<(), ImageError> {
    let file = File::open(tar).map_err(io_err("opening", tar))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let entries = archive.entries().map_err(io_err("reading", tar))?;
    for entry in entries {
        let entry = entry.map_err(io_err("reading", tar))?;
        let path = entry.path().map_err(io_err("reading", tar))?.into_owned();
        let link = if entry.header().entry_type().is_hard_link() {
            entry.link_name().map_err(io_err("reading", tar))?
        } else {
            None
        };
        for p in std::iter::once(path.as_path()).chain(link.as_deref()) {
            if p.components().any(|c| c == Component::ParentDir) {
                return Err(ImageError::UnsafeEntry {
                    tar: tar.to_path_buf(),
                    entry: p.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Extracts a (checked) tar into `dst`, keeping modes and ownership, skipping device nodes.
fn extract_tar(tar: &Path, dst: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(dst).map_err(io_err("creating", dst))?;
    let file = File::open(tar).map_err(io_err("opening", tar))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    // Directories last, deepest first, so a read-only directory does not block its children
    // and directory mtimes survive.
    let mut directories = Vec::new();
    let mut whiteouts = Vec::new();
    for entry in archive.entries().map_err(io_err("reading", tar))? {
        let mut entry = entry.map_err(io_err("reading", tar))?;
        let path = entry.path().map_err(io_err("reading", tar))?.into_owned();
        if path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()))
        {
            whiteouts.push(path);
            continue;
        }
        match entry.header().entry_type() {
            tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo => continue,
            tar::EntryType::Directory => directories.push(entry),
            _ => {
                entry.unpack_in(dst).map_err(io_err("extracting", tar))?;
            }
        }
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        dir.unpack_in(dst).map_err(io_err("extracting", tar))?;
    }
    for path in whiteouts {
        overlay_whiteout(dst, &path).map_err(io_err("extracting", tar))?;
    }
    // The layer root itself: like any image root, 0755.
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", dst))
}

/// OCI whiteouts: `.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` hides
/// everything below in its folder.
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Turns the OCI whiteout at `rel` into overlayfs's form under `root`: a 0:0 character device
/// in place of the deleted name, or the opaque xattr on the folder.
fn overlay_whiteout(root: &Path, rel: &Path) -> io::Result<()> {
    let name = rel.file_name().unwrap_or_default().to_string_lossy();
    let parent = root.join(rel.parent().unwrap_or(Path::new("")));
    fs::create_dir_all(&parent)?;
    if name == OPAQUE_WHITEOUT {
        let dir = std::ffi::CString::new(parent.as_os_str().as_encoded_bytes())?;
        let key = std::ffi::CString::new(OPAQUE_XATTR).expect("no NUL");
        // SAFETY: both are valid NUL-terminated strings; the value is one byte long.
        let rc =
            unsafe { nix::libc::lsetxattr(dir.as_ptr(), key.as_ptr(), b"y".as_ptr().cast(), 1, 0) };
        return if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    let target = parent.join(&name[WHITEOUT_PREFIX.len()..]);
    let _ = fs::remove_file(&target);
    nix::sys::stat::mknod(
        &target,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .map_err(io::Error::from)
}

/// Whether the folder carries overlayfs's opaque mark.
fn is_opaque(dir: &Path) -> bool {
    let (Ok(path), Ok(key)) = (
        std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()),
        std::ffi::CString::new(OPAQUE_XATTR),
    ) else {
        return false;
    };
    let mut value = [0u8; 1];
    // SAFETY: valid NUL-terminated strings and a buffer of the length passed.
    let n =
        unsafe { nix::libc::lgetxattr(path.as_ptr(), key.as_ptr(), value.as_mut_ptr().cast(), 1) };
    n == 1 && value[0] == b'y'
}

/// Writes the canonical tar of the layer tree `dir`: sorted names, mtime 0, real modes and
/// owners, hard links kept as links, overlay whiteouts as OCI ones, sockets and device nodes
/// left out, no entry for the root. A layer's digest is this tar's; export regenerates it.
fn write_dir_tar<W: Write>(dir: &Path, out: W) -> Result<W, ImageError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut seen_inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![(dir.to_path_buf(), PathBuf::new())];
    while let Some((src, name)) = stack.pop() {
        let meta = fs::symlink_metadata(&src).map_err(io_err("reading", &src))?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid() as u64);
        header.set_gid(meta.gid() as u64);
        header.set_mtime(0);
        header.set_size(0);
        let ft = meta.file_type();
        let packing = io_err("packing", &src);
        if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            // The root has no entry of its own.
            if !name.as_os_str().is_empty() {
                builder
                    .append_data(&mut header, &name, io::empty())
                    .map_err(packing)?;
            }
            if is_opaque(&src) {
                let mut wh = tar::Header::new_gnu();
                wh.set_entry_type(tar::EntryType::Regular);
                wh.set_mode(0o644);
                wh.set_size(0);
                wh.set_mtime(0);
                builder
                    .append_data(&mut wh, name.join(OPAQUE_WHITEOUT), io::empty())
                    .map_err(io_err("packing", &src))?;
            }
            let mut children: Vec<_> = fs::read_dir(&src)
                .map_err(io_err("listing", &src))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err("listing", &src))?;
            // Reverse-sorted onto the stack, so they come off in sorted order.
            children.sort();
            for child in children.into_iter().rev() {
                stack.push((src.join(&child), name.join(&child)));
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err("reading", &src))?;
            header.set_entry_type(tar::EntryType::Symlink);
            builder
                .append_link(&mut header, &name, &target)
                .map_err(packing)?;
        } else if std::os::unix::fs::FileTypeExt::is_char_device(&ft) && meta.rdev() == 0 {
            // An overlayfs whiteout (a build step deleted this name): OCI's `.wh.NAME`.
            let file = name.file_name().unwrap_or_default().to_string_lossy();
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(
                    &mut header,
                    name.with_file_name(format!("{WHITEOUT_PREFIX}{file}")),
                    io::empty(),
                )
                .map_err(packing)?;
        } else if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = seen_inodes.get(&key) {
                    header.set_entry_type(tar::EntryType::Link);
                    builder
                        .append_link(&mut header, &name, first)
                        .map_err(packing)?;
                    continue;
                }
                seen_inodes.insert(key, name.clone());
            }
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let data = File::open(&src).map_err(io_err("opening", &src))?;
            builder
                .append_data(&mut header, &name, data)
                .map_err(packing)?;
        }
    }
    builder.into_inner().map_err(io_err("packing", dir))
}

fn chmod_755(path: &Path) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", path))
}

/// Writes through to `out` (`io::sink()` to only learn a digest) while hashing and counting.
struct HashingWriter<W> {
    out: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The writer, the `sha256:` digest and the byte count of what went through.
    fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.out, digest, self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signals_as_dockerfiles_write_them() {
        for (text, want) in [
            ("SIGQUIT", Some(3)),
            ("quit", Some(3)),
            ("SIGUSR1", Some(10)),
            ("9", Some(9)),
            ("", None),
            ("SIGNOPE", None),
            ("99", None),
        ] {
            assert_eq!(super::parse_signal(text), want, "{text:?}");
        }
    }
}
