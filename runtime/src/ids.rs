//! Re-owning a tree between a container's own ids and the host ids its user namespace maps
//! them to ([`IdMap`]): a build step's upper dir, written as the range's host ids, becomes a
//! layer with the container's ids (uid 0 inside is 0 in the layer, a `USER 1000` file 1000);
//! a tree of container ids (a build cache made before builds had a user namespace) becomes
//! the range's. Links are never followed; ids outside the range moved from are left as they
//! are (an overlay whiteout is host root's). Set-user-ID and set-group-ID bits, which a chown
//! clears, are put back. Touches nothing but the tree it is given.

use std::fs;
use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::IdMap;

/// Re-owns every entry under `dir` (and `dir` itself) from the range's host ids to the
/// container's own: `map.host_id + n` becomes `n`.
pub fn to_container(dir: &Path, map: IdMap) -> io::Result<()> {
    shift(dir, &|id| map.to_container(id))
}

/// Re-owns every entry under `dir` (and `dir` itself) from the container's own ids to the
/// range's host ids: `n` becomes `map.host_id + n`.
pub fn to_host(dir: &Path, map: IdMap) -> io::Result<()> {
    shift(dir, &|id| map.to_host(id))
}

impl IdMap {
    /// The container id that host id `id` stands for, if it is in the range.
    pub fn to_container(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.host_id).filter(|n| *n < self.size)
    }

    /// The host id that container id `id` is, if the range maps it.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.size).then(|| self.host_id + id)
    }
}

/// Walks `dir` (depth first, links not followed) and re-owns each entry whose uid or gid
/// `new` maps, `dir` itself last (so an owner check of `dir` tells a finished walk). Each
/// inode is changed once, even when hard-linked, as a new id is outside the range it came
/// from.
fn shift(dir: &Path, new: &dyn Fn(u32) -> Option<u32>) -> io::Result<()> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
        if path != dir {
            reown(&path, &meta, new)?;
        }
    }
    reown(dir, &fs::symlink_metadata(dir)?, new)
}

/// Re-owns `path` (whose metadata is `meta`) by `new`, keeping its setuid and setgid bits.
fn reown(path: &Path, meta: &fs::Metadata, new: &dyn Fn(u32) -> Option<u32>) -> io::Result<()> {
    let (uid, gid) = (new(meta.uid()), new(meta.gid()));
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    lchown(path, uid, gid)?;
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use super::*;

    const MAP: IdMap = IdMap {
        host_id: 300_000,
        size: 65_536,
    };

    fn owner(path: &Path) -> (u32, u32) {
        let meta = fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn ids_map_inside_the_range_only() {
        assert_eq!(MAP.to_container(300_000), Some(0));
        assert_eq!(MAP.to_container(301_000), Some(1000));
        assert_eq!(MAP.to_container(365_536), None);
        assert_eq!(MAP.to_container(0), None);
        assert_eq!(MAP.to_host(1000), Some(301_000));
        assert_eq!(MAP.to_host(65_536), None);
    }

    /// Needs root (chown). A tree written as the range's host ids comes back as the
    /// container's, with setuid bits, links and out-of-range owners as they were; and back.
    #[test]
    fn trees_move_between_host_and_container_ids() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root");
            assert!(std::env::var("CI").is_err(), "needs root under CI");
            return;
        }
        let tmp = std::env::temp_dir().join(format!("berth-ids-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(tmp.join("sub")).unwrap();
        fs::write(tmp.join("sub/suid"), "x").unwrap();
        fs::write(tmp.join("by-1000"), "x").unwrap();
        fs::write(tmp.join("whiteout"), "").unwrap();
        symlink("/etc/passwd", tmp.join("link")).unwrap();
        fs::hard_link(tmp.join("by-1000"), tmp.join("hard")).unwrap();
        for (path, id) in [
            ("", 300_000),
            ("sub", 300_000),
            ("sub/suid", 300_000),
            ("by-1000", 301_000),
            ("link", 300_000),
        ] {
            lchown(tmp.join(path), Some(id), Some(id)).unwrap();
        }
        lchown(tmp.join("whiteout"), Some(0), Some(0)).unwrap();
        fs::set_permissions(tmp.join("sub/suid"), fs::Permissions::from_mode(0o4755)).unwrap();

        to_container(&tmp, MAP).unwrap();
        assert_eq!(owner(&tmp), (0, 0));
        assert_eq!(owner(&tmp.join("sub/suid")), (0, 0));
        let mode = fs::metadata(tmp.join("sub/suid")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o4755, "setuid kept");
        assert_eq!(owner(&tmp.join("by-1000")), (1000, 1000));
        assert_eq!(owner(&tmp.join("hard")), (1000, 1000));
        assert_eq!(owner(&tmp.join("link")), (0, 0), "the link, not its target");
        assert_eq!(owner(Path::new("/etc/passwd")), (0, 0));

        to_host(&tmp, MAP).unwrap();
        assert_eq!(owner(&tmp.join("sub/suid")), (300_000, 300_000));
        assert_eq!(owner(&tmp.join("hard")), (301_000, 301_000));
        assert_eq!(owner(&tmp.join("whiteout")), (300_000, 300_000));
        fs::remove_dir_all(&tmp).unwrap();
    }
}
