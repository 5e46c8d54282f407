//! The shim launcher: one small single-threaded process per [`crate::Runtime`] (`berth
//! shim-launcher`, spawned on the first detached start) that forks the shim of every
//! container the daemon starts detached. Forked, not executed: each shim shares the
//! launcher's pages copy-on-write (the binary's relocated data, the libraries, the startup
//! heap), so a shim costs little more than its own stack and heap, as a small C shim such as
//! conmon does, and starts without loading the binary again.
//!
//! The daemon and the launcher talk over a socket pair (`SOCK_SEQPACKET`, the launcher's end
//! as fd [`LAUNCHER_FD`]): the daemon sends a container directory with the shim's ready pipe
//! ([`crate::shim::READY_FD_VAR`]) attached; the launcher forks, and answers with the shim's
//! pid (4 bytes, little-endian). The shim's command line reads `EXE shim DIR`, as an executed
//! one's does, so it is found the same way: the launcher runs with an argument of spaces that
//! each shim overwrites with its own. The launcher ignores `SIGCHLD` (the kernel reaps
//! its exited shims) and exits when the daemon's end closes; its shims live on.
//!
//! Owns the launcher process and that exchange; the shim itself is [`crate::shim`].

use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::Error;

/// The launcher's end of its socket.
pub const LAUNCHER_FD: RawFd = 3;

/// Longest container directory path a request carries.
const MAX_DIR: usize = 4096;

/// Runs the launcher (`berth shim-launcher`): forks `shim` for each request until the daemon
/// goes away; returns the exit code.
pub fn main(shim: fn(&Path) -> i32) -> i32 {
    // SAFETY: SIG_IGN for SIGCHLD: exited children are reaped by the kernel; no handler code.
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.is_err() {
        return 1;
    }
    // Read before a shim writes its command line over the arguments.
    let exe = std::env::args_os().next().unwrap_or_default();
    // SAFETY: fd LAUNCHER_FD was handed over by the daemon for this loop alone.
    let socket = unsafe { OwnedFd::from_raw_fd(LAUNCHER_FD) };
    let mut buf = vec![0u8; MAX_DIR];
    loop {
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let (len, ready) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(nix::Error::EINTR) => continue,
                Err(_) => return 1,
            };
            let mut ready = None;
            for cmsg in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    for fd in fds {
                        // SAFETY: the kernel just installed this fd for us.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        ready.get_or_insert(fd);
                    }
                }
            }
            (msg.bytes, ready)
        };
        if len == 0 {
            return 0; // The daemon closed its end.
        }
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&buf[..len]));
        let pid = match (ready, unsafe { nix::unistd::fork() }) {
            (Some(ready), Ok(nix::unistd::ForkResult::Child)) => {
                drop(socket);
                // SAFETY: the single-threaded child of a fork; it becomes the shim and exits.
                unsafe { nix::libc::_exit(become_shim(&exe, &dir, ready, shim)) }
            }
            (_, Ok(nix::unistd::ForkResult::Parent { child })) => child.as_raw() as u32,
            _ => 0,
        };
        let _ = sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&pid.to_le_bytes())],
            &[],
            MsgFlags::empty(),
            None,
        );
    }
}

/// In the forked child: the shim's process state (own session, default SIGCHLD, the ready
/// pipe as its fd, its command line), then the shim.
fn become_shim(exe: &std::ffi::OsStr, dir: &Path, ready: OwnedFd, shim: fn(&Path) -> i32) -> i32 {
    // SAFETY: restores the default disposition; no handler code.
    let _ = unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) };
    let _ = nix::unistd::setsid();
    // SAFETY: dup2 onto the ready pipe's agreed number, kept across nothing (no exec follows).
    if unsafe { nix::libc::dup2(ready.as_raw_fd(), crate::shim::READY_FD) } < 0 {
        return crate::shim::START_FAILED;
    }
    drop(ready);
    std::env::set_var(crate::shim::READY_FD_VAR, crate::shim::READY_FD.to_string());
    set_command_line(&[exe, "shim".as_ref(), dir.as_os_str()]);
    shim(dir)
}

/// Room for a shim's command line: the launcher is started with an argument of this many
/// spaces, and each shim writes its own command line over the launcher's.
const TITLE_ROOM: usize = 4096;

/// Makes `/proc/self/cmdline` read `args` (NUL-separated), as if the process was executed
/// with them, by writing them over the launcher's own arguments (which [`TITLE_ROOM`] made long
/// enough). Best effort: left as it is if they do not fit.
fn set_command_line(args: &[&std::ffi::OsStr]) {
    let Some((start, end)) = argument_area() else {
        return;
    };
    let mut line = Vec::new();
    for arg in args {
        line.extend_from_slice(arg.as_bytes());
        line.push(0);
    }
    if line.len() > end - start {
        return;
    }
    line.resize(end - start, 0);
    // SAFETY: [start, end) is this process's argument strings, which the kernel placed in
    // writable memory at exec and nothing reads any more (std::env::args was read before).
    unsafe { std::ptr::copy_nonoverlapping(line.as_ptr(), start as *mut u8, line.len()) };
}

/// Where this process's argument strings are (`arg_start`, `arg_end` of `/proc/self/stat`).
fn argument_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start with field 3.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<usize>().ok();
    let (start, end) = (field(48)?, field(49)?);
    (start < end).then_some((start, end))
}

/// The daemon's side: a running launcher and its socket.
#[derive(Debug)]
pub(crate) struct Launcher {
    socket: OwnedFd,
    process: Child,
}

impl Launcher {
    /// Starts `exe shim-launcher` (its stdio null, the socket as [`LAUNCHER_FD`]).
    pub(crate) fn spawn(exe: &Path) -> Result<Self, Error> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(Error::sys("creating the shim launcher's socket"))?;
        let theirs_fd = theirs.as_raw_fd();
        let mut command = Command::new(exe);
        command
            .arg("shim-launcher")
            .arg(" ".repeat(TITLE_ROOM))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: dup2/fcntl are async-signal-safe; the launcher gets its end as LAUNCHER_FD.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                crate::control::inherit_as(theirs_fd, LAUNCHER_FD)
            });
        }
        let process = command.spawn().map_err(|err| Error::StartFailed {
            id: "(shim launcher)".into(),
            reason: format!("cannot run {} shim-launcher: {err}", exe.display()),
        })?;
        Ok(Launcher {
            socket: ours,
            process,
        })
    }

    /// Has a shim forked for the container in `dir`, with `ready` as its ready pipe; returns
    /// the shim's pid.
    pub(crate) fn launch(&self, dir: &Path, ready: &OwnedFd) -> Result<i32, Error> {
        let failed = |err: nix::Error| Error::sys("asking the shim launcher for a shim")(err);
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidId(dir.display().to_string()))?;
        let fds = [ready.as_raw_fd()];
        sendmsg::<()>(
            self.socket.as_raw_fd(),
            &[IoSlice::new(path.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(failed)?;
        let mut answer = [0u8; 4];
        let got = nix::sys::socket::recv(self.socket.as_raw_fd(), &mut answer, MsgFlags::empty())
            .map_err(failed)?;
        match (got, u32::from_le_bytes(answer)) {
            (4, pid) if pid > 0 => Ok(pid as i32),
            (0, _) => Err(failed(nix::Error::EPIPE)),
            _ => Err(failed(nix::Error::EAGAIN)),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // The launcher exits at the end of its input; reap it.
        let _ =
            nix::sys::socket::shutdown(self.socket.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.process.wait();
    }
}
