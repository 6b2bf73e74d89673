//! Benchmark of a node working alone: durable `dispatch new` with a 1 MiB scan (library and
//! binary), listing 10,000 dispatches and overdue assignments, and database bytes per dispatch
//! and per MiB of scan (database and scan files). Run with `cargo bench --bench local`; prints a Markdown table.

mod common;
use common::{greyscale_scan, load_average, ms, new_node, run_line};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use communesync::model::assignment::{self, NewAssignment, Status};
use communesync::model::dispatch::{self, DispatchKind, NewDispatch, Priority};
use communesync::model::{DocId, DocKind};
use communesync::node::{now_ms, DispatchRequest, Node};
use communesync::store::index::DispatchFilter;
use communesync::units::Role;

const UNIT: &str = "qn/binhlieu/tinhhuc";
const DISTRICT: &str = "qn/binhlieu";

/// Size of each synthetic scan.
const SCAN_BYTES: usize = 1 << 20;
/// Runs of `dispatch new` per method: enough for a p99 that is not the maximum.
const WRITE_RUNS: usize = 200;
/// Documents of each kind behind the list queries.
const LIST_DOCS: usize = 10_000;
/// Documents created per transaction while populating (speed only; not what is measured).
const POPULATE_BATCH: usize = 1_000;
/// Repetitions of each list query; the median is reported.
const LIST_RUNS_LIBRARY: usize = 21;
const LIST_RUNS_BINARY: usize = 11;

/// The bars of DESIGN.md and of the brief, in milliseconds.
const WRITE_P50_MS_MAX: f64 = 20.0;
const LIST_MS_MAX: f64 = 100.0;

/// Quantile `q` of sorted samples (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

struct Row {
    what: String,
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    bar: String,
}

impl Row {
    fn new(what: &str, mut samples: Vec<f64>, bar: Option<f64>) -> Row {
        samples.sort_by(f64::total_cmp);
        let p50 = quantile(&samples, 0.5);
        let bar = match bar {
            Some(max) if p50 <= max => format!("p50 ≤ {max} ms: met"),
            Some(max) => format!("p50 ≤ {max} ms: NOT met"),
            None => "—".into(),
        };
        Row {
            what: what.into(),
            n: samples.len(),
            p50,
            p90: quantile(&samples, 0.9),
            p99: quantile(&samples, 0.99),
            max: *samples.last().expect("at least one sample"),
            bar,
        }
    }

    fn print(&self) {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            self.what, self.n, self.p50, self.p90, self.p99, self.max, self.bar
        );
    }
}

/// Bytes the node stores: `node.db` once the WAL is folded in, plus the scan files in `blobs/`.
fn db_bytes(dir: &Path) -> u64 {
    let path = dir.join(communesync::node::DB_FILE);
    let conn = rusqlite::Connection::open(&path).expect("open node.db");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    drop(conn);
    let scans: u64 = std::fs::read_dir(dir.join(communesync::store::blobs::BLOB_DIR))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    std::fs::metadata(&path).expect("node.db").len() + scans
}

/// Issues WRITE_RUNS dispatches, each with a fresh scan, through the library; returns ms each.
fn write_library(node: &mut Node, scan: &Path, seed0: u64) -> Vec<f64> {
    (0..WRITE_RUNS)
        .map(|i| {
            std::fs::write(scan, greyscale_scan(SCAN_BYTES, seed0 + i as u64)).expect("scan");
            let req = DispatchRequest {
                ref_no: format!("{i}/UBND-VP"),
                summary: "Kế hoạch phòng chống lụt bão".into(),
                kind: DispatchKind::Dispatch,
                priority: Priority::Normal,
                to: vec![DISTRICT.into(), UNIT.into()],
                attach: vec![scan.to_path_buf()],
            };
            let start = Instant::now();
            node.dispatch_new(None, &req).expect("dispatch new");
            ms(start.elapsed())
        })
        .collect()
}

/// The same through the real binary, process start and exit included.
fn write_binary(dir: &Path, scan: &Path, seed0: u64) -> Vec<f64> {
    (0..WRITE_RUNS)
        .map(|i| {
            std::fs::write(scan, greyscale_scan(SCAN_BYTES, seed0 + i as u64)).expect("scan");
            let ref_no = format!("{i}/UBND-VP");
            let scan = scan.to_str().expect("a UTF-8 temporary path");
            let args = ["dispatch", "new", "--ref", &ref_no, "--summary", "Kế hoạch"];
            let args = [&args[..], &["--to", DISTRICT, UNIT, "--attach", scan]].concat();
            let start = Instant::now();
            run_quiet(dir, &args);
            ms(start.elapsed())
        })
        .collect()
}

