//! Bare git repos per app: where they live, creating them with the pre-receive hook installed,
//! deleting them, reading the `git-receive-pack` command an SSH client sends, and writing the tree
//! of a pushed commit into a directory (called from inside the pre-receive hook).
//!
//! This module owns `REPOS_DIR/APP.git` and nothing else. It never speaks the git wire protocol
//! (the real `git-receive-pack` does, spawned by [`crate::ssh`]) and never talks to the store or
//! the daemon: the hook command it installs is given by the caller.

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{open, openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::symlinkat;

/// What went wrong with a repo, a push command or a checkout. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("only git push is allowed here (got {command:?}) — push with: git push deploy main")]
    NotAPush { command: String },
    #[error(
        "{name:?} is not a valid app name — use 1 to 63 lowercase letters, digits and dashes, \
         starting with a letter"
    )]
    BadAppName { name: String },
    #[error(
        "could not {action} {path}: {source} — check that the directory exists and is writable"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "git could not {action} {path}: {source} — check that it is a bare repo made by berth"
    )]
    Repo {
        action: &'static str,
        path: PathBuf,
        source: git2::Error,
    },
    #[error("commit {rev:?} is not in {repo}: {source} — push it first")]
    NoSuchCommit {
        rev: String,
        repo: PathBuf,
        source: git2::Error,
    },
    #[error("the pushed tree has an unsafe path {name:?} — rename it and push again")]
    UnsafePath { name: String },
}

/// Where the bare repo of `app` lives: `repos_dir/APP.git`.
pub fn repo_path(repos_dir: &Path, app: &str) -> PathBuf {
    repos_dir.join(format!("{app}.git"))
}

/// The hooks berth installs: `pre-receive` builds and checks a pushed commit, `post-receive`
/// (which git runs only once the ref is updated) makes it live.
pub const HOOKS: [&str; 2] = ["pre-receive", "post-receive"];

/// Creates the bare repo of `app` (HEAD → `refs/heads/main`) and installs the [`HOOKS`], each
/// running `hook_command HOOK` through `/bin/sh`. Safe to call again on an existing repo: it
/// keeps the history and rewrites the hooks (e.g. after the berth binary moved).
pub fn create_repo(repos_dir: &Path, app: &str, hook_command: &str) -> Result<PathBuf, GitError> {
    check_app_name(app)?;
    let path = repo_path(repos_dir, app);
    let mut opts = git2::RepositoryInitOptions::new();
    opts.bare(true).mkpath(true).initial_head("main");
    git2::Repository::init_opts(&path, &opts).map_err(|source| GitError::Repo {
        action: "create a bare repo in",
        path: path.clone(),
        source,
    })?;

    let hooks = path.join("hooks");
    let io_err = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| GitError::Io {
            action,
            path,
            source,
        }
    };
    fs::create_dir_all(&hooks).map_err(io_err("create", &hooks))?;
    for name in HOOKS {
        // Write next to the hook and rename, so a push never sees a half-written hook.
        let hook = hooks.join(name);
        let tmp = hooks.join(format!("{name}.tmp"));
        let mut file = fs::File::create(&tmp).map_err(io_err("write", &tmp))?;
        file.write_all(format!("#!/bin/sh\nexec {hook_command} {name}\n").as_bytes())
            .and_then(|()| file.set_permissions(fs::Permissions::from_mode(0o755)))
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &hook).map_err(io_err("install", &hook))?;
    }
    Ok(path)
}

