//! The wire format: length-prefixed, typed, optionally zstd-compressed frames with hard limits.
//!
//! Encoding and decoding only; no I/O. Every length read from a peer is checked against a
//! bound before anything is allocated or decompressed.

use bytes::Bytes;

use super::ProtoError;

/// Protocol version spoken by this build (sent in Hello). 2 added `Push`; 3 gave `BlobMissing`
/// a reason and made `BlobsDone` answer each acknowledged round (protocol.md §4.1); 4 carries a
/// signature with every change and the certificates of their authors (`Certs`), the unit
/// tree's version in Hello, the `Units` and `Status` frames.
pub const VERSION: u16 = 5;
/// Largest frame on the wire (header excluded), compressed or not.
pub const FRAME_BYTES_MAX: usize = 16 << 20;
/// Largest frame body after decompression: checked before zstd runs (no decompression bombs).
pub const FRAME_RAW_BYTES_MAX: usize = 16 << 20;
/// Largest changes of one document sent in one frame: with the batch limit, keeps every
/// Changes frame under FRAME_RAW_BYTES_MAX by construction.
pub const DOC_CHANGES_BYTES_MAX: usize = 8 << 20;
/// Bodies at least this large are tried with zstd.
const COMPRESS_BYTES_MIN: usize = 512;
/// Most items (documents, heads, blobs) one frame may list.
pub const ITEMS_MAX: usize = 100_000;
/// Most heads one document may advertise (concurrent edits make a few; thousands mean abuse).
pub const HEADS_MAX: usize = 256;
/// Longest document id a frame may name (ids are a kind prefix and 16 hex digits).
pub const DOC_ID_BYTES_MAX: usize = 64;
/// Bytes of a change signature (ECDSA P-256, fixed-size `r || s`).
pub const SIG_BYTES: usize = 64;
/// Most certificates one `Certs` frame may carry.
pub const CERTS_PER_FRAME_MAX: usize = 256;
/// Largest certificate a `Certs` frame may carry (node certificates are about 700 bytes).
pub const CERT_BYTES_MAX: usize = 16 << 10;
/// Bytes of the frame header: u32 length, u8 type, u8 flags.
pub const HEADER_BYTES: usize = 6;

const FLAG_ZSTD: u8 = 1;

pub type Hash32 = [u8; 32];

/// Most node statuses one Status frame may carry (a receiver also refuses more than the units
/// of the sender's subtree).
pub const STATUS_ENTRIES_MAX: usize = 10_000;
/// Most peers one node status may list (a district's communes, its upstream, a standby).
pub const STATUS_PEERS_MAX: usize = 1_024;
/// Longest unit path, node id or version text in a status.
pub const STATUS_NAME_BYTES_MAX: usize = 256;
/// Longest error text in a status (longer errors are cut by the sender).
pub const STATUS_ERROR_BYTES_MAX: usize = 512;

/// One node's own account of its health, as it publishes it upstream (protocol.md, Status).
/// Times are Unix milliseconds; `None` is "unknown" or "never".
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusEntry {
    pub unit: String,
    pub node_id: String,
    /// The communesync version the node runs.
    pub version: String,
    /// When the node wrote this status: the newest per unit is kept.
    pub as_of_ms: u64,
    pub cert_expires_ms: Option<u64>,
    pub disk_free_bytes: Option<u64>,
    /// What the node holds that its upstream has not acknowledged.
    pub pending_docs: u64,
    pub pending_bytes: u64,
    /// Age of the oldest change not yet delivered upstream.
    pub lag_ms: Option<u64>,
    /// Scans partly received (transfers to resume or under way).
    pub scans_in_flight: u64,
    /// Scans its documents reference that it does not hold yet.
    pub scans_missing: u64,
    /// The most recent error of any of its sessions; empty when none.
    pub last_error: String,
    /// Its direct peers as it sees them.
    pub peers: Vec<StatusPeer>,
    /// The publishing node's signature of [`status_body`] (ECDSA P-256, `r || s`), checked by
    /// every receiver against the certificate of `node_id`, so that no relay can alter it.
    /// All zero: unsigned (a status stored before signatures), which no receiver keeps.
    #[serde(
        with = "sig_hex",
        default = "sig_hex::none",
        skip_serializing_if = "sig_hex::is_none"
    )]
    pub sig: [u8; SIG_BYTES],
}

/// What a node signs of its [`StatusEntry`]: every field but the signature, as the Status
/// frame encodes them.
pub fn status_body(entry: &StatusEntry) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(256));
    e.status_fields(entry);
    e.0
}

/// A status signature in JSON (stored rows, `status --json`): hex.
mod sig_hex {
    use super::SIG_BYTES;

    pub fn none() -> [u8; SIG_BYTES] {
        [0; SIG_BYTES]
    }

    pub fn is_none(sig: &[u8; SIG_BYTES]) -> bool {
        *sig == none()
    }

    pub fn serialize<S: serde::Serializer>(sig: &[u8; SIG_BYTES], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(sig))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<[u8; SIG_BYTES], D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        let mut sig = [0; SIG_BYTES];
        hex::decode_to_slice(&text, &mut sig).map_err(serde::de::Error::custom)?;
        Ok(sig)
    }
}

/// One direct peer as seen by the node that publishes a [`StatusEntry`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusPeer {
    pub unit: String,
    pub connected: bool,
    /// Last frame received from it.
    pub last_seen_ms: Option<u64>,
    /// What the publishing node still has to deliver to it.
    pub pending_docs: u64,
    pub pending_bytes: u64,
    pub lag_ms: Option<u64>,
    /// Its session's last error; empty when none.
    pub last_error: String,
}

