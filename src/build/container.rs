//! One build container run to its end: under the app's build limits and deadline, with its
//! output streamed to the pusher line by line (bounded, see [`super::output`]), and removed
//! afterwards however it ended. Owns why a build container failed (exit code, out of memory,
//! out of time); must not decide what runs in it.

use std::io::BufReader;
use std::sync::Arc;

use berth_runtime::{ContainerSpec, Runtime};
use tracing::warn;

use super::{output, BuildError};
use crate::limits::BuildLimits;
use crate::progress::Progress;

/// Runs `spec` under `limits` until it exits, fails or runs out of time.
pub async fn run(
    runtime: &Arc<Runtime>,
    mut spec: ContainerSpec,
    limits: BuildLimits,
    out: &Progress,
) -> Result<(), BuildError> {
    spec.limits = limits.limits.runtime();
    let id = spec.id.clone();
    let task = tokio::task::spawn_blocking({
        let (runtime, out) = (runtime.clone(), out.clone());
        move || -> Result<i32, BuildError> {
            let mut child = runtime.run_attached(&spec)?;
            if let Some(stdout) = child.stdout.take() {
                for line in output::lines(BufReader::new(stdout)) {
                    out.blocking_line(line?);
                }
            }
            Ok(child.wait()?.code().unwrap_or(-1))
        }
    });
    tokio::pin!(task);
    let finished = tokio::select! {
        done = &mut task => Some(done.expect("build task")),
        () = tokio::time::sleep(limits.timeout) => None,
    };
    let result = match finished {
        Some(code) => match code? {
            0 => Ok(()),
            _ if runtime.oom_killed(&id) => Err(BuildError::OutOfMemory {
                limit: limits.limits.memory,
            }),
            code => Err(BuildError::Failed(code)),
        },
        None => {
            // SIGTERM, then SIGKILL after the grace period; the output then ends.
            let stopping = runtime.clone();
            let stop_id = id.clone();
            let _ = tokio::task::spawn_blocking(move || stopping.stop(&stop_id)).await;
            let _ = task.await;
            Err(BuildError::TimedOut {
                after: limits.timeout,
            })
        }
    };
    let removing = runtime.clone();
    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || removing.remove(&id)).await {
        warn!(%err, "removing a build container failed");
    }
    result
}
