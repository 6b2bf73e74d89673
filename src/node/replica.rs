//! The node's store seen by one sync session with one authenticated peer: scope filtering on the
//! way out, and scope, authorship and integrity checks on the way in.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Duration;

use automerge::{AutoCommit, ChangeHash};
use tracing::warn;

use super::{now_ms, Authors, Node};
use crate::model::{self, guard, ChangeNote, DocId, DocView};
use crate::proto::session::OFFER_PAGE_DOCS;
use crate::proto::wire::{CHANGE_PREFIX_BYTES, SIG_BYTES};
use crate::proto::{Applied, ChangeSig, DocChanges, DocHeads, Hash32, ProtoError, Replica};
use crate::store::docs::{decode_heads, encode_heads, SaveHints};
use crate::store::sigs::ChangeSigRow;
use crate::store::sync::Scope;
use crate::store::{DocRecord, StoreError, WriteTx};
use crate::trust::PeerIdentity;
use crate::units::{canonical, is_within, parent};

/// Shortest time between two regressions of one peer that this node honours (each costs an
/// offer of the peer's whole scope from where it says it is).
const PEER_REGRESSION_INTERVAL_MS: i64 = 10 * 60 * 1000;
/// Meta key (followed by the peer's node id) of when that peer last regressed.
const REGRESSED_AT_META: &str = "peer_regressed_at_ms:";

/// CPU time one session may cost this node in work its peer drives (checking and storing the
/// documents it sends, loading documents for its offers) per [`SESSION_CPU_WINDOW`]: a first
/// sync of 10,000 documents costs about 2 s, so this bounds a hostile peer to ten minutes of
/// one core, after which the session is refused and the peer waits
/// ([`Node::peer_strike_wait`]).
pub const SESSION_CPU_MAX: Duration = Duration::from_secs(600);
/// The budget starts afresh every hour of a session, so a `serve` session that relays for
/// weeks is bounded in its rate (a sixth of a core over an hour), not cut off by its total.
pub const SESSION_CPU_WINDOW: Duration = Duration::from_secs(3_600);
/// Meta key (followed by the peer's node id) of the peer's violations: "count,at_ms".
const STRIKES_META: &str = "peer_strikes:";
/// How long a peer refused for a violation waits before its next session: doubling per
/// violation in a row, from a minute to an hour.
const STRIKE_WAIT_S_MIN: u64 = 60;
const STRIKE_WAIT_S_MAX: u64 = 3_600;

