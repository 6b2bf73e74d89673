//! The tree tests' world: nodes of a two-district test tree, sync settings for quick recovery,
//! and upstream links through LinkSim proxies.

use std::time::Duration;

use communesync::units::UnitTree;
use linksim::{Direction, LinkProfile, LinkSim};
use rand::Rng;
use tokio::runtime::Runtime;

use super::{enrol, TestNode};

/// The province, two districts and three communes in each, as every node of the tree reads it.
pub const UNITS_TOML: &str = r#"
[[unit]]
path = "qn"
name = "Tỉnh Quảng Ninh"
role = "province"

[[unit]]
path = "qn/binhlieu"
name = "Huyện Bình Liêu"
role = "district"

[[unit]]
path = "qn/binhlieu/tinhhuc"
name = "Xã Tình Húc"
role = "commune"

[[unit]]
path = "qn/binhlieu/hucdong"
name = "Xã Húc Động"
role = "commune"

[[unit]]
path = "qn/binhlieu/dongvan"
name = "Xã Đồng Văn"
role = "commune"

[[unit]]
path = "qn/haiha"
name = "Huyện Hải Hà"
role = "district"

[[unit]]
path = "qn/haiha/quangduc"
name = "Xã Quảng Đức"
role = "commune"

[[unit]]
path = "qn/haiha/quangson"
name = "Xã Quảng Sơn"
role = "commune"

[[unit]]
path = "qn/haiha/caichien"
name = "Xã Cái Chiên"
role = "commune"
"#;

/// The districts of [`UNITS_TOML`] with their communes.
pub const DISTRICTS: [(&str, [&str; 3]); 2] = [
    (
        "qn/binhlieu",
        [
            "qn/binhlieu/tinhhuc",
            "qn/binhlieu/hucdong",
            "qn/binhlieu/dongvan",
        ],
    ),
    (
        "qn/haiha",
        [
            "qn/haiha/quangduc",
            "qn/haiha/quangson",
            "qn/haiha/caichien",
        ],
    ),
];

/// A commune of the embedded sample tree, which `init` accepts.
const SAMPLE_COMMUNE: &str = "qn/binhlieu/vongai";

/// A node of `unit` in the test tree: the province with its CA when `province` is None, else a
/// node enrolled by `province`.
pub fn tree_node(province: Option<&TestNode>, unit: &str, role: &str) -> TestNode {
    let node = TestNode::uninitialised();
    // `init` checks the unit against the embedded sample tree and has no way to name another
    // tree file, and the sample lists communes of Bình Liêu only: a commune elsewhere is created
    // as a sample commune and moved to its unit (config and database) before it is ever opened.
    let in_sample = UnitTree::sample().get(unit).is_ok();
    let first = if in_sample { unit } else { SAMPLE_COMMUNE };
    assert!(
        in_sample || role == "commune",
        "{unit} must be in the sample tree"
    );
    node.ok(&["init", "--unit", first, "--role", role]);
    std::fs::write(node.data().join("units.toml"), UNITS_TOML).expect("writing units.toml");
    let path = node.config_path();
    let config = std::fs::read_to_string(&path).expect("reading config.toml");
    let (from_unit, from_units_file) = (
        format!("unit = \"{first}\"\n"),
        "# units_file = \"units.toml\"\n",
    );
    assert!(
        config.contains(&from_unit) && config.contains(from_units_file),
        "unexpected config.toml:\n{config}"
    );
    let config = config
        .replacen(&from_unit, &format!("unit = \"{unit}\"\n"), 1)
        .replacen(from_units_file, "units_file = \"units.toml\"\n", 1);
    std::fs::write(&path, config).expect("writing config.toml");
    if !in_sample {
        node.db()
            .execute("UPDATE meta SET value = ?1 WHERE key = 'unit'", [unit])
            .expect("moving the node to its unit");
    }
    match province {
        None => {
            node.ok(&["ca", "init"]);
        }
        Some(province) => enrol(province, &node, unit, role),
    }
    node
}

/// Sets `key = value` in the `[sync]` section, replacing the line (or its commented default).
pub fn set_sync(node: &TestNode, key: &str, value: &str) {
    let path = node.config_path();
    let text = std::fs::read_to_string(&path).expect("reading config.toml");
    let line = format!("{key} = {value}");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let existing = lines.iter().position(|l| {
        let l = l.trim_start_matches('#').trim_start();
        l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
    });
    match existing {
        Some(i) => lines[i] = line,
        None => {
            let at = lines
                .iter()
                .position(|l| l.trim() == "[sync]")
                .expect("config.toml has a [sync] section");
            lines.insert(at + 1, line);
        }
    }
    std::fs::write(&path, lines.join("\n") + "\n").expect("writing config.toml");
}

/// Settings so a cut link is noticed in seconds and a healed one is used again in seconds:
/// the defaults (120 s idle timeout, backoff up to 300 s) suit the field, not a timed test.
pub fn quick_recovery(node: &TestNode, push_interval_ms: u64) {
    set_sync(node, "idle_timeout_s", "5");
    set_sync(node, "keep_alive_s", "1");
    set_sync(node, "reconnect_max_s", "2");
    set_sync(node, "push_interval_ms", &push_interval_ms.to_string());
}

/// A tokio runtime for the link simulators (the nodes themselves run as processes).
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

/// A link simulator in front of `upstream` (HOST:PORT), shaped by `spec` both ways.
pub fn link(rt: &Runtime, upstream: &str, spec: &str, seed: u64) -> LinkSim {
    let profile: LinkProfile = spec.parse().expect("a valid link spec");
    rt.block_on(LinkSim::start(
        "127.0.0.1:0".parse().expect("literal address"),
        upstream.parse().expect("a HOST:PORT address"),
        profile.clone(),
        profile,
        seed,
        vec![],
    ))
    .expect("starting a link simulator")
}

/// The same link (address and profiles) in front of a server that came back on a new address,
/// as a relay restarted behind a fixed address looks to its clients.
pub fn relink(rt: &Runtime, sim: LinkSim, upstream: &str, seed: u64) -> LinkSim {
    let (addr, handle) = (sim.local_addr(), sim.handle());
    let (up, down) = (
        handle.profile(Direction::Up),
        handle.profile(Direction::Down),
    );
    rt.block_on(sim.shutdown());
    for _ in 0..50 {
        let started = rt.block_on(LinkSim::start(
            addr,
            upstream.parse().expect("a HOST:PORT address"),
            up.clone(),
            down.clone(),
            seed,
            vec![],
        ));
        if let Ok(sim) = started {
            return sim;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot bind {addr} again for the restarted link");
}

/// The BLAKE3 hash (raw bytes) of a dispatch's first attachment, as the node shows it.
pub fn attachment_hash(node: &TestNode, dispatch: &str) -> Vec<u8> {
    let shown = node.json(&["dispatch", "show", dispatch]);
    let hex_hash = shown["attachments"][0]["hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no attachment: {shown}"));
    hex::decode(hex_hash).expect("a hex hash")
}

/// Bytes that do not compress, like a JPEG or most PDFs.
pub fn incompressible(bytes: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut data = vec![0u8; bytes];
    rng.fill(&mut data[..]);
    data
}
