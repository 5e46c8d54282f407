//! One function per admin request: validates input, calls the store, git or `deploy`, and
//! writes what the user sees. State changes that affect what runs go through `deploy`.

use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use super::{Handles, Request};
use crate::config;
use crate::deploy::run;
use crate::progress::Progress as Out;
use crate::store::Formation;
use crate::{app, git, keys, limits, logs};

/// Who made a change from the admin socket (root on the server), in `releases`.
const ADMIN: &str = "admin";

pub async fn handle(d: &Handles, request: Request, out: &Out) -> anyhow::Result<()> {
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
            let keys: Vec<_> = changes.keys().cloned().collect();
            let description = format!("Set {} config vars", keys.join(", "));
            apply_config(d, &name, &description, !no_restart, out, |config| {
                config.extend(changes)
            })
            .await
        }
        Request::ConfigUnset {
            name,
            keys,
            no_restart,
        } => {
            let config = d.store.config(&name).await?;
            for key in &keys {
                config::validate_key(key)?;
                if !config.contains_key(key) {
                    out.warn(format!("{key} was not set")).await;
                }
            }
            let description = format!("Unset {} config vars", keys.join(", "));
            apply_config(d, &name, &description, !no_restart, out, |config| {
                keys.iter().for_each(|k| {
                    config.remove(k);
                })
            })
            .await
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
                let by = if r.created_by.is_empty() {
                    String::new()
                } else {
                    format!("  by {}", r.created_by)
                };
                out.line(format!(
                    "v{:<4} {:<10} {:<40} {}{by}",
                    r.version,
                    r.status.as_str(),
                    r.description,
                    r.created_at
                ))
                .await;
                if !r.reason.is_empty() {
                    out.line(format!("      {}", r.reason)).await;
                }
            }
            Ok(())
        }
        Request::Ps { name, json } => {
            d.store.require_app(&name).await?;
            let containers: Vec<PsRow> = d
                .store
                .containers(Some(&name))
                .await?
                .into_iter()
                .map(|c| PsRow {
                    status: d.deployer.container_state(&c),
                    container: c,
                })
                .collect();
            let runs = d.deployer.runs(&name);
            if json {
                let runs = runs.into_iter().map(|run| PsEntry::Run {
                    status: d.deployer.run_status(&run),
                    run,
                });
                let all: Vec<PsEntry> = containers
                    .into_iter()
                    .map(PsEntry::Container)
                    .chain(runs)
                    .collect();
                return print_json(out, &all).await;
            }
            if containers.is_empty() && runs.is_empty() {
                out.line(format!("{name} has no running containers")).await;
            }
            let set = d.store.resources(&name).await?;
            let mut last_type = None;
            for PsRow {
                container: c,
                status,
            } in containers
            {
                if last_type.as_ref() != Some(&c.process_type) {
                    let limits = limits::Limits::for_app(&set, &c.process_type);
                    out.line(format!("=== {} ({})", c.process_type, limits.describe()))
                        .await;
                    last_type = Some(c.process_type.clone());
                }
                let since = chrono::DateTime::parse_from_rfc3339(&c.created_at)
                    .map(|t| format_age(chrono::Utc::now() - t.to_utc()))
                    .unwrap_or_default();
                let oom = if c.last_exit_oom {
                    " (out of memory)"
                } else {
                    ""
                };
                let last_exit = c
                    .last_exit
                    .map(|code| format!(", last exit {code}{oom}"))
                    .unwrap_or_default();
                out.line(format!(
                    "{}.{}: {status} {since}  v{}  restarts {}{last_exit}  {}  {}",
                    c.process_type,
                    c.number,
                    c.release,
                    c.restarts,
                    c.addr(),
                    c.id
                ))
                .await;
            }
            if !runs.is_empty() {
                let limits = limits::Limits::for_app(&set, run::PROCESS_TYPE);
                out.line(format!("=== run: one-off ({})", limits.describe()))
                    .await;
            }
            for run in runs {
                let since = chrono::DateTime::parse_from_rfc3339(&run.created_at)
                    .map(|t| format_age(chrono::Utc::now() - t.to_utc()))
                    .unwrap_or_default();
                out.line(format!(
                    "run.{}: {} {since}  v{}  `{}` (by {})  {}",
                    run.number,
                    d.deployer.run_status(&run),
                    run.release,
                    run.command,
                    run.by,
                    run.id
                ))
                .await;
            }
            Ok(())
        }
        Request::Logs {
            name,
            follow,
            num,
            process_type,
            json,
        } => {
            d.store.require_app(&name).await?;
            let view = LogView { process_type, json };
            logs_command(d, &name, follow, num, &view, out).await
        }
        Request::PsScale { name, pairs } => {
            d.store.require_app(&name).await?;
            let changes = parse_formation(&pairs)?;
            let release = d.deployer.scale(&name, &changes, ADMIN, out).await?;
            out.line(format!(
                "Scaled {name}: {}, now v{}",
                formation_text(&release.formation),
                release.version
            ))
            .await;
            Ok(())
        }
        Request::PsRestart { name, process_type } => {
            d.store.require_app(&name).await?;
            d.deployer
                .restart(&name, process_type.as_deref(), out)
                .await?;
            out.line(format!("Restarted {name}")).await;
            Ok(())
        }
        Request::ReleasesRollback { name, version } => {
            d.store.require_app(&name).await?;
            let version = version
                .map(|v| {
                    v.strip_prefix('v')
                        .unwrap_or(&v)
                        .parse::<i64>()
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "{v:?} is not a release like v3 — see `berth releases {name}`"
                            )
                        })
                })
                .transpose()?;
            let release = d.deployer.rollback(&name, version, ADMIN, out).await?;
            out.line(format!(
                "{}: {name} is now v{}",
                release.description, release.version
            ))
            .await;
            Ok(())
        }
        Request::Domains { name, json } => {
            d.store.require_app(&name).await?;
            let domains = d.store.domains(&name).await?;
            if json {
                return print_json(out, &domains).await;
            }
            out.line(format!("=== {name} domains")).await;
            out.line(format!("{} (default)", d.deployer.app_host(&name)))
                .await;
            for host in domains {
                out.line(host).await;
            }
            Ok(())
        }
        Request::DomainsAdd { name, host } => {
            let host = d.deployer.add_domain(&name, &host).await?;
            d.acme.wake();
            out.line(format!(
                "Added {host} to {name}: http://{host} is served by it"
            ))
            .await;
            Ok(())
        }
        Request::DomainsRemove { name, host } => {
            d.store.require_app(&name).await?;
            d.deployer.remove_domain(&name, &host).await?;
            d.acme.wake();
            out.line(format!("Removed {host} from {name}")).await;
            Ok(())
        }
        Request::Certs { name, json } => {
            d.store.require_app(&name).await?;
            let cert = d.deployer.cert(&name);
            let auto = d.store.acme(Some(&name)).await?.pop();
            let info = CertInfo {
                hosts: d.deployer.cert_hosts(&name).await?,
                expires: cert.as_ref().map(|c| rfc3339(c.not_after())),
                renews: (cert.as_ref())
                    .filter(|_| auto.is_some())
                    .map(|c| rfc3339(c.renew_at())),
                auto,
            };
            if json {
                return print_json(out, &info).await;
            }
            if info.expires.is_none() && info.auto.is_none() {
                out.line(format!(
                    "{name} has no certificate — add one with `berth certs:add {name} CERT KEY` or `berth certs:auto {name}`"
                ))
                .await;
            }
            if let Some(expires) = &info.expires {
                let source = if info.auto.is_some() {
                    "automatic (ACME)"
                } else {
                    "uploaded"
                };
                out.line(format!(
                    "=== {name} certificate: {source}, expires {expires}"
                ))
                .await;
            }
            if let Some(renews) = &info.renews {
                out.line(format!("renewal due {renews}")).await;
            }
            if let Some(error) = info.auto.as_ref().and_then(|a| a.last_error.as_ref()) {
                out.warn(format!("the last ACME order failed: {error}"))
                    .await;
            }
            for host in info.hosts {
                out.line(format!("https://{host}")).await;
            }
            Ok(())
        }
        Request::CertsAdd {
            name,
            chain,
            key,
            redirect_https,
        } => {
            d.store.require_app(&name).await?;
            let row = crate::store::CertRow {
                app: name.clone(),
                chain,
                key,
                redirect_https,
            };
            let hosts = d.acme.manual(&name, d.deployer.add_cert(&row)).await?;
            out.line(format!(
                "Added a certificate to {name}; served over HTTPS for: {}",
                hosts.join(", ")
            ))
            .await;
            Ok(())
        }
        Request::CertsRemove { name } => {
            d.store.require_app(&name).await?;
            d.acme.manual(&name, d.deployer.remove_cert(&name)).await?;
            out.line(format!("Removed the certificate of {name}")).await;
            Ok(())
        }
        Request::Network { name, json } => network(d, &name, json, out).await,
        Request::NetworkSet { name, egress } => network_set(d, &name, egress, out).await,
        Request::Resources { name, json } => {
            d.store.require_app(&name).await?;
            let types = process_types(d, &name).await?;
            let set = d.store.resources(&name).await?;
            let all: Vec<(String, limits::Limits)> = types
                .into_iter()
                .map(|t| {
                    let limits = limits::Limits::for_app(&set, &t);
                    (t, limits)
                })
                .collect();
            if json {
                let all: std::collections::BTreeMap<_, _> = all.into_iter().collect();
                return print_json(out, &all).await;
            }
            out.line(format!("=== {name} resources")).await;
            for (process_type, limits) in all {
                out.line(format!("{process_type}: {}", limits.describe()))
                    .await;
            }
            Ok(())
        }
        Request::ResourcesSet {
            name,
            process_type,
            memory,
            cpus,
            pids,
        } => {
            d.store.require_app(&name).await?;
            let types = process_types(d, &name).await?;
            if !types.contains(&process_type) {
                bail!(
                    "{name} has no process type {process_type:?} — its process types are: {}",
                    types.join(", ")
                );
            }
            if [&memory, &cpus, &pids].iter().all(|v| v.is_none()) {
                bail!("nothing to change — pass --memory, --cpus or --pids (see `berth resources:set --help`)");
            }
            let mut set = d
                .store
                .resources(&name)
                .await?
                .into_iter()
                .find(|r| r.process_type == process_type)
                .unwrap_or_else(|| crate::store::ResourcesRow {
                    process_type: process_type.clone(),
                    ..Default::default()
                });
            let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            change_limit(&mut set.memory, memory, limits::parse_memory, big)?;
            change_limit(&mut set.cpu_millis, cpus, limits::parse_cpus, big)?;
            change_limit(&mut set.pids, pids, limits::parse_pids, |p| p)?;
            d.store.set_resources(&name, &set).await?;
            let limits = limits::Limits::for_app(std::slice::from_ref(&set), &process_type);
            out.line(format!(
                "{name} {process_type}: {} — running containers get it at their next restart: `berth ps:restart {name} {process_type}`",
                limits.describe()
            ))
            .await;
            Ok(())
        }
        Request::Builds { name, json } => {
            d.store.require_app(&name).await?;
            let set = d.store.build_limits(&name).await?;
            show_build_limits(out, &name, &set, json).await
        }
        Request::BuildsSet {
            name,
            memory,
            cpus,
            pids,
            timeout,
        } => {
            d.store.require_app(&name).await?;
            if [&memory, &cpus, &pids, &timeout]
                .iter()
                .all(|v| v.is_none())
            {
                bail!("nothing to change — pass --memory, --cpus, --pids or --timeout (see `berth builds:set --help`)");
            }
            let mut set = d.store.build_limits(&name).await?;
            let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            change_limit(&mut set.memory, memory, limits::parse_memory, big)?;
            change_limit(&mut set.cpu_millis, cpus, limits::parse_cpus, big)?;
            change_limit(&mut set.pids, pids, limits::parse_pids, |p| p)?;
            change_limit(
                &mut set.timeout_secs,
                timeout,
                limits::parse_duration,
                |d| big(d.as_secs()),
            )?;
            d.store.set_build_limits(&name, &set).await?;
            show_build_limits(out, &name, &set, false).await
        }
        Request::CertsAuto {
            name,
            redirect_https,
        } => {
            d.store.require_app(&name).await?;
            let hosts = d.acme.enable(&name, redirect_https, out).await?;
            let renews = d.deployer.cert(&name).map(|c| rfc3339(c.renew_at()));
            out.line(format!(
                "{name} is served over HTTPS with an automatic certificate for: {}; it renews from {}",
                hosts.join(", "),
                renews.unwrap_or_default()
            ))
            .await;
            Ok(())
        }
        Request::ImagesImport { file, name } => {
            let images = d.deployer.builder().images.clone();
            let _writing = images.writing().await;
            let (name, digest) =
                tokio::task::spawn_blocking(move || images.import_archive(&file, name.as_deref()))
                    .await
                    .expect("import task")?;
            out.line(format!("Imported {name}: {digest}")).await;
            Ok(())
        }
        Request::Images { json } => super::images::images(d, json, out).await,
        Request::ImagesExport { image } => super::images::export(d, &image, out).await,
        Request::Gc { json } => super::images::gc(d, json, out).await,
        Request::Info { json } => super::images::info(d, json, out).await,
        Request::StackBuild { force, stack } => {
            let _writing = d.deployer.builder().images.writing().await;
            let stack = crate::build::buildpacks::stack_named(&stack)?;
            let (build, run) = d
                .deployer
                .builder()
                .ensure_stacks(&stack, force, out)
                .await?;
            out.line(format!(
                "{} {build}\n{}   {run}",
                stack.build_tag(),
                stack.run_tag()
            ))
            .await;
            Ok(())
        }
        Request::Deploy {
            app,
            source,
            description,
            key,
            push,
            commit,
        } => {
            d.store.require_app(&app).await?;
            let push = crate::deploy::Push {
                id: &push,
                commit: &commit,
                by: &key,
            };
            d.deployer
                .prepare_push(&app, source, &description, &push, out)
                .await?;
            Ok(())
        }
        Request::Promote { app, push } => {
            d.deployer.promote_push(&app, &push, out).await?;
            Ok(())
        }
        Request::Run { .. } => {
            bail!("`run` is an exchange of its own on the admin socket (see admin::run), not a command — use `berth run APP -- COMMAND`")
        }
    }
}

