//! The default seccomp profile every berth container runs under (builds and apps alike): the
//! [`DENIED`] syscalls and `clone` with any of the [`NAMESPACE_FLAGS`] fail with `EPERM`,
//! `clone3` with `ENOSYS`; everything else is allowed. This module owns that list and why each entry is on it;
//! [`spec`](crate::spec) puts the profile into every OCI config.
//!
//! It is a deny list on top of what the capability set already forbids (containers are root in
//! their namespaces with Docker's default capabilities, no `CAP_SYS_ADMIN`): it takes away
//! kernel attack surface that needs no capability (user namespaces, `io_uring`, `keyctl`,
//! `ptrace`, …) and repeats the capability checks for the most dangerous calls, so a capability
//! added later does not silently hand them out. It follows Docker's default profile where that
//! profile denies a call without `CAP_SYS_ADMIN`, `CAP_SYS_MODULE` and friends.
//!
//! `clone3` fails with `ENOSYS`, as in Docker's profile: seccomp cannot read the flags in its
//! argument struct, and `ENOSYS` makes glibc (threads, `posix_spawn`) fall back to `clone`,
//! whose flags the filter does read. Not denied, on purpose: `personality`
//! (harmless values are common and seccomp cannot allow a set of values in a deny list),
//! `adjtimex`/`clock_adjtime` (glibc's `ntp_gettime` reads the clock state with them; setting
//! needs `CAP_SYS_TIME`), and `chroot`/`mknod`/`sethostname`, which the capability set
//! governs.
//!
//! Names that this libseccomp does not know (a syscall newer than the library) are skipped by
//! [`compile`], so the list can name syscalls of newer kernels without breaking container
//! start. Names of 32-bit-only syscalls (`vm86`, `stime`, …) apply to the compat
//! architectures. The filter is loaded right before the container's `execve`, after
//! `no_new_privileges` is set and the capabilities are dropped ([`crate::container`]).

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder,
    LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

use crate::Error;

/// Syscalls that fail with `EPERM` in every container, grouped by why.
pub const DENIED: &[&str] = &[
    // Replacing or stopping the host kernel, loading kernel code.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "reboot",
    "bpf",
    // Host-wide state: swap, process accounting, quotas, the system clock, the kernel log.
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "settimeofday",
    "clock_settime",
    "stime",
    "syslog",
    // Raw hardware access.
    "iopl",
    "ioperm",
    // Mounts: a container's filesystem is set up by the runtime, never by itself.
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    // New or other namespaces (user namespaces need no capability and open a large kernel
    // attack surface); `clone` with namespace flags is denied separately, see NAMESPACE_FLAGS.
    "unshare",
    "setns",
    // Opening files by handle bypasses the mount tree (the "shocker" container escape).
    "open_by_handle_at",
    "name_to_handle_at",
    // Inspecting or changing other processes' memory.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    // Kernel keyrings are not namespaced.
    "keyctl",
    "add_key",
    "request_key",
    // Frequent sources of kernel exploits that no app needs (libuv/Node fall back to threads
    // when io_uring is refused).
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Obsolete or profiling interfaces.
    "lookup_dcookie",
    "nfsservctl",
    "get_kernel_syms",
    "query_module",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
];

/// The `clone` flags that create namespaces: `clone` fails with `EPERM` when its flags (the
/// first argument on every architecture of the filter) contain any of them. Ordinary `fork`,
/// `vfork` and thread creation never pass them.
pub const NAMESPACE_FLAGS: [u64; 7] = [
    nix::libc::CLONE_NEWNS as u64,
    nix::libc::CLONE_NEWCGROUP as u64,
    nix::libc::CLONE_NEWUTS as u64,
    nix::libc::CLONE_NEWIPC as u64,
    nix::libc::CLONE_NEWUSER as u64,
    nix::libc::CLONE_NEWPID as u64,
    nix::libc::CLONE_NEWNET as u64,
];

/// The native architecture and the ones its kernel also runs (32-bit compat), so a 32-bit
/// binary cannot slip past the filter.
#[cfg(target_arch = "x86_64")]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32];
#[cfg(target_arch = "aarch64")]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchAarch64, Arch::ScmpArchArm];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURES: &[Arch] = &[Arch::ScmpArchNative];