/// Deletes the bare repo of `app`. A repo that is already gone is not an error.
pub fn delete_repo(repos_dir: &Path, app: &str) -> Result<(), GitError> {
    check_app_name(app)?;
    let path = repo_path(repos_dir, app);
    match fs::remove_dir_all(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(GitError::Io {
            action: "delete",
            path,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Reads the command an SSH client asks to run and returns the app it pushes to.
///
/// Accepts `git-receive-pack 'APP'` (or `git receive-pack`), where `'APP'` may also be `'/APP'`,
/// `'APP.git'` or `'/APP.git'`, as git sends for `ssh://git@host/APP` and `git@host:APP` remotes.
pub fn parse_receive_pack(command: &str) -> Result<String, GitError> {
    let not_a_push = || GitError::NotAPush {
        command: command.to_string(),
    };
    let quoted = command
        .strip_prefix("git-receive-pack ")
        .or_else(|| command.strip_prefix("git receive-pack "))
        .ok_or_else(not_a_push)?;
    let path = quoted
        .strip_prefix('\'')
        .and_then(|rest| rest.strip_suffix('\''))
        .filter(|path| !path.contains('\''))
        .ok_or_else(not_a_push)?;
    let path = path.strip_prefix('/').unwrap_or(path);
    let name = path.strip_suffix(".git").unwrap_or(path);
    check_app_name(name)?;
    Ok(name.to_string())
}

/// Writes the tree of commit `rev` of `repo` into `dest` (created if missing; must not already
/// hold any of the files) and returns `"<short sha> <first line of the message>"`.
///
/// Made to run inside the pre-receive hook: the pushed objects are then only visible through
/// git's quarantine directories (`GIT_OBJECT_DIRECTORY`, `GIT_ALTERNATE_OBJECT_DIRECTORIES`),
/// which are added to the repo's object database when set. Regular files keep their exec bit,
/// symlinks stay symlinks (never followed while writing: see [`write_tree`]), submodules are
/// skipped.
pub fn checkout(repo: &Path, rev: &str, dest: &Path) -> Result<String, GitError> {
    let repository = open_with_quarantine(repo)?;
    let commit = repository
        .revparse_single(rev)
        .and_then(|object| object.peel_to_commit())
        .map_err(|source| GitError::NoSuchCommit {
            rev: rev.to_string(),
            repo: repo.to_path_buf(),
            source,
        })?;
    let tree = commit.tree().map_err(|source| GitError::Repo {
        action: "read the tree of the pushed commit in",
        path: repo.to_path_buf(),
        source,
    })?;
    fs::create_dir_all(dest).map_err(|source| GitError::Io {
        action: "create",
        path: dest.to_path_buf(),
        source,
    })?;
    let dest_dir = open(
        dest,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| GitError::Io {
        action: "open",
        path: dest.to_path_buf(),
        source: errno.into(),
    })?;
    write_tree(&repository, &tree, &dest_dir, dest)?;

    let sha = commit.id().to_string();
    let subject = String::from_utf8_lossy(commit.summary_bytes().unwrap_or_default());
    Ok(format!("{} {subject}", &sha[..7]))
}

fn open_with_quarantine(repo: &Path) -> Result<git2::Repository, GitError> {
    let repo_err = |action| {
        move |source| GitError::Repo {
            action,
            path: repo.to_path_buf(),
            source,
        }
    };
    let repository = git2::Repository::open_bare(repo).map_err(repo_err("open"))?;
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("GIT_OBJECT_DIRECTORY") {
        dirs.push(dir.into());
    }
    if let Some(list) = std::env::var_os("GIT_ALTERNATE_OBJECT_DIRECTORIES") {
        dirs.extend(std::env::split_paths(&list));
    }
    if !dirs.is_empty() {
        let odb = repository.odb().map_err(repo_err("open the objects of"))?;
        for dir in dirs.iter().filter(|dir| !dir.as_os_str().is_empty()) {
            // Relative paths are relative to the repo (git runs hooks with the repo as cwd).
            let dir = repo.join(dir);
            odb.add_disk_alternate(&dir.to_string_lossy())
                .map_err(repo_err("add the quarantine objects to"))?;
        }
    }
    Ok(repository)
}

/// Writes `tree` into the directory open as `dir` (at `path`, for messages). Every entry is
/// created relative to `dir` and must not exist yet: directories with `mkdirat`, files with
/// `O_CREAT | O_EXCL | O_NOFOLLOW`, links with `symlinkat`, and subdirectories are entered with
/// `O_NOFOLLOW`. So no entry is ever written through a symlink, whatever the tree holds (a
/// hostile client can push a raw tree with the same name twice, a link and then a directory).
fn write_tree(
    repo: &git2::Repository,
    tree: &git2::Tree,
    dir: &OwnedFd,
    path: &Path,
) -> Result<(), GitError> {
    for entry in tree.iter() {
        let name = String::from_utf8_lossy(entry.name_bytes()).into_owned();
        // The names git itself refuses to check out: they would escape dest or fake a repo.
        let unsafe_name = name.is_empty()
            || name == "."
            || name == ".."
            || name.eq_ignore_ascii_case(".git")
            || name.contains('/');
        if unsafe_name {
            return Err(GitError::UnsafePath { name });
        }
        let path = path.join(&name);
        let sys_err = |errno: Errno| match errno {
            // Something is there already: the tree names it twice.
            Errno::EEXIST | Errno::ELOOP | Errno::ENOTDIR => {
                GitError::UnsafePath { name: name.clone() }
            }
            errno => GitError::Io {
                action: "write",
                path: path.clone(),
                source: errno.into(),
            },
        };
        let object_err = |source| GitError::Repo {
            action: "read the pushed objects in",
            path: repo.path().to_path_buf(),
            source,
        };
        match entry.kind() {
            Some(git2::ObjectType::Tree) => {
                let subtree = repo.find_tree(entry.id()).map_err(object_err)?;
                mkdirat(dir, name.as_str(), Mode::from_bits_truncate(0o777)).map_err(sys_err)?;
                let subdir = openat(
                    dir,
                    name.as_str(),
                    OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(sys_err)?;
                write_tree(repo, &subtree, &subdir, &path)?;
            }
            Some(git2::ObjectType::Blob) => {
                let blob = repo.find_blob(entry.id()).map_err(object_err)?;
                if entry.filemode() == i32::from(git2::FileMode::Link) {
                    symlinkat(blob.content(), dir, name.as_str()).map_err(sys_err)?;
                } else {
                    let mode = if entry.filemode() == i32::from(git2::FileMode::BlobExecutable) {
                        0o755
                    } else {
                        0o644
                    };
                    let fd = openat(
                        dir,
                        name.as_str(),
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )
                    .map_err(sys_err)?;
                    let mut file = fs::File::from(fd);
                    file.write_all(blob.content())
                        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
                        .map_err(|source| GitError::Io {
                            action: "write",
                            path: path.clone(),
                            source,
                        })?;
                }
            }
            // Submodules (commit entries) are not part of the pushed tree's content.
            _ => {}
        }
    }
    Ok(())
}

fn check_app_name(name: &str) -> Result<(), GitError> {
    crate::app::validate(name).map_err(|_| GitError::BadAppName {
        name: name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_receive_pack_accepts_push_commands_only() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        let ok: &[(&str, &str)] = &[
            ("git-receive-pack 'hello'", "hello"),
            ("git-receive-pack '/hello'", "hello"),
            ("git-receive-pack 'hello.git'", "hello"),
            ("git-receive-pack '/hello.git'", "hello"),
            ("git receive-pack '/hello.git'", "hello"),
            ("git-receive-pack 'my-app-2'", "my-app-2"),
            ("git-receive-pack 'a'", "a"),
        ];
        for (command, app) in ok {
            assert_eq!(parse_receive_pack(command).unwrap(), *app, "{command}");
        }
        let long_command = format!("git-receive-pack '{long}'");
        assert_eq!(parse_receive_pack(&long_command).unwrap(), long);

        let too_long_command = format!("git-receive-pack '{too_long}'");
        let bad: &[&str] = &[
            "git-upload-pack 'hello'",
            "git-upload-archive 'hello'",
            "ls",
            "",
            "git-receive-pack",
            "git-receive-pack ''",
            "git-receive-pack hello",
            "git-receive-pack 'hello",
            "git-receive-pack 'Hello'",
            "git-receive-pack '../hello'",
            "git-receive-pack '/../hello.git'",
            "git-receive-pack 'a/b'",
            "git-receive-pack '//hello'",
            "git-receive-pack 'hello.git.git'",
            "git-receive-pack '1app'",
            "git-receive-pack '-app'",
            "git-receive-pack 'hello'; rm -rf /",
            "git-receive-pack 'hel'lo'",
            "git-receive-pack 'hello;ls'",
            "git-receive-pack '$(ls)'",
            "git-receive-pack \"hello\"",
            "git-receive-pack  'hello'",
            "sh -c \"git-receive-pack 'hello'\"",
            &too_long_command,
        ];
        for command in bad {
            assert!(
                parse_receive_pack(command).is_err(),
                "{command:?} was accepted"
            );
        }
    }

    #[test]
    fn parse_receive_pack_errors_say_what_was_refused() {
        let err = parse_receive_pack("ls").unwrap_err().to_string();
        assert_eq!(
            err,
            "only git push is allowed here (got \"ls\") — push with: git push deploy main"
        );
        let err = parse_receive_pack("git-receive-pack 'Hello'")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("\"Hello\" is not a valid app name"),
            "{err}"
        );
    }

    #[test]
    fn create_repo_installs_the_hook_and_delete_repo_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = create_repo(dir.path(), "hello", "'/bin/berth' hook").unwrap();
        assert_eq!(path, dir.path().join("hello.git"));
        let repo = git2::Repository::open_bare(&path).unwrap();
        assert_eq!(
            repo.find_reference("HEAD").unwrap().symbolic_target_bytes(),
            Some(&b"refs/heads/main"[..])
        );
        for name in HOOKS {
            let hook = path.join("hooks").join(name);
            assert_eq!(
                fs::read_to_string(&hook).unwrap(),
                format!("#!/bin/sh\nexec '/bin/berth' hook {name}\n")
            );
            assert_eq!(
                fs::metadata(&hook).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        let hook = path.join("hooks/post-receive");

        // Again: the hook is rewritten, nothing else breaks.
        create_repo(dir.path(), "hello", "/new/berth hook").unwrap();
        assert!(fs::read_to_string(&hook).unwrap().contains("/new/berth"));

        assert!(create_repo(dir.path(), "../evil", "true").is_err());
        delete_repo(dir.path(), "hello").unwrap();
        assert!(!path.exists());
        delete_repo(dir.path(), "hello").unwrap();
    }

    #[test]
    fn checkout_writes_files_exec_bits_symlinks_and_subdirs() {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init_bare(dir.path().join("r.git")).unwrap();
        let blob = |content: &[u8]| repo.blob(content).unwrap();
        let mut sub = repo.treebuilder(None).unwrap();
        sub.insert("inner.txt", blob(b"inner\n"), 0o100644).unwrap();
        let sub = sub.write().unwrap();
        // A submodule entry points at a commit that is not in this repo.
        let submodule = git2::Oid::from_str("0123456789012345678901234567890123456789").unwrap();
        let mut root = repo.treebuilder(None).unwrap();
        root.insert("README", blob(b"hi\n"), 0o100644).unwrap();
        root.insert("run.sh", blob(b"#!/bin/sh\n"), 0o100755)
            .unwrap();
        root.insert("link", blob(b"README"), 0o120000).unwrap();
        root.insert("sub", sub, 0o040000).unwrap();
        root.insert("vendor", submodule, 0o160000).unwrap();
        let tree = repo.find_tree(root.write().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let commit = repo
            .commit(Some("HEAD"), &sig, &sig, "First line\n\nbody", &tree, &[])
            .unwrap();

        let dest = dir.path().join("out");
        let described = checkout(repo.path(), "HEAD", &dest).unwrap();
        assert_eq!(
            described,
            format!("{} First line", &commit.to_string()[..7])
        );

        assert_eq!(fs::read_to_string(dest.join("README")).unwrap(), "hi\n");
        assert_eq!(
            fs::read_to_string(dest.join("sub/inner.txt")).unwrap(),
            "inner\n"
        );
        let mode = |p: &str| fs::metadata(dest.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(mode("README"), 0o644);
        assert_eq!(
            fs::read_link(dest.join("link")).unwrap(),
            Path::new("README")
        );
        assert!(!dest.join("vendor").exists());

        let missing = checkout(repo.path(), "refs/heads/nope", &dir.path().join("x"));
        assert!(matches!(missing, Err(GitError::NoSuchCommit { .. })));
    }

    /// Commits the raw tree object `raw` (as a hostile client could push it; libgit2's tree
    /// builder refuses such trees) and checks it out under `out`.
    fn checkout_raw_tree(
        repo: &git2::Repository,
        raw: &[u8],
        out: &Path,
    ) -> Result<String, GitError> {
        let tree_id = repo
            .odb()
            .unwrap()
            .write(git2::ObjectType::Tree, raw)
            .unwrap();
        let tree = repo.find_tree(tree_id).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        let commit = repo.commit(None, &sig, &sig, "evil", &tree, &[]).unwrap();
        checkout(
            repo.path(),
            &commit.to_string(),
            &out.join(commit.to_string()),
        )
    }

    #[test]
    fn checkout_refuses_trees_that_would_escape_dest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = git2::Repository::init_bare(dir.path().join("r.git")).unwrap();
        let blob = repo.blob(b"x").unwrap();
        for name in ["..", ".", ".git", ".GIT", "a/b"] {
            // libgit2's tree builder refuses these names, so write the raw tree object,
            // as a hostile client could push it.
            let mut raw = format!("100644 {name}\0").into_bytes();
            raw.extend_from_slice(blob.as_bytes());
            let result = checkout_raw_tree(&repo, &raw, &dir.path().join("out"));
            assert!(
                matches!(&result, Err(GitError::UnsafePath { name: n }) if n == name),
                "{name:?}: {result:?}"
            );
        }
    }

    #[test]
    fn checkout_never_writes_through_a_symlink() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let repo = git2::Repository::init_bare(dir.path().join("r.git")).unwrap();
        let file = repo.blob(b"pwned").unwrap();
        let mut sub = repo.treebuilder(None).unwrap();
        sub.insert("x", file, 0o100644).unwrap();
        let sub = sub.write().unwrap();
        let outside_file = outside.join("f");
        let link = |target: &Path| repo.blob(target.as_os_str().as_bytes()).unwrap();
        let (to_dir, to_file) = (link(&outside), link(&outside_file));
        // Raw trees naming an entry twice, as a hostile client can push them (libgit2's tree
        // builder and git fsck refuse them; receive-pack does not check by default).
        let cases: &[(&str, &[(&str, git2::Oid)])] = &[
            // A link to a host directory, then a directory of the same name.
            ("a", &[("120000", to_dir), ("40000", sub)]),
            // A link to a host file, then a file of the same name.
            ("f", &[("120000", to_file), ("100644", file)]),
            // A directory, then a link of the same name.
            ("d", &[("40000", sub), ("120000", to_dir)]),
        ];
        for (name, entries) in cases {
            let mut raw = Vec::new();
            for (mode, oid) in *entries {
                raw.extend_from_slice(format!("{mode} {name}\0").as_bytes());
                raw.extend_from_slice(oid.as_bytes());
            }
            let result = checkout_raw_tree(&repo, &raw, &dir.path().join("out"));
            assert!(
                matches!(&result, Err(GitError::UnsafePath { name: n }) if n == name),
                "{name:?}: {result:?}"
            );
            let written: Vec<_> = fs::read_dir(&outside).unwrap().collect();
            assert!(written.is_empty(), "{name:?} wrote outside: {written:?}");
        }
    }
}
