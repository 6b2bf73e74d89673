//! Where scans' chunk bytes live: local files beside the database (the default) or an
//! S3-compatible object store, one object per chunk at `PREFIX/SCAN_HASH/IDX`.
//!
//! Metadata (which scans exist, each chunk's hash and length) stays in SQLite either way, and a
//! chunk's row commits only after its bytes are durable: fsynced in a local file, or its PUT
//! acknowledged by the object store. Keys are content addressed, so two writers of one scan PUT
//! the same bytes and a cut transfer resumes chunk by chunk.
//!
//! The store is opened by path on many threads and connections (every scan transfer opens its
//! own), so the backend of a database is registered once per process ([`use_for`]) and every
//! [`super::Store`] opened on that path uses it. The object store's client is async: it runs on
//! a small runtime of its own, and callers (sync code, possibly inside another runtime's
//! blocking threads) wait on a channel, never with `block_on`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::blobs::{Hash, CHUNK_BYTES};
use super::{Result, StoreError};

/// Chunk PUTs of one scan writer in flight at once: overlaps the round trips to the bucket.
const PUTS_IN_FLIGHT_MAX: usize = 8;
/// Chunk GETs a reader of a whole scan runs ahead of its output.
const GETS_AHEAD_MAX: usize = 8;
/// Worker threads of the object store's own runtime: requests are I/O bound.
const S3_WORKER_THREADS: usize = 2;
/// A bucket that does not answer a connection in this long is reported unreachable.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One request (a 256 KiB chunk) taking longer than this is failed and retried.
const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries of one failed request, and the longest time spent retrying it.
const S3_RETRIES_MAX: usize = 3;
const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings of an S3-compatible bucket holding scans (from `[scans.s3]` and credentials).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `http://HOST:PORT` or `https://HOST`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Key prefix, without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Settings {
    // The secret never reaches a log or an error message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "s3://{}/{} at {}",
            self.bucket, self.prefix, self.endpoint
        )
    }
}

/// The backend holding a database's scan bytes.
#[derive(Clone, Default)]
pub enum ScanStore {
    /// One file per scan in `blobs/` beside the database.
    #[default]
    Local,
    S3(Arc<S3Scans>),
}

impl std::fmt::Debug for ScanStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanStore::Local => f.write_str("local files"),
            ScanStore::S3(s3) => write!(f, "{:?}", s3.settings),
        }
    }
}

/// The databases of this process whose scans are not in local files, by database path.
fn registry() -> &'static Mutex<HashMap<PathBuf, ScanStore>> {
    static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, ScanStore>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// One name per database file however the path to it was spelled.
fn registry_key(db: &Path) -> PathBuf {
    let dir = db.parent().unwrap_or(Path::new("."));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    dir.join(db.file_name().unwrap_or_default())
}

/// Makes every store opened on `db` in this process keep its scans in `scans`.
pub fn use_for(db: &Path, scans: ScanStore) {
    let mut map = registry().lock().unwrap_or_else(|e| e.into_inner());
    match scans {
        ScanStore::Local => map.remove(&registry_key(db)),
        other => map.insert(registry_key(db), other),
    };
}

/// Makes every store opened on `db` in this process keep its scans in the bucket of
/// `settings`; a client already registered with the same settings is kept (one runtime).
pub fn use_s3_for(db: &Path, settings: S3Settings) -> Result<()> {
    if let ScanStore::S3(s3) = for_db(db) {
        if s3.settings == settings {
            return Ok(());
        }
    }
    use_for(db, ScanStore::S3(Arc::new(S3Scans::new(settings)?)));
    Ok(())
}

/// The backend registered for `db`, local files if none was.
pub(crate) fn for_db(db: &Path) -> ScanStore {
    let map = registry().lock().unwrap_or_else(|e| e.into_inner());
    map.get(&registry_key(db)).cloned().unwrap_or_default()
}

/// A bucket of scans and the runtime its client runs on.
pub struct S3Scans {
    settings: S3Settings,
    client: Arc<dyn ObjectStore>,
    handle: tokio::runtime::Handle,
    /// Shut down without waiting when the store is dropped (possibly inside another runtime,
    /// where a blocking shutdown would panic).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for S3Scans {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn s3_err(what: impl Into<String>) -> impl FnOnce(object_store::Error) -> StoreError {
    let what = what.into();
    move |error| StoreError::ObjectStore {
        what,
        error: Box::new(error),
    }
}

