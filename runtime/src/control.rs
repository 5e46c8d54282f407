//! The daemon side of the runtime: [`Runtime`] starts shims (forked by the shim launcher for a
//! detached container, `exe shim DIR/<id>` for an attached run), reads their
//! state from the container directory, asks them to stop and removes what they leave. It never
//! clones a container and never mounts anything, so it is safe in the multithreaded daemon.

use std::fs;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::launcher::Launcher;
use crate::{layout, rootfs, terminal, valid_id, ContainerSpec, Error};

/// How long [`Runtime::start`] waits for the shim to report the container running.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Runtime::stop`] waits beyond the grace period for the shim to finish.
const STOP_SLACK: Duration = Duration::from_secs(15);

/// How a container run with [`Runtime::run_attached`] is connected to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// No input; the container's stdout and stderr, and the shim's own errors, in one pipe
    /// (the shim's stdout): builds and release commands, whose output is read as lines.
    Output,
    /// The container's stdin, stdout and stderr are the shim's, each a pipe to the caller (the
    /// shim's own errors also go to stderr).
    Pipes,
    /// A pseudo-terminal of this size in the container's own `/dev/pts` is its stdin, stdout
    /// and stderr; its master comes back in [`Attached::terminal`] (see [`crate::terminal`]).
    /// The shim's errors go to its stderr pipe.
    Terminal(terminal::WindowSize),
}

/// A container run with [`Runtime::run_attached`].
#[derive(Debug)]
pub struct Attached {
    /// The shim, with the pipes [`Io`] asked for; its exit code is the container's.
    pub shim: Child,
    /// With [`Io::Terminal`]: the terminal's master (close-on-exec, blocking). `None` when
    /// the container did not start (its shim says why on stderr and exits with
    /// [`crate::shim::START_FAILED`]).
    pub terminal: Option<OwnedFd>,
}

/// What a container is doing, as its directory tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Running: `pid` is the container's init process (the shim's pid in the few milliseconds
    /// while the shim is still starting it).
    Running { pid: i32 },
    /// Exited with `code` (128+signal if killed; [`crate::shim::START_FAILED`] if it never started;
    /// -1 if its shim died without recording it).
    Exited { code: i32 },
    /// No such container directory.
    Gone,
}

/// Runs containers, each under its own shim, in directories `dir/<id>`.
#[derive(Debug, Clone)]
pub struct Runtime {
    dir: PathBuf,
    exe: PathBuf,
    /// Forks the shims of detached containers ([`crate::launcher`]); started on first use.
    launcher: Arc<Mutex<Option<Launcher>>>,
}

impl Runtime {
    /// `dir` holds one directory per container (e.g. `DATA/containers`); `exe` is the berth
    /// binary, re-executed as `exe shim DIR/<id>`.
    pub fn new(dir: PathBuf, exe: PathBuf) -> Self {
        // Absolute, so the shims' command lines name their directory the same way whatever
        // the working directory of a later daemon.
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Runtime {
            dir,
            exe,
            launcher: Arc::default(),
        }
    }