/// Why a side does not send a scan the peer asked for (`BlobMissing`). The asking side reports
/// it: a one-shot sync that ends with any scan missing either way is not converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingReason {
    /// The sender does not hold the scan (yet): nobody it could ask has delivered it.
    NotHeld = 0,
    /// Held, but a configured scans window holds it back until the window opens.
    Deferred = 1,
    /// No document of the asker's scope attaches it here (often: that document has not
    /// reached the sender yet).
    NotInScope = 2,
    /// The asker requested this scan more often in one session than a sender serves it.
    Limited = 3,
    /// Never on the wire: the transfer arrived but failed verification, or was cut.
    Failed = 4,
}

impl MissingReason {
    fn from_wire(v: u64) -> Result<MissingReason, ProtoError> {
        Ok(match v {
            0 => MissingReason::NotHeld,
            1 => MissingReason::Deferred,
            2 => MissingReason::NotInScope,
            3 => MissingReason::Limited,
            _ => {
                return Err(ProtoError::Malformed(format!(
                    "BlobMissing reason {v} is not one of 0, 1, 2, 3"
                )))
            }
        })
    }

    /// Words for a summary line.
    pub fn describe(self) -> &'static str {
        match self {
            MissingReason::NotHeld => "not held there either yet",
            MissingReason::Deferred => "deferred by the configured scans window",
            MissingReason::NotInScope => {
                "not attached there to a document of the asker's scope that another unit wrote"
            }
            MissingReason::Limited => "asked for more often in one session than it is sent",
            MissingReason::Failed => "transfer cut or failed verification; resumes next sync",
        }
    }
}

/// A document and its Automerge heads (sorted change hashes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocHeads {
    pub id: String,
    pub heads: Vec<Hash32>,
}

/// A document's changes the receiver lacks, with the sender's heads after them (so the receiver
/// knows whether the sender now holds all it holds, and need not offer the document back), and
/// the signature of each change by the node that made it (since version 4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocChanges {
    pub id: String,
    pub heads: Vec<Hash32>,
    pub data: Vec<u8>,
    pub sigs: Vec<ChangeSig>,
}

/// Bytes of a change's hash that locate its signature in a `Changes` entry (since version 5).
pub const CHANGE_PREFIX_BYTES: usize = 8;

/// The signature of one change by its author node, as it was made (relays forward it
/// unchanged), located by the first [`CHANGE_PREFIX_BYTES`] of the change's Automerge hash:
/// the signature covers the whole hash, which the receiver computes from the change itself,
/// so the prefix only says which signature to try (a wrong one fails to verify).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSig {
    pub change: [u8; CHANGE_PREFIX_BYTES],
    pub sig: [u8; SIG_BYTES],
}

impl ChangeSig {
    pub fn new(hash: &Hash32, sig: [u8; SIG_BYTES]) -> ChangeSig {
        let mut change = [0; CHANGE_PREFIX_BYTES];
        change.copy_from_slice(&hash[..CHANGE_PREFIX_BYTES]);
        ChangeSig { change, sig }
    }
}

/// Every message of the protocol; see docs/protocol.md for the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        feed_seq: u64,
        have_from_you: u64,
        crl_number: u64,
        /// The random id of the sender's copy of its database (a restored backup has another).
        epoch: u64,
        /// The version of the CA-signed unit tree the sender holds (0: none).
        units_version: u64,
    },
    Offer {
        docs: Vec<DocHeads>,
    },
    OfferEnd {
        upto: u64,
        offered: u64,
    },
    Want {
        docs: Vec<DocHeads>,
    },
    WantEnd,
    Changes {
        docs: Vec<DocChanges>,
    },
    /// Urgent documents sent whole ahead of the offer that lists them, without waiting for a Want.
    Push {
        docs: Vec<DocChanges>,
    },
    ChangesEnd {
        upto: u64,
    },
    Ack {
        upto: u64,
    },
    BlobWant {
        blobs: Vec<(Hash32, u64)>,
    },
    BlobMissing {
        hash: Hash32,
        reason: MissingReason,
    },
    BlobHeader {
        hash: Hash32,
        size: u64,
        chunk_bytes: u64,
        first: u64,
        chunk_hashes: Vec<Hash32>,
    },
    BlobChunk {
        idx: u64,
        compressed: bool,
        raw_len: u64,
        /// Shared, not copied, between the store, the compressor and QUIC's send buffer.
        data: Bytes,
    },
    BlobsDone,
    Crl {
        der: Vec<u8>,
    },
    Refused {
        reason: String,
    },
    /// One document of a Changes or Push frame was refused by the receiver's checks; the rest
    /// of the frame was stored and the session goes on (since version 3).
    DocRefused {
        id: String,
        reason: String,
    },
    /// The sender found the receiver restored from a backup after its round went out: it will
    /// offer again, from lower, once that round is acknowledged (since version 3).
    Reoffer,
    /// The province's unit tree, signed by its CA, for a peer that announced an older version
    /// (since version 4).
    Units {
        signed: Vec<u8>,
    },
    /// The sender's own status and the latest it holds of its subtree, sent upstream at the
    /// start of a session and then at most every `sync.status_interval_s` (since version 4).
    Status {
        entries: Vec<StatusEntry>,
    },
    /// Node certificates (DER) of the authors of changes the sender is about to send, each at
    /// most once per session (since version 4).
    Certs {
        ders: Vec<Vec<u8>>,
    },
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::Offer { .. } => 2,
            Frame::OfferEnd { .. } => 3,
            Frame::Want { .. } => 4,
            Frame::WantEnd => 5,
            Frame::Changes { .. } => 6,
            Frame::ChangesEnd { .. } => 7,
            Frame::Ack { .. } => 8,
            Frame::BlobWant { .. } => 9,
            Frame::BlobMissing { .. } => 10,
            Frame::BlobHeader { .. } => 11,
            Frame::BlobChunk { .. } => 12,
            Frame::BlobsDone => 13,
            Frame::Crl { .. } => 14,
            Frame::Refused { .. } => 15,
            Frame::Push { .. } => 16,
            Frame::DocRefused { .. } => 17,
            Frame::Reoffer => 18,
            Frame::Units { .. } => 22,
            Frame::Status { .. } => 21,
            Frame::Certs { .. } => 19,
        }
    }

    /// Frames whose bodies are worth compressing (blob chunks are compressed on their own terms).
    fn compressible(&self) -> bool {
        matches!(
            self,
            Frame::Offer { .. }
                | Frame::Want { .. }
                | Frame::Changes { .. }
                | Frame::Push { .. }
                | Frame::BlobHeader { .. }
                | Frame::Status { .. }
                | Frame::Certs { .. }
        )
    }
}

