//! Province-wide directive benchmark (issue 14 item 2): one flash directive with a 2 MB scan
//! from the province to every unit of a tree, from issue until every receipt is back at the
//! province, with receipts in receipt books (as nodes write them now) and inside the dispatch
//! (as nodes wrote them before), at three tree sizes. Protocol level: a real store per unit and
//! two `Session`s over `NodeReplica`s per sync, no sockets, frames counted as the wire encodes
//! them; the scan is copied between stores and counted by its bytes. Prints a Markdown table.
//!
//! `cargo bench --bench directive [-- SIZE... MODE...]`: SIZE is a number of districts, 1 (Bình
//! Liêu and its 8 communes), 4 or 14 (all 609 units); MODE is `books` or `dispatch` (default
//! all sizes, both modes).
//!
//! The tree is Quảng Ninh's 14 districts and Bình Liêu's 8 real communes (the embedded sample)
//! plus synthetic communes under the other 13 districts, 609 units in all. The sessions run in
//! the order field links would bring them: the directive goes down (province to each district,
//! each district to its communes); then each commune records its receipt and syncs with its
//! district, and each district, after its communes, records its own and syncs with the
//! province ("receipts home"); then every node syncs once more, top down, so that whatever is
//! still due moves ("settled"): receipts inside the dispatch go to every recipient there.

mod common;
use common::{enrol_with, identity, introduce, load_average, machine};

use std::path::{Path, PathBuf};
use std::time::Duration;

use communesync::model::dispatch::{self, DispatchKind, Priority};
use communesync::model::{Author, DocId};
use communesync::node::replica::NodeReplica;
use communesync::node::{now_ms, DispatchRequest, Node};
use communesync::proto::{wire, Action, Hash32, Session};
use communesync::trust::PeerIdentity;
use communesync::units::{Role, UnitTree};
use rand::{RngCore, SeedableRng};

/// Units in Quảng Ninh: the province, 14 districts, 594 communes.
const UNITS: usize = 609;
const SCAN_BYTES: usize = 2_000_000;
/// zstd level the network layer uses for control frames (`net::CONTROL_LEVEL`).
const CONTROL_LEVEL: i32 = 3;
/// One-way legs after which a protocol exchange is declared stuck.
const LEGS_MAX: usize = 64;

fn main() {
    let mut sizes = Vec::new();
    let mut modes = Vec::new();
    for arg in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        match arg.as_str() {
            "books" => modes.push(Mode::Books),
            "dispatch" => modes.push(Mode::InDispatch),
            n => match n.parse::<usize>() {
                Ok(n @ 1..=14) => sizes.push(n),
                _ => panic!("unknown argument {arg:?}: use 1..14 (districts), books or dispatch"),
            },
        }
    }
    if sizes.is_empty() {
        sizes = vec![1, 4, 14];
    }
    if modes.is_empty() {
        modes = vec![Mode::InDispatch, Mode::Books];
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&root).expect("bench data directory");
    let tree_dir = tempfile::tempdir_in(&root).expect("scratch");
    let tree_file = tree_dir.path().join("units-609.toml");
    std::fs::write(&tree_file, province_tree()).expect("writing the tree");
    let tree = UnitTree::parse(&std::fs::read_to_string(&tree_file).unwrap()).expect("tree");
    assert_eq!(tree.iter().count(), UNITS);

    println!("# Province-wide directive: flash, one {SCAN_BYTES}-byte scan, to every unit");
    println!();
    println!("{}; load average before: {}", machine(), load_average());
    println!();
    println!("| districts | units | receipts in | directive down: docs B + scan B | receipts home: B, s | settled: B, s | doc bytes in all | doc B per unit | receipts' B per unit | CPU s in all |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &n in &sizes {
        for &mode in &modes {
            let dir = tempfile::tempdir_in(&root).expect("scratch");
            let run = Run::new(dir.path(), &tree, &tree_file, n);
            let r = run.directive(mode);
            let units = run.members.len();
            let docs = r.down.doc_bytes + r.home.doc_bytes + r.settled.doc_bytes;
            let receipts = r.home.doc_bytes + r.settled.doc_bytes;
            println!(
                "| {n} | {units} | {} | {} + {} | {}, {:.1} | {}, {:.1} | {} | {} | {} | {:.1} |",
                mode.name(),
                r.down.doc_bytes,
                r.down.scan_bytes,
                r.home.doc_bytes,
                r.home.cpu.as_secs_f64(),
                r.settled.doc_bytes,
                r.settled.cpu.as_secs_f64(),
                docs,
                docs / units as u64,
                receipts / units as u64,
                (r.down.cpu + r.home.cpu + r.settled.cpu).as_secs_f64(),
            );
        }
    }
    println!();
    println!("load average after: {}", load_average());
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Receipts in receipt books (`dispatch receive` today).
    Books,
    /// Receipts written into the dispatch, as nodes did before receipt books.
    InDispatch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Books => "books",
            Mode::InDispatch => "dispatch",
        }
    }
}

