//! Scans in an S3-compatible bucket (issue 14 item 5), against a real S3 server: `s3s-fs`, found
//! on PATH or in target/tools/bin (`.ci/run` installs it there). Without it each test says
//! loudly that it skipped.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use communesync::store::blobs::CHUNK_BYTES;
use tempfile::TempDir;

use crate::util::{
    db_read_only, enrolled, exit, id, path_arg, province, set_sync, synced, Server, TestNode,
    COMMUNE,
};

const BUCKET: &str = "scans";
const PREFIX: &str = "qn";
const ACCESS_KEY: &str = "communesync-test";
const SECRET_KEY: &str = "communesync-test-secret";
/// How long the server may take to accept connections.
const S3_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `s3s-fs` serving a bucket from a temporary directory; killed when dropped.
struct S3Server {
    child: Child,
    root: TempDir,
    endpoint: String,
}

fn s3s_fs() -> Option<PathBuf> {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs");
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

impl S3Server {
    /// Starts the server, or says that the test skipped and returns None.
    fn start(test: &str) -> Option<S3Server> {
        let Some(bin) = s3s_fs() else {
            eprintln!(
                "\n*** SKIPPED {test}: no s3s-fs; `cargo install --locked --root target/tools s3s-fs@0.14.1 --features binary` (.ci/run does) ***\n"
            );
            return None;
        };
        let root = tempfile::tempdir().expect("a temporary directory");
        // s3s-fs serves each directory of its root as a bucket.
        std::fs::create_dir(root.path().join(BUCKET)).expect("creating the bucket");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        let server = S3Server {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + S3_START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(server)
    }

    /// The file holding chunk `idx` of scan `hash` (hex).
    fn object(&self, hash: &str, idx: u64) -> PathBuf {
        self.root
            .path()
            .join(BUCKET)
            .join(PREFIX)
            .join(hash)
            .join(idx.to_string())
    }

    /// Chunk objects of scan `hash` in the bucket.
    fn objects(&self, hash: &str) -> usize {
        std::fs::read_dir(self.root.path().join(BUCKET).join(PREFIX).join(hash))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Gives `node` the bucket in `[scans.s3]` (credentials in a 0600 file), with `store`.
fn configure(node: &TestNode, endpoint: &str, store: &str) {
    use std::os::unix::fs::PermissionsExt;
    let creds = node.data().join("s3.key");
    std::fs::write(
        &creds,
        format!("access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = std::fs::read_to_string(node.config_path()).unwrap();
    text.push_str(&format!(
        "\n[scans]\nstore = \"{store}\"\n\n[scans.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\ncredentials_file = \"s3.key\"\n",
        endpoint
    ));
    std::fs::write(node.config_path(), text).unwrap();
}

fn attachment_hash(node: &TestNode, d: &str) -> String {
    node.json(&["dispatch", "show", d])["attachments"][0]["hash"]
        .as_str()
        .unwrap()
        .to_string()
}

fn chunk_rows(node: &TestNode, hash: &str) -> i64 {
    db_read_only(node)
        .query_row(
            "SELECT COUNT(*) FROM blob_chunks WHERE hash = ?1",
            [hex::decode(hash).unwrap()],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn issue14_a_province_keeps_a_scan_sent_over_a_cut_link_in_a_real_bucket() {
    const SCAN_BYTES: usize = 8 << 20;
    let chunks_total = SCAN_BYTES.div_ceil(CHUNK_BYTES) as i64;
    let Some(s3) = S3Server::start("issue14 S3 transfer test") else {
        return;
    };
    let province = province();
    configure(&province, &s3.endpoint, "s3");
    let server = Server::start(&province);
    let commune = enrolled(&province, COMMUNE, "commune");
    set_sync(&commune, "idle_timeout_s", "5");
    set_sync(&commune, "keep_alive_s", "1");
    let mut data = vec![0u8; SCAN_BYTES];
    rand::fill(&mut data[..]);
    let scan_path = commune.write_file("bao-cao.jpg", &data);
    let d = id(&commune.new_dispatch("3/BC", &["qn"], &[&scan_path]));
    let hash = attachment_hash(&commune, &d);

    let rt = crate::util::runtime();
    let sim = crate::util::link(&rt, server.addr(), "rate=20mbit", 14);
    commune.ok(&["peer", "add", "up", "--addr", &sim.local_addr().to_string()]);
    let (_, mut first) = commune.spawn(&["--json", "sync"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_cut = loop {
        let n = chunk_rows(&province, &hash);
        if n * 10 >= chunks_total * 3 {
            sim.handle().set_up(false);
            break n;
        }
        assert!(first.try_wait().unwrap().is_none(), "ended before the cut");
        if Instant::now() > deadline {
            let _ = first.kill();
            panic!("the transfer stalled at {n} chunks");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(i32::from(exit::PEER)));
    let kept = chunk_rows(&province, &hash);
    assert!(
        kept >= at_cut && kept < chunks_total,
        "kept {kept} of {chunks_total} chunks (cut at {at_cut})"
    );
    // A row means its object was acknowledged: every recorded chunk is in the bucket.
    assert!(s3.objects(&hash) as i64 >= kept, "rows without objects");

    sim.handle().set_up(true);
    let report = synced(&commune);
    let sent = report["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < SCAN_BYTES as u64,
        "the resumed transfer sent {sent} bytes: it started over"
    );
    assert_eq!(s3.objects(&hash) as i64, chunks_total);
    assert!(
        !province.data().join("blobs").join(&hash).exists(),
        "the scan went to a local file"
    );
    let back = province.file("back.jpg");
    province.ok(&[
        "dispatch",
        "attachment",
        &d,
        "bao-cao.jpg",
        "--out",
        &path_arg(&back),
    ]);
    assert!(std::fs::read(&back).unwrap() == data, "the scan differs");
    assert_eq!(province.json(&["check"])["problems"], serde_json::json!([]));

    // One object's bytes damaged in the bucket: named by reads and by `check`.
    let object = s3.object(&hash, 3);
    let mut damaged = std::fs::read(&object).unwrap();
    damaged[100] ^= 1;
    std::fs::write(&object, damaged).unwrap();
    let err = province
        .run(&[
            "dispatch",
            "attachment",
            &d,
            "bao-cao.jpg",
            "--out",
            &path_arg(&province.file("again.jpg")),
        ])
        .stderr;
    assert!(err.contains("chunk 3") && err.contains("damaged"), "{err}");
    let check = province.run(&["--json", "check"]);
    assert_ne!(check.code, 0);
    assert!(check.stdout.contains("chunk 3"), "{}", check.stdout);
    server.finish();

    // The bucket gone: `check` names it rather than every scan.
    drop(s3);
    let check = province.run(&["check"]);
    assert_ne!(check.code, 0);
    let said = format!("{}{}", check.stdout, check.stderr);
    assert!(said.contains("s3://scans/qn"), "{said}");
}

#[test]
fn issue14_scans_migrate_copies_local_scans_verified_resumes_and_switches_the_config() {
    let Some(s3) = S3Server::start("issue14 scans migrate test") else {
        return;
    };
    let node = province();
    let data = crate::util::scan(3 * CHUNK_BYTES + 1000, 9);
    let scan_path = node.write_file("so-do.pgm", &data);
    let d = id(&node.new_dispatch("9/QD", &[COMMUNE], &[&scan_path]));
    let hash = attachment_hash(&node, &d);
    configure(&node, &s3.endpoint, "local");

    let report = node.json(&["scans", "migrate", "--to", "s3"]);
    let chunks = chunk_rows(&node, &hash);
    assert_eq!(report["chunks_copied"], chunks, "{report}");
    assert_eq!(report["switched"], true, "{report}");
    // Read back with the local files gone: the bytes come from the bucket.
    std::fs::remove_dir_all(node.data().join("blobs")).unwrap();
    let back = node.file("back.pgm");
    let read = || {
        node.ok(&[
            "dispatch",
            "attachment",
            &d,
            "so-do.pgm",
            "--out",
            &path_arg(&back),
        ]);
        std::fs::read(&back).unwrap()
    };
    assert!(read() == data);

    // A second run is refused: the config already says s3.
    let err = node.run(&["scans", "migrate", "--to", "s3"]).stderr;
    assert!(err.contains("already \"s3\""), "{err}");
    assert_eq!(s3.objects(&hash) as i64, chunks);
}

#[test]
fn issue14_a_cut_migration_resumes_and_rewrites_only_missing_or_damaged_chunks() {
    let Some(s3) = S3Server::start("issue14 migration resume test") else {
        return;
    };
    let node = province();
    let data = crate::util::scan(4 * CHUNK_BYTES, 3);
    let scan_path = node.write_file("ban-ve.pgm", &data);
    let d = id(&node.new_dispatch("4/QD", &[COMMUNE], &[&scan_path]));
    let hash = attachment_hash(&node, &d);
    configure(&node, &s3.endpoint, "local");
    node.ok(&["scans", "migrate", "--to", "s3"]);
    // As if the first run had been cut: the config still local, one object never written and
    // one written damaged.
    let text = std::fs::read_to_string(node.config_path()).unwrap();
    std::fs::write(
        node.config_path(),
        text.replace("store = \"s3\"", "store = \"local\""),
    )
    .unwrap();
    std::fs::remove_file(s3.object(&hash, 1)).unwrap();
    std::fs::write(s3.object(&hash, 2), b"cut short").unwrap();
    let report = node.json(&["scans", "migrate", "--to", "s3"]);
    assert_eq!(report["chunks_copied"], 2, "{report}");
    assert_eq!(
        report["chunks_present"],
        chunk_rows(&node, &hash) - 2,
        "{report}"
    );
    assert_eq!(node.json(&["check"])["problems"], serde_json::json!([]));
}

#[test]
fn issue14_a_credentials_file_others_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let node = province();
    // Refused before anything is sent: no server needed.
    configure(&node, "http://127.0.0.1:9", "s3");
    std::fs::set_permissions(
        node.data().join("s3.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = node.run(&["check"]).stderr;
    assert!(err.contains("chmod 600"), "{err}");
}