impl S3Scans {
    /// A client of the bucket; nothing is sent until it is used ([`S3Scans::probe`] checks).
    pub fn new(settings: S3Settings) -> Result<S3Scans> {
        let invalid = |m: String| StoreError::Invalid(format!("scans.s3: {m}"));
        let client = AmazonS3Builder::new()
            .with_endpoint(&settings.endpoint)
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(&settings.secret_access_key)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(settings.endpoint.starts_with("http://"))
                    .with_connect_timeout(S3_CONNECT_TIMEOUT)
                    .with_timeout(S3_REQUEST_TIMEOUT),
            )
            .with_retry(RetryConfig {
                max_retries: S3_RETRIES_MAX,
                retry_timeout: S3_RETRY_TIMEOUT,
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Self::with_client(settings, Arc::new(client))
    }

    fn with_client(settings: S3Settings, client: Arc<dyn ObjectStore>) -> Result<S3Scans> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(S3_WORKER_THREADS)
            .thread_name("scan-s3")
            .enable_all()
            .build()
            .map_err(|source| StoreError::Io {
                path: "scan store runtime".into(),
                source,
            })?;
        Ok(S3Scans {
            settings,
            client,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// A store over an in-memory bucket, for tests of everything above the wire.
    #[cfg(test)]
    pub(crate) fn in_memory() -> S3Scans {
        let settings = S3Settings {
            endpoint: "memory:".into(),
            bucket: "memory".into(),
            region: String::new(),
            prefix: "scans".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
        };
        Self::with_client(settings, Arc::new(object_store::memory::InMemory::new()))
            .expect("a runtime")
    }

    pub fn settings(&self) -> &S3Settings {
        &self.settings
    }

    /// Starts `fut` on the store's runtime; the result arrives on the returned channel.
    fn start<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Receiver<T> {
        let (tx, rx) = sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx
    }

    /// The key prefix of scan `hash`'s chunk objects.
    fn scan_dir(&self, hash: &Hash) -> ObjectPath {
        let hash = hex::encode(hash);
        if self.settings.prefix.is_empty() {
            ObjectPath::from(hash)
        } else {
            ObjectPath::from(format!("{}/{hash}", self.settings.prefix))
        }
    }

    /// The object key of chunk `idx` of scan `hash`.
    fn key(&self, hash: &Hash, idx: u64) -> ObjectPath {
        self.scan_dir(hash).child(idx.to_string())
    }

    /// How an object is named in messages.
    fn url(&self, key: &ObjectPath) -> String {
        format!("s3://{}/{key}", self.settings.bucket)
    }

    /// Lists at most one key under the prefix: fails when the bucket is unreachable, missing,
    /// or refuses the credentials.
    pub fn probe(&self) -> Result<()> {
        let client = self.client.clone();
        let prefix = (!self.settings.prefix.is_empty())
            .then(|| ObjectPath::from(self.settings.prefix.as_str()));
        let what = format!("s3://{}/{}", self.settings.bucket, self.settings.prefix);
        self.start(async move { client.list_with_delimiter(prefix.as_ref()).await })
            .recv()
            .map_err(|_| runtime_gone())?
            .map(drop)
            .map_err(s3_err(what))
    }

    /// Starts the GET of chunk `idx`; the result is its bytes, not yet verified.
    fn start_get(
        &self,
        hash: &Hash,
        idx: u64,
    ) -> (ObjectPath, Receiver<object_store::Result<Bytes>>) {
        let key = self.key(hash, idx);
        let client = self.client.clone();
        let k = key.clone();
        let rx = self.start(async move { client.get(&k).await?.bytes().await });
        (key, rx)
    }

    /// Waits for a GET started by [`S3Scans::start_get`] and checks the bytes against the row.
    fn finish_get(
        &self,
        hash: &Hash,
        idx: u64,
        key: &ObjectPath,
        rx: Receiver<object_store::Result<Bytes>>,
        len: usize,
        chunk_hash: &[u8],
    ) -> Result<Vec<u8>> {
        let data = match rx.recv().map_err(|_| runtime_gone())? {
            Ok(data) => data,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Corrupt(format!(
                    "scan {}: chunk {idx} ({}) is missing from the bucket",
                    hex::encode(hash),
                    self.url(key)
                )))
            }
            Err(e) => return Err(s3_err(self.url(key))(e)),
        };
        if data.len() != len || blake3::hash(&data).as_bytes()[..] != chunk_hash[..] {
            return Err(StoreError::Corrupt(format!(
                "scan {}: chunk {idx} ({}) is damaged",
                hex::encode(hash),
                self.url(key)
            )));
        }
        Ok(data.to_vec())
    }

    /// Chunk `idx` of a scan, verified against its row's length and hash.
    pub(crate) fn read_chunk(
        &self,
        hash: &Hash,
        idx: u64,
        len: usize,
        chunk_hash: &[u8],
    ) -> Result<Vec<u8>> {
        let (key, rx) = self.start_get(hash, idx);
        self.finish_get(hash, idx, &key, rx, len, chunk_hash)
    }

    /// Every chunk of `rows` (idx, chunk hash, length, in order) through `each`, verified, with
    /// at most [`GETS_AHEAD_MAX`] GETs running ahead: a scan streams, never whole in memory.
    pub(crate) fn read_chunks(
        &self,
        hash: &Hash,
        rows: &[(i64, Vec<u8>, i64)],
        mut each: impl FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<()> {
        let mut ahead = VecDeque::new();
        let mut next = 0;
        for (idx, chunk_hash, len) in rows {
            while ahead.len() < GETS_AHEAD_MAX && next < rows.len() {
                ahead.push_back(self.start_get(hash, rows[next].0 as u64));
                next += 1;
            }
            let (key, rx) = ahead.pop_front().expect("a GET runs for every row");
            let data = self.finish_get(hash, *idx as u64, &key, rx, *len as usize, chunk_hash)?;
            each(data)?;
        }
        Ok(())
    }

    /// Indexes of the chunk objects of scan `hash` in the bucket (one listing, whatever their
    /// number: a copy learns what an earlier, cut one left without a request per chunk).
    pub(crate) fn chunks_listed(&self, hash: &Hash) -> Result<HashSet<u64>> {
        let dir = self.scan_dir(hash);
        let client = self.client.clone();
        let what = self.url(&dir);
        let d = dir.clone();
        let listed = self
            .start(async move { client.list_with_delimiter(Some(&d)).await })
            .recv()
            .map_err(|_| runtime_gone())?
            .map_err(s3_err(what))?;
        Ok(listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename()?.parse().ok())
            .collect())
    }

    /// A writer of chunks of scan `hash`.
    pub(crate) fn writer(self: &Arc<Self>, hash: &Hash) -> S3Writer {
        S3Writer {
            s3: self.clone(),
            hash: *hash,
            puts: Arc::new(Mutex::new(Puts::default())),
        }
    }
}

fn runtime_gone() -> StoreError {
    StoreError::Io {
        path: "scan store runtime".into(),
        source: std::io::Error::other("it stopped; restart communesync"),
    }
}

/// PUTs of one writer not yet waited for, and the first that failed.
#[derive(Default)]
struct Puts {
    running: VecDeque<(u64, Receiver<object_store::Result<()>>)>,
    failed: Option<String>,
}

/// Writes verified chunks of one scan to the bucket; a chunk is durable once [`S3Writer::sync`]
/// has seen its PUT acknowledged. Clones share their PUTs, so one handle may write while
/// another syncs (as a receiver's committer thread does).
#[derive(Clone)]
pub struct S3Writer {
    s3: Arc<S3Scans>,
    hash: Hash,
    puts: Arc<Mutex<Puts>>,
}

impl S3Writer {
    /// Starts the PUT of chunk `idx`; waits first for the oldest when too many run.
    pub(crate) fn write(&self, idx: u64, data: &[u8]) -> Result<()> {
        assert!(data.len() <= CHUNK_BYTES, "a chunk is at most CHUNK_BYTES");
        let key = self.s3.key(&self.hash, idx);
        let client = self.s3.client.clone();
        let payload = PutPayload::from(Bytes::copy_from_slice(data));
        let rx = self
            .s3
            .start(async move { client.put(&key, payload).await.map(drop) });
        let oldest = {
            let mut puts = self.puts.lock().unwrap_or_else(|e| e.into_inner());
            puts.running.push_back((idx, rx));
            (puts.running.len() > PUTS_IN_FLIGHT_MAX)
                .then(|| puts.running.pop_front())
                .flatten()
        };
        match oldest {
            Some(put) => self.wait(vec![put]),
            None => Ok(()),
        }
    }

