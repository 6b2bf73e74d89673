//! Signatures of Automerge changes (who wrote each change, provably) and the certificates of
//! the nodes that signed them. Stores and reads bytes only: signing and verifying are the
//! caller's (node, through trust), so the store never holds a key.

use automerge::{AutoCommit, ChangeHash};
use rusqlite::{params, OptionalExtension};

use super::{Result, SqlContext, Store, StoreError, WriteTx};
use crate::model::DocId;

/// Bytes of one change signature (ECDSA P-256, fixed-size `r || s`).
pub const SIG_BYTES: usize = 64;

/// One change's signature: the change, the node (actor) that made it, and its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSigRow {
    pub hash: [u8; 32],
    /// The change's Automerge actor: the author's 16-byte node id.
    pub actor: Vec<u8>,
    pub sig: [u8; SIG_BYTES],
}

/// Signs this node's new changes as a local write stores them ([`WriteTx::create_doc`],
/// [`WriteTx::update_doc`]); the node gives the store one at open.
pub trait ChangeSigning: Send + Sync {
    fn sign_change(
        &self,
        doc: &str,
        hash: &[u8; 32],
    ) -> std::result::Result<[u8; SIG_BYTES], String>;
}

/// A node certificate as stored: what it certifies, read once when it was checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertRow {
    pub node_id: String,
    pub unit: String,
    pub role: String,
    pub serial: Vec<u8>,
    pub public_key: Vec<u8>,
    pub der: Vec<u8>,
}

fn sig_from(bytes: Vec<u8>) -> rusqlite::Result<[u8; SIG_BYTES]> {
    bytes.try_into().map_err(|b: Vec<u8>| {
        rusqlite::Error::FromSqlConversionFailure(
            b.len(),
            rusqlite::types::Type::Blob,
            "a change signature that is not 64 bytes".into(),
        )
    })
}

fn hash_from(bytes: Vec<u8>) -> rusqlite::Result<[u8; 32]> {
    bytes.try_into().map_err(|b: Vec<u8>| {
        rusqlite::Error::FromSqlConversionFailure(
            b.len(),
            rusqlite::types::Type::Blob,
            "a change hash that is not 32 bytes".into(),
        )
    })
}

fn read_sigs(
    conn: &rusqlite::Connection,
    path: &std::path::Path,
    doc: &str,
) -> Result<Vec<ChangeSigRow>> {
    conn.prepare_cached("SELECT hash, actor, sig FROM change_sigs WHERE doc = ?1")
        .at(path)?
        .query_map([doc], |r| {
            Ok(ChangeSigRow {
                hash: hash_from(r.get(0)?)?,
                actor: r.get(1)?,
                sig: sig_from(r.get(2)?)?,
            })
        })
        .at(path)?
        .collect::<rusqlite::Result<_>>()
        .at(path)
}

impl Store {
    /// Every stored signature of the changes of `doc`.
    pub fn change_sigs(&self, doc: &DocId) -> Result<Vec<ChangeSigRow>> {
        read_sigs(&self.conn, &self.path, doc.as_str())
    }

    /// Every node certificate this node holds.
    pub fn node_certs(&self) -> Result<Vec<NodeCertRow>> {
        self.conn
            .prepare_cached("SELECT node_id, unit, role, serial, public_key, der FROM node_certs")
            .at(&self.path)?
            .query_map([], |r| {
                Ok(NodeCertRow {
                    node_id: r.get(0)?,
                    unit: r.get(1)?,
                    role: r.get(2)?,
                    serial: r.get(3)?,
                    public_key: r.get(4)?,
                    der: r.get(5)?,
                })
            })
            .at(&self.path)?
            .collect::<rusqlite::Result<_>>()
            .at(&self.path)
    }

    /// The certificate (DER) held for one node.
    pub fn node_cert(&self, node_id: &str) -> Result<Option<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT der FROM node_certs WHERE node_id = ?1")
            .at(&self.path)?
            .query_row([node_id], |r| r.get(0))
            .optional()
            .at(&self.path)
    }
}

