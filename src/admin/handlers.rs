//! One function per admin request: validates input, calls the store, git or `deploy`, and
//! writes what the user sees. State changes that affect what runs go through `deploy`.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use super::{Out, Request};
use crate::config::{self, Config};
use crate::deploy::{self, container};
use crate::server::Daemon;
use crate::{app, build, git, keys, logs};

pub async fn handle(d: &Daemon, request: Request, out: &Out) -> anyhow::Result<()> {
    match request {
        Request::AppsCreate { name } => apps_create(d, &name, out).await,
        Request::Apps { json } => {
            let apps = d.store.apps().await?;
            if json {
                return print_json(out, &apps).await;
            }
            if apps.is_empty() {
                out.line("No apps yet: create one with `berth apps:create NAME`")
                    .await;
            }
            for a in apps {
                out.line(a.name).await;
            }
            Ok(())
        }
        Request::AppsInfo { name, json } => apps_info(d, &name, json, out).await,
        Request::AppsDestroy { name, force } => apps_destroy(d, &name, force, out).await,
        Request::Config { name, json } => {
            let config = d.store.config(&name).await?;
            if json {
                return print_json(out, &config).await;
            }
            out.line(format!("=== {name} config vars")).await;
            let width = config.keys().map(String::len).max().unwrap_or(0) + 1;
            for (key, value) in &config {
                out.line(format!("{:width$} {value}", format!("{key}:")))
                    .await;
            }
            Ok(())
        }
        Request::ConfigGet { name, key } => {
            let config = d.store.config(&name).await?;
            let value = config.get(&key).with_context(|| {
                format!("{key} is not set for {name} — see `berth config {name}`")
            })?;
            out.line(value).await;
            Ok(())
        }
        Request::ConfigSet {
            name,
            pairs,
            no_restart,
        } => {
            let changes = config::parse_pairs(&pairs)?;
            let mut config = d.store.config(&name).await?;
            let keys: Vec<_> = changes.keys().cloned().collect();
            config.extend(changes);
            let description = format!("Set {} config vars", keys.join(", "));
            apply_config(d, &name, config, &description, !no_restart, out).await
        }
        Request::ConfigUnset {
            name,
            keys,
            no_restart,
        } => {
            let mut config = d.store.config(&name).await?;
            for key in &keys {
                config::validate_key(key)?;
                if config.remove(key).is_none() {
                    out.warn(format!("{key} was not set")).await;
                }
            }
            let description = format!("Unset {} config vars", keys.join(", "));
            apply_config(d, &name, config, &description, !no_restart, out).await
        }
        Request::Keys { json } => {
            let keys = d.store.keys().await?;
            if json {
                return print_json(out, &keys).await;
            }
            if keys.is_empty() {
                out.line("No keys yet: add one with `berth keys:add NAME ~/.ssh/id_ed25519.pub`")
                    .await;
            }
            for k in keys {
                out.line(format!("{}  {}", k.name, k.fingerprint)).await;
            }
            Ok(())
        }
        Request::KeysAdd { name, key } => {
            if name.is_empty()
                || name.len() > 64
                || name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                bail!("invalid key name {name:?}: use up to 64 characters without spaces (e.g. laptop)");
            }
            let parsed = keys::parse(&key)?;
            d.store.add_key(&name, &parsed).await?;
            out.line(format!("Added key {name} ({})", parsed.fingerprint))
                .await;
            Ok(())
        }
        Request::KeysRemove { name } => {
            d.store.remove_key(&name).await?;
            out.line(format!("Removed key {name}")).await;
            Ok(())
        }
        Request::Releases { name, json } => {
            let releases = d.store.releases(&name).await?;
            if json {
                return print_json(out, &releases).await;
            }
            out.line(format!("=== {name} releases")).await;
            for r in releases {
                out.line(format!(
                    "v{:<4} {:<40} {}",
                    r.version, r.description, r.created_at
                ))
                .await;
            }
            Ok(())
        }
        Request::Ps { name, json } => {
            d.store.require_app(&name).await?;
            let containers = d.store.containers(Some(&name)).await?;
            if json {
                return print_json(out, &containers).await;
            }
            if containers.is_empty() {
                out.line(format!("{name} has no running containers")).await;
            }
            for c in containers {
                let state = match container::exit_code(d, &c.id) {
                    None => "up".to_string(),
                    Some(code) => format!("crashed (exit {code})"),
                };
                out.line(format!(
                    "{}.{}: {state}  v{}  {}  {}",
                    c.process_type,
                    c.number,
                    c.release,
                    c.addr(),
                    c.id
                ))
                .await;
            }
            Ok(())
        }
        Request::Logs { name, follow, num } => {
            d.store.require_app(&name).await?;
            logs_command(d, &name, follow, num, out).await
        }
        Request::StackBuild { force } => {
            let (build, run) = build::ensure_stacks(d, force, out).await?;
            out.line(format!(
                "berth/stack-build {build}\nberth/stack-run   {run}"
            ))
            .await;
            Ok(())
        }
        Request::Deploy {
            app,
            source,
            description,
        } => {
            d.store.require_app(&app).await?;
            deploy::deploy_source(d, &app, source, &description, out).await?;
            Ok(())
        }
    }
}

