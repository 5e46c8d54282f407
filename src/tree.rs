//! Reading files out of an untrusted tree: a pushed checkout, or what a build left in its
//! output folder. Both are written by code berth does not trust, while berth reads them as root,
//! so a file is opened only as a regular file *inside* the tree: never through a symlink in any
//! component (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), never blocking on a FIFO,
//! and read up to [`MAX_FILE_BYTES`].
//!
//! Owns only these reads; must not write into the tree or parse what it reads.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use thiserror::Error;

/// The largest file read from a tree (a Procfile, a `release.yml`).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a file could not be read from a tree. Each message says what to do next.
#[derive(Debug, Error)]
pub enum TreeError {
    #[error(
        "{name} is a symlink; berth reads it only as a regular file inside the repo — replace \
         the link with the file and push again"
    )]
    Symlink { name: String },
    #[error("{name} is not a regular file — make it a plain text file and push again")]
    NotAFile { name: String },
    #[error("{name} is larger than {MAX_FILE_BYTES} bytes — shorten it and push again")]
    TooLarge { name: String },
    #[error("{name} is not UTF-8 text — save it as UTF-8 and push again")]
    NotText { name: String },
    #[error("cannot read {name}: {source} — check the server's disk and permissions")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Reads `dir/name` as UTF-8 text; `None` when there is no such entry.
pub fn read_file(dir: &Path, name: &str) -> Result<Option<String>, TreeError> {
    let Some(file) = open_regular(dir, name)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(name))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TreeError::TooLarge {
            name: name.to_string(),
        });
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| TreeError::NotText {
            name: name.to_string(),
        })
}

/// Whether `dir/name` is a regular file (a symlink is not, wherever it points).
pub fn has_file(dir: &Path, name: &str) -> bool {
    matches!(open_regular(dir, name), Ok(Some(_)))
}

/// Opens `dir/name` for reading, refusing symlinks anywhere on the way and anything but a
/// regular file at the end.
fn open_regular(dir: &Path, name: &str) -> Result<Option<File>, TreeError> {
    let io = io_error(name);
    let dir_fd = nix::fcntl::open(
        dir,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| io(errno.into()))?;
    // O_NONBLOCK: opening a FIFO must not wait for a writer; fstat below refuses it anyway.
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    let fd: OwnedFd = match openat2(&dir_fd, name, how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => {
            return Err(TreeError::Symlink {
                name: name.to_string(),
            })
        }
        Err(errno) => return Err(io_error(name)(errno.into())),
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(io_error(name))?;
    if !meta.is_file() {
        return Err(TreeError::NotAFile {
            name: name.to_string(),
        });
    }
    Ok(Some(file))
}

fn io_error(name: &str) -> impl Fn(std::io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        name: name.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn reads_regular_files_only_inside_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "web: SECRET-MARKER\n").unwrap();
        let tree = tempfile::tempdir().unwrap();
        let dir = tree.path();
        std::fs::write(dir.join("Procfile"), "web: python app.py\n").unwrap();
        symlink(&secret, dir.join("abs-link")).unwrap();
        symlink("Procfile", dir.join("rel-link")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        symlink(outside.path(), dir.join("linked-dir")).unwrap();
        std::fs::write(dir.join("big"), vec![b'x'; MAX_FILE_BYTES as usize + 1]).unwrap();
        std::fs::write(dir.join("max"), vec![b'x'; MAX_FILE_BYTES as usize]).unwrap();
        std::fs::write(dir.join("binary"), [0xff, 0xfe]).unwrap();
        nix::unistd::mkfifo(&dir.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();

        assert_eq!(
            read_file(dir, "Procfile").unwrap().as_deref(),
            Some("web: python app.py\n")
        );
        assert!(read_file(dir, "missing").unwrap().is_none());
        assert_eq!(
            read_file(dir, "max").unwrap().unwrap().len() as u64,
            MAX_FILE_BYTES
        );
        let symlink = |e: &TreeError| matches!(e, TreeError::Symlink { .. });
        let not_a_file = |e: &TreeError| matches!(e, TreeError::NotAFile { .. });
        let refused = [
            (
                "abs-link",
                symlink(&read_file(dir, "abs-link").unwrap_err()),
            ),
            (
                "rel-link",
                symlink(&read_file(dir, "rel-link").unwrap_err()),
            ),
            (
                "linked-dir/secret",
                symlink(&read_file(dir, "linked-dir/secret").unwrap_err()),
            ),
            ("sub", not_a_file(&read_file(dir, "sub").unwrap_err())),
            ("fifo", not_a_file(&read_file(dir, "fifo").unwrap_err())),
            (
                "big",
                matches!(read_file(dir, "big"), Err(TreeError::TooLarge { .. })),
            ),
            (
                "binary",
                matches!(read_file(dir, "binary"), Err(TreeError::NotText { .. })),
            ),
        ];
        for (name, refused_as_expected) in refused {
            assert!(refused_as_expected, "{name}: {:?}", read_file(dir, name));
            let err = read_file(dir, name).unwrap_err().to_string();
            assert!(!err.contains("SECRET-MARKER"), "{err}");
        }
        // RESOLVE_BENEATH: not even `..` leaves the tree.
        assert!(read_file(dir, "../secret").is_err());
        assert_eq!(
            read_file(dir, "abs-link").unwrap_err().to_string(),
            "abs-link is a symlink; berth reads it only as a regular file inside the repo — \
             replace the link with the file and push again"
        );

        assert!(has_file(dir, "Procfile"));
        for name in ["missing", "abs-link", "rel-link", "sub", "fifo"] {
            assert!(!has_file(dir, name), "{name}");
        }
    }
}
