//! `restore`: puts a backup taken by `communesync backup` in place of a node's database and
//! scan files, keeping the database it replaces aside. Never deletes anything of the node's.
//!
//! It does not open the node's current database: that database may be the damaged one.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use super::{config, NodeError, Result, DB_FILE, KEY_FILE, WAKE_SOCKET};
use crate::trust::fsutil::{create_private_dir, rename_no_replace, sync_dir_io, temp_beside};
use crate::trust::NodeKey;

/// The directory of scan files beside a database (the store's layout).
const BLOB_DIR: &str = "blobs";
/// Files of a database besides the database itself, kept aside with it.
const DB_COMPANIONS: [&str; 2] = ["-wal", "-shm"];

/// What `restore` did.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    pub from: PathBuf,
    pub database: PathBuf,
    /// Where the database it replaced now is (None when the node had none).
    pub kept_aside: Option<PathBuf>,
    pub documents: u64,
    pub scans: u64,
    /// Scan files copied from the backup's `blobs/`, and those already there whole.
    pub scan_files_copied: u64,
    pub scan_files_present: u64,
}

/// Restores the backup `from` (a database written by `communesync backup --out`, with its
/// `blobs/` beside it) into the node in `dir`.
///
/// Order, so that a failure or crash at any step leaves a node that opens: the backup is
/// checked, then its scan files are copied in (content-addressed: extra files are harmless),
/// then the backup is copied to a temporary file in `dir` and made durable, and only then is
/// the current database linked aside and the copy renamed over it.
pub fn restore(dir: &Path, from: &Path) -> Result<RestoreReport> {
    if !dir.join(config::CONFIG_FILE).exists() {
        return Err(NodeError::NotInitialised(dir.to_path_buf()));
    }
    let (config, _) = config::Config::load(dir)?;
    refuse_if_served(dir)?;
    let facts = read_backup(from)?;
    if facts.unit != config.node.unit {
        return Err(NodeError::Invalid(format!(
            "{} is a backup of a node of {}, but this node is {}; restore it into a node of its own unit",
            from.display(),
            facts.unit,
            config.node.unit
        )));
    }
    // A node whose key is lost restores its key from the same backup first (operations.md).
    if let Ok(key) = NodeKey::load(dir.join(KEY_FILE)) {
        if key.node_id().to_string() != facts.node_id {
            return Err(NodeError::Invalid(format!(
                "{} is a backup of node {}, but this node's key is node {}; restore the key of the same node, or enrol this one anew (docs/operations.md)",
                from.display(),
                facts.node_id,
                key.node_id()
            )));
        }
    }

    let backup_blobs = crate::trust::fsutil::parent_dir(from).join(BLOB_DIR);
    // Restored rows that name a scan as stored make the node never ask for it again: its file
    // must be in the backup's blobs/ or already in the node's.
    // A node whose scans are in a bucket finds them there (`check` reads them all).
    let in_bucket = config.scans.store == config::ScanBackend::S3;
    let unfiled = facts
        .scan_hashes
        .iter()
        .filter(|h| !backup_blobs.join(h).is_file() && !dir.join(BLOB_DIR).join(h).is_file())
        .count()
        * usize::from(!in_bucket);
    if unfiled > 0 {
        return Err(NodeError::Invalid(format!(
            "{} names {unfiled} scan(s) whose files are neither in {} nor in the node's {BLOB_DIR}/: put the backup's {BLOB_DIR}/ directory beside it, as `communesync backup` wrote it",
            from.display(),
            backup_blobs.display()
        )));
    }
    let (scan_files_copied, scan_files_present) = if in_bucket {
        (0, 0)
    } else {
        copy_scan_files(&backup_blobs, &dir.join(BLOB_DIR))?
    };

    let database = dir.join(DB_FILE);
    let staged = temp_beside(&database, std::ffi::OsStr::new(DB_FILE), "restoring");
    let staged_result = stage_copy(from, &staged);
    if let Err(e) = staged_result {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }

    let kept_aside = swap_in(&staged, &database)?;
    sync_dir_io(dir).map_err(io_at(dir))?;
    Ok(RestoreReport {
        from: from.to_path_buf(),
        database,
        kept_aside,
        documents: facts.documents,
        scans: facts.scan_hashes.len() as u64,
        scan_files_copied,
        scan_files_present,
    })
}

/// A `serve` on the data directory answers on its wake socket; replacing the database under
/// it would lose its writes and confuse its sessions.
pub(super) fn refuse_if_served(dir: &Path) -> Result<()> {
    let socket = dir.join(WAKE_SOCKET);
    let answers = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(&socket))
        .is_ok();
    if answers {
        return Err(NodeError::Invalid(format!(
            "a `communesync serve` is running on {} ({} answers): stop it first (systemctl stop communesync), then run this again",
            dir.display(),
            socket.display()
        )));
    }
    Ok(())
}

/// What the backup says about itself.
struct BackupFacts {
    node_id: String,
    unit: String,
    documents: u64,
    /// Hashes (hex) of the scans the backup holds whole.
    scan_hashes: Vec<String>,
}

