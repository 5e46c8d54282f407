//! The stack images buildpacks build on and apps run on, made by berth itself (no registry):
//! `mmdebstrap --variant=minbase SUITE` from the host's own apt mirror (its Debian sources with
//! the suite swapped), packed as one OCI layer each and tagged in the [`ImageStore`] as
//! `berth/stack-build:SUITE` and `berth/stack-run:SUITE`.
//!
//! - build: what builds run in: Python (venv, headers), Node.js with npm, Go, a C toolchain
//!   (build-essential) for packages without wheels, git (buildpacks by git URL).
//! - run: what apps run on, lean: Python and the Node.js runtime — the same Debian python at the
//!   same path, so a venv built at `/app/.venv` on the build stack runs here.
//!
//! [`STACKS`] are Debian's current stable (`trixie`, the default) and the previous one
//! (`bookworm`); [`pick`] chooses one for the runtime versions an app asks for. Both images of
//! a stack are built concurrently (two mmdebstrap runs), which takes about as long as the build
//! image alone. Owns only the stack tags; must not touch mounts or containers itself
//! (mmdebstrap does its own chroot work).

use super::{ImageConfig, ImageError, ImageStore};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

pub const STACK_BUILD: &str = "berth/stack-build";
pub const STACK_RUN: &str = "berth/stack-run";

/// A Debian suite berth builds stacks from, and the language versions its packages have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stack {
    pub suite: &'static str,
    /// `major.minor`, as Debian's `python3` of that suite.
    pub python: &'static str,
    /// The major version of Debian's `nodejs`.
    pub node: &'static str,
    /// `major.minor` of Debian's `golang-go`.
    pub go: &'static str,
}

/// The stacks, the default (Debian's current stable) first.
pub const STACKS: &[Stack] = &[
    Stack {
        suite: "trixie",
        python: "3.13",
        node: "20",
        go: "1.24",
    },
    Stack {
        suite: "bookworm",
        python: "3.11",
        node: "18",
        go: "1.19",
    },
];

const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// Debian codenames that may appear in the host's sources (they are swapped for the stack's).
const CODENAMES: &[&str] = &["bullseye", "bookworm", "trixie", "forky"];
const RUN_PACKAGES: &str = "python3,ca-certificates,nodejs";
const BUILD_PACKAGES: &str = "python3,python3-venv,python3-dev,build-essential,pkg-config,nodejs,npm,golang-go,git,ca-certificates";

impl Stack {
    /// The stack of a suite name (`BERTH_STACK`).
    pub fn named(name: &str) -> Option<Stack> {
        STACKS.iter().copied().find(|s| s.suite == name)
    }

    pub fn build_tag(&self) -> String {
        format!("{STACK_BUILD}:{}", self.suite)
    }

    pub fn run_tag(&self) -> String {
        format!("{STACK_RUN}:{}", self.suite)
    }

    /// Names what goes into this stack's images (suite and packages): a different recipe
    /// gives different images. Test suites key their shared stack images by it.
    pub fn recipe(&self) -> String {
        use sha2::{Digest, Sha256};
        let recipe = format!(
            "{}\n{BUILD_PACKAGES}\n{RUN_PACKAGES}\n{}",
            self.suite, CUSTOMIZE_HOOK
        );
        format!(
            "{}-{}",
            self.suite,
            &hex::encode(Sha256::digest(recipe))[..12]
        )
    }
}

/// A language version an app asks for (`.python-version`, `engines.node`, go.mod's `go`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    Python(String),
    Node(String),
    Go(String),
}

impl Wanted {
    fn offered_by(&self, stack: &Stack) -> bool {
        // `3.12` matches `3.12` and `3.12.4`; Node by major version.
        let matches =
            |want: &str, have: &str| want == have || want.starts_with(&format!("{have}."));
        match self {
            Wanted::Python(v) => matches(v, stack.python),
            Wanted::Node(v) => matches(v, stack.node),
            Wanted::Go(v) => matches(v, stack.go),
        }
    }
}

impl std::fmt::Display for Wanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wanted::Python(v) => write!(f, "Python {v}"),
            Wanted::Node(v) => write!(f, "Node.js {v}"),
            Wanted::Go(v) => write!(f, "Go {v}"),
        }
    }
}

