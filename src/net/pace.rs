//! Pacing of scan data: the administrator's rate limit per peer, and on field links a pace that
//! keeps scans from filling the bottleneck queue that control frames (urgent dispatches,
//! acknowledgements) must cross too.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;
use tracing::debug;

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
/// Pacing granularity, and the largest burst the pacer lets through at once: half a round
/// trip's worth of bytes at the current rate within these bounds, so that even a slow pace
/// hands quinn a slice, and so reads the delay and moves, once per round trip (with 8 KiB
/// slices, a pace of 4 KB/s moved once per 2 s, and took minutes to climb back).
const PACE_SLICE_BYTES_MAX: usize = 8 * 1024;
const PACE_SLICE_BYTES_MIN: usize = 1024;
/// The pacer never goes below this (bytes/s): a path whose base RTT grew would otherwise
/// starve scans, its queueing delay being misread as our own.
const PACE_RATE_MIN: f64 = 4_000.0;
/// Smoothed round trips after handing quinn a slice with no ACK at all from the peer since,
/// after which the link is taken for down (about a loss-probe timeout; while anything is in
/// flight on a working link, ACKs come every other packet). A wrong guess costs a pause until
/// the next ACK; a late one, scan data sent into the outage that quinn then retransmits in one
/// burst, unpaced, when the link comes back.
const OUTAGE_RTTS: u32 = 3;
/// How often a pacer holding through an outage looks for the peer's ACKs again.
const OUTAGE_POLL: Duration = Duration::from_millis(50);
/// Through an outage the pacer hands quinn one small slice this often, which quinn sends at
/// once: the first to cross the restored link brings the ACK that restarts the transfer. quinn's
/// own loss probes double their interval each time (after a 60 s outage the next may be 30 s
/// away), and quinn 0.11 has no PING to call; a slice costs one packet, sent again later.
const OUTAGE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
const OUTAGE_PROBE_BYTES: usize = PACE_SLICE_BYTES_MIN;

/// What the pacer reads from the connection before each slice.
#[derive(Clone, Copy, Debug)]
struct LinkSample {
    /// Smoothed and minimum round-trip times.
    rtt: Duration,
    min_rtt: Duration,
    /// ACK frames received from the peer so far: they stop when the link does, and the RTT
    /// estimate with them.
    acks: u64,
    /// Bytes of the packets quinn has declared lost so far.
    lost_bytes: u64,
}

/// The pacer's answer for one slice.
#[derive(Debug, PartialEq)]
enum Pace {
    /// Send this many bytes after this wait.
    Send { bytes: usize, wait: Duration },
    /// The link is down: send nothing, ask again later.
    Hold,
}

/// The pacing decisions, with no clock or connection of their own: [`Pacer`] feeds them the
/// time and [`LinkSample`]s, the tests a simulated link.
struct PaceState {
    /// Bytes/s; 0 until the first slice.
    rate: f64,
    bucket: Bucket,
    /// When the rate last moved, and the ACK count then: it moves only on news from the peer,
    /// never on an RTT estimate left over from before an outage (a stale 430 ms smoothed RTT
    /// read 30 times over a 30 s outage cut a weak-4G pace from 916 to 110 kbit/s).
    adjusted: Instant,
    acks_at_adjust: u64,
    /// The ACK count last seen, when the first slice since it went to quinn, and the bytes
    /// handed over since.
    acks: u64,
    unacked_since: Option<Instant>,
    unacked_bytes: usize,
    /// Through an outage: when it began, when the last probe slice went, and the bytes it may
    /// have taken (in flight then, or handed over since).
    held: Option<(Instant, Instant, f64)>,
    /// After an outage: the most resent bytes the pace still pays for, until when. quinn resends
    /// what the outage took in one burst that overflows the bottleneck's queue, and resends
    /// what that queue dropped: counting it all (370 KB for 200 KB taken on weak 4G) left the
    /// link idle for 2 s.
    resend_budget: Option<(f64, Instant)>,
    /// Bytes quinn had declared lost when the pacer last looked (None before the first slice).
    lost_bytes: Option<u64>,
}

impl PaceState {
    fn new(now: Instant) -> Self {
        PaceState {
            rate: 0.0,
            bucket: Bucket {
                credit: 0.0,
                at: now,
            },
            adjusted: now,
            acks_at_adjust: 0,
            acks: 0,
            unacked_since: None,
            unacked_bytes: 0,
            held: None,
            resend_budget: None,
            lost_bytes: None,
        }
    }

