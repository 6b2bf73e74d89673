//! Sync benchmark against the hard numbers of DESIGN.md: reconnect cost at the protocol level
//! (two `Session`s over `NodeReplica`s, no sockets, frames counted), the same over real QUIC on
//! loopback, scan throughput on loopback and through linksim at weak 4G, and the peak RSS of real
//! `communesync` processes. Prints Markdown tables.
//!
//! `cargo bench --bench sync [-- SCENARIO... N... key=value...]`, where SCENARIO is `reconnect`,
//! `quic`, `link`, `scan`, `weak4g`, `urgent`, `outage` or `memory` (default: all), N a
//! province size for `reconnect` (default 100000 1000000; `quic` and `memory` use the largest,
//! `link` the smallest), and the keys `scan-mb=200`, `weak-mb=2`, `urgent-mb=4`,
//! `outage-mb=8`, `outage-s=60`, `memory-mb=1024`, `regen=1` (rebuild the cached provinces).

mod common;
use common::{
    command, doc_ids, greyscale_scan, load_average, ms, new_node, random_scan, run_line,
    ServeProcess,
};

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use communesync::model::dispatch::{self, DispatchKind, NewDispatch, Priority};
use communesync::model::{DocId, DocKind};
use communesync::net::{self, SessionReport};
use communesync::node::replica::NodeReplica;
use communesync::node::{admin, now_ms, DispatchRequest, Node, DB_FILE, KEY_FILE};
use communesync::proto::blob::{encode_chunk, LEVEL_RAW};
use communesync::proto::{wire, Action, DocChanges, DocHeads, Frame, Session};
use communesync::service::{self, path};
use communesync::store::SCHEMA_VERSION;
use communesync::trust::{Crl, NodeKey, PeerIdentity, TlsMaterial};
use communesync::units::Role;
use linksim::{Direction, LinkProfile, LinkSim};

const COMMUNE: &str = "qn/binhlieu/tinhhuc";
const SIBLING: &str = "qn/binhlieu/hucdong";
/// Documents addressed to the commune in every province, whatever its size.
const SCOPE_DOCS: usize = 10_000;
/// Documents changed on each side before the "changed" reconnect.
const CHANGED_DOCS: usize = 100;
/// Documents created per transaction while populating a province.
const POPULATE_BATCH: usize = 10_000;
/// Other dispatches built through the library; the rest of a province copies their rows.
const FILLER_TEMPLATES: usize = 10_000;
/// zstd level the network layer uses for control frames (`net::CONTROL_LEVEL`).
const CONTROL_LEVEL: i32 = 3;
/// One-way legs after which a protocol exchange is declared stuck.
const LEGS_MAX: usize = 64;
/// Segments compressed in parallel for the `zstd -19` reference (larger than its 8 MiB window).
const ZSTD_SEGMENT_BYTES: usize = 16 << 20;
/// Prefix of a large scan whose `zstd -19` size stands for the whole file's.
const ZSTD_SAMPLE_BYTES: usize = 32 << 20;
/// Chunk size of the scan store and the wire (`store::blobs::CHUNK_BYTES`).
const CHUNK_BYTES: usize = 256 * 1024;
const WEAK_4G_RATE_BPS: f64 = 1_000_000.0;
/// UDP bytes per byte of stream payload in full 1,452–1,472-byte QUIC packets towards a client with
/// zero-length connection ids, as the `scan` scenario measures for incompressible data on
/// loopback (1.0173–1.0175; 1.0233 with 8-byte ids).
const QUIC_UDP_PER_PAYLOAD: f64 = 1.0174;

const FIRST_SYNC_S_MAX: f64 = 2.0;
const RECONNECT_BYTES_MAX: u64 = 2_000;
const CHANGED_SLACK_BYTES: u64 = 64 * 1024;
const LOOPBACK_MB_S_MIN: f64 = 200.0;
const INCOMPRESSIBLE_OVERHEAD_MAX: f64 = 0.005;
const ZSTD19_RATIO_MAX: f64 = 1.05;
const GOODPUT_MIN: f64 = 0.90;
const COMMUNE_RSS_MB_MAX: f64 = 64.0;
const PROVINCE_RSS_MB_MAX: f64 = 512.0;

fn main() {
    let opts = Opts::parse();
    let started = Instant::now();
    std::fs::create_dir_all(data_root()).expect("bench data directory");
    println!("# communesync sync benchmark\n\n{}\n", run_line());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let largest = *opts.sizes.iter().max().expect("at least one size");
    if opts.wants("reconnect") {
        for &n in &opts.sizes {
            reconnect_protocol(&opts, n);
        }
    }
    if opts.wants("quic") {
        rt.block_on(reconnect_quic(&opts, largest));
    }
    if opts.wants("link") {
        let smallest = *opts.sizes.iter().min().expect("at least one size");
        rt.block_on(reconnect_link(&opts, smallest));
    }
    if opts.wants("scan") {
        rt.block_on(scan_loopback(opts.scan_mb));
    }
    if opts.wants("weak4g") {
        rt.block_on(scan_weak_4g(opts.weak_mb));
    }
    if opts.wants("urgent") {
        rt.block_on(urgent_weak_4g(opts.urgent_mb));
    }
    if opts.wants("outage") {
        rt.block_on(outage_weak_4g(opts.outage_mb, opts.outage_s));
    }
    if opts.wants("memory") {
        memory(&opts, largest);
    }
    println!(
        "\ntotal bench time {:.0} s, load average at the end {}",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

struct Opts {
    scenarios: Vec<String>,
    sizes: Vec<usize>,
    scan_mb: usize,
    weak_mb: usize,
    urgent_mb: usize,
    outage_mb: usize,
    outage_s: u64,
    memory_mb: usize,
    regen: bool,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            scenarios: Vec::new(),
            sizes: Vec::new(),
            scan_mb: 200,
            weak_mb: 2,
            urgent_mb: 4,
            outage_mb: 8,
            outage_s: 60,
            memory_mb: 1024,
            regen: false,
        };
        // `cargo bench` appends `--bench`; ignore flags.
        for arg in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
            let num = |v: &str| v.parse::<usize>().expect("a number");
            match arg.split_once('=') {
                Some(("scan-mb", v)) => o.scan_mb = num(v),
                Some(("weak-mb", v)) => o.weak_mb = num(v),
                Some(("urgent-mb", v)) => o.urgent_mb = num(v),
                Some(("outage-mb", v)) => o.outage_mb = num(v),
                Some(("outage-s", v)) => o.outage_s = num(v) as u64,
                Some(("memory-mb", v)) => o.memory_mb = num(v),
                Some(("regen", v)) => o.regen = v != "0",
                Some(_) => panic!("unknown option {arg}"),
                None if arg.chars().all(|c| c.is_ascii_digit()) => {
                    let n = num(&arg);
                    assert!(
                        n >= SCOPE_DOCS && n % SCOPE_DOCS == 0,
                        "province size must be a multiple of {SCOPE_DOCS}"
                    );
                    o.sizes.push(n);
                }
                None => o.scenarios.push(arg),
            }
        }
        if o.sizes.is_empty() {
            o.sizes = vec![100_000, 1_000_000];
        }
        o
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.is_empty() || self.scenarios.iter().any(|s| s == scenario)
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data")
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sync-")
        .tempdir_in(data_root())
        .expect("scratch directory")
}

/// Communes other than ours that the rest of the province's dispatches go to: the real Bình
/// Liêu ones and synthetic ones under the other districts (about 180 in all, as in Quảng Ninh).
fn other_communes() -> Vec<String> {
    let districts = [
        "halong",
        "campha",
        "uongbi",
        "mongcai",
        "dongtrieu",
        "quangyen",
        "bache",
        "coto",
        "damha",
        "haiha",
        "hoanhbo",
        "tienyen",
        "vandon",
    ];
    let mut out: Vec<String> = [
        "binhlieu", "dongtam", "dongvan", "hoanhmo", "hucdong", "luchon", "vohai",
    ]
    .iter()
    .map(|c| format!("qn/binhlieu/{c}"))
    .collect();
    for d in districts {
        for k in 0..13 {
            out.push(format!("qn/{d}/xa{k:02}"));
        }
    }
    out
}

const SUMMARIES: &[&str] = &[
    "Về việc triển khai kế hoạch phòng chống thiên tai và tìm kiếm cứu nạn",
    "Về việc báo cáo kết quả thực hiện chương trình nông thôn mới",
    "Về việc tăng cường công tác phòng cháy chữa cháy rừng mùa khô",
    "Về việc tổ chức tiêm chủng mở rộng cho trẻ em dưới 5 tuổi",
    "Về việc rà soát hộ nghèo, hộ cận nghèo theo chuẩn đa chiều",
];

