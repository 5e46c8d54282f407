//! The shim: `berth shim DIR`, one single-threaded process per container (like containerd-shim
//! or conmon). It reads `DIR/shim.json`, joins the container's network namespace, mounts the
//! rootfs (id-mapped for a container with a user namespace), starts the container
//! ([`container`]), writes its pid, copies its output to the log, forwards SIGTERM/SIGINT to
//! it (SIGKILL after the grace period), waits for it, cleans up (cgroup,
//! mount) and finally writes `DIR/exit` and exits with the container's code. Asked for a
//! terminal ([`terminal::TERMINAL_FD_VAR`]), it runs the container with one and hands the
//! terminal's master to the daemon ([`terminal`]).
//!
//! It never starts a thread: it clones the container's init, and a clone of a multithreaded
//! process may find malloc's locks held. Its mounts are
//! made in a private mount namespace of its own, so they vanish with it even if it is killed.
//! If the container cannot start, the reason goes to `DIR/error` (and stderr), the exit code is
//! [`START_FAILED`], and nothing is left mounted or in the cgroup tree.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::{cgroup, container, layout, rootfs, spec, terminal, ContainerSpec, Error, LogTarget};

/// Exit code of a shim whose container could not start.
pub const START_FAILED: i32 = 125;

/// When this variable is set, the shim's fd [`READY_FD`] is a pipe to the starting daemon: the
/// shim writes one byte to it once the container runs (`DIR/pid`) or could not start
/// (`DIR/error`), then closes it.
pub const READY_FD_VAR: &str = "BERTH_SHIM_READY_FD";
pub const READY_FD: i32 = 3;

/// Tells the starting daemon that `DIR/pid` or `DIR/error` is written (see [`READY_FD_VAR`]).
fn signal_ready() {
    if std::env::var_os(READY_FD_VAR).is_some() {
        // SAFETY: the daemon handed this fd over for exactly this; it is closed here once.
        let pipe = unsafe { std::fs::File::from_raw_fd(READY_FD) };
        let _ = (&pipe).write_all(b"1");
        std::env::remove_var(READY_FD_VAR);
    }
}

/// Longest log line; longer output is split.
const MAX_LINE: usize = 64 * 1024;

/// How long to wait for the last output after the container exited.
const DRAIN: Duration = Duration::from_secs(2);

/// Set by SIGTERM/SIGINT before the signalfd takes over.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: nix::libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// For programs that double as the shim (berth's examples and tests): runs the shim for
/// `PROGRAM shim DIR` or the launcher for `PROGRAM shim-launcher` and returns the exit code;
/// `None` for any other command line.
pub fn dispatch(args: &[String]) -> Option<i32> {
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("shim"), Some(dir)) => Some(main(Path::new(dir))),
        (Some("shim-launcher"), _) => Some(crate::launcher::main(main)),
        _ => None,
    }
}

/// Runs the container described by `DIR/shim.json`; returns the process exit code.
pub fn main(dir: &Path) -> i32 {
    main_with(dir, true)
}

/// [`main`] without the default seccomp profile. Only for berth-runtime's own tests, which
/// prove with it that the profile, not the capability set, is what denies a syscall; berth
/// never calls it.
#[doc(hidden)]
pub fn main_without_seccomp(dir: &Path) -> i32 {
    main_with(dir, false)
}

fn main_with(dir: &Path, seccomp: bool) -> i32 {
    for (var, fd) in [
        (READY_FD_VAR, READY_FD),
        (terminal::TERMINAL_FD_VAR, terminal::TERMINAL_FD),
    ] {
        if std::env::var_os(var).is_some() {
            // Not for the container's processes.
            // SAFETY: fcntl on an fd number; F_SETFD changes only its close-on-exec flag.
            unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
        }
    }
    let dir = match std::path::absolute(dir) {
        Ok(dir) => dir,
        Err(err) => {
            eprintln!("error: berth shim: bad directory {}: {err}", dir.display());
            return START_FAILED;
        }
    };
    match run(&dir, seccomp) {
        Ok(code) => code,
        Err(err) => {
            let reason = err.to_string();
            eprintln!("error: {reason}");
            let _ = layout::write(&dir, layout::ERROR, &reason);
            let _ = layout::write(&dir, layout::EXIT, &START_FAILED.to_string());
            signal_ready();
            START_FAILED
        }
    }
}

