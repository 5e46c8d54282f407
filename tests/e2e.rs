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
    for tool in ["git", "ssh", "ssh-keygen", "mmdebstrap"] {
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
    ssh: SocketAddr,
    bridge: String,
    subnet: String,
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
            ssh: ([0, 0, 0, 0], 0).into(),
            bridge: format!("bt{}", pid % 100_000),
            subnet: format!("10.{}.0.0/16", 200 + pid % 50),
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
            .args(["server", "--http", "127.0.0.1:0", "--ssh", "127.0.0.1:0"])
            .args(["--domain", "localhost", "--ephemeral"])
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
    assert!(ps.contains("web.1: up  v2"), "{ps}");

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
    assert_eq!(releases.matches("\"version\"").count(), 2, "{releases}");

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
    assert!(ps.contains("web.1: up  v2"), "{ps}");

    // A daemon killed in the middle of a build: the push fails, v2 keeps serving once a new
    // server runs, and the cut-short build leaves no container and no scratch behind.
    laptop.write("Procfile", "web: python app.py\n");
    laptop.commit("Interrupted deploy");
    let remote = format!("ssh://git@127.0.0.1:{}/hello", server.ssh.port());
    laptop.git(&["remote", "set-url", "deploy", &remote]);
    let mut push = laptop
        .git_command(&["push", "deploy", "main"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(push.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("Installing requirements with pip"))
    {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(err) => panic!("the build did not start ({err}): {seen:#?}"),
        }
    }
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
    assert!(left.is_empty(), "left behind after stop: {left:#?}");
}