/// A province node with `n` dispatches, `SCOPE_DOCS` of them addressed to our commune, spread
/// evenly through the feed; generated once and cached (with its CA) under target/bench-data.
///
/// Building an Automerge dispatch costs about 1.8 ms here, so only the scope and
/// `FILLER_TEMPLATES` other dispatches are built through the library (`tx.create_doc`, batched);
/// the rest of the province are SQL copies of those templates' rows under new ids (every table
/// with a `doc_id` or text `id` column), then the feed is renumbered to interleave the scope.
/// Copies are never loaded: a commune's sync reads only their feed and party rows.
/// A cached province of `n` dispatches at this build's schema version. Several worktrees share
/// the cache, each at its own version, so a cached copy is never migrated in place: a new
/// version starts from a copy of an older one, migrated.
fn province_fixture(opts: &Opts, n: usize) -> PathBuf {
    let name = format!("province-{n}-v{SCHEMA_VERSION}");
    let dir = data_root().join(&name);
    let done = data_root().join(format!("{name}.complete"));
    if done.exists() && !opts.regen {
        println!(
            "province of {n} dispatches: cached in {} (generated in {} s)",
            dir.display(),
            std::fs::read_to_string(&done).unwrap_or_default().trim()
        );
        return dir;
    }
    let _ = std::fs::remove_file(&done);
    let _ = std::fs::remove_dir_all(&dir);
    let started = Instant::now();
    let older = (!opts.regen)
        .then(|| {
            (1..SCHEMA_VERSION)
                .rev()
                .map(|v| format!("province-{n}-v{v}"))
                .chain([format!("province-{n}")])
                .find(|old| data_root().join(format!("{old}.complete")).exists())
        })
        .flatten();
    if let Some(old) = older {
        copy_dir(&data_root().join(&old), &dir);
        drop(Node::open(&dir).expect("migrate the cached province"));
        let secs = started.elapsed().as_secs_f64();
        std::fs::write(
            &done,
            format!("{secs:.1} (copied from {old} and migrated)\n"),
        )
        .expect("marker");
        println!("province of {n} dispatches: {old} copied and migrated in {secs:.1} s");
        return dir;
    }
    Node::init(&dir, "qn", Role::Province, "admin").expect("init province");
    let mut node = Node::open(&dir).expect("open province");
    node.ca_init().expect("ca init");
    let author = node.author(None).expect("author");
    let actor = node.actor().clone();
    let others = other_communes();
    let templates = FILLER_TEMPLATES.min(n - SCOPE_DOCS);
    let built = SCOPE_DOCS + templates;
    let (mut scope, mut fillers) = (Vec::new(), Vec::new());
    for batch in 0..built.div_ceil(POPULATE_BATCH) {
        node.store
            .write(|tx| {
                for k in batch * POPULATE_BATCH..((batch + 1) * POPULATE_BATCH).min(built) {
                    let ours = k < SCOPE_DOCS;
                    let to = if ours {
                        if k % 3 == 0 {
                            vec![COMMUNE.to_string(), SIBLING.to_string()]
                        } else {
                            vec![COMMUNE.to_string()]
                        }
                    } else if k % 4 == 0 {
                        let mut two = vec![
                            others[k % others.len()].clone(),
                            others[(k / 7) % others.len()].clone(),
                        ];
                        two.sort();
                        two.dedup();
                        two
                    } else {
                        vec![others[k % others.len()].clone()]
                    };
                    let new = NewDispatch {
                        ref_no: format!("{}/UBND-VP", k + 1),
                        summary: SUMMARIES[k % SUMMARIES.len()].to_string(),
                        kind: if k % 5 == 0 {
                            DispatchKind::Directive
                        } else {
                            DispatchKind::Dispatch
                        },
                        priority: if k % 20 == 0 {
                            Priority::Urgent
                        } else {
                            Priority::Normal
                        },
                        issuer: "qn".into(),
                        to,
                        attachments: vec![],
                    };
                    // Templates' ids carry 0000 where their copies carry the copy number.
                    let id = if ours {
                        DocId::generate(DocKind::Dispatch)
                    } else {
                        format!("dsp_0000{:012x}", rand::random::<u64>() >> 16)
                            .parse()
                            .expect("id")
                    };
                    let at_ms = now_ms();
                    tx.create_doc(&id, &actor, at_ms, |doc| {
                        Ok(dispatch::create(doc, &id, &new, &author, at_ms)?)
                    })?;
                    if ours { &mut scope } else { &mut fillers }.push(id.to_string());
                }
                Ok(())
            })
            .expect("populate");
    }
    drop(node);
    let library_secs = started.elapsed().as_secs_f64();
    clone_fillers(&dir.join(DB_FILE), n, &scope, &fillers);
    let secs = started.elapsed().as_secs_f64();
    std::fs::write(&done, format!("{secs:.1}\n")).expect("marker");
    println!(
        "province of {n} dispatches: generated in {secs:.1} s ({built} built through the library in batches of {POPULATE_BATCH} in {library_secs:.1} s, {} copied in SQL), node.db {}",
        n - built,
        mb(db_bytes(&dir) as f64)
    );
    dir
}

/// Copies the filler templates' rows until the store holds `n` documents, then renumbers the
/// feed so the scope documents sit evenly among the others.
fn clone_fillers(db: &Path, n: usize, scope: &[String], templates: &[String]) {
    let mut conn = rusqlite::Connection::open(db).expect("open db");
    let tx = conn.transaction().expect("tx");
    tx.execute_batch("CREATE TEMP TABLE tpl (id TEXT PRIMARY KEY)")
        .expect("temp table");
    for id in templates {
        tx.execute("INSERT INTO tpl (id) VALUES (?1)", [id])
            .expect("tpl");
    }
    // Every table holding per-document rows, and the column naming the document.
    let tables: Vec<String> = {
        let mut stmt = tx
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .expect("sql");
        let names = stmt.query_map([], |r| r.get(0)).expect("q");
        names.collect::<rusqlite::Result<_>>().expect("rows")
    };
    let mut plans = Vec::new();
    for table in tables {
        let mut stmt = tx
            .prepare(&format!("PRAGMA table_info({table})"))
            .expect("pragma");
        let cols: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(1)?, r.get(2)?)))
            .expect("q")
            .collect::<rusqlite::Result<_>>()
            .expect("rows");
        let key = cols.iter().find_map(|(c, ty)| {
            (c == "doc_id" || (c == "id" && ty.eq_ignore_ascii_case("TEXT"))).then(|| c.clone())
        });
        // The per-subtree feed is keyed by feed position: rebuilt once the feed is renumbered.
        if let Some(key) = key.filter(|_| table != "doc_scopes") {
            plans.push((
                table,
                key,
                cols.into_iter().map(|(c, _)| c).collect::<Vec<_>>(),
            ));
        }
    }
    let copies = (n - scope.len()) / templates.len().max(1);
    for r in 1..copies {
        for (table, key, cols) in &plans {
            let list = cols.join(", ");
            let exprs: Vec<String> = cols
                .iter()
                .map(|c| {
                    if c == key {
                        format!("substr({c}, 1, 4) || printf('%04x', ?1) || substr({c}, 9)")
                    } else {
                        c.clone()
                    }
                })
                .collect();
            tx.execute(
                &format!(
                    "INSERT INTO {table} ({list}) SELECT {} FROM {table} WHERE {key} IN (SELECT id FROM tpl)",
                    exprs.join(", ")
                ),
                [r as i64],
            )
            .expect("copy rows");
        }
    }
    // Feed order: one scope document in the middle of every n / SCOPE_DOCS.
    let stride = n / SCOPE_DOCS;
    let others: Vec<String> = {
        let mut stmt = tx.prepare("SELECT id FROM docs").expect("sql");
        let ids = stmt.query_map([], |r| r.get::<_, String>(0)).expect("q");
        let scope_set: std::collections::HashSet<&str> = scope.iter().map(String::as_str).collect();
        ids.map(|r| r.expect("row"))
            .filter(|id| !scope_set.contains(id.as_str()))
            .collect()
    };
    assert_eq!(
        others.len() + scope.len(),
        n,
        "province holds {n} documents"
    );
    {
        let mut set = tx
            .prepare("UPDATE docs SET seq = ?2 WHERE id = ?1")
            .expect("sql");
        let (mut ours, mut rest) = (scope.iter(), others.iter());
        for seq in 0..n {
            let id = if seq % stride == stride / 2 {
                ours.next()
            } else {
                rest.next()
            }
            .expect("ids enough");
            set.execute(rusqlite::params![id, seq as i64 + 1])
                .expect("seq");
        }
    }
    tx.execute("UPDATE feed SET seq = ?1", [n as i64])
        .expect("feed");
    tx.execute("DELETE FROM doc_scopes", [])
        .expect("doc_scopes");
    communesync::store::index::rebuild_scopes(&tx, db).expect("doc_scopes");
    tx.commit().expect("commit");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A writable copy of a cached province.
fn province_copy(fixture: &Path, into: &Path) -> PathBuf {
    let started = Instant::now();
    let dir = into.join("province");
    copy_dir(fixture, &dir);
    println!(
        "copied the province ({}) in {:.1} s",
        mb(db_bytes(&dir) as f64),
        started.elapsed().as_secs_f64()
    );
    dir
}

fn db_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(DB_FILE)).map_or(0, |m| m.len())
}

/// A fresh province with its CA and nothing else.
fn empty_province(dir: &Path) -> PathBuf {
    new_node(dir, "qn", Role::Province)
        .ca_init()
        .expect("ca init");
    dir.to_path_buf()
}

