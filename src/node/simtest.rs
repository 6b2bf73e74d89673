//! Deterministic protocol tests: two real stores, two sessions, a simulated link that
//! interleaves, delays and cuts frames from a seed. No sockets, no clock.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::replica::NodeReplica;
use super::{DispatchRequest, Node};
use crate::model::assignment::Status;
use crate::model::dispatch::{DispatchKind, Priority};
use crate::model::{dispatch, Author};
use crate::proto::blob::{decode_chunk, encode_chunk};
use crate::proto::{Action, Frame, Hash32, ProtoError, Session};
use crate::store::index::DispatchFilter;
use crate::trust::PeerIdentity;
use crate::units::Role;
use automerge::AutoCommit;

struct Side {
    node: Node,
    /// How this side's peer appears to it (what its certificate would say).
    peer: PeerIdentity,
}

/// What a node's certificate says of it.
fn identity(node: &Node) -> PeerIdentity {
    PeerIdentity::from_cert_der(&node.own_cert_der().unwrap()).unwrap()
}

/// Enrols `node` with the CA of `province`, as `enrol request`, `ca issue`, `enrol install` do.
fn enrol(province: &Node, node: &mut Node, dir: &std::path::Path) {
    let (request, issued) = (dir.join("request.pem"), dir.join("issued.pem"));
    node.enrol_request(&request).unwrap();
    let (unit, role) = (node.unit().to_string(), node.role());
    province.ca_issue(&request, &unit, role, &issued).unwrap();
    node.enrol_install(&issued).unwrap();
}

/// Two nodes that met, as a session's start leaves them: each knows the other's certificate.
fn meet(a: Node, b: Node) -> (Side, Side) {
    let (aid, bid) = (identity(&a), identity(&b));
    let (ader, bder) = (a.own_cert_der().unwrap(), b.own_cert_der().unwrap());
    let mut a = Side { node: a, peer: bid };
    let mut b = Side { node: b, peer: aid };
    a.node.record_contact(&a.peer).unwrap();
    b.node.record_contact(&b.peer).unwrap();
    a.node.learn_cert(&bder).unwrap();
    b.node.learn_cert(&ader).unwrap();
    (a, b)
}

fn pair(dir: &std::path::Path) -> (Side, Side) {
    Node::init(&dir.join("p"), "qn", Role::Province, "lan").unwrap();
    Node::init(&dir.join("c"), "qn/binhlieu/tinhhuc", Role::Commune, "minh").unwrap();
    let mut p = Node::open(&dir.join("p")).unwrap();
    let mut c = Node::open(&dir.join("c")).unwrap();
    p.ca_init().unwrap();
    enrol(&p, &mut c, dir);
    meet(p, c)
}

/// Everything a session has to send now, each frame through the wire encoding, as over QUIC.
fn flight(session: &mut Session, side: &mut Side) -> Vec<Frame> {
    let mut r = NodeReplica::new(&mut side.node, side.peer.clone());
    let mut out = Vec::new();
    while let Some(f) = session.poll_frame(&mut r).unwrap() {
        let bytes = crate::proto::wire::encode(&f, 1);
        out.push(crate::proto::wire::decode(&bytes[4..]).unwrap());
    }
    out
}

/// Hands a flight to the session on the other side, in order.
fn land(session: &mut Session, side: &mut Side, frames: Vec<Frame>) -> Result<(), ProtoError> {
    let mut r = NodeReplica::new(&mut side.node, side.peer.clone());
    frames
        .into_iter()
        .try_for_each(|f| session.handle(&mut r, f))
}

/// Exchanges whole flights both ways until neither side has anything to say.
fn settle(sa: &mut Session, a: &mut Side, sb: &mut Session, b: &mut Side) {
    for _ in 0..LEGS_MAX {
        let (fa, fb) = (flight(sa, a), flight(sb, b));
        if fa.is_empty() && fb.is_empty() {
            assert!(sa.is_done() && sb.is_done(), "both sides idle, not done");
            return;
        }
        land(sb, b, fa).unwrap();
        land(sa, a, fb).unwrap();
    }
    panic!("no convergence within {LEGS_MAX} flights");
}

const LEGS_MAX: usize = 32;

/// A scan transfer in flight: chunks still to copy.
struct Transfer {
    from_a: bool,
    hash: Hash32,
    next: u64,
}

enum Outcome {
    Converged,
    Cut,
}

/// Runs one session pair until both are done or the link is cut (probability `cut_per_step`).
fn run_once(a: &mut Side, b: &mut Side, rng: &mut StdRng, cut_per_step: f64) -> Outcome {
    run(
        a,
        b,
        rng,
        Run {
            cut_per_step,
            a_tick: 0.0,
            b_one_shot: false,
        },
    )
}

/// How a run treats the two sides.
struct Run {
    cut_per_step: f64,
    /// Probability per step that `a` runs its push tick, as a serving node does every 250 ms
    /// whatever the session is doing.
    a_tick: f64,
    /// `b` is a one-shot sync: the run ends as soon as `b` is done (it closes the connection,
    /// cutting whatever is still in flight).
    b_one_shot: bool,
}

