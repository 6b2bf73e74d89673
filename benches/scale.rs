//! A large province, generated through the real write path, and what it costs at its size:
//! build time, database bytes per document, `dispatch list --inbox` / `--unit`, `assign list
//! --overdue` / `--lead` (library and binary), the resident memory of a process serving them,
//! and (`--district-sync UNIT`) a district's first sync of its subtree from the province.
//!
//! `cargo bench --bench scale -- --docs 100000` (default 20,000; `--dir PATH` keeps the province
//! there, and a complete one found there is measured again without being rebuilt).
//! `--district-sync qn/halong [--link lan|weak4g]` measures, instead of the queries, a fresh
//! node of that district syncing from the province's real `serve` with the real `sync`, over
//! loopback and over linksim's weak 4G (both unless one `--link` is given). Prints Markdown
//! tables. docs/performance.md ("Province scale") has the figures and the 5M command.
//!
//! Every document is a real Automerge document made by the model's functions, with one change
//! per action by the acting unit's own node (receipts, comments, status changes, dossier
//! steps): each unit has a node key and a certificate of the province's CA, its node id is the
//! actor of its changes and its key signs them, and the province holds those certificates, so
//! any node of the province accepts the documents as it would the real ones. They are saved
//! through `WriteTx::save_doc_with` in batches, so their snapshots, signatures and index rows
//! are what a province that received them over sync would hold.

mod common;
use common::{
    doc_ids, enrol_with, load_average, machine, memory_kib, memory_mib, ms, ServeProcess,
};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Mutex;

use automerge::{ActorId, AutoCommit};
use communesync::model::assignment::{self, NewAssignment, Status};
use communesync::model::dispatch::{self, DispatchKind, NewDispatch, Priority};
use communesync::model::{dossier, Author, DocId, DocKind, DocView};
use communesync::node::{admin, Node, KEY_FILE};
use communesync::store::docs::SaveHints;
use communesync::store::index::DispatchFilter;
use communesync::store::sigs::ChangeSigRow;
use communesync::trust::{self, ChangeSigner, NodeKey};
use communesync::units::{Role, SAMPLE_TREE_TOML};
use linksim::{LinkProfile, LinkSim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

const BIN: &str = env!("CARGO_BIN_EXE_communesync");
/// Units of Quảng Ninh (issue 14); the sample tree lists communes for one district only, the
/// others get numbered communes until the tree has this many units.
const UNITS: usize = 609;
/// Documents per write transaction while building (speed only; not what is measured).
const BATCH: usize = 1_000;
/// Threads making and signing documents while one more stores them: the machine's two cores.
const WORKERS: usize = 2;
/// Documents planned or made ahead of the writer (enough to keep it busy).
const QUEUE: usize = 64;
/// The dispatches an assignment may pick from: the most recent ones, as offices assign the
/// week's mail.
const RECENT_DISPATCHES: usize = 2_000;
/// Runs of each query; the median is reported.
const QUERY_RUNS: usize = 9;
/// One year of documents, ending now.
const SPAN_MS: i64 = 365 * 24 * 3600 * 1000;
/// The bars of issue 14.
const QUERY_MS_MAX: f64 = 100.0;
const RSS_MB_MAX: f64 = 512.0;
/// A marker written once a province is complete, holding how long it took to build.
const DONE_FILE: &str = "scale-complete";

struct Opts {
    docs: usize,
    dir: Option<PathBuf>,
    /// A district whose first sync from the province is measured instead of the queries.
    district: Option<String>,
    links: Vec<Link>,
}

fn opts() -> Opts {
    let mut opts = Opts {
        docs: 20_000,
        dir: None,
        district: None,
        links: vec![],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--docs" => {
                opts.docs = args
                    .next()
                    .and_then(|n| n.replace('_', "").parse().ok())
                    .expect("--docs takes a number of documents")
            }
            "--dir" => opts.dir = Some(args.next().expect("--dir takes a directory").into()),
            "--district-sync" => {
                opts.district = Some(args.next().expect("--district-sync takes a district"))
            }
            "--link" => opts.links.push(match args.next().as_deref() {
                Some("lan") => Link::Lan,
                Some("weak4g") => Link::Weak4g,
                _ => panic!("--link takes lan or weak4g"),
            }),
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => panic!(
                "unknown argument {other}: use --docs N, --dir PATH, --district-sync UNIT, --link lan|weak4g"
            ),
        }
    }
    if opts.links.is_empty() {
        opts.links = vec![Link::Lan, Link::Weak4g];
    }
    opts
}

/// The sample tree plus numbered communes in the districts it lists none for, `UNITS` in all.
fn province_tree() -> String {
    let sample = communesync::units::UnitTree::parse(SAMPLE_TREE_TOML).expect("sample tree");
    let districts: Vec<String> = sample
        .iter()
        .filter(|u| u.role == Role::District && sample.children(&u.path).next().is_none())
        .map(|u| u.path.clone())
        .collect();
    let mut text = SAMPLE_TREE_TOML.to_string();
    let missing = UNITS - sample.iter().count();
    for k in 0..missing {
        let district = &districts[k % districts.len()];
        let n = k / districts.len() + 1;
        text.push_str(&format!(
            "\n[[unit]]\npath = \"{district}/xa{n:02}\"\nname = \"Xã {n} ({district})\"\nrole = \"commune\"\n"
        ));
    }
    text
}