struct Enc(Vec<u8>);

impl Enc {
    fn uint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.uint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn hash(&mut self, h: &Hash32) {
        self.0.extend_from_slice(h);
    }
    fn opt_uint(&mut self, v: Option<u64>) {
        // 0 is "none"; a value is sent plus one (u64::MAX saturates: no real time or size).
        self.uint(v.map_or(0, |v| v.saturating_add(1)));
    }
    fn status_entry(&mut self, s: &StatusEntry) {
        self.status_fields(s);
        self.0.extend_from_slice(&s.sig);
    }
    fn status_fields(&mut self, s: &StatusEntry) {
        self.bytes(s.unit.as_bytes());
        self.bytes(s.node_id.as_bytes());
        self.bytes(s.version.as_bytes());
        self.uint(s.as_of_ms);
        self.opt_uint(s.cert_expires_ms);
        self.opt_uint(s.disk_free_bytes);
        self.uint(s.pending_docs);
        self.uint(s.pending_bytes);
        self.opt_uint(s.lag_ms);
        self.uint(s.scans_in_flight);
        self.uint(s.scans_missing);
        self.bytes(s.last_error.as_bytes());
        self.uint(s.peers.len() as u64);
        for p in &s.peers {
            self.bytes(p.unit.as_bytes());
            self.uint(u64::from(p.connected));
            self.opt_uint(p.last_seen_ms);
            self.uint(p.pending_docs);
            self.uint(p.pending_bytes);
            self.opt_uint(p.lag_ms);
            self.bytes(p.last_error.as_bytes());
        }
    }
    fn doc_heads(&mut self, docs: &[DocHeads]) {
        self.uint(docs.len() as u64);
        for d in docs {
            self.bytes(d.id.as_bytes());
            self.uint(d.heads.len() as u64);
            for h in &d.heads {
                self.hash(h);
            }
        }
    }
}

struct Dec<'a> {
    buf: &'a [u8],
}

impl<'a> Dec<'a> {
    fn bad(what: &str) -> ProtoError {
        ProtoError::Malformed(what.to_string())
    }
    /// Unsigned LEB128, as `Enc::uint` writes it: minimal (no trailing zero byte) and within
    /// 64 bits. Anything else is refused rather than read as some other value.
    fn uint(&mut self) -> Result<u64, ProtoError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or_else(|| Self::bad("truncated integer"))?;
            self.buf = rest;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(Self::bad("integer longer than 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                if b == 0 && shift > 0 {
                    return Err(Self::bad("integer not in its shortest encoding"));
                }
                return Ok(v);
            }
        }
        Err(Self::bad("integer longer than 64 bits"))
    }
    fn count(&mut self, max: usize) -> Result<usize, ProtoError> {
        let n = self.uint()?;
        if n > max as u64 {
            return Err(ProtoError::Malformed(format!(
                "list of {n} items, more than the {max} allowed"
            )));
        }
        Ok(n as usize)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(Self::bad("truncated field"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.count(FRAME_RAW_BYTES_MAX)?;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self, max: usize) -> Result<String, ProtoError> {
        let n = self.count(max)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Self::bad("text is not UTF-8"))
    }
    fn hash(&mut self) -> Result<Hash32, ProtoError> {
        Ok(self.take(32)?.try_into().expect("take(32) yields 32 bytes"))
    }
    fn hashes(&mut self, max: usize) -> Result<Vec<Hash32>, ProtoError> {
        let n = self.count(max)?;
        (0..n).map(|_| self.hash()).collect()
    }
    fn opt_uint(&mut self) -> Result<Option<u64>, ProtoError> {
        Ok(self.uint()?.checked_sub(1))
    }
    fn flag(&mut self, what: &str) -> Result<bool, ProtoError> {
        match self.uint()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Malformed(format!("{what} is neither 0 nor 1"))),
        }
    }
    fn status_entry(&mut self) -> Result<StatusEntry, ProtoError> {
        let name = STATUS_NAME_BYTES_MAX;
        let mut entry = StatusEntry {
            unit: self.string(name)?,
            node_id: self.string(name)?,
            version: self.string(name)?,
            as_of_ms: self.uint()?,
            cert_expires_ms: self.opt_uint()?,
            disk_free_bytes: self.opt_uint()?,
            pending_docs: self.uint()?,
            pending_bytes: self.uint()?,
            lag_ms: self.opt_uint()?,
            scans_in_flight: self.uint()?,
            scans_missing: self.uint()?,
            last_error: self.string(STATUS_ERROR_BYTES_MAX)?,
            peers: Vec::new(),
            sig: [0; SIG_BYTES],
        };
        let n = self.count(STATUS_PEERS_MAX)?;
        for _ in 0..n {
            entry.peers.push(StatusPeer {
                unit: self.string(name)?,
                connected: self.flag("a peer's connected flag")?,
                last_seen_ms: self.opt_uint()?,
                pending_docs: self.uint()?,
                pending_bytes: self.uint()?,
                lag_ms: self.opt_uint()?,
                last_error: self.string(STATUS_ERROR_BYTES_MAX)?,
            });
        }
        entry.sig = self.take(SIG_BYTES)?.try_into().expect("take(SIG_BYTES)");
        Ok(entry)
    }
    fn doc_heads(&mut self) -> Result<Vec<DocHeads>, ProtoError> {
        let n = self.count(ITEMS_MAX)?;
        (0..n)
            .map(|_| {
                Ok(DocHeads {
                    id: self.string(64)?,
                    heads: self.hashes(HEADS_MAX)?,
                })
            })
            .collect()
    }
    fn doc_changes(&mut self) -> Result<Vec<DocChanges>, ProtoError> {
        let n = self.count(ITEMS_MAX)?;
        let mut docs = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let (id, heads, data) = (self.string(64)?, self.hashes(HEADS_MAX)?, self.bytes()?);
            let n = self.count(ITEMS_MAX)?;
            let sigs = (0..n)
                .map(|_| {
                    Ok(ChangeSig {
                        change: self
                            .take(CHANGE_PREFIX_BYTES)?
                            .try_into()
                            .expect("take(CHANGE_PREFIX_BYTES)"),
                        sig: self.take(SIG_BYTES)?.try_into().expect("take(SIG_BYTES)"),
                    })
                })
                .collect::<Result<_, ProtoError>>()?;
            docs.push(DocChanges {
                id,
                heads,
                data,
                sigs,
            });
        }
        Ok(docs)
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Self::bad("trailing bytes after the frame body"))
        }
    }
}