    /// The directory of container `id`.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Starts a detached shim for `spec` and returns once the container's process runs, or with
    /// the reason it could not start (then its directory is gone again).
    pub fn start(&self, spec: &ContainerSpec) -> Result<(), Error> {
        let dir = self.prepare(spec)?;
        // The shim writes to this pipe once the container runs or could not start, so the
        // start waits on it instead of polling the container's files.
        let (ready, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|err| Error::io("creating the shim's ready pipe")(err.into()))?;
        let launched = self.launch(&dir, &ready_w).and_then(|shim| {
            layout::write(&dir, layout::SHIM_PID, &shim.to_string())
                .inspect_err(|_| {
                    let _ = kill(Pid::from_raw(shim), Signal::SIGKILL);
                })
                .map(|()| shim)
        });
        drop(ready_w);
        let shim = match launched {
            Ok(shim) => shim,
            Err(err) => {
                self.discard(&dir);
                return Err(Error::StartFailed {
                    id: spec.id.clone(),
                    reason: err.to_string(),
                });
            }
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Readable once the shim said so, or at end of file when it died without a word.
            wait_readable(&ready, deadline.saturating_duration_since(Instant::now()));
            if let Some(reason) = layout::read(&dir, layout::ERROR) {
                // It cleans up before it writes the error; let it finish exiting.
                if let Ok(Some(pidfd)) = pidfd_open(shim) {
                    wait_readable(&pidfd, STOP_SLACK);
                }
                self.discard(&dir);
                return Err(Error::StartFailed {
                    id: spec.id.clone(),
                    reason,
                });
            }
            if dir.join(layout::PID).exists() {
                tracing::debug!(id = spec.id, "container started");
                return Ok(());
            }
            if !alive(shim) {
                self.discard(&dir);
                return Err(Error::StartFailed {
                    id: spec.id.clone(),
                    reason: "its shim exited without saying why".into(),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::StartTimeout {
                    id: spec.id.clone(),
                    secs: START_TIMEOUT.as_secs(),
                });
            }
            // Readable but no file yet: the pipe closed before the shim's exit shows; look again.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Has the launcher fork a shim for the container in `dir` (starting the launcher first,
    /// or again if it died); returns the shim's pid.
    fn launch(&self, dir: &Path, ready: &OwnedFd) -> Result<i32, Error> {
        let mut launcher = self.launcher.lock().expect("the shim launcher");
        if let Some(running) = launcher.as_ref() {
            match running.launch(dir, ready) {
                Ok(shim) => return Ok(shim),
                Err(err) => tracing::warn!("the shim launcher failed ({err}); starting it again"),
            }
        }
        *launcher = None;
        let fresh = Launcher::spawn(&self.exe)?;
        let shim = fresh.launch(dir, ready)?;
        *launcher = Some(fresh);
        Ok(shim)
    }

    /// Runs `spec` under a shim connected to the caller as `io` says. The shim's exit code is
    /// the container's. The caller reads what it asked for, waits for the shim and then calls
    /// [`Runtime::remove`].
    pub fn run_attached(&self, spec: &ContainerSpec, io: Io) -> Result<Attached, Error> {
        let dir = self.prepare(spec)?;
        let mut command = self.shim_command(&dir);
        let handover = match io {
            Io::Output => {
                command
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null());
                // SAFETY: dup2 is async-signal-safe; it merges the shim's stderr into its
                // stdout pipe.
                unsafe {
                    command.pre_exec(|| match nix::libc::dup2(1, 2) {
                        -1 => Err(std::io::Error::last_os_error()),
                        _ => Ok(()),
                    });
                }
                None
            }
            Io::Pipes => {
                command
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                None
            }
            Io::Terminal(size) => {
                command
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .env(terminal::TERMINAL_FD_VAR, terminal::TERMINAL_FD.to_string())
                    .env(terminal::TERMINAL_SIZE_VAR, size.to_string());
                let (ours, theirs) = terminal::handover_pair()?;
                let theirs_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
                // SAFETY: dup2 and fcntl are async-signal-safe; the shim gets its end of the
                // handover socket as TERMINAL_FD.
                unsafe {
                    command.pre_exec(move || inherit_as(theirs_fd, terminal::TERMINAL_FD));
                }
                Some((ours, theirs))
            }
        };
        let shim = self.spawn(&mut command, &dir, &spec.id)?;
        let terminal = handover.and_then(|(ours, theirs)| {
            drop(theirs);
            terminal::receive_master(&ours, Instant::now() + START_TIMEOUT)
        });
        Ok(Attached { shim, terminal })
    }

    /// The state of container `id`.
    pub fn state(&self, id: &str) -> State {
        let dir = self.container_dir(id);
        if !valid_id(id) || !dir.is_dir() {
            return State::Gone;
        }
        if let Some(code) = layout::read_i32(&dir, layout::EXIT) {
            return State::Exited { code };
        }
        // Without its shim a container is not supervised (no log, no exit code): one whose
        // shim died (SIGKILL) counts as exited, and `stop` kills what it left running.
        match (shim_pid(&dir), layout::read_i32(&dir, layout::PID)) {
            (Some(_), Some(pid)) if alive(pid) => State::Running { pid },
            (Some(shim), _) => State::Running { pid: shim },
            (None, _) => State::Exited { code: -1 },
        }
    }

    /// Whether the kernel's OOM killer killed a process of container `id` (known once it has
    /// exited, until it is removed).
    pub fn oom_killed(&self, id: &str) -> bool {
        valid_id(id) && self.container_dir(id).join(layout::OOM).exists()
    }

    /// Moves the writable layer (overlay upper dir) of exited container `id` to `to`, with the
    /// container's own ids (`0` for its root, not its range's host id): a build step's new
    /// layer. Call it before [`Runtime::remove`].
    pub fn take_upper(&self, id: &str, to: &Path) -> Result<(), Error> {
        if !valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        let dir = self.container_dir(id);
        let users = read_spec(&dir).and_then(|spec| spec.users);
        rootfs::take_upper(&dir, to, users)
    }

    /// What container `id` uses now (memory, CPU time), from its cgroup.
    pub fn usage(&self, id: &str) -> crate::cgroup::Usage {
        match valid_id(id) {
            true => crate::cgroup::usage(id),
            false => crate::cgroup::Usage::default(),
        }
    }

    /// Stops container `id`: SIGTERM to its shim, which forwards it and sends SIGKILL after the
    /// grace period. Blocks until the shim has cleaned up and exited. Returns the exit code, or
    /// `None` if there is no such container or its code was lost.
    pub fn stop(&self, id: &str) -> Result<Option<i32>, Error> {
        let dir = self.container_dir(id);
        if !valid_id(id) || !dir.is_dir() {
            return Ok(None);
        }
        if let Some(shim) = shim_pid(&dir) {
            let grace = read_spec(&dir).map_or(10, |spec| spec.stop_grace_secs);
            let limit = Duration::from_secs(grace) + STOP_SLACK;
            let pidfd = pidfd_open(shim)?;
            tracing::debug!(id, shim, "stopping container");
            let _ = kill(Pid::from_raw(shim), Signal::SIGTERM);
            if let Some(pidfd) = pidfd {
                wait_readable(&pidfd, limit);
            }
            if shim_pid(&dir).is_some() {
                return Err(Error::StopTimeout {
                    id: id.to_string(),
                    secs: limit.as_secs(),
                });
            }
        } else if layout::read_i32(&dir, layout::EXIT).is_none() {
            // Its shim died and left the container running: kill what is in its cgroup.
            tracing::warn!(
                id,
                "the container's shim is gone; killing what it left running"
            );
            crate::cgroup::kill_cgroup(id, STOP_SLACK);
            layout::write(&dir, layout::EXIT, &(128 + 9).to_string())?;
        }
        Ok(layout::read_i32(&dir, layout::EXIT))
    }

    /// Waits until container `id`'s shim has exited, which it does once the container has
    /// exited and its exit code is recorded (through a pidfd, so it works for shims a previous
    /// daemon started too). Returns at once when no shim runs.
    pub async fn wait_exit(&self, id: &str) -> Result<(), Error> {
        let dir = self.container_dir(id);
        let Some(shim) = valid_id(id).then(|| shim_pid(&dir)).flatten() else {
            return Ok(());
        };
        let Some(pidfd) = pidfd_open(shim)? else {
            return Ok(());
        };
        // SAFETY: the AsyncFd owns the pidfd, so the fd stays open for as long as it is
        // registered and is closed only after it is deregistered on drop.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        }
        .map_err(|err| Error::io(format!("watching the shim of {id}"))(err.into_parts().1))?;
        let _ = fd.readable().await;
        Ok(())
    }

    /// Removes container `id`'s directory, stopping it first if it still runs (also what a
    /// dead shim left running in its cgroup). Succeeds if there is no such container.
    pub fn remove(&self, id: &str) -> Result<(), Error> {
        if !valid_id(id) {
            return Err(Error::InvalidId(id.to_string()));
        }
        let dir = self.container_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        // Running, or left running by a shim that died before recording its exit.
        if shim_pid(&dir).is_some() || layout::read_i32(&dir, layout::EXIT).is_none() {
            self.stop(id)?;
        }
        self.discard(&dir);
        match layout::mounts_under(&dir).into_iter().next() {
            Some(mounted) => Err(Error::StillMounted(mounted)),
            None if dir.exists() => Err(Error::Io {
                context: format!("removing {}", dir.display()),
                source: std::io::Error::other("the directory is still there"),
            }),
            None => Ok(()),
        }
    }

    /// The ids of the containers that have a directory (to re-adopt after a daemon restart).
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.path().is_dir())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        ids
    }