/// `network APP`: what the app's containers may reach.
async fn network(d: &Handles, name: &str, json: bool, out: &Out) -> anyhow::Result<()> {
    let egress = d.store.egress(name).await?;
    if json {
        return print_json(out, &serde_json::json!({ "egress": egress })).await;
    }
    out.line(format!("=== {name} network")).await;
    out.line(format!("egress: {}", on_off(egress))).await;
    Ok(())
}

/// `network:set APP --egress on|off`: stored, then applied to the running containers at once.
async fn network_set(d: &Handles, name: &str, egress: bool, out: &Out) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    let applied = d.deployer.set_egress(name, egress).await?;
    out.line(format!(
        "{name} egress: {} — applied to its {applied} running container(s) now and to every container it starts",
        on_off(egress)
    ))
    .await;
    Ok(())
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// The process types of `app`'s live release and `run` (the limits of one-off runs), as
/// `resources` lists them (none before its first deploy).
async fn process_types(d: &Handles, app: &str) -> anyhow::Result<Vec<String>> {
    let live = d.store.live_release(app).await?;
    let mut types: Vec<String> = live
        .map(|r| r.process_types.keys().cloned().collect())
        .unwrap_or_default();
    if !types.is_empty() && !types.iter().any(|t| t == run::PROCESS_TYPE) {
        types.push(run::PROCESS_TYPE.to_string());
    }
    Ok(types)
}

