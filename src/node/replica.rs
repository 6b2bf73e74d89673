//! The node's store seen by one sync session with one authenticated peer: scope filtering on the
//! way out, and scope, authorship and integrity checks on the way in.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};

use automerge::{AutoCommit, ChangeHash};
use tracing::warn;

use super::{now_ms, Node};
use crate::model::{self, guard, ChangeNote, DocId, DocView};
use crate::proto::session::OFFER_PAGE_DOCS;
use crate::proto::{Applied, DocChanges, DocHeads, Hash32, ProtoError, Replica};
use crate::store::docs::{decode_heads, encode_heads, SaveHints};
use crate::store::sync::Scope;
use crate::store::{DocRecord, StoreError, WriteTx};
use crate::trust::PeerIdentity;
use crate::units::{is_within, parent};

/// Shortest time between two regressions of one peer that this node honours (each costs an
/// offer of the peer's whole scope from where it says it is).
const PEER_REGRESSION_INTERVAL_MS: i64 = 10 * 60 * 1000;
/// Meta key (followed by the peer's node id) of when that peer last regressed.
const REGRESSED_AT_META: &str = "peer_regressed_at_ms:";

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
    /// The unit of every node whose certificate this node has seen: the nodes it met, and on
    /// the province every node its CA certified.
    pub fn known_node_units(&self) -> super::Result<HashMap<String, String>> {
        let mut units: HashMap<String, String> = self
            .store
            .peer_syncs()?
            .into_iter()
            .map(|p| (p.node_id, p.unit))
            .collect();
        if self.dir.join(super::sync::CA_DIR).exists() {
            for record in crate::trust::Ca::open(self.dir.join(super::sync::CA_DIR))?.issued()? {
                units.insert(record.node_id.to_string(), record.unit);
            }
        }
        Ok(units)
    }

    /// Whether a peer may read a scan: any scan for a peer above this node; for one below or
    /// beside it, a scan a document of its scope attaches that someone outside its subtree
    /// wrote, or that this very peer delivered (docs/security.md).
    pub fn blob_readable_by(&self, hash: &Hash32, peer: &PeerIdentity) -> super::Result<bool> {
        Ok(match scope_for(&peer.unit, self.unit()) {
            Scope::All => true,
            // A standby of this same unit holds what this node holds.
            Scope::Subtree(unit) if unit == self.unit() => true,
            Scope::Subtree(unit) => {
                self.store
                    .blob_readable_by(hash, &unit, &peer.node_id.to_string())?
            }
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
}

/// Who sent a frame of changes, as the checks on each incoming document need it.
struct Sender<'a> {
    peer: &'a PeerIdentity,
    /// This node's unit.
    me: &'a str,
    /// Whether the sender may relay changes authored by others ([`is_trusted_relay`]).
    upstream: bool,
    /// The unit of every node whose certificate this node has seen (node id in hex → unit):
    /// an actor belongs to the node whose key it is derived from.
    actors: HashMap<String, String>,
    /// What the frame's documents inflate to so far ([`FRAME_INFLATED_BYTES_MAX`]); the
    /// checking threads add to it as they go.
    inflated: AtomicUsize,
}

/// Most bytes all documents of one frame may inflate to together. Each checking thread holds
/// up to 16 checked documents ahead of the store, and every inflated byte costs Automerge two
/// SHA-256 passes and a copy as it loads: a frame of documents each just under
/// [`guard::INFLATED_BYTES_MAX`] would cost that many times over. Twice the bound of one
/// document: a sender starts a new Changes frame after 2 MiB of changes, and sends a document of
/// up to 8 MiB alone.
const FRAME_INFLATED_BYTES_MAX: usize = 2 * guard::INFLATED_BYTES_MAX;

/// Why applying a frame stopped: the sender's fault, or this node's store.
enum ApplyError {
    Proto(ProtoError),
    Store(StoreError),
}

impl From<ProtoError> for ApplyError {
    fn from(e: ProtoError) -> Self {
        ApplyError::Proto(e)
    }
}

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        ApplyError::Store(e)
    }
}

/// An incoming document loaded and checked, ready to store: the merged state, its fields, and
/// the heads it replaces (None when new).
struct Checked {
    doc: AutoCommit,
    view: Result<DocView, model::ModelError>,
    old_heads: Option<Vec<ChangeHash>>,
    /// The received bytes are the document's whole `save()`: stored as they came.
    whole: bool,
}

