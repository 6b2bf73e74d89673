//! End-to-end tests of the unit tree over simulated links: every node converging to exactly its
//! scope through partitions, a relay killed mid-transfer, a flash dispatch overtaking a bulk scan,
//! and bundles carried by hand. Every node is the real binary; every link is real QUIC on
//! loopback through a LinkSim proxy where the link matters.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use communesync::store::blobs::CHUNK_BYTES;
use linksim::LinkSim;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::runtime::Runtime;

use crate::util::{
    attachment_hash, blob_rows, chunks_stored, db_read_only, enrolled, held_docs, holds_doc, id,
    incompressible, link, ms, now_ms, path_arg, province, quick_recovery, relink, runtime, scan,
    scans_missing, synced, tree_node, units_version, wait_until, Server, TestNode, COMMUNE,
    DISTRICT, DISTRICTS, SIBLING,
};

/// Push interval of every node in these tests: short, so a hop costs well under a second.
const PUSH_INTERVAL_MS: u64 = 200;

/// Whether `unit` is `ancestor` or below it (written here, not borrowed from the product, so the
/// expected scope does not share a bug with the code under test).
fn within(unit: &str, ancestor: &str) -> bool {
    unit == ancestor
        || unit
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether the node of `unit` must hold a document with these parties: the province holds all,
/// others the documents with a party in their subtree.
fn in_scope(unit: &str, parties: &[String]) -> bool {
    unit == "qn" || parties.iter().any(|p| within(p, unit))
}

// ---- 1. convergence of the whole tree under partitions ----

/// One node of the running tree.
struct Member {
    unit: String,
    node: TestNode,
    /// The proxy in front of this node's upstream (None for the province).
    uplink: Option<LinkSim>,
    server: Option<Server>,
}

/// A document the test created, with what decides where it belongs.
struct Created {
    parties: Vec<String>,
    /// For an assignment: its dispatch.
    dispatch: Option<String>,
    /// Recipients of a dispatch (those who may record receipt).
    recipients: Vec<String>,
    scans: usize,
}

/// Each node's upstream link: a little delay, jitter and loss, as a rural line would have.
const TREE_LINK: &str = "rate=20mbit,delay=10ms,jitter=3ms,loss=0.5%";
/// How long the random workload runs.
const WORKLOAD: Duration = Duration::from_secs(22);
/// How long the healed tree may take to settle.
const SETTLE_MAX: Duration = Duration::from_secs(40);

/// The province, both districts and their communes, each serving, each upstream link proxied.
fn start_tree(rt: &Runtime, seed: u64) -> Vec<Member> {
    let province = tree_node(None, "qn", "province");
    quick_recovery(&province, PUSH_INTERVAL_MS);
    let province_server = Server::start(&province);
    let mut members = Vec::new();
    for (i, (district, communes)) in DISTRICTS.iter().enumerate() {
        let node = tree_node(Some(&province), district, "district");
        quick_recovery(&node, PUSH_INTERVAL_MS);
        let uplink = link(rt, province_server.addr(), TREE_LINK, seed ^ (i as u64 + 1));
        let addr = uplink.local_addr().to_string();
        node.ok(&["peer", "add", "up", "--addr", &addr, "--upstream"]);
        let server = Server::start(&node);
        let district_addr = server.addr().to_string();
        members.push(Member {
            unit: district.to_string(),
            node,
            uplink: Some(uplink),
            server: Some(server),
        });
        for (j, commune) in communes.iter().enumerate() {
            let node = tree_node(Some(&province), commune, "commune");
            quick_recovery(&node, PUSH_INTERVAL_MS);
            let uplink = link(
                rt,
                &district_addr,
                TREE_LINK,
                seed ^ (10 * i + j + 10) as u64,
            );
            let addr = uplink.local_addr().to_string();
            node.ok(&["peer", "add", "up", "--addr", &addr, "--upstream"]);
            let server = Server::start(&node);
            members.push(Member {
                unit: commune.to_string(),
                node,
                uplink: Some(uplink),
                server: Some(server),
            });
        }
    }
    members.insert(
        0,
        Member {
            unit: "qn".into(),
            node: province,
            uplink: None,
            server: Some(province_server),
        },
    );
    members
}

/// The district of a commune (its parent path).
fn district_of(commune: &str) -> &str {
    commune.rsplit_once('/').expect("a commune path").0
}

fn ids_with_prefix(node: &TestNode, prefix: &str) -> Vec<String> {
    held_docs(node)
        .into_keys()
        .filter(|id| id.starts_with(prefix))
        .collect()
}

/// Everything that is not yet as it must end: documents missing or out of scope, replicas that
/// differ, scans missing. Empty when the tree has converged.
fn divergence(members: &[Member], created: &BTreeMap<String, Created>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut replicas: BTreeMap<String, Vec<(&str, Vec<u8>)>> = BTreeMap::new();
    for m in members {
        let held = held_docs(&m.node);
        let expected: BTreeSet<&String> = created
            .iter()
            .filter(|(_, c)| in_scope(&m.unit, &c.parties))
            .map(|(id, _)| id)
            .collect();
        let got: BTreeSet<&String> = held.keys().collect();
        let missing: Vec<_> = expected.difference(&got).collect();
        let extra: Vec<_> = got.difference(&expected).collect();
        if !missing.is_empty() {
            problems.push(format!("{} lacks {missing:?}", m.unit));
        }
        if !extra.is_empty() {
            problems.push(format!("{} holds out of its scope {extra:?}", m.unit));
        }
        let scans = scans_missing(&m.node);
        if scans > 0 {
            problems.push(format!("{} misses {scans} scans", m.unit));
        }
        for (id, heads) in held {
            replicas.entry(id).or_default().push((&m.unit, heads));
        }
    }
    for (id, copies) in replicas {
        if copies.iter().any(|(_, h)| *h != copies[0].1) {
            let units: Vec<_> = copies.iter().map(|(u, h)| (u, h.len() / 32)).collect();
            problems.push(format!(
                "replicas of {id} differ (unit, head count): {units:?}"
            ));
        }
    }
    problems
}

/// The random workload: dispatches along every kind of edge, assignments, status updates,
/// comments and receipts, while links go down and come back.
struct Workload {
    rng: StdRng,
    created: BTreeMap<String, Created>,
    received: BTreeSet<(String, String)>,
    events: Vec<String>,
    step: usize,
}

impl Workload {
    fn member<'a>(&self, members: &'a [Member], unit: &str) -> &'a Member {
        members
            .iter()
            .find(|m| m.unit == unit)
            .unwrap_or_else(|| panic!("no member {unit}"))
    }

    /// A small scan beside the issuing node: incompressible (a JPEG) or a greyscale PGM.
    fn maybe_scan(&mut self, node: &TestNode) -> Option<String> {
        if !self.rng.random_bool(0.35) {
            return None;
        }
        let bytes = self.rng.random_range(8_000..96_000);
        let (name, data) = if self.rng.random_bool(0.5) {
            let data = incompressible(bytes, &mut self.rng);
            (format!("scan-{}.jpg", self.step), data)
        } else {
            (
                format!("scan-{}.pgm", self.step),
                scan(bytes, self.rng.random()),
            )
        };
        Some(node.write_file(&name, &data))
    }

    fn new_dispatch(&mut self, members: &[Member]) {
        let communes: Vec<&str> = DISTRICTS
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .collect();
        let commune = *communes.choose(&mut self.rng).expect("communes");
        let (issuer, to): (&str, Vec<&str>) = match self.rng.random_range(0..6) {
            0 | 1 => {
                let n = self.rng.random_range(1..=3);
                let to = communes
                    .choose_multiple(&mut self.rng, n)
                    .copied()
                    .collect();
                ("qn", to)
            }
            2 => (commune, vec![district_of(commune)]),
            3 => {
                let (_, siblings) = DISTRICTS
                    .iter()
                    .find(|(d, _)| *d == district_of(commune))
                    .expect("a district");
                let others: Vec<&str> =
                    siblings.iter().copied().filter(|c| *c != commune).collect();
                (
                    commune,
                    vec![*others.choose(&mut self.rng).expect("siblings")],
                )
            }
            4 => (district_of(commune), vec!["qn"]),
            _ => (district_of(commune), vec![commune]),
        };
        self.issue(members, issuer, &to);
    }

    fn issue(&mut self, members: &[Member], issuer: &str, to: &[&str]) {
        let node = &self.member(members, issuer).node;
        let attach = self.maybe_scan(node);
        let ref_no = format!("{}/TEST", self.step);
        let attach: Vec<&str> = attach.iter().map(String::as_str).collect();
        let d = id(&node.new_dispatch(&ref_no, to, &attach));
        self.events.push(format!(
            "{issuer} issues {d} to {to:?} ({} scans)",
            attach.len()
        ));
        let recipients: Vec<String> = to.iter().map(|s| s.to_string()).collect();
        let mut parties = recipients.clone();
        parties.push(issuer.to_string());
        self.created.insert(
            d,
            Created {
                parties,
                dispatch: None,
                recipients,
                scans: attach.len(),
            },
        );
    }

    /// A commune assigns one of the dispatches it holds (issued there or arrived).
    fn new_assignment(&mut self, members: &[Member]) {
        let m = members[1..]
            .iter()
            .filter(|m| m.unit.matches('/').count() == 2)
            .collect::<Vec<_>>()
            .choose(&mut self.rng)
            .copied()
            .expect("communes");
        let held = ids_with_prefix(&m.node, "dsp_");
        let Some(d) = held.choose(&mut self.rng) else {
            return;
        };
        let deadline = format!("2030-{:02}-15", self.rng.random_range(1..=12));
        let a = id(&m.node.json(&[
            "assign",
            "new",
            d,
            "--lead",
            "admin",
            "--deadline",
            &deadline,
        ]));
        self.events.push(format!("{} assigns {d} as {a}", m.unit));
        self.created.insert(
            a,
            Created {
                parties: vec![m.unit.clone()],
                dispatch: Some(d.clone()),
                recipients: Vec::new(),
                scans: 0,
            },
        );
    }

    /// The unit of an assignment moves its status (only it may, docs/security.md); with links
    /// cut, its edits still pile up beside the ones in flight.
    fn update_assignment(&mut self, members: &[Member]) {
        let m = members.choose(&mut self.rng).expect("members");
        let held: Vec<String> = ids_with_prefix(&m.node, "asg_")
            .into_iter()
            .filter(|a| {
                self.created
                    .get(a)
                    .is_some_and(|c| c.parties == [m.unit.clone()])
            })
            .collect();
        let Some(a) = held.choose(&mut self.rng) else {
            return;
        };
        let status = *["in-progress", "done", "returned"]
            .choose(&mut self.rng)
            .expect("statuses");
        let note = format!("step {} at {}", self.step, m.unit);
        m.node
            .json(&["assign", "update", a, "--status", status, "--note", &note]);
        self.events.push(format!("{} sets {a} to {status}", m.unit));
    }

    /// A comment by any holder, or a receipt by a recipient that holds the dispatch.
    fn comment_or_receive(&mut self, members: &[Member]) {
        let m = members.choose(&mut self.rng).expect("members");
        let held = ids_with_prefix(&m.node, "dsp_");
        let Some(d) = held.choose(&mut self.rng).cloned() else {
            return;
        };
        let recipient = self.created[&d].recipients.contains(&m.unit);
        if recipient && self.received.insert((d.clone(), m.unit.clone())) {
            let receipt = m.node.json(&["dispatch", "receive", &d]);
            self.events.push(format!("{} receives {d}", m.unit));
            // The receipt is in the unit's receipt book for the issuer (the last party).
            let book = receipt["book"]
                .as_str()
                .expect("a receipt book")
                .to_string();
            let issuer = self.created[&d].parties.last().cloned().expect("an issuer");
            self.created.entry(book).or_insert(Created {
                parties: vec![issuer, m.unit.clone()],
                dispatch: None,
                recipients: Vec::new(),
                scans: 0,
            });
        } else {
            let text = format!("ý kiến {} của {}", self.step, m.unit);
            m.node.json(&["dispatch", "comment", &d, &text]);
            self.events.push(format!("{} comments on {d}", m.unit));
        }
    }

    /// Ends the workload with a partition that certainly matters: a district cut off from the
    /// province while each side writes to the other.
    fn final_partition(&mut self, members: &[Member]) {
        let (district, communes) = *DISTRICTS.choose(&mut self.rng).expect("districts");
        let commune = *communes.choose(&mut self.rng).expect("communes");
        let uplink = self.member(members, district).uplink.as_ref();
        uplink.expect("an upstream link").handle().set_up(false);
        self.events.push(format!("link {district} ↔ upstream cut"));
        self.step += 1;
        self.issue(members, "qn", &[commune]);
        self.step += 1;
        self.issue(members, commune, &["qn"]);
    }

    fn flip_link(&mut self, members: &[Member]) {
        let m = members[1..].choose(&mut self.rng).expect("members");
        let handle = m.uplink.as_ref().expect("an upstream link").handle();
        let up = !handle.is_up();
        handle.set_up(up);
        self.events.push(format!(
            "link {} ↔ upstream {}",
            m.unit,
            if up { "up" } else { "cut" }
        ));
    }
}

