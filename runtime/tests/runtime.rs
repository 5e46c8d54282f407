//! berth-runtime against the real kernel: shims, overlay rootfs, libcontainer, cgroups, netns,
//! veth, bridge, nftables firewall and the seccomp profile. No mocks. Needs root, overlayfs, nft
//! (nftables), nsenter and /bin/busybox (busybox-static); under CI=true a missing prerequisite
//! fails the run instead of skipping it.
//!
//! This test binary has its own `main` (harness = false) because it doubles as the shim:
//! `runtime shim DIR` runs `berth_runtime::shim::main`, exactly like `berth shim DIR`.
//! Tests run one after another; each cleans up through a Drop guard and then checks that no
//! mount, cgroup, netns, veth, nftables table or process is left.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::symlink;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_runtime::{
    firewall, network, terminal, Bind, ContainerSpec, Error, Io, Limits, LogTarget, Runtime, State,
};

/// A link to this binary with this name is a shim that applies no seccomp profile, for the one
/// test that proves the profile is what denies.
const UNCONFINED_SHIM: &str = "shim-without-seccomp";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let role = args.get(1).map(String::as_str);
    if role == Some("shim") || role == Some("shim-launcher") {
        // BERTH_SHIM_LOG=debug shows the runtime's own logs on the shim's stderr.
        if let Ok(filter) = std::env::var("BERTH_SHIM_LOG") {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
        }
        // Shims started through a link named UNCONFINED_SHIM run without the seccomp profile.
        let main = if Path::new(&args[0]).file_name() == Some(UNCONFINED_SHIM.as_ref()) {
            berth_runtime::shim::main_without_seccomp
        } else {
            berth_runtime::shim::main
        };
        std::process::exit(match args.get(2) {
            Some(dir) if role == Some("shim") => main(Path::new(dir)),
            _ => berth_runtime::launcher::main(main),
        });
    }
    if args.get(1).map(String::as_str) == Some("start-helper") {
        // A short-lived "daemon": starts one container and exits, like a daemon that dies.
        let runtime = Runtime::new(args[2].clone().into(), std::env::current_exe().unwrap());
        let spec: ContainerSpec = serde_json::from_str(&args[3]).unwrap();
        runtime.start(&spec).unwrap();
        return;
    }
    // libtest's conventions: positional filters, `--skip PATTERN`; other flags are ignored.
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        if arg == "--skip" {
            skips.extend(rest.next());
        } else if !arg.starts_with('-') {
            filters.push(arg);
        }
    }
    let tests: &[(&str, fn())] = &[
        (
            "attached_output_and_exit_code",
            attached_output_and_exit_code,
        ),
        (
            "detached_logs_and_stop_with_sigterm",
            detached_logs_and_stop_with_sigterm,
        ),
        ("stop_kills_after_grace", stop_kills_after_grace),
        ("stop_sends_the_stop_signal", stop_sends_the_stop_signal),
        (
            "init_passes_sigterm_on_and_reaps_orphans",
            init_passes_sigterm_on_and_reaps_orphans,
        ),
        (
            "remove_stops_a_running_container",
            remove_stops_a_running_container,
        ),
        (
            "a_stop_as_soon_as_the_shim_is_spawned_ends_it",
            a_stop_as_soon_as_the_shim_is_spawned_ends_it,
        ),
        ("shim_outlives_its_starter", shim_outlives_its_starter),
        (
            "a_container_whose_shim_was_killed_is_stopped",
            a_container_whose_shim_was_killed_is_stopped,
        ),
        ("binds_and_env", binds_and_env),
        ("pipes_carry_stdin_and_stderr", pipes_carry_stdin_and_stderr),
        (
            "a_terminal_of_its_own_and_resizing",
            a_terminal_of_its_own_and_resizing,
        ),
        ("runs_as_its_user", runs_as_its_user),
        ("user_namespace_confines_root", user_namespace_confines_root),
        (
            "build_trees_keep_the_containers_ids",
            build_trees_keep_the_containers_ids,
        ),
        (
            "limits_hold_and_oom_kills_are_reported",
            limits_hold_and_oom_kills_are_reported,
        ),
        (
            "network_http_routed_and_isolated",
            network_http_routed_and_isolated,
        ),
        ("firewall_shields_the_host", firewall_shields_the_host),
        (
            "egress_off_rejects_connections_out_of_the_bridge",
            egress_off_rejects_connections_out_of_the_bridge,
        ),
        (
            "detached_shims_cost_no_thread_and_are_reaped",
            detached_shims_cost_no_thread_and_are_reaped,
        ),
        (
            "shims_are_forked_by_one_launcher_that_comes_back",
            shims_are_forked_by_one_launcher_that_comes_back,
        ),
        ("missing_layer_is_refused", missing_layer_is_refused),
        ("missing_binary_fails_cleanly", missing_binary_fails_cleanly),
        (
            "seccomp_denies_new_namespaces",
            seccomp_denies_new_namespaces,
        ),
        ("start_to_exit_timing", start_to_exit_timing),
    ];
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .filter(|(name, _)| !skips.iter().any(|s| name.contains(s.as_str())))
        .collect();
    let started = Instant::now();
    if let Some(reason) = missing_prerequisite() {
        if std::env::var("CI").as_deref() == Ok("true") {
            eprintln!("error: runtime tests cannot run here: {reason}");
            println!("test result: FAILED. 0 passed; {} failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s", selected.len());
            std::process::exit(1);
        }
        println!("skipping the runtime tests: {reason}");
        println!("test result: ok. 0 passed; 0 failed; {} ignored; 0 measured; 0 filtered out; finished in 0.00s", selected.len());
        return;
    }
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in &selected {
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(test));
        let secs = t.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({secs:.2}s)");
            }
            Err(_) => {
                failed.push(*name);
                println!("test {name} ... FAILED ({secs:.2}s)");
            }
        }
    }
    // The tests' containers are gone; so goes the parent cgroup they made (if no other berth
    // on this machine has containers in it).
    berth_runtime::cgroup::remove_parent();
    if !failed.is_empty() {
        println!("\nfailures:\n    {}", failed.join("\n    "));
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        tests.len() - selected.len(),
        started.elapsed().as_secs_f64()
    );
    std::process::exit(if failed.is_empty() { 0 } else { 101 });
}

fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing (apt-get install busybox-static)".into());
    }
    if !Path::new("/usr/sbin/nft").is_file() {
        return Some("/usr/sbin/nft is missing (apt-get install nftables)".into());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") {
        return Some("the kernel has no overlay filesystem".into());
    }
    None
}

// ---------------------------------------------------------------------------------------------

/// One test's world: a busybox image, a container directory, and the things to clean up.
/// Dropping it stops and removes every container, deletes netns/veth/bridge and the bridge's
/// nftables table, and removes the directory, even when the test failed.
struct Fixture {
    root: PathBuf,
    image: PathBuf,
    runtime: Runtime,
    ids: Vec<String>,
    netns: Vec<String>,
    bridges: Vec<String>,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let root = PathBuf::from(format!("/tmp/berth-rt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let image = root.join("image");
        for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "www"] {
            std::fs::create_dir_all(image.join(dir)).unwrap();
        }
        std::fs::copy("/bin/busybox", image.join("bin/busybox")).unwrap();
        for tool in [
            "sh", "echo", "cat", "sleep", "httpd", "wget", "true", "touch", "ls", "env", "tty",
            "stty",
        ] {
            symlink("busybox", image.join("bin").join(tool)).unwrap();
        }
        std::fs::write(image.join("www/index.html"), "hello from berth\n").unwrap();
        let exe = std::env::current_exe().unwrap();
        Fixture {
            runtime: Runtime::new(root.join("containers"), exe),
            root,
            image,
            ids: Vec::new(),
            netns: Vec::new(),
            bridges: Vec::new(),
        }
    }

