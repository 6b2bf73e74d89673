//! Sync from the node's side: certificates and the CRL on disk, configured peers, one-shot
//! `sync`, the `serve` daemon (accepting peers, keeping the upstream link), and `status`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::health::Counters;
use super::{now_ms, path, Node, NodeError, Result};
use crate::net::admit::{self, Admission, Admit, PathCache};
use crate::net::{self, Mode, SessionReport};
use crate::store::sync::{Peer, PeerSync, Pending};
use crate::trust::{self, Ca, Crl, NodeKey, PeerIdentity, TlsMaterial};
use crate::units::Role;

pub const CERT_FILE: &str = "node.crt";
pub const CA_FILE: &str = "ca.crt";
pub const CRL_FILE: &str = "crl.pem";
pub const CA_DIR: &str = "ca";
/// How long `sync` waits for the peer to answer the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Validity of node certificates issued by `ca issue`.
pub const CERT_VALIDITY_DAYS: u32 = 5 * 365;

/// The blocks labelled `label` of a PEM bundle (certificates, a CRL), each as PEM text.
fn pem_blocks(file: &Path, text: &str, label: &str) -> Result<Vec<String>> {
    let blocks = pem::parse_many(text).map_err(|e| {
        NodeError::Invalid(format!(
            "{}: not a PEM file as `communesync ca issue` writes ({e})",
            file.display()
        ))
    })?;
    Ok(blocks
        .iter()
        .filter(|b| b.tag() == label)
        .map(|b| trust::pem_encode(label, b.contents()))
        .collect())
}

#[derive(Debug, Serialize)]
pub struct IssueReport {
    pub node_id: String,
    pub unit: String,
    pub role: Role,
    pub out: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub node_id: String,
    pub unit: String,
    pub role: Role,
    pub enrolled: bool,
    pub documents: i64,
    pub feed_seq: i64,
    pub scans_missing: i64,
    pub scan_bytes_missing: i64,
    pub peers: Vec<PeerStatus>,
    /// Every unit below this node, its upstream, a summary per district, what needs attention.
    #[serde(flatten)]
    pub health: super::health::Health,
}

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub unit: String,
    pub role: Role,
    /// None for a unit below this node that never made contact.
    pub sync: Option<PeerSync>,
    /// What this node holds that the peer has not acknowledged yet.
    pub pending_out: Pending,
    /// Feed entries the peer had that this node has not applied yet (an upper bound).
    pub pending_in_changes: i64,
    /// Age of the oldest change not yet delivered to the peer.
    pub lag_ms: Option<i64>,
    /// For a unit never in direct contact: the relay below this node that serves it; the
    /// pending figures are then what has not yet left for that relay.
    pub via: Option<String>,
    /// Documents from this peer node that the checks refused (each alone), the latest first:
    /// (document, reason, when), at most 5 listed; `refused_total` counts them all.
    pub refused: Vec<crate::store::sync::Refusal>,
    pub refused_total: i64,
    /// Documents of this node's that the peer still refuses, likewise.
    pub refused_by_peer: Vec<crate::store::sync::Refusal>,
    pub refused_by_peer_total: i64,
}

impl Node {
    fn tls_material(&self) -> Result<TlsMaterial> {
        let read = |name: &str| {
            std::fs::read_to_string(self.dir.join(name)).map_err(|_| {
                NodeError::Invalid(format!(
                    "this node is not enrolled ({} missing): run `communesync enrol request`, have the province issue it, then `communesync enrol install`",
                    self.dir.join(name).display()
                ))
            })
        };
        Ok(TlsMaterial {
            ca_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key: NodeKey::load(self.dir.join(super::KEY_FILE))?,
            crl: self.crl(),
        })
    }

    /// The revocation list this node holds, if any.
    pub fn crl(&self) -> Option<Crl> {
        let text = std::fs::read_to_string(self.dir.join(CRL_FILE)).ok()?;
        Crl::from_pem(&text).ok()
    }

