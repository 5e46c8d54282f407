//! The start-to-exit half of `scripts/bench/runtime.sh`: runs `true` in one OCI bundle ROUNDS
//! times under each of berth's embedded runtime, `crun run` and `runc run`, rotating which
//! runtime goes first each round, and prints one line per runtime: `NAME MEDIAN_MS MIN_MS
//! MAX_MS`. berth runs it two ways: `berth` as `berth server` starts an app's containers (a
//! detached start, the shim forked by the shim launcher, then waiting for the exit and
//! `remove`), and `berth-attached` as it runs builds and one-off commands (`run_attached`:
//! the shim executed, its exit waited for, then `remove`). berth takes
//! the bundle's `rootfs` as its one (read-only) layer; crun and runc take the bundle as it is.
//! Every container is removed before the next starts (crun and runc `run` delete their own);
//! WORKDIR holds berth's container directories and is removed at the end.
//!
//! Usage: `bench_start BUNDLE ROUNDS WORKDIR` (as root; WORKDIR must not exist). The binary
//! doubles as the shim: the runtime re-executes it as `bench_start shim DIR`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_runtime::{ContainerSpec, Io, LogTarget, Runtime};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(code) = berth_runtime::shim::dispatch(&args) {
        std::process::exit(code);
    }
    let [_, bundle, rounds, workdir] = &args[..] else {
        bail!("usage: bench_start BUNDLE ROUNDS WORKDIR");
    };
    let bundle = std::path::absolute(bundle)?;
    let rounds: usize = rounds.parse().context("ROUNDS is a number")?;
    let workdir = PathBuf::from(workdir);
    std::fs::create_dir(&workdir)
        .with_context(|| format!("creating {} (it must not exist)", workdir.display()))?;
    let measured = measure(&bundle, rounds, &workdir);
    let removed = std::fs::remove_dir_all(&workdir);
    let mut times = measured?;
    removed.with_context(|| format!("removing {}", workdir.display()))?;
    for (name, times) in RUNTIMES.iter().zip(&mut times) {
        times.sort();
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{name} {:.1} {:.1} {:.1}",
            ms(&times[times.len() / 2]),
            ms(&times[0]),
            ms(&times[times.len() - 1])
        );
    }
    Ok(())
}

const RUNTIMES: [&str; 4] = ["berth", "berth-attached", "crun", "runc"];

fn measure(bundle: &Path, rounds: usize, workdir: &Path) -> anyhow::Result<Vec<Vec<Duration>>> {
    let runtime = Runtime::new(workdir.join("containers"), std::env::current_exe()?);
    let pid = std::process::id();
    // For waiting on a detached container's exit (a pidfd); one thread, as the shims are
    // forked by the launcher process, not by this one.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let mut times = vec![Vec::new(); RUNTIMES.len()];
    for round in 0..rounds {
        for turn in 0..RUNTIMES.len() {
            let which = (round + turn) % RUNTIMES.len();
            let id = format!("bench-start-{pid}-{round}");
            let t = Instant::now();
            match RUNTIMES[which] {
                "berth" => start_berth(&runtime, &rt, bundle, &workdir.join("log"), &id)?,
                "berth-attached" => run_berth(&runtime, bundle, &id)?,
                peer => run_peer(peer, bundle, &id)?,
            }
            times[which].push(t.elapsed());
        }
    }
    Ok(times)
}

/// A detached start, as `berth server` starts an app's containers; returns once it exited
/// and was removed.
fn start_berth(
    runtime: &Runtime,
    rt: &tokio::runtime::Runtime,
    bundle: &Path,
    log: &Path,
    id: &str,
) -> anyhow::Result<()> {
    let log = LogTarget::File {
        path: log.to_path_buf(),
        prefix: "bench".into(),
    };
    runtime.start(&spec(bundle, id, log))?;
    rt.block_on(runtime.wait_exit(id))?;
    let state = runtime.state(id);
    runtime.remove(id)?;
    if state != (berth_runtime::State::Exited { code: 0 }) {
        bail!("berth's detached `true` ended as {state:?}");
    }
    Ok(())
}

fn spec(bundle: &Path, id: &str, log: LogTarget) -> ContainerSpec {
    ContainerSpec {
        id: id.to_string(),
        layers: vec![bundle.join("rootfs")],
        args: vec!["true".into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        hostname: "bench".into(),
        binds: Vec::new(),
        netns: None,
        log,
        stop_grace_secs: 1,
        limits: Default::default(),
        init: false,
        user: None,
        users: None,
        stop_signal: None,
    }
}

fn run_berth(runtime: &Runtime, bundle: &Path, id: &str) -> anyhow::Result<()> {
    let spec = spec(bundle, id, LogTarget::Inherit);
    // `true` prints nothing, so the output pipe never needs reading.
    let mut attached = runtime.run_attached(&spec, Io::Output)?;
    let status = attached.shim.wait()?;
    runtime.remove(id)?;
    if !status.success() {
        bail!("berth's `true` exited with {status}");
    }
    Ok(())
}

fn run_peer(peer: &str, bundle: &Path, id: &str) -> anyhow::Result<()> {
    let status = Command::new(peer)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {peer}"))?;
    if !status.success() {
        bail!("{peer} run exited with {status}");
    }
    Ok(())
}
