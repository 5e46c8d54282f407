//! Starts a container from its OCI config: berth's own runtime core, doing what runc, crun or
//! youki do for the part of the config [`crate::spec`] writes. Runs only in the
//! single-threaded shim (it clones).
//!
//! The shim creates the cgroup ([`crate::cgroup`]) and clones the container's init straight
//! into new pid, mount, uts and ipc namespaces (and a user namespace when the config maps ids;
//! the network namespace is the shim's, joined before). The init waits until the shim has
//! written its id maps and put it in the cgroup, enters a cgroup namespace, mounts what the
//! config lists under the rootfs (every destination resolved inside the rootfs, never
//! following a link out of it), binds the few device nodes a container needs, masks and
//! write-protects the kernel's paths, pivots into the rootfs, takes its terminal or its output
//! pipe as stdio, sets its limits, user, capabilities, `no_new_privs` and seccomp filter and
//! execs the command. A pipe that closes on exec tells the shim it started, or carries why it
//! did not. No intermediate process, no state files: the shim is the container's parent and
//! supervisor.
//!
//! Owns the container's namespaces and mounts; must not touch the host's (everything it mounts
//! is in the container's own mount namespace).

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::libc;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid, Uid};
use oci_spec::runtime::{LinuxNamespaceType, Mount, PosixRlimitType, Spec};

use crate::cgroup::{self, Cgroup};
use crate::Error;

/// The device nodes bound from the host into every container's `/dev`, with the devices
/// cgroup rule (v1) that lets it use them; plus the pty master and the container's own ptys.
const DEVICES: [(&str, &str); 6] = [
    ("null", "c 1:3 rwm"),
    ("zero", "c 1:5 rwm"),
    ("full", "c 1:7 rwm"),
    ("random", "c 1:8 rwm"),
    ("urandom", "c 1:9 rwm"),
    ("tty", "c 5:0 rwm"),
];
const PTY_RULES: [&str; 2] = ["c 5:2 rwm", "c 136:* rwm"];

/// The links every container's `/dev` has.
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// A started container: its init's pid and, when asked for, its terminal's master.
pub struct Started {
    pub pid: Pid,
    pub terminal: Option<OwnedFd>,
}

/// Creates container `id`'s cgroup and starts its init as `oci` says, with `out` as its
/// stdout and stderr (else the shim's), or with a terminal of its own (`terminal`), and the
/// seccomp filter when `seccomp`. Returns once the command was exec'd; on failure nothing of
/// the container is left but the rootfs mount (the caller's).
pub fn start(
    oci: &Spec,
    id: &str,
    out: Option<OwnedFd>,
    terminal: bool,
    seccomp: bool,
) -> Result<Started, Error> {
    let linux = oci
        .linux()
        .as_ref()
        .ok_or_else(|| invalid("no linux section"))?;
    let mut rules: Vec<&str> = DEVICES.iter().map(|(_, rule)| *rule).collect();
    rules.extend(PTY_RULES);
    let cgroup = cgroup::create(id, linux.resources().as_ref(), &rules)?;
    let started =
        Plan::new(oci, &cgroup, seccomp).and_then(|plan| plan.launch(&cgroup, out, terminal));
    if started.is_err() {
        cgroup::remove(id, std::time::Duration::from_secs(1));
    }
    started
}

/// Removes what is left of a container whose init has exited: its cgroup.
pub fn delete(id: &str) {
    cgroup::remove(id, std::time::Duration::from_secs(2));
}

fn invalid(what: &str) -> Error {
    Error::Spec(what.to_string())
}

/// Everything the init needs, prepared in the shim before the clone (so the init allocates
/// little and fails only on what it does).
struct Plan<'a> {
    oci: &'a Spec,
    root: PathBuf,
    /// The uid and gid maps of the container's user namespace, when it has one.
    maps: Option<(String, String)>,
    args: Vec<CString>,
    env: Vec<CString>,
    path_var: String,
    uid: u32,
    gid: u32,
    groups: Vec<Gid>,
    cwd: PathBuf,
    cgroup_views: Vec<(String, PathBuf)>,
    filter: Option<libseccomp::ScmpFilterContext>,
}

