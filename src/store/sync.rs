//! Sync state in SQLite: configured peers, per-peer feed checkpoints, change-feed queries by
//! scope, and scans in transit (manifests and verified chunks) so a cut transfer resumes.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::blobs::{Hash, ScanFile, CHUNK_BYTES};
use super::{Result, SqlContext, Store, StoreError, WriteTx};
use crate::units::{is_within, parent};

/// A configured peer (`peer add`).
#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub name: String,
    pub addr: String,
    /// The peer `serve` keeps syncing with (unless the config names another).
    pub upstream: bool,
}

/// Refusals kept per peer node and direction (see `WriteTx::refusal_record`).
pub const REFUSALS_KEPT_MAX: i64 = 10_000;

/// A refused document: (id, reason, when in ms).
pub type Refusal = (String, String, i64);

/// (unit, node id) a configured peer's certificate showed when last met.
pub type MetAs = (String, String);

/// What this node knows of one peer node, for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSync {
    pub node_id: String,
    pub unit: String,
    pub role: String,
    pub have_from: i64,
    pub acked_by: i64,
    pub peer_feed: i64,
    pub last_contact_at_ms: Option<i64>,
    pub last_sync_at_ms: Option<i64>,
    pub last_error: Option<String>,
    pub bytes_sent: i64,
    pub bytes_received: i64,
}

/// Which documents a peer may receive from this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every document this node holds (the peer is above it in the tree).
    All,
    /// Documents with a party at or below this unit.
    Subtree(String),
}

/// What a peer has not acknowledged yet, as far as this node knows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pending {
    pub docs: i64,
    /// Stored size of those documents plus the scans they reference that the peer does not
    /// hold (it sent them here).
    pub bytes: i64,
    /// When the oldest of them last changed here.
    pub oldest_change_at_ms: Option<i64>,
}

/// One changed document: feed position, id, heads, priority rank (dispatches; 0 otherwise).
pub type FeedRow = (i64, String, Vec<u8>, i64);