/// The sample tree's province, districts and Bình Liêu communes, and synthetic communes under
/// every other district: 609 units.
fn province_tree() -> String {
    let sample = UnitTree::sample();
    let mut out = String::new();
    let mut unit = |path: &str, name: &str, role: Role| {
        out.push_str(&format!(
            "[[unit]]\npath = \"{path}\"\nname = \"{name}\"\nrole = \"{}\"\n\n",
            role.as_str()
        ));
    };
    let units: Vec<_> = sample.iter().cloned().collect();
    for u in &units {
        unit(&u.path, &u.name, u.role);
    }
    let real = units.len();
    let bare: Vec<_> = units
        .iter()
        .filter(|u| u.role == Role::District && sample.children(&u.path).next().is_none())
        .collect();
    let synthetic = UNITS - real;
    for (i, d) in bare.iter().enumerate() {
        let here = synthetic / bare.len() + usize::from(i < synthetic % bare.len());
        for k in 1..=here {
            unit(
                &format!("{}/xa{k:02}", d.path),
                &format!("Xã {k} ({})", d.name),
                Role::Commune,
            );
        }
    }
    out
}

/// One unit's node.
struct Member {
    unit: String,
    dir: PathBuf,
    /// Index of its parent in `Run::members` (None for the province).
    parent: Option<usize>,
}

/// Nodes for the province and its first `districts` districts (Bình Liêu first) with their
/// communes, every one known to the province and to its district as a node of its unit.
struct Run {
    members: Vec<Member>,
    dir: PathBuf,
    tree_file: PathBuf,
}

/// What the syncs of one phase cost, both directions together.
#[derive(Default)]
struct Cost {
    /// Control frames as encoded for the wire: offers, wants, documents.
    doc_bytes: u64,
    scan_bytes: u64,
    /// CPU of both sides' protocol work (encoding, decoding, checking, storing), and of
    /// recording the receipts.
    cpu: Duration,
}

struct Outcome {
    down: Cost,
    home: Cost,
    settled: Cost,
}

impl Run {
    fn new(dir: &Path, tree: &UnitTree, tree_file: &Path, districts: usize) -> Run {
        let mut districts_in: Vec<&str> = tree
            .iter()
            .filter(|u| u.role == Role::District)
            .map(|u| u.path.as_str())
            .collect();
        // Bình Liêu (the real communes) first.
        districts_in.sort_by_key(|d| (*d != "qn/binhlieu", d.to_string()));
        let mut members = vec![Member {
            unit: "qn".into(),
            dir: PathBuf::new(),
            parent: None,
        }];
        for d in districts_in.into_iter().take(districts) {
            let at = members.len();
            members.push(Member {
                unit: d.into(),
                dir: PathBuf::new(),
                parent: Some(0),
            });
            for c in tree.children(d) {
                members.push(Member {
                    unit: c.path.clone(),
                    dir: PathBuf::new(),
                    parent: Some(at),
                });
            }
        }
        for (i, m) in members.iter_mut().enumerate() {
            m.dir = dir.join(format!("n{i}"));
        }
        Run {
            members,
            dir: dir.to_path_buf(),
            tree_file: tree_file.to_path_buf(),
        }
    }