/// Applies one `builds:set` value to `field`: `default` clears it; anything else must parse.
fn change_limit<T>(
    field: &mut Option<i64>,
    value: Option<String>,
    parse: impl Fn(&str) -> Result<T, limits::LimitsError>,
    to_i64: impl Fn(T) -> i64,
) -> Result<(), limits::LimitsError> {
    match value.as_deref() {
        None => {}
        Some("default") => *field = None,
        Some(text) => *field = Some(to_i64(parse(text)?)),
    }
    Ok(())
}

/// Prints an app's build limits, marking berth's defaults.
async fn show_build_limits(
    out: &Out,
    name: &str,
    set: &crate::store::BuildLimitsRow,
    json: bool,
) -> anyhow::Result<()> {
    let build = limits::BuildLimits::with(set);
    let applied = build.limits;
    if json {
        return print_json(
            out,
            &serde_json::json!({
                "memory": applied.memory,
                "cpu_millis": applied.cpu_millis,
                "pids": applied.pids,
                "timeout_secs": build.timeout.as_secs(),
            }),
        )
        .await;
    }
    let mark = |set: Option<i64>| if set.is_some() { "" } else { " (default)" };
    out.line(format!("=== {name} build limits")).await;
    for (what, value, set) in [
        ("memory", limits::format_memory(applied.memory), set.memory),
        (
            "cpus",
            limits::format_cpus(applied.cpu_millis),
            set.cpu_millis,
        ),
        ("pids", applied.pids.to_string(), set.pids),
        (
            "timeout",
            humantime::format_duration(build.timeout).to_string(),
            set.timeout_secs,
        ),
    ] {
        out.line(format!("{what:<8} {value}{}", mark(set))).await;
    }
    Ok(())
}

