//! The upstream of `scripts/bench/proxy.sh`: Debian's nginx answering `200 ok` to every request,
//! run by berth's embedded runtime as a container in its own network namespace on a bridge of
//! its own, the way `berth server` runs an app's `web` container. Prints the container's address
//! (`IP:8080`) on stdout once it answers, then runs until SIGINT, SIGTERM or SIGHUP and removes
//! everything it made: the container (and its shim, mounts and cgroup), the netns and veth, the
//! bridge and its nftables table, and `WORKDIR`.
//!
//! The rootfs is a directory of host files: symlinks for Debian's merged `/usr` (bound
//! read-only from the host), `/etc/passwd`, `/etc/group` and the nginx config.
//!
//! Usage: `bench_upstream WORKDIR` (as root; WORKDIR must not exist). The binary doubles as the
//! shim: the runtime re-executes it as `bench_upstream shim DIR`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_runtime::{firewall, network, Bind, ContainerSpec, LogTarget, Runtime};
use tokio::signal::unix::{signal, SignalKind};

const NGINX_CONF: &str = "user root;
worker_processes 1;
daemon off;
pid /tmp/nginx.pid;
error_log /tmp/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path /tmp/body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    server { listen 8080; location / { default_type text/plain; return 200 'ok'; } }
}
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // Before any thread exists: shims clone, and must not be multithreaded.
    if let Some(code) = berth_runtime::shim::dispatch(&args) {
        std::process::exit(code);
    }
    let [_, workdir] = &args[..] else {
        bail!("usage: bench_upstream WORKDIR");
    };
    let bench = Bench::new(PathBuf::from(workdir))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let served = rt.block_on(bench.serve());
    rt.block_on(bench.clean_up());
    served
}

struct Bench {
    workdir: PathBuf,
    runtime: Runtime,
    id: String,
    bridge: String,
    gateway: Ipv4Addr,
    ip: Ipv4Addr,
}

impl Bench {
    fn new(workdir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir(&workdir)
            .with_context(|| format!("creating {} (it must not exist)", workdir.display()))?;
        let pid = std::process::id();
        // A subnet and names of our own, so a berth server or a second run is never touched.
        let subnet = 20 + (pid % 200) as u8;
        Ok(Self {
            runtime: Runtime::new(workdir.join("containers"), std::env::current_exe()?),
            workdir,
            id: format!("bench-upstream-{pid}"),
            bridge: format!("bbench{pid}"),
            gateway: Ipv4Addr::new(10, 253, subnet, 1),
            ip: Ipv4Addr::new(10, 253, subnet, 2),
        })
    }

    /// Starts the container and keeps it until a signal asks to stop.
    async fn serve(&self) -> anyhow::Result<()> {
        let (mut int, mut term, mut hup) = (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        );
        network::ensure_bridge(&self.bridge, self.gateway, 24).await?;
        firewall::ensure(&self.bridge, self.gateway, 24)?;
        let netns = network::create_netns(
            &self.workdir.join("netns"),
            &self.id,
            &self.bridge,
            self.ip,
            24,
            self.gateway,
        )
        .await?;
        let spec = ContainerSpec {
            id: self.id.clone(),
            layers: vec![self.rootfs()?],
            args: ["nginx", "-e", "/tmp/nginx.err", "-c", "/etc/nginx.conf"]
                .map(String::from)
                .to_vec(),
            env: Vec::new(),
            cwd: "/".into(),
            hostname: "upstream".into(),
            binds: vec![Bind {
                source: "/usr".into(),
                destination: "/usr".into(),
                readonly: true,
                idmapped: false,
            }],
            netns: Some(netns.clone()),
            log: LogTarget::File {
                path: self.workdir.join("upstream.log"),
                prefix: "nginx".into(),
            },
            stop_grace_secs: 2,
            limits: Default::default(),
            init: false,
            user: None,
            users: None,
            stop_signal: None,
        };
        self.runtime.start(&spec)?;
        let addr = SocketAddr::from((self.ip, 8080));
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx in the container does not answer on {addr} — see {}/upstream.log",
                    self.workdir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("{addr} {}", netns.display());
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = hup.recv() => {}
        }
        Ok(())
    }

    /// The image layer: host files only.
    fn rootfs(&self) -> anyhow::Result<PathBuf> {
        let root = self.workdir.join("rootfs");
        for dir in ["etc", "tmp", "proc", "dev", "sys", "usr"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(target, root.join(link))?;
        }
        for file in ["passwd", "group"] {
            std::fs::copy(Path::new("/etc").join(file), root.join("etc").join(file))?;
        }
        std::fs::write(root.join("etc/nginx.conf"), NGINX_CONF)?;
        Ok(root)
    }

    /// Removes everything `serve` made, whatever it got to; errors are reported, not fatal.
    async fn clean_up(&self) {
        if let Err(err) = self.runtime.remove(&self.id) {
            eprintln!("bench_upstream: removing the container: {err}");
        }
        berth_runtime::cgroup::remove_parent();
        if let Err(err) = network::delete_netns(&self.workdir.join("netns"), &self.id).await {
            eprintln!("bench_upstream: removing the netns: {err}");
        }
        if let Err(err) = network::remove_bridge(&self.bridge).await {
            eprintln!("bench_upstream: removing the bridge: {err}");
        }
        if let Err(err) = firewall::remove(&self.bridge) {
            eprintln!("bench_upstream: removing the firewall table: {err}");
        }
        if let Err(err) = std::fs::remove_dir_all(&self.workdir) {
            eprintln!("bench_upstream: removing {}: {err}", self.workdir.display());
        }
    }
}
