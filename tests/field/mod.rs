//! Issue 10: one-shot `sync` on the field's links. A sync that exits 0 must leave the other side
//! holding every document and scan of ours, and us every one of theirs, on every link preset,
//! both ways. The default run covers each preset twice (both directions in each sync); the
//! seeded trial matrix behind docs/performance.md runs with
//! `FIELD_TRIALS=50 cargo test --release --test tests field::trial_matrix -- --ignored --nocapture`.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::util::{
    attachment_hash, blob_rows, enrolled, eventually, exit, holds_doc, holds_within, id,
    incompressible, link, province, runtime, Server, TestNode, COMMUNE,
};

/// Scan bytes per direction: small enough that 2G (64 kbit/s) carries both in seconds, large
/// enough to take many packets (and so many chances of loss) on every link.
fn scan_bytes(preset: &str) -> usize {
    if preset == "2g" {
        24 << 10
    } else {
        160 << 10
    }
}

/// What one trial found.
#[derive(Debug, PartialEq, Eq)]
enum Trial {
    /// Exit 0, converged, and both sides hold both dispatches and both scans.
    Delivered,
    /// Exit 6 (pending) or 5 (the link failed): honest, and the next sync resumes.
    Honest(i32),
    /// Exit 0 with something missing on either side: the lie issue 10 is about.
    Lied(String),
    /// Any other outcome.
    Failed(String),
}

struct Pair {
    province: TestNode,
    server: Server,
    commune: TestNode,
}

fn pair() -> Pair {
    let province = province();
    let server = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    Pair {
        province,
        server,
        commune,
    }
}

/// One dispatch with a fresh scan each way, then one `sync` of the commune through a link
/// shaped by `preset` from `seed`.
fn trial(p: &Pair, preset: &str, seed: u64) -> Trial {
    let rt = runtime();
    let sim = link(&rt, p.server.addr(), preset, seed);
    let mut rng = StdRng::seed_from_u64(seed);
    // The link is new each trial: so is its address.
    let _ = p.commune.run(&["peer", "remove", "up"]);
    peer_through(&p.commune, "up", &sim);
    let bytes = scan_bytes(preset);
    let up_scan = p
        .commune
        .write_file(&format!("up-{seed}.jpg"), &incompressible(bytes, &mut rng));
    let down_scan = p.province.write_file(
        &format!("down-{seed}.jpg"),
        &incompressible(bytes, &mut rng),
    );
    let up = id(&p
        .commune
        .new_dispatch(&format!("{seed}/UBND-BC"), &["qn"], &[&up_scan]));
    let down = id(&p
        .province
        .new_dispatch(&format!("{seed}/UBND-VP"), &[COMMUNE], &[&down_scan]));

    let started = Instant::now();
    let run = p.commune.run(&["--json", "sync"]);
    let took = started.elapsed();
    rt.block_on(sim.shutdown());
    let held = |node: &TestNode, doc: &str, from: &TestNode| {
        holds_doc(node, doc) && blob_rows(node, &attachment_hash(from, doc)) == 1
    };
    let (at_province, at_commune) = (
        held(&p.province, &up, &p.commune),
        held(&p.commune, &down, &p.province),
    );
    match run.code {
        0 => {
            let report = run.json();
            if report["converged"] != true {
                Trial::Lied(format!("exit 0 without converged: {report}"))
            } else if !(at_province && at_commune) {
                Trial::Lied(format!(
                    "exit 0 after {took:?} but the province holds ours: {at_province}, we hold theirs: {at_commune}: {report}"
                ))
            } else {
                Trial::Delivered
            }
        }
        c if c == i32::from(exit::PENDING) || c == i32::from(exit::PEER) => Trial::Honest(c),
        c => Trial::Failed(format!("exit {c}: {}{}", run.stdout, run.stderr)),
    }
}

