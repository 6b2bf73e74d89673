//! Orchestration above the network: the one-shot `sync` and the `serve` daemon (accepting
//! peers, dialling the ones it should reach, reloading the CRL and the config), built from net
//! sessions over a node's store.

mod notify;
pub mod path;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::net::admit::{self, Admission, Admit, PathCache};
use crate::net::{self, Mode, SessionReport};
use crate::node::admin::resolve;
use crate::node::health::Counters;
use crate::node::{Node, NodeError, Result};
use crate::trust::{self, PeerIdentity};

/// How long `sync` waits for the peer to answer the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// [`resolve`] for a stored peer, whose address had the right shape when it was added: a
/// failure is the network's (no DNS answer), and ends the sync like an unreachable peer (exit 5).
fn resolve_peer(addr: &str) -> std::result::Result<SocketAddr, net::NetError> {
    resolve(addr).map_err(|e| net::NetError::Unreachable {
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// Records which node answered under a peer name (used by `bundle export --for NAME`).
fn bind_peer(dir: &Path, name: &str, identity: &PeerIdentity) -> Result<()> {
    let mut node = Node::open(dir)?;
    node.record_contact(identity)?;
    let id = identity.node_id.to_string();
    Ok(node.store.write(|tx| tx.peer_bind(name, &id))?)
}

/// glibc malloc arenas a daemon may use. Each thread that decodes a peer's frame may otherwise
/// take an arena of its own (up to 8 per core) and keep what it freed there, so the same attack
/// left the daemon at 72 to 370 MiB from run to run (docs/performance.md, "Under attack").
const MALLOC_ARENAS_MAX: i32 = 2;

/// Caps glibc's malloc arenas for a long-running daemon, before its threads start.
pub fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before the runtime's threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS_MAX);
    }
}

/// Sessions one peer node may hold open here at once: its `serve` and a one-shot `sync` run by
/// hand. One certificate so buys two sessions' budgets (memory, CPU time, streams), not
/// `sync.connections_max` of them.
const SESSIONS_PER_NODE_MAX: usize = 2;

/// Close code of a session replaced by a newer connection of the same node.
const REPLACED_CODE: u32 = 3;

/// The open sessions of each peer node, oldest first. A connection beyond
/// [`SESSIONS_PER_NODE_MAX`] replaces the node's oldest, which is what a node reconnecting after
/// a cut needs: its old connection may not have timed out here yet.
#[derive(Clone, Default)]
struct OpenSessions(Arc<std::sync::Mutex<HashMap<String, Vec<quinn::Connection>>>>);

impl OpenSessions {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<quinn::Connection>>> {
        // A panic while holding the map leaves it whole (pushes and removes only).
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `conn` as a session of `node`, closing the oldest one beyond the limit.
    fn open(&self, node: &str, conn: &quinn::Connection) {
        let replaced = {
            let mut sessions = self.sessions();
            let open = sessions.entry(node.to_string()).or_default();
            open.push(conn.clone());
            (open.len() > SESSIONS_PER_NODE_MAX).then(|| open.remove(0))
        };
        if let Some(old) = replaced {
            info!(
                node,
                "a newer connection of the node replaces its oldest open session"
            );
            old.close(
                REPLACED_CODE.into(),
                b"replaced by a newer connection of the same node",
            );
        }
    }

    /// Forgets `conn` as a session of `node`.
    fn close(&self, node: &str, conn: &quinn::Connection) {
        let mut sessions = self.sessions();
        if let Some(open) = sessions.get_mut(node) {
            open.retain(|c| c.stable_id() != conn.stable_id());
            if open.is_empty() {
                sessions.remove(node);
            }
        }
    }
}

/// Keep-alive period of a one-shot sync (see `sync.peer_silence_s`).
const ONE_SHOT_KEEP_ALIVE_S: u64 = 2;

/// One full round with a peer in the foreground (both directions, documents then scans).
pub async fn sync_once(
    dir: &Path,
    peer_name: Option<&str>,
) -> std::result::Result<SessionReport, anyhow::Error> {
    sync_once_watched(dir, peer_name, None).await
}

/// Hands the progress of each scan transfer to a watcher (the CLI's progress bars).
pub type ProgressWatcher =
    Box<dyn FnOnce(std::sync::mpsc::Receiver<net::progress::ScanProgress>) + Send>;

/// [`sync_once`], handing `watcher` the progress of each scan sent and received once the
/// peer answers.
pub async fn sync_once_watched(
    dir: &Path,
    peer_name: Option<&str>,
    watcher: Option<ProgressWatcher>,
) -> std::result::Result<SessionReport, anyhow::Error> {
    let node = Node::open(dir)?;
    let peer = node.pick_peer(peer_name)?;
    let addr = resolve_peer(&peer.addr)?;
    let tls = node.tls_material()?;
    let mtu = path::known_mtu(dir, addr.ip());
    // Frequent keep-alives make a live peer answer while nothing else flows, so silence means
    // a dead peer within `sync.peer_silence_s` (net::run_session); a short sync can afford them.
    let mut transport = node.config.sync.clone();
    transport.keep_alive_s = transport.keep_alive_s.min(ONE_SHOT_KEEP_ALIVE_S);
    let ep = net::client_endpoint(addr, &tls, &transport, mtu)?;
    drop(node);
    let (conn, identity) = connect(dir, &ep, addr, mtu).await?;
    let opened = Instant::now();
    bind_peer(dir, &peer.name, &identity)?;
    // Kept until the session ends: scans report to the watcher while it lives.
    let _watch = watcher.and_then(|hand_over| {
        let (watch, events) = net::progress::watch(&conn)?;
        hand_over(events);
        Some(watch)
    });
    let (_stop, shutdown) = watch::channel(false);
    let session = net::run_session(
        conn.clone(),
        identity,
        dir.to_path_buf(),
        Mode::OneShot,
        shutdown,
        None,
        None,
    )
    .await;
    path::remember(dir, addr.ip(), mtu, opened, &conn);
    net::close_client(&ep).await;
    Ok(session?)
}

/// Dials a peer; a failed handshake on a path with a remembered MTU forgets it (see [`path`]).
async fn connect(
    dir: &Path,
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    mtu: Option<u16>,
) -> std::result::Result<(quinn::Connection, PeerIdentity), net::NetError> {
    let result = net::connect(ep, addr, CONNECT_TIMEOUT).await;
    if result.is_err() && mtu.is_some() {
        path::forget(dir, addr.ip());
    }
    result
}

/// The daemon: accepts enrolled peers and keeps the upstream link, until `shutdown` flips.
pub async fn serve(
    dir: &Path,
    listen: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
) -> std::result::Result<(), anyhow::Error> {
    serve_counted(dir, listen, shutdown, Counters::default(), || Ok(())).await
}

/// [`serve`], counting sync rounds and refusals into `counters` (for `/metrics`); `ready` runs
/// once the config is checked and the address bound (the CLI starts the status page there).
pub async fn serve_counted(
    dir: &Path,
    listen: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
    counters: Counters,
    ready: impl FnOnce() -> std::result::Result<(), anyhow::Error>,
) -> std::result::Result<(), anyhow::Error> {
    let mut node = Node::open(dir)?;
    // Sessions recorded as open belong to a process that is gone.
    node.sessions_reset()?;
    // A misconfigured upstream fails here, before anything is bound or announced.
    let dial = node.peers_to_dial()?;
    node.check_config_names()?;
    let listen = match listen {
        Some(a) => a,
        None => node.config.sync.listen.parse()?,
    };
    let tls = node.tls_material()?;
    let sync_cfg = node.config.sync.clone();
    // Each connection gets this with the transport for its path (see [`path`]).
    let mut server_cfg =
        trust::quinn_server_config(&tls, Arc::new(net::transport_config(&sync_cfg)))?;
    let ep = net::server_endpoint(listen, &tls, server_cfg.clone())?;
    info!(unit = node.unit(), addr = %ep.local_addr()?, "serving");
    eprintln!(
        "communesync serving {} on {}",
        node.unit(),
        ep.local_addr()?
    );
    ready()?;
    let limit = Arc::new(tokio::sync::Semaphore::new(
        node.config.sync.connections_max,
    ));
    if dial.is_empty() && node.role() == crate::units::Role::Commune {
        warn!("no peer to dial and a commune has no node below it to accept: nothing will sync; add the district with `communesync peer add NAME --addr HOST:PORT`");
    } else if dial.is_empty() && node.role() != crate::units::Role::Province {
        warn!("no peer to dial: this node relays only between the nodes that connect to it; add its upstream with `communesync peer add NAME --addr HOST:PORT`");
    }
    let reconnect_max = Duration::from_secs(node.config.sync.reconnect_max_s);
    drop(node);

    let wake = listen_for_local_writes(dir)?;
    if let Err(e) = notify::send("READY=1") {
        warn!("could not tell systemd the node is ready (NOTIFY_SOCKET): {e}");
    }
    // The peers kept, by name: a unit tree moving this node adds its new parent while it runs.
    let mut kept: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut keep_dialling = |dial: Vec<String>| {
        for name in dial {
            if kept.get(&name).is_some_and(|task| !task.is_finished()) {
                continue;
            }
            info!(peer = %name, "keeping a session with configured peer");
            let (dir, shutdown, wake) = (dir.to_path_buf(), shutdown.clone(), wake.clone());
            let counters = counters.clone();
            let task = tokio::spawn({
                let name = name.clone();
                async move { keep_peer(dir, name, reconnect_max, shutdown, wake, counters).await }
            });
            kept.insert(name, task);
        }
    };
    keep_dialling(dial);
    let mut stop = shutdown.clone();
    // A newer CRL (from `ca revoke` or a peer) takes effect for new connections without a restart.
    let mut crl_check = tokio::time::interval(Duration::from_secs(5));
    let mut crl_number = tls.crl.as_ref().map(|c| c.number());
    let (admission, paths) = (Admission::new(), PathCache::new());
    let open = OpenSessions::default();
    let mut failed = None;
    loop {
        tokio::select! {
            _ = crl_check.tick() => {
                // A bad moment (config being edited, a locked file) must not stop the daemon.
                let node = Node::open(dir);
                // The peers to dial: a unit tree that moved this node names a new parent.
                match node.as_ref().map(|node| node.peers_to_dial()) {
                    Ok(Ok(dial)) => keep_dialling(dial),
                    Ok(Err(e)) => warn!("could not re-read the peers to dial (will retry): {e:#}"),
                    Err(_) => {}
                }
                match node.map_err(anyhow::Error::from).and_then(|node| reload_crl(&node, &sync_cfg, crl_number)) {
                    Ok(None) => {}
                    Ok(Some((held, cfg))) => {
                        crl_number = held;
                        ep.set_server_config(Some(cfg.clone()));
                        server_cfg = cfg;
                    }
                    // An invalid config stops the daemon (exit 4, naming the key): running on
                    // with settings the file no longer says would hide the mistake.
                    Err(e) if matches!(e.downcast_ref::<NodeError>(), Some(NodeError::Config(_))) => {
                        failed = Some(e);
                        break;
                    }
                    Err(e) => warn!("could not re-read the node (will retry): {e:#}"),
                }
            }
            incoming = ep.accept() => {
                let Some(incoming) = incoming else { break };
                // Before authentication: a handshake slot of its own (never one of the
                // authenticated pool), a Retry when handshakes crowd, nothing from storage.
                let remote = incoming.remote_address();
                let slot = match admission.admit(remote.ip(), incoming.remote_address_validated()) {
                    Admit::Handshake(slot) => slot,
                    Admit::Retry => {
                        counters.refused("retry");
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                        continue;
                    }
                    Admit::Refuse => {
                        warn!(%remote, pending = admission.pending(), "too many handshakes in progress: refused a connection");
                        counters.refused("handshakes");
                        incoming.refuse();
                        continue;
                    }
                };
                let (dir, shutdown, wake) = (dir.to_path_buf(), shutdown.clone(), wake.clone());
                let (mut cfg, sync_cfg) = (server_cfg.clone(), sync_cfg.clone());
                let (limit, paths, counters) = (limit.clone(), paths.clone(), counters.clone());
                let open = open.clone();
                tokio::spawn(async move {
                    let mtu = paths.get(remote.ip());
                    cfg.transport_config(Arc::new(net::path_transport(&sync_cfg, remote, mtu)));
                    let handshake = match incoming.accept_with(Arc::new(cfg)) {
                        Ok(connecting) => tokio::time::timeout(admit::HANDSHAKE_TIMEOUT, connecting)
                            .await
                            .unwrap_or(Err(quinn::ConnectionError::TimedOut)),
                        Err(e) => Err(e),
                    };
                    drop(slot);
                    let conn = match handshake {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(%remote, "refused a connection: {e}");
                            counters.refused("handshake");
                            // A remembered MTU the path no longer carries can stall the handshake.
                            if mtu.is_some() {
                                paths.handshake_failed(remote.ip());
                            }
                            return;
                        }
                    };
                    let identity = match trust::peer_identity(&conn) {
                        Ok(id) => id,
                        Err(e) => {
                            warn!(%remote, "refused a connection: {e}");
                            counters.refused("identity");
                            conn.close(1u32.into(), b"no identity");
                            return;
                        }
                    };
                    let node_id = identity.node_id.to_string();
                    open.open(&node_id, &conn);
                    let Ok(_permit) = limit.try_acquire_owned() else {
                        open.close(&node_id, &conn);
                        warn!(%remote, unit = %identity.unit, "sync.connections_max sessions already open: refused a peer");
                        counters.refused("busy");
                        let after = rand::random_range(net::BUSY_RETRY_AFTER_S);
                        conn.close(2u32.into(), net::busy_reason(after).as_bytes());
                        return;
                    };
                    info!(%remote, unit = %identity.unit, node = %identity.node_id, "peer connected");
                    // Remembered as soon as the peer closes, before this side's session winds down,
                    // so that even an immediate reconnect finds the path known.
                    let (watched, watch_dir, opened) = (conn.clone(), dir.clone(), Instant::now());
                    tokio::spawn(async move {
                        watched.closed().await;
                        if paths.failed(remote.ip()) {
                            path::forget(&watch_dir, remote.ip());
                        }
                        path::remember(&watch_dir, remote.ip(), mtu, opened, &watched);
                        paths.set(remote.ip(), path::known_mtu(&watch_dir, remote.ip()));
                    });
                    let session = net::run_session(conn.clone(), identity.clone(), dir, Mode::Continuous, shutdown, Some(wake), Some(counters.clone())).await;
                    open.close(&node_id, &conn);
                    if let Err(e) = session {
                        if matches!(e, net::NetError::Trust(trust::TrustError::RevokedNode { .. })) {
                            counters.refused("revoked");
                        }
                        warn!(unit = %identity.unit, "session ended: {e}");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    let _ = notify::send("STOPPING=1");
    ep.close(0u32.into(), b"shutting down");
    ep.wait_idle().await;
    let _ = std::fs::remove_file(dir.join(crate::node::WAKE_SOCKET));
    failed.map_or(Ok(()), Err)
}

/// Binds the data directory's wake socket; the receiver moves each time a local command
/// commits a write (see [`Node::wake_daemon`]).
fn listen_for_local_writes(dir: &Path) -> Result<watch::Receiver<u64>> {
    let path = dir.join(crate::node::WAKE_SOCKET);
    // A socket file left by a daemon that was killed would make the bind fail.
    let _ = std::fs::remove_file(&path);
    let socket = tokio::net::UnixDatagram::bind(&path)
        .map_err(|e| NodeError::Invalid(format!("cannot listen on {}: {e}", path.display())))?;
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        let mut buf = [0u8; 16];
        while socket.recv(&mut buf).await.is_ok() {
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(rx)
}

/// A server config with the CRL now on disk, with that CRL's number, if it differs from
/// `current`.
fn reload_crl(
    node: &Node,
    sync: &crate::node::config::SyncSection,
    current: Option<u64>,
) -> std::result::Result<Option<(Option<u64>, quinn::ServerConfig)>, anyhow::Error> {
    let held = node.crl().map(|c| c.number());
    if held == current {
        return Ok(None);
    }
    let tls = node.tls_material()?;
    let cfg = trust::quinn_server_config(&tls, Arc::new(net::transport_config(sync)))?;
    info!(crl = ?held, "revocation list reloaded");
    Ok(Some((held, cfg)))
}

/// Keeps a session with a configured peer, reconnecting with bounded, jittered backoff, until
/// its certificate shows it is a node that dials this one instead (see `peers_to_dial`).
async fn keep_peer(
    dir: std::path::PathBuf,
    name: String,
    backoff_max: Duration,
    mut shutdown: watch::Receiver<bool>,
    wake: watch::Receiver<u64>,
    counters: Counters,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut wait_at_least = Duration::ZERO;
        let attempt = async {
            let node = Node::open(&dir)?;
            let peer = node.store.peer(&name)?;
            let addr = resolve_peer(&peer.addr)?;
            let tls = node.tls_material()?;
            let mtu = path::known_mtu(&dir, addr.ip());
            let ep = net::client_endpoint(addr, &tls, &node.config.sync, mtu)?;
            drop(node);
            let (conn, identity) = connect(&dir, &ep, addr, mtu).await?;
            let opened = Instant::now();
            info!(peer = %name, unit = %identity.unit, "connected");
            bind_peer(&dir, &name, &identity)?;
            if !Node::open(&dir)?.peers_to_dial()?.contains(&name) {
                info!(peer = %name, unit = %identity.unit, "this peer connects to us; not dialling it");
                conn.close(0u32.into(), b"you dial us");
                return Ok(None);
            }
            let session = net::run_session(
                conn.clone(),
                identity,
                dir.clone(),
                Mode::Continuous,
                shutdown.clone(),
                Some(wake.clone()),
                Some(counters.clone()),
            )
            .await;
            path::remember(&dir, addr.ip(), mtu, opened, &conn);
            Ok::<Option<SessionReport>, anyhow::Error>(Some(session?))
        };
        match attempt.await {
            Ok(Some(_)) => backoff = Duration::from_secs(1),
            Ok(None) => return,
            Err(e) => {
                error!(peer = %name, "sync failed: {e:#}");
                backoff = (backoff * 2).min(backoff_max);
                // A peer refusing for lack of capacity says when to come back; believed up to
                // the configured longest wait, so a hostile peer cannot park this link longer.
                wait_at_least = net::retry_after(&format!("{e:#}"))
                    .unwrap_or_default()
                    .min(backoff_max);
            }
        }
        if *shutdown.borrow() {
            return;
        }
        // A unit tree that moved this node leaves its old parent behind (`peers_to_dial`).
        if Node::open(&dir)
            .and_then(|node| node.peers_to_dial())
            .is_ok_and(|dial| !dial.contains(&name))
        {
            info!(peer = %name, "no longer a peer to dial (this node's unit moved); not dialling it");
            return;
        }
        let jitter = rand::random_range(0.5..1.5);
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(jitter).max(wait_at_least)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