fn run(dir: &Path, seccomp: bool) -> Result<i32, Error> {
    // First, so a stop that comes while the shim is still starting is not lost.
    install_stop_handler()?;
    let path = dir.join(layout::SPEC);
    let json = std::fs::read(&path).map_err(Error::io(format!("reading {}", path.display())))?;
    let spec: ContainerSpec = serde_json::from_slice(&json).map_err(|err| Error::Io {
        context: format!("parsing {}", path.display()),
        source: err.into(),
    })?;
    nix::sys::prctl::set_child_subreaper(true).map_err(Error::sys("becoming child subreaper"))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS)
        .map_err(Error::sys("creating the shim's mount namespace"))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(Error::sys("making the shim's mounts private"))?;

    let (log, container_out) = match &spec.log {
        LogTarget::Inherit => (None, None),
        LogTarget::File { path, prefix } => {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
                .map_err(Error::sys("creating the log pipe"))?;
            (Some(LogPump::new(path, prefix, read)?), Some(write))
        }
    };

    if let Some(netns) = &spec.netns {
        join_netns(netns, spec.users.is_some())?;
    }
    let root = rootfs::mount(dir, &spec.layers, spec.users)?;
    let spec = match spec.users {
        Some(users) => match rootfs::bind_sources(&spec.id, &spec.binds, users) {
            Ok(binds) => ContainerSpec { binds, ..spec },
            Err(err) => {
                let _ = rootfs::unmount(dir, true);
                return Err(err);
            }
        },
        None => spec,
    };
    let init = match start(dir, &spec, &root, container_out, seccomp) {
        Ok(init) => init,
        Err(err) => {
            let _ = rootfs::unmount(dir, spec.users.is_some());
            return Err(err);
        }
    };
    layout::write(dir, layout::PID, &init.to_string())?;
    signal_ready();
    tracing::info!(id = spec.id, pid = init.as_raw(), "container started");

    let stop = Stop {
        signal: spec
            .stop_signal
            .and_then(|s| Signal::try_from(s).ok())
            .unwrap_or(Signal::SIGTERM),
        grace: Duration::from_secs(spec.stop_grace_secs),
    };
    let code = supervise(init, log, stop)?;
    let oom_kills = cgroup::oom_kills(&spec.id);
    if oom_kills > 0 {
        layout::write(dir, layout::OOM, &oom_kills.to_string())?;
    }
    container::delete(&spec.id);
    rootfs::unmount(dir, spec.users.is_some())?;
    layout::write(dir, layout::EXIT, &code.to_string())?;
    Ok(code)
}

/// Joins the network namespace at `path` before the init is cloned, so the container inherits
/// it: the init could join it only from inside the container's user namespace, where a
/// namespace owned by the host's user namespace cannot be joined. The netns stays the host's to
/// configure (the container has no say over its links). With a user namespace, ports below
/// 1024 need no capability in it (`ip_unprivileged_port_start` is 0, as Docker sets it).
fn join_netns(path: &Path, userns: bool) -> Result<(), Error> {
    let ns = File::open(path).map_err(Error::io(format!("opening {}", path.display())))?;
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(Error::sys(format!(
        "joining the network namespace {}",
        path.display()
    )))?;
    if userns {
        let sysctl = "/proc/sys/net/ipv4/ip_unprivileged_port_start";
        std::fs::write(sysctl, "0").map_err(Error::io(format!("writing {sysctl}")))?;
    }
    Ok(())
}

/// SIGTERM/SIGINT set a flag until [`supervise`] reads them from a signalfd. Handlers are reset
/// by exec, so the container does not inherit them (it inherits no blocked signals either).
fn install_stop_handler() -> Result<(), Error> {
    let action = SigAction::new(
        SigHandler::Handler(on_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }.map_err(Error::sys("installing a signal handler"))?;
    }
    Ok(())
}

/// Writes config.json and starts the container ([`container::start`]); with a terminal, hands
/// its master to the daemon. On failure nothing is left behind but the rootfs mount, which the
/// caller removes.
fn start(
    dir: &Path,
    spec: &ContainerSpec,
    root: &Path,
    out: Option<OwnedFd>,
    seccomp: bool,
) -> Result<Pid, Error> {
    let mut oci = spec::build(spec, root)?;
    // Run with a terminal when the daemon asked for one (it waits on TERMINAL_FD for it).
    let terminal = std::env::var_os(terminal::TERMINAL_FD_VAR).is_some();
    if let Some(process) = oci.process_mut() {
        process.set_terminal(Some(terminal));
    }
    let config = dir.join("config.json");
    oci.save(&config)
        .map_err(|err| Error::Spec(format!("writing {}: {err}", config.display())))?;
    let started = container::start(&oci, &spec.id, out, terminal, seccomp)?;
    if let Some(master) = started.terminal {
        if let Err(err) = terminal::hand_over(master) {
            let _ = kill(started.pid, Signal::SIGKILL);
            let _ = waitpid(started.pid, None);
            container::delete(&spec.id);
            return Err(err);
        }
    }
    Ok(started.pid)
}

