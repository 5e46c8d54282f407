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
//!
//! Such a container's root cannot reach a bind source inside the data dir (`0700`), and
//! the init binds them as that root: [`bind_sources`] clones each one (id-mapped when the
//! bind asks for it) to `USERNS_BINDS/<id>/<n>`, which it can reach, and the container binds
//! those. [`take_upper`] hands a finished container's upper dir over with the container's own
//! ids (a build step's layer).

use std::fs;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::{Path, PathBuf};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::libc;
use nix::mount::{umount2, MntFlags, MsFlags};

use crate::{Bind, Error, IdMap};

/// Where the bind sources of a container with a user namespace are cloned to, reachable from
/// inside it: `USERNS_BINDS/<id>/<n>` (directories `0711`, like [`USERNS_ROOTS`]). The mounts
/// live in the shim's mount namespace only; the empty mount points are removed with the
/// container.
pub const USERNS_BINDS: &str = "/run/berth/binds";

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
                clone_mount(&target, &link, Some(userns))?;
            }
        }
        lower.push(format!("l/{n}"));
    }
    // volatile: no sync of the upper dir's filesystem at unmount (a journal commit, milliseconds
    // on every container exit); an upper dir never outlives a crash of its container.
    let options = format!(
        "lowerdir={},upperdir=upper,workdir=work,volatile",
        lower.join(":")
    );
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
/// container's netns stays the host's, so the container's init (inside the user namespace) cannot; the
/// shim, in the container's netns already, can. It shows that netns's links, as a container's
/// own sysfs would; the init's copy of the shim's mounts carries it over.
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

/// The binds of container `id` (with a user namespace `users`), their sources cloned to
/// `USERNS_BINDS/<id>/<n>` where its root can reach them: recursively, or id-mapped (by
/// `users`) when the bind asks for it. Only for the single-threaded shim (it forks).
pub fn bind_sources(id: &str, binds: &[Bind], users: IdMap) -> Result<Vec<Bind>, Error> {
    let points = Path::new(USERNS_BINDS).join(id);
    let mut searchable = fs::DirBuilder::new();
    searchable.recursive(true).mode(0o711);
    searchable
        .create(&points)
        .map_err(Error::io(format!("creating {}", points.display())))?;
    let userns = match binds.iter().any(|bind| bind.idmapped) {
        true => Some(crate::userns::with_map(users)?),
        false => None,
    };
    let mut cloned = Vec::with_capacity(binds.len());
    for (n, bind) in binds.iter().enumerate() {
        let point = points.join(n.to_string());
        let made = match fs::metadata(&bind.source) {
            Ok(meta) if meta.is_dir() => fs::create_dir(&point),
            Ok(_) => fs::File::create(&point).map(drop),
            Err(err) => Err(err),
        };
        made.map_err(Error::io(format!(
            "making a mount point for {}",
            bind.source.display()
        )))?;
        let idmap = userns.as_ref().filter(|_| bind.idmapped);
        clone_mount(&bind.source, &point, idmap)?;
        cloned.push(Bind {
            source: point,
            ..bind.clone()
        });
    }
    Ok(cloned)
}

/// Moves the upper dir of the finished container in `dir` to `to`; with `users`, re-owned
/// from the range's host ids to the container's own ([`crate::ids::to_container`]).
pub fn take_upper(dir: &Path, to: &Path, users: Option<IdMap>) -> Result<(), Error> {
    let upper = dir.join("upper");
    fs::rename(&upper, to).map_err(Error::io(format!("moving {}", upper.display())))?;
    match users {
        Some(map) => crate::ids::to_container(to, map).map_err(Error::io(format!(
            "handing {} back to the container's ids",
            to.display()
        ))),
        None => Ok(()),
    }
}

/// Bind-mounts `source` at `target`: recursively, or (not recursively) with the id mapping of
/// the user namespace `idmap` (`open_tree` + `mount_setattr` + `move_mount`).
fn clone_mount(source: &Path, target: &Path, idmap: Option<&OwnedFd>) -> Result<(), Error> {
    let failed = |context: &str| {
        let hint = match idmap {
            Some(_) => "; id-mapped mounts need Linux 5.12+ and a filesystem that supports them, such as ext4, xfs or btrfs",
            None => "",
        };
        let context = format!("{context} {}{hint}", source.display());
        move |err: nix::Error| Error::Sys {
            context,
            source: err,
        }
    };
    let path = std::ffi::CString::new(source.as_os_str().as_bytes())
        .map_err(|_| Error::MissingLayer(source.to_path_buf()))?;
    let recursive = match idmap {
        Some(_) => 0,
        None => libc::AT_RECURSIVE as libc::c_uint,
    };
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | recursive;
    // SAFETY: open_tree with a NUL-terminated path; returns a new fd or -1.
    let tree = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
    let tree = nix::errno::Errno::result(tree).map_err(failed("cloning the mount of"))?;
    // SAFETY: open_tree just returned this new fd.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    if let Some(userns) = idmap {
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        };
        let empty = c"";
        // SAFETY: mount_setattr on the tree's fd with a valid mount_attr of the given size.
        let set = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        nix::errno::Errno::result(set).map_err(failed("id-mapping the mount of"))?;
    }
    let parent = fs::File::open(target.parent().unwrap_or(Path::new("/")))
        .map_err(Error::io(format!("opening {}", target.display())))?;
    let name = std::ffi::CString::new(target.file_name().unwrap_or_default().as_bytes())
        .map_err(|_| Error::MissingLayer(target.to_path_buf()))?;
    let empty = c"";
    // SAFETY: move_mount of the detached tree onto NAME in the open parent directory.
    let moved = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    nix::errno::Errno::result(moved)
        .map(drop)
        .map_err(failed("mounting the cloned mount of"))
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

/// Removes the (empty) mount points of a container with a user namespace (its rootfs and bind
/// sources; unmounted first, in the shim), left by a shim that died; nothing for one without.
pub fn remove_mount_point(dir: &Path, users: bool) {
    if !users {
        return;
    }
    let _ = fs::remove_dir(path(dir, true));
    let Some(id) = dir.file_name() else {
        return;
    };
    let points = Path::new(USERNS_BINDS).join(id);
    if let Ok(entries) = fs::read_dir(&points) {
        for point in entries.flatten().map(|entry| entry.path()) {
            let _ = umount2(&point, MntFlags::MNT_DETACH);
            // Only an empty directory or an empty file: never what a mount showed.
            if fs::remove_dir(&point).is_err() {
                let empty = fs::symlink_metadata(&point).is_ok_and(|m| m.is_file() && m.len() == 0);
                if empty {
                    let _ = fs::remove_file(&point);
                }
            }
        }
    }
    let _ = fs::remove_dir(&points);
}