impl<'a> Plan<'a> {
    fn new(oci: &'a Spec, cgroup: &Cgroup, seccomp: bool) -> Result<Self, Error> {
        let linux = oci
            .linux()
            .as_ref()
            .ok_or_else(|| invalid("no linux section"))?;
        let process = oci
            .process()
            .as_ref()
            .ok_or_else(|| invalid("no process"))?;
        let root = oci
            .root()
            .as_ref()
            .ok_or_else(|| invalid("no root"))?
            .path()
            .clone();
        let namespaces = linux.namespaces().clone().unwrap_or_default();
        let userns = namespaces
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::User);
        let line = |maps: &Option<Vec<oci_spec::runtime::LinuxIdMapping>>| {
            maps.iter()
                .flatten()
                .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
                .collect::<String>()
        };
        let maps = userns.then(|| (line(linux.uid_mappings()), line(linux.gid_mappings())));
        let cstrings = |items: &[String]| {
            items
                .iter()
                .map(|item| {
                    CString::new(item.as_str()).map_err(|_| invalid("a NUL byte in args or env"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let args = cstrings(process.args().as_deref().unwrap_or_default())?;
        if args.is_empty() {
            return Err(invalid("no command"));
        }
        let env_list = process.env().clone().unwrap_or_default();
        let path_var = env_list
            .iter()
            .find_map(|var| var.strip_prefix("PATH="))
            .unwrap_or("")
            .to_string();
        let filter = match (seccomp, linux.seccomp()) {
            (true, Some(profile)) => Some(crate::seccomp::compile(profile)?),
            _ => None,
        };
        let user = process.user();
        Ok(Plan {
            oci,
            root,
            maps,
            args,
            env: cstrings(&env_list)?,
            path_var,
            uid: user.uid(),
            gid: user.gid(),
            groups: user
                .additional_gids()
                .iter()
                .flatten()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            cwd: process.cwd().clone(),
            cgroup_views: cgroup.views(),
            filter,
        })
    }

    /// Clones the init, lets it go once its ids and cgroup are set, and waits for its exec.
    fn launch(
        &self,
        cgroup: &Cgroup,
        out: Option<OwnedFd>,
        terminal: bool,
    ) -> Result<Started, Error> {
        let (go_read, go_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::sys("creating a pipe"))?;
        let (status_read, status_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(Error::sys("creating a pipe"))?;
        let console = match terminal {
            true => Some(
                socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )
                .map_err(Error::sys("creating the terminal socket"))?,
            ),
            false => None,
        };
        let mut flags = CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC;
        if self.maps.is_some() {
            flags |= CloneFlags::CLONE_NEWUSER;
        }
        match clone(flags).map_err(Error::sys("creating the container's init"))? {
            None => {
                drop((go_write, status_read));
                let console = console.map(|(_, theirs)| theirs);
                let Err(reason) = self.init(go_read, out, console);
                let _ = nix::unistd::write(&status_write, reason.as_bytes());
                // SAFETY: leaves the cloned child without running the shim's exit handlers.
                unsafe { libc::_exit(crate::shim::START_FAILED) }
            }
            Some(pid) => {
                drop((go_read, status_write, out));
                let console = console.map(|(ours, _)| ours);
                match self.release(pid, cgroup, go_write, status_read, console) {
                    Ok(terminal) => Ok(Started { pid, terminal }),
                    Err(err) => {
                        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                        let _ = nix::sys::wait::waitpid(pid, None);
                        Err(err)
                    }
                }
            }
        }
    }

    /// Shim side: id maps, cgroup, go; then the init's word (nothing: it exec'd).
    fn release(
        &self,
        pid: Pid,
        cgroup: &Cgroup,
        go: OwnedFd,
        status: OwnedFd,
        console: Option<OwnedFd>,
    ) -> Result<Option<OwnedFd>, Error> {
        if let Some((uids, gids)) = &self.maps {
            for (file, map) in [("uid_map", uids), ("gid_map", gids)] {
                let path = format!("/proc/{pid}/{file}");
                std::fs::write(&path, map).map_err(Error::io(format!("writing {path}")))?;
            }
        }
        cgroup.join(pid.as_raw())?;
        nix::unistd::write(&go, b"1").map_err(Error::sys("releasing the container's init"))?;
        drop(go);
        let wanted = console.is_some();
        let terminal = match console {
            Some(console) => crate::terminal::receive_fd(console.as_raw_fd())
                .map_err(Error::sys("receiving the container's terminal"))?,
            None => None,
        };
        let mut reason = String::new();
        let _ = std::fs::File::from(status)
            .take(64 * 1024)
            .read_to_string(&mut reason);
        if !reason.is_empty() {
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(Error::Init(reason));
        }
        if wanted && terminal.is_none() {
            return Err(Error::Init("the container's init sent no terminal".into()));
        }
        Ok(terminal)
    }

    /// The init: sets the container up and execs its command; returns only why it could not.
    fn init(
        &self,
        go: OwnedFd,
        out: Option<OwnedFd>,
        console: Option<OwnedFd>,
    ) -> Result<Infallible, String> {
        let mut byte = [0u8; 1];
        if nix::unistd::read(&go, &mut byte) != Ok(1) {
            return Err("the shim went away before the container started".into());
        }
        drop(go);
        let step = |what: &'static str| move |err: nix::Error| format!("{what}: {err}");
        if self.maps.is_some() {
            // Still the host's root, unmapped in the new namespace: become its mapped root.
            let root = (Uid::from_raw(0), Gid::from_raw(0));
            nix::unistd::setresgid(root.1, root.1, root.1)
                .map_err(step("becoming the namespace's root group"))?;
            nix::unistd::setresuid(root.0, root.0, root.0)
                .map_err(step("becoming the namespace's root"))?;
        }
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(step("entering a cgroup namespace"))?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(step("making the mounts private"))?;
        // A mount of its own for the new root: the copies of the shim's mounts are locked in a
        // user namespace, and pivot_root refuses a locked one.
        mount(
            Some(&self.root),
            &self.root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(step("binding the rootfs"))?;
        let root = nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| format!("opening the rootfs {}: {err}", self.root.display()))?;
        for m in self.oci.mounts().iter().flatten() {
            self.mount(&root, m)
                .map_err(|err| format!("mounting {}: {err}", m.destination().display()))?;
        }
        dev(&root)?;
        let linux = self.oci.linux().as_ref().ok_or("no linux section")?;
        for path in linux.masked_paths().iter().flatten() {
            mask(&root, Path::new(path)).map_err(|err| format!("masking {path}: {err}"))?;
        }
        for path in linux.readonly_paths().iter().flatten() {
            protect(&root, Path::new(path))
                .map_err(|err| format!("making {path} read-only: {err}"))?;
        }
        if let Some(name) = self.oci.hostname() {
            nix::unistd::sethostname(name).map_err(step("setting the hostname"))?;
        }
        nix::unistd::fchdir(&root).map_err(step("entering the rootfs"))?;
        nix::unistd::pivot_root(".", ".").map_err(step("pivoting into the rootfs"))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(step("detaching the host's root"))?;
        nix::unistd::chdir("/").map_err(step("entering /"))?;
        drop(root);

        nix::unistd::setsid().map_err(step("starting a session"))?;
        match console {
            Some(console) => self.take_terminal(&console)?,
            None => {
                if let Some(out) = out {
                    for fd in [1, 2] {
                        dup_to(&out, fd).map_err(step("wiring the output"))?;
                    }
                }
            }
        }
        let process = self.oci.process().as_ref().ok_or("no process")?;
        for limit in process.rlimits().iter().flatten() {
            set_rlimit(limit.typ(), limit.soft(), limit.hard())?;
        }
        std::fs::create_dir_all(&self.cwd).map_err(|err| {
            format!(
                "creating the working directory {}: {err}",
                self.cwd.display()
            )
        })?;
        self.become_user(process)?;
        nix::unistd::chdir(&self.cwd).map_err(|err| {
            format!(
                "entering the working directory {}: {err}",
                self.cwd.display()
            )
        })?;
        if process.no_new_privileges() == Some(true) {
            nix::sys::prctl::set_no_new_privs().map_err(step("setting no_new_privs"))?;
        }
        let program = self.program()?;
        let env = self.env_with_home();
        default_signals().map_err(step("resetting signal handling"))?;
        // SAFETY: marks every fd from 3 up close-on-exec; only raw syscall arguments.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if let Some(filter) = &self.filter {
            filter
                .load()
                .map_err(|err| format!("loading the seccomp filter: {err}"))?;
        }
        let err = nix::unistd::execve(&program, &self.args, &env).unwrap_err();
        Err(format!("executing {}: {err}", program.to_string_lossy()))
    }

    /// One mount of the config, at its destination inside the rootfs.
    fn mount(&self, root: &OwnedFd, m: &Mount) -> Result<(), String> {
        let kind = m.typ().as_deref().unwrap_or("bind");
        let (flags, data) = options(m.options().as_deref().unwrap_or_default());
        let bind = kind == "bind" || flags.contains(MsFlags::MS_BIND);
        let source = m.source().clone().unwrap_or_else(|| PathBuf::from(kind));
        if kind == "cgroup" || kind == "cgroup2" {
            return self.mount_cgroups(root, m.destination());
        }
        let is_dir = !bind
            || std::fs::metadata(&source)
                .map(|meta| meta.is_dir())
                .unwrap_or(true);
        let target = ensure(root, m.destination(), is_dir)?;
        let at = fd_path(&target);
        if bind {
            let recursive = flags & MsFlags::MS_REC;
            mount(
                Some(&source),
                at.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | recursive,
                None::<&str>,
            )
            .map_err(|err| format!("binding {}: {err}", source.display()))?;
            let extra = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
            if !extra.is_empty() {
                remount(root, m.destination(), extra)?;
            }
            return Ok(());
        }
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(Some(&source), at.as_str(), Some(kind), flags, data).map_err(|err| err.to_string())
    }

    /// The container's own cgroup, read-only, at `dest`: on v2 its directory, on v1 a tmpfs
    /// with each hierarchy's directory bound under the hierarchy's name.
    fn mount_cgroups(&self, root: &OwnedFd, dest: &Path) -> Result<(), String> {
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let target = ensure(root, dest, true)?;
        let at = fd_path(&target);
        if let [(name, dir)] = &self.cgroup_views[..] {
            if name.is_empty() {
                mount(
                    Some(dir),
                    at.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| e.to_string())?;
                return remount(root, dest, flags | MsFlags::MS_RDONLY);
            }
        }
        mount(
            Some("tmpfs"),
            at.as_str(),
            Some("tmpfs"),
            flags,
            Some("mode=755"),
        )
        .map_err(|e| e.to_string())?;
        for (name, dir) in &self.cgroup_views {
            let view = dest.join(name);
            let point = ensure(root, &view, true)?;
            mount(
                Some(dir),
                fd_path(&point).as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| e.to_string())?;
            remount(root, &view, flags | MsFlags::MS_RDONLY)?;
        }
        remount(root, dest, flags | MsFlags::MS_RDONLY)
    }

    /// A pty from the container's own devpts as its controlling terminal and stdio; the master
    /// goes to the shim over `console`.
    fn take_terminal(&self, console: &OwnedFd) -> Result<(), String> {
        let master = nix::fcntl::open(
            "/dev/ptmx",
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| format!("opening /dev/ptmx: {err}"))?;
        // SAFETY: ioctls on an fd we own; TIOCSPTLCK takes a pointer to an int, TIOCGPTPEER
        // returns a new fd for the pty's other end.
        let peer = unsafe {
            let unlock: libc::c_int = 0;
            libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock);
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCGPTPEER,
                libc::O_RDWR | libc::O_NOCTTY,
            )
        };
        if peer < 0 {
            return Err(format!("opening the terminal: {}", nix::Error::last()));
        }
        // SAFETY: the ioctl just returned this new fd.
        let peer = unsafe { OwnedFd::from_raw_fd(peer) };
        nix::unistd::fchown(
            &peer,
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
        )
        .map_err(|err| format!("handing the terminal to the container's user: {err}"))?;
        // SAFETY: makes the pty this session's controlling terminal.
        if unsafe { libc::ioctl(peer.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!("taking the terminal: {}", nix::Error::last()));
        }
        for fd in [0, 1, 2] {
            dup_to(&peer, fd).map_err(|err| format!("wiring the terminal: {err}"))?;
        }
        let fds = [master.as_raw_fd()];
        sendmsg::<()>(
            console.as_raw_fd(),
            &[IoSlice::new(b"t")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|err| format!("handing the terminal to the shim: {err}"))?;
        Ok(())
    }

    /// Supplementary groups, gid, uid; then the capability sets of the config.
    fn become_user(&self, process: &oci_spec::runtime::Process) -> Result<(), String> {
        let step = |what: &'static str| move |err: nix::Error| format!("{what}: {err}");
        let caps = process.capabilities().as_ref();
        let set = |which: Option<&std::collections::HashSet<oci_spec::runtime::Capability>>| -> Result<caps::CapsHashSet, String> {
            which
                .into_iter()
                .flatten()
                .map(|cap| format!("CAP_{cap}").parse::<caps::Capability>().map_err(|err| format!("capability {cap}: {err}")))
                .collect()
        };
        let bounding = set(caps.and_then(|c| c.bounding().as_ref()))?;
        for cap in caps::all() {
            if !bounding.contains(&cap) {
                caps::drop(None, caps::CapSet::Bounding, cap)
                    .map_err(|err| format!("dropping {cap}: {err}"))?;
            }
        }
        nix::unistd::setgroups(&self.groups).map_err(step("setting the supplementary groups"))?;
        nix::sys::prctl::set_keepcaps(true).map_err(step("keeping capabilities"))?;
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        nix::unistd::setresgid(gid, gid, gid).map_err(step("setting the group"))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(step("setting the user"))?;
        nix::sys::prctl::set_keepcaps(false).map_err(step("keeping capabilities"))?;
        // Effective first: each set must stay within the permitted one as it shrinks.
        for (which, cset) in [
            (
                caps.and_then(|c| c.effective().as_ref()),
                caps::CapSet::Effective,
            ),
            (
                caps.and_then(|c| c.permitted().as_ref()),
                caps::CapSet::Permitted,
            ),
            (
                caps.and_then(|c| c.inheritable().as_ref()),
                caps::CapSet::Inheritable,
            ),
        ] {
            caps::set(None, cset, &set(which)?)
                .map_err(|err| format!("setting capabilities: {err}"))?;
        }
        caps::clear(None, caps::CapSet::Ambient)
            .map_err(|err| format!("clearing ambient capabilities: {err}"))
    }

    /// The environment, with `HOME` from the container's `/etc/passwd` (else `/`) when the
    /// config sets none, as Docker does.
    fn env_with_home(&self) -> Vec<CString> {
        let mut env = self.env.clone();
        if env.iter().any(|var| var.as_bytes().starts_with(b"HOME=")) {
            return env;
        }
        let mut passwd = String::new();
        if let Ok(file) = std::fs::File::open("/etc/passwd") {
            let _ = file.take(1 << 20).read_to_string(&mut passwd);
        }
        let uid = self.uid.to_string();
        let home = passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.len() >= 6 && fields[2] == uid)
            .map(|fields| fields[5].to_string())
            .filter(|home| !home.is_empty())
            .unwrap_or_else(|| "/".into());
        env.extend(CString::new(format!("HOME={home}")).ok());
        env
    }

    /// The command's program: a path, or the first executable of that name in `PATH`.
    fn program(&self) -> Result<CString, String> {
        let name = self.args[0].to_string_lossy().into_owned();
        if name.contains('/') {
            return Ok(self.args[0].clone());
        }
        for dir in self.path_var.split(':').filter(|d| !d.is_empty()) {
            let candidate = Path::new(dir).join(&name);
            let executable = nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK)
                .is_ok()
                && std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
            if executable {
                return CString::new(candidate.as_os_str().as_bytes())
                    .map_err(|_| "a NUL byte in PATH".into());
            }
        }
        Err(format!(
            "executable `{name}` not found in PATH ({}): check the command and the image",
            self.path_var
        ))
    }
}