    /// Waits for `puts`; a failure is remembered, so no later sync reports success.
    fn wait(&self, puts: Vec<(u64, Receiver<object_store::Result<()>>)>) -> Result<()> {
        for (idx, rx) in puts {
            let outcome = rx.recv().map_err(|_| runtime_gone())?;
            if let Err(e) = outcome {
                let err = s3_err(self.s3.url(&self.s3.key(&self.hash, idx)))(e);
                let mut state = self.puts.lock().unwrap_or_else(|e| e.into_inner());
                state.failed.get_or_insert_with(|| err.to_string());
                return Err(err);
            }
        }
        Ok(())
    }

    /// Waits until every chunk written so far is acknowledged; only then may rows naming them
    /// commit. Fails if any PUT of this writer failed.
    pub(crate) fn sync(&self) -> Result<()> {
        let running: Vec<_> = {
            let mut puts = self.puts.lock().unwrap_or_else(|e| e.into_inner());
            puts.running.drain(..).collect()
        };
        self.wait(running)?;
        let puts = self.puts.lock().unwrap_or_else(|e| e.into_inner());
        match &puts.failed {
            Some(message) => Err(StoreError::ObjectStore {
                what: format!("scan {}", hex::encode(self.hash)),
                error: Box::new(object_store::Error::Generic {
                    store: "S3",
                    source: format!("a chunk was not stored: {message}").into(),
                }),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip_and_damage_or_loss_is_named() {
        let s3 = Arc::new(S3Scans::in_memory());
        let hash = [7u8; 32];
        let writer = s3.writer(&hash);
        let chunks: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 1000 + i as usize]).collect();
        for (idx, data) in chunks.iter().enumerate() {
            writer.write(idx as u64, data).unwrap();
        }
        writer.sync().unwrap();
        let rows: Vec<(i64, Vec<u8>, i64)> = chunks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    i as i64,
                    blake3::hash(d).as_bytes().to_vec(),
                    d.len() as i64,
                )
            })
            .collect();
        let mut read = Vec::new();
        s3.read_chunks(&hash, &rows, |data| {
            read.push(data);
            Ok(())
        })
        .unwrap();
        assert_eq!(read, chunks);
        assert_eq!(s3.chunks_listed(&hash).unwrap(), (0..20).collect());
        assert!(s3.chunks_listed(&[9u8; 32]).unwrap().is_empty());

