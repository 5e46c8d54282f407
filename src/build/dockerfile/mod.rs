//! Dockerfile builds, with no Docker daemon: chosen when the pushed tree has a `Dockerfile` (or
//! the file the app's `BERTH_DOCKERFILE_PATH` names). Each stage starts from an image in
//! berth's store (by name, e.g. `berth/stack-build`; a name with a registry host that the
//! store lacks is pulled into it first, [`crate::image::pull`]), an earlier stage, or
//! `scratch`; each `RUN` runs in a build container (its own netns, a user namespace mapped to
//! the app's host uid range, the host CA bundle passed in) over the layers so far, and the
//! container's overlay upper dir, handed back to the container's own ids, becomes the step's
//! layer; `COPY`/`ADD` stage their files in a folder that becomes a layer. The other instructions change the image
//! config. The result is an image in the store.
//!
//! **Layer cache**: every step has a key chained from its parent's key, the instruction as
//! expanded, the build args and env in effect and, for `COPY`/`ADD`, the hash of the copied
//! files; the store keeps `cache/<key>` → layer ([`ImageStore::cached_layer`]). An unchanged
//! rebuild reuses every layer; a changed copied file rebuilds from its step on.
//!
//! Owns the Dockerfile steps; must not start app containers or touch routes.

pub mod context;
pub mod parse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_runtime::{ContainerSpec, LogTarget};
use rand::Rng;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tracing::{info_span, Instrument};

use super::container::{self, Ended, OneOff};
use super::{bind, procfile, BuildError, Builder, Built, Job, CA_BUNDLE_IN_BUILD, CA_VARS};
use crate::checks::{self, Checks};
use crate::config::Config;
use crate::image::pull::{self, PullError};
use crate::image::{self, ImageConfig, ImageStore, Layer};
use crate::limits::BuildLimits;
use crate::progress::Progress;
use crate::store::ProcessTypes;
use crate::tree;
use context::{Ignore, Owner};
use parse::{Command, Instruction, Kind};

/// App config naming the Dockerfile to build (relative to the repo root).
pub const PATH_VAR: &str = "BERTH_DOCKERFILE_PATH";
/// App config: the user name and password `FROM` uses to pull from a registry.
/// The longest instruction text shown in a `Step n/m : …` line.
const MAX_STEP_TEXT: usize = 200;

/// Why a Dockerfile build failed. Each message says what to do next.
#[derive(Debug, Error)]
pub enum DockerfileError {
    #[error(transparent)]
    Parse(#[from] parse::ParseError),
    #[error("Dockerfile line {line}: {problem}\n    {text}\nfix the Dockerfile and push again")]
    Step {
        line: usize,
        text: String,
        problem: String,
    },
    #[error("Dockerfile line {line}: the step failed (exit code {code}) — see its output above, fix it and push again")]
    RunFailed { line: usize, code: i32 },
    #[error("Dockerfile line {line}: {text}")]
    Pull {
        line: usize,
        text: String,
        #[source]
        source: Box<PullError>,
    },
    #[error("{0} — fix it and push again")]
    Ignore(String),
    #[error("{PATH_VAR}={0} is not a file in the pushed tree — fix the config or add the file")]
    Missing(String),
    #[error("USER {user}: {problem} — create the user in a RUN step (useradd) or give a numeric uid:gid")]
    User { user: String, problem: String },
}

/// The numeric user a stage's `USER` names (resolved in its image's /etc/passwd and
/// /etc/group); None for root or no `USER`.
fn user_of(stage: &Stage) -> Result<Option<berth_runtime::User>, DockerfileError> {
    let user = stage.config.user.as_str();
    if user.is_empty() {
        return Ok(None);
    }
    let (uid, gid) =
        context::owner(&stage.dirs(), user).map_err(|problem| DockerfileError::User {
            user: user.to_string(),
            problem,
        })?;
    Ok(Some(berth_runtime::User { uid, gid }))
}

/// The Dockerfile to build, if the app has one: its path in the tree.
pub fn find(source: &Path, config: &Config) -> Result<Option<String>, BuildError> {
    match config.get(PATH_VAR) {
        Some(path) => {
            let path = context::clean(path);
            if tree::has_file(source, &path) {
                Ok(Some(path))
            } else {
                Err(DockerfileError::Missing(path).into())
            }
        }
        None => Ok(tree::has_file(source, "Dockerfile").then(|| "Dockerfile".to_string())),
    }
}

/// One stage being built.
#[derive(Clone)]
struct Stage {
    name: Option<String>,
    layers: Vec<Layer>,
    config: ImageConfig,
    /// The cache key of the state so far.
    key: String,
    /// `ARG`s declared in this stage, with their values.
    args: BTreeMap<String, String>,
    shell: Vec<String>,
}

impl Stage {
    fn dirs(&self) -> Vec<PathBuf> {
        self.layers.iter().rev().map(|l| l.dir.clone()).collect()
    }