/// The units, by level, and each district's communes.
struct Tree {
    province: String,
    districts: Vec<String>,
    communes: Vec<Vec<String>>,
    all: Vec<String>,
}

impl Tree {
    fn new(node: &Node) -> Tree {
        let province = node.unit().to_string();
        let districts: Vec<String> = node
            .tree
            .children(&province)
            .map(|u| u.path.clone())
            .collect();
        let communes: Vec<Vec<String>> = districts
            .iter()
            .map(|d| node.tree.children(d).map(|u| u.path.clone()).collect())
            .collect();
        let all = node.tree.iter().map(|u| u.path.clone()).collect();
        Tree {
            province,
            districts,
            communes,
            all,
        }
    }

    fn district_of(&self, commune: &str) -> &str {
        let (district, _) = commune.rsplit_once('/').expect("a commune has a district");
        self.districts
            .iter()
            .find(|d| d.as_str() == district)
            .expect("district")
    }

    fn any_commune(&self, rng: &mut StdRng) -> &str {
        let d = rng.random_range(0..self.districts.len());
        let list = &self.communes[d];
        &list[rng.random_range(0..list.len())]
    }
}

/// The node of each unit as the generator plays it: enrolled with the province's CA, its node
/// id as the actor of its changes, its key signing them, as if every change came from it.
struct UnitNode {
    actor: ActorId,
    node: String,
    signer: ChangeSigner,
}

/// Every unit's node, by unit and by actor.
struct UnitNodes {
    by_unit: HashMap<String, UnitNode>,
    unit_of_actor: HashMap<Vec<u8>, String>,
}

impl UnitNodes {
    /// The acting unit's actor and an officer of it.
    fn author(&self, unit: &str, rng: &mut StdRng) -> (ActorId, Author) {
        let node = &self.by_unit[unit];
        let author = Author {
            user: format!("canbo{}", rng.random_range(1..=4)),
            unit: unit.to_string(),
            node: node.node.clone(),
        };
        (node.actor.clone(), author)
    }

    /// Each change of `doc` signed by the node whose id is its actor, as that node's store
    /// would have signed it at write time.
    fn sign(&self, id: &DocId, doc: &mut AutoCommit) -> Vec<ChangeSigRow> {
        doc.get_changes_meta(&[])
            .into_iter()
            .map(|change| {
                let actor = change.actor.to_bytes().to_vec();
                let node = &self.by_unit[&self.unit_of_actor[&actor]];
                let sig = node
                    .signer
                    .sign(id.as_str(), &change.hash.0)
                    .expect("sign a change");
                ChangeSigRow {
                    hash: change.hash.0,
                    actor,
                    sig,
                }
            })
            .collect()
    }
}

/// Makes the province's CA (`ca init`) and one node per other unit, each with its own key and a
/// certificate of that CA (as `enrol request` + `ca issue` would), and stores those
/// certificates in the province's `node_certs`, where a node keeps its authors' certificates
/// and whence it sends them ahead of their changes. The province's own changes are its own
/// node's.
fn enrol_units(node: &mut Node) -> UnitNodes {
    node.ca_init().expect("ca init");
    let ca = trust::Ca::open(node.dir().join(admin::CA_DIR)).expect("the province's CA");
    let own = NodeKey::load(node.dir().join(KEY_FILE)).expect("the province's key");
    let mut keys = vec![(node.unit().to_string(), own)];
    let mut ders = Vec::new();
    for unit in node.tree.iter().filter(|u| u.path != node.unit()) {
        let key = NodeKey::generate().expect("a node key");
        let request = trust::enrol_request(&key).expect("an enrolment request");
        let issued = ca
            .issue(&request, &unit.path, unit.role, admin::CERT_VALIDITY_DAYS)
            .expect("ca issue");
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).expect("PEM");
        ders.push(der.to_vec());
        keys.push((unit.path.clone(), key));
    }
    let (learnt, _) = node
        .learn_certs(&ders)
        .expect("store the units' certificates");
    assert!(learnt.iter().all(|l| l.is_ok()), "a unit's certificate");
    let mut nodes = UnitNodes {
        by_unit: HashMap::new(),
        unit_of_actor: HashMap::new(),
    };
    for (unit, key) in keys {
        let id = key.node_id();
        nodes
            .unit_of_actor
            .insert(id.as_bytes().to_vec(), unit.clone());
        nodes.by_unit.insert(
            unit,
            UnitNode {
                actor: ActorId::from(id.as_bytes().to_vec()),
                node: id.to_string(),
                signer: ChangeSigner::new(&key).expect("a change signer"),
            },
        );
    }
    nodes
}

