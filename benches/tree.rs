//! Benchmark: how long a dispatch with a scan takes to reach every commune of a district over
//! simulated bad links, against the ideal (the bytes that had to cross each link over its rate).
//!
//! Real processes (`communesync serve` for the province, the district and every commune), real
//! QUIC, every link through its own `linksim` proxy. Run with
//! `cargo bench --bench tree` (weak 4G, 2 MB scan) or
//! `cargo bench --bench tree -- 2g 262144` (profile, scan bytes).

mod common;
use common::{cs, random_scan, run_line, ServeProcess};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use linksim::{LinkProfile, LinkSim};

fn enrol(province: &Path, data: &Path, unit: &str, role: &str) {
    cs(data, &["init", "--unit", unit, "--role", role]);
    let req = data.with_extension("req");
    let crt = data.with_extension("crt");
    cs(data, &["enrol", "request", "--out", req.to_str().unwrap()]);
    cs(
        province,
        &[
            "ca",
            "issue",
            req.to_str().unwrap(),
            "--unit",
            unit,
            "--role",
            role,
            "--out",
            crt.to_str().unwrap(),
        ],
    );
    cs(data, &["enrol", "install", crt.to_str().unwrap()]);
}

fn has_blob(data: &Path, hash: &[u8]) -> bool {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        data.join("node.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return false;
    };
    conn.query_row("SELECT 1 FROM blobs WHERE hash = ?1", [hash], |_| Ok(()))
        .is_ok()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let profile_name = args.first().cloned().unwrap_or_else(|| "weak4g".into());
    let scan_bytes: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2 << 20);
    let profile = LinkProfile::parse(&profile_name).expect("a linksim profile name or spec");
    let rate_bps = profile.rate_bps.expect("the profile needs a rate") as f64;
    // Taken now: the load at the start is the one that matters, not the load the bench made.
    let started_line = run_line();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| -> PathBuf { tmp.path().join(name) };
    let province = dir("qn");
    cs(&province, &["init", "--unit", "qn", "--role", "province"]);
    cs(&province, &["ca", "init"]);
    let district = dir("district-binhlieu");
    enrol(&province, &district, "qn/binhlieu", "district");
    let communes: Vec<(String, PathBuf)> = [
        "binhlieu", "dongtam", "dongvan", "hoanhmo", "hucdong", "luchon", "tinhhuc", "vongai",
    ]
    .iter()
    .map(|c| (format!("qn/binhlieu/{c}"), dir(c)))
    .collect();
    for (unit, data) in &communes {
        enrol(&province, data, unit, "commune");
    }

    // Every link gets its own simulator, shaped the same way in both directions.
    let province_serve = ServeProcess::start(&province);
    let mut links = Vec::new();
    let up_link = rt
        .block_on(LinkSim::start(
            "127.0.0.1:0".parse().unwrap(),
            province_serve.addr,
            profile.clone(),
            profile.clone(),
            1,
            vec![],
        ))
        .unwrap();
    cs(
        &district,
        &[
            "peer",
            "add",
            "province",
            "--addr",
            &up_link.local_addr().to_string(),
            "--upstream",
        ],
    );
    let district_serve = ServeProcess::start(&district);
    let mut procs = Vec::new();
    for (i, (_, data)) in communes.iter().enumerate() {
        let link = rt
            .block_on(LinkSim::start(
                "127.0.0.1:0".parse().unwrap(),
                district_serve.addr,
                profile.clone(),
                profile.clone(),
                10 + i as u64,
                vec![],
            ))
            .unwrap();
        cs(
            data,
            &[
                "peer",
                "add",
                "district",
                "--addr",
                &link.local_addr().to_string(),
                "--upstream",
            ],
        );
        procs.push(ServeProcess::start(data));
        links.push(link);
    }
    // Let every session come up (handshakes over the slow links) before timing.
    let settle = Instant::now();
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&cs(&district, &["--json", "status"])).unwrap();
        let synced = status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["sync"]["last_sync_at_ms"].is_number())
            .count();
        if synced == communes.len() + 1 || settle.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    let scan = tmp.path().join("scan.jpg");
    let data = random_scan(scan_bytes, 1);
    std::fs::write(&scan, &data).unwrap();
    let hash = *blake3::hash(&data).as_bytes();
    let before: Vec<u64> = std::iter::once(&up_link)
        .chain(links.iter())
        .map(|l| l.stats().down.forwarded_bytes)
        .collect();
    let recipients: Vec<&str> = communes.iter().map(|(u, _)| u.as_str()).collect();
    let mut new_args = vec![
        "dispatch",
        "new",
        "--ref",
        "1/BENCH",
        "--summary",
        "bench",
        "--priority",
        "urgent",
        "--attach",
        scan.to_str().unwrap(),
        "--to",
    ];
    new_args.extend(recipients);
    let t0 = Instant::now();
    cs(&province, &new_args);
    let at_district = loop {
        if has_blob(&district, &hash) {
            break t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut arrived = vec![None; communes.len()];
    while arrived.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(3600) {
        for (i, (_, data)) in communes.iter().enumerate() {
            if arrived[i].is_none() && has_blob(data, &hash) {
                arrived[i] = Some(t0.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let all = arrived
        .iter()
        .map(|a| a.expect("every commune got the scan"))
        .max()
        .unwrap();
    let after: Vec<u64> = std::iter::once(&up_link)
        .chain(links.iter())
        .map(|l| l.stats().down.forwarded_bytes)
        .collect();

    let hop_ideal = scan_bytes as f64 * 8.0 / rate_bps;
    // Cut-through: a relay verifies each 256 KiB chunk before forwarding it, so the least a
    // commune can wait is one hop for the whole scan plus one chunk over its own link.
    let chunk_bytes = scan_bytes.min(communesync::store::blobs::CHUNK_BYTES);
    let ideal = hop_ideal + chunk_bytes as f64 * 8.0 / rate_bps;
    println!("communesync tree benchmark — {profile_name}\n{started_line}");
    println!("scan {scan_bytes} bytes (incompressible) to {} communes of qn/binhlieu; link profile {profile}", communes.len());
    println!("| what | seconds | × ideal |");
    println!("|---|---|---|");
    println!(
        "| province → district (scan complete at the relay) | {:.2} | {:.2} |",
        at_district.as_secs_f64(),
        at_district.as_secs_f64() / hop_ideal
    );
    for (i, (unit, _)) in communes.iter().enumerate() {
        let t = arrived[i].unwrap().as_secs_f64();
        println!("| → {unit} | {t:.2} | {:.2} |", t / ideal);
    }
    println!(
        "| all communes | {:.2} | {:.2} |",
        all.as_secs_f64(),
        all.as_secs_f64() / ideal
    );
    println!("ideal = one hop ({scan_bytes} B × 8 / {rate_bps} bit/s) + one {chunk_bytes}-byte chunk over the commune's link = {ideal:.2} s (cut-through, commune links in parallel; store and forward would take {:.2} s)", 2.0 * hop_ideal);
    println!("bytes delivered downstream per link during the transfer (scan: {scan_bytes}):");
    println!("  province → district: {}", after[0] - before[0]);
    for (i, (unit, _)) in communes.iter().enumerate() {
        println!("  district → {unit}: {}", after[i + 1] - before[i + 1]);
    }
    drop(procs);
}