fn run(a: &mut Side, b: &mut Side, rng: &mut StdRng, how: Run) -> Outcome {
    let cut_per_step = how.cut_per_step;
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    let (mut a_to_b, mut b_to_a): (VecDeque<Frame>, VecDeque<Frame>) =
        (VecDeque::new(), VecDeque::new());
    let mut transfers: Vec<Transfer> = Vec::new();
    for _ in 0..100_000 {
        for (side, session, queue, from_a) in [
            (&mut *a, &mut sa, &mut a_to_b, true),
            (&mut *b, &mut sb, &mut b_to_a, false),
        ] {
            queue.extend(flight(session, side));
            let r = NodeReplica::new(&mut side.node, side.peer.clone());
            while let Some(action) = session.poll_action() {
                if let Action::SendBlob { hash, from } = action {
                    if r.node.store.has_blob(&hash).unwrap() {
                        transfers.push(Transfer {
                            from_a,
                            hash,
                            next: from,
                        });
                    } else {
                        session.blob_unavailable_here(hash, crate::proto::MissingReason::NotHeld);
                    }
                }
            }
        }
        if how.b_one_shot && sb.is_done() {
            return Outcome::Converged;
        }
        if sa.is_done() && sb.is_done() && a_to_b.is_empty() && b_to_a.is_empty() {
            return Outcome::Converged;
        }
        if rng.random_bool(how.a_tick) {
            sa.poll_local_changes(&mut NodeReplica::new(&mut a.node, a.peer.clone()), false)
                .unwrap();
        }
        if rng.random_bool(cut_per_step) {
            return Outcome::Cut;
        }
        // Pick what the link delivers next: a control frame either way, or one scan chunk.
        // Control streams stay ordered; scan streams interleave with them in any order.
        let choice = rng.random_range(0..3);
        if choice == 0 && !a_to_b.is_empty() {
            let f = a_to_b.pop_front().unwrap();
            sb.handle(&mut NodeReplica::new(&mut b.node, b.peer.clone()), f)
                .unwrap();
        } else if choice == 1 && !b_to_a.is_empty() {
            let f = b_to_a.pop_front().unwrap();
            sa.handle(&mut NodeReplica::new(&mut a.node, a.peer.clone()), f)
                .unwrap();
        } else if !transfers.is_empty() {
            let i = rng.random_range(0..transfers.len());
            let t = &mut transfers[i];
            let (src, dst, dst_session) = if t.from_a {
                (&mut *a, &mut *b, &mut sb)
            } else {
                (&mut *b, &mut *a, &mut sa)
            };
            let (size, manifest) = src.node.store.blob_manifest(&t.hash).unwrap().unwrap();
            let have = dst
                .node
                .store
                .write(|tx| tx.blob_partial_begin(&t.hash, size, &manifest, 1))
                .unwrap();
            assert!(t.next <= have, "a resumed transfer never skips a chunk");
            let data = src.node.store.blob_chunk(&t.hash, t.next).unwrap();
            let (compressed, wire) = encode_chunk(data.clone().into(), 1);
            let raw = decode_chunk(
                compressed,
                data.len() as u64,
                crate::store::blobs::CHUNK_BYTES as u64,
                wire,
                &manifest[t.next as usize],
            )
            .unwrap();
            let (hash, idx) = (t.hash, t.next);
            let mut file = dst.node.store.blob_partial_file(&hash).unwrap();
            file.write(idx, &raw).unwrap();
            file.sync().unwrap();
            dst.node
                .store
                .write(|tx| tx.blob_partial_chunks(&hash, &manifest, &[(idx, raw.len())], 1))
                .unwrap();
            t.next += 1;
            if t.next == manifest.len() as u64 {
                let stored = dst
                    .node
                    .store
                    .write(|tx| tx.blob_partial_finish(&hash, None, 2))
                    .unwrap();
                assert!(stored, "the scan matches its hash");
                transfers.swap_remove(i);
                dst_session
                    .blob_finished(
                        &mut NodeReplica::new(&mut dst.node, dst.peer.clone()),
                        &hash,
                        true,
                    )
                    .unwrap();
            }
        }
    }
    panic!("sessions did not finish within the step bound");
}

fn heads_of(node: &mut Node, id: &str) -> Vec<u8> {
    node.store.doc_heads(id).unwrap().unwrap_or_default()
}

#[test]
fn lossy_link_converges_from_any_seed() {
    for seed in 0..8u64 {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = pair(dir.path());
        let mut rng = StdRng::seed_from_u64(seed);
        let scan = dir.path().join("scan.pgm");
        std::fs::write(&scan, crate::cli::synthetic_scan(700, 800, seed)).unwrap();
        let to_commune = DispatchRequest {
            ref_no: "7/UBND".into(),
            summary: "Lụt bão".into(),
            kind: DispatchKind::Directive,
            priority: Priority::Flash,
            to: vec!["qn/binhlieu/tinhhuc".into()],
            attach: vec![scan.clone()],
        };
        let mut other = to_commune.clone();
        other.to = vec!["qn/binhlieu/hucdong".into()];
        other.attach.clear();
        let d = a.node.dispatch_new(None, &to_commune).unwrap();
        let foreign = a.node.dispatch_new(None, &other).unwrap();
        for i in 0..20 {
            a.node
                .dispatch_comment(None, &d.id, &format!("p{i}"))
                .unwrap();
        }

        // Converge through cuts: every attempt resumes from what the stores hold.
        let mut attempts = 0;
        let mut round = |a: &mut Side, b: &mut Side, rng: &mut StdRng| loop {
            attempts += 1;
            assert!(
                attempts < 200,
                "seed {seed}: no convergence after 200 attempts"
            );
            if let Outcome::Converged = run_once(a, b, rng, 0.02) {
                break;
            }
        };
        round(&mut a, &mut b, &mut rng);
        let asg = b
            .node
            .assign_new(None, &d.id, "minh", &[], "2026-12-31")
            .unwrap();
        // Concurrent offline edits on both sides of the same documents.
        b.node
            .dispatch_comment(None, &d.id, "from commune")
            .unwrap();
        a.node
            .dispatch_comment(None, &d.id, "from province")
            .unwrap();
        round(&mut a, &mut b, &mut rng);
        b.node
            .assign_update(None, &asg.id, Status::Done, Some("done here"))
            .unwrap();
        round(&mut a, &mut b, &mut rng);

        assert_eq!(
            heads_of(&mut a.node, &d.id),
            heads_of(&mut b.node, &d.id),
            "seed {seed}: dispatch replicas differ"
        );
        assert_eq!(
            heads_of(&mut a.node, &asg.id),
            heads_of(&mut b.node, &asg.id),
            "seed {seed}: assignment replicas differ"
        );
        let view = b.node.dispatch_show(&d.id).unwrap();
        assert_eq!(
            view.dispatch.comments.len(),
            22,
            "seed {seed}: every comment arrives once"
        );
        assert!(
            view.missing_scans.is_empty(),
            "seed {seed}: the scan arrived"
        );
        assert_eq!(a.node.assign_show(&asg.id).unwrap().status, "done");
        let held: Vec<_> = b
            .node
            .dispatch_list(DispatchFilter::All, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            held,
            vec![d.id.clone()],
            "seed {seed}: the commune holds exactly its scope, not {}",
            foreign.id
        );
        let mut copy = Vec::new();
        b.node
            .store
            .read_blob(
                &crate::store::blobs::parse_hash(&d.attachments[0].hash).unwrap(),
                &mut copy,
            )
            .unwrap();
        assert_eq!(copy, std::fs::read(&scan).unwrap());
    }
}

