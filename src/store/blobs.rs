//! Content-addressed scans: BLAKE3 over the whole content, stored once in fixed-size chunks,
//! each chunk with its own hash so a read (or a peer's chunk) is verified before it is trusted.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::{Result, SqlContext, Store, StoreError, WriteTx};

/// Bytes per stored chunk: large enough to keep rows few, small enough to resume cheaply.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Largest scan accepted, from a file or a peer.
pub const BLOB_BYTES_MAX: u64 = 1 << 30;

pub type Hash = [u8; 32];

#[derive(Debug, Clone, Serialize)]
pub struct BlobInfo {
    pub hash: String,
    pub size: u64,
    /// False when the same content was already stored (deduplicated).
    pub stored_new: bool,
}

pub fn parse_hash(hex_text: &str) -> Result<Hash> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut hash).map_err(|_| {
        StoreError::Invalid(format!("{hex_text:?} is not a BLAKE3 hash (64 hex digits)"))
    })?;
    Ok(hash)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Streams a file through `each` in CHUNK_BYTES pieces; returns its BLAKE3 hash and size.
fn scan_file(path: &Path, mut each: impl FnMut(usize, &[u8]) -> Result<()>) -> Result<(Hash, u64)> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let (mut size, mut idx) = (0u64, 0usize);
    loop {
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            let n = file.read(&mut buf[filled..]).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        size += filled as u64;
        if size > BLOB_BYTES_MAX {
            return Err(StoreError::Invalid(format!(
                "{}: larger than the {BLOB_BYTES_MAX}-byte limit for a scan",
                path.display()
            )));
        }
        hasher.update(&buf[..filled]);
        each(idx, &buf[..filled])?;
        idx += 1;
        if filled < CHUNK_BYTES {
            break;
        }
    }
    Ok((*hasher.finalize().as_bytes(), size))
}

impl Store {
    pub fn has_blob(&self, hash: &Hash) -> Result<bool> {
        self.conn
            .prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(&self.path)
    }

    /// Writes a blob's content to `out`, verifying every chunk and the whole; returns its size.
    pub fn read_blob(&self, hash: &Hash, out: &mut impl Write) -> Result<u64> {
        let hex_hash = hex::encode(hash);
        let chunks: i64 = self
            .conn
            .prepare_cached("SELECT chunks FROM blobs WHERE hash = ?1")
            .at(&self.path)?
            .query_row([&hash[..]], |r| r.get(0))
            .optional()
            .at(&self.path)?
            .ok_or_else(|| StoreError::NotFound(format!("scan {hex_hash}")))?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT idx, chunk_hash, data FROM blob_chunks WHERE hash = ?1 ORDER BY idx",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([&hash[..]], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .at(&self.path)?;
        let mut whole = blake3::Hasher::new();
        let (mut expected_idx, mut size) = (0i64, 0u64);
        for row in rows {
            let (idx, chunk_hash, data) = row.at(&self.path)?;
            if idx != expected_idx || blake3::hash(&data).as_bytes()[..] != chunk_hash[..] {
                return Err(StoreError::Corrupt(format!(
                    "scan {hex_hash}: chunk {expected_idx} is missing or damaged"
                )));
            }
            whole.update(&data);
            out.write_all(&data).map_err(|source| StoreError::Io {
                path: "output".into(),
                source,
            })?;
            size += data.len() as u64;
            expected_idx += 1;
        }
        if expected_idx != chunks || whole.finalize().as_bytes() != hash {
            return Err(StoreError::Corrupt(format!(
                "scan {hex_hash}: content does not match its hash"
            )));
        }
        Ok(size)
    }
}

