//! What `COPY` and `ADD` read: the build context (the pushed tree less `.dockerignore`), a
//! stage's or image's layers (`--from`), and how copied files land in a staging folder that
//! becomes a layer. The pushed tree is untrusted: nothing here follows a symlink out of it
//! (a symlink is copied as a link; a source path through a symlink is refused), and layer
//! files are looked up without following links either.
//!
//! Owns the copying and the content hash of what was copied; must not run anything.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{chown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use globset::GlobMatcher;
use sha2::{Digest, Sha256};

/// The `.dockerignore` rules of a context: later rules win; `!` re-includes.
#[derive(Debug, Default)]
pub struct Ignore {
    rules: Vec<(GlobMatcher, bool)>,
}

impl Ignore {
    /// Parses `.dockerignore` text. Errors name the line.
    pub fn parse(text: &str) -> Result<Ignore, String> {
        let mut rules = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (negated, pattern) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let pattern = clean(pattern);
            // `*` does not cross `/`, as in Docker (Go's filepath.Match).
            let glob = globset::GlobBuilder::new(&pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| format!(".dockerignore line {}: {e}: {line}", n + 1))?
                .compile_matcher();
            rules.push((glob, negated));
        }
        Ok(Ignore { rules })
    }

    /// Whether `path` (relative to the context) is left out: the last rule matching it or one
    /// of its parent folders decides.
    pub fn excludes(&self, path: &Path) -> bool {
        let mut excluded = false;
        for (glob, negated) in &self.rules {
            let mut prefix = PathBuf::new();
            let hit = path.components().any(|c| {
                prefix.push(c);
                glob.is_match(&prefix)
            });
            if hit {
                excluded = !negated;
            }
        }
        excluded
    }
}

/// A path as written in a Dockerfile or `.dockerignore`, made relative and cleaned of `.`/`..`
/// (never above the root).
pub fn clean(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn has_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// The context paths `source` names: itself, or what its glob matches (sorted). A path through
/// a symlink is refused.
pub fn context_sources(
    context: &Path,
    ignore: &Ignore,
    source: &str,
) -> Result<Vec<PathBuf>, String> {
    let source = clean(source);
    if !has_glob(&source) {
        let rel = PathBuf::from(&source);
        check_no_link_on_the_way(context, &rel)?;
        if fs::symlink_metadata(context.join(&rel)).is_err()
            || (!rel.as_os_str().is_empty() && ignore.excludes(&rel))
        {
            return Err(format!(
                "`{source}` is not in the pushed tree (or .dockerignore leaves it out)"
            ));
        }
        return Ok(vec![rel]);
    }
    let glob = globset::GlobBuilder::new(&source)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("bad pattern `{source}`: {e}"))?
        .compile_matcher();
    let mut found = Vec::new();
    walk(context, Path::new(""), &mut |rel, _| {
        if glob.is_match(rel) && !ignore.excludes(rel) {
            found.push(rel.to_path_buf());
        }
    })
    .map_err(|e| format!("reading the pushed tree: {e}"))?;
    found.sort();
    if found.is_empty() {
        return Err(format!("no file in the pushed tree matches `{source}`"));
    }
    Ok(found)
}

/// Refuses a relative path whose parent components include a symlink.
fn check_no_link_on_the_way(root: &Path, rel: &Path) -> Result<(), String> {
    let mut path = root.to_path_buf();
    let parents: Vec<_> = rel.components().collect();
    for c in parents.iter().take(parents.len().saturating_sub(1)) {
        path.push(c);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "`{}` goes through the symlink `{}`; berth copies only from inside the pushed tree",
                rel.display(),
                path.strip_prefix(root).unwrap_or(&path).display()
            ));
        }
    }
    Ok(())
}

/// Calls `f` for every entry under `root/rel` (not following symlinks), parents first.
fn walk(root: &Path, rel: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) -> io::Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let child = rel.join(entry.file_name());
        let meta = fs::symlink_metadata(root.join(&child))?;
        f(&child, &meta);
        if meta.is_dir() {
            walk(root, &child, f)?;
        }
    }
    Ok(())
}

