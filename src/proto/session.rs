//! One sync session with one peer: both directions at once, as a state machine.
//!
//! Each side offers the documents changed in the peer's scope since the peer last acknowledged
//! its feed (so an unchanged reconnect costs one exchange, whatever the store size), the peer
//! asks only for what it lacks, changes travel batched across documents and are acknowledged
//! once durable; scans are then pulled by the receiver, a few at a time, most urgent first, so a
//! scan that becomes urgent mid-transfer overtakes bulk ones. Urgent documents do not wait for
//! the peer's Want: they are pushed whole just ahead of the offer that lists them, half a round
//! trip after they are written. See docs/protocol.md.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};

use super::wire::{
    DocChanges, DocHeads, Frame, Hash32, MissingReason, StatusEntry, CERTS_PER_FRAME_MAX,
    CERT_BYTES_MAX, VERSION,
};
use super::ProtoError;

/// Documents listed per Offer frame.
pub const OFFER_PAGE_DOCS: usize = 2_000;
/// Raw bytes of changes per Changes frame before a new frame starts.
pub const CHANGES_FRAME_BYTES: usize = 2 << 20;
/// Scans requested and not yet arrived, at most: small, so the next request is always the most
/// urgent scan still missing.
pub const BLOBS_IN_FLIGHT_MAX: usize = 2;
/// Blobs listed per BlobWant frame (a peer may send more; the sender bounds its queue).
pub const BLOB_WANT_MAX: usize = 256;
/// Times one session sends the same scan: a peer asks again only after a transfer failed (its
/// retries of unavailable scans), and a scan that failed this often will not pass now. Past it,
/// the scan is answered as missing, so a peer asking in a loop costs no resend.
pub const BLOB_SENDS_PER_SCAN_MAX: u32 = 4;
/// Different scans one session counts sends of (about 3 MB): past it, a scan not yet asked for
/// is answered as missing (a session that asked for this many has asked for the rest of a
/// field link's week; the next session serves them).
pub const SCANS_COUNTED_MAX: usize = 65_536;
/// Authors whose certificates one session remembers having sent; past it, a certificate may be
/// sent twice (the receiver stores it once).
const CERTS_SENT_MAX: usize = 65_536;
/// Frames queued before the session stops paging more offers (bounds memory).
const QUEUE_FRAMES_MAX: usize = 8;
/// Documents of at least this priority rank (urgent and above) are pushed with their offer.
pub const PUSH_RANK_MIN: i64 = 1;
/// Largest document pushed whole; a larger one waits for the peer's Want like any other (it may
/// hold most of it already, and a push is resent whole whatever the peer holds).
pub const PUSH_DOC_BYTES_MAX: usize = 64 << 10;

