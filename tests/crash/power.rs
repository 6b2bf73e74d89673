//! Power loss, not just a killed process: the node's data directory is an ext4 file system on
//! a loop device whose image lives on a second ext4 file system. Freezing that outer file
//! system stops the inner device's writes at one instant; a copy of the image taken then is
//! the disk as a power cut would leave it: what reached the device is there, the inner page
//! cache (every write not yet fsynced) is not. The copy is mounted (its journal replayed) as
//! the node's data directory and checked.
//!
//! Needs root (mount, losetup, fsfreeze) and ext4; elsewhere the test prints why and passes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::Rng;
use crate::util::{
    enrolled, id, path_arg, scan, tool, Frozen, Mounted, Server, TestNode, COMMUNE, DISTRICT,
};

/// Writes acknowledged so far, in the order their commands exited 0.
#[derive(Default)]
struct Acked {
    docs: Vec<String>,
    scans: Vec<String>,
}

/// Writes documents (some with a scan) on `node` until `stop`, recording each acknowledged one.
fn keep_writing(node: &TestNode, stop: &AtomicBool, acked: &Mutex<Acked>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let json = if n.is_multiple_of(3) {
            node.json(&[
                "dossier",
                "new",
                "--applicant",
                "Phạm D",
                "--procedure",
                "hộ tịch",
            ])
        } else {
            let reference = format!("{n}/POWER");
            let mut args = vec!["--json", "dispatch", "new", "--ref", &reference];
            args.extend(["--summary", "power cut", "--to", COMMUNE]);
            let file;
            if n % 3 == 1 {
                file = node.write_file(&format!("p{n}.pgm"), &scan(300_000, n));
                args.extend(["--attach", &file]);
            }
            let run = node.run(&args);
            if run.code != 0 {
                // Blocked by the frozen device and finished after the copy: not in the cut.
                assert!(
                    stop.load(Ordering::Relaxed),
                    "a write failed: {}",
                    run.stderr
                );
                return;
            }
            run.json()
        };
        let mut acked = acked.lock().expect("ledger lock");
        acked.docs.push(id(&json));
        for a in json["attachments"].as_array().into_iter().flatten() {
            acked
                .scans
                .push(a["hash"].as_str().expect("a hash").to_string());
        }
    }
}

/// A data directory on an ext4 image that lives on a second, freezable ext4 file system.
/// Fields drop in order: the inner file system is unmounted before the outer one.
struct Disk {
    image: PathBuf,
    outer_point: PathBuf,
    inner: Mounted,
    outer: Mounted,
}

impl Disk {
    /// Mounts a fresh disk on `node`'s data directory (which must not exist yet).
    fn under(node: &TestNode) -> Result<Disk, String> {
        let outer_point = node.file("outer");
        let outer = Mounted::fresh(&node.file("outer.img"), 160, &outer_point)?;
        let image = outer_point.join("inner.img");
        let inner = Mounted::fresh(&image, 96, node.data())?;
        Ok(Disk {
            image,
            outer_point,
            inner,
            outer,
        })
    }

    /// The power cut: freezes the outer file system, copies the image to `to`, runs `at_cut`
    /// (no write reaches the image meanwhile), thaws, and returns what `at_cut` returned.
    fn cut<T>(&self, to: &Path, at_cut: impl FnOnce() -> T) -> Result<T, String> {
        let frozen = Frozen::freeze(&self.outer_point)?;
        let copied = tool(
            "cp",
            &["--sparse=always", &path_arg(&self.image), &path_arg(to)],
        );
        let value = at_cut();
        drop(frozen);
        copied.map(|_| value)
    }

    fn unmount(self) {
        let Disk { inner, outer, .. } = self;
        drop(inner);
        drop(outer);
    }
}

/// The database of `node` is whole and every scan in it matches its hash.
fn whole(node: &TestNode) {
    let integrity: String = node
        .db()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    node.ok(&["check", "--full"]);
}

fn docs_in_feed_order(node: &TestNode) -> Vec<String> {
    let db = crate::util::db_read_only(node);
    let mut stmt = db.prepare("SELECT id FROM docs ORDER BY seq").unwrap();
    let ids = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    ids
}

