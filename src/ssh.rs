//! The SSH endpoint: `git push` over SSH, and one-off runs (`ssh -t git@HOST run APP -- bash`).
//!
//! Owns the SSH host key file and the SSH listener. A client logs in with a public key that the
//! [`Gate`] knows (any user name; users write `git@`), then may run, for an existing app,
//! `git-receive-pack` — the real one, spawned on the app's bare repo (see [`crate::git`]), its
//! stdin/stdout/stderr joined to the SSH channel with russh's flow control — or `run APP [--]
//! COMMAND`: the [`Gate`] runs COMMAND (a shell command line) in a one-off container of the app
//! attached to the channel (its stderr as extended data; a terminal of the requested size when
//! the client asked for a pty, resized on window changes), and the channel's exit status is the
//! command's. A client that goes away has its container stopped. Both need the same permission:
//! a key whose owner may use the app. Any other command line is a berth command
//! (`config:set APP KEY=VALUE`, `ps APP` …) that the [`Gate`] runs as the key's owner, its output
//! on the channel and its exit code as the exit status. A shell or a subsystem gets one
//! `error: …` line and exit status 1.
//!
//! This module never reads the store itself (the [`Gate`] answers for it), never writes to repos
//! (git-receive-pack and its hooks do), never deploys (the pre-receive hook does) and never
//! starts containers (the [`Gate`] does).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rand::RngCore;
use russh::keys::ssh_key::{private::Ed25519Keypair, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, Disconnect, MethodKind, MethodSet};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{field, info, info_span, warn, Instrument, Span};

use crate::attach::{self, Attach, Frontend, Input, Output, WindowSize};
use crate::git;
use crate::locks::Locks;

/// What the SSH endpoint asks the rest of berth: who a key belongs to, what they may do, and
/// to do it.
pub trait Gate: Send + Sync + 'static {
    /// The stored key's name and the user it belongs to, if this OpenSSH public key (as
    /// "ssh-ed25519 AAAA…" / "ssh-rsa …", no comment) may log in; None refuses auth.
    fn key_owner(&self, openssh_key: String) -> BoxFuture<'static, Option<(String, String)>>;
    /// Whether `user` may push to (and run commands in) `app`; the message to refuse with
    /// otherwise.
    fn may_push(&self, user: String, app: String) -> BoxFuture<'static, Result<(), String>>;
    /// The push with this id (`BERTH_PUSH_ID` of its hooks) is over: its git-receive-pack exited.
    fn push_ended(&self, push: String) -> BoxFuture<'static, ()>;
    /// Runs `command` (a shell command line) in a one-off container of `app` as `user`,
    /// attached to `attach`; its exit code, or why it could not run.
    fn run(
        &self,
        app: String,
        command: String,
        user: String,
        attach: Attach,
    ) -> BoxFuture<'static, Result<i32, String>>;
    /// Runs a berth command (`config:set APP KEY=VALUE` as words) as `user`, sending what it
    /// prints to `out` (`true` for stderr); its exit code.
    fn command(
        &self,
        user: String,
        words: Vec<String>,
        out: mpsc::Sender<(bool, Vec<u8>)>,
    ) -> BoxFuture<'static, i32>;
}

/// Where the SSH endpoint keeps its host key and finds the apps' bare repos.
pub struct SshConfig {
    pub host_key: PathBuf,
    pub repos_dir: PathBuf,
}