/// What the session needs from the node's store, seen from this side of one peer.
pub trait Replica {
    /// This node's change-feed position now.
    fn feed_seq(&mut self) -> Result<u64, ProtoError>;
    /// How far this node has applied the peer's feed.
    fn have_from_peer(&mut self) -> Result<u64, ProtoError>;
    fn set_have_from_peer(&mut self, upto: u64) -> Result<(), ProtoError>;
    /// How far the peer has acknowledged this node's feed (where an offer may start).
    fn acked_by_peer(&mut self) -> Result<u64, ProtoError>;
    fn set_acked_by_peer(&mut self, upto: u64) -> Result<(), ProtoError>;
    /// Notes the peer's feed position from its Hello (how much it may still have for us).
    fn note_peer_feed(&mut self, seq: u64) -> Result<(), ProtoError>;
    /// The random id of this node's copy of its database (a restored backup has another).
    fn epoch(&mut self) -> Result<u64, ProtoError>;
    /// Records the peer's epoch from its Hello; true when it differs from the one recorded
    /// before (the peer was restored from a backup since).
    fn note_peer_epoch(&mut self, epoch: u64) -> Result<bool, ProtoError>;
    /// The peer has less of this node's feed than it acknowledged (restored from a backup):
    /// lower the checkpoint to `have` and forget which documents it was known to hold.
    fn peer_regressed(&mut self, have: u64) -> Result<(), ProtoError>;
    /// Documents in the peer's scope changed after `after`, with their feed positions and
    /// priority ranks (0 for anything but an urgent dispatch): in feed order across pages, most
    /// urgent first within a page.
    fn changed_since(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DocHeads, i64)>, ProtoError>;
    /// For offered documents this node lacks changes of: this node's heads (empty when absent).
    fn wants(&mut self, offered: &[DocHeads]) -> Result<Vec<DocHeads>, ProtoError>;
    /// The changes the peer lacks, given its heads; None when there is nothing to send.
    fn changes_for(&mut self, want: &DocHeads) -> Result<Option<DocChanges>, ProtoError>;
    /// Checks (scope, authorship, integrity) each document of a batch and stores, in one
    /// transaction, those that pass; a refused document is left out alone, with its reason.
    /// An error means this node could not store anything (its own store failed).
    fn apply(&mut self, docs: Vec<DocChanges>) -> Result<Applied, ProtoError>;
    /// The peer refused a document of ours, for `reason`: remember it until the document
    /// changes here.
    fn peer_refused(&mut self, id: &str, reason: &str) -> Result<(), ProtoError>;
    /// Scans referenced by this node's documents and missing here, most urgent first, then
    /// smallest, with the first chunk still needed (so a cut transfer resumes).
    fn missing_blobs(&mut self, limit: usize) -> Result<Vec<(Hash32, u64)>, ProtoError>;
    /// The authors (node id, certificate DER) of the changes [`Replica::changes_for`] handed out
    /// since the last call, except the peer itself: the peer checks each change's signature
    /// against its author's certificate, which it may not hold.
    fn authors_pending(&mut self) -> Result<Vec<(String, Vec<u8>)>, ProtoError>;
    /// Node certificates of authors from the peer: each is checked (CA, revocation) and kept
    /// to check the signatures of the changes that follow; one that fails is left out.
    fn store_certs(&mut self, ders: Vec<Vec<u8>>) -> Result<(), ProtoError>;
    /// Documents [`Replica::wants`] or [`Replica::changes_for`] left out since the last call
    /// because this node's stored copy does not load, with why: neither side may call the
    /// session converged while they are missing.
    fn take_unloadable(&mut self) -> Vec<(String, String)>;
}

/// What applying a frame of documents did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub stored: usize,
    /// Documents the checks refused, with why; the others were stored.
    pub refused: Vec<(String, String)>,
}

/// Refused documents remembered per session and direction, for the report; more are counted.
const REFUSALS_KEPT_MAX: usize = 1_000;

/// Work for the network layer that is not a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stream this blob to the peer from chunk `from` on a data stream.
    SendBlob { hash: Hash32, from: u64 },
    /// The peer sent a newer revocation list: verify it against the CA, then store and apply it.
    StoreCrl { der: Vec<u8> },
    /// The province's unit tree as its CA signed it: the node checks the signature and the
    /// version before using it.
    StoreUnits { signed: Vec<u8> },
    /// The peer published node statuses: keep those of units in its subtree (its certificate
    /// says which), the newest per unit.
    StoreStatus { entries: Vec<StatusEntry> },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    pub docs_offered: u64,
    pub docs_sent: u64,
    pub docs_received: u64,
    pub blobs_requested: u64,
    pub blobs_received: u64,
    /// Documents of the peer's this side refused.
    pub docs_refused: u64,
    /// Documents of ours the peer refused.
    pub docs_refused_by_peer: u64,
}

/// This side's outgoing round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    Offering {
        cursor: u64,
        upto: u64,
        offered: u64,
    },
    AwaitWantEnd {
        upto: u64,
    },
    AwaitAck,
    Done,
}

/// The peer's incoming round (documents only; scans are pulled independently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// No round seen yet.
    Waiting,
    /// Offers arriving.
    Offers,
    /// Wants sent; changes arriving until ChangesEnd.
    Changes,
    /// A round applied and acknowledged; a new one may start.
    Applied,
}

