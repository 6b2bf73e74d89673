//! Automerge document schemas: one CRDT document per dispatch, assignment and dossier, and one
//! receipt book per (issuer, recipient unit, year).
//!
//! Pure functions over `AutoCommit`: no SQLite, no files, no network. Every write commits one
//! change whose message records who did what (the audit trail); reads surface conflicts.

pub mod assignment;
pub mod authz;
pub mod dispatch;
pub mod dossier;
pub mod guard;
pub mod receipts;

use std::cell::{Ref, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use automerge::{
    transaction::CommitOptions, AutoCommit, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue,
    Value, ValueRef, ROOT,
};
use serde::{Deserialize, Serialize};

/// Longest free text accepted in any field (summary, note, comment), in bytes.
pub const TEXT_BYTES_MAX: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("document store error: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("document {0} is malformed: {1}")]
    Malformed(String, String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// The kinds of replicated document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocKind {
    Dispatch,
    Assignment,
    Dossier,
    /// A recipient's receipts of one issuer's dispatches (see [`receipts`]).
    Receipts,
}

impl DocKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DocKind::Dispatch => "dispatch",
            DocKind::Assignment => "assignment",
            DocKind::Dossier => "dossier",
            DocKind::Receipts => "receipts",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            DocKind::Dispatch => "dsp",
            DocKind::Assignment => "asg",
            DocKind::Dossier => "dos",
            DocKind::Receipts => "rcp",
        }
    }
}

impl fmt::Display for DocKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A document id: kind prefix and 64 bits, e.g. `dsp_3f9a0c1b2d4e5f60`; random, or derived from
/// what the document is about (receipt books).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DocId(String);

impl DocId {
    pub fn generate(kind: DocKind) -> Self {
        DocId(format!("{}_{:016x}", kind.prefix(), rand::random::<u64>()))
    }

    /// The id of a document that is one per `key` (a hash of what it is about), so that nodes
    /// creating it apart name the same document.
    pub fn derived(kind: DocKind, key: &[u8; 32]) -> Self {
        DocId(format!("{}_{}", kind.prefix(), hex::encode(&key[..8])))
    }