/// Opens the backup read-only and checks it is a whole communesync database.
fn read_backup(from: &Path) -> Result<BackupFacts> {
    let not_ours = |why: String| {
        NodeError::Invalid(format!(
            "{} is not a communesync database ({why}); give the FILE that `communesync backup --out FILE` wrote",
            from.display()
        ))
    };
    let meta = std::fs::metadata(from).map_err(io_at(from))?;
    if !meta.is_file() {
        return Err(not_ours("not a regular file".into()));
    }
    let conn = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| not_ours(e.to_string()))?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| not_ours(e.to_string()))?;
    if check != "ok" {
        return Err(NodeError::Invalid(format!(
            "{} is damaged (SQLite's check says: {check}); restore an older backup",
            from.display()
        )));
    }
    let meta_value = |key: &str| -> Result<String> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| not_ours(e.to_string()))?
            .ok_or_else(|| not_ours(format!("it records no {key}")))
    };
    let (node_id, unit) = (meta_value("node_id")?, meta_value("unit")?);
    let count = |table: &str| -> Result<u64> {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
        .map_err(|e| not_ours(e.to_string()))
    };
    let documents = count("docs")?;
    let mut stmt = conn
        .prepare("SELECT lower(hex(hash)) FROM blobs")
        .map_err(|e| not_ours(e.to_string()))?;
    let scan_hashes = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
        .map_err(|e| not_ours(e.to_string()))?;
    Ok(BackupFacts {
        node_id,
        unit,
        documents,
        scan_hashes,
    })
}

/// Copies the backup to `staged`, gives the copy an epoch of its own and makes it durable.
///
/// A new epoch for every restore, not the backup's: the same backup restored twice is two
/// different histories to the peers, and each time they must offer again what the node lost.
fn stage_copy(from: &Path, staged: &Path) -> Result<()> {
    let mut source = File::open(from).map_err(io_at(from))?;
    let mut copy = crate::trust::fsutil::create_private_file(staged).map_err(io_at(staged))?;
    std::io::copy(&mut source, &mut copy).map_err(io_at(staged))?;
    copy.sync_all().map_err(io_at(staged))?;
    drop(copy);
    crate::store::new_epoch(staged)?;
    // The epoch update went through a journal that SQLite synced and removed; the file itself
    // is synced again so the rename below never exposes an older state of it.
    File::open(staged)
        .and_then(|f| f.sync_all())
        .map_err(io_at(staged))
}

/// Keeps the current database as `node.db.before-restore-TIME` (with its WAL and shared-memory
/// files under the same new name, so SQLite still finds them) and renames `staged` over it.
///
/// `node.db` names a database that opens at every instant: the current one is first
/// checkpointed (its WAL emptied into it, when it opens at all), then hard-linked to the new
/// name; its WAL is unlinked from the old name before the restored copy replaces the database
/// in one rename, so SQLite never replays the old WAL onto the restored file.
fn swap_in(staged: &Path, database: &Path) -> Result<Option<PathBuf>> {
    if !database.exists() {
        rename_no_replace(staged, database).map_err(io_at(database))?;
        return Ok(None);
    }
    if let Ok(conn) = Connection::open(database) {
        let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }
    let now = time::OffsetDateTime::now_utc();
    let aside = database.with_file_name(format!(
        "{DB_FILE}.before-restore-{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    ));
    std::fs::hard_link(database, &aside).map_err(io_at(&aside))?;
    for suffix in DB_COMPANIONS {
        let (from, to) = (with_suffix(database, suffix), with_suffix(&aside, suffix));
        if from.exists() {
            std::fs::hard_link(&from, &to).map_err(io_at(&to))?;
            std::fs::remove_file(&from).map_err(io_at(&from))?;
        }
    }
    std::fs::rename(staged, database).map_err(io_at(database))?;
    Ok(Some(aside))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Copies the backup's scan files that the node lacks or holds with other bytes (a file still
/// being received, or a damaged one), each through a temporary name, synced; returns (copied,
/// already present).
fn copy_scan_files(from_dir: &Path, to_dir: &Path) -> Result<(u64, u64)> {
    if !from_dir.is_dir() {
        return Ok((0, 0));
    }
    create_private_dir(to_dir).map_err(io_at(to_dir))?;
    let (mut copied, mut present) = (0, 0);
    for entry in std::fs::read_dir(from_dir).map_err(io_at(from_dir))? {
        let from = entry.map_err(io_at(from_dir))?.path();
        let Some(name) = from.file_name() else {
            continue;
        };
        // Only scan files: names of 64 hex digits (no temporary files of a backup in progress).
        let is_scan = name
            .to_str()
            .is_some_and(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()));
        if !is_scan || !from.is_file() {
            continue;
        }
        let to = to_dir.join(name);
        let size = std::fs::metadata(&from).map_err(io_at(&from))?.len();
        // Equal lengths are compared byte for byte: a scan still in transit grows by chunks
        // written at their offsets, so its length alone does not say which chunks it holds.
        if std::fs::metadata(&to).is_ok_and(|m| m.len() == size) && same_bytes(&from, &to)? {
            present += 1;
            continue;
        }
        let tmp = temp_beside(&to, name, "restoring");
        let written = (|| {
            let mut source = File::open(&from)?;
            let mut copy = crate::trust::fsutil::create_private_file(&tmp)?;
            std::io::copy(&mut source, &mut copy)?;
            copy.sync_all()?;
            std::fs::rename(&tmp, &to)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_at(&to)(e));
        }
        copied += 1;
    }
    sync_dir_io(to_dir).map_err(io_at(to_dir))?;
    Ok((copied, present))
}

/// Whether two files of the same length hold the same bytes, read in bounded pieces.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    const PIECE_BYTES: usize = 256 * 1024;
    let (mut fa, mut fb) = (
        File::open(a).map_err(io_at(a))?,
        File::open(b).map_err(io_at(b))?,
    );
    let (mut ba, mut bb) = (vec![0u8; PIECE_BYTES], vec![0u8; PIECE_BYTES]);
    loop {
        let n = fa.read(&mut ba).map_err(io_at(a))?;
        if n == 0 {
            return Ok(true);
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}