    /// Variables for expansion: args, then env over them.
    fn vars(&self) -> BTreeMap<String, String> {
        let mut vars = self.args.clone();
        for kv in &self.config.env {
            if let Some((k, v)) = kv.split_once('=') {
                vars.insert(k.to_string(), v.to_string());
            }
        }
        vars
    }

    fn set_env(&mut self, key: &str, value: &str) {
        self.config
            .env
            .retain(|kv| kv.split_once('=').map(|(k, _)| k) != Some(key));
        self.config.env.push(format!("{key}={value}"));
    }

    fn chain(&mut self, parts: &[&str]) {
        let mut hasher = Sha256::new();
        hasher.update(self.key.as_bytes());
        for part in parts {
            hasher.update([0]);
            hasher.update(part.as_bytes());
        }
        self.key = hex::encode(hasher.finalize());
    }
}

/// Builds the Dockerfile at `path` in `source` for `job.app`.
pub async fn build(
    d: &Builder,
    job: Job<'_>,
    source: &Path,
    path: &str,
    out: &Progress,
) -> Result<Built, BuildError> {
    let Job {
        app,
        config,
        limits,
        users,
        ..
    } = job;
    let budget = Budget {
        app,
        limits,
        until: Instant::now() + limits.timeout,
        users,
    };
    let text = tree::read_file(source, path)?.unwrap_or_default();
    let instructions = parse::parse(&text)?;
    let ignore = match tree::read_file(source, ".dockerignore")? {
        Some(text) => Ignore::parse(&text).map_err(DockerfileError::Ignore)?,
        None => Ignore::default(),
    };
    // The folder the Dockerfile is in, for a Procfile next to it.
    let dir = Path::new(path)
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.line(format!("-----> Building {app} from {path}")).await;

    let total = instructions.len();
    let mut stages: Vec<Stage> = Vec::new();
    let mut global_args: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<Stage> = None;
    let started = Instant::now();
    for (n, instruction) in instructions.iter().enumerate() {
        let shown: String = instruction.text.chars().take(MAX_STEP_TEXT).collect();
        out.line(format!("Step {}/{total} : {shown}", n + 1)).await;
        let step_started = Instant::now();
        let fail = |problem| step_error(instruction, problem);
        let cached = match (&instruction.kind, current.as_mut()) {
            (Kind::Arg(raw), None) => {
                for (name, value) in arg_values(raw, &global_args, config).map_err(fail)? {
                    global_args.insert(name, value);
                }
                None
            }
            (Kind::From { image, name }, _) => {
                if let Some(done) = current.take() {
                    stages.push(done);
                }
                let image = parse::words(image, &global_args).map_err(fail)?.join("");
                let stage = from(d, &stages, &image, name.clone(), config, &budget, out).await;
                current = Some(stage.map_err(|e| {
                    match e {
                        FromError::Problem(problem) => fail(problem),
                        FromError::TimedOut => BuildError::TimedOut {
                            after: budget.limits.timeout,
                        },
                        FromError::Pull(source) => DockerfileError::Pull {
                            line: instruction.line,
                            text: instruction.text.clone(),
                            source,
                        }
                        .into(),
                    }
                })?);
                None
            }
            (_, None) => unreachable!("parse puts FROM first"),
            (kind, Some(stage)) => {
                step(
                    d,
                    source,
                    &ignore,
                    &stages,
                    stage,
                    instruction,
                    kind,
                    &global_args,
                    config,
                    &budget,
                    out,
                )
                .instrument(info_span!("step", line = instruction.line))
                .await?
            }
        };
        let secs = step_started.elapsed().as_secs_f64();
        match cached {
            Some(true) => out.line(format!(" ---> Using cache ({secs:.2} s)")).await,
            _ => out.line(format!(" ---> {secs:.2} s")).await,
        }
    }
    let mut stage = current.expect("parse requires a FROM");
    // No WORKDIR means `/`, as in Docker (berth starts containers of images without one in
    // `/app`, where buildpacks put the app; a base image from a registry may not have it).
    if stage.config.working_dir.is_empty() {
        stage.config.working_dir = "/".into();
    }
    out.line(format!(
        "-----> Built in {:.2} s",
        started.elapsed().as_secs_f64()
    ))
    .await;
    // Stored numerically: the app's containers start as it without reading /etc/passwd.
    if let Some(user) = user_of(&stage)? {
        stage.config.user = format!("{}:{}", user.uid, user.gid);
    }

    let process_types = process_types(source, &dir, &stage.config)?;
    out.line(format!(
        "-----> Process types: {}",
        process_types.keys().cloned().collect::<Vec<_>>().join(", ")
    ))
    .await;
    let checks = super::app_json_checks(source)?;
    let checks = if checks.is_empty() {
        healthcheck(&stage.config, out).await
    } else {
        checks
    };
    let images = d.images.clone();
    let earlier: Vec<Layer> = stages.into_iter().flat_map(|s| s.layers).collect();
    let image = tokio::task::spawn_blocking(move || {
        let image = images.put_image(&stage.layers, &stage.config)?;
        images.note_stage_layers(&image, &earlier)?;
        Ok::<_, crate::image::ImageError>(image)
    })
    .await
    .expect("image task")?;
    Ok(Built {
        image,
        process_types,
        checks,
    })
}

/// A step's instruction refused with the problem, its line and its text.
fn step_error(instruction: &Instruction, problem: String) -> BuildError {
    DockerfileError::Step {
        line: instruction.line,
        text: instruction.text.clone(),
        problem,
    }
    .into()
}

/// The values of an `ARG` line: the app's config (build args) over the defaults.
fn arg_values(
    raw: &str,
    vars: &BTreeMap<String, String>,
    config: &Config,
) -> Result<Vec<(String, String)>, String> {
    Ok(parse::words(raw, vars)?
        .into_iter()
        .map(|word| {
            let (name, default) = match word.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (word, String::new()),
            };
            let value = config.get(&name).cloned().unwrap_or(default);
            (name, value)
        })
        .collect())
}