/// Why the SSH endpoint could not start. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("could not read the SSH host key {path}: {source} — fix its permissions, or move it away to make a new one")]
    ReadHostKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the SSH host key {path} is not an OpenSSH private key: {source} — restore it, or move it away to make a new one (clients will then see a changed host key)")]
    ParseHostKey {
        path: PathBuf,
        source: russh::keys::ssh_key::Error,
    },
    #[error("could not write a new SSH host key to {path}: {source} — check that its directory is writable")]
    WriteHostKey {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Serves SSH connections from `listener` until `shutdown` is cancelled, then disconnects the
/// clients still connected and returns once their connections have ended.
pub async fn run(
    listener: TcpListener,
    config: SshConfig,
    gate: Arc<dyn Gate>,
    shutdown: CancellationToken,
) -> Result<(), SshError> {
    let host_key = load_or_create_host_key(&config.host_key)?;
    let russh_config = Arc::new(russh::server::Config {
        keys: vec![host_key],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // OpenSSH always probes with "none" first; only real refusals pay the delay.
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: Some(Duration::from_secs(600)),
        ..Default::default()
    });
    let repos_dir = Arc::new(config.repos_dir);
    let pushes = Arc::new(Locks::default());
    info!(addr = ?listener.local_addr().ok(), "ssh git endpoint listening");

    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let span = info_span!("ssh", %peer, key = field::Empty, app = field::Empty);
                    let handler = Connection {
                        gate: gate.clone(),
                        pushes: pushes.clone(),
                        repos_dir: repos_dir.clone(),
                        span: span.clone(),
                        key: None,
                        channels: HashMap::new(),
                        terminals: HashMap::new(),
                    };
                    let serve = serve(russh_config.clone(), stream, handler, shutdown.clone());
                    connections.spawn(serve.instrument(span));
                }
                Err(e) => {
                    // Usually out of file descriptors: wait a little instead of spinning.
                    warn!(error = %e, "ssh accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Loads the ed25519 host key at `path`, or makes one (mode 0600, OpenSSH format) when the file
/// does not exist yet, so clients see the same host key across restarts.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text).map_err(|source| SshError::ParseHostKey {
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_host_key(path),
        Err(source) => Err(SshError::ReadHostKey {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_host_key(path: &Path) -> Result<PrivateKey, SshError> {
    let write_err = |source| SshError::WriteHostKey {
        path: path.to_path_buf(),
        source,
    };
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| write_err(std::io::Error::other(e)))?;
    crate::paths::write_secret(path, text.as_bytes()).map_err(write_err)?;
    info!(path = %path.display(), fingerprint = %key.public_key().fingerprint(Default::default()), "made a new ssh host key");
    Ok(key)
}

async fn serve(
    config: Arc<russh::server::Config>,
    stream: TcpStream,
    handler: Connection,
    shutdown: CancellationToken,
) {
    let session = match russh::server::run_stream(config, stream, handler).await {
        Ok(session) => session,
        Err(e) => {
            info!(error = %e, "ssh handshake failed");
            return;
        }
    };
    let handle = session.handle();
    tokio::select! {
        ended = session => match ended {
            Ok(()) => info!("ssh connection closed"),
            Err(e) => info!(error = %e, "ssh connection ended"),
        },
        () = shutdown.cancelled() => {
            let reason = "berth is shutting down".to_string();
            // The client may be gone already; nothing more to do then.
            let _ = handle.disconnect(Disconnect::ByApplication, reason, "en".into()).await;
        }
    }
}

/// One SSH connection: its key, once authenticated, and the session channels not yet running
/// a command.
struct Connection {
    gate: Arc<dyn Gate>,
    /// One push per app at a time, for its whole receive.
    pushes: Arc<Locks>,
    repos_dir: Arc<PathBuf>,
    span: Span,
    /// The accepted key's name and its owner.
    key: Option<(String, String)>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// The pty size each channel asked for, if it asked for one.
    terminals: HashMap<ChannelId, WindowSize>,
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        // Ask about the bare key: no comment, whatever the client's file said.
        let Ok(openssh) = PublicKey::new(key.public_key.key_data().clone(), "").to_openssh() else {
            return Ok(Auth::reject());
        };
        match self.gate.key_owner(openssh).await {
            Some((name, user)) => {
                self.span.record("key", name.as_str());
                info!(parent: &self.span, %user, "key accepted");
                self.key = Some((name, user));
                Ok(Auth::Accept)
            }
            None => {
                let fingerprint = key.public_key.fingerprint(Default::default());
                info!(parent: &self.span, %fingerprint, "unknown key refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.terminals.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // A `run` that follows gets a terminal of this size; anything else is refused with an
        // explanation (`ssh -tt` gives up silently when its pty request fails).
        self.terminals
            .insert(channel, window_size(col_width, row_height));
        session.channel_success(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        session.channel_success(channel)?;
        refuse(session, channel, &not_served("a shell"))
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        session.channel_success(channel)?;
        refuse(
            session,
            channel,
            &not_served(&format!("{:?}", format!("subsystem {name}"))),
        )
    }

    async fn exec_request(
        &mut self,
        channel_id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(channel) = self.channels.remove(&channel_id) else {
            // A second command on a channel that already runs one.
            return session.channel_failure(channel_id);
        };
        session.channel_success(channel_id)?;
        let command = String::from_utf8_lossy(data);
        let terminal = self.terminals.remove(&channel_id);
        if is_run(&command) {
            let (app, command) = match parse_run(&command) {
                Ok(run) => run,
                Err(message) => return refuse(session, channel_id, &message),
            };
            if let Err(message) = self.may_push(&app).await {
                return refuse(session, channel_id, &message);
            }
            let (frontend, attach) = attach::pair(terminal);
            let run = self.gate.run(app, command, self.user(), attach);
            tokio::spawn(run_attached(channel, frontend, run).instrument(self.span.clone()));
            return Ok(());
        }
        let app = match git::parse_receive_pack(&command) {
            Ok(app) => app,
            Err(git::GitError::NotAPush { command }) => {
                let words = match shlex::split(&command) {
                    Some(words) if !words.is_empty() => words,
                    _ => return refuse(session, channel_id, &not_served(&format!("{command:?}"))),
                };
                let (tx, rx) = mpsc::channel(64);
                let ran = self.gate.command(self.user(), words, tx);
                tokio::spawn(command_attached(channel, rx, ran).instrument(self.span.clone()));
                return Ok(());
            }
            Err(e) => return refuse(session, channel_id, &e.to_string()),
        };
        if let Err(message) = self.may_push(&app).await {
            return refuse(session, channel_id, &message);
        }

        let push = format!("{:016x}", rand::rngs::OsRng.next_u64());
        let mut receive_pack = tokio::process::Command::new("git-receive-pack");
        receive_pack
            .arg(git::repo_path(&self.repos_dir, &app))
            .env("BERTH_APP", &app)
            .env(
                "BERTH_KEY_NAME",
                self.key.as_ref().map_or("", |(name, _)| name.as_str()),
            )
            .env("BERTH_PUSH_ID", &push);
        let (pushes, gate) = (self.pushes.clone(), self.gate.clone());
        let receive = async move {
            let _held = match pushes.try_lock(&app) {
                Some(held) => held,
                None => {
                    let waiting = format!(
                        "-----> Another push to {app} is in progress; waiting for it to finish\n"
                    );
                    let _ = channel.extended_data_bytes(1, waiting.into_bytes()).await;
                    pushes.lock(&app).await
                }
            };
            info!("push started");
            pipe_to_process(channel, receive_pack).await;
            gate.push_ended(push).await;
        };
        tokio::spawn(receive.instrument(self.span.clone()));
        Ok(())
    }
}

impl Connection {
    /// The user the accepted key belongs to.
    fn user(&self) -> String {
        self.key
            .as_ref()
            .map(|(_, user)| user.clone())
            .unwrap_or_default()
    }

    /// Whether this connection's key may push `app` (and so run commands in it); the message
    /// to refuse with otherwise.
    async fn may_push(&self, app: &str) -> Result<(), String> {
        self.span.record("app", app);
        self.gate.may_push(self.user(), app.to_string()).await
    }
}

/// Joins the channel to a berth command: what it prints goes out (stderr as extended data),
/// then its exit status, EOF and close. Input is not read.
async fn command_attached(
    channel: Channel<Msg>,
    mut printed: mpsc::Receiver<(bool, Vec<u8>)>,
    ran: BoxFuture<'static, i32>,
) {
    let (_from_client, to_client) = channel.split();
    let forwarding = async {
        let mut out = to_client.make_writer();
        let mut err = to_client.make_writer_ext(Some(1));
        while let Some((is_err, bytes)) = printed.recv().await {
            let sent = match is_err {
                true => err.write_all(&bytes).await,
                false => out.write_all(&bytes).await,
            };
            if sent.is_err() {
                return; // the client went away: dropping the receiver ends the command
            }
        }
    };
    let (code, ()) = tokio::join!(ran, forwarding);
    info!(code, "command finished");
    let _ = to_client
        .exit_status(u32::try_from(code).unwrap_or(1))
        .await;
    let _ = to_client.eof().await;
    let _ = to_client.close().await;
}

/// What a refused request is told: what is served here, and how to use it.
fn not_served(what: &str) -> String {
    format!("only git push, run and berth commands are served here (got {what}) — push with: git push deploy main; run a command in an app with: ssh -t -p PORT git@HOST run APP -- bash; see the commands with: ssh -p PORT git@HOST help")
}

/// Whether `command` asks for a one-off run (`run APP …`).
fn is_run(command: &str) -> bool {
    command == "run" || command.starts_with("run ")
}

/// `run APP [--] COMMAND` → (APP, COMMAND); the message to refuse with otherwise.
fn parse_run(command: &str) -> Result<(String, String), String> {
    let usage = "say which app and what to run: ssh -t -p PORT git@HOST run APP -- COMMAND";
    let rest = command.strip_prefix("run").unwrap_or_default().trim_start();
    let (app, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if app.is_empty() {
        return Err(usage.to_string());
    }
    crate::app::validate(app).map_err(|e| e.to_string())?;
    let rest = rest.trim_start();
    let rest = match rest.strip_prefix("--") {
        Some(after) if after.is_empty() || after.starts_with(char::is_whitespace) => after,
        _ => rest,
    };
    let command = rest.trim();
    if command.is_empty() {
        return Err(usage.to_string());
    }
    Ok((app.to_string(), command.to_string()))
}

/// A pty size as a client asked for it; 24×80 for what it left out.
fn window_size(cols: u32, rows: u32) -> WindowSize {
    let cells = |n: u32, default: u16| match u16::try_from(n) {
        Ok(0) | Err(_) => default,
        Ok(n) => n,
    };
    WindowSize {
        rows: cells(rows, 24),
        cols: cells(cols, 80),
    }
}

/// Joins the channel to a one-off run: the client's data, end of input and window changes go
/// in; the run's stdout (data) and stderr (extended data 1) come out, then its exit status,
/// EOF and close. A client that goes away (the channel closes) has its container stopped.
async fn run_attached(
    channel: Channel<Msg>,
    frontend: Frontend,
    run: BoxFuture<'static, Result<i32, String>>,
) {
    let (mut from_client, to_client) = channel.split();
    let Frontend { input, output } = frontend;
    let gone = CancellationToken::new();
    let receiving = tokio::spawn({
        let gone = gone.clone();
        async move {
            while let Some(msg) = from_client.wait().await {
                let message = match msg {
                    ChannelMsg::Data { data } => Input::Data(data.to_vec()),
                    ChannelMsg::Eof => Input::Eof,
                    ChannelMsg::WindowChange {
                        col_width,
                        row_height,
                        ..
                    } => Input::Resize(window_size(col_width, row_height)),
                    ChannelMsg::Close => break,
                    _ => continue,
                };
                // Once the run is over nobody takes input; the channel closes soon.
                let _ = input.send(message).await;
            }
            gone.cancel();
        }
        .in_current_span()
    });
    let forwarding = async {
        let mut output = output;
        let mut out = to_client.make_writer();
        let mut err = to_client.make_writer_ext(Some(1));
        loop {
            let message = tokio::select! {
                message = output.recv() => message,
                () = gone.cancelled() => return,
            };
            let sent = match message {
                Some(Output::Stdout(bytes)) => out.write_all(&bytes).await,
                Some(Output::Stderr(bytes)) => err.write_all(&bytes).await,
                None => return,
            };
            if sent.is_err() {
                return;
            }
        }
    };
    let (ran, ()) = tokio::join!(run, forwarding);
    receiving.abort();
    let code = match ran {
        Ok(code) => u32::try_from(code).unwrap_or(1),
        Err(message) => {
            info!(message, "run refused");
            let line = format!("error: {message}\n");
            let _ = to_client.extended_data_bytes(1, line.into_bytes()).await;
            1
        }
    };
    info!(code, "run finished");
    let _ = to_client.exit_status(code).await;
    let _ = to_client.eof().await;
    let _ = to_client.close().await;
}

/// Answers a request berth does not serve: one `error: …` line on stderr, exit status 1.
fn refuse(session: &mut Session, channel: ChannelId, message: &str) -> Result<(), russh::Error> {
    info!(message, "request refused");
    session.extended_data(channel, 1, format!("error: {message}\n"))?;
    session.exit_status_request(channel, 1)?;
    session.eof(channel)?;
    session.close(channel)
}

/// Runs `command` with the channel as its stdin, stdout and stderr (extended data 1), then sends
/// its exit status, EOF and close. Writes wait for the client's window; reads wait for the
/// process, which holds back the connection (and so the client) when the process is slow.
async fn pipe_to_process(channel: Channel<Msg>, mut command: tokio::process::Command) {
    let (mut from_client, to_client) = channel.split();
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            warn!(error = %e, "could not start git-receive-pack");
            let message = format!(
                "error: the server could not start git-receive-pack: {e} — install git on the berth server\n"
            );
            let _ = to_client.extended_data_bytes(1, message).await;
            let _ = to_client.exit_status(1).await;
            let _ = to_client.eof().await;
            let _ = to_client.close().await;
            return;
        }
    };
    let (Some(stdin), Some(mut stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        unreachable!("stdin, stdout and stderr are piped");
    };

    // Client → process. Keeps draining the channel after the process stops reading, so the
    // connection never stalls on data nobody wants; ends when the channel closes.
    tokio::spawn(
        async move {
            let mut stdin = Some(stdin);
            while let Some(msg) = from_client.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        if let Some(pipe) = stdin.as_mut() {
                            if pipe.write_all(&data).await.is_err() {
                                stdin = None;
                            }
                        }
                    }
                    // Dropping the pipe is what tells the process its input ended.
                    ChannelMsg::Eof => stdin = None,
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
        }
        .in_current_span(),
    );

    // Process → client.
    let mut out = to_client.make_writer();
    let mut err = to_client.make_writer_ext(Some(1));
    let (copied_out, copied_err) = tokio::join!(
        tokio::io::copy(&mut stdout, &mut out),
        tokio::io::copy(&mut stderr, &mut err)
    );
    if let Err(e) = copied_out.and(copied_err) {
        // The client went away: stop the push rather than wait on a process nobody reads.
        info!(error = %e, "client gone, stopping git-receive-pack");
        let _ = child.start_kill();
    }
    let code = match child.wait().await {
        Ok(status) => status
            .code()
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(1),
        Err(e) => {
            warn!(error = %e, "could not wait for git-receive-pack");
            1
        }
    };
    info!(code, "push finished");
    let _ = to_client.exit_status(code).await;
    let _ = to_client.eof().await;
    let _ = to_client.close().await;
}
