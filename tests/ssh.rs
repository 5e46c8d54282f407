//! End-to-end tests of the SSH git endpoint: the server runs in-process on 127.0.0.1:0 and is
//! driven by the real OpenSSH client, real git and keys made by the real ssh-keygen.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use berth::attach::{self, Attach, Input};
use berth::git;
use berth::ssh::{self, Gate, SshConfig};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every external command must finish within this, or the test fails.
const DEADLINE: Duration = Duration::from_secs(120);

struct TestGate {
    keys: HashMap<String, String>,
    apps: HashSet<String>,
    /// The ids of the pushes the server said were over, in order.
    ended: Arc<std::sync::Mutex<Vec<String>>>,
    /// The commands of runs whose user went away.
    abandoned: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Gate for TestGate {
    /// Each key belongs to a user of the same name.
    fn key_owner(&self, openssh_key: String) -> BoxFuture<'static, Option<(String, String)>> {
        let name = self.keys.get(&openssh_key).cloned();
        async move { name.map(|n| (n.clone(), n)) }.boxed()
    }

    fn may_push(&self, _user: String, app: String) -> BoxFuture<'static, Result<(), String>> {
        let exists = self.apps.contains(&app);
        async move {
            match exists {
                true => Ok(()),
                false => Err(format!(
                    "app {app:?} does not exist — create it first with: berth apps:create {app}"
                )),
            }
        }
        .boxed()
    }

    /// A stand-in for berth's commands: says on stdout what it got and as whom, one line on
    /// stderr, and exits 3.
    fn command(
        &self,
        user: String,
        words: Vec<String>,
        out: tokio::sync::mpsc::Sender<(bool, Vec<u8>)>,
    ) -> BoxFuture<'static, i32> {
        async move {
            let said = format!("{words:?} as {user}\n");
            let _ = out.send((false, said.into_bytes())).await;
            let _ = out.send((true, b"a warning\n".to_vec())).await;
            3
        }
        .boxed()
    }

    fn push_ended(&self, push: String) -> BoxFuture<'static, ()> {
        self.ended.lock().unwrap().push(push);
        async {}.boxed()
    }

    /// A stand-in for a container: says what it was asked (app, key, command, terminal),
    /// then `exit N` exits N at once; anything else echoes its input to stdout, reports
    /// window changes and exits 0 on end of input, or records in `abandoned` that its user
    /// went away.
    fn run(
        &self,
        app: String,
        command: String,
        key: String,
        attach: Attach,
    ) -> BoxFuture<'static, Result<i32, String>> {
        let abandoned = self.abandoned.clone();
        async move {
            let Attach {
                terminal,
                mut input,
                output,
            } = attach;
            let terminal =
                terminal.map_or("none".to_string(), |t| format!("{}x{}", t.rows, t.cols));
            let said = format!("{app} for {key}: {command} (terminal {terminal})\n");
            let _ = output.send(attach::Output::Stdout(said.into_bytes())).await;
            if let Some(code) = command.strip_prefix("exit ") {
                return code.parse().map_err(|_| format!("bad code {code}"));
            }
            loop {
                let message = tokio::select! {
                    message = input.recv() => message,
                    () = output.closed() => None,
                };
                let reply = match message {
                    Some(Input::Data(bytes)) => attach::Output::Stdout(bytes),
                    Some(Input::Resize(size)) => attach::Output::Stdout(
                        format!("resized {}x{}\n", size.rows, size.cols).into_bytes(),
                    ),
                    Some(Input::Eof) => {
                        let _ = output
                            .send(attach::Output::Stderr(b"end of input\n".to_vec()))
                            .await;
                        return Ok(0);
                    }
                    None => {
                        abandoned.lock().unwrap().push(command);
                        return Ok(143);
                    }
                };
                let _ = output.send(reply).await;
            }
        }
        .boxed()
    }
}

