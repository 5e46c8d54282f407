//! The cgroup of each container, `/berth/<id>`: created with the container's limits before its
//! init runs ([`create`]), joined by the init ([`Cgroup::join`]), read for what the container
//! uses ([`usage`]) and how often the OOM killer struck ([`oom_kills`]), and removed once it is
//! empty ([`remove`], or [`kill_cgroup`] for one whose shim died). Works on cgroup v1 (one
//! directory per controller hierarchy, as on this machine's v1/v2 hybrid) and on a pure v2 host
//! (one directory in the unified hierarchy). Owns nothing but `berth/` in each hierarchy.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use crate::Error;

/// The cgroup (in every hierarchy) that holds the containers' cgroups.
pub const PARENT: &str = "berth";

/// Where the cgroup hierarchies are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// The cgroup path of container `id`.
pub fn path(id: &str) -> String {
    format!("/{PARENT}/{id}")
}

/// Whether the host runs the unified cgroup v2 hierarchy only (no v1 controllers). Read once:
/// hierarchies are mounted at boot.
pub fn v2_only() -> bool {
    static V2_ONLY: OnceLock<bool> = OnceLock::new();
    *V2_ONLY.get_or_init(|| Path::new(ROOT).join("cgroup.controllers").exists())
}

/// The v1 controllers berth limits or reads: a container gets a cgroup in the hierarchies that
/// hold them, and stays in its shim's in the others (cpuset, blkio, freezer, …).
const USED_V1: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "devices"];

/// The v1 hierarchies that hold a controller berth uses ([`USED_V1`]), by mount point.
fn v1_hierarchies() -> &'static [PathBuf] {
    static HIERARCHIES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    HIERARCHIES.get_or_init(read_v1_hierarchies)
}

fn read_v1_hierarchies() -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fs = fs.split(' ');
            let (kind, _, options) = (fs.next()?, fs.next()?, fs.next()?);
            let point = mount.split(' ').nth(4)?;
            let used = options.split(',').any(|o| USED_V1.contains(&o));
            (kind == "cgroup" && used).then(|| PathBuf::from(point))
        })
        .collect()
}

/// Container `id`'s cgroup directories: one per controller on cgroup v1, one on v2 (whether
/// they exist or not).
fn dirs_of(id: &str) -> Vec<PathBuf> {
    let relative = Path::new(PARENT).join(id);
    match v2_only() {
        true => vec![Path::new(ROOT).join(relative)],
        false => v1_hierarchies()
            .iter()
            .map(|hierarchy| hierarchy.join(&relative))
            .collect(),
    }
}

/// The cgroup of one container, created and not yet removed.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

/// Creates container `id`'s cgroup with `resources` (memory limit, CPU quota, pids limit) and,
/// on cgroup v1, a devices controller that allows only `devices` (`c MAJOR:MINOR rwm` lines).
/// On failure nothing is left.
pub fn create(
    id: &str,
    resources: Option<&LinuxResources>,
    devices: &[&str],
) -> Result<Cgroup, Error> {
    let v2 = v2_only();
    if v2 {
        // Controllers must be enabled from the root down for `berth/<id>` to have them.
        let parent = Path::new(ROOT).join(PARENT);
        let _ = fs::create_dir(&parent);
        for dir in [Path::new(ROOT), parent.as_path()] {
            for controller in ["+memory", "+cpu", "+pids"] {
                let _ = fs::write(dir.join("cgroup.subtree_control"), controller);
            }
        }
    }
    let cgroup = Cgroup { dirs: dirs_of(id) };
    match cgroup.configure(v2, resources, devices) {
        Ok(()) => Ok(cgroup),
        Err(err) => {
            cgroup.remove();
            Err(err)
        }
    }
}

impl Cgroup {
    fn configure(
        &self,
        v2: bool,
        resources: Option<&LinuxResources>,
        devices: &[&str],
    ) -> Result<(), Error> {
        for dir in &self.dirs {
            fs::create_dir_all(dir)
                .map_err(Error::io(format!("creating the cgroup {}", dir.display())))?;
        }
        let memory = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        let cpu = resources.and_then(|r| r.cpu().as_ref());
        let quota = cpu
            .and_then(|c| c.quota())
            .zip(cpu.and_then(|c| c.period()));
        let pids = resources.and_then(|r| r.pids().as_ref()).map(|p| p.limit());
        if v2 {
            if let Some(limit) = memory {
                self.write("memory.max", &limit.to_string())?;
            }
            if let Some((quota, period)) = quota {
                self.write("cpu.max", &format!("{quota} {period}"))?;
            }
            if let Some(limit) = pids {
                self.write("pids.max", &limit.to_string())?;
            }
            return Ok(());
        }
        if let Some(limit) = memory {
            self.write("memory.limit_in_bytes", &limit.to_string())?;
        }
        if let Some((quota, period)) = quota {
            self.write("cpu.cfs_period_us", &period.to_string())?;
            self.write("cpu.cfs_quota_us", &quota.to_string())?;
        }
        if let Some(limit) = pids {
            self.write("pids.max", &limit.to_string())?;
        }
        if self.has("devices.deny") {
            self.write("devices.deny", "a")?;
            for device in devices {
                self.write("devices.allow", device)?;
            }
        }
        Ok(())
    }

