//! The `berth` command line. Owns argument parsing and printing; every command except `server`,
//! `shim` and `hook` is a request to the running daemon over its admin socket (`DIR/berth.sock`).
//! Must not touch the store, the runtime or the repos directly: the daemon owns them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::admin::{self, Request};

/// Default data directory of the server and the client.
pub const DEFAULT_DATA: &str = "/var/lib/berth";

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "A self-hosted git-push PaaS in one binary"
)]
pub struct Cli {
    /// berth's data directory; the client talks to DIR/berth.sock.
    #[arg(long, global = true, env = "BERTH_DATA", default_value = DEFAULT_DATA, value_name = "DIR")]
    pub data: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the berth server: proxy, SSH git endpoint, admin socket and deploys.
    Server(ServerArgs),
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
    /// List the SSH keys allowed to push.
    Keys {
        #[arg(long)]
        json: bool,
    },
    /// Allow an SSH public key to push; FILE is an OpenSSH public key file, or - for stdin.
    #[command(name = "keys:add")]
    KeysAdd {
        /// A name for the key, e.g. laptop.
        name: String,
        file: String,
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
    /// Internal: run one container under a shim (started by the daemon).
    #[command(hide = true)]
    Shim {
        /// The container's directory, holding its `shim.json`.
        dir: PathBuf,
    },
    /// Internal: git hooks (installed into each app's repo).
    #[command(hide = true)]
    Hook {
        #[command(subcommand)]
        hook: HookCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// Deploys a pushed main/master branch; run by git-receive-pack.
    #[command(name = "pre-receive")]
    PreReceive,
    #[command(name = "post-receive")]
    PostReceive,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// HTTP address of the proxy.
    #[arg(long, default_value = "0.0.0.0:80", value_name = "ADDR")]
    pub http: String,
    /// HTTPS address of the proxy (certificates from `berth certs:add` or `certs:auto`, picked
    /// by SNI); off when not given.
    #[arg(long, value_name = "ADDR")]
    pub https: Option<String>,
    /// ACME directory `certs:auto` gets certificates from.
    #[arg(long, default_value = crate::acme::LETS_ENCRYPT, value_name = "URL")]
    pub acme_directory: String,
    /// Contact address for the ACME account (expiry notices).
    #[arg(long, value_name = "EMAIL")]
    pub acme_email: Option<String>,
    /// PEM root certificate to trust for the ACME server itself (a private or test CA such as
    /// pebble's); the system's roots otherwise.
    #[arg(long, value_name = "FILE")]
    pub acme_ca: Option<PathBuf>,
    /// SSH address of the git endpoint.
    #[arg(long, default_value = "0.0.0.0:2222", value_name = "ADDR")]
    pub ssh: String,
    /// Apps are served at http://APP.<domain>.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Host bridge the containers attach to.
    #[arg(long, default_value = "berth0")]
    pub bridge: String,
    /// Private /16 subnet berth owns for containers (the bridge takes .0.1).
    #[arg(long, default_value = "10.219.0.0/16")]
    pub subnet: String,
    /// Host CA bundle passed read-only to builds (pip/npm behind TLS-intercepting proxies);
    /// empty to disable.
    #[arg(
        long,
        default_value = "/etc/ssl/certs/ca-certificates.crt",
        value_name = "FILE"
    )]
    pub build_ca_bundle: String,
    /// Let a Dockerfile's `FROM` pull from a registry on this machine's loopback (refused
    /// otherwise: a push must not make the daemon reach the host's loopback services).
    #[arg(long)]
    pub allow_loopback_registries: bool,
    /// On shutdown, also stop every container and remove the bridge (tests, throwaway servers).
    #[arg(long)]
    pub ephemeral: bool,
    /// How many of each app's latest releases keep their images when unused images are
    /// collected (after each deploy and on `berth gc`); older releases can no longer be rolled
    /// back to.
    #[arg(long, default_value_t = 5, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub keep_releases: u16,
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Server(args) => crate::server::main(cli.data, args),
        Command::Shim { dir } => return berth_runtime::shim::main(&dir),
        Command::Hook {
            hook: HookCommand::PreReceive,
        } => crate::hook::pre_receive(&cli.data),
        Command::Hook {
            hook: HookCommand::PostReceive,
        } => crate::hook::post_receive(&cli.data),
        Command::Run {
            name,
            command,
            no_tty,
        } => admin::run::call(&cli.data, name, shell_command(&command), !no_tty),
        command => to_request(command).and_then(|request| admin::client::call(&cli.data, request)),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

fn to_request(command: Command) -> anyhow::Result<Request> {
    Ok(match command {
        Command::AppsCreate { name } => Request::AppsCreate { name },
        Command::Apps { json } => Request::Apps { json },
        Command::AppsInfo { name, json } => Request::AppsInfo { name, json },
        Command::AppsDestroy { name, force } => Request::AppsDestroy { name, force },
        Command::Config { name, json } => Request::Config { name, json },
        Command::ConfigGet { name, key } => Request::ConfigGet { name, key },
        Command::ConfigSet {
            name,
            pairs,
            no_restart,
        } => Request::ConfigSet {
            name,
            pairs,
            no_restart,
        },
        Command::ConfigUnset {
            name,
            keys,
            no_restart,
        } => Request::ConfigUnset {
            name,
            keys,
            no_restart,
        },
        Command::Keys { json } => Request::Keys { json },
        Command::KeysAdd { name, file } => Request::KeysAdd {
            name,
            key: read_key_file(&file)?,
        },
        Command::KeysRemove { name } => Request::KeysRemove { name },
        Command::Releases { name, json } => Request::Releases { name, json },
        Command::Ps { name, json } => Request::Ps { name, json },
        Command::PsScale { name, pairs } => Request::PsScale { name, pairs },
        Command::PsRestart { name, process_type } => Request::PsRestart { name, process_type },
        Command::ReleasesRollback { name, version } => Request::ReleasesRollback { name, version },
        Command::Logs {
            name,
            follow,
            num,
            process_type,
            json,
        } => Request::Logs {
            name,
            follow,
            num,
            process_type,
            json,
        },
        Command::Domains { name, json } => Request::Domains { name, json },
        Command::DomainsAdd { name, host } => Request::DomainsAdd { name, host },
        Command::DomainsRemove { name, host } => Request::DomainsRemove { name, host },
        Command::Certs { name, json } => Request::Certs { name, json },
        Command::CertsAdd {
            name,
            cert,
            key,
            redirect_https,
        } => Request::CertsAdd {
            name,
            chain: read_pem(&cert, "certificate")?,
            key: read_pem(&key, "key")?,
            redirect_https,
        },
        Command::Builds { name, json } => Request::Builds { name, json },
        Command::Network { name, json } => Request::Network { name, json },
        Command::NetworkSet { name, egress } => Request::NetworkSet { name, egress },
        Command::Resources { name, json } => Request::Resources { name, json },
        Command::ResourcesSet {
            name,
            process_type,
            memory,
            cpus,
            pids,
        } => Request::ResourcesSet {
            name,
            process_type,
            memory,
            cpus,
            pids,
        },
        Command::BuildsSet {
            name,
            memory,
            cpus,
            pids,
            timeout,
        } => Request::BuildsSet {
            name,
            memory,
            cpus,
            pids,
            timeout,
        },
        Command::CertsAuto {
            name,
            redirect_https,
        } => Request::CertsAuto {
            name,
            redirect_https,
        },
        Command::CertsRemove { name } => Request::CertsRemove { name },
        Command::StackBuild { force, stack } => Request::StackBuild { force, stack },
        Command::Images { json } => Request::Images { json },
        Command::ImagesExport { image } => {
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() {
                anyhow::bail!("images:export writes a tar archive to stdout — redirect it: `berth images:export {image} > image.tar`");
            }
            Request::ImagesExport { image }
        }
        Command::Gc { json } => Request::Gc { json },
        Command::Info { json } => Request::Info { json },
        Command::ImagesImport { file, name } => Request::ImagesImport {
            file: std::path::absolute(&file)?,
            name,
        },
        Command::Server(_) | Command::Shim { .. } | Command::Hook { .. } | Command::Run { .. } => {
            unreachable!("handled before")
        }
    })
}

/// `berth run`'s words as one shell command line: a single word as it is (`'echo $HOME'`, as
/// `heroku run` and ssh take it), several each quoted, so they reach the command as given.
fn shell_command(words: &[String]) -> String {
    match words {
        [line] => line.clone(),
        words => words
            .iter()
            .map(|word| crate::server::shell_quote(word))
            .collect::<Vec<_>>()
            .join(" "),
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
    fn run_takes_the_command_after_the_app_as_given() {
        let parsed = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Run {
                name,
                command,
                no_tty,
            } => (name, shell_command(&command), no_tty),
            other => panic!("parsed as {other:?}"),
        };
        assert_eq!(
            parsed(&["berth", "run", "app", "--", "sh", "-c", "exit 7"]),
            ("app".into(), "'sh' '-c' 'exit 7'".into(), false)
        );
        assert_eq!(
            parsed(&["berth", "run", "--no-tty", "app", "ls", "-la"]),
            ("app".into(), "'ls' '-la'".into(), true)
        );
        assert_eq!(
            parsed(&["berth", "run", "app", "--", "echo $HOME; it's"]),
            ("app".into(), "echo $HOME; it's".into(), false)
        );
        assert_eq!(
            parsed(&["berth", "run", "app", "--no-tty", "--", "ls", "--all"]),
            ("app".into(), "'ls' '--all'".into(), true)
        );
        assert!(Cli::try_parse_from(["berth", "run", "app"]).is_err());
    }
}
