//! What a change may do to a document, given the unit that made it: the authorization table of
//! docs/security.md, judged on the document's fields just before and just after the change
//! (what it does), never on what its message says it does. Pure: no store, no network.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use automerge::{
    legacy, AutoCommit, ChangeHash, ExpandedChange, ObjId, ObjType, ReadDoc, Value, ROOT,
};

use super::receipts::{self, ReceiptBook, RECEIPTS_MAX};
use super::{DocId, DocView};

/// One change to judge: its hash and its dependencies.
pub type Step = (ChangeHash, Vec<ChangeHash>);

/// Judges changes of one document in turn. A working copy follows the changes: a chain of
/// changes (each depending on the previous one, as one node's edits are) costs one replay of
/// the history before it and one applied change each, not a replay per change (1,000 comments
/// took 18.6 s judged by replay, release build). A state read is kept only while a change still
/// to be judged needs it, so a long chain holds one state at a time, not one per change.
pub struct Judge<'a> {
    doc: &'a mut AutoCommit,
    id: &'a DocId,
    /// States read, by (sorted) heads, that changes still to be judged will ask for.
    states: HashMap<Vec<ChangeHash>, DocView>,
    /// How many more times each state will be asked for: once before each change depending on
    /// exactly those heads, once after each change.
    needs: HashMap<Vec<ChangeHash>, usize>,
    /// A copy of the document at the given (sorted) heads.
    cursor: Option<(Vec<ChangeHash>, AutoCommit)>,
    /// A dispatch's recipients map and comments list as its first change made them.
    made: Option<(legacy::ObjectId, legacy::ObjectId)>,
}

fn key(heads: &[ChangeHash]) -> Vec<ChangeHash> {
    let mut key = heads.to_vec();
    key.sort();
    key
}

impl<'a> Judge<'a> {
    /// A judge of `steps`, changes of `doc` (which holds them all), to be judged in that order.
    pub fn new(doc: &'a mut AutoCommit, id: &'a DocId, steps: &[Step]) -> Self {
        let mut needs: HashMap<Vec<ChangeHash>, usize> = HashMap::new();
        for (hash, deps) in steps {
            if !deps.is_empty() {
                *needs.entry(key(deps)).or_default() += 1;
            }
            *needs.entry(vec![*hash]).or_default() += 1;
        }
        Judge {
            doc,
            id,
            states: HashMap::new(),
            needs,
            cursor: None,
            made: None,
        }
    }

    /// Tells the judge the document's fields at `heads`, read already (the whole document's, or
    /// the stored state's): a change ending there, or starting there, costs no replay.
    pub fn know(&mut self, heads: &[ChangeHash], view: &DocView) {
        let key = key(heads);
        if self.needs.get(&key).is_some_and(|n| *n > 0) {
            self.states.insert(key, view.clone());
        }
    }

    /// Gives the judge a copy of the document at `heads` (the stored state a peer's changes
    /// extend) as its working copy, so the first new change applies to it without a replay.
    pub fn start_at(&mut self, heads: &[ChangeHash], doc: AutoCommit) {
        self.cursor = Some((key(heads), doc));
    }

    /// Refuses, with why, the change `hash` (depending on `deps`) if the unit `unit` may not
    /// make it.
    pub fn authorize(
        &mut self,
        hash: ChangeHash,
        deps: &[ChangeHash],
        unit: &str,
    ) -> Result<(), String> {
        if self.receipt_on_chain(hash, deps, unit)? {
            return Ok(());
        }
        let before = if deps.is_empty() {
            // A receipt book's id derives from its issuer, recipient and year: two nodes of the
            // recipient's unit (a standby) may each start it, with the same header.
            if self.id.kind() != super::DocKind::Receipts {
                self.only_first_change(hash)?;
            }
            None
        } else {
            Some(self.state(deps)?)
        };
        if let Some(DocView::Dispatch(b)) = &before {
            self.no_replaced_entries(hash, b, unit)?;
        }
        let after = self.after(hash, deps)?;
        match (before.as_ref(), &after) {
            (None, after) => created(after, unit),
            (Some(before), after) => changed(before, after, unit),
        }
    }