/// Ownership and mode for copied files.
#[derive(Clone, Copy, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    /// `--chmod`: applied to every copied file and folder.
    pub mode: Option<u32>,
}

/// Copies `src` (a file, link or folder, not followed) to `dst`, skipping what `skip` says
/// (relative to `src`'s folder tree), then sets owner and mode.
pub fn copy_tree(
    src: &Path,
    dst: &Path,
    owner: Owner,
    skip: &dyn Fn(&Path) -> bool,
) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    if meta.is_dir() {
        fs::create_dir_all(dst)?;
        let mut err = Ok(());
        walk(src, Path::new(""), &mut |rel, m| {
            if err.is_err()
                || rel
                    .ancestors()
                    .any(|a| !a.as_os_str().is_empty() && skip(a))
            {
                return;
            }
            err = copy_one(&src.join(rel), &dst.join(rel), m, owner);
        })?;
        err?;
    }
    // The folder itself last, so its mode cannot block its children.
    copy_one(src, dst, &meta, owner)
}

fn copy_one(src: &Path, dst: &Path, meta: &fs::Metadata, owner: Owner) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let _ = fs::remove_file(dst);
        symlink(fs::read_link(src)?, dst)?;
        return std::os::unix::fs::lchown(dst, Some(owner.uid), Some(owner.gid));
    }
    if ft.is_dir() {
        fs::create_dir_all(dst)?;
    } else if ft.is_file() {
        let _ = fs::remove_file(dst);
        fs::copy(src, dst)?;
    } else {
        // Sockets, fifos, devices (and overlay whiteouts): not copied.
        return Ok(());
    }
    chown(dst, Some(owner.uid), Some(owner.gid))?;
    let mode = owner.mode.unwrap_or(meta.mode() & 0o7777);
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))
}

/// Where `path` (absolute, in the image) is found in `layers` (top-most first): the top-most
/// layer holding it, unless a whiteout above hides it. Symlinks are not followed.
pub fn find_in_layers(layers: &[PathBuf], path: &str) -> Option<PathBuf> {
    let rel = clean(path);
    for layer in layers {
        let candidate = layer.join(&rel);
        if let Ok(meta) = fs::symlink_metadata(&candidate) {
            // An overlay whiteout (char device 0:0) hides lower layers.
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                return None;
            }
            return Some(candidate);
        }
    }
    None
}

/// Resolves symlinks in the folders of `path` inside the image made of `layers`, as Docker
/// does for a `COPY` destination (so `/bin/x` on a merged-/usr Debian lands in `/usr/bin/x`
/// instead of hiding the `/bin` link). Links resolve within the image root, never the host's.
pub fn resolve_in_image(layers: &[PathBuf], path: &str) -> String {
    let mut resolved: Vec<String> = Vec::new();
    let mut todo: Vec<String> = clean(path).split('/').rev().map(String::from).collect();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => resolved.push(part),
        }
        // The last component stays as written (it is what gets created or replaced).
        if todo.iter().all(String::is_empty) {
            break;
        }
        let here = format!("/{}", resolved.join("/"));
        let Some(found) = find_in_layers(layers, &here) else {
            continue;
        };
        let Ok(target) = fs::read_link(&found) else {
            continue;
        };
        hops += 1;
        if hops > 40 {
            break;
        }
        resolved.pop();
        let target = target.to_string_lossy().into_owned();
        if target.starts_with('/') {
            resolved.clear();
        }
        for part in target.split('/').rev() {
            todo.push(part.to_string());
        }
    }
    format!("/{}", resolved.join("/"))
}

/// Whether `path` exists in the image made of `layers`.
pub fn exists_in_image(layers: &[PathBuf], path: &str) -> bool {
    find_in_layers(layers, &resolve_in_image(layers, path)).is_some()
}

