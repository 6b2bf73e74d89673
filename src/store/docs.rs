//! Automerge documents in SQLite: a snapshot plus incremental change chunks, compacted as they
//! grow, a change-feed sequence per write, and a bounded cache of loaded documents.

use std::num::NonZeroUsize;

use automerge::{ActorId, AutoCommit, ChangeHash};
use lru::LruCache;
use rusqlite::{params, OptionalExtension};

use super::{index, Result, SqlContext, Store, StoreError, WriteTx};
use crate::model::{DocId, DocView};

/// Compact into a new snapshot once this many incremental chunks pile up.
const CHUNKS_BEFORE_COMPACT_MAX: i64 = 32;

/// A loaded document and the heads it was loaded at.
#[derive(Clone)]
pub struct DocRecord {
    pub doc: AutoCommit,
    pub heads: Vec<ChangeHash>,
}

/// Least-recently-used cache of loaded documents, so a busy relay does not reparse hot documents
/// and a province never holds more than `capacity` of its millions in memory.
pub struct DocCache {
    entries: LruCache<DocId, DocRecord>,
}

impl DocCache {
    pub fn new(capacity: usize) -> Self {
        DocCache {
            entries: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("max(1) is non-zero")),
        }
    }

    /// The cached copy, only if it is at the heads the database holds now.
    fn get(&mut self, id: &DocId, heads: &[ChangeHash]) -> Option<DocRecord> {
        match self.entries.get(id) {
            Some(rec) if rec.heads == heads => Some(rec.clone()),
            _ => None,
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.entries.cap().get()
    }

    pub(super) fn commit(&mut self, touched: impl IntoIterator<Item = (DocId, DocRecord)>) {
        for (id, rec) in touched {
            self.entries.put(id, rec);
        }
    }
}

pub(crate) fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    let mut sorted = heads.to_vec();
    sorted.sort();
    sorted.iter().flat_map(|h| h.0).collect()
}

pub(crate) fn decode_heads(bytes: &[u8]) -> Result<Vec<ChangeHash>> {
    if !bytes.len().is_multiple_of(32) {
        return Err(StoreError::Corrupt(
            "document heads column has a partial hash".into(),
        ));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| ChangeHash(c.try_into().expect("chunks_exact(32) yields 32 bytes")))
        .collect())
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort();
    heads
}

/// Loads a document from its snapshot and chunks, or from the cache when it is current.
fn load(
    conn: &rusqlite::Connection,
    path: &std::path::Path,
    cache: &mut DocCache,
    id: &DocId,
) -> Result<Option<DocRecord>> {
    let row: Option<(Vec<u8>, Vec<u8>)> = conn
        .prepare_cached("SELECT heads, snapshot FROM docs WHERE id = ?1")
        .at(path)?
        .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .at(path)?;
    let Some((heads_bytes, snapshot)) = row else {
        return Ok(None);
    };
    let heads = decode_heads(&heads_bytes)?;
    if let Some(rec) = cache.get(id, &heads) {
        return Ok(Some(rec));
    }
    let corrupt = |e: automerge::AutomergeError| {
        StoreError::Corrupt(format!("document {id} does not load: {e}"))
    };
    let mut doc = AutoCommit::load(&snapshot).map_err(corrupt)?;
    let mut stmt = conn
        .prepare_cached("SELECT data FROM doc_chunks WHERE doc_id = ?1 ORDER BY n")
        .at(path)?;
    let chunks = stmt
        .query_map([id.as_str()], |r| r.get::<_, Vec<u8>>(0))
        .at(path)?;
    for chunk in chunks {
        doc.load_incremental(&chunk.at(path)?).map_err(corrupt)?;
    }
    if sorted(doc.get_heads()) != heads {
        return Err(StoreError::Corrupt(format!(
            "document {id} does not reach its recorded heads"
        )));
    }
    Ok(Some(DocRecord { doc, heads }))
}

impl Store {
    /// Reads a document; `f` gets it mutably only because some Automerge reads need `&mut`.
    pub fn read_doc<T>(&mut self, id: &DocId, f: impl FnOnce(&mut AutoCommit) -> T) -> Result<T> {
        let mut rec = load(&self.conn, &self.path, &mut self.cache, id)?
            .ok_or_else(|| StoreError::NotFound(format!("{} {id}", id.kind())))?;
        let value = f(&mut rec.doc);
        self.cache.entries.put(id.clone(), rec);
        Ok(value)
    }

