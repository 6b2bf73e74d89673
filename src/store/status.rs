//! Health in SQLite: which peer sessions are open and when each peer was last heard from, and
//! the newest status each node of this node's subtree published (carried up by sync).
//!
//! Stores and reads rows only; what counts as connected, stale or a problem is node/health.rs's.

use std::collections::HashMap;

use rusqlite::params;

use super::sync::Pending;
use super::{Result, SqlContext, Store, WriteTx};

/// What is still to be delivered to each unit of a list, in one statement: per unit, the
/// documents of its scope (`doc_scopes`, read by its `(unit, seq)` key) past `after` whose
/// current state did not come from `skip`, their stored bytes plus the scans they attach that
/// `skip` did not send, and when the oldest changed; as `Store::pending` counts one unit. The
/// pending rows are gathered once (MATERIALIZED: read twice otherwise, 2.4 times slower on a
/// province where nothing was acknowledged).
pub(crate) const PENDING_OF_UNITS: &str = "WITH want(unit, after, skip) AS (
         SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
         FROM json_each(?1)),
     pend AS MATERIALIZED (
         SELECT w.unit, w.skip, d.id, length(d.snapshot) + d.chunk_bytes AS bytes, d.updated_at
         FROM want w JOIN doc_scopes s ON s.unit = w.unit AND s.seq > w.after
         JOIN docs d ON d.id = s.doc_id
         WHERE d.origin IS NOT w.skip),
     docs_of AS (
         SELECT unit, COUNT(*) AS n, SUM(bytes) AS bytes, MIN(updated_at) AS oldest
         FROM pend GROUP BY unit),
     scans_of AS (
         SELECT x.unit, SUM(b.size) AS bytes
         FROM (SELECT DISTINCT p.unit, p.skip, db.hash FROM pend p JOIN doc_blobs db ON db.doc_id = p.id) x
         JOIN blobs b ON b.hash = x.hash
         WHERE NOT EXISTS (SELECT 1 FROM blob_sources bs WHERE bs.hash = x.hash AND bs.node_id = x.skip)
         GROUP BY x.unit)
     SELECT o.unit, o.n, o.bytes + COALESCE(c.bytes, 0), o.oldest
     FROM docs_of o LEFT JOIN scans_of c ON c.unit = o.unit";

/// A peer node's sessions as the serving process last recorded them.
#[derive(Debug, Clone)]
pub struct PeerLive {
    pub node_id: String,
    pub unit: String,
    /// Its certificate's serial (hex), to tell whether the CRL revokes it.
    pub serial: String,
    pub last_seen_at_ms: Option<i64>,
    /// Refreshed while a session is open; None once it ended.
    pub alive_at_ms: Option<i64>,
}

/// A published status as stored: the entry's JSON and how it arrived.
#[derive(Debug, Clone)]
pub struct StoredStatus {
    pub unit: String,
    /// The peer node that delivered it (the unit's own node, or a relay below this node).
    pub via: String,
    pub received_at_ms: i64,
    pub body: String,
}