#[test]
fn unchanged_reconnect_is_one_exchange_of_few_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let req = DispatchRequest {
        ref_no: "1/UBND".into(),
        summary: "s".into(),
        kind: DispatchKind::Report,
        priority: Priority::Normal,
        to: vec!["qn/binhlieu/tinhhuc".into()],
        attach: vec![],
    };
    for _ in 0..50 {
        a.node.dispatch_new(None, &req).unwrap();
    }
    let mut rng = StdRng::seed_from_u64(1);
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    // A second session with nothing changed: count flights and bytes, delivering whole flights.
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    let (mut flights, mut bytes) = (0, 0);
    for _ in 0..10 {
        let mut ra = NodeReplica::new(&mut a.node, a.peer.clone());
        let mut out_a = Vec::new();
        while let Some(f) = sa.poll_frame(&mut ra).unwrap() {
            out_a.push(f);
        }
        let mut rb = NodeReplica::new(&mut b.node, b.peer.clone());
        let mut out_b = Vec::new();
        while let Some(f) = sb.poll_frame(&mut rb).unwrap() {
            out_b.push(f);
        }
        if out_a.is_empty() && out_b.is_empty() {
            break;
        }
        flights += 1;
        for f in out_a {
            bytes += crate::proto::wire::encode(&f, 3).len();
            sb.handle(&mut NodeReplica::new(&mut b.node, b.peer.clone()), f)
                .unwrap();
        }
        for f in out_b {
            bytes += crate::proto::wire::encode(&f, 3).len();
            sa.handle(&mut NodeReplica::new(&mut a.node, a.peer.clone()), f)
                .unwrap();
        }
    }
    assert!(sa.is_done() && sb.is_done());
    // Both sides speak at once: Hello+OfferEnd each way, then each side's Ack: two flights,
    // which is one round trip, with a few dozen bytes.
    assert!(flights <= 2, "{flights} flights");
    assert!(bytes < 200, "{bytes} bytes");
}

#[test]
fn a_peer_restored_from_a_backup_gets_back_what_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let req = |r: &str| DispatchRequest {
        ref_no: r.into(),
        summary: "s".into(),
        kind: DispatchKind::Report,
        priority: Priority::Normal,
        to: vec!["qn/binhlieu/tinhhuc".into()],
        attach: vec![],
    };
    let mut rng = StdRng::seed_from_u64(3);
    a.node.dispatch_new(None, &req("1/A")).unwrap();
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    // Back up the commune, let more arrive, then restore the backup: what came after is lost.
    b.node
        .store
        .write(|tx| tx.set_meta("checkpoint", "1"))
        .unwrap();
    let backup = dir.path().join("backup.db");
    b.node.store.backup_to(&backup).unwrap();
    let later = a.node.dispatch_new(None, &req("2/A")).unwrap();
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    let mut b = restored(b, &backup);
    assert!(
        b.node.dispatch_show(&later.id).is_err(),
        "the restore lost the later dispatch"
    );
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    assert!(
        b.node.dispatch_show(&later.id).is_ok(),
        "the province offered it again"
    );
}

/// Issue 11: a commune backed up, wrote a document and synced it, then was restored from the
/// backup. The province held the document as received whole from the commune and never
/// offered it back, so the commune lost its own work for good.
#[test]
fn a_node_restored_from_a_backup_gets_back_what_it_had_sent_since() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let mut rng = StdRng::seed_from_u64(4);
    a.node
        .dispatch_new(
            None,
            &request("1/A", Priority::Normal, "qn/binhlieu/tinhhuc"),
        )
        .unwrap();
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    let backup = dir.path().join("backup.db");
    b.node.store.backup_to(&backup).unwrap();
    let sent = b
        .node
        .dispatch_new(None, &request("2/C", Priority::Normal, "qn"))
        .unwrap();
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    assert!(a.node.dispatch_show(&sent.id).is_ok());
    let mut b = restored(b, &backup);
    assert!(
        b.node.dispatch_show(&sent.id).is_err(),
        "the restore lost it"
    );
    // Work done after the restore reuses feed positions the province has seen already.
    let after = b
        .node
        .dispatch_new(None, &request("3/C", Priority::Normal, "qn"))
        .unwrap();
    while !matches!(run_once(&mut a, &mut b, &mut rng, 0.0), Outcome::Converged) {}
    assert!(
        b.node.dispatch_show(&sent.id).is_ok(),
        "the province offered back what the commune had sent before the restore"
    );
    assert!(
        a.node.dispatch_show(&after.id).is_ok(),
        "and took what came after"
    );
}

/// The commune side after its database was replaced by `backup` (a restore, as an operator
/// does it: the backup's file over `node.db`, the old WAL gone).
fn restored(b: Side, backup: &std::path::Path) -> Side {
    let (peer, db) = (b.peer.clone(), b.node.store.path().to_path_buf());
    let dir = db
        .parent()
        .expect("node.db is in the data directory")
        .to_path_buf();
    drop(b);
    std::fs::copy(backup, &db).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    Side {
        node: Node::open(&dir).unwrap(),
        peer,
    }
}

/// Signs the changes of a document built in memory with `node`'s key, as a local write would,
/// keeping the signatures in its store (where a sender reads them).
fn sign_in_memory(node: &mut Node, id: &crate::model::DocId, doc: &mut AutoCommit) {
    use crate::store::sigs::ChangeSigRow;
    let key = crate::trust::NodeKey::load(node.dir().join(super::KEY_FILE)).unwrap();
    let signer = crate::trust::ChangeSigner::new(&key).unwrap();
    let rows: Vec<_> = doc
        .get_changes_meta(&[])
        .iter()
        .map(|c| ChangeSigRow {
            hash: c.hash.0,
            actor: c.actor.to_bytes().to_vec(),
            sig: signer.sign(id.as_str(), &c.hash.0).unwrap(),
        })
        .collect();
    node.store
        .write(|tx| tx.put_change_sigs(id, &rows))
        .unwrap();
}

/// Applies one Changes frame of `docs` (each a document's whole `save()` at the province) at
/// the commune, as its session would.
fn apply_frame(
    from: &Node,
    b: &mut Side,
    docs: &[(&str, Vec<u8>)],
) -> Result<crate::proto::Applied, ProtoError> {
    use crate::proto::{ChangeSig, DocChanges, Replica};
    let frame = docs
        .iter()
        .map(|(id, data)| DocChanges {
            id: id.to_string(),
            heads: AutoCommit::load(data)
                .unwrap()
                .get_heads()
                .iter()
                .map(|h| h.0)
                .collect(),
            data: data.clone(),
            sigs: id
                .parse()
                .ok()
                .and_then(|doc| from.store.change_sigs(&doc).ok())
                .unwrap_or_default()
                .into_iter()
                .map(|row| ChangeSig::new(&row.hash, row.sig))
                .collect(),
        })
        .collect();
    NodeReplica::new(&mut b.node, b.peer.clone()).apply(frame)
}

