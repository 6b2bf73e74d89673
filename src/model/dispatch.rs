//! The dispatch document: an official document with recipients, receipts, scans and comments.

use automerge::{transaction::Transactable, AutoCommit, ReadDoc, ROOT};
use serde::{Deserialize, Serialize};

use super::{
    check_text, commit, push_map, put_list, put_map, Author, Conflict, DocId, ModelError, Reader,
    Result,
};

/// Most recipients one dispatch may name (a province writing to all its units stays well below).
pub const RECIPIENTS_MAX: usize = 1_000;
/// Most attachments one dispatch may carry.
pub const ATTACHMENTS_MAX: usize = 64;

macro_rules! text_enum {
    ($name:ident, $what:literal, $($variant:ident = $text:literal),+ $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::model::ModelError;
            fn from_str(s: &str) -> std::result::Result<Self, $crate::model::ModelError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err($crate::model::ModelError::Invalid(format!(
                        concat!("unknown ", $what, " {:?}: use one of {}"),
                        other,
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}
pub(crate) use text_enum;

text_enum!(
    DispatchKind,
    "kind",
    Dispatch = "dispatch",
    Directive = "directive",
    Report = "report",
    Decision = "decision"
);
text_enum!(
    Priority,
    "priority",
    Normal = "normal",
    Urgent = "urgent",
    MostUrgent = "most-urgent",
    Flash = "flash"
);

impl Priority {
    /// Higher is more urgent; sync sends higher ranks first.
    pub fn rank(self) -> i64 {
        match self {
            Priority::Normal => 0,
            Priority::Urgent => 1,
            Priority::MostUrgent => 2,
            Priority::Flash => 3,
        }
    }
}

/// A scan attached to a dispatch: the blob itself lives in the blob store, addressed by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// BLAKE3 of the content, 64 hex digits.
    pub hash: String,
    pub name: String,
    pub media_type: String,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct NewDispatch {
    pub ref_no: String,
    pub summary: String,
    pub kind: DispatchKind,
    pub priority: Priority,
    pub issuer: String,
    pub to: Vec<String>,
    pub attachments: Vec<Attachment>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Recipient {
    pub unit: String,
    pub received_at_ms: Option<i64>,
    pub received_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Comment {
    pub by: String,
    pub unit: String,
    pub at_ms: i64,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DispatchView {
    pub id: String,
    #[serde(rename = "ref")]
    pub ref_no: String,
    pub summary: String,
    pub kind: String,
    pub priority: String,
    pub issuer: String,
    pub created_at_ms: i64,
    pub created_by: String,
    pub recipients: Vec<Recipient>,
    pub attachments: Vec<Attachment>,
    pub comments: Vec<Comment>,
    pub conflicts: Vec<Conflict>,
}

/// Writes a new dispatch into an empty document.
pub fn create(
    doc: &mut AutoCommit,
    id: &DocId,
    d: &NewDispatch,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    check_text("reference number", &d.ref_no)?;
    check_text("summary", &d.summary)?;
    if d.to.is_empty() {
        return Err(ModelError::Invalid(
            "a dispatch needs at least one recipient (--to UNIT)".into(),
        ));
    }
    if d.to.len() > RECIPIENTS_MAX || d.attachments.len() > ATTACHMENTS_MAX {
        return Err(ModelError::Invalid(format!(
            "a dispatch takes at most {RECIPIENTS_MAX} recipients and {ATTACHMENTS_MAX} attachments"
        )));
    }
    doc.put(ROOT, "type", "dispatch")?;
    doc.put(ROOT, "id", id.as_str())?;
    doc.put(ROOT, "ref", d.ref_no.as_str())?;
    doc.put(ROOT, "summary", d.summary.as_str())?;
    doc.put(ROOT, "kind", d.kind.as_str())?;
    doc.put(ROOT, "priority", d.priority.as_str())?;
    doc.put(ROOT, "issuer", d.issuer.as_str())?;
    doc.put(ROOT, "created_at", at_ms)?;
    doc.put(ROOT, "created_by", author.user.as_str())?;
    let recipients = put_map(doc, &ROOT, "recipients")?;
    for unit in &d.to {
        put_map(doc, &recipients, unit)?;
    }
    let attachments = put_list(doc, &ROOT, "attachments")?;
    for a in &d.attachments {
        let item = push_map(doc, &attachments)?;
        doc.put(&item, "hash", a.hash.as_str())?;
        doc.put(&item, "name", a.name.as_str())?;
        doc.put(&item, "media_type", a.media_type.as_str())?;
        doc.put(&item, "size", a.size)?;
    }
    put_list(doc, &ROOT, "comments")?;
    let what = format!(
        "created {} {} ({}) to {}{}",
        d.kind,
        d.ref_no,
        d.priority,
        d.to.join(", "),
        if d.attachments.is_empty() {
            String::new()
        } else {
            format!(" with {} scan(s)", d.attachments.len())
        }
    );
    commit(doc, author, at_ms, what);
    Ok(())
}

/// Records that `unit` received the dispatch; a repeated receipt keeps the first one.
pub fn receive(
    doc: &mut AutoCommit,
    id: &DocId,
    unit: &str,
    author: &Author,
    at_ms: i64,
) -> Result<bool> {
    let r = Reader::new(doc, id.as_str());
    let recipients = r.object(&ROOT, "recipients", "recipients")?;
    let entry = match doc.get(&recipients, unit)? {
        Some((automerge::Value::Object(_), entry)) => entry,
        _ => {
            return Err(ModelError::Invalid(format!(
                "unit {unit} is not a recipient of dispatch {id}"
            )))
        }
    };
    if doc.get(&entry, "received_at")?.is_some() {
        return Ok(false);
    }
    doc.put(&entry, "received_at", at_ms)?;
    doc.put(&entry, "received_by", author.user.as_str())?;
    commit(doc, author, at_ms, format!("received by {unit}"));
    Ok(true)
}

pub fn add_comment(
    doc: &mut AutoCommit,
    id: &DocId,
    text: &str,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    check_text("comment", text)?;
    let comments = Reader::new(doc, id.as_str()).object(&ROOT, "comments", "comments")?;
    let item = push_map(doc, &comments)?;
    doc.put(&item, "by", author.user.as_str())?;
    doc.put(&item, "unit", author.unit.as_str())?;
    doc.put(&item, "at", at_ms)?;
    doc.put(&item, "text", text)?;
    commit(doc, author, at_ms, format!("commented: {text}"));
    Ok(())
}

pub fn read(doc: &AutoCommit, id: &DocId) -> Result<DispatchView> {
    let mut r = Reader::new(doc, id.as_str());
    if r.doc_type()? != "dispatch" {
        return Err(ModelError::Malformed(
            id.to_string(),
            "not a dispatch".into(),
        ));
    }
    let recipients_obj = r.object(&ROOT, "recipients", "recipients")?;
    let mut recipients = Vec::new();
    for unit in r.keys(&recipients_obj) {
        let entry = r.object(&recipients_obj, &unit, "recipients")?;
        let path = format!("recipients.{unit}");
        recipients.push(Recipient {
            received_at_ms: r.opt_int(&entry, "received_at", &format!("{path}.received_at"))?,
            received_by: r.opt_str(&entry, "received_by", &format!("{path}.received_by"))?,
            unit,
        });
    }
    let attachments_obj = r.object(&ROOT, "attachments", "attachments")?;
    let mut attachments = Vec::new();
    for item in r.list_objects(&attachments_obj) {
        let size = r.int(&item, "size", "attachments.size")?;
        attachments.push(Attachment {
            hash: r.str(&item, "hash", "attachments.hash")?,
            name: r.str(&item, "name", "attachments.name")?,
            media_type: r.str(&item, "media_type", "attachments.media_type")?,
            size: u64::try_from(size).unwrap_or(0),
        });
    }
    let comments_obj = r.object(&ROOT, "comments", "comments")?;
    let mut comments = Vec::new();
    for item in r.list_objects(&comments_obj) {
        comments.push(Comment {
            by: r.str(&item, "by", "comments.by")?,
            unit: r.str(&item, "unit", "comments.unit")?,
            at_ms: r.int(&item, "at", "comments.at")?,
            text: r.str(&item, "text", "comments.text")?,
        });
    }
    Ok(DispatchView {
        id: id.to_string(),
        ref_no: r.str(&ROOT, "ref", "ref")?,
        summary: r.str(&ROOT, "summary", "summary")?,
        kind: r.str(&ROOT, "kind", "kind")?,
        priority: r.str(&ROOT, "priority", "priority")?,
        issuer: r.str(&ROOT, "issuer", "issuer")?,
        created_at_ms: r.int(&ROOT, "created_at", "created_at")?,
        created_by: r.str(&ROOT, "created_by", "created_by")?,
        recipients,
        attachments,
        comments,
        conflicts: r.conflicts,
    })
}

pub fn parties(doc: &AutoCommit, id: &DocId) -> Result<Vec<String>> {
    let mut r = Reader::new(doc, id.as_str());
    let mut units = vec![r.str(&ROOT, "issuer", "issuer")?];
    let recipients = r.object(&ROOT, "recipients", "recipients")?;
    units.extend(r.keys(&recipients));
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn author(user: &str, unit: &str) -> Author {
        Author {
            user: user.into(),
            unit: unit.into(),
            node: "00".repeat(16),
        }
    }

    fn sample(to: &[&str]) -> NewDispatch {
        NewDispatch {
            ref_no: "123/UBND-VP".into(),
            summary: "Kế hoạch phòng chống lụt bão".into(),
            kind: DispatchKind::Dispatch,
            priority: Priority::Urgent,
            issuer: "qn".into(),
            to: to.iter().map(|s| s.to_string()).collect(),
            attachments: vec![Attachment {
                hash: "ab".repeat(32),
                name: "scan.pdf".into(),
                media_type: "application/pdf".into(),
                size: 42,
            }],
        }
    }

    #[test]
    fn create_read_receive_comment() {
        let id = DocId::generate(super::super::DocKind::Dispatch);
        let mut doc = AutoCommit::new();
        create(
            &mut doc,
            &id,
            &sample(&["qn/binhlieu/tinhhuc"]),
            &author("lan", "qn"),
            1_000,
        )
        .unwrap();
        assert!(receive(
            &mut doc,
            &id,
            "qn/binhlieu/tinhhuc",
            &author("minh", "qn/binhlieu/tinhhuc"),
            2_000
        )
        .unwrap());
        assert!(!receive(
            &mut doc,
            &id,
            "qn/binhlieu/tinhhuc",
            &author("minh", "qn/binhlieu/tinhhuc"),
            3_000
        )
        .unwrap());
        assert!(receive(
            &mut doc,
            &id,
            "qn/binhlieu/hucdong",
            &author("x", "qn/binhlieu/hucdong"),
            3_000
        )
        .is_err());
        add_comment(
            &mut doc,
            &id,
            "đã nhận",
            &author("minh", "qn/binhlieu/tinhhuc"),
            4_000,
        )
        .unwrap();
        let v = read(&doc, &id).unwrap();
        assert_eq!(v.ref_no, "123/UBND-VP");
        assert_eq!(v.recipients[0].received_by.as_deref(), Some("minh"));
        assert_eq!(v.recipients[0].received_at_ms, Some(2_000));
        assert_eq!(v.attachments[0].size, 42);
        assert_eq!(v.comments[0].text, "đã nhận");
        assert!(v.conflicts.is_empty());
        assert_eq!(
            parties(&doc, &id).unwrap(),
            vec!["qn".to_string(), "qn/binhlieu/tinhhuc".to_string()]
        );
        let trail = super::super::audit(&mut doc);
        assert_eq!(trail.len(), 3);
        assert_eq!(trail[1].user, "minh");
        assert!(trail[0].what.contains("123/UBND-VP"));
    }

    #[test]
    fn concurrent_comments_both_survive_a_merge() {
        let id = DocId::generate(super::super::DocKind::Dispatch);
        let mut a = AutoCommit::new();
        create(
            &mut a,
            &id,
            &sample(&["qn/binhlieu/tinhhuc"]),
            &author("lan", "qn"),
            1_000,
        )
        .unwrap();
        let mut b = a.fork();
        add_comment(&mut a, &id, "from province", &author("lan", "qn"), 2_000).unwrap();
        add_comment(
            &mut b,
            &id,
            "from commune",
            &author("minh", "qn/binhlieu/tinhhuc"),
            2_000,
        )
        .unwrap();
        a.merge(&mut b).unwrap();
        let texts: Vec<_> = read(&a, &id)
            .unwrap()
            .comments
            .into_iter()
            .map(|c| c.text)
            .collect();
        assert_eq!(texts.len(), 2);
        assert!(
            texts.contains(&"from province".to_string())
                && texts.contains(&"from commune".to_string())
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!("urgentish".parse::<Priority>().is_err());
        assert_eq!(
            "most-urgent".parse::<Priority>().unwrap(),
            Priority::MostUrgent
        );
        let id = DocId::generate(super::super::DocKind::Dispatch);
        let mut doc = AutoCommit::new();
        assert!(create(&mut doc, &id, &sample(&[]), &author("lan", "qn"), 1).is_err());
    }
}