    /// The common long history, judged by its operations alone: a receipt, by its recipient,
    /// applied to the working copy standing at the change's dependencies. A dispatch to 600
    /// units gets 600 receipts (before receipt books), a receipt book one per dispatch of a
    /// year; reading the whole document at each would make judging them quadratic. Anything
    /// else, or anything unusual in one, is left to the full comparison (false).
    fn receipt_on_chain(
        &mut self,
        hash: ChangeHash,
        deps: &[ChangeHash],
        unit: &str,
    ) -> Result<bool, String> {
        let deps = key(deps);
        let Some((at, doc)) = self.cursor.as_ref() else {
            return Ok(false);
        };
        // A state this skips reading is read later if a branch asks for it (a replay).
        if deps.is_empty() || *at != deps {
            return Ok(false);
        }
        let change = self
            .doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| "a change to judge is not in the document".to_string())?;
        let ops = change.decode();
        let plain = match self.id.kind() {
            super::DocKind::Dispatch => dispatch_receipt(doc, &ops, unit),
            super::DocKind::Receipts => book_receipt(doc, &ops, unit),
            _ => false,
        };
        if !plain {
            return Ok(false);
        }
        let change = change.clone();
        let (_, mut doc) = self.cursor.take().expect("checked above");
        doc.apply_changes([change])
            .map_err(|e| format!("a change does not apply: {e}"))?;
        self.cursor = Some((vec![hash], doc));
        Ok(true)
    }

    /// A dispatch, an assignment or a dossier (their ids are random) has one first change (no
    /// dependencies): a second is a parallel history whose fields would conflict with the real
    /// ones, and could win the merge.
    fn only_first_change(&mut self, hash: ChangeHash) -> Result<(), String> {
        let firsts = self
            .doc
            .get_changes_meta(&[])
            .into_iter()
            .filter(|c| c.deps.is_empty() && c.hash != hash)
            .count();
        require(firsts == 0, || {
            "a change starts the document again (a second first change, a parallel history)".into()
        })
    }

    /// A dispatch's entries are compared by value, so a change must not swap one for a copy:
    /// no operation touches the recipients map or the comments list themselves, none replaces,
    /// removes or doubles (a concurrent entry under the same key) a recipient's entry, and none
    /// changes an element of the comments list (they are only inserted). A swapped copy would
    /// read the same, and every later write of its owner to the original would be lost.
    fn no_replaced_entries(
        &mut self,
        hash: ChangeHash,
        before: &super::dispatch::DispatchView,
        unit: &str,
    ) -> Result<(), String> {
        if self.made.is_none() {
            self.made = Some(self.dispatch_lists()?);
        }
        let (recipients, comments) = self.made.as_ref().expect("set above");
        let change = self
            .doc
            .get_change_by_hash(&hash)
            .ok_or_else(|| "a change to judge is not in the document".to_string())?;
        for op in &change.decode().operations {
            let key = match &op.key {
                legacy::Key::Map(key) => Some(key.as_str()),
                legacy::Key::Seq(_) => None,
            };
            if op.obj == legacy::ObjectId::Root && matches!(key, Some("recipients" | "comments")) {
                return Err(format!(
                    "{unit} replaced the recipients or comments of a dispatch"
                ));
            }
            if op.obj == *recipients {
                let held = key.is_some_and(|k| before.recipients.iter().any(|r| r.unit == k));
                require(op.pred.is_empty() && !held, || {
                    format!(
                        "{unit} removed recipient {} of a dispatch, or replaced its entry",
                        key.unwrap_or("?")
                    )
                })?;
            }
            if op.obj == *comments && !op.insert {
                return Err(format!(
                    "{unit} changed or removed a comment (comments are only ever added)"
                ));
            }
        }
        Ok(())
    }

    /// The ids of the recipients map and the comments list that the dispatch's first change made.
    fn dispatch_lists(&mut self) -> Result<(legacy::ObjectId, legacy::ObjectId), String> {
        let first = self
            .doc
            .get_changes_meta(&[])
            .into_iter()
            .find(|c| c.deps.is_empty())
            .map(|c| c.hash);
        let first = first
            .and_then(|hash| self.doc.get_change_by_hash(&hash))
            .ok_or_else(|| "a dispatch without a first change".to_string())?
            .decode();
        let made = |name: &str| {
            first.operations.iter().enumerate().find_map(|(i, op)| {
                let made_here = op.obj == legacy::ObjectId::Root
                    && matches!(&op.key, legacy::Key::Map(k) if k == name)
                    && matches!(op.action, legacy::OpType::Make(_));
                made_here.then(|| {
                    legacy::ObjectId::Id(legacy::OpId(
                        first.start_op.get() + i as u64,
                        first.actor_id.clone(),
                    ))
                })
            })
        };
        match (made("recipients"), made("comments")) {
            (Some(r), Some(c)) => Ok((r, c)),
            _ => Err("a dispatch whose first change made no recipients or comments".into()),
        }
    }

    fn read(&self, doc: &AutoCommit) -> Result<DocView, String> {
        DocView::read(doc, self.id)
            .map_err(|e| format!("the document does not read at one of its changes: {e}"))
    }

    /// The state at `key` when read already, counting one use of it (dropped after its last).
    fn known(&mut self, key: &[ChangeHash]) -> Option<DocView> {
        let left = self.needs.get_mut(key).map(|n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left.unwrap_or(0) == 0 {
            self.states.remove(key)
        } else {
            self.states.get(key).cloned()
        }
    }

    /// The document's fields at `heads`.
    fn state(&mut self, heads: &[ChangeHash]) -> Result<DocView, String> {
        let key = key(heads);
        if let Some(view) = self.known(&key) {
            return Ok(view);
        }
        let at = match self.cursor.take() {
            Some((at_heads, doc)) if at_heads == key => doc,
            _ => self.replay(&key)?,
        };
        self.keep(key, at)
    }

    /// The document's fields just after change `hash`: applied to the working copy when that
    /// stands at the change's dependencies, else read from a replay.
    fn after(&mut self, hash: ChangeHash, deps: &[ChangeHash]) -> Result<DocView, String> {
        let key = vec![hash];
        if let Some(view) = self.known(&key) {
            return Ok(view);
        }
        let deps = self::key(deps);
        let base = match self.cursor.take() {
            Some((at_heads, doc)) if at_heads == deps => Some(doc),
            None if deps.is_empty() => Some(AutoCommit::new()),
            _ => None,
        };
        let at = match base {
            Some(mut doc) => {
                let change = self
                    .doc
                    .get_change_by_hash(&hash)
                    .ok_or_else(|| "a change to judge is not in the document".to_string())?;
                doc.apply_changes([change])
                    .map_err(|e| format!("a change does not apply: {e}"))?;
                doc
            }
            None => self.replay(&key)?,
        };
        self.keep(key, at)
    }

    /// The document as it stood at `heads`, replayed from its history.
    fn replay(&mut self, heads: &[ChangeHash]) -> Result<AutoCommit, String> {
        self.doc
            .fork_at(heads)
            .map_err(|e| format!("its history does not replay: {e}"))
    }

    /// Reads the fields of `at`, the state at `key` (just asked for once), keeps them while
    /// another change needs them, and keeps `at` as the working copy the next change of a chain
    /// applies to.
    fn keep(&mut self, key: Vec<ChangeHash>, at: AutoCommit) -> Result<DocView, String> {
        let view = self.read(&at)?;
        if self.needs.get(&key).is_some_and(|n| *n > 0) {
            self.states.insert(key.clone(), view.clone());
        }
        self.cursor = Some((key, at));
        Ok(view)
    }
}

