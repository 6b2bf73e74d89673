//! Signed authorship end to end (issue 12 item 1): every change carries its author node's
//! signature through relays and bundles, and every node checks it before storing.

use communesync::model::{dispatch, Author, DocId};
use communesync::node::{now_ms, Node};
use serde_json::Value;

use crate::util::{doc_heads, enrolled, node_id, province, sync_pending, synced, Server};
use crate::util::{exit, id, path_arg, TestNode, COMMUNE, DISTRICT};

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
