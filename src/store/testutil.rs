//! Documents for the store's unit tests.

use automerge::ActorId;

use super::Store;
use crate::model::{dispatch, Author, DocId, DocKind};

pub fn actor() -> ActorId {
    ActorId::from(&[1u8; 16][..])
}

pub fn author() -> Author {
    Author {
        user: "lan".into(),
        unit: "qn".into(),
        node: "01".repeat(16),
    }
}

pub fn new_dispatch(store: &mut Store) -> DocId {
    new_dispatch_with(store, "1/UBND", "s".into())
}

pub fn new_dispatch_with(store: &mut Store, ref_no: &str, summary: String) -> DocId {
    new_dispatch_to(store, ref_no, summary, &["qn/binhlieu"])
}

/// A dispatch from the province to `to`, committed.
pub fn new_dispatch_to(store: &mut Store, ref_no: &str, summary: String, to: &[&str]) -> DocId {
    let id = DocId::generate(DocKind::Dispatch);
    let d = dispatch::NewDispatch {
        ref_no: ref_no.into(),
        summary,
        kind: dispatch::DispatchKind::Report,
        priority: dispatch::Priority::Normal,
        issuer: "qn".into(),
        to: to.iter().map(|u| u.to_string()).collect(),
        attachments: vec![],
    };
    store
        .write(|tx| {
            tx.create_doc(&id, &actor(), 1, |doc| {
                Ok(dispatch::create(doc, &id, &d, &author(), 1)?)
            })
        })
        .unwrap();
    id
}
