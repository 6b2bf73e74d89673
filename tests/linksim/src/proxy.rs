//! The UDP proxy: per-client flows, one scheduler task per direction, stats and a control handle.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::shaper::{derive_seed, Shaper, Verdict};
use super::{LinkProfile, LinkSimError, Outage, Result};

/// Largest datagram the proxy forwards (the UDP length field's limit).
pub const MAX_DATAGRAM: usize = 65_535;
/// Most distinct client source addresses served at once.
pub const MAX_FLOWS: usize = 256;
/// Most scheduled outage windows.
pub const MAX_OUTAGES: usize = 4_096;
/// Datagrams waiting between a socket reader and its direction's scheduler.
const CHANNEL_DATAGRAMS: usize = 256;
/// Bytes held per direction (queued plus propagating); an unlimited-rate link with a long
/// delay would otherwise buffer whatever the sender pushes.
const MAX_IN_FLIGHT_BYTES: usize = 32 * 1024 * 1024;
/// Bookkeeping charged per held datagram so floods of tiny datagrams are bounded too.
const ENTRY_OVERHEAD: usize = 64;
/// A flow idle this long may be evicted to make room for a new client.
const FLOW_IDLE_EVICT: Duration = Duration::from_secs(60);

/// One direction of the simulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// Counters for one direction since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectionStats {
    pub forwarded_datagrams: u64,
    pub forwarded_bytes: u64,
    /// Lost at random (`loss`).
    pub dropped_loss: u64,
    /// Tail-dropped because the queue in front of the rate limiter was full.
    pub dropped_queue: u64,
    /// Larger than the link's MTU (path-MTU probes, mostly).
    pub dropped_too_big: u64,
    /// Dropped because the link was down (scheduled outage or [`LinkHandle::set_up`]).
    pub dropped_outage: u64,
    /// Dropped for resource limits (flow table, in-flight bytes) or socket errors.
    pub dropped_other: u64,
}

impl DirectionStats {
    /// All drops, whatever the cause.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss
            + self.dropped_queue
            + self.dropped_too_big
            + self.dropped_outage
            + self.dropped_other
    }
}

impl fmt::Display for DirectionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fwd {} dgrams/{} B, lost {}, queue-drop {}, too-big-drop {}, outage-drop {}, other-drop {}",
            self.forwarded_datagrams,
            self.forwarded_bytes,
            self.dropped_loss,
            self.dropped_queue,
            self.dropped_too_big,
            self.dropped_outage,
            self.dropped_other
        )
    }
}

/// A snapshot of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Client to server.
    pub up: DirectionStats,
    /// Server to client.
    pub down: DirectionStats,
    /// Client flows currently open.
    pub flows: usize,
}

#[derive(Default)]
struct Counters {
    forwarded_datagrams: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_too_big: AtomicU64,
    dropped_outage: AtomicU64,
    dropped_other: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            forwarded_datagrams: self.forwarded_datagrams.load(Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Relaxed),
            dropped_loss: self.dropped_loss.load(Relaxed),
            dropped_queue: self.dropped_queue.load(Relaxed),
            dropped_too_big: self.dropped_too_big.load(Relaxed),
            dropped_outage: self.dropped_outage.load(Relaxed),
            dropped_other: self.dropped_other.load(Relaxed),
        }
    }
}

/// State shared by the tasks and every [`LinkHandle`].
struct Shared {
    started: Instant,
    link_up: AtomicBool,
    outages: Vec<Outage>,
    profiles: [watch::Sender<LinkProfile>; 2],
    counters: [Counters; 2],
    flows: AtomicUsize,
}

impl Shared {
    fn is_down(&self, at: Instant) -> bool {
        if !self.link_up.load(Relaxed) {
            return true;
        }
        let elapsed = at.saturating_duration_since(self.started);
        self.outages.iter().any(|o| o.contains(elapsed))
    }

    fn counters(&self, dir: Direction) -> &Counters {
        &self.counters[dir.index()]
    }

    /// Milliseconds since start, for cheap atomic activity stamps.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Controls a running [`LinkSim`]: cut or restore the link, change profiles, read stats.
///
/// Cheap to clone; outliving the simulator is harmless.
#[derive(Clone)]
pub struct LinkHandle {
    shared: Arc<Shared>,
}

impl LinkHandle {
    /// Cuts (`false`) or restores (`true`) the link in both directions, including
    /// datagrams already on their way. Scheduled outages still apply while up.
    pub fn set_up(&self, up: bool) {
        self.shared.link_up.store(up, Relaxed);
    }

