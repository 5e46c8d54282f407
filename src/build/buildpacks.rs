//! The built-in buildpacks (`buildpacks/` in the source tree), compiled into the binary so that
//! berth stays one file, and written out to `DATA/buildpacks` when the server starts; and which
//! stack a buildpack build uses (`BERTH_STACK`, else the runtime versions the app asks for).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Config;
use crate::image::stack::{self, Stack, Wanted};
use crate::tree::{self, TreeError};

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("BERTH_STACK={0:?} is not a stack berth has — use one of: {list}", list = stack::STACKS.iter().map(|s| s.suite).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    #[error(transparent)]
    File(#[from] TreeError),
}

/// The stack named `name` (the default one when empty).
pub fn stack_named(name: &str) -> Result<Stack, StackError> {
    if name.is_empty() {
        return Ok(stack::STACKS[0]);
    }
    Stack::named(name).ok_or_else(|| StackError::Unknown(name.to_string()))
}

/// The stack to build `source` on: the app's `BERTH_STACK`, else the one [`stack::pick`]s for
/// the versions the app asks for. The line says why, when it is not the default.
pub fn choose_stack(source: &Path, config: &Config) -> Result<(Stack, Option<String>), StackError> {
    if let Some(name) = config.get("BERTH_STACK") {
        let stack = stack_named(name.trim())?;
        return Ok((
            stack,
            Some(format!("BERTH_STACK: using the {} stack", stack.suite)),
        ));
    }
    Ok(stack::pick(&wanted_versions(source)?))
}

/// The runtime versions the app asks for: `.python-version` or `runtime.txt`, package.json's
/// `engines.node`, go.mod's `go` line (read inside the tree, no links followed).
fn wanted_versions(source: &Path) -> Result<Vec<Wanted>, TreeError> {
    let first_line = |text: &str| text.lines().next().unwrap_or("").trim().to_string();
    let mut wanted = Vec::new();
    if let Some(text) = tree::read_file(source, ".python-version")? {
        wanted.push(Wanted::Python(first_line(&text)));
    } else if let Some(text) = tree::read_file(source, "runtime.txt")? {
        wanted.push(Wanted::Python(
            first_line(&text).trim_start_matches("python-").to_string(),
        ));
    }
    if let Some(text) = tree::read_file(source, "package.json")? {
        let engines = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["engines"]["node"].as_str().map(str::to_string));
        // Only a plain major version picks a stack ("18", "18.x", "^18.2"); ranges such as
        // ">=18" are met by the default.
        if let Some(major) = engines.as_deref().and_then(node_major) {
            wanted.push(Wanted::Node(major));
        }
    }
    if let Some(text) = tree::read_file(source, "go.mod")? {
        if let Some(version) = text.lines().find_map(|l| l.trim().strip_prefix("go ")) {
            let minor: Vec<&str> = version.trim().split('.').take(2).collect();
            wanted.push(Wanted::Go(minor.join(".")));
        }
    }
    Ok(wanted)
}

/// The major version of an `engines.node` that names one: `18`, `v18`, `18.x`, `^18.2`, `~18`.
fn node_major(spec: &str) -> Option<String> {
    let spec = spec.trim().trim_start_matches(['^', '~', 'v']);
    let major = spec.split('.').next()?;
    (!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit())).then(|| major.to_string())
}

/// Embeds files of `buildpacks/` as (path under buildpacks/, contents).
macro_rules! files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../buildpacks/", $path)))),*]
    };
}

/// Everything is written executable.
const FILES: &[(&str, &str)] = files![
    "runner.sh",
    "lib.sh",
    "python/bin/detect",
    "python/bin/compile",
    "python/bin/release",
    "node/bin/detect",
    "node/bin/compile",
    "node/bin/release",
    "go/bin/detect",
    "go/bin/compile",
    "go/bin/release",
    "static/bin/detect",
    "static/bin/compile",
    "static/bin/release",
    "procfile/bin/detect",
    "procfile/bin/compile",
    "procfile/bin/release",
    "python/export",
    "node/export",
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
    fn reads_wanted_versions() {
        use super::Wanted::*;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("runtime.txt", "python-3.11.9\n");
        write("package.json", r#"{"engines": {"node": "18.x"}}"#);
        write("go.mod", "module example.com/x\n\ngo 1.22.3\n");
        assert_eq!(
            super::wanted_versions(dir.path()).unwrap(),
            [
                Python("3.11.9".into()),
                Node("18".into()),
                Go("1.22".into())
            ]
        );
        write(".python-version", "3.13\n");
        write("package.json", r#"{"engines": {"node": ">=18"}}"#);
        assert_eq!(
            super::wanted_versions(dir.path()).unwrap()[..2],
            [Python("3.13".into()), Go("1.22".into())]
        );
        for (spec, major) in [
            ("20", Some("20")),
            ("^18.2", Some("18")),
            ("v16", Some("16")),
            (">=18", None),
            ("*", None),
        ] {
            assert_eq!(super::node_major(spec).as_deref(), major, "{spec}");
        }
    }

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
            if path.contains("/bin/") {
                assert!(contents.starts_with("#!"), "{path} needs a shebang");
            }
        }
    }
}
