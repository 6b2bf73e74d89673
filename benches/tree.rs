//! Benchmark: how long a dispatch with a scan takes to reach every commune of a district over
//! simulated bad links, against the ideal (the bytes that had to cross each link over its rate).
//!
//! Real processes (`communesync serve` for the province, the district and every commune), real
//! QUIC, every link through its own `linksim` proxy. Run with
//! `cargo bench --bench tree` (weak 4G, 2 MB scan) or
//! `cargo bench --bench tree -- 2g 262144` (profile, scan bytes).

mod common;
use common::{load_average, machine};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use linksim::{LinkProfile, LinkSim};
use rand::RngCore;

const BIN: &str = env!("CARGO_BIN_EXE_communesync");

/// A child process stopped (SIGTERM, then kill) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cs(data: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run communesync");
    assert!(
        out.status.success(),
        "communesync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(data: &Path, port: u16) -> Proc {
    let log = std::fs::File::create(data.with_extension("log")).unwrap();
    let child = Command::new(BIN)
        .arg("--data")
        .arg(data)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("COMMUNESYNC_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn serve");
    Proc(child)
}

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
    let (p_port, d_port) = (free_port(), free_port());
    let _p = serve(&province, p_port);
    let mut links = Vec::new();
    let up_link = rt
        .block_on(LinkSim::start(
            "127.0.0.1:0".parse().unwrap(),
            format!("127.0.0.1:{p_port}").parse().unwrap(),
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
    let _d = serve(&district, d_port);
    let mut procs = Vec::new();
    for (i, (_, data)) in communes.iter().enumerate() {
        let link = rt
            .block_on(LinkSim::start(
                "127.0.0.1:0".parse().unwrap(),
                format!("127.0.0.1:{d_port}").parse().unwrap(),
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
        procs.push(serve(data, free_port()));
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
    let mut data = vec![0u8; scan_bytes];
    rand::rng().fill_bytes(&mut data);
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
    println!(
        "communesync tree benchmark — {} — {}, load average {}",
        profile_name,
        machine(),
        load_average()
    );
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
