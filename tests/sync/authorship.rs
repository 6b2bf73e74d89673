//! Signed authorship end to end (issue 12 item 1): every change carries its author node's
//! signature through relays and bundles, and every node checks it before storing; and what a
//! change does is judged wherever it enters, from above as from below (item 2).

use automerge::transaction::Transactable;
use automerge::ReadDoc;
use communesync::model::{assignment, dispatch, receipts, Author, DocId, DocKind};
use communesync::node::{now_ms, Node};
use serde_json::Value;

use crate::util::{doc_heads, enrolled, node_id, province, sync, sync_pending, synced, Server};
use crate::util::{exit, id, path_arg, TestNode, COMMUNE, DISTRICT, SIBLING};

/// A province serving, a district, and a commune that has synced `docs` dispatches of its own
/// (addressed to the province) to the district; the district's daemon is stopped again and it
/// has no upstream peer yet.
struct Chain {
    province: TestNode,
    upstream: Server,
    district: TestNode,
    commune: TestNode,
    docs: Vec<String>,
}

fn chain(docs: usize) -> Chain {
    let province = province();
    let upstream = Server::start(&province);
    let district = enrolled(&province, DISTRICT, "district");
    let commune = enrolled(&province, COMMUNE, "commune");
    let relay = Server::start(&district);
    commune.ok(&["peer", "add", "up", "--addr", relay.addr()]);
    let docs = (0..docs)
        .map(|i| id(&commune.new_dispatch(&format!("{i}/BC"), &["qn"], &[])))
        .collect::<Vec<_>>();
    commune.ok(&["dispatch", "comment", &docs[0], "đã gửi"]);
    synced(&commune);
    relay.finish();
    Chain {
        province,
        upstream,
        district,
        commune,
        docs,
    }
}

impl Chain {
    fn district_up(&self) {
        self.district
            .ok(&["peer", "add", "up", "--addr", self.upstream.addr()]);
    }
}