/// Who a dispatch from `issuer` goes to: mostly the next level up or down; a province or
/// district directive sometimes to a whole district or, rarely, to every unit.
fn recipients(tree: &Tree, issuer: &str, rng: &mut StdRng) -> Vec<String> {
    let depth = issuer.matches('/').count();
    let roll = rng.random_range(0..1000);
    let mut to: Vec<String> = match depth {
        0 if roll < 3 => tree.all.iter().filter(|u| *u != issuer).cloned().collect(),
        0 if roll < 150 => {
            let d = rng.random_range(0..tree.districts.len());
            let mut to = tree.communes[d].clone();
            to.push(tree.districts[d].clone());
            to
        }
        0 => (0..rng.random_range(1..=5))
            .map(|_| match rng.random_bool(0.5) {
                true => tree.districts[rng.random_range(0..tree.districts.len())].clone(),
                false => tree.any_commune(rng).to_string(),
            })
            .collect(),
        1 => {
            let d = tree.districts.iter().position(|d| d == issuer).expect("d");
            let communes = &tree.communes[d];
            if roll < 100 {
                communes.clone()
            } else if roll < 500 {
                vec![tree.province.clone()]
            } else {
                (0..rng.random_range(1..=3))
                    .map(|_| communes[rng.random_range(0..communes.len())].clone())
                    .collect()
            }
        }
        _ => {
            let mut to = vec![tree.district_of(issuer).to_string()];
            if roll < 200 {
                to.push(tree.province.clone());
            }
            to
        }
    };
    to.sort();
    to.dedup();
    to
}

/// One document to make, with what depends on the documents before it already chosen (its
/// id, the dispatch an assignment belongs to); `seed` draws the rest, so that whichever worker
/// makes it makes the same document.
struct Plan {
    id: DocId,
    i: usize,
    at: i64,
    seed: u64,
    what: Planned,
}

enum Planned {
    Dispatch {
        issuer: String,
        to: Vec<String>,
    },
    Assignment {
        dispatch_id: DocId,
        unit: String,
        age_days: i64,
    },
    Dossier {
        origin: String,
        district: String,
    },
}

/// The documents in time order over the last year: 45 % dispatches, 35 % assignments of a
/// recent dispatch to one of its recipients, 20 % dossiers.
fn plan(tree: &Tree, n: usize, out: SyncSender<Plan>) {
    let mut rng = StdRng::seed_from_u64(14);
    let now = communesync::node::now_ms();
    let start = now - SPAN_MS;
    let mut recent: Vec<(DocId, Vec<String>)> = Vec::new();
    for i in 0..n {
        let at = start + (i as i64) * SPAN_MS / n as i64;
        let kind = rng.random_range(0..100);
        let (id, what) = if kind < 45 || recent.is_empty() {
            let id = DocId::generate(DocKind::Dispatch);
            let issuer = match rng.random_range(0..10) {
                0 => tree.province.clone(),
                1..=3 => tree.districts[rng.random_range(0..tree.districts.len())].clone(),
                _ => tree.any_commune(&mut rng).to_string(),
            };
            let to = recipients(tree, &issuer, &mut rng);
            if recent.len() == RECENT_DISPATCHES {
                recent.swap_remove(rng.random_range(0..RECENT_DISPATCHES));
            }
            recent.push((id.clone(), to.clone()));
            (id, Planned::Dispatch { issuer, to })
        } else if kind < 80 {
            let (dispatch_id, to) = &recent[rng.random_range(0..recent.len())];
            let what = Planned::Assignment {
                dispatch_id: dispatch_id.clone(),
                unit: to[rng.random_range(0..to.len())].clone(),
                age_days: (now - at) / 86_400_000,
            };
            (DocId::generate(DocKind::Assignment), what)
        } else {
            let origin = tree.any_commune(&mut rng).to_string();
            let district = tree.district_of(&origin).to_string();
            (
                DocId::generate(DocKind::Dossier),
                Planned::Dossier { origin, district },
            )
        };
        let plan = Plan {
            id,
            i,
            at,
            seed: rng.random(),
            what,
        };
        if out.send(plan).is_err() {
            return;
        }
    }
}

/// A document made and signed, ready for the writer.
struct MadeDoc {
    id: DocId,
    at: i64,
    doc: AutoCommit,
    snapshot: Vec<u8>,
    view: DocView,
    sigs: Vec<ChangeSigRow>,
    /// Dispatch recipients (0 for other kinds).
    recipients: usize,
}

