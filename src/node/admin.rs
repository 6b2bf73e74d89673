//! A node's administration: its certificate and the CRL on disk, enrolment, the CA (on the
//! province), configured peers, and the `status` of its links.

use std::net::SocketAddr;
use std::path::Path;

use serde::Serialize;
use tracing::info;

use super::{now_ms, Node, NodeError, Result};
use crate::store::sync::{Peer, PeerSync, Pending};
use crate::trust::{self, Ca, Crl, NodeKey, PeerIdentity, TlsMaterial};
use crate::units::Role;

pub const CERT_FILE: &str = "node.crt";
pub const CA_FILE: &str = "ca.crt";
pub const CRL_FILE: &str = "crl.pem";
pub const CA_DIR: &str = "ca";
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
    pub(crate) fn tls_material(&self) -> Result<TlsMaterial> {
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
        // A unit the province moved may be certified anew under its current path.
        if self.tree.canonical(&identity.unit) != self.unit() || identity.role != self.role() {
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
        let moved = self.unit() != self.cert_unit();
        Ok(met
            .into_iter()
            .filter(|(_, met)| {
                // Once the province moved this node's unit, a district or province whose
                // certificate showed a unit no longer above it would refuse what it writes.
                let left_behind = met.as_ref().is_some_and(|(unit, _)| {
                    let unit = self.tree.canonical(unit);
                    let role = self.tree.get(unit).map(|u| u.role);
                    moved
                        && role.is_ok_and(|r| r != Role::Commune)
                        && unit != self.unit()
                        && !super::replica::is_upstream(unit, self.unit())
                });
                !left_behind
            })
            .filter(|(peer, met)| {
                peer.upstream
                    || configured == Some(peer.name.as_str())
                    || match met {
                        None => true,
                        Some((unit, node)) => {
                            let unit = self.tree.canonical(unit);
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
    pub(crate) fn pick_peer(&self, name: Option<&str>) -> Result<Peer> {
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
        // Each is counted past the acknowledgement of the relay that serves it, all in one query.
        let mut below = Vec::new();
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
            below.push((unit, relay));
        }
        let wanted: Vec<(String, i64, String)> = below
            .iter()
            .map(|(unit, relay)| {
                let (after, skip) = relay.map_or((0, ""), |r| (r.acked_by, r.node_id.as_str()));
                (unit.path.clone(), after, skip.to_string())
            })
            .collect();
        let mut pending = self.store.pending_of_units(&wanted)?;
        for (unit, relay) in below {
            let pending_out = pending.remove(&unit.path).unwrap_or_default();
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
pub(crate) fn resolve(addr: &str) -> Result<SocketAddr> {
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
