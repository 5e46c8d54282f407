//! The OCI runtime config (`config.json`) a [`ContainerSpec`] runs with ([`crate::container`]): the
//! default mounts (/proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys read-only, cgroups
//! read-only), pid/mount/uts/ipc/cgroup namespaces plus, with `users`, a user namespace with
//! that id mapping (the network namespace is not in it: the shim joins it before the init is
//! cloned), cgroup `/berth/<id>`, Docker's default capability set (held in the user namespace),
//! `no_new_privileges`, the default seccomp profile ([`crate::seccomp`]), the binds as `rbind`
//! mounts, and the caller's hard open-files limit. Touches nothing on the host.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{
    get_default_mounts, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

use crate::{ContainerSpec, Error};

/// `PATH` given to containers whose env does not set one.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The init containers with `init` run as PID 1: Debian's statically linked tini (package
/// `tini`), bind-mounted read-only, so it works on any image, `scratch` ones included.
pub const INIT_BINARY: &str = "/usr/bin/tini-static";
/// Where the init appears inside the container.
const INIT_IN_CONTAINER: &str = "/.berth-init";

/// The CFS period CPU limits are a quota of, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Docker's (containerd's) default capabilities but `NET_RAW` (raw sockets would let a container
/// forge packets on the bridge): enough for package managers in builds.
pub(crate) const CAPABILITIES: [Capability; 13] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Builds the OCI config for `spec`, with `rootfs` as the root path (relative to the bundle).
pub fn build(spec: &ContainerSpec, rootfs: &Path) -> Result<Spec, Error> {
    let mut env = spec.env.clone();
    if !env.iter().any(|var| var.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let caps: HashSet<Capability> = CAPABILITIES.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(invalid)?;
    // As many open files as the shim may have: raising the hard limit needs CAP_SYS_RESOURCE.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    let nofile = PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .soft(hard)
        .hard(hard)
        .build()
        .map_err(invalid)?;
    let args = if spec.init {
        // -g: signals go to the command's whole process group (`sh -c` wrappers included).
        [INIT_IN_CONTAINER, "-g", "--"]
            .into_iter()
            .map(String::from)
            .chain(spec.args.iter().cloned())
            .collect()
    } else {
        spec.args.clone()
    };
    let user = spec.user.unwrap_or(crate::User { uid: 0, gid: 0 });
    let user = UserBuilder::default()
        .uid(user.uid)
        .gid(user.gid)
        .build()
        .map_err(invalid)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user)
        .args(args)
        .env(env)
        .cwd(spec.cwd.clone())
        .capabilities(capabilities)
        .rlimits(vec![nofile])
        .no_new_privileges(true)
        .build()
        .map_err(invalid)?;

    let mut mounts = get_default_mounts();
    if spec.users.is_some() {
        // The shim mounts /sys itself (see `rootfs`): from inside the user namespace it cannot be.
        mounts.retain(|mount| mount.typ().as_deref() != Some("sysfs"));
    }
    let init = spec.init.then(|| crate::Bind {
        source: INIT_BINARY.into(),
        destination: INIT_IN_CONTAINER.into(),
        readonly: true,
        idmapped: false,
    });
    for bind in spec.binds.iter().chain(&init) {
        let mut options = vec!["rbind".to_string()];
        if bind.readonly {
            options.push("ro".to_string());
        }
        mounts.push(
            MountBuilder::default()
                .destination(&bind.destination)
                .typ("bind")
                .source(&bind.source)
                .options(options)
                .build()
                .map_err(invalid)?,
        );
    }

    let mut namespaces: Vec<LinuxNamespace> = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
    .collect::<Result<_, _>>()
    .map_err(invalid)?;
    let mut id_mappings = Vec::new();
    if let Some(users) = spec.users {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()
                .map_err(invalid)?,
        );
        id_mappings.push(
            LinuxIdMappingBuilder::default()
                .container_id(0u32)
                .host_id(users.host_id)
                .size(users.size)
                .build()
                .map_err(invalid)?,
        );
    }

    let mut resources = LinuxResourcesBuilder::default();
    if let Some(limit) = spec.limits.memory {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .build()
                .map_err(invalid)?,
        );
    }
    if let Some(millis) = spec.limits.cpu_millis {
        let quota = i64::try_from(millis * CPU_PERIOD_US / 1000).unwrap_or(i64::MAX);
        let cpu = LinuxCpuBuilder::default()
            .quota(quota)
            .period(CPU_PERIOD_US);
        resources = resources.cpu(cpu.build().map_err(invalid)?);
    }
    if let Some(limit) = spec.limits.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(limit)
                .build()
                .map_err(invalid)?,
        );
    }
    let resources = resources.build().map_err(invalid)?;
    let defaults = oci_spec::runtime::Linux::default();
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(crate::cgroup::path(&spec.id))
        .resources(resources)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .seccomp(crate::seccomp::default_profile()?)
        .build()
        .map_err(invalid)?;
    if !id_mappings.is_empty() {
        linux
            .set_uid_mappings(Some(id_mappings.clone()))
            .set_gid_mappings(Some(id_mappings));
    }

    let root = RootBuilder::default()
        .path(rootfs)
        .readonly(false)
        .build()
        .map_err(invalid)?;
    let mut oci = Spec::default();
    oci.set_hostname(Some(spec.hostname.clone()))
        .set_root(Some(root))
        .set_process(Some(process))
        .set_mounts(Some(mounts))
        .set_linux(Some(linux));
    Ok(oci)
}

