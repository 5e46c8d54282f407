//! Pulling an image from an OCI registry (Docker Registry HTTP API v2) into the store with the
//! `oci-client` crate, for a Dockerfile `FROM registry.example:5000/name:tag`. The manifest (a
//! linux image picked from an index for this machine's architecture), the config and the
//! layers are fetched, then stored through the same path as `images:import`
//! ([`ImageStore::store_foreign`]) and tagged with the reference as written, so the next build
//! finds it without pulling.
//!
//! The registry is untrusted: manifests and configs over [`MAX_JSON`] are refused (a config
//! is read no further; a manifest only once `oci-client` has read it whole), layers are
//! streamed to a scratch file in the store, never past the size their manifest gives, and
//! their digests are checked. Plain HTTP only for loopback registries; HTTPS with the system's
//! roots otherwise.
//!
//! Owns talking to registries; must not run anything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tracing::info_span;
use tracing::Instrument;

use super::import::ConfigFile;
use super::{oci_arch, ImageError, ImageStore};
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
    #[error("cannot reach the registry {registry} (check that it runs and that this server can reach it)")]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
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
    #[error("the registry {registry} sent a {what} of {size} bytes for `{reference}`, more than berth accepts ({MAX_JSON}) — is it an image?")]
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
        source: OciDistributionError,
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
    /// A registry on this machine's loopback (by name or by what its name resolves to) is
    /// refused unless `allow_loopback`: the daemon pulls from the host's network, where the
    /// host's loopback-only services are.
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
        if !allow_loopback && resolves_to_loopback(parsed.registry()).await {
            return Err(PullError::Loopback {
                registry: parsed.registry().to_string(),
            });
        }
        let puller = Puller {
            client: client_for(parsed.registry()),
            registry: parsed.registry().to_string(),
            written: reference.to_string(),
            auth: match login {
                Some(l) => RegistryAuth::Basic(l.user, l.password),
                None => RegistryAuth::Anonymous,
            },
            reference: parsed,
        };
        let registry = puller.registry.clone();
        puller
            .pull(self, out)
            .instrument(info_span!("pull", %reference, %registry))
            .await
    }
}

/// One client per pull: plain HTTP to loopback registries only.
fn client_for(registry: &str) -> Client {
    // reqwest is built without its own crypto provider: berth uses ring throughout.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::new(ClientConfig {
        protocol: if is_loopback(registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    })
}

/// Whether the registry `host[:port]` is, or resolves to, an address of this machine's own
/// (loopback or unspecified). A name that cannot be resolved is not (the pull then fails as
/// unreachable).
async fn resolves_to_loopback(registry: &str) -> bool {
    if is_loopback(registry) {
        return true;
    }
    let target = if registry
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        registry.to_string()
    } else {
        format!("{registry}:443")
    };
    tokio::net::lookup_host(target)
        .await
        .is_ok_and(|mut addrs| addrs.any(|a| a.ip().is_loopback() || a.ip().is_unspecified()))
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
    client: Client,
    registry: String,
    /// The reference as the Dockerfile wrote it: the tag in the store.
    written: String,
    reference: Reference,
    auth: RegistryAuth,
}

impl Puller {
    async fn pull(&self, images: &Arc<ImageStore>, out: &Progress) -> Result<String, PullError> {
        let started = Instant::now();
        out.line(format!("       Pulling {}", self.written)).await;
        let manifest = self.manifest().await?;
        let config = self.config(&manifest.config).await?;
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
        let result = self.layers(images, &manifest.layers, &mut blobs, out).await;
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
    async fn manifest(&self) -> Result<oci_client::manifest::OciImageManifest, PullError> {
        let mut reference = self.reference.clone();
        for _ in 0..2 {
            let (body, _digest) = self
                .client
                .pull_manifest_raw(&reference, &self.auth, &MANIFEST_TYPES)
                .await
                .map_err(|e| self.error(e))?;
            if body.len() > MAX_JSON {
                return Err(self.too_large("manifest", body.len() as u64));
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
                    reference = self.reference.clone_with_digest(entry.digest.clone());
                }
            }
        }
        Err(self.bad("manifest", "an index points at another index".into()))
    }

    /// The image config, at most [`MAX_JSON`] bytes, its digest checked.
    async fn config(&self, desc: &OciDescriptor) -> Result<ConfigFile, PullError> {
        if desc.size < 0 || desc.size as u64 > MAX_JSON as u64 {
            return Err(self.too_large("config", desc.size.max(0) as u64));
        }
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, desc)
            .await
            .map_err(|e| self.error(e))?;
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.bad("config", e.to_string()))?;
            if bytes.len() + chunk.len() > MAX_JSON {
                return Err(self.too_large("config", (bytes.len() + chunk.len()) as u64));
            }
            bytes.extend_from_slice(&chunk);
        }
        check_digest(&bytes, &desc.digest).map_err(|detail| self.bad("config", detail))?;
        serde_json::from_slice(&bytes).map_err(|e| self.bad("config", e.to_string()))
    }

    /// Streams each layer to a scratch file in the store (pushed onto `blobs` as it is made,
    /// so the caller removes it whatever happens).
    async fn layers(
        &self,
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
            self.layer(desc, &path).await?;
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(layer = %desc.digest, ms, "pulled layer");
        }
        Ok(())
    }

    async fn layer(&self, desc: &OciDescriptor, path: &std::path::Path) -> Result<(), PullError> {
        let limit = desc.size.max(0) as u64;
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, desc)
            .await
            .map_err(|e| self.error(e))?;
        let io = |source| ImageError::Io {
            action: "writing",
            path: path.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.bad("layer", e.to_string()))?;
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

    fn error(&self, e: OciDistributionError) -> PullError {
        let has_code = |wanted: &dyn Fn(&OciErrorCode) -> bool| match &e {
            OciDistributionError::RegistryError { envelope, .. } => {
                envelope.errors.iter().any(|err| wanted(&err.code))
            }
            _ => false,
        };
        let (registry, reference) = (self.registry.clone(), self.written.clone());
        if has_code(&|c| {
            matches!(
                c,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
            )
        }) || matches!(e, OciDistributionError::ServerError { code: 404, .. })
        {
            return PullError::Unknown {
                registry,
                reference,
            };
        }
        if has_code(&|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            || matches!(
                e,
                OciDistributionError::UnauthorizedError { .. }
                    | OciDistributionError::AuthenticationFailure(_)
                    | OciDistributionError::ServerError {
                        code: 401 | 403,
                        ..
                    }
            )
        {
            return PullError::Denied {
                registry,
                reference,
            };
        }
        match &e {
            // Not the body: whatever answers (a loopback service, say) is not echoed to the push.
            OciDistributionError::ServerError { code, .. } => PullError::Status {
                registry,
                reference,
                code: *code,
            },
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
                PullError::Unreachable {
                    registry,
                    source: e,
                }
            }
            _ => PullError::Registry {
                registry,
                reference,
                source: e,
            },
        }
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
    use super::{is_loopback, names_registry};

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