/// Creates LIST_DOCS dispatches (metadata only) in batched transactions.
fn populate_dispatches(node: &mut Node) -> Vec<DocId> {
    let author = node.author(None).expect("author");
    let actor = node.actor().clone();
    let mut ids = Vec::with_capacity(LIST_DOCS);
    for batch in 0..LIST_DOCS / POPULATE_BATCH {
        node.store
            .write(|tx| {
                for i in 0..POPULATE_BATCH {
                    let n = batch * POPULATE_BATCH + i;
                    let id = DocId::generate(DocKind::Dispatch);
                    let at_ms = now_ms();
                    let new = NewDispatch {
                        ref_no: format!("{n}/UBND-VP"),
                        summary: format!("Công văn số {n} về kế hoạch phòng chống lụt bão"),
                        kind: DispatchKind::Dispatch,
                        priority: if n.is_multiple_of(10) {
                            Priority::Urgent
                        } else {
                            Priority::Normal
                        },
                        issuer: UNIT.into(),
                        to: vec![DISTRICT.into(), UNIT.into()],
                        attachments: vec![],
                    };
                    tx.create_doc(&id, &actor, at_ms, |doc| {
                        Ok(dispatch::create(doc, &id, &new, &author, at_ms)?)
                    })?;
                    ids.push(id);
                }
                Ok(())
            })
            .expect("populate dispatches");
    }
    ids
}

