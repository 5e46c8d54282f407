//! Stack images shared by the slow tests: a stack is built with mmdebstrap once per recipe
//! (suite and package lists, [`Stack::recipe`]) into `/var/tmp/berth-test-stacks-2/RECIPE` under a
//! file lock, so concurrent test binaries wait for one build, and each test's data dir gets
//! hard links to it (layers are read-only lower dirs and records are never rewritten, so sharing
//! inodes is safe). The `-2` is the store's format: layers stored once, extracted. A fresh machine pays one build (about 2 min for trixie); later runs none.

use berth::image::stack::{ensure_stacks, Stack};
use berth::image::ImageStore;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHARED: &str = "/var/tmp/berth-test-stacks-2";

/// The shared image store holding `stack`'s images, built if missing; returns its path and
/// what the build said (empty when it was already there).
pub fn shared_store(stack: &Stack) -> (PathBuf, Vec<String>) {
    let dir = Path::new(SHARED).join(stack.recipe());
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::File::create(Path::new(SHARED).join(".lock")).unwrap();
    lock.lock().unwrap();
    let store = ImageStore::open(&dir.join("images")).unwrap();
    let mut log = Vec::new();
    ensure_stacks(&store, stack, false, &mut |line: &str| {
        eprintln!("{line}");
        log.push(line.to_string());
    })
    .unwrap_or_else(|e| panic!("building the shared {} stack: {e}", stack.suite));
    (dir.join("images"), log)
}

/// Hard-links `stack`'s shared images into the image store at `images` (before a server
/// opens it).
pub fn link_into(stack: &Stack, images: &Path) {
    let (shared, _) = shared_store(stack);
    std::fs::create_dir_all(images).unwrap();
    let out = Command::new("cp")
        .arg("-al")
        .arg(format!("{}/.", shared.display()))
        .arg(images)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "linking the shared stacks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