pub struct Session {
    out: VecDeque<Frame>,
    actions: VecDeque<Action>,
    hello_seen: bool,
    tx: Tx,
    tx_start: u64,
    rx: Rx,
    /// Scans requested from the peer and not yet arrived.
    blobs_in_flight: HashSet<Hash32>,
    /// Scans the peer lacks or that failed verification, and why: not asked for again this
    /// session, and reported as pending.
    unavailable: BTreeMap<Hash32, MissingReason>,
    /// Scans the peer asked for and this side did not send, and why (reported as pending).
    withheld: BTreeMap<Hash32, MissingReason>,
    /// Documents of the peer's this side refused, and why.
    refused_here: BTreeMap<String, String>,
    /// Documents of ours the peer refused, and why.
    refused_by_peer: BTreeMap<String, String>,
    /// Whether we told the peer we pull nothing more since its last round (re-armed when we
    /// request again, and by each round of the peer's we apply).
    blobs_done_sent: bool,
    /// Whether the peer told us, after acknowledging our last round, that it pulls nothing
    /// more from us.
    peer_blobs_done: bool,
    crl_number: u64,
    peer_crl_number: u64,
    units_version: u64,
    peer_units_version: u64,
    /// Where to offer from again after the current round (the peer was restored from a backup).
    resend_from: Option<u64>,
    /// Rounds of the peer's begun so far, and the count when the peer announced a Reoffer: a
    /// round begun after that must be applied before this side is done.
    rx_rounds_begun: u64,
    reoffer_after: Option<u64>,
    rx_round_applied: u64,
    /// What the peer may still Want, and how often each scan was sent (see [`Owed`]).
    owed: Owed,
    /// Authors whose certificates went to the peer this session (at most [`CERTS_SENT_MAX`]).
    certs_sent: HashSet<String>,
    pub stats: SessionStats,
}

/// What this session owes the peer: the documents offered in the current round and not yet sent
/// (a Want for anything else is refused, so each offered document costs at most one load and one
/// send per round), and the scans sent so far. Documents are kept as keyed 64-bit fingerprints
/// of their ids (8 bytes each, whatever the id), keyed per session so a peer cannot aim at a
/// collision.
#[derive(Default)]
struct Owed {
    keys: RandomState,
    docs: HashSet<u64>,
    scans_sent: HashMap<Hash32, u32>,
}

impl Owed {
    fn offer(&mut self, id: &str) {
        self.docs.insert(self.keys.hash_one(id));
    }

    /// Whether `id` was offered this round and not yet sent; it is then no longer owed.
    fn take(&mut self, id: &str) -> bool {
        self.docs.remove(&self.keys.hash_one(id))
    }

    /// Counts one more send of `hash`; false past [`BLOB_SENDS_PER_SCAN_MAX`], or for a new
    /// scan once [`SCANS_COUNTED_MAX`] are counted.
    fn send_scan(&mut self, hash: Hash32) -> bool {
        if self.scans_sent.len() >= SCANS_COUNTED_MAX && !self.scans_sent.contains_key(&hash) {
            return false;
        }
        let sent = self.scans_sent.entry(hash).or_default();
        *sent += 1;
        *sent <= BLOB_SENDS_PER_SCAN_MAX
    }
}

impl Session {
    /// Starts a session: queues Hello and this side's offers, from what the peer last acknowledged,
    /// without waiting for the peer (one exchange suffices when nothing changed).
    pub fn new(replica: &mut impl Replica, crl_number: u64) -> Result<Session, ProtoError> {
        Self::with_units(replica, crl_number, 0)
    }

    /// [`Session::new`] for a node holding version `units_version` of the signed unit tree.
    pub fn with_units(
        replica: &mut impl Replica,
        crl_number: u64,
        units_version: u64,
    ) -> Result<Session, ProtoError> {
        let mut s = Session {
            out: VecDeque::new(),
            actions: VecDeque::new(),
            hello_seen: false,
            tx: Tx::Done,
            tx_start: 0,
            rx: Rx::Waiting,
            blobs_in_flight: HashSet::new(),
            unavailable: BTreeMap::new(),
            withheld: BTreeMap::new(),
            refused_here: BTreeMap::new(),
            refused_by_peer: BTreeMap::new(),
            blobs_done_sent: false,
            peer_blobs_done: false,
            crl_number,
            peer_crl_number: 0,
            units_version,
            peer_units_version: 0,
            resend_from: None,
            rx_rounds_begun: 0,
            reoffer_after: None,
            rx_round_applied: 0,
            owed: Owed::default(),
            certs_sent: HashSet::new(),
            stats: SessionStats::default(),
        };
        s.out.push_back(Frame::Hello {
            version: VERSION,
            feed_seq: replica.feed_seq()?,
            have_from_you: replica.have_from_peer()?,
            crl_number,
            epoch: replica.epoch()?,
            units_version,
        });
        let from = replica.acked_by_peer()?;
        s.start_round(replica, from)?;
        Ok(s)
    }

    fn start_round(&mut self, replica: &mut impl Replica, from: u64) -> Result<(), ProtoError> {
        self.tx_start = from;
        self.owed.docs.clear();
        self.tx = Tx::Offering {
            cursor: from,
            upto: replica.feed_seq()?.max(from),
            offered: 0,
        };
        Ok(())
    }