/// Makes the planned document with the model's functions, one change per action, each by the
/// acting unit's node, and signs every change with its author's key.
fn make(plan: Plan, nodes: &UnitNodes) -> MadeDoc {
    let Plan {
        id,
        i,
        at,
        seed,
        what,
    } = plan;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut recipients = 0;
    let doc = match &what {
        Planned::Dispatch { issuer, to } => {
            recipients = to.len();
            let new = NewDispatch {
                ref_no: format!("{}/UBND-VP", i + 1),
                summary: format!("Công văn số {} về kế hoạch phòng chống lụt bão", i + 1),
                kind: DispatchKind::Dispatch,
                priority: if rng.random_bool(0.1) {
                    Priority::Urgent
                } else {
                    Priority::Normal
                },
                issuer: issuer.clone(),
                to: to.clone(),
                attachments: vec![],
            };
            let (actor, author) = nodes.author(issuer, &mut rng);
            let mut doc = AutoCommit::new().with_actor(actor);
            dispatch::create(&mut doc, &id, &new, &author, at).expect("dispatch");
            // Most recipients confirm receipt, each from its own node.
            for unit in to {
                if rng.random_bool(0.85) {
                    let (actor, author) = nodes.author(unit, &mut rng);
                    doc.set_actor(actor);
                    let when = at + rng.random_range(60_000..86_400_000);
                    dispatch::receive(&mut doc, &id, unit, &author, when).expect("receipt");
                }
            }
            if rng.random_bool(0.1) {
                let unit = &to[rng.random_range(0..to.len())];
                let (actor, author) = nodes.author(unit, &mut rng);
                doc.set_actor(actor);
                let text = "Đã nhận, đang triển khai";
                dispatch::add_comment(&mut doc, &id, text, &author, at + 3_600_000)
                    .expect("comment");
            }
            doc
        }
        Planned::Assignment {
            dispatch_id,
            unit,
            age_days,
        } => {
            let (actor, author) = nodes.author(unit, &mut rng);
            let deadline = time::OffsetDateTime::from_unix_timestamp(
                (at / 1000) + rng.random_range(7..60) * 86_400,
            )
            .expect("deadline")
            .date();
            let new = NewAssignment {
                dispatch_id: dispatch_id.clone(),
                unit: unit.clone(),
                lead: format!("canbo{}", rng.random_range(1..=4)),
                co: vec![format!("canbo{}", rng.random_range(5..=6))],
                deadline,
            };
            // Older assignments have moved further: most of those past two months are done,
            // some were returned on the way.
            let steps: &[Status] = match (*age_days > 60, rng.random_range(0..10)) {
                (true, 0) => &[Status::InProgress],
                (true, 1) => &[
                    Status::InProgress,
                    Status::Returned,
                    Status::InProgress,
                    Status::Done,
                ],
                (true, _) => &[Status::InProgress, Status::Done],
                (false, 0..=3) => &[],
                (false, 4..=7) => &[Status::InProgress],
                (false, _) => &[Status::InProgress, Status::Done],
            };
            let mut doc = AutoCommit::new().with_actor(actor);
            assignment::create(&mut doc, &id, &new, &author, at).expect("assignment");
            for (k, status) in steps.iter().enumerate() {
                let when = at + (k as i64 + 1) * 2 * 86_400_000;
                assignment::update_status(&mut doc, &id, *status, None, &author, when)
                    .expect("status");
            }
            doc
        }
        Planned::Dossier { origin, district } => {
            let (actor, author) = nodes.author(origin, &mut rng);
            let steps = rng.random_range(0..=4);
            let mut doc = AutoCommit::new().with_actor(actor);
            dossier::create(
                &mut doc,
                &id,
                "Nguyễn Văn An",
                "Cấp giấy chứng nhận quyền sử dụng đất",
                &author,
                at,
            )
            .expect("dossier");
            // Checked at the commune, handed to the district, decided there, handed back for
            // the applicant to collect.
            let route = [
                ("checked", None, origin),
                ("to district", Some(district), origin),
                ("decided", None, district),
                ("returned to commune", Some(origin), district),
            ];
            for (k, (step, to, holder)) in route.iter().take(steps).enumerate() {
                let (actor, author) = nodes.author(holder, &mut rng);
                doc.set_actor(actor);
                let when = at + (k as i64 + 1) * 86_400_000;
                dossier::advance(&mut doc, &id, step, to.map(|s| s.as_str()), &author, when)
                    .expect("dossier step");
            }
            doc
        }
    };
    let mut doc = doc;
    let sigs = nodes.sign(&id, &mut doc);
    let snapshot = doc.save();
    let view = DocView::read(&doc, &id).expect("read the document");
    MadeDoc {
        id,
        at,
        doc,
        snapshot,
        view,
        sigs,
        recipients,
    }
}

