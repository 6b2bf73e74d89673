//! Versioned schema migrations, applied in order inside one transaction at open.

use std::path::Path;

use rusqlite::{Connection, Transaction};

use super::blobs::{ScanFile, CHUNK_BYTES};
use super::{Result, SqlContext, StoreError};

/// One schema step: SQL, or code for what SQL cannot do (files beside the database).
enum Migration {
    Sql(&'static str),
    Code(fn(&Transaction<'_>, &Path) -> Result<()>),
}

/// Each entry moves the schema from version `index` to `index + 1`. Never edit a released one.
const MIGRATIONS: &[Migration] = &[
    // 1: the offline node.
    Migration::Sql(
        "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE users (name TEXT PRIMARY KEY, title TEXT, created_at INTEGER NOT NULL);
    CREATE TABLE feed (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
    INSERT INTO feed (id, seq) VALUES (1, 0);

    -- One row per Automerge document: the last snapshot plus the incremental chunks after it.
    CREATE TABLE docs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        snapshot BLOB NOT NULL,
        heads BLOB NOT NULL,        -- sorted 32-byte change hashes, concatenated
        chunks INTEGER NOT NULL,    -- incremental chunks stored since the snapshot
        chunk_bytes INTEGER NOT NULL,
        seq INTEGER NOT NULL,       -- position in this node's change feed
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX docs_by_seq ON docs (seq);
    CREATE TABLE doc_chunks (
        doc_id TEXT NOT NULL REFERENCES docs (id),
        n INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (doc_id, n)
    );
    CREATE TABLE doc_parties (unit TEXT NOT NULL, doc_id TEXT NOT NULL, PRIMARY KEY (unit, doc_id)) WITHOUT ROWID;
    CREATE INDEX doc_parties_by_doc ON doc_parties (doc_id);

    CREATE TABLE dispatches (
        id TEXT PRIMARY KEY,
        ref TEXT NOT NULL,
        summary TEXT NOT NULL,
        kind TEXT NOT NULL,
        priority TEXT NOT NULL,
        priority_rank INTEGER NOT NULL,
        issuer TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        recipients INTEGER NOT NULL,
        received INTEGER NOT NULL,
        scans INTEGER NOT NULL
    );
    CREATE INDEX dispatches_by_time ON dispatches (created_at);
    CREATE INDEX dispatches_by_issuer ON dispatches (issuer, created_at);
    CREATE TABLE dispatch_recipients (unit TEXT NOT NULL, id TEXT NOT NULL, received_at INTEGER, PRIMARY KEY (unit, id)) WITHOUT ROWID;
    CREATE INDEX dispatch_recipients_by_id ON dispatch_recipients (id);
    CREATE TABLE assignments (
        id TEXT PRIMARY KEY,
        dispatch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        lead TEXT NOT NULL,
        deadline TEXT NOT NULL,
        status TEXT NOT NULL,
        conflicted INTEGER NOT NULL
    );
    CREATE INDEX assignments_by_deadline ON assignments (deadline);
    CREATE INDEX assignments_by_lead ON assignments (lead, deadline);
    CREATE TABLE dossiers (
        id TEXT PRIMARY KEY,
        applicant TEXT NOT NULL,
        procedure TEXT NOT NULL,
        holder TEXT NOT NULL,
        step TEXT NOT NULL,
        since INTEGER NOT NULL
    );

    -- Scans: content-addressed by BLAKE3, chunked; each chunk carries its own hash.
    CREATE TABLE blobs (hash BLOB PRIMARY KEY, size INTEGER NOT NULL, chunk_bytes INTEGER NOT NULL, chunks INTEGER NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE blob_chunks (hash BLOB NOT NULL, idx INTEGER NOT NULL, chunk_hash BLOB NOT NULL, data BLOB NOT NULL, PRIMARY KEY (hash, idx));
    -- Which documents reference which blob, and how urgent the most urgent of them is.
    CREATE TABLE doc_blobs (hash BLOB NOT NULL, doc_id TEXT NOT NULL, priority_rank INTEGER NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (hash, doc_id)) WITHOUT ROWID;
    CREATE INDEX doc_blobs_by_doc ON doc_blobs (doc_id);
    ",
    ),
    // 2: sync with peers.
    Migration::Sql(
        "
    -- Peers an administrator configured (the upstream, usually).
    CREATE TABLE peers (name TEXT PRIMARY KEY, addr TEXT NOT NULL, added_at INTEGER NOT NULL, upstream INTEGER NOT NULL DEFAULT 0,
        node_id TEXT);  -- the node last met at that address (learnt from its certificate)
    -- What each authenticated peer node and this node know of each other's feeds.
    CREATE TABLE peer_sync (
        node_id TEXT PRIMARY KEY,
        unit TEXT NOT NULL,
        role TEXT NOT NULL,
        have_from INTEGER NOT NULL DEFAULT 0,   -- their feed, applied here up to
        acked_by INTEGER NOT NULL DEFAULT 0,    -- our feed, acknowledged by them up to
        peer_feed INTEGER NOT NULL DEFAULT 0,   -- their feed position when last heard
        last_contact_at INTEGER,
        last_sync_at INTEGER,
        last_error TEXT,
        bytes_sent INTEGER NOT NULL DEFAULT 0,
        bytes_received INTEGER NOT NULL DEFAULT 0
    );
    -- Scans in transit: their manifest; chunks already verified sit in blob_chunks.
    -- The peer a document's current state came from, whole: it is not offered back to it.
    ALTER TABLE docs ADD COLUMN origin TEXT;
    CREATE TABLE blob_partial (hash BLOB PRIMARY KEY, size INTEGER NOT NULL, chunk_bytes INTEGER NOT NULL, manifest BLOB NOT NULL, updated_at INTEGER NOT NULL);
    ",
    ),
    // 3: scans still to fetch, kept up to date instead of computed by a scan of doc_blobs.
    Migration::Sql(
        "
    CREATE TABLE blob_wants (hash BLOB PRIMARY KEY, rank INTEGER NOT NULL, size INTEGER NOT NULL) WITHOUT ROWID;
    CREATE INDEX blob_wants_by_urgency ON blob_wants (rank DESC, size);
    INSERT INTO blob_wants (hash, rank, size)
        SELECT db.hash, MAX(db.priority_rank), MIN(db.size) FROM doc_blobs db
        WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.hash = db.hash) GROUP BY db.hash;
    ",
    ),
    // 4: scan bytes move out of SQLite into one file per scan (store/blobs.rs says why).
    Migration::Code(scan_bytes_to_files),
    // 5: the MTU last found on the path to each peer address, so a reconnect skips probing.
    Migration::Sql(
        "
    CREATE TABLE path_mtu (ip TEXT PRIMARY KEY, mtu INTEGER NOT NULL, probed_at INTEGER NOT NULL) WITHOUT ROWID;
    ",
    ),
    // 6: the change feed per unit subtree, so an offer to a commune reads its own documents'
    // feed positions instead of filtering the province's whole feed (store/index.rs).
    Migration::Code(scoped_feed),
    // 7: documents refused, each alone (the rest of its frame was stored), with why: those a
    // peer node sent and this node's checks refused (by_peer = 0), and those of this node's
    // that the peer refused (by_peer = 1). For `status`, and so that a sync is not called
    // converged while the peer still refuses a change of ours.
    Migration::Sql(
        "
    CREATE TABLE refused_docs (peer_node TEXT NOT NULL, doc_id TEXT NOT NULL, by_peer INTEGER NOT NULL,
        reason TEXT NOT NULL, at_ms INTEGER NOT NULL,
        PRIMARY KEY (peer_node, doc_id, by_peer)) WITHOUT ROWID;
    -- A random id of this copy of the database: a backup gets a new one, so that a node
    -- restored from it is known to its peers as restored (protocol.md §4.1), and the epoch
    -- last seen from each peer node.
    INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', lower(hex(randomblob(8))));
    -- Which peer node delivered each scan received over the wire: that peer may read it back
    -- (after a restore, say) even though it wrote the only document that attaches it.
    CREATE TABLE blob_sources (hash BLOB NOT NULL, node_id TEXT NOT NULL,
        PRIMARY KEY (hash, node_id)) WITHOUT ROWID;
    ALTER TABLE peer_sync ADD COLUMN epoch TEXT;
    ",
    ),
    // 8: signed authorship (issue 12). Each change's signature by the node that made it, and
    // the certificates of author nodes that reached this node by sync. A database that already
    // holds documents is marked so the node signs its own earlier changes at its next open.
    Migration::Sql(
        "
    CREATE TABLE change_sigs (
        doc TEXT NOT NULL,
        hash BLOB NOT NULL,      -- the Automerge change hash
        actor BLOB NOT NULL,     -- the change's actor: the author's node id
        sig BLOB NOT NULL,       -- ECDSA P-256, r || s, over the document id and the hash
        PRIMARY KEY (doc, hash)
    ) WITHOUT ROWID;
    -- What the certificate says, read once when it was checked against the CA: the signature
    -- checks of a frame read these columns, not the certificate.
    CREATE TABLE node_certs (
        node_id TEXT PRIMARY KEY,
        unit TEXT NOT NULL,
        role TEXT NOT NULL,
        serial BLOB NOT NULL,
        public_key BLOB NOT NULL,  -- the uncompressed P-256 point
        der BLOB NOT NULL,
        added_at INTEGER NOT NULL
    );
    INSERT INTO meta (key, value) SELECT 'sign_own_changes', '1' WHERE EXISTS (SELECT 1 FROM docs);
    ",
    ),
    // 9: who is connected and heard from when, and
    // the statuses nodes publish up the tree (store/status.rs). IF NOT EXISTS: a database set
    // back to an older version by hand keeps these tables, and they hold nothing to redo.
    Migration::Sql(
        "
    -- Each peer node's sessions as `serve` sees them: alive_at is refreshed every few seconds
    -- while a session is open and cleared when it ends; last_seen_at is the last frame received.
    CREATE TABLE IF NOT EXISTS peer_live (node_id TEXT PRIMARY KEY, unit TEXT NOT NULL, serial TEXT NOT NULL,
        last_seen_at INTEGER, alive_at INTEGER) WITHOUT ROWID;
    -- The newest status each unit of this node's subtree published (wire::StatusEntry as JSON),
    -- which peer node delivered it, and when.
    CREATE TABLE IF NOT EXISTS node_status (unit TEXT PRIMARY KEY, node_id TEXT NOT NULL, as_of INTEGER NOT NULL,
        via TEXT NOT NULL, received_at INTEGER NOT NULL, body TEXT NOT NULL) WITHOUT ROWID;
    ",
    ),
    // 10: receipts recorded in receipt
    // books (model/receipts.rs), one row per (dispatch, recipient unit), the first kept. They
    // fill `dispatch_recipients.received_at` whichever of a book and its dispatch arrives
    // first; receipts written inside dispatch documents (before books) stay where they are.
    Migration::Sql(
        "
    CREATE TABLE receipts (dispatch_id TEXT NOT NULL, unit TEXT NOT NULL,
        received_at INTEGER NOT NULL, received_by TEXT NOT NULL,
        PRIMARY KEY (dispatch_id, unit)) WITHOUT ROWID;
    ",
    ),
    // 11: indexes in the order the list queries
    // read, so that a page of `dispatch list` or `assign list` reads that page and no more at
    // millions of rows, instead of a scan or a sort of the whole table (store/index.rs).
    Migration::Code(list_indexes),
];

/// The inbox sorts by the dispatch's time, so each recipient row carries it; done assignments
/// stay out of the indexes `--overdue` reads; `dispatch show` finds its assignments and
/// `dossier list` its newest dossiers without reading them all. Safe to run again on a database that has it (a
/// test or tool that winds `user_version` back re-runs it).
fn list_indexes(tx: &Transaction<'_>, db: &Path) -> Result<()> {
    let has_time: bool = tx
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM pragma_table_info('dispatch_recipients') WHERE name = 'created_at')",
            [],
            |r| r.get(0),
        )
        .at(db)?;
    if !has_time {
        tx.execute_batch(
            "ALTER TABLE dispatch_recipients ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
             UPDATE dispatch_recipients SET created_at = COALESCE(
                 (SELECT d.created_at FROM dispatches d WHERE d.id = dispatch_recipients.id), 0);",
        )
        .at(db)?;
    }
    tx.execute_batch(
        "DROP INDEX IF EXISTS dispatch_recipients_by_time;
         CREATE INDEX dispatch_recipients_by_time ON dispatch_recipients (unit, created_at DESC, id);
         DROP INDEX IF EXISTS dispatches_by_time;
         CREATE INDEX dispatches_by_time ON dispatches (created_at DESC, id);
         DROP INDEX IF EXISTS dispatches_by_issuer;
         CREATE INDEX dispatches_by_issuer ON dispatches (issuer, created_at DESC, id);
         DROP INDEX IF EXISTS assignments_by_deadline;
         CREATE INDEX assignments_by_deadline ON assignments (deadline, id);
         DROP INDEX IF EXISTS assignments_by_lead;
         CREATE INDEX assignments_by_lead ON assignments (lead, deadline, id);
         DROP INDEX IF EXISTS assignments_open;
         CREATE INDEX assignments_open ON assignments (deadline, id) WHERE status != 'done';
         DROP INDEX IF EXISTS assignments_open_by_lead;
         CREATE INDEX assignments_open_by_lead ON assignments (lead, deadline, id) WHERE status != 'done';
         DROP INDEX IF EXISTS assignments_by_dispatch;
         CREATE INDEX assignments_by_dispatch ON assignments (dispatch_id, id);
         DROP INDEX IF EXISTS dossiers_by_time;
         CREATE INDEX dossiers_by_time ON dossiers (since DESC, id);",
    )
    .at(db)
}

fn scoped_feed(tx: &Transaction<'_>, db: &Path) -> Result<()> {
    tx.execute_batch(
        "CREATE TABLE doc_scopes (unit TEXT NOT NULL, seq INTEGER NOT NULL, doc_id TEXT NOT NULL,
             PRIMARY KEY (unit, seq)) WITHOUT ROWID;",
    )
    .at(db)?;
    super::index::rebuild_scopes(tx, db)
}

/// Writes every chunk held in `blob_chunks.data` into its scan's file, makes the files durable,
/// and only then replaces the column by the chunk's length. A crash before the commit leaves
/// the database at version 3 and the files rewritten identically on the next open.
fn scan_bytes_to_files(tx: &Transaction<'_>, db: &Path) -> Result<()> {
    tx.execute_batch(
        "ALTER TABLE blob_chunks ADD COLUMN len INTEGER NOT NULL DEFAULT 0;
         UPDATE blob_chunks SET len = length(data);",
    )
    .at(db)?;
    {
        let mut stmt = tx
            .prepare("SELECT hash, idx, data FROM blob_chunks ORDER BY hash, idx")
            .at(db)?;
        let mut rows = stmt.query([]).at(db)?;
        let mut open: Option<(Vec<u8>, ScanFile)> = None;
        while let Some(row) = rows.next().at(db)? {
            let hash: Vec<u8> = row.get(0).at(db)?;
            let idx: i64 = row.get(1).at(db)?;
            let data = row
                .get_ref(2)
                .at(db)?
                .as_blob()
                .map_err(|e| StoreError::Corrupt(format!("blob_chunks.data: {e}")))?;
            if data.len() > CHUNK_BYTES || idx < 0 {
                return Err(StoreError::Corrupt(format!(
                    "chunk {idx} of scan {} holds {} bytes",
                    hex::encode(&hash),
                    data.len()
                )));
            }
            if open.as_ref().is_none_or(|(h, _)| *h != hash) {
                if let Some((_, mut done)) = open.take() {
                    done.sync()?;
                }
                let fixed: [u8; 32] = hash.as_slice().try_into().map_err(|_| {
                    StoreError::Corrupt("blob_chunks holds a hash that is not 32 bytes".into())
                })?;
                open = Some((hash, ScanFile::open_local(db, &fixed)?));
            }
            if let Some((_, file)) = &open {
                file.write(idx as u64, data)?;
            }
        }
        if let Some((_, mut done)) = open {
            done.sync()?;
        }
    }
    tx.execute_batch("ALTER TABLE blob_chunks DROP COLUMN data;")
        .at(db)
}

pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

pub fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .at(path)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction().at(path)?;
    for (version, step) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql).at(path)?,
            Migration::Code(run) => run(&tx, path)?,
        }
        tx.pragma_update(None, "user_version", version as i64 + 1)
            .at(path)?;
    }
    tx.commit().at(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database as a node of schema version `version` left it.
    fn at_version(path: &Path, version: usize) -> Connection {
        let conn = Connection::open(path).unwrap();
        for step in &MIGRATIONS[..version] {
            let Migration::Sql(sql) = step else {
                panic!("only SQL steps before version {version}");
            };
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", version as i64)
            .unwrap();
        conn
    }

    #[test]
    fn version_3_scans_move_to_files_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let conn = at_version(&path, 3);
        let content: Vec<u8> = (0..CHUNK_BYTES + 1000).map(|i| (i % 253) as u8).collect();
        let hash = *blake3::hash(&content).as_bytes();
        for (idx, chunk) in content.chunks(CHUNK_BYTES).enumerate() {
            conn.execute(
                "INSERT INTO blob_chunks (hash, idx, chunk_hash, data) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![
                    &hash[..],
                    idx as i64,
                    &blake3::hash(chunk).as_bytes()[..],
                    chunk
                ],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO blobs (hash, size, chunk_bytes, chunks, created_at) VALUES (?1, ?2, ?3, 2, 1)",
            rusqlite::params![&hash[..], content.len() as i64, CHUNK_BYTES as i64],
        )
        .unwrap();
        // Half a scan in transit: its chunk must survive for the transfer to resume.
        let partial = [7u8; 32];
        conn.execute(
            "INSERT INTO blob_chunks (hash, idx, chunk_hash, data) VALUES (?1, 0, ?2, x'0102')",
            rusqlite::params![&partial[..], &blake3::hash(&[1, 2]).as_bytes()[..]],
        )
        .unwrap();
        drop(conn);

        let store = crate::store::Store::open(&path, 4).unwrap();
        let mut out = Vec::new();
        store.read_blob(&hash, &mut out).unwrap();
        assert_eq!(out, content);
        assert_eq!(store.blob_chunk(&partial, 0).unwrap(), vec![1, 2]);
        let columns: Vec<String> = store
            .conn()
            .prepare("SELECT name FROM pragma_table_info('blob_chunks')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            columns,
            ["hash", "idx", "chunk_hash", "len"],
            "no bytes left in SQLite"
        );
        let file = dir
            .path()
            .join(crate::store::blobs::BLOB_DIR)
            .join(hex::encode(hash));
        assert_eq!(std::fs::read(file).unwrap(), content);
    }

    #[test]
    fn version_10_inboxes_list_newest_first_after_the_migration() {
        use crate::store::index::DispatchFilter;
        use crate::store::testutil::new_dispatch_to;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let mut store = crate::store::Store::create(&path, 4).unwrap();
        let a = new_dispatch_to(&mut store, "1/UBND", "s".into(), &["qn/campha"]);
        let b = new_dispatch_to(&mut store, "2/UBND", "s".into(), &["qn/campha"]);
        // The later id is the newer dispatch: without its time the inbox would list it last.
        let (older, newer) = if a.as_str() < b.as_str() {
            (a, b)
        } else {
            (b, a)
        };
        store
            .conn()
            .execute(
                "UPDATE dispatches SET created_at = 2 WHERE id = ?1",
                [newer.as_str()],
            )
            .unwrap();
        drop(store);
        // Back to what a version-10 node holds: recipient rows without the dispatch's time.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP INDEX dispatch_recipients_by_time; DROP INDEX assignments_open;
             DROP INDEX assignments_open_by_lead;
             ALTER TABLE dispatch_recipients DROP COLUMN created_at; PRAGMA user_version = 10;",
        )
        .unwrap();
        drop(conn);
        let store = crate::store::Store::open(&path, 4).unwrap();
        let inbox: Vec<String> = store
            .list_dispatches(DispatchFilter::Inbox("qn/campha"), 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(inbox, [newer.as_str(), older.as_str()]);
    }

    #[test]
    fn an_older_database_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let conn = at_version(&path, 2);
        // A scan referenced by a document but never received, as a version-2 node would hold it.
        conn.execute("INSERT INTO doc_blobs (hash, doc_id, priority_rank, size) VALUES (x'01', 'dsp_0000000000000001', 3, 10)", []).unwrap();
        drop(conn);
        let store = crate::store::Store::open(&path, 4).unwrap();
        assert_eq!(store.missing_blob_bytes().unwrap(), (1, 10));
        let too_new = Connection::open(&path).unwrap();
        too_new
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(too_new);
        drop(store);
        assert!(matches!(
            crate::store::Store::open(&path, 4),
            Err(StoreError::TooNew { .. })
        ));
    }
}