    /// A stored document as bytes that `AutoCommit::load` reads (its snapshot, then its chunks),
    /// with its sorted heads, without parsing it: what a peer that lacks the document needs.
    /// None when the document is not stored, or when its chunks would add more than a quarter
    /// to the snapshot (then a fresh `save()` is worth its cost on the wire).
    pub fn doc_load_bytes(&self, id: &DocId) -> Result<Option<(Vec<ChangeHash>, Vec<u8>)>> {
        let row: Option<(Vec<u8>, Vec<u8>, i64, i64)> = self
            .conn
            .prepare_cached("SELECT heads, snapshot, chunks, chunk_bytes FROM docs WHERE id = ?1")
            .at(&self.path)?
            .query_row([id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .at(&self.path)?;
        let Some((heads, mut bytes, chunks, chunk_bytes)) = row else {
            return Ok(None);
        };
        if chunks > 0 {
            if chunk_bytes * 4 > bytes.len() as i64 {
                return Ok(None);
            }
            let mut stmt = self
                .conn
                .prepare_cached("SELECT data FROM doc_chunks WHERE doc_id = ?1 ORDER BY n")
                .at(&self.path)?;
            let mut rows = stmt.query([id.as_str()]).at(&self.path)?;
            while let Some(row) = rows.next().at(&self.path)? {
                let chunk = row.get_ref(0).at(&self.path)?;
                bytes.extend_from_slice(
                    chunk
                        .as_blob()
                        .map_err(rusqlite::Error::from)
                        .at(&self.path)?,
                );
            }
        }
        Ok(Some((decode_heads(&heads)?, bytes)))
    }

    pub fn doc_exists(&self, id: &DocId) -> Result<bool> {
        exists(&self.conn, &self.path, id)
    }

    /// The latest position of this node's change feed.
    pub fn feed_seq(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT seq FROM feed WHERE id = 1", [], |r| r.get(0))
            .at(&self.path)
    }

    /// Number of stored documents of each kind, for status and benchmarks.
    pub fn doc_count(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM docs", [], |r| r.get(0))
            .at(&self.path)
    }
}

/// What a write did to a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// New changes were stored at this feed position.
    Changed(i64),
    /// Nothing new: the document already held every change.
    Unchanged,
}

/// What a caller of [`WriteTx::save_doc_with`] already knows, so the store does not compute it
/// again. Each hint must be exactly what the store would compute itself.
#[derive(Debug, Default)]
pub struct SaveHints<'a> {
    /// For a new document: bytes that `AutoCommit::load` turns into exactly this document (the
    /// `save()` a peer sent), stored as the snapshot instead of saving the document again.
    pub snapshot: Option<&'a [u8]>,
    /// The document's fields, as `DocView::read` returns them.
    pub view: Option<&'a DocView>,
    /// A peer node and the heads (sorted) it holds: if the stored state has exactly these heads,
    /// it came whole from that peer, which is then never offered it back.
    pub origin: Option<(&'a str, &'a [ChangeHash])>,
}

fn exists(conn: &rusqlite::Connection, path: &std::path::Path, id: &DocId) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM docs WHERE id = ?1")
        .at(path)?
        .query_row([id.as_str()], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
        .at(path)
}

