//! Debian's `docker-registry` (the CNCF distribution registry) for the tests of pulls, and an
//! image to put in it: on a free loopback port, its storage in a test's dir, plain HTTP or
//! TLS, asking for an HTTP basic login or for bearer tokens from a token server the test runs.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How the registry wants its clients to log in (each test binary uses one of them).
#[allow(dead_code)]
pub enum Login<'a> {
    /// HTTP basic with this user and password (an htpasswd file made with apache2-utils'
    /// `htpasswd`).
    Basic { user: &'a str, password: &'a str },
    /// Bearer tokens from the token server at `realm`, for the audience `service`, signed by
    /// `issuer` with the key of the certificate (PEM) `cert`.
    Token {
        realm: &'a str,
        service: &'a str,
        issuer: &'a str,
        cert: &'a Path,
    },
}

/// The registry's TLS certificate and key (PEM files).
pub struct Tls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A running `docker-registry`, killed on drop.
pub struct Registry {
    child: Child,
    /// `NAME:PORT`, as references name it.
    pub host: String,
}

/// What a command printed, for a failure's message.
fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Registry {
    /// Starts the registry on `127.0.0.1`, named `name` in references (`127.0.0.1`, or a name
    /// that resolves to it), with its storage in `dir`; waits until it answers.
    pub fn start(dir: &Path, name: &str, login: Login, tls: Option<Tls>) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let auth = match login {
            Login::Basic { user, password } => {
                let htpasswd = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("running htpasswd");
                assert!(htpasswd.status.success(), "htpasswd: {}", said(&htpasswd));
                std::fs::write(dir.join("registry.htpasswd"), &htpasswd.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                    dir.join("registry.htpasswd").display()
                )
            }
            Login::Token {
                realm,
                service,
                issuer,
                cert,
            } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                cert.display()
            ),
        };
        let tls_config = tls.as_ref().map_or(String::new(), |tls| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                tls.cert.display(),
                tls.key.display()
            )
        });
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{tls_config}{auth}",
                dir.join("registry-storage").display(),
            ),
        )
        .unwrap();
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log("registry.log"))
            .stderr(log("registry.err"))
            .spawn()
            .expect("starting docker-registry");
        let registry = Registry {
            child,
            host: format!("{name}:{port}"),
        };
        // Up once it answers at all (401 included: it wants a login).
        let scheme = if tls.is_some() { "https" } else { "http" };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("curl")
                .args([
                    "-sk",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                ])
                .arg(format!("{scheme}://127.0.0.1:{port}/v2/"))
                .output()
                .expect("running curl");
            if matches!(&out.stdout[..], b"200" | b"401") {
                return registry;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer: {}",
                std::fs::read_to_string(dir.join("registry.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Copies the OCI layout `layout` (its tag `tag`) into the registry as `name:tag`, logged
    /// in as `login` (`user:password`).
    pub fn push(&self, layout: &Path, tag: &str, name: &str, login: &str) {
        let out = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--dest-tls-verify=false",
                "--dest-creds",
                login,
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{name}:{tag}", self.host))
            .stdin(Stdio::null())
            .output()
            .expect("running skopeo");
        assert!(out.status.success(), "skopeo copy: {}", said(&out));
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI image layout at `dir` tagged `tag`: one gzip layer holding the host's static
/// busybox as `/bin/busybox` and `/bin/sh`, and `/www`; its command serves `/www` on `$PORT`.
/// Also tagged in two multi-platform indexes: `TAG-multi` (linux/arm64 and linux/amd64) and
/// `TAG-arm` (linux/arm64 only).
pub fn busybox_layout(dir: &Path, tag: &str) {
    use sha2::Digest;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = hex::encode(sha2::Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir_entry = |path: &str| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        tar.append_data(&mut header, path, std::io::empty())
            .unwrap();
    };
    dir_entry("bin");
    dir_entry("www");
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    tar.append_data(&mut header, "bin/busybox", &busybox[..])
        .unwrap();
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    link.set_uid(0);
    link.set_gid(0);
    link.set_mtime(0);
    tar.append_link(&mut link, "bin/sh", "busybox").unwrap();
    let plain = tar.into_inner().unwrap();
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&plain)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let (layer, layer_size) = put(&gz.finish().unwrap());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh", "-c", "exec busybox httpd -f -p $PORT -h /www"]
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}
    });
    let (config, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}]
    });
    let (manifest, manifest_size) = put(manifest.to_string().as_bytes());
    // Two multi-platform indexes of it: `TAG-multi` (arm64 listed first) and `TAG-arm`.
    let platform_index = |arches: &[&str]| {
        let entries: Vec<_> = arches
            .iter()
            .map(|arch| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest,
                    "size": manifest_size,
                    "platform": {"architecture": arch, "os": "linux"}
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries
        });
        put(index.to_string().as_bytes())
    };
    let entry = |media_type: &str, (digest, size): (String, usize), name: String| {
        serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": name}
        })
    };
    let index_type = "application/vnd.oci.image.index.v1+json";
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            entry("application/vnd.oci.image.manifest.v1+json", (manifest.clone(), manifest_size), tag.to_string()),
            entry(index_type, platform_index(&["arm64", "amd64"]), format!("{tag}-multi")),
            entry(index_type, platform_index(&["arm64"]), format!("{tag}-arm")),
        ]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}
