//! Pulling an image from an OCI registry (Docker Registry HTTP API v2) into the store, for a
//! Dockerfile `FROM registry.example:5000/name:tag`. The manifest (a linux image picked from an
//! index for this machine's architecture), the config and the layers are fetched, then stored
//! through the same path as `images:import` ([`ImageStore::store_foreign`]) and tagged with the
//! reference as written, so the next build finds it without pulling.
//!
//! References and manifests are read with the `oci-client` crate's types; the HTTP is
//! [`super::registry`]'s (oci-client's own client buffers whole answers and resolves names
//! itself). The registry is untrusted: manifests and configs over [`MAX_JSON`] are refused
//! before more is read, layers are streamed to a scratch file in the store, never past the
//! size their manifest gives, and every digest is checked. Plain HTTP only for loopback
//! registries; HTTPS with the system's roots otherwise.
//!
//! Owns what a pull fetches and stores; must not run anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::Reference;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tracing::info_span;
use tracing::Instrument;

use super::import::ConfigFile;
use super::registry::{read_limited, Registry, RegistryError};
use super::{digest_hex, oci_arch, ImageError, ImageStore};
use crate::progress::Progress;

/// The largest manifest or image config accepted from a registry.
pub const MAX_JSON: usize = 4 << 20;

/// Manifest media types berth asks for: OCI and Docker, single images and indexes.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Why a pull failed. Each message says what to do next.
#[derive(Debug, Error)]
pub enum PullError {
    #[error("`{reference}` is not an image reference such as `registry.example:5000/name:tag`")]
    BadReference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("the registry {registry} is on this machine's loopback, which a push may not make berth reach — use a registry elsewhere, or start `berth server` with --allow-loopback-registries (a registry on this host, tests)")]
    Loopback { registry: String },
    #[error("the registry {registry} sent berth on to {host}, which is on this machine's loopback and which a push may not make berth reach — use a registry that keeps to hosts elsewhere")]
    SentToLoopback { registry: String, host: String },
    #[error("cannot reach the registry {registry} (check that it runs and that this server can reach it)")]
    Unreachable {
        registry: String,
        #[source]
        source: RegistryError,
    },
    #[error("the registry {registry} shows a TLS certificate this server does not trust — if it comes from a private CA, start `berth server` with SSL_CERT_FILE naming a bundle of the usual roots and that CA")]
    Untrusted {
        registry: String,
        #[source]
        source: RegistryError,
    },
    #[error("the registry {registry} has no image `{reference}` — check the name and tag (`skopeo list-tags docker://{registry}/NAME` lists the tags)")]
    Unknown { registry: String, reference: String },
    #[error("the registry {registry} refused to hand out `{reference}` — if it needs a login, set it with `berth config:set APP BERTH_REGISTRY_USER=… BERTH_REGISTRY_PASSWORD=…`")]
    Denied { registry: String, reference: String },
    #[error("`{reference}` has no linux/{arch} image (it has {found}) — use an image built for linux/{arch}")]
    Platform {
        reference: String,
        arch: &'static str,
        found: String,
    },
    #[error("the registry {registry} sent a {what} of {size} bytes or more for `{reference}`, more than berth accepts ({MAX_JSON}) — is it an image?")]
    TooLarge {
        registry: String,
        reference: String,
        what: &'static str,
        size: u64,
    },
    #[error("the registry {registry} sent a bad {what} for `{reference}`: {detail} — check the image in the registry")]
    Bad {
        registry: String,
        reference: String,
        what: &'static str,
        detail: String,
    },
    #[error("the registry {registry} answered HTTP {code} for `{reference}` — check the registry and the name")]
    Status {
        registry: String,
        reference: String,
        code: u16,
    },
    #[error(
        "pulling `{reference}` from {registry} failed (retry; if it persists, check the registry)"
    )]
    Registry {
        registry: String,
        reference: String,
        #[source]
        source: RegistryError,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Whether `image` names a registry: a host with a `.` or a `:` (a port) before the first `/`,
/// or `localhost/…` — as Docker tells a registry host from a Docker Hub user name.
pub fn names_registry(image: &str) -> bool {
    image
        .split_once('/')
        .is_some_and(|(host, _)| host.contains(['.', ':']) || host == "localhost")
}

/// A registry login (app config `BERTH_REGISTRY_USER` / `BERTH_REGISTRY_PASSWORD`).
pub struct Login {
    pub user: String,
    pub password: String,
}

impl ImageStore {
    /// Pulls `reference` (as written in the Dockerfile) from its registry into the store,
    /// tagged `reference`; returns the manifest digest. Progress lines go to `out`.
    /// A registry on this machine's loopback (by name or by what its name resolves to, and
    /// so any host it redirects to) is refused unless `allow_loopback`: the daemon pulls from
    /// the host's network, where the host's loopback-only services are.
    pub async fn pull(
        self: &Arc<Self>,
        reference: &str,
        login: Option<Login>,
        allow_loopback: bool,
        out: &Progress,
    ) -> Result<String, PullError> {
        let parsed: Reference = reference
            .parse()
            .map_err(|source| PullError::BadReference {
                reference: reference.to_string(),
                source,
            })?;
        let registry = parsed.registry().to_string();
        let puller = Puller {
            registry: registry.clone(),
            written: reference.to_string(),
            reference: parsed,
        };
        let client = Registry::new(
            &registry,
            is_loopback(&registry),
            puller.reference.repository(),
            login.map(|l| (l.user, l.password)),
            allow_loopback,
        )
        .map_err(|e| puller.first_error(e))?;
        puller
            .pull(&client, self, out)
            .instrument(info_span!("pull", %reference, %registry))
            .await
    }
}

/// Whether the registry `host[:port]` is this machine's loopback (the only ones spoken to in
/// plain HTTP).
fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(host, _)| host);
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

