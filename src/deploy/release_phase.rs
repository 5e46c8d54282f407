//! Heroku's release phase: a Procfile `release:` command (`release: python manage.py migrate`)
//! runs once in a one-off container of the new release — its image, config and network — after
//! the release is recorded and before any of its containers start. Its output streams to the
//! push; a non-zero exit (or running past [`DEADLINE`]) fails the release with that reason, and
//! what ran before keeps serving. `release` is not a process type that is scaled or routed.
//!
//! Owns that one-off container from start to removal; must not touch routes or the store.

use std::time::Duration;

use rand::Rng;
use tracing::info;

use super::container::{self, Dyno};
use super::{DeployError, Deployer};
use crate::build::container::{Ended, Io, OneOff};
use crate::image::Image;
use crate::progress::Progress;
use crate::store::Release;

/// The Procfile process type that is the release command.
pub const PROCESS_TYPE: &str = "release";
/// How long the release command may run.
pub const DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Runs `release`'s release command, if it has one, to completion (`image` is its image).
pub(super) async fn run(
    d: &Deployer,
    release: &Release,
    image: &Image,
    out: &Progress,
) -> Result<(), DeployError> {
    let Some(command) = release.process_types.get(PROCESS_TYPE) else {
        return Ok(());
    };
    out.line(format!("-----> Running the release command: {command}"))
        .await;
    let suffix: u32 = rand::thread_rng().gen();
    let app = &release.app;
    let id = format!("{}-release-{suffix:08x}", &app[..app.len().min(40)]);
    let confinement = container::confinement(d, app, PROCESS_TYPE).await?;
    let net = d.network.attach(&id, confinement.egress).await?;
    let ip = net.ip;
    let dyno = Dyno::new(PROCESS_TYPE, 1);
    let spec = container::spec(&id, command, release, image, &dyno, net, &confinement);
    let job = OneOff {
        spec,
        deadline: DEADLINE,
        keep_upper: None,
    };
    let ended = crate::build::container::run(
        &d.runtime,
        job,
        Io::Lines {
            out,
            indent: "       ",
        },
    )
    .await;
    d.network.detach(&id, Some(ip)).await;
    let ended = ended?;
    info!(%app, version = release.version, ?ended, "release command finished");
    match ended {
        Ended::Exited(0) => {}
        Ended::Exited(code) => return Err(DeployError::ReleasePhaseFailed { code }),
        Ended::OutOfMemory => {
            return Err(DeployError::ReleasePhaseOutOfMemory {
                limit: crate::limits::format_memory(confinement.limits.memory),
            })
        }
        Ended::TimedOut => {
            return Err(DeployError::ReleasePhaseTimeout {
                secs: DEADLINE.as_secs(),
            })
        }
    }
    out.line("       The release command succeeded").await;
    Ok(())
}
