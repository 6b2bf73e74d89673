//! Progress of scan transfers, for people: events a watcher (a one-shot `sync` drawing bars)
//! receives for the scans of one connection, and a log line every [`LOG_EVERY`] for long
//! transfers nobody draws (`serve` under journald, `sync` without a terminal).
//!
//! Reports are best effort: they never slow or fail a transfer.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::info;

use crate::proto::Hash32;

/// How often a transfer nobody draws is logged (only those lasting longer).
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Events queued for a watcher that has not read them yet. A `Moved` beyond this is dropped:
/// each carries the running total, so the next one makes up for it.
const EVENTS_QUEUED_MAX: usize = 1024;
/// Connections watched at once (one per one-shot `sync` in a process).
const WATCHED_MAX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Send,
    Receive,
}

impl Direction {
    fn verb(self) -> &'static str {
        match self {
            Direction::Send => "sent",
            Direction::Receive => "received",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanProgress {
    /// A scan's stream began; `bytes_done` were already held by the receiver (a resumed one).
    Started {
        hash: Hash32,
        direction: Direction,
        bytes_total: u64,
        bytes_done: u64,
    },
    /// How far the scan's stream has come, in the scan's own (uncompressed) bytes.
    Moved {
        hash: Hash32,
        direction: Direction,
        bytes_done: u64,
    },
    /// The stream ended, whole or not.
    Ended { hash: Hash32, direction: Direction },
}

static WATCHERS: Mutex<Vec<(usize, SyncSender<ScanProgress>)>> = Mutex::new(Vec::new());

/// While alive, the scans of its connection report to the receiver [`watch`] returned.
pub struct Watch(usize);

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(mut w) = WATCHERS.lock() {
            w.retain(|(id, _)| *id != self.0);
        }
    }
}

/// Reports the scan transfers of `conn` to the returned receiver instead of the log; `None`
/// when too many connections are watched already.
pub fn watch(conn: &quinn::Connection) -> Option<(Watch, Receiver<ScanProgress>)> {
    let mut watchers = WATCHERS.lock().ok()?;
    if watchers.len() >= WATCHED_MAX {
        return None;
    }
    let (tx, rx) = sync_channel(EVENTS_QUEUED_MAX);
    watchers.push((conn.stable_id(), tx));
    Some((Watch(conn.stable_id()), rx))
}

/// One scan's transfer on `conn`, reporting as it goes; `Ended` is reported when it drops.
pub(super) struct Transfer {
    watcher: Option<SyncSender<ScanProgress>>,
    hash: Hash32,
    direction: Direction,
    bytes_total: u64,
    bytes_done: u64,
    /// Held before this stream began: not part of its rate.
    bytes_before: u64,
    started: Instant,
    logged: Instant,
}

impl Transfer {
    pub(super) fn start(
        conn: &quinn::Connection,
        hash: Hash32,
        direction: Direction,
        bytes_total: u64,
        bytes_done: u64,
    ) -> Transfer {
        let watcher = WATCHERS.lock().ok().and_then(|w| {
            w.iter()
                .find(|(id, _)| *id == conn.stable_id())
                .map(|(_, tx)| tx.clone())
        });
        Transfer::new(
            watcher,
            hash,
            direction,
            bytes_total,
            bytes_done,
            Instant::now(),
        )
    }

    fn new(
        watcher: Option<SyncSender<ScanProgress>>,
        hash: Hash32,
        direction: Direction,
        bytes_total: u64,
        bytes_done: u64,
        now: Instant,
    ) -> Transfer {
        let transfer = Transfer {
            watcher,
            hash,
            direction,
            bytes_total,
            bytes_done,
            bytes_before: bytes_done,
            started: now,
            logged: now,
        };
        transfer.report(ScanProgress::Started {
            hash,
            direction,
            bytes_total,
            bytes_done,
        });
        transfer
    }

