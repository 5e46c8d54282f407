//! The commands of the `berth` command line (and of SSH: `ssh git@HOST config:set APP K=V`):
//! each is one or a few API calls, and their answers printed as people read them (or as JSON
//! with `--json`). The CLI runs them against the admin socket or `BERTH_URL`; the SSH
//! endpoint in process, as the key's owner, where no command may read the server's files.
//! Owns the text of every answer; must not decide anything (the service does).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{encode, CallError, Client};
use crate::service::{self as svc, Kind};
use crate::store::{Formation, KeyRow, Release, TokenRow, UserRow};

/// The commands that talk to a server.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an app.
    #[command(name = "apps:create")]
    AppsCreate {
        /// The app's name: lowercase letters, digits and '-', starting with a letter.
        name: String,
    },
    /// List apps.
    Apps {
        #[arg(long)]
        json: bool,
    },
    /// Show an app: URL, git remote, current release, containers.
    #[command(name = "apps:info")]
    AppsInfo {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Destroy an app: its containers, route, repo, config and releases.
    #[command(name = "apps:destroy")]
    AppsDestroy {
        /// The app's name.
        name: String,
        /// Required: destroying cannot be undone.
        #[arg(long)]
        force: bool,
    },
    /// Show an app's config vars.
    Config {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print one config var's value.
    #[command(name = "config:get")]
    ConfigGet {
        /// The app's name.
        name: String,
        key: String,
    },
    /// Set config vars; makes a new release and restarts the app.
    #[command(name = "config:set")]
    ConfigSet {
        /// The app's name.
        name: String,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Store the vars but do not make a release or restart.
        #[arg(long)]
        no_restart: bool,
    },
    /// Unset config vars; makes a new release and restarts the app.
    #[command(name = "config:unset")]
    ConfigUnset {
        /// The app's name.
        name: String,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
        /// Store the change but do not make a release or restart.
        #[arg(long)]
        no_restart: bool,
    },
    /// List your SSH keys (an admin: `--user USER`, or `--user '*'` for everyone's).
    Keys {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Allow an SSH public key to push and run commands as you (or, for an admin, `--user`);
    /// FILE is an OpenSSH public key file, or - for stdin.
    #[command(name = "keys:add")]
    KeysAdd {
        /// A name for the key, e.g. laptop.
        name: String,
        file: String,
        /// Whose key (default: yours; root on the server is the user `admin`).
        #[arg(long)]
        user: Option<String>,
    },
    /// Remove an SSH key.
    #[command(name = "keys:remove")]
    KeysRemove {
        /// The key's name, as `berth keys` lists it.
        name: String,
    },
    /// List an app's releases, newest first.
    Releases {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List an app's containers.
    Ps {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Set how many containers of each process type run; a new release, zero downtime.
    #[command(name = "ps:scale")]
    PsScale {
        /// The app's name.
        name: String,
        /// TYPE=COUNT pairs, e.g. web=2 worker=1.
        #[arg(required = true, value_name = "TYPE=COUNT")]
        pairs: Vec<String>,
    },
    /// Restart an app's containers (all, or one process type) with zero downtime.
    #[command(name = "ps:restart")]
    PsRestart {
        /// The app's name.
        name: String,
        /// Only this process type, e.g. web.
        process_type: Option<String>,
    },
    /// Make a new release from an earlier one's code and config (default: the previous one).
    #[command(name = "releases:rollback", alias = "rollback")]
    ReleasesRollback {
        /// The app's name.
        name: String,
        /// The release to go back to, e.g. v3.
        version: Option<String>,
    },
    /// Show an app's logs.
    Logs {
        /// The app's name.
        name: String,
        /// Keep streaming new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many past lines to show.
        #[arg(short = 'n', long, default_value_t = 100)]
        num: usize,
        /// Only lines of this process type's containers, e.g. web.
        #[arg(short = 'p', long = "process", value_name = "TYPE")]
        process_type: Option<String>,
        /// One JSON object per line: time, source, process, text.
        #[arg(long)]
        json: bool,
    },
    /// List an app's domains: its default host and the custom ones.
    Domains {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve an app at another host name too (one app per host).
    #[command(name = "domains:add")]
    DomainsAdd {
        /// The app's name.
        name: String,
        /// The host, e.g. www.example.com.
        host: String,
    },
    /// Stop serving an app at a host name.
    #[command(name = "domains:remove")]
    DomainsRemove {
        /// The app's name.
        name: String,
        /// The host, as `berth domains` lists it.
        host: String,
    },
    /// Show which of an app's hosts its TLS certificate covers.
    Certs {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve an app over HTTPS (`--https`) with a certificate: CERT is the PEM chain (server
    /// certificate first), KEY its PEM private key.
    #[command(name = "certs:add")]
    CertsAdd {
        /// The app's name.
        name: String,
        cert: PathBuf,
        key: PathBuf,
        /// Redirect plain-HTTP requests to these hosts to HTTPS (308).
        #[arg(long)]
        redirect_https: bool,
    },
    /// Serve an app over HTTPS (`--https`) with a certificate berth gets by ACME HTTP-01 for
    /// all of its hosts (`--acme-directory`, Let's Encrypt by default) and renews before it
    /// expires. The hosts' DNS must point at this server and port 80 reach `--http`.
    #[command(name = "certs:auto")]
    CertsAuto {
        /// The app's name.
        name: String,
        /// Redirect plain-HTTP requests to these hosts to HTTPS (308).
        #[arg(long)]
        redirect_https: bool,
    },
    /// Stop serving an app over HTTPS (and stop automatic certificates).
    #[command(name = "certs:remove")]
    CertsRemove {
        /// The app's name.
        name: String,
    },
    /// Show what an app's containers may reach on the network.
    Network {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change what an app's containers may reach; applied at once to running containers.
    #[command(name = "network:set")]
    NetworkSet {
        /// The app's name.
        name: String,
        /// Whether its containers may open connections out of berth's bridge (to the
        /// internet, a database elsewhere, DNS servers). On by default; with `off` such
        /// connections fail at once, while the proxy and health checks still reach the app.
        #[arg(long, value_parser = parse_on_off, action = clap::ArgAction::Set, value_name = "on|off")]
        egress: bool,
    },
    /// Show the memory, CPU and process limits of each of an app's process types.
    Resources {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change the limits of one of an app's process types; running containers get them at
    /// their next restart (`berth ps:restart APP TYPE`). `default` puts one back.
    #[command(name = "resources:set")]
    ResourcesSet {
        /// The app's name.
        name: String,
        /// The process type, as in the Procfile (web, worker, …).
        process_type: String,
        /// Memory, like 256M or 1G (default 512M); past it the kernel kills the process.
        #[arg(long)]
        memory: Option<String>,
        /// CPUs, like 0.5 or 2 (default 1).
        #[arg(long)]
        cpus: Option<String>,
        /// Processes and threads at once (default 1024).
        #[arg(long)]
        pids: Option<String>,
    },
    /// Show the limits an app's builds run under.
    Builds {
        /// The app's name.
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change the limits an app's builds run under (from its next push); `default` puts one
    /// back to berth's default.
    #[command(name = "builds:set")]
    BuildsSet {
        /// The app's name.
        name: String,
        /// Memory, like 512M or 4G (default 2G); past it the build fails as out of memory.
        #[arg(long)]
        memory: Option<String>,
        /// CPUs, like 0.5 or 2 (default: all of the host's).
        #[arg(long)]
        cpus: Option<String>,
        /// Processes and threads at once (default 4096).
        #[arg(long)]
        pids: Option<String>,
        /// How long a build may run, like 90s or 30m (default 15m).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Import an image archive (`docker save` output or an OCI archive) for Dockerfiles' FROM.
    #[command(name = "images:import")]
    ImagesImport {
        /// The archive (a tar).
        file: PathBuf,
        /// The name to tag it with (default: the name the archive carries).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the images in the store: name, digest, size and which releases use them.
    Images {
        #[arg(long)]
        json: bool,
    },
    /// Write an image as a tar to stdout, for `docker load` and skopeo (`docker-archive:` or
    /// `oci-archive:`): `berth images:export web:v3 > web.tar`.
    #[command(name = "images:export")]
    ImagesExport {
        /// A tag (`berth/stack-run:trixie`), a release (`APP:vN`; `APP` for the live one) or a
        /// digest from `berth images`.
        image: String,
    },
    /// Remove images no kept release uses (see `berth server --keep-releases`), and the build
    /// caches nothing needs. Also runs after each deploy.
    Gc {
        #[arg(long)]
        json: bool,
    },
    /// Show the version, the data dir and the disk used by images, build caches and logs.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Build the stack images (berth/stack-build, berth/stack-run) from the Debian mirror.
    #[command(name = "stack:build")]
    StackBuild {
        /// Rebuild even if they exist.
        #[arg(long)]
        force: bool,
        /// Which stack: trixie (the default) or bookworm.
        #[arg(long, default_value = "trixie")]
        stack: String,
    },
    /// Run a command in a new container of an app's live release (its image, config vars and
    /// network), attached to this terminal, like `heroku run`; exits with the command's code.
    /// With a terminal on stdin it gets one too (as `docker run -it`).
    Run {
        /// The app's name.
        name: String,
        /// The command and its arguments, after `--` (e.g. `-- python manage.py shell`). One
        /// word is run as a shell command line (`-- 'echo $HOME'`); several as they are.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<String>,
        /// No terminal, even when stdin is one.
        #[arg(long)]
        no_tty: bool,
    },
    /// Show who you are to the server.
    Whoami,
    /// Show what the deploy that made a release printed (build, release command, checks).
    #[command(name = "releases:output")]
    ReleasesOutput {
        /// The app's name.
        name: String,
        /// The release, e.g. v3.
        version: String,
    },
    /// Follow the deploy of an app in progress (a push, config change, scale or rollback).
    #[command(name = "deploys:watch")]
    DeploysWatch {
        /// The app's name.
        name: String,
    },
    /// List users (admins only).
    Users {
        #[arg(long)]
        json: bool,
    },
    /// Add a user; prints their generated dashboard password once.
    #[command(name = "users:add")]
    UsersAdd {
        /// The user's name, e.g. alice.
        name: String,
        /// May do anything; otherwise only what concerns the apps granted (`apps:grant`).
        #[arg(long)]
        admin: bool,
    },
    /// Remove a user with their keys, tokens and grants.
    #[command(name = "users:remove")]
    UsersRemove { name: String },
    /// Give a user (default: you) a new generated password, printed once.
    #[command(name = "users:passwd")]
    UsersPasswd { name: Option<String> },
    /// Let a user push, deploy and manage an app.
    #[command(name = "apps:grant")]
    AppsGrant {
        /// The app's name.
        name: String,
        user: String,
    },
    /// Take an app from a user.
    #[command(name = "apps:revoke")]
    AppsRevoke {
        /// The app's name.
        name: String,
        user: String,
    },
    /// List your API tokens (an admin: `--user USER`, or `--user '*'` for everyone's).
    Tokens {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Create an API token (for `BERTH_TOKEN`); prints it once, only its hash is kept.
    #[command(name = "tokens:create")]
    TokensCreate {
        /// A name for the token, e.g. laptop or ci.
        name: String,
        /// Whose token (default: yours).
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke an API token: it stops working at once.
    #[command(name = "tokens:revoke")]
    TokensRevoke {
        name: String,
        /// Whose token (default: yours).
        #[arg(long)]
        user: Option<String>,
    },
}

/// What a command prints: bytes for stdout or stderr, in order.
#[derive(Debug)]
pub enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

/// Where a command prints (a bounded channel: a slow reader slows the command down).
#[derive(Clone)]
pub struct Terminal(mpsc::Sender<Chunk>);

impl Terminal {
    pub fn new(tx: mpsc::Sender<Chunk>) -> Self {
        Self(tx)
    }

    pub async fn line(&self, text: impl AsRef<str>) {
        let mut bytes = text.as_ref().as_bytes().to_vec();
        bytes.push(b'\n');
        let _ = self.0.send(Chunk::Out(bytes)).await;
    }

    pub async fn warn(&self, text: impl AsRef<str>) {
        let mut bytes = text.as_ref().as_bytes().to_vec();
        bytes.push(b'\n');
        let _ = self.0.send(Chunk::Err(bytes)).await;
    }

    async fn data(&self, bytes: Vec<u8>) -> bool {
        self.0.send(Chunk::Out(bytes)).await.is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Whether a command may read files where it runs (the CLI: yes; SSH, on the server: no).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    Readable,
    Refused,
}

/// Why a command failed, and the exit code it ends with.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Local(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Call(err) => err.exit_code(),
            Failure::Usage(_) => Kind::Invalid.exit_code(),
            Failure::Local(_) => 1,
        }
    }
}

type Done = Result<(), Failure>;

/// Runs `command` against `client`, printing to `term`; returns the exit code (after an
/// `error: …` line on failure).
pub async fn execute(client: &Client, command: Command, term: &Terminal, files: Files) -> i32 {
    match run(client, command, term, files).await {
        Ok(()) => 0,
        Err(err) => {
            term.warn(format!("error: {err}")).await;
            err.exit_code()
        }
    }
}

async fn print_json(term: &Terminal, value: &impl Serialize) -> Done {
    let text = serde_json::to_string_pretty(value).map_err(anyhow::Error::from)?;
    term.line(text).await;
    Ok(())
}

async fn get<T: DeserializeOwned>(client: &Client, path: &str) -> Result<T, CallError> {
    client.call(Method::GET, path, None::<&()>).await
}

/// A call without a body whose answer is not needed (a deletion, a grant).
async fn act(client: &Client, method: Method, path: &str) -> Result<(), CallError> {
    client
        .call::<serde_json::Value>(method, path, None::<&()>)
        .await
        .map(drop)
}

/// A call whose progress lines are printed as they come.
async fn streamed<T: DeserializeOwned>(
    client: &Client,
    method: Method,
    path: &str,
    body: &(impl Serialize + ?Sized),
    term: &Terminal,
) -> Result<T, CallError> {
    use crate::progress::{Line, Progress};
    let (tx, mut rx) = mpsc::channel::<Line>(256);
    let printer = async {
        while let Some(line) = rx.recv().await {
            match line {
                Line::Out(text) => term.line(text).await,
                Line::Warn(text) => term.warn(text).await,
            }
        }
    };
    let call = async move {
        let out = Progress::new(tx);
        client.call_streamed(method, path, Some(body), &out).await
    };
    let (result, ()) = tokio::join!(call, printer);
    result
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

fn refuse_files(files: Files, what: &str) -> Done {
    match files {
        Files::Readable => Ok(()),
        Files::Refused => Err(usage(format!(
            "{what} reads a file, which SSH commands cannot — run it with the berth CLI (BERTH_URL and BERTH_TOKEN on your machine)"
        ))),
    }
}

async fn run(client: &Client, command: Command, term: &Terminal, files: Files) -> Done {
    match command {
        Command::ReleasesOutput { name, version } => {
            let number = parse_version(&name, &version)?;
            let kept: crate::api::ReleaseOutput = get(
                client,
                &format!("/apps/{}/releases/{number}/output", encode(&name)),
            )
            .await?;
            term.data(kept.output.into_bytes()).await;
        }
        Command::DeploysWatch { name } => {
            let response = client
                .send(
                    Method::GET,
                    &format!("/apps/{}/deploy", encode(&name)),
                    &[(hyper::header::ACCEPT, crate::api::NDJSON)],
                    axum::body::Body::empty(),
                )
                .await?;
            let status = response.status();
            if !status.is_success() {
                let bytes = super::read_all(response).await?;
                return Err(super::error_of(status, &bytes).into());
            }
            let mut lines = super::Lines::new(response.into_body());
            while let Some(line) = lines.next().await? {
                if let crate::api::Event::Out(text) =
                    serde_json::from_slice(&line).map_err(anyhow::Error::from)?
                {
                    term.line(text).await;
                }
            }
        }
        Command::Whoami => {
            let me: crate::api::Me = get(client, "/me").await?;
            let role = if me.admin { " (admin)" } else { "" };
            term.line(format!("{}{role}", me.user)).await;
        }
        Command::AppsCreate { name } => {
            let info: svc::AppInfo = client
                .call(
                    Method::POST,
                    "/apps",
                    Some(&crate::api::NewApp { name: name.clone() }),
                )
                .await?;
            term.line(format!("Created {name}. Deploy it with:")).await;
            term.line(format!("  git remote add deploy {}", info.git_remote))
                .await;
            term.line("  git push deploy main").await;
        }
        Command::Apps { json } => {
            let apps: Vec<svc::AppSummary> = get(client, "/apps").await?;
            if json {
                return print_json(term, &apps).await;
            }
            if apps.is_empty() {
                term.line("No apps yet: create one with `berth apps:create NAME`")
                    .await;
            }
            for a in apps {
                term.line(a.name).await;
            }
        }
        Command::AppsInfo { name, json } => {
            let info: svc::AppInfo = get(client, &format!("/apps/{}", encode(&name))).await?;
            if json {
                return print_json(term, &info).await;
            }
            term.line(format!("=== {name}")).await;
            term.line(format!("URL:        {}", info.url)).await;
            term.line(format!("Git remote: {}", info.git_remote)).await;
            let release = info
                .release
                .map_or("none (push to deploy)".to_string(), |v| format!("v{v}"));
            term.line(format!("Release:    {release}")).await;
            term.line(format!("Containers: {}", info.containers.len()))
                .await;
            if !info.users.is_empty() {
                term.line(format!("Users:      {}", info.users.join(", ")))
                    .await;
            }
        }
        Command::AppsDestroy { name, force } => {
            if !force {
                return Err(usage(format!("destroying {name} deletes its code, config and releases and cannot be undone — run `berth apps:destroy {name} --force`")));
            }
            act(client, Method::DELETE, &format!("/apps/{}", encode(&name))).await?;
            term.line(format!("Destroyed {name}")).await;
        }
        Command::AppsGrant { name, user } => {
            act(
                client,
                Method::PUT,
                &format!("/apps/{}/users/{}", encode(&name), encode(&user)),
            )
            .await?;
            term.line(format!("{user} may now use {name}")).await;
        }
        Command::AppsRevoke { name, user } => {
            act(
                client,
                Method::DELETE,
                &format!("/apps/{}/users/{}", encode(&name), encode(&user)),
            )
            .await?;
            term.line(format!("{user} may no longer use {name}")).await;
        }
        Command::Config { name, json } => {
            let config: BTreeMap<String, String> =
                get(client, &format!("/apps/{}/config", encode(&name))).await?;
            if json {
                return print_json(term, &config).await;
            }
            term.line(format!("=== {name} config vars")).await;
            let width = config.keys().map(String::len).max().unwrap_or(0) + 1;
            for (key, value) in &config {
                term.line(format!("{:width$} {value}", format!("{key}:")))
                    .await;
            }
        }
        Command::ConfigGet { name, key } => {
            let value: String = get(
                client,
                &format!("/apps/{}/config/{}", encode(&name), encode(&key)),
            )
            .await?;
            term.line(value).await;
        }
        Command::ConfigSet {
            name,
            pairs,
            no_restart,
        } => {
            let vars = crate::config::parse_pairs(&pairs).map_err(|e| usage(e.to_string()))?;
            let vars = vars.into_iter().map(|(k, v)| (k, Some(v))).collect();
            change_config(client, term, &name, vars, no_restart).await?;
        }
        Command::ConfigUnset {
            name,
            keys,
            no_restart,
        } => {
            let vars = keys.into_iter().map(|k| (k, None)).collect();
            change_config(client, term, &name, vars, no_restart).await?;
        }
        Command::Keys { user, json } => {
            let path = of_user("/keys", user.as_deref());
            let keys: Vec<KeyRow> = get(client, &path).await?;
            if json {
                return print_json(term, &keys).await;
            }
            if keys.is_empty() {
                term.line("No keys yet: add one with `berth keys:add NAME ~/.ssh/id_ed25519.pub`")
                    .await;
            }
            for k in keys {
                term.line(format!("{}  {}  ({})", k.name, k.fingerprint, k.user))
                    .await;
            }
        }
        Command::KeysAdd { name, file, user } => {
            refuse_files(files, "keys:add")?;
            let key = read_key_file(&file)?;
            let added: KeyRow = client
                .call(
                    Method::POST,
                    "/keys",
                    Some(&crate::api::AddKey { name, key, user }),
                )
                .await?;
            term.line(format!(
                "Added key {} ({}) for {}",
                added.name, added.fingerprint, added.user
            ))
            .await;
        }
        Command::KeysRemove { name } => {
            act(client, Method::DELETE, &format!("/keys/{}", encode(&name))).await?;
            term.line(format!("Removed key {name}")).await;
        }
        Command::Users { json } => {
            let users: Vec<UserRow> = get(client, "/users").await?;
            if json {
                return print_json(term, &users).await;
            }
            for u in users {
                let role = if u.admin { "admin" } else { "user" };
                term.line(format!("{:<20} {role:<6} since {}", u.name, u.created_at))
                    .await;
            }
        }
        Command::UsersAdd { name, admin } => {
            let new: svc::NewUser = client
                .call(
                    Method::POST,
                    "/users",
                    Some(&crate::api::AddUser { name, admin }),
                )
                .await?;
            let role = if new.admin {
                "an admin"
            } else {
                "a user (grant apps with `berth apps:grant APP USER`)"
            };
            term.line(format!("Added {} as {role}", new.name)).await;
            term.line(format!("Password (shown once): {}", new.password))
                .await;
        }
        Command::UsersRemove { name } => {
            act(client, Method::DELETE, &format!("/users/{}", encode(&name))).await?;
            term.line(format!("Removed user {name} with their keys and tokens"))
                .await;
        }
        Command::UsersPasswd { name } => {
            let name = match name {
                Some(name) => name,
                None => get::<crate::api::Me>(client, "/me").await?.user,
            };
            let new: svc::NewPassword = client
                .call(
                    Method::POST,
                    &format!("/users/{}/password", encode(&name)),
                    None::<&()>,
                )
                .await?;
            term.line(format!(
                "New password of {} (shown once): {}",
                new.user, new.password
            ))
            .await;
        }
        Command::Tokens { user, json } => {
            let path = of_user("/tokens", user.as_deref());
            let tokens: Vec<TokenRow> = get(client, &path).await?;
            if json {
                return print_json(term, &tokens).await;
            }
            if tokens.is_empty() {
                term.line("No tokens yet: create one with `berth tokens:create NAME`")
                    .await;
            }
            for t in tokens {
                let used = t.last_used_at.as_deref().unwrap_or("never");
                term.line(format!(
                    "{:<20} {:<12} created {}  last used {used}",
                    t.name, t.user, t.created_at
                ))
                .await;
            }
        }
        Command::TokensCreate { name, user } => {
            let created: svc::CreatedToken = client
                .call(
                    Method::POST,
                    "/tokens",
                    Some(&crate::api::NewToken { name, user }),
                )
                .await?;
            term.warn(format!(
                "Created token {} for {}; it is shown once, keep it (e.g. as BERTH_TOKEN):",
                created.name, created.user
            ))
            .await;
            term.line(created.token).await;
        }
        Command::TokensRevoke { name, user } => {
            let path = of_user(&format!("/tokens/{}", encode(&name)), user.as_deref());
            act(client, Method::DELETE, &path).await?;
            term.line(format!("Revoked token {name}")).await;
        }
        Command::Releases { name, json } => {
            let releases: Vec<Release> =
                get(client, &format!("/apps/{}/releases", encode(&name))).await?;
            if json {
                return print_json(term, &releases).await;
            }
            term.line(format!("=== {name} releases")).await;
            for r in releases {
                let by = if r.created_by.is_empty() {
                    String::new()
                } else {
                    format!("  by {}", r.created_by)
                };
                term.line(format!(
                    "v{:<4} {:<10} {:<40} {}{by}",
                    r.version,
                    r.status.as_str(),
                    r.description,
                    r.created_at
                ))
                .await;
                if !r.reason.is_empty() {
                    term.line(format!("      {}", r.reason)).await;
                }
            }
        }
        Command::Ps { name, json } => {
            let entries: Vec<serde_json::Value> =
                get(client, &format!("/apps/{}/ps", encode(&name))).await?;
            if json {
                return print_json(term, &entries).await;
            }
            print_ps(term, &name, &entries).await;
        }
        Command::PsScale { name, pairs } => {
            let formation = parse_formation(&pairs)?;
            let scaled: svc::Scaled = streamed(
                client,
                Method::PATCH,
                &format!("/apps/{}/formation", encode(&name)),
                &formation,
                term,
            )
            .await?;
            term.line(format!(
                "Scaled {name}: {}, now v{}",
                formation_text(&scaled.formation),
                scaled.version
            ))
            .await;
        }
        Command::PsRestart { name, process_type } => {
            let _: crate::api::Restart = streamed(
                client,
                Method::POST,
                &format!("/apps/{}/restart", encode(&name)),
                &crate::api::Restart { process_type },
                term,
            )
            .await?;
            term.line(format!("Restarted {name}")).await;
        }
        Command::ReleasesRollback { name, version } => {
            let version = version.map(|v| parse_version(&name, &v)).transpose()?;
            let release: Release = streamed(
                client,
                Method::POST,
                &format!("/apps/{}/rollback", encode(&name)),
                &crate::api::Rollback { version },
                term,
            )
            .await?;
            term.line(format!(
                "{}: {name} is now v{}",
                release.description, release.version
            ))
            .await;
        }
        Command::Logs {
            name,
            follow,
            num,
            process_type,
            json,
        } => {
            logs(client, term, &name, follow, num, process_type, json).await?;
        }
        Command::Domains { name, json } => {
            let domains: svc::Domains =
                get(client, &format!("/apps/{}/domains", encode(&name))).await?;
            if json {
                return print_json(term, &domains.custom).await;
            }
            term.line(format!("=== {name} domains")).await;
            term.line(format!("{} (default)", domains.default)).await;
            for host in domains.custom {
                term.line(host).await;
            }
        }
        Command::DomainsAdd { name, host } => {
            let added: crate::api::Host = client
                .call(
                    Method::POST,
                    &format!("/apps/{}/domains", encode(&name)),
                    Some(&crate::api::Host { host }),
                )
                .await?;
            let host = added.host;
            term.line(format!(
                "Added {host} to {name}: http://{host} is served by it"
            ))
            .await;
        }
        Command::DomainsRemove { name, host } => {
            act(
                client,
                Method::DELETE,
                &format!("/apps/{}/domains/{}", encode(&name), encode(&host)),
            )
            .await?;
            term.line(format!("Removed {host} from {name}")).await;
        }
        Command::Certs { name, json } => {
            let info: svc::CertInfo =
                get(client, &format!("/apps/{}/certs", encode(&name))).await?;
            if json {
                return print_json(term, &info).await;
            }
            print_certs(term, &name, &info).await;
        }
        Command::CertsAdd {
            name,
            cert,
            key,
            redirect_https,
        } => {
            refuse_files(files, "certs:add")?;
            let cert = svc::NewCert {
                chain: read_pem(&cert, "certificate")?,
                key: read_pem(&key, "key")?,
                redirect_https,
            };
            let hosts: Vec<String> = client
                .call(
                    Method::PUT,
                    &format!("/apps/{}/certs", encode(&name)),
                    Some(&cert),
                )
                .await?;
            term.line(format!(
                "Added a certificate to {name}; served over HTTPS for: {}",
                hosts.join(", ")
            ))
            .await;
        }
        Command::CertsAuto {
            name,
            redirect_https,
        } => {
            let info: svc::CertInfo = streamed(
                client,
                Method::POST,
                &format!("/apps/{}/certs/auto", encode(&name)),
                &svc::AutoCert { redirect_https },
                term,
            )
            .await?;
            term.line(format!(
                "{name} is served over HTTPS with an automatic certificate for: {}; it renews from {}",
                info.hosts.join(", "),
                info.renews.unwrap_or_default()
            ))
            .await;
        }
        Command::CertsRemove { name } => {
            act(
                client,
                Method::DELETE,
                &format!("/apps/{}/certs", encode(&name)),
            )
            .await?;
            term.line(format!("Removed the certificate of {name}"))
                .await;
        }
        Command::Network { name, json } => {
            let network: svc::NetworkInfo =
                get(client, &format!("/apps/{}/network", encode(&name))).await?;
            if json {
                return print_json(term, &network).await;
            }
            term.line(format!("=== {name} network")).await;
            term.line(format!("egress: {}", on_off(network.egress)))
                .await;
        }
        Command::NetworkSet { name, egress } => {
            let set: svc::NetworkSet = client
                .call(
                    Method::PUT,
                    &format!("/apps/{}/network", encode(&name)),
                    Some(&svc::NetworkInfo { egress }),
                )
                .await?;
            term.line(format!(
                "{name} egress: {} — applied to its {} running container(s) now and to every container it starts",
                on_off(set.egress),
                set.applied
            ))
            .await;
        }
        Command::Resources { name, json } => {
            let all: BTreeMap<String, svc::TypeLimits> =
                get(client, &format!("/apps/{}/resources", encode(&name))).await?;
            if json {
                return print_json(term, &all).await;
            }
            term.line(format!("=== {name} resources")).await;
            for (process_type, limits) in all {
                term.line(format!("{process_type}: {}", limits.description))
                    .await;
            }
        }
        Command::ResourcesSet {
            name,
            process_type,
            memory,
            cpus,
            pids,
        } => {
            let patch = svc::LimitsPatch {
                memory,
                cpus,
                pids,
                timeout: None,
            };
            let set: svc::TypeLimits = client
                .call(
                    Method::PATCH,
                    &format!(
                        "/apps/{}/resources/{}",
                        encode(&name),
                        encode(&process_type)
                    ),
                    Some(&patch),
                )
                .await?;
            term.line(format!(
                "{name} {process_type}: {} — running containers get it at their next restart: `berth ps:restart {name} {process_type}`",
                set.description
            ))
            .await;
        }
        Command::Builds { name, json } => {
            let limits: svc::BuildLimits =
                get(client, &format!("/apps/{}/builds", encode(&name))).await?;
            print_build_limits(term, &name, &limits, json).await?;
        }
        Command::BuildsSet {
            name,
            memory,
            cpus,
            pids,
            timeout,
        } => {
            let patch = svc::LimitsPatch {
                memory,
                cpus,
                pids,
                timeout,
            };
            let limits: svc::BuildLimits = client
                .call(
                    Method::PATCH,
                    &format!("/apps/{}/builds", encode(&name)),
                    Some(&patch),
                )
                .await?;
            print_build_limits(term, &name, &limits, false).await?;
        }
        Command::ImagesImport { file, name } => {
            refuse_files(files, "images:import")?;
            let imported = import(client, &file, name).await?;
            term.line(format!("Imported {}: {}", imported.name, imported.digest))
                .await;
        }
        Command::Images { json } => {
            let rows: Vec<svc::ImageRow> = get(client, "/images").await?;
            if json {
                return print_json(term, &rows).await;
            }
            print_images(term, rows).await;
        }
        Command::ImagesExport { image } => export(client, term, &image).await?,
        Command::Gc { json } => {
            let report: crate::deploy::gc::GcReport =
                client.call(Method::POST, "/gc", None::<&()>).await?;
            if json {
                return print_json(term, &report).await;
            }
            let c = &report.collected;
            let plural = |n: usize| if n == 1 { "y" } else { "ies" };
            term.line(format!(
                "Removed {} image(s), {} layer(s), {} Dockerfile step cache entr{} and {} buildpack cache entr{}; freed {} ({} → {})",
                c.images,
                c.layers,
                c.step_cache_entries,
                plural(c.step_cache_entries),
                report.buildpack_cache_entries,
                plural(report.buildpack_cache_entries),
                human(report.bytes_before.saturating_sub(report.bytes_after)),
                human(report.bytes_before),
                human(report.bytes_after),
            ))
            .await;
        }
        Command::Info { json } => {
            let info: svc::Info = get(client, "/info").await?;
            if json {
                return print_json(term, &info).await;
            }
            for line in [
                format!("berth {}", info.version),
                format!("data dir:      {}", info.data_dir),
                format!("images:        {} ({} images; see `berth images`)", human(info.images_bytes), info.images),
                format!("build caches:  {} (buildpack caches; cached Dockerfile steps are layers, under images)", human(info.build_caches_bytes)),
                format!("logs:          {}", human(info.logs_bytes)),
                format!("kept releases: the last {} of each app (`berth server --keep-releases`)", info.keep_releases),
            ] {
                term.line(line).await;
            }
        }
        Command::StackBuild { force, stack } => {
            let path = format!("/stacks/{}/build?force={force}", encode(&stack));
            let built: svc::StackImages = streamed(client, Method::POST, &path, &(), term).await?;
            term.line(format!(
                "{} {}\n{}   {}",
                built.build_tag, built.build, built.run_tag, built.run
            ))
            .await;
        }
        Command::Run { .. } => {
            return Err(usage(
                "`run` is attached to a terminal of its own — use `berth run APP -- COMMAND`",
            ));
        }
    }
    Ok(())
}

async fn change_config(
    client: &Client,
    term: &Terminal,
    name: &str,
    vars: BTreeMap<String, Option<String>>,
    no_restart: bool,
) -> Done {
    let patch = svc::ConfigPatch {
        vars,
        restart: !no_restart,
    };
    let change: svc::ConfigChange = streamed(
        client,
        Method::PATCH,
        &format!("/apps/{}/config", encode(name)),
        &patch,
        term,
    )
    .await?;
    for key in &change.not_set {
        term.warn(format!("{key} was not set")).await;
    }
    let description = change.description;
    match change.release {
        Some(version) => {
            term.line(format!("{description}: {name} is now v{version}"))
                .await
        }
        None if !no_restart => {
            term.line(format!(
                "{description}: stored; they apply on the next push"
            ))
            .await
        }
        None => {
            term.line(format!("{description}: stored without restarting"))
                .await
        }
    }
    Ok(())
}

async fn logs(
    client: &Client,
    term: &Terminal,
    name: &str,
    follow: bool,
    num: usize,
    process_type: Option<String>,
    json: bool,
) -> Done {
    let mut path = format!("/apps/{}/logs?num={num}&follow={follow}", encode(name));
    if let Some(kind) = &process_type {
        path.push_str(&format!("&process={}", encode(kind)));
    }
    let show = |line: &svc::LogLine| match json {
        true => serde_json::to_string(line).expect("log lines serialize"),
        false => line.raw(),
    };
    if !follow {
        let lines: Vec<svc::LogLine> = get(client, &path).await?;
        for line in &lines {
            term.line(show(line)).await;
        }
        return Ok(());
    }
    let response = client
        .send(
            Method::GET,
            &path,
            &[(hyper::header::ACCEPT, crate::api::NDJSON)],
            axum::body::Body::empty(),
        )
        .await?;
    let status = response.status();
    if !status.is_success() {
        let bytes = super::read_all(response).await?;
        return Err(super::error_of(status, &bytes).into());
    }
    let mut lines = super::Lines::new(response.into_body());
    while let Some(line) = lines.next().await? {
        if term.is_closed() {
            break;
        }
        let line: svc::LogLine = serde_json::from_slice(&line).map_err(anyhow::Error::from)?;
        term.line(show(&line)).await;
    }
    Ok(())
}

async fn import(
    client: &Client,
    file: &std::path::Path,
    name: Option<String>,
) -> Result<svc::Imported, Failure> {
    use anyhow::Context;
    let opened = tokio::fs::File::open(file).await.with_context(|| {
        format!(
            "cannot read {} — pass a `docker save` tar or an OCI archive",
            file.display()
        )
    })?;
    let stream = tokio_util::io::ReaderStream::new(opened);
    let query = name
        .map(|n| format!("?name={}", encode(&n)))
        .unwrap_or_default();
    let response = client
        .send(
            Method::POST,
            &format!("/images{query}"),
            &[(hyper::header::CONTENT_TYPE, "application/x-tar")],
            axum::body::Body::from_stream(stream),
        )
        .await?;
    let status = response.status();
    let bytes = super::read_all(response).await?;
    if !status.is_success() {
        return Err(super::error_of(status, &bytes).into());
    }
    Ok(serde_json::from_slice(&bytes).map_err(anyhow::Error::from)?)
}

async fn export(client: &Client, term: &Terminal, image: &str) -> Done {
    use http_body_util::BodyExt;
    let response = client
        .send(
            Method::GET,
            &format!("/images/archive?image={}", encode(image)),
            &[],
            axum::body::Body::empty(),
        )
        .await?;
    let status = response.status();
    if !status.is_success() {
        let bytes = super::read_all(response).await?;
        return Err(super::error_of(status, &bytes).into());
    }
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| anyhow::anyhow!("the export broke off: {e} — see the server's log"))?;
        if let Ok(data) = frame.into_data() {
            if !term.data(data.to_vec()).await {
                break;
            }
        }
    }
    Ok(())
}

async fn print_ps(term: &Terminal, name: &str, entries: &[serde_json::Value]) {
    if entries.is_empty() {
        term.line(format!("{name} has no running containers")).await;
    }
    let text = |e: &serde_json::Value, k: &str| {
        e.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string()
    };
    let num = |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_i64()).unwrap_or(0);
    let mut last_type = None;
    for e in entries.iter().filter(|e| e.get("command").is_none()) {
        let process_type = text(e, "process_type");
        if last_type.as_ref() != Some(&process_type) {
            term.line(format!("=== {process_type} ({})", text(e, "limits")))
                .await;
            last_type = Some(process_type.clone());
        }
        let oom = if e.get("last_exit_oom").and_then(|v| v.as_bool()) == Some(true) {
            " (out of memory)"
        } else {
            ""
        };
        let last_exit = e
            .get("last_exit")
            .and_then(|v| v.as_i64())
            .map(|code| format!(", last exit {code}{oom}"))
            .unwrap_or_default();
        let ip = text(e, "ip");
        term.line(format!(
            "{process_type}.{}: {} {}  v{}  restarts {}{last_exit}  {ip}:{}  {}",
            num(e, "number"),
            text(e, "status"),
            age(&text(e, "created_at")),
            num(e, "release"),
            num(e, "restarts"),
            num(e, "port"),
            text(e, "id")
        ))
        .await;
    }
    let runs: Vec<_> = entries
        .iter()
        .filter(|e| e.get("command").is_some())
        .collect();
    if let Some(first) = runs.first() {
        term.line(format!("=== run: one-off ({})", text(first, "limits")))
            .await;
    }
    for e in runs {
        term.line(format!(
            "run.{}: {} {}  v{}  `{}` (by {})  {}",
            num(e, "number"),
            text(e, "status"),
            age(&text(e, "created_at")),
            num(e, "release"),
            text(e, "command"),
            text(e, "by"),
            text(e, "id")
        ))
        .await;
    }
}

async fn print_certs(term: &Terminal, name: &str, info: &svc::CertInfo) {
    if info.expires.is_none() && info.auto.is_none() {
        term.line(format!(
            "{name} has no certificate — add one with `berth certs:add {name} CERT KEY` or `berth certs:auto {name}`"
        ))
        .await;
    }
    if let Some(expires) = &info.expires {
        let source = if info.auto.is_some() {
            "automatic (ACME)"
        } else {
            "uploaded"
        };
        term.line(format!(
            "=== {name} certificate: {source}, expires {expires}"
        ))
        .await;
    }
    if let Some(renews) = &info.renews {
        term.line(format!("renewal due {renews}")).await;
    }
    if let Some(error) = info.auto.as_ref().and_then(|a| a.last_error.as_ref()) {
        term.warn(format!("the last ACME order failed: {error}"))
            .await;
    }
    for host in &info.hosts {
        term.line(format!("https://{host}")).await;
    }
}

async fn print_build_limits(
    term: &Terminal,
    name: &str,
    limits: &svc::BuildLimits,
    json: bool,
) -> Done {
    if json {
        return print_json(
            term,
            &serde_json::json!({
                "memory": limits.memory,
                "cpu_millis": limits.cpu_millis,
                "pids": limits.pids,
                "timeout_secs": limits.timeout_secs,
            }),
        )
        .await;
    }
    let mark = |what: &str| {
        if limits.defaults.iter().any(|d| d == what) {
            " (default)"
        } else {
            ""
        }
    };
    term.line(format!("=== {name} build limits")).await;
    for (what, value) in [
        ("memory", crate::limits::format_memory(limits.memory)),
        ("cpus", crate::limits::format_cpus(limits.cpu_millis)),
        ("pids", limits.pids.to_string()),
        (
            "timeout",
            humantime::format_duration(std::time::Duration::from_secs(limits.timeout_secs))
                .to_string(),
        ),
    ] {
        term.line(format!("{what:<8} {value}{}", mark(what))).await;
    }
    Ok(())
}

async fn print_images(term: &Terminal, rows: Vec<svc::ImageRow>) {
    term.line(format!(
        "{:<32} {:<19} {:>8}  USED BY",
        "NAME", "DIGEST", "SIZE"
    ))
    .await;
    for row in rows {
        let name = match row.used_by.first() {
            _ if !row.tags.is_empty() => row.tags.join(", "),
            Some(u) => format!("{}:v{}", u.app, u.version),
            None => "-".to_string(),
        };
        let mut by: Vec<String> = row
            .used_by
            .iter()
            .map(|u| format!("{} v{} ({})", u.app, u.version, u.status))
            .collect();
        if by.is_empty() {
            by.push(
                if row.kept {
                    "-"
                } else {
                    "nothing (gc removes it)"
                }
                .to_string(),
            );
        }
        term.line(format!(
            "{name:<32} {:<19} {:>8}  {}",
            &row.digest[..19.min(row.digest.len())],
            human(row.size),
            by.join(", ")
        ))
        .await;
    }
}

fn human(bytes: u64) -> String {
    crate::disk::human(bytes)
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// `path`, for `user`'s things when one is named.
fn of_user(path: &str, user: Option<&str>) -> String {
    match user {
        Some(user) => format!("{path}?user={}", encode(user)),
        None => path.to_string(),
    }
}

/// `v3` (or `3`) → 3.
fn parse_version(app: &str, version: &str) -> Result<i64, Failure> {
    let number = version.strip_prefix('v').unwrap_or(version);
    number.parse::<i64>().map_err(|_| {
        usage(format!(
            "{version:?} is not a release like v3 — see `berth releases {app}`"
        ))
    })
}

/// `web=2 worker=1` → a formation; refuses malformed pairs.
fn parse_formation(pairs: &[String]) -> Result<Formation, Failure> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .and_then(|(t, n)| Some((t.to_string(), n.parse::<u32>().ok()?)))
                .filter(|(t, _)| !t.is_empty())
                .ok_or_else(|| usage(format!("{pair:?} is not TYPE=COUNT — scale like: berth ps:scale APP web=2 worker=1")))
        })
        .collect()
}

fn formation_text(formation: &Formation) -> String {
    formation
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "5s", "3m", "2h", "4d": how long ago `since` (RFC 3339) was.
pub(crate) fn age(since: &str) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(since) else {
        return String::new();
    };
    let secs = (chrono::Utc::now() - t.to_utc()).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Reads a PEM file for `certs:add`, refusing one larger than any chain or key.
fn read_pem(path: &std::path::Path, what: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    let size = std::fs::metadata(path)
        .with_context(|| {
            format!(
                "cannot read the {what} file {} — pass a PEM file",
                path.display()
            )
        })?
        .len();
    if size > crate::tls::MAX_PEM as u64 {
        anyhow::bail!(
            "the {what} file {} is {size} bytes, more than a PEM {what} needs ({} at most) — pass the PEM file",
            path.display(),
            crate::tls::MAX_PEM
        );
    }
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the {what} file {} — pass a PEM file",
            path.display()
        )
    })
}

/// Reads a public key file, or stdin for `-`.
fn read_key_file(file: &str) -> anyhow::Result<String> {
    use anyhow::Context;
    if file == "-" {
        return std::io::read_to_string(std::io::stdin()).context("cannot read the key from stdin");
    }
    std::fs::read_to_string(file).with_context(|| {
        format!("cannot read {file} — pass an OpenSSH public key file, e.g. ~/.ssh/id_ed25519.pub")
    })
}

/// `on` or `off`, as `network:set --egress` takes it.
fn parse_on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("{other:?} is neither on nor off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formations_parse() {
        let ok = parse_formation(&["web=3".into(), "worker=0".into()]).unwrap();
        assert_eq!(
            ok,
            [("web".to_string(), 3), ("worker".to_string(), 0)].into()
        );
        for bad in ["web", "=2", "web=-1", "web=two", "web=1.5"] {
            assert!(parse_formation(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}

/// A berth command line as SSH gets it (`config:set APP K=V`).
#[derive(Debug, clap::Parser)]
#[command(
    name = "berth",
    about = "berth commands over SSH: ssh -p PORT git@HOST COMMAND …",
    disable_version_flag = true
)]
struct SshLine {
    #[command(subcommand)]
    command: Command,
}

/// Runs the command line `words` through `client` (in process, as the key's owner), sending
/// what it prints to `out` (`true`: stderr); returns its exit code. Commands that read files
/// are refused: they would read the server's.
pub async fn over_ssh(
    client: Client,
    words: Vec<String>,
    out: mpsc::Sender<(bool, Vec<u8>)>,
) -> i32 {
    use clap::Parser;
    let line = match SshLine::try_parse_from(std::iter::once("berth".to_string()).chain(words)) {
        Ok(line) => line,
        Err(err) => {
            let is_error = err.use_stderr();
            let _ = out
                .send((is_error, err.render().to_string().into_bytes()))
                .await;
            return if is_error {
                Kind::Invalid.exit_code()
            } else {
                0
            };
        }
    };
    let (tx, mut rx) = mpsc::channel(64);
    let forward = async move {
        while let Some(chunk) = rx.recv().await {
            let sent = match chunk {
                Chunk::Out(bytes) => out.send((false, bytes)).await,
                Chunk::Err(bytes) => out.send((true, bytes)).await,
            };
            if sent.is_err() {
                return; // the client went away
            }
        }
    };
    let run =
        async move { execute(&client, line.command, &Terminal::new(tx), Files::Refused).await };
    let (code, ()) = tokio::join!(run, forward);
    code
}