/// The profile: allow by default, `EPERM` for [`DENIED`] and for `clone` with any of the
/// [`NAMESPACE_FLAGS`], `ENOSYS` for `clone3` (so glibc uses `clone`).
pub fn default_profile() -> Result<LinuxSeccomp, Error> {
    let denied = errno_rule(LinuxSyscallBuilder::default().names(names(DENIED)))?;
    // One comparison per flag on the same argument: `compile` adds each as its own rule,
    // so any one flag is enough to deny.
    let args = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(flag)
                .value_two(flag)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let clone = errno_rule(
        LinuxSyscallBuilder::default()
            .names(names(&["clone"]))
            .args(args),
    )?;
    let clone3 = LinuxSyscallBuilder::default()
        .names(names(&["clone3"]))
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(nix::libc::ENOSYS as u32)
        .build()
        .map_err(invalid)?;
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(ARCHITECTURES.to_vec())
        .syscalls(vec![denied, clone, clone3])
        .build()
        .map_err(invalid)
}

/// The filter of an OCI seccomp profile, for libseccomp to load. Each argument comparison of
/// a syscall becomes a rule of its own (any one matching applies the action), as runc and
/// youki read the OCI format.
pub fn compile(profile: &LinuxSeccomp) -> Result<ScmpFilterContext, Error> {
    let failed = |what: String| {
        move |err: libseccomp::error::SeccompError| Error::Seccomp(format!("{what}: {err}"))
    };
    let mut filter = ScmpFilterContext::new(action(
        profile.default_action(),
        profile.default_errno_ret(),
    )?)
    .map_err(failed("creating the filter".into()))?;
    for arch in profile.architectures().iter().flatten() {
        filter
            .add_arch(architecture(*arch)?)
            .map_err(failed(format!("adding {arch:?}")))?;
    }
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        for name in rule.names() {
            // Unknown to this libseccomp: a syscall newer than the library, so none can make it.
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let args = rule.args().clone().unwrap_or_default();
            if args.is_empty() {
                filter
                    .add_rule(act, syscall)
                    .map_err(failed(format!("adding {name}")))?;
            }
            for arg in args {
                // OCI: `value` is the mask of a masked comparison, `valueTwo` what it must equal.
                let (op, datum) = match arg.op() {
                    LinuxSeccompOperator::ScmpCmpMaskedEq => (
                        ScmpCompareOp::MaskedEqual(arg.value()),
                        arg.value_two().unwrap_or(0),
                    ),
                    LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, arg.value()),
                    LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, arg.value()),
                    other => {
                        return Err(Error::Seccomp(format!(
                            "the comparison {other:?} is not supported"
                        )))
                    }
                };
                let compare = ScmpArgCompare::new(arg.index() as u32, op, datum);
                filter
                    .add_rule_conditional(act, syscall, &[compare])
                    .map_err(failed(format!("adding {name}")))?;
            }
        }
    }
    Ok(filter)
}