    fn init(&self) {
        let mut ids = Vec::new();
        for m in &self.members {
            let role = match m.parent {
                None => Role::Province,
                Some(0) => Role::District,
                Some(_) => Role::Commune,
            };
            Node::init_with_tree(&m.dir, &m.unit, role, "admin", Some(&self.tree_file))
                .expect("init");
            let node = Node::open(&m.dir).expect("open");
            ids.push((node.node_id().to_string(), role));
        }
        // Every node enrolled with the province's CA: changes travel signed by their authors.
        let mut province = Node::open(&self.members[0].dir).expect("open");
        province.ca_init().expect("ca init");
        for m in &self.members[1..] {
            let mut node = Node::open(&m.dir).expect("open");
            enrol_with(&province, &mut node, m.dir.parent().expect("scratch"));
        }
        // The province knows every node (as its CA would), each district those of its communes.
        for (i, m) in self.members.iter().enumerate() {
            let mut node = Node::open(&m.dir).expect("open");
            let below: Vec<usize> = (0..self.members.len())
                .filter(|&j| j != i && self.is_below(j, i))
                .collect();
            node.store
                .write(|tx| {
                    for &j in &below {
                        let (id, role) = &ids[j];
                        tx.peer_touch(id, &self.members[j].unit, role.as_str(), now_ms())?;
                    }
                    Ok(())
                })
                .expect("record nodes");
        }
    }

    fn is_below(&self, j: usize, i: usize) -> bool {
        let mut at = self.members[j].parent;
        while let Some(p) = at {
            if p == i {
                return true;
            }
            at = self.members[p].parent;
        }
        false
    }

    fn districts(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].parent == Some(0))
            .collect()
    }

    fn communes_of(&self, district: usize) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].parent == Some(district))
            .collect()
    }

    fn directive(&self, mode: Mode) -> Outcome {
        self.init();
        let scan = self.dir.join("scan.pgm");
        let mut bytes = vec![0u8; SCAN_BYTES];
        rand::rngs::StdRng::seed_from_u64(14).fill_bytes(&mut bytes);
        std::fs::write(&scan, &bytes).expect("scan");
        let to: Vec<String> = self.members[1..].iter().map(|m| m.unit.clone()).collect();
        let mut province = Node::open(&self.members[0].dir).expect("open");
        let d = province
            .dispatch_new(
                None,
                &DispatchRequest {
                    ref_no: "14/CT-UBND".into(),
                    summary: "Ứng phó khẩn cấp bão số 3".into(),
                    kind: DispatchKind::Directive,
                    priority: Priority::Flash,
                    to,
                    attach: vec![scan],
                },
            )
            .expect("dispatch new");
        drop(province);

        let mut down = Cost::default();
        for district in self.districts() {
            self.sync(district, &mut down);
            for commune in self.communes_of(district) {
                self.sync(commune, &mut down);
            }
        }
        let mut home = Cost::default();
        for district in self.districts() {
            for commune in self.communes_of(district) {
                self.receive(commune, &d.id, mode, &mut home);
                self.sync(commune, &mut home);
            }
            self.receive(district, &d.id, mode, &mut home);
            self.sync(district, &mut home);
        }
        let mut province = Node::open(&self.members[0].dir).expect("open");
        let id: DocId = d.id.parse().unwrap();
        let shown = province.dispatch_show(id.as_str()).expect("show");
        let received = shown
            .dispatch
            .recipients
            .iter()
            .filter(|r| r.received_at_ms.is_some())
            .count();
        assert_eq!(received, self.members.len() - 1, "every receipt home");
        drop(province);
        let mut settled = Cost::default();
        for district in self.districts() {
            self.sync(district, &mut settled);
            for commune in self.communes_of(district) {
                self.sync(commune, &mut settled);
            }
        }
        Outcome {
            down,
            home,
            settled,
        }
    }

    /// Records member `i`'s receipt of dispatch `id`, its CPU counted in `cost`.
    fn receive(&self, i: usize, id: &str, mode: Mode, cost: &mut Cost) {
        let mut node = Node::open(&self.members[i].dir).expect("open");
        let started = process_cpu();
        match mode {
            Mode::Books => {
                let r = node.dispatch_receive(None, id).expect("receive");
                assert!(r.recorded);
            }
            Mode::InDispatch => {
                let id: DocId = id.parse().unwrap();
                let unit = self.members[i].unit.clone();
                let author = Author {
                    user: "admin".into(),
                    unit: unit.clone(),
                    node: node.node_id().to_string(),
                };
                let actor = node.actor().clone();
                node.store
                    .write(|tx| {
                        tx.update_doc(&id, &actor, now_ms(), |doc| {
                            Ok(dispatch::receive(doc, &id, &unit, &author, now_ms())?)
                        })
                    })
                    .expect("receive");
            }
        }
        cost.cpu += process_cpu() - started;
    }

    /// One session between member `i` and its parent, run to its end.
    fn sync(&self, i: usize, cost: &mut Cost) {
        let up = self.members[i].parent.expect("a parent");
        let mut a = Side::open(&self.members[up].dir);
        let mut b = Side::open(&self.members[i].dir);
        (a.peer, b.peer) = introduce(&mut a.node, &mut b.node);
        let started = process_cpu();
        let mut sa = Session::new(&mut a.replica(), 0).expect("session");
        let mut sb = Session::new(&mut b.replica(), 0).expect("session");
        for _ in 0..LEGS_MAX {
            let (down, down_scans) = a.drain(&mut sa);
            let (up, up_scans) = b.drain(&mut sb);
            if down.is_empty() && up.is_empty() && down_scans.is_empty() && up_scans.is_empty() {
                assert!(sa.is_done() && sb.is_done(), "both sides converge");
                cost.cpu += process_cpu() - started;
                return;
            }
            cost.doc_bytes += down.iter().chain(&up).map(|f| f.len() as u64).sum::<u64>();
            b.deliver(&mut sb, down);
            a.deliver(&mut sa, up);
            for hash in down_scans {
                cost.scan_bytes += copy_scan(&a, &mut b, &mut sb, &hash);
            }
            for hash in up_scans {
                cost.scan_bytes += copy_scan(&b, &mut a, &mut sa, &hash);
            }
        }
        panic!("a session did not end within {LEGS_MAX} legs");
    }
}

