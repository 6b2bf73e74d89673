//! Sync without a link: a signed file carrying what a peer lacks (documents, then scans), and
//! its import through the same checks as the wire (certificate, scope, authorship, integrity).
//!
//! Layout: `CSBUNDLE`, format byte, u32 header length, header (JSON), u16 signature length,
//! signature, then protocol frames to the end of the file. The signature (the exporter's node
//! key) covers the header, which holds the payload's BLAKE3 and length. docs/protocol.md has
//! the details.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tracing::info;

use super::admin::{CA_FILE, CERT_FILE};
use super::replica::{scope_for, NodeReplica};
use super::{blobsink::BlobSink, now_ms, Node, NodeError, Result, KEY_FILE};
use crate::model::DocId;
use crate::proto::blob::encode_chunk;
use crate::proto::{wire, DocChanges, Frame, ProtoError, Replica};
use crate::store::blobs::Hash;
use crate::trust::{self, fsutil, NodeKey};

const MAGIC: &[u8; 8] = b"CSBUNDLE";
/// 2: documents carry their changes' signatures, and `Certs` frames the authors' certificates
/// (protocol version 4); 3: a signature is located by a prefix of its change's hash (protocol
/// version 5).
const FORMAT: u8 = 3;
/// Largest header accepted (it holds a certificate and a CRL).
const HEADER_BYTES_MAX: u32 = 256 * 1024;
/// zstd level for scans in a bundle: a USB stick has room, the import machine has little time.
const BUNDLE_LEVEL: i32 = 9;
/// Bytes read at a time while a bundle's payload is hashed and copied.
const COPY_BYTES: usize = 64 * 1024;
/// Documents read per page while exporting.
const PAGE_DOCS: usize = 1_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleHeader {
    pub from_node: String,
    pub from_unit: String,
    pub for_unit: String,
    pub created_at_ms: i64,
    /// The exporter's feed: the bundle holds every document in scope changed after `since`, up to `upto`.
    pub since: u64,
    pub upto: u64,
    pub docs: u64,
    pub scans: u64,
    pub payload_bytes: u64,
    pub payload_blake3: String,
    pub signer_cert_pem: String,
    #[serde(default)]
    pub crl_pem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub out: String,
    pub for_unit: String,
    pub docs: u64,
    pub scans: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ImportReport {
    pub from_unit: String,
    pub from_node: String,
    pub docs: u64,
    pub docs_changed: u64,
    pub scans_stored: u64,
    pub scans_already_held: u64,
    /// Documents the checks refused, each alone (the rest was stored), with why.
    pub docs_refused: Vec<(String, String)>,
}

/// How far an export or import has come, for a bar or a log line: the stage, and its bytes
/// done and in all (0: not known yet). Written by the work as it goes (atomics, never waited
/// on) and read by whoever draws it, at its own pace.
#[derive(Debug, Default)]
pub struct BundleProgress {
    stage: Mutex<&'static str>,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
}

impl BundleProgress {
    fn begin(&self, stage: &'static str, bytes_total: u64) {
        if let Ok(mut s) = self.stage.lock() {
            *s = stage;
        }
        self.bytes_total.store(bytes_total, Ordering::Relaxed);
        self.bytes_done.store(0, Ordering::Relaxed);
    }

    fn done(&self, bytes: u64) {
        self.bytes_done.store(bytes, Ordering::Relaxed);
    }

    /// The stage ("" before the first), bytes done, and bytes in all when known.
    pub fn now(&self) -> (&'static str, u64, Option<u64>) {
        let stage = self.stage.lock().map(|s| *s).unwrap_or_default();
        let total = self.bytes_total.load(Ordering::Relaxed);
        (
            stage,
            self.bytes_done.load(Ordering::Relaxed),
            (total > 0).then_some(total),
        )
    }
}

/// A reader counting the bytes read through it into a [`BundleProgress`].
struct Counted<'a, R> {
    inner: R,
    bytes: u64,
    progress: &'a BundleProgress,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        self.progress.done(self.bytes);
        Ok(n)
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn refused(e: ProtoError) -> NodeError {
    NodeError::Invalid(format!("bundle refused: {e}"))
}

impl Node {
    /// Writes what `peer` (a peer name, or a unit path) lacks, as far as this node knows.
    /// `progress` goes through "documents" (bytes written so far), "scans" (of the scans'
    /// bytes) and "writing" (of the bundle file's bytes).
    pub fn bundle_export(
        &mut self,
        peer: &str,
        out: &Path,
        progress: &BundleProgress,
    ) -> Result<ExportReport> {
        let (unit, peer_node) = match self.store.peer_node(peer)? {
            Some((node, unit)) => (unit, Some(node)),
            None if self.tree.get(peer).is_ok() => (peer.to_string(), self.store.peer_node_by_unit(peer)?),
            None => {
                return Err(NodeError::NotFound(format!(
                    "no peer {peer:?} has synced with this node yet: pass its unit path instead, like --for qn/binhlieu/tinhhuc"
                )))
            }
        };
        let since = match &peer_node {
            Some(id) => self.store.peer_checkpoints(id)?.1,
            None => 0,
        } as u64;
        self.check_output_path(out, true)?;
        let unit = self.tree.canonical(&unit).to_string();
        let scope = scope_for(&unit, self.unit());
        let upto = self.store.feed_seq()? as u64;
        // The payload is written first (its hash goes in the signed header) to a file with no
        // name in the data directory: private, and gone with the process whatever happens.
        let tmp = self.dir.clone();
        let mut payload = BufWriter::new(tempfile::tempfile_in(&self.dir).map_err(io(&self.dir))?);
        let (mut hasher, mut bytes, mut docs, mut scans) =
            (blake3::Hasher::new(), 0u64, 0u64, 0u64);
        // Returns the payload's bytes so far.
        let mut emit = |frame: &Frame, payload: &mut BufWriter<File>| -> Result<u64> {
            let encoded = wire::encode(frame, 3);
            hasher.update(&encoded);
            bytes += encoded.len() as u64;
            payload.write_all(&encoded).map_err(io(&tmp))?;
            Ok(bytes)
        };
        progress.begin("documents", 0);
        let mut hashes: Vec<Hash> = Vec::new();
        // Authors whose certificates the bundle already carries (the exporter's is its header's).
        let mut certs_sent = std::collections::HashSet::from([self.node_id().to_string()]);
        let mut cursor = since as i64;
        loop {
            let page = self
                .store
                .changed_since(&scope, peer_node.as_deref(), cursor, PAGE_DOCS)?;
            let Some(last) = page.iter().map(|r| r.0).max() else {
                break;
            };
            cursor = last;
            let (mut batch, mut batch_bytes) = (Vec::new(), 0);
            for (_, id, _, _) in page {
                let doc_id: DocId = id.parse()?;
                let (data, heads) = self
                    .store
                    .read_doc(&doc_id, |doc| (doc.save(), doc.get_heads()))?;
                if data.len() > wire::DOC_CHANGES_BYTES_MAX {
                    tracing::warn!(doc = %doc_id, "document too large for a bundle frame; left out");
                    continue;
                }
                hashes.extend(self.store.doc_blob_hashes(&doc_id)?);
                batch_bytes += data.len();
                let sigs = self.store.change_sigs(&doc_id)?;
                // The certificates of the documents' authors go ahead of their frame.
                let mut ders = Vec::new();
                for row in &sigs {
                    let node = hex::encode(&row.actor);
                    if certs_sent.insert(node.clone()) {
                        ders.extend(self.store.node_cert(&node)?);
                    }
                }
                if !ders.is_empty() {
                    emit(&Frame::Certs { ders }, &mut payload)?;
                }
                batch.push(DocChanges {
                    id,
                    heads: heads.iter().map(|h| h.0).collect(),
                    data,
                    sigs: sigs
                        .into_iter()
                        .map(|row| crate::proto::ChangeSig::new(&row.hash, row.sig))
                        .collect(),
                });
                // Frames stay bounded as on the wire.
                if batch_bytes >= crate::proto::session::CHANGES_FRAME_BYTES {
                    docs += batch.len() as u64;
                    let written = emit(
                        &Frame::Changes {
                            docs: std::mem::take(&mut batch),
                        },
                        &mut payload,
                    )?;
                    batch_bytes = 0;
                    progress.done(written);
                }
            }
            if !batch.is_empty() {
                docs += batch.len() as u64;
                progress.done(emit(&Frame::Changes { docs: batch }, &mut payload)?);
            }
        }
        hashes.sort();
        hashes.dedup();
        let mut manifests = Vec::with_capacity(hashes.len());
        for hash in hashes {
            if let Some((size, chunk_hashes)) = self.store.blob_manifest(&hash)? {
                manifests.push((hash, size, chunk_hashes));
            }
        }
        progress.begin("scans", manifests.iter().map(|m| m.1).sum());
        let mut scan_bytes = 0u64;
        for (hash, size, chunk_hashes) in manifests {
            let count = chunk_hashes.len() as u64;
            let header = Frame::BlobHeader {
                hash,
                size,
                chunk_bytes: crate::store::blobs::CHUNK_BYTES as u64,
                first: 0,
                chunk_hashes,
            };
            emit(&header, &mut payload)?;
            for idx in 0..count {
                let data = self.store.blob_chunk(&hash, idx)?;
                let raw_len = data.len() as u64;
                scan_bytes += raw_len;
                let (compressed, data) = encode_chunk(data.into(), BUNDLE_LEVEL);
                emit(
                    &Frame::BlobChunk {
                        idx,
                        compressed,
                        raw_len,
                        data,
                    },
                    &mut payload,
                )?;
                progress.done(scan_bytes);
            }
            scans += 1;
        }
        let mut payload = payload.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        payload.seek(SeekFrom::Start(0)).map_err(io(&tmp))?;

        let header = BundleHeader {
            from_node: self.node_id().to_string(),
            from_unit: self.unit().to_string(),
            for_unit: unit.clone(),
            created_at_ms: now_ms(),
            since,
            upto,
            docs,
            scans,
            payload_bytes: bytes,
            payload_blake3: hasher.finalize().to_hex().to_string(),
            signer_cert_pem: std::fs::read_to_string(self.dir.join(CERT_FILE))
                .map_err(|_| NodeError::Invalid("this node is not enrolled: a bundle must be signed with a certificate from the province".into()))?,
            crl_pem: self.crl().map(|c| c.to_pem()),
        };
        let header_json = serde_json::to_vec(&header).expect("a bundle header serializes");
        let signature = NodeKey::load(self.dir.join(KEY_FILE))?.sign(&header_json)?;
        // The bundle appears under its name whole or not at all: written under a name of its
        // own beside `out`, which is the only file this command ever removes.
        let partial = fsutil::temp_beside(out, out.file_name().expect("checked"), "partial");
        let head_bytes = MAGIC.len() + 1 + 4 + header_json.len() + 2 + signature.len();
        progress.begin("writing", head_bytes as u64 + bytes);
        let mut payload = Counted {
            inner: payload,
            bytes: head_bytes as u64,
            progress,
        };
        let written = (|| -> std::io::Result<()> {
            // Bundles hold documents in clear: readable by this user only, like the database.
            let mut file = BufWriter::new(fsutil::create_private_file(&partial)?);
            file.write_all(MAGIC)?;
            file.write_all(&[FORMAT])?;
            file.write_all(&(header_json.len() as u32).to_be_bytes())?;
            file.write_all(&header_json)?;
            file.write_all(&(signature.len() as u16).to_be_bytes())?;
            file.write_all(&signature)?;
            std::io::copy(&mut payload, &mut file)?;
            file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&partial, out)?;
            fsutil::sync_dir_io(fsutil::parent_dir(out))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(io(out)(e));
        }
        info!(docs, scans, bytes, "bundle written");
        Ok(ExportReport {
            out: out.display().to_string(),
            for_unit: unit,
            docs,
            scans,
            bytes,
        })
    }

    /// Applies a bundle: verified whole (signature, certificate, payload hash) before anything
    /// is stored, then documents through the same checks as the wire, then scans chunk by chunk.
    /// Importing the same bundle again changes nothing.
    /// `progress` goes through "checking" (the payload read from the file and hashed) and
    /// "importing" (the payload applied), each of the payload's bytes.
    pub fn bundle_import(
        &mut self,
        path: &Path,
        progress: &BundleProgress,
    ) -> Result<ImportReport> {
        let bad = |what: &str| {
            NodeError::Invalid(format!(
                "{}: not a communesync bundle ({what})",
                path.display()
            ))
        };
        let mut file = BufReader::new(File::open(path).map_err(io(path))?);
        let SignedHeader {
            header,
            json: header_json,
            signature,
        } = read_header(&mut file).map_err(bad)?;
        let ca = std::fs::read_to_string(self.dir.join(CA_FILE)).map_err(|_| {
            NodeError::Invalid(
                "this node is not enrolled: it cannot check a bundle's signature".into(),
            )
        })?;
        // A newer CRL in the bundle is checked and installed first, so a revoked signer is caught.
        if let Some(crl) = &header.crl_pem {
            let crl = trust::Crl::from_pem(crl)?;
            self.install_crl_der(crl.der())?;
        }
        let signer = trust::verify_signed(
            &header.signer_cert_pem,
            &ca,
            self.crl().as_ref(),
            &header_json,
            &signature,
        )
        .map_err(|e| NodeError::Invalid(format!("{}: bundle refused: {e}", path.display())))?;
        if signer.node_id.to_string() != header.from_node || signer.unit != header.from_unit {
            return Err(NodeError::Invalid(format!(
                "{}: bundle refused: its header does not match its signer's certificate",
                path.display()
            )));
        }
        // A bundle made for this unit's former path is still for this node.
        if self.tree.canonical(&header.for_unit) != self.unit() {
            return Err(NodeError::Invalid(format!(
                "{}: this bundle is for {}, not for this node ({})",
                path.display(),
                header.for_unit,
                self.unit()
            )));
        }
        // The payload is read from the bundle once, through the hash into a private copy with
        // no name (in the data directory, which must hold what it brings anyway), and applied
        // from that copy: a bundle file changed after its hash was checked changes nothing.
        let mut copy = BufWriter::new(tempfile::tempfile_in(&self.dir).map_err(io(&self.dir))?);
        let mut hasher = blake3::Hasher::new();
        progress.begin("checking", header.payload_bytes);
        let (mut buf, mut copied) = (vec![0u8; COPY_BYTES], 0u64);
        let mut payload = (&mut file).take(header.payload_bytes.saturating_add(1));
        loop {
            let n = match payload.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(path)(e)),
            };
            hasher.update(&buf[..n]);
            copy.write_all(&buf[..n]).map_err(io(&self.dir))?;
            copied += n as u64;
            progress.done(copied);
        }
        if copied != header.payload_bytes
            || hasher.finalize().to_hex().as_str() != header.payload_blake3
        {
            return Err(NodeError::Invalid(format!(
                "{}: bundle refused: its content was altered or truncated",
                path.display()
            )));
        }
        drop(file);
        let mut copy = copy
            .into_inner()
            .map_err(|e| io(&self.dir)(e.into_error()))?;
        copy.seek(SeekFrom::Start(0)).map_err(io(&self.dir))?;
        let mut file = BufReader::new(copy);

        self.record_contact(&signer)?;
        // The signer's certificate checks the signatures of the changes it made.
        let signer_der = trust::cert_der_from_pem("signer certificate", &header.signer_cert_pem)?;
        self.learn_cert(&signer_der)?;
        let mut report = ImportReport {
            from_unit: signer.unit.clone(),
            from_node: signer.node_id.to_string(),
            docs: 0,
            docs_changed: 0,
            scans_stored: 0,
            scans_already_held: 0,
            docs_refused: Vec::new(),
        };
        let feed_before = self.store.feed_seq()?;
        let mut remaining = header.payload_bytes;
        let mut skipping = false;
        let payload_bytes = header.payload_bytes;
        progress.begin("importing", payload_bytes);
        while remaining > 0 {
            progress.done(payload_bytes - remaining);
            let frame = read_frame(&mut file, &mut remaining).map_err(|e| bad(&e.to_string()))?;
            match frame {
                Frame::Changes { docs } => {
                    report.docs += docs.len() as u64;
                    let applied = NodeReplica::new(self, signer.clone())
                        .apply(docs)
                        .map_err(refused)?;
                    report.docs_refused.extend(applied.refused);
                }
                Frame::Certs { ders } => {
                    NodeReplica::new(self, signer.clone())
                        .store_certs(ders)
                        .map_err(refused)?;
                }
                header @ Frame::BlobHeader { .. } => {
                    let Frame::BlobHeader { hash, .. } = &header else {
                        unreachable!()
                    };
                    if self.store.has_blob(hash)? {
                        report.scans_already_held += 1;
                        skipping = true;
                        continue;
                    }
                    skipping = false;
                    let mut s =
                        BlobSink::begin(&mut self.store, header).map_err(|(_, e)| refused(e))?;
                    while !s.is_complete() && remaining > 0 {
                        let chunk = read_frame(&mut file, &mut remaining)
                            .map_err(|e| bad(&e.to_string()))?;
                        s.chunk(chunk).map_err(refused)?;
                        progress.done(payload_bytes - remaining);
                    }
                    s.finish().map_err(refused)?;
                    report.scans_stored += 1;
                }
                Frame::BlobChunk { .. } if skipping => {}
                other => {
                    return Err(bad(&format!(
                        "unexpected frame {:?}",
                        std::mem::discriminant(&other)
                    )))
                }
            }
        }
        progress.done(payload_bytes);
        report.docs_changed = (self.store.feed_seq()? - feed_before) as u64;
        // Everything of the exporter's feed in our scope up to `upto` is now here, provided the
        // bundle started no later than what we already had.
        let id = signer.node_id.to_string();
        let (have, _) = self.store.peer_checkpoints(&id)?;
        if have as u64 >= header.since && header.upto as i64 > have {
            self.store
                .write(|tx| tx.set_have_from(&id, header.upto as i64))?;
        }
        if report.docs_changed > 0 {
            // A relay's daemon forwards what arrived on the stick at once.
            self.wake_daemon();
        }
        Ok(report)
    }
}