impl WriteTx<'_> {
    /// Stores change signatures of `doc` (checked by the caller); one already held is kept.
    pub fn put_change_sigs(&mut self, doc: &DocId, sigs: &[ChangeSigRow]) -> Result<()> {
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT OR IGNORE INTO change_sigs (doc, hash, actor, sig) VALUES (?1, ?2, ?3, ?4)",
            )
            .at(self.path)?;
        for row in sigs {
            insert
                .execute(params![
                    doc.as_str(),
                    &row.hash[..],
                    row.actor,
                    &row.sig[..]
                ])
                .at(self.path)?;
        }
        Ok(())
    }

    /// Stores a node certificate (checked by the caller against the CA); a newer one of the same
    /// node (re-enrolled) replaces it.
    pub fn put_node_cert(&mut self, cert: &NodeCertRow, at_ms: i64) -> Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO node_certs (node_id, unit, role, serial, public_key, der, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (node_id) DO UPDATE SET unit = excluded.unit, role = excluded.role,
                   serial = excluded.serial, public_key = excluded.public_key, der = excluded.der,
                   added_at = excluded.added_at
                 WHERE der != excluded.der",
            )
            .at(self.path)?
            .execute(params![
                cert.node_id,
                cert.unit,
                cert.role,
                cert.serial,
                cert.public_key,
                cert.der,
                at_ms
            ])
            .at(self.path)?;
        Ok(())
    }

    /// Signs, with this node's signer, every change of `doc` after `old_heads` (all when None):
    /// a local write's new changes, whatever actor they carry (a receiver refuses a change whose
    /// actor is not the signer's). [`WriteTx::create_doc`] and [`WriteTx::update_doc`] call it;
    /// a caller storing a document it built itself ([`WriteTx::save_doc`]) calls it first.
    pub fn sign_new_changes(
        &mut self,
        id: &DocId,
        old_heads: Option<&[ChangeHash]>,
        doc: &mut AutoCommit,
    ) -> Result<()> {
        let Some(signer) = self.signer else {
            return Ok(());
        };
        let rows = doc
            .get_changes_meta(old_heads.unwrap_or_default())
            .into_iter()
            .map(|change| {
                let sig = signer
                    .sign_change(id.as_str(), &change.hash.0)
                    .map_err(|e| StoreError::Invalid(format!("signing a change of {id}: {e}")))?;
                Ok(ChangeSigRow {
                    hash: change.hash.0,
                    actor: change.actor.to_bytes().to_vec(),
                    sig,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.put_change_sigs(id, &rows)
    }

    /// Forgets every change signature, as a database from before schema 8 holds none.
    #[cfg(test)]
    pub(crate) fn delete_change_sigs_for_test(&mut self) -> Result<()> {
        self.tx
            .execute("DELETE FROM change_sigs", [])
            .at(self.path)?;
        Ok(())
    }

    /// Signs the changes of this node's own actor that carry no signature (documents written
    /// before schema 8). Returns how many were signed.
    pub fn sign_own_unsigned_changes(&mut self, actor: &[u8]) -> Result<usize> {
        let Some(signer) = self.signer else {
            return Ok(0);
        };
        let ids: Vec<String> = self
            .tx
            .prepare("SELECT id FROM docs")
            .at(self.path)?
            .query_map([], |r| r.get(0))
            .at(self.path)?
            .collect::<rusqlite::Result<_>>()
            .at(self.path)?;
        let mut signed = 0;
        for id in ids {
            let id: DocId = id
                .parse()
                .map_err(|e| StoreError::Corrupt(format!("document id {id:?}: {e}")))?;
            let Some(mut rec) = self.load_doc(&id)? else {
                continue;
            };
            let held: std::collections::HashSet<[u8; 32]> =
                read_sigs(&self.tx, self.path, id.as_str())?
                    .into_iter()
                    .map(|r| r.hash)
                    .collect();
            let mut rows = Vec::new();
            for change in rec.doc.get_changes_meta(&[]) {
                if change.actor.to_bytes() != actor || held.contains(&change.hash.0) {
                    continue;
                }
                let sig = signer
                    .sign_change(id.as_str(), &change.hash.0)
                    .map_err(|e| StoreError::Invalid(format!("signing a change of {id}: {e}")))?;
                rows.push(ChangeSigRow {
                    hash: change.hash.0,
                    actor: actor.to_vec(),
                    sig,
                });
            }
            signed += rows.len();
            self.put_change_sigs(&id, &rows)?;
        }
        Ok(signed)
    }
}
