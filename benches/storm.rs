//! Benchmark: a reconnect storm at the province (issue 14). After a regional outage every
//! district and commune (609 units by default) dials the province within a minute, each with a
//! few changed documents and one small scan, while one commune keeps a long-lived session and
//! gets a flash dispatch issued in the middle of the storm.
//!
//! The province is the real `communesync serve` process; the load generator is this process:
//! one real QUIC client per unit (the library's one-shot `sync`), each with its own node, key,
//! certificate and source address (127.0.x.y, as units behind different NATs), retrying with
//! back-off when refused, as a commune's `serve` would. The watcher is a real `serve` process.
//!
//! Run with `cargo bench --bench storm` (609 units, 60 s spread) or
//! `cargo bench --bench storm -- 120 20` (units, spread in seconds); `-- 609 0` is the burst
//! where every unit dials at the same instant, beyond the province's caps (64 handshakes, 256
//! sessions). A client refused for capacity waits at least the retry-after the province named
//! (believed up to `sync.reconnect_max_s`), as a commune's `serve` does.

mod common;
use common::{load_average, machine, memory_mib, random_scan, ServeProcess};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use communesync::model::dispatch::{DispatchKind, Priority};
use communesync::node::{DispatchRequest, Node};
use communesync::units::{Role, UnitTree};
use rand::{Rng, SeedableRng};

/// Documents and scan bytes each unit brings to the storm.
const DOCS_PER_UNIT: usize = 3;
const SCAN_BYTES: usize = 16 * 1024;
/// Attempts per unit before the bench counts it as not converged.
const ATTEMPTS_MAX: u32 = 12;
/// The longest retry-after believed: the default `sync.reconnect_max_s`.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// The province's tree: the sample's province and 14 districts, and `communes` synthetic
/// communes spread over the districts (the sample lists Bình Liêu's only).
fn tree_text(communes: usize) -> (String, Vec<(String, Role)>) {
    let sample = UnitTree::sample();
    let districts: Vec<String> = sample
        .iter()
        .filter(|u| u.role == Role::District)
        .map(|u| u.path.clone())
        .collect();
    let mut text = String::new();
    let mut units = Vec::new();
    let mut add = |path: &str, role: Role| {
        text.push_str(&format!(
            "[[unit]]\npath = \"{path}\"\nname = \"{path}\"\nrole = \"{role}\"\n\n"
        ));
        if role != Role::Province {
            units.push((path.to_string(), role));
        }
    };
    add("qn", Role::Province);
    for d in &districts {
        add(d, Role::District);
    }
    for i in 0..communes {
        add(
            &format!("{}/c{i:03}", districts[i % districts.len()]),
            Role::Commune,
        );
    }
    (text, units)
}

/// A unit's node, enrolled by the province, with its changes made and its source address set.
fn prepare(
    province: &Node,
    root: &Path,
    tree_file: &Path,
    (i, unit, role): (usize, &str, Role),
    province_addr: &str,
    seed: u64,
) -> PathBuf {
    let dir = root.join(format!("u{i:04}"));
    Node::init_with_tree(&dir, unit, role, "admin", Some(tree_file)).expect("init");
    let mut node = Node::open(&dir).expect("open");
    let (req, crt) = (dir.join("enrol.req"), dir.join("enrol.crt"));
    node.enrol_request(&req).expect("request");
    province.ca_issue(&req, unit, role, &crt).expect("issue");
    node.enrol_install(&crt).expect("install");
    node.peer_add("up", province_addr, true).expect("peer");
    let source = format!("127.0.{}.{}", 1 + i / 200, 2 + i % 200);
    let config = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let listen = "listen = \"0.0.0.0:7410\"\n";
    assert!(
        config.contains(listen),
        "init writes the default listen line"
    );
    let config = config.replacen(listen, &format!("{listen}source = \"{source}\"\n"), 1);
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let scan = dir.join("scan.pdf");
    std::fs::write(&scan, random_scan(SCAN_BYTES, seed)).unwrap();
    for d in 0..DOCS_PER_UNIT {
        node.dispatch_new(
            None,
            &DispatchRequest {
                ref_no: format!("{d}/storm"),
                summary: format!("report {d} from {unit}"),
                kind: DispatchKind::Report,
                priority: Priority::Normal,
                to: vec!["qn".into()],
                attach: if d == 0 { vec![scan.clone()] } else { vec![] },
            },
        )
        .expect("dispatch");
    }
    dir
}

/// Resident and peak resident memory of a process, MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let mib = |field| memory_mib(pid, field).unwrap_or(0.0);
    (mib("VmRSS"), mib("VmHWM"))
}

