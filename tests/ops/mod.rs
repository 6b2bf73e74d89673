//! The administrator's view: packaging (completions, man page, systemd readiness), the exit
//! codes the README promises, config mistakes caught before they loop, and the small things
//! of daily use (list totals, Vietnamese typed decomposed, DNS failures, log times).

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::util::{enrolled, province, Server};
mod walkthrough;

use crate::util::{exit, id, path_arg, Run, TestNode, COMMUNE};

/// Asserts `run` exited with `code`, saying why on stderr unless 0;
/// returns what it said. (A usage error from the argument parser takes several lines.)
fn exited(code: u8, run: Run) -> String {
    if code == exit::OK {
        return run.ok().stdout;
    }
    assert_eq!(run.code, i32::from(code), "{run:?}");
    // Only a sync that ran to its end (6) and a status that found problems (7) print a summary.
    assert!(
        run.stderr.starts_with("error: ")
            && (run.stdout.is_empty() || code == exit::PENDING || code == exit::ATTENTION),
        "{run:?}"
    );
    run.stderr.lines().next().unwrap_or_default().to_string()
}

/// Waits up to `within` for `child` to exit; its code and stderr.
fn exit_of(mut child: std::process::Child, within: Duration) -> (Option<i32>, String) {
    let deadline = std::time::Instant::now() + within;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[test]
fn completions_and_the_man_page_name_every_command() {
    let node = TestNode::uninitialised();
    let commands = [
        "init",
        "dispatch",
        "assign",
        "dossier",
        "serve",
        "sync",
        "status",
        "backup",
        "restore",
        "bundle",
        "completions",
        "man",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let script = node.ok(&["completions", shell]);
        for c in commands {
            assert!(script.contains(c), "{shell} completions lack {c}");
        }
        // The allowed values complete too.
        assert!(
            script.contains("most-urgent"),
            "{shell}: no --priority values"
        );
    }
    let page = node.ok(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH communesync 1"),
        "{page}"
    );
    for c in commands {
        assert!(page.contains(c), "the man page lacks {c}");
    }
    exited(exit::USAGE, node.run(&["completions", "tcsh"]));
}

#[test]
fn every_help_shows_its_choices_and_an_example() {
    let node = TestNode::uninitialised();
    let help = node.ok(&["assign", "update", "--help"]);
    assert!(
        help.contains("[possible values: assigned, in-progress, done, returned]"),
        "{help}"
    );
    assert!(help.contains("Example:\n  communesync"), "{help}");
    let help = node.ok(&["init", "--help"]);
    assert!(
        help.contains("values: commune, district, province]"),
        "{help}"
    );
}

/// Waits for one datagram on `socket`.
fn notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn serve_tells_systemd_it_is_ready_once_bound_and_when_it_stops() {
    let province = province();
    let socket_path = province.file("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut cmd = province.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.env("NOTIFY_SOCKET", &socket_path).stdout(Stdio::null());
    let child = cmd.spawn().unwrap();
    assert_eq!(notification(&socket), "READY=1");
    sigterm(&child);
    assert_eq!(notification(&socket), "STOPPING=1");
    let (code, log) = exit_of(child, Duration::from_secs(15));
    assert_eq!(code, Some(0), "{log}");
    // Ready came after the address was bound, which the daemon prints once bound.
    assert!(
        log.contains("communesync serving qn on 127.0.0.1:"),
        "{log}"
    );
}

/// The current local hour at UTC+7 (the nodes' default zone).
fn local_hour() -> u64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (secs / 3600 + 7) % 24
}

/// Every code of the README's table, and only those, comes out of a real run that the table's
/// words describe.
#[test]
fn the_exit_code_table_of_the_readme_holds_for_real_runs() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table: BTreeMap<u8, String> = readme
        .lines()
        .skip_while(|l| !l.starts_with("Exit codes"))
        .skip_while(|l| !l.starts_with("| code"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].parse().expect("a code"), cells[2].to_string())
        })
        .collect();

    let province = province();
    let commune = enrolled(&province, COMMUNE, "commune");
    let mut seen: BTreeMap<u8, Vec<String>> = BTreeMap::new();
    let mut expect = |code: u8, what: &str, run: Run| {
        let said = exited(code, run);
        seen.entry(code)
            .or_default()
            .push(format!("{what}: {said}"));
    };

    expect(0, "user list", commune.run(&["user", "list"]));
    expect(
        2,
        "an unknown value",
        commune.run(&[
            "dispatch",
            "new",
            "--ref",
            "1",
            "--summary",
            "s",
            "--to",
            COMMUNE,
            "--priority",
            "soon",
        ]),
    );
    expect(
        2,
        "a malformed id",
        commune.run(&["dispatch", "show", "not-an-id"]),
    );
    expect(
        3,
        "an unknown document",
        commune.run(&["dispatch", "show", "dsp_0000000000000000"]),
    );
    let d = commune.new_dispatch("1/X", &[COMMUNE], &[&commune.write_file("a.pdf", b"scan")]);
    let id = d["id"].as_str().unwrap().to_string();
    let out = path_arg(&commune.file("out.pdf"));
    expect(
        3,
        "an unknown attachment",
        commune.run(&["dispatch", "attachment", &id, "b.pdf", "--out", &out]),
    );
    expect(
        3,
        "a bundle for an unknown peer",
        commune.run(&["bundle", "export", "--for", "nosuchpeer", "--out", &out]),
    );
    expect(4, "no node", TestNode::uninitialised().run(&["status"]));

    // 6 (and a 3 for a scan not here yet): the province holds a scan back outside its window.
    let hour = local_hour();
    let config = std::fs::read_to_string(province.config_path()).unwrap();
    std::fs::write(
        province.config_path(),
        format!("{config}\n[[sync.limit]]\nunit = \"{COMMUNE}\"\nscans_window = \"{:02}:00-{:02}:00\"\n", (hour + 2) % 24, (hour + 3) % 24),
    )
    .unwrap();
    let sent = province.new_dispatch(
        "2/P",
        &[COMMUNE],
        &[&province.write_file("p.pdf", &crate::util::scan(20_000, 1))],
    );
    let server = Server::start(&province);
    commune.ok(&["peer", "add", "up", "--addr", server.addr(), "--upstream"]);
    expect(
        6,
        "a scan held back by the scans window",
        commune.run(&["sync"]),
    );
    let sent = sent["id"].as_str().unwrap().to_string();
    expect(
        3,
        "a scan not arrived yet",
        commune.run(&["dispatch", "attachment", &sent, "p.pdf", "--out", &out]),
    );
    expect(
        5,
        "serve on an address in use",
        province.run(&["serve", "--listen", server.addr()]),
    );
    drop(server);
    // 7: the commune, silent since, seen from the province.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    expect(
        7,
        "a unit silent longer than --stale",
        province.run(&["status", "--stale", "1s"]),
    );

    // 1: a damaged database.
    let damaged = TestNode::commune();
    std::fs::write(damaged.db_path(), vec![7u8; 8192]).unwrap();
    expect(1, "a damaged database", damaged.run(&["user", "list"]));
    // 4: a config that names no user, or a unit the database is not.
    commune.edit_config(&[("default_user = \"admin\"", "default_user = \"nobody\"")]);
    expect(4, "default_user naming no user", commune.run(&["check"]));
    commune.edit_config(&[("default_user = \"nobody\"", "default_user = \"admin\"")]);
    commune.edit_config(&[(
        &format!("unit = \"{COMMUNE}\""),
        "unit = \"qn/binhlieu/hucdong\"",
    )]);
    expect(4, "a config whose unit changed", commune.run(&["status"]));

    let codes: Vec<u8> = table.keys().copied().collect();
    assert_eq!(
        codes,
        (0..=7).collect::<Vec<u8>>(),
        "README table: {table:?}"
    );
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        codes,
        "every code in the table is reached by a run, and no other: {seen:#?}"
    );
    assert_eq!(
        [
            exit::OK,
            exit::FAILURE,
            exit::USAGE,
            exit::NOT_FOUND,
            exit::NODE,
            exit::PEER,
            exit::PENDING
        ],
        [0, 1, 2, 3, 4, 5, 6]
    );
}