/// Turns mount options into flags and the filesystem's own data string.
fn options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let flag = match option.as_str() {
            "ro" => MsFlags::MS_RDONLY,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "bind" => MsFlags::MS_BIND,
            "rbind" => MsFlags::MS_BIND | MsFlags::MS_REC,
            "rw" | "suid" | "dev" | "exec" | "private" | "rprivate" => MsFlags::empty(),
            other => {
                data.push(other.to_string());
                MsFlags::empty()
            }
        };
        flags |= flag;
    }
    (flags, data.join(","))
}

/// Remounts the mount at `path` (inside `root`; resolved again, as an fd opened before the
/// mount shows what was under it) with `flags`, keeping the flags the kernel locks (a user
/// namespace may not clear them).
fn remount(root: &OwnedFd, path: &Path, flags: MsFlags) -> Result<(), String> {
    let target = open_in(root, path)?;
    let at = fd_path(&target);
    let at = at.as_str();
    let locked =
        nix::sys::statvfs::statvfs(at).map_err(|err| format!("reading the mount flags: {err}"))?;
    use nix::sys::statvfs::FsFlags;
    let mut keep = MsFlags::empty();
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if locked.flags().contains(fs) {
            keep |= ms;
        }
    }
    mount(
        None::<&str>,
        at,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags | keep,
        None::<&str>,
    )
    .map_err(|err| format!("remounting: {err}"))
}

