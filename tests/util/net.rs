//! Nodes enrolled with a province CA, one-shot `sync` runs and their reports, and `serve`
//! daemons that die with the test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use super::{holds_within, path_arg, Run, TestNode};

/// How long a daemon may take to print that it serves.
const SERVE_START_TIMEOUT: Duration = Duration::from_secs(15);

/// A province node with its certificate authority.
pub fn province() -> TestNode {
    let node = TestNode::uninitialised();
    node.ok(&["init", "--unit", "qn", "--role", "province"]);
    node.ok(&["ca", "init"]);
    node
}

/// A node of `unit` enrolled by `province`'s CA, with users `lan` and `minh` besides `admin`.
pub fn enrolled(province: &TestNode, unit: &str, role: &str) -> TestNode {
    let node = TestNode::uninitialised();
    node.ok(&["init", "--unit", unit, "--role", role]);
    node.ok(&["user", "add", "lan"]);
    node.ok(&["user", "add", "minh"]);
    enrol(province, &node, unit, role);
    node
}

/// Carries an enrolment request to `province` and the certificate back, as an administrator would.
pub fn enrol(province: &TestNode, node: &TestNode, unit: &str, role: &str) {
    let request = node.file("enrol.req");
    let cert = node.file("enrol.crt");
    node.ok(&["enrol", "request", "--out", &path_arg(&request)]);
    province.ok(&[
        "ca",
        "issue",
        &path_arg(&request),
        "--unit",
        unit,
        "--role",
        role,
        "--out",
        &path_arg(&cert),
    ]);
    node.ok(&["enrol", "install", &path_arg(&cert)]);
}

/// The node's id, as `ca revoke` takes it.
pub fn node_id(node: &TestNode) -> String {
    node.json(&["status"])["node_id"]
        .as_str()
        .expect("status has a node_id")
        .to_string()
}

/// One `sync --json` run with the configured peer.
pub fn sync(node: &TestNode) -> Run {
    node.run(&["--json", "sync"])
}

/// Syncs, asserting success and convergence; returns the session report.
pub fn synced(node: &TestNode) -> Value {
    let report = sync(node).ok().json();
    assert_eq!(report["converged"], true, "sync did not converge: {report}");
    report
}

/// Syncs, asserting it ran to its end without converging (exit 6); returns the session report.
pub fn sync_pending(node: &TestNode) -> Value {
    let run = sync(node);
    assert_eq!(
        run.code,
        i32::from(super::exit::PENDING),
        "sync should end not converged:\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["converged"], false, "{report}");
    report
}

/// Asserts a sync failed with the peer exit code and printed no report; returns its `error:` line.
pub fn sync_refused(node: &TestNode) -> String {
    let run = sync(node);
    assert_eq!(
        run.code,
        i32::from(super::exit::PEER),
        "sync should fail with the peer exit code:\nstdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.is_empty(),
        "a failed sync printed a report: {}",
        run.stdout
    );
    run.stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error:` line in:\n{}", run.stderr))
        .to_string()
}

/// `communesync serve` on an ephemeral loopback port, killed when dropped.
pub struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(node: &TestNode) -> Server {
        let mut cmd = node.command(&["serve", "--listen", "127.0.0.1:0"]);
        cmd.stdout(Stdio::null());
        let mut child = cmd.spawn().expect("starting communesync serve");
        let stderr = child.stderr.take().expect("serve's stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, addr)) = line
                    .strip_prefix("communesync serving ")
                    .and_then(|rest| rest.rsplit_once(" on "))
                {
                    let _ = addr_tx.send(addr.to_string());
                }
                let mut log = sink.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = Server {
            child,
            addr: String::new(),
            log,
            reader: Some(reader),
        };
        match addr_rx.recv_timeout(SERVE_START_TIMEOUT) {
            Ok(addr) => server.addr = addr,
            Err(_) => panic!("serve did not start:\n{}", server.stop()),
        }
        server
    }

    /// The daemon's process id (to read its memory from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// HOST:PORT the daemon listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until `needle` occurs `times` times in the log (logs may trail the client's exit);
    /// returns the log.
    pub fn wait_log(&self, needle: &str, times: usize) -> String {
        holds_within(Duration::from_secs(30), || {
            self.log().matches(needle).count() >= times
        });
        self.log()
    }

    /// Kills the daemon and returns everything it logged, asserting it never panicked.
    pub fn finish(mut self) -> String {
        let log = self.stop();
        assert!(!log.contains("panicked"), "serve panicked:\n{log}");
        log
    }

    fn stop(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
