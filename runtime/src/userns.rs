//! A user namespace with a given id mapping, held by nothing but a file descriptor: what an
//! id-mapped mount ([`crate::rootfs`]) is made with. Only a process can own a new user
//! namespace, and only a single-threaded one may unshare it, so a short-lived child of the
//! shim unshares it, the shim writes its `uid_map` and `gid_map` and opens its `ns/user`, and
//! the child exits. Only for the single-threaded shim (it forks). Touches nothing on disk.

use std::fs::File;
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::unistd::{fork, ForkResult};

use crate::{Error, IdMap};

/// A user namespace in which `0..map.size` are the host's `map.host_id..`.
pub fn with_map(map: IdMap) -> Result<OwnedFd, Error> {
    let (ready_r, ready_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::sys("creating a pipe"))?;
    let (done_r, done_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::sys("creating a pipe"))?;
    // SAFETY: the shim is single-threaded; the child only makes raw syscalls and `_exit`s.
    match unsafe { fork() }.map_err(Error::sys("forking the user namespace helper"))? {
        ForkResult::Child => {
            drop((ready_r, done_w));
            let made = nix::sched::unshare(CloneFlags::CLONE_NEWUSER).is_ok()
                && nix::unistd::write(&ready_w, b"1") == Ok(1);
            if made {
                // Until the shim has opened the namespace (it closes its end: end of file).
                let _ = nix::unistd::read(&done_r, &mut [0u8; 1]);
            }
            // SAFETY: leaves the forked child without running the parent's exit handlers.
            unsafe { nix::libc::_exit(i32::from(!made)) }
        }
        ForkResult::Parent { child } => {
            drop((ready_w, done_r));
            let opened = (|| {
                let read = nix::unistd::read(&ready_r, &mut [0u8; 1])
                    .map_err(Error::sys("waiting for the user namespace helper"))?;
                if read != 1 {
                    return Err(Error::Sys {
                        context: "creating a user namespace (is user.max_user_namespaces 0?)"
                            .into(),
                        source: nix::Error::EPERM,
                    });
                }
                let line = format!("0 {} {}\n", map.host_id, map.size);
                for file in ["uid_map", "gid_map"] {
                    let path = format!("/proc/{child}/{file}");
                    std::fs::write(&path, &line).map_err(Error::io(format!("writing {path}")))?;
                }
                let path = format!("/proc/{child}/ns/user");
                let ns = File::open(&path).map_err(Error::io(format!("opening {path}")))?;
                Ok(OwnedFd::from(ns))
            })();
            drop(done_w);
            let _ = nix::sys::wait::waitpid(child, None);
            opened
        }
    }
}