    /// A spec for a container `t<pid>-<name>` running `args` on the busybox image.
    fn spec(&mut self, name: &str, args: &[&str]) -> ContainerSpec {
        let id = format!("t{}-{name}", std::process::id());
        self.ids.push(id.clone());
        ContainerSpec {
            id,
            layers: vec![self.image.clone()],
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec!["GREETING=hi".into()],
            cwd: "/".into(),
            hostname: name.into(),
            binds: Vec::new(),
            netns: None,
            log: LogTarget::Inherit,
            stop_grace_secs: 5,
            limits: Limits::default(),
            init: false,
            user: None,
            users: None,
            stop_signal: None,
        }
    }

    /// A host uid range of this test run for a user namespace (`slot` picks one of several),
    /// far above the host's own users.
    fn users(&self, slot: u32) -> berth_runtime::IdMap {
        berth_runtime::IdMap {
            host_id: 1_000_000_000 + (std::process::id() % 1000 * 4 + slot) * 65536,
            size: 65536,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("app.log")
    }

    /// Asserts that nothing of container `id` is left on the host.
    fn assert_clean(&self, id: &str) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = self.root.to_str().unwrap();
        assert!(
            !mountinfo.contains(root),
            "mounts left under {root}:\n{mountinfo}"
        );
        // v1: one cgroup per controller; v2: /sys/fs/cgroup/berth/<id>.
        let v2 = Path::new("/sys/fs/cgroup/berth").join(id);
        assert!(!v2.exists(), "cgroup left: {}", v2.display());
        for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
            let cgroup = controller.unwrap().path().join("berth").join(id);
            assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
        }
        assert!(
            !self.runtime.container_dir(id).exists(),
            "container directory left for {id}"
        );
        for dir in [
            berth_runtime::rootfs::USERNS_ROOTS,
            berth_runtime::rootfs::USERNS_BINDS,
        ] {
            let mount_point = Path::new(dir).join(id);
            assert!(!mount_point.exists(), "{} left", mount_point.display());
        }
        assert!(
            !self.root.join("netns").join(id).exists(),
            "netns file left for {id}"
        );
        let veth = network::veth_names(id).0;
        assert!(
            !Path::new("/sys/class/net").join(&veth).exists(),
            "veth {veth} left"
        );
        let left = processes_mentioning(root);
        assert!(left.is_empty(), "processes left: {left:?}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for id in &self.ids {
            if let Err(err) = self.runtime.remove(id) {
                eprintln!("cleanup: removing {id}: {err}");
            }
        }
        if !self.netns.is_empty() || !self.bridges.is_empty() {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                for id in &self.netns {
                    if let Err(err) = network::delete_netns(&self.root.join("netns"), id).await {
                        eprintln!("cleanup: netns {id}: {err}");
                    }
                }
                for bridge in &self.bridges {
                    if let Err(err) = network::remove_bridge(bridge).await {
                        eprintln!("cleanup: bridge {bridge}: {err}");
                    }
                    if let Err(err) = firewall::remove(bridge) {
                        eprintln!("cleanup: firewall of {bridge}: {err}");
                    }
                }
            });
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Pids (other than ours) whose command line mentions `needle`: shims of this fixture.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmd| String::from_utf8_lossy(&cmd).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Polls `check` until it returns Some or `within` passes.
fn wait_for<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs busybox `script` (an applet and its arguments) in the network namespace at `netns`,
/// as a container's processes see the network; its output, stderr included.
fn busybox_in(netns: &Path, script: &str) -> String {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["sh", "-c"])
        .arg(format!("/bin/busybox {script} 2>&1"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_attached(fx: &Fixture, spec: &ContainerSpec) -> (String, i32) {
    run_attached_with(&fx.runtime, spec)
}

fn run_attached_with(runtime: &Runtime, spec: &ContainerSpec) -> (String, i32) {
    let mut child = runtime
        .run_attached(spec, Io::Output)
        .expect("run_attached")
        .shim;
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let code = child.wait().unwrap().code().expect("shim exit code");
    (out, code)
}

// ---------------------------------------------------------------------------------------------

fn attached_output_and_exit_code() {
    let mut fx = Fixture::new("attached");
    let spec = fx.spec("attached", &["sh", "-c", "echo hi; echo oops >&2; exit 3"]);
    let (out, code) = run_attached(&fx, &spec);
    assert_eq!(out, "hi\noops\n");
    assert_eq!(code, 3);
    assert_eq!(fx.runtime.state(&spec.id), State::Exited { code: 3 });
    assert_eq!(fx.runtime.list(), vec![spec.id.clone()]);
    fx.runtime.remove(&spec.id).unwrap();
    assert_eq!(fx.runtime.state(&spec.id), State::Gone);
    fx.assert_clean(&spec.id);
}

fn detached_logs_and_stop_with_sigterm() {
    let mut fx = Fixture::new("logs");
    let mut spec = fx.spec(
        "logs",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo one; echo two >&2; \
             printf 'no newline'; echo; while true; do sleep 0.05; done",
        ],
    );
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "app[web.1]".into(),
    };
    fx.runtime.start(&spec).unwrap();
    let State::Running { pid } = fx.runtime.state(&spec.id) else {
        panic!("not running: {:?}", fx.runtime.state(&spec.id));
    };
    assert!(pid > 1);
    let log = wait_for(Duration::from_secs(10), "two log lines", || {
        let log = std::fs::read_to_string(fx.log_path()).unwrap_or_default();
        (log.lines().count() >= 3).then_some(log)
    });
    // What it uses, from its cgroup (v1 or v2).
    let usage = fx.runtime.usage(&spec.id);
    assert!(usage.memory.is_some_and(|m| m > 0), "{usage:?}");
    assert!(usage.cpu_usec.is_some(), "{usage:?}");
    let lines: Vec<&str> = log.lines().collect();
    for (line, text) in lines.iter().zip(["one", "two", "no newline"]) {
        let (stamp, rest) = line.split_once(' ').unwrap();
        chrono::DateTime::parse_from_rfc3339(stamp).expect("RFC3339 timestamp");
        assert!(stamp.ends_with('Z'), "not UTC: {stamp}");
        assert_eq!(rest, format!("app[web.1]: {text}"));
    }
    let t = Instant::now();
    assert_eq!(fx.runtime.stop(&spec.id).unwrap(), Some(7));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "SIGTERM not honoured promptly"
    );
    let log = std::fs::read_to_string(fx.log_path()).unwrap();
    assert!(
        log.lines()
            .last()
            .unwrap()
            .ends_with("app[web.1]: got TERM"),
        "{log}"
    );
    assert_eq!(fx.runtime.state(&spec.id), State::Exited { code: 7 });
    assert_eq!(
        fx.runtime.stop(&spec.id).unwrap(),
        Some(7),
        "stop is idempotent"
    );
    fx.runtime.remove(&spec.id).unwrap();
    assert_eq!(fx.runtime.usage(&spec.id), Default::default());
    fx.assert_clean(&spec.id);
}

