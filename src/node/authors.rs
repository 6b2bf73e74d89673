//! Signed authorship (issue 12): this node signs every change it makes with its key, keeps the
//! certificates of the nodes whose changes it holds, and checks the signature of every change
//! new to it against its author's certificate. Decides nothing about scope or what a change may
//! do (replica.rs, model/authz.rs).

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use tracing::info;

use super::admin::{CA_FILE, CERT_FILE};
use super::{now_ms, Node, NodeError, Result, KEY_FILE};
use crate::model::{AuditEntry, DocId};
use crate::store::sigs::{ChangeSigning, NodeCertRow, SIG_BYTES};
use crate::trust::{self, AuthorKey, ChangeSigner, NodeKey, PeerIdentity};

/// Meta key set by schema 8 on a database that held documents: this node's earlier changes
/// are signed at its next open.
const SIGN_OWN_CHANGES_META: &str = "sign_own_changes";

impl ChangeSigning for ChangeSigner {
    fn sign_change(
        &self,
        doc: &str,
        hash: &[u8; 32],
    ) -> std::result::Result<[u8; SIG_BYTES], String> {
        self.sign(doc, hash).map_err(|e| e.to_string())
    }
}

/// The nodes whose change signatures this node can check: by actor (16-byte node id), their
/// key and whether the CRL held now revokes them.
pub struct Authors {
    keys: HashMap<Vec<u8>, (AuthorKey, bool)>,
}

/// A change's short name in reasons: the first 8 bytes of its hash.
fn short(hash: &[u8; 32]) -> String {
    hex::encode(&hash[..8])
}

/// What checking one change's signature found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signature {
    /// Signed by the node whose id is the change's actor, with a certificate not revoked.
    Verified,
    /// No signature held (a change stored before schema 8 by another node).
    Missing,
    /// No certificate of the actor's node is held here.
    UnknownSigner,
    /// Signed by the actor, whose certificate is revoked.
    Revoked,
    /// The signature is not the actor's.
    Invalid,
}

impl Signature {
    /// Words for a line of `audit`.
    pub fn describe(self) -> &'static str {
        match self {
            Signature::Verified => "verified",
            Signature::Missing => "NOT SIGNED",
            Signature::UnknownSigner => "signer's certificate not held here",
            Signature::Revoked => "signer REVOKED",
            Signature::Invalid => "signature INVALID",
        }
    }
}

/// One line of `audit`: the change, the node that signed it and what checking found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditLine {
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// The signing node's unit, from its certificate, when held here.
    pub signer_unit: Option<String>,
    pub signature: Signature,
}

impl Authors {
    /// What the signature `sig` of change `hash` (actor `actor`) of document `doc` is worth.
    pub fn verdict(
        &self,
        doc: &str,
        hash: &[u8; 32],
        actor: &[u8],
        sig: Option<&[u8; SIG_BYTES]>,
    ) -> Signature {
        let Some(sig) = sig else {
            return Signature::Missing;
        };
        match self.keys.get(actor) {
            None => Signature::UnknownSigner,
            Some((key, _)) if !key.verifies(doc, hash, sig) => Signature::Invalid,
            Some((_, true)) => Signature::Revoked,
            Some((_, false)) => Signature::Verified,
        }
    }

    /// Checks the signature of change `hash` (actor `actor`) of document `doc`: present, by the
    /// certificate whose node id is the actor, that certificate not revoked unless
    /// `revoked_ok` (the sender is a trusted relay, which held the change before the revocation
    /// reached it: a node re-enrolled after a dead disk gets back what its old key signed).
    /// Err is the reason.
    pub fn check(
        &self,
        doc: &str,
        hash: &[u8; 32],
        actor: &[u8],
        sig: Option<&[u8; SIG_BYTES]>,
        revoked_ok: bool,
    ) -> std::result::Result<(), String> {
        let verdict = self.verdict(doc, hash, actor, sig);
        if verdict == Signature::Verified || (verdict == Signature::Revoked && revoked_ok) {
            return Ok(());
        }
        let node = hex::encode(actor);
        let unit = self.unit_of(actor).unwrap_or_default();
        let change = short(hash);
        Err(match verdict {
            Signature::Verified => unreachable!("returned above"),
            Signature::Missing => format!(
                "change {change} by node {node} carries no signature; every change must be signed by the node that made it"
            ),
            Signature::UnknownSigner => format!(
                "no certificate of node {node}, the author of change {change}, reached this node, so its signature cannot be checked"
            ),
            Signature::Revoked => {
                format!("change {change} is by node {node} ({unit}), whose certificate is revoked")
            }
            Signature::Invalid => format!(
                "the signature of change {change} is not by its author node {node} ({unit}): forged, or altered on the way"
            ),
        })
    }

    /// The unit the CA certified for the node whose id is `actor`, when its certificate is held.
    pub fn unit_of(&self, actor: &[u8]) -> Option<String> {
        self.keys
            .get(actor)
            .map(|(key, _)| key.identity.unit.clone())
    }
}