    /// Whether datagrams would pass right now (manual state and outage schedule).
    pub fn is_up(&self) -> bool {
        !self.shared.is_down(Instant::now())
    }

    /// Replaces one direction's profile; datagrams already scheduled keep their timing.
    pub fn set_profile(&self, dir: Direction, profile: LinkProfile) -> Result<()> {
        profile.validate()?;
        self.shared.profiles[dir.index()].send_replace(profile);
        Ok(())
    }

    /// Sets the one-way delay of both directions, keeping the rest of each profile: a link
    /// fading (a radio losing signal) before it is cut.
    pub fn set_delay(&self, delay_ms: u32) -> Result<()> {
        for dir in [Direction::Up, Direction::Down] {
            let profile = LinkProfile {
                delay_ms,
                ..self.profile(dir)
            };
            self.set_profile(dir, profile)?;
        }
        Ok(())
    }

    /// The profile currently applied to one direction.
    pub fn profile(&self, dir: Direction) -> LinkProfile {
        self.shared.profiles[dir.index()].borrow().clone()
    }

    /// Counters for both directions.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            up: self.shared.counters(Direction::Up).snapshot(),
            down: self.shared.counters(Direction::Down).snapshot(),
            flows: self.shared.flows.load(Relaxed),
        }
    }
}

/// A running link simulator; dropping it stops its tasks.
pub struct LinkSim {
    local_addr: SocketAddr,
    handle: LinkHandle,
    tasks: Vec<JoinHandle<()>>,
}

impl LinkSim {
    /// Listens on `listen` (use `127.0.0.1:0`) and forwards to `upstream`, shaping
    /// client-to-server traffic with `up` and server-to-client traffic with `down`.
    /// `seed` makes loss and jitter reproducible; `outages` are relative to now.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        up: LinkProfile,
        down: LinkProfile,
        seed: u64,
        outages: Vec<Outage>,
    ) -> Result<Self> {
        Self::start_with_flow_limit(listen, upstream, up, down, seed, outages, MAX_FLOWS).await
    }

    pub(crate) async fn start_with_flow_limit(
        listen: SocketAddr,
        upstream: SocketAddr,
        up: LinkProfile,
        down: LinkProfile,
        seed: u64,
        outages: Vec<Outage>,
        max_flows: usize,
    ) -> Result<Self> {
        up.validate()?;
        down.validate()?;
        if outages.len() > MAX_OUTAGES {
            return Err(LinkSimError::TooManyOutages { max: MAX_OUTAGES });
        }
        let socket = UdpSocket::bind(listen)
            .await
            .map_err(|source| LinkSimError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = socket.local_addr()?;
        // Deliveries use `try_send_to`, which fails until the reactor has seen the socket writable.
        socket.writable().await?;
        let shared = Arc::new(Shared {
            started: Instant::now(),
            link_up: AtomicBool::new(true),
            outages,
            profiles: [watch::Sender::new(up), watch::Sender::new(down)],
            counters: Default::default(),
            flows: AtomicUsize::new(0),
        });
        let (up_tx, up_rx) = mpsc::channel(CHANNEL_DATAGRAMS);
        let (down_tx, down_rx) = mpsc::channel(CHANNEL_DATAGRAMS);
        let tasks = vec![
            tokio::spawn(run_direction(
                Direction::Up,
                up_rx,
                shared.clone(),
                derive_seed(seed, 10),
            )),
            tokio::spawn(run_direction(
                Direction::Down,
                down_rx,
                shared.clone(),
                derive_seed(seed, 20),
            )),
            tokio::spawn(
                ClientSide {
                    listen: Arc::new(socket),
                    upstream,
                    up_tx,
                    down_tx,
                    shared: shared.clone(),
                    max_flows,
                    flows: HashMap::new(),
                }
                .run(),
            ),
        ];
        tracing::debug!(%local_addr, %upstream, "linksim started");
        Ok(Self {
            local_addr,
            handle: LinkHandle { shared },
            tasks,
        })
    }

    /// The address clients dial instead of the server.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A control handle that can outlive `self`.
    pub fn handle(&self) -> LinkHandle {
        self.handle.clone()
    }

    /// Counters for both directions.
    pub fn stats(&self) -> LinkStats {
        self.handle.stats()
    }

    /// Stops forwarding and waits for the tasks to finish; pending datagrams are discarded.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Cancellation is the expected outcome; nothing to report.
            let _ = task.await;
        }
    }
}