/// The reasons the peer gave for refusing documents of ours, by document.
fn refused_by_peer(report: &Value) -> Vec<(String, String)> {
    report["docs_refused_by_peer"]
        .as_array()
        .unwrap_or_else(|| panic!("no refusals in {report}"))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Flips one bit of the stored signature of every change of `doc` at `node`, as a relay that
/// alters what it forwards would.
fn alter_signatures(node: &TestNode, doc: &str) {
    let db = node.db();
    let sigs: Vec<(Vec<u8>, Vec<u8>)> = db
        .prepare("SELECT hash, sig FROM change_sigs WHERE doc = ?1")
        .unwrap()
        .query_map([doc], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(!sigs.is_empty(), "no signature of {doc} at the relay");
    for (hash, mut sig) in sigs {
        sig[10] ^= 1;
        db.execute(
            "UPDATE change_sigs SET sig = ?1 WHERE doc = ?2 AND hash = ?3",
            rusqlite::params![sig, doc, hash],
        )
        .unwrap();
    }
}

#[test]
fn issue12_a_district_writing_under_a_communes_actor_is_refused_at_the_province_and_the_commune() {
    let c = chain(2);
    let (forged, honest) = (&c.docs[0], &c.docs[1]);
    let commune_id = node_id(&c.commune);
    let before = doc_heads(&c.commune, forged);

    // The district writes a comment in the commune's name, under its actor: the note, the
    // unit and the actor all say the commune; only the signature is the district's.
    let mut relay = Node::open(c.district.data()).unwrap();
    let victim: automerge::ActorId = hex::decode(&commune_id).unwrap().into();
    let as_commune = Author {
        user: "admin".into(),
        unit: COMMUNE.into(),
        node: commune_id.clone(),
    };
    let doc_id: DocId = forged.parse().unwrap();
    relay
        .store
        .write(|tx| {
            tx.update_doc(&doc_id, &victim, now_ms(), |doc| {
                Ok(dispatch::add_comment(
                    doc,
                    &doc_id,
                    "rút lại báo cáo",
                    &as_commune,
                    now_ms(),
                )?)
            })
        })
        .unwrap();
    drop(relay);

    // Upwards: the province refuses that document alone, and stores the other.
    c.district_up();
    let report = sync_pending(&c.district);
    let refused = refused_by_peer(&report);
    assert_eq!(refused.len(), 1, "{report}");
    assert_eq!(&refused[0].0, forged);
    assert!(
        refused[0].1.contains(&format!(
            "is not by its author node {commune_id} ({COMMUNE})"
        )),
        "{report}"
    );
    assert!(
        doc_heads(&c.province, forged).is_none(),
        "nothing of it stored"
    );
    assert!(doc_heads(&c.province, honest).is_some());

    // Downwards: the commune, which trusted what came from above, refuses it too, keeps its
    // copy as it was, and goes on syncing.
    c.upstream.finish();
    c.district.ok(&["peer", "remove", "up"]);
    let relay = Server::start(&c.district);
    c.commune.ok(&["peer", "remove", "up"]);
    c.commune.ok(&["peer", "add", "up", "--addr", relay.addr()]);
    let report = sync_pending(&c.commune);
    let refused = report["docs_refused"].to_string();
    assert!(
        refused.contains(forged.as_str()) && refused.contains("is not by its author node"),
        "{report}"
    );
    assert_eq!(doc_heads(&c.commune, forged), before);
    let later = id(&c.commune.new_dispatch("9/BC", &["qn"], &[]));
    synced(&c.commune);
    assert!(doc_heads(&c.district, &later).is_some());
    relay.finish();
}

#[test]
fn issue12_signatures_cross_a_relay_intact_and_one_altered_on_the_way_is_refused() {
    let c = chain(2);
    let (altered, honest) = (&c.docs[0], &c.docs[1]);
    let commune_id = node_id(&c.commune);
    alter_signatures(&c.district, altered);

    c.district_up();
    let report = sync_pending(&c.district);
    let refused = refused_by_peer(&report);
    assert_eq!(refused.len(), 1, "{report}");
    assert_eq!(&refused[0].0, altered);
    assert!(refused[0].1.contains("altered on the way"), "{report}");
    assert!(doc_heads(&c.province, altered).is_none());

    // The honest document crossed the district with its signatures: the province names the
    // commune's node as the signer of each line, verified against the certificate the
    // district passed on.
    let audit = c.province.json(&["audit", honest]);
    let lines = audit.as_array().unwrap();
    assert!(!lines.is_empty(), "{audit}");
    for line in lines {
        assert_eq!(line["actor"], commune_id.as_str(), "{audit}");
        assert_eq!(line["signer_unit"], COMMUNE, "{audit}");
        assert_eq!(line["signature"], "verified", "{audit}");
    }
    let text = c.province.ok(&["audit", honest]);
    assert!(
        text.contains(&format!(
            "[signed by {} {COMMUNE}: verified]",
            &commune_id[..12]
        )),
        "{text}"
    );
    c.upstream.finish();
}

#[test]
fn issue12_a_change_signed_by_a_revoked_node_is_refused() {
    let c = chain(1);
    let commune_id = node_id(&c.commune);
    // The province met the commune (it holds its certificate), then revokes it; what the
    // commune wrote before and the district still relays is refused.
    c.commune.ok(&["peer", "remove", "up"]);
    c.commune
        .ok(&["peer", "add", "up", "--addr", c.upstream.addr()]);
    synced(&c.commune);
    let late = id(&c.commune.new_dispatch("8/BC", &["qn"], &[]));
    c.upstream.finish();
    let relay = Server::start(&c.district);
    c.commune.ok(&["peer", "remove", "up"]);
    c.commune.ok(&["peer", "add", "up", "--addr", relay.addr()]);
    synced(&c.commune);
    relay.finish();
    c.province.ok(&["ca", "revoke", &commune_id]);

    let upstream = Server::start(&c.province);
    c.district
        .ok(&["peer", "add", "up", "--addr", upstream.addr()]);
    let report = sync_pending(&c.district);
    let refused = refused_by_peer(&report);
    assert_eq!(refused.len(), 1, "{report}");
    assert_eq!(refused[0].0, late);
    assert!(
        refused[0].1.contains(&format!(
            "is by node {commune_id} ({COMMUNE}), whose certificate is revoked"
        )),
        "{report}"
    );
    assert!(doc_heads(&c.province, &late).is_none());
    upstream.finish();
}

#[test]
fn issue12_bundles_carry_signatures_and_their_import_checks_them() {
    let c = chain(2);
    let (altered, honest) = (&c.docs[0], &c.docs[1]);
    let commune_id = node_id(&c.commune);
    c.upstream.finish();
    alter_signatures(&c.district, altered);

    let out = c.district.file("for-qn.csb");
    c.district
        .ok(&["bundle", "export", "--for", "qn", "--out", &path_arg(&out)]);
    let run = c
        .province
        .run(&["--json", "bundle", "import", &path_arg(&out)]);
    assert_eq!(
        run.code,
        i32::from(exit::USAGE),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.contains(altered.as_str()) && run.stderr.contains("altered on the way"),
        "{}",
        run.stderr
    );
    assert!(doc_heads(&c.province, altered).is_none());
    // The commune's certificate came in the bundle: its changes verify at the province.
    let audit = c.province.json(&["audit", honest]);
    for line in audit.as_array().unwrap() {
        assert_eq!(line["actor"], commune_id.as_str(), "{audit}");
        assert_eq!(line["signature"], "verified", "{audit}");
    }
}

/// A province, its district and a commune below it, where the district (an honest binary, its
/// store written through the library with its own key and actor, as a compromised relay would)
/// holds, ready for the commune, forged changes of its own next to legitimate ones from above.
struct FromAbove {
    province: TestNode,
    district: TestNode,
    commune: TestNode,
    /// (document, why the commune must refuse it): a dispatch the commune issued, its summary
    /// rewritten; a province directive, the sibling's recipient entry deleted; an assignment of
    /// the commune, created by the district; a district dispatch carrying a comment signed as
    /// the province.
    forged: Vec<(String, String)>,
    /// New to the commune and legitimate: a province directive, the province's receipt book of
    /// the commune's dispatch, a dispatch of the district's own.
    honest: Vec<String>,
    /// Heads of the commune's own dispatch there before the forgery.
    own_heads: Option<Vec<u8>>,
}

fn forged_from_above() -> FromAbove {
    let province = province();
    let upstream = Server::start(&province);
    let district = enrolled(&province, DISTRICT, "district");
    let commune = enrolled(&province, COMMUNE, "commune");
    let relay = Server::start(&district);
    commune.ok(&["peer", "add", "up", "--addr", relay.addr()]);
    let own = id(&commune.new_dispatch("1/BC", &["qn"], &[]));
    synced(&commune);
    relay.finish();
    let own_heads = doc_heads(&commune, &own);

    district.ok(&["peer", "add", "up", "--addr", upstream.addr()]);
    let shared = id(&province.new_dispatch("2/flash", &[COMMUNE, SIBLING], &[]));
    let directive = id(&province.new_dispatch("3/UBND", &[COMMUNE], &[]));
    synced(&district);
    // The province acknowledges the commune's dispatch: its receipt book of the commune's
    // dispatches comes down to the commune.
    province.ok(&["dispatch", "receive", &own]);
    let year = receipts::year_of(
        province.json(&["dispatch", "show", &own])["created_at_ms"]
            .as_i64()
            .unwrap(),
    );
    let book = receipts::book_id(COMMUNE, "qn", year).to_string();
    synced(&district);
    upstream.finish();
    let mine = id(&district.new_dispatch("4/UBND", &[COMMUNE], &[]));
    let commented = id(&district.new_dispatch("5/UBND", &[COMMUNE], &[]));

    let mut relay = Node::open(district.data()).unwrap();
    let actor = relay.actor().clone();
    let me = Author {
        user: "admin".into(),
        unit: DISTRICT.into(),
        node: relay.node_id().to_string(),
    };
    let as_province = Author {
        unit: "qn".into(),
        ..me.clone()
    };
    let assigned = DocId::generate(DocKind::Assignment);
    relay
        .store
        .write(|tx| {
            let doc_id: DocId = own.parse().unwrap();
            tx.update_doc(&doc_id, &actor, now_ms(), |doc| {
                doc.put(automerge::ROOT, "summary", "Báo cáo đã rút")
                    .unwrap();
                communesync::model::commit(doc, &me, now_ms(), "summary");
                Ok(())
            })?;
            let doc_id: DocId = shared.parse().unwrap();
            tx.update_doc(&doc_id, &actor, now_ms(), |doc| {
                let (_, recipients) = doc.get(automerge::ROOT, "recipients").unwrap().unwrap();
                doc.delete(&recipients, SIBLING).unwrap();
                communesync::model::commit(doc, &me, now_ms(), "recipient removed");
                Ok(())
            })?;
            tx.create_doc(&assigned, &actor, now_ms(), |doc| {
                let a = assignment::NewAssignment {
                    dispatch_id: directive.parse().unwrap(),
                    unit: COMMUNE.into(),
                    lead: "lan".into(),
                    co: vec![],
                    deadline: assignment::parse_deadline("2030-01-01").unwrap(),
                };
                Ok(assignment::create(doc, &assigned, &a, &me, now_ms())?)
            })?;
            let doc_id: DocId = commented.parse().unwrap();
            tx.update_doc(&doc_id, &actor, now_ms(), |doc| {
                Ok(dispatch::add_comment(
                    doc,
                    &doc_id,
                    "đã duyệt",
                    &as_province,
                    now_ms(),
                )?)
            })?;
            Ok(())
        })
        .unwrap();
    drop(relay);
    FromAbove {
        province,
        district,
        commune,
        forged: vec![
            (
                own,
                format!("{DISTRICT} changed the reference, summary, kind, priority, issuer or scans of a dispatch issued by {COMMUNE}"),
            ),
            (shared, format!("{DISTRICT} removed recipient {SIBLING}")),
            (
                assigned.to_string(),
                format!("an assignment of {COMMUNE} created by {DISTRICT}"),
            ),
            (
                commented,
                "a change names author unit qn, but its signer".into(),
            ),
        ],
        honest: vec![directive, book, mine],
        own_heads,
    }
}

impl FromAbove {
    /// Nothing forged is stored at the commune; every legitimate document is.
    fn assert_commune_holds_only_the_honest(&self) {
        let (own, _) = &self.forged[0];
        assert_eq!(
            doc_heads(&self.commune, own),
            self.own_heads,
            "{own} changed"
        );
        for (doc, _) in &self.forged[1..] {
            assert!(doc_heads(&self.commune, doc).is_none(), "{doc} stored");
        }
        for doc in &self.honest {
            assert!(doc_heads(&self.commune, doc).is_some(), "{doc} not stored");
        }
        let shown = self.commune.json(&["dispatch", "show", own]);
        assert_eq!(shown["summary"], "Test dispatch", "{shown}");
    }

    /// Each forged document is named in `refusals` with its reason.
    fn assert_refused(&self, refusals: &[(String, String)]) {
        assert_eq!(refusals.len(), self.forged.len(), "{refusals:?}");
        for (doc, why) in &self.forged {
            assert!(
                refusals.iter().any(|(d, r)| d == doc && r.contains(why)),
                "{doc} not refused for {why:?}: {refusals:?}"
            );
        }
    }
}

#[test]
fn issue12_a_relay_cannot_rewrite_what_its_communes_hold_with_changes_of_its_own() {
    let f = forged_from_above();
    let relay = Server::start(&f.district);
    f.commune.ok(&["peer", "remove", "up"]);
    f.commune.ok(&["peer", "add", "up", "--addr", relay.addr()]);
    let report = sync_pending(&f.commune);
    let refusals: Vec<(String, String)> = report["docs_refused"]
        .as_array()
        .unwrap_or_else(|| panic!("nothing refused: {report}"))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    f.assert_refused(&refusals);
    f.assert_commune_holds_only_the_honest();
    // Recorded for `status` (exit 7: something needs attention), and the commune goes on
    // syncing with that district.
    let run = f.commune.run(&["--json", "status"]);
    assert_eq!(run.code, i32::from(exit::ATTENTION), "{}", run.stderr);
    let status = run.json();
    assert_eq!(
        status["peers"][0]["refused_total"],
        f.forged.len(),
        "{status}"
    );
    let later = id(&f.commune.new_dispatch("9/BC", &["qn"], &[]));
    sync(&f.commune);
    assert!(doc_heads(&f.district, &later).is_some());
    relay.finish();
    drop(f.province);
}

#[test]
fn issue12_a_bundle_from_above_is_judged_as_the_wire_is() {
    let f = forged_from_above();
    let out = f.district.file("for-tinhhuc.csb");
    f.district.ok(&[
        "bundle",
        "export",
        "--for",
        COMMUNE,
        "--out",
        &path_arg(&out),
    ]);
    let run = f
        .commune
        .run(&["--json", "bundle", "import", &path_arg(&out)]);
    assert_eq!(
        run.code,
        i32::from(exit::USAGE),
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    // The import's report names each refused document with its reason.
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let refusals: Vec<(String, String)> =
        serde_json::from_value(report["docs_refused"].clone()).unwrap();
    f.assert_refused(&refusals);
    f.assert_commune_holds_only_the_honest();
    drop(f.province);
}