    pub fn kind(&self) -> DocKind {
        match &self.0[..3] {
            "dsp" => DocKind::Dispatch,
            "asg" => DocKind::Assignment,
            "rcp" => DocKind::Receipts,
            _ => DocKind::Dossier,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DocId {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let ok = s.len() == 20
            && matches!(&s[..4], "dsp_" | "asg_" | "dos_" | "rcp_")
            && s[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
        if ok {
            Ok(DocId(s.to_string()))
        } else {
            Err(ModelError::Invalid(format!(
                "{s:?} is not a document id (expected dsp_, asg_, dos_ or rcp_ followed by 16 hex digits)"
            )))
        }
    }
}

impl TryFrom<String> for DocId {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DocId> for String {
    fn from(id: DocId) -> String {
        id.0
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who acts: recorded in every change as the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Author {
    pub user: String,
    pub unit: String,
    /// The node id (hex) of the node that made the change; also its Automerge actor.
    pub node: String,
}

/// The message stored with each change: who, where from, when, and what they did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeNote {
    pub user: String,
    pub unit: String,
    pub node: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub what: String,
}

impl ChangeNote {
    pub fn parse(message: &str) -> Option<ChangeNote> {
        serde_json::from_str(message).ok()
    }
}

/// Commits the pending operations of `doc` as one change carrying the audit note.
pub fn commit(
    doc: &mut AutoCommit,
    author: &Author,
    at_ms: i64,
    what: impl Into<String>,
) -> Option<ChangeHash> {
    let note = ChangeNote {
        user: author.user.clone(),
        unit: author.unit.clone(),
        node: author.node.clone(),
        at_ms,
        what: what.into(),
    };
    let message = serde_json::to_string(&note).expect("a change note always serializes");
    doc.commit_with(
        CommitOptions::default()
            .with_message(message)
            .with_time(at_ms / 1000),
    )
}

/// One line of a document's audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub hash: String,
    pub at_ms: i64,
    pub user: String,
    pub unit: String,
    pub node: String,
    pub what: String,
    pub ops: usize,
    /// The change's Automerge actor (hex): the node whose key must have signed it.
    pub actor: String,
}

/// Every change to the document, oldest first (causal order, ties by time).
pub fn audit(doc: &mut AutoCommit) -> Vec<AuditEntry> {
    doc.get_changes(&[])
        .into_iter()
        .map(|change| {
            let note = change.message().and_then(ChangeNote::parse);
            let (user, unit, node, at_ms, what) = match note {
                Some(n) => (n.user, n.unit, n.node, n.at_ms, n.what),
                None => (
                    "?".into(),
                    "?".into(),
                    change.actor_id().to_hex_string(),
                    change.timestamp() * 1000,
                    "change without an audit note".into(),
                ),
            };
            AuditEntry {
                hash: change.hash().to_string(),
                at_ms,
                user,
                unit,
                node,
                what,
                ops: change.len(),
                actor: change.actor_id().to_hex_string(),
            }
        })
        .collect()
}

/// A field that two people set concurrently: every value Automerge kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub field: String,
    pub values: Vec<String>,
}

/// Reads typed fields out of a document, collecting conflicts on the way.
pub(crate) struct Reader<'a> {
    doc: &'a AutoCommit,
    id: &'a str,
    pub conflicts: Vec<Conflict>,
    /// The maps read so far, each read whole in one pass: one Automerge lookup seeks through the
    /// document's operations, and costs about as much as reading a small map whole. By id: a
    /// dispatch to 600 units has 600 recipient maps, read once per change as it is judged.
    maps: RefCell<HashMap<ObjId, Option<MapRead>>>,
}

/// A map read whole: its entries in Automerge's order, and their positions sorted by key.
struct MapRead {
    entries: Vec<Entry>,
    by_key: Vec<usize>,
}

impl MapRead {
    fn get(&self, key: &str) -> Option<&Entry> {
        self.by_key
            .binary_search_by(|&i| self.entries[i].key.as_str().cmp(key))
            .ok()
            .map(|at| &self.entries[self.by_key[at]])
    }
}

/// One key of a map as read in one pass: its winning value, and whether others were kept.
struct Entry {
    key: String,
    value: Value<'static>,
    /// Set when the value is an object.
    obj: Option<ObjId>,
    conflict: bool,
}

fn scalar_text(value: &Value<'_>) -> String {
    match value {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Str(s) => s.to_string(),
            ScalarValue::Int(i) => i.to_string(),
            ScalarValue::Uint(u) => u.to_string(),
            ScalarValue::Null => "null".into(),
            other => other.to_string(),
        },
        Value::Object(t) => format!("<{t}>"),
    }
}

impl<'a> Reader<'a> {
    pub fn new(doc: &'a AutoCommit, id: &'a str) -> Self {
        Reader {
            doc,
            id,
            conflicts: Vec::new(),
            maps: RefCell::new(HashMap::new()),
        }
    }

    /// The map `obj` read whole (once per reader), or None when `obj` is not a map: then the
    /// caller asks Automerge directly, for its exact answer or error.
    fn map(&self, obj: &ObjId) -> Option<Ref<'_, MapRead>> {
        if !self.maps.borrow().contains_key(obj) {
            let read = match self.doc.object_type(obj) {
                Ok(ObjType::Map | ObjType::Table) => {
                    let entries: Vec<Entry> = self
                        .doc
                        .map_range(obj, ..)
                        .map(|item| {
                            let obj = matches!(item.value, ValueRef::Object(_)).then(|| item.id());
                            Entry {
                                key: item.key.into_owned(),
                                value: item.value.into_value(),
                                obj,
                                conflict: item.conflict,
                            }
                        })
                        .collect();
                    let mut by_key: Vec<usize> = (0..entries.len()).collect();
                    by_key.sort_by(|&a, &b| entries[a].key.cmp(&entries[b].key));
                    Some(MapRead { entries, by_key })
                }
                _ => None,
            };
            self.maps.borrow_mut().insert(obj.clone(), read);
        }
        Ref::filter_map(self.maps.borrow(), |maps| {
            maps.get(obj).and_then(|read| read.as_ref())
        })
        .ok()
    }

