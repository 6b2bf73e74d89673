//! The node's store seen by one sync session with one authenticated peer: scope filtering on the
//! way out, and scope, authorship and integrity checks on the way in.

use automerge::{AutoCommit, ChangeHash};
use tracing::warn;

use super::{now_ms, Node};
use crate::model::{self, ChangeNote, DocId};
use crate::proto::{DocChanges, DocHeads, Hash32, ProtoError, Replica};
use crate::store::docs::Saved;
use crate::store::docs::{decode_heads, encode_heads};
use crate::store::sync::Scope;
use crate::trust::PeerIdentity;
use crate::units::{is_within, parent};

/// Whether `peer` sits above `me` in the tree (then it relays others' changes and is trusted to
/// have checked them); otherwise it may only write what its own subtree authored.
pub fn is_upstream(peer_unit: &str, me: &str) -> bool {
    peer_unit != me && is_within(me, peer_unit)
}

/// What this node sends to a peer: everything when the peer is above, else the peer's subtree.
pub fn scope_for(peer_unit: &str, me: &str) -> Scope {
    if is_upstream(peer_unit, me) {
        Scope::All
    } else {
        Scope::Subtree(peer_unit.to_string())
    }
}

/// Whether `peer` may relay changes authored by others to this node: a node above it, or
/// another node of the same unit (a standby).
pub fn is_trusted_relay(peer_unit: &str, me: &str) -> bool {
    peer_unit == me || is_upstream(peer_unit, me)
}

impl Node {
    /// Whether a scan belongs to a document the peer of `peer_unit` may hold.
    pub fn blob_in_peer_scope(&self, hash: &Hash32, peer_unit: &str) -> super::Result<bool> {
        Ok(match scope_for(peer_unit, self.unit()) {
            Scope::All => true,
            Scope::Subtree(unit) => self.store.blob_in_subtree(hash, &unit)?,
        })
    }
}

/// Whether a document with these parties belongs on the node of `unit`.
pub fn in_scope_of(parties: &[String], unit: &str) -> bool {
    parent(unit).is_none() || parties.iter().any(|p| is_within(p, unit))
}

fn local(e: impl std::fmt::Display) -> ProtoError {
    ProtoError::Local(e.to_string())
}

fn to_hashes(heads: &[ChangeHash]) -> Vec<Hash32> {
    heads.iter().map(|h| h.0).collect()
}

pub struct NodeReplica<'a> {
    pub node: &'a mut Node,
    pub peer: PeerIdentity,
    peer_id: String,
}

impl<'a> NodeReplica<'a> {
    /// The caller records the contact first ([`Node::record_contact`]) so checkpoints have a row.
    pub fn new(node: &'a mut Node, peer: PeerIdentity) -> Self {
        let peer_id = peer.node_id.to_string();
        NodeReplica {
            node,
            peer,
            peer_id,
        }
    }

    fn refuse(&self, id: &str, why: String) -> ProtoError {
        let msg = format!(
            "node {} ({}) sent document {id}: {why}",
            self.peer.node_id, self.peer.unit
        );
        warn!(peer = %self.peer.unit, doc = id, "refused: {why}");
        ProtoError::Refused(msg)
    }

