//! Index tables derived from documents: what list and filter queries and sync read, so that
//! listing 10,000 dispatches never loads 10,000 documents.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use automerge::AutoCommit;
use rusqlite::{params, Connection, OptionalExtension, ToSql};
use serde::Serialize;

use super::{Result, SqlContext, Store};
use crate::model::receipts::ReceiptBook;
use crate::model::{self, dispatch, DocId, DocView};
use crate::units::{canonical, is_within, parent, Aliases};

/// Rebuilds every index row of one document from its current state, now at feed position
/// `seq`. `old_seq` is the position of the state it replaces (None: the document was just
/// inserted, so it has no rows to delete); `view`, when the caller has it already, must be
/// `DocView::read` of `doc`; `me` is this node's unit (see [`scope_units`]). Units the
/// document names are indexed under their current paths (`aliases`: a unit that moved).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reindex(
    conn: &Connection,
    path: &Path,
    id: &DocId,
    doc: &AutoCommit,
    seqs: (Option<i64>, i64),
    view: Option<&DocView>,
    me: Option<&str>,
    aliases: &Aliases,
) -> Result<()> {
    let canon = |unit: &str| canonical(aliases, unit).to_string();
    let key = id.as_str();
    let (old_seq, seq) = seqs;
    if let Some(old_seq) = old_seq {
        // The old parties name the old per-subtree feed rows, keyed by the old position.
        let old_parties: Vec<String> = conn
            .prepare_cached("DELETE FROM doc_parties WHERE doc_id = ?1 RETURNING unit")
            .at(path)?
            .query_map([key], |r| r.get(0))
            .at(path)?
            .collect::<rusqlite::Result<_>>()
            .at(path)?;
        for unit in scope_units(&old_parties, me) {
            conn.prepare_cached("DELETE FROM doc_scopes WHERE unit = ?1 AND seq = ?2")
                .at(path)?
                .execute(params![unit, old_seq])
                .at(path)?;
        }
        for sql in [
            "DELETE FROM doc_blobs WHERE doc_id = ?1",
            "DELETE FROM dispatch_recipients WHERE id = ?1",
        ] {
            conn.prepare_cached(sql).at(path)?.execute([key]).at(path)?;
        }
    }
    let read;
    let view = match view {
        Some(view) => view,
        None => {
            read = DocView::read(doc, id)?;
            &read
        }
    };
    debug_assert_eq!(view.parties(), model::parties(doc, id)?, "parties of {id}");
    let mut parties: Vec<String> = view.parties().iter().map(|p| canon(p)).collect();
    parties.sort();
    parties.dedup();
    for unit in &parties {
        conn.prepare_cached("INSERT INTO doc_parties (unit, doc_id) VALUES (?1, ?2)")
            .at(path)?
            .execute([unit, key])
            .at(path)?;
    }
    insert_scopes(conn, path, key, seq, &parties, me)?;
    match view {
        DocView::Dispatch(v) => {
            let rank = v
                .priority
                .parse::<dispatch::Priority>()
                .map(|p| p.rank())
                .unwrap_or(0);
            // A receipt is in the dispatch (written before receipt books) or in a book.
            let booked = booked_receipts(conn, path, key)?;
            let received_at = |r: &dispatch::Recipient| {
                r.received_at_ms
                    .or_else(|| booked.get(&canon(&r.unit)).copied())
            };
            let received = v
                .recipients
                .iter()
                .filter(|r| received_at(r).is_some())
                .count();
            conn.prepare_cached(
                "INSERT OR REPLACE INTO dispatches (id, ref, summary, kind, priority, priority_rank, issuer, created_at, recipients, received, scans)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .at(path)?
            .execute(params![key, v.ref_no, v.summary, v.kind, v.priority, rank, canon(&v.issuer), v.created_at_ms, v.recipients.len(), received, v.attachments.len()])
            .at(path)?;
            for r in &v.recipients {
                conn.prepare_cached(
                    "INSERT INTO dispatch_recipients (unit, id, received_at, created_at) VALUES (?1, ?2, ?3, ?4)",
                )
                .at(path)?
                .execute(params![canon(&r.unit), key, received_at(r), v.created_at_ms])
                .at(path)?;
            }
            for a in &v.attachments {
                let Ok(hash) = crate::store::blobs::parse_hash(&a.hash) else {
                    continue;
                };
                conn.prepare_cached("INSERT OR IGNORE INTO doc_blobs (hash, doc_id, priority_rank, size) VALUES (?1, ?2, ?3, ?4)")
                    .at(path)?
                    .execute(params![&hash[..], key, rank, a.size as i64])
                    .at(path)?;
                conn.prepare_cached(
                    "INSERT INTO blob_wants (hash, rank, size) SELECT ?1, ?2, ?3 WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE hash = ?1)
                     ON CONFLICT (hash) DO UPDATE SET rank = MAX(rank, excluded.rank)",
                )
                .at(path)?
                .execute(params![&hash[..], rank, a.size as i64])
                .at(path)?;
            }
        }
        DocView::Assignment(v) => {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO assignments (id, dispatch_id, unit, lead, deadline, status, conflicted) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .at(path)?
            .execute(params![key, v.dispatch_id, canon(&v.unit), v.lead, v.deadline, v.status, !v.conflicts.is_empty()])
            .at(path)?;
        }
        DocView::Dossier(v) => {
            conn.prepare_cached("INSERT OR REPLACE INTO dossiers (id, applicant, procedure, holder, step, since) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .at(path)?
                .execute(params![key, v.applicant, v.procedure, canon(&v.holder), v.step, v.since_ms])
                .at(path)?;
        }
        DocView::Receipts(v) => index_receipts(conn, path, v, &canon(&v.recipient))?,
    }
    Ok(())
}

/// The receipts books hold for a dispatch: unit -> received at.
fn booked_receipts(
    conn: &Connection,
    path: &Path,
    dispatch_id: &str,
) -> Result<HashMap<String, i64>> {
    conn.prepare_cached("SELECT unit, received_at FROM receipts WHERE dispatch_id = ?1")
        .at(path)?
        .query_map([dispatch_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .at(path)?
        .collect::<rusqlite::Result<_>>()
        .at(path)
}

/// Records a book's new receipts, and fills them into its dispatches' recipient rows when those
/// dispatches are here and hold no receipt of that unit yet (the first receipt stays).
fn index_receipts(
    conn: &Connection,
    path: &Path,
    book: &ReceiptBook,
    recipient: &str,
) -> Result<()> {
    for r in &book.receipts {
        let new = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO receipts (dispatch_id, unit, received_at, received_by) VALUES (?1, ?2, ?3, ?4)",
            )
            .at(path)?
            .execute(params![r.dispatch, recipient, r.received_at_ms, r.received_by])
            .at(path)?;
        if new == 0 {
            continue;
        }
        let filled = conn
            .prepare_cached(
                "UPDATE dispatch_recipients SET received_at = ?3 WHERE unit = ?2 AND id = ?1 AND received_at IS NULL",
            )
            .at(path)?
            .execute(params![r.dispatch, recipient, r.received_at_ms])
            .at(path)?;
        if filled > 0 {
            conn.prepare_cached("UPDATE dispatches SET received = received + 1 WHERE id = ?1")
                .at(path)?
                .execute([&r.dispatch])
                .at(path)?;
        }
    }
    Ok(())
}

/// The units below this node's (`me`) whose subtree holds a document with these parties: each
/// party and its ancestors. Offers to this node's own unit or any above it read `docs` directly
/// (every document a node holds is in its own subtree), so those need no rows; with `me`
/// unknown, every unit short of the province gets one. The `doc_scopes` rows these name let an
/// offer to a peer below read only that peer's feed.
fn scope_units<'a>(parties: &'a [String], me: Option<&str>) -> BTreeSet<&'a str> {
    let mut units = BTreeSet::new();
    for party in parties {
        let mut unit = party.as_str();
        while let Some(up) = parent(unit) {
            if me.is_none_or(|me| unit != me && is_within(unit, me)) {
                units.insert(unit);
            }
            unit = up;
        }
    }
    units
}

fn insert_scopes(
    conn: &Connection,
    path: &Path,
    doc_id: &str,
    seq: i64,
    parties: &[String],
    me: Option<&str>,
) -> Result<()> {
    for unit in scope_units(parties, me) {
        conn.prepare_cached("INSERT INTO doc_scopes (unit, seq, doc_id) VALUES (?1, ?2, ?3)")
            .at(path)?
            .execute(params![unit, seq, doc_id])
            .at(path)?;
    }
    Ok(())
}

impl Store {
    /// Reads units through `aliases` from now on (the former paths of the node's unit tree),
    /// this node's own unit included.
    pub fn set_aliases(&mut self, aliases: Aliases) {
        if let Some(unit) = &mut self.unit {
            *unit = canonical(&aliases, unit).to_string();
        }
        self.aliases = aliases;
    }

    /// Re-indexes, in one transaction, every document that names a unit by a path that is now
    /// a former one, under the unit's current path: its scope rows move to the unit's new
    /// subtree. Returns how many documents were re-indexed.
    pub fn rescope(&mut self) -> Result<usize> {
        self.write(|tx| {
            let mut ids = BTreeSet::new();
            for former in tx.aliases.keys() {
                let mut stmt = tx
                    .tx
                    .prepare_cached("SELECT doc_id FROM doc_parties WHERE unit = ?1")
                    .at(tx.path)?;
                let found = stmt
                    .query_map([former], |r| r.get::<_, String>(0))
                    .at(tx.path)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .at(tx.path)?;
                ids.extend(found);
            }
            for id in &ids {
                let id: DocId = id
                    .parse()
                    .map_err(|e| super::StoreError::Corrupt(format!("doc_parties: {e}")))?;
                let seq: i64 = tx
                    .tx
                    .prepare_cached("SELECT seq FROM docs WHERE id = ?1")
                    .at(tx.path)?
                    .query_row([id.as_str()], |r| r.get(0))
                    .at(tx.path)?;
                let Some(rec) = tx.load_doc(&id)? else {
                    continue;
                };
                reindex(
                    &tx.tx,
                    tx.path,
                    &id,
                    &rec.doc,
                    (Some(seq), seq),
                    None,
                    tx.unit,
                    tx.aliases,
                )?;
            }
            Ok(ids.len())
        })
    }
}

/// This node's unit, as `init` recorded it (None before that).
pub(crate) fn node_unit(conn: &Connection, path: &Path) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = 'unit'", [], |r| {
        r.get(0)
    })
    .optional()
    .at(path)
}