    /// Stores a newer CRL (from a peer or a file) after checking the CA signed it.
    pub fn install_crl_der(&mut self, der: &[u8]) -> Result<()> {
        let ca =
            std::fs::read_to_string(self.dir.join(CA_FILE)).map_err(|source| NodeError::Io {
                path: self.dir.join(CA_FILE),
                source,
            })?;
        let crl = trust::verify_crl(&ca, der)?;
        if self.crl().is_some_and(|held| held.number() >= crl.number()) {
            return Ok(());
        }
        trust::write_file_atomic(self.dir.join(CRL_FILE), crl.to_pem().as_bytes())?;
        info!(
            number = crl.number(),
            revoked = crl.revoked_serials().len(),
            "installed a newer revocation list"
        );
        Ok(())
    }

    pub fn enrol_request(&self, out: &Path) -> Result<String> {
        let key = NodeKey::load(self.dir.join(super::KEY_FILE))?;
        let pem = trust::enrol_request(&key)?;
        trust::write_file_atomic(out, pem.as_bytes())?;
        Ok(key.node_id().to_string())
    }

    /// Installs the certificate (and the CA, and the CRL) from a file written by `ca issue`.
    pub fn enrol_install(&mut self, file: &Path) -> Result<PeerIdentity> {
        let text = std::fs::read_to_string(file).map_err(|source| NodeError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        let certs = pem_blocks(file, &text, "CERTIFICATE")?;
        let [cert, .., ca] = &certs[..] else {
            return Err(NodeError::Invalid(format!("{}: expected the node certificate followed by the CA certificate, as `communesync ca issue` writes", file.display())));
        };
        let key = NodeKey::load(self.dir.join(super::KEY_FILE))?;
        let identity = trust::install_check(&key, cert, ca)?;
        if identity.unit != self.unit() || identity.role != self.role() {
            return Err(NodeError::Invalid(format!(
                "the certificate is for {} {}, but this node is {} {}; ask the province to issue it for this unit",
                identity.role,
                identity.unit,
                self.role(),
                self.unit()
            )));
        }
        trust::write_file_atomic(self.dir.join(CA_FILE), ca.as_bytes())?;
        trust::write_file_atomic(self.dir.join(CERT_FILE), cert.as_bytes())?;
        if let Some(crl) = pem_blocks(file, &text, "X509 CRL")?.first() {
            let crl = Crl::from_pem(crl)?;
            self.install_crl_der(crl.der())?;
        }
        Ok(identity)
    }

    pub(super) fn ca(&self) -> Result<Ca> {
        if self.role() != Role::Province {
            return Err(NodeError::Invalid(
                "the certificate authority runs on the province node only".into(),
            ));
        }
        Ok(Ca::open(self.dir.join(CA_DIR))?)
    }

    /// Creates the provincial CA and enrols this province node with it.
    pub fn ca_init(&mut self) -> Result<PeerIdentity> {
        if self.role() != Role::Province {
            return Err(NodeError::Invalid(
                "`ca init` runs on the province node only".into(),
            ));
        }
        let ca = Ca::init(self.dir.join(CA_DIR), self.unit())?;
        let key = NodeKey::load(self.dir.join(super::KEY_FILE))?;
        let issued = ca.issue(
            &trust::enrol_request(&key)?,
            self.unit(),
            Role::Province,
            CERT_VALIDITY_DAYS,
        )?;
        trust::write_file_atomic(self.dir.join(CA_FILE), ca.cert_pem().as_bytes())?;
        trust::write_file_atomic(self.dir.join(CERT_FILE), issued.cert_pem.as_bytes())?;
        trust::write_file_atomic(
            self.dir.join(CRL_FILE),
            ca.current_crl()?.to_pem().as_bytes(),
        )?;
        Ok(issued.identity)
    }

    /// Signs an enrolment request for a unit and role the province decides.
    pub fn ca_issue(
        &self,
        request: &Path,
        unit: &str,
        role: Role,
        out: &Path,
    ) -> Result<IssueReport> {
        let tree_unit = self.tree.get(unit)?;
        if tree_unit.role != role {
            return Err(NodeError::Invalid(format!(
                "{unit} is a {} in the unit tree, not a {role}",
                tree_unit.role
            )));
        }
        let ca = self.ca()?;
        let req = std::fs::read_to_string(request).map_err(|source| NodeError::Io {
            path: request.to_path_buf(),
            source,
        })?;
        let issued = ca.issue(&req, unit, role, CERT_VALIDITY_DAYS)?;
        let bundle = format!(
            "{}{}{}",
            issued.cert_pem,
            ca.cert_pem(),
            ca.current_crl()?.to_pem()
        );
        trust::write_file_atomic(out, bundle.as_bytes())?;
        Ok(IssueReport {
            node_id: issued.identity.node_id.to_string(),
            unit: unit.to_string(),
            role,
            out: out.display().to_string(),
        })
    }

    pub fn ca_list(&self) -> Result<Vec<trust::IssuedRecord>> {
        Ok(self.ca()?.issued()?)
    }

    /// Revokes a node; the new CRL spreads to every node by sync.
    pub fn ca_revoke(&mut self, node_id: &str) -> Result<u64> {
        let ca = self.ca()?;
        let crl = ca.revoke(node_id.parse()?)?;
        self.install_crl_der(crl.der())?;
        Ok(crl.number())
    }

    pub fn peer_add(&mut self, name: &str, addr: &str, upstream: bool) -> Result<Peer> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(NodeError::Invalid(format!(
                "peer name {name:?}: use letters, digits, '-', '_' or '.'"
            )));
        }
        resolve(addr)?;
        self.store
            .write(|tx| tx.peer_add(name, addr, upstream, now_ms()))?;
        Ok(Peer {
            name: name.into(),
            addr: addr.into(),
            upstream,
        })
    }

    pub fn peer_remove(&mut self, name: &str) -> Result<()> {
        Ok(self.store.write(|tx| tx.peer_remove(name))?)
    }

    pub fn peer_list(&self) -> Result<Vec<Peer>> {
        Ok(self.store.peers()?)
    }

    pub(crate) fn record_contact(&mut self, peer: &PeerIdentity) -> Result<()> {
        Ok(self.store.write(|tx| {
            tx.peer_touch(
                &peer.node_id.to_string(),
                &peer.unit,
                peer.role.as_str(),
                now_ms(),
            )
        })?)
    }

    /// Records a sync point (or a failure) with a peer and the traffic since the last record.
    pub(crate) fn record_session(
        &mut self,
        peer: &PeerIdentity,
        converged: bool,
        error: Option<&str>,
        sent: u64,
        received: u64,
    ) -> Result<()> {
        let id = peer.node_id.to_string();
        Ok(self
            .store
            .write(|tx| tx.peer_session_end(&id, now_ms(), converged, error, sent, received))?)
    }

    /// The upstream peer's name: `sync.upstream` in the config, else the peer added with --upstream.
    pub fn upstream_name(&self) -> Result<Option<String>> {
        if let Some(name) = &self.config.sync.upstream {
            return Ok(Some(name.clone()));
        }
        Ok(self
            .store
            .peers()?
            .into_iter()
            .find(|p| p.upstream)
            .map(|p| p.name))
    }

    /// The peers `serve` keeps a session with. A peer is dialled when it is marked upstream
    /// (`peer add --upstream`, `sync.upstream`), when its certificate showed a unit above this
    /// node's, when it is another node of this unit with a greater node id (so two standbys
    /// keep one session, not two), or when it was never met (first contact shows what it is).
    /// A peer below this node, or elsewhere in the tree, dials this node instead.
    pub fn peers_to_dial(&self) -> Result<Vec<String>> {
        let configured = self.config.sync.upstream.as_deref();
        let met = self.store.peers_met()?;
        if let Some(name) = configured {
            if !met.iter().any(|(p, _)| p.name == name) {
                return Err(NodeError::Config(super::config::ConfigError::Invalid {
                    path: self.dir.join(super::config::CONFIG_FILE),
                    message: format!("sync.upstream = {name:?} names no peer: add it with `communesync peer add {name} --addr HOST:PORT`, or remove the key"),
                }));
            }
        }
        let me = self.node_id.to_string();
        Ok(met
            .into_iter()
            .filter(|(peer, met)| {
                peer.upstream
                    || configured == Some(peer.name.as_str())
                    || match met {
                        None => true,
                        Some((unit, node)) => {
                            super::replica::is_upstream(unit, self.unit())
                                || (unit == self.unit() && *node > me)
                        }
                    }
            })
            .map(|(peer, _)| peer.name)
            .collect())
    }

    /// The peer `sync` talks to: the named one, else the configured upstream, else the only
    /// peer, else the only one whose certificate showed a unit above this node's.
    fn pick_peer(&self, name: Option<&str>) -> Result<Peer> {
        if let Some(name) = name.map(str::to_string).or(self.upstream_name()?) {
            return Ok(self.store.peer(&name)?);
        }
        let met = self.store.peers_met()?;
        let above: Vec<_> = met
            .iter()
            .filter(|(_, m)| {
                m.as_ref()
                    .is_some_and(|(unit, _)| super::replica::is_upstream(unit, self.unit()))
            })
            .collect();
        match (&met[..], &above[..]) {
            ([(only, _)], _) | (_, [(only, _)]) => Ok(only.clone()),
            ([], _) => Err(NodeError::Invalid(
                "no peers: add one with `communesync peer add NAME --addr HOST:PORT`".into(),
            )),
            _ => Err(NodeError::Invalid(
                "several peers and none known to be above this node: choose one with --peer NAME"
                    .into(),
            )),
        }
    }

    pub fn status(&self) -> Result<Status> {
        self.status_filtered(&super::health::Filter::default())
    }

    /// `status` with the units below this node listed as `filter` says.
    pub fn status_filtered(&self, filter: &super::health::Filter) -> Result<Status> {
        let (scans_missing, scan_bytes_missing) = self.store.missing_blob_bytes()?;
        let now = now_ms();
        let mut peers = Vec::new();
        let syncs = self.store.peer_syncs()?;
        for sync in &syncs {
            let scope = super::replica::scope_for(&sync.unit, self.unit());
            let pending_out = self.store.pending(&scope, &sync.node_id, sync.acked_by)?;
            let (refused, refused_total) = self.store.refusals(&sync.node_id, false, 5)?;
            let (refused_by_peer, refused_by_peer_total) =
                self.store.refusals(&sync.node_id, true, 5)?;
            peers.push(PeerStatus {
                refused,
                refused_total,
                refused_by_peer,
                refused_by_peer_total,
                unit: sync.unit.clone(),
                role: sync.role.parse()?,
                lag_ms: pending_out.oldest_change_at_ms.map(|t| (now - t).max(0)),
                pending_in_changes: (sync.peer_feed - sync.have_from).max(0),
                pending_out,
                sync: Some(sync.clone()),
                via: None,
            });
        }
        // Every unit below this node is listed, in contact or not: silence is what to look for.
        for unit in self
            .tree
            .iter()
            .filter(|u| u.path != self.unit() && crate::units::is_within(&u.path, self.unit()))
        {
            if syncs.iter().any(|s| s.unit == unit.path) {
                continue;
            }
            let relay = syncs
                .iter()
                // A relay is a peer below this node whose subtree holds the unit, never the upstream.
                .filter(|s| {
                    s.unit != self.unit()
                        && crate::units::is_within(&s.unit, self.unit())
                        && crate::units::is_within(&unit.path, &s.unit)
                })
                .max_by_key(|s| s.unit.len());
            let (skip, after) = relay
                .map(|r| (r.node_id.as_str(), r.acked_by))
                .unwrap_or(("", 0));
            let pending_out = self.store.pending(
                &super::replica::scope_for(&unit.path, self.unit()),
                skip,
                after,
            )?;
            peers.push(PeerStatus {
                unit: unit.path.clone(),
                role: unit.role,
                lag_ms: pending_out.oldest_change_at_ms.map(|t| (now - t).max(0)),
                pending_in_changes: 0,
                pending_out,
                sync: None,
                via: relay.map(|r| r.unit.clone()),
                refused: Vec::new(),
                refused_total: 0,
                refused_by_peer: Vec::new(),
                refused_by_peer_total: 0,
            });
        }
        peers.sort_by(|a, b| a.unit.cmp(&b.unit));
        let health = self.health(&peers, filter)?;
        Ok(Status {
            health,
            node_id: self.node_id.to_string(),
            unit: self.unit().to_string(),
            role: self.role(),
            enrolled: self.dir.join(CERT_FILE).exists(),
            documents: self.store.doc_count()?,
            feed_seq: self.store.feed_seq()?,
            scans_missing,
            scan_bytes_missing,
            peers,
        })
    }
}