impl Store {
    pub fn peers(&self) -> Result<Vec<Peer>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, addr, upstream FROM peers ORDER BY name")
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Peer {
                    name: r.get(0)?,
                    addr: r.get(1)?,
                    upstream: r.get(2)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Each configured peer with the unit and node id its certificate showed when last met
    /// (None before first contact).
    pub fn peers_met(&self) -> Result<Vec<(Peer, Option<MetAs>)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT p.name, p.addr, p.upstream, s.unit, s.node_id FROM peers p
                 LEFT JOIN peer_sync s ON s.node_id = p.node_id ORDER BY p.name",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |r| {
                let peer = Peer {
                    name: r.get(0)?,
                    addr: r.get(1)?,
                    upstream: r.get(2)?,
                };
                let met = match (r.get::<_, Option<String>>(3)?, r.get(4)?) {
                    (Some(unit), Some(node)) => Some((unit, node)),
                    _ => None,
                };
                Ok((peer, met))
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    pub fn peer(&self, name: &str) -> Result<Peer> {
        self.conn
            .query_row(
                "SELECT name, addr, upstream FROM peers WHERE name = ?1",
                [name],
                |r| {
                    Ok(Peer {
                        name: r.get(0)?,
                        addr: r.get(1)?,
                        upstream: r.get(2)?,
                    })
                },
            )
            .optional()
            .at(&self.path)?
            .ok_or_else(|| {
                StoreError::NotFound(format!("peer {name:?} (see `communesync peer list`)"))
            })
    }

    pub fn peer_syncs(&self) -> Result<Vec<PeerSync>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT node_id, unit, role, have_from, acked_by, last_contact_at, last_sync_at, last_error, bytes_sent, bytes_received, peer_feed
                 FROM peer_sync ORDER BY unit, node_id",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PeerSync {
                    node_id: r.get(0)?,
                    unit: r.get(1)?,
                    role: r.get(2)?,
                    have_from: r.get(3)?,
                    acked_by: r.get(4)?,
                    last_contact_at_ms: r.get(5)?,
                    last_sync_at_ms: r.get(6)?,
                    last_error: r.get(7)?,
                    bytes_sent: r.get(8)?,
                    bytes_received: r.get(9)?,
                    peer_feed: r.get(10)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// The node last met under a peer name, with its unit.
    pub fn peer_node(&self, name: &str) -> Result<Option<(String, String)>> {
        self.conn
            .query_row(
                "SELECT p.node_id, s.unit FROM peers p JOIN peer_sync s ON s.node_id = p.node_id WHERE p.name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .at(&self.path)
    }

    /// The node of `unit` this node was in contact with most recently.
    pub fn peer_node_by_unit(&self, unit: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT node_id FROM peer_sync WHERE unit = ?1 ORDER BY last_contact_at DESC LIMIT 1",
                [unit],
                |r| r.get(0),
            )
            .optional()
            .at(&self.path)
    }

    /// The path MTU last found towards `ip` and when it was probed (ms), if any.
    pub fn path_mtu(&self, ip: &str) -> Result<Option<(u16, i64)>> {
        let row: Option<(i64, i64)> = self
            .conn
            .prepare_cached("SELECT mtu, probed_at FROM path_mtu WHERE ip = ?1")
            .at(&self.path)?
            .query_row([ip], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .at(&self.path)?;
        // A value QUIC cannot use is ignored (the path is probed again), never trusted.
        Ok(row.and_then(|(mtu, at)| Some((u16::try_from(mtu).ok().filter(|m| *m >= 1200)?, at))))
    }

    /// (have_from, acked_by) for a peer node; zeros for a node never seen.
    pub fn peer_checkpoints(&self, node_id: &str) -> Result<(i64, i64)> {
        Ok(self
            .conn
            .prepare_cached("SELECT have_from, acked_by FROM peer_sync WHERE node_id = ?1")
            .at(&self.path)?
            .query_row([node_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .at(&self.path)?
            .unwrap_or((0, 0)))
    }

    /// Where the documents of `scope` past a feed position are read from, as SQL over rows `d`
    /// of `docs` (parameters: ?1 the position, ?3 the unit), and the feed column to order by.
    /// A peer's own unit or any above it gets the whole feed (every document a node holds is in
    /// its own subtree); a unit below, its rows of the per-subtree feed; any other unit (not a
    /// tree edge) the whole feed filtered by party, which costs the whole feed.
    fn feed_rows(&self, scope: &Scope) -> (&'static str, &'static str, Option<String>) {
        let Scope::Subtree(unit) = scope else {
            return ("docs d WHERE d.seq > ?1", "d.seq", None);
        };
        let me = self.unit.as_deref();
        if parent(unit).is_none() || me.is_some_and(|me| is_within(me, unit)) {
            ("docs d WHERE d.seq > ?1", "d.seq", None)
        } else if me.is_none_or(|me| is_within(unit, me)) {
            (
                "doc_scopes s JOIN docs d ON d.id = s.doc_id WHERE s.unit = ?3 AND s.seq > ?1",
                "s.seq",
                Some(unit.clone()),
            )
        } else {
            (
                "docs d WHERE d.seq > ?1 AND EXISTS (SELECT 1 FROM doc_parties p WHERE p.doc_id = d.id AND (p.unit = ?3 OR p.unit LIKE ?3 || '/%'))",
                "d.seq",
                Some(unit.clone()),
            )
        }
    }

    /// Documents in `scope` whose feed position is after `after`, in feed order.
    /// `skip_origin` leaves out documents whose current state came whole from that peer node.
    pub fn changed_since(
        &self,
        scope: &Scope,
        skip_origin: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<FeedRow>> {
        let (rows, seq, unit) = self.feed_rows(scope);
        let sql = format!(
            "SELECT {seq}, d.id, d.heads, COALESCE((SELECT x.priority_rank FROM dispatches x WHERE x.id = d.id), 0)
             FROM {rows} AND d.origin IS NOT ?2 ORDER BY {seq} LIMIT ?4"
        );
        let mut stmt = self.conn.prepare_cached(&sql).at(&self.path)?;
        let rows = stmt
            .query_map(
                params![after, skip_origin.unwrap_or(""), unit, limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Documents in `scope` after `after` (skipping those that came whole from `skip_origin`),
    /// with their bytes and those of their scans, except scans `skip_origin` delivered here
    /// (it holds them).
    pub fn pending(&self, scope: &Scope, skip_origin: &str, after: i64) -> Result<Pending> {
        let (rows, _, unit) = self.feed_rows(scope);
        let sql = format!(
            "WITH pend AS (SELECT d.id, length(d.snapshot) + d.chunk_bytes AS bytes, d.updated_at FROM {rows}
                           AND d.origin IS NOT ?2)
             SELECT (SELECT COUNT(*) FROM pend), (SELECT COALESCE(SUM(bytes), 0) FROM pend)
                    + (SELECT COALESCE(SUM(b.size), 0) FROM blobs b WHERE b.hash IN
                         (SELECT db.hash FROM doc_blobs db WHERE db.doc_id IN (SELECT id FROM pend))
                       AND NOT EXISTS (SELECT 1 FROM blob_sources s WHERE s.hash = b.hash AND s.node_id = ?2)),
                    (SELECT MIN(updated_at) FROM pend)"
        );
        let mut stmt = self.conn.prepare_cached(&sql).at(&self.path)?;
        let read = |r: &rusqlite::Row<'_>| {
            Ok(Pending {
                docs: r.get(0)?,
                bytes: r.get(1)?,
                oldest_change_at_ms: r.get(2)?,
            })
        };
        match unit {
            Some(unit) => stmt.query_row(params![after, skip_origin, unit], read),
            None => stmt.query_row(params![after, skip_origin], read),
        }
        .at(&self.path)
    }

    /// Stored heads of a document, without loading it.
    pub fn doc_heads(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT heads FROM docs WHERE id = ?1")
            .at(&self.path)?
            .query_row([id], |r| r.get(0))
            .optional()
            .at(&self.path)
    }

    /// Scans referenced by held documents but not stored here: most urgent first, then smallest,
    /// each with the first chunk still missing.
    /// Scans wanted here, most urgent first, then smallest, with the chunks already held;
    /// only those attached to a document with a party at or below `within` when given (what
    /// a peer of that subtree could hold: it is asked for nothing else).
    pub fn missing_blobs(&self, limit: usize, within: Option<&str>) -> Result<Vec<(Hash, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT w.hash, 0, 0, (SELECT COUNT(*) FROM blob_chunks c WHERE c.hash = w.hash)
                 FROM blob_wants w
                 WHERE ?2 IS NULL OR EXISTS (SELECT 1 FROM doc_blobs db JOIN doc_parties p ON p.doc_id = db.doc_id
                     WHERE db.hash = w.hash AND (p.unit = ?2 OR p.unit LIKE ?2 || '/%'))
                 ORDER BY w.rank DESC, w.size ASC LIMIT ?1",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map(params![limit as i64, within], |r| {
                let hash: Vec<u8> = r.get(0)?;
                Ok((hash, r.get::<_, i64>(3)?))
            })
            .at(&self.path)?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, have) = row.at(&self.path)?;
            let hash: Hash = hash.try_into().map_err(|_| {
                StoreError::Corrupt("doc_blobs holds a hash that is not 32 bytes".into())
            })?;
            out.push((hash, have as u64));
        }
        Ok(out)
    }

    /// Scans a document references.
    pub fn doc_blob_hashes(&self, id: &crate::model::DocId) -> Result<Vec<Hash>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT hash FROM doc_blobs WHERE doc_id = ?1")
            .at(&self.path)?;
        let rows = stmt
            .query_map([id.as_str()], |r| r.get::<_, Vec<u8>>(0))
            .at(&self.path)?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row.at(&self.path)?.try_into().map_err(|_| {
                StoreError::Corrupt("doc_blobs holds a hash that is not 32 bytes".into())
            })?);
        }
        Ok(out)
    }

    /// Whether a peer of subtree `unit` (node `node_id`) may read a scan: a document with a
    /// party in that subtree attaches it and was issued outside the subtree (someone else
    /// wrote the reference: a peer's own reference to a hash proves nothing), or a node of
    /// that subtree delivered the scan here (the subtree had its bytes: a node enrolled anew
    /// after a dead disk gets back the scans its predecessor sent).
    pub fn blob_readable_by(&self, hash: &Hash, unit: &str, node_id: &str) -> Result<bool> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM doc_blobs db JOIN dispatches ds ON ds.id = db.doc_id
                 WHERE db.hash = ?1 AND NOT (ds.issuer = ?2 OR ds.issuer LIKE ?2 || '/%')
                   AND EXISTS (SELECT 1 FROM doc_parties p WHERE p.doc_id = db.doc_id AND (p.unit = ?2 OR p.unit LIKE ?2 || '/%'))
                 UNION ALL SELECT 1 FROM blob_sources bs WHERE bs.hash = ?1 AND (bs.node_id = ?3
                   OR EXISTS (SELECT 1 FROM peer_sync ps WHERE ps.node_id = bs.node_id AND (ps.unit = ?2 OR ps.unit LIKE ?2 || '/%')))
                 LIMIT 1",
            )
            .at(&self.path)?
            .query_row(params![&hash[..], unit, node_id], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(&self.path)
    }

    /// Whether a dispatch issued strictly below `unit` attaches the scan: a relay there may
    /// rightly wait for it (it is on its way up from that unit) before it may read it. A
    /// dispatch of `unit`'s own does not count, or a peer could learn whether this node holds
    /// any hash by naming it in a document of its own.
    pub fn blob_attached_below(&self, hash: &Hash, unit: &str) -> Result<bool> {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM doc_blobs db JOIN dispatches ds ON ds.id = db.doc_id
                 WHERE db.hash = ?1 AND ds.issuer LIKE ?2 || '/%' LIMIT 1",
            )
            .at(&self.path)?
            .query_row(params![&hash[..], unit], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(&self.path)
    }

    /// How urgent a scan is: the highest priority rank of the dispatches that attach it.
    pub fn blob_rank(&self, hash: &Hash) -> Result<i64> {
        self.conn
            .prepare_cached("SELECT COALESCE(MAX(priority_rank), 0) FROM doc_blobs WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |r| r.get(0))
            .at(&self.path)
    }

    /// Whether a scan is referenced by a held document and not stored yet.
    pub fn blob_wanted(&self, hash: &Hash) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM blob_wants WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(&self.path)
    }

    /// Documents refused between this node and a peer node, as (document, reason, when),
    /// newest first, at most `limit`, and how many in all: those this node refused from it,
    /// or (`by_peer`) those of ours it still refuses, that is whose refusal is newer than the
    /// document's last change here (a changed document is offered and judged again).
    pub fn refusals(
        &self,
        peer_node: &str,
        by_peer: bool,
        limit: usize,
    ) -> Result<(Vec<Refusal>, i64)> {
        const STANDING: &str = "FROM refused_docs r LEFT JOIN docs d ON d.id = r.doc_id
             WHERE r.peer_node = ?1 AND r.by_peer = ?2 AND (?2 = 0 OR r.at_ms >= COALESCE(d.updated_at, 0))";
        let total = self
            .conn
            .prepare_cached(&format!("SELECT COUNT(*) {STANDING}"))
            .at(&self.path)?
            .query_row(params![peer_node, by_peer], |r| r.get(0))
            .at(&self.path)?;
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT r.doc_id, r.reason, r.at_ms {STANDING} ORDER BY r.at_ms DESC LIMIT ?3"
            ))
            .at(&self.path)?;
        let rows = stmt
            .query_map(params![peer_node, by_peer, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .at(&self.path)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .at(&self.path)?;
        Ok((rows, total))
    }

    /// Whether a transfer of this scan into this node has begun or stored chunks within the last
    /// `recent_ms`: a relay waits for such a scan instead of answering that it lacks it.
    pub fn blob_arriving(&self, hash: &Hash, now_ms: i64, recent_ms: i64) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT updated_at FROM blob_partial WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |r| r.get::<_, i64>(0))
            .optional()
            .map(|at| at.is_some_and(|at| now_ms - at <= recent_ms))
            .at(&self.path)
    }

    /// Bytes still to fetch for missing scans (for `status`).
    pub fn missing_blob_bytes(&self) -> Result<(i64, i64)> {
        self.conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blob_wants",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .at(&self.path)
    }

    /// A stored blob's manifest: size and the hash of every chunk.
    pub fn blob_manifest(&self, hash: &Hash) -> Result<Option<(u64, Vec<Hash>)>> {
        let Some(size) = self
            .conn
            .prepare_cached("SELECT size FROM blobs WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |r| r.get::<_, i64>(0))
            .optional()
            .at(&self.path)?
        else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT chunk_hash FROM blob_chunks WHERE hash = ?1 ORDER BY idx")
            .at(&self.path)?;
        let rows = stmt
            .query_map([&hash[..]], |r| r.get::<_, Vec<u8>>(0))
            .at(&self.path)?;
        let mut hashes = Vec::new();
        for row in rows {
            hashes.push(
                row.at(&self.path)?
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("chunk hash is not 32 bytes".into()))?,
            );
        }
        Ok(Some((size as u64, hashes)))
    }

    /// The size and manifest of a scan still arriving here (see `Store::blob_arriving`).
    pub fn blob_partial_manifest(&self, hash: &Hash) -> Result<Option<(u64, Vec<Hash>)>> {
        let row: Option<(i64, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT size, manifest FROM blob_partial WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .at(&self.path)?;
        let Some((size, manifest)) = row else {
            return Ok(None);
        };
        let hashes = manifest
            .chunks_exact(32)
            .map(|c| c.try_into().expect("chunks_exact(32)"))
            .collect();
        Ok(Some((size as u64, hashes)))
    }

    /// One stored chunk, verified against its hash before it leaves this node.
    pub fn blob_chunk(&self, hash: &Hash, idx: u64) -> Result<Vec<u8>> {
        let (chunk_hash, len): (Vec<u8>, i64) = self
            .conn
            .prepare_cached("SELECT chunk_hash, len FROM blob_chunks WHERE hash = ?1 AND idx = ?2")
            .at(&self.path)?
            .query_row(params![&hash[..], idx as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .at(&self.path)?
            .ok_or_else(|| {
                StoreError::NotFound(format!("chunk {idx} of scan {}", hex::encode(hash)))
            })?;
        if !(0..=CHUNK_BYTES as i64).contains(&len) {
            return Err(StoreError::Corrupt(format!(
                "chunk {idx} of scan {} has a length of {len}",
                hex::encode(hash)
            )));
        }
        super::blobs::read_stored_chunk(
            &self.scans,
            &self.path,
            hash,
            idx,
            len as usize,
            &chunk_hash,
        )
    }

    /// The file that chunks of a scan in transit are written to before their rows commit.
    pub fn blob_partial_file(&self, hash: &Hash) -> Result<ScanFile> {
        ScanFile::open(&self.scans, &self.path, hash)
    }
}

impl WriteTx<'_> {
    pub fn peer_add(&self, name: &str, addr: &str, upstream: bool, at_ms: i64) -> Result<()> {
        if upstream {
            self.tx
                .execute("UPDATE peers SET upstream = 0", [])
                .at(self.path)?;
        }
        let n = self
            .tx
            .execute(
                "INSERT OR IGNORE INTO peers (name, addr, added_at, upstream) VALUES (?1, ?2, ?3, ?4)",
                params![name, addr, at_ms, upstream],
            )
            .at(self.path)?;
        if n == 0 {
            return Err(StoreError::Invalid(format!(
                "peer {name:?} already exists; remove it first to change its address"
            )));
        }
        Ok(())
    }

    pub fn peer_remove(&self, name: &str) -> Result<()> {
        if self
            .tx
            .execute("DELETE FROM peers WHERE name = ?1", [name])
            .at(self.path)?
            == 0
        {
            return Err(StoreError::NotFound(format!("peer {name:?}")));
        }
        Ok(())
    }

    /// Records contact with a peer node (creating its row), its checkpoints and traffic.
    pub fn peer_touch(&self, node_id: &str, unit: &str, role: &str, at_ms: i64) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO peer_sync (node_id, unit, role, last_contact_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(node_id) DO UPDATE SET unit = excluded.unit, role = excluded.role, last_contact_at = excluded.last_contact_at",
                params![node_id, unit, role, at_ms],
            )
            .at(self.path)?;
        Ok(())
    }

    /// Records that peer node `node_id` delivered scan `hash` (see `Store::blob_readable_by`).
    pub fn blob_source(&self, hash: &Hash, node_id: &str) -> Result<()> {
        self.tx
            .prepare_cached("INSERT OR IGNORE INTO blob_sources (hash, node_id) VALUES (?1, ?2)")
            .at(self.path)?
            .execute(params![&hash[..], node_id])
            .at(self.path)?;
        Ok(())
    }

    /// Records that a document was refused, and why: sent by the peer node and refused here,
    /// or (`by_peer`) ours and refused by it. The latest refusal per document is kept, and at
    /// most [`REFUSALS_KEPT_MAX`] per peer and direction (a hostile peer could otherwise fill
    /// the disk with refusals of made-up documents); more are only logged.
    pub fn refusal_record(
        &self,
        peer_node: &str,
        doc_id: &str,
        by_peer: bool,
        reason: &str,
        at_ms: i64,
    ) -> Result<()> {
        let held: i64 = self
            .tx
            .prepare_cached(
                "SELECT COUNT(*) FROM refused_docs WHERE peer_node = ?1 AND by_peer = ?2",
            )
            .at(self.path)?
            .query_row(params![peer_node, by_peer], |r| r.get(0))
            .at(self.path)?;
        if held >= REFUSALS_KEPT_MAX {
            return Ok(());
        }
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO refused_docs (peer_node, doc_id, by_peer, reason, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .at(self.path)?
            .execute(params![peer_node, doc_id, by_peer, reason, at_ms])
            .at(self.path)?;
        Ok(())
    }

    /// Remembers which node answered at a named peer's address.
    pub fn peer_bind(&self, name: &str, node_id: &str) -> Result<()> {
        self.tx
            .execute(
                "UPDATE peers SET node_id = ?2 WHERE name = ?1",
                [name, node_id],
            )
            .at(self.path)?;
        Ok(())
    }

    pub fn set_path_mtu(&self, ip: &str, mtu: u16, probed_at: i64) -> Result<()> {
        self.tx
            .execute(
                "INSERT OR REPLACE INTO path_mtu (ip, mtu, probed_at) VALUES (?1, ?2, ?3)",
                params![ip, mtu, probed_at],
            )
            .at(self.path)?;
        Ok(())
    }

    pub fn forget_path_mtu(&self, ip: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM path_mtu WHERE ip = ?1", [ip])
            .at(self.path)?;
        Ok(())
    }

    pub fn set_have_from(&self, node_id: &str, upto: i64) -> Result<()> {
        self.tx
            .execute(
                "UPDATE peer_sync SET have_from = ?2 WHERE node_id = ?1",
                params![node_id, upto],
            )
            .at(self.path)?;
        Ok(())
    }

    /// A peer lost part of this node's feed: lower its checkpoint and clear the marks saying it
    /// holds documents whole, so everything since `have` is offered again.
    pub fn peer_regressed(&self, node_id: &str, have: i64) -> Result<()> {
        self.set_acked_by(node_id, have)?;
        self.tx
            .execute("UPDATE docs SET origin = NULL WHERE origin = ?1", [node_id])
            .at(self.path)?;
        Ok(())
    }

    /// Records the epoch a peer node's Hello carried; true when a different one was recorded
    /// before (the peer's database was restored from a backup since).
    pub fn set_peer_epoch(&self, node_id: &str, epoch: &str) -> Result<bool> {
        let before: Option<String> = self
            .tx
            .query_row(
                "SELECT epoch FROM peer_sync WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()
            .at(self.path)?
            .flatten();
        self.tx
            .execute(
                "UPDATE peer_sync SET epoch = ?2 WHERE node_id = ?1",
                params![node_id, epoch],
            )
            .at(self.path)?;
        Ok(before.is_some_and(|b| b != epoch))
    }

    pub fn set_peer_feed(&self, node_id: &str, seq: i64) -> Result<()> {
        self.tx
            .execute(
                "UPDATE peer_sync SET peer_feed = ?2 WHERE node_id = ?1",
                params![node_id, seq],
            )
            .at(self.path)?;
        Ok(())
    }

    pub fn set_acked_by(&self, node_id: &str, upto: i64) -> Result<()> {
        self.tx
            .execute(
                "UPDATE peer_sync SET acked_by = ?2 WHERE node_id = ?1",
                params![node_id, upto],
            )
            .at(self.path)?;
        Ok(())
    }

    pub fn peer_session_end(
        &self,
        node_id: &str,
        at_ms: i64,
        ok: bool,
        error: Option<&str>,
        sent: u64,
        received: u64,
    ) -> Result<()> {
        self.tx
            .execute(
                "UPDATE peer_sync SET last_sync_at = CASE WHEN ?3 THEN ?2 ELSE last_sync_at END, last_error = ?4,
                   bytes_sent = bytes_sent + ?5, bytes_received = bytes_received + ?6 WHERE node_id = ?1",
                params![node_id, at_ms, ok, error, sent as i64, received as i64],
            )
            .at(self.path)?;
        Ok(())
    }

    /// Starts (or resumes) receiving a scan: keeps verified chunks when the manifest is the same.
    pub fn blob_partial_begin(
        &self,
        hash: &Hash,
        size: u64,
        manifest: &[Hash],
        at_ms: i64,
    ) -> Result<u64> {
        let manifest_bytes: Vec<u8> = manifest.iter().flatten().copied().collect();
        let existing: Option<Vec<u8>> = self
            .tx
            .query_row(
                "SELECT manifest FROM blob_partial WHERE hash = ?1",
                [&hash[..]],
                |r| r.get(0),
            )
            .optional()
            .at(self.path)?;
        if existing.as_deref() != Some(&manifest_bytes[..]) {
            self.tx
                .execute("DELETE FROM blob_chunks WHERE hash = ?1", [&hash[..]])
                .at(self.path)?;
            self.tx
                .execute(
                    "INSERT OR REPLACE INTO blob_partial (hash, size, chunk_bytes, manifest, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![&hash[..], size as i64, CHUNK_BYTES as i64, manifest_bytes, at_ms],
                )
                .at(self.path)?;
        } else {
            self.blob_partial_touch(hash, at_ms)?;
        }
        self.tx
            .query_row(
                "SELECT COUNT(*) FROM blob_chunks WHERE hash = ?1",
                [&hash[..]],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .at(self.path)
    }

    /// Records chunks of a scan in transit, each verified against `manifest` and already made
    /// durable in the scan's file (`Store::blob_partial_file`), as `(idx, len)`. Refuses if the
    /// transfer was restarted meanwhile with another manifest, so its chunks are not mixed in.
    pub fn blob_partial_chunks(
        &self,
        hash: &Hash,
        manifest: &[Hash],
        chunks: &[(u64, usize)],
        at_ms: i64,
    ) -> Result<()> {
        let stored: Option<Vec<u8>> = self
            .tx
            .prepare_cached("SELECT manifest FROM blob_partial WHERE hash = ?1")
            .at(self.path)?
            .query_row([&hash[..]], |r| r.get(0))
            .optional()
            .at(self.path)?;
        if stored.as_deref() != Some(&manifest.concat()[..]) {
            return Err(StoreError::Invalid(format!(
                "scan {} is no longer in transit with this manifest",
                hex::encode(hash)
            )));
        }
        let mut insert = self
            .tx
            .prepare_cached("INSERT OR REPLACE INTO blob_chunks (hash, idx, chunk_hash, len) VALUES (?1, ?2, ?3, ?4)")
            .at(self.path)?;
        for &(idx, len) in chunks {
            let chunk_hash = manifest.get(idx as usize).ok_or_else(|| {
                StoreError::Invalid(format!("chunk {idx} is past the end of the manifest"))
            })?;
            insert
                .execute(params![&hash[..], idx as i64, &chunk_hash[..], len as i64])
                .at(self.path)?;
        }
        self.blob_partial_touch(hash, at_ms)
    }

    /// Notes that a transfer in progress moved (see `Store::blob_arriving`).
    fn blob_partial_touch(&self, hash: &Hash, at_ms: i64) -> Result<()> {
        self.tx
            .prepare_cached("UPDATE blob_partial SET updated_at = ?2 WHERE hash = ?1")
            .at(self.path)?
            .execute(params![&hash[..], at_ms])
            .at(self.path)?;
        Ok(())
    }

    /// Checks the whole content against its hash and makes the scan available (true); on
    /// mismatch discards the chunks and the manifest (the manifest lied) and returns false, so
    /// the discarding commits and the next transfer starts afresh. `streamed` describes a receiver that
    /// verified and stored every chunk itself, in order: the manifest it checked them against,
    /// and the BLAKE3 and size of what it stored. The stored chunks are then taken as that
    /// content if the stored manifest is still the same and no chunk is missing; otherwise (or
    /// without `streamed`) they are read back and hashed.
    pub fn blob_partial_finish(
        &self,
        hash: &Hash,
        streamed: Option<(&[Hash], Hash, u64)>,
        at_ms: i64,
    ) -> Result<bool> {
        let (size, manifest): (i64, Vec<u8>) = self
            .tx
            .query_row(
                "SELECT size, manifest FROM blob_partial WHERE hash = ?1",
                [&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .at(self.path)?;
        let chunks = (manifest.len() / 32) as i64;
        let streamed = match streamed {
            Some((checked, content, total)) if checked.concat() == manifest => {
                // The key is (hash, idx) and every idx is below `chunks`: a full count means
                // none is missing, and each was verified against this same manifest.
                let held: i64 = self
                    .tx
                    .prepare_cached("SELECT COUNT(*) FROM blob_chunks WHERE hash = ?1")
                    .at(self.path)?
                    .query_row([&hash[..]], |r| r.get(0))
                    .at(self.path)?;
                (held == chunks).then_some((content, total as i64))
            }
            _ => None,
        };
        let (content, total) = match streamed {
            Some(known) => known,
            None => self.blob_partial_read_back(hash)?,
        };
        if total != size || &content != hash {
            self.tx
                .execute("DELETE FROM blob_chunks WHERE hash = ?1", [&hash[..]])
                .at(self.path)?;
            self.tx
                .execute("DELETE FROM blob_partial WHERE hash = ?1", [&hash[..]])
                .at(self.path)?;
            return Ok(false);
        }
        self.tx
            .execute("DELETE FROM blob_wants WHERE hash = ?1", [&hash[..]])
            .at(self.path)?;
        self.tx
            .execute(
                "INSERT OR IGNORE INTO blobs (hash, size, chunk_bytes, chunks, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&hash[..], size, CHUNK_BYTES as i64, chunks, at_ms],
            )
            .at(self.path)?;
        self.tx
            .execute("DELETE FROM blob_partial WHERE hash = ?1", [&hash[..]])
            .at(self.path)?;
        Ok(true)
    }

    /// BLAKE3 and size of the leading run of stored chunks of a scan in transit, read back from
    /// its file and each checked against its hash.
    fn blob_partial_read_back(&self, hash: &Hash) -> Result<(Hash, i64)> {
        let rows = super::blobs::chunk_rows(&self.tx, self.path, hash)?;
        let mut whole = blake3::Hasher::new();
        let mut total = 0i64;
        for (expected, (idx, chunk_hash, len)) in rows.into_iter().enumerate() {
            if idx != expected as i64 || !(0..=CHUNK_BYTES as i64).contains(&len) {
                break;
            }
            let data = match super::blobs::read_stored_chunk(
                self.scans,
                self.path,
                hash,
                idx as u64,
                len as usize,
                &chunk_hash,
            ) {
                Ok(data) => data,
                // A bucket that does not answer says nothing of the chunks: their rows stay,
                // and the transfer resumes once it answers.
                Err(e @ StoreError::ObjectStore { .. }) => return Err(e),
                Err(_) => break,
            };
            total += data.len() as i64;
            whole.update(&data);
        }
        Ok((*whole.finalize().as_bytes(), total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dispatch;
    use crate::store::testutil::{actor, author, new_dispatch_to};

    const A: &str = "qn/binhlieu/tinhhuc";
    const B: &str = "qn/binhlieu/hucdong";

    fn offered(store: &Store, scope: &Scope, after: i64) -> Vec<String> {
        let rows = store.changed_since(scope, None, after, 100).unwrap();
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "feed order");
        rows.into_iter().map(|(_, id, _, _)| id).collect()
    }

    fn subtree(unit: &str) -> Scope {
        Scope::Subtree(unit.into())
    }

    #[test]
    fn a_scan_that_does_not_match_its_hash_is_discarded_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        // A peer's manifest whose one chunk verifies, but whose content is not the scan claimed.
        let claimed = [9u8; 32];
        let chunk = b"not the scan".to_vec();
        let manifest = [*blake3::hash(&chunk).as_bytes()];
        let have = store
            .write(|tx| tx.blob_partial_begin(&claimed, chunk.len() as u64, &manifest, 1))
            .unwrap();
        assert_eq!(have, 0);
        let mut file = store.blob_partial_file(&claimed).unwrap();
        file.write(0, &chunk).unwrap();
        file.sync().unwrap();
        store
            .write(|tx| tx.blob_partial_chunks(&claimed, &manifest, &[(0, chunk.len())], 1))
            .unwrap();
        let stored = store
            .write(|tx| tx.blob_partial_finish(&claimed, None, 2))
            .unwrap();
        assert!(!stored, "a mismatching scan is not stored");
        assert!(!store.has_blob(&claimed).unwrap());
        // The discarding committed: the next transfer starts from the first chunk.
        let have = store
            .write(|tx| tx.blob_partial_begin(&claimed, chunk.len() as u64, &manifest, 3))
            .unwrap();
        assert_eq!(have, 0);
        let held: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM blob_chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(held, 0, "no chunk of the lying transfer is kept");
    }

    #[test]
    fn a_subtree_is_offered_its_own_documents_in_feed_order_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = Store::create(&path, 16).unwrap();
        let to_a = new_dispatch_to(&mut store, "1/UBND", "a".into(), &[A]);
        let to_b = new_dispatch_to(&mut store, "2/UBND", "b".into(), &[B]);
        let to_both = new_dispatch_to(&mut store, "3/UBND", "ab".into(), &[A, B]);
        let elsewhere = new_dispatch_to(&mut store, "4/UBND", "c".into(), &["qn/campha/xa01"]);
        let ids = |docs: &[&crate::model::DocId]| -> Vec<String> {
            docs.iter().map(|d| d.to_string()).collect()
        };
        assert_eq!(offered(&store, &subtree(A), 0), ids(&[&to_a, &to_both]));
        assert_eq!(
            offered(&store, &subtree("qn/binhlieu"), 0),
            ids(&[&to_a, &to_b, &to_both])
        );
        let everything = ids(&[&to_a, &to_b, &to_both, &elsewhere]);
        assert_eq!(offered(&store, &subtree("qn"), 0), everything);
        assert_eq!(offered(&store, &Scope::All, 0), everything);

        // A change moves the document to the feed's end, under every unit, without a stale row.
        let before = store.feed_seq().unwrap();
        store
            .write(|tx| {
                tx.update_doc(&to_a, &actor(), 2, |doc| {
                    Ok(dispatch::add_comment(doc, &to_a, "seen", &author(), 2)?)
                })
            })
            .unwrap();
        assert_eq!(offered(&store, &subtree(A), 0), ids(&[&to_both, &to_a]));
        assert_eq!(offered(&store, &subtree(A), before), ids(&[&to_a]));
        assert_eq!(offered(&store, &subtree(B), before), Vec::<String>::new());
        let pending = store.pending(&subtree("qn/binhlieu"), "", before).unwrap();
        assert_eq!(pending.docs, 1);
        assert_eq!(store.pending(&subtree(B), "", 0).unwrap().docs, 2);

        // A database from before the per-subtree feed is migrated to the same answers.
        drop(store);
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE doc_scopes; DROP TABLE refused_docs; DROP TABLE blob_sources; DROP TABLE receipts; ALTER TABLE peer_sync DROP COLUMN epoch; DROP TABLE change_sigs; DROP TABLE node_certs; DELETE FROM meta WHERE key = 'sign_own_changes'; PRAGMA user_version = 5;",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path, 16).unwrap();
        assert_eq!(offered(&store, &subtree(A), 0), ids(&[&to_both, &to_a]));
        assert_eq!(
            offered(&store, &subtree("qn/binhlieu"), 0),
            ids(&[&to_b, &to_both, &to_a])
        );

        // On the district's node only its communes need their own feed; its own unit and the
        // units above read the whole feed, and a unit elsewhere is filtered by party.
        drop(store);
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "INSERT INTO meta (key, value) VALUES ('unit', 'qn/binhlieu');
             DROP TABLE doc_scopes; DROP TABLE refused_docs; DROP TABLE blob_sources; DROP TABLE receipts; ALTER TABLE peer_sync DROP COLUMN epoch;
             DROP TABLE change_sigs; DROP TABLE node_certs; DELETE FROM meta WHERE key = 'sign_own_changes'; PRAGMA user_version = 5;",
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path, 16).unwrap();
        let units: Vec<String> = store
            .conn()
            .prepare("SELECT DISTINCT unit FROM doc_scopes ORDER BY unit")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(units, [B, A]);
        let everything = ids(&[&to_b, &to_both, &elsewhere, &to_a]);
        assert_eq!(offered(&store, &subtree("qn/binhlieu"), 0), everything);
        assert_eq!(offered(&store, &subtree("qn"), 0), everything);
        assert_eq!(offered(&store, &subtree(A), 0), ids(&[&to_both, &to_a]));
        assert_eq!(
            offered(&store, &subtree("qn/campha"), 0),
            ids(&[&elsewhere])
        );
        assert_eq!(store.pending(&subtree("qn/campha"), "", 0).unwrap().docs, 1);
        assert_eq!(store.pending(&subtree(B), "", 0).unwrap().docs, 2);
        assert_eq!(store.pending(&Scope::All, "", 0).unwrap().docs, 4);
    }
}
