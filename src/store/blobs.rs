//! Content-addressed scans: BLAKE3 over the whole content, stored once in fixed-size chunks,
//! each chunk with its own hash so a read (or a peer's chunk) is verified before it is trusted.
//!
//! The bytes live in one file per scan under `blobs/` beside the database (chunk `idx` at byte
//! `idx * CHUNK_BYTES`), or in an S3-compatible bucket, one object per chunk
//! ([`super::scanstore`]); `blob_chunks` holds each chunk's hash and length either way. A
//! chunk's bytes are written and fsynced (or their PUT acknowledged) before the transaction that
//! adds its row commits, so a row always means its bytes survived. Files are only ever written with content verified against a hash, so two
//! writers of the same scan write the same bytes. A scan stored locally (`dispatch new`, tests)
//! is written under a temporary name and renamed to its hash once whole and durable; a scan
//! received from a peer is written chunk by chunk under its hash, so a cut transfer resumes.
//! Scan files and `blobs/` are readable by the node's user only.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, OptionalExtension};
use serde::Serialize;

use super::scanstore::{S3Scans, S3Writer, ScanStore};
use super::{Result, SqlContext, Store, StoreError, WriteTx};

/// Bytes per stored chunk: large enough to keep rows few, small enough to resume cheaply.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Largest scan accepted, from a file or a peer.
pub const BLOB_BYTES_MAX: u64 = 1 << 30;
/// Directory beside the database holding the scans' bytes, one file per scan.
pub const BLOB_DIR: &str = "blobs";
/// Name prefix of a scan file being written locally: `.writing-HASH-PID-RANDOM`.
const WRITING_PREFIX: &str = ".writing-";

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

/// The directory of scan files of the database at `db`.
pub(crate) fn blob_dir(db: &Path) -> PathBuf {
    db.parent().unwrap_or(Path::new(".")).join(BLOB_DIR)
}

fn blob_path(db: &Path, hash: &Hash) -> PathBuf {
    blob_dir(db).join(hex::encode(hash))
}

/// Makes a new directory entry durable (after creating a file or directory in `dir`).
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Creates `blobs/` beside the database if it is missing, readable by the owner only.
fn ensure_blob_dir(db: &Path) -> Result<PathBuf> {
    let dir = blob_dir(db);
    if !dir.exists() {
        private_dir(&dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(dir)
}

/// Creates `dir` (mode 0700 whatever the umask); one already there is left as it is.
fn private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Options for opening a scan file for writing, created with mode 0600 whatever the umask.
fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = OpenOptions::new();
    opts.write(true).mode(0o600);
    opts
}

/// The process id in the name of a scan file being written (see [`WRITING_PREFIX`]).
fn writer_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(WRITING_PREFIX)?;
    let mut parts = rest.split('-');
    let (hash, pid, random) = (parts.next()?, parts.next()?, parts.next()?);
    (hash.len() == 64 && random.len() == 16 && parts.next().is_none())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Whether process `pid` still runs (and may still be writing); a pid we may not signal runs.
fn process_runs(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// A new scan's file, written under a temporary name in `blobs/` and renamed to its hash only
/// once whole and durable ([`NewScanFile::finish`]): a file under a hash name that a local
/// write made is never partial, even after a kill. Dropped unfinished, it removes its file.
struct NewScanFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    finished: bool,
}

impl NewScanFile {
    fn create(db: &Path, hash: &Hash) -> Result<NewScanFile> {
        let dir = ensure_blob_dir(db)?;
        let tmp = dir.join(format!(
            "{WRITING_PREFIX}{}-{}-{:016x}",
            hex::encode(hash),
            std::process::id(),
            rand::random::<u64>()
        ));
        let file = private_file()
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        Ok(NewScanFile {
            file,
            tmp,
            path: blob_path(db, hash),
            finished: false,
        })
    }

    /// Writes chunk `idx` at its place in the file.
    fn write(&self, idx: u64, data: &[u8]) -> Result<()> {
        assert!(data.len() <= CHUNK_BYTES, "a chunk is at most CHUNK_BYTES");
        self.file
            .write_all_at(data, idx * CHUNK_BYTES as u64)
            .map_err(io_err(&self.tmp))
    }

    /// Makes the content durable, then gives the file its hash name (replacing any file there:
    /// the same content, or an unreferenced leftover) and makes the rename durable.
    fn finish(mut self) -> Result<PathBuf> {
        self.file.sync_data().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io_err(&self.path))?;
        self.finished = true;
        sync_dir(self.path.parent().unwrap_or(Path::new(".")))?;
        Ok(std::mem::take(&mut self.path))
    }
}

