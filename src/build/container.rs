//! One-off containers run to their end: a build, or a release command. Each runs under its
//! limits and deadline, with its output streamed line by line (bounded, see
//! [`super::output`]), and is removed afterwards however it ended. Owns how such a container
//! ended (exit code, out of memory, out of time); must not decide what runs in it.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_runtime::{ContainerSpec, Runtime};
use tracing::warn;

use super::output;
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
    /// Put before each of its output lines.
    pub indent: &'static str,
    /// On a clean exit, its writable layer (the overlay's upper dir) is moved here before the
    /// container is removed (a Dockerfile `RUN` step's new layer).
    pub keep_upper: Option<PathBuf>,
}

/// Runs `job` until it ends or its deadline passes, each output line sent to `out`.
pub async fn run(
    runtime: &Arc<Runtime>,
    job: OneOff,
    out: &Progress,
) -> Result<Ended, berth_runtime::Error> {
    let OneOff {
        spec,
        deadline,
        indent,
        keep_upper,
    } = job;
    let id = spec.id.clone();
    let task = tokio::task::spawn_blocking({
        let (runtime, out) = (runtime.clone(), out.clone());
        move || -> Result<i32, berth_runtime::Error> {
            let mut child = runtime.run_attached(&spec)?;
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
        }
    });
    tokio::pin!(task);
    let finished = tokio::select! {
        done = &mut task => Some(done.expect("one-off container task")),
        () = tokio::time::sleep(deadline) => None,
    };
    let upper = runtime.container_dir(&id).join("upper");
    let ended = match finished {
        Some(code) => match code? {
            0 => match keep_upper {
                Some(to) => std::fs::rename(&upper, &to)
                    .map(|()| Ended::Exited(0))
                    .map_err(|source| berth_runtime::Error::Io {
                        context: format!("keeping the new layer of {id}"),
                        source,
                    }),
                None => Ok(Ended::Exited(0)),
            },
            _ if runtime.oom_killed(&id) => Ok(Ended::OutOfMemory),
            code => Ok(Ended::Exited(code)),
        },
        None => {
            // SIGTERM, then SIGKILL after the grace period; the output then ends.
            let stopping = runtime.clone();
            let stop_id = id.clone();
            let _ = tokio::task::spawn_blocking(move || stopping.stop(&stop_id)).await;
            let _ = task.await;
            Ok(Ended::TimedOut)
        }
    };
    let removing = runtime.clone();
    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || removing.remove(&id)).await {
        warn!(%err, "removing a one-off container failed");
    }
    ended
}
