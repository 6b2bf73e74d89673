//! Progress for people at a terminal: a bar per scan during `sync` (name, bytes, rate, time
//! left), and a bar of bytes while `backup` writes its copy and a bundle is written or read.
//!
//! Drawn on stderr, and only when stderr is a terminal and `--json` is off: stdout stays the
//! report. Otherwise long transfers, backups and bundles are logged every 10 s instead (see
//! [`crate::net::progress`] for scans).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

use crate::net::progress::{Direction, ScanProgress, LOG_EVERY};
use crate::node::Node;
use crate::service::ProgressWatcher;

/// How often a drawing thread looks for the end of what it draws.
const POLL: Duration = Duration::from_millis(100);
/// Scan bars shown at once; the rest of the scans travel without one.
const BARS_MAX: usize = 32;

/// Whether to draw: a terminal on stderr, and no `--json`.
pub fn wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>8} {msg:30!} [{bar:24}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// The bars of one `sync`: [`ScanBars::watcher`] goes to the sync, [`ScanBars::finish`]
/// clears them when it ends.
pub struct ScanBars {
    multi: MultiProgress,
    stop: Arc<AtomicBool>,
    dir: PathBuf,
    spawned: Arc<std::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl ScanBars {
    /// Starts with a spinner saying the sync runs; scan bars appear below it.
    pub fn new(dir: &Path) -> ScanBars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let spinner = multi.add(ProgressBar::new_spinner());
        spinner.set_style(spinner_style());
        spinner.set_message("syncing");
        spinner.enable_steady_tick(Duration::from_millis(120));
        ScanBars {
            multi,
            stop: Arc::new(AtomicBool::new(false)),
            dir: dir.to_path_buf(),
            spawned: Arc::default(),
        }
    }

    /// What the sync calls with the scans' events once the peer answers: they are drawn on
    /// a thread of their own.
    pub fn watcher(&self) -> ProgressWatcher {
        let (multi, stop, dir) = (self.multi.clone(), self.stop.clone(), self.dir.clone());
        let spawned = self.spawned.clone();
        Box::new(move |events| {
            let thread = std::thread::spawn(move || draw(events, &multi, &stop, &dir));
            if let Ok(mut slot) = spawned.lock() {
                *slot = Some(thread);
            }
        })
    }

    /// Stops drawing and clears the bars, so the report follows on a clean screen.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.spawned.lock().ok().and_then(|mut s| s.take()) {
            let _ = thread.join();
        }
        let _ = self.multi.clear();
    }
}

fn draw(events: Receiver<ScanProgress>, multi: &MultiProgress, stop: &AtomicBool, dir: &Path) {
    let mut bars: HashMap<([u8; 32], Direction), ProgressBar> = HashMap::new();
    let mut node = Node::open(dir).ok();
    while !stop.load(Ordering::Relaxed) {
        let event = match events.recv_timeout(POLL) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            ScanProgress::Started {
                hash,
                direction,
                bytes_total,
                bytes_done,
            } if bars.len() < BARS_MAX => {
                let name = node
                    .as_mut()
                    .and_then(|n| n.scan_name(&hash).ok().flatten())
                    .unwrap_or_else(|| format!("scan {}", hex::encode(&hash[..6])));
                // Drawn once whole: added to the display only after its name and style are set.
                let bar =
                    ProgressBar::with_draw_target(Some(bytes_total), ProgressDrawTarget::hidden());
                bar.set_style(bar_style());
                bar.set_prefix(match direction {
                    Direction::Send => "sending",
                    Direction::Receive => "fetching",
                });
                bar.set_message(super::safe(&name).into_owned());
                bar.set_position(bytes_done);
                bar.reset_eta();
                bars.insert((hash, direction), multi.add(bar));
            }
            ScanProgress::Started { .. } => {}
            ScanProgress::Moved {
                hash,
                direction,
                bytes_done,
            } => {
                if let Some(bar) = bars.get(&(hash, direction)) {
                    bar.set_position(bytes_done);
                }
            }
            ScanProgress::Ended { hash, direction } => {
                if let Some(bar) = bars.remove(&(hash, direction)) {
                    bar.finish_and_clear();
                    multi.remove(&bar);
                }
            }
        }
    }
}

