//! The layout of berth's data directory, in one place. Owns path names only; creates nothing
//! but the top-level directories in [`Paths::create`], and clears only build scratch.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// Creates the data directory and its top-level folders (mode 0700 for the root).
    pub fn create(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.root)?;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        for dir in [
            self.repos(),
            self.images(),
            self.containers(),
            self.netns(),
            self.builds(),
            self.caches(),
            self.logs(),
            self.buildpacks(),
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The admin socket (root only): the API as the built-in admin.
    pub fn socket(&self) -> PathBuf {
        self.root.join("berth.sock")
    }

    pub fn database(&self) -> PathBuf {
        self.root.join("berth.db")
    }
    /// The ACME account's credentials (`certs:auto`).
    pub fn acme_account(&self) -> PathBuf {
        self.root.join("acme-account.json")
    }
    pub fn host_key(&self) -> PathBuf {
        self.root.join("ssh_host_ed25519_key")
    }
    /// Bare git repos, `APP.git`.
    pub fn repos(&self) -> PathBuf {
        self.root.join("repos")
    }
    /// The OCI image store.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    /// One directory per container (bundle, shim state).
    pub fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
    /// Named network namespaces of the containers.
    pub fn netns(&self) -> PathBuf {
        self.root.join("netns")
    }
    /// Scratch space of builds in progress.
    pub fn builds(&self) -> PathBuf {
        self.root.join("builds")
    }
    /// Deletes the scratch of builds that were cut short.
    pub fn clear_builds(&self) -> std::io::Result<()> {
        for entry in std::fs::read_dir(self.builds())? {
            std::fs::remove_dir_all(entry?.path())?;
        }
        Ok(())
    }

    pub fn caches(&self) -> PathBuf {
        self.root.join("cache")
    }
    /// The buildpack `CACHE_DIR` of an app, kept between builds.
    pub fn cache(&self, app: &str) -> PathBuf {
        self.caches().join(app)
    }
    /// Which stored layer each dependency layer key of an app's builds gave (one file per key,
    /// holding a layer digest). Beside the app's cache, not in it: builds cannot write here.
    pub fn layer_memo(&self, app: &str) -> PathBuf {
        self.caches().join(format!("{app}.layers"))
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// What each deploy printed, per app and release (`deploy::journal`).
    pub fn outputs(&self) -> PathBuf {
        self.root.join("outputs")
    }
    /// The log of an app: its containers' output.
    pub fn log(&self, app: &str) -> PathBuf {
        self.logs().join(format!("{app}.log"))
    }
    /// The `/etc/resolv.conf` every container gets (`dns`), written at start.
    pub fn resolv_conf(&self) -> PathBuf {
        self.root.join("resolv.conf")
    }
    /// The built-in buildpacks, written out of the binary at start.
    pub fn buildpacks(&self) -> PathBuf {
        self.root.join("buildpacks")
    }
}

/// Writes a secret (a key) to `path` with mode 0600 ([`write_atomic`]).
pub fn write_secret(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic(path, contents, 0o600)
}

/// Writes `contents` to `path` with `mode`: into a temporary file beside it (never readable
/// beyond `mode`), synced, then renamed over it, so a crash never leaves half of it behind.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    // Exactly `mode`, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