async fn print_json(out: &Out, value: &impl Serialize) -> anyhow::Result<()> {
    out.line(serde_json::to_string_pretty(value)?).await;
    Ok(())
}

async fn apps_create(d: &Daemon, name: &str, out: &Out) -> anyhow::Result<()> {
    app::validate(name)?;
    d.store.create_app(name).await?;
    if let Err(err) = git::create_repo(&d.paths.repos(), name, &d.hook_command) {
        d.store.delete_app(name).await?;
        return Err(err.into());
    }
    out.line(format!("Created {name}. Deploy it with:")).await;
    out.line(format!(
        "  git remote add deploy ssh://git@SERVER:{}/{name}",
        d.ssh_port
    ))
    .await;
    out.line("  git push deploy main").await;
    Ok(())
}

#[derive(Serialize)]
struct AppInfo {
    name: String,
    url: String,
    git_remote: String,
    release: Option<i64>,
    containers: Vec<crate::store::ContainerRow>,
}

async fn apps_info(d: &Daemon, name: &str, json: bool, out: &Out) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    let info = AppInfo {
        name: name.to_string(),
        url: d.app_url(name),
        git_remote: format!("ssh://git@SERVER:{}/{name}", d.ssh_port),
        release: d.store.current_release(name).await?.map(|r| r.version),
        containers: d.store.containers(Some(name)).await?,
    };
    if json {
        return print_json(out, &info).await;
    }
    out.line(format!("=== {name}")).await;
    out.line(format!("URL:        {}", info.url)).await;
    out.line(format!("Git remote: {}", info.git_remote)).await;
    let release = info
        .release
        .map_or("none (push to deploy)".to_string(), |v| format!("v{v}"));
    out.line(format!("Release:    {release}")).await;
    out.line(format!("Containers: {}", info.containers.len()))
        .await;
    Ok(())
}

async fn apps_destroy(d: &Daemon, name: &str, force: bool, out: &Out) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    if !force {
        bail!("destroying {name} deletes its code, config and releases and cannot be undone — run `berth apps:destroy {name} --force`");
    }
    let _guard = d.locks.lock(name).await;
    deploy::stop_app(d, name).await?;
    d.store.delete_app(name).await?;
    git::delete_repo(&d.paths.repos(), name)?;
    let _ = std::fs::remove_dir_all(d.paths.cache(name));
    let _ = std::fs::remove_file(d.paths.log(name));
    out.line(format!("Destroyed {name}")).await;
    Ok(())
}

async fn apply_config(
    d: &Daemon,
    name: &str,
    config: Config,
    description: &str,
    restart: bool,
    out: &Out,
) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    match deploy::change_config(d, name, config, description, restart, out).await? {
        Some(release) => {
            out.line(format!("{description}: {name} is now v{}", release.version))
                .await
        }
        None if restart => {
            out.line(format!(
                "{description}: stored; they apply on the next push"
            ))
            .await
        }
        None => {
            out.line(format!("{description}: stored without restarting"))
                .await
        }
    }
    Ok(())
}

async fn logs_command(
    d: &Daemon,
    name: &str,
    follow: bool,
    num: usize,
    out: &Out,
) -> anyhow::Result<()> {
    let path = d.paths.log(name);
    let mut offset = logs::end(&path);
    for line in logs::tail(&path, num) {
        out.line(line).await;
    }
    while follow && !out.is_closed() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (lines, next) = logs::read_from(&path, offset);
        offset = next;
        for line in lines {
            out.line(line).await;
        }
    }
    Ok(())
}