/// The map at `key` of `obj`, if that is what the key holds.
fn map_at(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<ObjId> {
    match doc.get(obj, key) {
        Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
        _ => None,
    }
}

fn text_at(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(s), _))) => s.as_str().map(str::to_string),
        _ => None,
    }
}

fn is_obj(id: &ObjId, legacy: &legacy::ObjectId) -> bool {
    match (id, legacy) {
        (ObjId::Id(ctr, actor, _), legacy::ObjectId::Id(legacy::OpId(c, a))) => {
            ctr == c && actor == a
        }
        _ => false,
    }
}

/// A first write (nothing overwritten) in `obj` of `received_at` (an integer) or `received_by`
/// (a text), the two fields of a receipt: its key.
fn receipt_field(op: &legacy::Op, obj: impl Fn(&legacy::ObjectId) -> bool) -> Option<&str> {
    match (&op.action, &op.key) {
        (legacy::OpType::Put(v), legacy::Key::Map(key))
            if !op.insert
                && op.pred.is_empty()
                && obj(&op.obj)
                && match key.as_str() {
                    "received_at" => v.is_int(),
                    "received_by" => v.is_str(),
                    _ => false,
                } =>
        {
            Some(key.as_str())
        }
        _ => None,
    }
}

/// A dispatch receipt as `dispatch::receive` writes it: `received_at` and `received_by` put
/// for the first time in the author's own recipient entry, and nothing else. Whatever a
/// recipient writes in its own entry is allowed (see [`changed`]); this only spares the read.
fn dispatch_receipt(doc: &AutoCommit, change: &ExpandedChange, unit: &str) -> bool {
    let Some(entry) = map_at(doc, &ROOT, "recipients").and_then(|r| map_at(doc, &r, unit)) else {
        return false;
    };
    !change.operations.is_empty()
        && change.operations.iter().all(|op| {
            receipt_field(op, |o| is_obj(&entry, o))
                .is_some_and(|key| matches!(doc.get(&entry, key), Ok(None)))
        })
}