    /// Paces up to `bytes_max` more bytes at `now`; `initial_rate` (bytes/s) starts the pace.
    fn next(
        &mut self,
        now: Instant,
        link: LinkSample,
        bytes_max: usize,
        initial_rate: impl FnOnce() -> f64,
    ) -> Pace {
        if link.acks != self.acks {
            self.acks = link.acks;
            self.unacked_since = None;
            self.unacked_bytes = 0;
            if let Some((since, _, taken)) = self.held.take() {
                // The link is back: carry on at the rate from before the outage once quinn has
                // resent what the outage took, reading the delay from a round trip after this.
                self.adjusted = now;
                self.acks_at_adjust = link.acks;
                let resending = Duration::from_secs_f64(taken / self.rate);
                self.resend_budget = Some((taken, now + resending + link.rtt * 2));
                debug!(
                    outage_ms = now.duration_since(since).as_millis() as u64,
                    rate_kbps = (self.rate * 8.0 / 1e3) as u64,
                    "the peer answers again: scan pacing resumes"
                );
            }
        } else if self
            .unacked_since
            .is_some_and(|since| now.saturating_duration_since(since) >= link.rtt * OUTAGE_RTTS)
        {
            let in_flight = self.rate * link.rtt.as_secs_f64();
            let (_, probed, taken) = self.held.get_or_insert_with(|| {
                debug!(
                    rtt_ms = link.rtt.as_millis() as u64,
                    "no ACK for {OUTAGE_RTTS} round trips: scan pacing holds until the peer answers"
                );
                (now, now, self.unacked_bytes as f64 + in_flight)
            });
            if now.duration_since(*probed) < OUTAGE_PROBE_INTERVAL {
                return Pace::Hold;
            }
            *probed = now;
            let bytes = bytes_max.min(OUTAGE_PROBE_BYTES);
            *taken += bytes as f64;
            return Pace::Send {
                bytes,
                wait: Duration::ZERO,
            };
        }
        if self.rate == 0.0 {
            self.rate = initial_rate().max(PACE_RATE_MIN);
            self.adjusted = now;
            self.acks_at_adjust = link.acks;
        } else if now.duration_since(self.adjusted) >= link.rtt && link.acks != self.acks_at_adjust
        {
            let delay = link.rtt.saturating_sub(link.min_rtt).as_secs_f64();
            let target = QUEUE_DELAY_TARGET.as_secs_f64();
            let factor = 1.0 + PACE_GAIN * (target - delay) / target;
            self.rate = (self.rate * factor.clamp(PACE_DOWN_MAX, PACE_UP_MAX)).max(PACE_RATE_MIN);
            self.adjusted = now;
            self.acks_at_adjust = link.acks;
        }
        let slice = (self.rate * link.min_rtt.as_secs_f64() / 2.0)
            .clamp(PACE_SLICE_BYTES_MIN as f64, PACE_SLICE_BYTES_MAX as f64);
        let bytes = bytes_max.min(slice as usize);
        // quinn sends again, unpaced, whatever it declares lost: the pace pays for it, so that
        // after an outage the scan waits while quinn resends what the outage took (its retries
        // filled weak 4G's queue for 7 s while the scan went on at full pace).
        let mut resent = (link.lost_bytes - self.lost_bytes.unwrap_or(link.lost_bytes)) as f64;
        self.lost_bytes = Some(link.lost_bytes);
        if let Some((budget, until)) = &mut self.resend_budget {
            if now > *until {
                self.resend_budget = None;
            } else {
                resent = resent.min(*budget);
                *budget -= resent;
            }
        }
        let wait = self
            .bucket
            .charge(now, self.rate, slice, bytes + resent as usize);
        self.unacked_since.get_or_insert(now + wait);
        self.unacked_bytes += bytes;
        Pace::Send { bytes, wait }
    }
}

/// Paces scan bytes into quinn on a field link so that they do not fill the bottleneck queue.
/// BBR keeps up to a bandwidth-delay product queued there (on weak 4G it filled the 64 KiB
/// queue: half a second), and quinn's stream priorities order only what it has not sent yet, so
/// every control frame (an urgent dispatch, an Ack) waited behind that queue. The rate follows
/// the queueing delay, not loss (the random loss of weak links is not congestion): once per
/// round trip it moves in proportion to how far the delay is from `QUEUE_DELAY_TARGET`. It
/// starts at the link-rate estimate that picks the zstd level; what quinn resends counts against
/// it. Through an outage (no ACK for a few round trips; quinn holds back no written data but
/// for the congestion window, so only a dead link leaves a slice unacknowledged that long) it
/// hands quinn only probes, as anything more would be lost and then resent in one unpaced
/// burst, and keeps its rate for when the link is back. On a LAN or loopback it does nothing.
pub(super) struct Pacer {
    conn: quinn::Connection,
    state: Mutex<PaceState>,
}