impl Node {
    /// Gives the store this node's change signer, and signs this node's own changes stored
    /// before schema 8 (once).
    pub(super) fn start_signing(&mut self) -> Result<()> {
        let key = NodeKey::load(self.dir.join(KEY_FILE))?;
        self.store.set_signer(Box::new(ChangeSigner::new(&key)?));
        if self.store.meta(SIGN_OWN_CHANGES_META)?.is_some() {
            let actor = self.node_id.as_bytes().to_vec();
            let signed = self.store.write(|tx| {
                let signed = tx.sign_own_unsigned_changes(&actor)?;
                tx.delete_meta(SIGN_OWN_CHANGES_META)?;
                Ok(signed)
            })?;
            info!(signed, "signed this node's changes stored before schema 8");
        }
        Ok(())
    }

    /// Checks a node certificate from a peer, a bundle or a TLS handshake against the CA, and
    /// keeps it to check that node's change signatures. A revoked one is kept too: the changes
    /// it signed are then refused as revoked, which says more than "no certificate".
    pub fn learn_cert(&mut self, der: &[u8]) -> Result<PeerIdentity> {
        let (mut learnt, _) = self.learn_certs(std::slice::from_ref(&der.to_vec()))?;
        learnt
            .pop()
            .ok_or_else(|| NodeError::Invalid("the certificate was checked but not kept".into()))?
    }

    /// [`Node::learn_cert`] for several, in one write (none when all are held already): what
    /// each certifies or why it was left out, in order, and how many were new or changed.
    pub fn learn_certs(&mut self, ders: &[Vec<u8>]) -> Result<(Vec<Result<PeerIdentity>>, usize)> {
        let ca = std::fs::read_to_string(self.dir.join(CA_FILE)).map_err(|_| {
            NodeError::Invalid(
                "this node is not enrolled (no ca.crt): it cannot check certificates of authors"
                    .into(),
            )
        })?;
        let mut rows = Vec::new();
        let mut learnt = Vec::with_capacity(ders.len());
        for der in ders {
            let author = match trust::verify_node_cert_der(der, &ca, None) {
                Ok(author) => author,
                Err(e) => {
                    learnt.push(Err(e.into()));
                    continue;
                }
            };
            let node_id = author.identity.node_id.to_string();
            if self.store.node_cert(&node_id)?.as_deref() != Some(&der[..]) {
                rows.push(NodeCertRow {
                    node_id,
                    unit: author.identity.unit.clone(),
                    role: author.identity.role.as_str().to_string(),
                    serial: author.identity.serial.clone(),
                    public_key: author.public_key().to_vec(),
                    der: der.clone(),
                });
            }
            learnt.push(Ok(author.identity));
        }
        if !rows.is_empty() {
            let at_ms = now_ms();
            self.store
                .write(|tx| rows.iter().try_for_each(|row| tx.put_node_cert(row, at_ms)))?;
        }
        Ok((learnt, rows.len()))
    }

    /// This node's own certificate (DER), once enrolled.
    pub fn own_cert_der(&self) -> Option<Vec<u8>> {
        let pem = std::fs::read_to_string(self.dir.join(CERT_FILE)).ok()?;
        first_cert_der(&pem)
    }

    /// Every author whose changes this node can check now: the certificates it holds
    /// (`node_certs`) and its own, each marked revoked or not by the CRL it holds.
    pub fn authors(&self) -> Result<Authors> {
        let crl = self.crl();
        let revoked = |serial: &[u8]| crl.as_ref().is_some_and(|c| c.is_revoked(serial));
        let mut keys = HashMap::new();
        for row in self.store.node_certs()? {
            let (Ok(node_id), Ok(role)) = (row.node_id.parse(), row.role.parse()) else {
                continue;
            };
            let actor = hex::decode(&row.node_id).unwrap_or_default();
            let is_revoked = revoked(&row.serial);
            let identity = PeerIdentity {
                node_id,
                unit: row.unit,
                role,
                serial: row.serial,
            };
            keys.insert(
                actor,
                (AuthorKey::from_parts(identity, row.public_key), is_revoked),
            );
        }
        if let Some(key) = self
            .own_cert_der()
            .and_then(|der| AuthorKey::from_cert_der(&der).ok())
        {
            let is_revoked = revoked(&key.identity.serial);
            keys.insert(key.identity.node_id.as_bytes().to_vec(), (key, is_revoked));
        }
        Ok(Authors { keys })
    }

