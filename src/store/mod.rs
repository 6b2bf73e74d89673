//! SQLite persistence for one node: documents, blobs, index tables, users, checkpoints.
//!
//! Knows SQL and Automerge bytes; knows nothing of the network or the CLI. Every write runs in
//! one `BEGIN IMMEDIATE` transaction, so a call that returns Ok has committed (WAL, synchronous=FULL)
//! and one that fails has changed nothing.

pub mod blobs;
pub mod docs;
pub mod fault;
pub mod index;
pub mod scanstore;
mod schema;
pub mod sigs;
pub mod status;
pub mod sync;
#[cfg(test)]
mod testutil;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};

use crate::model::ModelError;

pub use docs::{DocCache, DocRecord};
pub use schema::SCHEMA_VERSION;

/// How long a writer waits for another process's write lock before giving up.
const BUSY_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}{}", fault::sqlite_advice(.source, .path))]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {0} already exists: this node is already initialised")]
    Exists(PathBuf),
    #[error("no database at {0}: run `communesync init` first, or pass --data DIR")]
    Missing(PathBuf),
    #[error("database {path} has schema version {found}, newer than this program's {known}: upgrade communesync")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error("stored data is corrupt: {0}; run `communesync check`, and restore from a backup if it reports damage")]
    Corrupt(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}{}", fault::io_advice(.source, .path))]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// The object store's error with its causes in one line, then the advice (not a `source`:
    /// the advice would otherwise come before the cause).
    #[error("scan store {what}: {}; check [scans.s3] in config.toml, the credentials, and that the bucket answers (`communesync check`)", fault::with_causes(.error.as_ref()))]
    ObjectStore {
        what: String,
        error: Box<object_store::Error>,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Creates a new, empty file with mode 0600 whatever the umask; fails if anything is there.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// One node's database.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    cache: DocCache,
    /// This node's unit, once `init` has recorded it: which subtrees need their own feed. The
    /// unit's current path when the province's tree moved it ([`Store::set_aliases`]).
    unit: Option<String>,
    /// Former unit paths of the node's tree: documents' parties are indexed under the current
    /// path of the unit they name, so a moved unit's old documents are in its new subtree.
    aliases: crate::units::Aliases,
    /// Signs the changes of local writes (the node sets it at open; a bare store signs nothing).
    signer: Option<Box<dyn sigs::ChangeSigning>>,
    /// Where the scans' bytes are (registered for this path, see [`scanstore::use_for`]).
    scans: scanstore::ScanStore,
}

/// Attaches the database path to a SQLite error.
pub(crate) trait SqlContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        })
    }
}

