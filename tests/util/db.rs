//! Read-only looks into a node's database, safe beside a running daemon: what it holds, which
//! scans and chunks it has stored.

use std::collections::BTreeMap;

use rusqlite::OptionalExtension;

use super::TestNode;

/// A read-only connection to the node's database, safe beside a running daemon.
pub fn db_read_only(node: &TestNode) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        node.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("opening node.db read-only")
}

/// The stored heads of a document, or None when the node does not hold it.
pub fn doc_heads(node: &TestNode, id: &str) -> Option<Vec<u8>> {
    db_read_only(node)
        .query_row("SELECT heads FROM docs WHERE id = ?1", [id], |r| r.get(0))
        .optional()
        .expect("reading doc heads")
}

/// Every document the node holds, with its stored heads.
pub fn held_docs(node: &TestNode) -> BTreeMap<String, Vec<u8>> {
    let db = db_read_only(node);
    let mut stmt = db
        .prepare("SELECT id, heads FROM docs")
        .expect("reading docs");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("reading docs")
        .collect::<Result<_, _>>()
        .expect("reading docs")
}

/// Scans referenced by held documents but not (completely) stored.
pub fn scans_missing(node: &TestNode) -> i64 {
    db_read_only(node)
        .query_row(
            "SELECT COUNT(DISTINCT d.hash) FROM doc_blobs d
             WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.hash = d.hash)",
            [],
            |r| r.get(0),
        )
        .expect("counting missing scans")
}

/// Verified chunks of a scan stored so far (complete or in transit).
pub fn chunks_stored(node: &TestNode, hash: &[u8]) -> i64 {
    db_read_only(node)
        .query_row(
            "SELECT COUNT(*) FROM blob_chunks WHERE hash = ?1",
            [hash],
            |r| r.get(0),
        )
        .expect("counting scan chunks")
}

/// Rows of the `blobs` table for a scan: 1 once it is complete.
pub fn blob_rows(node: &TestNode, hash: &[u8]) -> i64 {
    db_read_only(node)
        .query_row("SELECT COUNT(*) FROM blobs WHERE hash = ?1", [hash], |r| {
            r.get(0)
        })
        .expect("counting blobs")
}

/// Whether the node holds the document (any kind).
pub fn holds_doc(node: &TestNode, id: &str) -> bool {
    doc_heads(node, id).is_some()
}
