//! A large province, generated through the real write path, and the list queries at its size:
//! build time, database bytes per document, `dispatch list --inbox` / `--unit`, `assign list
//! --overdue` / `--lead` (library and binary), and the resident memory of a process serving them.
//!
//! `cargo bench --bench scale -- --docs 100000` (default 20,000; `--dir PATH` keeps the province
//! there, and a complete one found there is measured again without being rebuilt). Prints
//! Markdown tables. docs/performance.md ("Province scale") has the figures and the 5M command.
//!
//! Every document is a real Automerge document made by the model's functions, with one change
//! per action by the acting unit's own actor (receipts, comments, status changes, dossier
//! steps), saved through `Store::write` + `create_doc` in batches, so its snapshot and index
//! rows are what a province that received it over sync would hold.

mod common;
use common::{load_average, machine, memory_mib, ms};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use automerge::ActorId;
use communesync::model::assignment::{self, NewAssignment, Status};
use communesync::model::dispatch::{self, DispatchKind, NewDispatch, Priority};
use communesync::model::{dossier, Author, DocId, DocKind};
use communesync::node::Node;
use communesync::store::index::DispatchFilter;
use communesync::units::{Role, SAMPLE_TREE_TOML};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_communesync");
/// Units of Quảng Ninh (issue 14); the sample tree lists communes for one district only, the
/// others get numbered communes until the tree has this many units.
const UNITS: usize = 609;
/// Documents per write transaction while building (speed only; not what is measured).
const BATCH: usize = 1_000;
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
}