    fn malformed(&self, what: String) -> ModelError {
        ModelError::Malformed(self.id.to_string(), what)
    }

    /// The winning value of `key`, recording a conflict when several are kept.
    ///
    /// One lookup: Automerge's `get` is the last of `get_all` (the winner sorts last), and each
    /// lookup seeks through the document's operations, the costliest part of reading.
    fn value(&mut self, obj: &ObjId, key: &str, path: &str) -> Result<Option<Value<'a>>> {
        if let Some(map) = self.map(obj) {
            match map.get(key) {
                None => return Ok(None),
                Some(e) if !e.conflict => return Ok(Some(e.value.clone())),
                Some(_) => {}
            }
        }
        let mut all = self.doc.get_all(obj, key)?;
        if all.len() > 1 {
            self.conflicts.push(Conflict {
                field: path.to_string(),
                values: all.iter().map(|(v, _)| scalar_text(v)).collect(),
            });
        }
        Ok(all.pop().map(|(v, _)| v))
    }

    pub fn str(&mut self, obj: &ObjId, key: &str, path: &str) -> Result<String> {
        self.opt_str(obj, key, path)?
            .ok_or_else(|| self.malformed(format!("field {path} is missing")))
    }

    pub fn opt_str(&mut self, obj: &ObjId, key: &str, path: &str) -> Result<Option<String>> {
        match self.value(obj, key, path)? {
            Some(Value::Scalar(s)) => match s.as_ref() {
                ScalarValue::Str(s) => Ok(Some(s.to_string())),
                _ => Err(self.malformed(format!("field {path} is not text"))),
            },
            Some(_) => Err(self.malformed(format!("field {path} is not text"))),
            None => Ok(None),
        }
    }

    pub fn int(&mut self, obj: &ObjId, key: &str, path: &str) -> Result<i64> {
        self.opt_int(obj, key, path)?
            .ok_or_else(|| self.malformed(format!("field {path} is missing or not a number")))
    }

    pub fn opt_int(&mut self, obj: &ObjId, key: &str, path: &str) -> Result<Option<i64>> {
        match self.value(obj, key, path)? {
            Some(Value::Scalar(s)) => match s.as_ref() {
                ScalarValue::Int(i) => Ok(Some(*i)),
                ScalarValue::Uint(u) => i64::try_from(*u)
                    .map(Some)
                    .map_err(|_| self.malformed(format!("field {path} is out of range"))),
                ScalarValue::Timestamp(t) => Ok(Some(*t)),
                _ => Err(self.malformed(format!("field {path} is not a number"))),
            },
            Some(_) => Err(self.malformed(format!("field {path} is missing or not a number"))),
            None => Ok(None),
        }
    }

    pub fn object(&self, obj: &ObjId, key: &str, path: &str) -> Result<ObjId> {
        if let Some(map) = self.map(obj) {
            return map.get(key).and_then(|e| e.obj.clone()).ok_or_else(|| {
                self.malformed(format!("field {path} is missing or not an object"))
            });
        }
        match self.doc.get(obj, key)? {
            Some((Value::Object(_), id)) => Ok(id),
            _ => Err(self.malformed(format!("field {path} is missing or not an object"))),
        }
    }

    /// The objects held in a list, in order.
    pub fn list_objects(&self, list: &ObjId) -> Vec<ObjId> {
        (0..self.doc.length(list))
            .filter_map(|i| match self.doc.get(list, i) {
                Ok(Some((Value::Object(_), id))) => Some(id),
                _ => None,
            })
            .collect()
    }

    pub fn list_strs(&mut self, list: &ObjId) -> Vec<String> {
        (0..self.doc.length(list))
            .filter_map(|i| match self.doc.get(list, i) {
                Ok(Some((Value::Scalar(s), _))) => s.as_str().map(str::to_string),
                _ => None,
            })
            .collect()
    }

    pub fn keys(&self, obj: &ObjId) -> Vec<String> {
        match self.map(obj) {
            Some(map) => map.entries.iter().map(|e| e.key.clone()).collect(),
            None => self.doc.keys(obj).collect(),
        }
    }

    pub fn doc_type(&mut self) -> Result<String> {
        self.str(&ROOT, "type", "type")
    }
}

