//! One-off containers run to their end: a build, a release command, or a `berth run`. Each runs
//! under its limits and deadline, with its output either streamed line by line to a
//! [`Progress`] (bounded, see [`super::output`]) or attached to a user ([`crate::attach`]:
//! stdin, stdout and stderr, or a terminal), and is removed afterwards however it ended (also
//! when the attached user went away: it is stopped then, and ends with the code that gives).
//! Owns how such a container ended (exit code, out of memory, out of time); must not decide
//! what runs in it.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_runtime::terminal::Master;
use berth_runtime::{ContainerSpec, Runtime};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::output;
use crate::attach::{Attach, Input, Output};
use crate::progress::Progress;

/// How a one-off container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself with this code.
    Exited(i32),
    /// The kernel's OOM killer killed a process of it.
    OutOfMemory,
    /// It ran past its deadline and was stopped.
    TimedOut,
}

/// One one-off container to run.
pub struct OneOff {
    pub spec: ContainerSpec,
    /// How long it may run.
    pub deadline: Duration,
    /// On a clean exit, its writable layer (the overlay's upper dir) is moved here, with the
    /// container's own ids, before the container is removed (a Dockerfile `RUN` step's new
    /// layer).
    pub keep_upper: Option<PathBuf>,
}

/// Where an attached container's input goes: its stdin pipe or its terminal.
type Writer = Box<dyn AsyncWrite + Send + Unpin>;
/// Where an attached container's output comes from: its stdout pipe or its terminal.
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// Where a one-off container's input comes from and its output goes.
pub enum Io<'a> {
    /// No input; its output (stdout and stderr together) line by line to `out`, each line
    /// after `indent`.
    Lines {
        out: &'a Progress,
        indent: &'static str,
    },
    /// Wired to a user (`berth run`); stopped when `stop` is cancelled, as when the user goes.
    Attached(Attach, CancellationToken),
}

/// Runs `job` until it ends, its deadline passes or (attached) its user goes away or its stop
/// is asked for.
pub async fn run(
    runtime: &Arc<Runtime>,
    job: OneOff,
    io: Io<'_>,
) -> Result<Ended, berth_runtime::Error> {
    let OneOff {
        spec,
        deadline,
        keep_upper,
    } = job;
    let id = spec.id.clone();
    let (work, user): (BoxFuture<'static, _>, _) = match io {
        Io::Lines { out, indent } => {
            let work = lines(runtime.clone(), spec, out.clone(), indent);
            (Box::pin(work), None)
        }
        Io::Attached(attach, stop) => {
            let (spawned, shim_spawned) = oneshot::channel();
            let user = (attach.output.clone(), stop, shim_spawned);
            (
                Box::pin(attached(runtime.clone(), spec, attach, spawned)),
                Some(user),
            )
        }
    };
    // A task of its own: after a stop it still reads the output to its end.
    let mut work = tokio::spawn(work);
    // Only once its shim runs can the container be stopped: a user gone (or a stop asked
    // for) before then has it stopped as soon as it does; one that never runs ends the work.
    let stop_wanted = async {
        let Some((output, stop, shim_spawned)) = user else {
            return std::future::pending().await;
        };
        if shim_spawned.await.is_err() {
            return std::future::pending().await;
        }
        tokio::select! {
            () = output.closed() => info!(%id, "the user went away; stopping the container"),
            () = stop.cancelled() => info!(%id, "stopping the container"),
        }
    };
    let finished = tokio::select! {
        done = &mut work => Some(done.expect("one-off container task")),
        () = tokio::time::sleep(deadline) => None,
        () = stop_wanted => {
            stop(runtime, &id).await;
            Some((&mut work).await.expect("one-off container task"))
        }
    };
    let ended = match finished {
        Some(code) => match code? {
            0 => match keep_upper {
                Some(to) => {
                    let (taking, id) = (runtime.clone(), id.clone());
                    tokio::task::spawn_blocking(move || taking.take_upper(&id, &to))
                        .await
                        .expect("layer task")
                        .map(|()| Ended::Exited(0))
                }
                None => Ok(Ended::Exited(0)),
            },
            _ if runtime.oom_killed(&id) => Ok(Ended::OutOfMemory),
            code => Ok(Ended::Exited(code)),
        },
        None => {
            stop(runtime, &id).await;
            let _ = work.await;
            Ok(Ended::TimedOut)
        }
    };
    let removing = runtime.clone();
    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || removing.remove(&id)).await {
        warn!(%err, "removing a one-off container failed");
    }
    ended
}

/// Stops container `id`: SIGTERM, then SIGKILL after the grace period; its output then ends.
async fn stop(runtime: &Arc<Runtime>, id: &str) {
    let (runtime, id) = (runtime.clone(), id.to_string());
    let _ = tokio::task::spawn_blocking(move || runtime.stop(&id)).await;
}