/// The wait after `strikes` violations in a row.
pub fn strike_wait(strikes: u32) -> Duration {
    let doubled = STRIKE_WAIT_S_MIN.saturating_mul(1 << strikes.saturating_sub(1).min(16));
    Duration::from_secs(doubled.min(STRIKE_WAIT_S_MAX))
}

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
    /// How long `peer` must still wait before this node holds a session with it again, after
    /// violations: None when it may now.
    pub fn peer_strike_wait(&self, peer: &PeerIdentity) -> super::Result<Option<Duration>> {
        let Some(value) = self
            .store
            .meta(&format!("{STRIKES_META}{}", peer.node_id))?
        else {
            return Ok(None);
        };
        let (strikes, at_ms) = value
            .split_once(',')
            .and_then(|(n, at)| Some((n.parse::<u32>().ok()?, at.parse::<i64>().ok()?)))
            .unwrap_or((0, 0));
        let until = at_ms + strike_wait(strikes).as_millis() as i64;
        let left = until - now_ms();
        Ok((strikes > 0 && left > 0).then(|| Duration::from_millis(left as u64)))
    }

    /// Records how a session with `peer` ended: a violation (or a refusal of ours) adds a
    /// strike and starts its wait; a session that ended well clears them.
    pub fn record_peer_strike(&mut self, peer: &PeerIdentity, violated: bool) -> super::Result<()> {
        let key = format!("{STRIKES_META}{}", peer.node_id);
        let before = self
            .store
            .meta(&key)?
            .and_then(|v| v.split_once(',').and_then(|(n, _)| n.parse::<u32>().ok()))
            .unwrap_or(0);
        if !violated && before == 0 {
            return Ok(());
        }
        self.store.write(|tx| {
            if violated {
                tx.set_meta(&key, &format!("{},{}", before + 1, now_ms()))
            } else {
                tx.delete_meta(&key)
            }
        })?;
        Ok(())
    }

    /// The unit of every node whose certificate this node has seen: the nodes it met, and on
    /// the province every node its CA certified.
    pub fn known_node_units(&self) -> super::Result<HashMap<String, String>> {
        let mut units: HashMap<String, String> = self
            .store
            .peer_syncs()?
            .into_iter()
            .map(|p| (p.node_id, p.unit))
            .collect();
        if self.dir.join(super::admin::CA_DIR).exists() {
            for record in crate::trust::Ca::open(self.dir.join(super::admin::CA_DIR))?.issued()? {
                units.insert(record.node_id.to_string(), record.unit);
            }
        }
        // A certificate names the unit it was issued for; the tree may have moved it since.
        for unit in units.values_mut() {
            if let Some(current) = self.tree.aliases().get(unit.as_str()) {
                *unit = current.clone();
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
    /// Documents left out because the stored copy does not load ([`Replica::take_unloadable`]).
    unloadable: Vec<(String, String)>,
}

impl<'a> NodeReplica<'a> {
    /// The caller records the contact first ([`Node::record_contact`]) so checkpoints have a row.
    pub fn new(node: &'a mut Node, peer: PeerIdentity) -> Self {
        let peer_id = peer.node_id.to_string();
        NodeReplica {
            node,
            peer,
            peer_id,
            unloadable: Vec::new(),
        }
    }

    /// Refuses peer-driven work once the session has spent its CPU budget
    /// ([`SESSION_CPU_MAX`]); else returns this thread's CPU clock, for [`Self::charge_cpu`].
    fn cpu_budget_left(&mut self) -> Result<Duration, ProtoError> {
        if self.node.session_cpu_since.elapsed() > SESSION_CPU_WINDOW {
            self.node.session_cpu = Duration::ZERO;
            self.node.session_cpu_since = std::time::Instant::now();
        }
        if self.node.session_cpu > self.node.session_cpu_max {
            return Err(ProtoError::Refused(format!(
                "node {} ({}) has cost this node more than {} s of CPU time in this session's last hour (checking what it sent and offered); the session ends, sync again later",
                self.peer.node_id,
                self.peer.unit,
                self.node.session_cpu_max.as_secs()
            )));
        }
        Ok(thread_cpu())
    }

    /// Counts the CPU time this thread spent since `started`, and `others` spent by the
    /// checking threads, against the session's budget.
    fn charge_cpu(&mut self, started: Duration, others: Duration) {
        self.node.session_cpu += thread_cpu().saturating_sub(started) + others;
    }
}

/// CPU time the calling thread has used so far.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; the clock id is a constant Linux
    // supports for every thread.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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
    /// The keys of the nodes whose change signatures this node can check.
    authors: Authors,
    /// Former unit paths of this node's tree: units named under them are compared by their
    /// current paths (a unit that moved is the same unit).
    aliases: crate::units::Aliases,
    /// What the frame's documents inflate to so far ([`FRAME_INFLATED_BYTES_MAX`]); the
    /// checking threads add to it as they go.
    inflated: AtomicUsize,
    /// CPU time the checking threads spent on the frame, in nanoseconds.
    checkers_cpu_ns: AtomicU64,
    /// CPU time this frame may spend judging changes: what the session's budget has left
    /// ([`SESSION_CPU_MAX`]) when the frame began.
    judge_cpu_left: Duration,
    /// CPU time spent judging so far in this frame, in nanoseconds, across threads.
    judged_cpu_ns: AtomicU64,
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
    /// The checked signatures of the changes new here, stored with them.
    sigs: Vec<ChangeSigRow>,
}

/// New changes of one document from a peer below judged at once, at most (see `Sender::check`).
/// From above, a document's whole history can come at once (a first sync: a receipt book of a
/// year), so there the bound is [`CHANGES_SIGNED_MAX`] and the session's CPU budget.
const CHANGES_JUDGED_MAX: usize = 1_000;

/// Changes judged between two readings of the thread's CPU clock (a system call) while judging
/// one document: a document of one change, the usual case, reads it never.
const JUDGE_CPU_CHECK_EVERY: usize = 32;

/// New changes of one document whose signatures are checked at once, at most, from any peer:
/// each costs a P-256 verification (54 µs of one core, performance.md), so 10,000 bound one
/// document to about half a second.
const CHANGES_SIGNED_MAX: usize = 10_000;

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
        jobs: Vec<(&'env DocId, &'env DocChanges)>,
    ) -> Result<Self, ProtoError> {
        let n = checker_threads().min(jobs.len());
        let mut results = Vec::with_capacity(n);
        for k in 0..n {
            let (ahead, checked) = sync_channel(CHECKED_AHEAD_MAX / n);
            let mine: Vec<_> = jobs.iter().skip(k).step_by(n).copied().collect();
            let checker = move || {
                let started = thread_cpu();
                for (id, change) in mine {
                    if ahead.send(sender.check_new(id, change)).is_err() {
                        break;
                    }
                }
                let spent = thread_cpu().saturating_sub(started).as_nanos() as u64;
                sender.checkers_cpu_ns.fetch_add(spent, Ordering::Relaxed);
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
    fn check_new(&self, id: &DocId, change: &DocChanges) -> Result<Checked, ProtoError> {
        let bytes = &change.data[..];
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
        self.check(id, doc, None, whole, &change.sigs)
    }

    /// Merges the bytes received into the stored state of a document and checks the result.
    fn check_stored(
        &self,
        id: &DocId,
        current: DocRecord,
        change: &DocChanges,
    ) -> Result<Checked, ApplyError> {
        let bytes = &change.data[..];
        if !self.upstream {
            let parties = model::parties(&current.doc, id).map_err(local)?;
            if !parties
                .iter()
                .any(|p| is_within(canonical(&self.aliases, p), &self.peer.unit))
            {
                return Err(self
                    .refuse(
                        id.as_str(),
                        "the document is outside the sender's scope".into(),
                    )
                    .into());
            }
        }
        self.guard(id, bytes)?;
        // The stored state, kept as it is: the judge's first step starts from it.
        let base = current.doc.clone();
        let mut doc = current.doc;
        doc.load_incremental(bytes)
            .map_err(|e| self.refuse(id.as_str(), format!("changes do not decode: {e}")))?;
        let old = Some((current.heads, base));
        Ok(self.check(id, doc, old, false, &change.sigs)?)
    }

    /// Integrity, authorship and scope checks of a document as it would be stored; `old` is the
    /// stored state it extends (heads and document), None when new here.
    fn check(
        &self,
        id: &DocId,
        mut doc: AutoCommit,
        old: Option<(Vec<ChangeHash>, AutoCommit)>,
        whole: bool,
        sigs: &[ChangeSig],
    ) -> Result<Checked, ProtoError> {
        let (old_heads, base) = old.unzip();
        if !doc.get_missing_deps(&[]).is_empty() {
            return Err(self.refuse(
                id.as_str(),
                "changes depend on changes that were not sent".into(),
            ));
        }
        if !self.upstream {
            // From below, what one document may cost to judge is bounded by count too: a
            // commune sends its own recent edits, never a long history at once.
            let new = doc
                .get_changes_meta(old_heads.as_deref().unwrap_or_default())
                .len();
            if new > CHANGES_JUDGED_MAX {
                return Err(self.refuse(
                    id.as_str(),
                    format!(
                        "{new} new changes at once, more than the {CHANGES_JUDGED_MAX} judged per document from below"
                    ),
                ));
            }
        }
        let sigs = self.check_sigs(id, &mut doc, old_heads.as_deref(), sigs)?;
        // The fields are read once, for the judge, the scope checks and the index rows. A
        // document whose fields do not read is still checked on its parties alone, and then
        // fails as its indexing would.
        let view = DocView::read(&doc, id);
        self.judge(id, &mut doc, old_heads.as_deref(), base, view.as_ref().ok())?;
        let parties = match &view {
            Ok(view) => view.parties(),
            Err(_) => {
                model::parties(&doc, id).map_err(|e| self.refuse(id.as_str(), e.to_string()))?
            }
        };
        let parties: Vec<String> = parties
            .iter()
            .map(|p| canonical(&self.aliases, p).to_string())
            .collect();
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
            sigs,
        })
    }

    /// Judges every change new here (after `old_heads`) by what it does, whichever peer sent it
    /// (docs/security.md, "What a change may do"): as made by the unit of its signer's
    /// certificate (checked by [`Self::check_sigs`] before), which its note must name. From
    /// below, the note's unit and the actor's node must also lie within the sender's subtree.
    /// `base` is the stored state the changes extend, `view` the document's fields with them.
    fn judge(
        &self,
        id: &DocId,
        doc: &mut AutoCommit,
        old_heads: Option<&[ChangeHash]>,
        base: Option<AutoCommit>,
        view: Option<&DocView>,
    ) -> Result<(), ProtoError> {
        let new: Vec<(model::authz::Step, Vec<u8>, Option<String>)> = doc
            .get_changes_meta(old_heads.unwrap_or_default())
            .into_iter()
            .map(|c| {
                let note = c.message.map(|m| m.into_owned());
                ((c.hash, c.deps), c.actor.to_bytes().to_vec(), note)
            })
            .collect();
        let steps: Vec<model::authz::Step> = new.iter().map(|(step, ..)| step.clone()).collect();
        let heads = doc.get_heads();
        let mut judge = model::authz::Judge::new(doc, id, &steps);
        // The whole document's fields are read anyway: a change ending at its heads (a new
        // document's only change, the last of a chain) costs no replay.
        if let Some(view) = view {
            judge.know(&heads, view);
        }
        if let (Some(old_heads), Some(base)) = (old_heads, base) {
            judge.start_at(old_heads, base);
        }
        // A long history is charged to the budget as it is judged; one of a few changes costs
        // too little to read the clock for.
        let mut cpu_at = (new.len() >= JUDGE_CPU_CHECK_EVERY).then(thread_cpu);
        for (i, ((hash, deps), actor_id, note)) in new.iter().enumerate() {
            let note = note.as_deref().and_then(ChangeNote::parse);
            let Some(note) = note else {
                return Err(self.refuse(id.as_str(), "a change carries no author".into()));
            };
            let actor = hex::encode(actor_id);
            if note.node != actor {
                return Err(self.refuse(
                    id.as_str(),
                    "a change's author node differs from its actor".into(),
                ));
            }
            if !self.upstream {
                self.check_from_below(id, &note, &actor)?;
            }
            // The author's unit is the one the CA certified for the signing node: a relay can
            // write what it likes in a note, not in a certificate.
            let Some(signer) = self.authors.unit_of(actor_id) else {
                return Err(self.refuse(
                    id.as_str(),
                    format!("no certificate of node {actor}, a change's author, is held here"),
                ));
            };
            // A moved unit may write under a former path of its own (a document naming it so).
            if canonical(&self.aliases, &note.unit) != canonical(&self.aliases, &signer) {
                return Err(self.refuse(
                    id.as_str(),
                    format!(
                        "a change names author unit {}, but its signer {actor} is certified for {signer}",
                        note.unit
                    ),
                ));
            }
            if i % JUDGE_CPU_CHECK_EVERY == JUDGE_CPU_CHECK_EVERY - 1 {
                self.charge_judging(id, &mut cpu_at)?;
            }
            // What the change does, not what its note says, decides (docs/security.md).
            judge
                .authorize(*hash, deps, &note.unit)
                .map_err(|why| self.refuse(id.as_str(), why))?;
        }
        Ok(())
    }

    /// The checks only a change from below gets: its note's unit lies within the sender's
    /// subtree, and its actor is a node of that subtree.
    fn check_from_below(
        &self,
        id: &DocId,
        note: &ChangeNote,
        actor: &str,
    ) -> Result<(), ProtoError> {
        if !is_within(canonical(&self.aliases, &note.unit), &self.peer.unit) {
            return Err(self.refuse(
                id.as_str(),
                format!(
                    "a change claims author unit {}, outside the sender's subtree",
                    note.unit
                ),
            ));
        }
        // A node writes under its own actor only (its node id): another node's actor would
        // poison that node's copies (Automerge refuses two changes with one actor and sequence
        // number).
        let owner = if actor == self.peer.node_id.to_string() {
            Some(self.peer.unit.as_str())
        } else {
            self.actors.get(actor).map(String::as_str)
        };
        if !owner.is_some_and(|unit| is_within(unit, &self.peer.unit)) {
            return Err(self.refuse(
                id.as_str(),
                format!("a change's actor {actor} is not a node of the sender's subtree"),
            ));
        }
        Ok(())
    }

    /// Counts the CPU this thread spent judging since the last call (`at`: this thread's clock
    /// then) against what the frame may spend judging ([`Sender::judge_cpu_left`]), and refuses
    /// the document once the frame's judging has spent it: a long history from above is judged
    /// whole, bounded by the session's CPU budget rather than by a count.
    fn charge_judging(&self, id: &DocId, at: &mut Option<Duration>) -> Result<(), ProtoError> {
        let now = thread_cpu();
        let spent = now.saturating_sub(at.replace(now).unwrap_or(now));
        let total = self
            .judged_cpu_ns
            .fetch_add(spent.as_nanos() as u64, Ordering::Relaxed)
            + spent.as_nanos() as u64;
        if Duration::from_nanos(total) > self.judge_cpu_left {
            return Err(self.refuse(
                id.as_str(),
                format!(
                    "judging its changes would cost more than the {} s of CPU time left in this session's budget; sync again later",
                    self.judge_cpu_left.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Checks that every change new here (after `old_heads`) carries a valid signature by its
    /// author node, from whichever peer it came: a relay forwards signatures, it cannot make
    /// them. Returns them, to be stored with the changes.
    fn check_sigs(
        &self,
        id: &DocId,
        doc: &mut AutoCommit,
        old_heads: Option<&[ChangeHash]>,
        sigs: &[ChangeSig],
    ) -> Result<Vec<ChangeSigRow>, ProtoError> {
        let new = doc.get_changes_meta(old_heads.unwrap_or_default());
        if new.len() > CHANGES_SIGNED_MAX {
            return Err(self.refuse(
                id.as_str(),
                format!(
                    "{} new changes at once, more than the {CHANGES_SIGNED_MAX} whose signatures are checked per document",
                    new.len()
                ),
            ));
        }
        let mut by_prefix: HashMap<&[u8; CHANGE_PREFIX_BYTES], &[u8; SIG_BYTES]> =
            HashMap::with_capacity(sigs.len());
        for s in sigs {
            // Two signatures under one prefix: an honest sender has 10,000 changes at most,
            // for which a shared 64-bit prefix is a 1-in-10^11 event, so this is a forgery.
            if by_prefix.insert(&s.change, &s.sig).is_some() {
                return Err(self.refuse(
                    id.as_str(),
                    "two change signatures carry the same change hash prefix".into(),
                ));
            }
        }
        new.iter()
            .map(|change| {
                let actor = change.actor.to_bytes();
                let prefix: &[u8; CHANGE_PREFIX_BYTES] = change.hash.0[..CHANGE_PREFIX_BYTES]
                    .try_into()
                    .expect("a hash is longer than its prefix");
                let sig = by_prefix.get(prefix).copied();
                self.authors
                    .check(id.as_str(), &change.hash.0, actor, sig, self.upstream)
                    .map_err(|why| self.refuse(id.as_str(), why))?;
                Ok(ChangeSigRow {
                    hash: change.hash.0,
                    actor: actor.to_vec(),
                    sig: *sig.expect("checked above"),
                })
            })
            .collect()
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
            (Some(current), _) => self.check_stored(id, current, change)?,
            (None, Some(early)) => early?,
            (None, None) => self.check_new(id, change)?,
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
        tx.put_change_sigs(id, &checked.sigs)?;
        Ok(())
    }
}

/// A stored document that no longer loads (poisoned by a hostile peer before its changes were
/// checked, or damaged) is left out of wants and sends, logged and listed in `unloadable` (the
/// session refuses it to the peer), instead of ending every session; `communesync check` names
/// it. Any other store error ends the session.
fn quarantined<T>(
    unloadable: &mut Vec<(String, String)>,
    id: &DocId,
    read: Result<T, StoreError>,
) -> Result<Option<T>, ProtoError> {
    match read {
        Ok(v) => Ok(Some(v)),
        Err(e @ (StoreError::Corrupt(_) | StoreError::Model(_))) => {
            warn!(doc = %id, "stored document does not load, left out of this session: {e}");
            unloadable.push((
                id.to_string(),
                format!(
                    "the stored copy of this document does not load at that node ({e}); left out until `communesync check` there finds it and it is restored"
                ),
            ));
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
        let started = self.cpu_budget_left()?;
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
            let Some((lacking, heads)) = quarantined(&mut self.unloadable, &id, read)? else {
                continue;
            };
            if lacking {
                wants.push(DocHeads {
                    id: offer.id.clone(),
                    heads: to_hashes(&heads),
                });
            }
        }
        self.charge_cpu(started, Duration::ZERO);
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
            let Some(stored) = quarantined(
                &mut self.unloadable,
                &id,
                self.node.store.doc_load_bytes(&id),
            )?
            else {
                return Ok(None);
            };
            stored
        } else {
            None
        };
        // The signatures of the changes sent: all the document's for a whole document, else
        // those of the changes after the heads the peer holds.
        let (mine, data, sent) = match stored {
            Some((mine, data)) => (mine, data, None),
            None => {
                let heads: Vec<ChangeHash> = want.heads.iter().map(|h| ChangeHash(*h)).collect();
                let read = self.node.store.read_doc(&id, |doc| {
                    let mine = doc.get_heads();
                    if heads.is_empty() {
                        return (mine, doc.save(), None);
                    }
                    let known: Vec<ChangeHash> = heads
                        .iter()
                        .filter(|h| doc.get_change_by_hash(h).is_some())
                        .copied()
                        .collect();
                    let sent: HashSet<Hash32> = doc
                        .get_changes_meta(&known)
                        .iter()
                        .map(|c| c.hash.0)
                        .collect();
                    (mine, doc.save_after(&known), Some(sent))
                });
                let Some(read) = quarantined(&mut self.unloadable, &id, read)? else {
                    return Ok(None);
                };
                read
            }
        };
        if data.len() > crate::proto::wire::DOC_CHANGES_BYTES_MAX {
            warn!(doc = %id, bytes = data.len(), "document changes too large to send in one frame; not sent");
            return Ok(None);
        }
        if data.is_empty() {
            return Ok(None);
        }
        let mut sigs = self.node.store.change_sigs(&id).map_err(local)?;
        if let Some(sent) = sent {
            sigs.retain(|row| sent.contains(&row.hash));
        }
        // The peer holds its own certificate and ours (from the handshake).
        let (peer, me) = (self.peer.node_id, self.node.node_id());
        self.node.note_authors_out(
            sigs.iter()
                .filter(|row| row.actor != peer.as_bytes() && row.actor != me.as_bytes())
                .map(|row| hex::encode(&row.actor)),
        );
        Ok(Some(DocChanges {
            id: want.id.clone(),
            heads: to_hashes(&mine),
            data,
            sigs: sigs
                .into_iter()
                .map(|row| ChangeSig::new(&row.hash, row.sig))
                .collect(),
        }))
    }

    fn apply(&mut self, docs: Vec<DocChanges>) -> Result<Applied, ProtoError> {
        let started = self.cpu_budget_left()?;
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
            authors: self.node.authors().map_err(local)?,
            aliases: self.node.tree.aliases().clone(),
            inflated: AtomicUsize::new(0),
            checkers_cpu_ns: AtomicU64::new(0),
            judge_cpu_left: self
                .node
                .session_cpu_max
                .saturating_sub(self.node.session_cpu),
            judged_cpu_ns: AtomicU64::new(0),
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
                    .map(|(id, change, _)| (id, change));
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
        let checkers = Duration::from_nanos(sender.checkers_cpu_ns.load(Ordering::Relaxed));
        self.charge_cpu(started, checkers);
        result.map_err(|e| match e {
            ApplyError::Proto(e) => e,
            ApplyError::Store(e) => local(e),
        })
    }

    fn take_unloadable(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.unloadable)
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

    fn authors_pending(&mut self) -> Result<Vec<(String, Vec<u8>)>, ProtoError> {
        self.node.take_authors_out().map_err(local)
    }

    fn store_certs(&mut self, ders: Vec<Vec<u8>>) -> Result<(), ProtoError> {
        let started = self.cpu_budget_left()?;
        let (learnt, _) = self.node.learn_certs(&ders).map_err(local)?;
        self.charge_cpu(started, Duration::ZERO);
        // A certificate this node cannot accept (another CA) is left out: the changes it would
        // check are then refused alone, with that reason.
        let refused: Vec<String> = learnt
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if let Some(first) = refused.first() {
            warn!(peer = %self.peer.unit, left_out = refused.len(), "certificates of authors from the peer were left out; the first: {first}");
        }
        Ok(())
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
    fn a_peer_waits_longer_after_each_violation_in_a_row_up_to_an_hour() {
        let waits: Vec<u64> = (1..=8).map(|n| strike_wait(n).as_secs()).collect();
        assert_eq!(waits, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(strike_wait(u32::MAX).as_secs(), 3600);
    }

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
            authors: node.authors().unwrap(),
            aliases: Default::default(),
            inflated: AtomicUsize::new(0),
            checkers_cpu_ns: AtomicU64::new(0),
            judge_cpu_left: SESSION_CPU_MAX,
            judged_cpu_ns: AtomicU64::new(0),
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
