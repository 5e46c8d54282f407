//! `berth server`: opens the store, the image store and the network, binds the proxy, SSH and
//! admin listeners, starts the deployer (which re-adopts running containers and converges), and
//! shuts down cleanly on SIGTERM/SIGINT. Owns the wiring: it hands each part the handles it
//! needs and owns no domain logic.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::future::BoxFuture;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::build::Builder;
use crate::cli::ServerArgs;
use crate::client::Client;
use crate::deploy::{Deployer, DeployerParts};
use crate::image::ImageStore;
use crate::network::Network;
use crate::paths::Paths;
use crate::proxy::Routes;
use crate::service::{Kind, Service};
use crate::store::Store;
use crate::tls::Certs;
use crate::{api, build, dashboard, dns, ssh};

/// Lets the SSH server ask the service who a key belongs to and what they may do, tell the
/// deployer a push ended, and run one-off commands and berth commands for the key's owner.
struct Gate {
    service: Arc<Service>,
    deployer: Arc<Deployer>,
    /// The API's routes, for berth commands (`client::Client::local`).
    api: axum::Router,
}

impl ssh::Gate for Gate {
    fn key_owner(&self, openssh_key: String) -> BoxFuture<'static, Option<(String, String)>> {
        let service = self.service.clone();
        Box::pin(async move {
            let (name, caller) = service.key_owner(&openssh_key).await?;
            Some((name, caller.user))
        })
    }

    fn may_push(&self, user: String, app: String) -> BoxFuture<'static, Result<(), String>> {
        let service = self.service.clone();
        Box::pin(async move {
            let caller = service.caller(&user).await.map_err(|e| e.to_string())?;
            service
                .app(&caller, &app)
                .await
                .map_err(|err| match err.kind {
                    Kind::NotFound => format!(
                    "app {app:?} does not exist — create it first with: berth apps:create {app}"
                ),
                    _ => err.to_string(),
                })
        })
    }

    fn push_ended(&self, push: String) -> BoxFuture<'static, ()> {
        let deployer = self.deployer.clone();
        Box::pin(async move { deployer.push_ended(&push).await })
    }

    fn run(
        &self,
        app: String,
        command: String,
        user: String,
        attach: crate::attach::Attach,
    ) -> BoxFuture<'static, Result<i32, String>> {
        let service = self.service.clone();
        Box::pin(async move {
            let caller = service.caller(&user).await.map_err(|e| e.to_string())?;
            let ran = service.run(&caller, &app, &command, attach).await;
            ran.map_err(|err| err.to_string())
        })
    }

    fn command(
        &self,
        user: String,
        words: Vec<String>,
        out: tokio::sync::mpsc::Sender<(bool, Vec<u8>)>,
    ) -> BoxFuture<'static, i32> {
        let (service, api) = (self.service.clone(), self.api.clone());
        Box::pin(async move {
            let caller = match service.caller(&user).await {
                Ok(caller) => caller,
                Err(err) => {
                    let _ = out
                        .send((true, format!("error: {err}\n").into_bytes()))
                        .await;
                    return 1;
                }
            };
            crate::client::commands::over_ssh(Client::local(api, caller), words, out).await
        })
    }
}

/// Parses "A.B.0.0/16" into the gateway (A.B.0.1) and prefix length.
fn parse_subnet(subnet: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let hint = || format!("--subnet {subnet:?} is not a private IPv4 subnet like 10.219.0.0/16");
    let (addr, len) = subnet.split_once('/').with_context(hint)?;
    let addr: Ipv4Addr = addr.parse().with_context(hint)?;
    let len: u8 = len.parse().with_context(hint)?;
    if !addr.is_private() || !(8..=24).contains(&len) {
        bail!("{} (prefix between /8 and /24)", hint());
    }
    let base = u32::from(addr) & (u32::MAX << (32 - len));
    Ok((Ipv4Addr::from(base + 1), len))
}

/// Runs the server until SIGTERM or SIGINT; returns the exit code.
pub fn main(data: PathBuf, args: ServerArgs) -> anyhow::Result<i32> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "berth=info,berth_runtime=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("berth server must run as root (it creates namespaces, mounts and network links) — run it with sudo");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(serve(data, args))?;
    Ok(0)
}