/// New changes of one document from a peer below judged at once, at most (see `Sender::check`).
const CHANGES_JUDGED_MAX: usize = 1_000;

/// Incoming documents checked ahead of the store, at most, across the checking threads: the
/// checks of the next documents (Automerge load, fields) overlap the store's inserts of the
/// previous ones.
const CHECKED_AHEAD_MAX: usize = 32;

/// Threads that check incoming documents beside the one storing them: one per core. Checking
/// (the Automerge load that verifies a document, then reading its fields) costs about twice
/// what storing does (callgrind, a first sync of 10,000 dispatches: 4.2 G instructions in the
/// checking thread, 2.3 G in the storing one, both sides' protocol work included), so on two
/// cores two checkers and the storing thread keep both busy.
fn checker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// The new documents of a frame, checked on other threads and read back in frame order: checker
/// k takes every `n`-th document, and the results are read from each in turn.
struct CheckedAhead {
    results: Vec<Receiver<Result<Checked, ProtoError>>>,
    read: usize,
}

impl CheckedAhead {
    /// Starts the checkers inside `scope` (none when there is nothing to check).
    fn start<'scope, 'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        sender: &'env Sender<'env>,
        jobs: Vec<(&'env DocId, &'env [u8])>,
    ) -> Result<Self, ProtoError> {
        let n = checker_threads().min(jobs.len());
        let mut results = Vec::with_capacity(n);
        for k in 0..n {
            let (ahead, checked) = sync_channel(CHECKED_AHEAD_MAX / n);
            let mine: Vec<_> = jobs.iter().skip(k).step_by(n).copied().collect();
            let checker = move || {
                for (id, bytes) in mine {
                    if ahead.send(sender.check_new(id, bytes)).is_err() {
                        break;
                    }
                }
            };
            std::thread::Builder::new()
                .name(format!("check-docs-{k}"))
                .spawn_scoped(scope, checker)
                .map_err(|e| local(format!("starting a thread: {e}")))?;
            results.push(checked);
        }
        Ok(CheckedAhead { results, read: 0 })
    }

    /// The check of the next new document, in frame order.
    fn next(&mut self) -> Result<Result<Checked, ProtoError>, ProtoError> {
        let from = &self.results[self.read % self.results.len()];
        self.read += 1;
        from.recv()
            .map_err(|_| local("a thread checking incoming documents stopped"))
    }
}