/// A frame's body, except a scan chunk's data, which ends its body and is returned apart.
fn body(frame: &Frame) -> (Vec<u8>, Option<&Bytes>) {
    let mut e = Enc(Vec::new());
    match frame {
        Frame::Hello {
            version,
            feed_seq,
            have_from_you,
            crl_number,
            epoch,
            units_version,
        } => {
            e.uint(u64::from(*version));
            e.uint(*feed_seq);
            e.uint(*have_from_you);
            e.uint(*epoch);
            e.uint(*crl_number);
            e.uint(*units_version);
        }
        Frame::Offer { docs } | Frame::Want { docs } => e.doc_heads(docs),
        Frame::OfferEnd { upto, offered } => {
            e.uint(*upto);
            e.uint(*offered);
        }
        Frame::WantEnd | Frame::BlobsDone | Frame::Reoffer => {}
        Frame::Changes { docs } | Frame::Push { docs } => {
            e.uint(docs.len() as u64);
            for c in docs {
                e.bytes(c.id.as_bytes());
                e.uint(c.heads.len() as u64);
                for h in &c.heads {
                    e.hash(h);
                }
                e.bytes(&c.data);
                e.uint(c.sigs.len() as u64);
                for s in &c.sigs {
                    e.0.extend_from_slice(&s.change);
                    e.0.extend_from_slice(&s.sig);
                }
            }
        }
        Frame::Certs { ders } => {
            e.uint(ders.len() as u64);
            for der in ders {
                e.bytes(der);
            }
        }
        Frame::ChangesEnd { upto } | Frame::Ack { upto } => e.uint(*upto),
        Frame::BlobWant { blobs } => {
            e.uint(blobs.len() as u64);
            for (h, from) in blobs {
                e.hash(h);
                e.uint(*from);
            }
        }
        Frame::BlobMissing { hash, reason } => {
            e.hash(hash);
            e.uint(*reason as u64);
        }
        Frame::BlobHeader {
            hash,
            size,
            chunk_bytes,
            first,
            chunk_hashes,
        } => {
            e.hash(hash);
            e.uint(*size);
            e.uint(*chunk_bytes);
            e.uint(*first);
            e.uint(chunk_hashes.len() as u64);
            for h in chunk_hashes {
                e.hash(h);
            }
        }
        Frame::BlobChunk {
            idx,
            compressed,
            raw_len,
            data,
        } => {
            e.uint(*idx);
            e.uint(u64::from(*compressed));
            e.uint(*raw_len);
            e.uint(data.len() as u64);
            return (e.0, Some(data));
        }
        Frame::Crl { der } => e.bytes(der),
        Frame::Units { signed } => e.bytes(signed),
        Frame::Refused { reason } => e.bytes(reason.as_bytes()),
        Frame::DocRefused { id, reason } => {
            e.bytes(id.as_bytes());
            e.bytes(reason.as_bytes());
        }
        Frame::Status { entries } => {
            e.uint(entries.len() as u64);
            for s in entries {
                e.status_entry(s);
            }
        }
    }
    (e.0, None)
}

/// Encodes a frame; bodies of list frames are zstd-compressed when that saves bytes.
pub fn encode(frame: &Frame, level: i32) -> Vec<u8> {
    let (mut out, data) = encode_split(frame, level);
    out.extend_from_slice(&data);
    out
}

/// Encodes a frame as two parts to be sent one after the other: the bytes up to a scan chunk's
/// data, and that data, shared rather than copied (empty for other frames).
pub fn encode_split(frame: &Frame, level: i32) -> (Vec<u8>, Bytes) {
    let (raw, data) = body(frame);
    let data_len = data.map_or(0, Bytes::len);
    let mut flags = 0;
    let payload = if frame.compressible() && raw.len() >= COMPRESS_BYTES_MIN {
        match zstd::bulk::compress(&raw, level) {
            Ok(z) if z.len() + 10 < raw.len() => {
                flags |= FLAG_ZSTD;
                let mut e = Enc(Vec::with_capacity(z.len() + 10));
                e.uint(raw.len() as u64);
                e.0.extend_from_slice(&z);
                e.0
            }
            _ => raw,
        }
    } else {
        raw
    };
    let len = payload.len() + data_len + 2;
    assert!(
        len <= FRAME_BYTES_MAX,
        "frame of {len} bytes exceeds FRAME_BYTES_MAX; the sender must batch"
    );
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len() + data_len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(frame.kind());
    out.push(flags);
    out.extend_from_slice(&payload);
    (out, data.cloned().unwrap_or_default())
}