/// Why a `FROM` could not start its stage.
enum FromError {
    /// A problem with the line itself.
    Problem(String),
    Pull(Box<PullError>),
    /// The pull ran past the build's deadline.
    TimedOut,
}

/// The start of a stage: an earlier stage, `scratch`, an image in the store, or one pulled from
/// the registry the name starts with (then kept in the store under that name).
async fn from(
    d: &Builder,
    stages: &[Stage],
    image: &str,
    name: Option<String>,
    config: &Config,
    budget: &Budget<'_>,
    out: &Progress,
) -> Result<Stage, FromError> {
    let stage = |layers, config, key: String| Stage {
        name: name.clone(),
        layers,
        config,
        key,
        args: BTreeMap::new(),
        shell: vec!["/bin/sh".into(), "-c".into()],
    };
    if let Some(parent) = stages
        .iter()
        .find(|s| s.name.as_deref() == Some(&image.to_ascii_lowercase()))
    {
        let mut s = parent.clone();
        s.name = name;
        s.args.clear();
        return Ok(s);
    }
    if image == "scratch" {
        return Ok(stage(Vec::new(), ImageConfig::default(), "scratch".into()));
    }
    let images = d.images.clone();
    let owned = image.to_string();
    let stored = tokio::task::spawn_blocking(move || resolve(&images, &owned))
        .await
        .expect("image task");
    let digest = match stored {
        Some(digest) => Some(digest),
        None if pull::names_registry(image) => {
            let login = match (
                config.get(crate::config::REGISTRY_USER),
                config.get(crate::config::REGISTRY_PASSWORD),
            ) {
                (Some(user), Some(password)) => Some(pull::Login {
                    user: user.clone(),
                    password: password.clone(),
                }),
                _ => None,
            };
            // A pull counts against the build's time limit like any step.
            let pull = d
                .images
                .pull(image, login, d.allow_loopback_registries, out);
            let digest = tokio::time::timeout_at(budget.until.into(), pull)
                .await
                .map_err(|_| FromError::TimedOut)?;
            Some(digest.map_err(|e| FromError::Pull(Box::new(e)))?)
        }
        None => None,
    };
    let images = d.images.clone();
    let found = tokio::task::spawn_blocking(move || digest.and_then(|d| images.image(&d).ok()))
        .await
        .expect("image task");
    let found = found.ok_or_else(|| {
        FromError::Problem(format!(
            "the image `{image}` is not in berth's image store — use `berth/stack-build`, `berth/stack-run`, `scratch`, an earlier stage, an image from `berth images:import`, or a registry reference such as `registry.example:5000/name:tag`"
        ))
    })?;
    let key = found.digest.clone();
    Ok(stage(found.layers, found.config, key))
}

