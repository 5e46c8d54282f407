//! berth's proxy alone, for `scripts/bench/proxy.sh`: serves `LISTEN` and routes the Host
//! `bench.localhost` to `UPSTREAM`, on one tokio thread (like one nginx worker). Given the
//! upstream container's network namespace (`NETNS`), it connects from inside it, as `berth
//! server` does; without, from the host.
//!
//! Usage: `proxy_bench LISTEN UPSTREAM [NETNS]`, e.g.
//! `proxy_bench 127.0.0.1:18081 10.253.40.2:8080 /tmp/up/netns/bench-upstream-40`.

use std::net::SocketAddr;
use std::sync::Arc;

use berth::proxy::{self, ProxyConfig, Routes, Target};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: proxy_bench LISTEN UPSTREAM [NETNS]");
    };
    let upstream = Target {
        addr: upstream.parse::<SocketAddr>()?,
        netns: args.next().map(Into::into),
    };
    let routes = Arc::new(Routes::default());
    routes.set("bench.localhost", [upstream]);
    let listener = TcpListener::bind(&listen).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    proxy::run(listener, routes, ProxyConfig::default(), shutdown).await;
    Ok(())
}
