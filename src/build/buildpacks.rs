//! The built-in buildpacks (`buildpacks/` in the source tree), compiled into the binary so that
//! berth stays one file, and written out to `DATA/buildpacks` when the server starts; and which
//! stack a buildpack build uses (`BERTH_STACK`, else the runtime versions the app asks for).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Config;
use crate::image::stack::{self, Stack, Wanted};
use crate::image::{ImageError, ImageStore, Layer};
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

/// A folder of the built app that a buildpack declared as a dependency layer (a line
/// `FOLDER KEY` in the build's `/out/layers`: `.venv 3f2a…`), packed as its own layer and reused
/// as it is by later builds of the app that declare the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyLayer {
    /// One path component under /app, e.g. `.venv` or `node_modules`.
    pub folder: String,
    pub key: String,
}

/// The dependency layers a build declared; lines that are not a plain folder name and a key
/// of letters, digits and `-` (at most 128) are ignored.
pub fn declared_layers(out_dir: &Path) -> Result<Vec<DependencyLayer>, TreeError> {
    let Some(text) = tree::read_file(out_dir, "layers")? else {
        return Ok(Vec::new());
    };
    let mut layers: Vec<DependencyLayer> = Vec::new();
    for line in text.lines() {
        let Some((folder, key)) = line.trim().split_once(' ') else {
            continue;
        };
        let folder_ok = !matches!(folder, "" | "." | "..") && !folder.contains(['/', '\\', '\0']);
        let key_ok = (1..=128).contains(&key.len())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if folder_ok && key_ok && !layers.iter().any(|l| l.folder == folder) {
            layers.push(DependencyLayer {
                folder: folder.to_string(),
                key: key.to_string(),
            });
        }
    }
    Ok(layers)
}

/// What became of a declared dependency layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dependency {
    /// Taken out of the app into a layer of its own.
    Layer(Layer),
    /// Not a directory or a link: left in the app layer.
    Kept,
    /// A link into the build cache (the buildpack reused its cache without copying) whose
    /// layer the store no longer has: the cache must be dropped and the app built again.
    Stale,
}

/// Takes `declared`'s folder out of the built app `source` as its own layer (under
/// `/app/FOLDER`): the layer an earlier build stored for the same key (recorded in `memo`, a
/// folder builds cannot write) when the store still has it — no tar, no hashing, and the folder
/// may then be a link into the build cache — else the folder packed now and recorded.
pub fn dependency_layer(
    images: &ImageStore,
    source: &Path,
    memo: &Path,
    declared: &DependencyLayer,
) -> Result<Dependency, ImageError> {
    let folder = source.join(&declared.folder);
    let Ok(meta) = std::fs::symlink_metadata(&folder) else {
        return Ok(Dependency::Kept);
    };
    let record = memo.join(&declared.key);
    let known = std::fs::read_to_string(&record)
        .ok()
        .and_then(|digest| images.layer(digest.trim()).ok());
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io {
            action,
            path,
            source,
        }
    };
    match known {
        Some(layer) if meta.is_dir() || meta.is_symlink() => {
            // The build's copy or link is not needed: moved into the build's scratch folder,
            // which is removed after the build.
            let unused = source.with_file_name(format!("unused-{}", declared.folder));
            std::fs::rename(&folder, &unused).map_err(io("moving", &folder))?;
            Ok(Dependency::Layer(layer))
        }
        None if meta.is_symlink() => Ok(Dependency::Stale),
        None if meta.is_dir() => {
            let layer = images.layer_from_dir(&folder, &format!("app/{}", declared.folder))?;
            std::fs::create_dir_all(memo).map_err(io("creating", memo))?;
            std::fs::write(&record, &layer.digest).map_err(io("recording", &record))?;
            Ok(Dependency::Layer(layer))
        }
        _ => Ok(Dependency::Kept),
    }
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
    use super::*;

    #[test]
    fn dependency_layers_are_declared_packed_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(
            out.join("layers"),
            ".venv abc-1\n../x k\na/b k\nnode_modules bad key!\n.venv again-2\nnode_modules nm-1\n",
        )
        .unwrap();
        let declared = declared_layers(&out).unwrap();
        let layer = |folder: &str, key: &str| DependencyLayer {
            folder: folder.into(),
            key: key.into(),
        };
        assert_eq!(
            declared,
            [layer(".venv", "abc-1"), layer("node_modules", "nm-1")]
        );

        let images = ImageStore::open(&dir.path().join("images")).unwrap();
        let memo = dir.path().join("memo");
        let build = |n: u32| {
            let source = dir.path().join(format!("build{n}/src"));
            std::fs::create_dir_all(source.join(".venv/bin")).unwrap();
            std::fs::write(source.join(".venv/bin/tool"), format!("build {n}")).unwrap();
            let got = dependency_layer(&images, &source, &memo, &declared[0]).unwrap();
            assert!(!source.join(".venv").exists(), "taken out of the app layer");
            assert_eq!(
                dependency_layer(&images, &source, &memo, &declared[1]).unwrap(),
                Dependency::Kept
            );
            match got {
                Dependency::Layer(layer) => layer,
                other => panic!("{other:?}"),
            }
        };
        let first = build(1);
        assert_eq!(
            std::fs::read_to_string(first.dir.join("app/.venv/bin/tool")).unwrap(),
            "build 1"
        );
        // The same key: the stored layer, as it was (the build's copy is not packed).
        assert_eq!(build(2), first);
        // A link into the cache stands for the stored layer…
        let source = dir.path().join("build3/src");
        std::fs::create_dir_all(&source).unwrap();
        std::os::unix::fs::symlink("/cache/python/venv", source.join(".venv")).unwrap();
        assert_eq!(
            dependency_layer(&images, &source, &memo, &declared[0]).unwrap(),
            Dependency::Layer(first.clone())
        );
        // …but not once the store lost it; a folder is packed again then.
        std::fs::write(memo.join("abc-1"), "sha256:0000").unwrap();
        std::os::unix::fs::symlink("/cache/python/venv", source.join(".venv")).unwrap();
        assert_eq!(
            dependency_layer(&images, &source, &memo, &declared[0]).unwrap(),
            Dependency::Stale
        );
        assert_ne!(build(4).digest, first.digest);
    }
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
