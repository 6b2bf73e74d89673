//! One sync session with one peer: both directions at once, as a state machine.
//!
//! Each side offers the documents changed in the peer's scope since the peer's checkpoint of its
//! feed (so an unchanged reconnect costs one exchange, whatever the store size), the peer asks
//! only for what it lacks, changes travel batched across documents, then the receiver pulls the
//! scans it lacks and acknowledges. See docs/protocol.md.

use std::collections::{HashSet, VecDeque};

use super::wire::{DocChanges, DocHeads, Frame, Hash32, VERSION};
use super::ProtoError;

/// Documents listed per Offer frame.
pub const OFFER_PAGE_DOCS: usize = 2_000;
/// Raw bytes of changes per Changes frame before a new frame starts.
pub const CHANGES_FRAME_BYTES: usize = 2 << 20;
/// Blobs asked for per BlobWant frame.
pub const BLOB_WANT_MAX: usize = 256;
/// Frames queued before the session stops paging more offers (bounds memory).
const QUEUE_FRAMES_MAX: usize = 8;

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
    /// Documents in the peer's scope changed after `after`, in feed order, with their feed positions.
    fn changed_since(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, DocHeads)>, ProtoError>;
    /// For offered documents this node lacks changes of: this node's heads (empty when absent).
    fn wants(&mut self, offered: &[DocHeads]) -> Result<Vec<DocHeads>, ProtoError>;
    /// The changes the peer lacks, given its heads; None when there is nothing to send.
    fn changes_for(&mut self, want: &DocHeads) -> Result<Option<DocChanges>, ProtoError>;
    /// Checks (scope, authorship, integrity) and applies a batch atomically.
    fn apply(&mut self, docs: Vec<DocChanges>) -> Result<usize, ProtoError>;
    /// Scans referenced by this node's documents and missing here, most urgent first, with the
    /// first chunk still needed (so a cut transfer resumes).
    fn missing_blobs(&mut self, limit: usize) -> Result<Vec<(Hash32, u64)>, ProtoError>;
}

/// Work for the network layer that is not a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stream this blob to the peer from chunk `from` on a data stream.
    SendBlob { hash: Hash32, from: u64 },
    /// The peer sent a newer revocation list: verify it against the CA, then store and apply it.
    StoreCrl { der: Vec<u8> },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    pub docs_offered: u64,
    pub docs_sent: u64,
    pub docs_received: u64,
    pub blobs_requested: u64,
    pub blobs_received: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    Idle,
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rx {
    /// Waiting for the peer's offers (or its end).
    Offers {
        wanted: u64,
    },
    /// Wants sent; waiting for the changes to end.
    Changes,
    /// Pulling scans.
    Blobs {
        upto: u64,
        outstanding: HashSet<Hash32>,
    },
    Done,
}

pub struct Session {
    out: VecDeque<Frame>,
    actions: VecDeque<Action>,
    /// The peer's Hello: (feed_seq, have_from_you).
    peer_hello: Option<(u64, u64)>,
    tx: Tx,
    tx_start: u64,
    rx: Rx,
    /// Blobs the peer said it lacks: not asked for again this session.
    unavailable: HashSet<Hash32>,
    crl_number: u64,
    peer_crl_number: u64,
    pub stats: SessionStats,
}

impl Session {
    /// Starts a session: queues Hello and this side's offers, from what the peer last acknowledged,
    /// without waiting for the peer (one exchange suffices when nothing changed).
    pub fn new(replica: &mut impl Replica, crl_number: u64) -> Result<Session, ProtoError> {
        let mut s = Session {
            out: VecDeque::new(),
            actions: VecDeque::new(),
            peer_hello: None,
            tx: Tx::Idle,
            tx_start: 0,
            rx: Rx::Offers { wanted: 0 },
            unavailable: HashSet::new(),
            crl_number,
            peer_crl_number: 0,
            stats: SessionStats::default(),
        };
        s.out.push_back(Frame::Hello {
            version: VERSION,
            feed_seq: replica.feed_seq()?,
            have_from_you: replica.have_from_peer()?,
            crl_number,
        });
        let from = replica.acked_by_peer()?;
        s.start_round(replica, from)?;
        Ok(s)
    }