/// Fills `doc_scopes` from `doc_parties` and the documents' feed positions (schema migration 6,
/// and tools that renumber the feed in SQL). The table must be empty.
pub fn rebuild_scopes(conn: &Connection, path: &Path) -> Result<()> {
    let me = node_unit(conn, path)?;
    let me = me.as_deref();
    let mut stmt = conn
        .prepare(
            "SELECT p.doc_id, d.seq, p.unit FROM doc_parties p JOIN docs d ON d.id = p.doc_id
             ORDER BY p.doc_id",
        )
        .at(path)?;
    let mut rows = stmt.query([]).at(path)?;
    let mut current: Option<(String, i64, Vec<String>)> = None;
    while let Some(row) = rows.next().at(path)? {
        let (doc_id, seq, unit): (String, i64, String) = (
            row.get(0).at(path)?,
            row.get(1).at(path)?,
            row.get(2).at(path)?,
        );
        match &mut current {
            Some((id, _, parties)) if *id == doc_id => parties.push(unit),
            _ => {
                if let Some((id, seq, parties)) = current.replace((doc_id, seq, vec![unit])) {
                    insert_scopes(conn, path, &id, seq, &parties, me)?;
                }
            }
        }
    }
    if let Some((id, seq, parties)) = current {
        insert_scopes(conn, path, &id, seq, &parties, me)?;
    }
    Ok(())
}