fn saved(node: &mut Node, id: &str) -> Vec<u8> {
    node.store
        .read_doc(&id.parse().unwrap(), |doc| doc.save())
        .unwrap()
}

fn dispatch_to(node: &mut Node, unit: &str) -> String {
    let req = request("1/UBND", Priority::Normal, unit);
    node.dispatch_new(None, &req).unwrap().id
}

/// A dispatch without scans from the province to `unit`.
fn request(ref_no: &str, priority: Priority, unit: &str) -> DispatchRequest {
    DispatchRequest {
        ref_no: ref_no.into(),
        summary: "Sơ tán khẩn cấp".into(),
        kind: DispatchKind::Directive,
        priority,
        to: vec![unit.into()],
        attach: vec![],
    }
}

#[test]
fn a_frame_carrying_a_document_twice_stores_it_merged() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let id = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let first = saved(&mut a.node, &id);
    a.node.dispatch_comment(None, &id, "later").unwrap();
    let second = saved(&mut a.node, &id);
    let other = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let third = saved(&mut a.node, &other);
    let applied = apply_frame(
        &a.node,
        &mut b,
        &[(&id, first), (&other, third), (&id, second)],
    )
    .unwrap();
    assert_eq!((applied.stored, applied.refused.len()), (3, 0));
    assert_eq!(heads_of(&mut b.node, &id), heads_of(&mut a.node, &id));
    assert_eq!(heads_of(&mut b.node, &other), heads_of(&mut a.node, &other));
}

/// Issue 12: one refused document used to roll back its whole frame and end the session, so
/// one bad change blocked everything behind it at every session.
#[test]
fn a_frame_with_one_refused_document_stores_the_others_and_records_why() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let ours = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let not_ours = dispatch_to(&mut a.node, "qn/binhlieu/hucdong");
    let also_ours = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let frame = [
        (ours.as_str(), saved(&mut a.node, &ours)),
        (not_ours.as_str(), saved(&mut a.node, &not_ours)),
        (also_ours.as_str(), saved(&mut a.node, &also_ours)),
    ];
    let applied = apply_frame(&a.node, &mut b, &frame).unwrap();
    assert_eq!(applied.stored, 2);
    let [(id, why)] = &applied.refused[..] else {
        panic!("one refusal: {applied:?}")
    };
    assert_eq!(id, &not_ours);
    assert!(why.contains("outside this node's scope"), "{why}");
    assert!(b.node.store.doc_exists(&ours.parse().unwrap()).unwrap());
    assert!(b
        .node
        .store
        .doc_exists(&also_ours.parse().unwrap())
        .unwrap());
    assert!(!b.node.store.doc_exists(&not_ours.parse().unwrap()).unwrap());
    let (recorded, total) = b
        .node
        .store
        .refusals(&a.node.node_id().to_string(), false, 5)
        .unwrap();
    assert_eq!((total, recorded[0].0.as_str()), (1, not_ours.as_str()));
}

/// The refusing side tells the sender which document and why; the session goes on, and
/// neither side calls itself converged.
#[test]
fn a_refused_document_is_reported_to_its_sender_and_neither_side_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let ours = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let frame = [(ours.as_str(), saved(&mut a.node, &ours))];
    apply_frame(&a.node, &mut b, &frame).unwrap();
    // The commune adds a comment that claims the province as its author: refused there,
    // while the commune's honest dispatch in the same session goes through.
    forge_comment(&mut b.node, &ours, "qn");
    let honest = b
        .node
        .dispatch_new(None, &request("2/UBND", Priority::Normal, "qn"))
        .unwrap();
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    for _ in 0..LEGS_MAX {
        let (fa, fb) = (flight(&mut sa, &mut a), flight(&mut sb, &mut b));
        if fa.is_empty() && fb.is_empty() {
            break;
        }
        land(&mut sb, &mut b, fa).unwrap();
        land(&mut sa, &mut a, fb).unwrap();
    }
    assert!(sa.is_done() && sb.is_done(), "the session ran to its end");
    assert!(a
        .node
        .store
        .doc_exists(&honest.id.parse().unwrap())
        .unwrap());
    assert_eq!(sa.docs_refused().len(), 1, "{:?}", sa.docs_refused());
    assert_eq!(sb.docs_refused_by_peer().keys().next(), Some(&ours));
    assert!(!sa.is_converged() && !sb.is_converged());
}

fn to_commune(ref_no: &str, priority: Priority) -> DispatchRequest {
    request(ref_no, priority, "qn/binhlieu/tinhhuc")
}