impl Sender<'_> {
    fn refuse(&self, id: &str, why: String) -> ProtoError {
        ProtoError::Refused(format!(
            "node {} ({}) sent document {id}: {why}",
            self.peer.node_id, self.peer.unit
        ))
    }

    /// Refuses bytes that Automerge would inflate past [`guard::INFLATED_BYTES_MAX`], or past
    /// what is left of the frame's [`FRAME_INFLATED_BYTES_MAX`], before Automerge allocates them
    /// (it inflates without a limit).
    fn guard(&self, id: &DocId, bytes: &[u8]) -> Result<guard::Inflated, ProtoError> {
        let left = FRAME_INFLATED_BYTES_MAX.saturating_sub(self.inflated.load(Ordering::Relaxed));
        let frame_full = || {
            self.refuse(
                id.as_str(),
                format!(
                    "the frame's documents inflate to more than {FRAME_INFLATED_BYTES_MAX} bytes together; send fewer per frame"
                ),
            )
        };
        let inflated = match guard::check_inflated(bytes, guard::INFLATED_BYTES_MAX.min(left)) {
            Ok(inflated) => inflated,
            Err(guard::GuardError::TooLarge { .. }) if left < guard::INFLATED_BYTES_MAX => {
                return Err(frame_full())
            }
            Err(e) => return Err(self.refuse(id.as_str(), e.to_string())),
        };
        let total = self.inflated.fetch_add(inflated.bytes, Ordering::Relaxed) + inflated.bytes;
        if total > FRAME_INFLATED_BYTES_MAX {
            return Err(frame_full());
        }
        Ok(inflated)
    }

    /// Loads a document this node does not hold from the bytes received and checks it. Needs
    /// no store, so it runs beside the transaction.
    fn check_new(&self, id: &DocId, bytes: &[u8]) -> Result<Checked, ProtoError> {
        let inflated = self.guard(id, bytes)?;
        // A new document sent whole (`save()`) loads strictly; its bytes are then stored as
        // they came, instead of saving the parsed document again. Anything else (changes
        // without a document chunk, or a partial load) goes through `load_incremental`, at
        // once when the bytes do not start with a document chunk (a second load would cost
        // a second pass over everything they inflate to).
        let strict = if inflated.document_first {
            AutoCommit::load(bytes).ok()
        } else {
            None
        };
        let (mut doc, whole) = match strict {
            Some(doc) => (doc, true),
            None => (AutoCommit::new(), false),
        };
        if !whole {
            doc.load_incremental(bytes)
                .map_err(|e| self.refuse(id.as_str(), format!("changes do not decode: {e}")))?;
        }
        self.check(id, doc, None, whole)
    }

    /// Merges the bytes received into the stored state of a document and checks the result.
    fn check_stored(
        &self,
        id: &DocId,
        current: DocRecord,
        bytes: &[u8],
    ) -> Result<Checked, ApplyError> {
        if !self.upstream {
            let parties = model::parties(&current.doc, id).map_err(local)?;
            if !parties.iter().any(|p| is_within(p, &self.peer.unit)) {
                return Err(self
                    .refuse(
                        id.as_str(),
                        "the document is outside the sender's scope".into(),
                    )
                    .into());
            }
        }
        self.guard(id, bytes)?;
        let mut doc = current.doc;
        doc.load_incremental(bytes)
            .map_err(|e| self.refuse(id.as_str(), format!("changes do not decode: {e}")))?;
        Ok(self.check(id, doc, Some(current.heads), false)?)
    }

    /// Integrity, authorship and scope checks of a document as it would be stored.
    fn check(
        &self,
        id: &DocId,
        mut doc: AutoCommit,
        old_heads: Option<Vec<ChangeHash>>,
        whole: bool,
    ) -> Result<Checked, ProtoError> {
        if !doc.get_missing_deps(&[]).is_empty() {
            return Err(self.refuse(
                id.as_str(),
                "changes depend on changes that were not sent".into(),
            ));
        }
        if !self.upstream {
            let changes = doc.get_changes(old_heads.as_deref().unwrap_or_default());
            // Judging a change replays the document up to it: bounded, or one document of many
            // tiny changes would buy a peer seconds of CPU per frame.
            if changes.len() > CHANGES_JUDGED_MAX {
                return Err(self.refuse(
                    id.as_str(),
                    format!(
                        "{} new changes at once, more than the {CHANGES_JUDGED_MAX} judged per document from below",
                        changes.len()
                    ),
                ));
            }
            let mut judge = model::authz::Judge::new(&mut doc, id);
            for change in &changes {
                let note = change.message().and_then(ChangeNote::parse);
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
                let actor = change.actor_id().to_hex_string();
                if note.node != actor {
                    return Err(self.refuse(
                        id.as_str(),
                        "a change's author node differs from its actor".into(),
                    ));
                }
                // A node writes under its own actor only (its node id): another node's actor
                // would poison that node's copies (Automerge refuses two changes with one actor
                // and sequence number).
                let owner = if actor == self.peer.node_id.to_string() {
                    Some(self.peer.unit.as_str())
                } else {
                    self.actors.get(&actor).map(String::as_str)
                };
                if !owner.is_some_and(|unit| is_within(unit, &self.peer.unit)) {
                    return Err(self.refuse(
                        id.as_str(),
                        format!("a change's actor {actor} is not a node of the sender's subtree"),
                    ));
                }
                // What the change does, not what its note says, decides (docs/security.md).
                judge
                    .authorize(change, &note.unit)
                    .map_err(|why| self.refuse(id.as_str(), why))?;
            }
        }
        // The fields are read once, for the scope checks and the index rows. A document whose
        // fields do not read is still checked on its parties alone, and then fails as its
        // indexing would.
        let view = DocView::read(&doc, id);
        let parties = match &view {
            Ok(view) => view.parties(),
            Err(_) => {
                model::parties(&doc, id).map_err(|e| self.refuse(id.as_str(), e.to_string()))?
            }
        };
        if !in_scope_of(&parties, self.me) {
            return Err(self.refuse(
                id.as_str(),
                format!("the document is outside this node's scope ({})", self.me),
            ));
        }
        if !self.upstream
            && old_heads.is_none()
            && !parties.iter().any(|p| is_within(p, &self.peer.unit))
        {
            return Err(self.refuse(
                id.as_str(),
                "a new document that does not concern the sender".into(),
            ));
        }
        Ok(Checked {
            doc,
            view,
            old_heads,
            whole,
        })
    }

    /// Checks one incoming document, merged with its stored state `current` or new (then
    /// checked ahead, `early`, unless the frame carried it twice), and stores it in `tx`.
    fn store(
        &self,
        tx: &mut WriteTx<'_>,
        peer_id: &str,
        (id, change): (&DocId, &DocChanges),
        (current, early): (Option<DocRecord>, Option<Result<Checked, ProtoError>>),
        at_ms: i64,
    ) -> Result<(), ApplyError> {
        let bytes = &change.data[..];
        let checked = match (current, early) {
            (Some(current), _) => self.check_stored(id, current, bytes)?,
            (None, Some(early)) => early?,
            (None, None) => self.check_new(id, bytes)?,
        };
        let view = checked
            .view
            .map_err(|e| self.refuse(id.as_str(), format!("its fields do not read: {e}")))?;
        let mut sender_heads: Vec<ChangeHash> =
            change.heads.iter().map(|h| ChangeHash(*h)).collect();
        sender_heads.sort();
        let hints = SaveHints {
            snapshot: checked.whole.then_some(bytes),
            view: Some(&view),
            // The sender already holds this exact state: never offer it back.
            origin: Some((peer_id, &sender_heads)),
        };
        tx.save_doc_with(id, checked.old_heads, checked.doc, at_ms, hints)?;
        Ok(())
    }
}