async fn serve(data: PathBuf, args: ServerArgs) -> anyhow::Result<()> {
    let paths = Paths::new(&data);
    paths
        .create()
        .with_context(|| format!("cannot create the data directory {}", data.display()))?;
    let socket = paths.socket();
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!(
            "another berth server is already running on {} — stop it first",
            data.display()
        );
    }
    let _ = std::fs::remove_file(&socket);

    let (gateway, prefix) = parse_subnet(&args.subnet)?;
    let dns_upstreams = args.dns.as_deref().map(dns::parse_upstreams).transpose()?;
    let store = Store::open(&paths.database()).await?;
    let images = Arc::new(ImageStore::open(&paths.images())?);
    build::buildpacks::install(&paths.buildpacks())?;
    berth_runtime::network::ensure_bridge(&args.bridge, gateway, prefix)
        .await
        .with_context(|| format!("cannot set up the container bridge {}", args.bridge))?;
    berth_runtime::firewall::ensure(&args.bridge, gateway, prefix)
        .with_context(|| format!("cannot set up the firewall of bridge {}", args.bridge))?;
    // Before any container starts: each one binds the resolv.conf naming the stub.
    let host_resolv = dns::HostResolvConf::read(Path::new(dns::HOST_RESOLV_CONF))?;
    let upstreams = dns_upstreams.unwrap_or_else(|| host_resolv.upstreams());
    dns::write_resolv_conf(&paths.resolv_conf(), gateway, &host_resolv)?;
    let dns_stub = dns::Forwarder::bind(
        (gateway, dns::PORT).into(),
        upstreams,
        dns::Limits::default(),
    )
    .await?;

    let http = TcpListener::bind(&args.http).await.with_context(|| {
        format!(
            "cannot listen for HTTP on {} — is the port free?",
            args.http
        )
    })?;
    let ssh_listener = TcpListener::bind(&args.ssh)
        .await
        .with_context(|| format!("cannot listen for SSH on {} — is the port free?", args.ssh))?;
    let api_listener = TcpListener::bind(&args.api).await.with_context(|| {
        format!(
            "cannot listen for the API on {} — is the port free?",
            args.api
        )
    })?;
    let (http_addr, ssh_addr) = (http.local_addr()?, ssh_listener.local_addr()?);
    let api_addr = api_listener.local_addr()?;
    let https =
        match &args.https {
            Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen for HTTPS on {addr} — is the port free?")
            })?),
            None => None,
        };
    let https_addr = https.as_ref().map(TcpListener::local_addr).transpose()?;

    let exe = std::env::current_exe().context("cannot find the berth binary")?;
    let build_ca_bundle = Some(PathBuf::from(&args.build_ca_bundle))
        .filter(|p| !args.build_ca_bundle.is_empty() && p.is_file());
    let runtime = Arc::new(berth_runtime::Runtime::new(paths.containers(), exe.clone()));
    let network = Arc::new(Network::new(
        args.bridge.clone(),
        gateway,
        prefix,
        paths.netns(),
        paths.resolv_conf(),
    ));
    let routes = Arc::new(Routes::default());
    let certs = Arc::new(Certs::default());
    let deployer = Deployer::new(DeployerParts {
        store: store.clone(),
        images: images.clone(),
        runtime: runtime.clone(),
        routes: routes.clone(),
        certs: certs.clone(),
        https_port: https_addr.map(|addr| addr.port()),
        network: network.clone(),
        builder: Builder {
            images,
            runtime,
            network,
            paths: paths.clone(),
            ca_bundle: build_ca_bundle,
            allow_loopback_registries: args.allow_loopback_registries,
        },
        paths: paths.clone(),
        domain: args.domain.clone(),
        keep_releases: args.keep_releases.into(),
    });
    let shutdown = CancellationToken::new();
    let supervisor = deployer.run(shutdown.clone()).await?;
    // No build runs before the admin socket is up: scratch left in builds/ is from builds cut
    // short by a crash.
    paths.clear_builds()?;
    let admin_listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot create the admin socket {}", socket.display()))?;
    set_mode(&socket, 0o600)?;

    let ssh_config = ssh::SshConfig {
        host_key: paths.host_key(),
        repos_dir: paths.repos(),
    };
    ssh::load_or_create_host_key(&ssh_config.host_key)?;
    let hook_command = format!(
        "{} --data {} hook",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&data.to_string_lossy())
    );
    // Repos made by an older berth, or before the binary moved, get the current hooks.
    for app in store.apps().await? {
        crate::git::create_repo(&paths.repos(), &app.name, &hook_command)?;
    }
    let acme = crate::acme::Acme::new(
        crate::acme::AcmeConfig {
            directory: args.acme_directory.clone(),
            email: args.acme_email.clone(),
            ca: args.acme_ca.clone(),
        },
        paths.acme_account(),
        store.clone(),
        deployer.clone(),
        routes.clone(),
    );
    let service = Arc::new(Service {
        store: store.clone(),
        deployer: deployer.clone(),
        acme: acme.clone(),
        hook_command,
        ssh_port: ssh_addr.port(),
        paths,
    });
    let apis = api::Apps::new(service.clone());
    // The API at berth.<domain> through the proxy, too (app names cannot be `berth`).
    routes.set(
        &format!("{}.{}", crate::app::RESERVED, args.domain),
        vec![api_addr],
    );
    let mut tasks = vec![
        supervisor,
        tokio::spawn(acme.run(shutdown.clone())),
        tokio::spawn(dns_stub.run(shutdown.clone())),
        tokio::spawn(crate::proxy::run(
            http,
            routes.clone(),
            crate::proxy::ProxyConfig::default(),
            shutdown.clone(),
        )),
        tokio::spawn({
            let gate = Arc::new(Gate {
                service: service.clone(),
                deployer: deployer.clone(),
                api: apis.local.clone(),
            });
            let shutdown = shutdown.clone();
            async move {
                if let Err(err) = ssh::run(ssh_listener, ssh_config, gate, shutdown).await {
                    warn!(%err, "ssh server stopped");
                }
            }
        }),
        tokio::spawn(api::serve(admin_listener, apis.socket, shutdown.clone())),
        // The dashboard at `/` beside the API's `/api/v1`.
        tokio::spawn(api::serve_tcp(
            api_listener,
            dashboard::router(service.clone(), shutdown.clone()).merge(apis.tcp),
            shutdown.clone(),
        )),
    ];
    if let Some(listener) = https {
        tasks.push(tokio::spawn(crate::proxy::run_tls(
            listener,
            routes,
            crate::proxy::ProxyConfig::default(),
            certs.server_config(),
            shutdown.clone(),
        )));
    }
    println!(
        "berth server ready: http={http_addr}{} ssh={ssh_addr} api={api_addr} admin={} domain={}",
        https_addr.map_or(String::new(), |addr| format!(" https={addr}")),
        socket.display(),
        args.domain
    );

    wait_for_signal().await;
    info!("shutting down");
    shutdown.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // A run belongs to its connection, which ends with the server: stop and remove them all.
    deployer.end_runs().await;
    if args.ephemeral {
        deployer.stop_everything().await;
        berth_runtime::cgroup::remove_parent();
        if let Err(err) = berth_runtime::network::remove_bridge(&args.bridge).await {
            warn!(%err, "removing the bridge failed");
        }
        if let Err(err) = berth_runtime::firewall::remove(&args.bridge) {
            warn!(%err, "removing the bridge's firewall table failed");
        }
    }
    store.close().await;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Quotes a word for /bin/sh.
pub fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        assert_eq!(
            parse_subnet("10.219.0.0/16").unwrap(),
            (Ipv4Addr::new(10, 219, 0, 1), 16)
        );
        assert_eq!(
            parse_subnet("10.250.7.0/24").unwrap(),
            (Ipv4Addr::new(10, 250, 7, 1), 24)
        );
        for bad in ["8.8.8.0/24", "10.0.0.0", "10.0.0.0/30", "nonsense/16"] {
            assert!(parse_subnet(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/var/lib/berth"), "'/var/lib/berth'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
