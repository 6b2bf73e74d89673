//! What the benchmarks share: the header every one prints about the machine it ran on (these
//! machines are shared, and the figures only mean something beside the CPU and the load they
//! were taken under), the synthetic scans, and the real binary run as a command or a daemon.

// Each bench includes this module and uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use communesync::node::{now_ms, Node};
use communesync::trust::PeerIdentity;
use communesync::units::Role;
use rand::{RngCore, SeedableRng};

#[path = "../../tests/util/proc.rs"]
mod proc;
#[allow(unused_imports)] // each bench uses a part
pub use proc::{memory_kib, memory_mib, ms};

/// The binary Cargo built for the benches.
pub const BIN: &str = env!("CARGO_BIN_EXE_communesync");

/// How long a stopped daemon may take to shut down cleanly before it is killed.
const SERVE_STOP_MAX: Duration = Duration::from_secs(10);

/// CPU model, cores and memory, e.g. "nproc 2, CPU AMD EPYC, 24 GiB RAM".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("nproc {cores}, CPU {cpu}, {mem_gb:.0} GiB RAM")
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The line every bench prints first under its title: when, on what, under which load, and
/// whether the build was optimised.
pub fn run_line() -> String {
    format!(
        "date {} UTC, machine {}, load average {} at start, profile {}",
        time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("zero ns"),
        machine(),
        load_average(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release (bench)"
        }
    )
}

/// A synthetic greyscale multi-page scan (PGM pages, A4 at 150 dpi): paper with sensor noise,
/// lines of word-like ink runs; every seed differs, so nothing deduplicates.
pub fn greyscale_scan(bytes: usize, seed: u64) -> Vec<u8> {
    let (w, h) = (1240usize, 1754usize);
    let mut out = Vec::with_capacity(bytes + w * h);
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    while out.len() < bytes {
        out.extend_from_slice(format!("P5\n{w} {h}\n255\n").as_bytes());
        // Per line: ink columns as runs (words) with gaps, chosen once per line.
        let mut line_ink = vec![false; w];
        for y in 0..h {
            let row = y % 36;
            if row == 0 {
                line_ink.fill(false);
                if (120..h - 150).contains(&y) && next() % 10 != 0 {
                    let mut x = 110 + (next() % 40) as usize;
                    let end = w - 110 - (next() % 300) as usize;
                    while x < end {
                        let word = 15 + (next() % 70) as usize;
                        line_ink[x..(x + word).min(end)].fill(true);
                        x += word + 10 + (next() % 8) as usize;
                    }
                }
            }
            let in_text = (8..24).contains(&row);
            for (x, &ink) in line_ink.iter().enumerate() {
                let r = next();
                let glyph = ink && in_text && (x + row / 3) % 6 < 3 && r % 5 != 0;
                out.push(if glyph {
                    35 + (r % 24) as u8
                } else {
                    232 + ((r >> 8) % 6) as u8
                });
            }
        }
    }
    out.truncate(bytes);
    out
}

/// Bytes that do not compress, like a JPEG or most PDFs.
pub fn random_scan(bytes: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// A node of `unit` initialised in `dir` and opened.
/// Ids of the documents the node in `dir` holds, sorted (read only, beside a running daemon).
pub fn doc_ids(dir: &Path) -> Vec<String> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join(communesync::node::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open db");
    let mut stmt = conn
        .prepare("SELECT id FROM docs ORDER BY id")
        .expect("sql");
    let ids = stmt
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<rusqlite::Result<Vec<String>>>()
        .expect("rows");
    ids
}

pub fn new_node(dir: &Path, unit: &str, role: Role) -> Node {
    Node::init(dir, unit, role, "admin").expect("init");
    Node::open(dir).expect("open")
}

/// The binary on the node in `data`, with `args`.
pub fn command(data: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data").arg(data).args(args);
    cmd
}

/// Runs the binary on the node in `data`, asserting success; returns its stdout.
pub fn cs(data: &Path, args: &[&str]) -> String {
    let out = command(data, args).output().expect("run communesync");
    assert!(
        out.status.success(),
        "communesync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `communesync serve` as a child process on a free loopback port, stopped (SIGTERM, then
/// killed if it lingers) when dropped.
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
    log: Option<JoinHandle<String>>,
}

impl ServeProcess {
    pub fn start(dir: &Path) -> ServeProcess {
        let mut child = command(dir, &["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        // It announces "communesync serving UNIT on ADDR" once listening.
        let addr = loop {
            let mut line = String::new();
            assert!(
                err.read_line(&mut line).expect("serve stderr") > 0,
                "serve exited"
            );
            if line.contains("serving") {
                if let Some(a) = line
                    .trim()
                    .rsplit(" on ")
                    .next()
                    .and_then(|a| a.parse().ok())
                {
                    break a;
                }
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        let log = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            rest
        });
        ServeProcess {
            child,
            addr,
            log: Some(log),
        }
    }

    /// SIGTERM, on which `serve` shuts down gracefully.
    pub fn terminate(&mut self) {
        // A child already waited for may have handed its pid on to another process.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child process by its pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Stops it (if still running) and returns its log.
    pub fn stop(mut self) -> String {
        self.shut_down();
        self.log
            .take()
            .and_then(|log| log.join().ok())
            .unwrap_or_default()
    }

    fn shut_down(&mut self) {
        self.terminate();
        let deadline = Instant::now() + SERVE_STOP_MAX;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if self.log.is_some() {
            self.shut_down();
        }
    }
}

/// How an enrolled node appears to a peer: what its certificate says.
pub fn identity(node: &Node) -> PeerIdentity {
    PeerIdentity::from_cert_der(&node.own_cert_der().expect("enrolled")).expect("certificate")
}

/// What a TLS handshake and first contact leave on both sides of a protocol-level session:
/// each node holds the other's certificate (to check the signatures of the changes it made)
/// and has recorded the other as a node it met. Returns how each sees the other.
pub fn introduce(a: &mut Node, b: &mut Node) -> (PeerIdentity, PeerIdentity) {
    let (a_sees, b_sees) = (identity(b), identity(a));
    let (a_der, b_der) = (
        a.own_cert_der().expect("enrolled"),
        b.own_cert_der().expect("enrolled"),
    );
    a.learn_cert(&b_der).expect("peer certificate");
    b.learn_cert(&a_der).expect("peer certificate");
    for (node, peer) in [(a, &a_sees), (b, &b_sees)] {
        node.store
            .write(|tx| {
                tx.peer_touch(
                    &peer.node_id.to_string(),
                    &peer.unit,
                    peer.role.as_str(),
                    now_ms(),
                )
            })
            .expect("record contact");
    }
    (a_sees, b_sees)
}

/// Enrols `node` with the province's CA, as `enrol request`, `ca issue` and `enrol install`
/// would; the request and certificate files go to `scratch`.
pub fn enrol_with(province: &Node, node: &mut Node, scratch: &Path) {
    let (req, crt) = (scratch.join("enrol.req"), scratch.join("enrol.crt"));
    node.enrol_request(&req).expect("enrol request");
    province
        .ca_issue(&req, node.unit(), node.role(), &crt)
        .expect("ca issue");
    node.enrol_install(&crt).expect("enrol install");
}