/// One side of a session: its node and how its peer appears to it.
struct Side {
    node: Node,
    peer: PeerIdentity,
}

impl Side {
    fn open(dir: &Path) -> Side {
        let node = Node::open(dir).expect("open");
        let peer = identity(&node);
        Side { node, peer }
    }

    fn replica(&mut self) -> NodeReplica<'_> {
        NodeReplica::new(&mut self.node, self.peer.clone())
    }

    /// Everything the session sends now, encoded as the network layer would, and the scans
    /// it streams.
    fn drain(&mut self, session: &mut Session) -> (Vec<Vec<u8>>, Vec<Hash32>) {
        let mut replica = self.replica();
        let mut frames = Vec::new();
        while let Some(frame) = session.poll_frame(&mut replica).expect("poll_frame") {
            frames.push(wire::encode(&frame, CONTROL_LEVEL));
        }
        let mut scans = Vec::new();
        while let Some(action) = session.poll_action() {
            if let Action::SendBlob { hash, .. } = action {
                scans.push(hash);
            }
        }
        (frames, scans)
    }

    fn deliver(&mut self, session: &mut Session, frames: Vec<Vec<u8>>) {
        let mut replica = self.replica();
        for bytes in frames {
            let frame = wire::decode(&bytes[4..]).expect("decode");
            session.handle(&mut replica, frame).expect("handle");
        }
    }
}

/// Copies a scan the way a scan stream would leave it, and tells the receiving session.
fn copy_scan(from: &Side, to: &mut Side, session: &mut Session, hash: &Hash32) -> u64 {
    let mut data = Vec::new();
    from.node
        .store
        .read_blob(hash, &mut data)
        .expect("read scan");
    to.node
        .store
        .write(|tx| tx.put_blob_bytes(&data, now_ms()))
        .expect("store scan");
    session
        .blob_finished(&mut to.replica(), hash, true)
        .expect("blob finished");
    data.len() as u64
}

/// CPU time of the whole process (both sides of every session run in it, and the threads that
/// check incoming documents).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
