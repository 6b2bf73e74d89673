//! QUIC transport: quinn endpoints with mutual TLS that drive [`crate::proto`] sessions over
//! real streams: one control stream each way, one data stream per scan in transit.

pub mod admit;
mod blobs;
mod pace;
pub mod progress;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::node::config::SyncSection;
use crate::node::health::{self, Counters, StatusSender};
use crate::node::replica::NodeReplica;
use crate::node::Node;
use crate::proto::{wire, Action, Frame, Hash32, MissingReason, ProtoError, Session};
use crate::trust::{PeerIdentity, TlsMaterial, TrustError};

/// First byte of every unidirectional stream: what it carries.
const STREAM_CONTROL: u8 = 1;
const STREAM_BLOB: u8 = 2;
/// zstd level for control frames (documents): cheap, and they are small.
const CONTROL_LEVEL: i32 = 3;
/// Scans sent at once per connection: a second stream lets an urgent scan pass a bulk one.
const BLOB_SENDERS: usize = 2;
/// Scans received at once per connection.
const BLOB_RECEIVERS_MAX: usize = 4;
/// Bytes of control frames a connection may hold received but not yet handled, wire and
/// decoded together: one frame of the largest size (the session handles one at a time; smaller
/// frames pipeline within it).
const CONTROL_QUEUED_BYTES_MAX: usize = wire::FRAME_BYTES_MAX + wire::FRAME_RAW_BYTES_MAX;
/// Control frames a peer may send per second, sustained. A session sends a few dozen frames to
/// move 10,000 documents and about one a second while idle; each frame may cost this side a
/// store query or a document load, so a faster peer is read only at this pace (QUIC's flow
/// control then holds it back).
const CONTROL_FRAMES_PER_S: f64 = 500.0;
/// Control frames a peer may send at once before the pace applies.
const CONTROL_FRAMES_BURST: f64 = 2_000.0;
/// Push ticks between asking again for scans the peer could not give.
const RETRY_UNAVAILABLE_TICKS: u64 = 15;
/// Longest reason text sent in a CONNECTION_CLOSE frame.
const CLOSE_REASON_BYTES_MAX: usize = 200;
/// A scan whose transfer into this relay began or moved this recently is "arriving": a peer
/// below that asks for it gets its chunks as they come, instead of "not held".
const ARRIVING_RECENT: Duration = Duration::from_secs(120);
/// Documents of ours the peer still refuses, listed in a session's report at most.
const REFUSALS_LISTED_MAX: usize = 100;
/// Status frames closer together than this are ignored: a sender sends one per
/// `sync.status_interval_s` (at least 1 s), and each costs this side a write.
const STATUS_RECEIVED_GAP_MIN: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot reach {addr}: {reason}; check the address, that the peer runs `communesync serve`, and the link")]
    Unreachable { addr: String, reason: String },
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("connection to {peer} lost: {reason}")]
    Lost { peer: String, reason: String },
    #[error("local node: {0}")]
    Node(String),
    #[error("scan already stored here")]
    AlreadyStored,
    #[error("{0}")]
    Setup(String),
    /// Exit 5 like other network failures: the address may be free again later.
    #[error("cannot bind UDP {addr}: {source}; another `communesync serve` may be running, or another program holds the port")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A node refusing a session for lack of capacity closes it with a reason saying when to come
/// back: `busy: too many sessions, retry after N s`. Spread over this range, so that the peers
/// a regional outage sends back at once do not all return in the same second.
pub const BUSY_RETRY_AFTER_S: std::ops::RangeInclusive<u64> = 5..=30;
/// Longest retry-after a peer's reason is believed for (a hostile peer could say a year).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(3600);

/// The close reason of a session refused for lack of capacity.
pub fn busy_reason(retry_after_s: u64) -> String {
    format!("busy: too many sessions, retry after {retry_after_s} s")
}

/// The retry-after a peer's refusal named (in an error's text, its close reason included),
/// bounded; None if it named none.
pub fn retry_after(error_text: &str) -> Option<Duration> {
    let (_, rest) = error_text.split_once("retry after ")?;
    let secs: u64 = rest.split(' ').next()?.parse().ok()?;
    Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX))
}

/// Largest UDP payload a connection may grow to, where the route allows it (loopback, jumbo
/// Ethernet). quinn hands the kernel up to 10 equal segments in one GSO send, which must fit a
/// single 65,507-byte UDP datagram; 6,500 × 10 does. At this size QUIC's per-packet cost (about
/// 25 bytes and one AEAD operation) falls from 1.7 % of a 1,452-byte packet to 0.4 %.
pub const UDP_PAYLOAD_MAX: u16 = 6_500;
/// QUIC's smallest datagram, where path-MTU discovery starts.
pub const UDP_PAYLOAD_MIN: u16 = 1_200;
/// What PLPMTUD may probe up to where the route's MTU is unknown: quinn's own default, safe
/// for IPv6 over 1,500-byte Ethernet.
const UDP_PAYLOAD_DEFAULT: u16 = 1_452;

/// The largest UDP payload the local route to `peer` carries without fragmenting (interface
/// MTU, or a smaller path MTU the kernel learned), capped at [`UDP_PAYLOAD_MAX`]. It bounds
/// path-MTU discovery: beyond the first router the probes find the rest.
pub fn route_udp_payload(peer: SocketAddr) -> u16 {
    route_mtu(peer)
        .map(|mtu| {
            let headers = if peer.is_ipv4() { 28 } else { 48 };
            mtu.saturating_sub(headers)
                .clamp(u32::from(UDP_PAYLOAD_MIN), u32::from(UDP_PAYLOAD_MAX)) as u16
        })
        .unwrap_or(UDP_PAYLOAD_DEFAULT)
}

/// The kernel's MTU for the route to `peer` (`IP_MTU` of a socket connected to it).
#[cfg(target_os = "linux")]
fn route_mtu(peer: SocketAddr) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let bind: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(bind).ok()?;
    socket.connect(peer).ok()?;
    let (level, name) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the socket is open for the duration of the call, and `mtu`/`len` are a valid
    // c_int and its size, as getsockopt(2) expects for IP_MTU and IPV6_MTU.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| u32::try_from(mtu).ok()).flatten()
}