impl WriteTx<'_> {
    fn blob_exists(&self, hash: &Hash) -> Result<bool> {
        self.tx
            .prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1")
            .at(self.path)?
            .query_row([&hash[..]], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(self.path)
    }

    fn insert_chunk(&self, hash: &Hash, idx: usize, data: &[u8]) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO blob_chunks (hash, idx, chunk_hash, data) VALUES (?1, ?2, ?3, ?4)",
            )
            .at(self.path)?
            .execute(params![
                &hash[..],
                idx as i64,
                &blake3::hash(data).as_bytes()[..],
                data
            ])
            .at(self.path)?;
        Ok(())
    }

    fn insert_blob_row(&self, hash: &Hash, size: u64, chunks: usize, at_ms: i64) -> Result<()> {
        self.tx
            .execute("DELETE FROM blob_wants WHERE hash = ?1", [&hash[..]])
            .at(self.path)?;
        self.tx
            .prepare_cached("INSERT INTO blobs (hash, size, chunk_bytes, chunks, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .at(self.path)?
            .execute(params![&hash[..], size as i64, CHUNK_BYTES as i64, chunks as i64, at_ms])
            .at(self.path)?;
        Ok(())
    }

    /// Stores a file's content once: a first pass hashes it, and only unknown content is written.
    pub fn put_blob_file(&mut self, path: &Path, at_ms: i64) -> Result<BlobInfo> {
        let (hash, size) = scan_file(path, |_, _| Ok(()))?;
        if self.blob_exists(&hash)? {
            return Ok(BlobInfo {
                hash: hex::encode(hash),
                size,
                stored_new: false,
            });
        }
        let mut chunks = 0;
        let (again, again_size) = scan_file(path, |idx, data| {
            chunks = idx + 1;
            self.insert_chunk(&hash, idx, data)
        })?;
        if again != hash || again_size != size {
            return Err(StoreError::Invalid(format!(
                "{}: the file changed while it was being stored; try again",
                path.display()
            )));
        }
        self.insert_blob_row(&hash, size, chunks, at_ms)?;
        Ok(BlobInfo {
            hash: hex::encode(hash),
            size,
            stored_new: true,
        })
    }

    /// Stores content held in memory (small blobs, tests, bundles).
    pub fn put_blob_bytes(&mut self, data: &[u8], at_ms: i64) -> Result<BlobInfo> {
        let hash = *blake3::hash(data).as_bytes();
        let size = data.len() as u64;
        if size > BLOB_BYTES_MAX {
            return Err(StoreError::Invalid(format!(
                "scan larger than the {BLOB_BYTES_MAX}-byte limit"
            )));
        }
        if self.blob_exists(&hash)? {
            return Ok(BlobInfo {
                hash: hex::encode(hash),
                size,
                stored_new: false,
            });
        }
        let mut chunks = 0;
        for (idx, chunk) in data.chunks(CHUNK_BYTES).enumerate() {
            self.insert_chunk(&hash, idx, chunk)?;
            chunks = idx + 1;
        }
        self.insert_blob_row(&hash, size, chunks, at_ms)?;
        Ok(BlobInfo {
            hash: hex::encode(hash),
            size,
            stored_new: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_dedup_roundtrip_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        let file = dir.path().join("scan.bin");
        let content: Vec<u8> = (0..CHUNK_BYTES * 2 + 1234)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&file, &content).unwrap();
        let first = store.write(|tx| tx.put_blob_file(&file, 1)).unwrap();
        let second = store.write(|tx| tx.put_blob_file(&file, 2)).unwrap();
        assert!(first.stored_new && !second.stored_new);
        assert_eq!(first.hash, blake3::hash(&content).to_hex().as_str());
        let hash = parse_hash(&first.hash).unwrap();
        let mut out = Vec::new();
        assert_eq!(
            store.read_blob(&hash, &mut out).unwrap(),
            content.len() as u64
        );
        assert_eq!(out, content);
        let rows: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM blob_chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3, "stored once, in three chunks");
        store
            .conn()
            .execute(
                "UPDATE blob_chunks SET data = zeroblob(10) WHERE idx = 1",
                [],
            )
            .unwrap();
        assert!(matches!(
            store.read_blob(&hash, &mut Vec::new()),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn missing_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        let err = store
            .write(|tx| tx.put_blob_file(Path::new("/nonexistent/scan.pdf"), 1))
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/scan.pdf"));
    }
}