/// Reads the length prefix: how many bytes follow it. Refuses oversized frames before reading them.
pub fn frame_len(header: [u8; 4]) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header) as usize;
    if !(2..=FRAME_BYTES_MAX).contains(&len) {
        return Err(ProtoError::Malformed(format!(
            "frame length {len} outside 2..={FRAME_BYTES_MAX}"
        )));
    }
    Ok(len)
}

/// What decoding `buf` (what follows the length prefix) will hold in memory, for budgeting before
/// decoding: the declared size of a compressed body (bounded by [`FRAME_RAW_BYTES_MAX`]) plus the
/// bytes received. Checks no more than the header.
pub fn decoded_bytes(buf: &[u8]) -> Result<usize, ProtoError> {
    match buf {
        [_, flags, rest @ ..] if flags & FLAG_ZSTD != 0 => {
            Ok(buf.len() + Dec { buf: rest }.count(FRAME_RAW_BYTES_MAX)?)
        }
        _ => Ok(buf.len()),
    }
}

/// Decodes what follows the length prefix (type, flags, body).
pub fn decode(buf: &[u8]) -> Result<Frame, ProtoError> {
    decode_in(buf, None)
}

/// As [`decode`], for a frame received into `Bytes`: a scan chunk's data is a view of `buf`.
pub fn decode_shared(buf: &Bytes) -> Result<Frame, ProtoError> {
    decode_in(buf, Some(buf))
}

/// Decodes `buf`; `shared`, when given, holds the same bytes as `buf`.
fn decode_in(buf: &[u8], shared: Option<&Bytes>) -> Result<Frame, ProtoError> {
    let [kind, flags, rest @ ..] = buf else {
        return Err(ProtoError::Malformed(
            "frame shorter than its header".into(),
        ));
    };
    if flags & !FLAG_ZSTD != 0 {
        return Err(ProtoError::Malformed(format!(
            "unknown frame flags {flags:#x}"
        )));
    }
    let decompressed;
    let (raw, shared): (&[u8], _) = if flags & FLAG_ZSTD != 0 {
        let mut d = Dec { buf: rest };
        let raw_len = d.count(FRAME_RAW_BYTES_MAX)?;
        decompressed = zstd::bulk::decompress(d.buf, raw_len)
            .map_err(|e| ProtoError::Malformed(format!("zstd body: {e}")))?;
        if decompressed.len() != raw_len {
            return Err(ProtoError::Malformed(
                "zstd body length differs from its declared length".into(),
            ));
        }
        (&decompressed, None)
    } else {
        (rest, shared)
    };
    let mut d = Dec { buf: raw };
    let frame = match kind {
        1 => {
            let version = u16::try_from(d.uint()?).map_err(|_| Dec::bad("version out of range"))?;
            if version != VERSION {
                // Another version's Hello may not parse as this one's: the session reports the
                // version mismatch, not a malformed frame.
                return Ok(Frame::Hello {
                    version,
                    feed_seq: 0,
                    have_from_you: 0,
                    crl_number: 0,
                    epoch: 0,
                    units_version: 0,
                });
            }
            Frame::Hello {
                version,
                feed_seq: d.uint()?,
                have_from_you: d.uint()?,
                epoch: d.uint()?,
                crl_number: d.uint()?,
                units_version: d.uint()?,
            }
        }
        2 => Frame::Offer {
            docs: d.doc_heads()?,
        },
        3 => Frame::OfferEnd {
            upto: d.uint()?,
            offered: d.uint()?,
        },
        4 => Frame::Want {
            docs: d.doc_heads()?,
        },
        5 => Frame::WantEnd,
        6 => Frame::Changes {
            docs: d.doc_changes()?,
        },
        16 => Frame::Push {
            docs: d.doc_changes()?,
        },
        7 => Frame::ChangesEnd { upto: d.uint()? },
        8 => Frame::Ack { upto: d.uint()? },
        9 => {
            let n = d.count(ITEMS_MAX)?;
            let mut blobs = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                blobs.push((d.hash()?, d.uint()?));
            }
            Frame::BlobWant { blobs }
        }
        10 => Frame::BlobMissing {
            hash: d.hash()?,
            reason: MissingReason::from_wire(d.uint()?)?,
        },
        11 => Frame::BlobHeader {
            hash: d.hash()?,
            size: d.uint()?,
            chunk_bytes: d.uint()?,
            first: d.uint()?,
            chunk_hashes: d.hashes(ITEMS_MAX)?,
        },
        12 => {
            let idx = d.uint()?;
            let compressed = match d.uint()? {
                0 => false,
                1 => true,
                _ => return Err(Dec::bad("chunk compression flag")),
            };
            let raw_len = d.uint()?;
            let n = d.count(FRAME_RAW_BYTES_MAX)?;
            let data = d.take(n)?;
            Frame::BlobChunk {
                idx,
                compressed,
                raw_len,
                data: shared.map_or_else(|| Bytes::copy_from_slice(data), |b| b.slice_ref(data)),
            }
        }
        13 => Frame::BlobsDone,
        14 => Frame::Crl { der: d.bytes()? },
        22 => Frame::Units { signed: d.bytes()? },
        15 => Frame::Refused {
            reason: d.string(4096)?,
        },
        18 => Frame::Reoffer,
        19 => {
            let n = d.count(CERTS_PER_FRAME_MAX)?;
            let ders = (0..n)
                .map(|_| {
                    let len = d.count(CERT_BYTES_MAX)?;
                    Ok(d.take(len)?.to_vec())
                })
                .collect::<Result<_, ProtoError>>()?;
            Frame::Certs { ders }
        }
        17 => Frame::DocRefused {
            id: d.string(DOC_ID_BYTES_MAX)?,
            reason: d.string(4096)?,
        },
        21 => {
            let n = d.count(STATUS_ENTRIES_MAX)?;
            let mut entries = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                entries.push(d.status_entry()?);
            }
            Frame::Status { entries }
        }
        other => return Err(ProtoError::Malformed(format!("unknown frame type {other}"))),
    };
    d.end()?;
    Ok(frame)
}