fn opts() -> Opts {
    let mut opts = Opts {
        docs: 20_000,
        dir: None,
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
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => panic!("unknown argument {other}: use --docs N and --dir PATH"),
        }
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

/// Each unit's own actor and an officer of it, as if every change came from that unit's node.
fn author_of(unit: &str, rng: &mut StdRng) -> (ActorId, Author) {
    let node = blake3::hash(unit.as_bytes()).as_bytes()[..16].to_vec();
    let author = Author {
        user: format!("canbo{}", rng.random_range(1..=4)),
        unit: unit.to_string(),
        node: hex::encode(&node),
    };
    (ActorId::from(node), author)
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

/// What the build made, for the tables.
#[derive(Default)]
struct Made {
    dispatches: usize,
    assignments: usize,
    dossiers: usize,
    recipients: usize,
    changes: usize,
}

/// Builds `n` documents: 45 % dispatches (with receipts and comments), 35 % assignments of a
/// recent dispatch to one of its recipients (with their status histories), 20 % dossiers
/// (with their routes), created in time order over the last year.
fn build(node: &mut Node, n: usize) -> Made {
    let tree = Tree::new(node);
    let mut rng = StdRng::seed_from_u64(14);
    let now = communesync::node::now_ms();
    let start = now - SPAN_MS;
    let mut recent: Vec<(DocId, Vec<String>, i64)> = Vec::new();
    let mut made = Made::default();
    let started = Instant::now();
    for batch in 0..n.div_ceil(BATCH) {
        node.store
            .write(|tx| {
                for i in batch * BATCH..((batch + 1) * BATCH).min(n) {
                    let at = start + (i as i64) * SPAN_MS / n as i64;
                    let age_days = (now - at) / 86_400_000;
                    let kind = rng.random_range(0..100);
                    if kind < 45 || recent.is_empty() {
                        let id = DocId::generate(DocKind::Dispatch);
                        let issuer = match rng.random_range(0..10) {
                            0 => tree.province.clone(),
                            1..=3 => {
                                tree.districts[rng.random_range(0..tree.districts.len())].clone()
                            }
                            _ => tree.any_commune(&mut rng).to_string(),
                        };
                        let to = recipients(&tree, &issuer, &mut rng);
                        let new = NewDispatch {
                            ref_no: format!("{}/UBND-VP", i + 1),
                            summary: format!(
                                "Công văn số {} về kế hoạch phòng chống lụt bão",
                                i + 1
                            ),
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
                        let (actor, author) = author_of(&issuer, &mut rng);
                        let mut changes = 1;
                        tx.create_doc(&id, &actor, at, |doc| {
                            dispatch::create(doc, &id, &new, &author, at)?;
                            // Most recipients confirm receipt, each from its own node.
                            for unit in &to {
                                if rng.random_bool(0.85) {
                                    let (actor, author) = author_of(unit, &mut rng);
                                    doc.set_actor(actor);
                                    let when = at + rng.random_range(60_000..86_400_000);
                                    dispatch::receive(doc, &id, unit, &author, when)?;
                                    changes += 1;
                                }
                            }
                            if rng.random_bool(0.1) {
                                let unit = &to[rng.random_range(0..to.len())];
                                let (actor, author) = author_of(unit, &mut rng);
                                doc.set_actor(actor);
                                let text = "Đã nhận, đang triển khai";
                                dispatch::add_comment(doc, &id, text, &author, at + 3_600_000)?;
                                changes += 1;
                            }
                            Ok(())
                        })?;
                        made.dispatches += 1;
                        made.recipients += to.len();
                        made.changes += changes;
                        if recent.len() == RECENT_DISPATCHES {
                            recent.swap_remove(rng.random_range(0..RECENT_DISPATCHES));
                        }
                        recent.push((id, to, at));
                    } else if kind < 80 {
                        let (dispatch_id, to, _) = &recent[rng.random_range(0..recent.len())];
                        let unit = to[rng.random_range(0..to.len())].clone();
                        let id = DocId::generate(DocKind::Assignment);
                        let (actor, author) = author_of(&unit, &mut rng);
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
                        // Older assignments have moved further: most of those past two months
                        // are done, some were returned on the way.
                        let steps: &[Status] = match (age_days > 60, rng.random_range(0..10)) {
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
                        tx.create_doc(&id, &actor, at, |doc| {
                            assignment::create(doc, &id, &new, &author, at)?;
                            for (k, status) in steps.iter().enumerate() {
                                let when = at + (k as i64 + 1) * 2 * 86_400_000;
                                assignment::update_status(doc, &id, *status, None, &author, when)?;
                            }
                            Ok(())
                        })?;
                        made.assignments += 1;
                        made.changes += 1 + steps.len();
                    } else {
                        let origin = tree.any_commune(&mut rng).to_string();
                        let district = tree.district_of(&origin).to_string();
                        let id = DocId::generate(DocKind::Dossier);
                        let (actor, author) = author_of(&origin, &mut rng);
                        let steps = rng.random_range(0..=4);
                        tx.create_doc(&id, &actor, at, |doc| {
                            dossier::create(
                                doc,
                                &id,
                                "Nguyễn Văn An",
                                "Cấp giấy chứng nhận quyền sử dụng đất",
                                &author,
                                at,
                            )?;
                            // Checked at the commune, handed to the district, decided there,
                            // handed back for the applicant to collect.
                            let route = [
                                ("checked", None, &origin),
                                ("to district", Some(&district), &origin),
                                ("decided", None, &district),
                                ("returned to commune", Some(&origin), &district),
                            ];
                            for (k, (step, to, holder)) in route.iter().take(steps).enumerate() {
                                let (actor, author) = author_of(holder, &mut rng);
                                doc.set_actor(actor);
                                let when = at + (k as i64 + 1) * 86_400_000;
                                dossier::advance(
                                    doc,
                                    &id,
                                    step,
                                    to.map(|s| s.as_str()),
                                    &author,
                                    when,
                                )?;
                            }
                            Ok(())
                        })?;
                        made.dossiers += 1;
                        made.changes += 1 + steps;
                    }
                }
                Ok(())
            })
            .expect("write a batch");
        let done = ((batch + 1) * BATCH).min(n);
        if batch % 20 == 19 || done == n {
            eprintln!(
                "{done} documents in {:.0} s, {:.0} CPU s (load {})",
                started.elapsed().as_secs_f64(),
                own_cpu_s(),
                load_average()
            );
        }
    }
    made
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
        let made = build(&mut node, opts.docs);
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