/// One power cut during a stream of writes; returns the number of writes acknowledged before it.
fn one_cut(rng: &mut Rng) -> Result<usize, String> {
    let node = TestNode::uninitialised();
    let disk = Disk::under(&node)?;
    node.ok(&["init", "--unit", COMMUNE, "--role", "commune"]);

    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Acked::default());
    let cut = node.file("after-the-cut.img");
    let control = node.data().join("never-synced");
    let control_bytes = b"written, never fsynced: lost with the power".repeat(100);
    let before_cut = std::thread::scope(|s| {
        let writer = s.spawn(|| keep_writing(&node, &stop, &acked));
        std::thread::sleep(Duration::from_millis(800 + rng.below(1500)));
        std::fs::write(&control, &control_bytes).expect("writing the control file");
        // Commands still running are blocked on the frozen device: none acknowledges anything
        // between the freeze and the end of the copy.
        let acked_then = disk.cut(&cut, || {
            let acked_then = std::mem::take(&mut *acked.lock().expect("ledger lock"));
            stop.store(true, Ordering::Relaxed);
            acked_then
        });
        // Also when the freeze failed and the closure above never ran.
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("the writer thread");
        acked_then
    })?;
    disk.unmount();
    assert!(
        !before_cut.docs.is_empty(),
        "nothing was acknowledged before the cut"
    );

    // Power back: the disk as the cut left it becomes the node's data directory.
    let _after = Mounted::existing(&cut, node.data())?;
    let held = std::fs::read(&control).unwrap_or_default();
    assert!(
        held != control_bytes,
        "the control file survived the cut: the simulation kept unsynced writes"
    );
    whole(&node);
    // Commit order survives: the documents in feed order are those acknowledged, in the order
    // acknowledged, and at most the one write in flight at the cut after them.
    let in_feed = docs_in_feed_order(&node);
    assert!(
        in_feed.len() <= before_cut.docs.len() + 1
            && in_feed[..before_cut.docs.len()] == before_cut.docs[..],
        "after the cut the feed holds {in_feed:?}, acknowledged were {:?}",
        before_cut.docs
    );
    for hash in &before_cut.scans {
        let file = node.data().join("blobs").join(hash);
        assert!(
            file.is_file(),
            "acknowledged scan {hash} has no file after the cut"
        );
    }
    // And the node works on: a new write after the cut.
    node.new_dispatch("after/POWER", &[COMMUNE], &[]);
    Ok(before_cut.docs.len())
}

/// The commune writes and syncs with a province serving from the disk that loses its power,
/// recording the documents the province acknowledged (a sync that exited 0).
fn keep_syncing(commune: &TestNode, stop: &AtomicBool, acked: &Mutex<Vec<String>>) {
    let mut unsynced = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let file;
        let mut attach = vec![];
        if n % 2 == 1 {
            file = commune.write_file(&format!("s{n}.pgm"), &scan(300_000, n));
            attach.push(file.as_str());
        }
        let d = commune.new_dispatch(&format!("{n}/SERVED"), &[DISTRICT], &attach);
        unsynced.push(id(&d));
        let run = crate::util::sync(commune);
        if run.code == 0 {
            acked.lock().expect("ledger lock").append(&mut unsynced);
        } else {
            assert!(
                stop.load(Ordering::Relaxed),
                "a sync failed: {}",
                run.stderr
            );
        }
    }
}

#[test]
fn a_power_cut_on_a_serving_node_loses_nothing_it_acknowledged_to_its_peer() {
    let province = TestNode::uninitialised();
    let disk = match Disk::under(&province) {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("power-loss test skipped: this machine cannot mount loop devices ({why})");
            return;
        }
    };
    province.ok(&["init", "--unit", "qn", "--role", "province"]);
    province.ok(&["ca", "init"]);
    let server = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    commune.ok(&["peer", "add", "up", "--addr", server.addr()]);
    let mut rng = Rng(super::seed());

    let stop = AtomicBool::new(false);
    let acked = Mutex::new(Vec::new());
    let cut = province.file("after-the-cut.img");
    let before_cut = std::thread::scope(|s| {
        let writer = s.spawn(|| keep_syncing(&commune, &stop, &acked));
        std::thread::sleep(Duration::from_millis(1500 + rng.below(1500)));
        let acked_then = disk.cut(&cut, || {
            let acked_then = std::mem::take(&mut *acked.lock().expect("ledger lock"));
            stop.store(true, Ordering::Relaxed);
            acked_then
        });
        stop.store(true, Ordering::Relaxed);
        // The session blocked by the frozen disk ends normally once it thaws.
        writer.join().expect("the writer thread");
        acked_then
    });
    server.finish();
    disk.unmount();
    let before_cut = match before_cut {
        Ok(acked) => acked,
        Err(why) => {
            eprintln!("power-loss test skipped: this machine cannot freeze a file system ({why})");
            return;
        }
    };
    assert!(!before_cut.is_empty(), "no sync finished before the cut");
    eprintln!(
        "power cut on the serving province: {} documents it had acknowledged",
        before_cut.len()
    );

    let _after = Mounted::existing(&cut, province.data()).expect("mounting the disk after the cut");
    whole(&province);
    let held = docs_in_feed_order(&province);
    let lost: Vec<&String> = before_cut.iter().filter(|d| !held.contains(d)).collect();
    assert!(
        lost.is_empty(),
        "the province lost what it acknowledged: {lost:?}"
    );

    // Back up: the next sync converges and the province holds everything the commune wrote.
    let server = Server::start(&province);
    commune.ok(&["peer", "remove", "up"]);
    commune.ok(&["peer", "add", "up", "--addr", server.addr()]);
    crate::util::synced(&commune);
    let held = docs_in_feed_order(&province);
    for d in docs_in_feed_order(&commune) {
        assert!(held.contains(&d), "after the sync the province lacks {d}");
    }
    whole(&province);
    server.finish();
}

#[test]
fn a_power_cut_loses_no_acknowledged_write_and_keeps_the_commit_order() {
    let cuts: u64 = std::env::var("POWER_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed = super::seed();
    eprintln!("power seed {seed} (CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    for cut in 0..cuts {
        match one_cut(&mut rng) {
            Ok(acked) => eprintln!("power cut {cut}: {acked} acknowledged writes, none lost"),
            Err(why) if cut == 0 => {
                eprintln!(
                    "power-loss test skipped: this machine cannot mount loop devices ({why})"
                );
                return;
            }
            Err(why) => panic!("power cut {cut}: {why}"),
        }
    }
}