struct Puller {
    /// `host[:port]`
    registry: String,
    /// The reference as the Dockerfile wrote it: the tag in the store.
    written: String,
    reference: Reference,
}

impl Puller {
    async fn pull(
        &self,
        client: &Registry,
        images: &Arc<ImageStore>,
        out: &Progress,
    ) -> Result<String, PullError> {
        let started = Instant::now();
        // Resolved once, here: a registry on this machine is refused before anything is sent.
        client.resolve().await.map_err(|e| self.first_error(e))?;
        out.line(format!("       Pulling {}", self.written)).await;
        let manifest = self.manifest(client).await?;
        let config = self.config(client, &manifest.config).await?;
        if config.os.as_deref().is_some_and(|os| os != "linux")
            || config
                .architecture
                .as_deref()
                .is_some_and(|a| a != oci_arch())
        {
            return Err(PullError::Platform {
                reference: self.written.clone(),
                arch: oci_arch(),
                found: format!(
                    "{}/{}",
                    config.os.as_deref().unwrap_or("?"),
                    config.architecture.as_deref().unwrap_or("?")
                ),
            });
        }
        let mut blobs = Vec::new();
        let result = self
            .layers(client, images, &manifest.layers, &mut blobs, out)
            .await;
        let stored = match result {
            Ok(()) => {
                let images = images.clone();
                let (name, paths) = (self.written.clone(), blobs.clone());
                tokio::task::spawn_blocking(move || images.store_foreign(config, &paths, &name))
                    .await
                    .expect("store task")
                    .map_err(PullError::from)
            }
            Err(e) => Err(e),
        };
        for blob in &blobs {
            let _ = tokio::fs::remove_file(blob).await;
        }
        let digest = stored?;
        out.line(format!(
            "       Pulled {} in {:.2} s",
            self.written,
            started.elapsed().as_secs_f64()
        ))
        .await;
        Ok(digest)
    }