/// A tag in the store: `name:tag`, or `name` (also for `name:latest`).
fn resolve(images: &ImageStore, name: &str) -> Option<String> {
    images.resolve(name).or_else(|| {
        name.strip_suffix(":latest")
            .and_then(|bare| images.resolve(bare))
    })
}

/// Runs one instruction on `stage`. `Some(true)`: its layer came from the cache; `Some(false)`:
/// built; `None`: config only.
#[allow(clippy::too_many_arguments)]
async fn step(
    d: &Builder,
    source: &Path,
    ignore: &Ignore,
    stages: &[Stage],
    stage: &mut Stage,
    instruction: &Instruction,
    kind: &Kind,
    global_args: &BTreeMap<String, String>,
    config: &Config,
    budget: &Budget<'_>,
    out: &Progress,
) -> Result<Option<bool>, BuildError> {
    let fail = |problem| step_error(instruction, problem);
    let vars = stage.vars();
    let one = |raw: &str| -> Result<String, BuildError> {
        Ok(parse::words(raw, &vars).map_err(fail)?.join(" "))
    };
    match kind {
        Kind::Arg(raw) => {
            let mut scope = global_args.clone();
            scope.extend(vars.clone());
            for (name, value) in arg_values(raw, &scope, config).map_err(fail)? {
                // A global ARG re-declared without a default takes the global value.
                let value = match (value.is_empty(), global_args.get(&name)) {
                    (true, Some(global)) => global.clone(),
                    _ => value,
                };
                stage.chain(&["ARG", &name, &value]);
                stage.args.insert(name, value);
            }
            Ok(None)
        }
        Kind::Env(raw) => {
            for (k, v) in parse::pairs(raw, &vars).map_err(fail)? {
                stage.chain(&["ENV", &k, &v]);
                stage.set_env(&k, &v);
            }
            Ok(None)
        }
        Kind::Label(raw) => {
            for (k, v) in parse::pairs(raw, &vars).map_err(fail)? {
                stage.chain(&["LABEL", &k, &v]);
                stage.config.labels.insert(k, v);
            }
            Ok(None)
        }
        Kind::Workdir(raw) => {
            let dir = one(raw)?;
            let dir = if dir.starts_with('/') {
                dir
            } else {
                format!("{}/{dir}", stage.config.working_dir.trim_end_matches('/'))
            };
            let dir = format!("/{}", context::clean(&dir));
            stage.chain(&["WORKDIR", &dir]);
            stage.config.working_dir = dir.clone();
            let dirs = stage.dirs();
            if context::exists_in_image(&dirs, &dir) {
                return Ok(None);
            }
            let resolved = context::resolve_in_image(&dirs, &dir);
            let cached = layer_step(d, stage, &["WORKDIR-LAYER"], move |staging| {
                let target = staging.join(context::clean(&resolved));
                std::fs::create_dir_all(&target)?;
                Ok(())
            })
            .await?;
            Ok(Some(cached))
        }
        Kind::User(raw) => {
            stage.config.user = one(raw)?;
            stage.chain(&["USER", &stage.config.user.clone()]);
            Ok(None)
        }
        Kind::Expose(raw) => {
            for port in parse::words(raw, &vars).map_err(fail)? {
                let (number, proto) = port.split_once('/').unwrap_or((&port, "tcp"));
                if number.parse::<u16>().is_err() || !matches!(proto, "tcp" | "udp") {
                    return Err(fail(format!(
                        "`{port}` is not a port such as 8000 or 8000/tcp"
                    )));
                }
                let port = format!("{number}/{proto}");
                stage.chain(&["EXPOSE", &port]);
                if !stage.config.exposed_ports.contains(&port) {
                    stage.config.exposed_ports.push(port);
                }
            }
            Ok(None)
        }
        Kind::Volume(raw) => {
            let list = match serde_json::from_str::<Vec<String>>(raw) {
                Ok(list) => list,
                Err(_) => parse::words(raw, &vars).map_err(fail)?,
            };
            for volume in list {
                stage.chain(&["VOLUME", &volume]);
                stage.config.volumes.push(volume);
            }
            Ok(None)
        }
        Kind::StopSignal(raw) => {
            let signal = one(raw)?;
            if crate::image::parse_signal(&signal).is_none() {
                return Err(fail(format!(
                    "{signal:?} is not a signal — write e.g. SIGQUIT, QUIT or 3"
                )));
            }
            stage.config.stop_signal = signal;
            stage.chain(&["STOPSIGNAL", &stage.config.stop_signal.clone()]);
            Ok(None)
        }
        Kind::Cmd(command) => {
            stage.config.cmd = argv(command, &stage.shell);
            stage.chain(&["CMD", &stage.config.cmd.join("\0")]);
            Ok(None)
        }
        Kind::Entrypoint(command) => {
            stage.config.entrypoint = argv(command, &stage.shell);
            // As in Docker, ENTRYPOINT resets a CMD inherited from the base.
            stage.config.cmd.clear();
            stage.chain(&["ENTRYPOINT", &stage.config.entrypoint.join("\0")]);
            Ok(None)
        }
        Kind::Shell(shell) => {
            stage.shell = shell.clone();
            stage.chain(&["SHELL", &shell.join("\0")]);
            Ok(None)
        }
        Kind::Healthcheck(check) => {
            stage.config.healthcheck = check.as_ref().map(|h| image::Healthcheck {
                test: [vec!["CMD".to_string()], h.command.clone()].concat(),
                interval_ns: h.interval_secs.unwrap_or(0) * 1_000_000_000,
                timeout_ns: h.timeout_secs.unwrap_or(0) * 1_000_000_000,
                start_period_ns: h.start_period_secs.unwrap_or(0) * 1_000_000_000,
                retries: h.retries.unwrap_or(0),
            });
            let test = check
                .as_ref()
                .map(|h| format!("{h:?}"))
                .unwrap_or_else(|| "NONE".into());
            stage.chain(&["HEALTHCHECK", &test]);
            Ok(None)
        }
        Kind::Run(command) => {
            let args = argv(command, &stage.shell);
            // Build args are in a RUN's environment (and its cache key) unless ENV set them.
            let mut env = stage.config.env.clone();
            for (k, v) in &stage.args {
                if !env
                    .iter()
                    .any(|kv| kv.split_once('=').map(|(n, _)| n) == Some(k))
                {
                    env.push(format!("{k}={v}"));
                }
            }
            let key_parts = [
                "RUN".to_string(),
                args.join("\0"),
                env.join("\0"),
                stage.config.working_dir.clone(),
            ];
            stage.chain(&key_parts.iter().map(String::as_str).collect::<Vec<_>>());
            if let Some(layer) = cached(d, &stage.key).await {
                stage.layers.push(layer);
                return Ok(Some(true));
            }
            let layer = run(d, stage, args, env, instruction.line, budget, out).await?;
            let images = d.images.clone();
            let key = stage.key.clone();
            let stored = layer.clone();
            tokio::task::spawn_blocking(move || images.cache_layer(&key, &stored))
                .await
                .expect("cache task")?;
            stage.layers.push(layer);
            Ok(Some(false))
        }
        Kind::Copy {
            add,
            args,
            from,
            chown,
            chmod,
            heredocs,
        } => {
            let mut words = Vec::new();
            for arg in args {
                if context::heredoc_source(arg, heredocs).is_some() {
                    words.push(arg.clone());
                } else {
                    words.extend(parse::words(arg, &vars).map_err(fail)?);
                }
            }
            let (dest, sources) = words.split_last().expect("parse requires two arguments");
            let dirs = stage.dirs();
            let (uid, gid) = match chown {
                Some(spec) => context::owner(&dirs, &one(spec)?).map_err(fail)?,
                None => (0, 0),
            };
            let mode = chmod
                .as_deref()
                .map(context::mode)
                .transpose()
                .map_err(fail)?;
            let owner = Owner { uid, gid, mode };
            let dest_abs = if dest.starts_with('/') {
                dest.clone()
            } else {
                format!("{}/{dest}", stage.config.working_dir.trim_end_matches('/'))
            };
            let into_dir = dest.ends_with('/') || sources.len() > 1;
            let from_layers: Option<Vec<PathBuf>> = match from {
                None => None,
                Some(from) => {
                    let from = one(from)?;
                    match stages.iter().enumerate().find(|(n, s)| {
                        s.name.as_deref() == Some(&from.to_ascii_lowercase())
                            || n.to_string() == from
                    }) {
                        Some((_, s)) => Some(s.dirs()),
                        None => {
                            let images = d.images.clone();
                            let name = from.clone();
                            let image = tokio::task::spawn_blocking(move || {
                                resolve(&images, &name).and_then(|dg| images.image(&dg).ok())
                            })
                            .await
                            .expect("image task")
                            .ok_or_else(|| fail(format!("--from={from} names no earlier stage and no image in the store")))?;
                            Some(image.layer_dirs())
                        }
                    }
                }
            };
            // Stage the files, hash them, and reuse a cached layer when the hash matches.
            let staging = d.images.scratch("copy");
            let source = source.to_path_buf();
            let ignore_ref = ignore;
            let result = (|| -> Result<(), String> {
                std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
                let target_for = |name: &str, is_dir_content: bool| -> PathBuf {
                    let dest = if into_dir && !is_dir_content {
                        format!("{}/{name}", dest_abs.trim_end_matches('/'))
                    } else {
                        dest_abs.clone()
                    };
                    staging.join(context::clean(&context::resolve_in_image(&dirs, &dest)))
                };
                for src in sources {
                    if let Some((name, body)) = context::heredoc_source(src, heredocs) {
                        let target = target_for(name, false);
                        std::fs::create_dir_all(target.parent().expect("under staging"))
                            .map_err(|e| e.to_string())?;
                        std::fs::write(&target, body).map_err(|e| e.to_string())?;
                        apply_owner(&target, owner, 0o644).map_err(|e| e.to_string())?;
                        continue;
                    }
                    if src.contains("://") {
                        return Err(format!(
                            "{} from a URL is not supported: download it in a RUN step",
                            if *add { "ADD" } else { "COPY" }
                        ));
                    }
                    if let Some(layers) = &from_layers {
                        let path = format!("/{}", context::clean(src));
                        let top = context::find_in_layers(
                            layers,
                            &context::resolve_in_image(layers, &path),
                        );
                        let is_dir = top.as_ref().is_some_and(|t| t.is_dir());
                        let name = Path::new(&path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        context::copy_from_layers(
                            layers,
                            &path,
                            &target_for(&name, is_dir),
                            owner,
                        )?;
                        continue;
                    }
                    for rel in context::context_sources(&source, ignore_ref, src)? {
                        let full = source.join(&rel);
                        let meta = std::fs::symlink_metadata(&full).map_err(|e| e.to_string())?;
                        let name = rel
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        if *add && meta.is_file() && context::is_tar(&full) {
                            let target = target_for(&name, true);
                            context::unpack_tar(&full, &target)
                                .map_err(|e| format!("unpacking {}: {e}", rel.display()))?;
                            continue;
                        }
                        let target = target_for(&name, meta.is_dir());
                        context::copy_tree(&full, &target, owner, &|inner| {
                            ignore_ref.excludes(&rel.join(inner))
                        })
                        .map_err(|e| format!("copying {}: {e}", rel.display()))?;
                    }
                }
                Ok(())
            })();
            if let Err(problem) = result {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(fail(problem));
            }
            let hash = context::hash_tree(&staging)?;
            stage.chain(&["COPY", &hash]);
            if let Some(layer) = cached(d, &stage.key).await {
                let _ = std::fs::remove_dir_all(&staging);
                stage.layers.push(layer);
                return Ok(Some(true));
            }
            let images = d.images.clone();
            let key = stage.key.clone();
            let layer = tokio::task::spawn_blocking(move || {
                let layer = images.layer_from_root(&staging)?;
                images.cache_layer(&key, &layer)?;
                Ok::<_, image::ImageError>(layer)
            })
            .await
            .expect("layer task")?;
            stage.layers.push(layer);
            Ok(Some(false))
        }
        Kind::From { .. } => unreachable!("handled by the caller"),
    }
}

fn apply_owner(path: &Path, owner: Owner, default_mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(owner.mode.unwrap_or(default_mode)),
    )
}