fn stop_kills_after_grace() {
    let mut fx = Fixture::new("grace");
    let mut spec = fx.spec(
        "grace",
        &["sh", "-c", "trap '' TERM; while true; do sleep 0.05; done"],
    );
    spec.stop_grace_secs = 1;
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "app[worker.1]".into(),
    };
    fx.runtime.start(&spec).unwrap();
    let t = Instant::now();
    assert_eq!(fx.runtime.stop(&spec.id).unwrap(), Some(128 + 9));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "SIGKILL after {took:?}, grace was 1s"
    );
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// A stop sends the spec's stop signal (an image's `STOPSIGNAL`), through the init, instead of
/// SIGTERM: a command that ignores SIGTERM and exits on SIGUSR1 stops at once with its code.
fn stop_sends_the_stop_signal() {
    let mut fx = Fixture::new("stopsig");
    let mut spec = fx.spec(
        "stopsig",
        &[
            "sh",
            "-c",
            "trap '' TERM; trap 'echo got USR1; exit 3' USR1; echo ready; \
             while true; do sleep 0.05; done",
        ],
    );
    spec.init = true;
    spec.stop_grace_secs = 10;
    spec.stop_signal = Some(nix::sys::signal::Signal::SIGUSR1 as i32);
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "app[web.1]".into(),
    };
    fx.runtime.start(&spec).unwrap();
    wait_for(Duration::from_secs(10), "the traps", || {
        let log = std::fs::read_to_string(fx.log_path()).unwrap_or_default();
        log.contains("ready").then_some(())
    });
    let t = Instant::now();
    assert_eq!(fx.runtime.stop(&spec.id).unwrap(), Some(3));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the stop signal did not reach the command: took {:?}",
        t.elapsed()
    );
    let log = std::fs::read_to_string(fx.log_path()).unwrap();
    assert!(log.contains("app[web.1]: got USR1"), "{log}");
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// Under the init, the command is not PID 1: a shell with no SIGTERM handler stops at once on
/// SIGTERM (as PID 1 the kernel would drop the signal and only SIGKILL after the grace period
/// would end it), and a process orphaned inside is reaped rather than left a zombie.
fn init_passes_sigterm_on_and_reaps_orphans() {
    let mut fx = Fixture::new("init");
    let mut spec = fx.spec(
        "init",
        &[
            "sh",
            "-c",
            "sh -c 'sleep 0.2 &'; sleep 1; \
             echo zombies $(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l) pid $$; \
             while true; do sleep 0.05; done",
        ],
    );
    spec.init = true;
    spec.stop_grace_secs = 10;
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "app[web.1]".into(),
    };
    fx.runtime.start(&spec).unwrap();
    let log = wait_for(Duration::from_secs(10), "the zombie count", || {
        let log = std::fs::read_to_string(fx.log_path()).unwrap_or_default();
        log.contains("zombies").then_some(log)
    });
    assert!(log.contains("zombies 0 pid 2"), "{log}");
    let t = Instant::now();
    assert_eq!(fx.runtime.stop(&spec.id).unwrap(), Some(128 + 15));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "SIGTERM did not reach the command: took {:?}",
        t.elapsed()
    );
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

fn remove_stops_a_running_container() {
    let mut fx = Fixture::new("remove");
    let mut spec = fx.spec("remove", &["sleep", "1000"]);
    spec.stop_grace_secs = 1;
    fx.runtime.start(&spec).unwrap();
    assert!(matches!(fx.runtime.state(&spec.id), State::Running { .. }));
    assert!(matches!(fx.runtime.start(&spec), Err(Error::Exists(_))));
    // sleep as pid 1 has no TERM handler, so the kernel ignores SIGTERM: SIGKILL after grace.
    fx.runtime.remove(&spec.id).unwrap();
    assert_eq!(fx.runtime.state(&spec.id), State::Gone);
    assert!(fx.runtime.list().is_empty());
    fx.assert_clean(&spec.id);
}

/// A stop that comes the moment the shim is spawned (a `berth run` whose user went away while
/// it started) finds the shim and ends it, rather than leave its command to run to its end.
fn a_stop_as_soon_as_the_shim_is_spawned_ends_it() {
    let mut fx = Fixture::new("early-stop");
    let mut spec = fx.spec("early-stop", &["sleep", "1000"]);
    spec.stop_grace_secs = 1;
    let mut shim = fx
        .runtime
        .run_attached(&spec, Io::Output)
        .expect("run_attached")
        .shim;
    fx.runtime.stop(&spec.id).unwrap();
    wait_for(Duration::from_secs(30), "the stopped shim to exit", || {
        shim.try_wait().unwrap()
    });
    fx.runtime.remove(&spec.id).unwrap();
    assert_eq!(fx.runtime.state(&spec.id), State::Gone);
    fx.assert_clean(&spec.id);
}

fn shim_outlives_its_starter() {
    let mut fx = Fixture::new("adopt");
    let mut spec = fx.spec(
        "adopt",
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo ready; while true; do sleep 0.05; done",
        ],
    );
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "app[web.1]".into(),
    };
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("start-helper")
        .arg(fx.root.join("containers"))
        .arg(serde_json::to_string(&spec).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "the starter failed");
    // The starter is gone; a new Runtime (a restarted daemon) finds and controls the container.
    let runtime = Runtime::new(fx.root.join("containers"), std::env::current_exe().unwrap());
    assert_eq!(runtime.list(), vec![spec.id.clone()]);
    let State::Running { pid } = runtime.state(&spec.id) else {
        panic!("not running: {:?}", runtime.state(&spec.id));
    };
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    // Stopped only once its TERM trap is set (on a loaded machine the shell may not be there yet).
    wait_for(Duration::from_secs(10), "the trap", || {
        let log = std::fs::read_to_string(fx.log_path()).unwrap_or_default();
        log.contains("ready").then_some(())
    });
    assert_eq!(runtime.stop(&spec.id).unwrap(), Some(0));
    runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// A shim killed with SIGKILL leaves its container running unsupervised: it counts as exited,
