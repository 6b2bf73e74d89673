//! Coming back from a lost or damaged disk: `restore` from a backup, and a node enrolled anew
//! for the same unit after its data directory is gone.

use crate::util::{
    enrol, enrolled, exit, id, node_id, path_arg, province, scan, synced, Server, TestNode,
    COMMUNE, DISTRICT,
};

/// The scan of a dispatch's first attachment, written out through the binary.
fn attachment(node: &TestNode, dispatch: &str, name: &str) -> Vec<u8> {
    let out = node.file(&format!("out-{dispatch}-{name}"));
    let _ = std::fs::remove_file(&out);
    node.ok(&[
        "dispatch",
        "attachment",
        dispatch,
        name,
        "--out",
        &path_arg(&out),
    ]);
    std::fs::read(&out).expect("reading the written scan")
}

fn dossier(node: &TestNode) -> String {
    id(&node.json(&[
        "dossier",
        "new",
        "--applicant",
        "Lê Văn C",
        "--procedure",
        "chứng thực",
    ]))
}

#[test]
fn restore_puts_a_backup_in_place_and_the_next_sync_brings_back_what_came_after() {
    let province = province();
    let upstream = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    commune.ok(&["peer", "add", "up", "--addr", upstream.addr()]);
    let before = scan(400_000, 1);
    let first = id(&commune.new_dispatch(
        "1/R",
        &[DISTRICT],
        &[&commune.write_file("first.pgm", &before)],
    ));
    synced(&commune);
    let backup = commune.file("backups").join("node.db");
    std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
    commune.ok(&["backup", "--out", &path_arg(&backup)]);

    // Work after the backup, on both sides, all synced.
    let after = scan(400_000, 2);
    let second = id(&commune.new_dispatch(
        "2/R",
        &[DISTRICT],
        &[&commune.write_file("second.pgm", &after)],
    ));
    let file = dossier(&commune);
    let from_province = id(&province.new_dispatch("3/R", &[COMMUNE], &[]));
    synced(&commune);

    // Refused while a daemon serves the node, and for a file that is not a backup.
    let daemon = Server::start(&commune);
    let line = commune.fails(&["restore", &path_arg(&backup)], exit::USAGE);
    assert!(
        line.contains("serve") && line.contains("stop it first"),
        "{line}"
    );
    daemon.finish();
    let junk = commune.write_file("junk.db", b"not a database at all, just text");
    let line = commune.fails(&["restore", &junk], exit::USAGE);
    assert!(line.contains("is not a communesync database"), "{line}");
    commune.ok(&["dossier", "track", &file]);

    let report = commune.json(&["restore", &path_arg(&backup)]);
    let aside = report["kept_aside"]
        .as_str()
        .expect("the old database was kept");
    assert!(aside.contains("node.db.before-restore-"), "{report}");
    assert!(std::path::Path::new(aside).is_file());
    assert_eq!(report["documents"], 1, "{report}");
    // The kept database still opens with what it held (its WAL moved with it).
    let kept = rusqlite::Connection::open(aside).unwrap();
    let held: i64 = kept
        .query_row("SELECT COUNT(*) FROM docs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(held, 4, "the kept-aside database lost documents");

    // The node is back at the backup: what came after is gone from it, and it is whole.
    commune.ok(&["dispatch", "show", &first]);
    commune.fails(&["dispatch", "show", &second], exit::NOT_FOUND);
    commune.fails(&["dossier", "track", &file], exit::NOT_FOUND);
    commune.ok(&["check", "--full"]);

    // Its next sync brings back its own work since the backup and what it had received.
    synced(&commune);
    commune.ok(&["dossier", "track", &file]);
    commune.ok(&["dispatch", "show", &from_province]);
    assert!(attachment(&commune, &second, "second.pgm") == after);
    assert!(attachment(&commune, &first, "first.pgm") == before);
    commune.ok(&["check", "--full"]);
    upstream.finish();
}

#[test]
fn restore_refuses_a_backup_of_another_node_and_changes_nothing() {
    let province = province();
    let commune = enrolled(&province, COMMUNE, "commune");
    let other = enrolled(&province, COMMUNE, "commune");
    let backup = other.file("other.db");
    other.ok(&["backup", "--out", &path_arg(&backup)]);
    let d = id(&commune.new_dispatch("1/X", &[DISTRICT], &[]));
    let line = commune.fails(&["restore", &path_arg(&backup)], exit::USAGE);
    assert!(line.contains("is a backup of node"), "{line}");
    commune.ok(&["dispatch", "show", &d]);
    let beside: Vec<_> = std::fs::read_dir(commune.data())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("restor"))
        .collect();
    assert!(beside.is_empty(), "a refused restore left {beside:?}");
}

/// A commune whose disk died with no backup: a new node for the same unit, enrolled with a new
/// key (the old one revoked), gets its whole scope back from upstream on its first sync.
#[test]
fn a_node_enrolled_anew_after_a_dead_disk_gets_its_whole_scope_back() {
    let province = province();
    let upstream = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    commune.ok(&["peer", "add", "up", "--addr", upstream.addr()]);
    let content = scan(400_000, 3);
    let own = id(&commune.new_dispatch(
        "1/D",
        &[DISTRICT],
        &[&commune.write_file("own.pgm", &content)],
    ));
    let file = dossier(&commune);
    let received = id(&province.new_dispatch("2/D", &[COMMUNE], &[]));
    synced(&commune);
    let old_id = node_id(&commune);

    // The disk dies: the data directory is gone, key and all.
    std::fs::remove_dir_all(commune.data()).unwrap();
    commune.ok(&["init", "--unit", COMMUNE, "--role", "commune"]);
    enrol(&province, &commune, COMMUNE, "commune");
    assert_ne!(node_id(&commune), old_id, "a new node has a new key");
    province.ok(&["ca", "revoke", &old_id]);
    commune.ok(&["peer", "add", "up", "--addr", upstream.addr()]);

    synced(&commune);
    commune.ok(&["dispatch", "show", &own]);
    commune.ok(&["dossier", "track", &file]);
    commune.ok(&["dispatch", "show", &received]);
    assert!(attachment(&commune, &own, "own.pgm") == content);
    commune.ok(&["check", "--full"]);
    upstream.finish();
}

#[test]
fn restore_refuses_a_backup_whose_scan_files_are_missing_then_restores_them() {
    let node = TestNode::commune();
    let content = scan(300_000, 9);
    let d = id(&node.new_dispatch("1/S", &[DISTRICT], &[&node.write_file("s.pgm", &content)]));
    let dir = node.file("backup");
    std::fs::create_dir_all(&dir).unwrap();
    let backup = dir.join("node.db");
    node.ok(&["backup", "--out", &path_arg(&backup)]);
    // The node's scan files are gone, and the backup was copied without its blobs/.
    std::fs::remove_dir_all(node.data().join("blobs")).unwrap();
    std::fs::rename(dir.join("blobs"), node.file("blobs-elsewhere")).unwrap();
    let line = node.fails(&["restore", &path_arg(&backup)], exit::USAGE);
    assert!(
        line.contains("names 1 scan(s) whose files are neither in"),
        "{line}"
    );
    assert!(
        node.db_path().is_file(),
        "a refused restore moved the database"
    );

    std::fs::rename(node.file("blobs-elsewhere"), dir.join("blobs")).unwrap();
    let report = node.json(&["restore", &path_arg(&backup)]);
    assert_eq!(report["scan_files_copied"], 1, "{report}");
    node.ok(&["check", "--full"]);
    assert!(attachment(&node, &d, "s.pgm") == content);
}