/// Splits an encoded stream into frames; used by tests, bundles and the fuzz-style checks.
pub fn decode_all(mut buf: &[u8]) -> Result<Vec<Frame>, ProtoError> {
    let mut frames = Vec::new();
    while !buf.is_empty() {
        let header: [u8; 4] = buf
            .get(..4)
            .ok_or_else(|| Dec::bad("truncated frame header"))?
            .try_into()
            .expect("4 bytes");
        let len = frame_len(header)?;
        let body = buf
            .get(4..4 + len)
            .ok_or_else(|| Dec::bad("truncated frame"))?;
        frames.push(decode(body)?);
        buf = &buf[4 + len..];
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn samples() -> Vec<Frame> {
        let docs = vec![
            DocHeads {
                id: "dsp_0011223344556677".into(),
                heads: vec![[7; 32], [9; 32]]
            };
            40
        ];
        vec![
            Frame::Hello {
                version: VERSION,
                feed_seq: 1 << 40,
                have_from_you: 3,
                crl_number: 2,
                epoch: 0xfeed_beef,
                units_version: 12,
            },
            Frame::Offer { docs: docs.clone() },
            Frame::OfferEnd {
                upto: 99,
                offered: 40,
            },
            Frame::Want { docs },
            Frame::WantEnd,
            Frame::Changes {
                docs: vec![
                    DocChanges {
                        id: "asg_0011223344556677".into(),
                        heads: vec![[1; 32]],
                        data: vec![1, 2, 3],
                        sigs: vec![ChangeSig::new(&[1; 32], [3; SIG_BYTES])],
                    };
                    300
                ],
            },
            Frame::Push {
                docs: vec![DocChanges {
                    id: "dsp_0011223344556677".into(),
                    heads: vec![[2; 32]],
                    data: vec![4; 600],
                    sigs: Vec::new(),
                }],
            },
            Frame::ChangesEnd { upto: 5 },
            Frame::Ack { upto: 5 },
            Frame::BlobWant {
                blobs: vec![([1; 32], 0), ([2; 32], 17)],
            },
            Frame::BlobMissing {
                hash: [3; 32],
                reason: MissingReason::Deferred,
            },
            Frame::BlobHeader {
                hash: [4; 32],
                size: 1000,
                chunk_bytes: 256,
                first: 1,
                chunk_hashes: vec![[5; 32]; 3],
            },
            Frame::BlobChunk {
                idx: 2,
                compressed: true,
                raw_len: 256,
                data: vec![0; 40].into(),
            },
            Frame::BlobsDone,
            Frame::Crl {
                der: vec![0x30, 0x82],
            },
            Frame::Refused {
                reason: "revoked".into(),
            },
            Frame::DocRefused {
                id: "dsp_0011223344556677".into(),
                reason: "a change claims author unit qn".into(),
            },
            Frame::Reoffer,
            Frame::Units {
                signed: b"CSUT1 tree".to_vec(),
            },
            Frame::Status {
                entries: vec![sample_status(), sample_status()],
            },
            Frame::Certs {
                ders: vec![vec![0x30, 0x82, 1], vec![0x30; 700]],
            },
        ]
    }

    fn sample_status() -> StatusEntry {
        StatusEntry {
            unit: "qn/binhlieu".into(),
            node_id: "ab".repeat(16),
            version: "0.1.0".into(),
            as_of_ms: 1_764_000_000_000,
            cert_expires_ms: Some(1_900_000_000_000),
            disk_free_bytes: None,
            pending_docs: 3,
            pending_bytes: 70_000,
            lag_ms: Some(0),
            scans_in_flight: 1,
            scans_missing: 2,
            last_error: "connection lost".into(),
            peers: vec![StatusPeer {
                unit: "qn/binhlieu/tinhhuc".into(),
                connected: false,
                last_seen_ms: Some(1_763_999_000_000),
                pending_docs: 0,
                pending_bytes: 0,
                lag_ms: None,
                last_error: String::new(),
            }],
            sig: [7; SIG_BYTES],
        }
    }

    #[test]
    fn a_status_past_its_bounds_is_refused() {
        let mut long = sample_status();
        long.last_error = "x".repeat(STATUS_ERROR_BYTES_MAX + 1);
        let bytes = encode(
            &Frame::Status {
                entries: vec![long],
            },
            1,
        );
        assert!(matches!(decode(&bytes[4..]), Err(ProtoError::Malformed(_))));
        let mut crowded = sample_status();
        crowded.peers = vec![crowded.peers[0].clone(); STATUS_PEERS_MAX + 1];
        let bytes = encode(
            &Frame::Status {
                entries: vec![crowded],
            },
            1,
        );
        assert!(matches!(decode(&bytes[4..]), Err(ProtoError::Malformed(_))));
    }

    #[test]
    fn the_memory_a_frame_decodes_into_is_known_before_decoding() {
        let offer = Frame::Offer {
            docs: vec![
                DocHeads {
                    id: "d".repeat(30),
                    heads: vec![[1; 32]],
                };
                1_000
            ],
        };
        let body = &encode(&offer, 3)[4..];
        let raw = body_len_raw(&offer);
        assert!(body.len() * 10 < raw, "compresses");
        assert_eq!(decoded_bytes(body).unwrap(), body.len() + raw);
        let plain = &encode(&Frame::BlobsDone, 3)[4..];
        assert_eq!(decoded_bytes(plain).unwrap(), plain.len());
        // A declared size past the bound is refused before anything is decompressed.
        let mut e = Enc(vec![2, FLAG_ZSTD]);
        e.uint(FRAME_RAW_BYTES_MAX as u64 + 1);
        assert!(decoded_bytes(&e.0).is_err());
    }

    fn body_len_raw(frame: &Frame) -> usize {
        body(frame).0.len()
    }

    /// Issue 15: the varint decoder read over-long encodings (0x80 0x00 for 0) and silently
    /// dropped the bits of a tenth byte past bit 63.
    #[test]
    fn issue15_integers_are_read_only_in_their_one_shortest_encoding() {
        let ack = |varint: &[u8]| {
            let mut frame = vec![8u8, 0];
            frame.extend_from_slice(varint);
            decode(&frame)
        };
        assert_eq!(ack(&[0x2c]).unwrap(), Frame::Ack { upto: 44 });
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(ack(&max).unwrap(), Frame::Ack { upto: u64::MAX });
        for bad in [
            &[0x80, 0x00][..],
            &[0xac, 0x80, 0x00],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
            &[
                0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ],
        ] {
            assert!(
                matches!(ack(bad), Err(ProtoError::Malformed(_))),
                "{bad:02x?} was read as {:?}",
                ack(bad)
            );
        }
        for upto in [0, 127, 128, 16_383, 16_384, u64::MAX / 3, u64::MAX] {
            let bytes = encode(&Frame::Ack { upto }, 1);
            assert_eq!(decode(&bytes[4..]).unwrap(), Frame::Ack { upto });
        }
    }

    #[test]
    fn every_frame_roundtrips() {
        let mut stream = Vec::new();
        for f in samples() {
            stream.extend(encode(&f, 3));
        }
        assert_eq!(decode_all(&stream).unwrap(), samples());
    }

    #[test]
    fn a_received_chunk_shares_the_frame_buffer() {
        for f in samples() {
            let body = Bytes::from(encode(&f, 3)[4..].to_vec());
            let frame = decode_shared(&body).unwrap();
            if let Frame::BlobChunk { data, .. } = &frame {
                assert!(body.as_ptr_range().contains(&data.as_ptr()), "not copied");
            }
            assert_eq!(frame, f);
        }
    }

    #[test]
    fn list_frames_are_compressed() {
        let f = Frame::Changes {
            docs: vec![
                DocChanges {
                    id: "asg_0011223344556677".into(),
                    heads: vec![[1; 32]],
                    data: vec![1, 2, 3],
                    sigs: Vec::new(),
                };
                300
            ],
        };
        let encoded = encode(&f, 3);
        assert_eq!(encoded[5] & FLAG_ZSTD, FLAG_ZSTD);
        assert!(encoded.len() < body(&f).0.len() / 4);
    }

    #[test]
    fn oversized_and_bomb_frames_are_refused_before_allocation() {
        assert!(frame_len(((FRAME_BYTES_MAX + 1) as u32).to_be_bytes()).is_err());
        // A zstd body claiming more than FRAME_RAW_BYTES_MAX is refused without decompressing.
        let mut e = Enc(vec![6, FLAG_ZSTD]);
        e.uint(FRAME_RAW_BYTES_MAX as u64 + 1);
        e.0.extend_from_slice(&zstd::bulk::compress(&[0u8; 64], 1).unwrap());
        assert!(decode(&e.0).is_err());
        // A list claiming a billion items is refused at the count.
        let mut e = Enc(vec![2, 0]);
        e.uint(1 << 30);
        assert!(decode(&e.0).is_err());
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|f| encode(f, 1)[4..].to_vec())
            .collect();
        for i in 0..20_000 {
            let mut buf = valid[i % valid.len()].clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..buf.len());
                buf[at] = rng.random();
            }
            if rng.random_bool(0.2) {
                buf.truncate(rng.random_range(0..buf.len()));
            }
            let _ = decode(&buf);
        }
    }

    // Issue 11: the fuzz targets' properties (fuzz/fuzz_targets/wire_frames.rs), in the default
    // test run.
    mod issue11_props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// The bytes a frame holds once decoded, which `decoded_bytes` must have budgeted.
        fn held_bytes(frame: &Frame) -> usize {
            let heads = |docs: &[DocHeads]| -> usize {
                docs.iter().map(|d| d.id.len() + 32 * d.heads.len()).sum()
            };
            let changes = |docs: &[DocChanges]| -> usize {
                docs.iter()
                    .map(|d| d.id.len() + 32 * d.heads.len() + d.data.len())
                    .sum()
            };
            match frame {
                Frame::Offer { docs } | Frame::Want { docs } => heads(docs),
                Frame::Changes { docs } | Frame::Push { docs } => changes(docs),
                Frame::BlobWant { blobs } => 32 * blobs.len(),
                Frame::BlobHeader { chunk_hashes, .. } => 32 * chunk_hashes.len(),
                Frame::BlobChunk { data, .. } => data.len(),
                Frame::Crl { der } => der.len(),
                Frame::Units { signed } => signed.len(),
                Frame::Refused { reason } => reason.len(),
                Frame::DocRefused { id, reason } => id.len() + reason.len(),
                _ => 0,
            }
        }

        fn id() -> impl Strategy<Value = String> {
            "[a-z0-9_]{0,64}"
        }
        fn doc_heads() -> impl Strategy<Value = DocHeads> {
            (id(), vec(any::<Hash32>(), 0..4)).prop_map(|(id, heads)| DocHeads { id, heads })
        }
        fn doc_changes() -> impl Strategy<Value = DocChanges> {
            (
                id(),
                vec(any::<Hash32>(), 0..3),
                vec(any::<u8>(), 0..700),
                vec((any::<Hash32>(), any::<[u8; 32]>()), 0..3),
            )
                .prop_map(|(id, heads, data, sigs)| DocChanges {
                    id,
                    heads,
                    data,
                    sigs: sigs
                        .into_iter()
                        .map(|(hash, half)| {
                            ChangeSig::new(&hash, [half, half].concat().try_into().unwrap())
                        })
                        .collect(),
                })
        }
        /// Lists of random items, and of one item repeated (which compresses).
        fn heads_list() -> impl Strategy<Value = Vec<DocHeads>> {
            prop_oneof![
                vec(doc_heads(), 0..30),
                (doc_heads(), 0..200usize).prop_map(|(d, n)| vec![d; n]),
            ]
        }
        fn changes_list() -> impl Strategy<Value = Vec<DocChanges>> {
            prop_oneof![
                vec(doc_changes(), 0..6),
                (doc_changes(), 0..40usize).prop_map(|(d, n)| vec![d; n]),
            ]
        }

        fn frame() -> impl Strategy<Value = Frame> {
            let reason = prop_oneof![
                Just(MissingReason::NotHeld),
                Just(MissingReason::Deferred),
                Just(MissingReason::NotInScope),
                Just(MissingReason::Limited),
            ];
            prop_oneof![
                any::<(u64, u64, u64, u64, u64)>().prop_map(|(a, b, c, d, e)| Frame::Hello {
                    version: VERSION,
                    feed_seq: a,
                    have_from_you: b,
                    crl_number: c,
                    epoch: d,
                    units_version: e,
                }),
                heads_list().prop_map(|docs| Frame::Offer { docs }),
                any::<(u64, u64)>().prop_map(|(upto, offered)| Frame::OfferEnd { upto, offered }),
                heads_list().prop_map(|docs| Frame::Want { docs }),
                Just(Frame::WantEnd),
                changes_list().prop_map(|docs| Frame::Changes { docs }),
                changes_list().prop_map(|docs| Frame::Push { docs }),
                any::<u64>().prop_map(|upto| Frame::ChangesEnd { upto }),
                any::<u64>().prop_map(|upto| Frame::Ack { upto }),
                vec(any::<(Hash32, u64)>(), 0..20).prop_map(|blobs| Frame::BlobWant { blobs }),
                (any::<Hash32>(), reason)
                    .prop_map(|(hash, reason)| Frame::BlobMissing { hash, reason }),
                (
                    any::<(Hash32, u64, u64, u64)>(),
                    vec(any::<Hash32>(), 0..20)
                )
                    .prop_map(
                        |((hash, size, chunk_bytes, first), chunk_hashes)| Frame::BlobHeader {
                            hash,
                            size,
                            chunk_bytes,
                            first,
                            chunk_hashes,
                        }
                    ),
                (any::<(u64, bool, u64)>(), vec(any::<u8>(), 0..2000)).prop_map(
                    |((idx, compressed, raw_len), data)| Frame::BlobChunk {
                        idx,
                        compressed,
                        raw_len,
                        data: data.into(),
                    }
                ),
                Just(Frame::BlobsDone),
                vec(any::<u8>(), 0..1000).prop_map(|der| Frame::Crl { der }),
                "\\PC{0,200}".prop_map(|reason| Frame::Refused { reason }),
                (id(), "\\PC{0,200}").prop_map(|(id, reason)| Frame::DocRefused { id, reason }),
                Just(Frame::Reoffer),
                vec(any::<u8>(), 0..1000).prop_map(|signed| Frame::Units { signed }),
                vec(Just(sample_status()), 0..3).prop_map(|entries| Frame::Status { entries }),
                vec(vec(any::<u8>(), 0..800), 0..4).prop_map(|ders| Frame::Certs { ders }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn issue11_generated_frames_roundtrip(frames in vec(frame(), 1..4), level in 1..4i32) {
                let mut stream = Vec::new();
                for f in &frames {
                    let one = encode(f, level);
                    prop_assert_eq!(&decode(&one[4..]).unwrap(), f);
                    let shared = decode_shared(&Bytes::from(one[4..].to_vec())).unwrap();
                    prop_assert_eq!(&shared, f);
                    prop_assert!(held_bytes(f) <= decoded_bytes(&one[4..]).unwrap());
                    stream.extend(one);
                }
                prop_assert_eq!(decode_all(&stream).unwrap(), frames);
            }

            #[test]
            fn issue11_any_bytes_decode_within_their_budget(buf in vec(any::<u8>(), 0..600)) {
                let _ = decode_all(&buf);
                let plain = decode(&buf);
                let shared = decode_shared(&Bytes::from(buf.clone()));
                prop_assert_eq!(plain.is_ok(), shared.is_ok());
                if let Ok(frame) = plain {
                    prop_assert!(held_bytes(&frame) <= decoded_bytes(&buf).unwrap());
                    prop_assert_eq!(decode(&encode(&frame, 1)[4..]).unwrap(), frame);
                }
            }

            #[test]
            fn issue11_mutated_frames_decode_within_their_budget(
                f in frame(),
                edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
                cut in any::<prop::sample::Index>(),
                truncate in any::<bool>(),
            ) {
                let mut buf = encode(&f, 1)[4..].to_vec();
                for (at, byte) in edits {
                    let at = at.index(buf.len());
                    buf[at] = byte;
                }
                if truncate {
                    buf.truncate(cut.index(buf.len()));
                }
                if let Ok(frame) = decode(&buf) {
                    prop_assert!(held_bytes(&frame) <= decoded_bytes(&buf).unwrap());
                }
            }

            /// A compressed body of any kind decodes to no more than it declares, and only when
            /// the declaration is true.
            #[test]
            fn issue11_zstd_bodies_inflate_only_to_their_declared_length(
                kind in 0u8..20,
                raw in vec(any::<u8>(), 0..3000),
                declared_delta in -3i64..3,
            ) {
                let z = zstd::bulk::compress(&raw, 1).unwrap();
                let declared = (raw.len() as i64 + declared_delta).max(0) as u64;
                let mut e = Enc(vec![kind, FLAG_ZSTD]);
                e.uint(declared);
                e.0.extend_from_slice(&z);
                let decoded = decode(&e.0);
                if declared != raw.len() as u64 {
                    prop_assert!(decoded.is_err());
                }
                if let Ok(frame) = decoded {
                    prop_assert!(held_bytes(&frame) <= decoded_bytes(&e.0).unwrap());
                }
            }
        }
    }
}