/// A fresh commune enrolled with `province`, its upstream peer at `addr`.
fn enrolled_commune(province: &Path, dir: &Path, addr: SocketAddr) -> PathBuf {
    let mut c = new_node(dir, COMMUNE, Role::Commune);
    let req = dir.with_extension("req");
    let cert = dir.with_extension("crt");
    c.enrol_request(&req).expect("enrol request");
    Node::open(province)
        .expect("open province")
        .ca_issue(&req, COMMUNE, Role::Commune, &cert)
        .expect("ca issue");
    c.enrol_install(&cert).expect("enrol install");
    c.peer_add("up", &addr.to_string(), true).expect("peer add");
    dir.to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// Protocol level: two sessions, no sockets

/// One node and how its peer appears to it (what the peer's certificate would say).
struct Party {
    node: Node,
    peer: PeerIdentity,
}

fn meet(mut province: Node, mut commune: Node) -> (Party, Party) {
    let (p_sees, c_sees) = common::introduce(&mut province, &mut commune);
    (
        Party {
            node: province,
            peer: p_sees,
        },
        Party {
            node: commune,
            peer: c_sees,
        },
    )
}

/// What one protocol exchange cost.
#[derive(Default)]
struct Exchange {
    /// One-way legs: both sides send everything they can, then read everything that arrived.
    legs: usize,
    frames: usize,
    bytes_down: u64,
    bytes_up: u64,
    docs_down: u64,
    docs_up: u64,
    elapsed: Duration,
    /// CPU time of the process, which runs both sides: steadier than `elapsed` on a shared
    /// machine.
    cpu: Duration,
    /// The part of `cpu` each side spent (encoding, decoding and handling its frames).
    province_cpu: Duration,
    commune_cpu: Duration,
}

impl Exchange {
    fn bytes(&self) -> u64 {
        self.bytes_down + self.bytes_up
    }
    fn round_trips(&self) -> usize {
        self.legs.div_ceil(2)
    }
}

/// Everything a session has to send now, encoded as the network layer would.
fn drain(session: &mut Session, party: &mut Party) -> Vec<Vec<u8>> {
    let mut replica = NodeReplica::new(&mut party.node, party.peer.clone());
    let mut out = Vec::new();
    while let Some(frame) = session.poll_frame(&mut replica).expect("poll_frame") {
        out.push(wire::encode(&frame, CONTROL_LEVEL));
    }
    while let Some(action) = session.poll_action() {
        assert!(
            !matches!(action, Action::SendBlob { .. }),
            "protocol scenarios carry no scans"
        );
    }
    out
}

fn deliver(session: &mut Session, party: &mut Party, frames: Vec<Vec<u8>>) {
    let mut replica = NodeReplica::new(&mut party.node, party.peer.clone());
    for bytes in frames {
        let frame = wire::decode(&bytes[4..]).expect("decode");
        session.handle(&mut replica, frame).expect("handle");
    }
}

/// Runs one session between province and commune, delivering each side's flight at once.
fn exchange(p: &mut Party, c: &mut Party) -> Exchange {
    let started = Instant::now();
    let cpu_started = process_cpu();
    let mut sp = Session::new(&mut NodeReplica::new(&mut p.node, p.peer.clone()), 0).expect("s");
    let mut sc = Session::new(&mut NodeReplica::new(&mut c.node, c.peer.clone()), 0).expect("s");
    let mut x = Exchange::default();
    let timed = |spent: &mut Duration, f: &mut dyn FnMut()| {
        let t = process_cpu();
        f();
        *spent += process_cpu() - t;
    };
    loop {
        let (mut down, mut up) = (Vec::new(), Vec::new());
        timed(&mut x.province_cpu, &mut || down = drain(&mut sp, p));
        timed(&mut x.commune_cpu, &mut || up = drain(&mut sc, c));
        if down.is_empty() && up.is_empty() {
            break;
        }
        x.legs += 1;
        assert!(x.legs <= LEGS_MAX, "exchange does not end");
        x.frames += down.len() + up.len();
        x.bytes_down += down.iter().map(|f| f.len() as u64).sum::<u64>();
        x.bytes_up += up.iter().map(|f| f.len() as u64).sum::<u64>();
        timed(&mut x.commune_cpu, &mut || {
            deliver(&mut sc, c, std::mem::take(&mut down))
        });
        timed(&mut x.province_cpu, &mut || {
            deliver(&mut sp, p, std::mem::take(&mut up))
        });
    }
    x.elapsed = started.elapsed();
    x.cpu = process_cpu() - cpu_started;
    assert!(sp.is_done() && sc.is_done(), "both sides converge");
    x.docs_down = sc.stats.docs_received;
    x.docs_up = sp.stats.docs_received;
    x
}

/// CPU time the calling thread has used so far.
/// CPU time of the whole process: the bench thread and any thread a side starts (the commune
/// checks incoming documents on a second thread).
fn process_cpu() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn heads_of(node: &Node, id: &str) -> Vec<u8> {
    node.store.doc_heads(id).expect("heads").unwrap_or_default()
}

/// Bytes of the changes made since `before` (heads per doc), as `save_after` encodes them.
fn change_bytes(node: &mut Node, before: &[(DocId, Vec<automerge::ChangeHash>)]) -> u64 {
    before
        .iter()
        .map(|(id, heads)| {
            node.store
                .read_doc(id, |doc| doc.save_after(heads).len() as u64)
                .expect("read")
        })
        .sum()
}

fn automerge_heads(node: &mut Node, id: &DocId) -> Vec<automerge::ChangeHash> {
    node.store
        .read_doc(id, |doc| doc.get_heads())
        .expect("read")
}

fn reconnect_protocol(opts: &Opts, n: usize) {
    println!("\n## Reconnect cost, protocol level, province of {n} dispatches\n");
    let fixture = province_fixture(opts, n);
    let tmp = scratch();
    let province = Node::open(&province_copy(&fixture, tmp.path())).expect("open province");
    let commune_dir = tmp.path().join("commune");
    let mut commune = new_node(&commune_dir, COMMUNE, Role::Commune);
    let (req, cert) = (
        commune_dir.with_extension("req"),
        commune_dir.with_extension("crt"),
    );
    commune.enrol_request(&req).expect("enrol request");
    province
        .ca_issue(&req, COMMUNE, Role::Commune, &cert)
        .expect("ca issue");
    commune.enrol_install(&cert).expect("enrol install");
    let (mut p, mut c) = meet(province, commune);

    let first = exchange(&mut p, &mut c);
    let ids: Vec<DocId> = doc_ids(&tmp.path().join("commune"))
        .iter()
        .map(|s| s.parse().expect("id"))
        .collect();
    let saved: u64 = ids
        .iter()
        .map(|id| {
            p.node
                .store
                .read_doc(id, |doc| doc.save().len() as u64)
                .expect("read")
        })
        .sum();
    let again1 = exchange(&mut p, &mut c);
    let again2 = exchange(&mut p, &mut c);

    // 100 receipts at the commune, 100 comments at the province, on different documents.
    let (ours, theirs) = (&ids[..CHANGED_DOCS], &ids[CHANGED_DOCS..2 * CHANGED_DOCS]);
    let before_c: Vec<_> = ours
        .iter()
        .map(|id| (id.clone(), automerge_heads(&mut c.node, id)))
        .collect();
    let before_p: Vec<_> = theirs
        .iter()
        .map(|id| (id.clone(), automerge_heads(&mut p.node, id)))
        .collect();
    for id in ours {
        c.node.dispatch_receive(None, id.as_str()).expect("receive");
    }
    for id in theirs {
        p.node
            .dispatch_comment(
                None,
                id.as_str(),
                "Đề nghị xã báo cáo trước ngày 15 tháng này.",
            )
            .expect("comment");
    }
    let changes = change_bytes(&mut c.node, &before_c) + change_bytes(&mut p.node, &before_p);
    let changed = exchange(&mut p, &mut c);
    for id in ours.iter().chain(theirs) {
        assert_eq!(
            heads_of(&p.node, id.as_str()),
            heads_of(&c.node, id.as_str()),
            "{id} converged"
        );
    }
    let after_changed = exchange(&mut p, &mut c);

    // The same 100 documents edited on both sides while apart: concurrent changes to merge.
    let both = &ids[2 * CHANGED_DOCS..3 * CHANGED_DOCS];
    let before: Vec<_> = both
        .iter()
        .map(|id| (id.clone(), automerge_heads(&mut c.node, id)))
        .collect();
    for id in both {
        c.node
            .dispatch_comment(None, id.as_str(), "Xã đã nhận, đang triển khai.")
            .expect("comment");
        p.node
            .dispatch_comment(None, id.as_str(), "Đề nghị báo cáo kết quả.")
            .expect("comment");
    }
    let concurrent_changes =
        change_bytes(&mut c.node, &before) + change_bytes(&mut p.node, &before);
    let concurrent = exchange(&mut p, &mut c);
    for id in both {
        assert_eq!(
            heads_of(&p.node, id.as_str()),
            heads_of(&c.node, id.as_str()),
            "{id} converged"
        );
    }

    println!(
        "\nscope: {} documents; their Automerge `save()` sizes sum to {}; changes made for (c): {} ({} docs each side)\n",
        ids.len(),
        kb(saved),
        kb(changes),
        CHANGED_DOCS
    );
    println!("| exchange | legs (round trips) | frames | bytes down / up | total bytes | docs down / up | time | bar |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let row = |what: &str, x: &Exchange, bar: String| {
        println!(
            "| {what} | {} ({}) | {} | {} / {} | {} | {} / {} | {:.0} ms ({:.0} ms CPU: province {:.0}, commune {:.0}) | {bar} |",
            x.legs,
            x.round_trips(),
            x.frames,
            x.bytes_down,
            x.bytes_up,
            x.bytes(),
            x.docs_down,
            x.docs_up,
            x.elapsed.as_secs_f64() * 1e3,
            x.cpu.as_secs_f64() * 1e3,
            x.province_cpu.as_secs_f64() * 1e3,
            x.commune_cpu.as_secs_f64() * 1e3
        )
    };
    row(
        "(a) first sync of the commune's scope",
        &first,
        format!(
            "bytes < save() {}: {}; ≤ {FIRST_SYNC_S_MAX} s: {} (one process, both sides)",
            kb(saved),
            met(first.bytes() < saved),
            met(first.elapsed.as_secs_f64() <= FIRST_SYNC_S_MAX)
        ),
    );
    let unchanged_bar = |x: &Exchange| {
        format!(
            "≤ 1 round trip: {}; ≤ {RECONNECT_BYTES_MAX} B: {}",
            met(x.round_trips() <= 1),
            met(x.bytes() <= RECONNECT_BYTES_MAX)
        )
    };
    row(
        "(b) reconnect, nothing changed (1st after the first sync)",
        &again1,
        unchanged_bar(&again1),
    );
    row(
        "(b) reconnect, nothing changed (2nd)",
        &again2,
        unchanged_bar(&again2),
    );
    row(
        "(c) reconnect, 100 docs changed on each side",
        &changed,
        format!(
            "≤ 3 round trips: {}; ≤ changes + 64 KiB = {}: {}",
            met(changed.round_trips() <= 3),
            kb(changes + CHANGED_SLACK_BYTES),
            met(changed.bytes() <= changes + CHANGED_SLACK_BYTES)
        ),
    );
    row(
        "(b) reconnect after (c), nothing changed",
        &after_changed,
        unchanged_bar(&after_changed),
    );
    row(
        "(c) reconnect, the same 100 docs changed on both sides (concurrent)",
        &concurrent,
        format!(
            "≤ 3 round trips: {}; ≤ changes {} + 64 KiB: {}",
            met(concurrent.round_trips() <= 3),
            kb(concurrent_changes),
            met(concurrent.bytes() <= concurrent_changes + CHANGED_SLACK_BYTES)
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Real QUIC on loopback

fn free_udp_addr() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
}

/// `serve` in this process; stop it by sending `true`.
struct Served {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve_here(dir: &Path) -> Served {
    let addr = free_udp_addr();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let dir = dir.to_path_buf();
    let task = tokio::spawn(async move {
        service::serve(&dir, Some(addr), shutdown)
            .await
            .expect("serve");
    });
    // serve() binds before its first await on the network.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Served { addr, stop, task }
}

impl Served {
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn sync_now(commune: &Path) -> SessionReport {
    service::sync_once(commune, None).await.expect("sync")
}

/// What a bare connection costs, seen from the client.
struct Bare {
    /// UDP bytes both ways when the handshake completes.
    handshake: u64,
    /// UDP bytes both ways after idling a second on the open connection (the server starts its
    /// session meanwhile, so this includes its Hello and empty offer).
    idle: u64,
    /// PLPMTUD probes the client sent in that second, and the path MTU found.
    probes: u64,
    mtu: u16,
}

async fn bare_connection(commune: &Path, addr: SocketAddr) -> Bare {
    let node = Node::open(commune).expect("open");
    let read = |f: &str| std::fs::read_to_string(commune.join(f)).expect("read tls file");
    let tls = TlsMaterial {
        ca_pem: read(admin::CA_FILE),
        cert_pem: read(admin::CERT_FILE),
        key: NodeKey::load(commune.join(KEY_FILE)).expect("key"),
        crl: std::fs::read_to_string(commune.join(admin::CRL_FILE))
            .ok()
            .and_then(|t| Crl::from_pem(&t).ok()),
    };
    // As `sync` does: start at the path MTU remembered from an earlier session, if any.
    let mtu = path::known_mtu(commune, addr.ip());
    let ep = net::client_endpoint(addr, &tls, &node.config.sync, mtu).expect("endpoint");
    let (conn, _) = net::connect(&ep, addr, Duration::from_secs(10))
        .await
        .expect("connect");
    let at_handshake = conn.stats();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = conn.stats();
    conn.close(0u32.into(), b"bench");
    ep.wait_idle().await;
    Bare {
        handshake: at_handshake.udp_tx.bytes + at_handshake.udp_rx.bytes,
        idle: later.udp_tx.bytes + later.udp_rx.bytes,
        probes: later.path.sent_plpmtud_probes,
        mtu: later.path.current_mtu,
    }
}

fn report_row(what: &str, r: &SessionReport, bar: &str) {
    println!(
        "| {what} | {} / {} | {} | {} | {} / {} | {} ms | {bar} |",
        r.bytes_sent,
        r.bytes_received,
        r.bytes_sent + r.bytes_received,
        r.round_trips,
        r.docs_received,
        r.docs_sent,
        r.elapsed_ms
    );
}

async fn reconnect_quic(opts: &Opts, n: usize) {
    println!("\n## Reconnect over real QUIC on loopback (`serve` + `sync_once`), province of {n} dispatches\n");
    let fixture = province_fixture(opts, n);
    let tmp = scratch();
    let province = province_copy(&fixture, tmp.path());
    let empty = empty_province(&tmp.path().join("empty"));
    let big = serve_here(&province).await;
    let small = serve_here(&empty).await;
    let c_small = enrolled_commune(&empty, &tmp.path().join("c-empty"), small.addr);
    let c_big = enrolled_commune(&province, &tmp.path().join("c-big"), big.addr);

    let empty_first = sync_now(&c_small).await;
    // Against the empty province, once synced: the server's session has nothing to offer.
    let bare = bare_connection(&c_small, small.addr).await;
    let handshake = bare.handshake;
    let empty_again = sync_now(&c_small).await;
    let first = sync_now(&c_big).await;
    let again1 = sync_now(&c_big).await;
    let again2 = sync_now(&c_big).await;
    big.stop().await;
    small.stop().await;

    println!(
        "\nbare mutual-TLS handshake, path MTU remembered from the first session: {handshake} UDP bytes both ways; the same connection after 1 s idle: {} bytes, the client having sent {} PLPMTUD probes (path MTU {}). The first session of a path probes its MTU (both sides); later ones start at the MTU found.\n",
        bare.idle, bare.probes, bare.mtu
    );
    println!("| session (seen from the commune) | UDP bytes sent / received | total | round trips (report) | docs in / out | elapsed | after the handshake |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let total = |r: &SessionReport| r.bytes_sent + r.bytes_received;
    let after = |r: &SessionReport| {
        let extra = total(r).saturating_sub(handshake);
        format!(
            "{extra} B: ≤ {RECONNECT_BYTES_MAX} B {}",
            met(extra <= RECONNECT_BYTES_MAX)
        )
    };
    report_row(
        "empty province, first session",
        &empty_first,
        &after(&empty_first),
    );
    report_row(
        "empty province, reconnect",
        &empty_again,
        &after(&empty_again),
    );
    report_row(
        &format!("(a) first sync, {} docs", first.docs_received),
        &first,
        &format!(
            "≤ {FIRST_SYNC_S_MAX} s: {}",
            met(first.elapsed_ms as f64 <= FIRST_SYNC_S_MAX * 1e3)
        ),
    );
    report_row(
        "(b) reconnect, nothing changed (1st)",
        &again1,
        &after(&again1),
    );
    report_row(
        "(b) reconnect, nothing changed (2nd)",
        &again2,
        &after(&again2),
    );
    println!(
        "\nextra cost of the {n}-doc province over the empty one on an unchanged reconnect: {} B",
        total(&again2) as i64 - total(&empty_again) as i64
    );
}

/// Reconnects of a synced commune through linksim at weak 4G and 2G: UDP bytes, the session's
/// round trips, and the wall time of `sync_once` (opening the node to exit) in base RTTs.
async fn reconnect_link(opts: &Opts, n: usize) {
    println!(
        "\n## Reconnect through linksim (`serve` + `sync_once`), province of {n} dispatches\n"
    );
    let fixture = province_fixture(opts, n);
    let tmp = scratch();
    let province = province_copy(&fixture, tmp.path());
    let served = serve_here(&province).await;
    // No MTU limit on the link: on loopback the route allows 6,500-byte datagrams, which a
    // 1,500-byte link would drop, so every short session would probe again (a path narrower
    // than its route, architecture.md). Idle reconnects send no large datagrams either way.
    let unshaped = LinkProfile {
        mtu: None,
        ..LinkProfile::loopback()
    };
    let sim = LinkSim::start(
        "127.0.0.1:0".parse().expect("addr"),
        served.addr,
        unshaped.clone(),
        unshaped,
        42,
        vec![],
    )
    .await
    .expect("linksim");
    let commune = enrolled_commune(&province, &tmp.path().join("commune"), sim.local_addr());
    let first = sync_now(&commune).await;
    println!(
        "first sync (unshaped link): {} docs, {} ms\n",
        first.docs_received, first.elapsed_ms
    );
    let ids: Vec<DocId> = doc_ids(&commune)
        .iter()
        .map(|s| s.parse().expect("id"))
        .collect();
    println!("| link | session (seen from the commune) | UDP bytes sent / received | total | round trips (report) | docs in / out | `sync_once` wall time | in base RTTs |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let presets = [
        ("weak 4G", LinkProfile::weak_4g()),
        ("2G", LinkProfile::two_g()),
    ];
    for (k, (name, preset)) in presets.into_iter().enumerate() {
        let rtt = Duration::from_millis(2 * u64::from(preset.delay_ms));
        let profile = LinkProfile {
            mtu: None,
            ..preset
        };
        let handle = sim.handle();
        for dir in [Direction::Up, Direction::Down] {
            handle.set_profile(dir, profile.clone()).expect("profile");
        }
        let row = |what: &str, r: &SessionReport, wall: Duration| {
            println!(
                "| {name} | {what} | {} / {} | {} | {} | {} / {} | {} ms | {:.1} |",
                r.bytes_sent,
                r.bytes_received,
                r.bytes_sent + r.bytes_received,
                r.round_trips,
                r.docs_received,
                r.docs_sent,
                wall.as_millis(),
                wall.as_secs_f64() / rtt.as_secs_f64()
            )
        };
        for i in 1..=3 {
            let started = Instant::now();
            let r = sync_now(&commune).await;
            row(&format!("nothing changed ({i})"), &r, started.elapsed());
        }
        // 100 receipts at the commune, 100 comments at the province, on different documents.
        let batch = &ids[2 * k * CHANGED_DOCS..2 * (k + 1) * CHANGED_DOCS];
        let mut c = Node::open(&commune).expect("open commune");
        for id in &batch[..CHANGED_DOCS] {
            c.dispatch_receive(None, id.as_str()).expect("receive");
        }
        drop(c);
        let mut p = Node::open(&province).expect("open province");
        for id in &batch[CHANGED_DOCS..] {
            p.dispatch_comment(None, id.as_str(), "Đề nghị xã báo cáo trước ngày 15.")
                .expect("comment");
        }
        drop(p);
        let started = Instant::now();
        let r = sync_now(&commune).await;
        row(
            &format!("{CHANGED_DOCS} docs changed on each side"),
            &r,
            started.elapsed(),
        );
    }
    sim.shutdown().await;
    served.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Scans

/// `zstd -19` of `data`, in segments larger than its window, on every core.
fn zstd19(data: &[u8]) -> u64 {
    let segments: Vec<&[u8]> = data.chunks(ZSTD_SEGMENT_BYTES).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut total = 0;
    for group in segments.chunks(threads) {
        total += std::thread::scope(|s| {
            let handles: Vec<_> = group
                .iter()
                .map(|seg| {
                    s.spawn(move || zstd::bulk::compress(seg, 19).expect("zstd").len() as u64)
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("zstd thread"))
                .sum::<u64>()
        });
    }
    total
}

/// `zstd -19` of the whole file, extrapolated from its first `ZSTD_SAMPLE_BYTES` when larger
/// (level 19 runs at under 1 MB/s per core here; the synthetic pages are all alike).
/// The size is kept under `target/bench-data`, keyed by the sample's BLAKE3: the synthetic
/// scans are the same from run to run, and compressing them takes a minute or more.
fn zstd19_estimate(data: &[u8]) -> (u64, bool) {
    let sampled = data.len() > ZSTD_SAMPLE_BYTES;
    let sample = &data[..data.len().min(ZSTD_SAMPLE_BYTES)];
    let cache = data_root().join(format!("zstd19-{}", &blake3::hash(sample).to_hex()[..16]));
    let size = match std::fs::read_to_string(&cache).map(|t| t.trim().parse::<u64>()) {
        Ok(Ok(size)) => size,
        _ => {
            let size = zstd19(sample);
            std::fs::write(&cache, size.to_string()).expect("write zstd -19 cache");
            size
        }
    };
    (
        (size as f64 * data.len() as f64 / sample.len() as f64) as u64,
        sampled,
    )
}

/// Creates a dispatch to the commune carrying `file`; returns the ingest time.
fn dispatch_with_scan(province: &Path, file: Option<&Path>, ref_no: &str) -> Duration {
    let mut node = Node::open(province).expect("open province");
    let req = DispatchRequest {
        ref_no: ref_no.into(),
        summary: "Hồ sơ quét kèm theo".into(),
        kind: DispatchKind::Dispatch,
        priority: Priority::Normal,
        to: vec![COMMUNE.into()],
        attach: file.map(|f| vec![f.to_path_buf()]).unwrap_or_default(),
    };
    let started = Instant::now();
    node.dispatch_new(None, &req).expect("dispatch new");
    started.elapsed()
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

fn kb(bytes: u64) -> String {
    format!("{:.1} KB", bytes as f64 / 1e3)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Bytes of the blob frames the sender writes for `data` at `level` (manifest excluded).
fn blob_frame_bytes(data: &[u8], level: i32) -> u64 {
    data.chunks(CHUNK_BYTES)
        .enumerate()
        .map(|(idx, chunk)| {
            let (compressed, payload) = encode_chunk(chunk.to_vec().into(), level);
            let frame = Frame::BlobChunk {
                idx: idx as u64,
                compressed,
                raw_len: chunk.len() as u64,
                data: payload,
            };
            wire::encode(&frame, 1).len() as u64
        })
        .sum()
}

/// What one scan transfer cost, from the commune's session report, and the CPU both ends used.
struct Transfer {
    /// UDP bytes the province sent in the session, retransmissions included: the wire's count.
    udp_sent: u64,
    elapsed_ms: u64,
    cpu_s: f64,
}

/// CPU seconds (user + system) of this process and of its children waited for so far, from
/// /proc/self/stat in clock ticks of 10 ms: less swayed by the machine's load than elapsed time.
fn cpu_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14-17; the first after the name is field 3.
    (
        (fields[11] + fields[12]) / 100.0,
        (fields[13] + fields[14]) / 100.0,
    )
}

impl Transfer {
    fn from_report(r: &SessionReport, cpu_s: f64, udp_sent: u64) -> Transfer {
        assert_eq!(r.blobs_received, 1, "the scan arrived");
        Transfer {
            udp_sent,
            elapsed_ms: r.elapsed_ms,
            cpu_s,
        }
    }

    fn from_json(text: &str, cpu_s: f64, udp_sent: u64) -> Transfer {
        let v: serde_json::Value = serde_json::from_str(text).expect("sync --json output");
        let num = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {text}"));
        assert_eq!(num("blobs_received"), 1, "the scan arrived");
        Transfer {
            udp_sent,
            elapsed_ms: num("elapsed_ms"),
            cpu_s,
        }
    }
}

/// UDP bytes the province has sent to all its peers so far, as it records them per session.
/// The sender's count, not the receiver's: datagrams dropped on the way are on the wire too.
fn province_udp_sent(province: &Path) -> u64 {
    let db = rusqlite::Connection::open(province.join(DB_FILE)).expect("open province db");
    db.query_row(
        "SELECT COALESCE(SUM(bytes_sent), 0) FROM peer_sync",
        [],
        |r| r.get::<_, i64>(0),
    )
    .expect("read peer_sync") as u64
}

/// Runs `communesync sync` on `commune` against a `communesync serve` of `province`.
fn sync_processes(province: &Path, commune: &Path) -> String {
    let serve = ServeProcess::start(province);
    set_upstream(commune, serve.addr);
    let out = command(commune, &["--json", "sync"])
        .stderr(Stdio::piped())
        .output()
        .expect("run sync");
    let log = serve.stop();
    if std::env::var_os("BENCH_SHOW_LOG").is_some() {
        eprintln!("{log}{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(out.status.success(), "sync failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Points the commune's upstream peer at `addr`.
fn set_upstream(commune: &Path, addr: SocketAddr) {
    let mut node = Node::open(commune).expect("open commune");
    let _ = node.peer_remove("up");
    node.peer_add("up", &addr.to_string(), true)
        .expect("peer add");
}

async fn scan_loopback(scan_mb: usize) {
    println!("\n## Scan throughput over loopback QUIC, {scan_mb} MB scans, province → commune\n");
    let bytes = scan_mb * 1_000_000;
    let tmp = scratch();
    let province = empty_province(&tmp.path().join("province"));
    let grey_path = tmp.path().join("scan.pgm");
    let rand_path = tmp.path().join("scan.jpg");
    let grey = greyscale_scan(bytes, 7);
    std::fs::write(&grey_path, &grey).expect("write scan");
    let started = Instant::now();
    let (z19, z19_sampled) = zstd19_estimate(&grey);
    let z19_secs = started.elapsed().as_secs_f64();
    let grey_frames1 = blob_frame_bytes(&grey, 1);
    let grey_frames = blob_frame_bytes(&grey, LEVEL_RAW);
    drop(grey);
    let random = random_scan(bytes, 8);
    std::fs::write(&rand_path, &random).expect("write scan");
    let rand_frames = blob_frame_bytes(&random, LEVEL_RAW);
    drop(random);

    // Commune A syncs in this process (`serve` + `sync_once` on one runtime); commune B runs
    // the real binaries, `serve` and `sync`, as two processes.
    let ca = enrolled_commune(&province, &tmp.path().join("commune-a"), free_udp_addr());
    let cb = enrolled_commune(&province, &tmp.path().join("commune-b"), free_udp_addr());
    let mut rows = Vec::new();
    for (what, path, frames) in [
        ("compressible (greyscale PGM)", &grey_path, grey_frames),
        ("incompressible (random, as JPEG)", &rand_path, rand_frames),
    ] {
        let ingest = dispatch_with_scan(&province, Some(path), what);
        let served = serve_here(&province).await;
        set_upstream(&ca, served.addr);
        let (cpu, sent) = (cpu_secs().0, province_udp_sent(&province));
        let report = sync_now(&ca).await;
        let cpu = cpu_secs().0 - cpu;
        served.stop().await;
        let a = Transfer::from_report(&report, cpu, province_udp_sent(&province) - sent);
        let (cpu, sent) = (cpu_secs().1, province_udp_sent(&province));
        let json = sync_processes(&province, &cb);
        let b = Transfer::from_json(
            &json,
            cpu_secs().1 - cpu,
            province_udp_sent(&province) - sent,
        );
        rows.push((what, frames, ingest, a, b));
    }

    println!("zstd -19 of the greyscale scan{}: {} in {z19_secs:.0} s (ratio {:.2}); its blob frames at level 1: {}, raw: {}",
        if z19_sampled { format!(" (from its first {} MiB, scaled)", ZSTD_SAMPLE_BYTES >> 20) } else { String::new() },
        mb(z19 as f64), bytes as f64 / z19 as f64, mb(grey_frames1 as f64), mb(grey_frames as f64));
    println!("\n| scan | run | elapsed | MB/s (file) | CPU s, both ends | UDP bytes sent | UDP / file | blob frames / file | UDP / zstd -19 | bars |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (what, frames, ingest, a, b) in &rows {
        let compressible = what.starts_with("compressible");
        for (run, t) in [("in-process `sync_once`", a), ("two processes", b)] {
            let rate = bytes as f64 / 1e6 / (t.elapsed_ms as f64 / 1e3);
            let size_bar = if compressible {
                format!(
                    "≤ {ZSTD19_RATIO_MAX} × zstd -19: {}",
                    met(t.udp_sent as f64 <= ZSTD19_RATIO_MAX * z19 as f64)
                )
            } else {
                let over = t.udp_sent as f64 / bytes as f64 - 1.0;
                format!(
                    "≤ +0.5%: {} (+{:.2}% UDP, +{:.3}% frames)",
                    met(over <= INCOMPRESSIBLE_OVERHEAD_MAX),
                    over * 100.0,
                    (*frames as f64 / bytes as f64 - 1.0) * 100.0
                )
            };
            println!(
                "| {what} | {run} | {} ms | {rate:.0} | {:.2} | {} | {:.4} | {:.4} | {} | ≥ {LOOPBACK_MB_S_MIN} MB/s: {}; {size_bar} |",
                t.elapsed_ms,
                t.cpu_s,
                t.udp_sent,
                t.udp_sent as f64 / bytes as f64,
                *frames as f64 / bytes as f64,
                if compressible { format!("{:.3}", t.udp_sent as f64 / z19 as f64) } else { "—".into() },
                met(rate >= LOOPBACK_MB_S_MIN),
            );
        }
        println!(
            "| {what} | ingest into the province (`dispatch new --attach`) | {} ms | {:.0} | | | | | | |",
            ingest.as_millis(),
            bytes as f64 / 1e6 / ingest.as_secs_f64()
        );
    }
    println!(
        "\nlevel used: the greyscale sessions' UDP bytes are {:.3} × its raw frames (QUIC's headers on top: ≈ 0.4 % at 6,500-byte packets), {:.3} × its level-1 frames: raw, as `level_for_rate` picks above 1 Gbit/s.",
        rows[0].3.udp_sent as f64 / grey_frames as f64,
        rows[0].3.udp_sent as f64 / grey_frames1 as f64
    );
}

/// A commune enrolled with `province`, its upstream the province's `serve` at `addr` through a
/// linksim weak-4G link both ways (random loss from `seed`).
async fn commune_behind_weak_4g(
    province: &Path,
    addr: SocketAddr,
    dir: &Path,
    seed: u64,
) -> (LinkSim, PathBuf) {
    let sim = LinkSim::start(
        "127.0.0.1:0".parse().expect("addr"),
        addr,
        LinkProfile::weak_4g(),
        LinkProfile::weak_4g(),
        seed,
        vec![],
    )
    .await
    .expect("linksim");
    let commune = enrolled_commune(province, dir, sim.local_addr());
    // Both ends know the path's MTU, as after any connection but the first of the day. Left to
    // probe, they would search up to the 6,500 bytes loopback's route allows through a link
    // that carries 1,500: a tunnel's case, not the field's, where the route says 1,500 too.
    // That first-of-day search costs a 2 MB scan about 2 points of goodput (performance.md).
    let mtu = (linksim::FIELD_MTU - linksim::UDP_IPV4_HEADERS) as u16;
    for node in [province, commune.as_path()] {
        Node::open(node)
            .expect("open node")
            .store
            .write(|tx| tx.set_path_mtu("127.0.0.1", mtu, now_ms()))
            .expect("seed the path MTU");
    }
    (sim, commune)
}

async fn scan_weak_4g(scan_mb: usize) {
    println!("\n## Scan over linksim weak 4G (1 Mbit/s, 200 ms RTT, 2% loss, both ways), {scan_mb} MB greyscale scan\n");
    let bytes = scan_mb * 1_000_000;
    let tmp = scratch();
    let province = empty_province(&tmp.path().join("province"));
    let grey_path = tmp.path().join("scan.pgm");
    let grey = greyscale_scan(bytes, 11);
    std::fs::write(&grey_path, &grey).expect("write scan");
    let z19 = zstd19(&grey);
    let (f19, f9) = (blob_frame_bytes(&grey, 19), blob_frame_bytes(&grey, 9));
    drop(grey);
    let served = serve_here(&province).await;
    let (sim, commune) =
        commune_behind_weak_4g(&province, served.addr, &tmp.path().join("commune"), 42).await;
    // Baseline: the same session shape with a dispatch and no scan, over the same link.
    dispatch_with_scan(&province, None, "1/NOSCAN");
    let base = sync_now(&commune).await;
    let link_base = sim.stats();
    dispatch_with_scan(&province, Some(&grey_path), "2/SCAN");
    let run = sync_now(&commune).await;
    let link = sim.stats();
    // The same size of random bytes (a JPEG): no compression, so the transport alone.
    let jpeg_path = tmp.path().join("scan.jpg");
    std::fs::write(&jpeg_path, random_scan(bytes, 12)).expect("write scan");
    dispatch_with_scan(&province, Some(&jpeg_path), "3/JPEG");
    let jpeg = sync_now(&commune).await;
    let link_jpeg = sim.stats();
    sim.shutdown().await;
    served.stop().await;
    assert_eq!(run.blobs_received, 1, "the scan arrived");
    assert_eq!(jpeg.blobs_received, 1, "the JPEG arrived");

    let secs = (run.elapsed_ms as f64 - base.elapsed_ms as f64) / 1e3;
    let wire = run.bytes_received.saturating_sub(base.bytes_received);
    let utilisation = wire as f64 * 8.0 / secs / WEAK_4G_RATE_BPS;
    // Payload is what remains of the UDP bytes once QUIC's per-packet share is taken off.
    let payload = wire as f64 / QUIC_UDP_PER_PAYLOAD;
    let goodput = payload * 8.0 / secs / WEAK_4G_RATE_BPS;
    println!(
        "zstd -19 of the file {}; its blob frames at level 19: {}, at level 9: {}\n",
        kb(z19),
        kb(f19),
        kb(f9)
    );
    println!("| session | UDP bytes received | elapsed | round trips |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| baseline: one dispatch, no scan | {} | {} ms | {} |",
        base.bytes_received, base.elapsed_ms, base.round_trips
    );
    println!(
        "| one dispatch with the scan | {} | {} ms | {} |",
        run.bytes_received, run.elapsed_ms, run.round_trips
    );
    println!(
        "\nscan share (difference of the two sessions): {} of UDP in {secs:.1} s = {:.0}% of the link rate; its payload (UDP / {QUIC_UDP_PER_PAYLOAD}) {} at {:.0} kbit/s = goodput {:.1}% of the link rate (bar ≥ {:.0}%: {}); the file itself arrived at {:.0} kbit/s",
        kb(wire),
        utilisation * 100.0,
        kb(payload as u64),
        payload * 8.0 / secs / 1e3,
        goodput * 100.0,
        GOODPUT_MIN * 100.0,
        met(goodput >= GOODPUT_MIN),
        bytes as f64 * 8.0 / secs / 1e3
    );
    println!(
        "UDP bytes / zstd -19 of the file: {:.3} (bar ≤ {ZSTD19_RATIO_MAX}: {}); / its level-19 frames: {:.3}; / its level-9 frames: {:.3} (≈ {QUIC_UDP_PER_PAYLOAD} when one level carried all chunks)",
        wire as f64 / z19 as f64,
        met(wire as f64 <= ZSTD19_RATIO_MAX * z19 as f64),
        wire as f64 / f19 as f64,
        wire as f64 / f9 as f64
    );
    println!(
        "linksim, scan session only: down {}\nlinksim, scan session only: up {} datagrams / {} B",
        sub_stats(link.down, link_base.down),
        link.up.forwarded_datagrams - link_base.up.forwarded_datagrams,
        link.up.forwarded_bytes - link_base.up.forwarded_bytes
    );
    let secs = (jpeg.elapsed_ms as f64 - base.elapsed_ms as f64) / 1e3;
    let wire = jpeg.bytes_received.saturating_sub(base.bytes_received);
    let goodput = wire as f64 / QUIC_UDP_PER_PAYLOAD * 8.0 / secs / WEAK_4G_RATE_BPS;
    println!(
        "\nincompressible ({} of random bytes, sent raw): session {} ms, {} of UDP beyond the baseline in {secs:.1} s = goodput {:.1}% of the link rate (bar ≥ {:.0}%: {}); UDP / file {:.4}\nlinksim, JPEG session only: down {}",
        kb(bytes as u64),
        jpeg.elapsed_ms,
        kb(wire),
        goodput * 100.0,
        GOODPUT_MIN * 100.0,
        met(goodput >= GOODPUT_MIN),
        wire as f64 / bytes as f64,
        sub_stats(link_jpeg.down, link.down),
    );
}

fn sub_stats(a: linksim::DirectionStats, b: linksim::DirectionStats) -> String {
    format!(
        "{} datagrams / {} B forwarded, {} lost at random, {} tail-dropped, {} over the MTU",
        a.forwarded_datagrams - b.forwarded_datagrams,
        a.forwarded_bytes - b.forwarded_bytes,
        a.dropped_loss - b.dropped_loss,
        a.dropped_queue - b.dropped_queue,
        a.dropped_too_big - b.dropped_too_big
    )
}

// ---------------------------------------------------------------------------------------------
// Peak memory of real processes

/// A process's peak resident set so far (VmHWM), in bytes; None once it has exited.
///
/// `ru_maxrss` from wait4 is no use here: a child spawned with vfork-style `posix_spawn` keeps
/// the high-water mark of the parent's address space it started in (this bench's, 170+ MB).
fn vm_hwm(pid: u32) -> Option<u64> {
    common::memory_kib(pid, "VmHWM").map(|kib| kib * 1024)
}

/// Polls the peak RSS of `watched` until `child` exits; returns whether it succeeded.
fn watch_until_exit(child: &mut Child, watched: &[u32], peaks: &mut [u64]) -> bool {
    loop {
        for (pid, peak) in watched.iter().zip(peaks.iter_mut()) {
            if let Some(hwm) = vm_hwm(*pid) {
                *peak = (*peak).max(hwm);
            }
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One `communesync sync` of `commune` against a fresh `communesync serve` of `province`.
struct Measured {
    secs: f64,
    commune_rss: u64,
    province_rss: u64,
    docs_received: u64,
    blobs_received: u64,
    bytes_received: u64,
}

fn measured_sync(province: &Path, commune: &Path) -> Measured {
    let mut serve = ServeProcess::start(province);
    set_upstream(commune, serve.addr);
    let started = Instant::now();
    let mut sync = command(commune, &["--json", "sync"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sync");
    let mut stdout = sync.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let mut peaks = [0u64; 2];
    let pids = [sync.id(), serve.child.id()];
    let ok = watch_until_exit(&mut sync, &pids, &mut peaks);
    let secs = started.elapsed().as_secs_f64();
    let out = reader.join().unwrap_or_default();
    serve.terminate();
    let serve_pid = serve.child.id();
    watch_until_exit(&mut serve.child, &[serve_pid], &mut peaks[1..]);
    let log = serve.stop();
    assert!(ok, "commune sync failed: {out}\n{log}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("sync --json output");
    Measured {
        secs,
        commune_rss: peaks[0],
        province_rss: peaks[1],
        docs_received: v["docs_received"].as_u64().unwrap_or(0),
        blobs_received: v["blobs_received"].as_u64().unwrap_or(0),
        bytes_received: v["bytes_received"].as_u64().unwrap_or(0),
    }
}

fn memory(opts: &Opts, n: usize) {
    let scan_bytes = opts.memory_mb * 1_000_000;
    println!("\n## Peak RSS of real processes: commune `sync` of {SCOPE_DOCS} docs + {} of scans from a province of {n} docs (`serve`)\n", mb(scan_bytes as f64));
    let fixture = province_fixture(opts, n);
    let tmp = scratch();
    let province = province_copy(&fixture, tmp.path());
    // Commune A takes the documents first, then the scans; commune B everything at once.
    let ca = enrolled_commune(&province, &tmp.path().join("commune-a"), free_udp_addr());
    let cb = enrolled_commune(&province, &tmp.path().join("commune-b"), free_udp_addr());
    let docs_only = measured_sync(&province, &ca);

    // Scans of 128 MB at most, alternately greyscale and random.
    let per = scan_bytes.min(128_000_000);
    let started = Instant::now();
    let mut k = 0;
    let mut left = scan_bytes;
    while left > 0 {
        let size = left.min(per);
        let data = if k % 2 == 0 {
            greyscale_scan(size, 100 + k as u64)
        } else {
            random_scan(size, 100 + k as u64)
        };
        let file = tmp.path().join(format!("scan{k}.bin"));
        std::fs::write(&file, &data).expect("write scan");
        drop(data);
        dispatch_with_scan(&province, Some(&file), &format!("{k}/MEM"));
        std::fs::remove_file(&file).expect("remove scan");
        left -= size;
        k += 1;
    }
    println!(
        "{k} scans ({} each at most, alternately greyscale and random) put into the province in {:.0} s\n",
        mb(per as f64),
        started.elapsed().as_secs_f64()
    );
    let scans_only = measured_sync(&province, &ca);
    let both = measured_sync(&province, &cb);

    println!("| commune session | docs / scans received | UDP bytes received | elapsed | commune peak RSS | province (`serve`, {n} docs) peak RSS | bars (commune ≤ {COMMUNE_RSS_MB_MAX} MiB, province ≤ {PROVINCE_RSS_MB_MAX} MiB) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (what, m) in [
        ("A: documents only", &docs_only),
        ("A again: the scans only", &scans_only),
        ("B: documents and scans at once", &both),
    ] {
        println!(
            "| {what} | {} / {} | {} | {:.1} s | {:.1} MiB | {:.1} MiB | {}; {} |",
            m.docs_received,
            m.blobs_received,
            m.bytes_received,
            m.secs,
            mib(m.commune_rss),
            mib(m.province_rss),
            met(mib(m.commune_rss) <= COMMUNE_RSS_MB_MAX),
            met(mib(m.province_rss) <= PROVINCE_RSS_MB_MAX)
        );
    }
    println!(
        "\npeak RSS is VmHWM from /proc/PID/status, polled every 10 ms while the processes run."
    );
}

// ---------------------------------------------------------------------------------------------
// Urgent dispatches over a busy weak-4G link

/// Urgent dispatches sent per priority on the idle link; twice as many, alternating, during the
/// bulk transfer.
const URGENT_SENDS: usize = 5;
/// Gap between two urgent dispatches, and how far into the bulk transfer the first one goes.
const URGENT_GAP: Duration = Duration::from_millis(2_000);
const URGENT_AFTER: Duration = Duration::from_secs(3);
/// How often the commune's store is read while waiting.
const URGENT_POLL: Duration = Duration::from_millis(10);
const URGENT_WAIT_MAX: Duration = Duration::from_secs(120);
/// Weak 4G's base round trip (`LinkProfile::weak_4g`: 100 ms each way).
const WEAK_4G_RTT_S: f64 = 0.2;

/// The commune's store, read-only, as an operator's query would read it while its daemon writes.
struct Watcher(rusqlite::Connection);

impl Watcher {
    fn open(dir: &Path) -> Watcher {
        Watcher(
            rusqlite::Connection::open_with_flags(
                dir.join(DB_FILE),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("open db"),
        )
    }

    fn has(&self, sql: &str, key: impl rusqlite::ToSql) -> bool {
        self.0
            .prepare_cached(sql)
            .expect("sql")
            .exists([key])
            .expect("query")
    }

    fn has_doc(&self, id: &str) -> bool {
        self.has("SELECT 1 FROM docs WHERE id = ?1", id)
    }

    fn has_blob(&self, hash: &[u8; 32]) -> bool {
        self.has("SELECT 1 FROM blobs WHERE hash = ?1", &hash[..])
    }
}

/// Waits until `done()`, reading every URGENT_POLL; returns the time since `from`.
async fn until(from: Instant, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    loop {
        if done() {
            return from.elapsed();
        }
        assert!(from.elapsed() < URGENT_WAIT_MAX, "{what} never arrived");
        tokio::time::sleep(URGENT_POLL).await;
    }
}

/// Bytes of the control frames that carry a new urgent document to a peer that lacks it: the
/// push of its whole `save()` and the offer page and end that follow it in the same flight.
fn dispatch_wire_bytes(node: &Node, id: &str) -> u64 {
    let doc: DocId = id.parse().expect("doc id");
    let (heads, data) = node
        .store
        .doc_load_bytes(&doc)
        .expect("read doc")
        .expect("a stored snapshot");
    let heads: Vec<_> = heads.iter().map(|h| h.0).collect();
    let upto = node.store.feed_seq().expect("feed") as u64;
    let frames = [
        Frame::Push {
            docs: vec![DocChanges {
                id: id.into(),
                heads: heads.clone(),
                data,
                sigs: node
                    .store
                    .change_sigs(&doc)
                    .expect("signatures")
                    .into_iter()
                    .map(|row| communesync::proto::ChangeSig::new(&row.hash, row.sig))
                    .collect(),
            }],
        },
        Frame::Offer {
            docs: vec![DocHeads {
                id: id.into(),
                heads,
            }],
        },
        Frame::OfferEnd { upto, offered: 1 },
    ];
    frames
        .iter()
        .map(|f| wire::encode(f, CONTROL_LEVEL).len() as u64)
        .sum()
}

/// One dispatch committed at the province and seen stored at the commune.
struct Delivery {
    priority: Priority,
    latency: Duration,
    wire: u64,
    /// The bulk scan was still arriving when the dispatch was stored.
    busy: bool,
}

impl Delivery {
    fn bar_s(&self) -> f64 {
        2.0 * WEAK_4G_RTT_S + self.wire as f64 * 8.0 / WEAK_4G_RATE_BPS
    }

    fn met(&self) -> bool {
        self.latency.as_secs_f64() <= self.bar_s()
    }
}

/// Commits a dispatch with no scan to the commune at the province (the command returns once it
/// is durable, and wakes the daemon) and waits until the commune's store holds it.
async fn deliver_one(
    province: &mut Node,
    watch: &Watcher,
    priority: Priority,
    ref_no: &str,
    bulk: Option<&[u8; 32]>,
) -> Delivery {
    let req = DispatchRequest {
        ref_no: ref_no.into(),
        summary: "Khẩn: di dời dân khỏi vùng sạt lở".into(),
        kind: DispatchKind::Directive,
        priority,
        to: vec![COMMUNE.into()],
        attach: Vec::new(),
    };
    let id = province.dispatch_new(None, &req).expect("dispatch new").id;
    let committed = Instant::now();
    let latency = until(committed, &id, || watch.has_doc(&id)).await;
    Delivery {
        priority,
        latency,
        wire: dispatch_wire_bytes(province, &id),
        busy: bulk.is_some_and(|h| !watch.has_blob(h)),
    }
}

/// Latency of urgent and flash dispatches from a province `serve` to a commune `serve` (which
/// keeps its upstream session, as in production) over linksim weak 4G, on the idle link and
/// while a bulk scan fills it.
async fn urgent_weak_4g(scan_mb: usize) {
    println!("\n## Urgent dispatch over a busy link: weak 4G (1 Mbit/s, 200 ms RTT, 2% loss, 64 KiB queue), bulk scan of {scan_mb} MB (incompressible)\n");
    let tmp = scratch();
    let province_dir = empty_province(&tmp.path().join("province"));
    let served = serve_here(&province_dir).await;
    let (sim, commune) =
        commune_behind_weak_4g(&province_dir, served.addr, &tmp.path().join("commune"), 43).await;
    let daemon = serve_here(&commune).await;
    let watch = Watcher::open(&commune);
    let mut province = Node::open(&province_dir).expect("open province");
    // The commune's daemon connects and converges; the first delivery also warms the path.
    deliver_one(&mut province, &watch, Priority::Normal, "0/WARM", None).await;

    let mut rows = Vec::new();
    for priority in [Priority::Urgent, Priority::Flash] {
        for i in 0..URGENT_SENDS {
            tokio::time::sleep(URGENT_GAP / 2).await;
            let d = deliver_one(&mut province, &watch, priority, &format!("{i}/IDLE"), None).await;
            rows.push(("idle", d));
        }
    }

    let scan_path = tmp.path().join("bulk.jpg");
    let scan = random_scan(scan_mb * 1_000_000, 44);
    let hash = *blake3::hash(&scan).as_bytes();
    std::fs::write(&scan_path, &scan).expect("write scan");
    drop(scan);
    let bulk_id = {
        let req = DispatchRequest {
            ref_no: "9/BULK".into(),
            summary: "Hồ sơ quét kèm theo".into(),
            kind: DispatchKind::Dispatch,
            priority: Priority::Normal,
            to: vec![COMMUNE.into()],
            attach: vec![scan_path],
        };
        province.dispatch_new(None, &req).expect("dispatch new").id
    };
    let bulk_started = Instant::now();
    // The commune asks for the scan as soon as it holds the document.
    until(bulk_started, "the bulk dispatch", || {
        watch.has_doc(&bulk_id)
    })
    .await;
    let (scan_started, link_before) = (Instant::now(), sim.stats());
    tokio::time::sleep(URGENT_AFTER).await;
    for i in 0..2 * URGENT_SENDS {
        let priority = [Priority::Urgent, Priority::Flash][i % 2];
        let d = deliver_one(
            &mut province,
            &watch,
            priority,
            &format!("{i}/BUSY"),
            Some(&hash),
        )
        .await;
        rows.push(("bulk scan", d));
        tokio::time::sleep(URGENT_GAP).await;
    }
    let scan_secs = until(scan_started, "the bulk scan", || watch.has_blob(&hash))
        .await
        .as_secs_f64();
    let link = sim.stats();
    daemon.stop().await;
    sim.shutdown().await;
    served.stop().await;

    println!("| # | link | priority | latency | frames carrying it | bar (2 × {:.0} ms + its transfer) | |", WEAK_4G_RTT_S * 1e3);
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (n, (link, d)) in rows.iter().enumerate() {
        println!(
            "| {} | {link}{} | {} | {:.0} ms | {} B | {:.0} ms | {} |",
            n + 1,
            if *link != "idle" && !d.busy {
                " (scan already done)"
            } else {
                ""
            },
            d.priority,
            ms(d.latency),
            d.wire,
            d.bar_s() * 1e3,
            met(d.met())
        );
    }
    println!();
    for link in ["idle", "bulk scan"] {
        for priority in [Priority::Urgent, Priority::Flash] {
            let mut lat: Vec<u128> = rows
                .iter()
                .filter(|(l, d)| *l == link && d.priority == priority)
                .map(|(_, d)| d.latency.as_millis())
                .collect();
            lat.sort();
            let met_n = rows
                .iter()
                .filter(|(l, d)| *l == link && d.priority == priority && d.met())
                .count();
            println!(
                "{link}, {priority}: latency {}–{} ms (median {} ms), bar met {met_n}/{}",
                lat[0],
                lat[lat.len() - 1],
                lat[lat.len() / 2],
                lat.len()
            );
        }
    }
    let down = sub_stats(link.down, link_before.down);
    println!(
        "\nbulk scan: {} in {scan_secs:.1} s after its document arrived = {:.0} kbit/s of file, {:.1}% of the link rate; linksim down meanwhile: {down}",
        mb((scan_mb * 1_000_000) as f64),
        (scan_mb * 1_000_000) as f64 * 8.0 / scan_secs / 1e3,
        (scan_mb * 1_000_000) as f64 * 8.0 / scan_secs / WEAK_4G_RATE_BPS * 100.0,
    );
}

// ---------------------------------------------------------------------------------------------
// A link that comes back

/// Share of the scan's bytes delivered before the link fades, and for how long its delay is
/// doubled (as a fading signal's rises) before it is cut: quinn's smoothed RTT then reads above
/// the pacer's target when the outage begins, as it did in the field report of issue 10.
const OUTAGE_CUT_AT: f64 = 0.4;
const OUTAGE_FADING: Duration = Duration::from_secs(2);
/// How often the link's counters are read, and the windows goodput is reported in.
const OUTAGE_SAMPLE: Duration = Duration::from_millis(250);
const OUTAGE_WINDOW_S: f64 = 5.0;
/// The bar (issue 10): goodput back above this share of the link within `OUTAGE_RECOVERY_S_MAX`
/// of the restore, from then to the end of the scan.
const OUTAGE_RECOVERED: f64 = 0.85;
const OUTAGE_RECOVERY_S_MAX: f64 = 10.0;

/// A bulk scan from a province `serve` to a commune `serve` over linksim weak 4G, cut for
/// `outage_s` seconds (less than the 120 s idle timeout, so the connection survives) once
/// `OUTAGE_CUT_AT` of it has crossed and the link has faded for `OUTAGE_FADING`: goodput in
/// windows before the cut and after the restore.
async fn outage_weak_4g(scan_mb: usize, outage_s: u64) {
    println!("\n## A link that comes back: weak 4G (1 Mbit/s, 200 ms RTT, 2% loss), {scan_mb} MB scan (incompressible), delay doubled for {} s at {:.0}%, then cut for {outage_s} s\n", OUTAGE_FADING.as_secs(), OUTAGE_CUT_AT * 100.0);
    let tmp = scratch();
    let province_dir = empty_province(&tmp.path().join("province"));
    let served = serve_here(&province_dir).await;
    let (sim, commune) =
        commune_behind_weak_4g(&province_dir, served.addr, &tmp.path().join("commune"), 45).await;
    let daemon = serve_here(&commune).await;
    let watch = Watcher::open(&commune);
    let mut province = Node::open(&province_dir).expect("open province");
    deliver_one(&mut province, &watch, Priority::Normal, "0/WARM", None).await;

    let bytes = scan_mb * 1_000_000;
    let scan_path = tmp.path().join("bulk.jpg");
    let scan = random_scan(bytes, 46);
    let hash = *blake3::hash(&scan).as_bytes();
    std::fs::write(&scan_path, &scan).expect("write scan");
    drop(scan);
    dispatch_with_scan(&province_dir, Some(&scan_path), "9/BULK");

    // (seconds since the scan's dispatch, UDP bytes delivered to the commune so far)
    let started = Instant::now();
    let base = sim.stats().down.forwarded_bytes;
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let (mut faded, mut cut, mut restored) = (None, None, None);
    let set_delay_ms = |ms: u32| sim.handle().set_delay(ms).expect("a valid delay");
    let delay_ms = LinkProfile::weak_4g().delay_ms;
    let wait_max = Duration::from_secs(outage_s) + URGENT_WAIT_MAX * (1 + scan_mb as u32 / 2);
    while !watch.has_blob(&hash) {
        assert!(started.elapsed() < wait_max, "the scan never arrived");
        tokio::time::sleep(OUTAGE_SAMPLE).await;
        let (t, delivered) = (
            started.elapsed().as_secs_f64(),
            sim.stats().down.forwarded_bytes - base,
        );
        samples.push((t, delivered));
        match (faded, cut, restored) {
            (None, _, _) if delivered as f64 >= OUTAGE_CUT_AT * bytes as f64 => {
                set_delay_ms(2 * delay_ms);
                faded = Some(t);
            }
            (Some(at), None, _) if t >= at + OUTAGE_FADING.as_secs_f64() => {
                sim.handle().set_up(false);
                cut = Some(t);
            }
            (_, Some(at), None) if t >= at + outage_s as f64 => {
                set_delay_ms(delay_ms);
                sim.handle().set_up(true);
                restored = Some(t);
            }
            _ => {}
        }
    }
    let done = started.elapsed().as_secs_f64();
    daemon.stop().await;
    sim.shutdown().await;
    served.stop().await;
    let (cut, restored) = (
        cut.expect("the link was cut"),
        restored.expect("the scan arrived only after the restore"),
    );

    // Goodput over [from, to): delivered UDP bytes less QUIC's per-packet share.
    let delivered_at = |t: f64| {
        samples
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |s| s.1)
    };
    let goodput = |from: f64, to: f64| {
        (delivered_at(to) - delivered_at(from)) as f64 / QUIC_UDP_PER_PAYLOAD * 8.0 / (to - from)
    };
    let kbit = |bps: f64| {
        format!(
            "{:.0} kbit/s ({:.0}%)",
            bps / 1e3,
            bps / WEAK_4G_RATE_BPS * 100.0
        )
    };
    // The first scan data across the restored link: the sender notices the link only when a
    // probe gets through (the pacer's, every 2 s; quinn's own loss probes double their interval).
    let resumed = samples
        .iter()
        .find(|(t, d)| *t > restored && *d > delivered_at(restored) + 4 * 1500)
        .map_or(done, |s| s.0);
    // The scan's last data (its completion is noticed a commit later).
    let last_data = samples
        .windows(2)
        .rfind(|w| w[1].1 > w[0].1)
        .map_or(done, |w| w[1].0);
    let first_full = samples
        .iter()
        .map(|s| s.0)
        .filter(|&t| t >= restored && t + OUTAGE_WINDOW_S <= last_data)
        .find(|&t| goodput(t, t + OUTAGE_WINDOW_S) >= OUTAGE_RECOVERED * WEAK_4G_RATE_BPS);
    let after_grace = goodput(restored + OUTAGE_RECOVERY_S_MAX, last_data);
    println!("| window (s after the restore) | goodput (share of the link) |");
    println!("| --- | --- |");
    let faded = faded.expect("the link faded");
    println!(
        "| before the cut (0–{faded:.0} s after the dispatch) | {} |",
        kbit(goodput(0.0, faded))
    );
    println!(
        "| fading ({faded:.0}–{cut:.0} s, delay doubled) | {} |",
        kbit(goodput(faded, cut))
    );
    let mut from = restored;
    while from < done {
        let to = (from + OUTAGE_WINDOW_S).min(done);
        println!(
            "| {:.0}–{:.0} | {} |",
            from - restored,
            to - restored,
            kbit(goodput(from, to))
        );
        from = to;
    }
    println!(
        "\nafter the restore: first scan data at +{:.1} s; first {OUTAGE_WINDOW_S:.0} s window at ≥ {:.0}% from +{}; from +{OUTAGE_RECOVERY_S_MAX:.0} s to the scan's last data (+{:.0} s): {} (bar ≥ {:.0}%: {}); {} on average from the restore",
        resumed - restored,
        OUTAGE_RECOVERED * 100.0,
        first_full.map_or("never".into(), |t| format!("{:.1} s", t - restored)),
        last_data - restored,
        kbit(after_grace),
        OUTAGE_RECOVERED * 100.0,
        met(after_grace >= OUTAGE_RECOVERED * WEAK_4G_RATE_BPS),
        kbit(goodput(restored, last_data)),
    );
}