    /// Offers the peer this node's feed again from `from` (a unit tree moved a unit into the
    /// peer's scope: the documents that came into it are older than what it acknowledged): at
    /// once if no round is under way, else after the current one.
    pub fn reoffer_from(
        &mut self,
        replica: &mut impl Replica,
        from: u64,
    ) -> Result<(), ProtoError> {
        match self.tx {
            Tx::Done | Tx::Offering { offered: 0, .. } => self.start_round(replica, from)?,
            // After the round under way, without a `Reoffer` (a peer takes one per round it
            // applies): a one-shot peer that ends first gets them at its next session, as the
            // stored checkpoint stays low until a round from it is acknowledged.
            _ => self.resend_from = Some(self.resend_from.map_or(from, |f| f.min(from))),
        }
        Ok(())
    }

    /// Starts a new outgoing round if the previous one is finished and the feed moved on, and
    /// pulls scans that became wanted (used by `serve` to push and pull within seconds).
    /// `retry_unavailable` forgets which scans the peer could not give (deferred to its scan
    /// window, or not yet arrived there), so a long session asks again now and then.
    pub fn poll_local_changes(
        &mut self,
        replica: &mut impl Replica,
        retry_unavailable: bool,
    ) -> Result<bool, ProtoError> {
        if retry_unavailable {
            self.unavailable.clear();
        }
        self.pull_blobs(replica)?;
        if self.tx == Tx::Done && replica.feed_seq()? > replica.acked_by_peer()? {
            let from = replica.acked_by_peer()?;
            self.start_round(replica, from)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Both directions finished: our offers acknowledged, the peer's applied, every scan either
    /// side wanted from the other transferred or answered as unavailable. The peer's BlobsDone
    /// counts only once it follows the Ack of our last round, so a peer that has not yet seen
    /// which scans our documents reference cannot end the session early.
    pub fn is_done(&self) -> bool {
        self.tx == Tx::Done
            && self.rx == Rx::Applied
            && self
                .reoffer_after
                .is_none_or(|after| self.rx_round_applied > after)
            && self.blobs_in_flight.is_empty()
            && self.blobs_done_sent
            && self.peer_blobs_done
    }

    /// Done, and nothing left behind: no scan of ours deferred from the peer, none unavailable
    /// from it, no document refused either way. What a one-shot sync may call converged. A
    /// scan the peer asked for that this side does not hold, or may not give it, is not ours
    /// to deliver.
    pub fn is_converged(&self) -> bool {
        self.is_done()
            && self.unavailable.is_empty()
            && !self
                .withheld
                .values()
                .any(|r| *r == MissingReason::Deferred)
            && self.stats.docs_refused == 0
            && self.stats.docs_refused_by_peer == 0
    }

    /// Documents of the peer's this side refused this session (the first
    /// [`REFUSALS_KEPT_MAX`]), and why.
    pub fn docs_refused(&self) -> &BTreeMap<String, String> {
        &self.refused_here
    }

    /// Documents of ours the peer refused this session (the first [`REFUSALS_KEPT_MAX`]).
    pub fn docs_refused_by_peer(&self) -> &BTreeMap<String, String> {
        &self.refused_by_peer
    }

    /// Counts a round of the peer's when its first Offer (or its OfferEnd, for an empty round)
    /// arrives between rounds.
    fn round_begins(&mut self) {
        if matches!(self.rx, Rx::Waiting | Rx::Applied) {
            self.rx_rounds_begun += 1;
        }
    }

    /// Stores what passed of a frame of documents; answers each refused one with DocRefused.
    fn apply(
        &mut self,
        replica: &mut impl Replica,
        docs: Vec<DocChanges>,
    ) -> Result<(), ProtoError> {
        let applied = replica.apply(docs)?;
        self.stats.docs_received += applied.stored as u64;
        for (id, reason) in applied.refused {
            self.refuse_here(id, reason);
        }
        Ok(())
    }

    /// Answers the peer's document with DocRefused, counted and kept for the report.
    fn refuse_here(&mut self, id: String, reason: String) {
        self.stats.docs_refused += 1;
        self.out.push_back(Frame::DocRefused {
            id: id.clone(),
            reason: reason.clone(),
        });
        if self.refused_here.len() < REFUSALS_KEPT_MAX {
            self.refused_here.insert(id, reason);
        }
    }

    /// Tells the peer of each document this side left out because its stored copy does not
    /// load (the peer offered it, or wants it): a refusal on both sides, so neither says
    /// converged while the document differs.
    fn refuse_unloadable(&mut self, replica: &mut impl Replica) {
        for (id, reason) in replica.take_unloadable() {
            self.refuse_here(id, reason);
        }
    }

    /// Scans this side asked for and did not get this session, and why.
    pub fn scans_not_received(&self) -> &BTreeMap<Hash32, MissingReason> {
        &self.unavailable
    }

    /// Scans the peer asked for that this side did not send, and why.
    pub fn scans_withheld(&self) -> &BTreeMap<Hash32, MissingReason> {
        &self.withheld
    }

    /// A newer revocation list arrived here during the session: the peer gets it too.
    pub fn update_crl(&mut self, number: u64) {
        self.crl_number = self.crl_number.max(number);
    }

    /// Sends our revocation list once, if the peer announced an older one.
    pub fn offer_crl(&mut self, der: &[u8]) {
        if self.hello_seen && self.peer_crl_number < self.crl_number {
            self.out.push_back(Frame::Crl { der: der.to_vec() });
            self.peer_crl_number = self.crl_number;
        }
    }

    /// A newer unit tree was installed here during the session: the peer gets it too.
    pub fn update_units(&mut self, version: u64) {
        self.units_version = self.units_version.max(version);
    }

    /// Sends our signed unit tree once, if the peer announced an older one.
    pub fn offer_units(&mut self, signed: &[u8]) {
        if self.hello_seen && self.peer_units_version < self.units_version && !signed.is_empty() {
            self.out.push_back(Frame::Units {
                signed: signed.to_vec(),
            });
            self.peer_units_version = self.units_version;
        }
    }

    /// Sends node statuses to the peer (this node's own and its subtree's), after `certs`, the
    /// certificates of the nodes that signed them which the peer may lack. They may go before
    /// the peer's Hello arrives: ours is queued first, and a peer of another version ends the
    /// session on it.
    pub fn send_status(&mut self, certs: Vec<Vec<u8>>, entries: Vec<StatusEntry>) {
        for ders in certs.chunks(super::wire::CERTS_PER_FRAME_MAX) {
            self.out.push_back(Frame::Certs {
                ders: ders.to_vec(),
            });
        }
        self.out.push_back(Frame::Status { entries });
    }

    /// The next control frame to send; pages further offers lazily to bound memory.
    pub fn poll_frame(&mut self, replica: &mut impl Replica) -> Result<Option<Frame>, ProtoError> {
        while self.out.len() < QUEUE_FRAMES_MAX {
            let Tx::Offering {
                cursor,
                upto,
                offered,
            } = self.tx
            else {
                break;
            };
            let page = replica.changed_since(cursor, OFFER_PAGE_DOCS)?;
            if page.is_empty() {
                self.out.push_back(Frame::OfferEnd { upto, offered });
                self.tx = if offered == 0 {
                    Tx::AwaitAck
                } else {
                    Tx::AwaitWantEnd { upto }
                };
                break;
            }
            let last = page.iter().map(|(seq, ..)| *seq).max().unwrap_or(cursor);
            let n = page.len() as u64;
            self.tx = Tx::Offering {
                cursor: last,
                upto: upto.max(last),
                offered: offered + n,
            };
            self.stats.docs_offered += n;
            self.push_urgent(replica, &page)?;
            for (_, doc, _) in &page {
                self.owed.offer(&doc.id);
            }
            self.out.push_back(Frame::Offer {
                docs: page.into_iter().map(|(_, d, _)| d).collect(),
            });
        }
        Ok(self.out.pop_front())
    }

    /// Queues the urgent documents of an offer page, whole, ahead of the offer: the peer stores
    /// them on arrival instead of a round trip later. They stay in the offer, so the round and
    /// its checkpoint are exactly those of a round without the push.
    fn push_urgent(
        &mut self,
        replica: &mut impl Replica,
        page: &[(u64, DocHeads, i64)],
    ) -> Result<(), ProtoError> {
        let (mut docs, mut bytes) = (Vec::new(), 0);
        // Pages come most urgent first, so the scan stops at the first normal document.
        for (_, doc, _) in page.iter().take_while(|(.., rank)| *rank >= PUSH_RANK_MIN) {
            if bytes >= CHANGES_FRAME_BYTES {
                break;
            }
            let whole = DocHeads {
                id: doc.id.clone(),
                heads: Vec::new(),
            };
            let Some(changes) = replica.changes_for(&whole)? else {
                continue;
            };
            if changes.data.len() <= PUSH_DOC_BYTES_MAX {
                bytes += changes.data.len();
                docs.push(changes);
            }
        }
        if !docs.is_empty() {
            self.stats.docs_sent += docs.len() as u64;
            self.certs_ahead(replica)?;
            self.out.push_back(Frame::Push { docs });
        }
        Ok(())
    }

    /// Queues the certificates of the authors of the documents about to be queued that the
    /// peer was not sent yet this session, so it can check their signatures on arrival.
    fn certs_ahead(&mut self, replica: &mut impl Replica) -> Result<(), ProtoError> {
        let mut ders = Vec::new();
        for (node, der) in replica.authors_pending()? {
            if self.certs_sent.contains(&node) {
                continue;
            }
            if self.certs_sent.len() < CERTS_SENT_MAX {
                self.certs_sent.insert(node);
            }
            if der.len() <= CERT_BYTES_MAX {
                ders.push(der);
            }
        }
        while !ders.is_empty() {
            let rest = ders.split_off(ders.len().min(CERTS_PER_FRAME_MAX));
            self.out.push_back(Frame::Certs { ders });
            ders = rest;
        }
        Ok(())
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Handles one control frame from the peer.
    pub fn handle(&mut self, replica: &mut impl Replica, frame: Frame) -> Result<(), ProtoError> {
        if !self.hello_seen && !matches!(frame, Frame::Hello { .. } | Frame::Refused { .. }) {
            return Err(ProtoError::Violation("first frame was not Hello".into()));
        }
        match frame {
            Frame::Hello {
                version,
                feed_seq,
                have_from_you,
                crl_number,
                epoch,
                units_version,
            } => {
                if version != VERSION {
                    return Err(ProtoError::Version(version));
                }
                if self.hello_seen {
                    return Err(ProtoError::Violation("second Hello".into()));
                }
                self.hello_seen = true;
                self.peer_crl_number = crl_number;
                self.peer_units_version = units_version;
                replica.note_peer_feed(feed_seq)?;
                // The peer holds less of our feed than we believed, or its own feed went back
                // (restored from a backup, a disk image, a VM snapshot): it may lack anything
                // it received or wrote since, documents it once sent us whole included. Offer
                // again from what it really has, origin marks forgotten, once the round already
                // under way ends.
                let restored =
                    replica.note_peer_epoch(epoch)? || feed_seq < replica.have_from_peer()?;
                if have_from_you < self.tx_start || restored {
                    let from = have_from_you.min(self.tx_start);
                    replica.peer_regressed(from)?;
                    if matches!(self.tx, Tx::Offering { offered: 0, .. }) {
                        self.start_round(replica, from)?;
                    } else {
                        // Said now, ahead of our Ack of the peer's round, so that a one-shot
                        // peer waits for the second round instead of ending after the first.
                        self.out.push_back(Frame::Reoffer);
                        self.resend_from = Some(from);
                    }
                }
            }
            Frame::Offer { docs } => {
                if !matches!(self.rx, Rx::Waiting | Rx::Offers | Rx::Applied) {
                    return Err(ProtoError::Violation("Offer during a round".into()));
                }
                self.round_begins();
                self.rx = Rx::Offers;
                let wants = replica.wants(&docs)?;
                self.refuse_unloadable(replica);
                if !wants.is_empty() {
                    self.out.push_back(Frame::Want { docs: wants });
                }
            }
            Frame::Push { docs } => {
                // Pushed documents come ahead of the offer that lists them, where an Offer
                // would be accepted; they pass the same checks as any Changes.
                if !matches!(self.rx, Rx::Waiting | Rx::Offers | Rx::Applied) {
                    return Err(ProtoError::Violation("Push during a round".into()));
                }
                self.apply(replica, docs)?;
            }
            Frame::OfferEnd { upto, offered } => {
                if !matches!(self.rx, Rx::Waiting | Rx::Offers | Rx::Applied) {
                    return Err(ProtoError::Violation("OfferEnd during a round".into()));
                }
                self.round_begins();
                if offered == 0 {
                    self.round_applied(replica, upto)?;
                } else {
                    self.out.push_back(Frame::WantEnd);
                    self.rx = Rx::Changes;
                }
            }
            Frame::Want { docs } => {
                if !matches!(self.tx, Tx::AwaitWantEnd { .. } | Tx::Offering { .. }) {
                    return Err(ProtoError::Violation("Want outside an offer".into()));
                }
                // A Want answers one Offer page, with documents of this round not yet sent:
                // anything else would have this side load and queue documents without end.
                if docs.len() > OFFER_PAGE_DOCS {
                    return Err(ProtoError::Violation(format!(
                        "a Want of {} documents, more than an offer page ({OFFER_PAGE_DOCS})",
                        docs.len()
                    )));
                }
                let mut batch = Vec::new();
                let mut bytes = 0;
                for want in &docs {
                    if !self.owed.take(&want.id) {
                        return Err(ProtoError::Violation(format!(
                            "a Want for document {}, which this round did not offer or already sent",
                            want.id
                        )));
                    }
                    let Some(changes) = replica.changes_for(want)? else {
                        self.refuse_unloadable(replica);
                        continue;
                    };
                    bytes += changes.data.len();
                    batch.push(changes);
                    if bytes >= CHANGES_FRAME_BYTES {
                        self.stats.docs_sent += batch.len() as u64;
                        self.certs_ahead(replica)?;
                        self.out.push_back(Frame::Changes {
                            docs: std::mem::take(&mut batch),
                        });
                        bytes = 0;
                    }
                }
                if !batch.is_empty() {
                    self.stats.docs_sent += batch.len() as u64;
                    self.certs_ahead(replica)?;
                    self.out.push_back(Frame::Changes { docs: batch });
                }
            }
            Frame::WantEnd => {
                let Tx::AwaitWantEnd { upto } = self.tx else {
                    return Err(ProtoError::Violation("WantEnd without an offer".into()));
                };
                self.out.push_back(Frame::ChangesEnd { upto });
                self.tx = Tx::AwaitAck;
            }
            Frame::Changes { docs } => {
                if self.rx != Rx::Changes {
                    return Err(ProtoError::Violation(
                        "Changes that were not asked for".into(),
                    ));
                }
                self.apply(replica, docs)?;
            }
            Frame::ChangesEnd { upto } => {
                if self.rx != Rx::Changes {
                    return Err(ProtoError::Violation("ChangesEnd out of place".into()));
                }
                self.round_applied(replica, upto)?;
            }
            Frame::Ack { upto } => {
                if self.tx != Tx::AwaitAck {
                    return Err(ProtoError::Violation("Ack without a round".into()));
                }
                match self.resend_from.take() {
                    // The acknowledgement covers only the round that started past the peer's
                    // real position: keep the lower checkpoint and offer again from it.
                    Some(from) => self.start_round(replica, from)?,
                    None => {
                        replica.set_acked_by_peer(upto)?;
                        self.tx = Tx::Done;
                    }
                }
                // The peer answers every round it applies with BlobWant or BlobsDone after its
                // Ack; a BlobsDone from before it knew our documents' scans no longer counts.
                self.peer_blobs_done = false;
            }
            Frame::BlobWant { blobs } => {
                if blobs.len() > BLOB_WANT_MAX {
                    return Err(ProtoError::Violation(format!(
                        "a BlobWant of {} scans, more than {BLOB_WANT_MAX}",
                        blobs.len()
                    )));
                }
                self.peer_blobs_done = false;
                for (hash, from) in blobs {
                    self.withheld.remove(&hash);
                    if self.owed.send_scan(hash) {
                        self.actions.push_back(Action::SendBlob { hash, from });
                    } else {
                        self.blob_unavailable_here(hash, MissingReason::Limited);
                    }
                }
            }
            Frame::BlobMissing { hash, reason } => {
                if !self.blobs_in_flight.contains(&hash) {
                    return Err(ProtoError::Violation(
                        "BlobMissing for a scan that was not asked for".into(),
                    ));
                }
                self.unavailable.insert(hash, reason);
                self.blob_settled(replica, &hash)?;
            }
            Frame::BlobsDone => self.peer_blobs_done = true,
            Frame::Crl { der } => self.actions.push_back(Action::StoreCrl { der }),
            Frame::Units { signed } => self.actions.push_back(Action::StoreUnits { signed }),
            Frame::Status { entries } => self.actions.push_back(Action::StoreStatus { entries }),
            Frame::BlobHeader { .. } | Frame::BlobChunk { .. } => {
                return Err(ProtoError::Violation(
                    "data frame on the control stream".into(),
                ));
            }
            Frame::Refused { reason } => return Err(ProtoError::PeerRefused(reason)),
            Frame::Reoffer => {
                if self
                    .reoffer_after
                    .is_some_and(|after| self.rx_round_applied <= after)
                {
                    return Err(ProtoError::Violation("a second Reoffer".into()));
                }
                self.reoffer_after = Some(self.rx_rounds_begun);
            }
            Frame::Certs { ders } => replica.store_certs(ders)?,
            Frame::DocRefused { id, reason } => {
                replica.peer_refused(&id, &reason)?;
                self.stats.docs_refused_by_peer += 1;
                if self.refused_by_peer.len() < REFUSALS_KEPT_MAX {
                    self.refused_by_peer.insert(id, reason);
                }
            }
        }
        Ok(())
    }

    /// The peer's round is durable here: record the checkpoint, acknowledge, then answer the
    /// round with the scans it made us want, or BlobsDone (always one of the two after an Ack).
    fn round_applied(&mut self, replica: &mut impl Replica, upto: u64) -> Result<(), ProtoError> {
        replica.set_have_from_peer(upto)?;
        self.rx_round_applied = self.rx_rounds_begun;
        self.out.push_back(Frame::Ack { upto });
        self.rx = Rx::Applied;
        self.blobs_done_sent = false;
        self.pull_blobs(replica)
    }

    /// Keeps up to BLOBS_IN_FLIGHT_MAX scans requested, most urgent first. Scans of documents
    /// pushed mid-round are requested at once, but BlobsDone is said only between rounds:
    /// before the peer's round is applied, the scans it references are not known to be missing.
    fn pull_blobs(&mut self, replica: &mut impl Replica) -> Result<(), ProtoError> {
        if self.rx == Rx::Waiting || self.blobs_in_flight.len() >= BLOBS_IN_FLIGHT_MAX {
            return Ok(());
        }
        let room = BLOBS_IN_FLIGHT_MAX - self.blobs_in_flight.len();
        let skip = self.unavailable.len() + self.blobs_in_flight.len();
        let wanted: Vec<_> = replica
            .missing_blobs(room + skip)?
            .into_iter()
            .filter(|(h, _)| !self.unavailable.contains_key(h) && !self.blobs_in_flight.contains(h))
            .take(room)
            .collect();
        if wanted.is_empty() {
            if self.rx == Rx::Applied && self.blobs_in_flight.is_empty() && !self.blobs_done_sent {
                self.out.push_back(Frame::BlobsDone);
                self.blobs_done_sent = true;
            }
            return Ok(());
        }
        self.blobs_done_sent = false;
        self.blobs_in_flight.extend(wanted.iter().map(|(h, _)| *h));
        self.stats.blobs_requested += wanted.len() as u64;
        self.out.push_back(Frame::BlobWant { blobs: wanted });
        Ok(())
    }

    /// A requested blob arrived complete and verified (or failed: then it is not asked for again
    /// this session, and the next session resumes it).
    pub fn blob_finished(
        &mut self,
        replica: &mut impl Replica,
        hash: &Hash32,
        ok: bool,
    ) -> Result<(), ProtoError> {
        if ok {
            self.stats.blobs_received += 1;
        } else {
            self.unavailable.insert(*hash, MissingReason::Failed);
        }
        self.blob_settled(replica, hash)
    }

    /// A scan stream brought a scan this side already holds (asked for twice): nothing to count.
    pub fn blob_already_stored(
        &mut self,
        replica: &mut impl Replica,
        hash: &Hash32,
    ) -> Result<(), ProtoError> {
        self.blob_settled(replica, hash)
    }

    fn blob_settled(
        &mut self,
        replica: &mut impl Replica,
        hash: &Hash32,
    ) -> Result<(), ProtoError> {
        self.blobs_in_flight.remove(hash);
        self.pull_blobs(replica)
    }

    /// This side does not send a blob the peer asked for, for `reason` (never `Failed`).
    pub fn blob_unavailable_here(&mut self, hash: Hash32, reason: MissingReason) {
        debug_assert_ne!(reason, MissingReason::Failed, "not a wire reason");
        self.withheld.insert(hash, reason);
        self.out.push_back(Frame::BlobMissing { hash, reason });
    }
}