fn ids_wanted(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .flat_map(|f| match f {
            Frame::Want { docs } => docs.iter().map(|d| d.id.clone()).collect(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn an_urgent_dispatch_is_stored_from_the_flight_that_offers_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    settle(&mut sa, &mut a, &mut sb, &mut b);

    // A continuous session, as `serve` runs it: the province writes, then offers.
    let urgent = a
        .node
        .dispatch_new(None, &to_commune("1/KHAN", Priority::Urgent))
        .unwrap();
    let normal = a
        .node
        .dispatch_new(None, &to_commune("2/THUONG", Priority::Normal))
        .unwrap();
    let mut ra = NodeReplica::new(&mut a.node, a.peer.clone());
    assert!(sa.poll_local_changes(&mut ra, false).unwrap());
    let first = flight(&mut sa, &mut a);
    assert!(
        matches!(&first[0], Frame::Push { docs } if docs.len() == 1 && docs[0].id == urgent.id)
    );
    land(&mut sb, &mut b, first).unwrap();
    assert!(
        b.node.store.doc_heads(&urgent.id).unwrap().is_some(),
        "the urgent dispatch is stored half a round trip after the write"
    );
    assert!(
        b.node.store.doc_heads(&normal.id).unwrap().is_none(),
        "a normal dispatch waits for its Want"
    );
    // A Push is accepted only where an Offer would be, not while a round's changes arrive.
    let mut rb = NodeReplica::new(&mut b.node, b.peer.clone());
    assert!(matches!(
        sb.handle(&mut rb, Frame::Push { docs: vec![] }),
        Err(ProtoError::Violation(_))
    ));
    let answer = flight(&mut sb, &mut b);
    assert_eq!(ids_wanted(&answer), vec![normal.id.clone()]);
    land(&mut sa, &mut a, answer).unwrap();
    settle(&mut sa, &mut a, &mut sb, &mut b);

    // A change to a document the peer holds is pushed whole again: merged, nothing asked for.
    a.node
        .dispatch_comment(None, &urgent.id, "đã có xe")
        .unwrap();
    let mut ra = NodeReplica::new(&mut a.node, a.peer.clone());
    assert!(sa.poll_local_changes(&mut ra, false).unwrap());
    let again = flight(&mut sa, &mut a);
    assert!(matches!(&again[0], Frame::Push { .. }));
    land(&mut sb, &mut b, again).unwrap();
    assert_eq!(ids_wanted(&flight(&mut sb, &mut b)), Vec::<String>::new());
    for id in [&urgent.id, &normal.id] {
        assert_eq!(heads_of(&mut a.node, id), heads_of(&mut b.node, id));
    }
    assert_eq!(
        b.node
            .dispatch_show(&urgent.id)
            .unwrap()
            .dispatch
            .comments
            .len(),
        1
    );
}

#[test]
fn a_pushed_document_passes_the_checks_of_any_change() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let mut flash = to_commune("3/HOATOC", Priority::Flash);
    flash.to = vec!["qn".into()];
    let d = b.node.dispatch_new(None, &flash).unwrap();
    // The commune adds a change claiming the province wrote it.
    forge_comment(&mut b.node, &d.id, "qn");
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    let first = flight(&mut sb, &mut b);
    assert!(first.iter().any(|f| matches!(f, Frame::Push { .. })));
    land(&mut sa, &mut a, first).unwrap();
    let answer = flight(&mut sa, &mut a);
    assert!(
        answer.iter().any(|f| matches!(f, Frame::DocRefused { id, reason } if *id == d.id && reason.contains("claims author unit qn"))),
        "{answer:?}"
    );
    assert!(a.node.store.doc_heads(&d.id).unwrap().is_none());
}

/// Adds a comment to a document in `node`'s store under a forged author unit: what a tampered
/// node would send.
fn forge_comment(node: &mut Node, id: &str, claimed_unit: &str) {
    let id: crate::model::DocId = id.parse().unwrap();
    let forged = Author {
        user: "admin".into(),
        unit: claimed_unit.into(),
        node: node.node_id().to_string(),
    };
    let actor = node.actor().clone();
    node.store
        .write(|tx| {
            tx.update_doc(&id, &actor, super::now_ms(), |doc| {
                Ok(dispatch::add_comment(
                    doc,
                    &id,
                    "forged",
                    &forged,
                    super::now_ms(),
                )?)
            })
        })
        .unwrap();
}

/// Issue 10: a serving node's push tick, falling between a one-shot peer's offer and the
/// moment its documents are applied, said "no more scans wanted" before it knew their scans;
/// the sync then ended converged with the scan left behind (8 of 8 trials on field links).
#[test]
fn a_one_shot_sync_is_done_only_once_the_serving_peer_holds_its_scans() {
    for seed in 0..24u64 {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b) = pair(dir.path());
        let mut rng = StdRng::seed_from_u64(seed);
        let scan = dir.path().join("scan.pgm");
        std::fs::write(&scan, crate::cli::synthetic_scan(300, 400, seed)).unwrap();
        let mut up = request("9/UBND", Priority::Normal, "qn");
        up.attach = vec![scan.clone()];
        let d = b.node.dispatch_new(None, &up).unwrap();
        let how = Run {
            cut_per_step: 0.0,
            a_tick: 0.3,
            b_one_shot: true,
        };
        assert!(matches!(
            run(&mut a, &mut b, &mut rng, how),
            Outcome::Converged
        ));
        assert_eq!(
            heads_of(&mut a.node, &d.id),
            heads_of(&mut b.node, &d.id),
            "seed {seed}: the province holds the dispatch"
        );
        assert!(
            a.node
                .dispatch_show(&d.id)
                .unwrap()
                .missing_scans
                .is_empty(),
            "seed {seed}: the one-shot side was done before the province held its scan"
        );
    }
}

#[test]
fn a_decompression_bomb_is_refused_before_automerge_inflates_it() {
    use crate::proto::{DocChanges, Replica};
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let held = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let whole = saved(&mut a.node, &held);
    apply_frame(&a.node, &mut b, &[(&held, whole)]).unwrap();
    let held_heads = heads_of(&mut b.node, &held);
    let new = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    // A compressed change chunk inflating to 1 GiB, for a new document and for a held one.
    let bomb = crate::model::guard::tests::change_bomb(1024);
    for id in [&new, &held] {
        let frame = Frame::Changes {
            docs: vec![DocChanges {
                id: id.clone(),
                heads: vec![[7; 32]],
                data: bomb.clone(),
                sigs: Vec::new(),
            }],
        };
        assert!(crate::proto::wire::encode(&frame, 3).len() < 8 << 10);
        let Frame::Changes { docs } = frame else {
            unreachable!()
        };
        let started = std::time::Instant::now();
        let applied = NodeReplica::new(&mut b.node, b.peer.clone())
            .apply(docs)
            .unwrap();
        assert_eq!(applied.stored, 0);
        assert!(
            matches!(&applied.refused[..], [(refused, why)] if refused == id && why.contains(id.as_str()) && why.contains("decompression bomb")),
            "{applied:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
    assert!(b.node.store.doc_heads(&new).unwrap().is_none());
    assert_eq!(heads_of(&mut b.node, &held), held_heads);
}

/// A fresh session at `a` that has taken `b`'s Hello (and nothing else from it yet).
fn session_past_hello(a: &mut Side, b: &mut Side) -> Session {
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    let hello = flight(&mut sb, b).remove(0);
    assert!(matches!(hello, Frame::Hello { .. }));
    land(&mut sa, a, vec![hello]).unwrap();
    sa
}

fn want(ids: &[&str]) -> Frame {
    Frame::Want {
        docs: ids
            .iter()
            .map(|id| crate::proto::DocHeads {
                id: id.to_string(),
                heads: vec![],
            })
            .collect(),
    }
}

#[test]
fn a_want_is_served_only_for_documents_offered_this_round_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let old = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    settle(&mut sa, &mut a, &mut sb, &mut b);

    // The next session offers only the new document: the old one may not be asked for.
    let new = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let mut sa = session_past_hello(&mut a, &mut b);
    let err = land(&mut sa, &mut a, vec![want(&[&old])]).unwrap_err();
    assert!(
        matches!(&err, ProtoError::Violation(why) if why.contains(&old) && why.contains("did not offer")),
        "{err}"
    );

    // Offered, it is sent once; the same Want again is refused, not answered again.
    let mut sa = session_past_hello(&mut a, &mut b);
    let offers = flight(&mut sa, &mut a);
    assert!(offers
        .iter()
        .any(|f| matches!(f, Frame::Offer { docs } if docs.iter().any(|d| d.id == new))));
    land(&mut sa, &mut a, vec![want(&[&new])]).unwrap();
    let sent = flight(&mut sa, &mut a);
    assert!(matches!(&sent[..], [Frame::Changes { docs }] if docs[0].id == new));
    let err = land(&mut sa, &mut a, vec![want(&[&new])]).unwrap_err();
    assert!(
        matches!(&err, ProtoError::Violation(why) if why.contains("already sent")),
        "{err}"
    );

    // A Want longer than an offer page is refused before anything is loaded.
    let mut sa = session_past_hello(&mut a, &mut b);
    flight(&mut sa, &mut a);
    let ids = vec![new.as_str(); crate::proto::session::OFFER_PAGE_DOCS + 1];
    let err = land(&mut sa, &mut a, vec![want(&ids)]).unwrap_err();
    assert!(
        matches!(&err, ProtoError::Violation(why) if why.contains("more than an offer page")),
        "{err}"
    );
}

#[test]
fn a_scan_asked_for_again_and_again_is_sent_a_bounded_number_of_times() {
    use crate::proto::session::BLOB_SENDS_PER_SCAN_MAX;
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let mut sa = session_past_hello(&mut a, &mut b);
    flight(&mut sa, &mut a);
    let scan = [9u8; 32];
    let asks = BLOB_SENDS_PER_SCAN_MAX + 3;
    for _ in 0..asks {
        let ask = Frame::BlobWant {
            blobs: vec![(scan, 0)],
        };
        land(&mut sa, &mut a, vec![ask]).unwrap();
    }
    let sends = std::iter::from_fn(|| sa.poll_action())
        .filter(|a| matches!(a, Action::SendBlob { hash, .. } if *hash == scan))
        .count();
    assert_eq!(sends, BLOB_SENDS_PER_SCAN_MAX as usize);
    let missing = flight(&mut sa, &mut a)
        .into_iter()
        .filter(|f| matches!(f, Frame::BlobMissing { hash, .. } if *hash == scan))
        .count();
    assert_eq!(missing, 3);
    // A session counts sends of so many different scans, and answers the next as missing.
    for k in 0..(crate::proto::session::SCANS_COUNTED_MAX as u32 / 256) {
        let blobs = (0..256u32)
            .map(|j| {
                let mut h = [1u8; 32];
                h[..4].copy_from_slice(&(k * 256 + j).to_be_bytes());
                (h, 0)
            })
            .collect();
        land(&mut sa, &mut a, vec![Frame::BlobWant { blobs }]).unwrap();
    }
    while sa.poll_action().is_some() {}
    flight(&mut sa, &mut a);
    let late = [2u8; 32];
    land(
        &mut sa,
        &mut a,
        vec![Frame::BlobWant {
            blobs: vec![(late, 0)],
        }],
    )
    .unwrap();
    assert!(sa.poll_action().is_none());
    assert!(flight(&mut sa, &mut a)
        .iter()
        .any(|f| matches!(f, Frame::BlobMissing { hash, .. } if *hash == late)));
    // A BlobWant longer than any a peer sends is refused whole.
    let flood = Frame::BlobWant {
        blobs: (0..=crate::proto::session::BLOB_WANT_MAX as u32)
            .map(|k| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&k.to_be_bytes());
                (h, 0)
            })
            .collect(),
    };
    assert!(matches!(
        land(&mut sa, &mut a, vec![flood]),
        Err(ProtoError::Violation(_))
    ));
}