impl WriteTx<'_> {
    pub fn doc_exists(&self, id: &DocId) -> Result<bool> {
        exists(&self.tx, self.path, id)
    }

    /// Loads a document inside the write lock, so what it sees is what it changes.
    pub fn load_doc(&mut self, id: &DocId) -> Result<Option<DocRecord>> {
        load(&self.tx, self.path, self.cache, id)
    }

    /// Creates a document with `build`, as `actor`.
    pub fn create_doc(
        &mut self,
        id: &DocId,
        actor: &ActorId,
        at_ms: i64,
        build: impl FnOnce(&mut AutoCommit) -> Result<()>,
    ) -> Result<Saved> {
        if self.load_doc(id)?.is_some() {
            return Err(StoreError::Invalid(format!("document {id} already exists")));
        }
        let mut doc = AutoCommit::new().with_actor(actor.clone());
        build(&mut doc)?;
        self.sign_new_changes(id, None, &mut doc)?;
        self.save_doc(id, None, doc, at_ms)
    }

    /// Changes an existing document with `f`, as `actor`.
    pub fn update_doc<T>(
        &mut self,
        id: &DocId,
        actor: &ActorId,
        at_ms: i64,
        f: impl FnOnce(&mut AutoCommit) -> Result<T>,
    ) -> Result<(T, Saved)> {
        let rec = self
            .load_doc(id)?
            .ok_or_else(|| StoreError::NotFound(format!("{} {id}", id.kind())))?;
        let mut doc = rec.doc;
        doc.set_actor(actor.clone());
        let value = f(&mut doc)?;
        self.sign_new_changes(id, Some(&rec.heads), &mut doc)?;
        let saved = self.save_doc(id, Some(rec.heads), doc, at_ms)?;
        Ok((value, saved))
    }

    /// Stores `doc`, which was loaded at `old_heads` (None when new): appends what changed since,
    /// advances the feed, rebuilds the document's index rows and compacts when chunks pile up.
    pub fn save_doc(
        &mut self,
        id: &DocId,
        old_heads: Option<Vec<ChangeHash>>,
        doc: AutoCommit,
        at_ms: i64,
    ) -> Result<Saved> {
        self.save_doc_with(id, old_heads, doc, at_ms, SaveHints::default())
    }

    /// [`WriteTx::save_doc`], reusing what the caller already computed (see [`SaveHints`]).
    pub fn save_doc_with(
        &mut self,
        id: &DocId,
        old_heads: Option<Vec<ChangeHash>>,
        mut doc: AutoCommit,
        at_ms: i64,
        hints: SaveHints<'_>,
    ) -> Result<Saved> {
        let heads = sorted(doc.get_heads());
        if old_heads.as_deref() == Some(&heads[..]) {
            return Ok(Saved::Unchanged);
        }
        let origin = hints
            .origin
            .and_then(|(node, sender_heads)| (sender_heads == &heads[..]).then_some(node));
        let seq = self.next_feed_seq()?;
        let heads_bytes = encode_heads(&heads);
        let old_seq = match &old_heads {
            None => {
                let saved;
                let snapshot = match hints.snapshot {
                    Some(bytes) => {
                        debug_assert!(
                            AutoCommit::load(bytes)
                                .is_ok_and(|mut d| sorted(d.get_heads()) == heads),
                            "the snapshot hint for {id} does not load to the document"
                        );
                        bytes
                    }
                    None => {
                        saved = doc.save();
                        &saved[..]
                    }
                };
                self.tx
                    .prepare_cached("INSERT INTO docs (id, kind, snapshot, heads, chunks, chunk_bytes, seq, updated_at, origin) VALUES (?1, ?2, ?3, ?4, 0, 0, ?5, ?6, ?7)")
                    .at(self.path)?
                    .execute(params![id.as_str(), id.kind().as_str(), snapshot, heads_bytes, seq, at_ms, origin])
                    .at(self.path)?;
                None
            }
            Some(old) => {
                let chunk = doc.save_after(old);
                let (chunks, chunk_bytes, snapshot_len, old_seq): (i64, i64, i64, i64) = self
                    .tx
                    .prepare_cached(
                        "SELECT chunks, chunk_bytes, length(snapshot), seq FROM docs WHERE id = ?1",
                    )
                    .at(self.path)?
                    .query_row([id.as_str()], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .at(self.path)?;
                let chunk_bytes = chunk_bytes + chunk.len() as i64;
                if chunks + 1 >= CHUNKS_BEFORE_COMPACT_MAX || chunk_bytes > snapshot_len.max(4096) {
                    let snapshot = doc.save();
                    self.tx
                        .prepare_cached("DELETE FROM doc_chunks WHERE doc_id = ?1")
                        .at(self.path)?
                        .execute([id.as_str()])
                        .at(self.path)?;
                    self.tx
                        .prepare_cached("UPDATE docs SET snapshot = ?2, heads = ?3, chunks = 0, chunk_bytes = 0, seq = ?4, updated_at = ?5, origin = ?6 WHERE id = ?1")
                        .at(self.path)?
                        .execute(params![id.as_str(), snapshot, heads_bytes, seq, at_ms, origin])
                        .at(self.path)?;
                } else {
                    self.tx
                        .prepare_cached(
                            "INSERT INTO doc_chunks (doc_id, n, data) VALUES (?1, ?2, ?3)",
                        )
                        .at(self.path)?
                        .execute(params![id.as_str(), chunks, chunk])
                        .at(self.path)?;
                    self.tx
                        .prepare_cached("UPDATE docs SET heads = ?2, chunks = ?3, chunk_bytes = ?4, seq = ?5, updated_at = ?6, origin = ?7 WHERE id = ?1")
                        .at(self.path)?
                        .execute(params![id.as_str(), heads_bytes, chunks + 1, chunk_bytes, seq, at_ms, origin])
                        .at(self.path)?;
                }
                Some(old_seq)
            }
        };
        index::reindex(
            &self.tx,
            self.path,
            id,
            &doc,
            (old_seq, seq),
            hints.view,
            self.unit,
            self.aliases,
        )?;
        self.touch(id.clone(), DocRecord { doc, heads });
        Ok(Saved::Changed(seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{dispatch, DocKind};
    use crate::store::testutil::{actor, author, new_dispatch, new_dispatch_with};

    #[test]
    fn changes_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = Store::create(&path, 4).unwrap();
        let id = new_dispatch(&mut store);
        for i in 0..(CHUNKS_BEFORE_COMPACT_MAX * 2) {
            store
                .write(|tx| {
                    tx.update_doc(&id, &actor(), 2, |doc| {
                        Ok(dispatch::add_comment(
                            doc,
                            &id,
                            &format!("c{i}"),
                            &author(),
                            2,
                        )?)
                    })
                })
                .unwrap();
        }
        drop(store);
        let mut store = Store::open(&path, 4).unwrap();
        let view = store
            .read_doc(&id, |doc| dispatch::read(doc, &id))
            .unwrap()
            .unwrap();
        assert_eq!(view.comments.len() as i64, CHUNKS_BEFORE_COMPACT_MAX * 2);
        let chunks: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM doc_chunks", [], |r| r.get(0))
            .unwrap();
        assert!(
            chunks < CHUNKS_BEFORE_COMPACT_MAX,
            "chunks were compacted: {chunks}"
        );
        assert_eq!(store.feed_seq().unwrap(), CHUNKS_BEFORE_COMPACT_MAX * 2 + 1);
    }

    #[test]
    fn a_failed_write_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        let id = new_dispatch(&mut store);
        let seq = store.feed_seq().unwrap();
        let err = store.write(|tx| {
            tx.update_doc(&id, &actor(), 2, |doc| {
                Ok(dispatch::add_comment(doc, &id, "kept?", &author(), 2)?)
            })?;
            Err::<(), _>(StoreError::Invalid("later step failed".into()))
        });
        assert!(err.is_err());
        assert_eq!(store.feed_seq().unwrap(), seq);
        let view = store
            .read_doc(&id, |doc| dispatch::read(doc, &id))
            .unwrap()
            .unwrap();
        assert!(
            view.comments.is_empty(),
            "the rolled-back comment must not appear, even from the cache"
        );
    }

    #[test]
    fn stored_bytes_load_as_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        // A long summary makes the snapshot large beside one comment, so both are sent as stored.
        let summary: String = (0..600).map(|i| format!("{} ", i * 7919 % 1000)).collect();
        let id = new_dispatch_with(&mut store, "2/UBND", summary);
        let (heads, bytes) = store.doc_load_bytes(&id).unwrap().unwrap();
        let mut doc = AutoCommit::load(&bytes).unwrap();
        assert_eq!(sorted(doc.get_heads()), heads, "a bare snapshot loads");
        // A comment is a chunk after the snapshot; snapshot then chunks is still load() input.
        store
            .write(|tx| {
                tx.update_doc(&id, &actor(), 2, |doc| {
                    Ok(dispatch::add_comment(doc, &id, "ok", &author(), 2)?)
                })
            })
            .unwrap();
        let chunks: i64 = store
            .conn()
            .query_row("SELECT chunks FROM docs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(chunks, 1);
        let want = store.read_doc(&id, |doc| sorted(doc.get_heads())).unwrap();
        let (heads, bytes) = store.doc_load_bytes(&id).unwrap().unwrap();
        assert_eq!(heads, want);
        let mut doc = AutoCommit::load(&bytes).unwrap();
        assert_eq!(sorted(doc.get_heads()), want, "snapshot and chunks load");
        let unknown = DocId::generate(DocKind::Dispatch);
        assert!(store.doc_load_bytes(&unknown).unwrap().is_none());
    }

    #[test]
    fn unknown_documents_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        let id = DocId::generate(DocKind::Assignment);
        assert!(matches!(
            store.read_doc(&id, |_| ()),
            Err(StoreError::NotFound(_))
        ));
    }
}
