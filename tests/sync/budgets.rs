//! What one enrolled but hostile node can make a `serve` daemon hold: sessions per node, and
//! memory while it asks for scans it never reads (issue 12, item 4; figures in
//! docs/performance.md "Under attack").

use std::time::{Duration, Instant};

use communesync::proto::{wire, Frame};

use super::{commune_of, open_control, raw_connection, raw_connection_tuned};
use crate::util::{doc_heads, id, province, scan, synced, Server, COMMUNE, SIBLING};

/// Waits for `conn` to be closed by the daemon; its reason as text.
fn closed_within(
    rt: &tokio::runtime::Runtime,
    conn: &quinn::Connection,
    within: Duration,
) -> String {
    rt.block_on(async { tokio::time::timeout(within, conn.closed()).await })
        .map(|e| e.to_string())
        .unwrap_or_else(|_| format!("still open after {within:?}"))
}

#[test]
fn issue12_a_node_holds_at_most_two_sessions_and_a_newer_connection_replaces_its_oldest() {
    let province = province();
    let server = Server::start(&province);
    let commune = commune_of(&province, COMMUNE, &server);
    let rt = crate::util::runtime();
    // Three connections of one node: the third replaces the first.
    let conns: Vec<_> = (0..3)
        .map(|_| raw_connection(&rt, &commune, &server))
        .collect();
    let why = closed_within(&rt, &conns[0], Duration::from_secs(10));
    assert!(
        why.contains("replaced by a newer connection of the same node"),
        "{why}"
    );
    assert!(conns[1].close_reason().is_none() && conns[2].close_reason().is_none());
    // An honest sync of that node (its fourth connection) replaces the second and converges,
    // and the province now holds what it sent.
    let d = id(&commune.new_dispatch("8/UBND", &["qn"], &[]));
    synced(&commune);
    assert!(doc_heads(&province, &d).is_some());
    let why = closed_within(&rt, &conns[1], Duration::from_secs(10));
    assert!(why.contains("replaced by a newer connection"), "{why}");
    // Another node is not affected by this one's sessions.
    let sibling = commune_of(&province, SIBLING, &server);
    synced(&sibling);
    assert!(conns[2].close_reason().is_none());
    server.finish();
}

#[test]
fn issue12_a_peer_asking_again_and_again_for_a_scan_it_never_reads_costs_the_daemon_a_window() {
    let province = province();
    let server = Server::start(&province);
    let commune = commune_of(&province, COMMUNE, &server);
    // A 24 MiB scan the commune may read: the province attaches it to a dispatch to it.
    let bytes = scan(24 << 20, 7);
    let hash: [u8; 32] = *blake3::hash(&bytes).as_bytes();
    let file = province.write_file("big.pdf", &bytes);
    province.new_dispatch("9/UBND", &[COMMUNE], &[&file]);
    let rt = crate::util::runtime();
    // A modified commune: 1 KiB windows it never opens further, since it reads nothing.
    let conn = raw_connection_tuned(&rt, &commune, &server, |t| {
        t.stream_receive_window(quinn::VarInt::from_u32(1024));
        t.receive_window(quinn::VarInt::from_u32(64 << 10));
    });
    let before = crate::util::memory_mib(server.pid(), "VmRSS").expect("daemon alive");
    // The same scan asked for 100 times, one BlobWant each.
    let wants: Vec<Vec<u8>> = (0..100)
        .map(|_| {
            wire::encode(
                &Frame::BlobWant {
                    blobs: vec![(hash, 0)],
                },
                1,
            )
        })
        .collect();
    let control = open_control(&rt, &conn, &wants);
    // The daemon starts sending it (a scan stream opens) and is then held by the window.
    rt.block_on(async {
        let _theirs = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .expect("the daemon opens its control stream")
            .unwrap();
        let _scan = tokio::time::timeout(Duration::from_secs(10), conn.accept_uni())
            .await
            .expect("the daemon starts sending the scan")
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
    });
    let held = crate::util::memory_mib(server.pid(), "VmRSS").expect("daemon alive");
    let peak = crate::util::memory_mib(server.pid(), "VmHWM").expect("daemon alive");
    eprintln!(
        "100 BlobWants of one 24 MiB scan, never read (1 KiB window): daemon RSS {before:.0} MiB before, {held:.0} MiB held, peak {peak:.0} MiB"
    );
    // Read chunk by chunk as the window opens: never the scan whole, nor once per ask.
    assert!(held < before + 16.0, "RSS {before:.0} -> {held:.0} MiB");
    // Meanwhile an honest node syncs as usual.
    let sibling = commune_of(&province, SIBLING, &server);
    let started = Instant::now();
    let d = id(&sibling.new_dispatch("10/UBND", &["qn"], &[]));
    synced(&sibling);
    assert!(doc_heads(&province, &d).is_some());
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(control);
    server.finish();
}

#[test]
fn issue12_a_want_for_a_document_never_offered_ends_the_session() {
    use communesync::proto::DocHeads;
    let province = province();
    let server = Server::start(&province);
    let commune = commune_of(&province, COMMUNE, &server);
    let rt = crate::util::runtime();
    let conn = raw_connection(&rt, &commune, &server);
    // 2,000 ids (the most one Want may list) the daemon never offered.
    let docs = (0..2_000u32)
        .map(|k| DocHeads {
            id: format!("dsp_{k:016x}"),
            heads: Vec::new(),
        })
        .collect();
    let want = wire::encode(&Frame::Want { docs }, 1);
    let _control = open_control(&rt, &conn, &[want]);
    let log = server.wait_log("session ended", 1);
    assert!(log.contains("protocol violation"), "{log}");
    let why = closed_within(&rt, &conn, Duration::from_secs(10));
    assert!(!why.contains("still open"), "{why}");
    server.finish();
}