/// What `certs` shows.
#[derive(Serialize)]
struct CertInfo {
    /// The app's hosts the certificate covers.
    hosts: Vec<String>,
    expires: Option<String>,
    /// When an automatic certificate is renewed.
    renews: Option<String>,
    /// Set when certificates are automatic.
    auto: Option<crate::store::AcmeRow>,
}

fn rfc3339(time: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub(super) async fn print_json(out: &Out, value: &impl Serialize) -> anyhow::Result<()> {
    out.line(serde_json::to_string_pretty(value)?).await;
    Ok(())
}

async fn apps_create(d: &Handles, name: &str, out: &Out) -> anyhow::Result<()> {
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

async fn apps_info(d: &Handles, name: &str, json: bool, out: &Out) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    let info = AppInfo {
        name: name.to_string(),
        url: d.deployer.app_url(name),
        git_remote: format!("ssh://git@SERVER:{}/{name}", d.ssh_port),
        release: d.store.live_release(name).await?.map(|r| r.version),
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

async fn apps_destroy(d: &Handles, name: &str, force: bool, out: &Out) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    if !force {
        bail!("destroying {name} deletes its code, config and releases and cannot be undone — run `berth apps:destroy {name} --force`");
    }
    d.deployer.destroy_app(name).await?;
    git::delete_repo(&d.paths.repos(), name)?;
    let _ = std::fs::remove_dir_all(d.paths.cache(name));
    let _ = std::fs::remove_file(d.paths.log(name));
    // Its images and dependency layers, in the background.
    d.deployer.collect_later();
    out.line(format!("Destroyed {name}")).await;
    Ok(())
}

async fn apply_config(
    d: &Handles,
    name: &str,
    description: &str,
    restart: bool,
    out: &Out,
    edit: impl FnOnce(&mut config::Config),
) -> anyhow::Result<()> {
    d.store.require_app(name).await?;
    match d
        .deployer
        .change_config(name, description, restart, ADMIN, out, edit)
        .await?
    {
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

/// Which log lines `logs` shows, and how.
struct LogView {
    process_type: Option<String>,
    json: bool,
}

impl LogView {
    fn keep(&self, line: &str) -> bool {
        self.process_type
            .as_deref()
            .is_none_or(|kind| logs::Line::parse(line).is_some_and(|line| line.is_of_type(kind)))
    }

    fn render(&self, line: String) -> String {
        if !self.json {
            return line;
        }
        let parsed = logs::Line::parse(&line).unwrap_or(logs::Line {
            time: "",
            source: "",
            process: "",
            text: &line,
        });
        serde_json::to_string(&parsed).expect("a log line serializes")
    }
}

async fn logs_command(
    d: &Handles,
    name: &str,
    follow: bool,
    num: usize,
    view: &LogView,
    out: &Out,
) -> anyhow::Result<()> {
    let path = d.paths.log(name);
    let mut offset = logs::end(&path);
    for line in logs::tail_where(&path, num, |l| view.keep(l)) {
        out.line(view.render(line)).await;
    }
    // Woken by inotify as lines arrive; the timeout only notices a client that went away.
    let mut watch = if follow {
        Some(logs::watch(&path).context("cannot watch the app's log")?)
    } else {
        None
    };
    while let Some((_, woken)) = watch.as_mut().filter(|_| !out.is_closed()) {
        let _ = tokio::time::timeout(Duration::from_secs(1), woken.recv()).await;
        let (lines, next) = logs::read_from(&path, offset);
        offset = next;
        for line in lines.into_iter().filter(|l| view.keep(l)) {
            out.line(view.render(line)).await;
        }
    }
    Ok(())
}

/// A container as `ps --json` shows it: its record and its state now.
#[derive(Serialize)]
struct PsRow {
    #[serde(flatten)]
    container: crate::store::ContainerRow,
    status: String,
}

/// One line of `ps --json`: a container of the formation, or a one-off run (with its command).
#[derive(Serialize)]
#[serde(untagged)]
enum PsEntry {
    Container(PsRow),
    Run {
        #[serde(flatten)]
        run: run::RunRow,
        status: &'static str,
    },
}

/// `web=2 worker=1` → a formation; refuses malformed pairs.
fn parse_formation(pairs: &[String]) -> anyhow::Result<Formation> {
    pairs
        .iter()
        .map(|pair| {
            let parsed = pair
                .split_once('=')
                .and_then(|(t, n)| Some((t.to_string(), n.parse::<u32>().ok()?)))
                .filter(|(t, _)| !t.is_empty());
            parsed.with_context(|| {
                format!(
                    "{pair:?} is not TYPE=COUNT — scale like: berth ps:scale APP web=2 worker=1"
                )
            })
        })
        .collect()
}

fn formation_text(formation: &Formation) -> String {
    formation
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "5s", "3m", "2h", "4d": how long ago.
fn format_age(age: chrono::TimeDelta) -> String {
    let secs = age.num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formations_parse() {
        let ok = parse_formation(&["web=3".into(), "worker=0".into()]).unwrap();
        assert_eq!(
            ok,
            [("web".to_string(), 3), ("worker".to_string(), 0)].into()
        );
        for bad in ["web", "=2", "web=-1", "web=two", "web=1.5"] {
            assert!(parse_formation(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn ages() {
        let cases = [
            (5, "5s"),
            (61, "1m"),
            (7200, "2h"),
            (200_000, "2d"),
            (-3, "0s"),
        ];
        for (secs, want) in cases {
            assert_eq!(format_age(chrono::TimeDelta::seconds(secs)), want);
        }
    }
}