/// Checks a free-text field's size and that it is not blank.
pub fn check_text(field: &str, text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return Err(ModelError::Invalid(format!("{field} must not be empty")));
    }
    if text.len() > TEXT_BYTES_MAX {
        return Err(ModelError::Invalid(format!(
            "{field} is {} bytes, more than the {TEXT_BYTES_MAX} allowed",
            text.len()
        )));
    }
    Ok(())
}

/// Creates a new, empty list under `key`.
pub(crate) fn put_list(doc: &mut AutoCommit, obj: &ObjId, key: &str) -> Result<ObjId> {
    Ok(automerge::transaction::Transactable::put_object(
        doc,
        obj,
        key,
        ObjType::List,
    )?)
}

/// Creates a new, empty map under `key`.
pub(crate) fn put_map(doc: &mut AutoCommit, obj: &ObjId, key: &str) -> Result<ObjId> {
    Ok(automerge::transaction::Transactable::put_object(
        doc,
        obj,
        key,
        ObjType::Map,
    )?)
}

/// Appends a new map to a list.
pub(crate) fn push_map(doc: &mut AutoCommit, list: &ObjId) -> Result<ObjId> {
    let len = doc.length(list);
    Ok(automerge::transaction::Transactable::insert_object(
        doc,
        list,
        len,
        ObjType::Map,
    )?)
}

/// A document's fields, read once for both the scope checks and the index rows.
#[derive(Debug, Clone)]
pub enum DocView {
    Dispatch(dispatch::DispatchView),
    Assignment(assignment::AssignmentView),
    Dossier(dossier::DossierView),
    Receipts(receipts::ReceiptBook),
}

impl DocView {
    pub fn read(doc: &AutoCommit, id: &DocId) -> Result<DocView> {
        Ok(match id.kind() {
            DocKind::Dispatch => DocView::Dispatch(dispatch::read(doc, id)?),
            DocKind::Assignment => DocView::Assignment(assignment::read(doc, id)?),
            DocKind::Dossier => DocView::Dossier(dossier::read(doc, id)?),
            DocKind::Receipts => DocView::Receipts(receipts::read(doc, id)?),
        })
    }

    /// The units [`parties`] returns for the same document, from the fields already read.
    pub fn parties(&self) -> Vec<String> {
        let mut units = match self {
            DocView::Dispatch(v) => std::iter::once(v.issuer.clone())
                .chain(v.recipients.iter().map(|r| r.unit.clone()))
                .collect(),
            DocView::Assignment(v) => vec![v.unit.clone()],
            DocView::Dossier(v) => v
                .route
                .iter()
                .map(|s| s.unit.clone())
                .chain([v.origin.clone(), v.holder.clone()])
                .collect(),
            DocView::Receipts(v) => vec![v.issuer.clone(), v.recipient.clone()],
        };
        units.sort();
        units.dedup();
        units
    }
}

/// The units a document concerns: what decides which nodes replicate it.
pub fn parties(doc: &AutoCommit, id: &DocId) -> Result<Vec<String>> {
    let mut units = match id.kind() {
        DocKind::Dispatch => dispatch::parties(doc, id)?,
        DocKind::Assignment => assignment::parties(doc, id)?,
        DocKind::Dossier => dossier::parties(doc, id)?,
        DocKind::Receipts => receipts::parties(doc, id)?,
    };
    units.sort();
    units.dedup();
    Ok(units)
}