/// A peer's address: an IP address and port as given, or a host name looked up now.
fn resolve(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let shape = || {
        NodeError::Invalid(format!(
            "peer address {addr:?} is not HOST:PORT (like 10.0.0.2:7410)"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(shape)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(shape());
    }
    // The shape is right, so a failure from here on is the name service's answer.
    let unresolved = |why: String| {
        NodeError::Invalid(format!(
            "could not resolve {host}: {why}; check the name and the DNS server, or give the peer's IP address"
        ))
    };
    addr.to_socket_addrs()
        .map_err(|e| unresolved(e.to_string()))?
        .next()
        .ok_or_else(|| unresolved("no address for that name".into()))
}

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
    if let Err(e) = super::notify::send("READY=1") {
        warn!("could not tell systemd the node is ready (NOTIFY_SOCKET): {e}");
    }
    for name in dial {
        info!(peer = %name, "keeping a session with configured peer");
        let (dir, shutdown, wake) = (dir.to_path_buf(), shutdown.clone(), wake.clone());
        let counters = counters.clone();
        tokio::spawn(
            async move { keep_peer(dir, name, reconnect_max, shutdown, wake, counters).await },
        );
    }
    let mut stop = shutdown.clone();
    // A newer CRL (from `ca revoke` or a peer) takes effect for new connections without a restart.
    let mut crl_check = tokio::time::interval(Duration::from_secs(5));
    let mut crl_number = tls.crl.as_ref().map(|c| c.number());
    let (admission, paths) = (Admission::new(), PathCache::new());
    let mut failed = None;
    loop {
        tokio::select! {
            _ = crl_check.tick() => {
                // A bad moment (config being edited, a locked file) must not stop the daemon.
                match reload_crl(dir, &sync_cfg, crl_number) {
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
                    let Ok(_permit) = limit.try_acquire_owned() else {
                        warn!(%remote, unit = %identity.unit, "sync.connections_max sessions already open: refused a peer");
                        counters.refused("busy");
                        conn.close(2u32.into(), b"busy: too many sessions, retry later");
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
                    let session = net::run_session(conn, identity.clone(), dir, Mode::Continuous, shutdown, Some(wake), Some(counters.clone())).await;
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
    let _ = super::notify::send("STOPPING=1");
    ep.close(0u32.into(), b"shutting down");
    ep.wait_idle().await;
    let _ = std::fs::remove_file(dir.join(super::WAKE_SOCKET));
    failed.map_or(Ok(()), Err)
}

/// Binds the data directory's wake socket; the receiver moves each time a local command
/// commits a write (see [`Node::wake_daemon`]).
fn listen_for_local_writes(dir: &Path) -> Result<watch::Receiver<u64>> {
    let path = dir.join(super::WAKE_SOCKET);
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
    dir: &Path,
    sync: &super::config::SyncSection,
    current: Option<u64>,
) -> std::result::Result<Option<(Option<u64>, quinn::ServerConfig)>, anyhow::Error> {
    let node = Node::open(dir)?;
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
            }
        }
        if *shutdown.borrow() {
            return;
        }
        let jitter = rand::random_range(0.5..1.5);
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