    /// Whether one of the directories has `file` (its controller is there).
    fn has(&self, file: &str) -> bool {
        self.dirs.iter().any(|dir| dir.join(file).exists())
    }

    /// Writes `value` to `file` in the directory that has it (the controller's).
    fn write(&self, file: &str, value: &str) -> Result<(), Error> {
        let Some(path) = self
            .dirs
            .iter()
            .map(|dir| dir.join(file))
            .find(|p| p.exists())
        else {
            return Err(Error::Io {
                context: format!("setting {file} of the container's cgroup"),
                source: std::io::Error::other(
                    "no cgroup controller has this file: is the controller enabled on this host?",
                ),
            });
        };
        fs::write(&path, value).map_err(Error::io(format!("writing {value} to {}", path.display())))
    }

    /// Moves process `pid` into the cgroup (every hierarchy).
    pub fn join(&self, pid: i32) -> Result<(), Error> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, pid.to_string()).map_err(Error::io(format!(
                "adding the container to {}",
                procs.display()
            )))?;
        }
        Ok(())
    }

    /// The directories, for the container's read-only view of them: on v1 each with its
    /// hierarchy's name (`memory`, `cpu`, …), on v2 the one with an empty name.
    pub fn views(&self) -> Vec<(String, PathBuf)> {
        self.dirs
            .iter()
            .map(|dir| {
                let name = match v2_only() {
                    true => String::new(),
                    false => dir
                        .ancestors()
                        .nth(2)
                        .and_then(|h| h.file_name())
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                };
                (name, dir.clone())
            })
            .collect()
    }

    fn remove(&self) {
        remove_dirs(&self.dirs, Duration::ZERO);
    }
}

/// Removes container `id`'s cgroup once its processes are gone (retrying for up to `within`
/// while the kernel still counts an exiting one).
pub fn remove(id: &str, within: Duration) {
    remove_dirs(&dirs_of(id), within);
}

fn remove_dirs(dirs: &[PathBuf], within: Duration) {
    let deadline = Instant::now() + within;
    for dir in dirs {
        while let Err(err) = fs::remove_dir(dir) {
            if err.kind() == std::io::ErrorKind::NotFound || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// How many times the kernel's OOM killer killed a process in container `id`'s cgroup, read
/// while the cgroup still exists (v1: `memory.oom_control`, v2: `memory.events`).
pub fn oom_kills(id: &str) -> u64 {
    dirs_of(id)
        .iter()
        .flat_map(|dir| ["memory.oom_control", "memory.events"].map(|file| dir.join(file)))
        .find_map(|file| fs::read_to_string(file).ok())
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What a container uses now, read from its cgroup; None when its cgroup is gone (or has no
/// such file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory charged to it, in bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`; page
    /// cache included).
    pub memory: Option<u64>,
    /// CPU time used so far, in microseconds (v1 `cpuacct.usage`, v2 `cpu.stat`'s `usage_usec`).
    pub cpu_usec: Option<u64>,
}

/// What container `id` uses now (cgroup v1 or v2).
pub fn usage(id: &str) -> Usage {
    let dirs = dirs_of(id);
    let read = |file: &str| {
        dirs.iter()
            .find_map(|dir| fs::read_to_string(dir.join(file)).ok())
    };
    let number = |text: String| text.trim().parse::<u64>().ok();
    let memory = read("memory.usage_in_bytes")
        .or_else(|| read("memory.current"))
        .and_then(number);
    let cpu_usec = read("cpuacct.usage")
        .and_then(number)
        .map(|ns| ns / 1000)
        .or_else(|| {
            read("cpu.stat").and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("usage_usec ")?.trim().parse().ok())
            })
        });
    Usage { memory, cpu_usec }
}

/// Kills every process left in container `id`'s cgroup (its shim died without cleaning up)
/// and removes the cgroup. Returns once they are gone, or after `within`.
pub fn kill_cgroup(id: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let dirs = dirs_of(id);
    loop {
        let pids: HashSet<i32> = dirs
            .iter()
            .filter_map(|dir| fs::read_to_string(dir.join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove_dirs(&dirs, deadline.saturating_duration_since(Instant::now()));
}

/// Removes the parent cgroup from every hierarchy where it is empty (the last container of
/// every server on this machine is gone); where containers still run it stays. For servers
/// that shut down for good (`--ephemeral`) and tests.
pub fn remove_parent() {
    // rmdir(2) refuses a cgroup with children or processes: exactly the ones to keep.
    if v2_only() {
        let _ = fs::remove_dir(Path::new(ROOT).join(PARENT));
        return;
    }
    for hierarchy in v1_hierarchies() {
        let _ = fs::remove_dir(hierarchy.join(PARENT));
    }
}
