//! One-off runs, like `heroku run`: `berth run APP -- CMD…` and `ssh … run APP -- CMD`. Each is a
//! new container of the app's live release — its image, config vars and network, `.profile.d/`
//! sourced as for every process — running the command (a shell command line) attached to the
//! user ([`crate::attach`]: stdin, stdout and stderr, or a terminal), its exit code passed back.
//! It runs under the limits of the process type `run` (the defaults, or `resources:set APP run
//! …`), is listed by `ps` as `run.N` with its command while it runs, and is removed when it
//! exits, when its user goes away (it is stopped then), when the app is destroyed, when the
//! server stops, or after 24 hours (Heroku's limit for one-off dynos).
//!
//! Runs are not recorded in the store: they belong to the connection that started them, and a
//! server start removes every container it has no record of, so runs of a server that died go
//! too. Owns a run's container from start to removal and the list of running runs; must not
//! touch routes, and a run never blocks or waits for a deploy of its app.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_runtime::ContainerSpec;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use super::container::{self, Dyno};
use super::{DeployError, Deployer};
use crate::attach::{Attach, Output};
use crate::build::container::{Ended, Io, OneOff};
use crate::store::{Release, Store};

/// The process type whose limits runs get, and the name `ps` shows them under (`run.1`).
pub const PROCESS_TYPE: &str = "run";
/// How long a run may last before it is stopped.
pub const DEADLINE: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a server stop waits for its runs to be stopped and removed.
const END_WAIT: Duration = Duration::from_secs(30);

/// A run in progress, as `ps` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: String,
    pub app: String,
    pub release: i64,
    pub process_type: &'static str,
    pub number: u32,
    /// The command line it runs.
    pub command: String,
    pub created_at: String,
    /// Who started it: `admin`, or the SSH key's name.
    pub by: String,
}

/// The runs in progress (each with what stops it) and their tasks.
#[derive(Default)]
pub(super) struct Runs {
    running: Mutex<Vec<(RunRow, CancellationToken)>>,
    tasks: TaskTracker,
}

impl Runs {
    /// Adds a run of `release` numbered with the lowest number its app's runs do not use;
    /// returns it and what stops it.
    fn add(&self, release: &Release, command: &str, by: &str) -> (RunRow, CancellationToken) {
        let mut running = self.running.lock().expect("runs");
        let number = (1..)
            .find(|n| {
                !running
                    .iter()
                    .any(|(r, _)| r.app == release.app && r.number == *n)
            })
            .expect("a free number");
        let row = RunRow {
            id: container::container_id(&release.app, PROCESS_TYPE, number),
            app: release.app.clone(),
            release: release.version,
            process_type: PROCESS_TYPE,
            number,
            command: command.to_string(),
            created_at: Store::timestamp(),
            by: by.to_string(),
        };
        let stop = CancellationToken::new();
        // Added after the server began to stop (and so after it stopped every run): stop it too.
        if self.tasks.is_closed() {
            stop.cancel();
        }
        running.push((row.clone(), stop.clone()));
        (row, stop)
    }

    fn remove(&self, id: &str) {
        self.running
            .lock()
            .expect("runs")
            .retain(|(r, _)| r.id != id);
    }

    /// Asks the runs of `app` (of every app with None) to stop.
    fn stop(&self, app: Option<&str>) {
        let running = self.running.lock().expect("runs");
        for (_, stop) in running
            .iter()
            .filter(|(r, _)| app.is_none_or(|app| r.app == app))
        {
            stop.cancel();
        }
    }
}

impl Deployer {
    /// Runs `command` in a new container of `app`'s live release attached to `attach`, for
    /// `by`; returns its exit code (128+N when killed by signal N) once it has been removed.
    pub async fn run_one_off(
        self: &Arc<Self>,
        app: &str,
        command: &str,
        by: &str,
        attach: Attach,
    ) -> Result<i32, DeployError> {
        if self.runs.tasks.is_closed() {
            return Err(DeployError::Stopping);
        }
        let live = self.live(app).await?;
        let image = self.load_image(&live.image).await?;
        let confinement = container::confinement(self, app, PROCESS_TYPE).await?;
        let (row, stop) = self.runs.add(&live, command, by);
        let dyno = Dyno::new(PROCESS_TYPE, row.number);
        let span = info_span!("run", %app, %dyno, release = live.version);
        let d = self.clone();
        // Kept for berth's own last words to the user, after the container's output.
        let notes = attach.output.clone();
        let task = self.runs.tasks.spawn(
            async move {
                let id = row.id.clone();
                let log = d.paths.log(&row.app);
                let source = format!("berth[{dyno}]");
                let attached = async {
                    let net = d.network.attach(&id, confinement.egress).await?;
                    let ip = net.ip;
                    let spec = ContainerSpec {
                        args: container::run_launcher(&row.command),
                        ..container::spec(&id, &row.command, &live, &image, &dyno, net, &confinement)
                    };
                    let job = OneOff {
                        spec,
                        deadline: DEADLINE,
                        keep_upper: None,
                    };
                    let started = format!("started `{}` by {}", row.command, row.by);
                    crate::logs::append(&log, &source, &started);
                    info!(id, command = row.command, by = row.by, "run started");
                    let ended = crate::build::container::run(&d.runtime, job, Io::Attached(attach, stop))
                        .await;
                    d.network.detach(&id, Some(ip)).await;
                    Ok::<_, DeployError>(ended?)
                };
                let ended = attached.await;
                d.runs.remove(&id);
                let (code, note) = match ended? {
                    Ended::Exited(code) => (code, None),
                    Ended::OutOfMemory => {
                        let limit = crate::limits::format_memory(confinement.limits.memory);
                        let text = format!("out of memory: killed at its {limit} limit — raise it with `berth resources:set {} run --memory 1G`", row.app);
                        (128 + 9, Some(text))
                    }
                    Ended::TimedOut => {
                        let hours = DEADLINE.as_secs() / 3600;
                        (128 + 9, Some(format!("stopped after {hours} hours, the longest a run may last")))
                    }
                };
                if let Some(text) = note {
                    crate::logs::append(&log, &source, &text);
                    let line = format!("berth: {dyno} {text}\n");
                    let _ = notes.send(Output::Stderr(line.into_bytes())).await;
                }
                drop(notes);
                crate::logs::append(&log, &source, &format!("exited with code {code}"));
                info!(id, code, "run ended");
                Ok(code)
            }
            .instrument(span),
        );
        task.await.expect("run task")
    }

    /// The runs of `app` in progress.
    pub fn runs(&self, app: &str) -> Vec<RunRow> {
        let running = self.runs.running.lock().expect("runs");
        running
            .iter()
            .filter(|(r, _)| r.app == app)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// How `ps` shows `run`: `starting` until its container's process runs, then `up`.
    pub fn run_status(&self, run: &RunRow) -> &'static str {
        match self.runtime.started(&run.id) {
            true => "up",
            false => "starting",
        }
    }

    /// Stops the runs of `app` (of every app with None): each run's task stops its container
    /// (at once, or as soon as it has one) and removes it.
    pub(super) fn stop_runs(&self, app: Option<&str>) {
        self.runs.stop(app);
    }

    /// On server stop: stops every run and waits (a while) until each is removed.
    pub async fn end_runs(&self) {
        self.runs.tasks.close();
        self.stop_runs(None);
        if tokio::time::timeout(END_WAIT, self.runs.tasks.wait())
            .await
            .is_err()
        {
            warn!("runs still in progress after {} s", END_WAIT.as_secs());
        }
    }
}