    fn start_round(&mut self, replica: &mut impl Replica, from: u64) -> Result<(), ProtoError> {
        self.tx_start = from;
        self.tx = Tx::Offering {
            cursor: from,
            upto: replica.feed_seq()?.max(from),
            offered: 0,
        };
        Ok(())
    }

    /// Starts a new outgoing round if the previous one is finished and the feed moved on
    /// (used by `serve` to push local changes within seconds).
    pub fn push_new_changes(&mut self, replica: &mut impl Replica) -> Result<bool, ProtoError> {
        if self.tx == Tx::Done && replica.feed_seq()? > replica.acked_by_peer()? {
            let from = replica.acked_by_peer()?;
            self.start_round(replica, from)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Allows a new incoming round from the peer (continuous mode).
    fn reopen_rx(&mut self) {
        if self.rx == Rx::Done {
            self.rx = Rx::Offers { wanted: 0 };
        }
    }

    /// Both directions finished: everything offered was acknowledged, everything received applied.
    pub fn is_done(&self) -> bool {
        self.tx == Tx::Done && self.rx == Rx::Done
    }

    /// The CRL number the peer announced, so the caller can send or fetch a newer CRL.
    pub fn peer_crl_number(&self) -> u64 {
        self.peer_crl_number
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
            match page.last() {
                Some(&(last, _)) => {
                    let n = page.len() as u64;
                    self.tx = Tx::Offering {
                        cursor: last,
                        upto: upto.max(last),
                        offered: offered + n,
                    };
                    self.stats.docs_offered += n;
                    self.out.push_back(Frame::Offer {
                        docs: page.into_iter().map(|(_, d)| d).collect(),
                    });
                }
                None => {
                    self.out.push_back(Frame::OfferEnd { upto, offered });
                    self.tx = if offered == 0 {
                        Tx::AwaitAck
                    } else {
                        Tx::AwaitWantEnd { upto }
                    };
                }
            }
        }
        Ok(self.out.pop_front())
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Handles one control frame from the peer.
    pub fn handle(&mut self, replica: &mut impl Replica, frame: Frame) -> Result<(), ProtoError> {
        if self.peer_hello.is_none()
            && !matches!(frame, Frame::Hello { .. } | Frame::Refused { .. })
        {
            return Err(ProtoError::Violation("first frame was not Hello".into()));
        }
        match frame {
            Frame::Hello {
                version,
                feed_seq,
                have_from_you,
                crl_number,
            } => {
                if version != VERSION {
                    return Err(ProtoError::Version(version));
                }
                if self.peer_hello.is_some() {
                    return Err(ProtoError::Violation("second Hello".into()));
                }
                self.peer_hello = Some((feed_seq, have_from_you));
                self.peer_crl_number = crl_number;
                // The peer holds less of this feed than we believed (restored from a backup,
                // or a standby): offer again from what it really has, once this round ends.
                if have_from_you < self.tx_start {
                    replica.set_acked_by_peer(have_from_you)?;
                    if matches!(self.tx, Tx::Offering { offered: 0, .. }) {
                        self.start_round(replica, have_from_you)?;
                    }
                }
            }
            Frame::Offer { docs } => {
                self.reopen_rx();
                let Rx::Offers { wanted } = &mut self.rx else {
                    return Err(ProtoError::Violation("Offer outside an offer phase".into()));
                };
                let wants = replica.wants(&docs)?;
                *wanted += wants.len() as u64;
                if !wants.is_empty() {
                    self.out.push_back(Frame::Want { docs: wants });
                }
            }
            Frame::OfferEnd { upto, offered } => {
                self.reopen_rx();
                let Rx::Offers { .. } = self.rx else {
                    return Err(ProtoError::Violation(
                        "OfferEnd outside an offer phase".into(),
                    ));
                };
                if offered == 0 {
                    replica.set_have_from_peer(upto)?;
                    self.begin_blobs(replica, upto)?;
                } else {
                    self.out.push_back(Frame::WantEnd);
                    self.rx = Rx::Changes;
                }
            }
            Frame::Want { docs } => {
                if !matches!(self.tx, Tx::AwaitWantEnd { .. } | Tx::Offering { .. }) {
                    return Err(ProtoError::Violation("Want outside an offer".into()));
                }
                let mut batch = Vec::new();
                let mut bytes = 0;
                for want in &docs {
                    let Some(changes) = replica.changes_for(want)? else {
                        continue;
                    };
                    bytes += changes.data.len();
                    batch.push(changes);
                    if bytes >= CHANGES_FRAME_BYTES {
                        self.stats.docs_sent += batch.len() as u64;
                        self.out.push_back(Frame::Changes {
                            docs: std::mem::take(&mut batch),
                        });
                        bytes = 0;
                    }
                }
                if !batch.is_empty() {
                    self.stats.docs_sent += batch.len() as u64;
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
                self.stats.docs_received += replica.apply(docs)? as u64;
            }
            Frame::ChangesEnd { upto } => {
                if self.rx != Rx::Changes {
                    return Err(ProtoError::Violation("ChangesEnd out of place".into()));
                }
                replica.set_have_from_peer(upto)?;
                self.begin_blobs(replica, upto)?;
            }
            Frame::Ack { upto } => {
                if self.tx != Tx::AwaitAck {
                    return Err(ProtoError::Violation("Ack without a round".into()));
                }
                replica.set_acked_by_peer(upto)?;
                self.tx = Tx::Done;
            }
            Frame::BlobWant { blobs } => {
                for (hash, from) in blobs {
                    self.actions.push_back(Action::SendBlob { hash, from });
                }
            }
            Frame::BlobMissing { hash } => {
                self.unavailable.insert(hash);
                self.blob_settled(replica, &hash)?;
            }
            Frame::BlobsDone => {}
            Frame::Crl { der } => self.actions.push_back(Action::StoreCrl { der }),
            Frame::BlobHeader { .. } | Frame::BlobChunk { .. } => {
                return Err(ProtoError::Violation(
                    "data frame on the control stream".into(),
                ));
            }
            Frame::Refused { reason } => return Err(ProtoError::PeerRefused(reason)),
        }
        Ok(())
    }

    fn begin_blobs(&mut self, replica: &mut impl Replica, upto: u64) -> Result<(), ProtoError> {
        self.rx = Rx::Blobs {
            upto,
            outstanding: HashSet::new(),
        };
        self.request_blobs(replica)
    }

    /// Asks for the next scans this node lacks, or acknowledges when none remain.
    fn request_blobs(&mut self, replica: &mut impl Replica) -> Result<(), ProtoError> {
        let Rx::Blobs { upto, outstanding } = &mut self.rx else {
            return Ok(());
        };
        if !outstanding.is_empty() {
            return Ok(());
        }
        let wanted: Vec<_> = replica
            .missing_blobs(BLOB_WANT_MAX + self.unavailable.len())?
            .into_iter()
            .filter(|(h, _)| !self.unavailable.contains(h))
            .take(BLOB_WANT_MAX)
            .collect();
        if wanted.is_empty() {
            self.out.push_back(Frame::Ack { upto: *upto });
            self.rx = Rx::Done;
            return Ok(());
        }
        outstanding.extend(wanted.iter().map(|(h, _)| *h));
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
            self.unavailable.insert(*hash);
        }
        self.blob_settled(replica, hash)
    }

    fn blob_settled(
        &mut self,
        replica: &mut impl Replica,
        hash: &Hash32,
    ) -> Result<(), ProtoError> {
        if let Rx::Blobs { outstanding, .. } = &mut self.rx {
            outstanding.remove(hash);
        }
        self.request_blobs(replica)
    }

    /// This side does not hold a blob the peer asked for.
    pub fn blob_unavailable_here(&mut self, hash: Hash32) {
        self.out.push_back(Frame::BlobMissing { hash });
    }

    /// Sends our revocation list once, if the peer announced an older one.
    pub fn offer_crl(&mut self, der: &[u8]) {
        if self.peer_hello.is_some() && self.peer_crl_number < self.crl_number {
            self.out.push_back(Frame::Crl { der: der.to_vec() });
            self.peer_crl_number = self.crl_number;
        }
    }
}