#[cfg(not(target_os = "linux"))]
fn route_mtu(_peer: SocketAddr) -> Option<u32> {
    None
}

/// Transport for a connection to `peer`. `known_mtu` is the MTU already found on that path:
/// the connection starts at it and sends no path-MTU probes, which would cost more than a
/// whole unchanged reconnect. Otherwise it probes from 1,200 bytes up to what the local route
/// carries ([`route_udp_payload`]).
pub fn path_transport(
    sync: &SyncSection,
    peer: SocketAddr,
    known_mtu: Option<u16>,
) -> quinn::TransportConfig {
    let mut t = transport_config(sync);
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    match known_mtu {
        Some(mtu) => {
            // Black-hole detection still falls back to 1200 bytes if the path has shrunk.
            t.initial_mtu(mtu);
            discovery.upper_bound(mtu);
        }
        None => {
            // quinn's binary search, down to 20-byte steps: about 9 probes of up to 6,500
            // bytes each way on loopback (107 KB for a first session), 4 on a 1,500-byte route.
            // Coarser steps cost less there, but end the search early on a path narrower than
            // its route (a tunnel): 1,200 bytes through a 1,500-byte link.
            discovery.upper_bound(route_udp_payload(peer));
        }
    }
    t.mtu_discovery_config(Some(discovery));
    t
}

/// Transport parameters for slow, lossy, high-latency links (see docs/architecture.md), on a
/// path not yet known: see [`path_transport`].
pub fn transport_config(sync: &SyncSection) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(sync.idle_timeout_s))
            .expect("validated idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(sync.keep_alive_s)));
    t.initial_rtt(Duration::from_millis(sync.initial_rtt_ms));
    // Windows sized for the largest bandwidth-delay product in the field (VSAT: 10 Mbit/s × 0.7 s).
    t.stream_receive_window(quinn::VarInt::from_u32(4 << 20));
    t.receive_window(quinn::VarInt::from_u32(32 << 20));
    t.send_window(32 << 20);
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    match sync.congestion.as_str() {
        "cubic" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        _ => t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
    };
    t
}

/// Endpoint settings with a stateless-reset key derived from the node's key: after a restart
/// the node can reset its peers' stale connections at once, instead of leaving them to wait
/// out the idle timeout before they reconnect.
fn endpoint_config(tls: &TlsMaterial) -> quinn::EndpointConfig {
    let seed = blake3::derive_key(
        "communesync 2026 QUIC stateless reset key",
        tls.key.to_pem().as_bytes(),
    );
    quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &seed,
    )))
}

/// Socket buffers asked of the kernel (which caps them at `net.core.rmem_max`/`wmem_max`).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Grows the socket's kernel buffers. At the default (208 KiB on Linux) a burst of scan data
/// overflows the receiver's buffer: on loopback 40 % of the packets sent were dropped there and
/// sent again. Kernel memory, not this process's.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    let sock = socket2::SockRef::from(socket);
    let receive = sock
        .set_recv_buffer_size(SOCKET_BUFFER_BYTES)
        .and_then(|()| sock.recv_buffer_size());
    let send = sock
        .set_send_buffer_size(SOCKET_BUFFER_BYTES)
        .and_then(|()| sock.send_buffer_size());
    match (receive, send) {
        // Linux reports twice what it granted (its bookkeeping included).
        (Ok(r), Ok(s)) if r >= SOCKET_BUFFER_BYTES && s >= SOCKET_BUFFER_BYTES => {}
        (r, s) => debug!(
            receive = ?r,
            send = ?s,
            "UDP buffers smaller than asked (docs/operations.md: raise net.core.rmem_max and wmem_max)"
        ),
    }
}

/// Zero-length connection ids (see [`endpoint`]).
struct NoConnectionIds;

impl quinn::ConnectionIdGenerator for NoConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&[])
    }

    fn cid_len(&self) -> usize {
        0
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

fn endpoint(
    bind: SocketAddr,
    tls: &TlsMaterial,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, NetError> {
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    size_socket_buffers(&socket);
    let runtime =
        quinn::default_runtime().ok_or_else(|| NetError::Setup("no async runtime".into()))?;
    let mut config = endpoint_config(tls);
    // Advertised to the peer as the largest datagram we take. quinn sizes its receive buffer
    // from it (× 64 GRO segments × 32 datagrams per call, 13 MB of address space), but the
    // kernel fills at most 64 KiB of each slot: the commune's peak RSS receiving 1 GB of scans
    // stayed at 36–44 MiB (`cargo bench --bench sync -- memory`).
    config
        .max_udp_payload_size(UDP_PAYLOAD_MAX)
        .expect("a valid UDP payload size");
    if server.is_none() {
        // A client endpoint carries one connection to one address, so it needs no connection
        // id to find it: every packet the peer sends (scans, mostly) is 8 bytes shorter.
        // The server keeps its ids, so the client's NAT may still rebind mid-connection.
        config.cid_generator(|| Box::new(NoConnectionIds));
    }
    quinn::Endpoint::new(config, server, socket, runtime)
        .map_err(|e| NetError::Setup(format!("cannot open a QUIC endpoint on {bind}: {e}")))
}

pub fn server_endpoint(
    listen: SocketAddr,
    tls: &TlsMaterial,
    cfg: quinn::ServerConfig,
) -> Result<quinn::Endpoint, NetError> {
    endpoint(listen, tls, Some(cfg))
}

pub fn client_endpoint(
    peer: SocketAddr,
    tls: &TlsMaterial,
    sync: &SyncSection,
    path_mtu: Option<u16>,
) -> Result<quinn::Endpoint, NetError> {
    // The configured source address (checked when the config was loaded), else any.
    let source = sync.source.as_deref().and_then(|s| s.parse().ok());
    let bind: SocketAddr = match source {
        Some(ip) => SocketAddr::new(ip, 0),
        None if peer.is_ipv4() => "0.0.0.0:0".parse().expect("literal address"),
        None => "[::]:0".parse().expect("literal address"),
    };
    let mut ep = endpoint(bind, tls, None)?;
    ep.set_default_client_config(crate::trust::quinn_client_config(
        tls,
        Arc::new(path_transport(sync, peer, path_mtu)),
    )?);
    Ok(ep)
}

/// Dials a peer and learns who it is from its certificate.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(quinn::Connection, PeerIdentity), NetError> {
    let unreachable = |reason: String| NetError::Unreachable {
        addr: addr.to_string(),
        reason,
    };
    let connecting = ep
        .connect(addr, crate::trust::SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| unreachable(format!("no answer within {} s", timeout.as_secs())))?
        .map_err(|e| unreachable(e.to_string()))?;
    let peer = crate::trust::peer_identity(&conn)?;
    Ok((conn, peer))
}

/// Longest a session with a peer this node's unit moved away from stays open to finish its
/// round (see [`run_session`]).
const MOVED_AWAY_GRACE: Duration = Duration::from_secs(10);

/// Longest a one-shot client waits for its CONNECTION_CLOSE to leave before it exits.
const CLOSE_SEND_WAIT: Duration = Duration::from_millis(100);

/// Closes a client endpoint whose session is over without waiting out QUIC's closing period.
///
/// [`quinn::Endpoint::wait_idle`] returns only after three probe timeouts (RFC 9000 §10.2),
/// during which a closed connection merely answers late packets with another
/// CONNECTION_CLOSE: an unchanged `sync` took 2.1–3.8 s on weak 4G and 11–12 s on 2G with it,
/// 0.8–1.3 s and 3.6 s without (docs/performance.md). The close leaves at the connection
/// driver's next poll, well inside [`CLOSE_SEND_WAIT`]. Should that datagram be lost, the peer
/// closes on its own: its session ends with the control stream that [`run_session`] finished
/// (and waited up to 2 s for the peer to acknowledge) before closing.
pub async fn close_client(ep: &quinn::Endpoint) {
    // Connections the session already closed keep their code and reason.
    ep.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(CLOSE_SEND_WAIT, ep.wait_idle()).await;
}

/// One-shot (`sync`: stop when both sides hold the same state) or continuous (`serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    OneShot,
    Continuous,
}