        // Another chunk's bytes under chunk 5's key: damage, named with its object.
        let w = s3.writer(&hash);
        w.write(5, &chunks[6]).unwrap();
        w.sync().unwrap();
        let err = s3.read_chunk(&hash, 5, 1005, &rows[5].1).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
        assert!(err.to_string().contains("scans/0707"), "{err}");
        let err = s3.read_chunk(&[8u8; 32], 0, 10, &rows[0].1).unwrap_err();
        assert!(err.to_string().contains("missing from the bucket"), "{err}");
    }

    #[test]
    fn an_unreachable_bucket_is_reported_with_its_name() {
        let s3 = S3Scans::new(S3Settings {
            // A port nothing listens on (the discard service is not run here).
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "scans".into(),
            region: "us-east-1".into(),
            prefix: "qn".into(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
        })
        .unwrap();
        let err = s3.probe().unwrap_err().to_string();
        assert!(err.contains("s3://scans/qn"), "{err}");
        assert!(!err.contains("\"s\""), "no secret in {err}");
    }

    #[test]
    fn a_registered_backend_follows_the_database_however_its_path_is_spelled() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("node.db");
        assert!(matches!(for_db(&db), ScanStore::Local));
        use_for(&db, ScanStore::S3(Arc::new(S3Scans::in_memory())));
        let other = dir.path().join(".").join("node.db");
        assert!(matches!(for_db(&other), ScanStore::S3(_)));
        use_for(&db, ScanStore::Local);
        assert!(matches!(for_db(&db), ScanStore::Local));
    }
}
