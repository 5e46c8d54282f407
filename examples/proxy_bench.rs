//! berth's proxy alone, for `scripts/bench/proxy.sh`: serves `LISTEN` and routes the Host
//! `bench.localhost` to `UPSTREAM`, on one tokio thread (like one nginx worker).
//!
//! Usage: `proxy_bench LISTEN UPSTREAM`, e.g. `proxy_bench 127.0.0.1:18081 127.0.0.1:18080`.

use std::net::SocketAddr;
use std::sync::Arc;

use berth::proxy::{self, ProxyConfig, Routes};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: proxy_bench LISTEN UPSTREAM");
    };
    let upstream: SocketAddr = upstream.parse()?;
    let routes = Arc::new(Routes::default());
    routes.set("bench.localhost", vec![upstream]);
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