/// What a session did, for the summary line, `--json` and the status table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionReport {
    pub peer_unit: String,
    pub peer_node: String,
    pub docs_sent: u64,
    pub docs_received: u64,
    pub blobs_sent: u64,
    pub blobs_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub round_trips: u64,
    pub elapsed_ms: u64,
    /// Both sides hold every document change and every scan of the other's that the shared
    /// scope holds: nothing withheld, nothing missing.
    pub converged: bool,
    /// Scans of ours the peer asked for that this node held back (a scans window).
    pub scans_withheld: Vec<PendingScan>,
    /// Scans this node asked for and did not get, and why.
    pub scans_not_received: Vec<PendingScan>,
    /// Documents of the peer's this node's checks refused, and why (the rest were stored).
    pub docs_refused: Vec<RefusedDoc>,
    /// Documents of this node's the peer refused, and why.
    pub docs_refused_by_peer: Vec<RefusedDoc>,
}

/// A document one side refused: left out alone, the session went on.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedDoc {
    pub id: String,
    pub reason: String,
}

fn refused_docs(docs: &std::collections::BTreeMap<String, String>) -> Vec<RefusedDoc> {
    docs.iter()
        .map(|(id, reason)| RefusedDoc {
            id: id.clone(),
            reason: reason.clone(),
        })
        .collect()
}

/// A scan left behind by a session.
#[derive(Debug, Clone, Serialize)]
pub struct PendingScan {
    pub hash: String,
    pub reason: MissingReason,
    pub why: &'static str,
}

fn pending(scans: &std::collections::BTreeMap<Hash32, MissingReason>) -> Vec<PendingScan> {
    scans
        .iter()
        .map(|(hash, reason)| PendingScan {
            hash: hex::encode(hash),
            reason: *reason,
            why: reason.describe(),
        })
        .collect()
}

/// How long a one-shot sync waits on a peer it hears nothing from: the configured floor, or 8
/// round trips of the path when that is longer (a 2G path's RTT reaches 1.5 s, more when a
/// scan fills its queue). The sync's own keep-alives make a live peer answer well within it.
fn silence_max(floor: Duration, rtt: Duration) -> Duration {
    floor.max(rtt * 8)
}

enum Event {
    Frame(Frame, Queued),
    ControlEnded,
    BlobDone(Hash32, bool),
    BlobAlreadyStored(Hash32),
    BlobSent,
    Failed(NetError),
}

/// Reads the next frame's length prefix; None at the stream's clean end. A frame longer than
/// `frame_bytes_max` (the bound of this kind of stream) is refused before it is read.
async fn read_len(
    recv: &mut RecvStream,
    frame_bytes_max: usize,
) -> Result<Option<usize>, NetError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(lost(e.to_string())),
    }
    let len = wire::frame_len(header)?;
    if len > frame_bytes_max {
        return Err(ProtoError::Violation(format!(
            "a frame of {len} bytes on a stream whose frames are at most {frame_bytes_max}"
        ))
        .into());
    }
    Ok(Some(len))
}

/// Reads a frame's `len` bytes after its length prefix.
async fn read_body(recv: &mut RecvStream, len: usize) -> Result<bytes::Bytes, NetError> {
    // Read as QUIC's own chunks into one buffer (not zeroed first), which a scan chunk's data
    // then shares: one copy from the stream to the store.
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(lost("the stream ended inside a frame".into())),
            Err(e) => return Err(lost(e.to_string())),
        }
    }
    Ok(body.into())
}

fn lost(reason: String) -> NetError {
    NetError::Lost {
        peer: "peer".into(),
        reason,
    }
}

/// Reads one frame of at most `frame_bytes_max` bytes; None at the stream's clean end.
async fn read_frame(
    recv: &mut RecvStream,
    frame_bytes_max: usize,
) -> Result<Option<Frame>, NetError> {
    let Some(len) = read_len(recv, frame_bytes_max).await? else {
        return Ok(None);
    };
    Ok(Some(wire::decode_shared(&read_body(recv, len).await?)?))
}