impl Drop for NewScanFile {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A scan being stored locally (`dispatch new`): a new file, or its chunks' objects, which are
/// PUT under their final keys (content addressed, so a leftover of a rolled back write holds
/// the same bytes a later write of that scan PUTs again).
enum NewScan {
    Local(NewScanFile),
    S3(S3Writer),
}

impl NewScan {
    fn create(scans: &ScanStore, db: &Path, hash: &Hash) -> Result<NewScan> {
        Ok(match scans {
            ScanStore::Local => NewScan::Local(NewScanFile::create(db, hash)?),
            ScanStore::S3(s3) => NewScan::S3(s3.writer(hash)),
        })
    }

    fn write(&self, idx: u64, data: &[u8]) -> Result<()> {
        match self {
            NewScan::Local(file) => file.write(idx, data),
            NewScan::S3(writer) => writer.write(idx, data),
        }
    }

    /// Makes the content durable; returns the file to remove if the transaction rolls back.
    fn finish(self) -> Result<Option<PathBuf>> {
        match self {
            NewScan::Local(file) => file.finish().map(Some),
            NewScan::S3(writer) => writer.sync().map(|()| None),
        }
    }
}

/// Where the chunks of one scan in transit are written: its local file, or its objects.
/// Nothing written is durable before `sync`.
pub struct ScanFile {
    inner: ScanTarget,
}

enum ScanTarget {
    Local {
        file: File,
        path: PathBuf,
        /// The file (or its directory) was created here: its directory entry needs an fsync too.
        created: bool,
    },
    S3(S3Writer),
}

impl ScanFile {
    /// The writer of scan `hash` in `scans`, the store of the database at `db`.
    pub(crate) fn open(scans: &ScanStore, db: &Path, hash: &Hash) -> Result<ScanFile> {
        match scans {
            ScanStore::Local => Self::open_local(db, hash),
            ScanStore::S3(s3) => Ok(ScanFile {
                inner: ScanTarget::S3(s3.writer(hash)),
            }),
        }
    }

    /// The scan's file in `blobs/` beside `db`, created if missing.
    pub(crate) fn open_local(db: &Path, hash: &Hash) -> Result<ScanFile> {
        let path = blob_path(db, hash);
        ensure_blob_dir(db)?;
        let created = !path.exists();
        let file = private_file()
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(ScanFile {
            inner: ScanTarget::Local {
                file,
                path,
                created,
            },
        })
    }

    /// Writes chunk `idx`, already verified against its hash, at its place in the file (or
    /// starts its PUT).
    pub fn write(&self, idx: u64, data: &[u8]) -> Result<()> {
        assert!(data.len() <= CHUNK_BYTES, "a chunk is at most CHUNK_BYTES");
        match &self.inner {
            ScanTarget::Local { file, path, .. } => file
                .write_all_at(data, idx * CHUNK_BYTES as u64)
                .map_err(io_err(path)),
            ScanTarget::S3(writer) => writer.write(idx, data),
        }
    }

    /// A second handle on the same scan, e.g. to make it durable from another thread while
    /// this one writes.
    pub fn try_clone(&self) -> Result<ScanFile> {
        let inner = match &self.inner {
            ScanTarget::Local {
                file,
                path,
                created,
            } => ScanTarget::Local {
                file: file.try_clone().map_err(io_err(path))?,
                path: path.clone(),
                created: *created,
            },
            ScanTarget::S3(writer) => ScanTarget::S3(writer.clone()),
        };
        Ok(ScanFile { inner })
    }

    /// Makes every chunk written so far durable (fsynced, or its PUT acknowledged); only then
    /// may rows naming them commit.
    pub fn sync(&mut self) -> Result<()> {
        match &mut self.inner {
            ScanTarget::Local {
                file,
                path,
                created,
            } => {
                file.sync_data().map_err(io_err(path))?;
                if *created {
                    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
                    *created = false;
                }
                Ok(())
            }
            ScanTarget::S3(writer) => writer.sync(),
        }
    }
}

/// Reads `len` bytes of chunk `idx` from a scan's file and checks them against `chunk_hash`.
fn read_chunk(
    file: &File,
    path: &Path,
    idx: u64,
    len: usize,
    chunk_hash: &[u8],
) -> Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, idx * CHUNK_BYTES as u64)
        .map_err(io_err(path))?;
    if blake3::hash(&data).as_bytes()[..] != chunk_hash[..] {
        return Err(StoreError::Corrupt(format!(
            "{}: chunk {idx} is damaged",
            path.display()
        )));
    }
    Ok(data)
}