/// A bundle's header as read, before its signature is checked.
#[derive(Debug)]
pub struct SignedHeader {
    pub header: BundleHeader,
    /// The header's bytes, which the signature covers.
    pub json: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Reads a bundle up to its payload (magic, format, header, signature), leaving `file` at the
/// first frame. Bounded: at most [`HEADER_BYTES_MAX`] plus 64 KiB of signature are allocated,
/// whatever the lengths say. The error says what was wrong.
pub fn read_header(file: &mut impl Read) -> std::result::Result<SignedHeader, &'static str> {
    let mut magic = [0u8; 9];
    file.read_exact(&mut magic).map_err(|_| "too short")?;
    if &magic[..8] != MAGIC {
        return Err("not a communesync bundle (wrong magic)");
    }
    if magic[8] != FORMAT {
        return Err("a bundle format this version does not read (made by an older or newer communesync): export it again with the version the importing node runs");
    }
    let mut len4 = [0u8; 4];
    file.read_exact(&mut len4).map_err(|_| "truncated header")?;
    let header_len = u32::from_be_bytes(len4);
    if header_len > HEADER_BYTES_MAX {
        return Err("oversized header");
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(|_| "truncated header")?;
    let mut len2 = [0u8; 2];
    file.read_exact(&mut len2)
        .map_err(|_| "truncated signature")?;
    let mut signature = vec![0u8; u16::from_be_bytes(len2) as usize];
    file.read_exact(&mut signature)
        .map_err(|_| "truncated signature")?;
    let header = serde_json::from_slice(&json).map_err(|_| "unreadable header")?;
    Ok(SignedHeader {
        header,
        json,
        signature,
    })
}

fn read_frame(file: &mut impl Read, remaining: &mut u64) -> std::result::Result<Frame, ProtoError> {
    let mut len4 = [0u8; 4];
    file.read_exact(&mut len4)
        .map_err(|_| ProtoError::Malformed("truncated frame".into()))?;
    let len = wire::frame_len(len4)?;
    if (len as u64 + 4) > *remaining {
        return Err(ProtoError::Malformed("frame runs past the payload".into()));
    }
    let mut body = vec![0u8; len];
    file.read_exact(&mut body)
        .map_err(|_| ProtoError::Malformed("truncated frame".into()))?;
    *remaining -= len as u64 + 4;
    wire::decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Issue 11: the fuzz target's properties (fuzz/fuzz_targets/bundle_header.rs), in the
    // default test run.
    mod issue11_props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// A bundle file as `bundle_export` lays it out.
        fn envelope(json: &[u8], signature: &[u8], payload: &[u8]) -> Vec<u8> {
            let mut file = MAGIC.to_vec();
            file.push(FORMAT);
            file.extend_from_slice(&(json.len() as u32).to_be_bytes());
            file.extend_from_slice(json);
            file.extend_from_slice(&(signature.len() as u16).to_be_bytes());
            file.extend_from_slice(signature);
            file.extend_from_slice(payload);
            file
        }

        fn header() -> impl Strategy<Value = BundleHeader> {
            (
                ("\\PC{0,40}", "\\PC{0,40}", "\\PC{0,40}"),
                any::<(i64, u64, u64, u64, u64, u64)>(),
                (
                    "[0-9a-f]{64}",
                    "\\PC{0,300}",
                    proptest::option::of("\\PC{0,300}"),
                ),
            )
                .prop_map(
                    |(
                        (from_node, from_unit, for_unit),
                        (created_at_ms, since, upto, docs, scans, payload_bytes),
                        (payload_blake3, signer_cert_pem, crl_pem),
                    )| BundleHeader {
                        from_node,
                        from_unit,
                        for_unit,
                        created_at_ms,
                        since,
                        upto,
                        docs,
                        scans,
                        payload_bytes,
                        payload_blake3,
                        signer_cert_pem,
                        crl_pem,
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            /// What the exporter writes reads back as it was, leaving the file at its payload.
            #[test]
            fn issue11_written_headers_read_back(
                h in header(),
                signature in vec(any::<u8>(), 0..200),
                payload in vec(any::<u8>(), 0..50),
            ) {
                let json = serde_json::to_vec(&h).unwrap();
                let file = envelope(&json, &signature, &payload);
                let mut rest = &file[..];
                let read = read_header(&mut rest).unwrap();
                prop_assert_eq!(
                    serde_json::to_value(&read.header).unwrap(),
                    serde_json::to_value(&h).unwrap()
                );
                prop_assert_eq!(read.json, json);
                prop_assert_eq!(read.signature, signature);
                prop_assert_eq!(rest, &payload[..]);
            }

            /// Any bytes, alone or as a header in a well-formed envelope: never a panic, and
            /// nothing held past the header and signature bounds.
            #[test]
            fn issue11_any_bytes_are_read_within_the_bounds(
                bytes in vec(any::<u8>(), 0..400),
                header_len in any::<u32>(),
                signature_len in any::<u16>(),
            ) {
                let _ = read_header(&mut &bytes[..]);
                let _ = read_header(&mut &envelope(&bytes, &[], &[])[..]);
                let mut file = MAGIC.to_vec();
                file.push(FORMAT);
                file.extend_from_slice(&header_len.to_be_bytes());
                file.extend_from_slice(b"{}");
                file.extend_from_slice(&signature_len.to_be_bytes());
                file.extend_from_slice(&bytes);
                match read_header(&mut &file[..]) {
                    Ok(read) => {
                        prop_assert!(read.json.len() <= HEADER_BYTES_MAX as usize);
                    }
                    Err(what) if header_len > HEADER_BYTES_MAX => {
                        prop_assert_eq!(what, "oversized header")
                    }
                    Err(_) => {}
                }
            }
        }
    }
}