/// One assignment per dispatch: deadlines spread over 2020–2029, a quarter of them done.
fn populate_assignments(node: &mut Node, dispatches: &[DocId]) {
    let author = node.author(None).expect("author");
    let actor = node.actor().clone();
    for batch in dispatches.chunks(POPULATE_BATCH) {
        node.store
            .write(|tx| {
                for (i, dispatch_id) in batch.iter().enumerate() {
                    let id = DocId::generate(DocKind::Assignment);
                    let at_ms = now_ms();
                    let deadline = time::Date::from_calendar_date(
                        2020 + (i % 10) as i32,
                        time::Month::try_from(1 + (i % 12) as u8).expect("month"),
                        1 + (i % 28) as u8,
                    )
                    .expect("date");
                    let new = NewAssignment {
                        dispatch_id: dispatch_id.clone(),
                        unit: UNIT.into(),
                        lead: "admin".into(),
                        co: vec![],
                        deadline,
                    };
                    tx.create_doc(&id, &actor, at_ms, |doc| {
                        assignment::create(doc, &id, &new, &author, at_ms)?;
                        if i % 4 == 0 {
                            assignment::update_status(
                                doc,
                                &id,
                                Status::Done,
                                None,
                                &author,
                                at_ms,
                            )?;
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })
            .expect("populate assignments");
    }
}

fn median_ms(runs: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            ms(start.elapsed())
        })
        .collect()
}

fn run_quiet(dir: &Path, args: &[&str]) {
    let status = common::command(dir, args)
        .stdout(Stdio::null())
        .status()
        .expect("run communesync");
    assert!(status.success(), "communesync {args:?} failed");
}

fn main() {
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("communesync-bench-")
        .tempdir()
        .expect("temporary directory");
    let scan: PathBuf = tmp.path().join("scan.pgm");
    println!("communesync local benchmark\n{}", run_line());
    let sample = greyscale_scan(SCAN_BYTES, 0);
    let compressed = zstd::bulk::compress(&sample, 3).expect("zstd").len();
    println!(
        "scan: {} bytes of synthetic greyscale A4 pages (PGM), zstd -3 ratio {:.1}, a new one per dispatch",
        sample.len(),
        sample.len() as f64 / compressed as f64
    );
    println!();
    println!("| what | runs | p50 ms | p90 ms | p99 ms | max ms | bar |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");

    // (a) Durable writes with a scan.
    let lib_dir = tmp.path().join("writes-library");
    let mut node = new_node(&lib_dir, UNIT, Role::Commune);
    let empty_bytes = db_bytes(&lib_dir);
    Row::new(
        "`dispatch new` + 1 MiB scan, library (`Node::dispatch_new`)",
        write_library(&mut node, &scan, 1_000),
        Some(WRITE_P50_MS_MAX),
    )
    .print();
    drop(node);
    let with_scans_bytes = db_bytes(&lib_dir);

    let bin_dir = tmp.path().join("writes-binary");
    drop(new_node(&bin_dir, UNIT, Role::Commune));
    Row::new(
        "`dispatch new` + 1 MiB scan, binary (process spawn included)",
        write_binary(&bin_dir, &scan, 10_000),
        Some(WRITE_P50_MS_MAX),
    )
    .print();
    // The last connection to close folds the WAL into node.db (checkpoint-on-close). When
    // another process holds the database open, as a running `serve` would, the command skips
    // that, and only the periodic automatic checkpoint remains.
    let held_dir = tmp.path().join("writes-binary-held");
    let holder = new_node(&held_dir, UNIT, Role::Commune);
    Row::new(
        "`dispatch new` + 1 MiB scan, binary, database held open by another connection",
        write_binary(&held_dir, &scan, 20_000),
        Some(WRITE_P50_MS_MAX),
    )
    .print();
    drop(holder);

    // (b) Queries over 10,000 dispatches and 10,000 assignments.
    let list_dir = tmp.path().join("lists");
    let mut node = new_node(&list_dir, UNIT, Role::Commune);
    let populate = Instant::now();
    let dispatches = populate_dispatches(&mut node);
    drop(node);
    let dispatches_bytes = db_bytes(&list_dir);
    let mut node = Node::open(&list_dir).expect("open");
    populate_assignments(&mut node, &dispatches);
    drop(node);
    let assignments_bytes = db_bytes(&list_dir);
    let populate_s = populate.elapsed().as_secs_f64();
    let node = Node::open(&list_dir).expect("open");

    let rows = node
        .store
        .list_dispatches(DispatchFilter::All, LIST_DOCS)
        .expect("list");
    assert_eq!(rows.len(), LIST_DOCS);
    Row::new(
        "`dispatch list`, 10,000 rows, library (`list_dispatches(All, 10_000)`)",
        median_ms(LIST_RUNS_LIBRARY, || {
            let rows = node
                .store
                .list_dispatches(DispatchFilter::All, LIST_DOCS)
                .expect("list");
            std::hint::black_box(rows);
        }),
        Some(LIST_MS_MAX),
    )
    .print();
    let overdue = node.assign_list(true, None, LIST_DOCS).expect("overdue");
    Row::new(
        &format!(
            "`assign list --overdue`, {} of 10,000 rows, library (`assign_list`)",
            overdue.len()
        ),
        median_ms(LIST_RUNS_LIBRARY, || {
            let rows = node.assign_list(true, None, LIST_DOCS).expect("overdue");
            std::hint::black_box(rows);
        }),
        Some(LIST_MS_MAX),
    )
    .print();
    drop(node);
    Row::new(
        "`dispatch list --limit 10000 > /dev/null`, binary",
        median_ms(LIST_RUNS_BINARY, || {
            run_quiet(&list_dir, &["dispatch", "list", "--limit", "10000"])
        }),
        Some(LIST_MS_MAX),
    )
    .print();
    Row::new(
        "`assign list --overdue --limit 10000 > /dev/null`, binary",
        median_ms(LIST_RUNS_BINARY, || {
            run_quiet(
                &list_dir,
                &["assign", "list", "--overdue", "--limit", "10000"],
            )
        }),
        Some(LIST_MS_MAX),
    )
    .print();
    Row::new(
        "`dispatch list --json --limit 10000 > /dev/null`, binary",
        median_ms(LIST_RUNS_BINARY, || {
            run_quiet(
                &list_dir,
                &["--json", "dispatch", "list", "--limit", "10000"],
            )
        }),
        None,
    )
    .print();

    // (c) Database size, from node.db after a TRUNCATE checkpoint.
    let per_dispatch = (dispatches_bytes - empty_bytes) as f64 / LIST_DOCS as f64;
    let per_assignment = (assignments_bytes - dispatches_bytes) as f64 / LIST_DOCS as f64;
    let scan_mib = (WRITE_RUNS * sample.len()) as f64 / (1 << 20) as f64;
    let per_scan_mib =
        ((with_scans_bytes - empty_bytes) as f64 - per_dispatch * WRITE_RUNS as f64) / scan_mib;
    println!();
    println!("| database size | bytes |");
    println!("| --- | --- |");
    println!("| empty node (after init) | {empty_bytes} |");
    println!(
        "| per dispatch, metadata only (10,000 dispatches, 2 recipients) | {per_dispatch:.0} |"
    );
    println!(
        "| per assignment (10,000, a quarter with a second status change) | {per_assignment:.0} |"
    );
    println!(
        "| per MiB of scan ({WRITE_RUNS} dispatches with a distinct 1 MiB scan each; 1 MiB = 1,048,576) | {per_scan_mib:.0} |"
    );
    println!();
    println!(
        "populating 10,000 dispatches and 10,000 assignments took {populate_s:.1} s; whole benchmark {:.0} s; load average {} at the end",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}