/// Opens a scan's file for reading; a missing file is damage, since rows say its bytes exist.
fn open_for_read(db: &Path, hash: &Hash) -> Result<(File, PathBuf)> {
    let path = blob_path(db, hash);
    match File::open(&path) {
        Ok(file) => Ok((file, path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::Corrupt(format!(
            "scan {}: its file {} is missing",
            hex::encode(hash),
            path.display()
        ))),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Reads chunk `idx` of a scan whose row gives its length and hash, verified.
pub(crate) fn read_stored_chunk(
    scans: &ScanStore,
    db: &Path,
    hash: &Hash,
    idx: u64,
    len: usize,
    chunk_hash: &[u8],
) -> Result<Vec<u8>> {
    match scans {
        ScanStore::Local => {
            let (file, path) = open_for_read(db, hash)?;
            read_chunk(&file, &path, idx, len, chunk_hash)
        }
        ScanStore::S3(s3) => s3.read_chunk(hash, idx, len, chunk_hash),
    }
}

/// (idx, chunk hash, length) of every chunk row of a scan, in index order.
pub(super) fn chunk_rows(
    conn: &rusqlite::Connection,
    db: &Path,
    hash: &Hash,
) -> Result<Vec<(i64, Vec<u8>, i64)>> {
    let mut stmt = conn
        .prepare_cached("SELECT idx, chunk_hash, len FROM blob_chunks WHERE hash = ?1 ORDER BY idx")
        .at(db)?;
    let rows = stmt
        .query_map([&hash[..]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .at(db)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().at(db)
}

/// Copies the scan files of `store` (stored scans and scans in transit) into `blobs/` beside
/// `dest`, a backup just taken of its database: rows in the backup name only bytes already in
/// these files. A stored scan's file already in the backup is skipped: it never changes.
pub(crate) fn backup_scan_files(store: &Store, dest: &Path) -> Result<()> {
    if let ScanStore::S3(_) = store.scans {
        // The bucket holds every chunk the backup's rows name, and objects are never rewritten
        // with other bytes: the bucket's own replication or versioning is their backup.
        return Ok(());
    }
    let from_dir = blob_dir(&store.path);
    if !from_dir.exists() {
        return Ok(());
    }
    let to_dir = blob_dir(dest);
    private_dir(&to_dir)?;
    for entry in std::fs::read_dir(&from_dir).map_err(io_err(&from_dir))? {
        let from = entry.map_err(io_err(&from_dir))?.path();
        let Some(name) = from.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with(WRITING_PREFIX) {
            // Not a scan yet: nothing the backup's rows can name.
            continue;
        }
        let to = to_dir.join(name);
        let size = std::fs::metadata(&from).map_err(io_err(&from))?.len();
        let stored = parse_hash(name).map_or(Ok(false), |h| store.has_blob(&h))?;
        if stored && std::fs::metadata(&to).is_ok_and(|m| m.len() == size) {
            continue;
        }
        let mut source = File::open(&from).map_err(io_err(&from))?;
        let mut copy = private_file()
            .create(true)
            .truncate(true)
            .open(&to)
            .map_err(io_err(&to))?;
        std::io::copy(&mut source, &mut copy).map_err(io_err(&to))?;
        copy.sync_all().map_err(io_err(&to))?;
    }
    sync_dir(&to_dir)
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
    /// Files in `blobs/` that no stored scan and no transfer in progress names, with their
    /// sizes: what a crash between writing a new scan's file and committing its row leaves (the
    /// write's own rollback removes them otherwise). A command writing a scan at this moment
    /// has one too, so they are reported, never deleted here.
    pub fn unreferenced_scan_files(&self) -> Result<Vec<(PathBuf, u64)>> {
        let dir = blob_dir(&self.path);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut named = self
            .conn
            .prepare_cached(
                "SELECT EXISTS(SELECT 1 FROM blobs WHERE hash = ?1)
                     OR EXISTS(SELECT 1 FROM blob_partial WHERE hash = ?1)",
            )
            .at(&self.path)?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            if writer_pid(&entry.file_name().to_string_lossy()).is_some() {
                // Listed by `stale_scan_writes`.
                continue;
            }
            let referenced = match parse_hash(&entry.file_name().to_string_lossy()) {
                Ok(hash) => named
                    .query_row([&hash[..]], |r| r.get::<_, bool>(0))
                    .at(&self.path)?,
                Err(_) => false,
            };
            if !referenced {
                let bytes = entry.metadata().map_err(io_err(&entry.path()))?.len();
                found.push((entry.path(), bytes));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Files in `blobs/` of a local scan write whose process is gone (killed before it could
    /// give the file its hash name), with their sizes. Writes still running are left out.
    pub fn stale_scan_writes(&self) -> Result<Vec<(PathBuf, u64)>> {
        let dir = blob_dir(&self.path);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&dir))?;
            match writer_pid(&entry.file_name().to_string_lossy()) {
                Some(pid) if !process_runs(pid) => {
                    let bytes = entry.metadata().map_err(io_err(&entry.path()))?.len();
                    found.push((entry.path(), bytes));
                }
                _ => {}
            }
        }
        found.sort();
        Ok(found)
    }

    /// Hashes of every scan with chunks here (stored, or in transit) after `after`, in order.
    pub fn chunked_scans_after(&self, after: &[u8], limit: usize) -> Result<Vec<Hash>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT hash FROM blob_chunks WHERE hash > ?1 ORDER BY hash LIMIT ?2",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| r.get::<_, Vec<u8>>(0))
            .at(&self.path)?;
        let mut hashes = Vec::new();
        for row in rows {
            let hash = row.at(&self.path)?;
            hashes.push(hash.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt("blob_chunks holds a hash that is not 32 bytes".into())
            })?);
        }
        Ok(hashes)
    }

    /// Copies every chunk of scan `hash` recorded here from its local file to `s3`, each
    /// verified against its row before it is PUT. A chunk already in the bucket and matching
    /// its row is kept, so a copy cut midway resumes where it stopped. Returns the chunks PUT,
    /// the chunks found already there, and the bytes PUT.
    pub fn copy_scan_to_bucket(&self, hash: &Hash, s3: &Arc<S3Scans>) -> Result<(u64, u64, u64)> {
        let rows = chunk_rows(&self.conn, &self.path, hash)?;
        let (file, path) = open_for_read(&self.path, hash)?;
        let writer = s3.writer(hash);
        let listed = s3.chunks_listed(hash)?;
        let (mut put, mut present, mut bytes) = (0, 0, 0);
        for (idx, chunk_hash, len) in rows {
            if !(0..=CHUNK_BYTES as i64).contains(&len) {
                return Err(StoreError::Corrupt(format!(
                    "chunk {idx} of scan {} has a length of {len}",
                    hex::encode(hash)
                )));
            }
            let (idx, len) = (idx as u64, len as usize);
            if listed.contains(&idx) {
                match s3.read_chunk(hash, idx, len, &chunk_hash) {
                    Ok(_) => {
                        present += 1;
                        continue;
                    }
                    // Damaged by hand or by the store: written again.
                    Err(StoreError::Corrupt(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            let data = read_chunk(&file, &path, idx, len, &chunk_hash)?;
            writer.write(idx, &data)?;
            put += 1;
            bytes += data.len() as u64;
        }
        writer.sync()?;
        Ok((put, present, bytes))
    }

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
        let rows = chunk_rows(&self.conn, &self.path, hash)?;
        let missing = |idx: i64| {
            StoreError::Corrupt(format!(
                "scan {hex_hash}: chunk {idx} is missing or damaged"
            ))
        };
        if let Some(expected) = rows
            .iter()
            .enumerate()
            .position(|(expected, (idx, _, len))| {
                *idx != expected as i64 || !(0..=CHUNK_BYTES as i64).contains(len)
            })
        {
            return Err(missing(expected as i64));
        }
        let mut whole = blake3::Hasher::new();
        let mut size = 0u64;
        let mut each = |data: Vec<u8>| {
            whole.update(&data);
            size += data.len() as u64;
            out.write_all(&data).map_err(|source| StoreError::Io {
                path: "output".into(),
                source,
            })
        };
        match &self.scans {
            ScanStore::Local => {
                let (file, path) = open_for_read(&self.path, hash)?;
                for (idx, chunk_hash, len) in &rows {
                    let data = read_chunk(&file, &path, *idx as u64, *len as usize, chunk_hash)
                        .map_err(|_| missing(*idx))?;
                    each(data)?;
                }
            }
            // The object's own key and fault name it: more use than "missing or damaged".
            ScanStore::S3(s3) => s3.read_chunks(hash, &rows, each)?,
        }
        let expected_idx = rows.len() as i64;
        if expected_idx != chunks || whole.finalize().as_bytes() != hash {
            return Err(StoreError::Corrupt(format!(
                "scan {hex_hash}: content does not match its hash"
            )));
        }
        Ok(size)
    }
}

impl WriteTx<'_> {
    /// Gives a new scan's file its hash name, remembering it for removal on rollback unless a
    /// transfer in progress (whose manifest row committed before any of its bytes were
    /// written) is writing to that name too.
    fn finish_scan_file(&mut self, file: NewScan, hash: &Hash) -> Result<()> {
        let Some(path) = file.finish()? else {
            return Ok(());
        };
        let receiving = self
            .tx
            .prepare_cached("SELECT 1 FROM blob_partial WHERE hash = ?1")
            .at(self.path)?
            .query_row([&hash[..]], |_| Ok(()))
            .optional()
            .at(self.path)?
            .is_some();
        if !receiving {
            self.new_files.push(path);
        }
        Ok(())
    }

    fn blob_exists(&self, hash: &Hash) -> Result<bool> {
        self.tx
            .prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1")
            .at(self.path)?
            .query_row([&hash[..]], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(self.path)
    }

    /// Records a chunk whose bytes are in the scan's file (durable before this commits).
    fn insert_chunk(&self, hash: &Hash, idx: usize, data: &[u8]) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO blob_chunks (hash, idx, chunk_hash, len) VALUES (?1, ?2, ?3, ?4)",
            )
            .at(self.path)?
            .execute(params![
                &hash[..],
                idx as i64,
                &blake3::hash(data).as_bytes()[..],
                data.len() as i64
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
        let file = NewScan::create(self.scans, self.path, &hash)?;
        let (again, again_size) = scan_file(path, |idx, data| {
            chunks = idx + 1;
            file.write(idx as u64, data)?;
            self.insert_chunk(&hash, idx, data)
        })?;
        if again != hash || again_size != size {
            return Err(StoreError::Invalid(format!(
                "{}: the file changed while it was being stored; try again",
                path.display()
            )));
        }
        self.finish_scan_file(file, &hash)?;
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
        let file = NewScan::create(self.scans, self.path, &hash)?;
        for (idx, chunk) in data.chunks(CHUNK_BYTES).enumerate() {
            file.write(idx as u64, chunk)?;
            self.insert_chunk(&hash, idx, chunk)?;
            chunks = idx + 1;
        }
        self.finish_scan_file(file, &hash)?;
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
        let file = dir.path().join(BLOB_DIR).join(&first.hash);
        let mut damaged = std::fs::read(&file).unwrap();
        damaged[CHUNK_BYTES + 7] ^= 1;
        std::fs::write(&file, &damaged).unwrap();
        assert!(matches!(
            store.read_blob(&hash, &mut Vec::new()),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn issue14_scans_in_a_bucket_leave_no_file_and_read_back_verified() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        let s3 = Arc::new(crate::store::scanstore::S3Scans::in_memory());
        crate::store::scanstore::use_for(&db, ScanStore::S3(s3.clone()));
        let mut store = Store::create(&db, 4).unwrap();
        let content: Vec<u8> = (0..CHUNK_BYTES * 2 + 99).map(|i| (i % 241) as u8).collect();
        let info = store.write(|tx| tx.put_blob_bytes(&content, 1)).unwrap();
        assert!(!blob_dir(&db).exists(), "a scan file was written");
        let hash = parse_hash(&info.hash).unwrap();
        let mut out = Vec::new();
        store.read_blob(&hash, &mut out).unwrap();
        assert_eq!(out, content);
        assert_eq!(
            store.blob_chunk(&hash, 2).unwrap(),
            &content[2 * CHUNK_BYTES..]
        );
        // Chunk 1's object replaced by other bytes: the read names the damage.
        let writer = s3.writer(&hash);
        writer.write(1, &content[..CHUNK_BYTES]).unwrap();
        writer.sync().unwrap();
        let err = store.read_blob(&hash, &mut std::io::sink()).unwrap_err();
        assert!(err.to_string().contains("chunk 1"), "{err}");
        crate::store::scanstore::use_for(&db, ScanStore::Local);
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