impl Pacer {
    pub(super) fn new(conn: quinn::Connection) -> Self {
        Pacer {
            conn,
            state: Mutex::new(PaceState::new(Instant::now())),
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
                let end = at + self.take(part.len() - at).await;
                stream
                    .write_chunk(part.slice(at..end))
                    .await
                    .map_err(lost)?;
                at = end;
            }
        }
        Ok(())
    }

    /// Waits until a slice of at most `bytes_max` bytes may go, and says how large it is. Through
    /// an outage it waits until the peer answers or the connection closes (then the write that
    /// follows fails, saying why).
    async fn take(&self, bytes_max: usize) -> usize {
        loop {
            let stats = self.conn.stats();
            let pace = self.state.lock().await.next(
                Instant::now(),
                LinkSample {
                    rtt: self.conn.rtt(),
                    min_rtt: self.conn.min_rtt(),
                    acks: stats.frame_rx.acks,
                    lost_bytes: stats.path.lost_bytes,
                },
                bytes_max,
                || estimated_rate_bps(&self.conn) as f64 / 8.0,
            );
            match pace {
                Pace::Send { bytes, wait } => {
                    tokio::time::sleep(wait).await;
                    return bytes;
                }
                Pace::Hold if self.conn.close_reason().is_some() => return bytes_max,
                Pace::Hold => tokio::time::sleep(OUTAGE_POLL).await,
            }
        }
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

    const MIN_RTT: Duration = Duration::from_millis(200);
    /// A smoothed RTT whose queueing delay is on target: the pace holds still.
    const RTT_ON_TARGET: Duration = Duration::from_millis(300);

    /// A pacer feeding a simulated path, on a virtual clock: every slice is acknowledged one
    /// round trip after it goes, unless the link is down when it goes or when its ACK would
    /// come back; lost slices are declared lost (and counted by quinn) at the first ACK after.
    struct Sim {
        state: PaceState,
        now: Instant,
        /// When each slice went.
        sends: Vec<Instant>,
        link: LinkSample,
        /// Slices in flight: when their ACK comes back, their size, and when they went.
        in_flight: std::collections::VecDeque<(Instant, usize, Instant)>,
        /// A bottleneck with a queue, when the test models one: the RTT then follows the queue.
        bottleneck: Option<Bottleneck>,
        up: bool,
        lost_unseen: u64,
        /// Bytes handed over so far, and slices handed over while the link was down.
        sent: usize,
        sent_down: usize,
    }

    impl Sim {
        fn new(rate: f64) -> Sim {
            let now = Instant::now();
            let mut sim = Sim {
                state: PaceState::new(now),
                now,
                sends: Vec::new(),
                link: LinkSample {
                    rtt: RTT_ON_TARGET,
                    min_rtt: MIN_RTT,
                    acks: 0,
                    lost_bytes: 0,
                },
                in_flight: Default::default(),
                bottleneck: None,
                up: true,
                lost_unseen: 0,
                sent: 0,
                sent_down: 0,
            };
            sim.state.next(now, sim.link, 0, || rate);
            sim
        }

        /// ACKs due by now.
        fn deliver(&mut self) {
            while let Some(&(at, bytes, sent)) = self.in_flight.front() {
                if at > self.now {
                    break;
                }
                self.in_flight.pop_front();
                if self.up {
                    self.link.acks += 1;
                    self.link.lost_bytes += std::mem::take(&mut self.lost_unseen);
                    if self.bottleneck.is_some() {
                        // quinn's smoothed RTT: 7/8 of the old estimate, 1/8 of the sample.
                        self.link.rtt = (self.link.rtt * 7 + (at - sent)) / 8;
                    }
                } else {
                    self.lost_unseen += bytes as u64;
                }
            }
        }

        /// Runs a sender that always has scan data for `d`.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.deliver();
                match self
                    .state
                    .next(self.now, self.link, PACE_SLICE_BYTES_MAX, || unreachable!())
                {
                    Pace::Send { bytes, wait } => {
                        self.now += wait;
                        self.sends.push(self.now);
                        if let Some(b) = &mut self.bottleneck {
                            // Packet by packet: each meets the queue as it is and is acknowledged
                            // on its own; one the full queue drops, quinn declares lost at the
                            // next ACK (and sends again: not modelled, the scan is endless here).
                            for at in (0..bytes).step_by(PACKET_BYTES) {
                                let packet = (bytes - at).min(PACKET_BYTES);
                                match b.enqueue(self.now, packet) {
                                    Some(delay) => self.in_flight.push_back((
                                        self.now + self.link.min_rtt + delay,
                                        packet,
                                        self.now,
                                    )),
                                    None => self.lost_unseen += packet as u64,
                                }
                            }
                            self.sent += bytes;
                            continue;
                        }
                        let lost = !self.up;
                        self.in_flight
                            .push_back((self.now + self.link.rtt, bytes, self.now));
                        if lost {
                            self.lost_unseen += bytes as u64;
                            self.in_flight.pop_back();
                            self.sent_down += 1;
                        }
                        self.sent += bytes;
                    }
                    Pace::Hold => self.now += OUTAGE_POLL,
                }
            }
        }
    }

    /// QUIC packets on a field link.
    const PACKET_BYTES: usize = 1200;

    /// A bottleneck of `rate` bytes/s with a drop-tail queue of `queue_max` bytes.
    struct Bottleneck {
        rate: f64,
        queue_max: usize,
        queue: f64,
        at: Instant,
        /// Bytes the full queue dropped, and bytes that went into it to cross the link.
        dropped: usize,
        queued: usize,
    }

    impl Bottleneck {
        /// Queues `bytes` at `now`: the delay until they have crossed, or None when dropped.
        fn enqueue(&mut self, now: Instant, bytes: usize) -> Option<Duration> {
            let drained = now.duration_since(self.at).as_secs_f64() * self.rate;
            self.queue = (self.queue - drained).max(0.0);
            self.at = now;
            if self.queue + bytes as f64 > self.queue_max as f64 {
                self.dropped += bytes;
                return None;
            }
            self.queue += bytes as f64;
            self.queued += bytes;
            Some(Duration::from_secs_f64(self.queue / self.rate))
        }
    }

    #[test]
    fn a_scan_on_weak_4g_reaches_the_links_rate_within_seconds_without_flooding_its_queue() {
        // Weak 4G: 1 Mbit/s, 200 ms RTT, the link simulator's 64 KiB queue; the pace starts at
        // the estimate of an unmeasured field link (1 Mbit/s). quinn's minimum RTT comes from
        // full packets: one packet's serialization is in it.
        let rate = 125_000.0;
        let mut sim = Sim::new(rate);
        sim.state = PaceState::new(sim.now);
        sim.link.min_rtt = MIN_RTT + Duration::from_secs_f64(PACKET_BYTES as f64 / rate);
        sim.link.rtt = sim.link.min_rtt;
        sim.state.next(sim.now, sim.link, 0, || rate);
        sim.bottleneck = Some(Bottleneck {
            rate,
            queue_max: 64 * 1024,
            queue: 0.0,
            at: sim.now,
            dropped: 0,
            queued: 0,
        });
        sim.run(Duration::from_secs(5));
        let queued = sim.bottleneck.as_ref().map_or(0, |b| b.queued);
        sim.run(Duration::from_secs(20));
        let b = sim.bottleneck.as_ref().unwrap();
        let goodput = (b.queued - queued) as f64 / 20.0 / rate;
        assert!(
            goodput >= 0.85,
            "goodput from 5 s on: {goodput:.2} of the link"
        );
        assert_eq!(b.dropped, 0, "bytes the queue dropped");
        let delay = sim.link.rtt - sim.link.min_rtt;
        assert!(
            delay <= QUEUE_DELAY_TARGET * 2,
            "queueing delay {delay:?} after 25 s"
        );
    }

    #[test]
    fn issue_10_an_outage_neither_lowers_the_pace_nor_sends_into_the_void() {
        let rate = 120_000.0;
        let mut sim = Sim::new(rate);
        sim.run(Duration::from_secs(20));
        assert!(
            (sim.state.rate - rate).abs() < 1.0,
            "on target the pace holds still"
        );

        // The link goes down with a queue-inflated smoothed RTT, which quinn keeps as it was
        // for as long as no ACK comes: a stale reading, 127 ms of delay above the target.
        sim.up = false;
        sim.link.rtt = Duration::from_millis(427);
        let sent = sim.sent;
        sim.run(Duration::from_secs(30));
        // At most one step, on ACKs from before the cut (without the fix: 70, down to 7 %).
        let kept = sim.state.rate;
        assert!(
            kept >= rate * PACE_DOWN_MAX,
            "the outage took the pace to {kept}"
        );
        let into_outage = sim.sent - sent;
        let detection_s = (sim.link.rtt * (OUTAGE_RTTS + 1)).as_secs_f64();
        let probes = 30 / OUTAGE_PROBE_INTERVAL.as_secs() as usize;
        assert!(
            into_outage as f64 <= rate * detection_s + (probes * OUTAGE_PROBE_BYTES) as f64,
            "{into_outage} bytes handed to quinn through a 30 s outage"
        );
        assert!(
            sim.sent_down >= probes - 1,
            "probes through the outage: {}",
            sim.sent_down
        );

        // Back up: a probe brings the first ACK within a probe interval and a round trip, and
        // the scan goes on at its old pace once quinn has resent what the outage took.
        sim.up = true;
        sim.link.rtt = RTT_ON_TARGET;
        let (sent, restored, sends) = (sim.sent, sim.now, sim.sends.len());
        sim.run(Duration::from_secs(10));
        let (probe, resumed) = (sim.sends[sends], sim.sends[sends + 1]);
        assert!(
            probe - restored <= OUTAGE_PROBE_INTERVAL,
            "first probe {:?} after the restore",
            probe - restored
        );
        // The probe's ACK ends the hold; quinn resends what the outage took, and the pace
        // waits as long as that takes at its rate.
        let lost = sim.link.lost_bytes as f64;
        let resent_s = Duration::from_secs_f64(lost / rate);
        assert!(
            resumed - probe >= resent_s && resumed - probe <= resent_s + RTT_ON_TARGET * 2,
            "the scan went on {:?} after the probe, quinn resending {lost} bytes",
            resumed - probe
        );
        // A round trip of it waits for the probe's ACK.
        let paced = ((sim.sent - sent) as f64 + lost) / (sim.now - probe).as_secs_f64();
        assert!(
            paced >= 0.9 * rate,
            "{paced:.0} B/s (resent included) from the probe on, at a pace of {rate} B/s"
        );
        assert_eq!(
            sim.state.rate, kept,
            "on target again, the pace holds still"
        );
    }

    #[test]
    fn a_quiet_spell_is_no_outage() {
        let mut sim = Sim::new(120_000.0);
        sim.run(Duration::from_secs(5));
        // Nothing to send for a minute: every slice was acknowledged, so the next one goes.
        sim.now += Duration::from_secs(60);
        sim.deliver();
        let pace = sim.state.next(sim.now, sim.link, 1000, || unreachable!());
        assert_eq!(
            pace,
            Pace::Send {
                bytes: 1000,
                wait: Duration::ZERO
            }
        );
    }

    #[test]
    fn a_slow_pace_climbs_once_per_round_trip() {
        // An empty queue (smoothed RTT at the minimum): +2 % per round trip, at most 50 in 10 s,
        // even at the lowest pace (whole 8 KiB slices there went once per 2 s: 5 steps).
        let mut sim = Sim::new(PACE_RATE_MIN);
        sim.link.rtt = MIN_RTT;
        sim.run(Duration::from_secs(10));
        let steps = (sim.state.rate / PACE_RATE_MIN).ln() / PACE_UP_MAX.ln();
        assert!(steps >= 30.0, "{steps:.0} steps in 10 s");
    }

    #[test]
    fn bytes_quinn_declares_lost_are_paid_for() {
        let rate = 100_000.0;
        let mut sim = Sim::new(rate);
        sim.run(Duration::from_secs(2));
        sim.link.lost_bytes += 50_000;
        let Pace::Send { wait, .. } = sim.state.next(sim.now, sim.link, 1000, || unreachable!())
        else {
            panic!("no outage here")
        };
        assert!(wait >= Duration::from_millis(500), "{wait:?}");
    }

    #[test]
    fn after_an_outage_the_pace_pays_once_for_what_the_outage_took() {
        let rate = 120_000.0;
        let mut sim = Sim::new(rate);
        sim.run(Duration::from_secs(5));
        sim.up = false;
        sim.run(Duration::from_secs(10));
        sim.up = true;
        sim.run(OUTAGE_PROBE_INTERVAL + RTT_ON_TARGET * 2);
        assert!(sim.state.held.is_none(), "the probe's ACK ended the hold");
        // quinn's burst of resent data overflowed the bottleneck's queue, and it declares what
        // the queue dropped lost again: that never crossed the link, and is not paid for twice.
        sim.link.lost_bytes += 500_000;
        let Pace::Send { wait, .. } = sim.state.next(sim.now, sim.link, 1000, || unreachable!())
        else {
            panic!("the link is up")
        };
        assert!(wait < Duration::from_secs(1), "{wait:?}");
    }
}
