//! Builds: turns a pushed source tree into an OCI image with Heroku buildpacks (API v2).
//! The buildpacks run inside a build container on the `berth/stack-build` image with the source
//! at /app, the app's cache at /cache, its config at /env (one file per var) and the host CA
//! bundle passed in, in a network namespace of its own on berth's bridge (out by NAT; the host's
//! own services are firewalled off) and a user namespace mapped to the app's own host uid range
//! (`Job::users`, which `deploy` picks), so build code is no host root; the result is one
//! layer on top of `berth/stack-run`. The source and output are bound id-mapped, so what the
//! build writes there is stored with its own ids (the app layer's files are root's, not the
//! range's); the cache is the range's own.
//! Owns the build steps; must not start app containers or touch routes (that is `deploy`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_runtime::{Bind, ContainerSpec, IdMap, LogTarget, Runtime};
use rand::Rng;
use thiserror::Error;
use tracing::{info, info_span, Instrument};

use crate::checks::{self, Checks};
use crate::config::Config;
use crate::image::stack::{self, Stack};
use crate::image::{ImageConfig, ImageError, ImageStore};
use crate::limits::BuildLimits;
use crate::network::Network;
use crate::paths::Paths;
use crate::progress::Progress;
use crate::store::ProcessTypes;
use crate::tree;

pub mod buildpacks;
pub mod container;
pub mod dockerfile;
pub mod output;
pub mod procfile;
pub mod release;

