//! The overlay root filesystem of one container: the image layers (read-only, top-most first)
//! under a per-container writable `DIR/upper`, mounted at `DIR/rootfs`.
//!
//! `mount(2)` options are capped at one page, so the layers are named through short symlinks
//! `DIR/l/<n>` and the mount is made with paths relative to `DIR`: [`mount`] changes the
//! working directory for a moment and must only run in the single-threaded shim. Owns nothing
//! outside `DIR`.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags, MsFlags};

use crate::Error;

/// Where the rootfs of the container in `dir` is mounted (the OCI `root.path`).
pub fn path(dir: &Path) -> PathBuf {
    dir.join("rootfs")
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

/// Mounts the overlay of `layers` (top-most first) at `DIR/rootfs`.
pub fn mount(dir: &Path, layers: &[PathBuf]) -> Result<PathBuf, Error> {
    check_layers(layers)?;
    let links = dir.join("l");
    for sub in [&links, &dir.join("upper"), &dir.join("work"), &path(dir)] {
        fs::create_dir_all(sub).map_err(Error::io(format!("creating {}", sub.display())))?;
    }
    let mut lower = Vec::with_capacity(layers.len());
    for (n, layer) in layers.iter().enumerate() {
        let target = fs::canonicalize(layer).map_err(|_| Error::MissingLayer(layer.clone()))?;
        let link = links.join(n.to_string());
        let _ = fs::remove_file(&link);
        symlink(&target, &link).map_err(Error::io(format!("linking {}", link.display())))?;
        lower.push(format!("l/{n}"));
    }
    let options = format!("lowerdir={},upperdir=upper,workdir=work", lower.join(":"));
    let previous = std::env::current_dir().map_err(Error::io("reading the current directory"))?;
    std::env::set_current_dir(dir).map_err(Error::io(format!("entering {}", dir.display())))?;
    let mounted = nix::mount::mount(
        Some("overlay"),
        "rootfs",
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    );
    std::env::set_current_dir(&previous)
        .map_err(Error::io(format!("returning to {}", previous.display())))?;
    mounted.map_err(Error::sys(format!(
        "mounting the overlay rootfs at {} ({} layers; is the data dir on a filesystem that supports overlay upper dirs?)",
        path(dir).display(),
        layers.len()
    )))?;
    Ok(path(dir))
}

/// Unmounts `DIR/rootfs`; succeeds if it is not mounted.
pub fn unmount(dir: &Path) -> Result<(), Error> {
    match umount2(&path(dir), MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(err) => Err(Error::sys(format!("unmounting {}", path(dir).display()))(
            err,
        )),
    }
}