/// A receipt as `receipts::record` adds it to a book by the book's recipient: a new map at a
/// dispatch id that the book does not hold yet, with `received_at` (an integer) and
/// `received_by` (a text) in it, and nothing else; the book stays within [`RECEIPTS_MAX`].
fn book_receipt(doc: &AutoCommit, change: &ExpandedChange, unit: &str) -> bool {
    if text_at(doc, &ROOT, "type").as_deref() != Some("receipts")
        || text_at(doc, &ROOT, "recipient").as_deref() != Some(unit)
    {
        return false;
    }
    let [make, at, by] = &change.operations[..] else {
        return false;
    };
    let new_entry =
        legacy::ObjectId::Id(legacy::OpId(change.start_op.get(), change.actor_id.clone()));
    let made = match (&make.action, &make.key, &make.obj) {
        (legacy::OpType::Make(ObjType::Map), legacy::Key::Map(key), legacy::ObjectId::Root)
            if !make.insert && make.pred.is_empty() =>
        {
            key.as_str()
        }
        _ => return false,
    };
    let is_dispatch = made
        .parse::<DocId>()
        .is_ok_and(|d| d.kind() == super::DocKind::Dispatch);
    let field = |op: &legacy::Op, key: &str| receipt_field(op, |o| *o == new_entry) == Some(key);
    is_dispatch
        && matches!(doc.get(&ROOT, made), Ok(None))
        && field(at, "received_at")
        && field(by, "received_by")
        && doc.length(&ROOT) < RECEIPTS_MAX + receipts::HEADER.len()
}

fn require(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

/// A document's first change: made by the unit it belongs to.
fn created(doc: &DocView, unit: &str) -> Result<(), String> {
    match doc {
        DocView::Dispatch(d) => require(d.issuer == unit, || {
            format!("a dispatch issued by {} created by {unit}", d.issuer)
        }),
        DocView::Assignment(a) => require(a.unit == unit, || {
            format!("an assignment of {} created by {unit}", a.unit)
        }),
        DocView::Dossier(d) => require(d.origin == unit && d.holder == unit, || {
            format!("a dossier of {} created by {unit}", d.origin)
        }),
        DocView::Receipts(b) => {
            require(b.recipient == unit, || {
                format!("a receipt book of {} created by {unit}", b.recipient)
            })?;
            book_fits(b)
        }
    }
}

/// A book's id is the one its issuer, recipient and year derive (so no second book of the same
/// three exists to hide receipts in), and it holds at most [`RECEIPTS_MAX`] receipts.
fn book_fits(b: &ReceiptBook) -> Result<(), String> {
    require(
        receipts::book_id(&b.issuer, &b.recipient, b.year).as_str() == b.id,
        || {
            format!(
                "receipt book {} is not the book of {} for {} in {}",
                b.id, b.recipient, b.issuer, b.year
            )
        },
    )?;
    require(b.receipts.len() <= RECEIPTS_MAX, || {
        format!(
            "receipt book {} holds more than {RECEIPTS_MAX} receipts",
            b.id
        )
    })
}

/// Every entry of `before` is still in `after`, unchanged (entries are only ever appended), and
/// the new ones, returned, are what the change added. Linear: entries are counted, not searched
/// (a long history is judged change by change, so this runs once per change).
fn appended<'a, T: Eq + Hash>(before: &[T], after: &'a [T]) -> Option<Vec<&'a T>> {
    let mut left: HashMap<&T, usize> = HashMap::with_capacity(before.len());
    for entry in before {
        *left.entry(entry).or_default() += 1;
    }
    let mut added = Vec::new();
    for entry in after {
        match left.get_mut(entry) {
            Some(n) if *n > 0 => *n -= 1,
            _ => added.push(entry),
        }
    }
    left.values().all(|n| *n == 0).then_some(added)
}

/// The fields of a dispatch only its issuing unit writes.
type Fixed<'a> = (
    [&'a String; 5],
    &'a Vec<super::dispatch::Attachment>,
    i64,
    &'a String,
);

fn fixed(d: &super::dispatch::DispatchView) -> Fixed<'_> {
    (
        [&d.ref_no, &d.summary, &d.kind, &d.priority, &d.issuer],
        &d.attachments,
        d.created_at_ms,
        &d.created_by,
    )
}

