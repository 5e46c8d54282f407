//! How much disk a folder takes: allocated blocks of everything under it, each inode once (hard
//! links, such as layers shared between stores, are counted once), links not followed. Owns
//! measuring only; must not change anything.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes allocated under `path` (0 when it does not exist); unreadable entries are skipped.
pub fn usage(path: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        }
    }
    total
}

/// `1.2 GB`, `340 MB`, `12 kB`: sizes as people read them (powers of 1000, like `df -H`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        for (bytes, want) in [
            (0, "0 B"),
            (999, "999 B"),
            (1_000, "1.0 kB"),
            (12_345_678, "12.3 MB"),
            (340_000_000, "340 MB"),
        ] {
            assert_eq!(human(bytes), want);
        }
    }

    #[test]
    fn counts_hard_links_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), vec![7u8; 100_000]).unwrap();
        let one = usage(tmp.path());
        std::fs::hard_link(tmp.path().join("a"), tmp.path().join("b")).unwrap();
        assert_eq!(usage(tmp.path()), one);
        assert!(one >= 100_000);
        assert_eq!(usage(&tmp.path().join("missing")), 0);
    }
}
