//! berth: a self-hosted git-push PaaS in one binary.
//!
//! Data flows one way: push → build → release → runtime → route.
//!
//! - [`cli`]: the `berth …` command line: the server, the shim, the hooks, and the commands of
//!   [`client`].
//! - [`client`]: the API's client (admin socket, `BERTH_URL`, in process for SSH) and each
//!   command's calls and printed answers.
//! - [`api`]: the REST API (`/api/v1`, OpenAPI), the one front door of [`service`].
//! - [`dashboard`]: the web dashboard (server-rendered pages at `/` beside the API), a front
//!   end over [`service`] like [`api`].
//! - [`service`]: every operation once, with the caller's permissions: apps, config, releases,
//!   processes, logs, domains, limits, images, users, keys and tokens.
//! - [`server`]: `berth server`: hands each part its handles, runs the listeners; shutdown.
//! - [`store`]: SQLite state (apps, config, releases, keys, containers) via sqlx.
//! - [`app`]: app names and their validation.
//! - [`config`]: config var keys and values.
//! - [`domain`]: custom domain host names and their validation.
//! - [`keys`]: SSH public keys (parse, fingerprint).
//! - [`limits`]: resource limits as users write them; the build defaults.
//! - [`ssh`]: the SSH server (russh): key auth, `git-receive-pack`, `run` and berth commands.
//! - [`git`]: bare repos per app, the pre-receive hook, checking out a pushed commit.
//! - [`hook`]: `berth hook pre-receive`, run by git inside a push.
//! - [`image`]: the OCI content-addressed image store and the stack images.
//! - [`checks`]: health checks from app.json (Dokku's format).
//! - [`build`]: buildpack builds (API v2) inside a build container; Procfile.
//! - [`deploy`]: desired state (the live release) and the reconciler: the switch (start → check →
//!   swap route → drain old) and the supervisor (crash restarts, convergence on start).
//! - [`proxy`]: the HTTP reverse proxy and its route table.
//! - [`locks`]: one async lock per app name.
//! - [`logs`]: the per-app log file.
//! - [`network`]: the container bridge's subnet and addresses; a netns per container.
//! - [`dns`]: the containers' resolv.conf and the DNS stub on the bridge that relays their
//!   queries to the host's resolvers.
//! - [`acme`]: automatic certificates (`certs:auto`) by ACME HTTP-01, and their renewal.
//! - [`tls`]: certificates (PEM parsing, host coverage) and the SNI table of `--https`.
//! - [`paths`]: the layout of the data directory.
//! - [`disk`]: how much disk a folder takes.
//! - [`progress`]: the line sink through which builds, deploys and commands report to a front end.
//! - [`attach`]: the input and output channels between a user and a one-off container (`run`).
//! - [`tree`]: reading files out of a pushed tree or a build's output, never through a symlink.
//!
//! The OS-facing container runtime lives in its own crate, `berth-runtime` (`runtime/`).

pub mod acme;
pub mod api;
pub mod app;
pub mod attach;
pub mod build;
pub mod checks;
pub mod cli;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod deploy;
pub mod disk;
pub mod dns;
pub mod domain;
pub mod git;
pub mod hook;
pub mod image;
pub mod keys;
pub mod limits;
pub mod locks;
pub mod logs;
pub mod network;
pub mod paths;
pub mod progress;
pub mod proxy;
pub mod server;
pub mod service;
pub mod ssh;
pub mod store;
pub mod tls;
pub mod tree;
