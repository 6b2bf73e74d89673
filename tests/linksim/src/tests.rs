//! End-to-end tests: a UDP echo server behind the simulator, over real loopback sockets.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

use super::*;

/// Generous ceiling so a broken test fails instead of hanging; never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(10);
/// How long to listen for a datagram that must not arrive.
const QUIET: Duration = Duration::from_millis(250);

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

struct Echo {
    addr: SocketAddr,
    peers: Arc<Mutex<HashSet<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> Echo {
    let sock = UdpSocket::bind(any_port()).await.unwrap();
    let addr = sock.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let seen = peers.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            seen.lock().unwrap().insert(from);
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    Echo { addr, peers, task }
}

async fn sim(echo: &Echo, up: LinkProfile, down: LinkProfile, outages: Vec<Outage>) -> LinkSim {
    LinkSim::start(any_port(), echo.addr, up, down, 7, outages)
        .await
        .unwrap()
}

async fn loopback_sim(echo: &Echo) -> LinkSim {
    sim(
        echo,
        LinkProfile::loopback(),
        LinkProfile::loopback(),
        vec![],
    )
    .await
}

async fn client(sim: &LinkSim) -> UdpSocket {
    let sock = UdpSocket::bind(any_port()).await.unwrap();
    sock.connect(sim.local_addr()).await.unwrap();
    sock
}

async fn recv_within(sock: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    match timeout(wait, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Polls the stats until `done` holds, failing after [`PATIENCE`].
async fn wait_stats(sim: &LinkSim, done: impl Fn(&LinkStats) -> bool) -> LinkStats {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stats = sim.stats();
        if done(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "stats never settled: {stats:?}");
        sleep(Duration::from_millis(5)).await;
    }
}

fn profile(spec: &str) -> LinkProfile {
    LinkProfile::parse(spec).unwrap()
}

#[tokio::test]
async fn loopback_passes_both_ways() {
    let echo = echo_server().await;
    let sim = loopback_sim(&echo).await;
    let c = client(&sim).await;
    for i in 0..10u8 {
        c.send(&[i; 100]).await.unwrap();
        assert_eq!(recv_within(&c, PATIENCE).await.unwrap(), vec![i; 100]);
    }
    // The largest IPv4 UDP payload crosses intact.
    let big: Vec<u8> = (0..65_507u32).map(|i| i as u8).collect();
    c.send(&big).await.unwrap();
    assert_eq!(recv_within(&c, PATIENCE).await.unwrap(), big);
    let stats = wait_stats(&sim, |s| s.down.forwarded_datagrams == 11).await;
    assert_eq!(stats.up.forwarded_datagrams, 11);
    assert_eq!(stats.up.forwarded_bytes, 1000 + 65_507);
    assert_eq!(stats.up.dropped(), 0);
    assert_eq!(stats.down.dropped(), 0);
    assert_eq!(stats.flows, 1);
}

#[tokio::test]
async fn delay_lengthens_round_trip() {
    let echo = echo_server().await;
    let p = profile("delay=50ms");
    let sim = sim(&echo, p.clone(), p, vec![]).await;
    let c = client(&sim).await;
    for _ in 0..3 {
        let t0 = Instant::now();
        c.send(b"ping").await.unwrap();
        assert_eq!(recv_within(&c, PATIENCE).await.unwrap(), b"ping");
        let rtt = t0.elapsed();
        assert!(rtt >= Duration::from_millis(100), "rtt {rtt:?}");
    }
}

#[tokio::test]
async fn total_loss_drops_everything_and_counts_it() {
    let echo = echo_server().await;
    let sim = sim(&echo, profile("loss=100%"), LinkProfile::loopback(), vec![]).await;
    let c = client(&sim).await;
    for _ in 0..20 {
        c.send(b"gone").await.unwrap();
    }
    let stats = wait_stats(&sim, |s| s.up.dropped_loss == 20).await;
    assert_eq!(stats.up.forwarded_datagrams, 0);
    assert!(recv_within(&c, QUIET).await.is_none());
    assert!(echo.peers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn partial_loss_drops_about_the_configured_fraction() {
    let echo = echo_server().await;
    let sim = sim(&echo, profile("loss=20%"), LinkProfile::loopback(), vec![]).await;
    let c = client(&sim).await;
    for i in 0..1000u32 {
        c.send(&i.to_be_bytes()).await.unwrap();
        // Pace the burst so kernel buffers never drop datagrams behind the stats' back.
        if i % 50 == 49 {
            sleep(Duration::from_millis(1)).await;
        }
    }
    let stats = wait_stats(&sim, |s| {
        s.up.dropped_loss + s.up.forwarded_datagrams + s.up.dropped_other >= 1000
    })
    .await;
    assert_eq!(stats.up.dropped_other, 0);
    let lost = stats.up.dropped_loss;
    assert!((100..=300).contains(&lost), "lost {lost} of 1000");
}

#[tokio::test]
async fn rate_limit_serialises_datagrams() {
    let echo = echo_server().await;
    let sim = sim(
        &echo,
        profile("rate=64kbit"),
        LinkProfile::loopback(),
        vec![],
    )
    .await;
    let c = client(&sim).await;
    let t0 = Instant::now();
    // 8 KB at 64 kbit/s is one second on the wire.
    for _ in 0..8 {
        c.send(&[0u8; 1000]).await.unwrap();
    }
    for _ in 0..8 {
        assert!(recv_within(&c, PATIENCE).await.is_some());
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert_eq!(sim.stats().up.dropped(), 0);
}

#[tokio::test]
async fn scheduled_outage_drops_then_recovers() {
    let echo = echo_server().await;
    let outage = Outage {
        start: Duration::ZERO,
        duration: Duration::from_millis(800),
    };
    let sim = sim(
        &echo,
        LinkProfile::loopback(),
        LinkProfile::loopback(),
        vec![outage],
    )
    .await;
    let started = Instant::now();
    let c = client(&sim).await;
    assert!(!sim.handle().is_up());
    c.send(b"during").await.unwrap();
    assert!(recv_within(&c, QUIET).await.is_none());
    assert_eq!(sim.stats().up.dropped_outage, 1);

    tokio::time::sleep_until(started + Duration::from_millis(900)).await;
    assert!(sim.handle().is_up());
    c.send(b"after").await.unwrap();
    assert_eq!(recv_within(&c, PATIENCE).await.unwrap(), b"after");
}

#[tokio::test]
async fn handle_cuts_and_restores_the_link() {
    let echo = echo_server().await;
    let sim = sim(
        &echo,
        profile("delay=300ms"),
        LinkProfile::loopback(),
        vec![],
    )
    .await;
    let handle = sim.handle();
    let c = client(&sim).await;

    handle.set_up(false);
    c.send(b"cut").await.unwrap();
    assert!(recv_within(&c, QUIET).await.is_none());
    assert_eq!(sim.stats().up.dropped_outage, 1);

    // A datagram already on the wire when the link is cut is lost too.
    handle.set_up(true);
    c.send(b"in flight").await.unwrap();
    sleep(Duration::from_millis(50)).await;
    handle.set_up(false);
    sleep(Duration::from_millis(400)).await;
    handle.set_up(true);
    assert!(recv_within(&c, QUIET).await.is_none());
    assert_eq!(sim.stats().up.dropped_outage, 2);

    c.send(b"restored").await.unwrap();
    assert_eq!(recv_within(&c, PATIENCE).await.unwrap(), b"restored");
}

#[tokio::test]
async fn profile_changes_at_run_time() {
    let echo = echo_server().await;
    let sim = loopback_sim(&echo).await;
    let handle = sim.handle();
    let c = client(&sim).await;
    c.send(b"a").await.unwrap();
    assert!(recv_within(&c, PATIENCE).await.is_some());

    handle
        .set_profile(Direction::Down, profile("loss=100%"))
        .unwrap();
    assert_eq!(handle.profile(Direction::Down).loss, 1.0);
    c.send(b"b").await.unwrap();
    wait_stats(&sim, |s| s.down.dropped_loss == 1).await;
    assert!(recv_within(&c, QUIET).await.is_none());

    let bad = LinkProfile {
        loss: 2.0,
        ..LinkProfile::loopback()
    };
    assert!(handle.set_profile(Direction::Up, bad).is_err());
    assert_eq!(handle.profile(Direction::Up), LinkProfile::loopback());

    handle.set_delay(300).unwrap();
    assert_eq!(handle.profile(Direction::Up).delay_ms, 300);
    let down = handle.profile(Direction::Down);
    assert_eq!(
        (down.delay_ms, down.loss),
        (300, 1.0),
        "only the delay changes"
    );
    assert!(handle.set_delay(MAX_DELAY_MS + 1).is_err());
}

#[tokio::test]
async fn burst_beyond_queue_is_tail_dropped() {
    let echo = echo_server().await;
    let sim = sim(
        &echo,
        profile("rate=64kbit,queue=4k"),
        LinkProfile::loopback(),
        vec![],
    )
    .await;
    let c = client(&sim).await;
    for _ in 0..50 {
        c.send(&[1u8; 1000]).await.unwrap();
    }
    let stats = wait_stats(&sim, |s| {
        s.up.dropped_queue + s.up.forwarded_datagrams + s.up.dropped_other >= 50
    })
    .await;
    // About four datagrams fit in 4 KiB; the rest of the burst is tail-dropped.
    assert!(stats.up.dropped_queue >= 40, "{stats:?}");
    assert!(stats.up.forwarded_datagrams >= 1, "{stats:?}");
    assert!(recv_within(&c, PATIENCE).await.is_some());
}

#[tokio::test]
async fn each_client_gets_its_own_upstream_peer() {
    let echo = echo_server().await;
    let sim = loopback_sim(&echo).await;
    let a = client(&sim).await;
    let b = client(&sim).await;
    a.send(b"from a").await.unwrap();
    b.send(b"from b").await.unwrap();
    assert_eq!(recv_within(&a, PATIENCE).await.unwrap(), b"from a");
    assert_eq!(recv_within(&b, PATIENCE).await.unwrap(), b"from b");
    assert_eq!(echo.peers.lock().unwrap().len(), 2);
    assert_eq!(sim.stats().flows, 2);
}

#[tokio::test]
async fn flow_table_is_bounded() {
    let echo = echo_server().await;
    let sim = LinkSim::start_with_flow_limit(
        any_port(),
        echo.addr,
        LinkProfile::loopback(),
        LinkProfile::loopback(),
        1,
        vec![],
        1,
    )
    .await
    .unwrap();
    let a = client(&sim).await;
    let b = client(&sim).await;
    a.send(b"first").await.unwrap();
    assert!(recv_within(&a, PATIENCE).await.is_some());
    b.send(b"second").await.unwrap();
    wait_stats(&sim, |s| s.up.dropped_other == 1).await;
    assert!(recv_within(&b, QUIET).await.is_none());
    assert_eq!(sim.stats().flows, 1);
}

#[tokio::test]
async fn start_rejects_bad_input() {
    let echo = echo_server().await;
    let bad = LinkProfile {
        rate_bps: Some(0),
        ..LinkProfile::loopback()
    };
    let err = LinkSim::start(
        any_port(),
        echo.addr,
        bad,
        LinkProfile::loopback(),
        1,
        vec![],
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, LinkSimError::Profile(_)), "{err}");

    let outages = vec![
        Outage {
            start: Duration::ZERO,
            duration: Duration::ZERO,
        };
        MAX_OUTAGES + 1
    ];
    let err = LinkSim::start(
        any_port(),
        echo.addr,
        LinkProfile::loopback(),
        LinkProfile::loopback(),
        1,
        outages,
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, LinkSimError::TooManyOutages { .. }), "{err}");

    // The echo server already holds its port.
    let err = LinkSim::start(
        echo.addr,
        echo.addr,
        LinkProfile::loopback(),
        LinkProfile::loopback(),
        1,
        vec![],
    )
    .await
    .err()
    .unwrap();
    assert!(matches!(err, LinkSimError::Bind { .. }), "{err}");
}

#[tokio::test]
async fn shutdown_stops_forwarding() {
    let echo = echo_server().await;
    let sim = loopback_sim(&echo).await;
    let handle = sim.handle();
    let c = client(&sim).await;
    c.send(b"before").await.unwrap();
    assert!(recv_within(&c, PATIENCE).await.is_some());
    sim.shutdown().await;
    c.send(b"after").await.unwrap();
    assert!(recv_within(&c, QUIET).await.is_none());
    // The handle outlives the simulator harmlessly.
    handle.set_up(false);
    assert_eq!(handle.stats().up.forwarded_datagrams, 1);
}