#[test]
fn an_offer_longer_than_a_page_is_refused_before_any_document_is_loaded() {
    use crate::proto::session::OFFER_PAGE_DOCS;
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let held = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let whole = saved(&mut a.node, &held);
    apply_frame(&a.node, &mut b, &[(&held, whole)]).unwrap();
    let mut sb = session_past_hello(&mut b, &mut a);
    // Bogus heads for a held document: each would cost a load of it.
    let bogus = crate::proto::DocHeads {
        id: held.clone(),
        heads: vec![[3; 32]],
    };
    let offer = |n| Frame::Offer {
        docs: vec![bogus.clone(); n],
    };
    land(&mut sb, &mut b, vec![offer(OFFER_PAGE_DOCS)]).unwrap();
    let err = land(&mut sb, &mut b, vec![offer(OFFER_PAGE_DOCS + 1)]).unwrap_err();
    assert!(
        matches!(&err, ProtoError::Violation(why) if why.contains("more than a page")),
        "{err}"
    );
}

#[test]
fn a_peer_that_keeps_claiming_to_have_lost_our_feed_is_honoured_once_per_interval() {
    use crate::proto::Replica;
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _b) = pair(dir.path());
    let mut r = NodeReplica::new(&mut a.node, a.peer.clone());
    r.set_acked_by_peer(40).unwrap();
    // Restored from a backup: offered again from what it holds.
    r.peer_regressed(10).unwrap();
    assert_eq!(r.acked_by_peer().unwrap(), 10);
    // It acknowledges everything again, then says the same at its next session: refused,
    // with the reason, and the checkpoint stays.
    r.set_acked_by_peer(40).unwrap();
    let err = r.peer_regressed(0).unwrap_err();
    assert!(
        matches!(&err, ProtoError::Refused(why) if why.contains("again holds less") && why.contains("sync again later")),
        "{err}"
    );
    assert_eq!(r.acked_by_peer().unwrap(), 40);
}

/// A peer's DocRefused for a document this node does not hold is not recorded: a hostile peer
/// cannot fill the refusals table with made-up ids.
#[test]
fn a_refusal_of_a_document_not_held_here_is_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let mut sa = session_past_hello(&mut a, &mut b);
    let mut r = NodeReplica::new(&mut a.node, a.peer.clone());
    for i in 0..3 {
        sa.handle(
            &mut r,
            Frame::DocRefused {
                id: format!("dsp_{i:016x}"),
                reason: "made up".into(),
            },
        )
        .unwrap();
    }
    let peer = b.node.node_id().to_string();
    assert_eq!(a.node.store.refusals(&peer, true, 10).unwrap().1, 0);
}