/// A running server with its own temp dir, one app repo per name in `apps`, and a client key
/// the gate knows as "laptop".
struct TestServer {
    dir: tempfile::TempDir,
    port: u16,
    key: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ssh::SshError>>,
    ended: Arc<std::sync::Mutex<Vec<String>>>,
    abandoned: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TestServer {
    /// Starts a server whose repos run `hook_command HOOK` as their hooks.
    async fn start(apps: &[&str], hook_command: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let key = new_client_key(dir.path(), "laptop");
        for app in apps {
            git::create_repo(&dir.path().join("repos"), app, hook_command).unwrap();
        }
        TestServer::start_in(dir, key).await
    }

    /// Starts a server on an existing temp dir (its host key and repos are kept).
    async fn start_in(dir: tempfile::TempDir, key: PathBuf) -> TestServer {
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let mut fields = public.split_whitespace();
        let bare = format!("{} {}", fields.next().unwrap(), fields.next().unwrap());
        let mut apps = HashSet::new();
        if let Ok(entries) = std::fs::read_dir(dir.path().join("repos")) {
            for entry in entries {
                let name = entry.unwrap().file_name().into_string().unwrap();
                apps.insert(name.trim_end_matches(".git").to_string());
            }
        }
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let abandoned = Arc::new(std::sync::Mutex::new(Vec::new()));
        let gate = TestGate {
            keys: HashMap::from([(bare, "laptop".to_string())]),
            apps,
            ended: ended.clone(),
            abandoned: abandoned.clone(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = SshConfig {
            host_key: dir.path().join("ssh_host_ed25519_key"),
            repos_dir: dir.path().join("repos"),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ssh::run(listener, config, Arc::new(gate), shutdown.clone()));
        TestServer {
            dir,
            port,
            key,
            shutdown,
            task,
            ended,
            abandoned,
        }
    }

    async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
        self.dir
    }

    fn repo(&self, app: &str) -> git2::Repository {
        git2::Repository::open_bare(git::repo_path(&self.dir.path().join("repos"), app)).unwrap()
    }

    /// The plain `ssh` command line for this server, with `key`, as git and users run it.
    fn ssh_command(&self, key: &Path) -> String {
        format!(
            "ssh -F /dev/null -i {} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
            key.display()
        )
    }

    fn url(&self, app_path: &str) -> String {
        format!("ssh://git@127.0.0.1:{}/{app_path}", self.port)
    }

    /// Runs `ssh git@server ARGS…` with `key` and no input.
    async fn ssh(&self, key: &Path, args: &[&str]) -> Output {
        let mut command = self.ssh_to(key, args);
        command.stdin(std::process::Stdio::null());
        run(command).await
    }

    /// The command `ssh git@server ARGS…` with `key`.
    fn ssh_to(&self, key: &Path, args: &[&str]) -> tokio::process::Command {
        let line = format!("{} -p {} git@127.0.0.1", self.ssh_command(key), self.port);
        let mut words: Vec<&str> = line.split_whitespace().collect();
        words.extend_from_slice(args);
        let mut command = tokio::process::Command::new(words[0]);
        command.args(&words[1..]).kill_on_drop(true);
        command
    }

    /// Runs `git push REMOTE main` from `work` with `key` (`-p PORT` added for scp-like remotes).
    async fn push(&self, work: &Path, key: &Path, remote: &str) -> Output {
        run(self.push_command(work, key, remote, &["main"])).await
    }

    /// The command `git push REMOTE ARGS…` from `work` with `key`.
    fn push_command(
        &self,
        work: &Path,
        key: &Path,
        remote: &str,
        args: &[&str],
    ) -> tokio::process::Command {
        let mut ssh = self.ssh_command(key);
        if !remote.starts_with("ssh://") {
            ssh = format!("{ssh} -p {}", self.port);
        }
        let mut command = git_command(work);
        command
            .args(["push", remote])
            .args(args)
            .env("GIT_SSH_COMMAND", ssh);
        command
    }

    /// Waits until the server has said that `count` pushes ended; returns their ids.
    async fn ended_pushes(&self, count: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let ended = self.ended.lock().unwrap().clone();
            if ended.len() >= count {
                return ended;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pushes ended: {ended:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn new_client_key(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "someone@laptop",
            "-f",
        ])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

/// Writes an executable hook script into `dir` and returns the hook command that runs it.
fn hook_script(dir: &Path, body: &str) -> String {
    let path = dir.join("hook.sh");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("'{}'", path.display())
}

/// Prints the pushed refs, the app and the key name, and accepts the push unless a file
/// `reject` sits next to the script.
const ACCEPTING_HOOK: &str = r#"while read old new ref; do
  echo "-----> test hook $1 got $ref for $BERTH_APP by $BERTH_KEY_NAME in push $BERTH_PUSH_ID"
done
if [ -e "$(dirname "$0")/reject" ]; then
  echo "-----> test hook says no" >&2
  exit 1
fi"#;

fn git_command(dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("git");
    command
        .current_dir(dir)
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com");
    command
}

async fn run(mut command: tokio::process::Command) -> Output {
    command.kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish in {DEADLINE:?}"))
        .unwrap()
}

async fn git_ok(dir: &Path, args: &[&str]) -> String {
    let mut command = git_command(dir);
    command.args(args);
    let output = run(command).await;
    assert!(output.status.success(), "git {args:?}: {}", text(&output));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// A work repo on branch main with one commit; returns its path.
async fn work_repo(parent: &Path) -> PathBuf {
    let work = parent.join("work");
    std::fs::create_dir(&work).unwrap();
    git_ok(&work, &["init", "-q", "-b", "main"]).await;
    commit(&work, "README", "hello\n").await;
    work
}

/// Writes `file` and commits it; returns the new commit's sha.
async fn commit(work: &Path, file: &str, content: &str) -> String {
    std::fs::write(work.join(file), content).unwrap();
    git_ok(work, &["add", "-A"]).await;
    git_ok(work, &["commit", "-q", "-m", &format!("change {file}")]).await;
    git_ok(work, &["rev-parse", "HEAD"]).await
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn main_ref(repo: &git2::Repository) -> Option<String> {
    repo.refname_to_id("refs/heads/main")
        .ok()
        .map(|id| id.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_runs_the_hook_and_updates_the_ref() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let work = work_repo(server.dir.path()).await;
    let head = git_ok(&work, &["rev-parse", "HEAD"]).await;

    let output = server.push(&work, &server.key, &server.url("hello")).await;

    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let ended = server.ended_pushes(1).await;
    for hook in ["pre-receive", "post-receive"] {
        let line = format!(
            "remote: -----> test hook {hook} got refs/heads/main for hello by laptop in push {}",
            ended[0]
        );
        assert!(
            stderr.contains(&line),
            "{line:?} missing:\n{}",
            text(&output)
        );
    }
    assert_eq!(main_ref(&server.repo("hello")), Some(head));
    server.stop().await;
}

/// Logs when each push's pre-receive starts and ends, and holds it until a file `release`
/// sits next to the script.
const HOLDING_HOOK: &str = r#"cd "$(dirname "$0")"
[ "$1" = pre-receive ] || exit 0
echo "start $BERTH_PUSH_ID" >> order
while [ ! -e release ]; do sleep 0.05; done
echo "end $BERTH_PUSH_ID" >> order"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_of_one_app_wait_for_each_other() {
    use tokio::io::AsyncBufReadExt;
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), HOLDING_HOOK)).await;
    let first = work_repo(server.dir.path()).await;
    let second = server.dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    git_ok(&second, &["init", "-q", "-b", "main"]).await;
    commit(&second, "OTHER", "other\n").await;
    let url = server.url("hello");
    let order = scripts.path().join("order");

    let mut one = server.push_command(&first, &server.key, &url, &["--force", "main"]);
    let one = one.kill_on_drop(true).output();
    let one = tokio::spawn(one);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !order.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first push's hook never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut two = server.push_command(&second, &server.key, &url, &["--force", "main"]);
    let mut two = two
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(two.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("Another push to hello is in progress; waiting"))
    {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => seen.push(line),
            other => panic!("the second push did not say it waits ({other:?}): {seen:#?}"),
        }
    }
    std::fs::write(scripts.path().join("release"), "").unwrap();
    let one = one.await.unwrap().unwrap();
    assert!(one.status.success(), "{}", text(&one));
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        seen.push(line);
    }
    assert!(two.wait().await.unwrap().success(), "{seen:#?}");

    // One push at a time: the second one's hook started only after the first one's ended.
    let ended = server.ended_pushes(2).await;
    let log = std::fs::read_to_string(&order).unwrap();
    let want = format!(
        "start {a}\nend {a}\nstart {b}\nend {b}\n",
        a = ended[0],
        b = ended[1]
    );
    assert_eq!(log, want);
    let second_head = git_ok(&second, &["rev-parse", "HEAD"]).await;
    assert_eq!(main_ref(&server.repo("hello")), Some(second_head));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_hook_rejects_the_push_and_keeps_the_ref() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let work = work_repo(server.dir.path()).await;
    let first = git_ok(&work, &["rev-parse", "HEAD"]).await;
    let output = server.push(&work, &server.key, &server.url("hello")).await;
    assert!(output.status.success(), "{}", text(&output));

    std::fs::write(scripts.path().join("reject"), "").unwrap();
    commit(&work, "second", "2\n").await;
    let output = server.push(&work, &server.key, &server.url("hello")).await;

    assert!(!output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("remote: -----> test hook says no"),
        "{}",
        text(&output)
    );
    assert!(
        stderr.contains("pre-receive hook declined"),
        "{}",
        text(&output)
    );
    assert_eq!(main_ref(&server.repo("hello")), Some(first));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_remote_forms_reach_the_app() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let work = work_repo(server.dir.path()).await;
    // git sends 'hello' and 'hello.git' for scp-like remotes, '/hello' and '/hello.git' for URLs.
    let remotes = [
        "git@127.0.0.1:hello".to_string(),
        "git@127.0.0.1:hello.git".to_string(),
        server.url("hello"),
        server.url("hello.git"),
    ];
    for (i, remote) in remotes.iter().enumerate() {
        let head = commit(&work, "counter", &format!("{i}\n")).await;
        let output = server.push(&work, &server.key, remote).await;
        assert!(output.status.success(), "{remote}: {}", text(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr)
                .contains("remote: -----> test hook pre-receive got"),
            "{remote}: {}",
            text(&output)
        );
        assert_eq!(main_ref(&server.repo("hello")), Some(head), "{remote}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_missing_app_says_how_to_create_it() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let work = work_repo(server.dir.path()).await;

    let output = server.push(&work, &server.key, &server.url("nope")).await;

    assert!(!output.status.success(), "{}", text(&output));
    let expected =
        "error: app \"nope\" does not exist — create it first with: berth apps:create nope";
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(expected),
        "{}",
        text(&output)
    );
    assert!(!git::repo_path(&server.dir.path().join("repos"), "nope").exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_is_refused() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let stranger = new_client_key(scripts.path(), "stranger");

    let output = server.ssh(&stranger, &["git-receive-pack '/hello'"]).await;
    assert_eq!(output.status.code(), Some(255), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("Permission denied (publickey)"),
        "{}",
        text(&output)
    );

    let work = work_repo(scripts.path()).await;
    let output = server.push(&work, &stranger, &server.url("hello")).await;
    assert!(!output.status.success(), "{}", text(&output));
    assert_eq!(main_ref(&server.repo("hello")), None);

    // The known key gets through to the same command: git-receive-pack advertises its
    // capabilities, then exits 128 on the empty input, and that status reaches the client.
    let output = server
        .ssh(&server.key, &["git-receive-pack '/hello'"])
        .await;
    assert_eq!(output.status.code(), Some(128), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("report-status"),
        "{}",
        text(&output)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_but_a_push_is_refused_with_one_line() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let refused = |what: &str| {
        format!("error: only git push, run and berth commands are served here (got {what}) — push with: git push deploy main; run a command in an app with: ssh -t -p PORT git@HOST run APP -- bash; see the commands with: ssh -p PORT git@HOST help\n")
    };
    let usage =
        "error: say which app and what to run: ssh -t -p PORT git@HOST run APP -- COMMAND\n";
    let cases: &[(&[&str], String)] = &[
        (
            &["git-receive-pack '../hello'"],
            "error: \"../hello\" is not a valid app name — use 1 to 63 lowercase letters, digits and dashes, starting with a letter\n".to_string(),
        ),
        (&[], refused("a shell")),
        (&["-tt"], refused("a shell")),
        (&["-s", "sftp"], refused("\"subsystem sftp\"")),
        (&["run"], usage.to_string()),
        (&["run hello"], usage.to_string()),
        (&["run hello --"], usage.to_string()),
        (
            &["run ../hello -- ls"],
            "error: invalid app name \"../hello\": use 1–63 characters, lowercase letters, digits and '-', starting with a letter (e.g. my-app)\n".to_string(),
        ),
        (
            &["run nope -- ls"],
            "error: app \"nope\" does not exist — create it first with: berth apps:create nope\n".to_string(),
        ),
    ];
    for (args, expected) in cases {
        let output = server.ssh(&server.key, args).await;
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", text(&output));
        assert_eq!(
            String::from_utf8_lossy(&output.stderr),
            *expected,
            "{args:?}: {}",
            text(&output)
        );
        assert!(output.stdout.is_empty(), "{args:?}: {}", text(&output));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_command_lines_are_berth_commands_of_the_keys_user() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    for (args, words) in [
        (
            &["config:set hello 'A=b c'"][..],
            r#"["config:set", "hello", "A=b c"]"#,
        ),
        (&["-tt", "ps", "hello"], r#"["ps", "hello"]"#),
        (&["runner"], r#"["runner"]"#),
    ] {
        let output = server.ssh(&server.key, args).await;
        assert_eq!(output.status.code(), Some(3), "{args:?}: {}", text(&output));
        let stdout = String::from_utf8_lossy(&output.stdout).replace("\r\n", "\n");
        assert_eq!(stdout, format!("{words} as laptop\n"), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr).replace("\r\n", "\n");
        assert_eq!(stderr, "a warning\n", "{args:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_key_survives_a_restart() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let first = host_key_seen_by_client(server.port).await;
    let key = server.key.clone();
    let dir = server.stop().await;

    let host_key = dir.path().join("ssh_host_ed25519_key");
    let mode = std::fs::metadata(&host_key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let server = TestServer::start_in(dir, key).await;
    let second = host_key_seen_by_client(server.port).await;

    assert_eq!(first, second);
    let stored = ssh::load_or_create_host_key(&host_key).unwrap();
    assert_eq!(stored.public_key().to_openssh().unwrap(), first);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_disconnects_clients_and_returns() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    // A push that has started and waits for the client's input.
    let mut client = server
        .ssh_to(&server.key, &["git-receive-pack '/hello'"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut advertisement = [0u8; 4];
    let mut stdout = client.stdout.take().unwrap();
    tokio::time::timeout(DEADLINE, stdout.read_exact(&mut advertisement))
        .await
        .expect("no ref advertisement")
        .unwrap();

    server.stop().await;

    let status = tokio::time::timeout(DEADLINE, client.wait())
        .await
        .expect("the client stayed connected after shutdown")
        .unwrap();
    assert!(!status.success());
    let mut stderr = String::new();
    let mut pipe = client.stderr.take().unwrap();
    pipe.read_to_string(&mut stderr).await.unwrap();
    assert!(stderr.contains("berth is shutting down"), "{stderr}");
}

/// The host key the real OpenSSH tools see, as "ssh-ed25519 AAAA…".
async fn host_key_seen_by_client(port: u16) -> String {
    let mut command = tokio::process::Command::new("ssh-keyscan");
    command.args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"]);
    let output = run(command).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| !line.starts_with('#'))
        .unwrap_or_else(|| panic!("no host key: {}", text(&output)));
    let fields: Vec<&str> = line.split_whitespace().collect();
    format!("{} {}", fields[1], fields[2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_pushes_and_chatty_hooks_go_through() {
    let scripts = tempfile::tempdir().unwrap();
    // About 3 MB of hook output travels back to the pusher, beyond any initial SSH window.
    let hook = hook_script(
        scripts.path(),
        "[ \"$1\" = pre-receive ] || exit 0\ncat >/dev/null\nseq 1 300000 | sed 's/^/-----> line /'\necho '-----> hook done'",
    );
    let server = TestServer::start(&["hello"], &hook).await;
    let work = work_repo(server.dir.path()).await;
    // 24 MB that does not compress: many times the SSH window in the other direction.
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    let mut big = std::fs::File::create(work.join("big.bin")).unwrap();
    std::io::copy(&mut std::io::Read::take(&mut random, 24 << 20), &mut big).unwrap();
    let head = commit(&work, "small", "x\n").await;

    let output = server.push(&work, &server.key, &server.url("hello")).await;

    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines = stderr
        .lines()
        .filter(|l| l.starts_with("remote: -----> line "))
        .count();
    assert_eq!(
        lines,
        300000,
        "stderr tail: {}",
        &stderr[stderr.len().saturating_sub(500)..]
    );
    assert!(stderr.contains("remote: -----> hook done"));
    assert_eq!(main_ref(&server.repo("hello")), Some(head));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_to_many_apps() {
    let scripts = tempfile::tempdir().unwrap();
    let apps = [
        "app-0", "app-1", "app-2", "app-3", "app-4", "app-5", "app-6", "app-7",
    ];
    let server = TestServer::start(&apps, &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let mut pushes = Vec::new();
    for app in apps {
        let dir = server.dir.path().join(format!("client-{app}"));
        std::fs::create_dir(&dir).unwrap();
        let work = work_repo(&dir).await;
        let head = git_ok(&work, &["rev-parse", "HEAD"]).await;
        pushes.push((app, work, head));
    }

    let urls: Vec<String> = apps.iter().map(|app| server.url(app)).collect();
    let outputs = futures::future::join_all(
        pushes
            .iter()
            .zip(&urls)
            .map(|((_, work, _), url)| server.push(work, &server.key, url)),
    )
    .await;

    for ((app, _, head), output) in pushes.iter().zip(outputs) {
        assert!(output.status.success(), "{app}: {}", text(&output));
        let expected =
            format!("remote: -----> test hook pre-receive got refs/heads/main for {app} by laptop");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(&expected),
            "{app}: {}",
            text(&output)
        );
        assert_eq!(main_ref(&server.repo(app)), Some(head.clone()), "{app}");
    }
    server.stop().await;
}

/// Not a test on its own: the pre-receive hook of `checkout_sees_the_pushed_commit_in_quarantine`
/// runs this test binary filtered to this function, with `BERTH_TEST_CHECKOUT_DEST` set.
#[test]
fn hook_helper_checkout_in_quarantine() {
    let Some(dest) = std::env::var_os("BERTH_TEST_CHECKOUT_DEST") else {
        return;
    };
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let new = line.split_whitespace().nth(1).unwrap().to_string();
    let repo = PathBuf::from(std::env::var("GIT_DIR").unwrap());

    let visible_without_quarantine = git2::Repository::open_bare(&repo)
        .unwrap()
        .find_commit(git2::Oid::from_str(&new).unwrap())
        .is_ok();
    println!("-----> visible without quarantine: {visible_without_quarantine}");
    match git::checkout(&repo, &new, Path::new(&dest)) {
        Ok(described) => println!("-----> checked out {described}"),
        Err(e) => println!("-----> checkout failed: {e}"),
    }
    // Refuse the push, so the pushed objects never leave the quarantine.
    std::process::exit(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_sees_the_pushed_commit_in_quarantine() {
    let scripts = tempfile::tempdir().unwrap();
    let dest = scripts.path().join("checkout");
    let helper = std::env::current_exe().unwrap();
    let hook = hook_script(
        scripts.path(),
        &format!(
            "BERTH_TEST_CHECKOUT_DEST='{}' exec '{}' --exact hook_helper_checkout_in_quarantine --nocapture --quiet",
            dest.display(),
            helper.display()
        ),
    );
    let server = TestServer::start(&["hello"], &hook).await;
    let work = work_repo(server.dir.path()).await;
    std::fs::create_dir(work.join("bin")).unwrap();
    std::fs::write(work.join("bin/run"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(work.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let head = commit(&work, "Procfile", "web: bin/run\n").await;

    let output = server.push(&work, &server.key, &server.url("hello")).await;

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("remote: -----> visible without quarantine: false"),
        "{}",
        text(&output)
    );
    let expected = format!("remote: -----> checked out {} change Procfile", &head[..7]);
    assert!(stderr.contains(&expected), "{}", text(&output));
    assert_eq!(
        std::fs::read_to_string(dest.join("Procfile")).unwrap(),
        "web: bin/run\n"
    );
    let mode = std::fs::metadata(dest.join("bin/run"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // The hook refused the push: the commit stayed in quarantine and was thrown away.
    assert!(!output.status.success(), "{}", text(&output));
    assert_eq!(main_ref(&server.repo("hello")), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_wires_input_output_terminal_and_the_exit_status() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;

    // The command is the rest of the line after `--`, as one shell line; its code comes back.
    let output = server.ssh(&server.key, &["run hello -- exit 3"]).await;
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello for laptop: exit 3 (terminal none)\n"
    );

    // Without `--` too: stdin goes in, stdout comes back, stderr apart, end of input passed on.
    let mut command = server.ssh_to(&server.key, &["run hello cat -v 'a b'"]);
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, b"some input\n")
        .await
        .unwrap();
    drop(stdin);
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the run did not end")
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello for laptop: cat -v 'a b' (terminal none)\nsome input\n"
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "end of input\n");

    // A client that asks for a pty (-tt) gets a terminal: 24x80 when its own size is unknown.
    let output = server
        .ssh(&server.key, &["-tt", "run hello -- exit 0"])
        .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("(terminal 24x80)"),
        "{}",
        text(&output)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_client_goes_away_is_abandoned() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let mut command = server.ssh_to(&server.key, &["run hello -- sleepy"]);
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .expect("the run never started")
    .unwrap();
    assert_eq!(line, "hello for laptop: sleepy (terminal none)\n");
    assert!(server.abandoned.lock().unwrap().is_empty());

    child.kill().await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while server.abandoned.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run never saw its client go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*server.abandoned.lock().unwrap(), ["sleepy"]);
    server.stop().await;
}

/// An SSH client that trusts any host key (the server is this test's own).
struct TrustingClient;

impl russh::client::Handler for TrustingClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// The size a client asks its pty to be reaches the run, and so does a window change (sent
/// here with russh's client, as OpenSSH sends one only on its own terminal's SIGWINCH).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_gets_the_pty_size_and_window_changes() {
    let scripts = tempfile::tempdir().unwrap();
    let server = TestServer::start(&["hello"], &hook_script(scripts.path(), ACCEPTING_HOOK)).await;
    let key = russh::keys::load_secret_key(&server.key, None).unwrap();
    let config = Arc::new(russh::client::Config::default());
    let mut session = russh::client::connect(config, ("127.0.0.1", server.port), TrustingClient)
        .await
        .unwrap();
    let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None);
    let auth = session.authenticate_publickey("git", key).await.unwrap();
    assert!(auth.success());
    let mut channel = session.channel_open_session().await.unwrap();
    channel
        .request_pty(true, "xterm", 101, 33, 0, 0, &[])
        .await
        .unwrap();
    channel.exec(true, "run hello -- shell").await.unwrap();
    channel.window_change(120, 40, 0, 0).await.unwrap();
    channel.eof().await.unwrap();
    let (mut shown, mut status) = (String::new(), None);
    while let Some(message) = tokio::time::timeout(DEADLINE, channel.wait())
        .await
        .expect("the run did not end")
    {
        match message {
            russh::ChannelMsg::Data { data } => shown.push_str(&String::from_utf8_lossy(&data)),
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            _ => {}
        }
    }
    assert_eq!(
        shown,
        "hello for laptop: shell (terminal 33x101)\nresized 40x120\n"
    );
    assert_eq!(status, Some(0));
    server.stop().await;
}