    /// Validates `spec`, creates its directory and writes `shim.json`.
    fn prepare(&self, spec: &ContainerSpec) -> Result<PathBuf, Error> {
        if !valid_id(&spec.id) {
            return Err(Error::InvalidId(spec.id.clone()));
        }
        rootfs::check_layers(&spec.layers)?;
        if spec.init && !Path::new(crate::spec::INIT_BINARY).is_file() {
            return Err(Error::NoInit);
        }
        fs::create_dir_all(&self.dir)
            .map_err(Error::io(format!("creating {}", self.dir.display())))?;
        let dir = self.container_dir(&spec.id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::Exists(spec.id.clone()))
            }
            Err(err) => return Err(Error::io(format!("creating {}", dir.display()))(err)),
        }
        let json = serde_json::to_string_pretty(spec).expect("a ContainerSpec always serializes");
        if let Err(err) = layout::write(&dir, layout::SPEC, &json) {
            self.discard(&dir);
            return Err(err);
        }
        Ok(dir)
    }

    fn shim_command(&self, dir: &Path) -> Command {
        let mut command = Command::new(&self.exe);
        command.arg("shim").arg(dir);
        command
    }

    /// Spawns the shim and records its pid before returning, so a [`Runtime::stop`] that
    /// comes at once (before the shim has run a line of its own) finds it and stops it.
    fn spawn(&self, command: &mut Command, dir: &Path, id: &str) -> Result<Child, Error> {
        let mut child = command.spawn().map_err(|err| {
            self.discard(dir);
            Error::StartFailed {
                id: id.to_string(),
                reason: format!("cannot run the shim {}: {err}", self.exe.display()),
            }
        })?;
        if let Err(err) = layout::write(dir, layout::SHIM_PID, &child.id().to_string()) {
            let _ = child.kill();
            let _ = child.wait();
            self.discard(dir);
            return Err(err);
        }
        Ok(child)
    }

    /// Whether container `id`'s process has started (its shim recorded its pid); true from
    /// then until the container is removed.
    pub fn started(&self, id: &str) -> bool {
        valid_id(id) && self.container_dir(id).join(layout::PID).exists()
    }

    /// Deletes a container directory, unless something is still mounted in it (deleting would
    /// then reach into the mounted filesystem).
    fn discard(&self, dir: &Path) {
        if !layout::mounts_under(dir).is_empty() {
            tracing::warn!(dir = %dir.display(), "not deleting a container directory with mounts");
            return;
        }
        let users = read_spec(dir).is_some_and(|spec| spec.users.is_some());
        rootfs::remove_mount_point(dir, users);
        if let Err(err) = fs::remove_dir_all(dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), "deleting the container directory: {err}");
            }
        }
    }
}