/// Where the host CA bundle appears inside build containers.
const CA_BUNDLE_IN_BUILD: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The variables that point build tools at the CA bundle.
const CA_VARS: [&str; 4] = [
    "SSL_CERT_FILE",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
];

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{0} — check the server's disk space and permissions")]
    Io(#[from] std::io::Error),
    #[error("cannot start the build container: {0}")]
    Runtime(#[from] berth_runtime::Error),
    #[error("the build failed (exit code {0}) — see the output above, fix the app and push again")]
    Failed(i32),
    #[error("the build ran out of memory (its limit is {}) — make it use less, or raise the limit with `berth builds:set APP --memory 4G`", crate::limits::format_memory(*limit))]
    OutOfMemory { limit: u64 },
    #[error("the build ran longer than {} and was stopped — make it faster, or raise the limit with `berth builds:set APP --timeout 30m`", humantime::format_duration(*after))]
    TimedOut { after: std::time::Duration },
    #[error("Procfile: {0}")]
    Procfile(#[from] procfile::ProcfileError),
    #[error("the buildpack's release output is malformed: {0}")]
    Release(#[from] release::ReleaseError),
    #[error(transparent)]
    File(#[from] tree::TreeError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Checks(#[from] checks::ChecksError),
    #[error(transparent)]
    Dockerfile(#[from] dockerfile::DockerfileError),
    #[error("no process types: add a Procfile with a line like `web: python app.py` (or a CMD to the Dockerfile)")]
    NoProcessTypes,
    #[error(transparent)]
    Stack(#[from] buildpacks::StackError),
    #[error("the build cache referred to a dependency layer that is gone; the cache is cleared — push again")]
    StaleCache,
}

/// What a build produced.
pub struct Built {
    pub image: String,
    pub process_types: ProcessTypes,
    /// From app.json, when it has `healthchecks`.
    pub checks: Checks,
}

/// One stack build at a time, however many pushes wait for it.
static STACK_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What builds need: the image store, the runtime for build containers, the container network,
/// the data dir's layout (caches, buildpacks) and the host CA bundle to pass in.
pub struct Builder {
    pub images: Arc<ImageStore>,
    pub runtime: Arc<Runtime>,
    pub network: Arc<Network>,
    pub paths: Paths,
    pub ca_bundle: Option<PathBuf>,
    /// Whether a Dockerfile's `FROM` may pull from a registry on this machine's loopback.
    pub allow_loopback_registries: bool,
}

/// One build: which app, the pushed commit, the app's config, the limits to build under and
/// the host uid range its containers run as.
#[derive(Clone, Copy)]
pub struct Job<'a> {
    pub app: &'a str,
    pub source_version: &'a str,
    pub config: &'a Config,
    pub limits: BuildLimits,
    /// The app's own range (the one its containers run as): a build runs the app's code, so it
    /// gets no more than the app, and cannot touch another app's files or processes.
    pub users: IdMap,
}

impl Builder {
    /// Builds `source` (a checkout of commit `job.source_version` in `DATA/builds/ID/src`).
    /// The scratch folder is removed afterwards, pass or fail; on success the built tree now
    /// lives in the image store.
    pub async fn build(
        &self,
        job: Job<'_>,
        source: PathBuf,
        out: &Progress,
    ) -> Result<Built, BuildError> {
        let scratch = source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| source.clone());
        let app = job.app;
        let result = run_build(self, job, &source, &scratch, out)
            .instrument(info_span!("build", %app))
            .await;
        // In the background: the result does not wait for a venv's worth of unlinks. A server
        // stopped before it finishes clears `DATA/builds` on its next start.
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&scratch));
        result
    }

    /// The digests of `stack`'s images, building them if missing (or again with `force`), with
    /// progress streamed to `out`.
    pub async fn ensure_stacks(
        &self,
        stack: &Stack,
        force: bool,
        out: &Progress,
    ) -> Result<(String, String), BuildError> {
        let _guard = STACK_LOCK.lock().await;
        let images = self.images.clone();
        let progress = out.clone();
        let stack = *stack;
        Ok(tokio::task::spawn_blocking(move || {
            stack::ensure_stacks(&images, &stack, force, &mut |line: &str| {
                progress.blocking_line(format!("       {line}"))
            })
        })
        .await
        .expect("stack task")?)
    }
}

async fn run_build(
    d: &Builder,
    job: Job<'_>,
    source: &Path,
    scratch: &Path,
    out: &Progress,
) -> Result<Built, BuildError> {
    let Job {
        app,
        source_version,
        config,
        limits,
        users,
    } = job;
    let (stack, why) = buildpacks::choose_stack(source, config)?;
    if let Some(why) = why {
        out.line(format!("-----> {why}")).await;
    }
    let (build_image, run_image) = d.ensure_stacks(&stack, false, out).await?;
    if let Some(path) = dockerfile::find(source, config)? {
        return dockerfile::build(d, job, source, &path, out).await;
    }
    let env_dir = scratch.join("env");
    let out_dir = scratch.join("out");
    let cache_dir = d.paths.cache(app);
    for dir in [&env_dir, &out_dir, &cache_dir] {
        std::fs::create_dir_all(dir)?;
    }
    let cache = cache_dir.clone();
    tokio::task::spawn_blocking(move || own_cache(&cache, users))
        .await
        .expect("cache task")?;
    for (key, value) in config
        .iter()
        .filter(|(k, _)| !crate::config::is_registry_login(k))
    {
        std::fs::write(env_dir.join(key), value)?;
    }

    let images = d.images.clone();
    let stack_build = tokio::task::spawn_blocking(move || images.image(&build_image))
        .await
        .expect("image task")?;
    let mut env = stack_build.config.env.clone();
    env.extend([
        "HOME=/app".to_string(),
        format!("STACK=berth-{}", stack.suite),
        format!("SOURCE_VERSION={source_version}"),
    ]);
    if let Some(url) = config.get("BUILDPACK_URL") {
        env.push(format!("BUILDPACK_URL={url}"));
    }
    let mut binds = vec![
        idmapped(bind(source, "/app", false)),
        bind(&cache_dir, "/cache", false),
        bind(&env_dir, "/env", true),
        idmapped(bind(&out_dir, "/out", false)),
        bind(&d.paths.buildpacks(), "/buildpacks", true),
    ];
    if let Some(ca) = &d.ca_bundle {
        binds.push(bind(ca, CA_BUNDLE_IN_BUILD, true));
        for var in CA_VARS {
            env.push(format!("{var}={CA_BUNDLE_IN_BUILD}"));
        }
    }
    let suffix: u32 = rand::thread_rng().gen();
    let id = format!("build-{}-{suffix:08x}", &app[..app.len().min(40)]);
    let net = d.network.attach(&id, true).await?;
    binds.push(net.resolv_conf);
    let spec = ContainerSpec {
        id: id.clone(),
        layers: stack_build.layer_dirs(),
        args: [
            "/bin/sh",
            "/buildpacks/runner.sh",
            "/app",
            "/cache",
            "/env",
            "/out",
        ]
        .map(String::from)
        .to_vec(),
        env,
        cwd: "/app".into(),
        hostname: "build".into(),
        binds,
        netns: Some(net.netns),
        log: LogTarget::Inherit,
        stop_grace_secs: 5,
        limits: limits.limits.runtime(),
        init: true,
        user: None,
        users: Some(users),
        stop_signal: None,
    };

    out.line(format!("-----> Building {app} with buildpacks"))
        .await;
    let started = std::time::Instant::now();
    let job = container::OneOff {
        spec,
        deadline: limits.timeout,
        keep_upper: None,
    };
    let ran = container::run(&d.runtime, job, container::Io::Lines { out, indent: "" }).await;
    d.network.detach(&id, Some(net.ip)).await;
    info!(
        ms = started.elapsed().as_millis() as u64,
        ended = ?ran.as_ref().ok(),
        "build container finished"
    );
    match ran? {
        container::Ended::Exited(0) => {}
        container::Ended::Exited(code) => return Err(BuildError::Failed(code)),
        container::Ended::OutOfMemory => {
            return Err(BuildError::OutOfMemory {
                limit: limits.limits.memory,
            })
        }
        container::Ended::TimedOut => {
            return Err(BuildError::TimedOut {
                after: limits.timeout,
            })
        }
    }

    let process_types = process_types(source, &out_dir)?;
    out.line(format!(
        "-----> Discovering process types: {}",
        process_types.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
    .await;
    let checks = app_json_checks(source)?;
    for (process_type, list) in &checks {
        out.line(format!(
            "-----> app.json: {} check(s) for {process_type}",
            list.len()
        ))
        .await;
    }

    out.line("-----> Packing the image").await;
    let images = d.images.clone();
    let source = source.to_path_buf();
    let declared = buildpacks::declared_layers(&out_dir)?;
    let memo = d.paths.layer_memo(app);
    let started = std::time::Instant::now();
    let image = tokio::task::spawn_blocking(move || -> Result<String, BuildError> {
        let run = images.image(&run_image)?;
        let mut layers = run.layers.clone();
        // Dependency layers (a venv, node_modules) first, reused while their key is unchanged;
        // then the rest of /app.
        for declared in &declared {
            match buildpacks::dependency_layer(&images, &source, &memo, declared)? {
                buildpacks::Dependency::Layer(layer) => layers.push(layer),
                buildpacks::Dependency::Kept => {}
                buildpacks::Dependency::Stale => {
                    std::fs::remove_dir_all(&cache_dir)?;
                    return Err(BuildError::StaleCache);
                }
            }
        }
        layers.push(images.layer_from_dir(&source, "app")?);
        let config = ImageConfig {
            env: run.config.env.clone(),
            working_dir: "/app".into(),
            cmd: vec![],
            ..ImageConfig::default()
        };
        Ok(images.put_image(&layers, &config)?)
    })
    .await
    .expect("pack task")?;
    info!(%image, ms = started.elapsed().as_millis() as u64, "packed");
    Ok(Built {
        image,
        process_types,
        checks,
    })
}

/// The app.json health checks of the pushed tree (none without app.json).
fn app_json_checks(source: &Path) -> Result<Checks, BuildError> {
    Ok(match tree::read_file(source, "app.json")? {
        Some(text) => checks::from_app_json(&text)?,
        None => Checks::new(),
    })
}

fn bind(source: &Path, destination: &str, readonly: bool) -> Bind {
    Bind {
        source: source.to_path_buf(),
        destination: destination.to_string(),
        readonly,
        idmapped: false,
    }
}

/// `bind` id-mapped: what the build writes there keeps its own ids on disk (see [`Bind`]).
fn idmapped(bind: Bind) -> Bind {
    Bind {
        idmapped: true,
        ..bind
    }
}

/// Makes the app's buildpack cache `dir` the range `users`'s, as the build container's root
/// writes it: a cache left by a build from before builds had a user namespace (owned by host
/// root) is handed over whole, once, so it stays usable; one of another range (the app was
/// destroyed and made again before its cache was pruned) is emptied.
fn own_cache(dir: &Path, users: IdMap) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(dir)?.uid() {
        owner if owner == users.host_id => return Ok(()),
        0 => {}
        _ => {
            std::fs::remove_dir_all(dir)?;
            std::fs::create_dir_all(dir)?;
        }
    }
    berth_runtime::ids::to_host(dir, users)
}

/// The Procfile's process types over the buildpack's defaults.
fn process_types(source: &Path, out_dir: &Path) -> Result<ProcessTypes, BuildError> {
    let mut types = ProcessTypes::new();
    if let Some(yaml) = tree::read_file(out_dir, "release.yml")? {
        types.extend(release::default_process_types(&yaml)?);
    }
    if let Some(text) = tree::read_file(source, "Procfile")? {
        types.extend(procfile::parse(&text)?);
    }
    if types.is_empty() {
        return Err(BuildError::NoProcessTypes);
    }
    Ok(types)
}

impl From<dockerfile::parse::ParseError> for BuildError {
    fn from(err: dockerfile::parse::ParseError) -> Self {
        BuildError::Dockerfile(err.into())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// Needs root (chown).
    #[test]
    fn caches_become_the_ranges() {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(std::env::var("CI").is_err(), "needs root under CI");
            return;
        }
        let users = IdMap {
            host_id: 400_000,
            size: 65_536,
        };
        let owner = |path: &Path| std::fs::symlink_metadata(path).unwrap().uid();
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        std::fs::create_dir_all(cache.join("python/venv")).unwrap();
        std::fs::write(cache.join("python/venv.key"), "k").unwrap();
        // Left by a build as host root: handed over, contents kept.
        own_cache(&cache, users).unwrap();
        for path in ["", "python/venv", "python/venv.key"] {
            assert_eq!(owner(&cache.join(path)), 400_000, "{path}");
        }
        // Already the range's: left as it is.
        std::os::unix::fs::lchown(cache.join("python/venv.key"), Some(401_000), None).unwrap();
        own_cache(&cache, users).unwrap();
        assert_eq!(owner(&cache.join("python/venv.key")), 401_000);
        // Another range's: emptied and handed over.
        let other = IdMap {
            host_id: 500_000,
            size: 65_536,
        };
        own_cache(&cache, other).unwrap();
        assert_eq!(owner(&cache), 500_000);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    }
}