impl Store {
    /// [`Store::pending`] of many units below this node at once: each `(unit, after,
    /// skip_origin)` counted past its relay's acknowledgement (`after`) leaving out what that
    /// relay's node sent (`skip_origin`; "" for none). Units with nothing pending are absent.
    /// One statement for all, where `status` on a province once ran one per unit (about 600).
    pub fn pending_of_units(
        &self,
        units: &[(String, i64, String)],
    ) -> Result<HashMap<String, Pending>> {
        if units.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted = serde_json::to_string(units).expect("unit lists serialize");
        let mut stmt = self.conn.prepare_cached(PENDING_OF_UNITS).at(&self.path)?;
        let rows = stmt
            .query_map([wanted], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Pending {
                        docs: r.get(1)?,
                        bytes: r.get(2)?,
                        oldest_change_at_ms: r.get(3)?,
                    },
                ))
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<HashMap<_, _>>>()
            .at(&self.path)
    }

    pub fn peer_lives(&self) -> Result<Vec<PeerLive>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT node_id, unit, serial, last_seen_at, alive_at FROM peer_live ORDER BY unit, node_id",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(PeerLive {
                    node_id: r.get(0)?,
                    unit: r.get(1)?,
                    serial: r.get(2)?,
                    last_seen_at_ms: r.get(3)?,
                    alive_at_ms: r.get(4)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// The statuses held of units at or below `unit`, at most `limit`.
    pub fn node_statuses_within(&self, unit: &str, limit: usize) -> Result<Vec<StoredStatus>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT unit, via, received_at, body FROM node_status
                 WHERE unit = ?1 OR substr(unit, 1, length(?1) + 1) = ?1 || '/'
                 ORDER BY unit LIMIT ?2",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map(params![unit, limit as i64], |r| {
                Ok(StoredStatus {
                    unit: r.get(0)?,
                    via: r.get(1)?,
                    received_at_ms: r.get(2)?,
                    body: r.get(3)?,
                })
            })
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Assignments past their deadline (`today`, YYYY-MM-DD) and not done, per unit.
    pub fn overdue_by_unit(&self, today: &str) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT unit, COUNT(*) FROM assignments WHERE deadline < ?1 AND status != 'done'
                 GROUP BY unit ORDER BY unit",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([today], |r| Ok((r.get(0)?, r.get(1)?)))
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }

    /// Scans partly received: transfers under way or waiting to resume.
    pub fn scans_in_flight(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM blob_partial", [], |r| r.get(0))
            .at(&self.path)
    }

    /// Documents refused per peer node and direction (`by_peer`): (node, by_peer, count).
    pub fn refusal_counts(&self) -> Result<Vec<(String, bool, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT peer_node, by_peer, COUNT(*) FROM refused_docs GROUP BY peer_node, by_peer",
            )
            .at(&self.path)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .at(&self.path)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().at(&self.path)
    }
}

impl WriteTx<'_> {
    /// A session with `node_id` opened (and a frame just arrived).
    pub fn peer_live_open(
        &self,
        node_id: &str,
        unit: &str,
        serial: &str,
        at_ms: i64,
    ) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO peer_live (node_id, unit, serial, last_seen_at, alive_at) VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT(node_id) DO UPDATE SET unit = excluded.unit, serial = excluded.serial,
                   last_seen_at = excluded.last_seen_at, alive_at = excluded.alive_at",
                params![node_id, unit, serial, at_ms],
            )
            .at(self.path)?;
        Ok(())
    }

    /// A session with `node_id` is still open at `alive_ms`; its last frame came at `seen_ms`.
    pub fn peer_live_beat(&self, node_id: &str, alive_ms: i64, seen_ms: i64) -> Result<()> {
        self.tx
            .prepare_cached(
                "UPDATE peer_live SET alive_at = ?2, last_seen_at = MAX(COALESCE(last_seen_at, 0), ?3)
                 WHERE node_id = ?1",
            )
            .at(self.path)?
            .execute(params![node_id, alive_ms, seen_ms])
            .at(self.path)?;
        Ok(())
    }

    /// The last session with `node_id` ended; its last frame came at `seen_ms`.
    pub fn peer_live_close(&self, node_id: &str, seen_ms: i64) -> Result<()> {
        self.tx
            .execute(
                "UPDATE peer_live SET alive_at = NULL, last_seen_at = MAX(COALESCE(last_seen_at, 0), ?2)
                 WHERE node_id = ?1",
                params![node_id, seen_ms],
            )
            .at(self.path)?;
        Ok(())
    }

    /// No session is open: the process that recorded the open ones has ended.
    pub fn peer_live_all_closed(&self) -> Result<()> {
        self.tx
            .execute("UPDATE peer_live SET alive_at = NULL", [])
            .at(self.path)?;
        Ok(())
    }

    /// Keeps a unit's published status if it is newer than the one held; true if kept.
    pub fn node_status_put(
        &self,
        unit: &str,
        node_id: &str,
        as_of_ms: i64,
        via: &str,
        received_at_ms: i64,
        body: &str,
    ) -> Result<bool> {
        let changed = self
            .tx
            .prepare_cached(
                "INSERT INTO node_status (unit, node_id, as_of, via, received_at, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(unit) DO UPDATE SET node_id = excluded.node_id, as_of = excluded.as_of,
                   via = excluded.via, received_at = excluded.received_at, body = excluded.body
                 WHERE excluded.as_of > node_status.as_of",
            )
            .at(self.path)?
            .execute(params![unit, node_id, as_of_ms, via, received_at_ms, body])
            .at(self.path)?;
        Ok(changed > 0)
    }
}