/// Copies `path` out of the image made of `layers` (top-most first) to `dst`, merging a folder
/// over all layers that hold it.
pub fn copy_from_layers(
    layers: &[PathBuf],
    path: &str,
    dst: &Path,
    owner: Owner,
) -> Result<(), String> {
    let path = resolve_in_image(layers, path);
    let top = find_in_layers(layers, &path)
        .ok_or_else(|| format!("`{path}` is not in that image or stage"))?;
    let is_dir = fs::symlink_metadata(&top).is_ok_and(|m| m.is_dir());
    let rel = clean(&path);
    let err = |e: io::Error| format!("copying `{path}`: {e}");
    if !is_dir {
        return copy_tree(&top, dst, owner, &|_| false).map_err(err);
    }
    for layer in layers.iter().rev() {
        let here = layer.join(&rel);
        if fs::symlink_metadata(&here).is_ok_and(|m| m.is_dir()) {
            copy_tree(&here, dst, owner, &|_| false).map_err(err)?;
        }
    }
    Ok(())
}

/// A hash of everything in `dir` that ends up in a layer: names, types, modes, owners,
/// contents and link targets. The cache key of a `COPY`.
pub fn hash_tree(dir: &Path) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut err = Ok(());
    walk(dir, Path::new(""), &mut |rel, meta| {
        if err.is_err() {
            return;
        }
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update(
            format!(
                "\0{:o}:{}:{}:{}\0",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.len()
            )
            .as_bytes(),
        );
        let path = dir.join(rel);
        if meta.file_type().is_symlink() {
            match fs::read_link(&path) {
                Ok(t) => hasher.update(t.as_os_str().as_encoded_bytes()),
                Err(e) => err = Err(e),
            }
        } else if meta.is_file() {
            err = fs::File::open(&path).and_then(|mut f| {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    hasher.update(&buf[..n]);
                }
            });
        }
    })?;
    err?;
    Ok(hex::encode(hasher.finalize()))
}

/// A `--chown` value (`user[:group]`, names or numbers) resolved with the image's
/// `/etc/passwd` and `/etc/group` (read without following links).
pub fn owner(layers: &[PathBuf], spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let found = find_in_layers(layers, file)?;
        let dir = found.parent()?;
        let text = crate::tree::read_file(dir, found.file_name()?.to_str()?).ok()??;
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name)).then(|| {
                let id = fields.get(2)?.parse().ok()?;
                let gid = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((id, gid))
            })?
        })
    };
    let (uid, default_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => lookup("/etc/passwd", user)
            .ok_or_else(|| format!("no user `{user}` in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                lookup("/etc/group", g)
                    .ok_or_else(|| format!("no group `{g}` in the image's /etc/group"))?
                    .0
            }
        },
    };
    Ok((uid, gid))
}

/// Parses a `--chmod` octal mode.
pub fn mode(spec: &str) -> Result<u32, String> {
    u32::from_str_radix(spec, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("--chmod={spec} is not an octal mode such as 755"))
}

/// Whether `path` is a tar archive ADD unpacks (plain or gzip).
pub fn is_tar(path: &Path) -> bool {
    let Ok(mut file) = fs::File::open(path) else {
        return false;
    };
    let mut head = [0u8; 262];
    let n = file.read(&mut head).unwrap_or(0);
    (n >= 2 && head[..2] == [0x1f, 0x8b]) || (n >= 262 && &head[257..262] == b"ustar")
}

/// Unpacks an ADD tar into `dst` (entries leaving it are refused by the tar crate).
pub fn unpack_tar(path: &Path, dst: &Path) -> io::Result<()> {
    fs::create_dir_all(dst)?;
    let file = fs::File::open(path)?;
    let mut head = [0u8; 2];
    let gz = fs::File::open(path)?.read(&mut head)? == 2 && head == [0x1f, 0x8b];
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        if matches!(
            entry.header().entry_type(),
            tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo
        ) {
            continue;
        }
        entry.unpack_in(dst)?;
    }
    Ok(())
}