/// Builds `n` documents (see [`plan`] and [`make`]): a planner thread draws them in order,
/// `WORKERS` threads make and sign them, and this thread stores them through
/// `WriteTx::save_doc_with` (the snapshot and fields the worker computed as hints, as a
/// document received whole is stored), `BATCH` per transaction.
fn build(node: &mut Node, nodes: &UnitNodes, n: usize) -> Made {
    let tree = Tree::new(node);
    let mut made = Made::default();
    let started = Instant::now();
    let (plans_tx, plans_rx) = sync_channel::<Plan>(QUEUE);
    let plans_rx = Mutex::new(plans_rx);
    let (made_tx, made_rx) = sync_channel::<MadeDoc>(QUEUE);
    std::thread::scope(|s| {
        let tree = &tree;
        s.spawn(move || plan(tree, n, plans_tx));
        for _ in 0..WORKERS {
            let (plans_rx, made_tx) = (&plans_rx, made_tx.clone());
            s.spawn(move || loop {
                let next = plans_rx.lock().expect("plans").recv();
                let Ok(plan) = next else { return };
                if made_tx.send(make(plan, nodes)).is_err() {
                    return;
                }
            });
        }
        drop(made_tx);
        let mut received = made_rx.iter();
        let mut done = 0;
        while done < n {
            // Stored as they come, so that only the channels' few documents wait in memory.
            let (take, before) = (BATCH.min(n - done), done);
            node.store
                .write(|tx| {
                    for m in received.by_ref().take(take) {
                        match m.view {
                            DocView::Dispatch(_) => made.dispatches += 1,
                            DocView::Assignment(_) => made.assignments += 1,
                            _ => made.dossiers += 1,
                        }
                        made.recipients += m.recipients;
                        made.changes += m.sigs.len();
                        tx.put_change_sigs(&m.id, &m.sigs)?;
                        let hints = SaveHints {
                            snapshot: Some(&m.snapshot),
                            view: Some(&m.view),
                            origin: None,
                        };
                        tx.save_doc_with(&m.id, None, m.doc, m.at, hints)?;
                        done += 1;
                    }
                    Ok(())
                })
                .expect("write a batch");
            assert_eq!(done - before, take, "a worker stopped");
            if done.is_multiple_of(20 * BATCH) || done == n {
                eprintln!(
                    "{done} documents in {:.0} s, {:.0} CPU s (load {})",
                    started.elapsed().as_secs_f64(),
                    own_cpu_s(),
                    load_average()
                );
            }
        }
    });
    made
}

/// What the build made, for the tables.
#[derive(Default)]
struct Made {
    dispatches: usize,
    assignments: usize,
    dossiers: usize,
    recipients: usize,
    changes: usize,
}

/// `node.db` once the WAL is folded in.
fn db_bytes(dir: &Path) -> u64 {
    let path = dir.join(communesync::node::DB_FILE);
    let conn = rusqlite::Connection::open(&path).expect("open node.db");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(conn);
    std::fs::metadata(&path).expect("node.db").len()
}

fn count(dir: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(communesync::node::DB_FILE)).expect("open");
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// CPU seconds this process has used (user and system): on a shared machine the wall time
/// of a build says more about the other processes than about this one.
fn own_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is handed.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// This process's peak resident set (VmHWM), in MiB.
fn own_peak_rss_mb() -> f64 {
    memory_mib(std::process::id(), "VmHWM").expect("/proc/self/status")
}

/// The queries measured, as the command line spells them and as the library calls them.
fn queries(node: &Node) -> Vec<(String, Vec<String>)> {
    // The busiest commune and district inboxes, and the lead with the most assignments.
    let busiest = |depth: usize| -> String {
        let conn =
            rusqlite::Connection::open(node.dir().join(communesync::node::DB_FILE)).expect("open");
        conn.query_row(
            "SELECT unit FROM dispatch_recipients WHERE length(unit) - length(replace(unit, '/', '')) = ?1
             GROUP BY unit ORDER BY count(*) DESC LIMIT 1",
            [depth as i64],
            |r| r.get(0),
        )
        .expect("busiest unit")
    };
    let commune = busiest(2);
    let district = busiest(1);
    [
        vec!["dispatch", "list", "--inbox"],
        vec!["dispatch", "list", "--unit", &district],
        vec!["dispatch", "list", "--unit", &commune],
        vec!["assign", "list", "--overdue"],
        vec!["assign", "list", "--lead", "canbo1"],
        vec!["assign", "list", "--overdue", "--lead", "canbo1"],
    ]
    .into_iter()
    .map(|args| {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        (args.join(" "), args)
    })
    .collect()
}

/// Runs one query through the library with the CLI's default limit; returns the rows.
fn run_library(node: &Node, args: &[String]) -> usize {
    const LIMIT: usize = 1000;
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].as_str())
    };
    match args[0].as_str() {
        "dispatch" => {
            let own = node.unit().to_string();
            let filter = match arg("--unit") {
                Some(unit) => DispatchFilter::Involving(unit),
                None => DispatchFilter::Inbox(&own),
            };
            node.dispatch_list(filter, LIMIT)
                .expect("dispatch list")
                .len()
        }
        _ => {
            let overdue = args.iter().any(|a| a == "--overdue");
            node.assign_list(overdue, arg("--lead"), LIMIT)
                .expect("assign list")
                .len()
        }
    }
}