/// A received control frame's share of [`CONTROL_QUEUED_BYTES_MAX`], given back once the
/// session has handled the frame.
struct Queued {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Reads the control stream into `events` until it ends or fails.
async fn read_control(mut recv: RecvStream, events: mpsc::Sender<Event>) {
    let queued = Arc::new(tokio::sync::Semaphore::new(CONTROL_QUEUED_BYTES_MAX));
    let mut rate = FrameRate::new(Instant::now());
    loop {
        let wait = rate.take(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let event = match next_control(&mut recv, &queued).await {
            Ok(Some((frame, held))) => Event::Frame(frame, held),
            Ok(None) => Event::ControlEnded,
            Err(e) => Event::Failed(e),
        };
        let last = !matches!(event, Event::Frame(..));
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}

/// A token bucket of control frames: [`CONTROL_FRAMES_BURST`] at once, then
/// [`CONTROL_FRAMES_PER_S`].
struct FrameRate {
    tokens: f64,
    at: Instant,
}

impl FrameRate {
    fn new(now: Instant) -> Self {
        FrameRate {
            tokens: CONTROL_FRAMES_BURST,
            at: now,
        }
    }

    /// Takes one frame's token; returns how long to wait before reading it.
    fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * CONTROL_FRAMES_PER_S).min(CONTROL_FRAMES_BURST) - 1.0;
        self.at = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / CONTROL_FRAMES_PER_S)
        }
    }
}

/// The next control frame, within the connection's budget of queued control bytes: what it
/// takes on the wire, then decoded, is reserved before it is read, then before it is
/// decompressed, so a peer that sends faster than the session handles waits (QUIC's flow
/// control then holds it back) instead of filling this node's memory.
async fn next_control(
    recv: &mut RecvStream,
    queued: &Arc<tokio::sync::Semaphore>,
) -> Result<Option<(Frame, Queued)>, NetError> {
    let Some(len) = read_len(recv, wire::FRAME_BYTES_MAX).await? else {
        return Ok(None);
    };
    let reserve = |n: usize| {
        // Never more than the budget holds: frame_len and decoded_bytes are bounded below it.
        let n = u32::try_from(n).expect("bounded by CONTROL_QUEUED_BYTES_MAX");
        queued.clone().acquire_many_owned(n)
    };
    let closed = |_| NetError::Setup("the control budget closed".into());
    let mut held = reserve(len).await.map_err(closed)?;
    let body = read_body(recv, len).await?;
    held.merge(
        reserve(wire::decoded_bytes(&body)? - len)
            .await
            .map_err(closed)?,
    );
    Ok(Some((
        wire::decode_shared(&body)?,
        Queued { _permit: held },
    )))
}

async fn write_frame(send: &mut SendStream, frame: &Frame, level: i32) -> Result<(), NetError> {
    send.write_all(&wire::encode(frame, level))
        .await
        .map_err(|e| NetError::Lost {
            peer: "peer".into(),
            reason: e.to_string(),
        })
}

/// Accepts the peer's streams: its control stream feeds frames, each blob stream is received.
fn spawn_acceptor(conn: quinn::Connection, dir: PathBuf, events: mpsc::Sender<Event>) {
    tokio::spawn(async move {
        let receivers = Arc::new(tokio::sync::Semaphore::new(BLOB_RECEIVERS_MAX));
        let mut control_seen = false;
        while let Ok(mut recv) = conn.accept_uni().await {
            let mut tag = [0u8; 1];
            if recv.read_exact(&mut tag).await.is_err() {
                continue;
            }
            let events = events.clone();
            match tag[0] {
                STREAM_CONTROL if control_seen => {
                    // One control stream per connection: a second would double what the peer
                    // may queue here, and a well-behaved peer never opens one.
                    let _ = events
                        .send(Event::Failed(
                            ProtoError::Violation("the peer opened a second control stream".into())
                                .into(),
                        ))
                        .await;
                    break;
                }
                STREAM_CONTROL => {
                    control_seen = true;
                    tokio::spawn(read_control(recv, events));
                }
                STREAM_BLOB => {
                    let Ok(permit) = receivers.clone().acquire_owned().await else {
                        break;
                    };
                    let (dir, conn) = (dir.clone(), conn.clone());
                    tokio::spawn(async move {
                        let result = blobs::receive(&mut recv, &dir, &conn).await;
                        drop(permit);
                        match result {
                            Ok(hash) => {
                                let _ = events.send(Event::BlobDone(hash, true)).await;
                            }
                            Err((Some(hash), NetError::AlreadyStored)) => {
                                debug!(
                                    "scan {} from peer already stored here; dropped",
                                    hex::encode(hash)
                                );
                                let _ = events.send(Event::BlobAlreadyStored(hash)).await;
                            }
                            // A cut link is not a refusal: what arrived verified is kept.
                            Err((Some(hash), e @ NetError::Lost { .. })) => {
                                info!("scan {} from peer interrupted ({e}); the next session resumes it", hex::encode(hash));
                                let _ = events.send(Event::BlobDone(hash, false)).await;
                            }
                            Err((Some(hash), e)) => {
                                warn!("scan {} from peer refused: {e}", hex::encode(hash));
                                let _ = events.send(Event::BlobDone(hash, false)).await;
                            }
                            Err((None, e @ NetError::Lost { .. })) => {
                                info!("scan stream from peer interrupted: {e}")
                            }
                            Err((None, e)) => warn!("scan stream from peer refused: {e}"),
                        }
                    });
                }
                other => warn!("peer opened a stream of unknown type {other}; ignored"),
            }
        }
    });
}