/// Between fork and exec: makes `fd` the child's fd `to`, kept open across exec. (dup2 onto
/// itself would keep its close-on-exec flag, so that case clears the flag instead.)
pub(crate) fn inherit_as(fd: RawFd, to: RawFd) -> std::io::Result<()> {
    // SAFETY: plain fcntl/dup2 calls on fd numbers; async-signal-safe.
    let done = unsafe {
        match fd == to {
            true => nix::libc::fcntl(fd, nix::libc::F_SETFD, 0),
            false => nix::libc::dup2(fd, to),
        }
    };
    match done {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn read_spec(dir: &Path) -> Option<ContainerSpec> {
    serde_json::from_slice(&fs::read(dir.join(layout::SPEC)).ok()?).ok()
}

/// The pid of the live shim of the container in `dir`, checked against its command line so a
/// recycled pid is not mistaken for it.
fn shim_pid(dir: &Path) -> Option<i32> {
    let pid = layout::read_i32(dir, layout::SHIM_PID)?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let same_dir = |arg: &[u8]| {
        let arg = Path::new(std::str::from_utf8(arg).unwrap_or(""));
        arg == dir || fs::canonicalize(arg).ok() == fs::canonicalize(dir).ok()
    };
    let is_shim = args
        .windows(2)
        .any(|pair| pair[0] == b"shim" && same_dir(pair[1]));
    (is_shim && alive(pid)).then_some(pid)
}

/// Whether `pid` runs: exists and is not a zombie (an exited process nobody reaped yet, as the
/// orphans of a killed shim can stay when PID 1 does not reap).
fn alive(pid: i32) -> bool {
    pid > 0
        && fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
}

/// A pidfd for `pid` (readable once it exits); `None` if it already exited.
fn pidfd_open(pid: i32) -> Result<Option<OwnedFd>, Error> {
    // SAFETY: plain syscall; on success it returns a new fd we own.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = nix::Error::last();
        return match err {
            nix::Error::ESRCH => Ok(None),
            err => Err(Error::sys(format!("pidfd_open({pid})"))(err)),
        };
    }
    // SAFETY: fd is a fresh descriptor returned by pidfd_open.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn wait_readable(fd: &OwnedFd, limit: Duration) {
    use std::os::fd::AsFd;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, crate::shim::timeout_until(deadline)) {
            Ok(0) | Err(nix::Error::EINTR) => continue,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombies_are_not_alive() {
        let mut running = Command::new("sleep").arg("30").spawn().unwrap();
        let mut exited = Command::new("true").spawn().unwrap();
        let pid = |c: &Child| c.id() as i32;
        assert!(alive(pid(&running)));
        // `true` exits at once but stays a zombie until it is reaped; wait for that state.
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid(&exited)) {
            assert!(Instant::now() < deadline, "`true` never exited");
            std::thread::yield_now();
        }
        assert!(
            Path::new(&format!("/proc/{}", pid(&exited))).exists(),
            "still a zombie"
        );
        exited.wait().unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
        assert!(!alive(pid(&running)));
        assert!(!alive(0) && !alive(-1));
    }
}