#[test]
fn a_default_user_that_is_no_user_stops_serve_and_check_naming_the_line() {
    let province = province();
    province.edit_config(&[("default_user = \"admin\"", "default_user = \"nobody\"")]);
    // Bounded: a daemon that starts anyway would otherwise run (and loop on errors) forever.
    let mut cmd = province.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.stdout(Stdio::null());
    let (code, log) = exit_of(cmd.spawn().unwrap(), Duration::from_secs(15));
    assert_eq!(code, Some(i32::from(exit::NODE)), "{log}");
    let line = log.trim_end();
    assert!(
        line.starts_with("error: ")
            && line.contains("node.default_user = \"nobody\" is not a user of this node"),
        "{line}"
    );
    assert!(
        line.contains("(line ") && line.contains("communesync user add nobody"),
        "{line}"
    );
    let line = province.fails(&["check"], exit::NODE);
    assert!(line.contains("node.default_user"), "{line}");
    province.ok(&["--as", "admin", "user", "add", "nobody"]);
    province.ok(&["check"]);
}

#[test]
fn serve_stops_when_its_config_becomes_invalid_naming_the_key() {
    let province = province();
    let mut cmd = province.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.stdout(Stdio::null());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    province.edit_config(&[("keep_alive_s = 10", "keep_alive_s = 0")]);
    // The daemon re-reads the node every 5 s.
    let (code, log) = exit_of(child, Duration::from_secs(15));
    assert_eq!(code, Some(i32::from(exit::NODE)), "{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default();
    assert!(
        line.contains("sync.keep_alive_s = 0") && line.contains("(line "),
        "{log}"
    );
    assert!(!log.contains("revocation list"), "{log}");
}

#[test]
fn dispatch_list_says_how_many_it_left_out() {
    let node = TestNode::commune();
    for n in 0..3 {
        node.new_dispatch(&format!("{n}/X"), &[COMMUNE], &[]);
    }
    let out = node.ok(&["dispatch", "list", "--limit", "2"]);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(
        out.ends_with("2 of 3 dispatches shown; use --limit 3 to see them all\n"),
        "{out}"
    );
    let all = node.ok(&["dispatch", "list"]);
    assert!(!all.contains("shown"), "{all}");
    let json = node
        .run(&["--json", "dispatch", "list", "--limit", "2"])
        .ok();
    assert_eq!(json.json().as_array().unwrap().len(), 2);
    assert!(
        json.stderr.contains("2 of 3 dispatches shown"),
        "{}",
        json.stderr
    );
}

/// Tests serve at once: each district or province page on a port of its own, not the users'
/// default 127.0.0.1:8377 (which one of them alone could hold).
#[test]
fn test_serves_put_their_status_pages_on_ports_of_their_own() {
    let (first, second) = (province(), province());
    let servers = [Server::start(&first), Server::start(&second)];
    let pages: Vec<String> = servers
        .iter()
        .map(|s| {
            let log = s.wait_log("status page on http://", 1);
            assert!(!log.contains("cannot serve the status page"), "{log}");
            log.lines()
                .find_map(|l| l.split("status page on http://").nth(1))
                .unwrap_or_else(|| panic!("no status page in:\n{log}"))
                .to_string()
        })
        .collect();
    assert_ne!(pages[0], pages[1]);
    assert!(pages.iter().all(|p| !p.contains(":8377")), "{pages:?}");
}

#[test]
fn assign_and_dossier_lists_say_how_many_they_left_out() {
    let node = TestNode::commune();
    let d = id(&node.new_dispatch("1/X", &[COMMUNE], &[]));
    for deadline in ["2020-01-15", "2020-02-15", "2999-12-31"] {
        node.ok(&[
            "assign",
            "new",
            &d,
            "--lead",
            "minh",
            "--deadline",
            deadline,
        ]);
    }
    for n in 0..3 {
        let applicant = format!("Nguyễn Văn {n}");
        node.ok(&[
            "dossier",
            "new",
            "--applicant",
            &applicant,
            "--procedure",
            "khai sinh",
        ]);
    }
    // The total counts the same filter: two overdue of three assignments.
    let out = node.ok(&["assign", "list", "--overdue", "--limit", "1"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.ends_with("1 of 2 assignments shown; use --limit 2 to see them all\n"),
        "{out}"
    );
    let all = node.ok(&["assign", "list", "--overdue"]);
    assert!(!all.contains("shown"), "{all}");
    let out = node.ok(&["dossier", "list", "--limit", "2"]);
    assert!(
        out.ends_with("2 of 3 dossiers shown; use --limit 3 to see them all\n"),
        "{out}"
    );
    for (args, rows, line) in [
        (
            &["--json", "assign", "list", "--limit", "2"][..],
            2,
            "2 of 3 assignments shown",
        ),
        (
            &["--json", "dossier", "list", "--limit", "1"][..],
            1,
            "1 of 3 dossiers shown",
        ),
    ] {
        let json = node.run(args).ok();
        assert_eq!(json.json().as_array().unwrap().len(), rows);
        assert!(json.stderr.contains(line), "{}", json.stderr);
    }
}

#[test]
fn vietnamese_typed_decomposed_is_stored_and_matched_as_precomposed() {
    let node = TestNode::commune();
    // "Nguyễn.Hằng" typed in NFD: base letters followed by combining marks.
    let nfd = "Nguye\u{302}\u{303}n.Ha\u{306}\u{300}ng";
    let nfc = "Nguy\u{1ec5}n.H\u{1eb1}ng";
    node.ok(&["user", "add", nfd]);
    let users = node.json(&["user", "list"]);
    assert!(users.to_string().contains(nfc), "{users}");
    // The same name typed precomposed is the same user, and an NFD search finds NFC data.
    let d = node.new_dispatch("1/X", &[COMMUNE], &[]);
    let id = d["id"].as_str().unwrap();
    node.ok(&["--as", nfc, "dispatch", "receive", id]);
    node.ok(&[
        "assign",
        "new",
        id,
        "--lead",
        nfc,
        "--deadline",
        "2030-01-01",
    ]);
    let led = node.json(&["assign", "list", "--lead", nfd]);
    assert_eq!(led.as_array().unwrap().len(), 1, "{led}");
    let dossier = node.json(&[
        "dossier",
        "new",
        "--applicant",
        nfd,
        "--procedure",
        "khai sinh",
    ]);
    assert_eq!(dossier["applicant"], nfc, "{dossier}");
}

#[test]
fn a_name_that_does_not_resolve_is_said_as_such() {
    let node = TestNode::commune();
    let line = node.fails(
        &["peer", "add", "up", "--addr", "no-such-host.invalid:7410"],
        exit::USAGE,
    );
    assert!(
        line.contains("could not resolve no-such-host.invalid"),
        "{line}"
    );
    let line = node.fails(&["peer", "add", "up", "--addr", "10.0.0.2"], exit::USAGE);
    assert!(line.contains("is not HOST:PORT"), "{line}");
}

#[test]
fn logs_are_stamped_in_the_nodes_zone_like_the_commands_print() {
    let province = province();
    let mut cmd = province.command(&["-v", "serve", "--listen", "127.0.0.1:0"]);
    cmd.stdout(Stdio::null());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(&child);
    let (_, log) = exit_of(child, Duration::from_secs(15));
    let serving = log
        .lines()
        .find(|l| l.contains("serving"))
        .expect("an info line");
    // 2026-11-26 13:33:08.412 +07  INFO ...
    let stamp: Vec<&str> = serving.split_whitespace().take(3).collect();
    assert_eq!(stamp[2], "+07", "{serving}");
    assert_eq!(stamp[0].len(), 10, "{serving}");
}

/// The shipped unit agrees with the program: readiness, the data directory it may write, and
/// the exit codes that restarting cannot fix.
#[test]
fn the_shipped_systemd_unit_matches_what_serve_does() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/communesync.service"
    ))
    .unwrap();
    let values = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(values("Type"), ["notify"]);
    assert!(
        values("ExecStart")[0].ends_with("communesync serve"),
        "{unit}"
    );
    let data = values("Environment")
        .into_iter()
        .find_map(|e| e.strip_prefix("COMMUNESYNC_DATA=").map(str::to_string))
        .expect("the data directory is named");
    assert_eq!(values("ReadWritePaths"), [data]);
    assert_eq!(
        values("RestartPreventExitStatus"),
        [format!("{} {}", exit::USAGE, exit::NODE)]
    );
    for hardening in ["ProtectSystem", "NoNewPrivileges", "PrivateTmp", "User"] {
        assert!(!values(hardening).is_empty(), "no {hardening}");
    }
}