// The list queries, one per filter, each in the order of an index (schema.rs, `list_indexes`);
// `list_queries_read_one_page` checks their plans. A limit is the last parameter.
const DISPATCHES_ALL: &str = "SELECT d.id, d.ref, d.summary, d.kind, d.priority, d.issuer, d.created_at, d.recipients, d.received, d.scans
     FROM dispatches d ORDER BY d.created_at DESC, d.id LIMIT ?1";
const DISPATCHES_TO: &str = "SELECT d.id, d.ref, d.summary, d.kind, d.priority, d.issuer, d.created_at, d.recipients, d.received, d.scans
     FROM dispatch_recipients r JOIN dispatches d ON d.id = r.id
     WHERE r.unit = ?1 ORDER BY r.created_at DESC, r.id LIMIT ?2";
const DISPATCHES_FROM: &str = "SELECT d.id, d.ref, d.summary, d.kind, d.priority, d.issuer, d.created_at, d.recipients, d.received, d.scans
     FROM dispatches d WHERE d.issuer = ?1 ORDER BY d.created_at DESC, d.id LIMIT ?2";
const ASSIGNMENTS_ALL: &str = "SELECT id, dispatch_id, unit, lead, deadline, status, conflicted
     FROM assignments ORDER BY deadline, id LIMIT ?1";
const ASSIGNMENTS_OVERDUE: &str = "SELECT id, dispatch_id, unit, lead, deadline, status, conflicted
     FROM assignments WHERE status != 'done' AND deadline < ?1 ORDER BY deadline, id LIMIT ?2";
const ASSIGNMENTS_LED: &str = "SELECT id, dispatch_id, unit, lead, deadline, status, conflicted
     FROM assignments WHERE lead = ?1 ORDER BY deadline, id LIMIT ?2";
const ASSIGNMENTS_LED_OVERDUE: &str = "SELECT id, dispatch_id, unit, lead, deadline, status, conflicted
     FROM assignments WHERE status != 'done' AND lead = ?1 AND deadline < ?2 ORDER BY deadline, id LIMIT ?3";
const ASSIGNMENTS_OF: &str = "SELECT id FROM assignments WHERE dispatch_id = ?1 ORDER BY id";
const DOSSIERS: &str = "SELECT id, applicant, procedure, holder, step, since FROM dossiers ORDER BY since DESC, id LIMIT ?1";
// The totals a full page stops short of, one per list filter, each counted in the index its list
// reads (an unfiltered total walks the smallest index: SQLite keeps no row count).
const COUNT_DISPATCHES_ALL: &str = "SELECT COUNT(*) FROM dispatches";
const COUNT_DISPATCHES_TO: &str = "SELECT COUNT(*) FROM dispatch_recipients WHERE unit = ?1";
const COUNT_DISPATCHES_FROM: &str = "SELECT COUNT(*) FROM dispatches WHERE issuer = ?1";
// Involving a unit: issued + addressed - both. An OR of the two reads every dispatch, and a
// join for "both" probes a B-tree per row (200 ms for a district of a 5M province): both id
// lists are read from their covering indexes instead, and intersected in memory.
const IDS_ISSUED: &str = "SELECT id FROM dispatches WHERE issuer = ?1";
const IDS_ADDRESSED: &str = "SELECT id FROM dispatch_recipients WHERE unit = ?1";
const COUNT_ASSIGNMENTS_ALL: &str = "SELECT COUNT(*) FROM assignments";
const COUNT_ASSIGNMENTS_OVERDUE: &str =
    "SELECT COUNT(*) FROM assignments WHERE status != 'done' AND deadline < ?1";
