//! The pseudo-terminal of a container run with one ([`crate::Io::Terminal`]), like `docker run
//! -t`: the pty is made by the container's init inside the container's own `/dev/pts` (so
//! `tty` there prints `/dev/pts/0`), never one of the host's ([`crate::container`]). The init
//! sends the pty's master to the shim over a socket pair; the shim hands it on ([`hand_over`]),
//! over a socket the daemon gave it as fd [`TERMINAL_FD`], to the daemon, which reads and writes
//! it ([`Master`], async) and sets its window size ([`resize`]).
//!
//! Owns that handover, async access to the master and the window size; must not decide what
//! flows through the terminal.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

use crate::Error;

/// When this variable is set, the shim runs its container with a terminal and hands the
/// terminal's master to fd [`TERMINAL_FD`].
pub const TERMINAL_FD_VAR: &str = "BERTH_SHIM_TERMINAL_FD";
pub const TERMINAL_FD: RawFd = 4;
/// The terminal's first size, `ROWSxCOLS`, set before the container's command starts.
pub const TERMINAL_SIZE_VAR: &str = "BERTH_SHIM_TERMINAL_SIZE";

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl std::fmt::Display for WindowSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.rows, self.cols)
    }
}

impl std::str::FromStr for WindowSize {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let (rows, cols) = text.split_once('x').ok_or(())?;
        Ok(WindowSize {
            rows: rows.parse().map_err(|_| ())?,
            cols: cols.parse().map_err(|_| ())?,
        })
    }
}

/// The pair of connected sockets the daemon makes for one terminal run: it keeps the first and
/// gives the second to the shim as [`TERMINAL_FD`]. Both are close-on-exec.
pub(crate) fn handover_pair() -> Result<(OwnedFd, OwnedFd), Error> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(Error::sys("creating the terminal handover socket"))
}

/// Daemon side: waits until `deadline` for the shim to send the terminal's master over
/// `handover`. `None` when the shim closed it without one (the container did not start; its
/// reason is on the shim's stderr) or did not send it in time.
pub(crate) fn receive_master(handover: &OwnedFd, deadline: Instant) -> Option<OwnedFd> {
    loop {
        let mut fds = [PollFd::new(handover.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, crate::shim::timeout_until(deadline)) {
            Ok(0) if Instant::now() >= deadline => {
                tracing::warn!("the shim did not hand over the terminal in time");
                return None;
            }
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => return receive_fd(handover.as_raw_fd()).ok().flatten(),
            Err(err) => {
                tracing::warn!("waiting for the terminal: {err}");
                return None;
            }
        }
    }
}

/// Sets the window size of the terminal whose master is `master` (the container's foreground
/// process gets SIGWINCH).
pub fn resize(master: &impl AsFd, size: WindowSize) -> Result<(), Error> {
    let winsize = nix::libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    let done = unsafe {
        nix::libc::ioctl(
            master.as_fd().as_raw_fd(),
            nix::libc::TIOCSWINSZ,
            &winsize as *const nix::libc::winsize,
        )
    };
    if done == -1 {
        return Err(Error::sys("setting the terminal's window size")(
            nix::Error::last(),
        ));
    }
    Ok(())
}

/// A terminal's master for async code: reads end (`Ok(0)`) once every process of the container
/// has closed the terminal (the kernel says EIO then). Make one per direction with
/// [`Master::try_clone`].
pub struct Master(tokio::io::unix::AsyncFd<OwnedFd>);

impl Master {
    /// Makes `master` non-blocking and registers it with the tokio reactor (call inside a
    /// tokio runtime).
    pub fn new(master: OwnedFd) -> std::io::Result<Master> {
        let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the AsyncFd owns the fd, so it stays open for as long as it is registered
        // and is closed only after it is deregistered on drop.
        let registered = unsafe { tokio::io::unix::AsyncFd::register(master) };
        Ok(Master(registered.map_err(|err| err.into_parts().1)?))
    }

    /// Another handle on the same terminal (a duplicated fd), for the other direction.
    pub fn try_clone(&self) -> std::io::Result<Master> {
        Master::new(self.0.get_ref().try_clone()?)
    }

    /// Sets the terminal's window size.
    pub fn resize(&self, size: WindowSize) -> Result<(), Error> {
        resize(self, size)
    }
}

impl AsFd for Master {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

impl tokio::io::AsyncRead for Master {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // No slave open any more: the end of the container's output.
                Ok(Err(err)) if err.raw_os_error() == Some(nix::libc::EIO) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl tokio::io::AsyncWrite for Master {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Shim side: gives the terminal's `master` (which the container's init sent) its first size
/// ([`TERMINAL_SIZE_VAR`]) and hands it on to the daemon over [`TERMINAL_FD`], which is then
/// closed.
pub(crate) fn hand_over(master: OwnedFd) -> Result<(), Error> {
    let size = std::env::var(TERMINAL_SIZE_VAR).ok();
    if let Some(size) = size.and_then(|size| size.parse().ok()) {
        resize(&master, size)?;
    }
    // SAFETY: the daemon handed this fd over for exactly this; it is closed here once.
    let daemon = unsafe { OwnedFd::from_raw_fd(TERMINAL_FD) };
    let iov = [IoSlice::new(b"t")];
    let fds = [master.as_raw_fd()];
    sendmsg::<()>(
        daemon.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(Error::sys("handing the terminal to the daemon"))?;
    Ok(())
}

/// Receives one message on `socket` and the first fd passed with it (close-on-exec).
pub(crate) fn receive_fd(socket: RawFd) -> Result<Option<OwnedFd>, nix::Error> {
    let mut byte = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this fd in our table for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if received.is_none() {
                    received = Some(owned);
                }
            }
        }
    }
    Ok(received)
}