/// The child process that serves the queries: opens the province, runs each query QUERY_RUNS
/// times through the library, prints "median-ms rows" per query and its own peak RSS.
fn serve_queries(dir: &Path) {
    let node = Node::open(dir).expect("open the province");
    for (_, args) in queries(&node) {
        let mut rows = 0;
        let times: Vec<f64> = (0..QUERY_RUNS)
            .map(|_| {
                let start = Instant::now();
                rows = run_library(&node, &args);
                ms(start.elapsed())
            })
            .collect();
        println!("{:.2} {rows}", median(times));
    }
    println!("{:.1}", own_peak_rss_mb());
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn main() {
    if let Some(dir) = std::env::var_os("SCALE_SERVE_QUERIES") {
        serve_queries(Path::new(&dir));
        return;
    }
    let opts = opts();
    println!("# Province scale: {} documents", opts.docs);
    println!(
        "\n{}, load average {} at the start",
        machine(),
        load_average()
    );
    let tmp = tempfile::Builder::new()
        .prefix("communesync-scale-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let dir = opts
        .dir
        .clone()
        .unwrap_or_else(|| tmp.path().join("province"));
    let done = dir.join(DONE_FILE);
    let (build_s, build_cpu_s, made) = if done.exists() {
        let text = std::fs::read_to_string(&done).expect("marker");
        println!(
            "\nprovince in {} already built: {}",
            dir.display(),
            text.trim()
        );
        let mut words = text.split_whitespace().filter_map(|s| s.parse().ok());
        let secs = words.next().unwrap_or(f64::NAN);
        (secs, words.next().unwrap_or(f64::NAN), None)
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        let units = tmp.path().join("units.toml");
        std::fs::write(&units, province_tree()).expect("units file");
        Node::init_with_tree(&dir, "qn", Role::Province, "admin", Some(&units)).expect("init");
        let mut node = Node::open(&dir).expect("open");
        let (started, cpu) = (Instant::now(), own_cpu_s());
        let nodes = enrol_units(&mut node);
        eprintln!(
            "{} unit nodes enrolled in {:.1} s, {:.1} CPU s",
            nodes.by_unit.len(),
            started.elapsed().as_secs_f64(),
            own_cpu_s() - cpu
        );
        let made = build(&mut node, &nodes, opts.docs);
        let secs = started.elapsed().as_secs_f64();
        let cpu = own_cpu_s() - cpu;
        drop(node);
        let note = format!(
            "{secs:.1} {cpu:.1} (s, CPU s) for {} documents\n",
            opts.docs
        );
        std::fs::write(&done, note).expect("marker");
        (secs, cpu, Some(made))
    };
    let bytes = db_bytes(&dir);
    let docs = count(&dir, "SELECT count(*) FROM docs");
    let recipients = count(&dir, "SELECT count(*) FROM dispatch_recipients");
    let changes_note = match &made {
        Some(m) => format!(
            "{} dispatches ({} recipient rows), {} assignments, {} dossiers, {} changes; generator peak RSS {:.0} MiB",
            m.dispatches, m.recipients, m.assignments, m.dossiers, m.changes, own_peak_rss_mb()
        ),
        None => format!("{recipients} recipient rows"),
    };
    println!("\n| build | figure |\n| --- | --- |");
    println!("| documents | {docs} |");
    println!("| made | {changes_note} |");
    println!("| build time | {build_s:.1} s ({build_cpu_s:.1} CPU s) |");
    println!(
        "| build time per document | {:.2} ms ({:.2} CPU ms) |",
        build_s * 1000.0 / docs as f64,
        build_cpu_s * 1000.0 / docs as f64
    );
    println!("| `node.db` | {bytes} bytes |");
    println!("| bytes per document | {} |", bytes / docs.max(1) as u64);
    if let Some(unit) = &opts.district {
        district_sync(&dir, unit, &opts.links, tmp.path());
        return;
    }

    // The library figures and the RSS come from a fresh process that only opens the province
    // and serves the queries, as `serve` or a command would.
    let out = Command::new(std::env::current_exe().expect("own path"))
        .env("SCALE_SERVE_QUERIES", &dir)
        .stderr(Stdio::inherit())
        .output()
        .expect("query process");
    assert!(out.status.success(), "query process failed");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = text.lines();
    let node = Node::open(&dir).expect("open");
    println!(
        "\n| query (limit 1000, the default) | rows | library ms (median of {QUERY_RUNS}) | binary ms (median of {QUERY_RUNS}, process start included) | bar ≤ {QUERY_MS_MAX} ms |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for (name, args) in queries(&node) {
        let line = lines.next().expect("a line per query");
        let (lib_ms, rows) = line.split_once(' ').expect("ms rows");
        let lib_ms: f64 = lib_ms.parse().expect("ms");
        let binary = median(
            (0..QUERY_RUNS)
                .map(|_| {
                    let start = Instant::now();
                    let status = Command::new(BIN)
                        .arg("--data")
                        .arg(&dir)
                        .args(&args)
                        .stdout(Stdio::null())
                        .status()
                        .expect("run communesync");
                    assert!(status.success(), "communesync {name} failed");
                    ms(start.elapsed())
                })
                .collect(),
        );
        println!(
            "| `{name}` | {rows} | {lib_ms:.1} | {binary:.1} | {} |",
            met(lib_ms <= QUERY_MS_MAX && binary <= QUERY_MS_MAX)
        );
    }
    let rss: f64 = lines
        .next()
        .and_then(|l| l.parse().ok())
        .expect("peak RSS line");
    println!(
        "\nPeak RSS of the process serving the queries: {rss:.0} MiB (bar ≤ {RSS_MB_MAX} MiB: {}).",
        met(rss <= RSS_MB_MAX)
    );
    println!("Load average {} at the end.", load_average());
}

// ---------------------------------------------------------------------------------------------
// A district's first sync of its subtree (issue 14 item 3)

/// Sessions a first sync may take before the bench gives up (each ends with exit 6 while
/// something is still pending, and the next picks up where it stopped).
const SYNC_ROUNDS_MAX: usize = 20;
/// Exit code of `sync` when it ran to its end with something still pending (cli::exit).
const EXIT_PENDING: i32 = 6;

/// The link between the district and the province.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Link {
    /// Straight over loopback: a LAN, no shaping (the path MTU seeded at 1,500 as on Ethernet).
    Lan,
    /// Through the link simulator's weak-4G preset both ways (1 Mbit/s, 200 ms RTT, 2 % loss).
    Weak4g,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Lan => "LAN (loopback)",
            Link::Weak4g => "weak 4G (linksim)",
        }
    }
}