/// Runs `spec` with its output sent to `out` line by line; returns its exit code.
async fn lines(
    runtime: Arc<Runtime>,
    spec: ContainerSpec,
    out: Progress,
    indent: &'static str,
) -> Result<i32, berth_runtime::Error> {
    tokio::task::spawn_blocking(move || {
        let mut child = runtime.run_attached(&spec, berth_runtime::Io::Output)?.shim;
        if let Some(stdout) = child.stdout.take() {
            for line in output::lines(BufReader::new(stdout)) {
                match line {
                    Ok(line) => out.blocking_line(format!("{indent}{line}")),
                    Err(_) => break,
                }
            }
        }
        let status = child.wait().map_err(|source| berth_runtime::Error::Io {
            context: format!("waiting for container {}", spec.id),
            source,
        })?;
        Ok(status.code().unwrap_or(-1))
    })
    .await
    .expect("one-off container task")
}

/// Runs `spec` attached to a user: their input to its stdin (or terminal), its stdout and
/// stderr (or terminal) to them, all of it before this returns its exit code.
/// `spawned` is told once the container's shim runs (and so can be stopped).
async fn attached(
    runtime: Arc<Runtime>,
    spec: ContainerSpec,
    attach: Attach,
    spawned: oneshot::Sender<()>,
) -> Result<i32, berth_runtime::Error> {
    let Attach {
        terminal,
        input,
        output,
    } = attach;
    let io = match terminal {
        Some(size) => berth_runtime::Io::Terminal(size),
        None => berth_runtime::Io::Pipes,
    };
    let id = spec.id.clone();
    let started = tokio::task::spawn_blocking(move || runtime.run_attached(&spec, io))
        .await
        .expect("one-off container task")?;
    let _ = spawned.send(());
    let io_err = |what: &str| {
        let context = format!("{what} of container {id}");
        move |source| berth_runtime::Error::Io { context, source }
    };
    let mut shim = started.shim;
    let stderr = shim
        .stderr
        .take()
        .map(|p| pipe::Receiver::from_owned_fd(p.into()));
    let stderr = stderr.transpose().map_err(io_err("reading the stderr"))?;
    // What the user types goes to the terminal or the stdin pipe; what it shows, or the
    // stdout pipe, comes back.
    let (to_container, from_container, master): (Option<Writer>, Option<Reader>, _) =
        match started.terminal {
            Some(fd) => {
                let reader = Master::new(fd).map_err(io_err("attaching to the terminal"))?;
                let writer = reader
                    .try_clone()
                    .map_err(io_err("attaching to the terminal"))?;
                let master = writer.try_clone().ok();
                (Some(Box::new(writer)), Some(Box::new(reader)), master)
            }
            None => {
                let stdin = shim
                    .stdin
                    .take()
                    .map(|p| pipe::Sender::from_owned_fd(p.into()));
                let stdin = stdin.transpose().map_err(io_err("writing the stdin"))?;
                let stdout = shim
                    .stdout
                    .take()
                    .map(|p| pipe::Receiver::from_owned_fd(p.into()));
                let stdout = stdout.transpose().map_err(io_err("reading the stdout"))?;
                let stdin = stdin.map(|p| Box::new(p) as Writer);
                let stdout = stdout.map(|p| Box::new(p) as Reader);
                (stdin, stdout, None)
            }
        };
    let feeding = tokio::spawn(feed(input, to_container, master));
    let waiting = tokio::task::spawn_blocking(move || shim.wait());
    tokio::join!(
        copy_out(from_container, &output, Output::Stdout),
        copy_out(stderr, &output, Output::Stderr),
    );
    let status = waiting
        .await
        .expect("one-off container task")
        .map_err(io_err("waiting for the shim"))?;
    feeding.abort();
    Ok(status.code().unwrap_or(-1))
}

/// Copies the user's input to the container until the input ends: bytes to `to`, end of
/// input closes it (a pipe; not a terminal, which would hang up), a resize to `terminal`.
async fn feed(mut input: mpsc::Receiver<Input>, mut to: Option<Writer>, terminal: Option<Master>) {
    while let Some(message) = input.recv().await {
        match message {
            Input::Data(bytes) => {
                if let Some(writer) = to.as_mut() {
                    if writer.write_all(&bytes).await.is_err() {
                        to = None; // it stopped reading; later input has nowhere to go
                    }
                }
            }
            Input::Eof if terminal.is_none() => to = None,
            Input::Eof => {}
            Input::Resize(size) => {
                if let Some(master) = &terminal {
                    let _ = master.resize(size);
                }
            }
        }
    }
}

/// Sends what `from` yields to the user, each chunk wrapped by `kind`, until its end. When the
/// user is gone it keeps reading, so the container never blocks on a full pipe.
async fn copy_out(
    from: Option<impl AsyncRead + Unpin>,
    output: &mpsc::Sender<Output>,
    kind: fn(Vec<u8>) -> Output,
) {
    let Some(mut from) = from else {
        return;
    };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let _ = output.send(kind(chunk[..n].to_vec())).await;
            }
        }
    }
}