/// A layer made by `make` in a fresh staging folder (cached under the chained key).
async fn layer_step(
    d: &Builder,
    stage: &mut Stage,
    parts: &[&str],
    make: impl FnOnce(&Path) -> std::io::Result<()> + Send + 'static,
) -> Result<bool, BuildError> {
    stage.chain(parts);
    if let Some(layer) = cached(d, &stage.key).await {
        stage.layers.push(layer);
        return Ok(true);
    }
    let images = d.images.clone();
    let key = stage.key.clone();
    let layer = tokio::task::spawn_blocking(move || -> Result<Layer, BuildError> {
        let staging = images.scratch("step");
        std::fs::create_dir_all(&staging)?;
        make(&staging)?;
        let layer = images.layer_from_root(&staging)?;
        images.cache_layer(&key, &layer)?;
        Ok(layer)
    })
    .await
    .expect("layer task")?;
    stage.layers.push(layer);
    Ok(false)
}

async fn cached(d: &Builder, key: &str) -> Option<Layer> {
    let images = d.images.clone();
    let key = key.to_string();
    tokio::task::spawn_blocking(move || images.cached_layer(&key))
        .await
        .expect("cache task")
}

/// The argv of a command: exec form as written, shell form through the stage's `SHELL`.
fn argv(command: &Command, shell: &[String]) -> Vec<String> {
    match command {
        Command::Exec(args) => args.clone(),
        Command::Shell(script) => [shell.to_vec(), vec![script.clone()]].concat(),
    }
}