/// and stopping it kills what is left in its cgroup.
fn a_container_whose_shim_was_killed_is_stopped() {
    let mut fx = Fixture::new("orphan");
    // Two containers whose shims are killed: one stopped, one removed without a stop.
    let mut orphan = |name: &str| {
        let spec = fx.spec(name, &["sh", "-c", "while true; do sleep 0.05; done"]);
        fx.runtime.start(&spec).unwrap();
        let State::Running { pid } = fx.runtime.state(&spec.id) else {
            panic!("not running: {:?}", fx.runtime.state(&spec.id));
        };
        let dir = fx.runtime.container_dir(&spec.id);
        let shim: i32 = std::fs::read_to_string(dir.join("shim.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::SIGKILL)
            .unwrap();
        wait_for(Duration::from_secs(10), "the shim to die", || {
            (!Path::new(&format!("/proc/{shim}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{shim}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                }))
            .then_some(())
        });
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the container outlived its shim"
        );
        assert_eq!(fx.runtime.state(&spec.id), State::Exited { code: -1 });
        (spec.id, pid)
    };
    let gone = |pid: i32| {
        !Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap()
                .is_empty()
    };
    let (stopped, pid) = orphan("orphan");
    let (removed, removed_pid) = orphan("orphan2");
    assert_eq!(fx.runtime.stop(&stopped).unwrap(), Some(128 + 9));
    assert!(gone(pid), "the stopped container's process still runs");
    fx.runtime.remove(&stopped).unwrap();
    fx.assert_clean(&stopped);
    fx.runtime.remove(&removed).unwrap();
    assert!(
        gone(removed_pid),
        "the removed container's process still runs"
    );
    fx.assert_clean(&removed);
}

fn binds_and_env() {
    let mut fx = Fixture::new("binds");
    let data = fx.root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("hello.txt"), "from the host\n").unwrap();
    let mut spec = fx.spec(
        "binds",
        &[
            "sh",
            "-c",
            "cat /mnt/data/hello.txt; touch /mnt/data/new 2>/dev/null && echo writable; \
             echo $GREETING; hostname; grep CapBnd /proc/self/status; \
             echo home=$HOME; grep SigIgn /proc/self/status; ls /sys/fs/cgroup/memory",
        ],
    );
    spec.binds.push(Bind {
        source: data.clone(),
        destination: "/mnt/data".into(),
        readonly: true,
        idmapped: false,
    });
    let (out, code) = run_attached(&fx, &spec);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "from the host");
    assert!(
        !out.contains("writable"),
        "read-only bind was writable: {out}"
    );
    assert_eq!(lines[1], "hi", "{out}");
    assert_eq!(lines[2], "binds");
    let bounding = u64::from_str_radix(lines[3].trim_start_matches("CapBnd:").trim(), 16).unwrap();
    assert_eq!(bounding & (1 << 13), 0, "CAP_NET_RAW is left out: {out}");
    assert_ne!(bounding & 1, 0, "CAP_CHOWN stays: {out}");
    // No HOME in the env and no /etc/passwd in the image: `/`, as Docker gives.
    assert_eq!(lines[4], "home=/", "{out}");
    // SIGPIPE, which the shim (Rust) ignores, is not ignored in the container.
    let ignored = u64::from_str_radix(lines[5].trim_start_matches("SigIgn:").trim(), 16).unwrap();
    assert_eq!(ignored & (1 << (nix::libc::SIGPIPE - 1)), 0, "{out}");
    if !berth_runtime::cgroup::v2_only() {
        assert!(
            out.contains("memory.limit_in_bytes"),
            "its own memory cgroup at /sys/fs/cgroup/memory: {out}"
        );
    }
    assert!(!data.join("new").exists());
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// A container with a user runs its command as that uid and gid, without capabilities.
/// All of what a shim run with its stderr piped writes there.
fn stderr_of(shim: &mut std::process::Child) -> String {
    let mut err = String::new();
    let pipe = shim.stderr.as_mut().expect("stderr is piped");
    pipe.read_to_string(&mut err).unwrap();
    err
}

/// With pipes, what the caller writes to the shim's stdin is the container's stdin (until it
/// closes it), and the container's stderr comes back apart from its stdout.
fn pipes_carry_stdin_and_stderr() {
    let mut fx = Fixture::new("pipes");
    let spec = fx.spec("pipes", &["sh", "-c", "cat; echo done >&2; exit 4"]);
    let mut shim = fx.runtime.run_attached(&spec, Io::Pipes).unwrap().shim;
    let mut stdin = shim.stdin.take().unwrap();
    stdin.write_all(b"line one\nline two\n").unwrap();
    drop(stdin);
    let mut out = String::new();
    let stdout = shim.stdout.as_mut().unwrap();
    stdout.read_to_string(&mut out).unwrap();
    let err = stderr_of(&mut shim);
    assert_eq!(shim.wait().unwrap().code(), Some(4));
    assert_eq!(out, "line one\nline two\n");
    assert_eq!(err, "done\n");
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// With a terminal, the container's stdin, stdout and stderr are a pty of the container's own
/// /dev/pts (not the host's), the caller gets its master, and a resize reaches the container.
fn a_terminal_of_its_own_and_resizing() {
    let mut fx = Fixture::new("tty");
    let mut spec = fx.spec(
        "tty",
        &[
            "sh",
            "-c",
            "tty; busybox stat -c %u:%g $(tty); stty size; read word; stty size; \
             echo typed $word; exit 6",
        ],
    );
    // A user of the image owns its terminal, as on a login.
    spec.user = Some(berth_runtime::User {
        uid: 1000,
        gid: 1000,
    });
    let size = terminal::WindowSize {
        rows: 33,
        cols: 101,
    };
    let attached = fx.runtime.run_attached(&spec, Io::Terminal(size)).unwrap();
    let mut shim = attached.shim;
    let Some(master) = attached.terminal else {
        panic!("no terminal; the shim said: {}", stderr_of(&mut shim));
    };
    let mut pty = std::fs::File::from(master.try_clone().unwrap());
    // Read on a thread until the slave side is closed (EIO once every process of the
    // container is gone), so the test waits with a deadline.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut chunk) {
            if tx.send(chunk[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = String::new();
    let mut read_until = |marker: &str| {
        while !out.contains(marker) {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(chunk) => out.push_str(&String::from_utf8_lossy(&chunk).replace('\r', "")),
                Err(err) => panic!("{marker:?} never came ({err}): {out}"),
            }
        }
    };
    // Its size from the start, then a new one while it runs.
    read_until("/dev/pts/0\n1000:1000\n33 101\n");
    terminal::resize(
        &master,
        terminal::WindowSize {
            rows: 40,
            cols: 120,
        },
    )
    .unwrap();
    pty.write_all(b"hello\n").unwrap();
    read_until("40 120\ntyped hello\n");
    assert_eq!(shim.wait().unwrap().code(), Some(6));
    assert_eq!(stderr_of(&mut shim), "", "the shim complained");
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

fn runs_as_its_user() {
    let mut fx = Fixture::new("user");
    let mut spec = fx.spec(
        "user",
        &["sh", "-c", "id -u; id -g; grep CapEff /proc/self/status"],
    );
    spec.user = Some(berth_runtime::User {
        uid: 65534,
        gid: 65533,
    });
    spec.init = true;
    let (out, code) = run_attached(&fx, &spec);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..2], ["65534", "65533"], "{out}");
    assert_eq!(
        lines[2].trim_start_matches("CapEff:").trim(),
        "0000000000000000",
        "{out}"
    );
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// The fields of a `/proc/PID/status` line (`Uid:`, `Gid:`) of a host process.
fn status_ids(pid: i32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .map(|id| id.parse().unwrap())
        .collect()
}

/// With a user namespace the container's root is root inside (owns the image's files, keeps
/// its capabilities there) but a plain host uid outside: its processes run as the mapped uid,
/// its writes land in the upper dir as that uid, it cannot write a root-owned host directory
/// bound into it, mount, or see host processes. A container with a `USER` runs as base + uid.
fn user_namespace_confines_root() {
    let mut fx = Fixture::new("userns");
    // Like berth's data dir: the container's root cannot search it, and still starts.
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(fx.root.join("containers"))
        .unwrap();
    let hostdir = fx.root.join("hostdir");
    std::fs::create_dir_all(&hostdir).unwrap();
    let users = fx.users(0);
    let mut spec = fx.spec(
        "userns",
        &[
            "sh",
            "-c",
            "id -u; busybox stat -c %u:%g /bin/busybox; cat /www/index.html; \
             echo more >> /www/index.html && echo appended; touch /made-by-root && echo made; \
             touch /hostdir/x 2>/dev/null && echo HOSTDIR-WRITTEN; \
             busybox mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED; \
             echo pids $(ls /proc | busybox grep -c '^[0-9]'); echo ready; sleep 30",
        ],
    );
    spec.users = Some(users);
    spec.init = true;
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "c".into(),
    };
    spec.binds.push(Bind {
        source: hostdir.clone(),
        destination: "/hostdir".into(),
        readonly: false,
        idmapped: false,
    });
    fx.runtime.start(&spec).unwrap();
    let log = wait_for(
        Duration::from_secs(10),
        "the container to get ready",
        || {
            let log = std::fs::read_to_string(fx.log_path()).unwrap_or_default();
            log.contains("c: ready").then_some(log)
        },
    );
    let out: Vec<&str> = log.lines().map(|l| l.split_once(": ").unwrap().1).collect();
    assert_eq!(out[0], "0", "root inside: {log}");
    assert_eq!(out[1], "0:0", "the image's files are root's inside: {log}");
    assert_eq!(out[2], "hello from berth", "{log}");
    assert!(out.contains(&"appended") && out.contains(&"made"), "{log}");
    assert!(
        !out.contains(&"HOSTDIR-WRITTEN"),
        "wrote a host directory: {log}"
    );
    assert!(!out.contains(&"MOUNTED"), "mounted: {log}");
    let pids: u32 = out
        .iter()
        .find_map(|l| l.strip_prefix("pids "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(pids <= 5, "sees host processes ({pids} pids): {log}");

    let State::Running { pid } = fx.runtime.state(&spec.id) else {
        panic!("not running: {:?}", fx.runtime.state(&spec.id));
    };
    let host = users.host_id;
    assert_eq!(status_ids(pid, "Uid:"), [host; 4], "its init on the host");
    assert_eq!(status_ids(pid, "Gid:"), [host; 4], "its init on the host");
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let shell: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(
        status_ids(shell, "Uid:"),
        [host; 4],
        "its command on the host"
    );

    let upper = fx.runtime.container_dir(&spec.id).join("upper");
    let owner = |path: &Path| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).unwrap();
        (meta.uid(), meta.gid())
    };
    assert_eq!(owner(&upper.join("made-by-root")), (host, host));
    assert_eq!(
        owner(&upper.join("www/index.html")),
        (host, host),
        "copied up"
    );
    assert_eq!(
        owner(&fx.image.join("www/index.html")),
        (0, 0),
        "layer unchanged"
    );
    assert_eq!(
        std::fs::read_to_string(fx.image.join("www/index.html")).unwrap(),
        "hello from berth\n"
    );
    assert!(std::fs::read_dir(&hostdir).unwrap().next().is_none());

    // A USER of the image keeps its uid inside and is base + uid outside.
    let mut user = fx.spec("userns-user", &["sh", "-c", "id -u; id -g; sleep 30"]);
    user.users = Some(fx.users(1));
    user.init = true;
    user.user = Some(berth_runtime::User {
        uid: 1000,
        gid: 1001,
    });
    user.log = LogTarget::File {
        path: fx.root.join("user.log"),
        prefix: "u".into(),
    };
    fx.runtime.start(&user).unwrap();
    let log = wait_for(Duration::from_secs(10), "the user container's ids", || {
        let log = std::fs::read_to_string(fx.root.join("user.log")).unwrap_or_default();
        (log.lines().count() >= 2).then_some(log)
    });
    assert!(
        log.contains("u: 1000\n") && log.contains("u: 1001\n"),
        "{log}"
    );
    let State::Running { pid } = fx.runtime.state(&user.id) else {
        panic!("not running");
    };
    let base = fx.users(1).host_id;
    assert_eq!(status_ids(pid, "Uid:"), [base + 1000; 4]);
    assert_eq!(status_ids(pid, "Gid:"), [base + 1001; 4]);

    for id in [&spec.id, &user.id] {
        fx.runtime.remove(id).unwrap();
    }
    for id in [&spec.id, &user.id] {
        fx.assert_clean(id);
    }
}

/// What a build container (with a user namespace) writes keeps the container's ids where berth
/// packs it as a layer: in an id-mapped bind (root's files are its root's; what it writes as
/// root is 0 on disk, as 1000 is 1000) and in its upper dir once taken with `take_upper`; in a
/// plain bind (a cache) its writes are its range's. Bind sources inside a `0700` directory (as
/// the data dir is) are reached.
fn build_trees_keep_the_containers_ids() {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let mut fx = Fixture::new("buildids");
    let private = fx.root.join("private");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .unwrap();
    let (src, cache) = (private.join("src"), private.join("cache"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("given"), "pushed\n").unwrap();
    let users = fx.users(3);
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::chown(&cache, Some(users.host_id), Some(users.host_id)).unwrap();
    let mut spec = fx.spec(
        "buildids",
        &[
            "sh",
            "-c",
            "set -e; cat /proc/self/uid_map; busybox stat -c %u:%g /src/given; cat /src/given; \
             touch /src/by-root /src/by-1000 /cache/cached /made-by-root /made-by-1000; \
             busybox chown 1000:1000 /src/by-1000 /made-by-1000",
        ],
    );
    spec.users = Some(users);
    spec.binds = vec![
        Bind {
            source: src.clone(),
            destination: "/src".into(),
            readonly: false,
            idmapped: true,
        },
        Bind {
            source: cache.clone(),
            destination: "/cache".into(),
            readonly: false,
            idmapped: false,
        },
    ];
    let (out, code) = run_attached(&fx, &spec);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    let map: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        map,
        ["0", &users.host_id.to_string(), "65536"],
        "not host root: {out}"
    );
    assert_eq!(lines[1..3], ["0:0", "pushed"], "{out}");
    let owner = |path: &Path| {
        let meta = std::fs::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    };
    assert_eq!(owner(&src.join("by-root")), (0, 0));
    assert_eq!(owner(&src.join("by-1000")), (1000, 1000));
    assert_eq!(owner(&cache.join("cached")), (users.host_id, users.host_id));
    let layer = fx.root.join("layer");
    fx.runtime.take_upper(&spec.id, &layer).unwrap();
    assert_eq!(owner(&layer.join("made-by-root")), (0, 0));
    assert_eq!(owner(&layer.join("made-by-1000")), (1000, 1000));
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// Memory, CPU and pids limits as the container (in a user namespace) sees its own cgroup (v1
/// or v2 files), a fork past the pids limit failing, and a process past the memory limit killed and reported as OOM.
fn limits_hold_and_oom_kills_are_reported() {
    let mut fx = Fixture::new("limits");
    let limits = Limits {
        memory: Some(48 << 20),
        cpu_millis: Some(250),
        pids: Some(6),
    };
    let mut spec = fx.spec(
        "limits",
        &[
            "sh",
            "-c",
            "cd /sys/fs/cgroup; \
             cat memory/memory.limit_in_bytes memory.max 2>/dev/null; \
             cat cpu/cpu.cfs_quota_us cpu.max 2>/dev/null; \
             cat pids/pids.max pids.max 2>/dev/null; \
             for i in 1 2 3 4 5 6 7 8; do sleep 2 & done 2>&1 | head -n 1; wait",
        ],
    );
    spec.limits = limits;
    // Limits hold for a container in a user namespace: its cgroup is set from the host.
    spec.users = Some(fx.users(2));
    let (out, code) = run_attached(&fx, &spec);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"50331648"), "memory limit: {out}");
    let cpu = lines.get(1).copied().unwrap_or_default();
    assert!(cpu == "25000" || cpu == "25000 100000", "cpu quota: {out}");
    assert_eq!(lines.get(2), Some(&"6"), "pids limit: {out}");
    assert!(
        lines.get(3).is_some_and(|l| l.contains("fork")),
        "a fork past the pids limit fails: {out}"
    );
    assert_eq!(code, 0, "{out}");
    assert!(!fx.runtime.oom_killed(&spec.id));
    fx.runtime.remove(&spec.id).unwrap();

    let mut hog = fx.spec(
        "oom",
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    hog.limits = limits;
    hog.users = Some(fx.users(2));
    let (out, code) = run_attached(&fx, &hog);
    assert!(!out.contains("survived"), "{out}");
    assert_ne!(code, 0, "{out}");
    assert!(
        fx.runtime.oom_killed(&hog.id),
        "exit {code}, not reported as OOM: {out}"
    );
    fx.runtime.remove(&hog.id).unwrap();
    fx.assert_clean(&spec.id);
    fx.assert_clean(&hog.id);
}

/// A routed container answers HTTP from the host (here in a user namespace, on port 80
/// all the same) and is out of reach of another container.
fn network_http_routed_and_isolated() {
    let mut fx = Fixture::new("net");
    let pid = std::process::id();
    let bridge = format!("bt{pid}");
    let subnet = 20 + (pid % 200) as u8;
    let gateway = Ipv4Addr::new(10, 250, subnet, 1);
    let ip = Ipv4Addr::new(10, 250, subnet, 2);
    let mut spec = fx.spec("net", &["httpd", "-f", "-p", "80", "-h", "/www"]);
    spec.stop_grace_secs = 1;
    // In a user namespace, on a port below 1024 all the same.
    spec.users = Some(fx.users(0));
    fx.bridges.push(bridge.clone());
    fx.netns.push(spec.id.clone());
    let netns_dir = fx.root.join("netns");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let netns = rt.block_on(async {
        network::ensure_bridge(&bridge, gateway, 24).await.unwrap();
        network::ensure_bridge(&bridge, gateway, 24)
            .await
            .expect("idempotent");
        network::create_netns(&netns_dir, &spec.id, &bridge, ip, 24, gateway)
            .await
            .unwrap()
    });
    spec.netns = Some(netns.clone());
    fx.runtime.start(&spec).unwrap();
    // Routed, not bridged: its veth is no bridge port, and the host reaches it by a /32 route
    // through that veth.
    let veth = network::veth_names(&spec.id).0;
    assert!(
        !Path::new(&format!("/sys/class/net/{veth}/master")).exists(),
        "{veth} is a bridge port"
    );
    let route = std::process::Command::new("ip")
        .args(["-4", "route", "show", &format!("{ip}/32")])
        .output()
        .unwrap();
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains(&format!("dev {veth}")) && route.contains(&format!("src {gateway}")),
        "the host's route to {ip}: {route:?}"
    );

    let addr = SocketAddr::from((ip, 80));
    let body = wait_for(Duration::from_secs(10), "httpd to answer", || {
        http_get(addr)
    });
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(body.ends_with("hello from berth\n"), "{body}");

    // A socket made in its namespace reaches it there, from its own address; the host's
    // connections come from the gateway. A namespace that is not there is an error, and the
    // sockets' thread goes on.
    let sockets = network::NetnsSockets::default();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let missing = sockets.tcp(&netns_dir.join("none"), false).await;
        assert!(
            missing.is_err(),
            "a socket in a namespace that is not there"
        );
        for _ in 0..2 {
            let socket = sockets.tcp(&netns, false).await.unwrap();
            let mut stream = socket.connect(addr).await.unwrap();
            assert_eq!(stream.local_addr().unwrap().ip(), ip);
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            assert!(answer.ends_with("hello from berth\n"), "{answer}");
        }
    });
    assert_eq!(
        TcpStream::connect(addr).unwrap().local_addr().unwrap().ip(),
        gateway
    );

    // Another container cannot reach it: containers share no link, and the host drops what
    // one sends to another.
    let mut peer = fx.spec(
        "net-peer",
        &[
            "sh",
            "-c",
            &format!(
                "if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox timeout 3 busybox nc {ip} 80 \
                 | grep -q 'hello from berth'; then echo REACHED; else echo BLOCKED; fi"
            ),
        ],
    );
    let peer_ip = Ipv4Addr::new(10, 250, subnet, 3);
    fx.netns.push(peer.id.clone());
    peer.netns = Some(rt.block_on(async {
        network::create_netns(&netns_dir, &peer.id, &bridge, peer_ip, 24, gateway)
            .await
            .unwrap()
    }));
    let (out, _) = run_attached(&fx, &peer);
    assert!(out.contains("BLOCKED") && !out.contains("REACHED"), "{out}");
    fx.runtime.remove(&peer.id).unwrap();
    rt.block_on(network::delete_netns(&netns_dir, &peer.id))
        .unwrap();
    assert!(
        !String::from_utf8_lossy(
            &std::process::Command::new("ip")
                .args(["-4", "route", "show", &format!("{peer_ip}/32")])
                .output()
                .unwrap()
                .stdout
        )
        .contains("dev"),
        "the route to a removed container stays"
    );

    fx.runtime.stop(&spec.id).unwrap();
    fx.runtime.remove(&spec.id).unwrap();
    rt.block_on(async {
        network::delete_netns(&netns_dir, &spec.id).await.unwrap();
        network::delete_netns(&netns_dir, &spec.id)
            .await
            .expect("idempotent");
        network::remove_bridge(&bridge).await.unwrap();
    });
    assert!(!Path::new("/sys/class/net").join(&bridge).exists());
    fx.assert_clean(&spec.id);
}

/// The bridge's firewall: a container opens no connection to the host, neither to a port on the
/// host's 127.0.0.1 (routed there as a container with CAP_NET_RAW could send it) nor to a port on
/// 0.0.0.0 through the gateway address, but for DNS on the gateway's port 53 (berth's DNS stub),
/// over UDP and TCP; the host still connects into the container (its replies pass). The
/// kernel's own guard for the first, route_localnet, is off and must stay off.
fn firewall_shields_the_host() {
    let mut fx = Fixture::new("fw");
    let pid = std::process::id();
    let bridge = format!("bf{pid}");
    let subnet = 20 + (pid % 200) as u8;
    let gateway = Ipv4Addr::new(10, 251, subnet, 1);
    let ip = Ipv4Addr::new(10, 251, subnet, 2);
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let any = TcpListener::bind("0.0.0.0:0").unwrap();
    let (loopback_port, any_port) = (
        loopback.local_addr().unwrap().port(),
        any.local_addr().unwrap().port(),
    );
    let script = format!(
        "httpd -p 8080 -h /www; \
         busybox timeout 3 busybox nc 127.0.0.1 {loopback_port} </dev/null; echo tried; \
         busybox timeout 3 busybox nc {gateway} {any_port} </dev/null; echo tried again; \
         exec sleep 1000"
    );
    let mut spec = fx.spec("fw", &["sh", "-c", &script]);
    spec.stop_grace_secs = 1;
    spec.log = LogTarget::File {
        path: fx.log_path(),
        prefix: "fw".into(),
    };
    fx.bridges.push(bridge.clone());
    fx.netns.push(spec.id.clone());
    let netns_dir = fx.root.join("netns");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let netns = rt.block_on(async {
        network::ensure_bridge(&bridge, gateway, 24).await.unwrap();
        network::create_netns(&netns_dir, &spec.id, &bridge, ip, 24, gateway)
            .await
            .unwrap()
    });
    firewall::ensure(&bridge, gateway, 24).unwrap();
    firewall::ensure(&bridge, gateway, 24).expect("idempotent");
    for conf in ["all", bridge.as_str()] {
        let path = format!("/proc/sys/net/ipv4/conf/{conf}/route_localnet");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            "0",
            "{path}"
        );
    }
    // Inside the namespace, send 127.0.0.1 to the gateway instead of to the own lo.
    let routed = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["sh", "-c"])
        .arg(format!(
            "sysctl -qw net.ipv4.conf.eth0.route_localnet=1 && ip addr flush dev lo && \
             ip route add 127.0.0.1/32 via {gateway} dev eth0"
        ))
        .status()
        .unwrap();
    assert!(routed.success(), "routing 127.0.0.1 out of the namespace");
    spec.netns = Some(netns.clone());
    fx.runtime.start(&spec).unwrap();

    let log = wait_for(Duration::from_secs(30), "both connection attempts", || {
        let log = std::fs::read_to_string(fx.log_path()).unwrap_or_default();
        log.contains("tried again").then_some(log)
    });
    for (listener, what) in [(&loopback, "127.0.0.1"), (&any, "0.0.0.0 via the gateway")] {
        listener.set_nonblocking(true).unwrap();
        let accepted = listener.accept();
        assert!(
            accepted.is_err(),
            "the container connected to the host's {what}: {accepted:?}\n{log}"
        );
    }
    let addr = SocketAddr::from((ip, 8080));
    let body = wait_for(Duration::from_secs(10), "httpd to answer the host", || {
        http_get(addr)
    });
    assert!(body.ends_with("hello from berth\n"), "{body}");

    let dns = DnsStandIn::on(gateway);
    let in_netns = |script: &str| busybox_in(&netns, script);
    let out = in_netns(&format!(
        "timeout 10 /bin/busybox nslookup x.test {gateway}"
    ));
    assert!(
        out.contains("NXDOMAIN"),
        "DNS over UDP to the gateway: {out}"
    );
    assert!(dns.udp_queries() > 0);
    in_netns(&format!(
        "timeout 3 /bin/busybox nc {gateway} 53 </dev/null"
    ));
    assert!(dns.tcp_connected(), "DNS over TCP to the gateway");
    drop(dns);

    fx.runtime.stop(&spec.id).unwrap();
    fx.runtime.remove(&spec.id).unwrap();
    rt.block_on(async {
        network::delete_netns(&netns_dir, &spec.id).await.unwrap();
        network::remove_bridge(&bridge).await.unwrap();
    });
    firewall::remove(&bridge).unwrap();
    firewall::remove(&bridge).expect("idempotent");
    let table = std::process::Command::new("nft")
        .args(["list", "table", "inet", &firewall::table_name(&bridge)])
        .output()
        .unwrap();
    assert!(!table.status.success(), "the nftables table is left");
    fx.assert_clean(&spec.id);
}