/// Authorization reads a document after each new change from below: a document of more new
/// changes than `CHANGES_JUDGED_MAX` is refused before any is judged; the rest of the frame
/// is stored.
#[test]
fn a_document_of_too_many_new_changes_from_below_is_refused_before_it_is_judged() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    // Written as the commune's node would, in memory (the node would commit each comment).
    let author = Author {
        user: "minh".into(),
        unit: b.node.unit().into(),
        node: b.node.node_id().to_string(),
    };
    let commented = |comments: usize| {
        let id = crate::model::DocId::generate(crate::model::DocKind::Dispatch);
        let mut doc = AutoCommit::new().with_actor(b.node.actor().clone());
        let new = dispatch::NewDispatch {
            ref_no: "7/BC".into(),
            summary: "Báo cáo".into(),
            kind: DispatchKind::Report,
            priority: Priority::Normal,
            issuer: author.unit.clone(),
            to: vec!["qn".into()],
            attachments: vec![],
        };
        dispatch::create(&mut doc, &id, &new, &author, 1).unwrap();
        for i in 0..comments {
            dispatch::add_comment(&mut doc, &id, &format!("c{i}"), &author, 2 + i as i64).unwrap();
        }
        (id, doc)
    };
    let (mut some, mut too_many) = (commented(50), commented(0));
    sign_in_memory(&mut b.node, &some.0, &mut some.1);
    let some = (some.0.to_string(), some.1.save());
    // The count is checked before anything else about the changes: bare ones do.
    for i in 0..1_000i64 {
        use automerge::transaction::Transactable;
        too_many.1.put(automerge::ROOT, "n", i).unwrap();
        too_many.1.commit();
    }
    let too_many = (too_many.0.to_string(), too_many.1.save());
    // Judging is quadratic in a document's changes (each is read whole after each change): 999
    // take seconds even in a release build, so the accepted one here is small.
    let frame = [(some.0.as_str(), some.1), (too_many.0.as_str(), too_many.1)];
    let applied = apply_frame(&b.node, &mut a, &frame).unwrap();
    assert_eq!(applied.stored, 1, "{applied:?}");
    assert!(
        matches!(&applied.refused[..], [(id, why)] if *id == too_many.0 && why.contains("1001 new changes at once")),
        "{applied:?}"
    );
}

/// From above, a document's whole history is judged, however long: what bounds it is the
/// session's CPU budget, spent as the changes are judged, not a count.
#[test]
fn a_long_history_from_above_is_judged_within_the_sessions_cpu_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let long = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    for i in 0..40 {
        a.node
            .dispatch_comment(None, &long, &format!("bổ sung {i}"))
            .unwrap();
    }
    let short = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    // No budget left for judging: the long history is refused once it has cost any CPU; a
    // document of one change is judged without reading the clock.
    b.node.session_cpu_max = std::time::Duration::ZERO;
    let frame = [
        (&long[..], saved(&mut a.node, &long)),
        (&short[..], saved(&mut a.node, &short)),
    ];
    let applied = apply_frame(&a.node, &mut b, &frame).unwrap();
    assert_eq!(applied.stored, 1, "{:?}", applied.refused);
    assert_eq!(applied.refused[0].0, long);
    assert!(
        applied.refused[0]
            .1
            .contains("judging its changes would cost more than the 0 s of CPU time left"),
        "{:?}",
        applied.refused
    );
    assert!(b.node.store.doc_heads(&long).unwrap().is_none());

    // With the budget, the same 41 changes from above are judged and stored.
    b.node.session_cpu_max = super::replica::SESSION_CPU_MAX;
    let applied = apply_frame(&a.node, &mut b, &frame[..1]).unwrap();
    assert_eq!(applied.stored, 1, "{:?}", applied.refused);
}

#[test]
fn a_peer_is_refused_once_its_session_has_cost_its_cpu_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = pair(dir.path());
    let first = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    let second = dispatch_to(&mut a.node, "qn/binhlieu/tinhhuc");
    // A budget the first frame's checks use up.
    b.node.session_cpu_max = std::time::Duration::ZERO;
    let whole = saved(&mut a.node, &first);
    apply_frame(&a.node, &mut b, &[(&first, whole)]).unwrap();
    let whole = saved(&mut a.node, &second);
    let err = apply_frame(&a.node, &mut b, &[(&second, whole)]).unwrap_err();
    assert!(
        matches!(&err, ProtoError::Refused(why) if why.contains("more than 0 s of CPU time in this session's last hour")),
        "{err}"
    );
    assert!(b.node.store.doc_heads(&second).unwrap().is_none());
}

/// One whole session between two sides, from Hello to both done.
fn sync_sides(a: &mut Side, b: &mut Side) {
    let mut sa = Session::new(&mut NodeReplica::new(&mut a.node, a.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut b.node, b.peer.clone()), 0).unwrap();
    settle(&mut sa, a, &mut sb, b);
}

fn holds(node: &Node, id: &str) -> bool {
    node.store.doc_exists(&id.parse().unwrap()).unwrap()
}

/// A province, a commune of Binh Lieu that sent it a report, and the Ha Long district
/// enrolled and met by the province (a second connection of its node): where a move lands.
fn commune_and_halong(dir: &std::path::Path) -> (Side, Side, Side, Side, String) {
    let (mut p, mut c) = pair(dir);
    let report = c
        .node
        .dispatch_new(None, &request("7/BC", Priority::Normal, "qn"))
        .unwrap()
        .id;
    sync_sides(&mut p, &mut c);
    Node::init(&dir.join("h"), "qn/halong", Role::District, "an").unwrap();
    let mut h = Node::open(&dir.join("h")).unwrap();
    enrol(&p.node, &mut h, dir);
    let (ph, h) = meet(Node::open(&dir.join("p")).unwrap(), h);
    (p, c, ph, h, report)
}

#[test]
fn a_commune_moved_at_the_province_reaches_its_new_district_and_writes_as_its_new_path() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ("qn/binhlieu/tinhhuc", "qn/halong/tinhhuc");
    let (mut p, mut c, mut ph, mut h, report) = commune_and_halong(dir.path());
    sync_sides(&mut ph, &mut h);
    assert!(holds(&ph.node, &report) && !holds(&h.node, &report));

    // A commune cannot hold a commune, and a move lands once at the province.
    assert!(ph.node.units_move(old, "qn/binhlieu/hucdong").is_err());
    assert!(c.node.units_move(old, "qn/halong").is_err());
    let signed = ph.node.units_move(old, "qn/halong").unwrap();
    assert_eq!(ph.node.tree.canonical(old), new);

    // Halong, already in step with the province's feed, is offered the moved commune's
    // documents again: they came into its scope.
    assert!(h.node.install_units(&signed.bytes).unwrap());
    sync_sides(&mut ph, &mut h);
    assert!(holds(&h.node, &report), "the new district lacks the report");

    // The commune follows the tree: same certificate, new path for what it writes.
    assert!(c.node.install_units(&signed.bytes).unwrap());
    assert_eq!((c.node.unit(), c.node.cert_unit()), (new, old));
    let later = c
        .node
        .dispatch_new(None, &request("8/BC", Priority::Normal, "qn"))
        .unwrap()
        .id;
    assert_eq!(c.node.dispatch_show(&later).unwrap().dispatch.issuer, new);
    // The province meets it by its old certificate and takes it as the new path (as a session
    // does at authentication); the new document is within the sender's subtree.
    p.node = Node::open(&dir.path().join("p")).unwrap();
    p.peer.unit = p.node.tree.canonical(&p.peer.unit).to_string();
    assert_eq!(p.peer.unit, new);
    sync_sides(&mut p, &mut c);
    assert!(holds(&p.node, &later));
    // Reopened, the commune still runs as its new path.
    let reopened = Node::open(&dir.path().join("c")).unwrap();
    assert_eq!(reopened.unit(), new);
}