/// A stored document that no longer loads (poisoned by a hostile peer before its changes were
/// checked, or damaged) is left out of offers and sends, logged, instead of ending every
/// session; `communesync check` names it. Any other store error ends the session.
fn quarantined<T>(id: &DocId, read: Result<T, StoreError>) -> Result<Option<T>, ProtoError> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e @ (StoreError::Corrupt(_) | StoreError::Model(_))) => {
            warn!(doc = %id, "stored document does not load, left out of this session: {e}");
            Ok(None)
        }
        Err(e) => Err(local(e)),
    }
}

/// Leaves one refused document out of a frame: logged once, recorded for `status`, and
/// reported to the peer by the session.
fn refused(
    tx: &mut WriteTx<'_>,
    peer_id: &str,
    applied: &mut Applied,
    id: &str,
    why: ProtoError,
    at_ms: i64,
) -> Result<(), ApplyError> {
    let reason = match why {
        ProtoError::Refused(reason) => reason,
        other => other.to_string(),
    };
    warn!("refused: {reason}");
    tx.refusal_record(peer_id, id, false, &reason, at_ms)?;
    applied.refused.push((id.to_string(), reason));
    Ok(())
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

    fn epoch(&mut self) -> Result<u64, ProtoError> {
        let hex = self.node.store.epoch().map_err(local)?;
        u64::from_str_radix(&hex, 16)
            .map_err(|_| local(format!("the stored epoch {hex:?} is not 16 hex digits")))
    }

    fn note_peer_epoch(&mut self, epoch: u64) -> Result<bool, ProtoError> {
        let id = self.peer_id.clone();
        let changed = self
            .node
            .store
            .write(|tx| tx.set_peer_epoch(&id, &format!("{epoch:016x}")))
            .map_err(local)?;
        if changed {
            warn!(peer = %self.peer.unit, "peer's database is another copy than last time (restored from a backup?): offering again what it may have lost");
        }
        Ok(changed)
    }

    fn peer_regressed(&mut self, have: u64) -> Result<(), ProtoError> {
        let id = self.peer_id.clone();
        // Each regression makes this node offer the peer's whole scope again from `have`: a
        // peer restored from a backup needs it once, a peer claiming it at every session would
        // have this node resend everything each time.
        let key = format!("{REGRESSED_AT_META}{id}");
        let now = now_ms();
        let last: Option<i64> = self
            .node
            .store
            .meta(&key)
            .map_err(local)?
            .and_then(|at| at.parse().ok());
        if let Some(last) = last.filter(|at| now - at < PEER_REGRESSION_INTERVAL_MS) {
            return Err(ProtoError::Refused(format!(
                "node {} ({}) again holds less of this node's feed than it acknowledged ({have}), {} s after the last time; once per {} min is honoured: sync again later",
                self.peer.node_id,
                self.peer.unit,
                (now - last) / 1000,
                PEER_REGRESSION_INTERVAL_MS / 60_000
            )));
        }
        warn!(peer = %self.peer.unit, have, "peer holds less than it acknowledged (restored from a backup?): offering again");
        self.node
            .store
            .write(|tx| {
                tx.peer_regressed(&id, have as i64)?;
                tx.set_meta(&key, &now.to_string())
            })
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
    ) -> Result<Vec<(u64, DocHeads, i64)>, ProtoError> {
        let scope = scope_for(&self.peer.unit, self.node.unit());
        let mut rows = self
            .node
            .store
            .changed_since(&scope, Some(&self.peer_id), after as i64, limit)
            .map_err(local)?;
        // Flash and urgent dispatches travel first within the page.
        rows.sort_by_key(|(seq, _, _, rank)| (std::cmp::Reverse(*rank), *seq));
        rows.into_iter()
            .map(|(seq, id, heads, rank)| {
                Ok((
                    seq as u64,
                    DocHeads {
                        id,
                        heads: to_hashes(&decode_heads(&heads).map_err(local)?),
                    },
                    rank,
                ))
            })
            .collect()
    }

    fn wants(&mut self, offered: &[DocHeads]) -> Result<Vec<DocHeads>, ProtoError> {
        // An offered document whose heads differ from ours costs a load here: a peer lists at
        // most a page per Offer, so one frame cannot ask for more.
        if offered.len() > OFFER_PAGE_DOCS {
            return Err(ProtoError::Violation(format!(
                "an Offer of {} documents, more than a page ({OFFER_PAGE_DOCS})",
                offered.len()
            )));
        }
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
            let read = self.node.store.read_doc(&id, |doc| {
                (
                    offered_heads
                        .iter()
                        .any(|h| doc.get_change_by_hash(h).is_none()),
                    doc.get_heads(),
                )
            });
            let Some((lacking, heads)) = quarantined(&id, read)? else {
                continue;
            };
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
            // The index rows hold the stored state's parties: no need to parse the document.
            let parties = self.node.store.doc_parties(&id).map_err(local)?;
            if parties.is_empty() && !self.node.store.doc_exists(&id).map_err(local)? {
                return Err(local(StoreError::NotFound(format!("{} {id}", id.kind()))));
            }
            if !parties.iter().any(|p| is_within(p, unit)) {
                warn!(peer = %self.peer.unit, doc = %id, "peer asked for a document outside its scope; not sent");
                return Ok(None);
            }
        }
        // A peer with nothing gets the whole document, compact and compressed: the stored
        // snapshot and chunks as they are when they are compact enough, else a fresh save().
        let stored = if want.heads.is_empty() {
            let Some(stored) = quarantined(&id, self.node.store.doc_load_bytes(&id))? else {
                return Ok(None);
            };
            stored
        } else {
            None
        };
        let (mine, data) = match stored {
            Some(stored) => stored,
            None => {
                let heads: Vec<ChangeHash> = want.heads.iter().map(|h| ChangeHash(*h)).collect();
                let read = self.node.store.read_doc(&id, |doc| {
                    let mine = doc.get_heads();
                    if heads.is_empty() {
                        return (mine, doc.save());
                    }
                    let known: Vec<ChangeHash> = heads
                        .iter()
                        .filter(|h| doc.get_change_by_hash(h).is_some())
                        .copied()
                        .collect();
                    (mine, doc.save_after(&known))
                });
                let Some(read) = quarantined(&id, read)? else {
                    return Ok(None);
                };
                read
            }
        };
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

    fn apply(&mut self, docs: Vec<DocChanges>) -> Result<Applied, ProtoError> {
        let n = docs.len();
        let at_ms = now_ms();
        let me = self.node.unit().to_string();
        let upstream = is_trusted_relay(&self.peer.unit, &me);
        let sender = Sender {
            peer: &self.peer,
            me: &me,
            upstream,
            actors: if upstream {
                HashMap::new()
            } else {
                self.node.known_node_units().map_err(local)?
            },
            inflated: AtomicUsize::new(0),
        };
        let peer_id = &self.peer_id;
        // One transaction for the frame. A document the checks refuse is left out alone and
        // recorded; only a failure of this node's own store rolls the frame back. Which
        // documents are new is read inside the transaction (the write lock), so nothing else
        // can store them meanwhile; those are loaded and checked on other threads, a bounded
        // distance ahead, while the others are merged with their stored state here.
        let result = self.node.store.write_with(|tx| {
            let mut applied = Applied::default();
            let mut incoming = Vec::with_capacity(n);
            for change in docs {
                match change.id.parse::<DocId>() {
                    Ok(id) => {
                        let stored = tx.doc_exists(&id)?;
                        incoming.push((id, change, stored));
                    }
                    Err(e) => {
                        let why = sender.refuse(&change.id, format!("not a document id: {e}"));
                        refused(tx, peer_id, &mut applied, &change.id, why, at_ms)?;
                    }
                }
            }
            std::thread::scope(|scope| {
                let jobs = incoming
                    .iter()
                    .filter(|(_, _, stored)| !stored)
                    .map(|(id, change, _)| (id, &change.data[..]));
                let mut checked = CheckedAhead::start(scope, &sender, jobs.collect())?;
                let mut new_here = HashSet::new();
                for (id, change, stored) in &incoming {
                    let early = if *stored { None } else { Some(checked.next()?) };
                    // New when the frame began, and still new unless the frame carries it twice
                    // (and its first copy was stored).
                    let current = if *stored || !new_here.insert(id) {
                        match tx.load_doc(id) {
                            Ok(current) => current,
                            // A stored copy that no longer loads (poisoned elsewhere, damaged)
                            // is quarantined: this document is refused, the others go on.
                            Err(e @ (StoreError::Corrupt(_) | StoreError::Model(_))) => {
                                let why = sender.refuse(
                                    id.as_str(),
                                    format!("the copy stored here does not load ({e}); run `communesync check`"),
                                );
                                refused(tx, peer_id, &mut applied, id.as_str(), why, at_ms)?;
                                continue;
                            }
                            Err(e) => return Err(e.into()),
                        }
                    } else {
                        None
                    };
                    match sender.store(tx, peer_id, (id, change), (current, early), at_ms) {
                        Ok(()) => applied.stored += 1,
                        Err(ApplyError::Proto(why)) => {
                            refused(tx, peer_id, &mut applied, id.as_str(), why, at_ms)?
                        }
                        Err(e @ ApplyError::Store(_)) => return Err(e),
                    }
                }
                Ok(applied)
                // Dropping `checked` stops the checking threads at their next document.
            })
        });
        result.map_err(|e| match e {
            ApplyError::Proto(e) => e,
            ApplyError::Store(e) => local(e),
        })
    }

    fn peer_refused(&mut self, id: &str, reason: &str) -> Result<(), ProtoError> {
        // Only a document this node holds can have been refused: anything else is noise.
        let held = id
            .parse::<DocId>()
            .ok()
            .map(|doc| self.node.store.doc_exists(&doc))
            .transpose()
            .map_err(local)?
            .unwrap_or(false);
        if !held {
            return Ok(());
        }
        warn!(peer = %self.peer.unit, doc = %id, "the peer refused a document of ours: {reason}");
        let peer_id = self.peer_id.clone();
        self.node
            .store
            .write(|tx| tx.refusal_record(&peer_id, id, true, reason, now_ms()))
            .map_err(local)
    }

    fn missing_blobs(&mut self, limit: usize) -> Result<Vec<(Hash32, u64)>, ProtoError> {
        // A peer below is asked only for scans its subtree's documents attach.
        let within = match scope_for(&self.peer.unit, self.node.unit()) {
            Scope::All => None,
            Scope::Subtree(unit) => Some(unit),
        };
        self.node
            .store
            .missing_blobs(limit, within.as_deref())
            .map_err(local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Role;

    #[test]
    fn the_documents_of_one_frame_inflate_within_a_budget_together() {
        let dir = tempfile::tempdir().unwrap();
        Node::init(dir.path(), "qn/binhlieu", Role::District, "lan").unwrap();
        let node = Node::open(dir.path()).unwrap();
        let peer = PeerIdentity {
            node_id: node.node_id(),
            unit: "qn".into(),
            role: Role::Province,
            serial: vec![1],
        };
        let sender = Sender {
            peer: &peer,
            me: "qn/binhlieu",
            upstream: true,
            actors: HashMap::new(),
            inflated: AtomicUsize::new(0),
        };
        let id: DocId = "dsp_0123456789abcdef".parse().unwrap();
        // Each just under the bound of one document: two fit a frame, the third does not.
        let near = guard::tests::change_bomb(30);
        for _ in 0..2 {
            sender.guard(&id, &near).unwrap();
        }
        let err = sender.guard(&id, &near).unwrap_err();
        assert!(
            matches!(&err, ProtoError::Refused(why) if why.contains("inflate to more than 67108864 bytes together")),
            "{err}"
        );
    }
}