/// Runs a `RUN` step in a build container over the stage's layers; returns the new layer
/// (the container's overlay upper dir, less the mount points the runtime created).
async fn run(
    d: &Builder,
    stage: &Stage,
    args: Vec<String>,
    mut env: Vec<String>,
    line: usize,
    budget: &Budget<'_>,
    out: &Progress,
) -> Result<Layer, BuildError> {
    if stage.layers.is_empty() {
        return Err(DockerfileError::Step {
            line,
            text: args.join(" "),
            problem: "RUN needs a base image with a shell; `FROM scratch` has none".into(),
        }
        .into());
    }
    let user = user_of(stage)?;
    let suffix: u32 = rand::thread_rng().gen();
    let app = budget.app;
    let id = format!("build-{}-{suffix:08x}", &app[..app.len().min(40)]);
    let net = d.network.attach(&id, true).await?;
    let mut binds = vec![net.resolv_conf];
    if let Some(ca) = &d.ca_bundle {
        binds.push(bind(ca, CA_BUNDLE_IN_BUILD, true));
        for var in CA_VARS {
            env.push(format!("{var}={CA_BUNDLE_IN_BUILD}"));
        }
    }
    if !env.iter().any(|kv| kv.starts_with("HOME=")) {
        env.push("HOME=/root".into());
    }
    let dirs = stage.dirs();
    // Mount points the runtime would create in the upper dir when the image lacks them.
    let placeholders: Vec<String> = binds
        .iter()
        .map(|b| b.destination.clone())
        .filter(|dest| !context::exists_in_image(&dirs, dest))
        .collect();
    let cwd = if stage.config.working_dir.is_empty() {
        "/".to_string()
    } else {
        stage.config.working_dir.clone()
    };
    let spec = ContainerSpec {
        id: id.clone(),
        layers: dirs,
        args,
        env,
        cwd,
        hostname: "build".into(),
        binds,
        netns: Some(net.netns),
        log: LogTarget::Inherit,
        stop_grace_secs: 5,
        limits: budget.limits.limits.runtime(),
        init: true,
        user,
        users: Some(budget.users),
        stop_signal: None,
    };
    let staging = d.images.scratch("run");
    let job = OneOff {
        spec,
        deadline: budget.until.saturating_duration_since(Instant::now()),
        keep_upper: Some(staging.clone()),
    };
    let ended = container::run(
        &d.runtime,
        job,
        container::Io::Lines {
            out,
            indent: "       ",
        },
    )
    .await;
    d.network.detach(&id, Some(net.ip)).await;
    match ended? {
        Ended::Exited(0) => {}
        Ended::Exited(code) => return Err(DockerfileError::RunFailed { line, code }.into()),
        Ended::OutOfMemory => {
            return Err(BuildError::OutOfMemory {
                limit: budget.limits.limits.memory,
            })
        }
        Ended::TimedOut => {
            return Err(BuildError::TimedOut {
                after: budget.limits.timeout,
            })
        }
    }
    let images = d.images.clone();
    tokio::task::spawn_blocking(move || -> Result<Layer, BuildError> {
        for dest in &placeholders {
            remove_placeholder(&staging, dest);
        }
        Ok(images.layer_from_root(&staging)?)
    })
    .await
    .expect("layer task")
}

