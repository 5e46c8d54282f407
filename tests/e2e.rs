//! The user story of berth, end to end and slow (it builds the stack images and installs Flask
//! from PyPI): a real `berth server` on free ports and a temp data dir, driven by the real
//! `berth` CLI, the real `git` client over the real OpenSSH client, and real HTTP through the
//! proxy into containers of the embedded runtime. `scripts/test` runs it after the fast tests.
//!
//! Needs root, git, ssh, ssh-keygen and mmdebstrap; under CI=true a missing one fails the test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BERTH: &str = env!("CARGO_BIN_EXE_berth");

/// Returns false (test skipped) when a prerequisite is missing outside CI; panics under CI=true.
fn prerequisites_met() -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_string());
    }
    for tool in ["git", "ssh", "ssh-keygen", "mmdebstrap", "curl", "openssl"] {
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
    bridge: String,
    subnet: String,
    /// Whether `launch` starts an `--ephemeral` server (whose stop stops its containers).
    ephemeral: bool,
}

impl Server {
    fn start() -> Server {
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
            bridge: format!("bt{}", pid % 100_000),
            subnet: format!("10.{}.0.0/16", 200 + pid % 50),
            ephemeral: true,
        };
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
            .args(["--ssh", "127.0.0.1:0"])
            .args(["--domain", "localhost"])
            .args(self.ephemeral.then_some("--ephemeral"))
            .args(["--bridge", &self.bridge, "--subnet", &self.subnet])
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
        for id in &ids {
            left.push(format!("container dir {id}"));
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
        berth_runtime::spec::remove_cgroup_parent();
        if let Ok(entries) = std::fs::read_dir(self.data().join("containers")) {
            for id in entries.flatten() {
                for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
                    let _ =
                        std::fs::remove_dir(controller.path().join("berth").join(id.file_name()));
                }
            }
        }
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
        run(Command::new("ssh")
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
                command,
            ]))
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
    if !prerequisites_met() {
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
    let push = laptop.git(&["push", "deploy", "main"]);
    let push_text = text(&push);
    assert!(
        push.status.success(),
        "push failed:\n{push_text}\n--- server log:\n{}",
        server.log()
    );
    eprintln!("--- the first push, as the developer sees it:\n{push_text}");
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
        !out.status.success() && text(&out).contains("only git push"),
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
    laptop.commit("Interrupted deploy");
    let remote = format!("ssh://git@127.0.0.1:{}/hello", server.ssh.port());
    laptop.git(&["remote", "set-url", "deploy", &remote]);
    let mut push = laptop.push_until("Installing requirements with pip");
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
    server.stop();
    let left = server.leftovers();
    assert!(
        left.is_empty(),
        "left behind after stop: {left:#?}\n--- server log:\n{}",
        server.log()
    );
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
    if !prerequisites_met() {
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
        ps.lines().count() == 1 && !ps.contains("draining")
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
            ps.lines().count() == 3 && !ps.contains("starting") && !ps.contains("draining")
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

    server.berth_ok(&["apps:destroy", "zd", "--force"]);
    assert_eq!(server.get(host).0, 404);
    assert_eq!(
        server.get("api.example.test").0,
        404,
        "a destroyed app's domains are unrouted"
    );
    server.stop();
    let left = server.leftovers();
    assert!(
        left.is_empty(),
        "left behind after stop: {left:#?}\n--- server log:\n{}",
        server.log()
    );
}

const DOCKERFILE: &str = r#"# A two-stage build: the first stage compiles the app into a zipapp.
ARG BASE=berth/stack-build
FROM ${BASE} AS build
WORKDIR /src
COPY app/ ./
RUN <<EOF
set -e
mkdir -p /out
python3 -m zipapp /src -o /out/app.pyz
python3 --version > /out/built-with
EOF

FROM berth/stack-run
ENV GREETING="hello from a Dockerfile" \
    APP_HOME=/srv/app
WORKDIR $APP_HOME
COPY --from=build /out/ ./
COPY *.txt ./
EXPOSE 8080
HEALTHCHECK --interval=1s CMD curl -f http://localhost:8080/health
CMD ["python3", "app.pyz"]
"#;

const DOCKER_APP_PY: &str = r#"import http.server, os

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        built = open("built-with").read().split()[0]
        notes = open("notes.txt").read().strip()
        files = ",".join(sorted(os.listdir(".")))
        body = f"{os.environ['GREETING']} | {built} | {notes} | {files} | {os.getcwd()} | {os.environ['PORT']}\n"
        body = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// Dockerfile builds end to end: a two-stage Dockerfile (the first stage compiles a zipapp)
/// pushed over git+ssh serves through the proxy on its EXPOSEd port from its WORKDIR, with
/// `.dockerignore` applied; an unchanged rebuild takes every layer from the cache; a changed
/// copied file rebuilds from its step on; a malformed Dockerfile is refused with its line.
#[test]
fn slow_dockerfile_multi_stage_cache_and_bad_dockerfile() {
    if !prerequisites_met() {
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

    let push = |what: &str| -> String {
        let push = laptop.git(&["push", "deploy", "main"]);
        let push_text = text(&push);
        assert!(
            push.status.success(),
            "{what}: push failed:\n{push_text}\n--- server log:\n{}",
            server.log()
        );
        eprintln!("--- {what}, as the developer sees it:\n{push_text}");
        push_text
    };
    let first = push("the first push");
    for expected in [
        "Building dock from Dockerfile",
        "Step 1/13 : ARG BASE=berth/stack-build",
        "Step 5/13 : RUN <<EOF",
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
            "8080"
        ],
        "{body}"
    );

    // An unchanged rebuild (only an ignored file changed) reuses every layer.
    let layer_steps = 6;
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

    server.stop();
    let left = server.leftovers();
    assert!(
        left.is_empty(),
        "left behind after stop: {left:#?}\n--- server log:\n{}",
        server.log()
    );
}