fn invalid(err: oci_spec::OciSpecError) -> Error {
    Error::Spec(err.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use oci_spec::runtime::LinuxNamespaceType;

    use crate::{Bind, ContainerSpec, LogTarget};

    fn spec(netns: Option<PathBuf>) -> ContainerSpec {
        ContainerSpec {
            id: "app-web-1".into(),
            layers: vec![PathBuf::from("/layers/a")],
            args: vec!["sh".into()],
            env: vec!["A=b".into()],
            cwd: "/app".into(),
            hostname: "app".into(),
            binds: vec![Bind {
                source: "/etc/ssl/certs/ca-certificates.crt".into(),
                destination: "/etc/ssl/ca.crt".into(),
                readonly: true,
                idmapped: false,
            }],
            netns,
            log: LogTarget::Inherit,
            stop_grace_secs: 10,
            init: false,
            user: None,
            users: None,
            limits: crate::Limits {
                memory: Some(1 << 28),
                cpu_millis: Some(500),
                pids: Some(100),
            },
            stop_signal: None,
        }
    }

    #[test]
    fn host_network_when_no_netns() {
        let oci = super::build(&spec(None), Path::new("rootfs")).unwrap();
        let linux = oci.linux().as_ref().unwrap();
        let namespaces = linux.namespaces().as_ref().unwrap();
        assert!(namespaces
            .iter()
            .all(|ns| ns.typ() != LinuxNamespaceType::Network));
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/berth/app-web-1"))
        );
        let process = oci.process().as_ref().unwrap();
        assert_eq!(process.env().as_ref().unwrap()[0], super::DEFAULT_PATH);
        let bind = oci.mounts().as_ref().unwrap().last().unwrap().clone();
        assert_eq!(bind.destination(), Path::new("/etc/ssl/ca.crt"));
        assert_eq!(bind.options().as_ref().unwrap(), &["rbind", "ro"]);
    }

    #[test]
    fn default_seccomp_profile_and_no_new_privileges() {
        let oci = super::build(&spec(None), Path::new("rootfs")).unwrap();
        assert_eq!(
            oci.linux().as_ref().unwrap().seccomp().as_ref(),
            Some(&crate::seccomp::default_profile().unwrap())
        );
        let process = oci.process().as_ref().unwrap();
        assert_eq!(process.no_new_privileges(), Some(true));
    }

    #[test]
    fn the_netns_is_left_to_the_shim() {
        let oci = super::build(&spec(Some("/run/b/ns1".into())), Path::new("rootfs")).unwrap();
        let namespaces = oci.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(namespaces
            .iter()
            .all(|ns| ns.typ() != LinuxNamespaceType::Network));
        assert!(!oci.root().as_ref().unwrap().readonly().unwrap_or(true));
    }

    #[test]
    fn users_map_to_the_host_range() {
        let oci = super::build(&spec(None), Path::new("rootfs")).unwrap();
        let linux = oci.linux().as_ref().unwrap();
        assert!(linux.uid_mappings().is_none());
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .all(|ns| ns.typ() != LinuxNamespaceType::User));

        let mut users = spec(None);
        users.users = Some(crate::IdMap {
            host_id: 165536,
            size: 65536,
        });
        let oci = super::build(&users, Path::new("rootfs")).unwrap();
        let linux = oci.linux().as_ref().unwrap();
        assert!(linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::User && ns.path().is_none()));
        for mappings in [linux.uid_mappings(), linux.gid_mappings()] {
            let mapping = &mappings.as_ref().unwrap()[0];
            assert_eq!(
                (mapping.container_id(), mapping.host_id(), mapping.size()),
                (0, 165536, 65536)
            );
        }
    }
}
