//! docs/operations.md, run as written: its `cs` commands, in order, on a province, a district
//! and a commune on loopback, then a look at what they did.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use crate::util::Server;
use crate::util::{path_arg, TestNode, BIN};

/// Sections whose `cs` commands make one walk from nothing to a restored commune. The others
/// need another setting (a revoked node, a dead disk, systemd) and are tested elsewhere.
const SECTIONS: [&str; 7] = [
    "Create a node",
    "Enrol a node",
    "Peers",
    "Monitoring",
    "Working without a link",
    "Backup",
    "Restore a node from backup",
];
const MACHINES: [&str; 3] = ["province", "district", "commune"];

/// The `cs` lines of the sections above, in order, each with the machine it runs on.
fn commands(doc: &str) -> Vec<(&'static str, String)> {
    let (mut section, mut in_sh, mut machine) = ("", false, None);
    let mut out = Vec::new();
    for line in doc.lines() {
        let line = line.trim();
        if let Some(heading) = line.strip_prefix("## ").or(line.strip_prefix("### ")) {
            section = heading;
            continue;
        }
        if line.starts_with("```") {
            in_sh = !in_sh && line == "```sh";
            continue;
        }
        if !in_sh || !SECTIONS.iter().any(|s| section.starts_with(s)) {
            continue;
        }
        if let Some(m) = MACHINES
            .iter()
            .find(|m| line.contains(&format!("# on the {m}")))
        {
            machine = Some(*m);
        }
        // A pipeline into another tool (jq) shows a use of the output; its `cs` part runs alone
        // elsewhere in the walk.
        if line.starts_with("cs ") && !line.contains(" | ") {
            let on = machine.unwrap_or_else(|| panic!("no `# on the ...` before {line:?}"));
            out.push((on, line.to_string()));
        }
    }
    out
}

#[test]
fn operations_md_runs_as_written() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let nodes: BTreeMap<&str, TestNode> = MACHINES
        .iter()
        .map(|m| (*m, TestNode::uninitialised()))
        .collect();
    // What the administrator carries between machines or keeps aside.
    let carried = tempfile::tempdir().unwrap();
    for dir in ["usb", "backups"] {
        std::fs::create_dir(carried.path().join(dir)).unwrap();
    }
    let carried_dir = path_arg(carried.path());
    let mut servers: BTreeMap<&str, Server> = BTreeMap::new();
    let mut ran = Vec::new();
    for (machine, line) in commands(&doc) {
        let node = &nodes[machine];
        let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
        ran.push(words[1..].join(" "));
        if words == ["cs", "serve"] {
            servers.insert(machine, Server::start(node));
            continue;
        }
        let addr = |m: &str| {
            servers
                .get(m)
                .map(|s| s.addr().to_string())
                .unwrap_or_default()
        };
        // /tmp first: the directories put in place of the others are under it.
        let line = line
            .replace("/tmp/", &format!("{carried_dir}/"))
            .replace("10.0.0.2:7410", &addr("district"))
            .replace("prov.example.vn:7410", &addr("province"))
            .replace("/media/usb/", &format!("{carried_dir}/usb/"))
            .replace(
                "/var/backups/communesync/",
                &format!("{carried_dir}/backups/"),
            );
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cs() {{ \"$CS_BIN\" --data \"$CS_DATA\" \"$@\"; }}\n{line}"
            ))
            .env("CS_BIN", BIN)
            .env("CS_DATA", node.data())
            .env_remove("COMMUNESYNC_DATA")
            .env_remove("COMMUNESYNC_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "on the {machine}: {line}\nexit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The walk covers the life of a node, and not by accident: each step is in the doc.
    for step in [
        "init",
        "ca init",
        "enrol request",
        "ca issue",
        "enrol install",
        "serve",
        "peer add",
        "sync",
        "status",
        "bundle export",
        "bundle import",
        "backup",
        "restore",
        "check --full",
    ] {
        assert!(
            ran.iter().any(|r| r.starts_with(step)),
            "operations.md no longer runs `{step}`: {ran:?}"
        );
    }
    // What they did: the commune synced with its district, the district with the province.
    let commune = nodes["commune"].json(&["status"]);
    let district = nodes["district"].json(&["status"]);
    let contact = |status: &serde_json::Value, unit: &str| {
        status["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["unit"] == unit && !p["sync"]["last_sync_at_ms"].is_null())
    };
    assert!(contact(&commune, "qn/binhlieu"), "{commune}");
    assert!(contact(&district, "qn"), "{district}");
    assert!(contact(&district, "qn/binhlieu/tinhhuc"), "{district}");
    // The backup is private, and the restore kept the database it replaced.
    let backup = carried.path().join("backups/node-2026-11-26.db");
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", backup.display());
    let kept = std::fs::read_dir(nodes["commune"].data())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("node.db.before-restore-")
        });
    assert!(kept, "restore kept no copy of the database it replaced");
    for server in servers.into_values() {
        server.finish();
    }
}