fn changed(before: &DocView, after: &DocView, unit: &str) -> Result<(), String> {
    match (before, after) {
        (DocView::Dispatch(b), DocView::Dispatch(a)) => {
            let issuer = b.issuer == unit;
            require(issuer || fixed(b) == fixed(a), || {
                format!(
                    "{unit} changed the reference, summary, kind, priority, issuer or scans of a dispatch issued by {}",
                    b.issuer
                )
            })?;
            require(a.issuer == b.issuer, || {
                "a dispatch's issuer changed".into()
            })?;
            // By unit, once per change: a dispatch to 600 units is judged 600 times as its
            // receipts arrive (before receipt books), so no search per recipient.
            let now: HashMap<&str, &super::dispatch::Recipient> =
                a.recipients.iter().map(|r| (r.unit.as_str(), r)).collect();
            let was: HashSet<&str> = b.recipients.iter().map(|r| r.unit.as_str()).collect();
            for r in &b.recipients {
                let now = now.get(r.unit.as_str());
                require(now.is_some(), || {
                    format!("{unit} removed recipient {} of a dispatch", r.unit)
                })?;
                require(r.unit == unit || now.is_some_and(|n| *n == r), || {
                    format!("{unit} wrote the receipt of recipient {}", r.unit)
                })?;
            }
            for r in &a.recipients {
                if !was.contains(r.unit.as_str()) {
                    require(issuer && r.received_at_ms.is_none(), || {
                        format!(
                            "{unit} added recipient {} to a dispatch issued by {}",
                            r.unit, b.issuer
                        )
                    })?;
                }
            }
            let added = appended(&b.comments, &a.comments).ok_or_else(|| {
                format!("{unit} changed or removed a comment (comments are only ever added)")
            })?;
            for c in added {
                require(c.unit == unit, || {
                    format!("{unit} added a comment signed as unit {}", c.unit)
                })?;
            }
            Ok(())
        }
        (DocView::Assignment(b), DocView::Assignment(a)) => {
            require(b.unit == unit && a.unit == b.unit, || {
                format!("{unit} changed an assignment of {}", b.unit)
            })?;
            let added = appended(&b.history, &a.history)
                .ok_or_else(|| format!("{unit} changed or removed an assignment's history"))?;
            for t in added {
                require(t.unit == unit, || {
                    format!("{unit} added a status change signed as unit {}", t.unit)
                })?;
            }
            Ok(())
        }
        (DocView::Dossier(b), DocView::Dossier(a)) => {
            require(b.holder == unit, || {
                format!("{unit} moved a dossier held by {}", b.holder)
            })?;
            require(
                (&b.applicant, &b.procedure, &b.origin) == (&a.applicant, &a.procedure, &a.origin),
                || format!("{unit} changed a dossier's applicant, procedure or origin"),
            )?;
            appended(&b.route, &a.route)
                .map(|_| ())
                .ok_or_else(|| format!("{unit} changed or removed a step of a dossier's route"))
        }
        (DocView::Receipts(b), DocView::Receipts(a)) => {
            require(b.recipient == unit, || {
                format!("{unit} wrote into the receipt book of {}", b.recipient)
            })?;
            require(
                (&b.issuer, &b.recipient, b.year) == (&a.issuer, &a.recipient, a.year),
                || format!("{unit} changed the issuer, recipient or year of a receipt book"),
            )?;
            appended(&b.receipts, &a.receipts).ok_or_else(|| {
                format!("{unit} changed or removed a receipt (receipts are only ever added)")
            })?;
            book_fits(a)
        }
        _ => Err("a change turned the document into another kind".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dispatch::{self, DispatchKind, NewDispatch, Priority};
    use crate::model::{assignment, dossier, Author, DocKind};

    fn author(unit: &str) -> Author {
        Author {
            user: "lan".into(),
            unit: unit.into(),
            node: "00".repeat(16),
        }
    }

    fn dispatch_from(issuer: &str, to: &[&str]) -> (AutoCommit, DocId) {
        let id = DocId::generate(DocKind::Dispatch);
        let mut doc = AutoCommit::new();
        let d = NewDispatch {
            ref_no: "1/UBND".into(),
            summary: "Phòng chống lụt bão".into(),
            kind: DispatchKind::Directive,
            priority: Priority::Flash,
            issuer: issuer.into(),
            to: to.iter().map(|u| u.to_string()).collect(),
            attachments: vec![],
        };
        dispatch::create(&mut doc, &id, &d, &author(issuer), 1).unwrap();
        (doc, id)
    }

    /// Judges the last change of `doc` as made by `unit`.
    fn judge_last(doc: &mut AutoCommit, id: &DocId, unit: &str) -> Result<(), String> {
        let last = doc.get_changes(&[]).last().cloned().unwrap();
        let step = (last.hash(), last.deps().to_vec());
        Judge::new(doc, id, std::slice::from_ref(&step)).authorize(step.0, &step.1, unit)
    }

    const A: &str = "qn/binhlieu/tinhhuc";
    const B: &str = "qn/binhlieu/hucdong";

    #[test]
    fn only_the_issuer_creates_a_dispatch_in_its_own_name() {
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        assert!(judge_last(&mut doc, &id, "qn").is_ok());
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("issued by qn created by"), "{why}");
    }

    #[test]
    fn a_recipient_records_its_own_receipt_and_no_one_elses() {
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        dispatch::receive(&mut doc, &id, A, &author(A), 2).unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        let why = judge_last(&mut doc, &id, B).unwrap_err();
        assert!(why.contains("wrote the receipt of recipient"), "{why}");
    }

    #[test]
    fn a_recipient_may_not_rewrite_the_summary_or_drop_a_comment() {
        use automerge::transaction::Transactable;
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        doc.put(automerge::ROOT, "summary", "forged").unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("summary"), "{why}");
        assert!(judge_last(&mut doc, &id, "qn").is_ok(), "the issuer may");

        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        dispatch::add_comment(&mut doc, &id, "đã nhận", &author(B), 2).unwrap();
        let comments = crate::model::Reader::new(&doc, id.as_str())
            .object(&automerge::ROOT, "comments", "comments")
            .unwrap();
        doc.delete(&comments, 0).unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, "qn").unwrap_err();
        assert!(why.contains("comment"), "{why}");
    }

    #[test]
    fn a_comment_is_added_in_the_authors_own_unit() {
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        dispatch::add_comment(&mut doc, &id, "ok", &author(A), 2).unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        let why = judge_last(&mut doc, &id, B).unwrap_err();
        assert!(why.contains("signed as unit"), "{why}");
    }

    #[test]
    fn an_assignment_is_written_by_its_unit_only() {
        let id = DocId::generate(DocKind::Assignment);
        let mut doc = AutoCommit::new();
        let a = assignment::NewAssignment {
            dispatch_id: "dsp_0011223344556677".parse().unwrap(),
            unit: A.into(),
            lead: "lan".into(),
            co: vec![],
            deadline: assignment::parse_deadline("2030-01-01").unwrap(),
        };
        assignment::create(&mut doc, &id, &a, &author(A), 1).unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        assert!(judge_last(&mut doc, &id, B).is_err());
        assignment::update_status(&mut doc, &id, assignment::Status::Done, None, &author(A), 2)
            .unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        assert!(judge_last(&mut doc, &id, "qn/binhlieu").is_err());
    }

    /// A book of `A`'s receipts of the province's dispatches, with one receipt, by `A`.
    fn book_of_a() -> (AutoCommit, DocId) {
        let id = receipts::book_id("qn", A, 2026);
        let mut doc = AutoCommit::new();
        let d = DocId::generate(DocKind::Dispatch);
        receipts::record(&mut doc, &id, ("qn", A, 2026), &d, &author(A), 2).unwrap();
        (doc, id)
    }

    #[test]
    fn a_receipt_book_is_written_by_its_recipient_only() {
        let (mut doc, id) = book_of_a();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        let why = judge_last(&mut doc, &id, B).unwrap_err();
        assert!(
            why.contains("receipt book of qn/binhlieu/tinhhuc created by"),
            "{why}"
        );
        let why = judge_last(&mut doc, &id, "qn").unwrap_err();
        assert!(why.contains("created by qn"), "{why}");

        let d = DocId::generate(DocKind::Dispatch);
        receipts::record(&mut doc, &id, ("qn", A, 2026), &d, &author(A), 3).unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        let why = judge_last(&mut doc, &id, B).unwrap_err();
        assert!(why.contains("wrote into the receipt book of"), "{why}");
    }

    #[test]
    fn a_receipt_is_never_changed_or_removed() {
        use automerge::transaction::Transactable;
        let (mut doc, id) = book_of_a();
        let book = receipts::read(&doc, &id).unwrap();
        let key = book.receipts[0].dispatch.clone();
        let entry = crate::model::Reader::new(&doc, id.as_str())
            .object(&automerge::ROOT, &key, &key)
            .unwrap();
        doc.put(&entry, "received_at", 99_i64).unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("changed or removed a receipt"), "{why}");

        let (mut doc, id) = book_of_a();
        let key = receipts::read(&doc, &id).unwrap().receipts[0]
            .dispatch
            .clone();
        doc.delete(automerge::ROOT, key.as_str()).unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("changed or removed a receipt"), "{why}");

        let (mut doc, id) = book_of_a();
        doc.put(automerge::ROOT, "recipient", B).unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("issuer, recipient or year"), "{why}");
    }

    #[test]
    fn a_receipt_book_under_another_books_id_is_refused() {
        use automerge::transaction::Transactable;
        // A's receipts written under the id of B's book: a reader of B's book would find them.
        let id = receipts::book_id("qn", B, 2026);
        let mut doc = AutoCommit::new();
        doc.put(automerge::ROOT, "type", "receipts").unwrap();
        doc.put(automerge::ROOT, "issuer", "qn").unwrap();
        doc.put(automerge::ROOT, "recipient", A).unwrap();
        doc.put(automerge::ROOT, "year", 2026_i64).unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("is not the book of"), "{why}");
    }

    #[test]
    fn a_dossier_moves_only_by_the_unit_holding_it() {
        let id = DocId::generate(DocKind::Dossier);
        let mut doc = AutoCommit::new();
        dossier::create(&mut doc, &id, "Nguyễn Văn A", "khai sinh", &author(A), 1).unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        dossier::advance(
            &mut doc,
            &id,
            "chuyển huyện",
            Some("qn/binhlieu"),
            &author(A),
            2,
        )
        .unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
        // The model itself refuses a move by another unit; a tampered node writes it raw.
        assert!(dossier::advance(&mut doc, &id, "thẩm định", None, &author(B), 3).is_err());
        use automerge::transaction::Transactable;
        doc.put(automerge::ROOT, "holder", B).unwrap();
        doc.commit();
        let why = judge_last(&mut doc, &id, B).unwrap_err();
        assert!(why.contains("held by qn/binhlieu"), "{why}");
        assert!(judge_last(&mut doc, &id, "qn/binhlieu").is_ok());
    }

    /// Judges the last change as a chain is judged: on a working copy at its dependencies,
    /// where a plain receipt is judged by its operations alone.
    fn judge_last_on_chain(doc: &mut AutoCommit, id: &DocId, unit: &str) -> Result<(), String> {
        let last = doc.get_changes(&[]).last().cloned().unwrap();
        let step = (last.hash(), last.deps().to_vec());
        let base = doc.fork_at(&step.1).unwrap();
        let mut judge = Judge::new(doc, id, std::slice::from_ref(&step));
        judge.start_at(&step.1, base);
        judge.authorize(step.0, &step.1, unit)
    }

    /// Both ways of judging agree, and say `expected` (Ok, or an error containing it).
    fn agree(doc: &mut AutoCommit, id: &DocId, unit: &str, expected: Option<&str>) {
        let full = judge_last(doc, id, unit);
        let chain = judge_last_on_chain(doc, id, unit);
        match expected {
            None => assert!(full.is_ok() && chain.is_ok(), "{full:?} {chain:?}"),
            Some(why) => {
                for verdict in [full, chain] {
                    let e = verdict.unwrap_err();
                    assert!(e.contains(why), "{e}");
                }
            }
        }
    }

    #[test]
    fn receipts_judged_by_their_operations_follow_the_same_rules() {
        use automerge::transaction::Transactable;
        // A dispatch's receipts, each by its own recipient: on a chain, by operations.
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        dispatch::receive(&mut doc, &id, A, &author(A), 2).unwrap();
        agree(&mut doc, &id, A, None);
        agree(&mut doc, &id, B, Some("wrote the receipt of recipient"));
        // A receipt whose time is text does not read: refused either way.
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        let entry = crate::model::Reader::new(&doc, id.as_str())
            .object(&automerge::ROOT, "recipients", "recipients")
            .unwrap();
        let entry = crate::model::Reader::new(&doc, id.as_str())
            .object(&entry, A, A)
            .unwrap();
        doc.put(&entry, "received_at", "yesterday").unwrap();
        doc.commit();
        assert!(judge_last(&mut doc, &id, A).is_err());
        assert!(judge_last_on_chain(&mut doc, &id, A).is_err());
        // A recipient writing a receipt and a comment in another's name in one change.
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        dispatch::receive(&mut doc, &id, A, &author(A), 2).unwrap();
        let mut more = doc.fork();
        dispatch::add_comment(&mut more, &id, "x", &author(B), 3).unwrap();
        let comment = more.get_changes(&doc.get_heads()).last().cloned().unwrap();
        let mut forged = doc.fork();
        forged.apply_changes([comment]).unwrap();
        agree(&mut forged, &id, A, Some("added a comment signed as unit"));

        // A receipt book: receipts added by its recipient only, never changed.
        let (mut doc, id) = book_of_a();
        let d = DocId::generate(DocKind::Dispatch);
        receipts::record(&mut doc, &id, ("qn", A, 2026), &d, &author(A), 3).unwrap();
        agree(&mut doc, &id, A, None);
        agree(&mut doc, &id, B, Some("wrote into the receipt book of"));
        let (mut doc, id) = book_of_a();
        let entry = doc
            .put_object(automerge::ROOT, "not-a-dispatch", ObjType::Map)
            .unwrap();
        doc.put(&entry, "received_at", 3_i64).unwrap();
        doc.put(&entry, "received_by", "lan").unwrap();
        doc.commit();
        assert!(judge_last(&mut doc, &id, A).is_err());
        assert!(judge_last_on_chain(&mut doc, &id, A).is_err());
    }

    /// The change of `from` on top of `doc` (both of one document), as the last of `doc`.
    fn graft(doc: &mut AutoCommit, from: &mut AutoCommit) {
        let change = from.get_changes(&doc.get_heads()).last().cloned().unwrap();
        doc.apply_changes([change]).unwrap();
    }

    #[test]
    fn a_parallel_history_or_a_swapped_entry_is_refused() {
        use automerge::transaction::Transactable;
        // A second first change: A makes "the same" dispatch in its own name, to win the merge.
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        let mut shadow = AutoCommit::new();
        let forged = NewDispatch {
            ref_no: "1/UBND".into(),
            summary: "forged".into(),
            kind: DispatchKind::Directive,
            priority: Priority::Flash,
            issuer: A.into(),
            to: vec![A.into(), B.into()],
            attachments: vec![],
        };
        dispatch::create(&mut shadow, &id, &forged, &author(A), 1).unwrap();
        let root = shadow.get_changes(&[]).last().cloned().unwrap();
        doc.apply_changes([root]).unwrap();
        let why = judge_last(&mut doc, &id, A).unwrap_err();
        assert!(why.contains("second first change"), "{why}");

        // A swaps B's recipient entry for an identical copy (B's later receipt would be lost).
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        let mut swap = doc.fork();
        let recipients = crate::model::Reader::new(&swap, id.as_str())
            .object(&automerge::ROOT, "recipients", "recipients")
            .unwrap();
        swap.put_object(&recipients, B, ObjType::Map).unwrap();
        swap.commit();
        graft(&mut doc, &mut swap);
        agree(&mut doc, &id, A, Some("or replaced its entry"));

        // The same with a concurrent entry under B's key (no predecessor: a conflict A wins).
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        let mut twin = AutoCommit::new().with_actor(automerge::ActorId::from([0xff; 16]));
        twin.merge(&mut doc.fork()).unwrap();
        let r = crate::model::Reader::new(&twin, id.as_str())
            .object(&automerge::ROOT, "recipients", "recipients")
            .unwrap();
        twin.delete(&r, B).unwrap();
        twin.put_object(&r, B, ObjType::Map).unwrap();
        twin.commit();
        graft(&mut doc, &mut twin);
        agree(&mut doc, &id, A, Some("or replaced its entry"));

        // A comment swapped for a copy of itself.
        let (mut doc, id) = dispatch_from("qn", &[A, B]);
        dispatch::add_comment(&mut doc, &id, "ok", &author(B), 2).unwrap();
        let mut swap = doc.fork();
        let comments = crate::model::Reader::new(&swap, id.as_str())
            .object(&automerge::ROOT, "comments", "comments")
            .unwrap();
        let copy = swap.put_object(&comments, 0, ObjType::Map).unwrap();
        swap.put(&copy, "by", "lan").unwrap();
        swap.put(&copy, "unit", B).unwrap();
        swap.put(&copy, "at", 2_i64).unwrap();
        swap.put(&copy, "text", "ok").unwrap();
        swap.commit();
        graft(&mut doc, &mut swap);
        agree(&mut doc, &id, A, Some("changed or removed a comment"));

        // The issuer still adds a recipient, and a receipt book may start twice (a standby).
        let (mut doc, id) = dispatch_from("qn", &[A]);
        let mut more = doc.fork();
        let r = crate::model::Reader::new(&more, id.as_str())
            .object(&automerge::ROOT, "recipients", "recipients")
            .unwrap();
        more.put_object(&r, B, ObjType::Map).unwrap();
        more.commit();
        graft(&mut doc, &mut more);
        agree(&mut doc, &id, "qn", None);
        let (mut doc, id) = book_of_a();
        let mut standby = AutoCommit::new();
        let d = DocId::generate(DocKind::Dispatch);
        receipts::record(&mut standby, &id, ("qn", A, 2026), &d, &author(A), 3).unwrap();
        let root = standby.get_changes(&[]).last().cloned().unwrap();
        doc.apply_changes([root]).unwrap();
        assert!(judge_last(&mut doc, &id, A).is_ok());
    }
}