    /// The image manifest; from an index, the entry for linux on this machine's architecture.
    async fn manifest(&self, client: &Registry) -> Result<OciImageManifest, PullError> {
        let mut wanted = self.reference.digest().map(str::to_string);
        for _ in 0..2 {
            let name = wanted
                .as_deref()
                .or(self.reference.tag())
                .unwrap_or("latest");
            let body = client
                .manifest(name, &MANIFEST_TYPES, MAX_JSON)
                .await
                .map_err(|e| self.sized_error("manifest", e))?;
            if let Some(digest) = &wanted {
                check_digest(&body, digest).map_err(|detail| self.bad("manifest", detail))?;
            }
            let manifest: OciManifest =
                serde_json::from_slice(&body).map_err(|e| self.bad("manifest", e.to_string()))?;
            match manifest {
                OciManifest::Image(image) => return Ok(image),
                OciManifest::ImageIndex(index) => {
                    let arch = oci_arch();
                    let platforms = || index.manifests.iter().filter_map(|m| m.platform.as_ref());
                    let entry = index.manifests.iter().find(|m| {
                        m.platform.as_ref().is_some_and(|p| {
                            p.os.to_string() == "linux" && p.architecture.to_string() == arch
                        })
                    });
                    let Some(entry) = entry else {
                        let found: Vec<String> = platforms()
                            .map(|p| format!("{}/{}", p.os, p.architecture))
                            .collect();
                        return Err(PullError::Platform {
                            reference: self.written.clone(),
                            arch,
                            found: if found.is_empty() {
                                "no platforms listed".into()
                            } else {
                                found.join(", ")
                            },
                        });
                    };
                    self.fetchable("manifest", &entry.digest)?;
                    wanted = Some(entry.digest.clone());
                }
            }
        }
        Err(self.bad("manifest", "an index points at another index".into()))
    }

    /// The image config, at most [`MAX_JSON`] bytes, its digest checked.
    async fn config(
        &self,
        client: &Registry,
        desc: &OciDescriptor,
    ) -> Result<ConfigFile, PullError> {
        if desc.size < 0 || desc.size as u64 > MAX_JSON as u64 {
            return Err(self.too_large("config", desc.size.max(0) as u64));
        }
        self.fetchable("config", &desc.digest)?;
        let response = client.blob(&desc.digest).await.map_err(|e| self.error(e))?;
        let bytes = read_limited(response, MAX_JSON)
            .await
            .map_err(|e| self.sized_error("config", e))?;
        check_digest(&bytes, &desc.digest).map_err(|detail| self.bad("config", detail))?;
        serde_json::from_slice(&bytes).map_err(|e| self.bad("config", e.to_string()))
    }

    /// Streams each layer to a scratch file in the store (pushed onto `blobs` as it is made,
    /// so the caller removes it whatever happens).
    async fn layers(
        &self,
        client: &Registry,
        images: &ImageStore,
        layers: &[OciDescriptor],
        blobs: &mut Vec<PathBuf>,
        out: &Progress,
    ) -> Result<(), PullError> {
        for (n, desc) in layers.iter().enumerate() {
            if !desc.media_type.ends_with("tar")
                && !desc.media_type.ends_with("tar+gzip")
                && !desc.media_type.ends_with("tar.gzip")
            {
                return Err(self.bad(
                    "layer",
                    format!(
                        "media type {} (berth reads tar and gzip layers)",
                        desc.media_type
                    ),
                ));
            }
            let started = Instant::now();
            let short = desc.digest.trim_start_matches("sha256:");
            let short = &short[..12.min(short.len())];
            out.line(format!(
                "       layer {}/{} {short} ({:.1} MB)",
                n + 1,
                layers.len(),
                desc.size.max(0) as f64 / 1e6
            ))
            .await;
            let path = images.scratch("pull-layer");
            blobs.push(path.clone());
            self.layer(client, desc, &path).await?;
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(layer = %desc.digest, ms, "pulled layer");
        }
        Ok(())
    }