    /// Checks one incoming document and returns its merged state (not yet stored).
    fn check_incoming(
        &self,
        id: &DocId,
        existing: Option<&AutoCommit>,
        bytes: &[u8],
    ) -> Result<AutoCommit, ProtoError> {
        let me = self.node.unit();
        let upstream = is_trusted_relay(&self.peer.unit, me);
        let (mut doc, old_heads) = match existing {
            Some(doc) => {
                let mut doc = doc.clone();
                let heads = doc.get_heads();
                if !upstream {
                    let parties = model::parties(&doc, id).map_err(local)?;
                    if !parties.iter().any(|p| is_within(p, &self.peer.unit)) {
                        return Err(self.refuse(
                            id.as_str(),
                            "the document is outside the sender's scope".into(),
                        ));
                    }
                }
                (doc, heads)
            }
            None => (AutoCommit::new(), Vec::new()),
        };
        doc.load_incremental(bytes)
            .map_err(|e| self.refuse(id.as_str(), format!("changes do not decode: {e}")))?;
        if !doc.get_missing_deps(&[]).is_empty() {
            return Err(self.refuse(
                id.as_str(),
                "changes depend on changes that were not sent".into(),
            ));
        }
        if !upstream {
            for change in doc.get_changes(&old_heads) {
                let note = change.message().and_then(|m| ChangeNote::parse(m));
                let Some(note) = note else {
                    return Err(self.refuse(id.as_str(), "a change carries no author".into()));
                };
                if !is_within(&note.unit, &self.peer.unit) {
                    return Err(self.refuse(
                        id.as_str(),
                        format!(
                            "a change claims author unit {}, outside the sender's subtree",
                            note.unit
                        ),
                    ));
                }
                if note.node != change.actor_id().to_hex_string() {
                    return Err(self.refuse(
                        id.as_str(),
                        "a change's author node differs from its actor".into(),
                    ));
                }
            }
        }
        let parties =
            model::parties(&doc, id).map_err(|e| self.refuse(id.as_str(), e.to_string()))?;
        if !in_scope_of(&parties, me) {
            return Err(self.refuse(
                id.as_str(),
                format!("the document is outside this node's scope ({me})"),
            ));
        }
        if !upstream && existing.is_none() && !parties.iter().any(|p| is_within(p, &self.peer.unit))
        {
            return Err(self.refuse(
                id.as_str(),
                "a new document that does not concern the sender".into(),
            ));
        }
        Ok(doc)
    }
}

