//! `berth images:import FILE`: an image archive — `docker save` output or an OCI image layout
//! packed as a tar (`skopeo copy … oci-archive:`, `buildah push … oci-archive:`) — into the
//! store, tagged so a Dockerfile's `FROM` can name it. Layers may be gzip-compressed; they are
//! stored uncompressed like every layer. The archive is untrusted: it is unpacked into a staging
//! folder inside the store (entries leaving it refused) and every file named by its manifests is
//! opened only inside that folder.
//!
//! Owns reading the two archive formats; must not run anything.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{io_err, ImageError, ImageStore, Manifest, OciRunConfig};

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct OciIndex {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
}

/// An image config as it comes from outside berth (an archive or a registry).
#[derive(Deserialize)]
pub(super) struct ConfigFile {
    #[serde(default)]
    pub(super) architecture: Option<String>,
    #[serde(default)]
    pub(super) os: Option<String>,
    #[serde(default)]
    config: Option<OciRunConfig>,
}

fn bad(archive: &Path, problem: impl Into<String>) -> ImageError {
    ImageError::BadArchive {
        path: archive.to_path_buf(),
        problem: problem.into(),
    }
}

impl ImageStore {
    /// Imports the image in `archive`, tags it `name` (or the name the archive carries) and
    /// returns (name, manifest digest).
    pub fn import_archive(
        &self,
        archive: &Path,
        name: Option<&str>,
    ) -> Result<(String, String), ImageError> {
        super::check_tar_paths(archive).map_err(|e| match e {
            ImageError::Io { source, .. } if source.kind() != io::ErrorKind::NotFound => {
                bad(archive, format!("it is not a tar ({source})"))
            }
            other => other,
        })?;
        let staging = self.tmp_path("import");
        let result = self.import_unpacked(archive, &staging, name);
        let _ = fs::remove_dir_all(&staging);
        result
    }

    fn import_unpacked(
        &self,
        archive: &Path,
        staging: &Path,
        name: Option<&str>,
    ) -> Result<(String, String), ImageError> {
        fs::create_dir_all(staging).map_err(io_err("creating", staging))?;
        let file = File::open(archive).map_err(io_err("opening", archive))?;
        tar::Archive::new(file)
            .unpack(staging)
            .map_err(io_err("unpacking", archive))?;
        let inside = |rel: &str| inside(archive, staging, rel);
        let read = |rel: &str| -> Result<serde_json::Value, ImageError> {
            read_json(archive, staging, rel)
        };
        let (config_rel, layer_rels, carried_name) = if staging.join("manifest.json").exists() {
            let manifests: Vec<DockerManifest> =
                parse(archive, "manifest.json", read("manifest.json")?)?;
            let [m] = <[DockerManifest; 1]>::try_from(manifests)
                .map_err(|_| bad(archive, "manifest.json must list exactly one image"))?;
            let tag = m.repo_tags.and_then(|t| t.into_iter().next());
            (m.config, m.layers, tag)
        } else if staging.join("index.json").exists() {
            let blob = |digest: &str| format!("blobs/{}", digest.replacen(':', "/", 1));
            let mut index: OciIndex = parse(archive, "index.json", read("index.json")?)?;
            let entry = loop {
                let arch = super::oci_arch();
                let mut entries = index.manifests.into_iter();
                let first = entries
                    .find(|e| e.platform.as_ref().is_none_or(|p| p.architecture == arch))
                    .ok_or_else(|| bad(archive, format!("its index has no {arch} image")))?;
                if first.media_type.contains("index") {
                    // A multi-platform index: pick this machine's image from it.
                    let rel = blob(&first.digest);
                    index = parse(archive, &rel, read(&rel)?)?;
                    continue;
                }
                break first;
            };
            let rel = blob(&entry.digest);
            let manifest: Manifest = parse(archive, &rel, read(&rel)?)?;
            let tag = entry
                .annotations
                .get("io.containerd.image.name")
                .or_else(|| entry.annotations.get("org.opencontainers.image.ref.name"))
                .cloned();
            (
                blob(&manifest.config.digest),
                manifest.layers.iter().map(|l| blob(&l.digest)).collect(),
                tag,
            )
        } else {
            return Err(bad(
                archive,
                "it has neither manifest.json (docker save) nor index.json (OCI)",
            ));
        };
        let name = name
            .map(String::from)
            .or(carried_name)
            .ok_or_else(|| bad(archive, "it names no image: pass --name NAME"))?;

        let config: ConfigFile = parse(archive, &config_rel, read(&config_rel)?)?;
        let layer_paths = layer_rels
            .iter()
            .map(|rel| inside(rel))
            .collect::<Result<Vec<_>, _>>()?;
        let digest = self.store_foreign(config, &layer_paths, &name)?;
        Ok((name, digest))
    }

    /// Stores an image that comes from outside berth — its config and its layer blobs (tars,
    /// plain or gzip), bottom-most first — and tags it `name`; returns the manifest digest.
    /// Archives ([`ImageStore::import_archive`]) and registry pulls (`pull`) both end here.
    pub(super) fn store_foreign(
        &self,
        config: ConfigFile,
        layer_blobs: &[PathBuf],
        name: &str,
    ) -> Result<String, ImageError> {
        let config = config
            .config
            .map(OciRunConfig::into_config)
            .unwrap_or_default();
        let mut layers = Vec::new();
        for path in layer_blobs {
            let plain = self.tmp_path("import-layer.tar");
            let unpacked = decompress(path, &plain).map_err(io_err("decompressing", path));
            let layer = unpacked.and_then(|()| self.import_layer_tar(&plain));
            let _ = fs::remove_file(&plain);
            layers.push(layer?);
        }
        let digest = self.put_image(&layers, &config)?;
        self.tag(name, &digest)?;
        Ok(digest)
    }
}

/// `rel` inside the unpacked archive: links inside it (docker save links shared layers) must
/// stay inside it.
fn inside(archive: &Path, staging: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let path = fs::canonicalize(staging.join(rel.trim_start_matches('/')))
        .map_err(|_| bad(archive, format!("it names `{rel}`, which it does not hold")))?;
    let root = fs::canonicalize(staging).map_err(io_err("reading", staging))?;
    if !path.starts_with(&root) || !path.is_file() {
        return Err(bad(archive, format!("`{rel}` leaves the archive")));
    }
    Ok(path)
}

fn read_json(archive: &Path, staging: &Path, rel: &str) -> Result<serde_json::Value, ImageError> {
    let path = inside(archive, staging, rel)?;
    let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| bad(archive, format!("{rel}: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(
    archive: &Path,
    rel: &str,
    value: serde_json::Value,
) -> Result<T, ImageError> {
    serde_json::from_value(value).map_err(|e| bad(archive, format!("{rel}: {e}")))
}

/// Copies a layer blob to `out`, gunzipping it when it is gzip.
fn decompress(path: &Path, out: &Path) -> io::Result<()> {
    let mut head = [0u8; 2];
    let gz = File::open(path)?.read(&mut head)? == 2 && head == [0x1f, 0x8b];
    let file = File::open(path)?;
    let mut reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    io::copy(&mut reader, &mut File::create(out)?)?;
    Ok(())
}