impl Drop for LinkSim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Where a datagram goes once it has crossed the link.
enum Out {
    /// Through a flow's socket, already connected to the server.
    Upstream(Arc<UdpSocket>),
    /// Through the listening socket back to a client.
    Client(Arc<UdpSocket>, SocketAddr),
}

struct Datagram {
    arrived: Instant,
    out: Out,
    data: Vec<u8>,
}

struct Scheduled {
    at: Instant,
    /// Tie-breaker so equal delivery times keep arrival order.
    seq: u64,
    dgram: Datagram,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed so `BinaryHeap` (a max-heap) pops the earliest delivery first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Shapes one direction: admits datagrams through the [`Shaper`] and delivers them on time.
async fn run_direction(
    dir: Direction,
    mut rx: mpsc::Receiver<Datagram>,
    shared: Arc<Shared>,
    seed: u64,
) {
    let mut profile_rx = shared.profiles[dir.index()].subscribe();
    let mut shaper = Shaper::new(profile_rx.borrow_and_update().clone(), seed);
    let mut heap: BinaryHeap<Scheduled> = BinaryHeap::new();
    let mut in_flight = 0usize;
    let mut seq = 0u64;
    let sleep = tokio::time::sleep_until(Instant::now());
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    let counters = shared.counters(dir);
    loop {
        let head = heap.peek().map(|s| s.at);
        if head != armed {
            if let Some(at) = head {
                sleep.as_mut().reset(at);
            }
            armed = head;
        }
        tokio::select! {
            // Deliveries first: late deliveries would distort the simulated delay.
            biased;
            () = &mut sleep, if head.is_some() => {
                let now = Instant::now();
                while heap.peek().is_some_and(|s| s.at <= now) {
                    let Some(s) = heap.pop() else { break };
                    in_flight = in_flight.saturating_sub(s.dgram.data.len() + ENTRY_OVERHEAD);
                    deliver(&shared, dir, s.dgram, s.at);
                }
                armed = None;
            }
            msg = rx.recv() => {
                let Some(dgram) = msg else { break };
                if profile_rx.has_changed().unwrap_or(false) {
                    shaper.set_profile(profile_rx.borrow_and_update().clone());
                }
                if shared.is_down(dgram.arrived) {
                    Counters::bump(&counters.dropped_outage);
                    continue;
                }
                let cost = dgram.data.len() + ENTRY_OVERHEAD;
                if in_flight + cost > MAX_IN_FLIGHT_BYTES {
                    Counters::bump(&counters.dropped_other);
                    continue;
                }
                match shaper.admit(dgram.arrived, dgram.data.len()) {
                    Verdict::DropQueue => Counters::bump(&counters.dropped_queue),
                    Verdict::DropLoss => Counters::bump(&counters.dropped_loss),
                    Verdict::DropTooBig => Counters::bump(&counters.dropped_too_big),
                    // Already due and nothing earlier pending: skip the timer, whose
                    // millisecond granularity would add latency to an unshaped link.
                    Verdict::Deliver(at)
                        if at <= Instant::now() && heap.peek().is_none_or(|s| s.at > at) =>
                    {
                        deliver(&shared, dir, dgram, at);
                    }
                    Verdict::Deliver(at) => {
                        heap.push(Scheduled { at, seq, dgram });
                        seq = seq.wrapping_add(1);
                        in_flight += cost;
                    }
                }
            }
        }
    }
}

/// Sends a datagram that has crossed the link, unless the link went down meanwhile.
fn deliver(shared: &Shared, dir: Direction, dgram: Datagram, at: Instant) {
    let counters = shared.counters(dir);
    if shared.is_down(at) {
        Counters::bump(&counters.dropped_outage);
        return;
    }
    // Non-blocking: a full socket buffer is congestion, and waiting would stall the schedule.
    let sent = match &dgram.out {
        Out::Upstream(sock) => sock.try_send(&dgram.data),
        Out::Client(sock, addr) => sock.try_send_to(&dgram.data, *addr),
    };
    match sent {
        Ok(n) => {
            counters.forwarded_datagrams.fetch_add(1, Relaxed);
            counters
                .forwarded_bytes
                .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Relaxed);
        }
        Err(e) => {
            tracing::debug!(?dir, error = %e, "linksim send failed");
            Counters::bump(&counters.dropped_other);
        }
    }
}