/// How often the peak RSS of a running child is read.
const RSS_SAMPLE: Duration = Duration::from_millis(10);

/// A child process run to its end.
struct Measured {
    code: i32,
    stdout: String,
    stderr: String,
    wall: Duration,
    /// Its peak resident set (VmHWM), read from /proc while it ran: `wait4`'s `ru_maxrss` would
    /// count this bench's own peak, which the child held between fork and exec.
    peak_rss_mib: f64,
}

fn run_measured(mut cmd: Command) -> Measured {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let pid = child.id();
    // Until it is reaped below, its pid cannot be reused; a zombie's status has no VmHWM.
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while let Some(kib) = memory_kib(pid, "VmHWM") {
            peak = peak.max(kib);
            std::thread::sleep(RSS_SAMPLE);
        }
        peak
    });
    let status = child.wait().expect("wait for the child");
    Measured {
        code: status.code().unwrap_or(-1),
        stdout: out.join().expect("stdout"),
        stderr: err.join().expect("stderr"),
        wall: started.elapsed(),
        peak_rss_mib: sampler.join().expect("sampler") as f64 / 1024.0,
    }
}

/// What one first sync measured.
#[derive(Default)]
struct FirstSync {
    sessions: usize,
    docs_received: u64,
    wall: Duration,
    /// UDP bytes as the district's connections counted them (session reports).
    udp_up: u64,
    udp_down: u64,
    /// UDP bytes the link simulator forwarded, when there was one.
    link_up: Option<u64>,
    link_down: Option<u64>,
    district_rss_mib: f64,
    province_rss_start_mib: f64,
    province_rss_peak_mib: f64,
    held: Vec<String>,
}

/// The documents of the province in `unit`'s subtree (what it offers that unit's node), sorted,
/// with their changes and the summed size of Automerge's `save()` of each.
fn subtree(province: &Path, unit: &str) -> (Vec<String>, i64, u64) {
    let conn = rusqlite::Connection::open(province.join(communesync::node::DB_FILE)).expect("open");
    let mut stmt = conn
        .prepare("SELECT DISTINCT doc_id FROM doc_scopes WHERE unit = ?1 ORDER BY doc_id")
        .expect("sql");
    let ids = stmt
        .query_map([unit], |r| r.get(0))
        .expect("query")
        .collect::<rusqlite::Result<Vec<String>>>()
        .expect("ids");
    let changes: i64 = conn
        .query_row(
            "SELECT count(*) FROM change_sigs WHERE doc IN (SELECT doc_id FROM doc_scopes WHERE unit = ?1)",
            [unit],
            |r| r.get(0),
        )
        .expect("changes");
    let mut snapshot = conn
        .prepare("SELECT snapshot FROM docs WHERE id = ?1")
        .expect("sql");
    let mut chunks = conn
        .prepare("SELECT data FROM doc_chunks WHERE doc_id = ?1 ORDER BY n")
        .expect("sql");
    let mut save_bytes = 0;
    for id in &ids {
        let mut bytes: Vec<u8> = snapshot.query_row([id], |r| r.get(0)).expect("snapshot");
        for chunk in chunks
            .query_map([id], |r| r.get::<_, Vec<u8>>(0))
            .expect("chunks")
        {
            bytes.extend(chunk.expect("chunk"));
        }
        let mut doc = AutoCommit::load(&bytes).expect("load a document");
        save_bytes += doc.save().len() as u64;
    }
    (ids, changes, save_bytes)
}