/// `/proc/self/fd/N` of `fd`: how a mount reaches a destination resolved safely.
fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens `path` inside `root` (resolved as if `root` were `/`: no link leads out of it),
/// creating what is missing: directories, and for the last part a directory or an empty file.
fn ensure(root: &OwnedFd, path: &Path, dir: bool) -> Result<OwnedFd, String> {
    let parts: Vec<&std::ffi::OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect();
    if let Ok(found) = open_in(root, path) {
        return Ok(found);
    }
    // Each prefix is resolved from `root` again (a link in it leads inside the rootfs, not
    // beside its parent); what is missing is made in the parent just opened.
    let mut at = PathBuf::from(".");
    let mut parent = open_in(root, &at)?;
    for (n, part) in parts.iter().enumerate() {
        at.push(part);
        if let Ok(found) = open_in(root, &at) {
            parent = found;
            continue;
        }
        let last = n + 1 == parts.len();
        let made = match !last || dir {
            true => nix::sys::stat::mkdirat(&parent, *part, Mode::from_bits_truncate(0o755)),
            false => nix::fcntl::openat(
                &parent,
                *part,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NOFOLLOW,
                Mode::from_bits_truncate(0o644),
            )
            .map(drop),
        };
        made.map_err(|err| format!("creating {}: {err}", at.display()))?;
        parent = open_in(root, &at)?;
    }
    Ok(parent)
}