/// One client source address and the socket that represents it to the server.
struct Flow {
    sock: Arc<UdpSocket>,
    last_active_ms: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads datagrams from clients, opening a flow per source address.
struct ClientSide {
    listen: Arc<UdpSocket>,
    upstream: SocketAddr,
    up_tx: mpsc::Sender<Datagram>,
    down_tx: mpsc::Sender<Datagram>,
    shared: Arc<Shared>,
    max_flows: usize,
    flows: HashMap<SocketAddr, Flow>,
}

impl ClientSide {
    async fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let shared = self.shared.clone();
        let counters = shared.counters(Direction::Up);
        loop {
            let (n, from) = match self.listen.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    recv_error(&e).await;
                    continue;
                }
            };
            let arrived = Instant::now();
            let sock = match self.flows.get(&from) {
                Some(flow) => {
                    flow.last_active_ms.store(shared.now_ms(), Relaxed);
                    flow.sock.clone()
                }
                None => match self.open_flow(from).await {
                    Some(sock) => sock,
                    None => {
                        Counters::bump(&counters.dropped_other);
                        continue;
                    }
                },
            };
            let dgram = Datagram {
                arrived,
                out: Out::Upstream(sock),
                data: buf[..n].to_vec(),
            };
            if self.up_tx.try_send(dgram).is_err() {
                Counters::bump(&counters.dropped_other);
            }
        }
    }

    /// Opens a flow for a new client, evicting the least recently active idle one if full.
    async fn open_flow(&mut self, client: SocketAddr) -> Option<Arc<UdpSocket>> {
        if self.flows.len() >= self.max_flows {
            let now = self.shared.now_ms();
            let idle_ms = u64::try_from(FLOW_IDLE_EVICT.as_millis()).unwrap_or(u64::MAX);
            let victim = self
                .flows
                .iter()
                .map(|(addr, f)| (*addr, f.last_active_ms.load(Relaxed)))
                .min_by_key(|(_, t)| *t)
                .filter(|(_, t)| now.saturating_sub(*t) >= idle_ms)
                .map(|(addr, _)| addr);
            let Some(victim) = victim else {
                tracing::debug!(%client, "linksim flow table full");
                return None;
            };
            self.flows.remove(&victim);
        }
        let sock = match bind_towards(self.upstream).await {
            Ok(sock) => Arc::new(sock),
            Err(e) => {
                tracing::warn!(%client, error = %e, "linksim cannot open upstream socket");
                return None;
            }
        };
        let last_active_ms = Arc::new(AtomicU64::new(self.shared.now_ms()));
        let task = tokio::spawn(run_flow(
            sock.clone(),
            client,
            self.listen.clone(),
            self.down_tx.clone(),
            self.shared.clone(),
            last_active_ms.clone(),
        ));
        self.flows.insert(
            client,
            Flow {
                sock: sock.clone(),
                last_active_ms,
                task,
            },
        );
        self.shared.flows.store(self.flows.len(), Relaxed);
        tracing::debug!(%client, flows = self.flows.len(), "linksim flow opened");
        Some(sock)
    }
}

/// A socket connected to `upstream`, on loopback when the server is, so it sees a distinct peer.
async fn bind_towards(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let ip: IpAddr = match (upstream.ip(), upstream.ip().is_loopback()) {
        (IpAddr::V4(_), true) => Ipv4Addr::LOCALHOST.into(),
        (IpAddr::V4(_), false) => Ipv4Addr::UNSPECIFIED.into(),
        (IpAddr::V6(_), true) => Ipv6Addr::LOCALHOST.into(),
        (IpAddr::V6(_), false) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
    // Connected, so only the server's datagrams come back through this flow.
    sock.connect(upstream).await?;
    // Deliveries use `try_send`, which fails until the reactor has seen the socket writable.
    sock.writable().await?;
    Ok(sock)
}

/// Reads the server's datagrams for one client flow.
async fn run_flow(
    sock: Arc<UdpSocket>,
    client: SocketAddr,
    listen: Arc<UdpSocket>,
    down_tx: mpsc::Sender<Datagram>,
    shared: Arc<Shared>,
    last_active_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let counters = shared.counters(Direction::Down);
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                recv_error(&e).await;
                continue;
            }
        };
        let arrived = Instant::now();
        last_active_ms.store(shared.now_ms(), Relaxed);
        let dgram = Datagram {
            arrived,
            out: Out::Client(listen.clone(), client),
            data: buf[..n].to_vec(),
        };
        if down_tx.try_send(dgram).is_err() {
            Counters::bump(&counters.dropped_other);
        }
    }
}

async fn recv_error(e: &io::Error) {
    // ICMP port-unreachable from a server that is not up yet shows up here; keep going.
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "linksim receive failed");
    // Back off so a persistent error cannot spin a core.
    tokio::time::sleep(Duration::from_millis(10)).await;
}