fn count(db: &Path, sql: &str) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap_or(-1)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// What one unit's storm looked like.
struct Outcome {
    attempts: u32,
    /// Refusals for capacity that named a retry-after, and the longest named.
    busy: u32,
    retry_after_max: Duration,
    /// From its first dial to its converged sync.
    session_s: Option<f64>,
    errors: Vec<String>,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let units_total: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(609);
    let spread = Duration::from_secs(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(60));
    let communes = units_total.saturating_sub(15).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);

    let tmp = tempfile::tempdir().unwrap();
    let (text, units) = tree_text(communes);
    let tree_file = tmp.path().join("units.toml");
    std::fs::write(&tree_file, &text).unwrap();
    let province_dir = tmp.path().join("qn");
    Node::init_with_tree(
        &province_dir,
        "qn",
        Role::Province,
        "admin",
        Some(&tree_file),
    )
    .unwrap();
    Node::open(&province_dir).unwrap().ca_init().unwrap();
    let province = ServeProcess::start(&province_dir);
    let province_addr = province.addr.to_string();
    let started = Instant::now();
    let dirs: Vec<(String, PathBuf)> = {
        let province = Node::open(&province_dir).unwrap();
        units
            .iter()
            .enumerate()
            .map(|(i, (unit, role))| {
                let dir = prepare(
                    &province,
                    tmp.path(),
                    &tree_file,
                    (i, unit, *role),
                    &province_addr,
                    i as u64,
                );
                (unit.clone(), dir)
            })
            .collect()
    };
    let setup_s = started.elapsed().as_secs_f64();
    eprintln!("{} units enrolled in {setup_s:.1} s", dirs.len());

    // The watcher: the last commune keeps a session open through the storm.
    let (watch_unit, watch_dir) = dirs.last().cloned().unwrap();
    let watcher = ServeProcess::start(&watch_dir);
    std::thread::sleep(Duration::from_secs(3));
    let stormers = &dirs[..dirs.len() - 1];

    let rss_peak = Arc::new(Mutex::new((0.0f64, 0.0f64)));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, on, pid) = (rss_peak.clone(), sampling.clone(), province.child.id());
        std::thread::spawn(move || {
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                let (rss, hwm) = rss_mib(pid);
                let mut p = peak.lock().unwrap();
                *p = (p.0.max(rss), hwm);
                drop(p);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let storm_start = Instant::now();
    let outcomes: Vec<Outcome> = rt.block_on(async {
        let tasks: Vec<_> = stormers
            .iter()
            .map(|(_, dir)| {
                let dir = dir.clone();
                let offset = spread.mul_f64(rng.random::<f64>());
                let seed = rng.random::<u64>();
                tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    tokio::time::sleep(offset).await;
                    let first = Instant::now();
                    let mut out = Outcome {
                        attempts: 0,
                        busy: 0,
                        retry_after_max: Duration::ZERO,
                        session_s: None,
                        errors: Vec::new(),
                    };
                    while out.attempts < ATTEMPTS_MAX {
                        out.attempts += 1;
                        let mut wait_at_least = Duration::ZERO;
                        match communesync::service::sync_once(&dir, None).await {
                            Ok(report) if report.converged => {
                                out.session_s = Some(first.elapsed().as_secs_f64());
                                break;
                            }
                            Ok(r) => out.errors.push(format!(
                                "not converged: {} scans withheld, {} not received ({}), {} docs refused",
                                r.scans_withheld.len(),
                                r.scans_not_received.len(),
                                r.scans_not_received
                                    .iter()
                                    .map(|p| p.why)
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                r.docs_refused.len() + r.docs_refused_by_peer.len()
                            )),
                            Err(e) => {
                                let text = format!("{e:#}");
                                if let Some(wait) = communesync::net::retry_after(&text) {
                                    wait_at_least = wait.min(RETRY_AFTER_MAX);
                                    out.busy += 1;
                                    out.retry_after_max = out.retry_after_max.max(wait_at_least);
                                }
                                out.errors.push(text)
                            }
                        }
                        // A commune's serve backs off the same way, with jitter, and waits at
                        // least the retry-after a busy province named.
                        let backoff = (1u64 << out.attempts.min(5)) as f64;
                        let backoff = Duration::from_secs_f64(backoff * rng.random_range(0.5..1.0));
                        tokio::time::sleep(backoff.max(wait_at_least)).await;
                    }
                    out
                })
            })
            .collect();

        // The flash dispatch, issued at the province halfway through the spread.
        tokio::time::sleep(spread / 2).await;
        let issued = Instant::now();
        let flash = tokio::task::spawn_blocking({
            let (province_dir, watch_unit) = (province_dir.clone(), watch_unit.clone());
            move || {
                let mut node = Node::open(&province_dir).unwrap();
                node.dispatch_new(
                    None,
                    &DispatchRequest {
                        ref_no: "1/KT".into(),
                        summary: "flash directive during the storm".into(),
                        kind: DispatchKind::Directive,
                        priority: Priority::Flash,
                        to: vec![watch_unit],
                        attach: vec![],
                    },
                )
                .unwrap()
                .id
            }
        })
        .await
        .unwrap();
        let watch_db = watch_dir.join("node.db");
        let sql = format!("SELECT COUNT(*) FROM docs WHERE id = '{flash}'");
        let mut flash_s = None;
        while issued.elapsed() < Duration::from_secs(60) {
            if count(&watch_db, &sql) == 1 {
                flash_s = Some(issued.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "flash dispatch reached the watcher in {}",
            flash_s.map_or("(not within 60 s)".into(), |s| format!("{s:.2} s"))
        );
        FLASH.lock().unwrap().replace(flash_s);
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
        outcomes
    });
    let storm_s = storm_start.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let (rss_max, hwm) = *rss_peak.lock().unwrap();

    // What the province holds: every unit's documents and scans.
    let db = province_dir.join("node.db");
    let docs_expected = (dirs.len() * DOCS_PER_UNIT) as i64;
    let docs_held = count(
        &db,
        "SELECT COUNT(*) FROM dispatch_recipients WHERE unit = 'qn'",
    );
    let scans_held = count(&db, "SELECT COUNT(*) FROM blobs");
    watcher.stop();
    province.stop();

    let mut times: Vec<f64> = outcomes.iter().filter_map(|o| o.session_s).collect();
    times.sort_by(f64::total_cmp);
    let converged = times.len();
    let mut attempts: BTreeMap<u32, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for o in &outcomes {
        *attempts.entry(o.attempts).or_default() += 1;
        for e in &o.errors {
            let short: String = e.chars().take(160).collect();
            *reasons.entry(short).or_default() += 1;
        }
    }
    let flash_s = FLASH.lock().unwrap().flatten();

    println!("\n## Reconnect storm at the province ({})", machine());
    println!("load before/after: {}", load_average());
    println!(
        "{} units dial within {} s (+1 watcher kept connected); {} documents and one {} KiB scan each",
        stormers.len(),
        spread.as_secs(),
        DOCS_PER_UNIT,
        SCAN_BYTES / 1024
    );
    println!("| measure | value |");
    println!("| --- | --- |");
    println!("| setup (init + enrol + writes, in process) | {setup_s:.1} s |");
    println!("| storm wall time | {storm_s:.1} s |");
    println!("| converged units | {converged} of {} |", stormers.len());
    println!(
        "| session time from first dial, p50 / p90 / p99 / max | {:.2} / {:.2} / {:.2} / {:.2} s |",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        percentile(&times, 0.99),
        times.last().copied().unwrap_or(f64::NAN)
    );
    println!("| attempts per unit (attempts: units) | {attempts:?} |");
    let busy_units = outcomes.iter().filter(|o| o.busy > 0).count();
    let busy: u32 = outcomes.iter().map(|o| o.busy).sum();
    let retry_after_max = outcomes
        .iter()
        .map(|o| o.retry_after_max)
        .max()
        .unwrap_or_default();
    let failed: usize = outcomes.iter().map(|o| o.errors.len()).sum();
    println!(
        "| refused for capacity with a retry-after: units / refusals / longest named | {busy_units} / {busy} / {} s |",
        retry_after_max.as_secs()
    );
    println!(
        "| other failed attempts (handshake refused, timed out, not converged: reasons below) | {} |",
        failed - busy as usize
    );
    println!(
        "| province holds the units' documents / scans | {docs_held} of {docs_expected} / {scans_held} of {} |",
        dirs.len()
    );
    println!("| province RSS peak (sampled) / VmHWM | {rss_max:.0} / {hwm:.0} MiB |");
    println!(
        "| flash dispatch to a connected commune during the storm | {} |",
        flash_s.map_or("not within 60 s".into(), |s| format!("{s:.2} s"))
    );
    for (reason, n) in &reasons {
        println!("| failed attempt: {reason} | {n} |");
    }
}

static FLASH: Mutex<Option<Option<f64>>> = Mutex::new(None);