    /// How far the stream has come, in the scan's bytes.
    pub(super) fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// The stream has come to `bytes_done` of the scan (capped at its size).
    pub(super) fn moved(&mut self, bytes_done: u64) {
        self.moved_at(bytes_done, Instant::now());
    }

    /// [`Transfer::moved`] at `now`; whether it logged a line.
    fn moved_at(&mut self, bytes_done: u64, now: Instant) -> bool {
        let before = self.bytes_done;
        self.bytes_done = bytes_done.min(self.bytes_total);
        if self.watcher.is_some() {
            self.report(ScanProgress::Moved {
                hash: self.hash,
                direction: self.direction,
                bytes_done: self.bytes_done,
            });
        } else if now.duration_since(self.logged) >= LOG_EVERY && self.bytes_done > before {
            self.logged = now;
            let moved = self.bytes_done - self.bytes_before.min(self.bytes_done);
            let rate_bps = rate_bps(moved, now.duration_since(self.started));
            info!(
                scan = %hex::encode(&self.hash[..8]),
                "scan transfer: {} of {} bytes {} ({} %), {rate_bps} bytes/s",
                self.bytes_done,
                self.bytes_total,
                self.direction.verb(),
                percent(self.bytes_done, self.bytes_total),
            );
            return true;
        }
        false
    }

    fn report(&self, event: ScanProgress) {
        if let Some(tx) = &self.watcher {
            let _ = tx.try_send(event);
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.report(ScanProgress::Ended {
            hash: self.hash,
            direction: self.direction,
        });
    }
}

fn rate_bps(bytes: u64, elapsed: Duration) -> u64 {
    (bytes as f64 / elapsed.as_secs_f64().max(0.001)) as u64
}

fn percent(done: u64, total: u64) -> u64 {
    (done * 100).checked_div(total).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: Hash32 = [7; 32];

    #[test]
    fn a_transfer_nobody_watches_is_logged_every_ten_seconds_while_it_moves() {
        let t0 = Instant::now();
        let mut t = Transfer::new(None, HASH, Direction::Receive, 1_000_000, 0, t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!t.moved_at(100_000, at(5)), "not before 10 s");
        assert!(t.moved_at(200_000, at(10)));
        assert!(!t.moved_at(300_000, at(15)));
        assert!(!t.moved_at(300_000, at(25)), "not when nothing moved");
        assert!(t.moved_at(400_000, at(26)));
    }

    #[test]
    fn a_watched_transfer_reports_its_start_each_move_capped_at_its_size_and_its_end() {
        let (tx, rx) = sync_channel(EVENTS_QUEUED_MAX);
        let t0 = Instant::now();
        let mut t = Transfer::new(Some(tx), HASH, Direction::Send, 300, 100, t0);
        assert!(
            !t.moved_at(200, t0 + LOG_EVERY * 2),
            "a watched transfer is not logged"
        );
        t.moved_at(10_000, t0 + LOG_EVERY * 3);
        drop(t);
        let (hash, direction) = (HASH, Direction::Send);
        assert_eq!(
            rx.iter().collect::<Vec<_>>(),
            [
                ScanProgress::Started {
                    hash,
                    direction,
                    bytes_total: 300,
                    bytes_done: 100
                },
                ScanProgress::Moved {
                    hash,
                    direction,
                    bytes_done: 200
                },
                ScanProgress::Moved {
                    hash,
                    direction,
                    bytes_done: 300
                },
                ScanProgress::Ended { hash, direction },
            ]
        );
    }

    #[test]
    fn a_watcher_that_falls_behind_never_holds_up_the_transfer() {
        let (tx, rx) = sync_channel(2);
        let t0 = Instant::now();
        let mut t = Transfer::new(Some(tx), HASH, Direction::Receive, 1 << 20, 0, t0);
        for n in 1..=100 {
            t.moved_at(n * 1024, t0);
        }
        drop(t);
        // The queue kept what fit; the transfer itself went on to its end without waiting.
        assert_eq!(rx.try_iter().count(), 2);
    }
}
