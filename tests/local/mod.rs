//! End-to-end tests of a node working alone: every local command through the real binary,
//! checking exit code, message and the state left behind, and that bad input changes nothing.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde_json::Value;

use crate::util::{
    exit, field_set, id, now_ms, path_arg, scan, set, strs, Run, TestNode, Tmpfs, BIN, COMMUNE,
    DISTRICT, SIBLING,
};

/// The recipient entry for `unit` in a `dispatch show` object.
fn recipient<'a>(dispatch: &'a Value, unit: &str) -> &'a Value {
    dispatch["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["unit"] == unit)
        .unwrap_or_else(|| panic!("{unit} is not a recipient of {dispatch}"))
}

/// A file's bytes and modification time, to prove a command did not touch it.
fn fingerprint(path: &std::path::Path) -> (Vec<u8>, SystemTime) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    (bytes, mtime)
}

fn dir_listing(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

// ---- init and users ----

#[test]
fn init_creates_a_node_and_a_second_init_changes_nothing() {
    let node = TestNode::uninitialised();
    let report = node.json(&[
        "init", "--unit", COMMUNE, "--role", "commune", "--user", "chutich",
    ]);
    assert_eq!(report["unit"], COMMUNE);
    assert_eq!(report["role"], "commune");
    assert_eq!(report["user"], "chutich");
    let node_id = report["node_id"].as_str().unwrap();
    assert!(
        node_id.len() == 32 && node_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "node id {node_id}"
    );
    let config = std::fs::read_to_string(node.config_path()).unwrap();
    assert!(
        config.contains(&format!("unit = \"{COMMUNE}\"")),
        "{config}"
    );
    assert!(config.contains("default_user = \"chutich\""), "{config}");
    let users = node.json(&["user", "list"]);
    assert_eq!(strs(&users, "name"), ["chutich"]);

    let files = dir_listing(node.data());
    let config_before = fingerprint(&node.config_path());
    let db_before = fingerprint(&node.db_path());
    let line = node.fails(
        &["init", "--unit", SIBLING, "--role", "commune"],
        exit::NODE,
    );
    assert!(line.contains("already a communesync node"), "{line}");
    assert!(line.contains(&path_arg(node.data())), "{line}");
    assert_eq!(fingerprint(&node.config_path()), config_before);
    assert_eq!(fingerprint(&node.db_path()), db_before);
    assert_eq!(dir_listing(node.data()), files);
    // The node still works as the first init made it.
    assert_eq!(node.json(&["user", "list"])[0]["name"], "chutich");
}

#[test]
fn init_refuses_a_bad_unit_or_a_directory_holding_other_files() {
    let node = TestNode::uninitialised();
    let line = node.fails(
        &["init", "--unit", "qn/nowhere", "--role", "commune"],
        exit::USAGE,
    );
    assert!(line.contains("unknown unit \"qn/nowhere\""), "{line}");
    assert!(
        !line.contains("config.toml"),
        "no config file exists yet: {line}"
    );
    assert!(!node.data().exists(), "a refused init leaves no directory");
    let line = node.fails(
        &["init", "--unit", COMMUNE, "--role", "district"],
        exit::USAGE,
    );
    assert!(
        line.contains("district") && line.contains("commune"),
        "{line}"
    );
    assert!(!node.data().exists(), "a refused init leaves no directory");

    std::fs::create_dir_all(node.data()).unwrap();
    std::fs::write(node.data().join("notes.txt"), "mine").unwrap();
    let line = node.fails(
        &["init", "--unit", COMMUNE, "--role", "commune"],
        exit::USAGE,
    );
    assert!(line.contains("not empty"), "{line}");
    assert_eq!(dir_listing(node.data()), set(&["notes.txt"]));
}

#[test]
fn users_are_added_listed_and_checked() {
    let node = TestNode::commune();
    let added = node.json(&["user", "add", "hoa", "--title", "kế toán"]);
    assert_eq!(added["name"], "hoa");
    let users = node.json(&["user", "list"]);
    assert_eq!(strs(&users, "name"), ["admin", "hoa", "lan", "minh"]);
    assert_eq!(strs(&users, "title")[1], "kế toán");
    assert!(node.ok(&["user", "list"]).contains("hoa"));

    let line = node.fails(&["user", "add", "hoa"], exit::USAGE);
    assert!(
        line.contains("hoa") && line.contains("already exists"),
        "{line}"
    );
    let line = node.fails(&["user", "add", "bad name!"], exit::USAGE);
    assert!(line.contains("bad name!"), "{line}");
    assert_eq!(node.json(&["user", "list"]).as_array().unwrap().len(), 4);
}

// ---- dispatches ----

#[test]
fn dispatch_new_stores_the_scan_and_prints_the_new_object() {
    let node = TestNode::commune();
    let content = scan(600_000, 1);
    let file = node.write_file("cong-van.pgm", &content);
    let before = now_ms();
    let d = node.json(&[
        "--as",
        "lan",
        "dispatch",
        "new",
        "--ref",
        "12/UBND-VP",
        "--summary",
        "Kế hoạch phòng chống lụt bão",
        "--kind",
        "directive",
        "--priority",
        "urgent",
        "--to",
        SIBLING,
        COMMUNE,
        SIBLING,
        "--attach",
        &file,
    ]);
    let id = id(&d);
    assert!(id.starts_with("dsp_") && id.len() == 20, "{id}");
    assert_eq!(d["ref"], "12/UBND-VP");
    assert_eq!(d["summary"], "Kế hoạch phòng chống lụt bão");
    assert_eq!(d["kind"], "directive");
    assert_eq!(d["priority"], "urgent");
    assert_eq!(d["issuer"], COMMUNE);
    assert_eq!(d["created_by"], "lan");
    let created = d["created_at_ms"].as_i64().unwrap();
    assert!((before..=now_ms()).contains(&created), "{created}");
    assert_eq!(
        strs(&d["recipients"], "unit"),
        [SIBLING, COMMUNE],
        "deduplicated"
    );
    let scan0 = &d["attachments"][0];
    assert_eq!(scan0["name"], "cong-van.pgm");
    assert_eq!(scan0["size"], content.len() as u64);
    assert_eq!(scan0["hash"], blake3::hash(&content).to_hex().as_str());
    assert_eq!(scan0["media_type"], "image/x-portable-anymap");

    // Durable: a new process, and a plain SQLite connection, see it.
    let stored: i64 = node
        .db()
        .query_row("SELECT COUNT(*) FROM docs WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(stored, 1);
    let listed = node.json(&["dispatch", "list"]);
    assert_eq!(strs(&listed, "id"), [id.as_str()]);
    assert_eq!(listed[0]["scans"], 1);
    assert_eq!(listed[0]["recipients"], 2);
    assert_eq!(node.count("blobs"), 1);
    assert_eq!(node.count("blob_chunks"), 3, "600 kB in 256 KiB chunks");
    let human = node.ok(&["dispatch", "list"]);
    assert!(
        human.contains(&id) && human.contains("12/UBND-VP"),
        "{human}"
    );
}

#[test]
fn dispatch_list_filters_inbox_outbox_and_unit() {
    let node = TestNode::commune();
    assert!(node.ok(&["dispatch", "list"]).contains("no dispatches"));
    let to_self = id(&node.new_dispatch("1/A", &[COMMUNE], &[]));
    let to_district = id(&node.new_dispatch("2/B", &[DISTRICT], &[]));
    let to_sibling = id(&node.new_dispatch("3/C", &[SIBLING, DISTRICT], &[]));

    let all = node.json(&["dispatch", "list"]);
    assert_eq!(
        strs(&all, "id"),
        [to_sibling.as_str(), to_district.as_str(), to_self.as_str()],
        "newest first"
    );
    assert_eq!(
        field_set(&node.json(&["dispatch", "list", "--inbox"]), "id"),
        set(&[&to_self])
    );
    assert_eq!(
        field_set(&node.json(&["dispatch", "list", "--outbox"]), "id"),
        set(&[&to_self, &to_district, &to_sibling])
    );
    assert_eq!(
        field_set(&node.json(&["dispatch", "list", "--unit", DISTRICT]), "id"),
        set(&[&to_district, &to_sibling])
    );
    assert_eq!(
        field_set(&node.json(&["dispatch", "list", "--unit", SIBLING]), "id"),
        set(&[&to_sibling])
    );
    assert!(node
        .json(&["dispatch", "list", "--unit", "qn/haiha"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        node.json(&["dispatch", "list", "--limit", "2"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    let line = node.fails(&["dispatch", "list", "--unit", "qn/nowhere"], exit::USAGE);
    assert!(line.contains("qn/nowhere"), "{line}");
}

#[test]
fn dispatch_show_receive_and_comment() {
    let node = TestNode::commune();
    let d = id(&node.new_dispatch("7/UBND", &[COMMUNE, DISTRICT], &[]));
    let shown = node.json(&["dispatch", "show", &d]);
    assert!(shown["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["received_at_ms"].is_null()));
    assert!(node
        .ok(&["dispatch", "show", &d])
        .contains("not yet received"));

    let before = now_ms();
    let receipt = node.json(&["--as", "lan", "dispatch", "receive", &d]);
    let after = now_ms();
    assert_eq!(receipt["recorded"], true);
    assert_eq!(receipt["unit"], COMMUNE);
    let shown = node.json(&["dispatch", "show", &d]);
    let mine = recipient(&shown, COMMUNE);
    assert_eq!(mine["received_by"], "lan");
    let at = mine["received_at_ms"].as_i64().unwrap();
    assert!(
        (before..=after).contains(&at),
        "{at} not in {before}..={after}"
    );
    assert!(
        recipient(&shown, DISTRICT)["received_at_ms"].is_null(),
        "only this unit received it"
    );

    let changes = node.json(&["audit", &d]).as_array().unwrap().len();
    let again = node.ok(&["--as", "minh", "dispatch", "receive", &d]);
    assert!(
        again.contains("already received") && again.contains("nothing changed"),
        "{again}"
    );
    assert_eq!(
        node.json(&["--as", "minh", "dispatch", "receive", &d])["recorded"],
        false
    );
    assert_eq!(node.json(&["audit", &d]).as_array().unwrap().len(), changes);
    let shown = node.json(&["dispatch", "show", &d]);
    assert!(shown["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["received_by"] == "lan" && r["received_at_ms"] == at));

    let commented = node.json(&[
        "--as",
        "minh",
        "dispatch",
        "comment",
        &d,
        "Đã giao cho địa chính",
    ]);
    assert_eq!(commented["comments"][0]["text"], "Đã giao cho địa chính");
    assert_eq!(commented["comments"][0]["by"], "minh");
    assert_eq!(commented["comments"][0]["unit"], COMMUNE);
    let shown = node.json(&["dispatch", "show", &d]);
    assert_eq!(shown["comments"].as_array().unwrap().len(), 1);
    let human = node.ok(&["dispatch", "show", &d]);
    assert!(
        human.contains("received") && human.contains("by lan"),
        "{human}"
    );
    assert!(human.contains("Đã giao cho địa chính"), "{human}");

    // A dispatch this unit does not receive cannot be marked received here.
    let other = id(&node.new_dispatch("8/UBND", &[SIBLING], &[]));
    let line = node.fails(&["dispatch", "receive", &other], exit::USAGE);
    assert!(line.contains("not a recipient"), "{line}");
    // A blank comment is refused and leaves the document as it was.
    node.fails(&["dispatch", "comment", &d, "   "], exit::USAGE);
    assert_eq!(
        node.json(&["dispatch", "show", &d])["comments"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn attachments_come_back_bit_for_bit_and_are_stored_once() {
    let node = TestNode::commune();
    let content = scan(700_000, 2);
    let first = node.write_file("to-trinh.pgm", &content);
    let copy = node.write_file("to-trinh-copy.pgm", &content);
    let other = node.write_file("phu-luc.pgm", &scan(10_000, 3));
    let a = node.new_dispatch("1/TTr", &[DISTRICT], &[&first]);
    let b = node.new_dispatch("2/TTr", &[DISTRICT], &[&copy, &other]);
    assert_eq!(a["attachments"][0]["hash"], b["attachments"][0]["hash"]);
    assert_eq!(node.count("blobs"), 2, "the same scan is stored once");
    assert_eq!(node.count("blob_chunks"), 3 + 1);

    let out_a = node.file("out-a.pgm");
    let report = node.json(&[
        "dispatch",
        "attachment",
        &id(&a),
        "to-trinh.pgm",
        "--out",
        &path_arg(&out_a),
    ]);
    assert_eq!(report["size"], content.len() as u64);
    assert_eq!(std::fs::read(&out_a).unwrap(), content);
    // By hash prefix, from the other dispatch that references the same blob.
    let hash = a["attachments"][0]["hash"].as_str().unwrap().to_string();
    let out_b = node.file("out-b.pgm");
    let human = node.ok(&[
        "dispatch",
        "attachment",
        &id(&b),
        &hash[..12],
        "--out",
        &path_arg(&out_b),
    ]);
    assert!(human.contains("wrote to-trinh-copy.pgm"), "{human}");
    assert_eq!(std::fs::read(&out_b).unwrap(), content);
    assert!(dir_listing(node.file("").as_path())
        .iter()
        .all(|f| !f.contains("communesync-partial")));

    let missing = node.file("never.pgm");
    let line = node.fails(
        &[
            "dispatch",
            "attachment",
            &id(&a),
            "nope.pdf",
            "--out",
            &path_arg(&missing),
        ],
        exit::NOT_FOUND,
    );
    assert!(
        line.contains("nope.pdf") && line.contains("to-trinh.pgm"),
        "{line}"
    );
    assert!(!missing.exists());
}

// ---- assignments, dossiers, audit, units ----

#[test]
fn assignments_keep_their_whole_history_and_filter_by_overdue_and_lead() {
    let node = TestNode::commune();
    let d = id(&node.new_dispatch("5/KH", &[COMMUNE], &[]));
    let late = node.json(&[
        "assign",
        "new",
        &d,
        "--lead",
        "minh",
        "--co",
        "lan",
        "--deadline",
        "2020-01-15",
    ]);
    let later = node.json(&[
        "assign",
        "new",
        &d,
        "--lead",
        "lan",
        "--deadline",
        "2999-12-31",
    ]);
    let done = node.json(&[
        "assign",
        "new",
        &d,
        "--lead",
        "minh",
        "--deadline",
        "2020-06-01",
    ]);
    let (late, later, done) = (id(&late), id(&later), id(&done));
    assert!(late.starts_with("asg_"));

    node.json(&[
        "--as",
        "minh",
        "assign",
        "update",
        &late,
        "--status",
        "in-progress",
        "--note",
        "khảo sát",
    ]);
    node.json(&[
        "--as",
        "lan",
        "assign",
        "update",
        &late,
        "--status",
        "returned",
        "--note",
        "thiếu hồ sơ",
    ]);
    let shown = node.json(&[
        "--as",
        "minh",
        "assign",
        "update",
        &late,
        "--status",
        "in-progress",
    ]);
    node.json(&[
        "--as", "minh", "assign", "update", &done, "--status", "done",
    ]);

    assert_eq!(shown["status"], "in-progress");
    assert_eq!(shown["lead"], "minh");
    assert_eq!(shown["co"], serde_json::json!(["lan"]));
    assert_eq!(shown["deadline"], "2020-01-15");
    assert_eq!(shown["dispatch_id"], d.as_str());
    let history = &shown["history"];
    assert_eq!(
        strs(history, "status"),
        ["assigned", "in-progress", "returned", "in-progress"]
    );
    assert_eq!(strs(history, "by"), ["admin", "minh", "lan", "minh"]);
    assert_eq!(strs(history, "note"), ["", "khảo sát", "thiếu hồ sơ", ""]);
    let times: Vec<i64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["at_ms"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(node.json(&["assign", "show", &late]), shown);
    let human = node.ok(&["assign", "show", &late]);
    assert!(
        human.contains("thiếu hồ sơ") && human.contains("returned"),
        "{human}"
    );

    let all = node.json(&["assign", "list"]);
    assert_eq!(
        strs(&all, "id"),
        [late.as_str(), done.as_str(), later.as_str()],
        "earliest deadline first"
    );
    assert_eq!(
        strs(&node.json(&["assign", "list", "--overdue"]), "id"),
        [late.as_str()]
    );
    assert_eq!(
        strs(&node.json(&["assign", "list", "--lead", "lan"]), "id"),
        [later.as_str()]
    );
    assert_eq!(
        strs(&node.json(&["assign", "list", "--lead", "minh"]), "id"),
        [late.as_str(), done.as_str()]
    );
    assert_eq!(
        strs(
            &node.json(&["assign", "list", "--lead", "minh", "--overdue"]),
            "id"
        ),
        [late.as_str()]
    );
    assert!(node
        .json(&["assign", "list", "--lead", "lan", "--overdue"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        node.json(&["dispatch", "show", &d])["assignments"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let line = node.fails(
        &["assign", "update", &late, "--status", "assigned"],
        exit::USAGE,
    );
    assert!(line.contains("status"), "{line}");
    let line = node.fails(
        &[
            "assign",
            "new",
            &d,
            "--lead",
            "minh",
            "--co",
            "minh",
            "--deadline",
            "2030-01-01",
        ],
        exit::USAGE,
    );
    assert!(line.contains("minh"), "{line}");
    assert_eq!(
        node.json(&["assign", "show", &late])["history"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(node.json(&["assign", "list"]).as_array().unwrap().len(), 3);
}

#[test]
fn dossiers_advance_and_track_step_since_holder_and_route() {
    let node = TestNode::commune();
    let opened = node.json(&[
        "--as",
        "lan",
        "dossier",
        "new",
        "--applicant",
        "Nguyễn Văn A",
        "--procedure",
        "đăng ký khai sinh",
    ]);
    let d = id(&opened);
    assert!(d.starts_with("dos_"));
    assert_eq!(opened["step"], "received");
    assert_eq!(opened["holder"], COMMUNE);
    assert_eq!(opened["origin"], COMMUNE);

    node.json(&[
        "--as", "lan", "dossier", "advance", &d, "--step", "verified",
    ]);
    let before = now_ms();
    node.json(&[
        "--as",
        "minh",
        "dossier",
        "advance",
        &d,
        "--step",
        "district approval",
        "--to-unit",
        DISTRICT,
    ]);
    let tracked = node.json(&["dossier", "track", &d]);
    assert_eq!(tracked["step"], "district approval");
    assert_eq!(tracked["holder"], DISTRICT);
    let since = tracked["since_ms"].as_i64().unwrap();
    assert!((before..=now_ms()).contains(&since), "{since}");
    assert_eq!(
        strs(&tracked["route"], "step"),
        ["received", "verified", "district approval"]
    );
    assert_eq!(
        strs(&tracked["route"], "unit"),
        [COMMUNE, COMMUNE, DISTRICT]
    );
    assert_eq!(strs(&tracked["route"], "by"), ["lan", "lan", "minh"]);
    let human = node.ok(&["dossier", "track", &d]);
    assert!(
        human.contains("at step \"district approval\"")
            && human.contains(&format!("held by {DISTRICT}")),
        "{human}"
    );

    let listed = node.json(&["dossier", "list"]);
    assert_eq!(strs(&listed, "id"), [d.as_str()]);
    assert_eq!(listed[0]["holder"], DISTRICT);

    let line = node.fails(
        &[
            "dossier",
            "advance",
            &d,
            "--step",
            "x",
            "--to-unit",
            "qn/nowhere",
        ],
        exit::USAGE,
    );
    assert!(line.contains("qn/nowhere"), "{line}");
    assert_eq!(
        node.json(&["dossier", "track", &d])["route"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn audit_lists_every_change_oldest_first_with_who_where_and_what() {
    let node = TestNode::commune();
    let d = id(&node.new_dispatch("9/BC", &[COMMUNE], &[]));
    node.ok(&["--as", "lan", "dispatch", "comment", &d, "đã nhận"]);
    node.ok(&["--as", "minh", "dispatch", "comment", &d, "xong"]);
    // A receipt is recorded in the unit's receipt book, audited there.
    let receipt = node.json(&["--as", "lan", "dispatch", "receive", &d]);
    let book = receipt["book"].as_str().unwrap();
    let booked = node.json(&["audit", book]);
    assert_eq!(strs(&booked, "user"), ["lan"]);
    let what = booked[0]["what"].as_str().unwrap();
    assert!(what.contains("received") && what.contains(&d), "{what}");
    let trail = node.json(&["audit", &d]);
    let entries = trail.as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(strs(&trail, "user"), ["admin", "lan", "minh"]);
    assert!(entries.iter().all(|e| e["unit"] == COMMUNE));
    assert!(entries[0]["what"]
        .as_str()
        .unwrap()
        .contains("created dispatch 9/BC"));
    assert!(entries[1]["what"]
        .as_str()
        .unwrap()
        .contains("commented: đã nhận"));
    assert!(entries[2]["what"]
        .as_str()
        .unwrap()
        .contains("commented: xong"));
    let times: Vec<i64> = entries
        .iter()
        .map(|e| e["at_ms"].as_i64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:?}"
    );
    // Every change names the node that made it: this one.
    let nodes: BTreeSet<String> = strs(&trail, "node").into_iter().collect();
    assert_eq!(nodes.len(), 1);
    let recorded: String = node
        .db()
        .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(nodes.into_iter().next().unwrap(), recorded);
    let human = node.ok(&["audit", &d]);
    assert_eq!(human.lines().count(), 3, "{human}");
    assert!(
        human
            .lines()
            .next()
            .unwrap()
            .contains("admin@qn/binhlieu/tinhhuc"),
        "{human}"
    );
}

#[test]
fn unit_list_shows_the_tree_or_a_subtree() {
    let node = TestNode::commune();
    let units = node.json(&["unit", "list"]);
    let paths = strs(&units, "path");
    assert!(
        paths.contains(&"qn".to_string()) && paths.contains(&COMMUNE.to_string()),
        "{paths:?}"
    );
    let province = units
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["path"] == "qn")
        .unwrap();
    assert_eq!(province["role"], "province");
    let under = strs(&node.json(&["unit", "list", DISTRICT]), "path");
    assert!(under.contains(&COMMUNE.to_string()) && under.contains(&SIBLING.to_string()));
    assert!(under.iter().all(|p| p.starts_with(DISTRICT)), "{under:?}");
    assert!(under.len() < paths.len());
    let line = node.fails(&["unit", "list", "qn/nowhere"], exit::USAGE);
    assert!(line.contains("qn/nowhere"), "{line}");
}

/// Runs `communesync demo ARGS` (which makes its own temporary nodes); returns stdout.
fn demo(args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("demo")
        .args(args)
        .env_remove("COMMUNESYNC_DATA")
        .env_remove("COMMUNESYNC_LOG")
        .output()
        .expect("running communesync demo");
    Run::from_output(args, out).ok().stdout
}

#[test]
fn demo_local_walks_a_dispatch_through_its_life() {
    let stdout = demo(&["--local"]);
    assert!(stdout.contains("status assigned → in-progress"), "{stdout}");
    assert!(stdout.contains("status in-progress → done"), "{stdout}");
    assert!(stdout.contains("demo complete"), "{stdout}");
}

#[test]
fn demo_runs_to_completion() {
    let stdout = demo(&[]);
    assert!(stdout.lines().last() == Some("demo complete"), "{stdout}");
}

// ---- bad input: exit code, one clear line, nothing changed ----

#[test]
fn unknown_unit_in_to_is_refused_and_nothing_is_stored() {
    let node = TestNode::commune();
    let line = node.fails(
        &[
            "dispatch",
            "new",
            "--ref",
            "1/X",
            "--summary",
            "s",
            "--to",
            DISTRICT,
            "qn/nowhere",
        ],
        exit::USAGE,
    );
    assert!(line.contains("unknown unit \"qn/nowhere\""), "{line}");
    let line = node.fails(
        &[
            "dispatch",
            "new",
            "--ref",
            "1/X",
            "--summary",
            "s",
            "--to",
            "QN//Bad",
        ],
        exit::USAGE,
    );
    assert!(line.contains("QN//Bad"), "{line}");
    assert_eq!(node.count("docs"), 0);
}

#[test]
fn malformed_deadline_is_refused() {
    let node = TestNode::commune();
    let d = id(&node.new_dispatch("1/X", &[COMMUNE], &[]));
    for bad in ["2026-13-45", "next week", "15/12/2026"] {
        let line = node.fails(
            &["assign", "new", &d, "--lead", "minh", "--deadline", bad],
            exit::USAGE,
        );
        assert!(line.contains(bad) && line.contains("YYYY-MM-DD"), "{line}");
    }
    assert_eq!(node.count("assignments"), 0);
}

#[test]
fn a_missing_attachment_fails_the_whole_dispatch() {
    let node = TestNode::commune();
    let good = node.write_file("good.pgm", &scan(300_000, 4));
    let missing = path_arg(&node.file("missing.pdf"));
    let line = node.fails(
        &[
            "dispatch",
            "new",
            "--ref",
            "1/X",
            "--summary",
            "s",
            "--to",
            DISTRICT,
            "--attach",
            &good,
            &missing,
        ],
        exit::USAGE,
    );
    assert!(line.contains(&missing), "{line}");
    assert!(node.ok(&["dispatch", "list"]).contains("no dispatches"));
    for table in ["docs", "dispatches", "blobs", "blob_chunks", "doc_blobs"] {
        assert_eq!(node.count(table), 0, "{table}");
    }
    let seq: i64 = node
        .db()
        .query_row("SELECT seq FROM feed", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seq, 0, "the change feed did not move");
    // A directory is not a scan either.
    let line = node.fails(
        &[
            "dispatch",
            "new",
            "--ref",
            "1/X",
            "--summary",
            "s",
            "--to",
            DISTRICT,
            "--attach",
            &path_arg(&node.file("")),
        ],
        exit::USAGE,
    );
    assert!(line.contains("attachment"), "{line}");
}

#[test]
fn a_dispatch_refused_after_its_scans_were_stored_leaves_no_trace() {
    // These checks run inside the write transaction, after the scans went in: the rollback,
    // not an up-front check, is what keeps the blobs out.
    let node = TestNode::commune();
    let good = node.write_file("good.pgm", &scan(300_000, 6));
    let line = node.fails(
        &[
            "dispatch",
            "new",
            "--ref",
            "1/X",
            "--summary",
            "   ",
            "--to",
            DISTRICT,
            "--attach",
            &good,
        ],
        exit::USAGE,
    );
    assert!(line.contains("summary"), "{line}");
    let many: Vec<String> = (0..65)
        .map(|i| node.write_file(&format!("page-{i}.txt"), format!("page {i}").as_bytes()))
        .collect();
    let mut args = vec![
        "dispatch",
        "new",
        "--ref",
        "2/X",
        "--summary",
        "s",
        "--to",
        DISTRICT,
        "--attach",
    ];
    args.extend(many.iter().map(String::as_str));
    let line = node.fails(&args, exit::USAGE);
    assert!(line.contains("attachments"), "{line}");
    for table in ["docs", "blobs", "blob_chunks", "doc_blobs"] {
        assert_eq!(node.count(table), 0, "{table}");
    }
    let files = std::fs::read_dir(node.data().join("blobs")).map_or(0, |d| d.count());
    assert_eq!(files, 0, "no scan file is left behind");
}

#[test]
fn well_formed_but_unknown_ids_are_not_found() {
    let node = TestNode::commune();
    let (dsp, asg, dos) = (
        "dsp_0123456789abcdef",
        "asg_0123456789abcdef",
        "dos_0123456789abcdef",
    );
    let out = path_arg(&node.file("out.bin"));
    for args in [
        vec!["dispatch", "show", dsp],
        vec!["dispatch", "receive", dsp],
        vec!["dispatch", "comment", dsp, "hello"],
        vec!["dispatch", "attachment", dsp, "scan.pdf", "--out", &out],
        vec![
            "assign",
            "new",
            dsp,
            "--lead",
            "minh",
            "--deadline",
            "2030-01-01",
        ],
        vec!["assign", "show", asg],
        vec!["assign", "update", asg, "--status", "done"],
        vec!["dossier", "track", dos],
        vec!["dossier", "advance", dos, "--step", "x"],
        vec!["audit", dsp],
    ] {
        let line = node.fails(&args, exit::NOT_FOUND);
        assert!(
            line.contains("0123456789abcdef") && line.contains("not found"),
            "{args:?}: {line}"
        );
    }
    assert_eq!(node.count("docs"), 0);
}

#[test]
fn malformed_ids_are_refused_as_invalid_input() {
    let node = TestNode::commune();
    for bad in [
        "dsp_123",
        "hello",
        "DSP_0123456789ABCDEF",
        "dsp_0123456789abcdeg",
    ] {
        let line = node.fails(&["dispatch", "show", bad], exit::USAGE);
        assert!(
            line.contains(bad) && line.contains("not a document id"),
            "{line}"
        );
    }
    // Well-formed, but the wrong kind of document for the command.
    let line = node.fails(&["dispatch", "show", "asg_0123456789abcdef"], exit::USAGE);
    assert!(
        line.contains("asg_0123456789abcdef") && line.contains("not a dispatch"),
        "{line}"
    );
    let line = node.fails(&["audit", "nonsense"], exit::USAGE);
    assert!(line.contains("nonsense"), "{line}");
}

#[test]
fn unknown_users_are_named_via_as_and_via_lead() {
    let node = TestNode::commune();
    let line = node.fails(
        &[
            "--as",
            "ghost",
            "dispatch",
            "new",
            "--ref",
            "1/X",
            "--summary",
            "s",
            "--to",
            DISTRICT,
        ],
        exit::NOT_FOUND,
    );
    assert!(line.contains("unknown user \"ghost\""), "{line}");
    assert_eq!(node.count("docs"), 0);
    let d = id(&node.new_dispatch("1/X", &[COMMUNE], &[]));
    let line = node.fails(
        &["--as", "ghost", "dispatch", "receive", &d],
        exit::NOT_FOUND,
    );
    assert!(line.contains("ghost"), "{line}");
    let line = node.fails(
        &[
            "assign",
            "new",
            &d,
            "--lead",
            "phantom",
            "--deadline",
            "2030-01-01",
        ],
        exit::NOT_FOUND,
    );
    assert!(line.contains("unknown user \"phantom\""), "{line}");
    let line = node.fails(
        &[
            "assign",
            "new",
            &d,
            "--lead",
            "minh",
            "--co",
            "phantom",
            "--deadline",
            "2030-01-01",
        ],
        exit::NOT_FOUND,
    );
    assert!(line.contains("phantom"), "{line}");
    assert_eq!(node.count("assignments"), 0);
    assert!(node.json(&["dispatch", "show", &d])["recipients"][0]["received_at_ms"].is_null());
}

#[test]
fn commands_on_a_directory_that_is_not_a_node_are_refused() {
    let node = TestNode::uninitialised();
    let missing_dir = path_arg(node.data());
    let line = node.fails(&["dispatch", "list"], exit::NODE);
    assert!(
        line.contains(&missing_dir) && line.contains("communesync init"),
        "{line}"
    );
    assert!(!node.data().exists(), "a refused command creates nothing");

    std::fs::create_dir_all(node.data()).unwrap();
    for args in [
        vec!["user", "list"],
        vec!["dispatch", "show", "dsp_0123456789abcdef"],
        vec!["assign", "list", "--overdue"],
        vec!["unit", "list"],
    ] {
        let line = node.fails(&args, exit::NODE);
        assert!(line.contains("no communesync node"), "{args:?}: {line}");
    }
    assert!(
        dir_listing(node.data()).is_empty(),
        "no database was created"
    );
}

#[test]
fn a_bad_config_is_refused_naming_the_key() {
    let node = TestNode::commune();
    let good = std::fs::read_to_string(node.config_path()).unwrap();
    let cases = [
        (format!("{good}\ncolour = \"blue\"\n"), "`colour`"),
        (
            good.replace("doc_cache_entries = 256", "doc_cache_entries = \"many\""),
            "doc_cache_entries",
        ),
        (
            good.replace("utc_offset_hours = 7", "utc_offset_hours = 99"),
            "utc_offset_hours",
        ),
        (
            good.replace("role = \"commune\"", "role = \"village\""),
            "role",
        ),
        (good.replace("[store]", "[stor]"), "`stor`"),
    ];
    for (text, key) in cases {
        assert_ne!(text, good, "the case for {key} must change the file");
        std::fs::write(node.config_path(), &text).unwrap();
        let line = node.fails(&["dispatch", "list"], exit::NODE);
        assert!(
            line.contains(key) && line.contains("config.toml"),
            "{key}: {line}"
        );
    }
    std::fs::write(node.config_path(), &good).unwrap();
    assert!(node.ok(&["dispatch", "list"]).contains("no dispatches"));
}

#[test]
fn a_corrupted_database_is_reported_by_name() {
    let node = TestNode::commune();
    node.new_dispatch("1/X", &[COMMUNE], &[]);
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(node.db_path(), &garbage).unwrap();
    for args in [
        vec!["dispatch", "list"],
        vec!["user", "list"],
        vec![
            "dispatch",
            "new",
            "--ref",
            "2/X",
            "--summary",
            "s",
            "--to",
            COMMUNE,
        ],
    ] {
        let line = node.fails(&args, exit::FAILURE);
        assert!(
            line.contains(&path_arg(&node.db_path())),
            "{args:?}: {line}"
        );
        assert!(line.contains("not a database"), "{line}");
        assert!(
            line.contains("restore it from a backup"),
            "real damage: {line}"
        );
    }
    assert_eq!(
        std::fs::read(node.db_path()).unwrap(),
        garbage,
        "the damaged file is left for recovery"
    );
}

// ---- durability and concurrency ----

#[test]
fn concurrent_comments_from_separate_processes_are_all_kept() {
    let node = TestNode::commune();
    let d = id(&node.new_dispatch("1/X", &[COMMUNE], &[]));
    let texts: Vec<String> = (0..8).map(|i| format!("comment {i}")).collect();
    let children: Vec<_> = texts
        .iter()
        .map(|t| node.spawn(&["dispatch", "comment", &d, t]))
        .collect();
    for (args, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shown = node.json(&["dispatch", "show", &d]);
    let got: BTreeSet<String> = strs(&shown["comments"], "text").into_iter().collect();
    assert_eq!(got, texts.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(
        node.json(&["audit", &d]).as_array().unwrap().len(),
        1 + texts.len()
    );
}

#[test]
fn concurrent_dispatches_with_the_same_scan_store_it_once() {
    let node = TestNode::commune();
    let file = node.write_file("same.pgm", &scan(300_000, 5));
    let children: Vec<_> = (0..4)
        .map(|i| {
            let ref_no = format!("{i}/X");
            node.spawn(&[
                "dispatch",
                "new",
                "--ref",
                &ref_no,
                "--summary",
                "s",
                "--to",
                DISTRICT,
                "--attach",
                &file,
            ])
        })
        .collect();
    for (args, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        node.json(&["dispatch", "list"]).as_array().unwrap().len(),
        4
    );
    assert_eq!(node.count("blobs"), 1);
    assert_eq!(node.count("doc_blobs"), 4);
}

#[test]
fn check_lists_scan_files_that_no_scan_names_and_leaves_them() {
    let node = TestNode::commune();
    let good = node.write_file("good.pgm", &scan(300_000, 8));
    node.new_dispatch("1/CHECK", &[DISTRICT], &[&good]);
    // What a crash between writing a new scan's file and committing its row leaves behind.
    let blobs = node.data().join("blobs");
    let stray = blobs.join("ab".repeat(32));
    std::fs::write(&stray, vec![7u8; 1000]).unwrap();
    std::fs::write(blobs.join("junk"), b"x").unwrap();

    let report = node.json(&["check"]);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    assert_eq!(report["scans"], 1, "{report}");
    let listed: Vec<(String, u64)> = report["unreferenced_scan_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            (stray.display().to_string(), 1000),
            (blobs.join("junk").display().to_string(), 1),
        ],
        "the stored scan's own file is not listed"
    );
    let text = node.ok(&["check"]);
    assert!(
        text.contains("2 scan file(s) in blobs/ that no scan names"),
        "{text}"
    );
    assert!(stray.exists(), "check only reports");
}

// ---- local safety (issues 11, 12, 13) ----

/// Escape sequences a hostile peer could put in any text field: OSC 52 (set the clipboard),
/// clear screen, a C1 CSI, DEL and a right-to-left override.
const HOSTILE: &str = "\u{1b}]52;c;ZWNobyBwd25lZA==\u{7}\u{1b}[2J\u{9b}31m\u{7f}\u{202e}";

/// Characters a terminal acts on instead of showing.
fn raw_controls(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

#[test]
fn text_from_peers_reaches_the_screen_with_escape_sequences_neutralised() {
    let node = TestNode::commune();
    let summary = format!("Công văn khẩn {HOSTILE}end");
    let scan_name = format!("scan{HOSTILE}.pgm");
    let scan_path = node.write_file(&scan_name, &scan(5_000, 21));
    let d = id(&node.json(&[
        "dispatch",
        "new",
        "--ref",
        &format!("1/{HOSTILE}"),
        "--summary",
        &summary,
        "--to",
        COMMUNE,
        "--attach",
        &scan_path,
    ]));
    let comment = format!("ý kiến {HOSTILE}");
    node.ok(&["dispatch", "comment", &d, &comment]);
    let a = id(&node.json(&[
        "assign",
        "new",
        &d,
        "--lead",
        "lan",
        "--deadline",
        "2030-01-01",
    ]));
    node.ok(&[
        "assign",
        "update",
        &a,
        "--status",
        "in-progress",
        "--note",
        HOSTILE,
    ]);
    let dossier = id(&node.json(&[
        "dossier",
        "new",
        "--applicant",
        &format!("Nguyễn Văn A{HOSTILE}"),
        "--procedure",
        HOSTILE,
    ]));
    // A refusal reason from a peer, as a session records it.
    node.db()
        .execute(
            "INSERT INTO peer_sync (node_id, unit, role, last_error) VALUES ('00', ?1, 'district', ?2)",
            [DISTRICT, &format!("peer refused: {HOSTILE}")],
        )
        .unwrap();

    for args in [
        vec!["dispatch", "show", &d],
        vec!["dispatch", "list"],
        vec!["audit", &d],
        vec!["assign", "show", &a],
        vec!["assign", "list"],
        vec!["dossier", "track", &dossier],
        vec!["dossier", "list"],
        vec!["status"],
    ] {
        // `status` exits 7 here: the refusal it shows needs attention (issue 13).
        let code = |run: &crate::util::Run| {
            let expected = if args == ["status"] {
                exit::ATTENTION
            } else {
                exit::OK
            };
            assert_eq!(run.code, i32::from(expected), "{args:?}: {}", run.stderr);
        };
        let run = node.run(&args);
        code(&run);
        let text = run.stdout;
        assert_eq!(
            raw_controls(&text),
            [] as [char; 0],
            "{args:?} printed raw controls:\n{text}"
        );
        let json = node.run(&[&["--json"][..], &args].concat());
        code(&json);
        assert_eq!(
            raw_controls(&json.stdout),
            [] as [char; 0],
            "{args:?} --json printed raw controls"
        );
    }
    let shown = node.ok(&["dispatch", "show", &d]);
    assert!(
        shown.contains("Công văn khẩn \\u{1b}]52;c;ZWNobyBwd25lZA==\\u{7}\\u{1b}[2J\\u{9b}31m\\u{7f}\\u{202e}end"),
        "escapes are visible, Vietnamese intact:\n{shown}"
    );
    assert!(shown.contains("scan scan\\u{1b}]52"), "{shown}");
    assert!(shown.contains("ý kiến \\u{1b}"), "{shown}");
    let status = node.run(&["status"]);
    assert_eq!(status.code, i32::from(exit::ATTENTION), "{}", status.stderr);
    let status = status.stdout;
    assert!(
        status.contains("last error: peer refused: \\u{1b}]52"),
        "{status}"
    );
    // JSON keeps the exact text.
    let json = node.json(&["dispatch", "show", &d]);
    assert_eq!(json["summary"], summary.as_str());
    assert_eq!(json["attachments"][0]["name"], scan_name.as_str());
    assert_eq!(json["comments"][0]["text"], comment.as_str());

    // The name in an error line is neutralised too.
    let line = node.fails(
        &[
            "dispatch",
            "attachment",
            &d,
            &format!("x{HOSTILE}"),
            "--out",
            "-",
        ],
        exit::NOT_FOUND,
    );
    assert_eq!(raw_controls(&line), [] as [char; 0], "{line}");
}

#[test]
fn attachment_out_never_replaces_a_device_fifo_link_directory_or_the_node() {
    use std::os::unix::fs::FileTypeExt;
    let node = TestNode::commune();
    let content = scan(300_000, 22);
    let d = id(&node.new_dispatch("1/OUT", &[DISTRICT], &[&node.write_file("s.pgm", &content)]));
    let get = |out: &str, extra: &[&str]| {
        let mut args = vec!["dispatch", "attachment", &d, "s.pgm", "--out", out];
        args.extend_from_slice(extra);
        node.run(&args)
    };

    let fifo = node.file("fifo");
    let c_fifo = std::ffi::CString::new(path_arg(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let target = node.write_file("target.txt", b"not yours");
    let link = node.file("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dir = node.file("a-directory");
    std::fs::create_dir(&dir).unwrap();
    for (out, what) in [
        (&fifo, "a device, FIFO or socket"),
        (&link, "a symbolic link"),
        (&dir, "a directory"),
    ] {
        for force in [&[][..], &["--force"][..]] {
            let line = get(&path_arg(out), force).fails(exit::USAGE);
            assert!(
                line.contains(what) && line.contains("nothing was written"),
                "{line}"
            );
        }
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"not yours");
    assert!(dir.is_dir() && dir_listing(&dir).is_empty());

    // Nothing inside the data directory, above all not the database.
    let db_before = fingerprint(&node.db_path());
    for out in [
        node.db_path(),
        node.data().join("copy.pgm"),
        node.data().join("blobs/x"),
    ] {
        let line = get(&path_arg(&out), &["--force"]).fails(exit::USAGE);
        assert!(line.contains("inside this node's data directory"), "{line}");
    }
    let dotted = format!("{}/../node/node.db", path_arg(node.data()));
    let line = get(&dotted, &["--force"]).fails(exit::USAGE);
    assert!(line.contains("inside this node's data directory"), "{line}");
    assert_eq!(fingerprint(&node.db_path()), db_before);
    assert!(!node.data().join("copy.pgm").exists());

    // An existing file only with --force.
    let existing = node.write_file("existing.pgm", b"old");
    let line = get(&path_arg(&node.file("existing.pgm")), &[]).fails(exit::USAGE);
    assert!(
        line.contains("already there") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"old");
    get(&existing, &["--force"]).ok();
    assert_eq!(std::fs::read(&existing).unwrap(), content);

    // `-` is standard output, the bytes alone.
    let out = node
        .command(&["dispatch", "attachment", &d, "s.pgm", "--out", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == content, "stdout holds the scan, nothing else");
    assert!(!node.file("-").exists());
    // No temporary file left anywhere.
    assert!(
        dir_listing(&node.file(""))
            .iter()
            .all(|f| !f.contains("communesync-partial")),
        "{:?}",
        dir_listing(&node.file(""))
    );
}

/// A bundle export whose output name ends in `.partial` keeps its output, and an import reads
/// the bundle once: from a pipe, which cannot be read twice, it applies what it verified.
#[test]
fn bundle_export_keeps_a_partial_named_output_and_import_reads_the_file_once() {
    use std::io::Write;
    use std::process::Stdio;
    let province = crate::util::province();
    let commune = crate::util::enrolled(&province, COMMUNE, "commune");
    let data = scan(600_000, 23);
    let d =
        id(&province.new_dispatch("3/KH", &[COMMUNE], &[&province.write_file("kh.pgm", &data)]));
    let out = province.file("for-tinhhuc.partial");
    let export = province.json(&[
        "bundle",
        "export",
        "--for",
        COMMUNE,
        "--out",
        &path_arg(&out),
    ]);
    assert_eq!(export["docs"], 1, "{export}");
    assert!(out.exists(), "the export removed its own output");
    assert_eq!(mode(&out), 0o600, "a bundle holds documents in clear");
    // Exporting again replaces the file whole; nothing else is left beside it.
    province.json(&[
        "bundle",
        "export",
        "--for",
        COMMUNE,
        "--out",
        &path_arg(&out),
    ]);
    let beside: Vec<String> = dir_listing(&province.file(""))
        .into_iter()
        .filter(|f| f.contains("partial"))
        .collect();
    assert_eq!(beside, ["for-tinhhuc.partial"]);
    let line = province.fails(
        &[
            "bundle",
            "export",
            "--for",
            COMMUNE,
            "--out",
            &path_arg(&province.db_path()),
        ],
        exit::USAGE,
    );
    assert!(line.contains("inside this node's data directory"), "{line}");
    assert!(province.json(&["status"])["documents"].as_i64().unwrap() >= 1);

    let bundle = std::fs::read(&out).unwrap();
    let mut child = commune
        .command(&["--json", "bundle", "import", "/dev/stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&bundle));
    let done = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        done.status.success(),
        "import from a pipe failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let report: Value = serde_json::from_slice(&done.stdout).unwrap();
    assert_eq!(report["scans_stored"], 1, "{report}");
    let back = commune.file("back.pgm");
    commune.ok(&[
        "dispatch",
        "attachment",
        &d,
        "kh.pgm",
        "--out",
        &path_arg(&back),
    ]);
    assert!(std::fs::read(&back).unwrap() == data);
}

/// Runs the binary on `node` with umask 022 (group and others may read new files by default).
fn run_umask_022(node: &TestNode, args: &[&str]) -> Run {
    use std::os::unix::process::CommandExt;
    let mut cmd = node.command(args);
    // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    Run::from_output(args, cmd.output().unwrap()).ok()
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn data_directory_key_database_scans_and_backups_are_private_under_umask_022() {
    let node = TestNode::uninitialised();
    run_umask_022(&node, &["init", "--unit", COMMUNE, "--role", "commune"]);
    let scan_path = node.write_file("s.pgm", &scan(300_000, 24));
    let d = run_umask_022(
        &node,
        &[
            "--json",
            "dispatch",
            "new",
            "--ref",
            "1/P",
            "--summary",
            "s",
            "--to",
            DISTRICT,
            "--attach",
            &scan_path,
        ],
    )
    .json();
    let hash = d["attachments"][0]["hash"].as_str().unwrap().to_string();
    let backup = node.file("backups").join("node.db");
    std::fs::create_dir(node.file("backups")).unwrap();
    run_umask_022(&node, &["backup", "--out", &path_arg(&backup)]);

    assert_eq!(mode(node.data()), 0o700, "data directory");
    assert_eq!(mode(&node.data().join("node.key")), 0o600, "node.key");
    assert_eq!(mode(&node.db_path()), 0o600, "node.db");
    assert_eq!(mode(&node.data().join("blobs")), 0o700, "blobs/");
    assert_eq!(
        mode(&node.data().join("blobs").join(&hash)),
        0o600,
        "a scan file"
    );
    assert_eq!(mode(&backup), 0o600, "the backup");
    assert_eq!(
        mode(&node.file("backups/blobs")),
        0o700,
        "the backup's blobs/"
    );
    assert_eq!(
        mode(&node.file("backups/blobs").join(&hash)),
        0o600,
        "a backed-up scan"
    );
    // SQLite gives its -wal and -shm files the database file's mode.
    let db = node.db();
    db.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')", [])
        .unwrap();
    for side in ["node.db-wal", "node.db-shm"] {
        assert_eq!(mode(&node.data().join(side)), 0o600, "{side}");
    }
}

#[test]
fn a_killed_dispatch_new_leaves_no_partial_file_under_a_hash_name() {
    const SCAN_BYTES: usize = 64 << 20;
    let node = TestNode::commune();
    let content: Vec<u8> = (0..SCAN_BYTES)
        .map(|i| (i.wrapping_mul(31) % 251) as u8)
        .collect();
    let file = node.write_file("big.pgm", &content);
    let blobs = node.data().join("blobs");
    let (_, mut child) = node.spawn(&[
        "dispatch",
        "new",
        "--ref",
        "1/K",
        "--summary",
        "s",
        "--to",
        DISTRICT,
        "--attach",
        &file,
    ]);
    // Kill it as soon as it has started writing the scan.
    let started = std::time::Instant::now();
    while !blobs.exists() || dir_listing(&blobs).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "dispatch new ended before it could be killed"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let expected = blake3::hash(&content).to_hex().to_string();
    for name in dir_listing(&blobs) {
        if name.len() == 64 {
            let bytes = std::fs::read(blobs.join(&name)).unwrap();
            assert_eq!(
                blake3::hash(&bytes).to_hex().as_str(),
                name,
                "a partial file under a hash name"
            );
        }
    }
    let report = node.json(&["check"]);
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let stale = report["stale_scan_writes"].as_array().unwrap();
    assert_eq!(stale.len(), 1, "{report}");
    assert!(
        stale[0]["path"]
            .as_str()
            .unwrap()
            .contains(&format!("/blobs/.writing-{expected}-")),
        "{report}"
    );
    assert_eq!(
        report["unreferenced_scan_files"],
        serde_json::json!([]),
        "{report}"
    );
    let text = node.ok(&["check"]);
    assert!(
        text.contains("1 unfinished scan write(s) in blobs/ whose process is gone"),
        "{text}"
    );

    // The same scan stores whole afterwards.
    let d = node.new_dispatch("2/K", &[DISTRICT], &[&file]);
    assert_eq!(d["attachments"][0]["hash"], expected.as_str());
    assert!(std::fs::read(blobs.join(&expected)).unwrap() == content);
    assert_eq!(node.json(&["check"])["scans"], 1);
}

#[test]
fn a_full_disk_or_a_read_only_mount_is_said_as_such_without_advising_a_restore() {
    let node = TestNode::uninitialised();
    // The data directory is a 2 MiB file system of its own.
    let Some(disk) = Tmpfs::mount(node.data(), "2m") else {
        return;
    };
    node.ok(&["init", "--unit", COMMUNE, "--role", "commune"]);
    let before = id(&node.new_dispatch("0/F", &[DISTRICT], &[]));
    let big = node.write_file("big.pgm", &scan(4 << 20, 25));
    let big_dispatch = [
        "dispatch",
        "new",
        "--ref",
        "1/F",
        "--summary",
        "s",
        "--to",
        DISTRICT,
        "--attach",
        &big,
    ];
    let line = node.fails(&big_dispatch, exit::FAILURE);
    assert!(
        line.contains(&format!(
            "no space left on the device holding {}",
            path_arg(&node.data().join("blobs"))
        )),
        "{line}"
    );
    assert!(!line.contains("backup"), "{line}");
    assert_eq!(
        dir_listing(&node.data().join("blobs")),
        BTreeSet::new(),
        "the failed write left a file"
    );
    assert_eq!(node.count("docs"), 1, "only the acknowledged dispatch");
    node.ok(&["dispatch", "show", &before]);

    // Space returns: the same write goes through, and nothing is damaged.
    disk.grow("32m");
    node.ok(&big_dispatch);
    assert_eq!(node.count("docs"), 2);
    node.ok(&["check", "--full"]);

    disk.remount_read_only();
    for args in [
        vec![
            "dispatch",
            "new",
            "--ref",
            "2/F",
            "--summary",
            "s",
            "--to",
            DISTRICT,
        ],
        vec!["dispatch", "list"],
    ] {
        let line = node.fails(&args, exit::FAILURE);
        assert!(
            line.contains(&format!(
                "the file system holding {} is mounted read-only",
                path_arg(node.data())
            )),
            "{args:?}: {line}"
        );
        assert!(!line.contains("backup"), "{line}");
    }
}

/// Runs the binary on `node` as a user who does not own it: as root, the binary drops to
/// `nobody` (uid 65534), from a copy it can execute if the build directory is closed to it;
/// as anyone else, it runs as itself on files the test made unreadable (`unreadable`).
fn run_as_stranger(node: &TestNode, unreadable: &std::path::Path, args: &[&str]) -> Run {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = node.command(args);
    if root {
        let probe = std::process::Command::new(BIN)
            .arg("--version")
            .uid(65534)
            .gid(65534)
            .output();
        if !probe.is_ok_and(|o| o.status.success()) {
            let copy = node.file("bin/communesync");
            if !copy.exists() {
                std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
                std::fs::copy(BIN, &copy).unwrap();
                std::fs::set_permissions(
                    copy.parent().unwrap(),
                    std::fs::Permissions::from_mode(0o755),
                )
                .unwrap();
            }
            let mut other = std::process::Command::new(&copy);
            other
                .args(cmd.get_args())
                .stdin(std::process::Stdio::null());
            cmd = other;
        }
        // std drops root's supplementary groups too when it changes the uid.
        cmd.uid(65534).gid(65534);
    } else {
        std::fs::set_permissions(unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = cmd.output().unwrap();
    if !root {
        let restore = if unreadable.is_dir() || unreadable == node.data() {
            0o700
        } else {
            0o600
        };
        std::fs::set_permissions(unreadable, std::fs::Permissions::from_mode(restore)).unwrap();
    }
    Run::from_output(args, out)
}

#[test]
fn permission_denied_names_the_user_and_the_file_without_advising_a_restore() {
    use std::os::unix::fs::PermissionsExt;
    let node = TestNode::commune();
    std::fs::set_permissions(node.file(""), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The data directory itself is closed to the stranger.
    let line = run_as_stranger(&node, node.data(), &["dispatch", "list"]).fails(exit::FAILURE);
    assert!(
        line.contains("permission denied for ") && line.contains("(uid "),
        "{line}"
    );
    assert!(
        line.contains(&format!("on {} (owned by uid", path_arg(node.data()))),
        "{line}"
    );
    assert!(
        !line.contains("backup") && !line.contains("no communesync node"),
        "{line}"
    );

    // The directory is open, the database is not.
    std::fs::set_permissions(node.data(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let line = run_as_stranger(&node, &node.db_path(), &["dispatch", "list"]).fails(exit::FAILURE);
    assert!(
        line.contains(&format!("on {} (owned by uid", path_arg(&node.db_path()))),
        "{line}"
    );
    assert!(
        line.contains("permission denied for ") && !line.contains("backup"),
        "{line}"
    );
    std::fs::set_permissions(node.data(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(node.ok(&["dispatch", "list"]).contains("no dispatches"));
}