impl Replica for NodeReplica<'_> {
    fn feed_seq(&mut self) -> Result<u64, ProtoError> {
        Ok(self.node.store.feed_seq().map_err(local)? as u64)
    }

    fn have_from_peer(&mut self) -> Result<u64, ProtoError> {
        Ok(self
            .node
            .store
            .peer_checkpoints(&self.peer_id)
            .map_err(local)?
            .0 as u64)
    }

    fn set_have_from_peer(&mut self, upto: u64) -> Result<(), ProtoError> {
        let id = self.peer_id.clone();
        self.node
            .store
            .write(|tx| tx.set_have_from(&id, upto as i64))
            .map_err(local)
    }

    fn acked_by_peer(&mut self) -> Result<u64, ProtoError> {
        Ok(self
            .node
            .store
            .peer_checkpoints(&self.peer_id)
            .map_err(local)?
            .1 as u64)
    }

    fn set_acked_by_peer(&mut self, upto: u64) -> Result<(), ProtoError> {
        let id = self.peer_id.clone();
        self.node
            .store
            .write(|tx| tx.set_acked_by(&id, upto as i64))
            .map_err(local)
    }

    fn peer_regressed(&mut self, have: u64) -> Result<(), ProtoError> {
        let id = self.peer_id.clone();
        warn!(peer = %self.peer.unit, have, "peer holds less than it acknowledged (restored from a backup?): offering again");
        self.node
            .store
            .write(|tx| tx.peer_regressed(&id, have as i64))
            .map_err(local)
    }

    fn note_peer_feed(&mut self, seq: u64) -> Result<(), ProtoError> {
        let id = self.peer_id.clone();
        self.node
            .store
            .write(|tx| tx.set_peer_feed(&id, seq as i64))
            .map_err(local)
    }

    fn changed_since(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DocHeads)>, ProtoError> {
        let scope = scope_for(&self.peer.unit, self.node.unit());
        let mut rows = self
            .node
            .store
            .changed_since(&scope, Some(&self.peer_id), after as i64, limit)
            .map_err(local)?;
        // Flash and urgent dispatches travel first within the page.
        rows.sort_by_key(|(seq, _, _, rank)| (std::cmp::Reverse(*rank), *seq));
        rows.into_iter()
            .map(|(seq, id, heads, _)| {
                Ok((
                    seq as u64,
                    DocHeads {
                        id,
                        heads: to_hashes(&decode_heads(&heads).map_err(local)?),
                    },
                ))
            })
            .collect()
    }

    fn wants(&mut self, offered: &[DocHeads]) -> Result<Vec<DocHeads>, ProtoError> {
        let mut wants = Vec::new();
        for offer in offered {
            let id: DocId = offer
                .id
                .parse()
                .map_err(|e| ProtoError::Malformed(format!("offer: {e}")))?;
            let offered_heads: Vec<ChangeHash> =
                offer.heads.iter().map(|h| ChangeHash(*h)).collect();
            let Some(mine) = self.node.store.doc_heads(id.as_str()).map_err(local)? else {
                wants.push(DocHeads {
                    id: offer.id.clone(),
                    heads: Vec::new(),
                });
                continue;
            };
            if encode_heads(&offered_heads) == mine {
                continue;
            }
            let (lacking, heads) = self
                .node
                .store
                .read_doc(&id, |doc| {
                    (
                        offered_heads
                            .iter()
                            .any(|h| doc.get_change_by_hash(h).is_none()),
                        doc.get_heads(),
                    )
                })
                .map_err(local)?;
            if lacking {
                wants.push(DocHeads {
                    id: offer.id.clone(),
                    heads: to_hashes(&heads),
                });
            }
        }
        Ok(wants)
    }

    fn changes_for(&mut self, want: &DocHeads) -> Result<Option<DocChanges>, ProtoError> {
        let id: DocId = want
            .id
            .parse()
            .map_err(|e| ProtoError::Malformed(format!("want: {e}")))?;
        let scope = scope_for(&self.peer.unit, self.node.unit());
        if let Scope::Subtree(unit) = &scope {
            let parties = self
                .node
                .store
                .read_doc(&id, |doc| model::parties(doc, &id))
                .map_err(local)?
                .map_err(local)?;
            if !parties.iter().any(|p| is_within(p, unit)) {
                warn!(peer = %self.peer.unit, doc = %id, "peer asked for a document outside its scope; not sent");
                return Ok(None);
            }
        }
        let heads: Vec<ChangeHash> = want.heads.iter().map(|h| ChangeHash(*h)).collect();
        let (data, mine) = self
            .node
            .store
            .read_doc(&id, |doc| {
                let mine = doc.get_heads();
                // A peer with nothing gets the compact, compressed whole document.
                if heads.is_empty() {
                    return (doc.save(), mine);
                }
                let known: Vec<ChangeHash> = heads
                    .iter()
                    .filter(|h| doc.get_change_by_hash(h).is_some())
                    .copied()
                    .collect();
                (doc.save_after(&known), mine)
            })
            .map_err(local)?;
        if data.len() > crate::proto::wire::DOC_CHANGES_BYTES_MAX {
            warn!(doc = %id, bytes = data.len(), "document changes too large to send in one frame; not sent");
            return Ok(None);
        }
        Ok((!data.is_empty()).then(|| DocChanges {
            id: want.id.clone(),
            heads: to_hashes(&mine),
            data,
        }))
    }

    fn apply(&mut self, docs: Vec<DocChanges>) -> Result<usize, ProtoError> {
        let mut checked = Vec::with_capacity(docs.len());
        for change in docs {
            let id: DocId = change
                .id
                .parse()
                .map_err(|e| ProtoError::Malformed(format!("changes: {e}")))?;
            let existing = if self.node.store.doc_exists(&id).map_err(local)? {
                Some(
                    self.node
                        .store
                        .read_doc(&id, |doc| doc.clone())
                        .map_err(local)?,
                )
            } else {
                None
            };
            let doc = self.check_incoming(&id, existing.as_ref(), &change.data)?;
            let mut sender_heads: Vec<ChangeHash> =
                change.heads.iter().map(|h| ChangeHash(*h)).collect();
            sender_heads.sort();
            checked.push((id, doc, sender_heads));
        }
        let at_ms = now_ms();
        let n = checked.len();
        let peer_id = self.peer_id.clone();
        // Merge into what is stored now, inside the write lock: a local write that landed
        // since the check is kept, never overwritten.
        self.node
            .store
            .write(|tx| {
                for (id, mut doc, sender_heads) in checked {
                    let merged = match tx.load_doc(&id)? {
                        Some(current) => {
                            let mut merged = current.doc;
                            merged.merge(&mut doc).map_err(|e| {
                                crate::store::StoreError::Corrupt(format!("merging {id}: {e}"))
                            })?;
                            tx.save_doc(&id, Some(current.heads), merged, at_ms)?
                        }
                        None => tx.save_doc(&id, None, doc, at_ms)?,
                    };
                    // The sender already holds this exact state: never offer it back.
                    if let Saved::Changed(_) = merged {
                        if tx.doc_heads_sorted(&id)? == sender_heads {
                            tx.set_doc_origin(&id, &peer_id)?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(local)?;
        Ok(n)
    }

    fn missing_blobs(&mut self, limit: usize) -> Result<Vec<(Hash32, u64)>, ProtoError> {
        self.node.store.missing_blobs(limit).map_err(local)
    }
}
