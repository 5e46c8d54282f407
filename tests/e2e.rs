//! The user story of berth, end to end and slow (it builds the stack images and installs Flask
//! from PyPI): a real `berth server` on free ports and a temp data dir, driven by the real
//! `berth` CLI, the real `git` client over the real OpenSSH client, and real HTTP through the
//! proxy into containers of the embedded runtime. `scripts/test` runs it after the fast tests.
//!
//! Needs root, git, ssh, ssh-keygen and mmdebstrap; under CI=true a missing one fails the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

#[path = "support/registry.rs"]
mod registry;
#[path = "support/stacks.rs"]
mod stacks;

use registry::{busybox_layout, Login, Registry};

/// Returns false (test skipped) when a prerequisite is missing outside CI; panics under CI=true.
fn prerequisites_met(also: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    let tools = ["git", "ssh", "ssh-keygen", "mmdebstrap", "curl", "openssl"];
    for tool in tools.iter().chain(also) {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "e2e prerequisites missing: {} (scripts/test installs them)",
        missing.join(", ")
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{message}");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// A `berth server` child with its own data dir, bridge and subnet. Dropping it stops the
/// server (which, being --ephemeral, stops its containers and removes its bridge) and then
/// sweeps anything left: processes, mounts, netns files, links, nftables tables and cgroups.
struct Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    http: SocketAddr,
    https: SocketAddr,
    ssh: SocketAddr,
    /// The REST API (`--api`).
    api: SocketAddr,
    bridge: String,
    subnet: String,
    /// Whether `launch` starts an `--ephemeral` server (whose stop stops its containers).
    ephemeral: bool,
    /// More `berth server` arguments.
    extra_args: Vec<String>,
}

impl Server {
    fn start() -> Server {
        Self::start_with(&[])
    }

    /// Starts a server with more `berth server` arguments. Each server of this test process
    /// gets its own bridge and subnet.
    fn start_with(extra_args: &[&str]) -> Server {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        let pid = std::process::id();
        let mut server = Server {
            child: None,
            dir,
            http: ([0, 0, 0, 0], 0).into(),
            https: ([0, 0, 0, 0], 0).into(),
            ssh: ([0, 0, 0, 0], 0).into(),
            api: ([0, 0, 0, 0], 0).into(),
            bridge: format!("bt{}x{n}", pid % 100_000),
            subnet: format!("10.{}.0.0/16", 200 + (pid + 17 * n) % 50),
            ephemeral: true,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        // The default stack, built once per machine and shared by every test (hard links).
        stacks::link_into(
            &berth::image::stack::STACKS[0],
            &server.data().join("images"),
        );
        server.launch();
        server
    }

    /// Starts `berth server` on this data dir (again), on fresh free ports.
    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut child = Command::new(BERTH)
            .arg("--data")
            .arg(self.data())
            .args(["server", "--http", "127.0.0.1:0", "--https", "127.0.0.1:0"])
            .args(["--ssh", "127.0.0.1:0", "--api", "127.0.0.1:0"])
            .args(["--domain", "localhost"])
            .args(self.ephemeral.then_some("--ephemeral"))
            .args(["--bridge", &self.bridge, "--subnet", &self.subnet])
            .args(&self.extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting berth server");
        let ready = lines(child.stdout.take().unwrap());
        self.child = Some(child);
        let line = ready
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_default();
        let log = self.log();
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("server did not get ready: {line:?}\n{log}"))
        };
        self.http = field("http");
        self.https = field("https");
        self.ssh = field("ssh");
        self.api = field("api");
    }

    /// Stops the server and requires that nothing of it is left: processes, mounts, netns
    /// files, the bridge and its table, cgroups.
    fn stop_leaving_nothing(&mut self) {
        self.stop();
        let left = self.leftovers();
        assert!(
            left.is_empty(),
            "left behind after stop: {left:#?}\n--- server log:\n{}",
            self.log()
        );
    }

    /// Kills the server with SIGKILL, as a crash would: its containers keep running.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("server running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs the berth CLI against this server.
    fn berth(&self, args: &[&str]) -> Output {
        run(Command::new(BERTH)
            .arg("--data")
            .arg(self.data())
            .args(args))
    }

    /// `berth images:export IMAGE` into the file `to`; requires success.
    fn export(&self, image: &str, to: &Path) {
        let out = Command::new(BERTH)
            .arg("--data")
            .arg(self.data())
            .args(["images:export", image])
            .stdout(std::fs::File::create(to).unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }

    /// Runs the berth CLI and requires success.
    fn berth_ok(&self, args: &[&str]) -> String {
        let out = self.berth(args);
        assert!(
            out.status.success(),
            "berth {args:?} failed:\n{}\n--- server log:\n{}",
            text(&out),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Requires GET / through the proxy with the given Host to answer 200 with `body`.
    fn assert_serves(&self, host: &str, body: &str) {
        assert_eq!(
            self.get(host),
            (200, body.to_string()),
            "--- server log:\n{}",
            self.log()
        );
    }

    /// GET / through the proxy with the given Host; returns (status, body).
    fn get(&self, host: &str) -> (u16, String) {
        http_get(self.http, host)
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What the server left behind: processes, mounts, netns files, links, nftables tables,
    /// cgroups.
    fn leftovers(&self) -> Vec<String> {
        let data = self.data();
        let data_str = data.to_string_lossy().into_owned();
        let mut left = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&data_str) {
                left.push(format!(
                    "process {}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        left.extend(
            mountinfo
                .lines()
                .filter(|l| l.contains(&data_str))
                .map(|l| format!("mount: {l}")),
        );
        if let Ok(entries) = std::fs::read_dir(data.join("netns")) {
            left.extend(
                entries
                    .flatten()
                    .map(|e| format!("netns file: {}", e.path().display())),
            );
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            left.push(format!("bridge {}", self.bridge));
        }
        let table = berth_runtime::firewall::table_name(&self.bridge);
        let listed = Command::new("nft")
            .args(["list", "table", "inet", &table])
            .output();
        if listed.is_ok_and(|out| out.status.success()) {
            left.push(format!("nftables table inet {table}"));
        }
        let ids: Vec<String> = std::fs::read_dir(data.join("containers"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            // The shared parent counts only when empty: another berth on this machine may use it.
            let parent = controller.path().join("berth");
            let children = std::fs::read_dir(&parent)
                .map(|d| d.flatten().filter(|e| e.path().is_dir()).count())
                .unwrap_or(1);
            if children == 0 {
                left.push(format!("empty cgroup {}", parent.display()));
            }
        }
        let v2_parent = Path::new("/sys/fs/cgroup").join("berth");
        if v2_parent.is_dir()
            && std::fs::read_dir(&v2_parent).is_ok_and(|d| !d.flatten().any(|e| e.path().is_dir()))
        {
            left.push(format!("empty cgroup {}", v2_parent.display()));
        }
        for id in &ids {
            left.push(format!("container dir {id}"));
        }
        for id in &self.container_ids() {
            let v2 = v2_parent.join(id);
            if v2.exists() {
                left.push(format!("cgroup {}", v2.display()));
            }
            for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
                let cgroup = controller.path().join("berth").join(id);
                if cgroup.exists() {
                    left.push(format!("cgroup {}", cgroup.display()));
                }
            }
        }
        left
    }

    /// Removes whatever [`Server::leftovers`] finds (the failure path).
    fn sweep(&self) {
        let data_str = self.data().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&data_str) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::SIGKILL,
                    );
                }
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mut mounts: Vec<&str> = mountinfo
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&data_str))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = berth_runtime::firewall::remove(&self.bridge);
        berth_runtime::cgroup::remove_parent();
        for id in self.container_ids() {
            for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
                let _ = std::fs::remove_dir(controller.path().join("berth").join(&id));
            }
        }
    }

    /// The ids of the containers this server has (a directory each) or started (its log says
    /// so, also for containers whose directory is gone: a shim that died, say).
    fn container_ids(&self) -> Vec<String> {
        let dirs = std::fs::read_dir(self.data().join("containers"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let log = self.log();
        let logged = log
            .split_whitespace()
            .filter_map(|word| word.strip_prefix("id="))
            .map(|id| id.trim_matches('"').to_string());
        let mut ids: Vec<String> = dirs.into_iter().chain(logged).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        self.sweep();
    }
}

/// The lines `reader` yields, read on a thread so that callers can wait with a deadline.
fn lines(reader: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(reader)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .expect("running a command")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The head of the answer to `GET /` with the given Host, lowercased.
fn http_get_head(addr: SocketAddr, host: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    head.to_ascii_lowercase().replace("http/1.1", "HTTP/1.1")
}

fn http_get(addr: SocketAddr, host: &str) -> (u16, String) {
    http_get_path(addr, host, "/")
}

fn http_get_path(addr: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connecting to the proxy");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A git work tree on the "laptop", pushing over SSH with `key`.
struct Laptop {
    dir: PathBuf,
    key: PathBuf,
}

impl Laptop {
    fn new(root: &Path, name: &str) -> Laptop {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let key = root.join(format!("{name}_key"));
        let out = run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key));
        assert!(out.status.success(), "{}", text(&out));
        let laptop = Laptop { dir, key };
        laptop.git(&["init", "-q", "-b", "main"]);
        laptop.git(&["config", "user.email", "dev@example.com"]);
        laptop.git(&["config", "user.name", "Dev"]);
        laptop
    }

    fn write(&self, path: &str, contents: &str) {
        std::fs::write(self.dir.join(path), contents).unwrap();
    }

    fn git(&self, args: &[&str]) -> Output {
        run(&mut self.git_command(args))
    }

    /// A git command in the work tree that pushes over SSH with this laptop's key.
    fn git_command(&self, args: &[&str]) -> Command {
        let ssh = format!(
            "ssh -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            self.key.display()
        );
        let mut command = Command::new("git");
        command
            .current_dir(&self.dir)
            .env("GIT_SSH_COMMAND", ssh)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn commit(&self, message: &str) {
        self.git(&["add", "-A"]);
        let out = self.git(&["commit", "-q", "-m", message]);
        assert!(out.status.success(), "{}", text(&out));
    }

    /// Starts pushing main to `deploy` and returns the push once its output showed `marker`.
    fn push_until(&self, marker: &str) -> Child {
        let mut push = self
            .git_command(&["push", "deploy", "main"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let rx = lines(push.stderr.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l.contains(marker)) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => seen.push(line),
                Err(err) => panic!("the push never showed {marker:?} ({err}): {seen:#?}"),
            }
        }
        push
    }

    /// Pushes `main` to `deploy`, which must succeed; returns (and shows) its output.
    fn push_ok(&self, server: &Server, what: &str) -> String {
        let push = self.git(&["push", "deploy", "main"]);
        let push_text = text(&push);
        assert!(
            push.status.success(),
            "{what}: push failed:\n{push_text}\n--- server log:\n{}",
            server.log()
        );
        eprintln!("--- {what}, as the developer sees it:\n{push_text}");
        push_text
    }

    /// Pushes main to `deploy` and requires the push to fail with output containing `expected`;
    /// returns the output.
    fn push_rejected(&self, expected: &[&str]) -> String {
        let push = self.git(&["push", "deploy", "main"]);
        let push_text = text(&push);
        assert!(
            !push.status.success(),
            "the push was accepted:\n{push_text}"
        );
        for e in expected {
            assert!(
                push_text.contains(e),
                "{e:?} is not in the push output:\n{push_text}"
            );
        }
        push_text
    }

    fn ssh(&self, port: u16, command: &str) -> Output {
        run(&mut self.ssh_command(port, &[command]))
    }

    /// `ssh … -p PORT git@127.0.0.1 ARGS…` with this laptop's key.
    fn ssh_command(&self, port: u16, args: &[&str]) -> Command {
        let mut command = Command::new("ssh");
        command
            .args(["-i"])
            .arg(&self.key)
            .args([
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-p",
                &port.to_string(),
                "git@127.0.0.1",
            ])
            .args(args);
        command
    }
}

const APP_PY: &str = r#"import os
from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return os.environ.get("GREETING", "hello") + " from berth\n"


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.environ["PORT"]))
"#;