/// What a whole Dockerfile build may use: its app's limits, when its time is up, and the host
/// uid range its `RUN` steps run as.
struct Budget<'a> {
    app: &'a str,
    limits: BuildLimits,
    until: Instant,
    users: berth_runtime::IdMap,
}

/// Removes an empty file or folder the runtime created as a bind mount point, and the empty
/// folders it created on the way.
fn remove_placeholder(upper: &Path, dest: &str) {
    let path = upper.join(context::clean(dest));
    let empty_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0);
    if empty_file {
        let _ = std::fs::remove_file(&path);
    } else {
        let _ = std::fs::remove_dir(&path);
    }
}

/// Process types: a Procfile next to the Dockerfile (its commands run after the ENTRYPOINT),
/// else `web` runs the image's ENTRYPOINT + CMD.
fn process_types(
    source: &Path,
    dir: &str,
    config: &ImageConfig,
) -> Result<ProcessTypes, BuildError> {
    let procfile_path = if dir.is_empty() {
        "Procfile".to_string()
    } else {
        format!("{dir}/Procfile")
    };
    let entrypoint = quote(&config.entrypoint);
    if let Some(text) = tree::read_file(source, &procfile_path)? {
        return Ok(procfile::parse(&text)?
            .into_iter()
            .map(|(name, command)| match entrypoint.is_empty() {
                true => (name, command),
                false => (name, format!("{entrypoint} {command}")),
            })
            .collect());
    }
    let command = quote(&[config.entrypoint.clone(), config.cmd.clone()].concat());
    if command.is_empty() {
        return Err(BuildError::NoProcessTypes);
    }
    Ok(ProcessTypes::from([("web".to_string(), command)]))
}