#[test]
fn a_partitioned_tree_converges_to_each_nodes_exact_scope() {
    let seed: u64 = std::env::var("TREE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("tree convergence seed: {seed} (rerun with TREE_SEED={seed})");
    let rt = runtime();
    let members = start_tree(&rt, seed);
    let mut work = Workload {
        rng: StdRng::seed_from_u64(seed),
        created: BTreeMap::new(),
        received: BTreeSet::new(),
        events: Vec::new(),
        step: 0,
    };

    let started = Instant::now();
    while started.elapsed() < WORKLOAD {
        work.step += 1;
        match work.rng.random_range(0..100) {
            0..30 => work.new_dispatch(&members),
            30..42 => work.new_assignment(&members),
            42..52 => work.update_assignment(&members),
            52..64 => work.comment_or_receive(&members),
            _ => work.flip_link(&members),
        }
        let pause = work.rng.random_range(20..300);
        std::thread::sleep(Duration::from_millis(pause));
    }
    work.final_partition(&members);
    std::thread::sleep(Duration::from_secs(1));
    let cuts = work.events.iter().filter(|e| e.ends_with("cut")).count();
    let apart = divergence(&members, &work.created);
    assert!(
        apart.iter().any(|p| p.starts_with("qn lacks")),
        "seed {seed}: the final partition did not keep the province behind: {apart:?}"
    );
    for m in &members[1..] {
        m.uplink
            .as_ref()
            .expect("an upstream link")
            .handle()
            .set_up(true);
    }
    let healed = Instant::now();
    let mut last = Vec::new();
    let settled = wait_until(SETTLE_MAX, || {
        last = divergence(&members, &work.created);
        last.is_empty()
    });
    let history = work.events.join("\n");
    let warnings: Vec<String> = members
        .iter()
        .filter_map(|m| m.server.as_ref())
        .flat_map(|s| {
            s.log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        settled.is_some(),
        "seed {seed}: not converged {} s after healing:\n{}\n\nevents:\n{history}\n\ndaemon warnings:\n{}",
        SETTLE_MAX.as_secs(),
        last.join("\n"),
        warnings.join("\n")
    );
    eprintln!(
        "seed {seed}: {} documents, {} events ({cuts} cuts), {} differences at healing, \
         converged {} ms after healing",
        work.created.len(),
        work.events.len(),
        apart.len(),
        ms(healed.elapsed())
    );

    // What users see, through the CLI: each node lists exactly its scope, every replica shows
    // the same document, every scan is present.
    let dispatches: BTreeSet<&String> = work
        .created
        .iter()
        .filter(|(id, c)| c.dispatch.is_none() && id.starts_with("dsp_"))
        .map(|(id, _)| id)
        .collect();
    for m in &members {
        let expected = |dispatch: bool| -> BTreeSet<String> {
            work.created
                .iter()
                .filter(|(id, c)| {
                    !id.starts_with("rcp_")
                        && c.dispatch.is_none() == dispatch
                        && in_scope(&m.unit, &c.parties)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let listed = |args: &[&str]| -> BTreeSet<String> {
            m.node
                .json(args)
                .as_array()
                .unwrap_or_else(|| panic!("{args:?} is not a list"))
                .iter()
                .map(id)
                .collect()
        };
        assert_eq!(
            listed(&["dispatch", "list"]),
            expected(true),
            "seed {seed}: dispatches listed at {}",
            m.unit
        );
        assert_eq!(
            listed(&["assign", "list"]),
            expected(false),
            "seed {seed}: assignments listed at {}",
            m.unit
        );
        let status = m.node.json(&["status"]);
        assert_eq!(
            status["scans_missing"], 0,
            "seed {seed}: {}: {status}",
            m.unit
        );
    }
    // Receipt books are checked as documents by `divergence`; their receipts in `dispatch show`.
    for (doc, c) in work
        .created
        .iter()
        .filter(|(id, _)| !id.starts_with("rcp_"))
    {
        let kind = if dispatches.contains(doc) {
            "dispatch"
        } else {
            "assign"
        };
        let mut first: Option<(String, Value)> = None;
        for m in members.iter().filter(|m| in_scope(&m.unit, &c.parties)) {
            let mut shown = m.node.json(&[kind, "show", doc]);
            if kind == "dispatch" {
                assert_eq!(
                    shown["missing_scans"],
                    serde_json::json!([]),
                    "seed {seed}: {doc} at {}",
                    m.unit
                );
                assert_eq!(shown["attachments"].as_array().map(Vec::len), Some(c.scans));
                // The assignments listed are those this node holds: they differ by design.
                let listed: BTreeSet<String> =
                    serde_json::from_value(shown["assignments"].take()).expect("assignment ids");
                let expected: BTreeSet<String> = work
                    .created
                    .iter()
                    .filter(|(_, a)| {
                        a.dispatch.as_ref() == Some(doc) && in_scope(&m.unit, &a.parties)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                assert_eq!(
                    listed, expected,
                    "seed {seed}: assignments of {doc} at {}",
                    m.unit
                );
                // A receipt shows where its book goes: its recipient, the issuer (the last
                // party), and the units above them; the rest of the dispatch is the same
                // everywhere.
                let issuer = c.parties.last().expect("an issuer");
                for r in shown["recipients"].as_array_mut().expect("recipients") {
                    let unit = r["unit"].as_str().expect("a unit").to_string();
                    let seen = work.received.contains(&(doc.clone(), unit.clone()))
                        && in_scope(&m.unit, &[issuer.clone(), unit.clone()]);
                    assert_eq!(
                        !r["received_at_ms"].is_null(),
                        seen,
                        "seed {seed}: receipt of {doc} by {unit} at {}",
                        m.unit
                    );
                    r["received_at_ms"].take();
                    r["received_by"].take();
                }
            }
            match &first {
                None => first = Some((m.unit.clone(), shown)),
                Some((unit, seen)) => assert_eq!(
                    &shown, seen,
                    "seed {seed}: {doc} differs between {unit} and {}",
                    m.unit
                ),
            }
        }
    }
    for m in members {
        if let Some(server) = m.server {
            // Honest nodes never have a document refused; a refusal means a scope or
            // authorship check and the relaying disagree.
            let log = server.finish();
            let refused: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("refused") && !l.contains("refused a connection"))
                .collect();
            assert!(
                refused.is_empty(),
                "seed {seed}: {} logged refusals:\n{}",
                m.unit,
                refused.join("\n")
            );
        }
    }
}

// ---- 2. a relay killed mid-transfer ----

#[test]
fn a_relay_killed_mid_scan_resumes_and_stores_everything_once() {
    const SCAN_BYTES: usize = 8 << 20;
    let chunks_total = SCAN_BYTES.div_ceil(CHUNK_BYTES) as i64;
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(2);
    let province = province();
    quick_recovery(&province, PUSH_INTERVAL_MS);
    let province_server = Server::start(&province);
    let district = enrolled(&province, DISTRICT, "district");
    quick_recovery(&district, PUSH_INTERVAL_MS);
    // 20 Mbit/s: the scan takes a few seconds to reach the relay, time enough to kill it.
    let uplink = link(&rt, province_server.addr(), "rate=20mbit,delay=5ms", 2);
    district.ok(&[
        "peer",
        "add",
        "up",
        "--addr",
        &uplink.local_addr().to_string(),
        "--upstream",
    ]);
    let district_server = Server::start(&district);
    let commune = enrolled(&province, COMMUNE, "commune");
    quick_recovery(&commune, PUSH_INTERVAL_MS);
    // The commune dials a fixed address, which the restarted relay takes over.
    let downlink = link(&rt, district_server.addr(), "delay=1ms", 3);
    commune.ok(&[
        "peer",
        "add",
        "up",
        "--addr",
        &downlink.local_addr().to_string(),
        "--upstream",
    ]);
    let commune_server = Server::start(&commune);

    let data = incompressible(SCAN_BYTES, &mut rng);
    let scan_path = province.write_file("ban-do-quy-hoach.jpg", &data);
    let d = id(&province.new_dispatch("41/QD-UBND", &[COMMUNE], &[&scan_path]));
    let hash = attachment_hash(&province, &d);

    let partial = wait_until(Duration::from_secs(30), || {
        chunks_stored(&district, &hash) >= chunks_total / 3
    });
    assert!(
        partial.is_some(),
        "the scan never started reaching the relay"
    );
    // `finish` is SIGKILL (`kill -9`): the relay gets no chance to flush or say goodbye.
    district_server.finish();
    let at_kill = chunks_stored(&district, &hash);
    assert!(
        at_kill < chunks_total && blob_rows(&district, &hash) == 0,
        "the relay was killed after the transfer ended ({at_kill} of {chunks_total} chunks)"
    );
    let bytes_at_kill = uplink.stats().down.forwarded_bytes;

    let (restarted, restarted_ms) = (Instant::now(), now_ms());
    let district_server = Server::start(&district);
    let _downlink = relink(&rt, downlink, district_server.addr(), 3);
    // When the commune's session with the new relay began, when each side held the whole scan.
    let (mut reconnected, mut relay_done, mut commune_done) = (None, None, None);
    wait_until(Duration::from_secs(40), || {
        let now = restarted.elapsed();
        if reconnected.is_none() && last_contact_ms(&commune, DISTRICT) > restarted_ms {
            reconnected = Some(now);
        }
        if relay_done.is_none() && blob_rows(&district, &hash) == 1 {
            relay_done = Some(now);
        }
        if commune_done.is_none() && blob_rows(&commune, &hash) == 1 {
            commune_done = Some(now);
        }
        commune_done.is_some()
    });
    let received = uplink.stats().down.forwarded_bytes;
    let report = format!(
        "relay killed at {at_kill}/{chunks_total} chunks ({bytes_at_kill} B received so far); \
         after its restart: scan complete at the relay {:?} ms, commune reconnected {:?} ms, scan \
         complete at the commune {:?} ms; the relay received {received} B in all for a \
         {SCAN_BYTES} B scan ({:.2}x)",
        relay_done.map(ms),
        reconnected.map(ms),
        commune_done.map(ms),
        received as f64 / SCAN_BYTES as f64
    );
    eprintln!("{report}");
    assert!(
        relay_done.is_some(),
        "the restarted relay did not complete the scan: {report}"
    );
    assert!(
        commune_done.is_some(),
        "the commune did not get the scan: {report}"
    );

    let back = commune.file("back.jpg");
    commune.ok(&[
        "dispatch",
        "attachment",
        &d,
        "ban-do-quy-hoach.jpg",
        "--out",
        &path_arg(&back),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the relayed scan differs"
    );
    for (unit, node) in [("district", &district), ("commune", &commune)] {
        assert_eq!(
            held_docs(node).into_keys().collect::<Vec<_>>(),
            vec![d.clone()],
            "the {unit} must hold the dispatch once"
        );
        assert_eq!(blob_rows(node, &hash), 1, "{unit}");
        assert_eq!(node.count("blobs"), 1, "{unit}: one scan stored once");
        assert_eq!(
            chunks_stored(node, &hash),
            chunks_total,
            "{unit}: each chunk once"
        );
    }
    // Resumed, not restarted: the chunks stored before the kill did not cross the link again.
    assert!(
        (received as f64) < 1.5 * SCAN_BYTES as f64,
        "the relay received {received} B for a {SCAN_BYTES} B scan: the transfer restarted"
    );
    for server in [province_server, district_server, commune_server] {
        server.finish();
    }
}

/// When the node last began a session with a peer of `unit` (0 if never).
fn last_contact_ms(node: &TestNode, unit: &str) -> i64 {
    db_read_only(node)
        .query_row(
            "SELECT COALESCE(MAX(last_contact_at), 0) FROM peer_sync WHERE unit = ?1",
            [unit],
            |r| r.get(0),
        )
        .expect("reading peer contacts")
}

// ---- 3. urgent traffic overtakes a bulk scan ----

#[test]
fn a_flash_dispatch_overtakes_a_bulk_scan_on_a_slow_link() {
    const BULK_BYTES: usize = 4 << 20;
    const RTT: Duration = Duration::from_millis(200);
    let rt = runtime();
    let mut rng = StdRng::seed_from_u64(3);
    let province = province();
    quick_recovery(&province, PUSH_INTERVAL_MS);
    let province_server = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    quick_recovery(&commune, PUSH_INTERVAL_MS);
    let uplink = link(&rt, province_server.addr(), "rate=2mbit,delay=100ms", 4);
    commune.ok(&[
        "peer",
        "add",
        "up",
        "--addr",
        &uplink.local_addr().to_string(),
        "--upstream",
    ]);
    let commune_server = Server::start(&commune);

    let bulk = incompressible(BULK_BYTES, &mut rng);
    let bulk_path = province.write_file("so-do-dia-chinh.jpg", &bulk);
    let before = uplink.stats().down.forwarded_bytes;
    let bulk_issued = Instant::now();
    let bulk_d = id(&province.new_dispatch("88/STNMT", &[COMMUNE], &[&bulk_path]));
    let bulk_hash = attachment_hash(&province, &bulk_d);
    // The receiver commits chunks 16 at a time (all of this scan at once), so the link's byte
    // count is what shows the transfer under way: a quarter of the scan has crossed.
    let under_way = wait_until(Duration::from_secs(40), || {
        uplink.stats().down.forwarded_bytes - before >= (BULK_BYTES / 4) as u64
    });
    assert!(under_way.is_some(), "the bulk scan never started arriving");
    assert_eq!(
        blob_rows(&commune, &bulk_hash),
        0,
        "the bulk scan arrived too soon"
    );

    let tiny = incompressible(12_000, &mut rng);
    let tiny_path = province.write_file("cong-dien-khan.jpg", &tiny);
    let flash_issued = Instant::now();
    let flash = id(&province.json(&[
        "dispatch",
        "new",
        "--ref",
        "1/CD-UBND",
        "--summary",
        "Công điện khẩn: bão số 3",
        "--priority",
        "flash",
        "--to",
        COMMUNE,
        "--attach",
        &tiny_path,
    ]));
    let tiny_hash = attachment_hash(&province, &flash);
    let (mut doc_at, mut tiny_at, mut bulk_at) = (None, None, None);
    let done = wait_until(Duration::from_secs(60), || {
        let now = flash_issued.elapsed();
        if doc_at.is_none() && holds_doc(&commune, &flash) {
            doc_at = Some(now);
        }
        if tiny_at.is_none() && blob_rows(&commune, &tiny_hash) == 1 {
            tiny_at = Some(now);
        }
        if bulk_at.is_none() && blob_rows(&commune, &bulk_hash) == 1 {
            bulk_at = Some(now);
        }
        doc_at.is_some() && tiny_at.is_some() && bulk_at.is_some()
    });
    let report = format!(
        "after the flash dispatch was issued: document at the commune {:?} ms, its scan {:?} ms, \
         bulk scan complete {:?} ms (bulk issued {} ms before the flash)",
        doc_at.map(ms),
        tiny_at.map(ms),
        bulk_at.map(ms),
        ms(flash_issued - bulk_issued)
    );
    eprintln!("{report}");
    assert!(done.is_some(), "not everything arrived: {report}");
    let (doc_at, tiny_at, bulk_at) = (doc_at.unwrap(), tiny_at.unwrap(), bulk_at.unwrap());
    // The bound: the push interval, a few round trips (Offer → Want → Changes, queued behind the
    // bulk data) and its own few kilobytes, with room for a loaded test machine.
    let bound = Duration::from_millis(PUSH_INTERVAL_MS) + 2 * RTT + Duration::from_millis(1_500);
    assert!(
        doc_at <= bound,
        "the flash dispatch took too long: {report}"
    );
    assert!(
        doc_at * 3 < bulk_at,
        "the flash dispatch did not overtake the bulk scan: {report}"
    );
    assert!(
        tiny_at < bulk_at,
        "the flash scan waited for the bulk scan: {report}"
    );
    let shown = commune.json(&["dispatch", "show", &flash]);
    assert_eq!(shown["priority"], "flash");
    assert_eq!(shown["missing_scans"], serde_json::json!([]));
    for server in [province_server, commune_server] {
        server.finish();
    }
}

// ---- 4. bundles ----

/// A copy of `bundle` with one byte flipped at `at`.
fn tampered(node: &TestNode, bundle: &[u8], name: &str, at: usize) -> String {
    let mut copy = bundle.to_vec();
    copy[at] ^= 0x01;
    node.write_file(name, &copy)
}

/// Byte offset of the JSON header inside a bundle file (after magic, format and length).
const HEADER_AT: usize = 8 + 1 + 4;

#[test]
fn a_bundle_round_trip_is_verified_idempotent_and_spares_the_network() {
    const SCAN_BYTES: usize = 1_500_000;
    let mut rng = StdRng::seed_from_u64(4);
    let province = province();
    let commune = enrolled(&province, COMMUNE, "commune");
    let data = incompressible(SCAN_BYTES, &mut rng);
    let scan_path = province.write_file("ke-hoach.jpg", &data);
    let d = id(&province.new_dispatch("5/KH-UBND", &[COMMUNE], &[&scan_path]));
    // Not for this commune: must stay out of its bundle.
    let other = id(&province.new_dispatch("6/KH-UBND", &[SIBLING], &[]));

    let out = province.file("for-tinhhuc.csb");
    let export = province.json(&[
        "bundle",
        "export",
        "--for",
        COMMUNE,
        "--out",
        &path_arg(&out),
    ]);
    assert_eq!(export["docs"], 1, "{export}");
    assert_eq!(export["scans"], 1, "{export}");
    let bundle = std::fs::read(&out).unwrap();
    let header_len = u32::from_be_bytes(bundle[9..13].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bundle[HEADER_AT..HEADER_AT + header_len]).unwrap();
    let payload_at = bundle.len() - export["bytes"].as_u64().unwrap() as usize;

    // Tampered copies are refused whole, with a clear message, and leave nothing behind.
    let feed_before = commune.json(&["status"])["feed_seq"].clone();
    let in_payload = tampered(
        &commune,
        &bundle,
        "payload.csb",
        payload_at + (bundle.len() - payload_at) / 2,
    );
    // A digit of created_at_ms: the header still parses, so the signature is what catches it.
    let digit = header.find("\"created_at_ms\":").unwrap() + "\"created_at_ms\":".len() + 3;
    let in_header = tampered(&commune, &bundle, "header.csb", HEADER_AT + digit);
    let truncated = commune.write_file("truncated.csb", &bundle[..bundle.len() - 100]);
    for (what, file, words) in [
        ("payload byte flipped", &in_payload, "altered"),
        ("header byte flipped", &in_header, "signature"),
        ("truncated", &truncated, "truncated"),
    ] {
        let run = commune.run(&["bundle", "import", file]);
        eprintln!("bundle {what}: exit {}, {}", run.code, run.stderr.trim());
        assert_ne!(run.code, 0, "a bundle ({what}) was accepted");
        assert!(
            run.stdout.is_empty()
                && run.stderr.lines().count() == 1
                && run.stderr.starts_with("error: ")
                && run.stderr.contains("refused")
                && run.stderr.contains(words),
            "unclear refusal of a bundle ({what}): {}",
            run.stderr
        );
        assert_eq!(
            commune.count("docs"),
            0,
            "bundle ({what}): a document was stored"
        );
        assert_eq!(
            commune.count("blob_chunks"),
            0,
            "bundle ({what}): scan data was stored"
        );
        assert_eq!(commune.json(&["status"])["feed_seq"], feed_before);
    }

    // The real bundle: the dispatch and its scan, bit for bit, and nothing of the sibling's.
    let imported = commune.json(&["bundle", "import", &path_arg(&out)]);
    assert_eq!(imported["docs"], 1, "{imported}");
    assert_eq!(imported["scans_stored"], 1, "{imported}");
    assert!(
        !holds_doc(&commune, &other),
        "the bundle leaked a sibling's dispatch"
    );
    let shown = commune.json(&["dispatch", "show", &d]);
    assert_eq!(shown["missing_scans"], serde_json::json!([]), "{shown}");
    let back = commune.file("back.jpg");
    commune.ok(&[
        "dispatch",
        "attachment",
        &d,
        "ke-hoach.jpg",
        "--out",
        &path_arg(&back),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the scan from the bundle differs"
    );

    // Importing it again changes nothing.
    let (feed, blobs) = (
        commune.json(&["status"])["feed_seq"].clone(),
        commune.count("blobs"),
    );
    let again = commune.json(&["bundle", "import", &path_arg(&out)]);
    assert_eq!(again["docs_changed"], 0, "{again}");
    assert_eq!(again["scans_stored"], 0, "{again}");
    assert_eq!(commune.json(&["status"])["feed_seq"], feed);
    assert_eq!(commune.count("blobs"), blobs);

    // The next sync over the network does not send the scan again.
    let server = Server::start(&province);
    commune.ok(&["peer", "add", "up", "--addr", server.addr()]);
    let report = synced(&commune);
    let received = report["bytes_received"].as_u64().unwrap();
    assert!(
        received < (SCAN_BYTES / 20) as u64,
        "the sync after the import received {received} B (the scan is {SCAN_BYTES} B): {report}"
    );
    assert_eq!(report["blobs_received"], 0, "{report}");
    assert!(
        !holds_doc(&commune, &other),
        "the sync leaked a sibling's dispatch"
    );
    eprintln!(
        "sync after the import: {received} B received, {} B sent, for a {SCAN_BYTES} B scan",
        report["bytes_sent"]
    );

    // The other way: the commune's answer, with its scan, carried to the province.
    let reply_data = scan(600_000, 9);
    let reply_path = commune.write_file("bao-cao.pgm", &reply_data);
    let reply = id(&commune.new_dispatch("12/BC-UBND", &["qn"], &[&reply_path]));
    let up = commune.file("for-province.csb");
    let export = commune.json(&["bundle", "export", "--for", "up", "--out", &path_arg(&up)]);
    assert_eq!(export["docs"], 1, "only what the province lacks: {export}");
    assert_eq!(export["scans"], 1, "{export}");
    let imported = province.json(&["bundle", "import", &path_arg(&up)]);
    assert_eq!(imported["scans_stored"], 1, "{imported}");
    assert_eq!(
        province.json(&["dispatch", "show", &reply])["issuer"],
        COMMUNE
    );
    let back = province.file("back.pgm");
    province.ok(&[
        "dispatch",
        "attachment",
        &reply,
        "bao-cao.pgm",
        "--out",
        &path_arg(&back),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == reply_data,
        "the commune's scan differs at the province"
    );
    server.finish();
}

/// A bundle damaged in its header is refused for what it is: the certificate and the CA are
/// fine, so the message must not send the administrator to reinstall them.
#[test]
fn a_bundle_with_a_damaged_header_is_not_blamed_on_the_certificate() {
    let province = province();
    let commune = enrolled(&province, COMMUNE, "commune");
    province.new_dispatch("7/TB-UBND", &[COMMUNE], &[]);
    let out = province.file("for-tinhhuc.csb");
    province.json(&[
        "bundle",
        "export",
        "--for",
        COMMUNE,
        "--out",
        &path_arg(&out),
    ]);
    let bundle = std::fs::read(&out).unwrap();
    let header_len = u32::from_be_bytes(bundle[9..13].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bundle[HEADER_AT..HEADER_AT + header_len]).unwrap();
    let digit = header.find("\"created_at_ms\":").unwrap() + "\"created_at_ms\":".len() + 3;
    let damaged = tampered(&commune, &bundle, "header.csb", HEADER_AT + digit);
    let run = commune.run(&["bundle", "import", &damaged]);
    assert_ne!(run.code, 0, "a damaged bundle was accepted");
    assert!(
        run.stderr.contains("altered or damaged")
            && !run.stderr.contains("certificate is not valid")
            && !run.stderr.contains("install the certificate"),
        "the message blames the certificate for a damaged file: {}",
        run.stderr
    );
    assert_eq!(commune.count("docs"), 0);
}

// ---- a commune moving between districts ----

/// The version line `unit list` ends with.
#[test]
fn a_commune_moved_once_at_the_province_follows_the_tree_to_its_new_district() {
    const NEW_DISTRICT: &str = "qn/halong";
    const MOVED: &str = "qn/halong/tinhhuc";
    const SETTLE: Duration = Duration::from_secs(60);
    let settle = |what: &str, done: &mut dyn FnMut() -> bool| {
        assert!(wait_until(SETTLE, done).is_some(), "{what}");
    };
    // Statuses every second, so the province hears of C through B within the test.
    let quick = |node: &TestNode| {
        quick_recovery(node, PUSH_INTERVAL_MS);
        crate::util::set_sync(node, "status_interval_s", "1");
    };
    // The province, districts A (Bình Liêu) and B (Hạ Long), each district dialling up;
    // commune C under A, dialling A.
    let province = province();
    quick(&province);
    let up = Server::start(&province);
    let district = |unit: &str| {
        let node = enrolled(&province, unit, "district");
        quick(&node);
        node.ok(&["peer", "add", "up", "--addr", up.addr()]);
        let server = Server::start(&node);
        (node, server)
    };
    let (a, a_server) = district(DISTRICT);
    let (b, b_server) = district(NEW_DISTRICT);
    let c = enrolled(&province, COMMUNE, "commune");
    quick(&c);
    c.ok(&["peer", "add", "up", "--addr", a_server.addr()]);

    // The province's tree says where B listens.
    let text = communesync::units::SAMPLE_TREE_TOML.replacen(
        "path = \"qn/halong\"\n",
        &format!("path = \"qn/halong\"\naddr = \"{}\"\n", b_server.addr()),
        1,
    );
    let file = province.file("units-addr.toml");
    std::fs::write(&file, text).unwrap();
    province.ok(&["unit", "publish", &path_arg(&file)]);

    // C's dispatches, one with a scan, reach the province through A.
    let scan_file = c.write_file("so-do.pdf", &scan(200_000, 13));
    let with_scan = id(&c.new_dispatch("1/BC-UBND", &["qn"], &[&scan_file]));
    let plain = id(&c.new_dispatch("2/BC-UBND", &["qn"], &[]));
    let hash = attachment_hash(&c, &with_scan);
    let c_server = Server::start(&c);
    settle("C's documents reach the province through A", &mut || {
        holds_doc(&province, &with_scan)
            && holds_doc(&province, &plain)
            && blob_rows(&province, &hash) == 1
            && units_version(&c).contains("version 1")
    });
    assert!(!holds_doc(&b, &with_scan) && !holds_doc(&b, &plain));
    // C goes offline for a while (a weak link), as communes do.
    c_server.finish();

    // The move, once, at the province; a node that is not the province cannot.
    a.fails(&["unit", "move", COMMUNE, NEW_DISTRICT], 2);
    let moved = province.json(&["unit", "move", COMMUNE, NEW_DISTRICT]);
    assert_eq!(
        (moved["from"].as_str(), moved["to"].as_str()),
        (Some(COMMUNE), Some(MOVED)),
        "{moved}"
    );
    // B, in step with the province's feed, is offered C's documents: they came into its scope.
    settle("B holds C's documents", &mut || {
        holds_doc(&b, &with_scan) && holds_doc(&b, &plain)
    });
    settle("A has the moved tree", &mut || {
        units_version(&a).contains("version 2")
    });

    // Offline, C wrote under its old path before it learnt of the move.
    let written_away = id(&c.new_dispatch("3/BC-UBND", &["qn"], &[]));
    // Back online, nothing typed at C: it gets the tree from A (which no longer takes C's
    // documents: node::simtest covers its refusal), and dials B at the address the tree gives.
    let c_server = Server::start(&c);
    settle("C runs as its new path", &mut || {
        units_version(&c).contains("version 2")
    });
    settle("C's scan reaches B from C", &mut || {
        blob_rows(&b, &hash) == 1
    });
    settle(
        "what C wrote away reaches the province through B",
        &mut || holds_doc(&b, &written_away) && holds_doc(&province, &written_away),
    );
    let later = id(&c.new_dispatch("4/BC-UBND", &["qn"], &[]));
    settle(
        "a new dispatch of C reaches the province through B",
        &mut || holds_doc(&province, &later),
    );
    // A holds none of what C wrote after the move was signed.
    assert!(!holds_doc(&a, &written_away) && !holds_doc(&a, &later));
    let peers = c.json(&["peer", "list"]);
    assert!(
        peers.to_string().contains(b_server.addr()),
        "C records B as a peer: {peers}"
    );
    let shown = c.json(&["dispatch", "show", &later]);
    assert_eq!(shown["issuer"], MOVED, "{shown}");
    let own = c.run(&["--json", "status"]).json();
    assert_eq!(own["own"]["unit"], MOVED, "{own}");

    // The province's status lists C under B, heard from.
    let mut listed = Value::Null;
    settle("the province's status lists C under B", &mut || {
        let status = province.run(&["status", "--json"]).json();
        listed = status["units"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["unit"] == MOVED)
            .cloned()
            .unwrap_or(Value::Null);
        listed["via"] == NEW_DISTRICT && !listed["last_seen"].is_null()
    });
    let status = province.run(&["status", "--json"]).json();
    assert!(
        !status["units"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|u| u["unit"] == COMMUNE),
        "the old path is still listed: {status}"
    );
    for server in [c_server, b_server, a_server, up] {
        server.finish();
    }
}