/// An `O_PATH` fd of `path` resolved inside `root`.
fn open_in(root: &OwnedFd, path: &Path) -> Result<OwnedFd, String> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(root, path, how).map_err(|err| format!("{}: {err}", path.display()))
}

/// The device nodes and links of `/dev` (a tmpfs the config mounted).
fn dev(root: &OwnedFd) -> Result<(), String> {
    for (name, _) in DEVICES {
        let node = ensure(root, &Path::new("dev").join(name), false)?;
        let host = format!("/dev/{name}");
        mount(
            Some(host.as_str()),
            fd_path(&node).as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|err| format!("binding {host}: {err}"))?;
    }
    let dev = open_in(root, Path::new("dev"))?;
    let dev = nix::fcntl::openat(
        &dev,
        ".",
        OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| format!("opening /dev: {err}"))?;
    for (name, target) in DEV_LINKS {
        match nix::unistd::symlinkat(target, &dev, name) {
            Ok(()) | Err(nix::Error::EEXIST) => {}
            Err(err) => return Err(format!("linking /dev/{name}: {err}")),
        }
    }
    Ok(())
}

/// Hides `path` (if it exists): an empty read-only tmpfs over a directory, `/dev/null` over a
/// file.
fn mask(root: &OwnedFd, path: &Path) -> Result<(), String> {
    let Ok(target) = open_in(root, path) else {
        return Ok(());
    };
    let at = fd_path(&target);
    let is_dir =
        nix::sys::stat::fstat(&target).map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
    match is_dir {
        Ok(true) => mount(
            Some("tmpfs"),
            at.as_str(),
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        ),
        _ => mount(
            Some("/dev/null"),
            at.as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ),
    }
    .map_err(|err| err.to_string())
}