/// A container whose address is in the firewall's no-egress set opens no connection out of the
/// bridge: to a server on another network of this host (a second bridge standing for the
/// outside, with a container of its own) it is rejected at once, TCP and DNS alike, and so are
/// its queries to berth's DNS stub on the gateway (which would carry them out), while the host
/// still reaches the container (the proxy, health checks). Taken out of the set, the same
/// connection works again, and it worked before: the path out is real.
fn egress_off_rejects_connections_out_of_the_bridge() {
    let mut fx = Fixture::new("egress");
    let pid = std::process::id();
    let octet = 20 + (pid % 200) as u8;
    let (bridge, outside) = (format!("be{pid}"), format!("bo{pid}"));
    let gateway = Ipv4Addr::new(10, 252, octet, 1);
    let ip = Ipv4Addr::new(10, 252, octet, 2);
    let outside_gateway = Ipv4Addr::new(10, 253, octet, 1);
    let server_ip = Ipv4Addr::new(10, 253, octet, 2);
    fx.bridges.extend([bridge.clone(), outside.clone()]);
    let mut server = fx.spec(
        "egress-server",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    server.stop_grace_secs = 1;
    let mut client = fx.spec(
        "egress-client",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
    );
    client.stop_grace_secs = 1;
    fx.netns.extend([server.id.clone(), client.id.clone()]);
    let netns_dir = fx.root.join("netns");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (server_ns, client_ns) = rt.block_on(async {
        network::ensure_bridge(&bridge, gateway, 24).await.unwrap();
        network::ensure_bridge(&outside, outside_gateway, 24)
            .await
            .unwrap();
        let server_ns = network::create_netns(
            &netns_dir,
            &server.id,
            &outside,
            server_ip,
            24,
            outside_gateway,
        )
        .await
        .unwrap();
        let client_ns = network::create_netns(&netns_dir, &client.id, &bridge, ip, 24, gateway)
            .await
            .unwrap();
        (server_ns, client_ns)
    });
    firewall::ensure(&bridge, gateway, 24).unwrap();
    server.netns = Some(server_ns);
    client.netns = Some(client_ns.clone());
    fx.runtime.start(&server).unwrap();
    fx.runtime.start(&client).unwrap();
    // What the container's processes see, run in its network namespace: busybox's nc and
    // nslookup against the outside server; output and how long it took.
    let probe = |args: &str| {
        let t = Instant::now();
        (busybox_in(&client_ns, args), t.elapsed())
    };
    let get = format!(
        "sh -c \"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | /bin/busybox timeout 5 /bin/busybox nc {server_ip} 8080\""
    );
    let reached = wait_for(Duration::from_secs(10), "the outside server", || {
        let (out, _) = probe(&get);
        out.contains("hello from berth").then_some(out)
    });
    println!("    egress on: {}", reached.lines().next().unwrap_or(""));
    let dns = DnsStandIn::on(gateway);
    let ask_stub = format!("timeout 10 /bin/busybox nslookup x.test {gateway}");
    let (out, _) = probe(&ask_stub);
    assert!(
        out.contains("NXDOMAIN"),
        "the DNS stub with egress on: {out}"
    );

    firewall::set_no_egress(&bridge, &[ip]).unwrap();
    let (out, took) = probe(&get);
    assert!(!out.contains("hello from berth"), "egress off, yet: {out}");
    assert!(
        took < Duration::from_millis(500),
        "a blocked connection should fail at once, not time out ({took:?}): {out}"
    );
    println!("    egress off: {} ({took:?})", out.trim());
    let (out, took) = probe(&format!(
        "timeout 10 /bin/busybox nslookup example.test {server_ip}"
    ));
    assert!(
        took < Duration::from_secs(2),
        "DNS with egress off should fail at once ({took:?}): {out}"
    );
    println!(
        "    DNS with egress off: {} ({took:?})",
        out.replace('\n', " | ")
    );
    let asked = dns.udp_queries();
    let (out, took) = probe(&ask_stub);
    assert!(
        !out.contains("NXDOMAIN") && took < Duration::from_secs(2),
        "the DNS stub with egress off should refuse at once ({took:?}): {out}"
    );
    let (out, took) = probe(&format!(
        "timeout 5 /bin/busybox nc {gateway} 53 </dev/null"
    ));
    assert!(
        took < Duration::from_millis(500),
        "DNS over TCP with egress off should fail at once ({took:?}): {out}"
    );
    assert_eq!(dns.udp_queries(), asked, "a query reached the stub");
    assert!(!dns.tcp_connected(), "a connection reached the stub");
    println!(
        "    the DNS stub with egress off: {} ({took:?})",
        out.trim()
    );
    let body = wait_for(
        Duration::from_secs(10),
        "the host to reach the container",
        || http_get(SocketAddr::from((ip, 8080))),
    );
    assert!(body.ends_with("hello from berth\n"), "{body}");

    firewall::set_no_egress(&bridge, &[]).unwrap();
    let (out, _) = probe(&get);
    assert!(out.contains("hello from berth"), "egress back on: {out}");
    let (out, _) = probe(&ask_stub);
    assert!(
        out.contains("NXDOMAIN"),
        "the DNS stub with egress back on: {out}"
    );
    drop(dns);

    for spec in [&client, &server] {
        fx.runtime.stop(&spec.id).unwrap();
        fx.runtime.remove(&spec.id).unwrap();
    }
    rt.block_on(async {
        for spec in [&client, &server] {
            network::delete_netns(&netns_dir, &spec.id).await.unwrap();
        }
        network::remove_bridge(&bridge).await.unwrap();
        network::remove_bridge(&outside).await.unwrap();
    });
    firewall::remove(&bridge).unwrap();
    fx.assert_clean(&client.id);
    fx.assert_clean(&server.id);
}

/// Detached containers cost the starting process no thread (no waiter per shim), and a shim
/// that exited is reaped by the runtime, not left a zombie.
fn detached_shims_cost_no_thread_and_are_reaped() {
    let mut fx = Fixture::new("reap");
    let threads = || {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse::<usize>()
            .unwrap()
    };
    let before = threads();
    let specs: Vec<ContainerSpec> = (0..4)
        .map(|n| {
            let mut spec = fx.spec(&format!("reap{n}"), &["sleep", "1000"]);
            spec.stop_grace_secs = 1;
            spec
        })
        .collect();
    let mut shims = Vec::new();
    for spec in &specs {
        fx.runtime.start(spec).unwrap();
        let dir = fx.runtime.container_dir(&spec.id);
        let shim: i32 = std::fs::read_to_string(dir.join("shim.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        shims.push(shim);
    }
    assert_eq!(threads(), before, "threads grew with 4 running containers");
    for spec in &specs {
        fx.runtime.stop(&spec.id).unwrap();
    }
    for shim in shims {
        assert!(
            !Path::new(&format!("/proc/{shim}")).exists(),
            "shim {shim} was not reaped (a zombie of ours)"
        );
    }
    for spec in &specs {
        fx.runtime.remove(&spec.id).unwrap();
        fx.assert_clean(&spec.id);
    }
}

/// The shims of detached containers are forks of one launcher (a child of the starting
/// process), each reading `… shim DIR` as its command line; a launcher killed with SIGKILL
/// leaves its shims running, and the next start brings up a new one.
fn shims_are_forked_by_one_launcher_that_comes_back() {
    let mut fx = Fixture::new("launcher");
    let field = |pid: i32, key: &str| -> i32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let start = |fx: &mut Fixture, name: &str| {
        let mut spec = fx.spec(name, &["sleep", "1000"]);
        spec.init = true; // stops at once: the init passes SIGTERM on
        fx.runtime.start(&spec).unwrap();
        let dir = fx.runtime.container_dir(&spec.id);
        let shim: i32 = std::fs::read_to_string(dir.join("shim.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let cmdline = std::fs::read(format!("/proc/{shim}/cmdline")).unwrap();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        assert!(
            args.windows(2)
                .any(|pair| pair[0] == b"shim" && pair[1] == dir.as_os_str().as_encoded_bytes()),
            "shim {shim}'s command line: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
        (spec, shim, field(shim, "PPid:"))
    };
    let (first, first_shim, launcher) = start(&mut fx, "launcher1");
    let (second, _, same) = start(&mut fx, "launcher2");
    assert_eq!(same, launcher, "both shims are forks of one launcher");
    assert_eq!(
        field(launcher, "PPid:"),
        std::process::id() as i32,
        "the launcher is the starting process's child"
    );
    let comm = std::fs::read_to_string(format!("/proc/{launcher}/cmdline")).unwrap();
    assert!(comm.contains("shim-launcher"), "{comm:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(launcher),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the killed launcher to exit",
        || {
            let state =
                std::fs::read_to_string(format!("/proc/{launcher}/stat")).unwrap_or_default();
            (state.is_empty() || state.contains(") Z")).then_some(())
        },
    );
    assert!(
        matches!(fx.runtime.state(&first.id), State::Running { .. }),
        "its shims live on"
    );
    let (third, _, new_launcher) = start(&mut fx, "launcher3");
    assert_ne!(
        new_launcher, launcher,
        "a new launcher forked the next shim"
    );
    assert!(Path::new(&format!("/proc/{first_shim}")).exists());
    for spec in [&first, &second, &third] {
        fx.runtime.remove(&spec.id).unwrap();
    }
    for spec in [&first, &second, &third] {
        fx.assert_clean(&spec.id);
    }
}

fn missing_layer_is_refused() {
    let mut fx = Fixture::new("nolayer");
    let mut spec = fx.spec("nolayer", &["true"]);
    spec.layers.insert(0, fx.root.join("no-such-layer"));
    match fx.runtime.start(&spec) {
        Err(Error::MissingLayer(path)) => assert!(path.ends_with("no-such-layer")),
        other => panic!("expected MissingLayer, got {other:?}"),
    }
    match fx.runtime.run_attached(&spec, Io::Pipes) {
        Err(Error::MissingLayer(_)) => {}
        other => panic!("expected MissingLayer, got {other:?}"),
    }
    spec.layers.clear();
    assert!(matches!(fx.runtime.start(&spec), Err(Error::NoLayers)));
    spec.id = "Bad_Id".into();
    assert!(matches!(fx.runtime.start(&spec), Err(Error::InvalidId(_))));
    assert!(fx.runtime.list().is_empty());
    fx.assert_clean(&format!("t{}-nolayer", std::process::id()));
}

fn missing_binary_fails_cleanly() {
    let mut fx = Fixture::new("nobin");
    let spec = fx.spec("nobin", &["/bin/no-such-binary", "arg"]);
    match fx.runtime.start(&spec) {
        Err(err @ Error::StartFailed { .. }) => {
            let text = err.to_string();
            assert!(text.contains("no-such-binary"), "unclear error: {text}");
            println!("    start error: {text}");
        }
        other => panic!("expected StartFailed, got {other:?}"),
    }
    fx.assert_clean(&spec.id);
    let (out, code) = run_attached(&fx, &spec);
    assert_eq!(code, berth_runtime::shim::START_FAILED);
    assert!(out.contains("no-such-binary"), "{out}");
    fx.runtime.remove(&spec.id).unwrap();
    fx.assert_clean(&spec.id);
}

/// The default seccomp profile is loaded (with no_new_privs) and denies `unshare` with EPERM.
/// Creating a user namespace needs no capability, so the same command succeeds in the same
/// container without the profile: the profile, not the capability set, is what denies it.
fn seccomp_denies_new_namespaces() {
    let mut fx = Fixture::new("seccomp");
    let script = "busybox grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status; \
                  busybox unshare -U true && echo unshare ok; \
                  echo 'fork and exec still work' | busybox cat";
    let confined = fx.spec("seccomp", &["sh", "-c", script]);
    let (out, code) = run_attached(&fx, &confined);
    assert_eq!(code, 0, "{out}");
    let status: Vec<&str> = out.lines().take(3).collect();
    assert_eq!(
        status,
        ["NoNewPrivs:\t1", "Seccomp:\t2", "Seccomp_filters:\t1"],
        "{out}"
    );
    assert!(
        out.contains("unshare(0x10000000): Operation not permitted"),
        "unshare was not denied with EPERM: {out}"
    );
    assert!(!out.contains("unshare ok"), "{out}");
    assert!(out.contains("fork and exec still work"), "{out}");
    fx.runtime.remove(&confined.id).unwrap();
    fx.assert_clean(&confined.id);

    let link = fx.root.join(UNCONFINED_SHIM);
    symlink(std::env::current_exe().unwrap(), &link).unwrap();
    let unconfined_runtime = Runtime::new(fx.root.join("containers"), link);
    let unconfined = fx.spec("noseccomp", &["sh", "-c", script]);
    let (out, code) = run_attached_with(&unconfined_runtime, &unconfined);
    assert_eq!(code, 0, "{out}");
    let status: Vec<&str> = out.lines().take(2).collect();
    assert_eq!(status, ["NoNewPrivs:\t1", "Seccomp:\t0"], "{out}");
    assert!(
        out.contains("unshare ok"),
        "unshare failed without the profile: {out}"
    );
    unconfined_runtime.remove(&unconfined.id).unwrap();
    fx.assert_clean(&unconfined.id);
}

fn start_to_exit_timing() {
    let mut fx = Fixture::new("timing");
    let mut times = Vec::new();
    for n in 0..5 {
        let spec = fx.spec(&format!("timing{n}"), &["true"]);
        let t = Instant::now();
        let (_, code) = run_attached(&fx, &spec);
        times.push(t.elapsed());
        assert_eq!(code, 0);
        fx.runtime.remove(&spec.id).unwrap();
        fx.assert_clean(&spec.id);
    }
    times.sort();
    println!(
        "    start-to-exit of `true` (spawn shim .. shim exited): min {:?}, median {:?}, max {:?}",
        times[0], times[2], times[4]
    );
}

/// What listens where berth's DNS stub would, on a gateway's port 53: over UDP it answers every
/// query NXDOMAIN; over TCP it only accepts. Counts what reached it. Stops when dropped.
struct DnsStandIn {
    udp_queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tcp: TcpListener,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsStandIn {
    fn on(gateway: Ipv4Addr) -> DnsStandIn {
        use std::sync::atomic::Ordering;
        let udp = std::net::UdpSocket::bind((gateway, 53)).expect("UDP port 53 on the gateway");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let tcp = TcpListener::bind((gateway, 53)).expect("TCP port 53 on the gateway");
        tcp.set_nonblocking(true).unwrap();
        let udp_queries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (queries, stop) = (udp_queries.clone(), stop.clone());
            move || {
                let mut buf = [0; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if len < 12 {
                        continue;
                    }
                    queries.fetch_add(1, Ordering::Relaxed);
                    // QR and RD set, RA set, NXDOMAIN.
                    buf[2] |= 0x80;
                    buf[3] = 0x83;
                    let _ = udp.send_to(&buf[..len], from);
                }
            }
        });
        DnsStandIn {
            udp_queries,
            tcp,
            stop,
            thread: Some(thread),
        }
    }

    fn udp_queries(&self) -> usize {
        self.udp_queries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a TCP connection is waiting to be accepted (and takes it).
    fn tcp_connected(&self) -> bool {
        self.tcp.accept().is_ok()
    }
}

impl Drop for DnsStandIn {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One `GET /` over HTTP/1.0; the whole answer, or None when nothing answered.
fn http_get(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}
