//! Test helpers, written once for every area: a node in a temporary directory, driven through
//! the real `communesync` binary, with its exit code, output and database open to inspection;
//! polling, and reading JSON output. The submodules hold the rest, re-exported here:
//! [`net`] enrolment, sync runs and `serve` daemons; [`db`] read-only looks into a node's
//! database; [`tree`] the two-district test tree and its simulated links; [`mount`] file systems
//! of a test's own.

pub mod db;
pub mod mount;
pub mod net;
pub mod proc;
pub mod tree;

pub use db::*;
pub use mount::*;
pub use net::*;
pub use proc::*;
pub use tree::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tempfile::TempDir;

/// The binary Cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_communesync");

/// Units of the embedded Quảng Ninh sample tree the tests use.
pub const COMMUNE: &str = "qn/binhlieu/tinhhuc";
pub const SIBLING: &str = "qn/binhlieu/hucdong";
pub const DISTRICT: &str = "qn/binhlieu";

/// Exit codes as the CLI documents them.
pub use communesync::cli::exit;

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// What a finished command did, asserting it did not panic; for commands [`TestNode::run`]
    /// does not build (another umask, another user, no data directory).
    pub fn from_output(args: &[&str], out: Output) -> Run {
        let run = Run {
            args: to_strings(args),
            // A run killed by a signal has no code; -1 fails every assertion on codes.
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert!(
            !run.stderr.contains("panicked") && !run.stdout.contains("panicked"),
            "communesync {:?} panicked:\n{}",
            run.args,
            run.stderr
        );
        run
    }

    /// Asserts success; returns self for the output.
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "communesync {:?} failed with {}:\nstdout: {}\nstderr: {}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Asserts the exit code and that stderr is exactly one line starting with `error:` and
    /// that nothing went to stdout; returns that line.
    pub fn fails(self, code: u8) -> String {
        assert_eq!(
            self.code,
            i32::from(code),
            "communesync {:?}: wrong exit code\nstdout: {}\nstderr: {}",
            self.args,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "communesync {:?}: stderr must be one `error:` line, got:\n{}",
            self.args,
            self.stderr
        );
        assert!(
            self.stdout.is_empty(),
            "communesync {:?}: a failed command printed to stdout:\n{}",
            self.args,
            self.stdout
        );
        lines[0].to_string()
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "communesync {:?}: stdout is not JSON ({e}):\n{}",
                self.args, self.stdout
            )
        })
    }
}

/// A data directory in a fresh temporary directory; other files of a test go beside it.
pub struct TestNode {
    tmp: TempDir,
    data: PathBuf,
}

impl TestNode {
    /// A temporary directory whose `node` subdirectory is not a node (yet).
    pub fn uninitialised() -> TestNode {
        let tmp = tempfile::Builder::new()
            .prefix("communesync-test-")
            .tempdir()
            .expect("creating a temporary directory");
        let data = tmp.path().join("node");
        TestNode { tmp, data }
    }