/// A fresh node of district `unit`, enrolled by the province, syncs from the province's real
/// `serve` with the real `communesync sync` (sessions repeated until one converges) over `link`.
fn first_sync(
    province: &Path,
    unit: &str,
    link: Link,
    scratch: &Path,
    rt: &tokio::runtime::Runtime,
) -> FirstSync {
    let dir = scratch.join(format!("district-{link:?}"));
    let _ = std::fs::remove_dir_all(&dir);
    let units = province.join(communesync::node::UNITS_FILE);
    Node::init_with_tree(&dir, unit, Role::District, "admin", Some(&units)).expect("init");
    let mut district = Node::open(&dir).expect("open the district");
    // Both ends know the path's MTU (1,500 on Ethernet and on the simulated 4G link), as after
    // any connection but the first of the day (see benches/sync.rs: a first-of-day search over
    // loopback would probe up to the 6,500 bytes its route allows).
    let mtu = (linksim::FIELD_MTU - linksim::UDP_IPV4_HEADERS) as u16;
    {
        let mut p = Node::open(province).expect("open the province");
        enrol_with(&p, &mut district, scratch);
        for node in [&mut p, &mut district] {
            node.store
                .write(|tx| tx.set_path_mtu("127.0.0.1", mtu, communesync::node::now_ms()))
                .expect("seed the path MTU");
        }
    }
    let serve = ServeProcess::start(province);
    let mut run = FirstSync {
        province_rss_start_mib: memory_mib(serve.child.id(), "VmRSS").unwrap_or(f64::NAN),
        ..FirstSync::default()
    };
    let sim = match link {
        Link::Lan => None,
        Link::Weak4g => Some(
            rt.block_on(LinkSim::start(
                "127.0.0.1:0".parse().expect("addr"),
                serve.addr,
                LinkProfile::weak_4g(),
                LinkProfile::weak_4g(),
                14,
                vec![],
            ))
            .expect("linksim"),
        ),
    };
    let addr = sim.as_ref().map_or(serve.addr, |s| s.local_addr());
    district
        .peer_add("up", &addr.to_string(), true)
        .expect("peer add");
    drop(district);
    loop {
        let mut cmd = Command::new(BIN);
        cmd.arg("--json").arg("--data").arg(&dir).arg("sync");
        let m = run_measured(cmd);
        run.sessions += 1;
        run.wall += m.wall;
        run.district_rss_mib = run.district_rss_mib.max(m.peak_rss_mib);
        assert!(
            m.code == 0 || m.code == EXIT_PENDING,
            "communesync sync exited {}: {}",
            m.code,
            m.stderr
        );
        let report: serde_json::Value = serde_json::from_str(&m.stdout).expect("sync --json");
        let field = |name: &str| report[name].as_u64().unwrap_or(0);
        run.docs_received += field("docs_received");
        run.udp_up += field("bytes_sent");
        run.udp_down += field("bytes_received");
        let refused = report["docs_refused"].as_array().map_or(0, |r| r.len());
        assert_eq!(refused, 0, "the district refused documents: {report}");
        if m.code == 0 {
            break;
        }
        assert!(
            run.sessions < SYNC_ROUNDS_MAX,
            "not converged after {SYNC_ROUNDS_MAX} sessions: {report}"
        );
    }
    run.province_rss_peak_mib = memory_mib(serve.child.id(), "VmHWM").unwrap_or(f64::NAN);
    if let Some(sim) = sim {
        let stats = sim.stats();
        run.link_up = Some(stats.up.forwarded_bytes);
        run.link_down = Some(stats.down.forwarded_bytes);
        rt.block_on(sim.shutdown());
    }
    serve.stop();
    run.held = doc_ids(&dir);
    run
}

/// Issue 14 item 3: the district's first sync of its subtree over each link, against what the
/// province holds for it and the size of its documents' `save()`.
fn district_sync(province: &Path, unit: &str, links: &[Link], scratch: &Path) {
    let role = Node::open(province)
        .expect("open the province")
        .tree
        .get(unit)
        .map(|u| u.role)
        .expect("a unit of the province's tree");
    assert_eq!(role, Role::District, "{unit} is not a district");
    let (ids, changes, save_bytes) = subtree(province, unit);
    println!(
        "\n## First sync of district {unit}: {} documents in its subtree, {changes} changes (one 64-byte signature each), `save()` of each summed: {save_bytes} bytes\n",
        ids.len()
    );
    println!("| link | sessions | documents received / held / in the subtree | wall time (process start to exit) | UDP bytes district → province / province → district | on the wire / `save()` | district peak RSS | province RSS at start / peak |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    for &link in links {
        let run = first_sync(province, unit, link, scratch, &rt);
        assert_eq!(
            run.held, ids,
            "the district holds other documents than the province's subtree"
        );
        let (up, down) = match (run.link_up, run.link_down) {
            (Some(up), Some(down)) => (up, down),
            _ => (run.udp_up, run.udp_down),
        };
        println!(
            "| {} | {} | {} / {} / {} | {:.1} s | {up} / {down} | {:.2} | {:.0} MiB | {:.0} / {:.0} MiB |",
            link.name(),
            run.sessions,
            run.docs_received,
            run.held.len(),
            ids.len(),
            run.wall.as_secs_f64(),
            (up + down) as f64 / save_bytes as f64,
            run.district_rss_mib,
            run.province_rss_start_mib,
            run.province_rss_peak_mib,
        );
    }
    println!("Load average {} at the end.", load_average());
}
