//! Pacing of scan data: the administrator's rate limit per peer, and on field links a pace that
//! keeps scans from filling the bottleneck queue that control frames (urgent dispatches,
//! acknowledgements) must cross too.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use super::blobs::estimated_rate_bps;
use super::NetError;

/// Credit in bytes that refills at a rate, up to a cap: what both pacers below charge.
struct Bucket {
    credit: f64,
    at: Instant,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            credit: 0.0,
            at: Instant::now(),
        }
    }

    /// Charges `bytes` at `rate` bytes/s with at most `cap` bytes of credit held, and says how
    /// long to wait before sending them.
    fn charge(&mut self, now: Instant, rate: f64, cap: f64, bytes: usize) -> Duration {
        let held = (self.credit + now.duration_since(self.at).as_secs_f64() * rate).min(cap);
        self.credit = held - bytes as f64;
        self.at = now;
        Duration::from_secs_f64((-self.credit).max(0.0) / rate)
    }
}

/// A token bucket on scan bytes sent to one peer (`sync.limit.rate_kbps`), holding at most one
/// second of credit.
pub(super) struct RateLimit {
    bytes_per_s: Option<f64>,
    bucket: Mutex<Bucket>,
}

impl RateLimit {
    pub(super) fn new(rate_kbps: Option<u64>) -> Self {
        RateLimit {
            bytes_per_s: rate_kbps.map(|k| k as f64 * 1000.0 / 8.0),
            bucket: Mutex::new(Bucket::new()),
        }
    }

    /// Waits until `bytes` may be sent.
    pub(super) async fn take(&self, bytes: usize) {
        let Some(rate) = self.bytes_per_s else { return };
        let wait = self
            .bucket
            .lock()
            .await
            .charge(Instant::now(), rate, rate, bytes);
        tokio::time::sleep(wait).await;
    }
}

/// Queueing delay (smoothed RTT above the path's minimum) the scan pacer aims for on a field
/// link: a control frame sent meanwhile waits about this long behind scan data, so a pushed
/// urgent dispatch arrives in about half a round trip plus this, within DESIGN's 2 × RTT on
/// weak 4G with room for jitter, while the queue never runs dry (which would cost goodput).
const QUEUE_DELAY_TARGET: Duration = Duration::from_millis(100);
/// Rate change per round trip for each target's worth of delay error, and its bounds. Gentle:
/// the smoothed RTT lags the queue, and a gain of 0.1 within 0.85–1.05 swung the rate around
/// the link's, costing 6–7 % of goodput on weak 4G.
const PACE_GAIN: f64 = 0.03;
const PACE_UP_MAX: f64 = 1.02;
const PACE_DOWN_MAX: f64 = 0.95;
/// A path with a shorter minimum RTT (LAN, loopback) is not paced: its queues drain fast, and
/// pacing would only cost throughput.
const PACE_MIN_RTT: Duration = Duration::from_millis(30);
/// Pacing granularity, and the largest burst the pacer lets through at once.
const PACE_SLICE_BYTES: usize = 8 * 1024;
/// The pacer never goes below this (bytes/s): a path whose base RTT grew would otherwise
/// starve scans, its queueing delay being misread as our own.
const PACE_RATE_MIN: f64 = 4_000.0;

/// Paces scan bytes into quinn on a field link so that they do not fill the bottleneck queue.
/// BBR keeps up to a bandwidth-delay product queued there (on weak 4G it filled the 64 KiB
/// queue: half a second), and quinn's stream priorities order only what it has not sent yet, so
/// every control frame (an urgent dispatch, an Ack) waited behind that queue. The rate follows
/// the queueing delay, not loss (the random loss of weak links is not congestion): once per
/// round trip it moves in proportion to how far the delay is from `QUEUE_DELAY_TARGET`. It
/// starts at the link-rate estimate that picks the zstd level. On a LAN or loopback it does
/// nothing.
pub(super) struct Pacer {
    conn: quinn::Connection,
    /// Bytes/s (0 until the first scan), its credit, when the rate last changed.
    state: Mutex<(f64, Bucket, Instant)>,
}

impl Pacer {
    pub(super) fn new(conn: quinn::Connection) -> Self {
        Pacer {
            conn,
            state: Mutex::new((0.0, Bucket::new(), Instant::now())),
        }
    }

    /// Writes one encoded frame (its parts, shared not copied) to a scan stream, in paced
    /// slices on a field link.
    pub(super) async fn write(
        &self,
        stream: &mut quinn::SendStream,
        frame: &mut [Bytes],
    ) -> Result<(), NetError> {
        let lost = |e: quinn::WriteError| NetError::Lost {
            peer: "peer".into(),
            reason: e.to_string(),
        };
        if self.conn.min_rtt() < PACE_MIN_RTT {
            return stream.write_all_chunks(frame).await.map_err(lost);
        }
        for part in frame.iter() {
            let mut at = 0;
            while at < part.len() {
                let end = (at + PACE_SLICE_BYTES).min(part.len());
                self.take(end - at).await;
                stream
                    .write_chunk(part.slice(at..end))
                    .await
                    .map_err(lost)?;
                at = end;
            }
        }
        Ok(())
    }

    async fn take(&self, bytes: usize) {
        let wait = {
            let mut state = self.state.lock().await;
            let (rate, bucket, adjusted) = &mut *state;
            let now = Instant::now();
            let (rtt, min_rtt) = (self.conn.rtt(), self.conn.min_rtt());
            if *rate == 0.0 {
                *rate = estimated_rate_bps(&self.conn) as f64 / 8.0;
                *adjusted = now;
            } else if now.duration_since(*adjusted) >= rtt {
                let delay = rtt.saturating_sub(min_rtt).as_secs_f64();
                let target = QUEUE_DELAY_TARGET.as_secs_f64();
                let factor = 1.0 + PACE_GAIN * (target - delay) / target;
                *rate = (*rate * factor.clamp(PACE_DOWN_MAX, PACE_UP_MAX)).max(PACE_RATE_MIN);
                *adjusted = now;
            }
            bucket.charge(now, *rate, PACE_SLICE_BYTES as f64, bytes)
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_makes_bytes_wait_their_time_and_holds_at_most_its_cap() {
        let t0 = Instant::now();
        let mut bucket = Bucket {
            credit: 0.0,
            at: t0,
        };
        // 1,000 bytes/s: 500 bytes with no credit wait half a second.
        assert_eq!(
            bucket.charge(t0, 1000.0, 1000.0, 500),
            Duration::from_millis(500)
        );
        // Ten idle seconds pay the debt and refill only up to the cap: 1,500 bytes then wait for
        // the 500 the cap did not hold.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            bucket.charge(later, 1000.0, 1000.0, 1500),
            Duration::from_millis(500)
        );
        // Within the credit there is no wait.
        let much_later = later + Duration::from_secs(10);
        assert_eq!(
            bucket.charge(much_later, 1000.0, 1000.0, 1000),
            Duration::ZERO
        );
    }
}
