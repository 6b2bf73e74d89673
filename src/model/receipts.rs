//! The receipt book: the receipts one recipient unit recorded for the dispatches of one issuer
//! in one year. A receipt written into the dispatch itself re-sent the whole dispatch's changes
//! to every party, so a directive to 609 units moved 609 receipts to 609 units; a book concerns
//! only its recipient and issuer, so a receipt travels up to the issuer and nowhere sideways.
//!
//! One document per (issuer, recipient, year of the dispatch), its id derived from those three
//! (`rcp_` and 16 hex digits of their BLAKE3), so two nodes of one unit that start the same
//! book concurrently write one document that merges. Receipts are root keys (the dispatch id),
//! never a nested map created at the first write, so concurrent first writes keep every entry.

use automerge::{transaction::Transactable, AutoCommit, ObjType, ReadDoc, ROOT};
use serde::Serialize;

use super::{commit, Author, DocId, DocKind, ModelError, Reader, Result};

/// Most receipts one book holds: a year of one issuer's dispatches to one unit (a commune gets
/// a few thousand documents a year from all issuers together).
pub const RECEIPTS_MAX: usize = 20_000;

/// Root keys of a book that are not receipts.
pub(crate) const HEADER: [&str; 4] = ["type", "issuer", "recipient", "year"];

/// One recorded receipt.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Receipt {
    pub dispatch: String,
    pub received_at_ms: i64,
    pub received_by: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReceiptBook {
    pub id: String,
    pub issuer: String,
    pub recipient: String,
    pub year: i64,
    /// Sorted by dispatch id.
    pub receipts: Vec<Receipt>,
}

/// The UTC year of a time in milliseconds since the Unix epoch.
pub fn year_of(at_ms: i64) -> i64 {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .map(|t| i64::from(t.year()))
        .unwrap_or(1970)
}

/// The id of the book holding `recipient`'s receipts of `issuer`'s dispatches created in `year`.
pub fn book_id(issuer: &str, recipient: &str, year: i64) -> DocId {
    let mut h = blake3::Hasher::new();
    for part in [issuer, recipient, &year.to_string()] {
        h.update(part.as_bytes());
        h.update(&[0]);
    }
    DocId::derived(DocKind::Receipts, h.finalize().as_bytes())
}

/// Records that `recipient` received `dispatch`, in the book `id` (empty when new); a repeated
/// receipt keeps the first one and returns false.
pub fn record(
    doc: &mut AutoCommit,
    id: &DocId,
    (issuer, recipient, year): (&str, &str, i64),
    dispatch: &DocId,
    author: &Author,
    at_ms: i64,
) -> Result<bool> {
    if *id != book_id(issuer, recipient, year) {
        return Err(ModelError::Invalid(format!(
            "{id} is not the receipt book of {recipient} for {issuer}'s dispatches of {year}"
        )));
    }
    if dispatch.kind() != DocKind::Dispatch {
        return Err(ModelError::Invalid(format!("{dispatch} is not a dispatch")));
    }
    if doc.get(ROOT, "type")?.is_none() {
        doc.put(ROOT, "type", "receipts")?;
        doc.put(ROOT, "issuer", issuer)?;
        doc.put(ROOT, "recipient", recipient)?;
        doc.put(ROOT, "year", year)?;
    } else {
        let book = read(doc, id)?;
        if (book.issuer.as_str(), book.recipient.as_str(), book.year) != (issuer, recipient, year) {
            return Err(ModelError::Malformed(
                id.to_string(),
                "its issuer, recipient or year differ from its id".into(),
            ));
        }
        if book
            .receipts
            .iter()
            .any(|r| r.dispatch == dispatch.as_str())
        {
            return Ok(false);
        }
        if book.receipts.len() >= RECEIPTS_MAX {
            return Err(ModelError::Invalid(format!(
                "the receipt book of {recipient} for {issuer} in {year} is full ({RECEIPTS_MAX} receipts)"
            )));
        }
    }
    let entry = doc.put_object(ROOT, dispatch.as_str(), ObjType::Map)?;
    doc.put(&entry, "received_at", at_ms)?;
    doc.put(&entry, "received_by", author.user.as_str())?;
    commit(
        doc,
        author,
        at_ms,
        format!("received {dispatch} ({recipient})"),
    );
    Ok(true)
}