#[test]
fn slow_push_deploy_config_and_bad_input() {
    if !prerequisites_met(&[]) {
        return;
    }
    let mut server = Server::start();
    let laptop = Laptop::new(server.dir.path(), "laptop");
    let stranger = Laptop::new(server.dir.path(), "stranger");

    // Keys: a garbage key is refused; the laptop's key is added.
    let garbage = server.dir.path().join("garbage.pub");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let out = server.berth(&["keys:add", "bad", garbage.to_str().unwrap()]);
    assert!(
        !out.status.success() && text(&out).contains("error: not an OpenSSH public key"),
        "{}",
        text(&out)
    );
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    assert!(server.berth_ok(&["keys"]).contains("laptop  SHA256:"));

    // App names: bad ones change nothing.
    for bad in ["a/b", "..", "Hello", &"a".repeat(64)] {
        let out = server.berth(&["apps:create", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("error: invalid app name") && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
    server.berth_ok(&["apps:create", "hello"]);
    assert_eq!(server.berth_ok(&["apps"]).trim(), "hello");
    let out = server.berth(&["apps:create", "hello"]);
    assert!(
        !out.status.success() && text(&out).contains("already exists"),
        "{}",
        text(&out)
    );

    // The first push builds with the python buildpack and goes live.
    laptop.write("app.py", APP_PY);
    laptop.write("requirements.txt", "flask\n");
    laptop.write("Procfile", "web: python app.py\n");
    laptop.commit("First version");
    let remote = format!("ssh://git@127.0.0.1:{}/hello", server.ssh.port());
    laptop.git(&["remote", "add", "deploy", &remote]);
    let push_text = laptop.push_ok(&server, "the first push");
    assert!(push_text.contains("Python app detected"), "{push_text}");
    assert!(
        push_text.contains("-----> hello v1 is live at http://hello.localhost"),
        "{push_text}"
    );
    server.assert_serves("hello.localhost", "hello from berth\n");
    assert_eq!(server.get("nope.localhost").0, 404);

    // config:set makes v2 and restarts the app with the new env.
    let out = server.berth_ok(&["config:set", "hello", "GREETING=hi"]);
    assert!(out.contains("v2"), "{out}");
    server.assert_serves("hello.localhost", "hi from berth\n");
    let releases = server.berth_ok(&["releases", "hello", "--json"]);
    let releases: serde_json::Value = serde_json::from_str(&releases).unwrap();
    assert_eq!(releases[0]["version"], 2);
    assert_eq!(releases[0]["config"]["GREETING"], "hi");
    assert_eq!(releases[1]["version"], 1);

    // Values round-trip exactly; bad keys change nothing.
    let weird = "two words \"double\" 'single'\nsecond line ünïcødé ✓ $HOME `x`";
    server.berth_ok(&[
        "config:set",
        "hello",
        &format!("WEIRD={weird}"),
        "--no-restart",
    ]);
    assert_eq!(
        server.berth_ok(&["config:get", "hello", "WEIRD"]),
        format!("{weird}\n")
    );
    let before = server.berth_ok(&["config", "hello", "--json"]);
    let out = server.berth(&["config:set", "hello", "1BAD=x"]);
    assert!(
        !out.status.success() && text(&out).contains("invalid config key"),
        "{}",
        text(&out)
    );
    assert_eq!(server.berth_ok(&["config", "hello", "--json"]), before);
    assert_eq!(
        server
            .berth_ok(&["releases", "hello", "--json"])
            .matches("\"version\"")
            .count(),
        2
    );

    // SSH refusals: an unknown key, a missing app, a shell command.
    stranger.write("x", "x");
    stranger.commit("x");
    let out = stranger.git(&["push", &remote, "main"]);
    assert!(
        !out.status.success() && text(&out).contains("Permission denied"),
        "{}",
        text(&out)
    );
    let out = laptop.git(&[
        "push",
        &format!("ssh://git@127.0.0.1:{}/nope", server.ssh.port()),
        "main",
    ]);
    assert!(
        !out.status.success() && text(&out).contains("berth apps:create nope"),
        "{}",
        text(&out)
    );
    let out = laptop.ssh(server.ssh.port(), "ls");
    assert!(
        out.status.code() == Some(2) && text(&out).contains("unrecognized subcommand 'ls'"),
        "{}",
        text(&out)
    );

    // A broken push is rejected with pip's error, and v2 keeps serving.
    laptop.write(
        "requirements.txt",
        "flask\nthis-package-does-not-exist-berth==1.0\n",
    );
    laptop.commit("Broken requirements");
    laptop.push_rejected(&[
        "No matching distribution found for this-package-does-not-exist-berth",
        "pre-receive hook declined",
    ]);
    server.assert_serves("hello.localhost", "hi from berth\n");
    let ps = server.berth_ok(&["ps", "hello"]);
    assert!(ps.contains("web.1: up ") && ps.contains("  v2  "), "{ps}");

    // Build limits: a build step past the memory limit fails as out of memory, one past the
    // timeout is stopped; v2 keeps serving. The step is a local package's setup.py, which pip
    // runs at build time.
    server.berth_ok(&["builds:set", "hello", "--memory", "200M"]);
    let builds = server.berth_ok(&["builds", "hello"]);
    assert!(
        builds.contains("memory   200 MiB\n") && builds.contains("pids     4096 (default)"),
        "{builds}"
    );
    let out = server.berth(&["builds:set", "hello", "--memory", "lots"]);
    assert!(
        !out.status.success() && text(&out).contains("is not a memory size"),
        "{}",
        text(&out)
    );
    std::fs::create_dir_all(laptop.dir.join("hog")).unwrap();
    laptop.write(
        "hog/setup.py",
        "import pathlib, time\nfrom setuptools import setup\n\
         if pathlib.Path(__file__).with_name('mode').read_text().strip() == 'memory':\n\
         \x20   hog = b'x' * (1 << 30)\n\
         else:\n\
         \x20   time.sleep(600)\n\
         setup(name='hog', version='1')\n",
    );
    laptop.write("hog/mode", "memory\n");
    laptop.write("requirements.txt", "flask\n./hog\n");
    laptop.commit("A build step that needs 1 GiB");
    laptop.push_rejected(&[
        "the build ran out of memory (its limit is 200 MiB)",
        "builds:set APP --memory",
    ]);
    server.berth_ok(&[
        "builds:set",
        "hello",
        "--memory",
        "default",
        "--timeout",
        "15s",
    ]);
    laptop.write("hog/mode", "sleep\n");
    laptop.commit("A build step that never ends");
    laptop.push_rejected(&["the build ran longer than 15s and was stopped"]);
    server.berth_ok(&["builds:set", "hello", "--timeout", "default"]);
    server.assert_serves("hello.localhost", "hi from berth\n");
    std::fs::remove_dir_all(laptop.dir.join("hog")).unwrap();

    // An app that crashes on start is rejected with its exit code and output; v2 keeps serving.
    laptop.write("requirements.txt", "flask\n");
    laptop.write(
        "Procfile",
        "web: python -c 'import sys; print(\"boom: no database\", flush=True); sys.exit(3)'\n",
    );
    laptop.commit("Crashing web process");
    laptop.push_rejected(&["web.1 exited with code 3", "boom: no database"]);
    server.assert_serves("hello.localhost", "hi from berth\n");
    let releases = server.berth_ok(&["releases", "hello", "--json"]);
    let releases: serde_json::Value = serde_json::from_str(&releases).unwrap();
    assert_eq!(
        (&releases[0]["version"], &releases[0]["status"]),
        (&3.into(), &"failed".into()),
        "the crashing release is listed as failed: {releases:#}"
    );
    assert!(releases[0]["reason"]
        .as_str()
        .unwrap()
        .contains("exited with code 3"));
    assert_eq!(releases[1]["status"], "live", "{releases:#}");

    // A Procfile linking to a host file is refused unread (the root daemon would echo its lines
    // in parse errors); v2 keeps serving.
    let host_file = server.dir.path().join("host-secret");
    std::fs::write(&host_file, "berth-e2e-host-secret-6d1f\n").unwrap();
    let procfile = laptop.dir.join("Procfile");
    std::fs::remove_file(&procfile).unwrap();
    std::os::unix::fs::symlink(&host_file, &procfile).unwrap();
    laptop.commit("Procfile links to a host file");
    let push_text = laptop.push_rejected(&["Procfile is a symlink", "replace the link"]);
    assert!(!push_text.contains("host-secret-6d1f"), "{push_text}");
    server.assert_serves("hello.localhost", "hi from berth\n");
    std::fs::remove_file(&procfile).unwrap();

    // Logs show the app's output.
    let logs = server.berth_ok(&["logs", "hello", "-n", "50"]);
    assert!(logs.contains("app[web.1]:"), "{logs}");
    // As JSON, one object per line, and only the asked-for process type.
    let json = server.berth_ok(&["logs", "hello", "-n", "5", "-p", "web", "--json"]);
    let objects: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!objects.is_empty(), "{json}");
    for object in &objects {
        assert!(
            object["process"].as_str().unwrap().starts_with("web."),
            "{object}"
        );
        assert!(
            object["time"].as_str().unwrap().starts_with("20"),
            "{object}"
        );
    }
    let none = server.berth_ok(&["logs", "hello", "-p", "worker"]);
    assert!(none.trim().is_empty(), "no worker runs: {none}");
    // `logs -f` streams new lines: the request below shows up in Flask's access log.
    let mut follow = Command::new(BERTH)
        .arg("--data")
        .arg(server.data())
        .args(["logs", "hello", "-f", "-n", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(follow.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("app[web.1]") && l.contains("GET /?follow"))
    {
        assert!(
            Instant::now() < deadline,
            "logs -f did not show the request: {seen:#?}"
        );
        let _ = http_get_path(server.http, "hello.localhost", "/?follow");
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            seen.push(line);
        }
    }
    follow.kill().unwrap();
    follow.wait().unwrap();

    // A killed daemon: the app's containers keep running, and a new server takes them back.
    server.kill();
    server.launch();
    server.assert_serves("hello.localhost", "hi from berth\n");
    let ps = server.berth_ok(&["ps", "hello"]);
    assert!(ps.contains("web.1: up ") && ps.contains("  v2  "), "{ps}");

    // A daemon killed in the middle of a build: the push fails, v2 keeps serving once a new
    // server runs, and the cut-short build leaves no container and no scratch behind.
    laptop.write("Procfile", "web: python app.py\n");
    // Changed requirements, so pip runs (an unchanged venv is reused too fast to interrupt).
    laptop.write("requirements.txt", "flask\nsix\n");
    laptop.commit("Interrupted deploy");
    let remote = format!("ssh://git@127.0.0.1:{}/hello", server.ssh.port());
    laptop.git(&["remote", "set-url", "deploy", &remote]);
    let mut push = laptop.push_until("Installing requirements.txt with pip");
    server.kill();
    let pushed = push.wait().unwrap();
    assert!(!pushed.success(), "a push whose server died was accepted");
    server.launch();
    server.assert_serves("hello.localhost", "hi from berth\n");
    let containers = std::fs::read_dir(server.data().join("containers"))
        .unwrap()
        .count();
    assert_eq!(containers, 1, "only v2's web.1 should be left");
    let scratch = std::fs::read_dir(server.data().join("builds"))
        .unwrap()
        .count();
    assert_eq!(scratch, 0, "build scratch was left behind");

    // A clean stop leaves nothing behind.
    server.stop_leaving_nothing();
}

/// A stdlib-only Python web app (the `procfile` buildpack: no pip, quick builds; also what
/// `scripts/bench/zero-downtime.sh` deploys). `/` answers
/// its mark, `<version.txt>/<GREETING>`, so every answer names the release that served it; with
/// FAIL set, `/` answers 500; `/stream` sends 30 server-sent events 100 ms apart.
const STDLIB_APP_PY: &str = include_str!("apps/stdlib-web/app.py");

/// The client side of a WebSocket through the proxy (RFC 6455; text messages under 126 bytes).
struct WebSocket(TcpStream);

impl WebSocket {
    fn open(proxy: SocketAddr, host: &str, path: &str) -> WebSocket {
        let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        // Byte by byte up to the blank line, so no frame is read with the head.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            stream
                .read_exact(&mut byte)
                .expect("reading the upgrade answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "wrong accept: {head}"
        );
        WebSocket(stream)
    }

    /// Sends one masked text message.
    fn send(&mut self, text: &str) {
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&frame).unwrap();
    }

    /// The next text message; None when the server closed the socket (a close frame, or the
    /// connection's end between frames).
    fn recv(&mut self) -> Option<String> {
        let mut head = [0u8; 2];
        match self.0.read_exact(&mut head) {
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            other => other.expect("reading a frame"),
        }
        let mut payload = vec![0u8; usize::from(head[1] & 0x7F)];
        self.0
            .read_exact(&mut payload)
            .expect("reading a frame's payload");
        (head[0] & 0x0F != 8).then(|| String::from_utf8_lossy(&payload).into_owned())
    }
}

/// What a stream of requests saw while changes ran.
#[derive(Debug, Default)]
struct Seen {
    ok: usize,
    /// Non-200 answers and broken exchanges, with what happened.
    failed: Vec<String>,
    /// Each distinct body answered, with how often.
    bodies: std::collections::BTreeMap<String, usize>,
}

/// Clients sending requests to `host` through the proxy until stopped: one over a keep-alive
/// connection, one with a new connection per request.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Seen>>,
}

impl Load {
    fn start(proxy: SocketAddr, host: &str) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = [true, false]
            .into_iter()
            .map(|keep_alive| {
                let (stop, host) = (stop.clone(), host.to_string());
                std::thread::spawn(move || load_loop(proxy, &host, keep_alive, &stop))
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut all = Seen::default();
        for thread in self.threads {
            let seen = thread.join().unwrap();
            all.ok += seen.ok;
            all.failed.extend(seen.failed);
            for (body, n) in seen.bodies {
                *all.bodies.entry(body).or_default() += n;
            }
        }
        all
    }
}

fn load_loop(
    proxy: SocketAddr,
    host: &str,
    keep_alive: bool,
    stop: &std::sync::atomic::AtomicBool,
) -> Seen {
    let mut seen = Seen::default();
    let mut conn: Option<std::io::BufReader<TcpStream>> = None;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let reused = conn.is_some();
        let mut stream = match conn.take() {
            Some(stream) => stream,
            None => match TcpStream::connect_timeout(&proxy, Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    std::io::BufReader::new(s)
                }
                Err(err) => {
                    seen.failed.push(format!("connect: {err}"));
                    continue;
                }
            },
        };
        let close = if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        };
        let sent = write!(
            stream.get_mut(),
            "GET / HTTP/1.1\r\nHost: {host}\r\n{close}\r\n"
        );
        match (sent, read_response(&mut stream)) {
            (Ok(()), Ok((200, body, open))) => {
                seen.ok += 1;
                *seen.bodies.entry(body).or_default() += 1;
                if keep_alive && open {
                    conn = Some(stream);
                }
            }
            // A keep-alive connection the proxy closed while idle: clients retry on a new one.
            (_, Err(err)) if reused && err.kind() == std::io::ErrorKind::UnexpectedEof => {}
            (Ok(()), Ok((status, body, _))) => seen.failed.push(format!("{status}: {body}")),
            (sent, read) => seen.failed.push(format!("{sent:?} {read:?}")),
        }
    }
    seen
}

/// Reads one response with a Content-Length body: (status, body, whether the connection stays
/// open). An EOF before the first byte is `UnexpectedEof`.
fn read_response(
    stream: &mut std::io::BufReader<TcpStream>,
) -> std::io::Result<(u16, String, bool)> {
    use std::io::BufRead;
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_string());
    }
    let status = head
        .first()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    let open = !header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok((status, String::from_utf8_lossy(&body).into_owned(), open))
}