    /// An initialised commune node with users `admin` (the default), `lan` and `minh`.
    pub fn commune() -> TestNode {
        let node = TestNode::uninitialised();
        node.ok(&["init", "--unit", COMMUNE, "--role", "commune"]);
        node.ok(&["user", "add", "lan", "--title", "clerk"]);
        node.ok(&["user", "add", "minh"]);
        node
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    /// A path beside the data directory, for scans and outputs.
    pub fn file(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `content` beside the data directory; returns its path as text for arguments.
    pub fn write_file(&self, name: &str, content: &[u8]) -> String {
        let path = self.file(name);
        std::fs::write(&path, content).expect("writing a test file");
        path_arg(&path)
    }

    pub fn config_path(&self) -> PathBuf {
        self.data.join("config.toml")
    }

    /// Replaces text in config.toml, each `from` required to be there (see also `set_sync`).
    pub fn edit_config(&self, from_to: &[(&str, &str)]) {
        let path = self.config_path();
        let mut text = std::fs::read_to_string(&path).expect("reading config.toml");
        for (from, to) in from_to {
            assert!(text.contains(from), "config.toml has no {from:?}:\n{text}");
            text = text.replace(from, to);
        }
        std::fs::write(&path, text).expect("writing config.toml");
    }

    pub fn db_path(&self) -> PathBuf {
        self.data.join("node.db")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--data")
            .arg(&self.data)
            .args(args)
            .env_remove("COMMUNESYNC_DATA")
            .env_remove("COMMUNESYNC_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A serving district or province would put its status page on the default
        // 127.0.0.1:8377, shared by every test serving at once ("port in use"): each gets a
        // free port instead, unless the test configured the page itself.
        let serving = args.iter().find(|a| !a.starts_with('-')) == Some(&"serve");
        if serving && !args.contains(&"--http") && !self.configures_http() {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        cmd
    }

    fn configures_http(&self) -> bool {
        std::fs::read_to_string(self.config_path()).is_ok_and(|c| c.contains("[http]"))
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out = self
            .command(args)
            .output()
            .expect("running the communesync binary");
        Run::from_output(args, out)
    }

    /// Starts the binary without waiting, for concurrency tests.
    pub fn spawn(&self, args: &[&str]) -> (Vec<String>, Child) {
        let child = self
            .command(args)
            .spawn()
            .expect("starting the communesync binary");
        (to_strings(args), child)
    }

    /// Runs, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args).ok().stdout
    }

    /// Runs with `--json`, asserts success, returns the parsed output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        self.run(&all).ok().json()
    }

    /// Runs, asserts the exit code and a one-line `error:`; returns the line.
    pub fn fails(&self, args: &[&str], code: u8) -> String {
        self.run(args).fails(code)
    }

    /// Issues a dispatch to `to` with the given scans; returns its JSON object.
    pub fn new_dispatch(&self, ref_no: &str, to: &[&str], attach: &[&str]) -> Value {
        let mut args = vec![
            "dispatch",
            "new",
            "--ref",
            ref_no,
            "--summary",
            "Test dispatch",
        ];
        args.push("--to");
        args.extend_from_slice(to);
        if !attach.is_empty() {
            args.push("--attach");
            args.extend_from_slice(attach);
        }
        self.json(&args)
    }

    /// The node's database, opened the way SQLite tools would.
    pub fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )
        .expect("opening node.db")
    }

    /// Rows in a table of the node's database, read without taking a write lock.
    pub fn count(&self, table: &str) -> i64 {
        db_read_only(self)
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .expect("counting rows")
    }
}

pub fn path_arg(path: &Path) -> String {
    path.to_str()
        .expect("temporary paths are UTF-8")
        .to_string()
}

fn to_strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The `id` field of a JSON object.
pub fn id(value: &Value) -> String {
    value["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {value}"))
        .to_string()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// A synthetic greyscale scan (binary PGM) of about `bytes` bytes; `seed` makes distinct
/// scans distinct.
pub fn scan(bytes: usize, seed: u64) -> Vec<u8> {
    communesync::cli::synthetic_scan(1024, bytes.div_ceil(1024).max(1), seed)
}

/// How often the polling helpers look again: fine enough to time a hop of a few hundred ms.
const POLL: Duration = Duration::from_millis(5);

/// Polls `done` until it holds or `limit` passes; returns how long it took.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `what` until it holds (true) or `within` has passed (false).
pub fn holds_within(within: Duration, what: impl FnMut() -> bool) -> bool {
    wait_until(within, what).is_some()
}

/// [`holds_within`], panicking with `why` when it does not hold in time.
pub fn eventually(within: Duration, why: &str, what: impl FnMut() -> bool) {
    assert!(holds_within(within, what), "{why}");
}

/// The values of `field` in a JSON array of objects, in order.
pub fn strs(items: &Value, field: &str) -> Vec<String> {
    items
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {items}"))
        .iter()
        .map(|v| v[field].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The last line of `unit list`: the unit tree's version and where it came from.
pub fn units_version(node: &TestNode) -> String {
    node.ok(&["unit", "list"])
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// The values of `field` in a JSON array of objects, as a set.
pub fn field_set(items: &Value, field: &str) -> BTreeSet<String> {
    strs(items, field).into_iter().collect()
}

pub fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}
