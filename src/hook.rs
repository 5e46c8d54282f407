//! `berth hook pre-receive` and `berth hook post-receive`: run by `git-receive-pack` inside a
//! push (the SSH server sets `BERTH_APP`, `BERTH_KEY_NAME` and `BERTH_PUSH_ID`).
//!
//! pre-receive checks out the pushed main/master commit — only this process can see the pushed
//! objects, which git keeps in quarantine until the hook accepts them — and asks the daemon to
//! build it, start it and check it, streaming the output to the pusher. A non-zero exit rejects
//! the push, so a failed build or check leaves the branch and the live release as they were.
//! post-receive, which git runs only after it has updated the ref, asks the daemon to make the
//! checked release live: code goes live together with its commit, never without it. If git does
//! not update the ref (or the push is cut short), the SSH server tells the daemon the push
//! ended and the checked release is discarded.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context};
use rand::Rng;

use crate::client::Client;
use crate::git;
use crate::service::Deploy;

const DEPLOYED_BRANCHES: &[&str] = &["refs/heads/main", "refs/heads/master"];

/// The new commit of the update of this push that deploys: the first update of main or master
/// that does not delete it (git gives hooks `OLD NEW REFNAME` lines). With `report`, says what
/// happens to the others.
fn deployed_update(report: bool) -> anyhow::Result<Option<String>> {
    let mut deployed = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut fields = line.split_whitespace();
        let (Some(_old), Some(new), Some(refname)) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("git sent an unexpected hook line {line:?}");
        };
        let skipped = if !DEPLOYED_BRANCHES.contains(&refname) {
            "is stored but not deployed (only main or master deploy)"
        } else if new.bytes().all(|b| b == b'0') {
            "deleted; the running release keeps serving"
        } else if deployed.is_some() {
            "is stored but not deployed: a push deploys one branch"
        } else {
            deployed = Some(new.to_string());
            continue;
        };
        if report {
            println!("-----> {refname} {skipped}");
        }
    }
    Ok(deployed)
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: this hook runs inside a push to berth's SSH endpoint")
    })
}

/// pre-receive: build, start and check the pushed commit (not yet live).
pub fn pre_receive(data: &Path) -> anyhow::Result<i32> {
    let app = env("BERTH_APP")?;
    let push = env("BERTH_PUSH_ID")?;
    let repo = std::env::current_dir()?;
    let Some(new) = deployed_update(true)? else {
        return Ok(0);
    };
    let scratch = data
        .join("builds")
        .join(format!("{:016x}", rand::thread_rng().gen::<u64>()));
    let source = scratch.join("src");
    std::fs::create_dir_all(&source)?;
    let description = match git::checkout(&repo, &new, &source) {
        Ok(description) => description,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(err.into());
        }
    };
    println!("-----> Deploying {app} from {description}");
    let deploy = Deploy {
        app,
        source,
        description: format!("Deploy {description}"),
        key: std::env::var("BERTH_KEY_NAME").unwrap_or_default(),
        push,
        commit: new,
    };
    let prepared = call(data, "/pushes", &deploy);
    if !matches!(prepared, Ok(0)) {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    prepared
}

/// post-receive: git has updated the ref; make the checked release live.
pub fn post_receive(data: &Path) -> anyhow::Result<i32> {
    let app = env("BERTH_APP")?;
    let push = env("BERTH_PUSH_ID")?;
    if deployed_update(false)?.is_none() {
        return Ok(0);
    }
    call(
        data,
        &format!("/pushes/{push}/promote"),
        &crate::api::Promote { app },
    )
}

/// Posts `body` to the admin socket's `path`, printing the progress as it comes (git shows it
/// to the pusher); 0 when it succeeded.
fn call(data: &Path, path: &str, body: &impl serde::Serialize) -> anyhow::Result<i32> {
    let client = Client::Socket(crate::paths::Paths::new(data).socket());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use crate::progress::{Line, Progress};
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Line>(256);
        // git shows both to the pusher.
        let printer = async {
            while let Some(line) = rx.recv().await {
                match line {
                    Line::Out(text) => println!("{text}"),
                    Line::Warn(text) => eprintln!("{text}"),
                }
            }
        };
        let call = async move {
            let out = Progress::new(tx);
            let method = hyper::Method::POST;
            let called = client.call_streamed::<serde_json::Value>(method, path, Some(body), &out);
            called.await
        };
        let (called, ()) = tokio::join!(call, printer);
        called?;
        Ok(0)
    })
}