/// A spinner with a message the caller updates (a count of things done), for work whose
/// bytes are not known up front; `None` when not drawing.
pub fn spinner(json: bool, what: &str) -> Option<ProgressBar> {
    if !wanted(json) {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(spinner_style());
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

/// Where a long command (bundle export or import, backup) has come: its stage, bytes done,
/// and bytes in all when known.
pub type Snapshot = (&'static str, u64, Option<u64>);

/// Progress of one long command, read from `source` every [`POLL`] on a thread of its own (the
/// work never waits on it): a bar on a terminal (bytes, rate, time left; a byte counter while
/// the total is not known), otherwise a log line every [`LOG_EVERY`] once it lasts longer.
pub struct Watched {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Watched {
    pub fn start(
        json: bool,
        what: &str,
        source: impl Fn() -> Snapshot + Send + 'static,
    ) -> Watched {
        let bar = wanted(json).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_message(what.to_string());
            bar
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, what) = (stop.clone(), what.to_string());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let (mut shown, mut logged) = (None, Duration::ZERO);
            while !stopped.load(Ordering::Relaxed) {
                let (stage, done, total) = source();
                match &bar {
                    Some(bar) => {
                        if shown != Some((stage, total)) {
                            shown = Some((stage, total));
                            restyle(bar, stage, total);
                        }
                        bar.set_position(total.map_or(done, |t| done.min(t)));
                    }
                    None if started.elapsed() >= logged + LOG_EVERY => {
                        logged = started.elapsed();
                        let of = total
                            .map(|t| format!(" of {}", HumanBytes(t)))
                            .unwrap_or_default();
                        info!("{what}: {stage}: {}{of}", HumanBytes(done));
                    }
                    None => {}
                }
                // Woken early by `finish`, so the command does not wait out a poll.
                std::thread::park_timeout(POLL);
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Watched { stop, thread }
    }

    /// Stops watching and clears the bar, so the report follows on a clean screen.
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

/// A bar with the stage's total, or a running byte count while it is not known.
fn restyle(bar: &ProgressBar, stage: &str, total: Option<u64>) {
    match total {
        Some(t) => {
            bar.set_style(bar_style());
            bar.set_length(t);
        }
        None => {
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} {msg:30!} {spinner} {bytes:>10} {binary_bytes_per_sec:>12} ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.unset_length();
        }
    }
    bar.set_prefix(stage.to_string());
    bar.reset_eta();
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::model::dispatch::{DispatchKind, Priority};
    use crate::node::bundle::BundleProgress;
    use crate::node::DispatchRequest;
    use crate::units::Role;

    const COMMUNE: &str = "qn/binhlieu/tinhhuc";

    fn node(dir: &Path, unit: &str, role: Role) -> Node {
        Node::init(dir, unit, role, "admin").unwrap();
        Node::open(dir).unwrap()
    }

    /// A province with a dispatch to an enrolled commune carrying a 700 KB scan named
    /// `kế-hoạch.pdf`: the nodes (closed) and the scan.
    fn province_and_commune(tmp: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
        let (prov, comm) = (tmp.join("prov"), tmp.join("comm"));
        let mut province = node(&prov, "qn", Role::Province);
        province.ca_init().unwrap();
        let scan: Vec<u8> = (0..700_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let file = tmp.join("kế-hoạch.pdf");
        std::fs::write(&file, &scan).unwrap();
        province
            .dispatch_new(
                None,
                &DispatchRequest {
                    ref_no: "1/UBND".into(),
                    summary: "plan".into(),
                    kind: DispatchKind::Directive,
                    priority: Priority::Normal,
                    to: vec![COMMUNE.into()],
                    attach: vec![file],
                },
            )
            .unwrap();
        let mut commune = node(&comm, COMMUNE, Role::Commune);
        let (req, cert) = (tmp.join("c.req"), tmp.join("c.crt"));
        commune.enrol_request(&req).unwrap();
        province
            .ca_issue(&req, COMMUNE, Role::Commune, &cert)
            .unwrap();
        commune.enrol_install(&cert).unwrap();
        (prov, comm, scan)
    }

    /// What the bars and log lines of `bundle export` and `bundle import` are drawn from: each
    /// ends its last stage with every byte of it done.
    #[test]
    fn bundle_progress_ends_at_the_bundles_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (prov, comm, _) = province_and_commune(tmp.path());
        let bundle = tmp.path().join("for-commune.csb");
        let progress = BundleProgress::default();
        Node::open(&prov)
            .unwrap()
            .bundle_export(COMMUNE, &bundle, &progress)
            .unwrap();
        let file_bytes = std::fs::metadata(&bundle).unwrap().len();
        assert_eq!(progress.now(), ("writing", file_bytes, Some(file_bytes)));

        let progress = BundleProgress::default();
        let report = Node::open(&comm)
            .unwrap()
            .bundle_import(&bundle, &progress)
            .unwrap();
        assert_eq!(report.scans_stored, 1);
        let (stage, done, total) = progress.now();
        assert_eq!((stage, Some(done)), ("importing", total));
        // The payload is the file but for its signed header.
        assert!(
            done > file_bytes - 8192 && done < file_bytes,
            "{done} of {file_bytes}"
        );
    }

    /// What the bars of a `sync` are drawn from: each scan fetched is reported from its start
    /// to its whole size, then ended, and the node can name it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_one_shot_sync_reports_each_scan_from_start_to_end() {
        let tmp = tempfile::tempdir().unwrap();
        let (prov, comm, scan) = province_and_commune(tmp.path());
        let mut commune = Node::open(&comm).unwrap();
        let addr: SocketAddr = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .unwrap();
        commune.peer_add("up", &addr.to_string(), true).unwrap();
        drop(commune);

        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let served = {
            let prov = prov.clone();
            tokio::spawn(async move { crate::service::serve(&prov, Some(addr), shutdown).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (tx, rx) = std::sync::mpsc::channel();
        let watcher: ProgressWatcher = Box::new(move |events| {
            std::thread::spawn(move || {
                let seen: Vec<ScanProgress> = events.iter().collect();
                let _ = tx.send(seen);
            });
        });
        let report = crate::service::sync_once_watched(&comm, None, Some(watcher))
            .await
            .unwrap();
        assert_eq!(report.blobs_received, 1);
        let _ = stop.send(true);
        served.await.unwrap().unwrap();

        let events = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the events end with the sync");
        let hash = match events.first() {
            Some(ScanProgress::Started {
                hash,
                direction: Direction::Receive,
                bytes_total,
                bytes_done: 0,
            }) if *bytes_total == scan.len() as u64 => *hash,
            other => panic!("the first event is not the scan's start: {other:?}"),
        };
        let moved: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                ScanProgress::Moved { bytes_done, .. } => Some(*bytes_done),
                _ => None,
            })
            .collect();
        assert!(moved.windows(2).all(|w| w[0] <= w[1]), "{moved:?}");
        assert_eq!(moved.last(), Some(&(scan.len() as u64)), "{moved:?}");
        assert_eq!(
            events.last(),
            Some(&ScanProgress::Ended {
                hash,
                direction: Direction::Receive
            })
        );
        let name = Node::open(&comm).unwrap().scan_name(&hash).unwrap();
        assert_eq!(name.as_deref(), Some("kế-hoạch.pdf"));
    }
}