/// A self-signed certificate for `host` made by the real `openssl`; returns the paths of its
/// PEM certificate and key.
fn self_signed(dir: &Path, host: &str) -> (String, String) {
    let (cert, key) = (
        dir.join(format!("{host}.crt")),
        dir.join(format!("{host}.key")),
    );
    let out = run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={host}")])
        .args(["-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert!(out.status.success(), "{}", text(&out));
    (cert.display().to_string(), key.display().to_string())
}

/// How many containers `berth ps` lists (its `=== TYPE (limits)` headings aside).
fn containers_in(ps: &str) -> usize {
    ps.lines().filter(|l| !l.starts_with("===")).count()
}

/// The pids of the processes of `app`'s running containers (the container init of each).
fn container_pids(server: &Server, app: &str) -> Vec<(String, i32)> {
    let ps = server.berth_ok(&["ps", app, "--json"]);
    let ps: serde_json::Value = serde_json::from_str(&ps).unwrap();
    ps.as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "up")
        .filter_map(|c| {
            let id = c["id"].as_str()?.to_string();
            let pid =
                std::fs::read_to_string(server.data().join("containers").join(&id).join("pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
            Some((
                format!("{}.{}", c["process_type"].as_str()?, c["number"]),
                pid,
            ))
        })
        .collect()
}

/// Waits until `berth ps APP` satisfies `done`, or panics after `secs`.
fn wait_for_ps(server: &Server, app: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let ps = server.berth_ok(&["ps", app]);
        if done(&ps) {
            return ps;
        }
        assert!(
            Instant::now() < deadline,
            "ps never got there:\n{ps}\n--- server log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn slow_zero_downtime_changes_crashes_and_restarts() {
    if !prerequisites_met(&[]) {
        return;
    }
    let mut server = Server::start();
    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    server.berth_ok(&["apps:create", "zd"]);
    let host = "zd.localhost";
    let remote = format!("ssh://git@127.0.0.1:{}/zd", server.ssh.port());
    laptop.git(&["remote", "add", "deploy", &remote]);
    let push = |version: &str| {
        laptop.write("version.txt", version);
        laptop.commit(version);
        let push = laptop.git(&["push", "deploy", "main"]);
        assert!(
            push.status.success(),
            "push of {version} failed:\n{}\n--- server log:\n{}",
            text(&push),
            server.log()
        );
    };
    laptop.write("app.py", STDLIB_APP_PY);
    laptop.write(
        "Procfile",
        "web: python3 app.py\nworker: python3 -c 'import time; time.sleep(86400)'\n",
    );
    push("c1");
    server.assert_serves(host, "c1/hello\n");
    // The proxy connects from inside the container's network namespace: the app sees its own
    // address as the peer, not the gateway the host's connections come from.
    let (status, peer) = http_get_path(server.http, host, "/peer");
    let (from, to) = peer.trim().split_once(' ').unwrap_or_default();
    assert!(
        status == 200 && !from.is_empty() && from == to,
        "{status} {peer}"
    );

    // 20 changes in a row under a steady stream of requests, with one long stream open across
    // a change: no request fails, and every answer comes from a release that was live.
    let load = Load::start(server.http, host);
    let mut expected = std::collections::BTreeSet::from(["c1/hello\n".to_string()]);
    let stream = {
        let proxy = server.http;
        std::thread::spawn(move || http_get_path(proxy, "zd.localhost", "/stream"))
    };
    // A client that sends half a request line is closed at the header timeout (30 s) while
    // everything else goes on.
    let slowloris = {
        let mut stream = TcpStream::connect(server.http).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(b"GET / HT").unwrap();
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            started.elapsed()
        })
    };
    let mut socket = WebSocket::open(server.http, host, "/ws");
    socket.send("one");
    assert_eq!(socket.recv().as_deref(), Some("c1/hello one"));
    let mut code = "c1".to_string();
    let mut greeting = "hello".to_string();
    // What each release serves, oldest first (a restart makes no release).
    let mut history = vec![(code.clone(), greeting.clone())];
    for step in 1..=20 {
        match step % 10 {
            1 | 6 => {
                code = format!("c{}", step + 1);
                push(&code);
            }
            2 | 7 => {
                greeting = format!("g{step}");
                server.berth_ok(&["config:set", "zd", &format!("GREETING={greeting}")]);
            }
            3 => {
                server.berth_ok(&["ps:scale", "zd", "web=3"]);
            }
            4 => {
                server.berth_ok(&["ps:scale", "zd", "web=1"]);
            }
            5 => {
                server.berth_ok(&["ps:restart", "zd"]);
                history.pop(); // pushed again below: a restart makes no release
            }
            8 => {
                server.berth_ok(&["ps:restart", "zd", "web"]);
                history.pop(); // pushed again below: a restart makes no release
            }
            _ => {
                // Back to the release before the live one: its code and its config.
                let out = server.berth_ok(&["releases:rollback", "zd"]);
                assert!(out.contains("Rollback to v"), "{out}");
                (code, greeting) = history[history.len() - 2].clone();
            }
        }
        history.push((code.clone(), greeting.clone()));
        expected.insert(format!("{code}/{greeting}\n"));
        if step == 1 {
            // The socket stays open on the old release while that one drains.
            socket.send("two");
            assert_eq!(socket.recv().as_deref(), Some("c1/hello two"));
        }
        server.assert_serves(host, &format!("{code}/{greeting}\n"));
    }
    let (status, events) = stream.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        events.contains("data: c1/hello 29"),
        "the stream was cut before its end:\n{events}"
    );
    let held = slowloris.join().unwrap();
    assert!(
        (Duration::from_secs(29)..Duration::from_secs(45)).contains(&held),
        "a half request line held its connection for {held:?}"
    );
    // Its container is stopped at the drain deadline (30 s): the socket ends cleanly, between
    // messages.
    assert_eq!(
        socket.recv(),
        None,
        "the socket was not closed by the drain"
    );
    let seen = load.finish();
    assert!(
        seen.failed.is_empty(),
        "failed requests: {:#?}",
        seen.failed
    );
    assert!(seen.ok > 100, "too few requests to mean anything: {seen:?}");
    for body in seen.bodies.keys() {
        assert!(
            expected.contains(body),
            "{body:?} came from no live release; expected {expected:?}"
        );
    }
    let releases = server.berth_ok(&["releases", "zd"]);
    assert!(
        releases.contains("Scale web=3") && releases.contains("Rollback to v"),
        "{releases}"
    );
    assert_eq!(releases.matches(" live ").count(), 1, "{releases}");
    // The old containers drain and stop in the background.
    wait_for_ps(&server, "zd", 60, |ps| {
        containers_in(ps) == 1 && !ps.contains("draining")
    });

    // A release whose check fails never gets traffic and is listed as failed.
    let load = Load::start(server.http, host);
    let out = server.berth(&["config:set", "zd", "FAIL=1"]);
    assert!(!out.status.success(), "a release answering 500 went live");
    assert!(text(&out).contains("status 500"), "{}", text(&out));
    let seen = load.finish();
    assert!(
        seen.failed.is_empty(),
        "the failing release got traffic: {:#?}",
        seen.failed
    );
    let releases = server.berth_ok(&["releases", "zd", "--json"]);
    let releases: serde_json::Value = serde_json::from_str(&releases).unwrap();
    assert_eq!(releases[0]["status"], "failed", "{releases:#}");
    assert!(
        releases[0]["reason"].as_str().unwrap().contains("500"),
        "{releases:#}"
    );
    assert!(
        !server.berth_ok(&["config", "zd"]).contains("FAIL"),
        "the failed change's config stayed"
    );

    // Bad scale input is refused with what to do; nothing changes.
    let out = server.berth(&["ps:scale", "zd", "nope=2"]);
    assert!(
        text(&out).contains("its process types are: web, worker"),
        "{}",
        text(&out)
    );
    let out = server.berth(&["ps:scale", "zd", "web=500"]);
    assert!(
        !out.status.success() && text(&out).contains("50 or fewer"),
        "{}",
        text(&out)
    );

    // app.json checks: one that cannot pass fails the push and the live release keeps serving;
    // one that passes is run on every new container.
    let check = |content: &str| {
        format!(
            r#"{{"healthchecks": {{"web": [{{"type": "startup", "name": "ready", "path": "/health",
               "content": "{content}", "attempts": 2, "wait": 1, "timeout": 2}}]}}}}"#
        )
    };
    laptop.write("app.json", &check("ready!"));
    laptop.commit("a check that cannot pass");
    laptop.push_rejected(&[
        "failed its app.json check \"ready\"",
        "GET /health answered 200 without \"ready!\" (2 attempts)",
    ]);
    server.assert_serves(host, &format!("{code}/{greeting}\n"));
    laptop.write("app.json", &check("healthy"));
    laptop.commit("a check that passes");
    let push = laptop.git(&["push", "deploy", "main"]);
    assert!(push.status.success(), "{}", text(&push));
    assert!(
        text(&push).contains("Checking web.1: \"ready\": GET /health answers with \"healthy\""),
        "{}",
        text(&push)
    );

    // A killed web process comes back by itself; with web=2 the stream of requests sees no
    // more failures than the requests that were on the dead container.
    server.berth_ok(&["ps:scale", "zd", "web=2", "worker=1"]);
    let load = Load::start(server.http, host);
    let (dyno, pid) = container_pids(&server, "zd")
        .into_iter()
        .find(|(d, _)| d == "web.1")
        .expect("web.1 runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let ps = wait_for_ps(&server, "zd", 60, |ps| {
        ps.lines().any(|l| {
            l.starts_with(&format!("{dyno}: up")) && l.contains("restarts 1, last exit 137")
        })
    });
    eprintln!("after the crash:\n{ps}");
    let seen = load.finish();
    assert!(
        seen.failed.len() <= 2,
        "more failures than requests in flight: {:#?}",
        seen.failed
    );
    server.assert_serves(host, &format!("{code}/{greeting}\n"));

    // A host reboot: the server and every shim and container process die; a new server brings
    // the whole formation back.
    server.kill();
    for entry in std::fs::read_dir(server.data().join("containers"))
        .unwrap()
        .flatten()
    {
        for file in ["shim.pid", "pid"] {
            if let Ok(pid) = std::fs::read_to_string(entry.path().join(file)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid.trim().parse().unwrap()),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
    }
    server.launch();
    let ps = wait_for_ps(&server, "zd", 60, |ps| ps.matches(": up").count() == 3);
    assert!(ps.contains("worker.1: up"), "{ps}");
    server.assert_serves(host, &format!("{code}/{greeting}\n"));

    // A server killed (SIGKILL), or stopped (SIGTERM, without --ephemeral: its apps keep
    // running), in the middle of a switch: on restart the last live release serves, the
    // interrupted one is failed, and nothing of it is left running.
    laptop.write("Procfile", "web: sh -c 'sleep 5; exec python3 app.py'\n");
    for signal in ["SIGKILL", "SIGTERM"] {
        if signal == "SIGTERM" {
            server.kill();
            server.ephemeral = false;
            server.launch();
            server.ephemeral = true;
        }
        let remote = format!("ssh://git@127.0.0.1:{}/zd", server.ssh.port());
        laptop.git(&["remote", "set-url", "deploy", &remote]);
        laptop.write("version.txt", &format!("slow-{signal}"));
        laptop.commit(&format!("slow start, {signal}"));
        let mut push = laptop.push_until("Checking web.1");
        match signal {
            "SIGKILL" => server.kill(),
            _ => server.stop(),
        }
        assert!(
            !push.wait().unwrap().success(),
            "a push whose server got {signal} was accepted"
        );
        server.launch();
        server.assert_serves(host, &format!("{code}/{greeting}\n"));
        let releases = server.berth_ok(&["releases", "zd", "--json"]);
        let releases: serde_json::Value = serde_json::from_str(&releases).unwrap();
        assert_eq!(releases[0]["status"], "failed", "{signal}: {releases:#}");
        assert!(
            releases[0]["reason"]
                .as_str()
                .unwrap()
                .contains("server stopped"),
            "{signal}: {releases:#}"
        );
        wait_for_ps(&server, "zd", 60, |ps| {
            containers_in(ps) == 3 && !ps.contains("starting") && !ps.contains("draining")
        });
        assert!(
            !server.get(host).1.starts_with("slow"),
            "{signal}: the interrupted release serves"
        );
    }

    // Two pushes of one app at once: one waits for the other, and in the end the live code is
    // the commit on the branch.
    let remote = format!("ssh://git@127.0.0.1:{}/zd", server.ssh.port());
    laptop.git(&["remote", "set-url", "deploy", &remote]);
    let rival = Laptop::new(server.dir.path(), "rival");
    server.berth_ok(&[
        "keys:add",
        "rival",
        rival.key.with_extension("pub").to_str().unwrap(),
    ]);
    rival.git(&["remote", "add", "deploy", &remote]);
    for (who, version) in [(&laptop, "race-a"), (&rival, "race-b")] {
        who.write("app.py", STDLIB_APP_PY);
        who.write("Procfile", "web: python3 app.py\n");
        who.write("version.txt", version);
        who.commit(version);
    }
    let spawned: Vec<Child> = [&laptop, &rival]
        .iter()
        .map(|who| {
            who.git_command(&["push", "--force", "deploy", "main"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = spawned
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for out in &outputs {
        assert!(out.status.success(), "{}", text(out));
    }
    // The branch as the server's repo has it (berth serves no fetches).
    let branch = run(Command::new("git")
        .arg("--git-dir")
        .arg(server.data().join("repos/zd.git"))
        .args(["rev-parse", "refs/heads/main"]));
    let branch = String::from_utf8_lossy(&branch.stdout).trim().to_string();
    let winner = [(&laptop, "race-a"), (&rival, "race-b")]
        .into_iter()
        .find(|(who, _)| {
            String::from_utf8_lossy(&who.git(&["rev-parse", "HEAD"]).stdout).trim() == branch
        })
        .map(|(_, version)| version)
        .expect("the branch is one of the pushed commits");
    server.assert_serves(host, &format!("{winner}/{greeting}\n"));

    // Custom domains: one owner per host, malformed and reserved hosts refused.
    server.berth_ok(&["domains:add", "zd", "WWW.Example.TEST"]);
    server.assert_serves("www.example.test", &format!("{winner}/{greeting}\n"));
    server.berth_ok(&["apps:create", "other"]);
    let out = server.berth(&["domains:add", "other", "www.example.test"]);
    assert!(
        !out.status.success() && text(&out).contains("already belongs to app \"zd\""),
        "{}",
        text(&out)
    );
    for bad in [
        "*.example.test",
        "example.test:80",
        "zd.localhost",
        "not_a_host.test",
    ] {
        let out = server.berth(&["domains:add", "other", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
    }
    let domains = server.berth_ok(&["domains", "zd"]);
    assert!(
        domains.contains("zd.localhost (default)") && domains.contains("www.example.test"),
        "{domains}"
    );
    server.berth_ok(&["domains:remove", "zd", "www.example.test"]);
    assert_eq!(server.get("www.example.test").0, 404);
    server.berth_ok(&["domains:add", "zd", "api.example.test"]);

    // HTTPS on --https: a certificate for a custom domain is served by SNI; certificates for
    // none of the app's hosts, and keys that do not belong, are refused.
    server.berth_ok(&["domains:add", "zd", "secure.example.test"]);
    let (cert, key) = self_signed(server.dir.path(), "secure.example.test");
    let (other_cert, other_key) = self_signed(server.dir.path(), "elsewhere.test");
    let out = server.berth(&["certs:add", "zd", &other_cert, &other_key]);
    assert!(
        !out.status.success() && text(&out).contains("covers none of zd's hosts"),
        "{}",
        text(&out)
    );
    let out = server.berth(&["certs:add", "zd", &cert, &other_key]);
    assert!(
        !out.status.success() && text(&out).contains("does not belong to the certificate"),
        "{}",
        text(&out)
    );
    let added = server.berth_ok(&["certs:add", "zd", &cert, &key, "--redirect-https"]);
    assert!(added.contains("secure.example.test"), "{added}");
    let redirected = http_get_head(server.http, "secure.example.test");
    assert!(
        redirected.starts_with("HTTP/1.1 308")
            && redirected.contains(&format!(
                "location: https://secure.example.test:{}/",
                server.https.port()
            )),
        "{redirected}"
    );
    assert_eq!(
        server.get("api.example.test").0,
        200,
        "a host the certificate does not cover is not redirected"
    );
    let port = server.https.port();
    let curl = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &cert, "--resolve"])
        .arg(format!("secure.example.test:{port}:127.0.0.1"))
        .arg(format!("https://secure.example.test:{port}/")));
    assert_eq!(
        String::from_utf8_lossy(&curl.stdout),
        format!("{winner}/{greeting}\n"),
        "{}",
        text(&curl)
    );
    server.berth_ok(&["certs:remove", "zd"]);
    let curl = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", &cert, "--resolve"])
        .arg(format!("secure.example.test:{port}:127.0.0.1"))
        .arg(format!("https://secure.example.test:{port}/")));
    assert!(!curl.status.success(), "served without a certificate");
    assert_eq!(
        server.get("secure.example.test").0,
        200,
        "without its certificate the host is not redirected"
    );

    // Egress: on by default; off puts the running containers' addresses into the firewall's
    // no-egress set at once (what that set does to traffic: runtime/tests), a restart's new
    // containers are in it from their start, the app still serves, and on takes them out.
    let no_egress = |server: &Server| {
        let table = format!("berth-{}", server.bridge);
        let out = run(Command::new("nft").args(["-j", "list", "set", "inet", &table, "no-egress"]));
        assert!(out.status.success(), "{}", text(&out));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ips: Vec<String> = json["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["set"]["elem"].as_array())
            .flatten()
            .map(|e| e.as_str().unwrap().to_string())
            .collect();
        ips.sort();
        ips
    };
    let app_ips = |server: &Server| {
        let out = server.berth_ok(&["ps", "zd", "--json"]);
        let ps: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut ips: Vec<String> = ps
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["ip"].as_str().unwrap().to_string())
            .collect();
        ips.sort();
        ips
    };
    assert!(server.berth_ok(&["network", "zd"]).contains("egress: on"));
    assert_eq!(no_egress(&server), Vec::<String>::new());
    let out = server.berth(&["network:set", "zd", "--egress", "maybe"]);
    assert!(
        !out.status.success() && text(&out).contains("neither on nor off"),
        "{}",
        text(&out)
    );
    let running = app_ips(&server);
    let set = server.berth_ok(&["network:set", "zd", "--egress", "off"]);
    assert!(
        set.contains(&format!(
            "applied to its {} running container(s) now",
            running.len()
        )),
        "{set}"
    );
    assert!(server.berth_ok(&["network", "zd"]).contains("egress: off"));
    assert_eq!(no_egress(&server), running);
    server.berth_ok(&["ps:restart", "zd", "web"]);
    let (running, blocked) = (app_ips(&server), no_egress(&server));
    assert!(
        running.iter().all(|ip| blocked.contains(ip)),
        "after a restart: running {running:?}, without egress {blocked:?}"
    );
    server.assert_serves(host, &format!("{winner}/{greeting}\n"));
    server.berth_ok(&["network:set", "zd", "--egress", "on"]);
    assert_eq!(no_egress(&server), Vec::<String>::new());

    // Limits: web containers run under their process type's memory limit (as their own cgroup
    // shows it); resources:set applies at the next restart; a container that allocates past
    // its limit is killed by the kernel, reported as out of memory in `ps` and `logs`, and
    // restarted.
    let limit = |server: &Server| http_get_path(server.http, host, "/limit");
    assert_eq!(limit(&server), (200, format!("{}\n", 512u64 << 20)));
    let out = server.berth(&["resources:set", "zd", "nope", "--memory", "1G"]);
    assert!(
        !out.status.success() && text(&out).contains("its process types are: web"),
        "{}",
        text(&out)
    );
    server.berth_ok(&["resources:set", "zd", "web", "--memory", "256M"]);
    assert_eq!(
        limit(&server).1,
        format!("{}\n", 512u64 << 20),
        "not before a restart"
    );
    server.berth_ok(&["ps:restart", "zd", "web"]);
    for _ in 0..4 {
        assert_eq!(limit(&server).1, format!("{}\n", 256u64 << 20));
    }
    let resources = server.berth_ok(&["resources", "zd"]);
    assert!(
        resources.contains("web: 256 MiB, 1 CPU, 1024 pids"),
        "{resources}"
    );
    // The request fails with its container (502), or, should the proxy not see the dead
    // connection, at the upstream timeout (504, 60 s); what counts is what happens to the
    // container.
    let hog = std::thread::spawn({
        let addr = server.http;
        move || {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(90)))
                .unwrap();
            write!(
                stream,
                "GET /hog HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            response.lines().next().unwrap_or_default().to_string()
        }
    });
    let ps = wait_for_ps(&server, "zd", 120, |ps| {
        ps.contains("last exit 137 (out of memory)")
            && !ps.contains("crashed")
            && !ps.contains("starting")
    });
    assert!(ps.contains("=== web (256 MiB, 1 CPU, 1024 pids)"), "{ps}");
    let status = hog.join().unwrap();
    assert!(
        status.starts_with("HTTP/1.1 502") || status.starts_with("HTTP/1.1 504"),
        "the request that ran its container out of memory got {status:?}\n--- server log:\n{}",
        server.log()
    );
    let logs = server.berth_ok(&["logs", "zd", "-n", "200"]);
    assert!(
        logs.lines().any(|l| l.contains("berth[web.")
            && l.contains("out of memory: killed at its 256 MiB limit")),
        "{logs}"
    );
    server.assert_serves(host, &format!("{winner}/{greeting}\n"));

    server.berth_ok(&["apps:destroy", "zd", "--force"]);
    assert_eq!(server.get(host).0, 404);
    assert_eq!(
        server.get("api.example.test").0,
        404,
        "a destroyed app's domains are unrouted"
    );
    server.stop_leaving_nothing();
}

/// A free TCP port on 127.0.0.1 (for peers that cannot be told to pick one themselves).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's pebble (an ACME test CA) and pebble-challtestsrv (the DNS it resolves with, which
/// answers 127.0.0.1 for every name) on free loopback ports; both are killed on drop.
struct Pebble {
    children: Vec<Child>,
    /// The ACME directory URL.
    directory: String,
    /// The CA of pebble's own HTTPS listener (berth's `--acme-ca`).
    listener_ca: String,
    /// pebble's listener port, and its management port (its issuing roots).
    listen: u16,
    management: u16,
    /// pebble-challtestsrv's management port (fake DNS records).
    dns_management: u16,
}

impl Pebble {
    /// Picks pebble's ports and makes its listener's certificate: berth must know the directory
    /// and trust that CA when it starts, before pebble (which needs berth's HTTP port) can.
    fn prepare(dir: &Path) -> Pebble {
        let listen = free_port();
        Pebble {
            children: Vec::new(),
            directory: format!("https://127.0.0.1:{listen}/dir"),
            listener_ca: test_ca(dir, "pebble-listener", "127.0.0.1"),
            listen,
            management: free_port(),
            dns_management: free_port(),
        }
    }

    /// Starts both; pebble validates HTTP-01 challenges on `http_port` and issues certificates
    /// valid for `validity`.
    fn start(&mut self, dir: &Path, http_port: u16, validity: Duration) {
        let dns = free_port();
        let config = dir.join("pebble.json");
        std::fs::write(
            &config,
            format!(
                r#"{{"pebble": {{
                    "listenAddress": "127.0.0.1:{listen}",
                    "managementListenAddress": "127.0.0.1:{management}",
                    "certificate": "{dir}/pebble-listener.crt",
                    "privateKey": "{dir}/pebble-listener.key",
                    "httpPort": {http_port},
                    "tlsPort": {tls},
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false,
                    "certificateValidityPeriod": {validity}
                }}}}"#,
                listen = self.listen,
                management = self.management,
                dir = dir.display(),
                tls = free_port(),
                validity = validity.as_secs(),
            ),
        )
        .unwrap();
        let log = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-management", &format!("127.0.0.1:{}", self.dns_management)])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("starting pebble-challtestsrv");
        self.children.push(challtestsrv);
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("starting pebble");
        self.children.push(pebble);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.get(&self.directory).status.success() {
            assert!(
                Instant::now() < deadline,
                "pebble did not answer at {}: {}",
                self.directory,
                std::fs::read_to_string(dir.join("pebble.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `url` from pebble's HTTPS listeners.
    fn get(&self, url: &str) -> Output {
        run(Command::new("curl")
            .args(["-sSf", "--max-time", "10", "--cacert", &self.listener_ca])
            .arg(url))
    }

    /// Writes the root pebble issues certificates under to `path`.
    fn save_root(&self, path: &Path) {
        let url = format!("https://127.0.0.1:{}/roots/0", self.management);
        let out = self.get(&url);
        assert!(out.status.success(), "{}", text(&out));
        std::fs::write(path, out.stdout).unwrap();
    }

    /// Makes pebble's DNS answer `host` with `ip`.
    fn resolve(&self, host: &str, ip: &str) {
        let out = run(Command::new("curl")
            .args(["-sSf", "--max-time", "10", "-d"])
            .arg(format!(r#"{{"host": "{host}", "addresses": ["{ip}"]}}"#))
            .arg(format!("http://127.0.0.1:{}/add-a", self.dns_management)));
        assert!(out.status.success(), "{}", text(&out));
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A CA and a certificate for `ip` it signed, made by the real `openssl` as `NAME.crt`/`.key`
/// in `dir`; returns the CA certificate's path.
fn test_ca(dir: &Path, name: &str, ip: &str) -> String {
    let path = |file: &str| dir.join(file).display().to_string();
    let (ca_key, ca, key, csr, cert) = (
        path(&format!("{name}-ca.key")),
        path(&format!("{name}-ca.crt")),
        path(&format!("{name}.key")),
        path(&format!("{name}.csr")),
        path(&format!("{name}.crt")),
    );
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &["-days", "2", "-subj", "/CN=test CA"],
        ]
        .concat(),
        [&["req"][..], &ec, &["-subj", "/CN=pebble"]].concat(),
        vec!["x509", "-req", "-days", "2", "-CAcreateserial"],
    ];
    let san = format!("subjectAltName=IP:{ip},DNS:localhost");
    let extfile = path(&format!("{name}.ext"));
    std::fs::write(&extfile, &san).unwrap();
    for (i, step) in steps.iter().enumerate() {
        let mut command = Command::new("openssl");
        command.args(step);
        match i {
            0 => command.args(["-keyout", &ca_key, "-out", &ca]),
            1 => command.args(["-keyout", &key, "-out", &csr]),
            _ => command
                .args(["-in", &csr, "-CA", &ca, "-CAkey", &ca_key])
                .args(["-extfile", &extfile, "-out", &cert]),
        };
        let out = run(&mut command);
        assert!(out.status.success(), "openssl {step:?}: {}", text(&out));
    }
    ca
}

/// The serial number of the certificate the HTTPS listener serves for `host`, checked against
/// `root` by curl; also returns the status of `GET /`.
fn served_certificate(server: &Server, host: &str, root: &Path) -> (String, u16) {
    let port = server.https.port();
    let curl = run(Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/")));
    assert!(
        curl.status.success(),
        "the certificate for {host} does not verify against pebble's root: {}\n--- server log:\n{}",
        text(&curl),
        server.log()
    );
    let status = String::from_utf8_lossy(&curl.stdout).parse().unwrap();
    let s_client = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {host} </dev/null 2>/dev/null \
             | openssl x509 -noout -serial"
        ))
        .output()
        .unwrap();
    let serial = String::from_utf8_lossy(&s_client.stdout).trim().to_string();
    assert!(serial.starts_with("serial="), "{}", text(&s_client));
    (serial, status)
}

/// `certs:auto` against a real ACME server (Debian's pebble on loopback, validating HTTP-01
/// through berth's own proxy): the certificate is issued, served on --https and verifies
/// against pebble's root; plain HTTP is redirected; it is renewed on its own before it
/// expires; an order pebble cannot validate fails with the reason and leaves automatic
/// certificates off.
#[test]
fn certs_auto_gets_a_certificate_from_pebble_and_renews_it() {
    if !prerequisites_met(&["pebble", "pebble-challtestsrv"]) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut pebble = Pebble::prepare(scratch.path());
    let server = Server::start_with(&[
        "--acme-directory",
        &pebble.directory,
        "--acme-ca",
        &pebble.listener_ca,
        "--acme-email",
        "ops@shop.test",
    ]);
    pebble.start(scratch.path(), server.http.port(), Duration::from_secs(30));
    let root = scratch.path().join("pebble-root.pem");
    pebble.save_root(&root);

    // Only .localhost hosts: nothing an ACME server could validate.
    server.berth_ok(&["apps:create", "shop"]);
    let out = server.berth(&["certs:auto", "shop"]);
    assert!(
        !out.status.success() && text(&out).contains("no host an ACME server can validate"),
        "{}",
        text(&out)
    );

    server.berth_ok(&["domains:add", "shop", "www.shop.test"]);
    let issued = server.berth_ok(&["certs:auto", "shop", "--redirect-https"]);
    assert!(
        issued.contains("Answering the HTTP-01 challenge for www.shop.test")
            && issued.contains("automatic certificate for: www.shop.test"),
        "{issued}"
    );
    // Nothing is deployed, so the app answers 404; what matters is that TLS verifies.
    let (first, status) = served_certificate(&server, "www.shop.test", &root);
    assert_eq!(status, 404);
    let account = server.data().join("acme-account.json");
    let mode = std::fs::metadata(&account).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the ACME account key is private");
    let listed = server.berth_ok(&["certs", "shop"]);
    assert!(
        listed.contains("automatic (ACME)") && listed.contains("https://www.shop.test"),
        "{listed}"
    );
    let listed = server.berth_ok(&["certs", "shop", "--json"]);
    let compact = listed.replace(char::is_whitespace, "");
    assert!(compact.contains(r#""redirect_https":true"#), "{listed}");

    // The 30 s certificate is due after 20 s; the renewal loop replaces it by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (serial, _) = served_certificate(&server, "www.shop.test", &root);
        if serial != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the certificate was not renewed:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A host pebble cannot reach (its DNS points at 127.0.0.2, where nothing listens): the
    // order fails with pebble's reason, and the app gets no automatic certificate.
    pebble.resolve("broken.test", "127.0.0.2");
    server.berth_ok(&["apps:create", "other"]);
    server.berth_ok(&["domains:add", "other", "broken.test"]);
    let out = server.berth(&["certs:auto", "other"]);
    assert!(
        !out.status.success() && text(&out).contains("could not validate broken.test"),
        "{}",
        text(&out)
    );
    let listed = server.berth_ok(&["certs", "other", "--json"]);
    let compact = listed.replace(char::is_whitespace, "");
    assert!(
        compact.contains(r#""auto":null"#) && compact.contains(r#""expires":null"#),
        "{listed}"
    );

    // An uploaded certificate turns automatic ones off.
    let (cert, key) = self_signed(server.dir.path(), "www.shop.test");
    server.berth_ok(&["certs:add", "shop", &cert, &key]);
    let listed = server.berth_ok(&["certs", "shop"]);
    assert!(listed.contains("uploaded"), "{listed}");
}

/// Copies `tests/apps/NAME` into the laptop's work tree.
fn copy_app(laptop: &Laptop, name: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/apps")
        .join(name);
    let out = run(Command::new("cp")
        .arg("-r")
        .arg(format!("{}/.", src.display()))
        .arg(&laptop.dir));
    assert!(out.status.success(), "{}", text(&out));
}

/// Pushes the laptop's main to app `app` and requires success; returns the push's output.
fn push_app(server: &Server, laptop: &Laptop, app: &str) -> String {
    let remote = format!("ssh://git@127.0.0.1:{}/{app}", server.ssh.port());
    let push = laptop.git(&["push", &remote, "main"]);
    let push_text = text(&push);
    assert!(
        push.status.success(),
        "push to {app} failed:\n{push_text}\n--- server log:\n{}",
        server.log()
    );
    push_text
}

/// The host uid of `app`'s running web.1 (whose user namespace maps its root, and only uids
/// from there on, to it), checked against the container's `uid_map`.
fn host_uid_of_web(server: &Server, app: &str) -> u32 {
    let containers = server.data().join("containers");
    let dir = std::fs::read_dir(&containers)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|dir| {
            let name = dir.file_name().unwrap().to_str().unwrap();
            name.starts_with(&format!("{app}-web-1-")) && !dir.join("exit").exists()
        })
        .unwrap_or_else(|| panic!("no running web.1 of {app} in {}", containers.display()));
    let pid = std::fs::read_to_string(dir.join("pid")).unwrap();
    let proc = PathBuf::from(format!("/proc/{}", pid.trim()));
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let ids = |field: &str| -> Vec<u32> {
        let line = status.lines().find_map(|l| l.strip_prefix(field)).unwrap();
        line.split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect()
    };
    let uid = ids("Uid:")[0];
    assert!(uid != 0, "{app}'s container runs as host root");
    assert_eq!(ids("Uid:"), [uid; 4], "{status}");
    assert_eq!(ids("Gid:"), [uid; 4], "{status}");
    let map = std::fs::read_to_string(proc.join("uid_map")).unwrap();
    let map: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(map, ["0", &uid.to_string(), "65536"], "{app}'s uid_map");
    uid
}

/// Real apps whose frameworks no one here wrote, each built by its buildpack on the trixie
/// stack and answering through the proxy, on one server: Django with gunicorn, WhiteNoise's
/// manifest static files (collectstatic at build time) and a `release:` migrate step; a failing
/// release command that keeps the old release serving; a warm redeploy reusing the cached venv;
/// Express from npm (`npm start` as the default web), also with yarn and pnpm lockfiles; an app
/// installed from its pyproject.toml, then from a Pipfile; a static site; a Go module with vendored
/// dependencies; and three buildpacks in `.buildpacks` (a path in the app, a git URL, a
/// built-in) with `export` between them.
#[test]
fn slow_buildpack_apps_django_express_static_go_and_release_phase() {
    if !prerequisites_met(&[]) {
        return;
    }
    let server = Server::start();
    let key_owner = Laptop::new(server.dir.path(), "keys");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        key_owner.key.with_extension("pub").to_str().unwrap(),
    ]);
    let laptop = |name: &str| {
        let laptop = Laptop::new(server.dir.path(), name);
        for ext in ["", "pub"] {
            let (from, to) = (
                key_owner.key.with_extension(ext),
                laptop.key.with_extension(ext),
            );
            std::fs::copy(from, to).unwrap();
        }
        copy_app(&laptop, name);
        laptop
    };

    // Django: collectstatic at build time, migrate as the release command, WhiteNoise serving
    // the hashed static file (ManifestStaticFilesStorage answers 500 without collectstatic).
    let django = laptop("django-site");
    django.commit("Django site");
    server.berth_ok(&["apps:create", "django"]);
    let out = push_app(&server, &django, "django");
    eprintln!("--- the Django push:\n{out}");
    for want in [
        "Using Python 3.13",
        // runtime.txt asks for a version no stack has: said plainly, the build goes on.
        "runtime.txt asks for Python 3.12.7; no stack has it, so Python 3.13.",
        "$ python manage.py collectstatic --noinput",
        "-----> Running the release command: python manage.py migrate --noinput",
        "Applying auth.0001_initial... OK",
        "The release command succeeded",
        "-----> Discovering process types: release, web",
        "django v1 is live",
    ] {
        assert!(
            out.contains(want),
            "{want:?} is not in the push output:\n{out}"
        );
    }
    let (status, page) = server.get("django.localhost");
    assert_eq!(status, 200, "{page}\n--- server log:\n{}", server.log());
    assert!(page.contains("hello from django 6."), "{page}");
    let css = page
        .split('"')
        .find(|s| s.starts_with("/static/site.") && s.ends_with(".css"))
        .unwrap_or_else(|| panic!("no hashed stylesheet link in {page}"));
    assert_eq!(
        http_get_path(server.http, "django.localhost", css),
        (200, "body { color: rebeccapurple; }\n".to_string())
    );
    let ps: serde_json::Value =
        serde_json::from_str(&server.berth_ok(&["ps", "django", "--json"])).unwrap();
    let types: Vec<&str> = ps
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["process_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["web"],
        "the release command is not a running process"
    );
    let out = server.berth(&["ps:scale", "django", "release=1"]);
    assert!(
        !out.status.success() && text(&out).contains("not a process type to scale"),
        "{}",
        text(&out)
    );

    // A failing release command: the push fails with its output, v1 keeps serving, v2 is failed.
    django.write(
        "Procfile",
        "release: python -c \"import sys; print('migration 0042 failed'); sys.exit(3)\"\nweb: gunicorn site_config.wsgi --bind 0.0.0.0:$PORT\n",
    );
    django.commit("Broken migration");
    let remote = format!("ssh://git@127.0.0.1:{}/django", server.ssh.port());
    let push = django.git(&["push", &remote, "main"]);
    let out = text(&push);
    assert!(!push.status.success(), "{out}");
    assert!(out.contains("migration 0042 failed"), "{out}");
    assert!(
        out.contains("the release command exited with code 3"),
        "{out}"
    );
    let (status, page) = server.get("django.localhost");
    assert!(
        status == 200 && page.contains("hello from django"),
        "{page}"
    );
    let releases: serde_json::Value =
        serde_json::from_str(&server.berth_ok(&["releases", "django", "--json"])).unwrap();
    assert_eq!(releases[0]["version"], 2);
    assert_eq!(releases[0]["status"], "failed");
    assert!(
        releases[0]["reason"]
            .as_str()
            .unwrap()
            .contains("exited with code 3"),
        "{releases}"
    );
    assert_eq!(releases[1]["status"], "live");

    // A warm redeploy of a one-line change: the cached venv, no pip; the new code answers.
    django.write(
        "Procfile",
        "release: python manage.py migrate --noinput\nweb: gunicorn site_config.wsgi --bind 0.0.0.0:$PORT\n",
    );
    let template = std::fs::read_to_string(django.dir.join("templates/index.html")).unwrap();
    django.write(
        "templates/index.html",
        &template.replace("hello from", "hi from"),
    );
    django.commit("One line");
    let started = Instant::now();
    let out = push_app(&server, &django, "django");
    eprintln!(
        "warm Django redeploy: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.contains("Reusing the cached virtualenv (requirements.txt unchanged)"),
        "{out}"
    );
    assert!(!out.contains("Collecting"), "pip did not run:\n{out}");
    assert!(server.get("django.localhost").1.contains("hi from django"));

    // Express from npm, without a Procfile: package.json's start script is the web process.
    let express = laptop("express-hello");
    express.commit("Express");
    server.berth_ok(&["apps:create", "express"]);
    let out = push_app(&server, &express, "express");
    assert!(
        out.contains("Node.js app detected") && out.contains("Using Node.js 20."),
        "{out}"
    );
    let (status, body) = server.get("express.localhost");
    assert!(
        status == 200 && body.starts_with("hello from express 5."),
        "{status} {body}"
    );

    // The same app with a yarn lockfile, then a pnpm one: each installs with its own tool.
    let lockfiles = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps/node-lockfiles");
    for (lock, tool) in [("yarn.lock", "yarn"), ("pnpm-lock.yaml", "pnpm")] {
        for old in ["yarn.lock", "pnpm-lock.yaml"] {
            let _ = std::fs::remove_file(express.dir.join(old));
        }
        std::fs::copy(lockfiles.join(lock), express.dir.join(lock)).unwrap();
        express.commit(&format!("Locked with {tool}"));
        let out = push_app(&server, &express, "express");
        assert!(
            out.contains(&format!("Installing dependencies ({lock})")),
            "{out}"
        );
        assert!(
            server
                .get("express.localhost")
                .1
                .starts_with("hello from express 5."),
            "{tool}"
        );
    }

    // A pyproject.toml app is installed with `pip install .`; then the same app with a Pipfile.
    let py = laptop("pyproject-flask");
    py.commit("pyproject");
    server.berth_ok(&["apps:create", "pyproj"]);
    let out = push_app(&server, &py, "pyproj");
    assert!(out.contains("Installing the app with pip"), "{out}");
    let (status, body) = server.get("pyproj.localhost");
    assert!(
        status == 200 && body.starts_with("hello from pyproject with flask 3."),
        "{status} {body}"
    );
    std::fs::remove_file(py.dir.join("pyproject.toml")).unwrap();
    py.write("Pipfile", "[packages]\nflask = \">=3\"\n");
    let app_py = std::fs::read_to_string(py.dir.join("hello_app.py")).unwrap();
    py.write(
        "hello_app.py",
        &app_py.replace("from pyproject", "from a Pipfile"),
    );
    py.commit("Pipfile");
    let out = push_app(&server, &py, "pyproj");
    assert!(
        out.contains("Installing Pipfile's packages with pip"),
        "{out}"
    );
    let (status, body) = server.get("pyproj.localhost");
    assert!(
        status == 200 && body.starts_with("hello from a Pipfile with flask 3."),
        "{status} {body}"
    );

    // Each app's containers run in a user namespace of their own: root inside, a host uid of
    // the app's own range outside.
    let django_uid = host_uid_of_web(&server, "django");
    let express_uid = host_uid_of_web(&server, "express");
    assert!(django_uid >= 100_000 && express_uid >= 100_000);
    assert!(
        django_uid.abs_diff(express_uid) >= 65_536,
        "ranges overlap: {django_uid} {express_uid}"
    );
    // Their builds ran as the same range: what the build wrote to the app's buildpack cache is
    // the range's. The layers they made keep the container's ids: the app's files and its venv
    // are root's (0), not the range's.
    let owner = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    };
    let cache = server.data().join("cache/django");
    for path in ["", "python", "python/venv.key", "python/venv/bin/python"] {
        assert_eq!(
            owner(&cache.join(path)),
            (django_uid, django_uid),
            "cache/django/{path}"
        );
    }
    let layers: Vec<PathBuf> = std::fs::read_dir(server.data().join("images/l"))
        .unwrap()
        .flatten()
        .map(|layer| layer.path())
        .collect();
    for file in [
        "app/manage.py",
        "app/.venv/pyvenv.cfg",
        "app/.venv/bin/python",
    ] {
        let found: Vec<PathBuf> = layers
            .iter()
            .map(|layer| layer.join(file))
            .filter(|path| path.symlink_metadata().is_ok())
            .collect();
        assert!(!found.is_empty(), "no layer has {file}");
        for path in found {
            assert_eq!(owner(&path), (0, 0), "{}", path.display());
        }
    }

    // A static site, served by the run stack's small server.
    let site = laptop("static-site");
    site.commit("Site");
    server.berth_ok(&["apps:create", "site"]);
    // A stack berth does not have is refused with the ones it has.
    server.berth_ok(&["config:set", "site", "BERTH_STACK=sid", "--no-restart"]);
    let remote = format!("ssh://git@127.0.0.1:{}/site", server.ssh.port());
    let push = site.git(&["push", &remote, "main"]);
    let out = text(&push);
    assert!(!push.status.success(), "{out}");
    assert!(
        out.contains("BERTH_STACK=\"sid\" is not a stack berth has — use one of: trixie, bookworm"),
        "{out}"
    );
    server.berth_ok(&["config:unset", "site", "BERTH_STACK", "--no-restart"]);
    let out = push_app(&server, &site, "site");
    assert!(out.contains("Static site detected"), "{out}");
    let (status, body) = server.get("site.localhost");
    assert!(
        status == 200 && body.contains("hello from a static site"),
        "{body}"
    );
    assert_eq!(
        http_get_path(server.http, "site.localhost", "/style.css"),
        (200, "p { margin: 0; }\n".to_string())
    );

    // A Go module with vendored dependencies, compiled on the build stack, run on the run stack.
    let go = laptop("go-vendored");
    go.commit("Go");
    server.berth_ok(&["apps:create", "goapp"]);
    let out = push_app(&server, &go, "goapp");
    assert!(out.contains("Using vendored modules"), "{out}");
    let (status, body) = server.get("goapp.localhost");
    assert!(
        status == 200 && body.starts_with("hello from go (go1.24"),
        "{status} {body}"
    );

    // .buildpacks: a path in the app, a git URL (a repo the test makes), a built-in, in order,
    // the first one's `export` seen by the second; the last one's default web process.
    let multi = laptop("multi-buildpack");
    let bare = multi.dir.join("tools/second.git");
    let work = server.dir.path().join("second-work");
    for args in [
        vec!["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        vec![
            "clone",
            "-q",
            bare.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    ] {
        let out = run(Command::new("git").args(&args));
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = run(Command::new("cp")
        .arg("-r")
        .arg(multi.dir.join("second/bin"))
        .arg(&work));
    assert!(out.status.success(), "{}", text(&out));
    for args in [
        &["add", "-A"][..],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "bp",
        ],
        &["tag", "v1"],
        &["push", "-q", "origin", "main", "v1"],
    ] {
        let out = run(Command::new("git").current_dir(&work).args(args));
        assert!(out.status.success(), "{}", text(&out));
    }
    // Its main moves on to a buildpack that fails: `.buildpacks` asks for `#v1`.
    let compile = work.join("bin/compile");
    let broken = std::fs::read_to_string(&compile).unwrap() + "echo not v1; exit 3\n";
    std::fs::write(&compile, broken).unwrap();
    for args in [
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qam",
            "broken",
        ][..],
        &["push", "-q", "origin", "main"],
    ] {
        let out = run(Command::new("git").current_dir(&work).args(args));
        assert!(out.status.success(), "{}", text(&out));
    }
    multi.commit("Three buildpacks");
    server.berth_ok(&["apps:create", "multi"]);
    let out = push_app(&server, &multi, "multi");
    let order = [
        "first: compiling",
        "second: compiling with FROM_FIRST=exported-by-first",
        "Static site detected",
    ];
    let at: Vec<usize> = order
        .iter()
        .map(|s| {
            out.find(s)
                .unwrap_or_else(|| panic!("{s:?} not in:\n{out}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "in order:\n{out}");
    assert_eq!(
        server.get("multi.localhost"),
        (200, "<p>exported-by-first and first</p>\n".to_string())
    );
    assert!(
        server.leftovers().iter().all(|l| !l.contains("release-")),
        "no release container left"
    );
}

const DOCKERFILE: &str = r#"# A two-stage build: the first stage compiles the app into a zipapp.
ARG BASE=berth/stack-build
FROM ${BASE} AS build
WORKDIR /src
COPY app/ ./
RUN <<EOF
set -e
mkdir -p /out /build-info
python3 -m zipapp /src -o /out/app.pyz
python3 --version > /out/built-with
cat /proc/self/uid_map > /build-info/uid_map
EOF
USER 1000:1000
RUN touch /tmp/by-1000

FROM berth/stack-run
ENV GREETING="hello from a Dockerfile" \
    APP_HOME=/srv/app
WORKDIR $APP_HOME
COPY --from=build /out/ ./
COPY *.txt ./
EXPOSE 8080
HEALTHCHECK --interval=1s CMD curl -f http://localhost:8080/health
USER nobody
CMD ["python3", "app.pyz"]
"#;

const DOCKER_APP_PY: &str = r#"import http.server, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        built = open("built-with").read().split()[0]
        notes = open("notes.txt").read().strip()
        files = ",".join(sorted(os.listdir(".")))
        body = f"{os.environ['GREETING']} | {built} | {notes} | {files} | {os.getcwd()} | {os.environ['PORT']} | {os.getuid()}\n"
        body = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// Dockerfile builds end to end: a two-stage Dockerfile (the first stage compiles a zipapp)
/// pushed over git+ssh serves through the proxy on its EXPOSEd port from its WORKDIR, with
/// `.dockerignore` applied; its `RUN` steps ran in a user namespace (not host root), and the
/// layers they made keep the container's ids (root's files 0, a `USER 1000` file 1000); an
/// unchanged rebuild takes every layer from the cache; a changed copied file rebuilds from its
/// step on; a malformed Dockerfile is refused with its line.
#[test]
fn slow_dockerfile_multi_stage_cache_and_bad_dockerfile() {
    if !prerequisites_met(&[]) {
        return;
    }
    let mut server = Server::start();
    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    server.berth_ok(&["apps:create", "dock"]);
    std::fs::create_dir_all(laptop.dir.join("app")).unwrap();
    laptop.write("app/__main__.py", DOCKER_APP_PY);
    laptop.write("Dockerfile", DOCKERFILE);
    laptop.write("notes.txt", "first notes");
    laptop.write("secret.txt", "not for the image");
    laptop.write("README.md", "readme");
    laptop.write(".dockerignore", "secret.txt\nREADME.md\n");
    laptop.commit("Dockerfile app");
    let remote = format!("ssh://git@127.0.0.1:{}/dock", server.ssh.port());
    laptop.git(&["remote", "add", "deploy", &remote]);

    let push = |what: &str| laptop.push_ok(&server, what);
    let first = push("the first push");
    for expected in [
        "Building dock from Dockerfile",
        "Step 1/16 : ARG BASE=berth/stack-build",
        "Step 5/16 : RUN <<EOF",
        "HEALTHCHECK: GET /health",
        "Process types: web",
        "dock v1 is live",
    ] {
        assert!(first.contains(expected), "{expected:?} missing:\n{first}");
    }
    let (status, body) = server.get("dock.localhost");
    assert_eq!(status, 200, "{body}\n--- server log:\n{}", server.log());
    let fields: Vec<&str> = body.trim_end().split(" | ").collect();
    assert_eq!(
        fields,
        [
            "hello from a Dockerfile",
            "Python",
            "first notes",
            "app.pyz,built-with,notes.txt",
            "/srv/app",
            "8080",
            "65534"
        ],
        "{body}"
    );

    // The RUN steps were not host root (host root's map is `0 0 4294967295`): root inside was
    // a host uid of the app's range. Their layers, as stored, hold the container's own ids.
    let in_layers = |path: &str| -> Vec<PathBuf> {
        let layers = server.data().join("images/l");
        std::fs::read_dir(&layers)
            .unwrap()
            .flatten()
            .map(|layer| layer.path().join(path))
            .filter(|file| file.exists())
            .collect()
    };
    let owner = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    };
    let uid_map = in_layers("build-info/uid_map");
    assert_eq!(uid_map.len(), 1, "{uid_map:?}");
    let map = std::fs::read_to_string(&uid_map[0]).unwrap();
    let map: Vec<u64> = map.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(
        map.len() == 3 && map[0] == 0 && map[1] >= 100_000 && map[2] == 65_536,
        "a RUN step's uid_map: {map:?}"
    );
    assert_eq!(owner(&uid_map[0]), (0, 0), "root's file in the layer");
    assert_eq!(owner(uid_map[0].parent().unwrap()), (0, 0));
    let by_user = in_layers("tmp/by-1000");
    assert_eq!(by_user.len(), 1, "{by_user:?}");
    assert_eq!(owner(&by_user[0]), (1000, 1000), "USER 1000's file");
    // Each layer's tar, made again from its files, still has its digest.
    server.export("dock:v1", &server.dir.path().join("dock.tar"));

    // An unchanged rebuild (only an ignored file changed) reuses every layer.
    let layer_steps = 7;
    laptop.write("README.md", "readme, edited");
    laptop.commit("Edit the README");
    let again = push("the unchanged rebuild");
    assert_eq!(again.matches("Using cache").count(), layer_steps, "{again}");

    // One copied file changed: the steps before it come from the cache, it and later rebuild.
    laptop.write("notes.txt", "second notes");
    laptop.commit("New notes");
    let changed = push("the rebuild after a copied file changed");
    assert_eq!(
        changed.matches("Using cache").count(),
        layer_steps - 1,
        "{changed}"
    );
    let (_, body) = server.get("dock.localhost");
    assert!(body.contains(" | second notes | "), "{body}");

    // A malformed Dockerfile is refused with its line; v3 keeps serving.
    laptop.write(
        "Dockerfile",
        "FROM berth/stack-run\nWORKDIR /srv\nCOPY onlyone\nCMD [\"true\"]\n",
    );
    laptop.commit("Broken Dockerfile");
    laptop.push_rejected(&[
        "Dockerfile line 3: COPY takes one or more sources and a destination",
        "COPY onlyone",
    ]);
    let (_, body) = server.get("dock.localhost");
    assert!(body.contains(" | second notes | "), "{body}");

    server.stop_leaving_nothing();
}

/// A Dockerfile `FROM` an image in a registry on loopback (Debian's docker-registry, with a
/// login the app's config gives): the first push pulls it into the store and the app serves through the proxy; the next push
/// finds it in the store and pulls nothing; an unknown tag and an unreachable registry fail
/// the push with the Dockerfile line and what to do.
#[test]
fn slow_dockerfile_from_registry() {
    if !prerequisites_met(&["docker-registry", "skopeo", "busybox", "htpasswd"]) {
        return;
    }
    let mut server = Server::start();
    let login = Login::Basic {
        user: "puller",
        password: "s3cret",
    };
    let registry = Registry::start(server.dir.path(), "127.0.0.1", login, None);
    let layout = server.dir.path().join("busybox-oci");
    busybox_layout(&layout, "1");
    for tag in ["1", "1-multi", "1-arm"] {
        registry.push(&layout, tag, "team/web", "puller:s3cret");
    }

    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    server.berth_ok(&["apps:create", "pulled"]);
    let image = format!("{}/team/web:1", registry.host);
    let dockerfile =
        format!("FROM {image}\nCOPY index.html /www/\nRUN echo -n ' (built)' >> /www/index.html\n");
    laptop.write("Dockerfile", &dockerfile);
    laptop.write("index.html", "served from a pulled image");
    laptop.commit("Dockerfile from a registry");
    let remote = format!("ssh://git@127.0.0.1:{}/pulled", server.ssh.port());
    laptop.git(&["remote", "add", "deploy", &remote]);

    // A registry on the host's loopback is off limits to pushes by default: the daemon pulls
    // from the host's network, where loopback-only services listen.
    laptop.push_rejected(&[
        &format!(
            "the registry {} is on this machine's loopback",
            registry.host
        ),
        "--allow-loopback-registries",
    ]);
    server.stop();
    server.extra_args = vec!["--allow-loopback-registries".to_string()];
    server.launch();
    let remote = format!("ssh://git@127.0.0.1:{}/pulled", server.ssh.port());
    laptop.git(&["remote", "set-url", "deploy", &remote]);

    // The registry wants a login: without the app's, the push is refused saying how to set it.
    let denied = laptop.push_rejected(&[
        &format!(
            "Dockerfile line 1: FROM {image}: the registry {} refused",
            registry.host
        ),
        "BERTH_REGISTRY_USER",
    ]);
    eprintln!("--- without a login:\n{denied}");
    server.berth_ok(&[
        "config:set",
        "pulled",
        "BERTH_REGISTRY_USER=puller",
        "BERTH_REGISTRY_PASSWORD=s3cret",
    ]);

    let push = |what: &str| laptop.push_ok(&server, what);
    let first = push("the first push");
    for expected in [
        format!("Pulling {image}"),
        "layer 1/1".to_string(),
        format!("Pulled {image} in"),
        "pulled v1 is live".to_string(),
    ] {
        assert!(first.contains(&expected), "{expected:?} missing:\n{first}");
    }
    let (status, body) = server.get("pulled.localhost");
    assert_eq!(status, 200, "{body}\n--- server log:\n{}", server.log());
    assert_eq!(body, "served from a pulled image (built)");

    // The image is in the store now, under the reference: no second pull.
    laptop.write("index.html", "second version");
    laptop.commit("New page");
    let second = push("the second push");
    assert!(!second.contains("Pulling"), "pulled again:\n{second}");
    let (_, body) = server.get("pulled.localhost");
    assert_eq!(body, "second version (built)");
    // The registry login is berth's, not the app's: it is not in the container's environment.
    let pids = container_pids(&server, "pulled");
    assert!(!pids.is_empty());
    for (dyno, pid) in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(environ.contains(&format!("DYNO={dyno}")), "{environ}");
        assert!(!environ.contains("BERTH_REGISTRY"), "{environ}");
    }

    // An unknown tag and a registry nobody listens on: refused, v2 keeps serving.
    laptop.write(
        "Dockerfile",
        &format!("FROM {}/team/web:nope\n", registry.host),
    );
    laptop.commit("Unknown tag");
    let unknown = laptop.push_rejected(&[
        &format!(
            "Dockerfile line 1: FROM {}/team/web:nope: the registry",
            registry.host
        ),
        &format!("has no image `{}/team/web:nope`", registry.host),
        "check the name and tag",
    ]);
    laptop.write(
        "Dockerfile",
        &format!("FROM {}/team/web:1-arm\n", registry.host),
    );
    laptop.commit("Wrong platform");
    let platform = laptop.push_rejected(&[
        &format!("Dockerfile line 1: FROM {}/team/web:1-arm:", registry.host),
        "has no linux/amd64 image (it has linux/arm64) — use an image built for linux/amd64",
    ]);
    eprintln!("--- a wrong platform:\n{platform}");
    let closed = free_port();
    laptop.write(
        "Dockerfile",
        &format!("FROM 127.0.0.1:{closed}/team/web:1\n"),
    );
    laptop.commit("Unreachable registry");
    let unreachable = laptop.push_rejected(&[
        &format!("Dockerfile line 1: FROM 127.0.0.1:{closed}/team/web:1: cannot reach the registry 127.0.0.1:{closed}"),
        "check that it runs",
    ]);
    eprintln!("--- the refused pushes:\n{unknown}\n{unreachable}");
    let (_, body) = server.get("pulled.localhost");
    assert_eq!(body, "second version (built)");

    // From a multi-platform index berth takes the linux/amd64 image.
    laptop.write(
        "Dockerfile",
        &format!(
            "FROM {}/team/web:1-multi\nCOPY index.html /www/\n",
            registry.host
        ),
    );
    laptop.commit("From an index");
    let third = push("a push from an index");
    assert!(third.contains("layer 1/1"), "{third}");
    let (_, body) = server.get("pulled.localhost");
    assert_eq!(body, "second version");

    drop(registry);
    server.stop_leaving_nothing();
}

/// Runs `command` with `input` on its stdin; returns its output.
fn with_input(command: &mut Command, input: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// What is left of the one-off runs of `app`: container directories, mounts, cgroups, shims.
fn run_leftovers(server: &Server, app: &str) -> Vec<String> {
    let prefix = format!("{app}-run-");
    server
        .leftovers()
        .into_iter()
        .filter(|l| l.contains(&prefix))
        .collect()
}

/// `berth run` and `ssh … run`, like `heroku run`: one-off containers of the live release with
/// its config, stdin and stdout wired, the exit code passed back, a terminal when asked for
/// (through `script` for the CLI, `ssh -tt` over SSH), listed by `ps` while they run, stopped
/// when their client goes away, and removed when they end.
#[test]
fn slow_run_one_off_commands() {
    if !prerequisites_met(&["script"]) {
        return;
    }
    let mut server = Server::start();
    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    server.berth_ok(&["apps:create", "once"]);
    server.berth_ok(&["config:set", "once", "GREETING=from config"]);
    // Nothing to run before a push, nor in an app that does not exist.
    for (app, expected) in [
        (
            "once",
            "error: app \"once\" has no release yet — push code first",
        ),
        ("nope", "error: app \"nope\" not found — see `berth apps`"),
    ] {
        let out = server.berth(&["run", app, "--", "true"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).starts_with(expected), "{}", text(&out));
    }
    laptop.write("app.py", STDLIB_APP_PY);
    laptop.write("version.txt", "v1");
    laptop.write("Procfile", "web: python3 app.py\n");
    laptop.commit("a web app");
    let remote = format!("ssh://git@127.0.0.1:{}/once", server.ssh.port());
    laptop.git(&["remote", "add", "deploy", &remote]);
    laptop.push_ok(&server, "the first push");
    let data = server.data();
    let berth_run = |stdin: &str, args: &[&str]| -> Output {
        let mut command = Command::new(BERTH);
        command.arg("--data").arg(&data).args(["run", "once", "--"]);
        with_input(command.args(args), stdin.as_bytes())
    };

    let why = |out: &Output| format!("{}\n--- server log:\n{}", text(out), server.log());

    // The exit code comes back; stdin goes in and comes back out, stderr apart.
    let out = berth_run("", &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", why(&out));
    let out = berth_run("hi\nthere\n", &["sh", "-c", "cat; echo to stderr >&2"]);
    assert_eq!(out.status.code(), Some(0), "{}", why(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\nthere\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to stderr\n");
    // The app's config and the run's own name are in its environment; one word is a shell line.
    let out = berth_run(
        "",
        &["echo \"$GREETING\" $DYNO; test -t 0 || echo no terminal"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from config run.1\nno terminal\n",
        "{}",
        text(&out)
    );
    assert_eq!(run_leftovers(&server, "once"), Vec::<String>::new());

    // From inside a container: the host (a listener of this test on all addresses, through the
    // bridge's gateway) and another container (web.1) cannot be reached.
    let host_listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    host_listener.set_nonblocking(true).unwrap();
    let ps: serde_json::Value =
        serde_json::from_str(&server.berth_ok(&["ps", "once", "--json"])).unwrap();
    let web = format!("{}:{}", ps[0]["ip"].as_str().unwrap(), ps[0]["port"]);
    let gateway = server.subnet.replace(".0.0/16", ".0.1");
    let port = host_listener.local_addr().unwrap().port();
    let probe = format!(
        "import socket\nfor target in [('{gateway}', {port}), ('{}', {})]:\n    try:\n        socket.create_connection(target, timeout=2).close()\n        print('reached', target[0])\n    except OSError:\n        print('blocked', target[0])\n",
        ps[0]["ip"].as_str().unwrap(),
        ps[0]["port"]
    );
    let out = berth_run("", &["python3", "-c", &probe]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "blocked {gateway}\nblocked {}\n",
            web.split(':').next().unwrap()
        ),
        "{}",
        why(&out)
    );
    assert!(
        host_listener.accept().is_err(),
        "a container reached the host"
    );

    // With a terminal on stdin (script gives the CLI one), the run gets a terminal of its own
    // (/dev/pts inside the container) and an interactive shell reads commands from it.
    let script = format!(
        "{BERTH} --data {} run once -- sh",
        berth::server::shell_quote(&data.to_string_lossy())
    );
    let out = with_input(
        Command::new("script").args(["-qec", &script, "/dev/null"]),
        b"tty; echo \"size $(stty size)\"\nexit 5\n",
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{}", why(&out));
    assert!(shown.contains("/dev/pts/0\r\n"), "{}", why(&out));
    assert!(shown.contains("size "), "{}", why(&out));

    // Over SSH: the exit status comes back, and `-tt` gives a terminal too.
    let out = laptop.ssh(server.ssh.port(), "run once -- sh -c 'exit 3'");
    assert_eq!(out.status.code(), Some(3), "{}", why(&out));
    let out = with_input(
        &mut laptop.ssh_command(server.ssh.port(), &["-tt", "run once -- sh"]),
        b"tty; echo \"$GREETING\"\nexit 4\n",
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{}", why(&out));
    assert!(shown.contains("/dev/pts/0\r\n"), "{}", why(&out));
    assert!(shown.contains("from config\r\n"), "{}", why(&out));
    // A key berth does not know may not run anything.
    let stranger = Laptop::new(server.dir.path(), "stranger");
    let out = stranger.ssh(server.ssh.port(), "run once -- true");
    assert_eq!(out.status.code(), Some(255), "{}", why(&out));
    assert!(text(&out).contains("Permission denied"), "{}", why(&out));

    // While a run sleeps, ps lists it with its command (`up` once its process runs, not
    // before); when its client goes away, it is stopped and removed.
    let mut sleeper = Command::new(BERTH)
        .arg("--data")
        .arg(&data)
        .args(["run", "once", "--", "sleep", "300"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ps = wait_for_ps(&server, "once", 60, |ps| ps.contains("run.1: up"));
    assert!(ps.contains("`'sleep' '300'` (by admin)"), "{ps}");
    assert!(
        ps.contains("=== run: one-off (512 MiB, 1 CPU, 1024 pids)"),
        "{ps}"
    );
    let json = server.berth_ok(&["ps", "once", "--json"]);
    assert!(json.contains(r#""command": "'sleep' '300'""#), "{json}");
    let mut containers: Vec<String> = std::fs::read_dir(data.join("containers"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    containers.sort();
    let is = |name: &String, prefix: &str| name.starts_with(prefix);
    assert!(
        matches!(containers.as_slice(), [run, web] if is(run, "once-run-1-") && is(web, "once-web-1-")),
        "web.1 and run.1 only: {containers:?}\n{ps}"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    wait_for_ps(&server, "once", 60, |ps| !ps.contains("run.1"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_leftovers(&server, "once").is_empty() {
        assert!(
            Instant::now() < deadline,
            "left of the abandoned run: {:#?}",
            run_leftovers(&server, "once")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = server.berth_ok(&["logs", "once"]);
    assert!(
        logs.contains("berth[run.1]: started `sh` by admin"),
        "{logs}"
    );
    assert!(logs.contains("berth[run.1]: exited with code 4"), "{logs}");

    server.stop_leaving_nothing();
}

/// A DNS server of the test's own on 127.0.0.1 (UDP, a free port): `db.berth-test.internal`
/// has the A record 192.0.2.10 and no AAAA record; every other name does not exist. Records
/// the names it was asked for; stops when dropped.
struct TestDns {
    addr: SocketAddr,
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const TEST_NAME: &str = "db.berth-test.internal";
const TEST_ADDRESS: [u8; 4] = [192, 0, 2, 10];

impl TestDns {
    fn start() -> TestDns {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (asked, stop) = (asked.clone(), stop.clone());
            move || {
                let mut buf = [0; 4096];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some((name, answer)) = TestDns::answer(&buf[..len]) {
                        asked.lock().unwrap().push(name);
                        let _ = socket.send_to(&answer, from);
                    }
                }
            }
        });
        TestDns {
            addr,
            asked,
            stop,
            thread: Some(thread),
        }
    }

    /// The name a query asks for and the answer to it (None for what is no query).
    fn answer(query: &[u8]) -> Option<(String, Vec<u8>)> {
        let (mut at, mut labels) = (12, Vec::new());
        loop {
            let len = usize::from(*query.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
            at += len;
        }
        let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
        let question = query.get(12..at + 4)?;
        let name = labels.join(".");
        let known = name == TEST_NAME;
        let records: u16 = (known && qtype == 1).into();
        let mut answer = query[..2].to_vec();
        // QR, RD as asked, RA; NXDOMAIN for unknown names.
        answer.extend([0x80 | (query[2] & 0x01), if known { 0x80 } else { 0x83 }]);
        answer.extend([0, 1]);
        answer.extend(records.to_be_bytes());
        answer.extend([0, 0, 0, 0]);
        answer.extend(question);
        if records == 1 {
            // The name (a pointer to the question's), A, IN, TTL 60, 4 bytes.
            answer.extend([0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            answer.extend(TEST_ADDRESS);
        }
        Some((name, answer))
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Apps resolve names through their /etc/resolv.conf, which names berth's DNS stub on the
/// bridge's gateway; the stub relays to the server's `--dns`, here a DNS server of this test on
/// 127.0.0.1 (a loopback resolver, which containers cannot reach themselves). The host's
/// search and options lines are kept. An app with egress off cannot use the stub either (no
/// way out by DNS), and its lookups fail at once instead of timing out.
#[test]
fn slow_apps_resolve_names_through_berths_dns_stub() {
    if !prerequisites_met(&[]) {
        return;
    }
    let dns = TestDns::start();
    let mut server = Server::start_with(&["--dns", &dns.addr.to_string()]);
    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    server.berth_ok(&["apps:create", "names"]);
    laptop.write("app.py", STDLIB_APP_PY);
    laptop.write("version.txt", "v1");
    laptop.write("Procfile", "web: python3 app.py\n");
    laptop.commit("a web app");
    push_app(&server, &laptop, "names");
    let in_app = |command: &str| {
        let out = server.berth(&["run", "names", "--", command]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            text(&out),
        )
    };

    let gateway = server.subnet.replace(".0.0/16", ".0.1");
    let (code, resolv_conf, all) = in_app("cat /etc/resolv.conf");
    assert_eq!(code, Some(0), "{all}");
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let kept = host.lines().map(str::trim).filter(|line| {
        ["search", "domain", "options"].contains(&line.split_whitespace().next().unwrap_or(""))
    });
    let expected: Vec<String> = std::iter::once(format!("nameserver {gateway}"))
        .chain(kept.map(String::from))
        .collect();
    let lines: Vec<String> = resolv_conf
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(String::from)
        .collect();
    assert_eq!(lines, expected, "the container's /etc/resolv.conf");

    let (code, found, all) = in_app(&format!("getent hosts {TEST_NAME}"));
    assert_eq!(code, Some(0), "{all}\n--- server log:\n{}", server.log());
    assert_eq!(
        found.split_whitespace().collect::<Vec<_>>(),
        ["192.0.2.10", TEST_NAME],
        "{all}"
    );
    assert!(dns.asked().iter().any(|name| name == TEST_NAME));
    let (code, _, all) = in_app("getent hosts nope.berth-test.internal");
    assert_eq!(code, Some(2), "a name that does not exist: {all}");

    server.berth_ok(&["network:set", "names", "--egress", "off"]);
    let asked = dns.asked().len();
    let started = Instant::now();
    let (code, _, all) = in_app(&format!("getent hosts {TEST_NAME}"));
    let took = started.elapsed();
    assert_eq!(code, Some(2), "egress off, yet: {all}");
    // glibc waits 5 s for a dropped query; a refused one fails at once.
    assert!(
        took < Duration::from_secs(4),
        "a lookup without egress should fail at once, not time out ({took:?})"
    );
    assert_eq!(
        dns.asked().len(),
        asked,
        "a query without egress reached the DNS server"
    );
    server.stop_leaving_nothing();
}

/// Images and disk on a server keeping one release's images: an app built from an imported
/// busybox image; `images` lists its image with size and the release using it; the exported
/// image is a docker-archive and an OCI archive skopeo reads and copies, and berth imports to
/// the same digest; a second push, then `gc` (after the first release's containers are gone)
/// removes v1's image and its layer's files but keeps v2's (live) and the tagged base, and a
/// rollback to v1 says why it cannot; `info` shows where the disk goes.
#[test]
fn slow_images_export_gc_and_info() {
    if !prerequisites_met(&["skopeo", "busybox"]) {
        return;
    }
    let mut server = Server::start_with(&["--keep-releases", "1"]);
    let layout = server.dir.path().join("busybox-oci");
    busybox_layout(&layout, "1");
    let archive = server.dir.path().join("busybox.tar");
    let out = run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg("."));
    assert!(out.status.success(), "{}", text(&out));
    server.berth_ok(&[
        "images:import",
        archive.to_str().unwrap(),
        "--name",
        "busybox:1",
    ]);

    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    server.berth_ok(&["apps:create", "img"]);
    laptop.write("Dockerfile", "FROM busybox:1\nCOPY www /www/\n");
    std::fs::create_dir_all(laptop.dir.join("www")).unwrap();
    laptop.write("www/index.html", "first page");
    // 3 MB that only v1 has, so its collection frees a measurable amount.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(laptop.dir.join("www/big.bin"), &big).unwrap();
    laptop.commit("v1");
    let remote = format!("ssh://git@127.0.0.1:{}/img", server.ssh.port());
    laptop.git(&["remote", "add", "deploy", &remote]);
    laptop.push_ok(&server, "the first push");
    server.assert_serves("img.localhost", "first page");

    let release_image = |version: i64| -> String {
        let releases: serde_json::Value =
            serde_json::from_str(&server.berth_ok(&["releases", "img", "--json"])).unwrap();
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["version"] == version)
            .unwrap_or_else(|| panic!("no v{version}: {releases}"))["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let images = || -> Vec<serde_json::Value> {
        serde_json::from_str(&server.berth_ok(&["images", "--json"])).unwrap()
    };
    let v1 = release_image(1);
    let listed = images();
    let row = listed.iter().find(|i| i["digest"] == v1.as_str()).unwrap();
    assert!(row["size"].as_u64().unwrap() > 3_000_000, "{row}");
    assert_eq!(row["used_by"][0]["app"], "img");
    assert_eq!(row["used_by"][0]["version"], 1);
    assert_eq!(row["used_by"][0]["status"], "live");
    let layers: Vec<String> = row["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 2, "{row}");
    let layer_dir = |digest: &str| server.data().join("images/l").join(&digest[7..19]);
    let v1_top = layer_dir(&layers[1]);
    assert!(v1_top.join("www/big.bin").is_file());
    let table = server.berth_ok(&["images"]);
    assert!(table.contains("busybox:1"), "{table}");
    assert!(
        table.contains("img:v1") && table.contains("img v1 (live)"),
        "{table}"
    );
    assert!(table.contains(" MB"), "{table}");

    // Exported: skopeo reads it as a docker-archive and as an OCI archive, and copies it.
    let exported = server.dir.path().join("img-v1.tar");
    server.export("img:v1", &exported);
    let skopeo = |args: &[&str]| -> String {
        let out = run(Command::new("skopeo").args(args));
        assert!(out.status.success(), "skopeo {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let docker_archive = format!("docker-archive:{}", exported.display());
    // Named by its tag, as `docker load` would name it.
    let by_tag = format!("{docker_archive}:img:v1");
    let inspected: serde_json::Value =
        serde_json::from_str(&skopeo(&["inspect", &by_tag])).unwrap();
    assert_eq!(
        inspected["Layers"],
        serde_json::json!(layers),
        "{inspected}"
    );
    let oci_archive = format!("oci-archive:{}", exported.display());
    let inspected: serde_json::Value =
        serde_json::from_str(&skopeo(&["inspect", &oci_archive])).unwrap();
    assert_eq!(inspected["Digest"], v1.as_str(), "{inspected}");
    let copied = server.dir.path().join("copied-oci");
    skopeo(&[
        "copy",
        &docker_archive,
        &format!("oci:{}:v1", copied.display()),
    ]);
    assert!(copied.join("index.json").is_file());
    server.berth_ok(&[
        "images:import",
        exported.to_str().unwrap(),
        "--name",
        "copy:1",
    ]);
    let copy = images();
    let copy = copy.iter().find(|i| i["tags"][0] == "copy:1").unwrap();
    assert_eq!(copy["digest"], v1.as_str(), "re-imported, the same image");

    // v2 replaces v1; once v1's container is gone, gc removes v1's image and its files.
    std::fs::remove_file(laptop.dir.join("www/big.bin")).unwrap();
    laptop.write("www/index.html", "second page");
    laptop.commit("v2");
    laptop.push_ok(&server, "the second push");
    server.assert_serves("img.localhost", "second page");
    wait_for_ps(&server, "img", 60, |ps| !ps.contains(" v1 "));
    // `copy:1` is a tag on v1's image: tagged images stay, so drop it first by re-tagging.
    server.berth_ok(&[
        "images:import",
        archive.to_str().unwrap(),
        "--name",
        "copy:1",
    ]);
    let gc: serde_json::Value = serde_json::from_str(&server.berth_ok(&["gc", "--json"])).unwrap();
    assert!(gc["images"].as_u64().unwrap() >= 1, "{gc}");
    assert!(gc["layers"].as_u64().unwrap() >= 1, "{gc}");
    let freed = gc["bytes_before"].as_u64().unwrap() - gc["bytes_after"].as_u64().unwrap();
    assert!(freed >= 3_000_000, "{gc}");
    assert!(!v1_top.exists(), "v1's layer is still on disk");
    let v2 = release_image(2);
    let listed = images();
    assert!(
        !listed.iter().any(|i| i["digest"] == v1.as_str()),
        "{listed:?}"
    );
    let row = listed.iter().find(|i| i["digest"] == v2.as_str()).unwrap();
    assert_eq!(row["used_by"][0]["status"], "live");
    assert!(layer_dir(row["layers"][1].as_str().unwrap()).is_dir());
    assert!(listed.iter().any(|i| i["tags"][0] == "busybox:1"));
    server.assert_serves("img.localhost", "second page");
    let rollback = server.berth(&["releases:rollback", "img", "v1"]);
    assert!(!rollback.status.success());
    assert!(
        text(&rollback).contains("img v1's image was removed by gc")
            && text(&rollback).contains("--keep-releases"),
        "{}",
        text(&rollback)
    );

    let info = server.berth_ok(&["info"]);
    for expected in [
        format!("berth {}", env!("CARGO_PKG_VERSION")),
        format!("data dir:      {}", server.data().display()),
        "images:".to_string(),
        "build caches:".to_string(),
        "logs:".to_string(),
        "the last 1 of each app".to_string(),
    ] {
        assert!(info.contains(&expected), "{expected:?} missing:\n{info}");
    }
    let info: serde_json::Value =
        serde_json::from_str(&server.berth_ok(&["info", "--json"])).unwrap();
    let on_disk = berth::disk::usage(&server.data().join("images"));
    let reported = info["images_bytes"].as_u64().unwrap();
    assert!(
        reported > 0 && reported.abs_diff(on_disk) < 1_000_000,
        "{info} vs {on_disk}"
    );
    assert!(info["logs_bytes"].as_u64().unwrap() > 0, "{info}");

    server.stop_leaving_nothing();
}

/// One API request with curl: (status, body). `token` None sends no Authorization header.
fn api_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut curl = Command::new("curl");
    curl.args(["-s", "-S", "--max-time", "60", "-X", method])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("http://{addr}/api/v1{path}"));
    if let Some(token) = token {
        curl.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        curl.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = run(&mut curl);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// Who an endpoint is for: admins only, users granted the app, or every user for their own
/// things.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scope {
    Admin,
    App,
    Own,
}

/// Every API endpoint with a valid token, a revoked one, none and another user's: the
/// OpenAPI document lists exactly the endpoints below (and validates), none answers without a
/// valid token, a user who was not granted an app is refused it, only admins reach the
/// admin's endpoints, and nobody reaches another user's keys, tokens or password.
#[test]
fn api_every_endpoint_with_valid_revoked_missing_and_foreign_tokens() {
    if !prerequisites_met(&[]) {
        return;
    }
    let validator = std::env::var("BERTH_OPENAPI_VALIDATOR")
        .unwrap_or_else(|_| "/var/tmp/berth-openapi-venv/bin/openapi-spec-validator".into());
    if !Path::new(&validator).exists() {
        let message = format!(
            "{validator} is missing (scripts/test installs openapi-spec-validator from PyPI)"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
        return;
    }
    let server = Server::start();
    let token_of = |user: &str, name: &str| {
        server
            .berth_ok(&["tokens:create", name, "--user", user])
            .trim()
            .to_string()
    };
    server.berth_ok(&["users:add", "alice"]);
    server.berth_ok(&["users:add", "bob"]);
    server.berth_ok(&["apps:create", "shop"]);
    server.berth_ok(&["apps:grant", "shop", "alice"]);
    let admin = token_of("admin", "ci");
    let alice = token_of("alice", "laptop");
    let bob = token_of("bob", "laptop");
    let revoked = token_of("alice", "old");
    server.berth_ok(&["tokens:revoke", "old", "--user", "alice"]);
    let key = |n: &str| {
        let dir = server.dir.path().join(format!("key-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id");
        run(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path));
        std::fs::read_to_string(path.with_extension("pub")).unwrap()
    };
    let body_key = |name: &str| serde_json::json!({ "name": name, "key": key(name) }).to_string();

    // The OpenAPI document is public, valid, and lists exactly these endpoints.
    let (status, doc) = api_call(server.api, "GET", "/openapi.json", None, None);
    assert_eq!(status, 200, "{doc}");
    let doc_file = server.dir.path().join("openapi.json");
    std::fs::write(&doc_file, &doc).unwrap();
    let validated = run(Command::new(&validator).arg(&doc_file));
    assert!(validated.status.success(), "{}", text(&validated));
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let mut listed: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect();
    listed.sort();

    // (method, documented path, scope, the request alice (or an admin) makes, body).
    use Scope::*;
    let endpoints: Vec<(&str, &str, Scope, String, Option<String>)> = vec![
        ("GET", "/api/v1/me", Own, "/me".into(), None),
        ("GET", "/api/v1/apps", Own, "/apps".into(), None),
        (
            "POST",
            "/api/v1/apps",
            Own,
            "/apps".into(),
            Some(r#"{"name":"scratch"}"#.into()),
        ),
        ("GET", "/api/v1/apps/{app}", App, "/apps/shop".into(), None),
        (
            "PUT",
            "/api/v1/apps/{app}/users/{user}",
            Admin,
            "/apps/shop/users/bob".into(),
            None,
        ),
        (
            "DELETE",
            "/api/v1/apps/{app}/users/{user}",
            Admin,
            "/apps/shop/users/bob".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/apps/{app}/config",
            App,
            "/apps/shop/config".into(),
            None,
        ),
        (
            "PATCH",
            "/api/v1/apps/{app}/config",
            App,
            "/apps/shop/config".into(),
            Some(r#"{"vars":{"X":"<script>1</script>"}}"#.into()),
        ),
        (
            "GET",
            "/api/v1/apps/{app}/config/{key}",
            App,
            "/apps/shop/config/X".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/apps/{app}/releases",
            App,
            "/apps/shop/releases".into(),
            None,
        ),
        (
            "POST",
            "/api/v1/apps/{app}/rollback",
            App,
            "/apps/shop/rollback".into(),
            Some("{}".into()),
        ),
        (
            "GET",
            "/api/v1/apps/{app}/releases/{version}/output",
            App,
            "/apps/shop/releases/1/output".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/apps/{app}/deploy",
            App,
            "/apps/shop/deploy".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/apps/{app}/ps",
            App,
            "/apps/shop/ps".into(),
            None,
        ),
        (
            "PATCH",
            "/api/v1/apps/{app}/formation",
            App,
            "/apps/shop/formation".into(),
            Some(r#"{"web":2}"#.into()),
        ),
        (
            "POST",
            "/api/v1/apps/{app}/restart",
            App,
            "/apps/shop/restart".into(),
            Some("{}".into()),
        ),
        (
            "GET",
            "/api/v1/apps/{app}/logs",
            App,
            "/apps/shop/logs?num=5".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/apps/{app}/domains",
            App,
            "/apps/shop/domains".into(),
            None,
        ),
        (
            "POST",
            "/api/v1/apps/{app}/domains",
            App,
            "/apps/shop/domains".into(),
            Some(r#"{"host":"shop.example.com"}"#.into()),
        ),
        (
            "DELETE",
            "/api/v1/apps/{app}/domains/{host}",
            App,
            "/apps/shop/domains/shop.example.com".into(),
            None,
        ),
        (
            "GET",
            "/api/v1/apps/{app}/certs",
            App,
            "/apps/shop/certs".into(),
            None,
        ),
        (
            "PUT",
            "/api/v1/apps/{app}/certs",
            App,
            "/apps/shop/certs".into(),
            Some(r#"{"chain":"x","key":"y"}"#.into()),
        ),
        (
            "DELETE",
            "/api/v1/apps/{app}/certs",
            App,
            "/apps/shop/certs".into(),
            None,
        ),
        (
            "POST",
            "/api/v1/apps/{app}/certs/auto",
            App,
            "/apps/shop/certs/auto".into(),
            Some("{}".into()),
        ),
        (
            "GET",
            "/api/v1/apps/{app}/resources",
            App,
            "/apps/shop/resources".into(),
            None,
        ),
        (
            "PATCH",
            "/api/v1/apps/{app}/resources/{process_type}",
            App,
            "/apps/shop/resources/web".into(),
            Some(r#"{"memory":"256M"}"#.into()),
        ),
        (
            "GET",
            "/api/v1/apps/{app}/builds",
            App,
            "/apps/shop/builds".into(),
            None,
        ),
        (
            "PATCH",
            "/api/v1/apps/{app}/builds",
            App,
            "/apps/shop/builds".into(),
            Some(r#"{"memory":"1G"}"#.into()),
        ),
        (
            "GET",
            "/api/v1/apps/{app}/network",
            App,
            "/apps/shop/network".into(),
            None,
        ),
        (
            "PUT",
            "/api/v1/apps/{app}/network",
            App,
            "/apps/shop/network".into(),
            Some(r#"{"egress":true}"#.into()),
        ),
        (
            "POST",
            "/api/v1/apps/{app}/run",
            App,
            "/apps/shop/run?command=true".into(),
            None,
        ),
        ("GET", "/api/v1/images", Admin, "/images".into(), None),
        (
            "POST",
            "/api/v1/images",
            Admin,
            "/images".into(),
            Some("not a tar".into()),
        ),
        (
            "GET",
            "/api/v1/images/archive",
            Admin,
            "/images/archive?image=nope".into(),
            None,
        ),
        ("POST", "/api/v1/gc", Admin, "/gc".into(), None),
        ("GET", "/api/v1/info", Admin, "/info".into(), None),
        (
            "POST",
            "/api/v1/stacks/{stack}/build",
            Admin,
            "/stacks/nope/build".into(),
            None,
        ),
        ("GET", "/api/v1/users", Admin, "/users".into(), None),
        (
            "POST",
            "/api/v1/users",
            Admin,
            "/users".into(),
            Some(r#"{"name":"carol"}"#.into()),
        ),
        (
            "DELETE",
            "/api/v1/users/{user}",
            Admin,
            "/users/carol".into(),
            None,
        ),
        (
            "POST",
            "/api/v1/users/{user}/password",
            Own,
            "/users/alice/password".into(),
            None,
        ),
        ("GET", "/api/v1/keys", Own, "/keys".into(), None),
        (
            "POST",
            "/api/v1/keys",
            Own,
            "/keys".into(),
            Some(body_key("alices")),
        ),
        (
            "DELETE",
            "/api/v1/keys/{name}",
            Own,
            "/keys/alices".into(),
            None,
        ),
        ("GET", "/api/v1/tokens", Own, "/tokens".into(), None),
        (
            "POST",
            "/api/v1/tokens",
            Own,
            "/tokens".into(),
            Some(r#"{"name":"extra"}"#.into()),
        ),
        (
            "DELETE",
            "/api/v1/tokens/{name}",
            Own,
            "/tokens/extra".into(),
            None,
        ),
        (
            "DELETE",
            "/api/v1/apps/{app}",
            App,
            "/apps/scratch".into(),
            None,
        ),
    ];
    let mut expected: Vec<String> = endpoints
        .iter()
        .map(|(method, path, ..)| format!("{method} {path}"))
        .collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "the OpenAPI document and this test disagree"
    );

    let refused = |status: u16| status == 401 || status == 403;
    for (method, _, scope, path, body) in &endpoints {
        let body = body.as_deref();
        let what = format!("{method} {path}");
        // No token, a revoked one: 401 with a JSON error.
        for token in [None, Some(revoked.as_str())] {
            let (status, answer) = api_call(server.api, method, path, token, body);
            assert_eq!(status, 401, "{what} with {token:?}: {answer}");
            let error: serde_json::Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(error["code"], "unauthorized", "{what}: {answer}");
        }
        // Another user's token: refused for what is not theirs. (What bob may create for
        // himself is not created here: it would take the names alice's calls use.)
        let names_alice = path.contains("alice") || path.ends_with("/extra");
        let (status, answer) = match (scope, *method, names_alice) {
            (Own, "POST", false) => (200, String::new()),
            _ => api_call(server.api, method, path, Some(&bob), body),
        };
        match scope {
            Admin | App => assert_eq!(status, 403, "{what} as bob: {answer}"),
            Own if names_alice => {
                assert!(
                    status == 403 || status == 404,
                    "{what} as bob: {status} {answer}"
                )
            }
            Own => assert!(!refused(status), "{what} as bob: {status} {answer}"),
        }
        // A valid token: past authentication and permission (the admin's for admin routes;
        // the operation itself may still refuse what it is asked, e.g. no release yet).
        let token = if *scope == Admin { &admin } else { &alice };
        let (status, answer) = api_call(server.api, method, path, Some(token), body);
        assert!(!refused(status) && status != 0, "{what}: {status} {answer}");
        assert!(!answer.contains("no such API route"), "{what}: {answer}");
        if *scope == Admin {
            let (status, answer) = api_call(server.api, method, path, Some(&alice), body);
            assert_eq!(status, 403, "{what} as alice (not an admin): {answer}");
        }
    }
    // What the valid calls did, seen through the CLI as root.
    assert_eq!(
        server.berth_ok(&["config:get", "shop", "X"]).trim(),
        "<script>1</script>"
    );
    assert!(!server.berth_ok(&["apps"]).contains("scratch"));
    let (status, me) = api_call(server.api, "GET", "/me", Some(&bob), None);
    assert_eq!(
        (status, me.as_str()),
        (200, r#"{"user":"bob","admin":false}"#)
    );
    let (_, apps) = api_call(server.api, "GET", "/apps", Some(&bob), None);
    assert_eq!(apps, "[]", "bob sees no app he was not granted");
    // Errors name what to do, with the status their kind means.
    let (status, answer) = api_call(server.api, "GET", "/apps/nope", Some(&admin), None);
    assert_eq!(status, 404, "{answer}");
    assert!(answer.contains("not found — see `berth apps`"), "{answer}");
    let (status, answer) = api_call(
        server.api,
        "POST",
        "/apps",
        Some(&admin),
        Some(r#"{"name":"Bad Name"}"#),
    );
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = api_call(
        server.api,
        "POST",
        "/apps",
        Some(&admin),
        Some(r#"{"name":"shop"}"#),
    );
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = api_call(server.api, "POST", "/apps", Some(&admin), Some("{"));
    assert_eq!(status, 400, "{answer}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&answer).is_ok(),
        "{answer}"
    );
    // The API answers behind the proxy at berth.<domain> too.
    let mut stream = TcpStream::connect(server.http).unwrap();
    write!(
        stream,
        "GET /api/v1/me HTTP/1.1\r\nHost: berth.localhost\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(r#"{"user":"alice","admin":false}"#),
        "{answer}"
    );
}

/// The README's deploy story from a laptop, as a user who is not an admin: root adds the user,
/// a token and nothing else; the laptop's `berth` (with `BERTH_URL` and `BERTH_TOKEN`) adds its
/// key, creates the app, pushes, sets config, reads logs and runs a command; SSH commands work
/// for the key's owner. Another user's key, token and SSH commands are refused that app.
#[test]
fn slow_remote_cli_deploy_story() {
    if !prerequisites_met(&[]) {
        return;
    }
    let server = Server::start();
    server.berth_ok(&["users:add", "dev"]);
    server.berth_ok(&["users:add", "eve"]);
    let token = server.berth_ok(&["tokens:create", "laptop", "--user", "dev"]);
    let eve_token = server.berth_ok(&["tokens:create", "laptop", "--user", "eve"]);
    let laptop = Laptop::new(server.dir.path(), "laptop");
    let eve = Laptop::new(server.dir.path(), "eve");
    let remote = |token: &str, args: &[&str]| {
        run(Command::new(BERTH)
            .args(args)
            // No data dir of the server's: everything goes over the API.
            .arg("--data")
            .arg("/nonexistent")
            .env("BERTH_URL", format!("http://{}", server.api))
            .env("BERTH_TOKEN", token.trim()))
    };
    let ok = |token: &str, args: &[&str]| {
        let out = remote(token, args);
        assert!(
            out.status.success(),
            "{args:?}: {}\n{}",
            text(&out),
            server.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ok(&token, &["whoami"]).trim(), "dev");
    let pubkey = |l: &Laptop| l.key.with_extension("pub").to_str().unwrap().to_string();
    ok(&token, &["keys:add", "laptop", &pubkey(&laptop)]);
    ok(&eve_token, &["keys:add", "eve", &pubkey(&eve)]);
    let created = ok(&token, &["apps:create", "hello"]);
    let port = server.ssh.port();
    assert!(
        created.contains(&format!("ssh://git@SERVER:{port}/hello")),
        "{created}"
    );

    laptop.write("app.py", STDLIB_APP_PY);
    laptop.write("version.txt", "v1");
    laptop.write("Procfile", "web: python3 app.py\n");
    laptop.commit("hello");
    laptop.git(&[
        "remote",
        "add",
        "deploy",
        &format!("ssh://git@127.0.0.1:{port}/hello"),
    ]);
    let pushed = laptop.push_ok(&server, "the first push");
    assert!(pushed.contains("hello v1 is live"), "{pushed}");
    let out = ok(&token, &["config:set", "hello", "GREETING=hi there"]);
    assert!(out.contains("is now v2"), "{out}");
    server.assert_serves("hello.localhost", "v1/hi there\n");
    assert!(ok(&token, &["releases:output", "hello", "v2"]).contains("Starting v2"));
    assert!(ok(&token, &["releases", "hello"]).contains("Set GREETING config vars"));
    assert!(ok(&token, &["ps", "hello"]).contains("web.1: up"));
    let logs = ok(&token, &["logs", "hello", "-n", "50"]);
    assert!(logs.contains("app[web.1]"), "{logs}");
    // What each deploy printed is kept with its release, and a deploy in progress can be
    // followed (this one takes 3 s to answer its check).
    let v1 = ok(&token, &["releases:output", "hello", "v1"]);
    assert!(
        v1.contains("Building hello with buildpacks") && v1.contains("Starting v1"),
        "{v1}"
    );
    laptop.write("Procfile", "web: sh -c 'sleep 3; exec python3 app.py'\n");
    laptop.commit("slow start");
    let push = std::thread::spawn({
        let mut git = laptop.git_command(&["push", "deploy", "main"]);
        move || run(&mut git)
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let watched = loop {
        let out = remote(&token, &["deploys:watch", "hello"]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            text(&out).contains("no deploy of hello is in progress"),
            "{}",
            text(&out)
        );
        assert!(
            Instant::now() < deadline && !push.is_finished(),
            "never saw the deploy"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let pushed = push.join().unwrap();
    assert!(
        pushed.status.success(),
        "{}\n{}",
        text(&pushed),
        server.log()
    );
    assert!(
        watched.contains("Building hello with buildpacks") && watched.contains("Starting v3"),
        "{watched}"
    );
    let out = remote(&token, &["deploys:watch", "hello"]);
    assert!(
        text(&out).contains("no deploy of hello is in progress"),
        "{}",
        text(&out)
    );
    let ran = remote(
        &token,
        &[
            "run",
            "--no-tty",
            "hello",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; exit 6",
        ],
    );
    assert_eq!(ran.status.code(), Some(6), "{}", text(&ran));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "hi there\n");
    // SSH commands, as the key's owner; no file is read on the server.
    let out = laptop.ssh(port, "config:get hello GREETING");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there\n");
    let out = laptop.ssh(port, "keys:add other /etc/passwd");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("reads a file, which SSH commands cannot"),
        "{}",
        text(&out)
    );
    let out = laptop.ssh(port, "whoami");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "dev\n",
        "{}",
        text(&out)
    );

    // eve may not touch dev's app: not by push, SSH command, run or API.
    eve.write("x", "x");
    eve.commit("x");
    eve.git(&[
        "remote",
        "add",
        "deploy",
        &format!("ssh://git@127.0.0.1:{port}/hello"),
    ]);
    eve.push_rejected(&["eve may not use app \"hello\""]);
    let out = eve.ssh(port, "config:set hello GREETING=pwned");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let out = eve.ssh(port, "run hello -- true");
    assert!(
        !out.status.success() && text(&out).contains("may not use"),
        "{}",
        text(&out)
    );
    let out = remote(&eve_token, &["config", "hello"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("apps:grant hello eve"),
        "{}",
        text(&out)
    );
    assert_eq!(
        ok(&eve_token, &["apps"]).trim(),
        "No apps yet: create one with `berth apps:create NAME`"
    );
    // A revoked token stops working at once.
    server.berth_ok(&["tokens:revoke", "laptop", "--user", "eve"]);
    let out = remote(&eve_token, &["whoami"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    server.assert_serves("hello.localhost", "v1/hi there\n");
}

/// An app for the dashboard test: answers `GREETING` (default "hello") and prints each
/// request's path (percent-decoded) to its log.
const DASHBOARD_APP_PY: &str = r#"import os, urllib.parse
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        print("request " + urllib.parse.unquote(self.path), flush=True)
        body = (os.environ.get("GREETING", "hello") + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// A chromedriver on a free loopback port, in a process group of its own (with the browsers
/// it starts), killed on drop.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    fn start() -> ChromeDriver {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting chromedriver");
        let driver = ChromeDriver { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// chromedriver's browser log (`goog:loggingPrefs`): the entries since the last read.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(r#"{"type":"browser"}"#.into()),
        )
    }
}

/// The browser log's errors since the last read.
async fn console_errors(browser: &fantoccini::Client) -> Vec<String> {
    let log = browser
        .issue_cmd(BrowserLog)
        .await
        .expect("reading the browser log");
    log.as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["level"] == "SEVERE")
        .map(|entry| entry["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits (at most `secs`) until `check` holds, re-reading the page each time.
async fn wait_page(
    browser: &fantoccini::Client,
    secs: u64,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let html = browser.source().await.unwrap();
        if check(&html) {
            return html;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}:\n{html}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element `css` finds.
async fn text_of(browser: &fantoccini::Client, css: &str) -> String {
    use fantoccini::Locator;
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The message a form's action left on the page it led to; it must be a success.
async fn flash_ok(browser: &fantoccini::Client) -> String {
    use fantoccini::Locator;
    let flash = browser.find(Locator::Css(".flash")).await.unwrap();
    let text = flash.text().await.unwrap();
    let class = flash.attr("class").await.unwrap().unwrap_or_default();
    assert!(class.contains("ok"), "the action failed: {text}");
    text
}

/// Fills the form field `css` finds (replacing what it held).
async fn fill(browser: &fantoccini::Client, css: &str, value: &str) {
    use fantoccini::Locator;
    let field = browser.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(value).await.unwrap();
}

async fn click(browser: &fantoccini::Client, css: &str) {
    use fantoccini::Locator;
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Clicks the submit button `css` finds (accepting the confirmation it asks for, if
/// `confirm`) and waits until the answer page has loaded (a deploy takes a while).
async fn submit(browser: &fantoccini::Client, css: &str, confirm: bool) {
    browser
        .execute("window.berthOldPage = true", vec![])
        .await
        .unwrap();
    click(browser, css).await;
    if confirm {
        browser.accept_alert().await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let loaded = browser
            .execute(
                "return window.berthOldPage === undefined && document.readyState === 'complete'",
                vec![],
            )
            .await;
        if loaded.is_ok_and(|v| v == serde_json::json!(true)) {
            return;
        }
        assert!(Instant::now() < deadline, "{css} led to no new page");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Saves a screenshot of the page as `target/dashboard-screenshots/NAME.png`.
async fn screenshot(browser: &fantoccini::Client, name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = browser.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// The password `users:add` printed.
fn password_of(added: &str) -> String {
    added
        .lines()
        .find_map(|l| l.strip_prefix("Password (shown once): "))
        .unwrap_or_else(|| panic!("no password in {added:?}"))
        .trim()
        .to_string()
}

/// `curl` against the dashboard with a cookie jar; returns (status, body).
fn curl_dashboard(jar: &Path, args: &[&str]) -> (u16, String) {
    let out = run(Command::new("curl")
        .args(["-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .arg("-b")
        .arg(jar)
        .arg("-c")
        .arg(jar)
        .args(args));
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = all.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// The CSRF token of the first form in `html`.
fn csrf_in(html: &str) -> String {
    let start = html
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token")
        + 19;
    html[start..start + html[start..].find('"').unwrap()].to_string()
}

/// The dashboard in real headless Chromium: log in, create an app, deploy it by push, set and
/// delete a config var (each a new live release), scale, roll back, follow live logs; values
/// with `<script>` shown as text; no console errors; a screenshot of each page. Then: a form
/// without its CSRF token is refused, a user without access to the app cannot see it, and
/// failed logins are limited.
#[test]
fn slow_dashboard_login_deploy_config_scale_rollback_logs() {
    if !prerequisites_met(&["chromium", "chromedriver"]) {
        return;
    }
    let server = Server::start();
    let laptop = Laptop::new(server.dir.path(), "laptop");
    server.berth_ok(&[
        "keys:add",
        "laptop",
        laptop.key.with_extension("pub").to_str().unwrap(),
    ]);
    let dev = password_of(&server.berth_ok(&["users:add", "dev", "--admin"]));
    let eve = password_of(&server.berth_ok(&["users:add", "eve"]));
    let driver = ChromeDriver::start();
    let base = format!("http://{}", server.api);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-proxy-server", "--window-size=1280,1000", "--disable-extensions"
            ] }),
        );
        caps.insert(
            "goog:loggingPrefs".into(),
            serde_json::json!({ "browser": "ALL" }),
        );
        let browser = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a chromium session");

        // Without a session there is only the login page; a wrong password is refused.
        browser.goto(&format!("{base}/")).await.unwrap();
        assert!(browser.current_url().await.unwrap().path() == "/login");
        screenshot(&browser, "login").await;
        fill(&browser, "#user", "dev").await;
        fill(&browser, "#password", "wrong").await;
        submit(&browser, "button[type=submit]", false).await;
        assert!(text_of(&browser, ".flash.error").await.contains("wrong user name or password"));
        console_errors(&browser).await; // the 401 answer itself is logged; not an error here

        fill(&browser, "#user", "dev").await;
        fill(&browser, "#password", &dev).await;
        submit(&browser, "button[type=submit]", false).await;
        wait_page(&browser, 10, "the apps page", |h| h.contains("No apps yet")).await;
        screenshot(&browser, "apps-empty").await;

        // Create an app; the page tells how to deploy it.
        fill(&browser, "#new-app", "web").await;
        submit(&browser, ".heading button[type=submit]", false).await;
        assert!(browser.current_url().await.unwrap().path() == "/apps/web");
        assert!(flash_ok(&browser).await.contains("Created web"));
        assert_eq!(text_of(&browser, "#state").await, "new");

        // Deploy by a real push.
        laptop.write("app.py", DASHBOARD_APP_PY);
        laptop.write("Procfile", "web: python3 -u app.py\n");
        laptop.commit("first");
        push_app(&server, &laptop, "web");
        server.assert_serves("web.localhost", "hello\n");
        browser.goto(&format!("{base}/apps/web")).await.unwrap();
        assert_eq!(text_of(&browser, "#state").await, "running");
        assert_eq!(text_of(&browser, "#live-release").await, "v1");
        // Memory from the container's cgroup.
        let memory = text_of(&browser, ".memory").await;
        assert!(memory.ends_with(" MiB") && memory != "0.0 MiB", "{memory:?}");

        // A custom domain, served, then removed.
        fill(&browser, "#domain-host", "www.web.test").await;
        submit(&browser, "#domains form.row button[type=submit]", false).await;
        assert!(flash_ok(&browser).await.contains("www.web.test"));
        server.assert_serves("www.web.test", "hello\n");
        submit(&browser, "form[action$='/domains/remove'] button", false).await;
        assert!(flash_ok(&browser).await.contains("no longer served"));
        assert_eq!(server.get("www.web.test").0, 404);

        // A config value with <script> in it: a new live release, and shown as text.
        let evil = "<script>document.title='owned'</script>";
        fill(&browser, "#config-key", "GREETING").await;
        fill(&browser, "#config-value", evil).await;
        submit(&browser, "#config-form button[type=submit]", false).await;
        let flash = flash_ok(&browser).await;
        assert!(flash.contains("release v2 is live"), "{flash}");
        server.assert_serves("web.localhost", &format!("{evil}\n"));
        assert_eq!(text_of(&browser, "#live-release").await, "v2");
        click(&browser, ".secret summary").await;
        assert_eq!(text_of(&browser, ".secret .value").await, evil);
        assert_ne!(browser.title().await.unwrap(), "owned");
        // The whole page, in a tall window.
        browser.set_window_size(1280, 2100).await.unwrap();
        browser.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
        screenshot(&browser, "app").await;
        browser.set_window_size(1280, 1000).await.unwrap();

        // Delete it: another release, the default greeting again.
        submit(&browser, "#config form[action$='/config/unset'] button", true).await;
        wait_page(&browser, 60, "release v3", |h| h.contains("release v3 is live")).await;
        server.assert_serves("web.localhost", "hello\n");

        // Scale to two web containers.
        fill(&browser, "#count-web", "2").await;
        submit(&browser, "#scale button[type=submit]", false).await;
        wait_page(&browser, 60, "the scaled release", |h| h.contains("Scaled to web=2")).await;
        // Two containers up (the replaced one may still be draining).
        let html = browser.source().await.unwrap();
        assert_eq!(html.matches(r#"class="badge up">up<"#).count(), 2, "{html}");

        // Roll back to v2 (its config: the <script> greeting).
        submit(&browser, "form[action$='/rollback'] input[value='2'] ~ button", false).await;
        wait_page(&browser, 60, "the rollback", |h| h.contains("release v5 is live")).await;
        server.assert_serves("web.localhost", &format!("{evil}\n"));

        // What a deploy printed is kept with its release.
        browser.goto(&format!("{base}/apps/web/releases/1")).await.unwrap();
        let output = text_of(&browser, "#release-output").await;
        assert!(output.contains("Starting v1"), "{output}");
        // A deploy in progress shows on the app's page as it goes (this one takes 3 s to answer
        // its check); the page reloads itself when it is over.
        laptop.write("Procfile", "web: sh -c 'sleep 3; exec python3 -u app.py'\n");
        laptop.commit("slow start");
        let remote = format!("ssh://git@127.0.0.1:{}/web", server.ssh.port());
        let mut push = laptop.git_command(&["push", &remote, "main"]).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            browser.goto(&format!("{base}/apps/web")).await.unwrap();
            if browser.source().await.unwrap().contains(r#"id="deploy-output""#) {
                break;
            }
            assert!(Instant::now() < deadline, "the deploy never showed on the page");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Its output so far, and what it prints next, arriving on the open page.
        wait_page(&browser, 30, "the deploy's output", |h| {
            h.contains("Building web") && h.contains("Waiting for web.1")
        })
        .await;
        screenshot(&browser, "app-deploying").await;
        wait_page(&browser, 60, "the page reloaded after the deploy", |h| {
            !h.contains(r#"id="deploy-output""#)
        })
        .await;
        assert!(push.wait().unwrap().success());
        browser.goto(&format!("{base}/apps/web")).await.unwrap();
        assert_eq!(text_of(&browser, "#live-release").await, "v6");

        // Live logs: a request's line arrives on the open page, as text.
        browser.goto(&format!("{base}/apps/web#logs")).await.unwrap();
        wait_page(&browser, 10, "the log stream", |h| h.contains(r#"id="log-status">live"#)).await;
        let marker = "/%3Cscript%3Ewindow.logged=1%3C/script%3E";
        let (status, _) = http_get_path(server.http, "web.localhost", marker);
        assert_eq!(status, 200);
        wait_page(&browser, 20, "the request's log line", |h| {
            h.contains("request /&lt;script&gt;window.logged=1&lt;/script&gt;")
        })
        .await;
        let injected = browser
            .execute("return [window.logged === undefined, document.querySelectorAll('#log script').length]", vec![])
            .await
            .unwrap();
        assert_eq!(injected, serde_json::json!([true, 0]));
        screenshot(&browser, "app-logs").await;
        let errors = console_errors(&browser).await;
        assert!(errors.is_empty(), "console errors: {errors:?}");

        // Destroying an app asks for its name.
        browser.goto(&format!("{base}/")).await.unwrap();
        fill(&browser, "#new-app", "scratch").await;
        submit(&browser, ".heading button[type=submit]", false).await;
        let button = "#destroy button[type=submit]";
        use fantoccini::Locator;
        let enabled = || async { browser.find(Locator::Css(button)).await.unwrap().is_enabled().await.unwrap() };
        fill(&browser, "#destroy-name", "scratc").await;
        assert!(!enabled().await, "the button waits for the name");
        fill(&browser, "#destroy-name", "scratch").await;
        assert!(enabled().await);
        submit(&browser, button, false).await;
        assert!(flash_ok(&browser).await.contains("Destroyed scratch"));
        assert!(browser.current_url().await.unwrap().path() == "/");
        assert!(!server.berth_ok(&["apps"]).contains("scratch"));

        // The apps overview at a glance.
        browser.goto(&format!("{base}/")).await.unwrap();
        let row = text_of(&browser, "table.apps tbody tr").await;
        for part in ["web", "running", "v6", "http://web.localhost", "2"] {
            assert!(row.contains(part), "{row}");
        }
        screenshot(&browser, "apps").await;
        // And on a phone.
        browser.set_window_size(390, 844).await.unwrap();
        browser.goto(&format!("{base}/apps/web")).await.unwrap();
        screenshot(&browser, "app-phone").await;
        // The proxy's counts of the app's requests, charted.
        let traffic = text_of(&browser, "#traffic").await;
        assert!(traffic.contains("2xx"), "{traffic}");
        let bars = browser
            .find_all(fantoccini::Locator::Css("#traffic svg rect"))
            .await
            .unwrap();
        assert!(!bars.is_empty(), "no requests-per-minute bar");
        browser.set_window_size(1280, 1000).await.unwrap();
        let errors = console_errors(&browser).await;
        assert!(errors.is_empty(), "console errors: {errors:?}");

        // A form posted without its CSRF token is refused, with this session's cookie.
        let cookie = browser
            .get_named_cookie("berth_session")
            .await
            .unwrap()
            .value()
            .to_string();
        let jar = server.dir.path().join("jar");
        std::fs::write(&jar, format!("127.0.0.1\tFALSE\t/\tFALSE\t0\tberth_session\t{cookie}\n")).unwrap();
        let (status, body) = curl_dashboard(&jar, &["-d", "key=X&value=1", &format!("{base}/apps/web/config")]);
        assert_eq!(status, 403, "{body}");
        let (status, _) = curl_dashboard(&jar, &["-d", "key=X&value=1&csrf=nonsense", &format!("{base}/apps/web/config")]);
        assert_eq!(status, 403);
        assert!(!server.berth_ok(&["config", "web"]).contains("X="));
        // With the token the form is taken; destroying still needs the app's name.
        let (status, page) = curl_dashboard(&jar, &[&format!("{base}/apps/web")]);
        assert_eq!(status, 200);
        let form = format!("csrf={}&name=nope", csrf_in(&page));
        let (status, _) = curl_dashboard(&jar, &["-d", &form, &format!("{base}/apps/web/destroy")]);
        assert_eq!(status, 303);
        assert!(server.berth_ok(&["apps"]).contains("web"));

        // Log out; a user without access to the app sees neither it nor its page.
        submit(&browser, "form[action='/logout'] button", false).await;
        assert!(browser.current_url().await.unwrap().path() == "/login");
        fill(&browser, "#user", "eve").await;
        fill(&browser, "#password", &eve).await;
        submit(&browser, "button[type=submit]", false).await;
        let html = wait_page(&browser, 10, "eve's apps", |h| h.contains("No apps yet")).await;
        assert!(!html.contains("web.localhost"), "{html}");
        browser.goto(&format!("{base}/apps/web")).await.unwrap();
        let html = browser.source().await.unwrap();
        assert!(html.contains("Not allowed"), "{html}");
        assert!(!html.contains("GREETING") && !html.contains("git remote"), "{html}");
        screenshot(&browser, "forbidden").await;
        let (status, _) = curl_dashboard(&jar, &[&format!("{base}/apps/web")]);
        assert_eq!(status, 303, "a logged-out session must be gone");
        browser.close().await.unwrap();

        // The dashboard answers through the proxy at berth.<domain> too.
        let mut stream = TcpStream::connect(server.http).unwrap();
        write!(
            stream,
            "GET /login HTTP/1.1\r\nHost: berth.localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("Log in to berth"), "{answer}");
        let head = answer.to_ascii_lowercase();
        for header in [
            "content-security-policy: default-src 'self'",
            "x-frame-options: deny",
            "cache-control: no-store",
            "set-cookie: berth_session=",
        ] {
            assert!(head.contains(header), "{answer}");
        }

        // Failed logins are limited: after five, a sixth try gets 429, even with the right password.
        let jar = server.dir.path().join("jar2");
        let login = |password: &str| {
            let (_, page) = curl_dashboard(&jar, &[&format!("{base}/login")]);
            let form = format!("csrf={}&user=eve&password={password}", csrf_in(&page));
            curl_dashboard(&jar, &["-d", &form, &format!("{base}/login")])
        };
        for _ in 0..4 {
            // (one failure was the browser's)
            assert_eq!(login("wrong").0, 401);
        }
        let (status, body) = login(&eve);
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("Too many failed logins"), "{body}");
    });
}
