//! The files in a container directory, shared by the daemon side ([`crate::Runtime`]) and the
//! shim. Files that the other side polls for are written atomically (temp file + rename).
//!
//! ```text
//! DIR/shim.json   the ContainerSpec (written by the daemon)
//! DIR/shim.pid    the shim's pid (written by the daemon as it spawns the shim)
//! DIR/pid         the container init's pid, once it runs
//! DIR/exit        its exit code (128+signal if killed), once the shim has cleaned up
//! DIR/oom         present when the kernel's OOM killer killed a process of it (written before exit)
//! DIR/error       why the container could not start
//! DIR/config.json the OCI config (DIR is the bundle); DIR/rootfs (or /run/berth/rootfs/ID with a
//!                 user namespace), upper, work, l/: the overlay
//! ```

use std::fs;
use std::path::{Path, PathBuf};

use crate::Error;

pub const SPEC: &str = "shim.json";
pub const SHIM_PID: &str = "shim.pid";
pub const PID: &str = "pid";
pub const EXIT: &str = "exit";
pub const OOM: &str = "oom";
pub const ERROR: &str = "error";

/// Writes `DIR/name` atomically so a reader never sees half of it.
pub fn write(dir: &Path, name: &str, contents: &str) -> Result<(), Error> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    fs::write(&tmp, contents).map_err(Error::io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(Error::io(format!("renaming to {}", path.display())))
}

/// Reads `DIR/name` as a trimmed string; `None` if it does not exist (or is unreadable).
pub fn read(dir: &Path, name: &str) -> Option<String> {
    fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Reads `DIR/name` as an integer.
pub fn read_i32(dir: &Path, name: &str) -> Option<i32> {
    read(dir, name)?.parse().ok()
}

/// Mount points at or below `dir`, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect()
}