/// Which heredoc bodies a COPY names (`<<EOF` sources).
pub fn heredoc_source<'a>(
    source: &str,
    bodies: &'a BTreeMap<String, String>,
) -> Option<(&'a str, &'a str)> {
    let word = source.strip_prefix("<<")?.trim_start_matches('-');
    let word = word.trim_matches(['"', '\'']);
    bodies
        .get_key_value(word)
        .map(|(k, v)| (k.as_str(), v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerignore_rules() {
        let ignore = Ignore::parse("# comment\nnode_modules\n*.log\n!keep.log\n/tmp/**\n").unwrap();
        for (path, excluded) in [
            ("node_modules", true),
            ("node_modules/a/b.js", true),
            ("a.log", true),
            ("keep.log", false),
            ("sub/a.log", false),
            ("tmp/x/y", true),
            ("src/main.c", false),
        ] {
            assert_eq!(ignore.excludes(Path::new(path)), excluded, "{path}");
        }
        assert!(Ignore::parse("a[\n").unwrap_err().contains("line 1"));
    }

    #[test]
    fn sources_stay_in_the_tree_and_hashes_follow_content() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        let tree = tempfile::tempdir().unwrap();
        let ctx = tree.path();
        std::fs::create_dir(ctx.join("src")).unwrap();
        std::fs::write(ctx.join("src/a.c"), "int a;").unwrap();
        std::fs::write(ctx.join("src/b.c"), "int b;").unwrap();
        std::fs::write(ctx.join("src/b.log"), "log").unwrap();
        symlink(outside.path(), ctx.join("out")).unwrap();
        let ignore = Ignore::parse("**/*.log\n").unwrap();
        assert_eq!(
            context_sources(ctx, &ignore, "src/*.c").unwrap(),
            [PathBuf::from("src/a.c"), PathBuf::from("src/b.c")]
        );
        assert!(context_sources(ctx, &ignore, "out/secret")
            .unwrap_err()
            .contains("symlink"));
        assert!(context_sources(ctx, &ignore, "../x").is_err());
        assert!(context_sources(ctx, &ignore, "src/b.log").is_err());

        let staged = tempfile::tempdir().unwrap();
        let dst = staged.path().join("app");
        copy_tree(&ctx.join("src"), &dst, Owner::default(), &|rel| {
            ignore.excludes(&Path::new("src").join(rel))
        })
        .unwrap();
        assert!(dst.join("a.c").exists() && !dst.join("b.log").exists());
        // The link is copied as a link, not followed.
        copy_tree(
            &ctx.join("out"),
            &staged.path().join("out"),
            Owner::default(),
            &|_| false,
        )
        .unwrap();
        assert!(fs::symlink_metadata(staged.path().join("out"))
            .unwrap()
            .file_type()
            .is_symlink());
        let before = hash_tree(staged.path()).unwrap();
        assert_eq!(before, hash_tree(staged.path()).unwrap());
        std::fs::write(dst.join("a.c"), "int A;").unwrap();
        assert_ne!(before, hash_tree(staged.path()).unwrap());
    }

    #[test]
    fn destinations_resolve_links_inside_the_image() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(lower.path().join("usr/bin")).unwrap();
        symlink("usr/bin", lower.path().join("bin")).unwrap();
        symlink("/../../etc", lower.path().join("evil")).unwrap();
        let layers = vec![upper.path().to_path_buf(), lower.path().to_path_buf()];
        assert_eq!(resolve_in_image(&layers, "/bin/tool"), "/usr/bin/tool");
        assert_eq!(resolve_in_image(&layers, "/evil/x"), "/etc/x");
        assert_eq!(resolve_in_image(&layers, "/app/x"), "/app/x");
        assert!(exists_in_image(&layers, "/bin"));
        assert!(!exists_in_image(&layers, "/app"));
    }
}
