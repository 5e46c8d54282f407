//! berth-runtime: the embedded container runtime. The only code in berth that clones, mounts,
//! touches namespaces, cgroups or network links. (Skeleton: the runtime helper fills this in.)