/// The stack for what an app asks for: the default, unless only another stack offers the
/// version it wants. Returns a line for the pusher when the choice is not the default's.
pub fn pick(wanted: &[Wanted]) -> (Stack, Option<String>) {
    let default = STACKS[0];
    for want in wanted {
        if want.offered_by(&default) {
            continue;
        }
        if let Some(other) = STACKS.iter().find(|s| want.offered_by(s)) {
            return (
                *other,
                Some(format!("{want} requested: using the {} stack", other.suite)),
            );
        }
    }
    (default, None)
}

/// Empty files the runtime bind-mounts over; /app for the app; a sticky /tmp.
const CUSTOMIZE_HOOK: &str = "rm -f \"$1/etc/resolv.conf\" \"$1/etc/hosts\" && \
     : > \"$1/etc/resolv.conf\" && : > \"$1/etc/hosts\" && \
     mkdir -p \"$1/app\" \"$1/tmp\" && chmod 1777 \"$1/tmp\"";
/// mmdebstrap lines kept for an error message.
const LOG_TAIL_LINES: usize = 25;

/// Whether an mmdebstrap line is shown to the pusher: milestones, warnings and errors. The
/// rest goes to the server log (and to the error message if the build fails).
fn worth_showing(line: &str) -> bool {
    const MILESTONES: &[&str] = &[
        "I: downloading packages",
        "I: installing remaining",
        "I: success",
    ];
    !line.starts_with("I: ") || MILESTONES.iter().any(|m| line.starts_with(m))
}

/// The environment both stacks start processes with.
fn stack_env() -> Vec<String> {
    vec![
        berth_runtime::spec::DEFAULT_PATH.to_string(),
        "LANG=C.UTF-8".to_string(),
    ]
}

/// Makes sure both stack images exist (all of them again if `force`) and returns
/// `(build digest, run digest)`. Progress and mmdebstrap's own output go to `progress`.
pub fn ensure_stacks(
    store: &ImageStore,
    stack: &Stack,
    force: bool,
    progress: &mut dyn FnMut(&str),
) -> Result<(String, String), ImageError> {
    let present = |name: &str| {
        store
            .resolve(name)
            .filter(|digest| store.image(digest).is_ok())
    };
    let mut todo = Vec::new();
    let (build, run) = (stack.build_tag(), stack.run_tag());
    for (name, packages) in [(&build, BUILD_PACKAGES), (&run, RUN_PACKAGES)] {
        if force || present(name).is_none() {
            todo.push((name.as_str(), packages));
        }
    }
    if !todo.is_empty() {
        build_stacks(store, stack.suite, &todo, progress)?;
    }
    let digest = |name: &str| {
        present(name).ok_or_else(|| ImageError::NotFound {
            what: name.to_string(),
        })
    };
    let (build, run) = (digest(&build)?, digest(&run)?);
    // The default stack also answers to the bare names (a Dockerfile's `FROM berth/stack-run`).
    if stack.suite == STACKS[0].suite {
        for (bare, digest) in [(STACK_BUILD, &build), (STACK_RUN, &run)] {
            if store.resolve(bare).as_ref() != Some(digest) {
                store.tag(bare, digest)?;
            }
        }
    }
    Ok((build, run))
}