pub fn read(doc: &AutoCommit, id: &DocId) -> Result<ReceiptBook> {
    let mut r = Reader::new(doc, id.as_str());
    if r.doc_type()? != "receipts" {
        return Err(ModelError::Malformed(
            id.to_string(),
            "not a receipt book".into(),
        ));
    }
    let mut receipts = Vec::new();
    for key in r.keys(&ROOT) {
        if HEADER.contains(&key.as_str()) {
            continue;
        }
        let dispatch: DocId = key.parse().map_err(|_| {
            ModelError::Malformed(id.to_string(), format!("key {key:?} is not a dispatch id"))
        })?;
        if dispatch.kind() != DocKind::Dispatch {
            return Err(ModelError::Malformed(
                id.to_string(),
                format!("key {key} is not a dispatch id"),
            ));
        }
        let entry = r.object(&ROOT, &key, &key)?;
        receipts.push(Receipt {
            received_at_ms: r.int(&entry, "received_at", &format!("{key}.received_at"))?,
            received_by: r.str(&entry, "received_by", &format!("{key}.received_by"))?,
            dispatch: key,
        });
    }
    receipts.sort_by(|a, b| a.dispatch.cmp(&b.dispatch));
    Ok(ReceiptBook {
        id: id.to_string(),
        issuer: r.str(&ROOT, "issuer", "issuer")?,
        recipient: r.str(&ROOT, "recipient", "recipient")?,
        year: r.int(&ROOT, "year", "year")?,
        receipts,
    })
}

pub fn parties(doc: &AutoCommit, id: &DocId) -> Result<Vec<String>> {
    let mut r = Reader::new(doc, id.as_str());
    Ok(vec![
        r.str(&ROOT, "issuer", "issuer")?,
        r.str(&ROOT, "recipient", "recipient")?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: &str = "qn/binhlieu/tinhhuc";

    fn author(user: &str, node: u8) -> Author {
        Author {
            user: user.into(),
            unit: R.into(),
            node: format!("{node:02x}").repeat(16),
        }
    }

    #[test]
    fn the_id_names_issuer_recipient_and_year_only() {
        let id = book_id("qn", R, 2026);
        assert_eq!(id, book_id("qn", R, 2026));
        assert_eq!(id.kind(), DocKind::Receipts);
        assert_eq!(id.as_str().parse::<DocId>().unwrap(), id);
        assert_ne!(id, book_id("qn", R, 2027));
        assert_ne!(id, book_id("qn/binhlieu", R, 2026));
        assert_ne!(book_id("a", "bc", 1), book_id("ab", "c", 1));
        assert_eq!(year_of(1_780_000_000_000), 2026);
    }

    #[test]
    fn a_repeated_receipt_keeps_the_first() {
        let id = book_id("qn", R, 2026);
        let d = DocId::generate(DocKind::Dispatch);
        let mut doc = AutoCommit::new();
        let key = ("qn", R, 2026);
        assert!(record(&mut doc, &id, key, &d, &author("minh", 1), 2_000).unwrap());
        assert!(!record(&mut doc, &id, key, &d, &author("lan", 1), 3_000).unwrap());
        let book = read(&doc, &id).unwrap();
        assert_eq!(
            book.receipts,
            vec![Receipt {
                dispatch: d.to_string(),
                received_at_ms: 2_000,
                received_by: "minh".into()
            }]
        );
        assert_eq!(
            parties(&doc, &id).unwrap(),
            vec!["qn".to_string(), R.into()]
        );
        // A book is only written under its own id.
        let other = book_id("qn", R, 2025);
        assert!(record(&mut doc, &other, key, &d, &author("minh", 1), 1).is_err());
        let err = record(&mut doc, &other, ("qn", R, 2025), &d, &author("x", 1), 1);
        assert!(err.is_err(), "the stored year is 2026");
    }

    #[test]
    fn two_nodes_starting_the_same_book_merge_into_one_with_both_receipts() {
        let id = book_id("qn", R, 2026);
        let (d1, d2) = (
            DocId::generate(DocKind::Dispatch),
            DocId::generate(DocKind::Dispatch),
        );
        let key = ("qn", R, 2026);
        let mut a = AutoCommit::new().with_actor(automerge::ActorId::from(&[1u8; 16][..]));
        let mut b = AutoCommit::new().with_actor(automerge::ActorId::from(&[2u8; 16][..]));
        record(&mut a, &id, key, &d1, &author("minh", 1), 2_000).unwrap();
        record(&mut b, &id, key, &d2, &author("lan", 2), 2_500).unwrap();
        a.merge(&mut b).unwrap();
        let book = read(&a, &id).unwrap();
        let mut want = vec![d1.to_string(), d2.to_string()];
        want.sort();
        let got: Vec<_> = book.receipts.iter().map(|r| r.dispatch.clone()).collect();
        assert_eq!(got, want);
        assert_eq!((book.issuer.as_str(), book.year), ("qn", 2026));
    }
}
