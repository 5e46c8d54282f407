//! The overlay root filesystem of one container: the image layers (read-only, top-most first)
//! under a per-container writable `DIR/upper`, mounted at `DIR/rootfs`.
//!
//! `mount(2)` options are capped at one page, so the layers are named through short paths
//! `DIR/l/<n>` and the mount is made with paths relative to `DIR`: [`mount`] changes the
//! working directory for a moment and must only run in the single-threaded shim. Owns nothing
//! outside `DIR`.
//!
//! A container with its own user namespace (`users`) gets each layer as an **id-mapped** bind
//! mount at `DIR/l/<n>` (`open_tree` + `mount_setattr(MOUNT_ATTR_IDMAP)` + `move_mount`): the
//! layers' host-root files show as the container's root without a chown, and the layers stay
//! shared by every app. `DIR/upper` then belongs to the mapped root, and what the container
//! writes lands there as its mapped host uids. Without `users`, `DIR/l/<n>` are symlinks.
//! Either way the mounts live in the shim's private mount namespace and go with it.

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use libcontainer::syscall::linux::{LinuxSyscall, MountAttr};
use libcontainer::syscall::Syscall;
use nix::libc;
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::{Error, IdMap};

/// Where the rootfs of a container with a user namespace is mounted: `USERNS_ROOTS/<id>`.
/// Its root must reach its rootfs through directories it may search as a plain host uid, and
/// the data dir is `0700`; these directories are `0711`. The mount lives in the shim's mount
/// namespace only; the empty directory is removed with the container.
pub const USERNS_ROOTS: &str = "/run/berth/rootfs";

/// Where the rootfs of the container in `dir` is mounted (the OCI `root.path`): `DIR/rootfs`,
/// or with a user namespace (`users`) `USERNS_ROOTS/<id>`.
pub fn path(dir: &Path, users: bool) -> PathBuf {
    match (users, dir.file_name()) {
        (true, Some(id)) => Path::new(USERNS_ROOTS).join(id),
        _ => dir.join("rootfs"),
    }
}

/// Checks that there is at least one layer and each one is a directory.
pub fn check_layers(layers: &[PathBuf]) -> Result<(), Error> {
    if layers.is_empty() {
        return Err(Error::NoLayers);
    }
    match layers.iter().find(|layer| !layer.is_dir()) {
        Some(missing) => Err(Error::MissingLayer(missing.clone())),
        None => Ok(()),
    }
}

/// Mounts the overlay of `layers` (top-most first) at `DIR/rootfs`; with `users`, on
/// id-mapped layers and with the upper dir owned by the mapped root.
pub fn mount(dir: &Path, layers: &[PathBuf], users: Option<IdMap>) -> Result<PathBuf, Error> {
    check_layers(layers)?;
    let links = dir.join("l");
    let upper = dir.join("upper");
    let rootfs = path(dir, users.is_some());
    if users.is_some() {
        let mut searchable = fs::DirBuilder::new();
        searchable.recursive(true).mode(0o711);
        let parent = Path::new(USERNS_ROOTS);
        searchable
            .create(parent)
            .map_err(Error::io(format!("creating {}", parent.display())))?;
    }
    for sub in [&links, &upper, &dir.join("work"), &rootfs] {
        fs::create_dir_all(sub).map_err(Error::io(format!("creating {}", sub.display())))?;
    }
    let userns = users.map(crate::userns::with_map).transpose()?;
    if let Some(map) = users {
        let root = Some(nix::unistd::Uid::from_raw(map.host_id));
        nix::unistd::chown(&upper, root, Some(nix::unistd::Gid::from_raw(map.host_id))).map_err(
            Error::sys(format!("handing {} to the mapped root", upper.display())),
        )?;
    }
    let mut lower = Vec::with_capacity(layers.len());
    for (n, layer) in layers.iter().enumerate() {
        let target = fs::canonicalize(layer).map_err(|_| Error::MissingLayer(layer.clone()))?;
        let link = links.join(n.to_string());
        let _ = fs::remove_file(&link);
        match &userns {
            None => {
                symlink(&target, &link).map_err(Error::io(format!("linking {}", link.display())))?
            }
            Some(userns) => {
                fs::create_dir_all(&link)
                    .map_err(Error::io(format!("creating {}", link.display())))?;
                mount_idmapped(&target, &link, userns)?;
            }
        }
        lower.push(format!("l/{n}"));
    }
    let options = format!("lowerdir={},upperdir=upper,workdir=work", lower.join(":"));
    let previous = std::env::current_dir().map_err(Error::io("reading the current directory"))?;
    std::env::set_current_dir(dir).map_err(Error::io(format!("entering {}", dir.display())))?;
    let mounted = nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    );
    std::env::set_current_dir(&previous)
        .map_err(Error::io(format!("returning to {}", previous.display())))?;
    mounted.map_err(Error::sys(format!(
        "mounting the overlay rootfs at {} ({} layers; is the data dir on a filesystem that supports overlay upper dirs?)",
        rootfs.display(),
        layers.len()
    )))?;
    if users.is_some() {
        mount_sysfs(&rootfs)?;
    }
    Ok(rootfs)
}