/// Runs one mmdebstrap per image concurrently, then imports and tags each.
fn build_stacks(
    store: &ImageStore,
    suite: &str,
    todo: &[(&str, &str)],
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    if which("mmdebstrap").is_none() {
        return Err(ImageError::MissingTool {
            tool: "mmdebstrap",
            package: "mmdebstrap",
        });
    }
    let sources = host_sources(suite);
    let mirror = sources[0]
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let names: Vec<&str> = todo.iter().map(|(name, _)| *name).collect();
    progress(&format!(
        "Building {} with mmdebstrap from {mirror} (1 to 3 min, once)",
        names.join(" and ")
    ));

    struct Run {
        name: String,
        tar: PathBuf,
        child: std::process::Child,
        tail: VecDeque<String>,
        started: Instant,
    }
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    let mut runs = Vec::new();
    for (i, (name, packages)) in todo.iter().enumerate() {
        let tar = store.tmp_path("stack.tar");
        let mut child = mmdebstrap_command(suite, packages, &tar, &sources)
            .spawn()
            .map_err(|source| ImageError::Io {
                action: "starting mmdebstrap for",
                path: tar.clone(),
                source,
            })?;
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send((i, line));
                }
            });
        }
        runs.push(Run {
            name: name.to_string(),
            tar,
            child,
            tail: VecDeque::new(),
            started: Instant::now(),
        });
    }
    drop(tx);
    // Ends when every output pipe is closed, i.e. both mmdebstraps are done.
    for (i, line) in rx {
        let short = runs[i].name.trim_start_matches("berth/stack-").to_string();
        if worth_showing(&line) {
            progress(&format!("[{short}] {line}"));
        } else {
            tracing::debug!(stack = %short, "{line}");
        }
        let tail = &mut runs[i].tail;
        tail.push_back(line);
        if tail.len() > LOG_TAIL_LINES {
            tail.pop_front();
        }
    }

    let mut failure = None;
    let mut built = Vec::new();
    for run in &mut runs {
        let status = run.child.wait().map_err(|source| ImageError::Io {
            action: "waiting for mmdebstrap for",
            path: run.tar.clone(),
            source,
        })?;
        let secs = run.started.elapsed().as_secs_f64();
        if status.success() {
            built.push((run.name.clone(), run.tar.clone(), secs));
        } else if failure.is_none() {
            failure = Some(ImageError::StackBuild {
                image: run.name.clone(),
                reason: format!("mmdebstrap exited with {status} after {secs:.1} s"),
                mirror: mirror.clone(),
                log_tail: Vec::from(run.tail.clone()).join("\n"),
            });
        }
    }
    if let Some(err) = failure {
        for run in &runs {
            let _ = std::fs::remove_file(&run.tar);
        }
        return Err(err);
    }

    for (name, tar, secs) in built {
        let size = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
        let imported = store.import_layer_tar(&tar);
        let _ = std::fs::remove_file(&tar);
        let layer = imported?;
        let config = ImageConfig {
            env: stack_env(),
            working_dir: "/app".to_string(),
            cmd: Vec::new(),
            ..ImageConfig::default()
        };
        let digest = store.put_image(&[layer], &config)?;
        store.tag(&name, &digest)?;
        progress(&format!(
            "Built {name} in {secs:.1} s ({} MB): {digest}",
            size / 1_000_000
        ));
    }
    Ok(())
}

