//! The assignment document: who leads a dispatch's handling, who co-handles, the deadline, and
//! the whole status history.

use automerge::{transaction::Transactable, AutoCommit, ROOT};
use serde::Serialize;

use super::dispatch::text_enum;
use super::{
    check_text, commit, push_map, put_list, Author, Conflict, DocId, ModelError, Reader, Result,
};

/// Most co-handlers on one assignment.
pub const CO_HANDLERS_MAX: usize = 64;

text_enum!(
    Status,
    "status",
    Assigned = "assigned",
    InProgress = "in-progress",
    Done = "done",
    Returned = "returned"
);

/// Parses a deadline given as YYYY-MM-DD.
pub fn parse_deadline(text: &str) -> Result<time::Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(text, &format).map_err(|_| {
        ModelError::Invalid(format!(
            "deadline {text:?} is not a date: use YYYY-MM-DD, like 2026-12-31"
        ))
    })
}

#[derive(Debug, Clone)]
pub struct NewAssignment {
    pub dispatch_id: DocId,
    pub unit: String,
    pub lead: String,
    pub co: Vec<String>,
    pub deadline: time::Date,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Transition {
    pub status: String,
    pub by: String,
    pub unit: String,
    pub at_ms: i64,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AssignmentView {
    pub id: String,
    pub dispatch_id: String,
    pub unit: String,
    pub lead: String,
    pub co: Vec<String>,
    pub deadline: String,
    pub status: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub history: Vec<Transition>,
    pub conflicts: Vec<Conflict>,
}

fn push_transition(
    doc: &mut AutoCommit,
    id: &DocId,
    status: Status,
    note: Option<&str>,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    let history = Reader::new(doc, id.as_str()).object(&ROOT, "history", "history")?;
    let item = push_map(doc, &history)?;
    doc.put(&item, "status", status.as_str())?;
    doc.put(&item, "by", author.user.as_str())?;
    doc.put(&item, "unit", author.unit.as_str())?;
    doc.put(&item, "at", at_ms)?;
    if let Some(note) = note {
        doc.put(&item, "note", note)?;
    }
    Ok(())
}

pub fn create(
    doc: &mut AutoCommit,
    id: &DocId,
    a: &NewAssignment,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    if a.co.len() > CO_HANDLERS_MAX {
        return Err(ModelError::Invalid(format!(
            "at most {CO_HANDLERS_MAX} co-handlers"
        )));
    }
    if a.co.contains(&a.lead) {
        return Err(ModelError::Invalid(format!(
            "{} cannot be both lead and co-handler",
            a.lead
        )));
    }
    let deadline = a.deadline.to_string();
    doc.put(ROOT, "type", "assignment")?;
    doc.put(ROOT, "id", id.as_str())?;
    doc.put(ROOT, "dispatch_id", a.dispatch_id.as_str())?;
    doc.put(ROOT, "unit", a.unit.as_str())?;
    doc.put(ROOT, "lead", a.lead.as_str())?;
    let co = put_list(doc, &ROOT, "co")?;
    for (i, user) in a.co.iter().enumerate() {
        doc.insert(&co, i, user.as_str())?;
    }
    doc.put(ROOT, "deadline", deadline.as_str())?;
    doc.put(ROOT, "status", Status::Assigned.as_str())?;
    doc.put(ROOT, "created_at", at_ms)?;
    doc.put(ROOT, "created_by", author.user.as_str())?;
    put_list(doc, &ROOT, "history")?;
    push_transition(doc, id, Status::Assigned, None, author, at_ms)?;
    let co_text = if a.co.is_empty() {
        String::new()
    } else {
        format!(", co-handlers {}", a.co.join(", "))
    };
    commit(
        doc,
        author,
        at_ms,
        format!(
            "assigned {} to lead {}{co_text}, deadline {deadline}",
            a.dispatch_id, a.lead
        ),
    );
    Ok(())
}

/// Moves the assignment to `status`, appending the transition to the history.
pub fn update_status(
    doc: &mut AutoCommit,
    id: &DocId,
    status: Status,
    note: Option<&str>,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    if status == Status::Assigned {
        return Err(ModelError::Invalid(
            "status can be set to in-progress, done or returned".into(),
        ));
    }
    if let Some(note) = note {
        check_text("note", note)?;
    }
    let mut r = Reader::new(doc, id.as_str());
    let unit = r.str(&ROOT, "unit", "unit")?;
    if unit != author.unit {
        return Err(ModelError::Invalid(format!(
            "assignment {id} belongs to {unit}: only that unit updates it"
        )));
    }
    let previous = r.str(&ROOT, "status", "status")?;
    doc.put(ROOT, "status", status.as_str())?;
    push_transition(doc, id, status, note, author, at_ms)?;
    let note_text = note.map(|n| format!(": {n}")).unwrap_or_default();
    commit(
        doc,
        author,
        at_ms,
        format!("status {previous} → {status}{note_text}"),
    );
    Ok(())
}

pub fn read(doc: &AutoCommit, id: &DocId) -> Result<AssignmentView> {
    let mut r = Reader::new(doc, id.as_str());
    if r.doc_type()? != "assignment" {
        return Err(ModelError::Malformed(
            id.to_string(),
            "not an assignment".into(),
        ));
    }
    let co_obj = r.object(&ROOT, "co", "co")?;
    let co = r.list_strs(&co_obj);
    let history_obj = r.object(&ROOT, "history", "history")?;
    let mut history = Vec::new();
    for item in r.list_objects(&history_obj) {
        history.push(Transition {
            status: r.str(&item, "status", "history.status")?,
            by: r.str(&item, "by", "history.by")?,
            unit: r.str(&item, "unit", "history.unit")?,
            at_ms: r.int(&item, "at", "history.at")?,
            note: r.opt_str(&item, "note", "history.note")?,
        });
    }
    Ok(AssignmentView {
        id: id.to_string(),
        dispatch_id: r.str(&ROOT, "dispatch_id", "dispatch_id")?,
        unit: r.str(&ROOT, "unit", "unit")?,
        lead: r.str(&ROOT, "lead", "lead")?,
        co,
        deadline: r.str(&ROOT, "deadline", "deadline")?,
        status: r.str(&ROOT, "status", "status")?,
        created_at_ms: r.int(&ROOT, "created_at", "created_at")?,
        created_by: r.str(&ROOT, "created_by", "created_by")?,
        history,
        conflicts: r.conflicts,
    })
}

/// An assignment is internal to its unit: it replicates only up the tree, never to siblings.
pub fn parties(doc: &AutoCommit, id: &DocId) -> Result<Vec<String>> {
    Ok(vec![
        Reader::new(doc, id.as_str()).str(&ROOT, "unit", "unit")?
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DocKind;

    fn author(user: &str) -> Author {
        Author {
            user: user.into(),
            unit: "qn/binhlieu/tinhhuc".into(),
            node: "11".repeat(16),
        }
    }

    fn new_doc() -> (DocId, AutoCommit) {
        let id = DocId::generate(DocKind::Assignment);
        let mut doc = AutoCommit::new();
        let a = NewAssignment {
            dispatch_id: DocId::generate(DocKind::Dispatch),
            unit: "qn/binhlieu/tinhhuc".into(),
            lead: "minh".into(),
            co: vec!["hoa".into()],
            deadline: parse_deadline("2026-12-31").unwrap(),
        };
        create(&mut doc, &id, &a, &author("chairman"), 1_000).unwrap();
        (id, doc)
    }

    #[test]
    fn history_is_kept_whole() {
        let (id, mut doc) = new_doc();
        update_status(
            &mut doc,
            &id,
            Status::InProgress,
            Some("started"),
            &author("minh"),
            2_000,
        )
        .unwrap();
        update_status(&mut doc, &id, Status::Done, None, &author("minh"), 3_000).unwrap();
        let v = read(&doc, &id).unwrap();
        assert_eq!(v.status, "done");
        let statuses: Vec<_> = v.history.iter().map(|t| t.status.as_str()).collect();
        assert_eq!(statuses, ["assigned", "in-progress", "done"]);
        assert_eq!(v.history[1].note.as_deref(), Some("started"));
        assert_eq!(v.deadline, "2026-12-31");
    }

    #[test]
    fn concurrent_status_updates_merge_and_show_the_conflict() {
        let (id, mut a) = new_doc();
        let mut b = a
            .fork()
            .with_actor(automerge::ActorId::from(&[7u8; 16][..]));
        update_status(
            &mut a,
            &id,
            Status::Done,
            Some("finished at commune"),
            &author("minh"),
            2_000,
        )
        .unwrap();
        update_status(
            &mut b,
            &id,
            Status::Returned,
            Some("needs more data"),
            &author("lan"),
            2_100,
        )
        .unwrap();
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        let va = read(&a, &id).unwrap();
        let vb = read(&b, &id).unwrap();
        assert_eq!(va.status, vb.status, "replicas agree on the winner");
        assert_eq!(va.history.len(), 3, "both transitions are kept");
        let conflict = va
            .conflicts
            .iter()
            .find(|c| c.field == "status")
            .expect("conflict visible");
        assert!(
            conflict.values.contains(&"done".to_string())
                && conflict.values.contains(&"returned".to_string())
        );
    }

    #[test]
    fn bad_dates_and_statuses_are_refused() {
        assert!(parse_deadline("2026-13-01").is_err());
        assert!(parse_deadline("31/12/2026").is_err());
        assert!("finished".parse::<Status>().is_err());
        let (id, mut doc) = new_doc();
        assert!(update_status(&mut doc, &id, Status::Assigned, None, &author("x"), 5).is_err());
    }
}
