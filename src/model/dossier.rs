//! The dossier document: a citizen's application moving step by step between units.

use automerge::{transaction::Transactable, AutoCommit, ROOT};
use serde::Serialize;

use super::{
    check_text, commit, push_map, put_list, Author, Conflict, DocId, ModelError, Reader, Result,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Step {
    pub step: String,
    pub unit: String,
    pub at_ms: i64,
    pub by: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DossierView {
    pub id: String,
    pub applicant: String,
    pub procedure: String,
    /// The unit where the dossier was submitted.
    pub origin: String,
    /// The unit that holds it now.
    pub holder: String,
    pub step: String,
    pub since_ms: i64,
    pub route: Vec<Step>,
    pub conflicts: Vec<Conflict>,
}

const FIRST_STEP: &str = "received";

fn push_step(
    doc: &mut AutoCommit,
    id: &DocId,
    step: &str,
    unit: &str,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    let route = Reader::new(doc, id.as_str()).object(&ROOT, "route", "route")?;
    let item = push_map(doc, &route)?;
    doc.put(&item, "step", step)?;
    doc.put(&item, "unit", unit)?;
    doc.put(&item, "at", at_ms)?;
    doc.put(&item, "by", author.user.as_str())?;
    doc.put(ROOT, "step", step)?;
    doc.put(ROOT, "holder", unit)?;
    doc.put(ROOT, "since", at_ms)?;
    Ok(())
}

pub fn create(
    doc: &mut AutoCommit,
    id: &DocId,
    applicant: &str,
    procedure: &str,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    check_text("applicant", applicant)?;
    check_text("procedure", procedure)?;
    doc.put(ROOT, "type", "dossier")?;
    doc.put(ROOT, "id", id.as_str())?;
    doc.put(ROOT, "applicant", applicant)?;
    doc.put(ROOT, "procedure", procedure)?;
    doc.put(ROOT, "origin", author.unit.as_str())?;
    put_list(doc, &ROOT, "route")?;
    push_step(doc, id, FIRST_STEP, &author.unit, author, at_ms)?;
    commit(
        doc,
        author,
        at_ms,
        format!("dossier opened for {applicant}: {procedure}"),
    );
    Ok(())
}

/// Moves the dossier to a new step, optionally handing it to another unit.
pub fn advance(
    doc: &mut AutoCommit,
    id: &DocId,
    step: &str,
    to_unit: Option<&str>,
    author: &Author,
    at_ms: i64,
) -> Result<()> {
    check_text("step", step)?;
    let holder = Reader::new(doc, id.as_str()).str(&ROOT, "holder", "holder")?;
    if holder != author.unit {
        return Err(ModelError::Invalid(format!(
            "dossier {id} is held by {holder}: only that unit moves it to a next step"
        )));
    }
    let unit = to_unit.unwrap_or(&holder).to_string();
    push_step(doc, id, step, &unit, author, at_ms)?;
    let hand = if unit != holder {
        format!(", handed from {holder} to {unit}")
    } else {
        String::new()
    };
    commit(doc, author, at_ms, format!("step: {step}{hand}"));
    Ok(())
}

pub fn read(doc: &AutoCommit, id: &DocId) -> Result<DossierView> {
    let mut r = Reader::new(doc, id.as_str());
    if r.doc_type()? != "dossier" {
        return Err(ModelError::Malformed(
            id.to_string(),
            "not a dossier".into(),
        ));
    }
    let route_obj = r.object(&ROOT, "route", "route")?;
    let mut route = Vec::new();
    for item in r.list_objects(&route_obj) {
        route.push(Step {
            step: r.str(&item, "step", "route.step")?,
            unit: r.str(&item, "unit", "route.unit")?,
            at_ms: r.int(&item, "at", "route.at")?,
            by: r.str(&item, "by", "route.by")?,
        });
    }
    Ok(DossierView {
        id: id.to_string(),
        applicant: r.str(&ROOT, "applicant", "applicant")?,
        procedure: r.str(&ROOT, "procedure", "procedure")?,
        origin: r.str(&ROOT, "origin", "origin")?,
        holder: r.str(&ROOT, "holder", "holder")?,
        step: r.str(&ROOT, "step", "step")?,
        since_ms: r.int(&ROOT, "since", "since")?,
        route,
        conflicts: r.conflicts,
    })
}

/// Every unit on the route can answer where the dossier is.
pub fn parties(doc: &AutoCommit, id: &DocId) -> Result<Vec<String>> {
    let view = read(doc, id)?;
    let mut units: Vec<String> = view.route.into_iter().map(|s| s.unit).collect();
    units.push(view.origin);
    units.push(view.holder);
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DocKind;

    #[test]
    fn track_route_and_current_step() {
        let author = Author {
            user: "thu".into(),
            unit: "qn/binhlieu/tinhhuc".into(),
            node: "22".repeat(16),
        };
        let id = DocId::generate(DocKind::Dossier);
        let mut doc = AutoCommit::new();
        create(
            &mut doc,
            &id,
            "Nguyễn Văn A",
            "birth registration",
            &author,
            1_000,
        )
        .unwrap();
        advance(&mut doc, &id, "verified", None, &author, 2_000).unwrap();
        advance(
            &mut doc,
            &id,
            "district approval",
            Some("qn/binhlieu"),
            &author,
            3_000,
        )
        .unwrap();
        let v = read(&doc, &id).unwrap();
        assert_eq!(v.step, "district approval");
        assert_eq!(v.holder, "qn/binhlieu");
        assert_eq!(v.since_ms, 3_000);
        assert_eq!(v.route.len(), 3);
        assert_eq!(parties(&doc, &id).unwrap().len(), 5);
        assert!(advance(&mut doc, &id, " ", None, &author, 4_000).is_err());
    }
}