    async fn layer(
        &self,
        client: &Registry,
        desc: &OciDescriptor,
        path: &std::path::Path,
    ) -> Result<(), PullError> {
        let limit = desc.size.max(0) as u64;
        self.fetchable("layer", &desc.digest)?;
        let mut response = client.blob(&desc.digest).await.map_err(|e| self.error(e))?;
        let io = |source| ImageError::Io {
            action: "writing",
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.bad("layer", e.to_string()))?
        {
            written += chunk.len() as u64;
            if written > limit {
                return Err(self.bad(
                    "layer",
                    format!(
                        "{} is longer than its manifest says ({limit} bytes)",
                        desc.digest
                    ),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        let got = format!("sha256:{}", hex::encode(hasher.finalize()));
        if got != desc.digest {
            return Err(self.bad(
                "layer",
                format!("its content has digest {got}, not {}", desc.digest),
            ));
        }
        Ok(())
    }

    /// What a failure of the registry client means for this pull.
    fn error(&self, e: RegistryError) -> PullError {
        let (registry, reference) = (self.registry.clone(), self.written.clone());
        match e {
            RegistryError::OwnHost { host } => PullError::SentToLoopback { registry, host },
            RegistryError::Status { code: 404, .. } => PullError::Unknown {
                registry,
                reference,
            },
            RegistryError::Status { ref errors, .. }
                if errors.iter().any(|c| {
                    matches!(
                        c.as_str(),
                        "MANIFEST_UNKNOWN" | "NAME_UNKNOWN" | "BLOB_UNKNOWN"
                    )
                }) =>
            {
                PullError::Unknown {
                    registry,
                    reference,
                }
            }
            RegistryError::Status {
                code: 401 | 403, ..
            } => PullError::Denied {
                registry,
                reference,
            },
            RegistryError::Status { ref errors, .. }
                if errors
                    .iter()
                    .any(|c| matches!(c.as_str(), "UNAUTHORIZED" | "DENIED")) =>
            {
                PullError::Denied {
                    registry,
                    reference,
                }
            }
            // Not the body: whatever answers (a loopback service, say) is not echoed to the push.
            RegistryError::Status { code, .. } => PullError::Status {
                registry,
                reference,
                code,
            },
            RegistryError::Untrusted(_) => PullError::Untrusted {
                registry,
                source: e,
            },
            RegistryError::Connect(_) | RegistryError::Resolve { .. } => PullError::Unreachable {
                registry,
                source: e,
            },
            _ => PullError::Registry {
                registry,
                reference,
                source: e,
            },
        }
    }

    /// [`Self::error`] before anything was sent: a host of this machine's is the registry's.
    fn first_error(&self, e: RegistryError) -> PullError {
        match e {
            RegistryError::OwnHost { .. } => PullError::Loopback {
                registry: self.registry.clone(),
            },
            e => self.error(e),
        }
    }

    /// [`Self::error`], with an answer over the size limit said to be the `what`.
    fn sized_error(&self, what: &'static str, e: RegistryError) -> PullError {
        match e {
            RegistryError::TooLarge { size, .. } => self.too_large(what, size),
            e => self.error(e),
        }
    }

    /// Whether `digest`, as the registry's manifest gives it, is one berth asks for: a
    /// sha256 digest (nothing else ends up in a URL).
    fn fetchable(&self, what: &'static str, digest: &str) -> Result<(), PullError> {
        digest_hex(digest)
            .map(drop)
            .map_err(|_| self.bad(what, format!("`{digest}` is not a sha256 digest")))
    }

    fn bad(&self, what: &'static str, detail: String) -> PullError {
        PullError::Bad {
            registry: self.registry.clone(),
            reference: self.written.clone(),
            what,
            detail,
        }
    }

    fn too_large(&self, what: &'static str, size: u64) -> PullError {
        PullError::TooLarge {
            registry: self.registry.clone(),
            reference: self.written.clone(),
            what,
            size,
        }
    }
}

fn check_digest(bytes: &[u8], digest: &str) -> Result<(), String> {
    let got = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    if got == digest {
        Ok(())
    } else {
        Err(format!("its content has digest {got}, not {digest}"))
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry::test_server::{serve, Answer, ENDLESS};
    use super::super::registry::MAX_SMALL;
    use super::*;
    use std::time::Duration;

    /// A registry that never stops sending (a manifest, an error or a token answer), or
    /// announces a manifest of 10 GB: each pull fails within seconds with what happened, and
    /// berth hangs up after reading at most about the limit (the server's writes fail long
    /// before its 256 MiB are out; what it did write sits in the kernel's socket buffers).
    #[tokio::test]
    async fn oversized_answers_are_refused_after_a_bounded_read() {
        let tmp = tempfile::tempdir().unwrap();
        let images = Arc::new(ImageStore::open(&tmp.path().join("images")).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = serve(listener, move |path| {
            let json = "Content-Type: application/json\r\n";
            match path.split('/').nth(2).unwrap_or_default() {
                "endless" => Answer::Endless(format!("HTTP/1.1 200 OK\r\n{json}")),
                "huge" => Answer::Endless(format!(
                    "HTTP/1.1 200 OK\r\n{json}Content-Length: 10000000000\r\n"
                )),
                "error" => Answer::Endless(format!("HTTP/1.1 404 Not Found\r\n{json}")),
                "token" => Answer::Full(
                    format!("HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/auth\",service=\"test\"\r\nContent-Length: 0\r\n"),
                    Vec::new(),
                ),
                _ => Answer::Endless(format!("HTTP/1.1 200 OK\r\n{json}")),
            }
        });
        for name in ["endless", "huge", "error", "token"] {
            let reference = format!("127.0.0.1:{port}/{name}/app:1");
            let started = Instant::now();
            let pulled = images
                .pull(&reference, None, true, &Progress::discard())
                .await;
            let error = pulled.expect_err(name);
            let expected = match name {
                "endless" => matches!(&error,
                    PullError::TooLarge { what: "manifest", size, .. } if *size > MAX_JSON as u64),
                "huge" => matches!(
                    &error,
                    PullError::TooLarge {
                        what: "manifest",
                        size: 10_000_000_000,
                        ..
                    }
                ),
                "error" => matches!(&error, PullError::Unknown { .. }),
                _ => matches!(&error,
                    PullError::Registry { source: RegistryError::Token { detail, .. }, .. }
                        if detail.contains(&format!("over the {MAX_SMALL}"))),
            };
            assert!(expected, "{name}: {error}");
            assert!(started.elapsed() < Duration::from_secs(10), "{name}");
        }
        // Each endless answer (all but the 401 asking for a token) was cut off by berth.
        let deadline = Instant::now() + Duration::from_secs(10);
        while hits.lock().unwrap().len() < 5 {
            assert!(Instant::now() < deadline, "{:?}", hits.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for hit in hits.lock().unwrap().iter() {
            let endless = !hit.path.starts_with("/v2/token/");
            assert!(
                !endless || (hit.cut_off && hit.written < ENDLESS / 4),
                "{hit:?}"
            );
        }
        let message = images
            .pull(
                &format!("127.0.0.1:{port}/endless/app:1"),
                None,
                true,
                &Progress::discard(),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("sent a manifest of") && message.contains("bytes or more for"),
            "{message}"
        );
    }

    /// Without --allow-loopback-registries, a registry on this machine (by name, by address
    /// in any spelling) is refused before anything is sent to it.
    #[tokio::test]
    async fn loopback_registries_are_refused_before_anything_is_sent() {
        let tmp = tempfile::tempdir().unwrap();
        let images = Arc::new(ImageStore::open(&tmp.path().join("images")).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = serve(listener, |_| {
            Answer::Full("HTTP/1.1 200 OK\r\n".into(), Vec::new())
        });
        for host in ["localhost", "127.0.0.1", "127.1", "0.0.0.0"] {
            let reference = format!("{host}:{port}/app:1");
            let pulled = images
                .pull(&reference, None, false, &Progress::discard())
                .await;
            match pulled {
                Err(PullError::Loopback { registry }) => {
                    assert_eq!(registry, format!("{host}:{port}"))
                }
                other => panic!("{reference}: {other:?}"),
            }
        }
        assert!(hits.lock().unwrap().is_empty());
    }

    #[test]
    fn only_loopback_registries_get_plain_http() {
        for (registry, loopback) in [
            ("127.0.0.1:5000", true),
            ("127.0.0.1", true),
            ("localhost:5000", true),
            ("[::1]:5000", true),
            ("[::1]", true),
            ("127.0.0.1.example:5000", false),
            ("localhost.example", false),
            ("registry.example:5000", false),
            ("10.0.0.1:5000", false),
            ("docker.io", false),
        ] {
            assert_eq!(is_loopback(registry), loopback, "{registry}");
        }
    }

    #[test]
    fn which_images_name_a_registry() {
        for (image, registry) in [
            ("127.0.0.1:5000/app:1", true),
            ("registry.example/team/app", true),
            ("localhost/app:latest", true),
            ("[::1]:5000/app", true),
            ("berth/stack-build", false),
            ("berth/stack-run:bookworm", false),
            ("python:3.12", false),
            ("scratch", false),
        ] {
            assert_eq!(names_registry(image), registry, "{image}");
        }
    }
}