/// Waits for the container's init to exit while copying its output to the log and turning
/// stop signals into `stop.signal`, then SIGKILL after its grace period. Returns the exit code.
fn supervise(init: Pid, mut log: Option<LogPump>, stop: Stop) -> Result<i32, Error> {
    let mut mask = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(signal);
    }
    mask.thread_block()
        .map_err(Error::sys("blocking signals"))?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(Error::sys("creating a signalfd"))?;

    let mut kill_at = None;
    if STOP_REQUESTED.load(Ordering::SeqCst) {
        kill_at = Some(request_stop(init, stop));
    }
    let mut code = reap(init);
    while code.is_none() {
        let timeout = match kill_at {
            Some(at) => timeout_until(at),
            None => PollTimeout::NONE,
        };
        let (signal_ready, log_ready) = {
            let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
            if let Some(pump) = log.as_ref().filter(|pump| pump.open) {
                fds.push(PollFd::new(pump.pipe.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(err) => return Err(Error::sys("waiting for the container")(err)),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), fds.get(1).is_some_and(ready))
        };
        if signal_ready {
            while let Ok(Some(info)) = signals.read_signal() {
                let signo = info.ssi_signo as i32;
                if (signo == Signal::SIGTERM as i32 || signo == Signal::SIGINT as i32)
                    && kill_at.is_none()
                {
                    kill_at = Some(request_stop(init, stop));
                }
            }
            code = reap(init);
        }
        if log_ready {
            if let Some(pump) = log.as_mut() {
                pump.pump();
            }
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            tracing::info!(pid = init.as_raw(), "grace period over, sending SIGKILL");
            let _ = kill(init, Signal::SIGKILL);
            kill_at = None;
        }
    }
    if let Some(pump) = log.as_mut() {
        pump.drain(Instant::now() + DRAIN);
    }
    Ok(code.unwrap_or(START_FAILED))
}

/// How a stop ends the container: `signal` first, SIGKILL `grace` later.
#[derive(Clone, Copy)]
struct Stop {
    signal: Signal,
    grace: Duration,
}

fn request_stop(init: Pid, stop: Stop) -> Instant {
    tracing::info!(pid = init.as_raw(), signal = %stop.signal, "stop requested");
    let _ = kill(init, stop.signal);
    Instant::now() + stop.grace
}

/// A poll timeout that ends just after `at` (at most a minute; callers loop).
pub(crate) fn timeout_until(at: Instant) -> PollTimeout {
    let left = at.saturating_duration_since(Instant::now());
    PollTimeout::try_from(left.as_millis().min(60_000) as u32 + 1).unwrap_or(PollTimeout::MAX)
}

/// Reaps every exited child; returns the init's exit code once it has exited.
fn reap(init: Pid) -> Option<i32> {
    let mut code = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, status)) if pid == init => code = Some(status),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == init => {
                code = Some(128 + signal as i32)
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return code,
            Ok(_) => {}
        }
    }
}

/// Copies the container's output, line by line, to the log file with a timestamp and prefix.
struct LogPump {
    file: File,
    prefix: String,
    pipe: File,
    buf: Vec<u8>,
    open: bool,
}

impl LogPump {
    fn new(path: &PathBuf, prefix: &str, pipe: OwnedFd) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(Error::io(format!("opening the log {}", path.display())))?;
        Ok(LogPump {
            file,
            prefix: prefix.to_string(),
            pipe: File::from(pipe),
            buf: Vec::new(),
            open: true,
        })
    }

    /// Reads what is available (call when the pipe is readable) and writes complete lines.
    fn pump(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        match self.pipe.read(&mut chunk) {
            Ok(0) | Err(_) => {
                self.open = false;
                let rest = std::mem::take(&mut self.buf);
                if !rest.is_empty() {
                    self.write_line(&rest);
                }
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=end).collect();
                    self.write_line(&line[..end]);
                }
                if self.buf.len() >= MAX_LINE {
                    let line = std::mem::take(&mut self.buf);
                    self.write_line(&line);
                }
            }
        }
    }

    /// Copies the remaining output until every writer closed the pipe or `deadline` passes.
    fn drain(&mut self, deadline: Instant) {
        while self.open && Instant::now() < deadline {
            let mut fds = [PollFd::new(self.pipe.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout_until(deadline)) {
                Ok(0) => break,
                Ok(_) => self.pump(),
                Err(nix::Error::EINTR) => {}
                Err(_) => break,
            }
        }
        let rest = std::mem::take(&mut self.buf);
        if !rest.is_empty() {
            self.write_line(&rest);
        }
    }

    fn write_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let stamp = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut record = Vec::with_capacity(line.len() + self.prefix.len() + 32);
        record.extend_from_slice(format!("{stamp} {}: ", self.prefix).as_bytes());
        record.extend_from_slice(line);
        record.push(b'\n');
        if let Err(err) = self.file.write_all(&record) {
            tracing::warn!("writing the log: {err}");
        }
    }
}
