//! `linksim`: run the UDP link simulator between a client and a server for manual experiments.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use linksim::{LinkProfile, LinkSim, LinkStats, Outage};

/// Shapes UDP (e.g. QUIC) traffic between clients and one server: delay, jitter, loss,
/// rate, queue and outages, per direction. Point clients at --listen instead of the server.
#[derive(Parser, Debug)]
#[command(
    name = "linksim",
    version,
    after_help = "LINK SPECS: a preset (loopback, weak4g, 2g, vsat) and/or comma-separated \
                  overrides: rate=64kbit|1mbit|unlimited, delay=100ms, jitter=5ms, loss=2%, \
                  queue=64k, reorder, mtu=1500|none (IP packet bytes; the field presets \
                  have 1500, larger datagrams are dropped).\nExamples: --up weak4g --down \"weak4g,jitter=20ms\"; \
                  --up \"rate=1mbit,delay=100ms,loss=2%\"; --outage 10s+5s --outage 1m+30s"
)]
struct Args {
    /// Address clients dial.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// The real server.
    #[arg(long)]
    upstream: SocketAddr,
    /// Client-to-server link spec.
    #[arg(long, default_value = "loopback")]
    up: LinkProfile,
    /// Server-to-client link spec (defaults to the --up spec).
    #[arg(long)]
    down: Option<LinkProfile>,
    /// Seed for loss and jitter, so runs are reproducible.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Outage as START+DURATION after startup, e.g. 10s+5s; repeatable.
    #[arg(long = "outage", value_name = "START+DURATION")]
    outages: Vec<Outage>,
    /// Seconds between stats lines.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stats_every: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let down = args.down.unwrap_or_else(|| args.up.clone());
    println!("up   (client -> server): {}", args.up);
    println!("down (server -> client): {down}");
    for o in &args.outages {
        println!("outage: {o}");
    }
    let sim = LinkSim::start(
        args.listen,
        args.upstream,
        args.up,
        down,
        args.seed,
        args.outages,
    )
    .await
    .context("cannot start link simulator")?;
    println!(
        "forwarding {} -> {} (Ctrl-C to stop)",
        sim.local_addr(),
        args.upstream
    );

    let mut ticker = tokio::time::interval(Duration::from_secs(args.stats_every));
    ticker.tick().await; // The first tick is immediate.
    loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.context("cannot wait for ctrl-c")?;
                break;
            }
            _ = ticker.tick() => print_stats(&sim.stats(), sim.handle().is_up()),
        }
    }
    print_stats(&sim.stats(), sim.handle().is_up());
    sim.shutdown().await;
    Ok(())
}

fn print_stats(stats: &LinkStats, up: bool) {
    let state = if up { "up" } else { "DOWN" };
    println!("[link {state}, {} flows]", stats.flows);
    println!("  up:   {}", stats.up);
    println!("  down: {}", stats.down);
}
