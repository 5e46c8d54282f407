//! `berth hook pre-receive`: run by `git-receive-pack` inside a push (the SSH server sets
//! `BERTH_APP`). Checks out each pushed main/master commit — only this process can see the
//! pushed objects, which git keeps in quarantine until the hook accepts them — and asks the
//! daemon to build and deploy it, streaming the output to the pusher. A non-zero exit rejects
//! the push, so a failed build or start leaves the branch and the running release as they were.

use std::io::BufRead;
use std::path::Path;

use anyhow::{bail, Context};
use rand::Rng;

use crate::admin::{client, Request};
use crate::git;

const DEPLOYED_BRANCHES: &[&str] = &["refs/heads/main", "refs/heads/master"];

pub fn pre_receive(data: &Path) -> anyhow::Result<i32> {
    let app = std::env::var("BERTH_APP")
        .context("BERTH_APP is not set: this hook runs inside a push to berth's SSH endpoint")?;
    let repo = std::env::current_dir()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut fields = line.split_whitespace();
        let (Some(_old), Some(new), Some(refname)) = (fields.next(), fields.next(), fields.next())
        else {
            bail!("git sent an unexpected hook line {line:?}");
        };
        if !DEPLOYED_BRANCHES.contains(&refname) {
            println!("-----> {refname} is stored but not deployed (only main or master deploy)");
            continue;
        }
        if new.bytes().all(|b| b == b'0') {
            println!("-----> {refname} deleted; the running release keeps serving");
            continue;
        }
        let scratch = data
            .join("builds")
            .join(format!("{:016x}", rand::thread_rng().gen::<u64>()));
        let source = scratch.join("src");
        std::fs::create_dir_all(&source)?;
        let description = match git::checkout(&repo, new, &source) {
            Ok(description) => description,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(err.into());
            }
        };
        println!("-----> Deploying {app} from {description}");
        let deployed = client::call(
            data,
            Request::Deploy {
                app: app.clone(),
                source,
                description: format!("Deploy {description}"),
                key: std::env::var("BERTH_KEY_NAME").unwrap_or_default(),
            },
        );
        if !matches!(deployed, Ok(0)) {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        let code = deployed?;
        if code != 0 {
            return Ok(code);
        }
    }
    Ok(0)
}
