//! The built-in buildpacks (`buildpacks/` in the source tree), compiled into the binary so that
//! berth stays one file, and written out to `DATA/buildpacks` when the server starts.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// (path under buildpacks/, contents). Everything is written executable.
const FILES: &[(&str, &str)] = &[
    ("runner.sh", include_str!("../../buildpacks/runner.sh")),
    (
        "python/bin/detect",
        include_str!("../../buildpacks/python/bin/detect"),
    ),
    (
        "python/bin/compile",
        include_str!("../../buildpacks/python/bin/compile"),
    ),
    (
        "python/bin/release",
        include_str!("../../buildpacks/python/bin/release"),
    ),
    (
        "procfile/bin/detect",
        include_str!("../../buildpacks/procfile/bin/detect"),
    ),
    (
        "procfile/bin/compile",
        include_str!("../../buildpacks/procfile/bin/compile"),
    ),
    (
        "procfile/bin/release",
        include_str!("../../buildpacks/procfile/bin/release"),
    ),
];

/// Writes the built-in buildpacks into `dir`, replacing older copies.
pub fn install(dir: &Path) -> std::io::Result<()> {
    for (path, contents) in FILES {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().expect("buildpack files sit in a folder"))?;
        std::fs::write(&target, contents)?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn installs_every_file_executable() {
        let dir = tempfile::tempdir().unwrap();
        super::install(dir.path()).unwrap();
        for (path, contents) in super::FILES {
            let meta = std::fs::metadata(dir.path().join(path)).unwrap();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
                0o755
            );
            assert!(contents.starts_with("#!"), "{path} needs a shebang");
        }
    }
}