impl Store {
    /// Creates a new database, readable by the owner only; refuses if one exists.
    pub fn create(path: &Path, cache_docs: usize) -> Result<Store> {
        // SQLite creates its file with mode 0644 less the umask, and gives the -wal and -shm
        // files the database file's mode: an empty file made first with 0600 keeps all three
        // private (SQLite takes an empty file for a new database).
        create_private_file(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => StoreError::Exists(path.to_path_buf()),
            _ => StoreError::Io {
                path: path.to_path_buf(),
                source,
            },
        })?;
        Self::open_with(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            cache_docs,
        )
    }

    /// Opens an existing database, migrating it to the current schema.
    pub fn open(path: &Path, cache_docs: usize) -> Result<Store> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        Self::open_with(path, OpenFlags::SQLITE_OPEN_READ_WRITE, cache_docs)
    }

    fn open_with(path: &Path, flags: OpenFlags, cache_docs: usize) -> Result<Store> {
        let mut conn =
            Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX).at(path)?;
        conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
            .at(path)?;
        // WAL keeps readers off the writer's back; FULL makes each commit survive power loss.
        conn.pragma_update(None, "journal_mode", "WAL").at(path)?;
        conn.pragma_update(None, "synchronous", "FULL").at(path)?;
        conn.pragma_update(None, "foreign_keys", "ON").at(path)?;
        schema::migrate(&mut conn, path)?;
        let unit = index::node_unit(&conn, path)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            cache: DocCache::new(cache_docs),
            unit,
            aliases: Default::default(),
            signer: None,
            scans: scanstore::for_db(path),
        })
    }

    /// Signs every change a local write makes from now on ([`sigs::ChangeSigning`]).
    pub fn set_signer(&mut self, signer: Box<dyn sigs::ChangeSigning>) {
        self.signer = Some(signer);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where this database's scans' bytes are.
    pub fn scans(&self) -> &scanstore::ScanStore {
        &self.scans
    }

    #[cfg(test)]
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Runs `f` in one write transaction; commits only if it returns Ok.
    pub fn write<T>(&mut self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<T>) -> Result<T> {
        self.write_with(f)
    }

    /// [`Store::write`] for a caller whose own errors can also end the transaction.
    pub fn write_with<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        let mut wtx = WriteTx {
            tx,
            path: &path,
            cache: &mut self.cache,
            touched: VecDeque::new(),
            feed: None,
            unit: self.unit.as_deref(),
            aliases: &self.aliases,
            new_files: Vec::new(),
            signer: self.signer.as_deref(),
            scans: &self.scans,
        };
        let outcome = f(&mut wtx).and_then(|value| {
            wtx.flush_feed()?;
            Ok(value)
        });
        let WriteTx {
            tx,
            touched,
            cache,
            new_files,
            ..
        } = wtx;
        let committed = outcome.and_then(|value| {
            tx.commit().at(&path)?;
            Ok(value)
        });
        match committed {
            Ok(value) => {
                cache.commit(touched);
                Ok(value)
            }
            Err(e) => {
                // The rollback leaves the scan files this transaction created unreferenced.
                for file in new_files {
                    let _ = std::fs::remove_file(file);
                }
                Err(e)
            }
        }
    }

    /// A consistent copy of the database, taken while it is in use (SQLite's VACUUM INTO), and
    /// of the files of the scans it holds, into `blobs/` beside `dest`.
    /// The copy is readable by the owner only, like the database.
    pub fn backup_to(&self, dest: &Path) -> Result<()> {
        // VACUUM INTO writes into an empty file it is given, keeping that file's mode.
        create_private_file(dest).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => StoreError::Invalid(format!(
                "{} already exists; choose a new file for the backup",
                dest.display()
            )),
            _ => StoreError::Io {
                path: dest.to_path_buf(),
                source,
            },
        })?;
        let copied = self
            .conn
            .execute("VACUUM INTO ?1", [dest.to_string_lossy()])
            .at(&self.path)
            .and_then(|_| new_epoch(dest));
        if let Err(e) = copied {
            // The file is the one just created here: nothing of anyone else's is removed.
            let _ = std::fs::remove_file(dest);
            return Err(e);
        }
        blobs::backup_scan_files(self, dest)
    }

    /// SQLite's own consistency check of the file: "ok" or the problems it found.
    pub fn integrity_check(&self, full: bool) -> Result<Vec<String>> {
        let pragma = if full {
            "PRAGMA integrity_check"
        } else {
            "PRAGMA quick_check"
        };
        let mut stmt = self.conn.prepare(pragma).at(&self.path)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Ids of every stored document after `after`, in id order (for paging through all of them).
    pub fn doc_ids_after(&self, after: &str, limit: usize) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM docs WHERE id > ?1 ORDER BY id LIMIT ?2")
            .at(&self.path)?;
        let rows = stmt
            .query_map(rusqlite::params![after, limit as i64], |r| r.get(0))
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Hashes of every stored scan after `after`, in order.
    pub fn blob_hashes_after(&self, after: &[u8], limit: usize) -> Result<Vec<Vec<u8>>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT hash FROM blobs WHERE hash > ?1 ORDER BY hash LIMIT ?2")
            .at(&self.path)?;
        let rows = stmt
            .query_map(rusqlite::params![after, limit as i64], |r| r.get(0))
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// The random id of this copy of the database (see [`new_epoch`]).
    pub fn epoch(&self) -> Result<String> {
        Ok(self.meta("epoch")?.unwrap_or_default())
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .at(&self.path)
    }

    pub fn users(&self) -> Result<Vec<User>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, title, created_at FROM users ORDER BY name")
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(User {
                    name: r.get(0)?,
                    title: r.get(1)?,
                    created_at_ms: r.get(2)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    pub fn user_exists(&self, name: &str) -> Result<bool> {
        self.conn
            .query_row("SELECT 1 FROM users WHERE name = ?1", [name], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
            .at(&self.path)
    }
}

/// A user account of this node's unit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct User {
    pub name: String,
    pub title: Option<String>,
    pub created_at_ms: i64,
}

/// An open write transaction, with the document cache updated only once it commits.
pub struct WriteTx<'a> {
    tx: Transaction<'a>,
    path: &'a Path,
    cache: &'a mut DocCache,
    /// Documents written, for the cache; never more than the cache holds, so a transaction
    /// that stores thousands of documents does not keep them all in memory until it commits.
    touched: VecDeque<(crate::model::DocId, DocRecord)>,
    /// The change feed's position as this transaction has advanced it: (read at first use,
    /// now). Written back once before commit rather than once per saved document.
    feed: Option<(i64, i64)>,
    /// This node's unit (see [`Store`]).
    unit: Option<&'a str>,
    /// Former unit paths (see [`Store`]).
    aliases: &'a crate::units::Aliases,
    /// Scan files this transaction created and nothing else was writing: removed if it rolls
    /// back, so a refused write leaves no file behind.
    new_files: Vec<PathBuf>,
    /// Signs the changes of local writes ([`Store::set_signer`]).
    signer: Option<&'a dyn sigs::ChangeSigning>,
    /// Where scan bytes written in this transaction go.
    scans: &'a scanstore::ScanStore,
}

impl WriteTx<'_> {
    /// The next position of the change feed, for one saved document.
    fn next_feed_seq(&mut self) -> Result<i64> {
        let (read, now) = match self.feed {
            Some(feed) => feed,
            None => {
                let seq: i64 = self
                    .tx
                    .prepare_cached("SELECT seq FROM feed WHERE id = 1")
                    .at(self.path)?
                    .query_row([], |r| r.get(0))
                    .at(self.path)?;
                (seq, seq)
            }
        };
        self.feed = Some((read, now + 1));
        Ok(now + 1)
    }

    fn flush_feed(&mut self) -> Result<()> {
        if let Some((read, now)) = self.feed.take() {
            if now != read {
                let updated = self
                    .tx
                    .prepare_cached("UPDATE feed SET seq = ?1 WHERE id = 1 AND seq = ?2")
                    .at(self.path)?
                    .execute([now, read])
                    .at(self.path)?;
                // Nothing else writes the feed while this transaction holds the write lock.
                if updated != 1 {
                    return Err(StoreError::Corrupt(
                        "the change feed moved inside a write transaction".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Remembers a written document for the cache; the oldest is forgotten when full, as the
    /// cache would drop it anyway.
    fn touch(&mut self, id: crate::model::DocId, rec: DocRecord) {
        if self.touched.len() >= self.cache.capacity() {
            self.touched.pop_front();
        }
        self.touched.push_back((id, rec));
    }

    pub fn path(&self) -> &Path {
        self.path
    }

    pub fn delete_meta(&self, key: &str) -> Result<()> {
        self.tx
            .execute("DELETE FROM meta WHERE key = ?1", [key])
            .at(self.path)?;
        Ok(())
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.tx
            .execute("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])
            .at(self.path)?;
        Ok(())
    }

    pub fn add_user(&self, name: &str, title: Option<&str>, at_ms: i64) -> Result<User> {
        let inserted = self
            .tx
            .execute(
                "INSERT OR IGNORE INTO users(name, title, created_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![name, title, at_ms],
            )
            .at(self.path)?;
        if inserted == 0 {
            return Err(StoreError::Invalid(format!("user {name} already exists")));
        }
        Ok(User {
            name: name.to_string(),
            title: title.map(str::to_string),
            created_at_ms: at_ms,
        })
    }
}

/// Gives a backup copy its own epoch: a node restored from it then tells its peers, in its
/// Hello, that it is not the database they last synced with, and they offer it again what it
/// may have lost (its own work since the backup included).
pub(crate) fn new_epoch(copy: &Path) -> Result<()> {
    let conn = Connection::open(copy).at(copy)?;
    conn.execute(
        "UPDATE meta SET value = lower(hex(randomblob(8))) WHERE key = 'epoch'",
        [],
    )
    .at(copy)?;
    Ok(())
}