/// Makes `path` (if it exists) read-only.
fn protect(root: &OwnedFd, path: &Path) -> Result<(), String> {
    let Ok(target) = open_in(root, path) else {
        return Ok(());
    };
    let at = fd_path(&target);
    mount(
        Some(at.as_str()),
        at.as_str(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|err| err.to_string())?;
    remount(
        root,
        path,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
}

/// Default handling for every signal and none blocked, whatever the shim set (Rust ignores
/// SIGPIPE, and an ignored signal stays ignored across exec).
fn default_signals() -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installs the default disposition, no handler code.
        unsafe { sigaction(signal, &default) }?;
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

fn dup_to(fd: &OwnedFd, to: RawFd) -> nix::Result<()> {
    // SAFETY: dup2 onto a standard stream number; the old one is closed by the kernel.
    match unsafe { libc::dup2(fd.as_raw_fd(), to) } {
        -1 => Err(nix::Error::last()),
        _ => Ok(()),
    }
}

fn set_rlimit(typ: PosixRlimitType, soft: u64, hard: u64) -> Result<(), String> {
    use nix::sys::resource::{setrlimit, Resource};
    let resource = match typ {
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        other => return Err(format!("the rlimit {other:?} is not supported")),
    };
    setrlimit(resource, soft, hard).map_err(|err| format!("setting {typ:?}: {err}"))
}

/// `clone3(2)` with `flags` and no new stack (fork semantics): `None` in the child, the
/// child's pid in the parent.
fn clone(flags: CloneFlags) -> nix::Result<Option<Pid>> {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let args = CloneArgs {
        flags: flags.bits() as u64,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: 0,
    };
    // SAFETY: clone3 without CLONE_VM or a stack duplicates the (single-threaded) shim like
    // fork(2); the child runs on a copy of its memory.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        -1 => Err(nix::Error::last()),
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
    }
}

#[cfg(test)]
mod tests {
    use nix::mount::MsFlags;

    #[test]
    fn mount_options_become_flags_and_data() {
        let (flags, data) = super::options(&[
            "nosuid".into(),
            "strictatime".into(),
            "mode=755".into(),
            "size=65536k".into(),
            "ro".into(),
        ]);
        assert_eq!(
            flags,
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME | MsFlags::MS_RDONLY
        );
        assert_eq!(data, "mode=755,size=65536k");
        let (flags, data) = super::options(&["rbind".into()]);
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert!(data.is_empty());
    }

    #[test]
    fn oci_capabilities_map_to_the_kernel_ones() {
        for cap in crate::spec::CAPABILITIES {
            let parsed: caps::Capability = format!("CAP_{cap}").parse().unwrap();
            assert!(caps::all().contains(&parsed), "{cap}");
        }
    }
}