/// Runs one session over an authenticated connection until it converges (one-shot), or until
/// the connection or `shutdown` ends it (continuous). A continuous session offers local
/// writes at each push tick, and at once when `wake` moves (see [`Node::wake_daemon`]).
/// `counters`, when given, counts the session's sync rounds for `/metrics`.
pub async fn run_session(
    conn: quinn::Connection,
    peer: PeerIdentity,
    dir: PathBuf,
    mode: Mode,
    mut shutdown: watch::Receiver<bool>,
    mut wake: Option<watch::Receiver<u64>>,
    counters: Option<Counters>,
) -> Result<SessionReport, NetError> {
    let started = Instant::now();
    let node_err = |e: crate::node::NodeError| NetError::Node(format!("{e:#}"));
    let mut node = Node::open(&dir).map_err(node_err)?;
    // The certificate names the unit the peer was enrolled for; the province's tree may have
    // moved that unit since (the CA signed both). Scope and checks use its current path, read
    // again whenever a newer tree is installed during the session.
    let enrolled_unit = peer.unit.clone();
    let mut peer = peer;
    peer.unit = node.tree.canonical(&enrolled_unit).to_string();
    // The handshake checked the CRL the endpoint was built with; a newer one may be on disk.
    if node.crl().is_some_and(|crl| crl.is_revoked(&peer.serial)) {
        conn.close(1u32.into(), b"revoked");
        return Err(NetError::Trust(TrustError::RevokedNode {
            node: peer.node_id,
        }));
    }
    // A peer that broke the protocol or its budgets lately waits before its next session.
    if let Some(wait) = node.peer_strike_wait(&peer).map_err(node_err)? {
        let reason = format!(
            "node {} ({}) broke the protocol or a budget in a recent session; retry in {} s",
            peer.node_id,
            peer.unit,
            wait.as_secs() + 1
        );
        conn.close(
            1u32.into(),
            &reason.as_bytes()[..reason.len().min(CLOSE_REASON_BYTES_MAX)],
        );
        return Err(NetError::Proto(ProtoError::Refused(reason)));
    }
    node.record_contact(&peer).map_err(node_err)?;
    // The peer's certificate checks the signatures of the changes it made.
    let peer_der = crate::trust::peer_cert_der(&conn)?;
    node.learn_cert(&peer_der).map_err(node_err)?;
    node.session_opened(&peer).map_err(node_err)?;
    let (crl_number, mut crl_der) = node
        .crl()
        .map(|c| (c.number(), c.der().to_vec()))
        .unwrap_or((0, Vec::new()));
    let push_every = Duration::from_millis(node.config.sync.push_interval_ms);
    let limit = node.config.sync.limit_for(&peer.unit).cloned();
    let rate = Arc::new(pace::RateLimit::new(
        limit.as_ref().and_then(|l| l.rate_kbps),
    ));
    let utc_offset = node.config.node.utc_offset();

    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    spawn_acceptor(conn.clone(), dir.clone(), events_tx.clone());
    let (lost_unit, lost_conn) = (peer.unit.clone(), conn.clone());
    // A stream error only says "connection lost"; the peer's close reason (a busy refusal's
    // retry-after, a revocation) is what the caller needs.
    let lost = move |e: String| NetError::Lost {
        peer: lost_unit.clone(),
        reason: lost_conn.close_reason().map_or(e, |r| r.to_string()),
    };
    let mut control = conn.open_uni().await.map_err(|e| lost(e.to_string()))?;
    control.set_priority(10).ok();
    control
        .write_all(&[STREAM_CONTROL])
        .await
        .map_err(|e| lost(e.to_string()))?;

    let (blob_queue, blob_rx) = async_channel();
    let pacer = Arc::new(pace::Pacer::new(conn.clone()));
    for _ in 0..BLOB_SENDERS {
        blobs::spawn_sender(
            conn.clone(),
            dir.clone(),
            blob_rx.clone(),
            events_tx.clone(),
            (rate.clone(), pacer.clone()),
        );
    }

    // Size and time of the signed tree file when last read (see the push tick).
    let mut units_stamp = None;
    let mut units_signed = node
        .units_signed()
        .map(|t| t.bytes.clone())
        .unwrap_or_default();
    let units_version = node.units_version();
    let mut session = Session::with_units(
        &mut NodeReplica::new(&mut node, peer.clone()),
        crl_number,
        units_version,
    )?;
    let mut report = SessionReport {
        peer_unit: peer.unit.clone(),
        peer_node: peer.node_id.to_string(),
        ..Default::default()
    };
    let mut sent_since_receive = false;
    let mut ticks: u64 = 0;
    let (mut was_converged, mut recorded) = (false, (0u64, 0u64));
    // A serving relay above the peer forwards a scan still arriving here chunk by chunk.
    let relay_for_peer =
        mode == Mode::Continuous && crate::node::replica::is_upstream(node.unit(), &peer.unit);
    let silence_floor = Duration::from_secs(node.config.sync.peer_silence_s);
    let mut heard = (conn.stats().udp_rx.datagrams, Instant::now());
    let mut tick = tokio::time::interval(push_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Connected and last seen (`status`): the last frame's time, recorded every LIVE_BEAT.
    let (mut last_frame_ms, mut beat_at) = (crate::node::now_ms(), Instant::now());
    let mut round_started = Instant::now();
    // A node publishes its status, and its subtree's, to the nodes above it.
    let mut status_out = crate::node::replica::is_upstream(&peer.unit, node.unit())
        .then(|| StatusSender::new(Duration::from_secs(node.config.sync.status_interval_s)));
    let mut status_in_at: Option<Instant> = None;
    let dialled_upstream =
        mode == Mode::Continuous && crate::node::replica::is_upstream(&peer.unit, node.unit());
    let mut moved_away_at: Option<Instant> = None;

    let outcome: Result<(), NetError> = async {
        loop {
            // Send everything the session has to say, and start the scan transfers it asked for.
            {
                let mut replica = NodeReplica::new(&mut node, peer.clone());
                // Statuses only inform: failing to gather or keep them costs no sync.
                if let Some(sender) = status_out.as_mut() {
                    match sender.due(replica.node, Instant::now()) {
                        Ok(Some(out)) => session.send_status(out.certs, out.entries),
                        Ok(None) => {}
                        Err(e) => warn!(peer = %peer.unit, "could not gather this node's status: {e}"),
                    }
                }
                session.offer_crl(&crl_der);
                session.offer_units(&units_signed);
                while let Some(frame) = blocking(|| session.poll_frame(&mut replica))? {
                    write_frame(&mut control, &frame, CONTROL_LEVEL).await?;
                    sent_since_receive = true;
                }
                while let Some(action) = session.poll_action() {
                    match action {
                        Action::SendBlob { hash, from } => {
                            let window_open = limit.as_ref().is_none_or(|l| l.window_open(local_minute(utc_offset)));
                            let store_err = |e: crate::store::StoreError| NetError::Node(e.to_string());
                            if !window_open {
                                debug!(peer = %peer.unit, "scan deferred: outside the scans window");
                                session.blob_unavailable_here(hash, MissingReason::Deferred);
                            } else if !replica.node.blob_readable_by(&hash, &peer).map_err(node_err)? {
                                // Only scans the peer may read leave this node (docs/security.md).
                                // Often benign: the document has not reached this node yet. A scan
                                // not here yet that a dispatch from below the peer attaches is said
                                // to be not held (the asker tries again): it is on its way up and
                                // becomes readable once stored. Any other hash gets the same answer
                                // held or not, so asking is no oracle of what this node holds.
                                debug!(peer = %peer.unit, "scan not attached here to a document of the peer's scope written by another unit; not sent");
                                let store = &replica.node.store;
                                let awaited = !store.has_blob(&hash).map_err(store_err)?
                                    && store.blob_attached_below(&hash, &peer.unit).map_err(store_err)?;
                                let reason = if awaited { MissingReason::NotHeld } else { MissingReason::NotInScope };
                                session.blob_unavailable_here(hash, reason);
                            } else if replica.node.store.has_blob(&hash).map_err(store_err)? {
                                let _ = blob_queue.send((hash, from)).await;
                            } else if relay_for_peer && replica.node.store.blob_arriving(&hash, crate::node::now_ms(), ARRIVING_RECENT.as_millis() as i64).map_err(store_err)? {
                                // Cut-through: the scan is arriving here right now; its verified
                                // chunks are forwarded as they come (net::blobs). A scan nobody
                                // is sending here is answered at once: the asker may be its only
                                // source, and two nodes must not wait on each other.
                                let _ = blob_queue.send((hash, from)).await;
                            } else {
                                session.blob_unavailable_here(hash, MissingReason::NotHeld);
                            }
                        }
                        Action::StoreCrl { der } => replica.node.install_crl_der(&der).map_err(node_err)?,
                        Action::StoreUnits { signed } => {
                            // A tree that fails its checks is the province's problem or a
                            // hostile relay's, not this session's: logged, and sync goes on.
                            match replica.node.install_units(&signed) {
                                Ok(true) => {
                                    units_signed = signed;
                                    session.update_units(replica.node.units_version());
                                    replica.peer.unit = replica.node.tree.canonical(&enrolled_unit).to_string();
                                    peer.unit = replica.peer.unit.clone();
                                    if replica.node.scope_grew_for(&peer.unit) {
                                        session.reoffer_from(&mut replica, 0)?;
                                    }
                                }
                                Ok(false) => {}
                                Err(e) => warn!("unit tree from {} refused: {e}", peer.unit),
                            }
                        }
                        Action::StoreStatus { entries } => {
                            if status_in_at.is_some_and(|at| at.elapsed() < STATUS_RECEIVED_GAP_MIN) {
                                debug!(peer = %peer.unit, "status frame too soon after the last one; ignored");
                                continue;
                            }
                            status_in_at = Some(Instant::now());
                            let accepted = match replica.node.accept_statuses(&peer, entries) {
                                Ok(accepted) => accepted,
                                Err(e) => {
                                    warn!(peer = %peer.unit, "could not keep the peer's statuses: {e}");
                                    continue;
                                }
                            };
                            for why in &accepted.refused {
                                warn!(peer = %peer.unit, "status refused: {why}");
                            }
                            if !accepted.refused.is_empty() {
                                if let Some(c) = &counters {
                                    c.refused("status");
                                }
                            }
                        }
                    }
                }
                // Frames the actions produced (BlobMissing) go out now too.
                while let Some(frame) = blocking(|| session.poll_frame(&mut replica))? {
                    write_frame(&mut control, &frame, CONTROL_LEVEL).await?;
                }
            }
            let converged = session.is_converged();
            if converged != was_converged {
                if converged {
                    if let Some(c) = &counters {
                        c.round(&peer.unit, round_started.elapsed());
                    }
                } else {
                    round_started = Instant::now();
                }
            }
            if converged && !was_converged {
                // A long-lived session records each point where both sides agree.
                let stats = conn.stats();
                node.record_session(&peer, true, None, stats.udp_tx.bytes - recorded.0, stats.udp_rx.bytes - recorded.1)
                    .map_err(node_err)?;
                recorded = (stats.udp_tx.bytes, stats.udp_rx.bytes);
            }
            was_converged = converged;
            if mode == Mode::OneShot && session.is_done() {
                return Ok(());
            }
            // The province moved this node away from the peer it kept a session with: the
            // peer no longer takes what this node writes; `serve` dials the new parent.
            // It ends once both sides are done (the peer's refusals of what this node wrote
            // before it learnt of the move have arrived), or after MOVED_AWAY_GRACE.
            if dialled_upstream && !crate::node::replica::is_upstream(&peer.unit, node.unit()) {
                let since = *moved_away_at.get_or_insert_with(Instant::now);
                if session.is_done() || since.elapsed() > MOVED_AWAY_GRACE {
                    info!(peer = %peer.unit, unit = node.unit(), "this node's unit moved away from the peer; ending the session");
                    return Ok(());
                }
            }
            tokio::select! {
                // Events first: the peer's last frames (its Ack) are read before it closes, so
                // when both are ready they must be handled before the close ends the session.
                biased;
                event = events.recv() => {
                    let mut replica = NodeReplica::new(&mut node, peer.clone());
                    // A control frame, or a scan whose last frame just arrived.
                    if matches!(event, Some(Event::Frame(..) | Event::BlobDone(..) | Event::BlobAlreadyStored(_))) {
                        last_frame_ms = crate::node::now_ms();
                    }
                    match event {
                        Some(Event::Frame(frame, _queued)) => {
                            if sent_since_receive {
                                report.round_trips += 1;
                                sent_since_receive = false;
                            }
                            debug!(?frame, "frame from {}", peer.unit);
                            if let Err(e) = blocking(|| session.handle(&mut replica, frame)) {
                                if let ProtoError::Refused(reason) = &e {
                                    let _ = write_frame(&mut control, &Frame::Refused { reason: reason.clone() }, 1).await;
                                }
                                return Err(e.into());
                            }
                        }
                        Some(Event::BlobDone(hash, ok)) => {
                            if ok {
                                let from = peer.node_id.to_string();
                                replica.node.store.write(|tx| tx.blob_source(&hash, &from)).map_err(|e| NetError::Node(e.to_string()))?;
                            }
                            session.blob_finished(&mut replica, &hash, ok)?
                        }
                        Some(Event::BlobAlreadyStored(hash)) => session.blob_already_stored(&mut replica, &hash)?,
                        Some(Event::BlobSent) => report.blobs_sent += 1,
                        Some(Event::Failed(e)) => return Err(e),
                        Some(Event::ControlEnded) | None => {
                            return if session.is_done() || mode == Mode::Continuous { Ok(()) } else { Err(lost("the peer ended the session early".into())) };
                        }
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if mode == Mode::OneShot {
                        // A peer that died (or a link that went dark) costs a few seconds, not
                        // the idle timeout: any datagram from it, keep-alive ACKs included,
                        // proves it alive.
                        let received = conn.stats().udp_rx.datagrams;
                        if received != heard.0 {
                            heard = (received, Instant::now());
                        } else if heard.1.elapsed() > silence_max(silence_floor, conn.rtt()) {
                            let st = &session.stats;
                            return Err(lost(format!(
                                "no packet from the peer for {:.0} s (path RTT {} ms): it stopped or the link is cut; \
                                 so far {} documents sent, {} received, {} of {} scans requested received; \
                                 all of it is stored and the next sync resumes from there",
                                heard.1.elapsed().as_secs_f64(),
                                conn.rtt().as_millis(),
                                st.docs_sent,
                                st.docs_received,
                                st.blobs_received,
                                st.blobs_requested,
                            )));
                        }
                        continue;
                    }
                    if beat_at.elapsed() >= health::LIVE_BEAT {
                        beat_at = Instant::now();
                        // Only `status` relies on it: a failed write costs no sync.
                        if let Err(e) = node.session_beat(&peer, last_frame_ms) {
                            warn!(peer = %peer.unit, "could not record the session as open: {e}");
                        }
                    }
                    let retry = ticks.is_multiple_of(RETRY_UNAVAILABLE_TICKS);
                    session.poll_local_changes(&mut NodeReplica::new(&mut node, peer.clone()), retry)?;
                    if let Some(crl) = node.crl() {
                        if crl.is_revoked(&peer.serial) {
                            return Err(NetError::Trust(TrustError::RevokedNode { node: peer.node_id }));
                        }
                        // Revocations travel on open sessions too, hop by hop down the tree.
                        if crl.der() != crl_der.as_slice() {
                            session.update_crl(crl.number());
                            crl_der = crl.der().to_vec();
                        }
                    }
                    // So does a unit tree another session (or `unit publish`) installed here;
                    // the file is read only when its size or time changed (it is replaced whole).
                    let tree_file = dir.join(crate::node::tree::SIGNED_UNITS_FILE);
                    let stamp = std::fs::metadata(&tree_file).ok().map(|m| (m.len(), m.modified().ok()));
                    if stamp.is_some() && stamp != units_stamp {
                        units_stamp = stamp;
                        if let Ok(held) = std::fs::read(&tree_file) {
                            if held != units_signed && node.install_units(&held).is_ok() {
                                session.update_units(node.units_version());
                                units_signed = held;
                                peer.unit = node.tree.canonical(&enrolled_unit).to_string();
                                if node.scope_grew_for(&peer.unit) {
                                    session.reoffer_from(&mut NodeReplica::new(&mut node, peer.clone()), 0)?;
                                }
                            }
                        }
                    }
                }
                woken = async {
                    match wake.as_mut() {
                        Some(w) => w.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                } => {
                    if !woken {
                        wake = None;
                    } else if mode == Mode::Continuous {
                        session.poll_local_changes(&mut NodeReplica::new(&mut node, peer.clone()), false)?;
                    }
                }
                _ = shutdown.changed() => return Ok(()),
                reason = conn.closed() => {
                    return if session.is_done() || mode == Mode::Continuous { Ok(()) } else { Err(lost(reason.to_string())) };
                }
            }
        }
    }
    .await;

    // A change of ours the peer refused in an earlier session is still missing there.
    let (standing, standing_total) = node
        .store
        .refusals(&peer.node_id.to_string(), true, REFUSALS_LISTED_MAX)
        .map_err(|e| NetError::Node(e.to_string()))?;
    report.converged = outcome.is_ok() && session.is_converged() && standing_total == 0;
    report.scans_withheld = pending(session.scans_withheld())
        .into_iter()
        .filter(|s| s.reason == MissingReason::Deferred)
        .collect();
    report.scans_not_received = pending(session.scans_not_received());
    report.docs_refused = refused_docs(session.docs_refused());
    report.docs_refused_by_peer = standing
        .into_iter()
        .map(|(id, reason, _)| RefusedDoc { id, reason })
        .collect();
    report.docs_sent = session.stats.docs_sent;
    report.docs_received = session.stats.docs_received;
    report.blobs_received = session.stats.blobs_received;
    // Let the peer read our last frames (its Ack, or why we refused) before the connection closes.
    let _ = control.finish();
    let linger = if outcome.is_ok() {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(500)
    };
    let _ = tokio::time::timeout(linger, control.stopped()).await;
    let stats = conn.stats();
    report.bytes_sent = stats.udp_tx.bytes;
    report.bytes_received = stats.udp_rx.bytes;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    debug!(
        mtu = stats.path.current_mtu,
        sent_packets = stats.path.sent_packets,
        lost_packets = stats.path.lost_packets,
        lost_bytes = stats.path.lost_bytes,
        congestion_events = stats.path.congestion_events,
        udp_tx_datagrams = stats.udp_tx.datagrams,
        udp_rx_datagrams = stats.udp_rx.datagrams,
        "connection statistics"
    );
    let error = outcome.as_ref().err().map(|e| e.to_string());
    match &error {
        None => conn.close(0u32.into(), b"done"),
        // The reason also travels in the close frame, so the peer can say why it was cut off.
        Some(reason) => conn.close(
            1u32.into(),
            &reason.as_bytes()[..reason.len().min(CLOSE_REASON_BYTES_MAX)],
        ),
    }
    if let Err(e) = node.session_closed(&peer, last_frame_ms) {
        warn!(peer = %peer.unit, "could not record the session as ended: {e}");
    }
    node.record_session(
        &peer,
        report.converged && !was_converged,
        error.as_deref(),
        report.bytes_sent - recorded.0.min(report.bytes_sent),
        report.bytes_received - recorded.1.min(report.bytes_received),
    )
    .map_err(node_err)?;
    let violated = matches!(
        &outcome,
        Err(NetError::Proto(
            ProtoError::Violation(_) | ProtoError::Malformed(_) | ProtoError::Refused(_)
        ))
    );
    node.record_peer_strike(&peer, violated).map_err(node_err)?;
    match outcome {
        Ok(()) => {
            info!(peer = %peer.unit, docs_in = report.docs_received, docs_out = report.docs_sent, bytes_out = report.bytes_sent, "session ended");
            Ok(report)
        }
        Err(e) => Err(e),
    }
}

/// Runs store-bound protocol work (applying a frame of documents, loading documents to send)
/// off the async worker, so the connection's other tasks (its UDP I/O, the stream reading the
/// next frame) keep running meanwhile on the multi-threaded runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Minutes after local midnight at the node's UTC offset.
fn local_minute(offset: time::UtcOffset) -> u32 {
    let now = time::OffsetDateTime::now_utc().to_offset(offset);
    u32::from(now.hour()) * 60 + u32::from(now.minute())
}

/// A scan to send: its hash and the first chunk the peer lacks.
type BlobRequest = (Hash32, u64);
/// The scan senders' shared end of the queue.
type SharedBlobQueue = Arc<tokio::sync::Mutex<mpsc::Receiver<BlobRequest>>>;

/// A bounded multi-consumer queue of scans to send, in the order the receiver asked for them.
fn async_channel() -> (mpsc::Sender<BlobRequest>, SharedBlobQueue) {
    let (tx, rx) = mpsc::channel(crate::proto::session::BLOB_WANT_MAX * 2);
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;
    use crate::trust::{enrol_request, Ca, NodeKey, Role};
    use linksim::{LinkProfile, LinkSim};

    fn enrol(ca: &Ca, unit: &str, role: Role) -> TlsMaterial {
        let key = NodeKey::generate().unwrap();
        let issued = ca
            .issue(&enrol_request(&key).unwrap(), unit, role, 30)
            .unwrap();
        TlsMaterial {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            key,
            crl: None,
        }
    }

    /// A one-shot `sync` exits as soon as its close has left, not three probe timeouts later,
    /// and the peer still learns that the session is over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_client_exits_without_waiting_out_the_closing_period() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(tmp.path().join("ca"), "qn").unwrap();
        let province = enrol(&ca, "qn", Role::Province);
        let commune = enrol(&ca, "qn/binhlieu/tinhhuc", Role::Commune);
        let sync = SyncSection::default();
        let server_cfg =
            crate::trust::quinn_server_config(&province, Arc::new(transport_config(&sync)))
                .unwrap();
        let server =
            server_endpoint((Ipv4Addr::LOCALHOST, 0).into(), &province, server_cfg).unwrap();
        // 300 ms each way: three probe timeouts come to several seconds.
        let link = LinkProfile {
            delay_ms: 300,
            ..LinkProfile::loopback()
        };
        let sim = LinkSim::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            server.local_addr().unwrap(),
            link.clone(),
            link,
            1,
            vec![],
        )
        .await
        .unwrap();
        let accepted = {
            let server = server.clone();
            tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() })
        };
        let client = client_endpoint(sim.local_addr(), &commune, &sync, Some(1452)).unwrap();
        let (conn, peer) = connect(&client, sim.local_addr(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(peer.unit, "qn");
        let server_conn = accepted.await.unwrap();
        conn.close(0u32.into(), b"done");

        let started = Instant::now();
        close_client(&client).await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(600),
            "the client waited {took:?} after closing"
        );
        let reason = tokio::time::timeout(Duration::from_secs(3), server_conn.closed())
            .await
            .expect("the server heard of the close within one trip");
        assert!(
            matches!(reason, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == 0u32.into()),
            "the server saw {reason:?}"
        );
        server.close(0u32.into(), b"");
        sim.shutdown().await;
    }

    #[test]
    fn a_busy_refusal_says_when_to_come_back_and_is_believed_within_bounds() {
        let reason = busy_reason(17);
        let error = format!("connection to qn lost: closed by peer: {reason} (code 2)");
        assert_eq!(retry_after(&error), Some(Duration::from_secs(17)));
        assert_eq!(
            retry_after("busy: too many sessions, retry after 999999999 s"),
            Some(RETRY_AFTER_MAX)
        );
        assert_eq!(retry_after("connection lost: timed out"), None);
        assert_eq!(retry_after("retry after soon"), None);
    }

    #[test]
    fn a_peer_sending_control_frames_faster_than_the_budget_is_read_at_its_pace() {
        let start = Instant::now();
        let mut rate = FrameRate::new(start);
        // A burst is read at once...
        for _ in 0..CONTROL_FRAMES_BURST as usize {
            assert_eq!(rate.take(start), Duration::ZERO);
        }
        // ...then each further frame waits its share of a second, however fast they come.
        let wait = rate.take(start);
        assert_eq!(wait, Duration::from_secs_f64(1.0 / CONTROL_FRAMES_PER_S));
        let later = start + wait;
        assert_eq!(
            rate.take(later),
            Duration::from_secs_f64(1.0 / CONTROL_FRAMES_PER_S)
        );
        // A quiet peer earns its burst back, and no more.
        let rested = later + Duration::from_secs(3600);
        for _ in 0..CONTROL_FRAMES_BURST as usize {
            assert_eq!(rate.take(rested), Duration::ZERO);
        }
        assert!(rate.take(rested) > Duration::ZERO);
    }
}