fn action(action: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, Error> {
    match action {
        LinuxSeccompAction::ScmpActAllow => Ok(ScmpAction::Allow),
        LinuxSeccompAction::ScmpActErrno => Ok(ScmpAction::Errno(
            errno.unwrap_or(nix::libc::EPERM as u32) as i32,
        )),
        LinuxSeccompAction::ScmpActKillProcess => Ok(ScmpAction::KillProcess),
        other => Err(Error::Seccomp(format!(
            "the action {other:?} is not supported"
        ))),
    }
}

fn architecture(arch: Arch) -> Result<ScmpArch, Error> {
    match arch {
        Arch::ScmpArchX86_64 => Ok(ScmpArch::X8664),
        Arch::ScmpArchX86 => Ok(ScmpArch::X86),
        Arch::ScmpArchX32 => Ok(ScmpArch::X32),
        Arch::ScmpArchAarch64 => Ok(ScmpArch::Aarch64),
        Arch::ScmpArchArm => Ok(ScmpArch::Arm),
        Arch::ScmpArchNative => Ok(ScmpArch::Native),
        other => Err(Error::Seccomp(format!(
            "the architecture {other:?} is not supported"
        ))),
    }
}

fn errno_rule(rule: LinuxSyscallBuilder) -> Result<LinuxSyscall, Error> {
    rule.action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(nix::libc::EPERM as u32)
        .build()
        .map_err(invalid)
}

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn invalid(err: oci_spec::OciSpecError) -> Error {
    Error::Spec(err.to_string())
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{LinuxSeccompAction, LinuxSeccompOperator};

    use super::{default_profile, NAMESPACE_FLAGS};

    /// Every name the profile denies without looking at arguments.
    fn unconditional() -> Vec<String> {
        let profile = default_profile().unwrap();
        profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|rule| rule.args().is_none())
            .filter(|rule| rule.errno_ret() == Some(nix::libc::EPERM as u32))
            .flat_map(|rule| rule.names().clone())
            .collect()
    }

    #[test]
    fn allows_by_default_and_denies_with_eperm() {
        let profile = default_profile().unwrap();
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert!(!profile.architectures().as_ref().unwrap().is_empty());
        for rule in profile.syscalls().as_ref().unwrap() {
            assert_eq!(rule.action(), LinuxSeccompAction::ScmpActErrno);
            let errno = if rule.names() == &["clone3"] {
                nix::libc::ENOSYS
            } else {
                nix::libc::EPERM
            };
            assert_eq!(rule.errno_ret(), Some(errno as u32));
        }
    }

    #[test]
    fn denies_the_dangerous_syscalls() {
        let denied = unconditional();
        for name in [
            "kexec_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "keyctl",
            "add_key",
            "request_key",
            "open_by_handle_at",
            "mount",
            "umount2",
            "pivot_root",
            "fsopen",
            "move_mount",
            "open_tree",
            "unshare",
            "setns",
            "ptrace",
            "process_vm_writev",
            "swapon",
            "iopl",
            "clock_settime",
            "io_uring_setup",
        ] {
            assert!(denied.iter().any(|d| d == name), "{name} is not denied");
        }
        let mut sorted = denied.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), denied.len(), "duplicate names");
    }

    #[test]
    fn never_denies_what_ordinary_programs_need() {
        let denied = unconditional();
        for name in [
            "clone",
            "clone3",
            "fork",
            "vfork",
            "execve",
            "execveat",
            "wait4",
            "exit_group",
            "personality",
            "prctl",
            "seccomp",
            "chroot",
            "socket",
            "bind",
            "listen",
            "accept4",
            "epoll_wait",
            "futex",
            "mmap",
            "mprotect",
            "openat",
            "statx",
            "getrandom",
            "adjtimex",
            "clock_gettime",
        ] {
            assert!(!denied.iter().any(|d| d == name), "{name} is denied");
        }
    }

    #[test]
    fn clone_is_denied_only_with_namespace_flags() {
        let profile = default_profile().unwrap();
        let clones: Vec<_> = profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|rule| rule.names().iter().any(|n| n == "clone" || n == "clone3"))
            .collect();
        assert_eq!(clones.len(), 2);
        assert_eq!(clones[0].names(), &["clone"]);
        // clone3 answers ENOSYS (glibc then falls back to clone), never EPERM.
        assert_eq!(clones[1].names(), &["clone3"]);
        assert_eq!(clones[1].errno_ret(), Some(nix::libc::ENOSYS as u32));
        assert!(clones[1].args().is_none());
        let args = clones[0]
            .args()
            .as_ref()
            .expect("clone is filtered on its flags");
        assert_eq!(args.len(), NAMESPACE_FLAGS.len());
        for (arg, flag) in args.iter().zip(NAMESPACE_FLAGS) {
            assert_eq!(arg.index(), 0);
            assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
            // Mask and value alike, whichever of the two the runtime reads as the mask.
            assert_eq!((arg.value(), arg.value_two()), (flag, Some(flag)));
        }
        // fork(2) and pthread_create(3) flags match none of the rules.
        let fork = (nix::libc::CLONE_CHILD_SETTID
            | nix::libc::CLONE_CHILD_CLEARTID
            | nix::libc::SIGCHLD) as u64;
        let thread = (nix::libc::CLONE_VM
            | nix::libc::CLONE_FS
            | nix::libc::CLONE_FILES
            | nix::libc::CLONE_SIGHAND
            | nix::libc::CLONE_THREAD
            | nix::libc::CLONE_SYSVSEM
            | nix::libc::CLONE_SETTLS
            | nix::libc::CLONE_PARENT_SETTID
            | nix::libc::CLONE_CHILD_CLEARTID) as u64;
        for flags in [fork, thread] {
            assert!(args.iter().all(|arg| flags & arg.value() != arg.value()));
        }
    }
}