#[test]
fn the_old_district_refuses_what_a_moved_commune_wrote_before_it_learnt_of_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let (p, c) = pair(dir.path());
    let province = p.node;
    let mut commune = c.node;
    Node::init(&dir.path().join("d"), "qn/binhlieu", Role::District, "an").unwrap();
    let mut district = Node::open(&dir.path().join("d")).unwrap();
    enrol(&province, &mut district, dir.path());
    let (mut province, mut district) = meet(province, district);
    sync_sides(&mut province, &mut district);
    let signed = province
        .node
        .units_move("qn/binhlieu/tinhhuc", "qn/halong")
        .unwrap();
    assert!(district.node.install_units(&signed.bytes).unwrap());

    // The commune has not heard yet: it writes under its old path and offers it upward.
    let written = commune
        .dispatch_new(None, &request("9/BC", Priority::Normal, "qn"))
        .unwrap()
        .id;
    let (mut d, mut c) = meet(district.node, commune);
    // The district takes the commune's certificate by its current path (as a session does).
    d.peer.unit = d.node.tree.canonical(&d.peer.unit).to_string();
    sync_sides(&mut d, &mut c);
    assert!(!holds(&d.node, &written));
    let (refused, _) = d
        .node
        .store
        .refusals(&c.node.node_id().to_string(), false, 10)
        .unwrap();
    assert!(
        refused
            .iter()
            .any(|(id, why, _)| *id == written && why.contains("outside this node's scope")),
        "{refused:?}"
    );
    // The commune was told, and keeps its document for its new district.
    let (told, _) = c
        .node
        .store
        .refusals(&d.node.node_id().to_string(), true, 10)
        .unwrap();
    assert!(told.iter().any(|(id, _, _)| *id == written), "{told:?}");
    assert!(holds(&c.node, &written));
}

#[test]
fn an_open_session_offers_again_when_a_tree_installed_meanwhile_moved_a_unit_into_its_peers_scope()
{
    let dir = tempfile::tempdir().unwrap();
    let (_p, _c, mut ph, mut h, report) = commune_and_halong(dir.path());
    // A session between the province and Halong, open and in step.
    let mut sa = Session::new(&mut NodeReplica::new(&mut ph.node, ph.peer.clone()), 0).unwrap();
    let mut sb = Session::new(&mut NodeReplica::new(&mut h.node, h.peer.clone()), 0).unwrap();
    settle(&mut sa, &mut ph, &mut sb, &mut h);

    // `unit move` runs in another process; this session's round acknowledged since put
    // Halong's checkpoint back where it was.
    let signed = Node::open(&dir.path().join("p"))
        .unwrap()
        .units_move("qn/binhlieu/tinhhuc", "qn/halong")
        .unwrap();
    let (halong, upto) = (
        h.node.node_id().to_string(),
        ph.node.store.feed_seq().unwrap(),
    );
    ph.node
        .store
        .write(|tx| tx.set_acked_by(&halong, upto))
        .unwrap();
    assert!(h.node.install_units(&signed.bytes).unwrap());
    // The session finds the tree at its push tick and offers Halong its scope again.
    assert!(ph.node.install_units(&signed.bytes).unwrap());
    assert!(ph.node.scope_grew_for(&ph.peer.unit));
    assert!(!holds(&h.node, &report));
    sa.reoffer_from(&mut NodeReplica::new(&mut ph.node, ph.peer.clone()), 0)
        .unwrap();
    settle(&mut sa, &mut ph, &mut sb, &mut h);
    assert!(
        holds(&h.node, &report),
        "Halong lacks the moved commune's report"
    );
    assert!(!ph.node.scope_grew_for("qn/binhlieu"));
}

#[test]
fn a_moved_commune_updates_its_assignment_of_before_the_move_and_its_new_district_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = ("qn/binhlieu/tinhhuc", "qn/halong/tinhhuc");
    let (mut p, mut c) = pair(dir.path());
    let dispatch = dispatch_to(&mut p.node, old);
    sync_sides(&mut p, &mut c);
    let asg = c
        .node
        .assign_new(None, &dispatch, "minh", &[], "2026-12-31")
        .unwrap();
    assert_eq!(asg.unit, old);
    sync_sides(&mut p, &mut c);
    Node::init(&dir.path().join("h"), "qn/halong", Role::District, "an").unwrap();
    let mut h = Node::open(&dir.path().join("h")).unwrap();
    enrol(&p.node, &mut h, dir.path());
    let signed = p.node.units_move(old, "qn/halong").unwrap();
    let (mut ph, mut h) = meet(Node::open(&dir.path().join("p")).unwrap(), h);
    assert!(h.node.install_units(&signed.bytes).unwrap());
    sync_sides(&mut ph, &mut h);
    assert!(holds(&h.node, &asg.id));

    // At the commune, now the new path: the assignment still names the old one, and the
    // update is written under it, so the new district's judging of it agrees.
    assert!(c.node.install_units(&signed.bytes).unwrap());
    let done = c
        .node
        .assign_update(None, &asg.id, Status::Done, Some("xong"))
        .unwrap();
    assert_eq!(done.status, "done");
    let (mut hc, mut ch) = meet(h.node, c.node);
    hc.peer.unit = hc.node.tree.canonical(&hc.peer.unit).to_string();
    assert_eq!(hc.peer.unit, new);
    sync_sides(&mut hc, &mut ch);
    let (refused, _) = hc
        .node
        .store
        .refusals(&ch.node.node_id().to_string(), false, 10)
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(hc.node.assign_show(&asg.id).unwrap().status, "done");
}