fn delivered_on(preset: &str) {
    let p = pair();
    assert_eq!(trial(&p, preset, 1), Trial::Delivered, "on {preset}");
    assert_eq!(trial(&p, preset, 2), Trial::Delivered, "on {preset}, again");
    p.server.finish();
}

#[test]
fn a_sync_on_loopback_delivers_both_ways_before_it_says_converged() {
    delivered_on("loopback");
}

#[test]
fn a_sync_on_weak_4g_delivers_both_ways_before_it_says_converged() {
    delivered_on("weak4g");
}

#[test]
fn a_sync_on_satellite_delivers_both_ways_before_it_says_converged() {
    delivered_on("vsat");
}

#[test]
fn a_sync_on_2g_delivers_both_ways_before_it_says_converged() {
    delivered_on("2g");
}

/// The seeded trial matrix: `FIELD_TRIALS` trials (default 10) per preset, each a fresh scan
/// both ways; prints one table row per preset and fails on any exit 0 that lied.
#[test]
#[ignore = "minutes per preset; run by hand (see the module's doc) for docs/performance.md"]
fn trial_matrix() {
    let trials: u64 = std::env::var("FIELD_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let presets =
        std::env::var("FIELD_PRESETS").unwrap_or_else(|_| "loopback,weak4g,vsat,2g".into());
    println!("| link | trials | exit 0, both sides hold everything | exit 6 / 5 (honest) | exit 0 with something missing | other |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut lies = Vec::new();
    for preset in presets.split(',') {
        let p = pair();
        let (mut ok, mut honest, mut lied, mut other) = (0, 0, 0, 0);
        for seed in 0..trials {
            match trial(&p, preset, 1000 + seed) {
                Trial::Delivered => ok += 1,
                Trial::Honest(_) => honest += 1,
                Trial::Lied(why) => {
                    lied += 1;
                    lies.push(format!("{preset} seed {seed}: {why}"));
                }
                Trial::Failed(why) => {
                    other += 1;
                    eprintln!("{preset} seed {seed}: {why}");
                }
            }
        }
        println!("| {preset} | {trials} | {ok} | {honest} | {lied} | {other} |");
        p.server.finish();
    }
    assert!(
        lies.is_empty(),
        "exit 0 while something was missing:\n{}",
        lies.join("\n")
    );
}

/// Appends a scans window that never opens, for peers at or below `unit`.
fn close_scans_window(node: &TestNode, unit: &str) {
    let path = node.config_path();
    let mut text = std::fs::read_to_string(&path).expect("reading config.toml");
    text.push_str(&format!(
        "\n[[sync.limit]]\nunit = \"{unit}\"\nscans_window = \"00:00-00:00\"\n"
    ));
    std::fs::write(&path, text).expect("writing config.toml");
}

fn reopen_scans_window(node: &TestNode) {
    let path = node.config_path();
    let text = std::fs::read_to_string(&path).expect("reading config.toml");
    let kept = &text[..text.find("\n[[sync.limit]]").expect("a limit to remove")];
    std::fs::write(&path, format!("{kept}\n")).expect("writing config.toml");
}

#[test]
fn a_scan_held_back_by_the_peers_scans_window_is_named_pending_with_exit_6_then_arrives() {
    let province = province();
    close_scans_window(&province, COMMUNE);
    let server = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    commune.ok(&["peer", "add", "up", "--addr", server.addr()]);
    let scan = province.write_file(
        "so-do.jpg",
        &incompressible(40_000, &mut StdRng::seed_from_u64(5)),
    );
    let d = id(&province.new_dispatch("5/UBND-VP", &[COMMUNE], &[&scan]));

    let run = commune.run(&["--json", "sync"]);
    assert_eq!(
        run.code,
        i32::from(exit::PENDING),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["converged"], false, "{report}");
    assert_eq!(
        report["scans_not_received"][0]["reason"], "deferred",
        "{report}"
    );
    assert!(
        holds_doc(&commune, &d),
        "the dispatch itself is never held back"
    );
    let hash = attachment_hash(&province, &d);
    assert_eq!(blob_rows(&commune, &hash), 0);
    let text = commune.run(&["sync"]);
    assert!(
        text.stdout.contains("pending: scan") && text.stdout.contains("scans window"),
        "the summary names the scan and why: {}",
        text.stdout
    );

    reopen_scans_window(&province);
    assert_eq!(
        commune.run(&["--json", "sync"]).ok().json()["converged"],
        true
    );
    assert_eq!(
        blob_rows(&commune, &hash),
        1,
        "the scan arrived once the window opened"
    );
    server.finish();
}

/// Issue 10's second lie: a relay asked for a scan it lacks too used to hold the request for
/// 120 s, waiting for a scan from its only possible source, then the sync said converged.
#[test]
fn a_relay_that_lacks_a_scan_too_answers_at_once_and_the_sync_says_pending() {
    let province = province();
    close_scans_window(&province, "qn/binhlieu");
    let upstream = Server::start(&province);
    let district = enrolled(&province, "qn/binhlieu", "district");
    district.ok(&["peer", "add", "province", "--addr", upstream.addr()]);
    let relay = Server::start(&district);
    let commune = enrolled(&province, COMMUNE, "commune");
    commune.ok(&["peer", "add", "district", "--addr", relay.addr()]);
    let scan = province.write_file(
        "so-do.jpg",
        &incompressible(40_000, &mut StdRng::seed_from_u64(6)),
    );
    let d = id(&province.new_dispatch("6/UBND-VP", &[COMMUNE], &[&scan]));
    eventually(
        std::time::Duration::from_secs(30),
        "the district never received the dispatch",
        || holds_doc(&district, &d),
    );

    let started = Instant::now();
    let run = commune.run(&["--json", "sync"]);
    let took = started.elapsed();
    assert_eq!(
        run.code,
        i32::from(exit::PENDING),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let report = run.json();
    assert_eq!(
        report["scans_not_received"][0]["reason"], "not_held",
        "{report}"
    );
    assert!(holds_doc(&commune, &d));
    assert!(
        took < std::time::Duration::from_secs(60),
        "the relay answered at once, not after 120 s: {took:?}"
    );
    relay.finish();
    upstream.finish();
}

/// Issue 10: `serve` killed mid-transfer cost the commune the full 120 s idle timeout.
#[test]
fn a_sync_whose_peer_dies_mid_transfer_exits_5_within_seconds_and_resumes_later() {
    let province = province();
    let server = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    let rt = runtime();
    let sim = link(&rt, server.addr(), "rate=1mbit", 7);
    peer_through(&commune, "up", &sim);
    let scan = province.write_file(
        "so-do.jpg",
        &incompressible(3 << 20, &mut StdRng::seed_from_u64(7)),
    );
    let d = id(&province.new_dispatch("7/UBND-VP", &[COMMUNE], &[&scan]));
    let hash = attachment_hash(&province, &d);

    let (_, mut sync) = commune.spawn(&["--json", "sync"]);
    eventually(
        std::time::Duration::from_secs(30),
        "no chunk arrived",
        || crate::util::chunks_stored(&commune, &hash) > 0,
    );
    let killed = Instant::now();
    server.finish();
    let status = sync.wait().expect("waiting for sync");
    let took = killed.elapsed();
    assert_eq!(status.code(), Some(i32::from(exit::PEER)));
    assert!(
        took < std::time::Duration::from_secs(60),
        "a dead peer is given up after sync.peer_silence_s (30 s), not the 120 s idle timeout: {took:?}"
    );
    let kept = crate::util::chunks_stored(&commune, &hash);
    assert!(kept > 0, "verified chunks stay for the resume");

    let server = Server::start(&province);
    let _ = commune.run(&["peer", "remove", "up"]);
    commune.ok(&["peer", "add", "up", "--addr", server.addr()]);
    assert_eq!(
        commune.run(&["--json", "sync"]).ok().json()["converged"],
        true
    );
    assert_eq!(blob_rows(&commune, &hash), 1);
    rt.block_on(sim.shutdown());
    server.finish();
}

/// Issue 10: a district that added the province as a peer, without `--upstream`, and ran
/// `serve` never connected and logged nothing.
#[test]
fn serve_dials_a_configured_peer_without_upstream_and_refuses_an_upstream_that_does_not_exist() {
    let province = province();
    let upstream = Server::start(&province);
    let district = enrolled(&province, "qn/binhlieu", "district");
    district.ok(&["peer", "add", "province", "--addr", upstream.addr()]);
    let relay = Server::start(&district);
    let d = id(&province.new_dispatch("8/UBND-VP", &[COMMUNE], &[]));
    assert!(
        holds_within(std::time::Duration::from_secs(30), || holds_doc(
            &district, &d
        )),
        "the district never dialled the province:\n{}",
        relay.log()
    );
    relay.finish();
    upstream.finish();

    crate::util::set_sync(&district, "upstream", "\"nosuchpeer\"");
    let error = district.fails(&["serve", "--listen", "127.0.0.1:0"], exit::NODE);
    assert!(
        error.contains("nosuchpeer") && error.contains("peer add"),
        "{error}"
    );
}

/// Issue 10: a relay forwards a scan to its communes chunk by chunk as the chunks arrive,
/// instead of after the whole scan has landed (1.36 × the ideal time on 2G before).
#[test]
fn a_relay_forwards_a_scan_to_its_commune_while_the_scan_is_still_arriving() {
    let province = province();
    let upstream = Server::start(&province);
    let district = enrolled(&province, "qn/binhlieu", "district");
    let rt = runtime();
    // The province → district hop is slow; the district → commune hop is loopback.
    let sim = link(&rt, upstream.addr(), "rate=2mbit", 11);
    peer_through(&district, "province", &sim);
    let relay = Server::start(&district);
    let commune = enrolled(&province, COMMUNE, "commune");
    commune.ok(&["peer", "add", "district", "--addr", relay.addr()]);
    let scan = province.write_file(
        "ban-do.jpg",
        &incompressible(2 << 20, &mut StdRng::seed_from_u64(11)),
    );
    let d = id(&province.new_dispatch("11/UBND-VP", &[COMMUNE], &[&scan]));
    let hash = attachment_hash(&province, &d);
    eventually(
        std::time::Duration::from_secs(30),
        "the district never began receiving the scan",
        || crate::util::chunks_stored(&district, &hash) > 0,
    );

    let (_, mut sync) = p_sync(&commune);
    let mut forwarded_early = false;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while sync.try_wait().expect("polling sync").is_none() {
        assert!(Instant::now() < deadline, "sync did not finish");
        if blob_rows(&district, &hash) == 0 && crate::util::chunks_stored(&commune, &hash) > 0 {
            forwarded_early = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = sync.wait().expect("sync ran");
    assert!(
        forwarded_early,
        "the commune had no chunk before the district held the whole scan"
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        blob_rows(&commune, &hash),
        1,
        "the commune holds the whole scan"
    );
    rt.block_on(sim.shutdown());
    relay.finish();
    upstream.finish();
}

/// Adds `name` as a peer of `node` at the link simulator's address.
fn peer_through(node: &TestNode, name: &str, sim: &linksim::LinkSim) {
    node.ok(&["peer", "add", name, "--addr", &sim.local_addr().to_string()]);
}

fn p_sync(node: &TestNode) -> (Vec<String>, std::process::Child) {
    let mut cmd = node.command(&["--json", "sync"]);
    cmd.stdout(std::process::Stdio::null());
    cmd.stderr(std::process::Stdio::null());
    (vec![], cmd.spawn().expect("starting sync"))
}

// ---- every end-to-end scenario on every preset (issue 10, item 2) ----

/// Up to `attempts` one-shot syncs, a second apart, until one exits 0 with `done` holding.
fn sync_until(node: &TestNode, attempts: usize, done: impl Fn() -> bool) -> bool {
    for _ in 0..attempts {
        if node.run(&["--json", "sync"]).code == 0 && done() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    false
}

fn scan_for(preset: &str, rng: &mut StdRng) -> Vec<u8> {
    incompressible(if preset == "2g" { 96 << 10 } else { 1 << 20 }, rng)
}

/// A commune and its standby edit one assignment offline; after syncing through the link both
/// hold the same replica, with the conflict visible.
fn concurrent_edits(preset: &str, seed: u64) {
    let p = pair();
    let rt = runtime();
    let standby = enrolled(&p.province, COMMUNE, "commune");
    let links: Vec<_> = (0..2)
        .map(|i| link(&rt, p.server.addr(), preset, seed + i))
        .collect();
    for (node, sim) in [(&p.commune, &links[0]), (&standby, &links[1])] {
        peer_through(node, "up", sim);
    }
    let d = id(&p.province.new_dispatch("1/VP", &[COMMUNE], &[]));
    assert!(
        sync_until(&p.commune, 3, || holds_doc(&p.commune, &d)),
        "{preset}"
    );
    let a = id(&p.commune.json(&[
        "assign",
        "new",
        &d,
        "--lead",
        "lan",
        "--deadline",
        "2030-01-31",
    ]));
    assert!(sync_until(&p.commune, 3, || true), "{preset}");
    assert!(
        sync_until(&standby, 3, || holds_doc(&standby, &a)),
        "{preset}"
    );
    p.commune
        .json(&["assign", "update", &a, "--status", "done"]);
    standby.json(&["assign", "update", &a, "--status", "returned"]);
    for node in [&p.commune, &standby, &p.commune] {
        assert!(sync_until(node, 3, || true), "{preset}");
    }
    let shown = p.commune.json(&["assign", "show", &a]);
    assert_eq!(shown, standby.json(&["assign", "show", &a]), "{preset}");
    assert_eq!(shown, p.province.json(&["assign", "show", &a]), "{preset}");
    assert!(
        shown["conflicts"].to_string().contains("status"),
        "{preset}: {shown}"
    );
    for sim in links {
        rt.block_on(sim.shutdown());
    }
    p.server.finish();
}

/// A scan transfer cut by the link: the sync gives up in seconds (exit 5) and the next one
/// resumes from the chunks kept.
fn resume_after_a_cut(preset: &str, seed: u64) {
    let p = pair();
    let rt = runtime();
    // On loopback the scan would land before the cut: there, the link is held to 8 Mbit/s.
    let spec = if preset == "loopback" {
        "rate=8mbit"
    } else {
        preset
    };
    let sim = link(&rt, p.server.addr(), spec, seed);
    peer_through(&p.commune, "up", &sim);
    let mut rng = StdRng::seed_from_u64(seed);
    // Several 256 KiB chunks even on 2G, so the cut falls between two of them.
    let scan = p
        .province
        .write_file("cut.jpg", &incompressible(640 << 10, &mut rng));
    let d = id(&p.province.new_dispatch("2/VP", &[COMMUNE], &[&scan]));
    let hash = attachment_hash(&p.province, &d);
    let (_, mut sync) = p_sync(&p.commune);
    eventually(
        std::time::Duration::from_secs(120),
        &format!("{preset}: no chunk arrived"),
        || crate::util::chunks_stored(&p.commune, &hash) > 0,
    );
    sim.handle().set_up(false);
    let status = sync.wait().expect("sync ran");
    assert_eq!(status.code(), Some(i32::from(exit::PEER)), "{preset}");
    let kept = crate::util::chunks_stored(&p.commune, &hash);
    assert!(kept > 0, "{preset}: the verified chunks stay");
    sim.handle().set_up(true);
    assert!(
        sync_until(&p.commune, 3, || blob_rows(&p.commune, &hash) == 1),
        "{preset}: the scan did not arrive after the link came back"
    );
    rt.block_on(sim.shutdown());
    p.server.finish();
}

/// Province → district → commune, both hops through the link, a scan down and a report up.
fn relay_tree(preset: &str, seed: u64) {
    let province = province();
    let upstream = Server::start(&province);
    let rt = runtime();
    let up = link(&rt, upstream.addr(), preset, seed);
    let district = enrolled(&province, "qn/binhlieu", "district");
    peer_through(&district, "province", &up);
    let relay = Server::start(&district);
    let down = link(&rt, relay.addr(), preset, seed + 1);
    let commune = enrolled(&province, COMMUNE, "commune");
    peer_through(&commune, "district", &down);
    let mut rng = StdRng::seed_from_u64(seed);
    let scan = province.write_file("relay.jpg", &scan_for(preset, &mut rng));
    let d = id(&province.new_dispatch("3/VP", &[COMMUNE], &[&scan]));
    let hash = attachment_hash(&province, &d);
    assert!(
        sync_until(&commune, 20, || blob_rows(&commune, &hash) == 1),
        "{preset}: the scan never reached the commune through the district"
    );
    let report = id(&commune.new_dispatch("4/BC", &["qn"], &[]));
    assert!(
        sync_until(&commune, 3, || holds_doc(&district, &report)),
        "{preset}"
    );
    eventually(
        std::time::Duration::from_secs(60),
        &format!("{preset}: the district never forwarded the report"),
        || holds_doc(&province, &report),
    );
    for sim in [up, down] {
        rt.block_on(sim.shutdown());
    }
    relay.finish();
    upstream.finish();
}

/// A revocation reaches the district through its link, and the district refuses the node.
fn revocation(preset: &str, seed: u64) {
    let province = province();
    let upstream = Server::start(&province);
    let rt = runtime();
    let up = link(&rt, upstream.addr(), preset, seed);
    let district = enrolled(&province, "qn/binhlieu", "district");
    peer_through(&district, "province", &up);
    let commune = enrolled(&province, COMMUNE, "commune");
    let commune_id = commune.json(&["status"])["node_id"]
        .as_str()
        .unwrap()
        .to_string();
    province.ok(&["ca", "revoke", &commune_id]);
    assert!(
        sync_until(&district, 3, || true),
        "{preset}: the district's sync failed"
    );
    let relay = Server::start(&district);
    let down = link(&rt, relay.addr(), preset, seed + 1);
    peer_through(&commune, "district", &down);
    let run = commune.run(&["--json", "sync"]);
    assert_eq!(
        run.code,
        i32::from(exit::PEER),
        "{preset}: {}{}",
        run.stdout,
        run.stderr
    );
    for sim in [up, down] {
        rt.block_on(sim.shutdown());
    }
    relay.finish();
    upstream.finish();
}

/// A scenario run on one link preset from a seed.
type Scenario = fn(&str, u64);

const SCENARIOS: [(&str, Scenario); 4] = [
    ("concurrent edits", concurrent_edits),
    ("resume after a cut", resume_after_a_cut),
    ("relay tree", relay_tree),
    ("revocation", revocation),
];

#[test]
fn every_scenario_holds_on_weak_4g() {
    for (_, run) in SCENARIOS {
        run("weak4g", 21);
    }
}

/// Every scenario on every preset: `cargo test --release --test tests
/// field::every_scenario_on_every_preset -- --ignored --nocapture` (`FIELD_PRESETS=2g` for one).
#[test]
#[ignore = "minutes; run by hand for docs/performance.md"]
fn every_scenario_on_every_preset() {
    let presets =
        std::env::var("FIELD_PRESETS").unwrap_or_else(|_| "loopback,weak4g,vsat,2g".into());
    for preset in presets.split(',') {
        for (name, run) in SCENARIOS {
            let started = Instant::now();
            run(preset, 31);
            println!(
                "| {preset} | {name} | ok | {:.1} s |",
                started.elapsed().as_secs_f64()
            );
        }
    }
}