const COUNT_ASSIGNMENTS_LED: &str = "SELECT COUNT(*) FROM assignments WHERE lead = ?1";
const COUNT_ASSIGNMENTS_LED_OVERDUE: &str =
    "SELECT COUNT(*) FROM assignments WHERE status != 'done' AND lead = ?1 AND deadline < ?2";
const COUNT_DOSSIERS: &str = "SELECT COUNT(*) FROM dossiers";

/// One line of `dispatch list`.
#[derive(Debug, Clone, Serialize)]
pub struct DispatchRow {
    pub id: String,
    #[serde(rename = "ref")]
    pub ref_no: String,
    pub summary: String,
    pub kind: String,
    pub priority: String,
    pub issuer: String,
    pub created_at_ms: i64,
    pub recipients: i64,
    pub received: i64,
    pub scans: i64,
}

/// Which dispatches `dispatch list` shows.
#[derive(Debug, Clone, Copy)]
pub enum DispatchFilter<'a> {
    All,
    /// Addressed to this unit.
    Inbox(&'a str),
    /// Issued by this unit.
    Outbox(&'a str),
    /// Issued by or addressed to this unit.
    Involving(&'a str),
}

/// One line of `assign list`.
#[derive(Debug, Clone, Serialize)]
pub struct AssignmentRow {
    pub id: String,
    pub dispatch_id: String,
    pub unit: String,
    pub lead: String,
    pub deadline: String,
    pub status: String,
    pub conflicted: bool,
}

/// One line of `dossier list`.
#[derive(Debug, Clone, Serialize)]
pub struct DossierRow {
    pub id: String,
    pub applicant: String,
    pub procedure: String,
    pub holder: String,
    pub step: String,
    pub since_ms: i64,
}

impl Store {
    /// The units a stored document concerns, as its index rows hold them (`model::parties` of its
    /// current state); empty if the document is not stored.
    pub fn doc_parties(&self, id: &DocId) -> Result<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT unit FROM doc_parties WHERE doc_id = ?1 ORDER BY unit")
            .at(&self.path)?;
        let rows = stmt.query_map([id.as_str()], |r| r.get(0)).at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Dispatches newest first. Each filter reads an index in that order (schema.rs,
    /// `list_indexes`), so a page costs the same in a province of millions as in a commune.
    pub fn list_dispatches(
        &self,
        filter: DispatchFilter<'_>,
        limit: usize,
    ) -> Result<Vec<DispatchRow>> {
        let unit = match filter {
            DispatchFilter::All => {
                return self.dispatch_rows(DISPATCHES_ALL, params![limit as i64])
            }
            DispatchFilter::Inbox(u) => {
                return self.dispatch_rows(DISPATCHES_TO, params![u, limit as i64])
            }
            DispatchFilter::Outbox(u) => {
                return self.dispatch_rows(DISPATCHES_FROM, params![u, limit as i64])
            }
            DispatchFilter::Involving(u) => u,
        };
        // An OR of the two would read every dispatch; merging the two newest-first pages reads
        // at most two pages.
        let mut rows = self.dispatch_rows(DISPATCHES_FROM, params![unit, limit as i64])?;
        rows.extend(self.dispatch_rows(DISPATCHES_TO, params![unit, limit as i64])?);
        rows.sort_by(|a, b| {
            b.created_at_ms
                .cmp(&a.created_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        rows.dedup_by(|a, b| a.id == b.id);
        rows.truncate(limit);
        Ok(rows)
    }

    fn dispatch_rows(&self, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<DispatchRow>> {
        let mut stmt = self.conn.prepare_cached(sql).at(&self.path)?;
        let rows = stmt
            .query_map(args, |r| {
                Ok(DispatchRow {
                    id: r.get(0)?,
                    ref_no: r.get(1)?,
                    summary: r.get(2)?,
                    kind: r.get(3)?,
                    priority: r.get(4)?,
                    issuer: r.get(5)?,
                    created_at_ms: r.get(6)?,
                    recipients: r.get(7)?,
                    received: r.get(8)?,
                    scans: r.get(9)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// One document that attaches the scan `hash`, if any.
    pub fn doc_of_blob(&self, hash: &[u8; 32]) -> Result<Option<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT doc_id FROM doc_blobs WHERE hash = ?1 LIMIT 1")
            .at(&self.path)?;
        stmt.query_row(params![&hash[..]], |r| r.get(0))
            .optional()
            .at(&self.path)
    }

    /// How many dispatches `filter` matches in all (what `list_dispatches` stops short of).
    pub fn count_dispatches(&self, filter: DispatchFilter<'_>) -> Result<i64> {
        match filter {
            DispatchFilter::All => self.count(COUNT_DISPATCHES_ALL, params![]),
            DispatchFilter::Inbox(u) => self.count(COUNT_DISPATCHES_TO, params![u]),
            DispatchFilter::Outbox(u) => self.count(COUNT_DISPATCHES_FROM, params![u]),
            DispatchFilter::Involving(u) => self.count_involving(u),
        }
    }

    fn count_involving(&self, unit: &str) -> Result<i64> {
        let mut issued = self.conn.prepare_cached(IDS_ISSUED).at(&self.path)?;
        let issued: HashSet<String> = issued
            .query_map(params![unit], |r| r.get(0))
            .at(&self.path)?
            .collect::<rusqlite::Result<_>>()
            .at(&self.path)?;
        let mut addressed = self.conn.prepare_cached(IDS_ADDRESSED).at(&self.path)?;
        let mut rows = addressed.query(params![unit]).at(&self.path)?;
        let (mut total, mut both) = (issued.len() as i64, 0);
        while let Some(row) = rows.next().at(&self.path)? {
            total += 1;
            let id = row.get_ref(0).at(&self.path)?.as_str().unwrap_or_default();
            both += i64::from(issued.contains(id));
        }
        Ok(total - both)
    }

    /// How many assignments `list_assignments` with the same filters finds in all.
    pub fn count_assignments(
        &self,
        overdue_before: Option<&str>,
        lead: Option<&str>,
    ) -> Result<i64> {
        match (overdue_before, lead) {
            (None, None) => self.count(COUNT_ASSIGNMENTS_ALL, params![]),
            (Some(day), None) => self.count(COUNT_ASSIGNMENTS_OVERDUE, params![day]),
            (None, Some(lead)) => self.count(COUNT_ASSIGNMENTS_LED, params![lead]),
            (Some(day), Some(lead)) => {
                self.count(COUNT_ASSIGNMENTS_LED_OVERDUE, params![lead, day])
            }
        }
    }

    /// How many dossiers `list_dossiers` could show.
    pub fn count_dossiers(&self) -> Result<i64> {
        self.count(COUNT_DOSSIERS, params![])
    }

    fn count(&self, sql: &str, args: &[&dyn ToSql]) -> Result<i64> {
        let mut stmt = self.conn.prepare_cached(sql).at(&self.path)?;
        stmt.query_row(args, |r| r.get(0)).at(&self.path)
    }

    /// Assignments, optionally only those past `overdue_before` (YYYY-MM-DD) and not done,
    /// and only those led by `lead`; earliest deadline first. One statement per combination of
    /// filters, each matching its own index: a `(?1 IS NULL OR ...)` filter would read them all.
    pub fn list_assignments(
        &self,
        overdue_before: Option<&str>,
        lead: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AssignmentRow>> {
        let limit = limit as i64;
        match (overdue_before, lead) {
            (None, None) => self.assignment_rows(ASSIGNMENTS_ALL, params![limit]),
            (Some(day), None) => self.assignment_rows(ASSIGNMENTS_OVERDUE, params![day, limit]),
            (None, Some(lead)) => self.assignment_rows(ASSIGNMENTS_LED, params![lead, limit]),
            (Some(day), Some(lead)) => {
                self.assignment_rows(ASSIGNMENTS_LED_OVERDUE, params![lead, day, limit])
            }
        }
    }

    fn assignment_rows(&self, sql: &str, args: &[&dyn ToSql]) -> Result<Vec<AssignmentRow>> {
        let mut stmt = self.conn.prepare_cached(sql).at(&self.path)?;
        let rows = stmt
            .query_map(args, |r| {
                Ok(AssignmentRow {
                    id: r.get(0)?,
                    dispatch_id: r.get(1)?,
                    unit: r.get(2)?,
                    lead: r.get(3)?,
                    deadline: r.get(4)?,
                    status: r.get(5)?,
                    conflicted: r.get(6)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    pub fn list_dossiers(&self, limit: usize) -> Result<Vec<DossierRow>> {
        let mut stmt = self.conn.prepare_cached(DOSSIERS).at(&self.path)?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(DossierRow {
                    id: r.get(0)?,
                    applicant: r.get(1)?,
                    procedure: r.get(2)?,
                    holder: r.get(3)?,
                    step: r.get(4)?,
                    since_ms: r.get(5)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Receipts of a dispatch recorded in receipt books: (unit, received at, received by).
    pub fn booked_receipts(&self, dispatch_id: &DocId) -> Result<Vec<(String, i64, String)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT unit, received_at, received_by FROM receipts WHERE dispatch_id = ?1 ORDER BY unit",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([dispatch_id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Assignments that handle a dispatch, for `dispatch show`.
    pub fn assignments_of(&self, dispatch_id: &DocId) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(ASSIGNMENTS_OF).at(&self.path)?;
        let rows = stmt
            .query_map([dispatch_id.as_str()], |r| r.get(0))
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{assignment, receipts, DocKind};
    use crate::store::testutil::{actor, author, new_dispatch_to};

    const A: &str = "qn/binhlieu/tinhhuc";
    const B: &str = "qn/binhlieu/hucdong";

    /// Stores `unit`'s receipt of `dispatch` (issued by the province at time 1) in its book.
    fn receipt(store: &mut Store, dispatch: &DocId, unit: &str, at_ms: i64) {
        let year = receipts::year_of(1);
        let book = receipts::book_id("qn", unit, year);
        let author = model::Author {
            user: "minh".into(),
            unit: unit.into(),
            node: "01".repeat(16),
        };
        store
            .write(|tx| {
                let write = |doc: &mut AutoCommit| {
                    receipts::record(doc, &book, ("qn", unit, year), dispatch, &author, at_ms)
                };
                if tx.doc_exists(&book)? {
                    tx.update_doc(&book, &actor(), at_ms, |doc| Ok(write(doc)?))?;
                } else {
                    tx.create_doc(&book, &actor(), at_ms, |doc| Ok(write(doc).map(drop)?))?;
                }
                Ok(())
            })
            .unwrap();
    }

    fn received(store: &Store, id: &DocId) -> i64 {
        let rows = store.list_dispatches(DispatchFilter::All, 10).unwrap();
        rows.iter().find(|r| r.id == id.as_str()).unwrap().received
    }

    #[test]
    fn a_receipt_from_a_book_counts_whether_it_or_the_dispatch_arrives_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 4).unwrap();
        // The dispatch first, then A's receipt; a second receipt of A is not counted twice.
        let d = new_dispatch_to(&mut store, "1/UBND", "s".into(), &[A, B]);
        assert_eq!(received(&store, &d), 0);
        receipt(&mut store, &d, A, 5);
        assert_eq!(received(&store, &d), 1);
        receipt(&mut store, &d, A, 6);
        assert_eq!(received(&store, &d), 1);
        assert_eq!(
            store.booked_receipts(&d).unwrap(),
            vec![(A.to_string(), 5, "minh".to_string())]
        );
        // A book naming a dispatch not here yet (books and dispatches sync independently).
        let early = DocId::generate(DocKind::Dispatch);
        receipt(&mut store, &early, B, 7);
        assert_eq!(
            received(&store, &d),
            1,
            "B's receipt is of another dispatch"
        );
        let inbox = |store: &Store, unit| {
            store
                .conn
                .query_row(
                    "SELECT received_at FROM dispatch_recipients WHERE unit = ?1",
                    [unit],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .unwrap()
        };
        assert_eq!(inbox(&store, A), Some(5));
        assert_eq!(inbox(&store, B), None);
        // When that dispatch is stored, its recipient rows pick the receipt up.
        let d2 = store
            .write(|tx| {
                let new = dispatch::NewDispatch {
                    ref_no: "2/UBND".into(),
                    summary: "s".into(),
                    kind: dispatch::DispatchKind::Directive,
                    priority: dispatch::Priority::Flash,
                    issuer: "qn".into(),
                    to: vec![B.into()],
                    attachments: vec![],
                };
                let author = crate::store::testutil::author();
                tx.create_doc(&early, &actor(), 1, |doc| {
                    Ok(dispatch::create(doc, &early, &new, &author, 1)?)
                })?;
                Ok(early.clone())
            })
            .unwrap();
        assert_eq!(received(&store, &d2), 1);
    }

    /// A node with dispatches between a few units, several at the same instant, and
    /// assignments with several leads, deadlines and statuses, done ones included.
    fn populated() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::create(&dir.path().join("node.db"), 16).unwrap();
        let units = ["qn", "qn/binhlieu", "qn/binhlieu/hoanhmo", "qn/campha"];
        store
            .write(|tx| {
                for i in 0..60usize {
                    let id = DocId::generate(DocKind::Dispatch);
                    // Every tenth also addressed to its issuer (counted once in its totals).
                    let to: Vec<String> = (1..=1 + i % 3)
                        .map(|k| units[(i + k) % units.len()].to_string())
                        .chain((i % 10 == 0).then(|| units[i % units.len()].to_string()))
                        .collect();
                    let d = dispatch::NewDispatch {
                        ref_no: format!("{i}/UBND"),
                        summary: "s".into(),
                        kind: dispatch::DispatchKind::Report,
                        priority: dispatch::Priority::Normal,
                        issuer: units[i % units.len()].into(),
                        to,
                        attachments: vec![],
                    };
                    // Three dispatches per instant: ties are broken by id.
                    let at = 1_000 + (i / 3) as i64;
                    tx.create_doc(&id, &actor(), at, |doc| {
                        Ok(dispatch::create(doc, &id, &d, &author(), at)?)
                    })?;
                }
                for i in 0..60usize {
                    let id = DocId::generate(DocKind::Assignment);
                    let a = assignment::NewAssignment {
                        dispatch_id: DocId::generate(DocKind::Dispatch),
                        unit: "qn".into(),
                        lead: ["lan", "minh", "hoa"][i % 3].into(),
                        co: vec![],
                        deadline: time::Date::from_calendar_date(
                            2026,
                            time::Month::May,
                            1 + (i % 20) as u8,
                        )
                        .unwrap(),
                    };
                    tx.create_doc(&id, &actor(), 1, |doc| {
                        Ok(assignment::create(doc, &id, &a, &author(), 1)?)
                    })?;
                    if i % 4 == 0 {
                        tx.update_doc(&id, &actor(), 2, |doc| {
                            Ok(assignment::update_status(
                                doc,
                                &id,
                                assignment::Status::Done,
                                None,
                                &author(),
                                2,
                            )?)
                        })?;
                    }
                }
                Ok(())
            })
            .unwrap();
        (dir, store)
    }

    fn plan(store: &Store, sql: &str, args: &[&dyn ToSql]) -> Vec<String> {
        let mut stmt = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let rows = stmt.query_map(args, |r| r.get::<_, String>(3)).unwrap();
        rows.collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn list_queries_read_one_page() {
        let (_dir, store) = populated();
        // As a node runs (it never runs ANALYZE), and with statistics of how the rows spread.
        for analyzed in [false, true] {
            if analyzed {
                store.conn.execute_batch("ANALYZE").unwrap();
            }
            for (sql, args) in [
                (DISPATCHES_ALL, params![10]),
                (DISPATCHES_TO, params!["qn/campha", 10]),
                (DISPATCHES_FROM, params!["qn/campha", 10]),
                (ASSIGNMENTS_ALL, params![10]),
                (ASSIGNMENTS_OVERDUE, params!["2026-05-10", 10]),
                (ASSIGNMENTS_LED, params!["lan", 10]),
                (ASSIGNMENTS_LED_OVERDUE, params!["lan", "2026-05-10", 10]),
                (ASSIGNMENTS_OF, params!["dsp_0000000000000001"]),
                (DOSSIERS, params![10]),
            ] {
                let steps = plan(&store, sql, args);
                for step in &steps {
                    assert!(
                        !step.contains("TEMP B-TREE")
                            && (!step.starts_with("SCAN") || step.contains("INDEX")),
                        "{sql}\nreads more than a page (analyzed: {analyzed}): {steps:?}"
                    );
                }
            }
        }
        // `--overdue` reads only open assignments' index entries.
        let overdue = plan(&store, ASSIGNMENTS_OVERDUE, params!["2026-05-10", 10]).join(" ");
        assert!(overdue.contains("assignments_open"), "{overdue}");
    }

    #[test]
    fn list_totals_count_in_an_index_and_match_the_lists() {
        let (_dir, store) = populated();
        for analyzed in [false, true] {
            if analyzed {
                store.conn.execute_batch("ANALYZE").unwrap();
            }
            // A filtered total searches its index; an unfiltered one walks the smallest index,
            // never the table's rows.
            for (sql, args, filtered) in [
                (COUNT_DISPATCHES_ALL, params![], false),
                (COUNT_DISPATCHES_TO, params!["qn/campha"], true),
                (COUNT_DISPATCHES_FROM, params!["qn/campha"], true),
                (IDS_ISSUED, params!["qn/campha"], true),
                (IDS_ADDRESSED, params!["qn/campha"], true),
                (COUNT_ASSIGNMENTS_ALL, params![], false),
                (COUNT_ASSIGNMENTS_OVERDUE, params!["2026-05-10"], true),
                (COUNT_ASSIGNMENTS_LED, params!["lan"], true),
                (
                    COUNT_ASSIGNMENTS_LED_OVERDUE,
                    params!["lan", "2026-05-10"],
                    true,
                ),
                (COUNT_DOSSIERS, params![], false),
            ] {
                let steps = plan(&store, sql, args);
                for step in &steps {
                    let ok = !step.starts_with("SCAN")
                        || step == "SCAN CONSTANT ROW"
                        || !filtered && step.contains("COVERING INDEX");
                    assert!(
                        ok,
                        "{sql}\nreads rows it does not count (analyzed: {analyzed}): {steps:?}"
                    );
                }
            }
        }
        let all = |limit| {
            store
                .list_assignments(Some("2026-05-10"), Some("lan"), limit)
                .unwrap()
        };
        assert_eq!(
            store
                .count_assignments(Some("2026-05-10"), Some("lan"))
                .unwrap(),
            all(1000).len() as i64
        );
        assert_eq!(
            store.count_assignments(None, None).unwrap(),
            store.list_assignments(None, None, 1000).unwrap().len() as i64
        );
        // qn issues dispatches addressed to itself too: each counted once.
        for unit in ["qn/campha", "qn"] {
            assert_eq!(
                store
                    .count_dispatches(DispatchFilter::Involving(unit))
                    .unwrap(),
                store
                    .list_dispatches(DispatchFilter::Involving(unit), 1000)
                    .unwrap()
                    .len() as i64
            );
        }
    }

    /// `status` counts every unit's backlog in one statement, with each unit's own
    /// acknowledgement, reading `doc_scopes` by its key, and finds what one query per unit found.
    #[test]
    fn the_backlog_of_every_unit_is_one_query_that_matches_one_per_unit() {
        let (_dir, store) = populated();
        let units = [
            "qn/binhlieu",
            "qn/binhlieu/hoanhmo",
            "qn/campha",
            "qn/halong",
        ];
        for after in [0, 25] {
            let wanted: Vec<(String, i64, String)> = units
                .iter()
                .map(|u| (u.to_string(), after, String::new()))
                .collect();
            let all = store.pending_of_units(&wanted).unwrap();
            for unit in units {
                let one = store
                    .pending(&crate::store::sync::Scope::Subtree(unit.into()), "", after)
                    .unwrap();
                let got = all.get(unit).cloned().unwrap_or_default();
                assert_eq!(
                    (got.docs, got.bytes, got.oldest_change_at_ms),
                    (one.docs, one.bytes, one.oldest_change_at_ms),
                    "{unit} after {after}"
                );
            }
            assert!(all.get("qn/campha").is_some_and(|p| p.docs > 0), "{all:?}");
        }
        let wanted = serde_json::json!([["qn/campha", 0, ""]]).to_string();
        let steps = plan(
            &store,
            crate::store::status::PENDING_OF_UNITS,
            params![wanted],
        );
        // Scanned: only the list given, the pending rows gathered and the per-unit results;
        // every table is searched.
        for step in &steps {
            let scanned = step.strip_prefix("SCAN ").and_then(|t| t.split(' ').next());
            assert!(
                scanned.is_none_or(|t| ["json_each", "pend", "p", "x", "o"].contains(&t)),
                "reads more than the units' rows: {steps:?}"
            );
        }
        let searched = steps.join(" ");
        assert!(
            searched.contains("SEARCH s USING PRIMARY KEY (unit=? AND seq>?)"),
            "{searched}"
        );
    }

    #[test]
    fn lists_match_a_sort_of_every_row() {
        let (_dir, store) = populated();
        // What the queries answered before they had indexes of their own: every row, sorted.
        let dispatch_ids = |filter: &str, unit: &str| -> Vec<String> {
            let sql = format!(
                "SELECT d.id FROM dispatches d WHERE {filter} ORDER BY d.created_at DESC, d.id LIMIT 1000"
            );
            let mut stmt = store.conn.prepare(&sql).unwrap();
            let rows = stmt.query_map(params![unit], |r| r.get(0)).unwrap();
            rows.collect::<rusqlite::Result<Vec<String>>>().unwrap()
        };
        let listed = |filter: DispatchFilter<'_>, limit: usize| -> Vec<String> {
            let rows = store.list_dispatches(filter, limit).unwrap();
            rows.into_iter().map(|r| r.id).collect()
        };
        let inbox = "d.id IN (SELECT id FROM dispatch_recipients WHERE unit = ?1)";
        let outbox = "d.issuer = ?1";
        for unit in [
            "qn",
            "qn/binhlieu",
            "qn/binhlieu/hoanhmo",
            "qn/campha",
            "qn/nowhere",
        ] {
            for limit in [1, 7, 1000] {
                let first = |mut ids: Vec<String>| {
                    ids.truncate(limit);
                    ids
                };
                assert_eq!(
                    listed(DispatchFilter::All, limit),
                    first(dispatch_ids("?1 = ?1", unit))
                );
                assert_eq!(
                    listed(DispatchFilter::Inbox(unit), limit),
                    first(dispatch_ids(inbox, unit))
                );
                assert_eq!(
                    listed(DispatchFilter::Outbox(unit), limit),
                    first(dispatch_ids(outbox, unit))
                );
                assert_eq!(
                    listed(DispatchFilter::Involving(unit), limit),
                    first(dispatch_ids(&format!("{outbox} OR {inbox}"), unit)),
                    "{unit} {limit}"
                );
            }
        }
        assert_eq!(
            store
                .list_dispatches(DispatchFilter::Inbox("qn/campha"), 1000)
                .unwrap()
                .len(),
            30
        );

        let mut old = store
            .conn
            .prepare(
                "SELECT id FROM assignments WHERE (?1 IS NULL OR (deadline < ?1 AND status != 'done'))
                 AND (?2 IS NULL OR lead = ?2) ORDER BY deadline, id LIMIT ?3",
            )
            .unwrap();
        for day in [None, Some("2026-05-10"), Some("2000-01-01")] {
            for lead in [None, Some("lan"), Some("nobody")] {
                for limit in [1, 5, 1000] {
                    let want: Vec<String> = old
                        .query_map(params![day, lead, limit], |r| r.get(0))
                        .unwrap()
                        .collect::<rusqlite::Result<_>>()
                        .unwrap();
                    let got: Vec<String> = store
                        .list_assignments(day, lead, limit)
                        .unwrap()
                        .into_iter()
                        .map(|r| r.id)
                        .collect();
                    assert_eq!(got, want, "{day:?} {lead:?} {limit}");
                }
            }
        }
        // 27 with deadlines 1-9 May, of which 9 are done: the open ones only.
        assert_eq!(
            store
                .list_assignments(Some("2026-05-10"), None, 1000)
                .unwrap()
                .len(),
            18
        );
    }
}
