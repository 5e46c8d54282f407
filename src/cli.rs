//! The `berth` command line. Owns argument parsing and printing; every command except `server`,
//! `shim` and `hook` is a request to the running daemon over its admin socket (`DIR/berth.sock`).
//! Must not touch the store, the runtime or the repos directly: the daemon owns them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::client::commands::{self, Command, Files, Terminal};
use crate::client::Client;

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
    pub command: TopCommand,
}

#[derive(Debug, Subcommand)]
pub enum TopCommand {
    /// Run the berth server: proxy, SSH git endpoint, admin socket and deploys.
    Server(ServerArgs),
    #[command(flatten)]
    Client(Command),
    /// Internal: run one container under a shim (started by the daemon).
    #[command(hide = true)]
    Shim {
        /// The container's directory, holding its `shim.json`.
        dir: PathBuf,
    },
    /// Internal: fork the shims of detached containers (started by the daemon).
    #[command(hide = true, name = "shim-launcher")]
    ShimLauncher {
        /// Spaces that each shim overwrites with its own command line.
        #[arg(hide = true)]
        room: Option<String>,
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
    /// Address of the REST API (`/api/v1`, bearer tokens from `berth tokens:create`); it is
    /// also served through the proxy at berth.<domain>.
    #[arg(long, default_value = "127.0.0.1:7200", value_name = "ADDR")]
    pub api: String,
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
    /// DNS servers that berth's DNS stub (on the bridge's address, port 53, which every
    /// container's /etc/resolv.conf names) relays containers' queries to, comma-separated;
    /// the `nameserver` lines of the host's /etc/resolv.conf when not given.
    #[arg(long, value_name = "ADDR[:PORT],...")]
    pub dns: Option<String>,
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
        TopCommand::Server(args) => crate::server::main(cli.data, args),
        TopCommand::Shim { dir } => return berth_runtime::shim::main(&dir),
        TopCommand::ShimLauncher { .. } => {
            return berth_runtime::launcher::main(berth_runtime::shim::main)
        }
        TopCommand::Hook {
            hook: HookCommand::PreReceive,
        } => crate::hook::pre_receive(&cli.data),
        TopCommand::Hook {
            hook: HookCommand::PostReceive,
        } => crate::hook::post_receive(&cli.data),
        TopCommand::Client(command) => return client(&cli.data, command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

/// Runs a command against the server (the admin socket, or `BERTH_URL`).
fn client(data: &std::path::Path, command: Command) -> i32 {
    use std::io::IsTerminal;
    if let Command::ImagesExport { image } = &command {
        if std::io::stdout().is_terminal() {
            eprintln!("error: images:export writes a tar archive to stdout — redirect it: `berth images:export {image} > image.tar`");
            return 2;
        }
    }
    let client = match Client::from_env(data) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("error: {err:#}");
            return 2;
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = runtime.block_on(async {
        if let Command::Run {
            name,
            command,
            no_tty,
        } = command
        {
            return match crate::client::run::run(&client, &name, &shell_command(&command), !no_tty)
                .await
            {
                Ok(code) => code,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    err.downcast_ref::<crate::client::CallError>()
                        .map_or(1, crate::client::CallError::exit_code)
                }
            };
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let printing = tokio::task::spawn_blocking(move || print_chunks(rx));
        let code = commands::execute(&client, command, &Terminal::new(tx), Files::Readable).await;
        let _ = printing.await;
        code
    });
    // Reading stdin (a run's input) may still block a thread; the process ends anyway.
    runtime.shutdown_background();
    code
}

/// Copies a command's output to stdout and stderr.
fn print_chunks(mut rx: tokio::sync::mpsc::Receiver<commands::Chunk>) {
    use std::io::Write;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    while let Some(chunk) = rx.blocking_recv() {
        let written = match chunk {
            commands::Chunk::Out(bytes) => stdout.write_all(&bytes).and_then(|()| stdout.flush()),
            commands::Chunk::Err(bytes) => stderr.write_all(&bytes).and_then(|()| stderr.flush()),
        };
        if written.is_err() {
            return; // stdout closed (`| head`): dropping rx ends the command
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_the_command_after_the_app_as_given() {
        let parsed = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            TopCommand::Client(Command::Run {
                name,
                command,
                no_tty,
            }) => (name, shell_command(&command), no_tty),
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