fn mmdebstrap_command(suite: &str, packages: &str, tar: &Path, sources: &[String]) -> Command {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={packages}"))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        // Like Debian's slim images: no docs, man pages or translations.
        .arg("--dpkgopt=path-exclude=/usr/share/doc/*")
        .arg("--dpkgopt=path-include=/usr/share/doc/*/copyright")
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/info/*")
        .arg("--dpkgopt=path-exclude=/usr/share/locale/*")
        .arg(format!("--customize-hook={CUSTOMIZE_HOOK}"))
        .arg(suite)
        .arg(tar)
        .args(sources)
        // Without mirrors on the command line mmdebstrap would read sources from stdin.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// The host's Debian apt sources as one-line `deb URI SUITE COMPONENTS…` entries for `suite`
/// (each Debian codename swapped for it: a bookworm host's `bookworm-security` entry gives
/// `trixie-security`), read from `/etc/apt/sources.list` and
/// `/etc/apt/sources.list.d/*.{list,sources}`; never empty.
fn host_sources(suite: &str) -> Vec<String> {
    let mut sources: Vec<String> = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let found = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => parse_deb822(&text, suite),
            Some("list") => parse_one_line(&text, suite),
            _ => continue,
        };
        for entry in found {
            if !sources.contains(&entry) {
                sources.push(entry);
            }
        }
    }
    if sources.is_empty() {
        sources.push(format!("deb {FALLBACK_MIRROR} {suite} main"));
    }
    sources
}

/// `host_suite` (`bookworm`, `bookworm-updates`, …) with its Debian codename swapped for
/// `suite`; `None` for suites of other distributions.
fn swap_suite(host_suite: &str, suite: &str) -> Option<String> {
    CODENAMES.iter().find_map(|codename| {
        let rest = host_suite.strip_prefix(codename)?;
        (rest.is_empty() || rest.starts_with('-') || rest.starts_with('/'))
            .then(|| format!("{suite}{rest}"))
    })
}

/// `deb [options] URI SUITE COMPONENTS…` lines (sources.list format).
fn parse_one_line(text: &str, suite: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(opts) => opts.split_once(']').map(|(_, r)| r).unwrap_or(""),
            None => rest,
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        if let Some(swapped) = swap_suite(fields[1], suite) {
            let components = fields[2..].join(" ");
            out.push(format!("deb {} {swapped} {components}", fields[0]));
        }
    }
    out
}

/// deb822 `.sources` stanzas (Types/URIs/Suites/Components/Enabled).
fn parse_deb822(text: &str, suite: &str) -> Vec<String> {
    let mut out = Vec::new();
    let stanzas = text.split("\n\n").filter(|s| !s.trim().is_empty());
    for stanza in stanzas {
        let field = |key: &str| -> Vec<String> {
            stanza
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
                .map(|(_, v)| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        if !field("Types").iter().any(|t| t == "deb")
            || field("Enabled")
                .iter()
                .any(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        let components = field("Components").join(" ");
        for uri in field("URIs") {
            for host_suite in field("Suites") {
                match swap_suite(&host_suite, suite) {
                    Some(swapped) if !components.is_empty() => {
                        out.push(format!("deb {uri} {swapped} {components}"))
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_milestones_warnings_and_errors_only() {
        for (line, shown) in [
            ("I: downloading packages with apt...", true),
            ("I: success in 31.2 seconds", true),
            ("W: something looks off", true),
            ("E: apt-get update failed", true),
            (
                "Err:1 http://deb.debian.org/debian bookworm InRelease",
                true,
            ),
            (
                "I: chroot architecture amd64 is equal to the host's architecture",
                false,
            ),
            ("I: using /tmp/mmdebstrap.x as tempdir", false),
        ] {
            assert_eq!(worth_showing(line), shown, "{line}");
        }
    }

    #[test]
    fn reads_debian_sources_in_both_formats_for_another_suite() {
        let cases: &[(&str, bool, &str, &[&str])] = &[
            (
                "deb822 with comments, two stanzas",
                true,
                "Types: deb\n# snapshot\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n",
                &[
                    "deb http://deb.debian.org/debian trixie main",
                    "deb http://deb.debian.org/debian trixie-updates main",
                    "deb http://deb.debian.org/debian-security trixie-security main",
                ],
            ),
            (
                "deb822 other distro and deb-src skipped",
                true,
                "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n\nTypes: deb-src\nURIs: http://m/debian\nSuites: bookworm\nComponents: main\n",
                &[],
            ),
            (
                "deb822 disabled",
                true,
                "Types: deb\nURIs: http://m/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n",
                &[],
            ),
            (
                "one-line with options and a comment",
                false,
                "# mirror\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib # x\ndeb-src http://m/debian bookworm main\ndeb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
                &["deb http://m/debian trixie main contrib"],
            ),
        ];
        for (what, deb822, text, want) in cases {
            let got = if *deb822 {
                parse_deb822(text, "trixie")
            } else {
                parse_one_line(text, "trixie")
            };
            assert_eq!(got, *want, "{what}");
        }
    }

    #[test]
    fn picks_the_stack_that_has_the_wanted_version() {
        use Wanted::*;
        let cases: &[(&[Wanted], &str, bool)] = &[
            (&[], "trixie", false),
            (&[Python("3.13".into())], "trixie", false),
            (&[Python("3.13.2".into())], "trixie", false),
            (&[Python("3.11".into())], "bookworm", true),
            (&[Node("18".into())], "bookworm", true),
            (&[Go("1.24".into()), Node("20".into())], "trixie", false),
            // Nobody has it: the default, and the buildpack says which version it uses.
            (&[Python("3.12".into())], "trixie", false),
            (&[Python("3.1".into())], "trixie", false),
        ];
        for (wanted, suite, noted) in cases {
            let (stack, note) = pick(wanted);
            assert_eq!(
                (stack.suite, note.is_some()),
                (*suite, *noted),
                "{wanted:?}"
            );
        }
        assert_eq!(Stack::named("bookworm").map(|s| s.python), Some("3.11"));
        assert_eq!(Stack::named("sid"), None);
    }
}