/// Words joined as one shell command line, each quoted as needed.
fn quote(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            shlex::try_quote(w)
                .map(|q| q.into_owned())
                .unwrap_or_else(|_| w.replace('\0', ""))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A deploy check from the image's HEALTHCHECK when app.json has none: an HTTP GET when the
/// command fetches a local URL (`curl -f http://localhost:8000/health`), else none (berth runs
/// no command checks) and its default check applies.
async fn healthcheck(config: &ImageConfig, out: &Progress) -> Checks {
    let Some(h) = &config.healthcheck else {
        return Checks::new();
    };
    let text = h.test.join(" ");
    let url = text.split_whitespace().find_map(|w| {
        let w = w.trim_matches(['"', '\'']);
        ["http://localhost", "http://127.0.0.1"]
            .iter()
            .find_map(|p| w.strip_prefix(p))
    });
    let Some(rest) = url else {
        out.warn("       HEALTHCHECK runs a command, which berth cannot run as a deploy check yet; using the default check")
            .await;
        return Checks::new();
    };
    let (port, path) = match rest.strip_prefix(':') {
        Some(r) => {
            let end = r.find('/').unwrap_or(r.len());
            (r[..end].parse::<u16>().ok(), r[end..].to_string())
        }
        None => (None, rest.to_string()),
    };
    let path = if path.is_empty() {
        "/".to_string()
    } else {
        path
    };
    let secs = |ns: u64| ns / 1_000_000_000;
    let json = serde_json::json!({"healthchecks": {"web": [{
        "name": "HEALTHCHECK",
        "path": path,
        "port": port,
        "attempts": if h.retries > 0 { h.retries } else { 3 },
        "timeout": if h.timeout_ns > 0 { secs(h.timeout_ns) } else { 5 },
        "wait": if h.interval_ns > 0 { secs(h.interval_ns).min(30) } else { 5 },
        "initialDelay": secs(h.start_period_ns),
    }]}});
    match checks::from_app_json(&json.to_string()) {
        Ok(checks) => {
            out.line(format!(
                "-----> HEALTHCHECK: GET {path} before web gets traffic"
            ))
            .await;
            checks
        }
        Err(_) => Checks::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_chain_over_every_part() {
        let base = Stage {
            name: None,
            layers: vec![],
            config: ImageConfig::default(),
            key: "sha256:parent".into(),
            args: BTreeMap::new(),
            shell: vec![],
        };
        let key = |parent: &str, parts: &[&str]| {
            let mut s = base.clone();
            s.key = parent.into();
            s.chain(parts);
            s.key
        };
        let a = key("p", &["RUN", "make"]);
        assert_eq!(a, key("p", &["RUN", "make"]));
        assert_eq!(a.len(), 64);
        assert_ne!(a, key("q", &["RUN", "make"]));
        assert_ne!(a, key("p", &["RUN", "make all"]));
        // Part boundaries count: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(key("p", &["ab", "c"]), key("p", &["a", "bc"]));
    }

    #[test]
    fn process_types_from_cmd_or_procfile() {
        let tree = tempfile::tempdir().unwrap();
        let config = ImageConfig {
            entrypoint: vec!["/app/run".into()],
            cmd: vec!["--port".into(), "$PORT with space".into()],
            ..ImageConfig::default()
        };
        assert_eq!(
            process_types(tree.path(), "", &config).unwrap()["web"],
            "/app/run --port '$PORT with space'"
        );
        std::fs::write(tree.path().join("Procfile"), "web: serve\nworker: work\n").unwrap();
        let types = process_types(tree.path(), "", &config).unwrap();
        assert_eq!(types["worker"], "/app/run work");
        assert!(matches!(
            process_types(tree.path(), "sub", &ImageConfig::default()),
            Err(BuildError::NoProcessTypes)
        ));
    }
}