    /// Every change to a document, oldest first, each with the node that signed it and
    /// whether its signature verifies here (so the province can show who wrote each line).
    pub fn audit(&mut self, id: &str) -> Result<Vec<AuditLine>> {
        let id: DocId = id.parse()?;
        let entries = self.store.read_doc(&id, crate::model::audit)?;
        let sigs: HashMap<[u8; 32], [u8; SIG_BYTES]> = self
            .store
            .change_sigs(&id)?
            .into_iter()
            .map(|row| (row.hash, row.sig))
            .collect();
        let authors = self.authors()?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                let hash: [u8; 32] = hex::decode(&entry.hash)
                    .ok()
                    .and_then(|h| h.try_into().ok())
                    .unwrap_or_default();
                let actor = hex::decode(&entry.actor).unwrap_or_default();
                AuditLine {
                    signer_unit: authors.unit_of(&actor),
                    signature: authors.verdict(id.as_str(), &hash, &actor, sigs.get(&hash)),
                    entry,
                }
            })
            .collect())
    }

    /// Notes authors of changes handed to a peer, whose certificates go ahead of them.
    pub(super) fn note_authors_out(&mut self, actors: impl IntoIterator<Item = String>) {
        self.authors_out.extend(actors);
    }

    /// The authors noted since the last call, with the certificate held of each.
    pub(super) fn take_authors_out(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        let me = self.node_id.to_string();
        let mut out = Vec::new();
        for node in std::mem::take(&mut self.authors_out) {
            let der = if node == me {
                self.own_cert_der()
            } else {
                self.store.node_cert(&node)?
            };
            if let Some(der) = der {
                out.push((node, der));
            }
        }
        Ok(out)
    }
}

/// The first certificate of a PEM file, as DER.
fn first_cert_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|der| der.to_vec())
}

/// Authors pending for a peer: kept in order, each once.
pub(super) type AuthorsOut = BTreeSet<String>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dispatch::{DispatchKind, Priority};
    use crate::node::DispatchRequest;
    use crate::units::Role;

    /// A database from before schema 8 holds unsigned changes: at the next open the node signs
    /// those of its own actor, and `audit` shows each line signed by this node, verified.
    #[test]
    fn a_node_signs_its_own_changes_from_before_schema_8_at_its_next_open() {
        let dir = tempfile::tempdir().unwrap();
        Node::init(dir.path(), "qn", Role::Province, "lan").unwrap();
        let mut node = Node::open(dir.path()).unwrap();
        node.ca_init().unwrap();
        let request = DispatchRequest {
            ref_no: "1/UBND".into(),
            summary: "Họp".into(),
            kind: DispatchKind::Dispatch,
            priority: Priority::Normal,
            to: vec!["qn/binhlieu".into()],
            attach: vec![],
        };
        let id = node.dispatch_new(None, &request).unwrap().id;
        node.dispatch_comment(None, &id, "đã xem").unwrap();
        let verified = |node: &mut Node| {
            node.audit(&id)
                .unwrap()
                .iter()
                .map(|line| line.signature)
                .collect::<Vec<_>>()
        };
        assert_eq!(verified(&mut node), [Signature::Verified; 2]);
        // As a schema-7 database, migrated, leaves it.
        node.store
            .write(|tx| {
                tx.delete_change_sigs_for_test()?;
                tx.set_meta(SIGN_OWN_CHANGES_META, "1")
            })
            .unwrap();
        assert_eq!(verified(&mut node), [Signature::Missing; 2]);
        drop(node);
        let mut node = Node::open(dir.path()).unwrap();
        assert_eq!(verified(&mut node), [Signature::Verified; 2]);
        assert_eq!(node.store.meta(SIGN_OWN_CHANGES_META).unwrap(), None);
    }

    /// Certificates of authors from a peer: one of this CA is kept (once), one of another CA
    /// is left out with why, and the rest of the frame's are kept all the same.
    #[test]
    fn certificates_of_authors_are_kept_only_when_they_chain_to_this_nodes_ca() {
        let dir = tempfile::tempdir().unwrap();
        Node::init(&dir.path().join("p"), "qn", Role::Province, "lan").unwrap();
        let mut node = Node::open(&dir.path().join("p")).unwrap();
        node.ca_init().unwrap();
        let issue = |ca: &trust::Ca| {
            let key = NodeKey::generate().unwrap();
            let pem = ca
                .issue(
                    &trust::enrol_request(&key).unwrap(),
                    "qn/binhlieu/tinhhuc",
                    Role::Commune,
                    30,
                )
                .unwrap()
                .cert_pem;
            trust::cert_der_from_pem("node certificate", &pem)
                .unwrap()
                .to_vec()
        };
        let ours = issue(
            &trust::Ca::open(dir.path().join("p").join(super::super::admin::CA_DIR)).unwrap(),
        );
        let foreign = issue(&trust::Ca::init(dir.path().join("other"), "qn").unwrap());
        let (learnt, written) = node.learn_certs(&[foreign, ours.clone()]).unwrap();
        assert!(
            matches!(&learnt[0], Err(e) if e.to_string().contains("not valid under this CA")),
            "{:?}",
            learnt[0]
        );
        assert_eq!(learnt[1].as_ref().unwrap().unit, "qn/binhlieu/tinhhuc");
        assert_eq!(written, 1);
        let node_id = learnt[1].as_ref().unwrap().node_id.to_string();
        assert_eq!(node.store.node_cert(&node_id).unwrap(), Some(ours.clone()));
        assert_eq!(node.store.node_certs().unwrap().len(), 1);
        // The same again writes nothing.
        assert_eq!(node.learn_certs(&[ours]).unwrap().1, 0);
    }
}
