//! `berth images:export`: one image as a tar that is both a `docker save` archive
//! (`manifest.json`, what `docker load` and `skopeo … docker-archive:` read) and an OCI image
//! layout (`oci-layout`, `index.json`, `blobs/sha256/…`, what `skopeo … oci-archive:` reads),
//! as Docker 25 writes them: both name the same blob files. Each layer's tar is regenerated
//! from its extracted directory and checked against its digest before it goes out.
//!
//! Owns the archive's layout; must not change the store.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};

use serde::Serialize;

use super::{
    io_err, write_dir_tar, Descriptor, HashingWriter, ImageError, ImageStore, Index, Manifest,
    INDEX_MEDIA_TYPE, MANIFEST_MEDIA_TYPE,
};

/// One entry of a `docker save` `manifest.json`.
#[derive(Serialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

fn blob_name(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// A name Docker accepts as a repo tag: `name:tag`, `:latest` added when there is no tag.
fn repo_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

impl ImageStore {
    /// Writes the image `digest` as an archive to `out`, tagged `name` (`app:v3`,
    /// `berth/stack-run:trixie`) when given.
    pub fn export(
        &self,
        digest: &str,
        name: Option<&str>,
        out: impl Write,
    ) -> Result<(), ImageError> {
        let manifest_path = self.blob_path(digest)?;
        let manifest_bytes = fs::read(&manifest_path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound {
                what: format!("image {digest}"),
            },
            _ => io_err("reading", &manifest_path)(e),
        })?;
        let manifest: Manifest = self.read_json_blob("manifest", digest)?;
        let config_path = self.blob_path(&manifest.config.digest)?;
        let config_bytes = fs::read(&config_path).map_err(io_err("reading", &config_path))?;

        let mut tar = tar::Builder::new(out);
        let mut add = |path: &str, bytes: &[u8]| -> Result<(), ImageError> {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(bytes.len() as u64);
            tar.append_data(&mut header, path, bytes)
                .map_err(io_err("writing the archive for", &manifest_path))
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut annotations = HashMap::new();
        if let Some(name) = name {
            let tagged = repo_tag(name);
            let tag = tagged.rsplit_once(':').map_or("latest", |(_, t)| t);
            annotations.insert("io.containerd.image.name".to_string(), tagged.clone());
            annotations.insert(
                "org.opencontainers.image.ref.name".to_string(),
                tag.to_string(),
            );
        }
        let index = Index {
            schema_version: 2,
            media_type: INDEX_MEDIA_TYPE.to_string(),
            manifests: vec![Descriptor {
                media_type: MANIFEST_MEDIA_TYPE.to_string(),
                digest: digest.to_string(),
                size: manifest_bytes.len() as u64,
                annotations: (!annotations.is_empty()).then_some(annotations),
            }],
        };
        add(
            "index.json",
            &serde_json::to_vec(&index).expect("index serializes"),
        )?;
        let docker = [DockerManifest {
            config: blob_name(&manifest.config.digest),
            repo_tags: name.map(repo_tag).into_iter().collect(),
            layers: manifest
                .layers
                .iter()
                .map(|l| blob_name(&l.digest))
                .collect(),
        }];
        add(
            "manifest.json",
            &serde_json::to_vec(&docker).expect("manifest serializes"),
        )?;
        add(&blob_name(digest), &manifest_bytes)?;
        add(&blob_name(&manifest.config.digest), &config_bytes)?;
        let mut done = std::collections::HashSet::new();
        for desc in &manifest.layers {
            if done.insert(desc.digest.clone()) {
                self.append_layer(&mut tar, &desc.digest)?;
            }
        }
        tar.into_inner()
            .and_then(|mut out| out.flush())
            .map_err(io_err("writing the archive for", &manifest_path))
    }

    /// Writes layer `digest`'s tar (regenerated from its directory) to `out`; an error when it
    /// no longer hashes to `digest` (its files were changed on disk).
    pub fn write_layer_tar<W: Write>(&self, digest: &str, out: W) -> Result<W, ImageError> {
        let layer = self.layer(digest)?;
        let (out, got, _) = write_dir_tar(&layer.dir, HashingWriter::new(out))?.finish();
        if got != digest {
            return Err(ImageError::Corrupt {
                what: "layer",
                digest: digest.to_string(),
                detail: format!("its files now give {got}: they were changed on disk"),
            });
        }
        Ok(out)
    }

    /// Regenerates layer `digest`'s tar into a scratch file (a tar entry needs its size
    /// first, and a changed layer must fail before any of it is sent), then appends it.
    fn append_layer<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        digest: &str,
    ) -> Result<(), ImageError> {
        let scratch = self.tmp_path("export-layer.tar");
        let result = (|| {
            let file = File::create(&scratch).map_err(io_err("creating", &scratch))?;
            self.write_layer_tar(digest, io::BufWriter::new(file))?
                .into_inner()
                .map_err(|e| io_err("writing", &scratch)(e.into_error()))?;
            let mut file = File::open(&scratch).map_err(io_err("opening", &scratch))?;
            let size = file.metadata().map_err(io_err("reading", &scratch))?.len();
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(size);
            tar.append_data(&mut header, blob_name(digest), &mut file)
                .map_err(io_err("writing the archive with", &scratch))
        })();
        let _ = fs::remove_file(&scratch);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::repo_tag;

    #[test]
    fn repo_tags_always_have_a_tag() {
        for (name, want) in [
            ("web:v3", "web:v3"),
            ("berth/stack-run", "berth/stack-run:latest"),
            ("localhost:5000/x", "localhost:5000/x:latest"),
            ("localhost:5000/x:1", "localhost:5000/x:1"),
        ] {
            assert_eq!(repo_tag(name), want);
        }
    }
}