/// Mounts a read-only sysfs at `ROOTFS/sys` for a container with a user namespace: the kernel
/// lets only a user namespace that owns the current network namespace mount sysfs, and a
/// container's netns stays the host's, so libcontainer (inside the user namespace) cannot; the
/// shim, in the container's netns already, can. It shows that netns's links, as a container's
/// own sysfs would; libcontainer's recursive bind of the rootfs carries it over.
fn mount_sysfs(rootfs: &Path) -> Result<(), Error> {
    let sys = rootfs.join("sys");
    fs::create_dir_all(&sys).map_err(Error::io(format!("creating {}", sys.display())))?;
    nix::mount::mount(
        Some("sysfs"),
        &sys,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(Error::sys(format!("mounting sysfs at {}", sys.display())))
}

/// Bind-mounts `source` at `target` with the id mapping of the user namespace `userns`.
fn mount_idmapped(source: &Path, target: &Path, userns: &OwnedFd) -> Result<(), Error> {
    let failed = |context: &'static str| {
        move |err: libcontainer::syscall::SyscallError| {
            Error::Libcontainer {
            context,
            reason: format!(
                "{err} ({}; id-mapped mounts need Linux 5.12+ and a filesystem that supports them, such as ext4, xfs or btrfs)",
                source.display()
            ),
        }
        }
    };
    let syscall = LinuxSyscall;
    let tree = syscall
        .open_tree(
            libc::AT_FDCWD,
            source.to_str(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
        .map_err(failed("cloning an image layer's mount"))?;
    let attr = MountAttr {
        attr_set: libc::MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    syscall
        .mount_setattr(
            tree.as_fd(),
            Path::new(""),
            libc::AT_EMPTY_PATH as u32,
            &attr,
            std::mem::size_of::<MountAttr>(),
        )
        .map_err(failed("id-mapping an image layer"))?;
    let parent = fs::File::open(target.parent().unwrap_or(Path::new("/")))
        .map_err(Error::io(format!("opening {}", target.display())))?;
    let name = target.file_name().and_then(|name| name.to_str());
    syscall
        .move_mount(
            tree.as_fd(),
            None,
            parent.as_fd(),
            name,
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(failed("mounting an id-mapped image layer"))
}

/// Unmounts the rootfs of the container in `dir` (and removes its mount point outside `dir`);
/// succeeds if it is not mounted.
pub fn unmount(dir: &Path, users: bool) -> Result<(), Error> {
    let rootfs = path(dir, users);
    match umount2(&rootfs, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(err) => return Err(Error::sys(format!("unmounting {}", rootfs.display()))(err)),
    }
    remove_mount_point(dir, users);
    Ok(())
}

/// Removes the (empty) mount point of a container with a user namespace, left by a shim
/// that died; nothing for one without.
pub fn remove_mount_point(dir: &Path, users: bool) {
    if users {
        let _ = fs::remove_dir(path(dir, true));
    }
}
