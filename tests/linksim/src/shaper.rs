//! One direction's shaping decision: tail-drop queue, serialising rate limiter, loss, delay.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::LinkProfile;

/// What happens to one datagram offered to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the far end at this instant.
    Deliver(Instant),
    /// The queue in front of the link was full.
    DropQueue,
    /// Lost on the link.
    DropLoss,
    /// Larger than the link's MTU.
    DropTooBig,
}

/// Pure shaping state for one direction: no sockets, time is passed in.
pub(crate) struct Shaper {
    profile: LinkProfile,
    /// When the serialiser finishes the last admitted datagram.
    link_free_at: Option<Instant>,
    /// Latest delivery handed out, so a non-reordering link stays FIFO.
    last_delivery: Option<Instant>,
    // Separate streams so changing jitter does not change which datagrams are lost.
    loss_rng: StdRng,
    jitter_rng: StdRng,
}

/// Derives independent, reproducible RNG seeds from one user seed.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    // splitmix64 finaliser: nearby seeds give unrelated streams.
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Shaper {
    pub(crate) fn new(profile: LinkProfile, seed: u64) -> Self {
        Self {
            profile,
            link_free_at: None,
            last_delivery: None,
            loss_rng: StdRng::seed_from_u64(derive_seed(seed, 1)),
            jitter_rng: StdRng::seed_from_u64(derive_seed(seed, 2)),
        }
    }

    /// Swaps the profile; datagrams already on the link keep their schedule.
    pub(crate) fn set_profile(&mut self, profile: LinkProfile) {
        self.profile = profile;
    }

    /// Decides the fate of a datagram of `len` bytes arriving at `now`.
    pub(crate) fn admit(&mut self, now: Instant, len: usize) -> Verdict {
        if let Some(mtu) = self.profile.mtu {
            if len as u64 + u64::from(super::profile::UDP_IPV4_HEADERS) > u64::from(mtu) {
                return Verdict::DropTooBig;
            }
        }
        let departs = match self.profile.rate_bps {
            None => now,
            Some(rate) => {
                let rate = rate.max(1);
                let start = self.link_free_at.map_or(now, |free| free.max(now));
                let backlog = backlog_bytes(start.saturating_duration_since(now), rate);
                // An idle link always takes the datagram, even one larger than the queue.
                if backlog > 0 && backlog.saturating_add(len) > self.profile.queue_bytes_max {
                    return Verdict::DropQueue;
                }
                let Some(done) = start.checked_add(serialisation(len, rate)) else {
                    return Verdict::DropQueue;
                };
                self.link_free_at = Some(done);
                done
            }
        };
        // Always draw, so the loss pattern for a seed does not depend on the loss setting's history.
        let draw: f64 = self.loss_rng.random();
        if draw < self.profile.loss {
            return Verdict::DropLoss;
        }
        let mut prop_us = i64::from(self.profile.delay_ms) * 1000;
        if self.profile.jitter_ms > 0 {
            let j = i64::from(self.profile.jitter_ms) * 1000;
            prop_us += self.jitter_rng.random_range(-j..=j);
        }
        let prop = Duration::from_micros(u64::try_from(prop_us).unwrap_or(0));
        let mut at = departs.checked_add(prop).unwrap_or(departs);
        if let Some(last) = self.last_delivery {
            if !self.profile.reorder {
                at = at.max(last);
            }
            self.last_delivery = Some(last.max(at));
        } else {
            self.last_delivery = Some(at);
        }
        Verdict::Deliver(at)
    }
}

/// Time a datagram occupies a link of `rate` bit/s.
fn serialisation(len: usize, rate: u64) -> Duration {
    let nanos = (len as u128 * 8 * 1_000_000_000) / u128::from(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Bytes still waiting for (or on) the serialiser when it is busy for `busy` more.
fn backlog_bytes(busy: Duration, rate: u64) -> usize {
    let bytes = busy.as_nanos() * u128::from(rate) / 8_000_000_000;
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn deliver(v: Verdict) -> Instant {
        match v {
            Verdict::Deliver(at) => at,
            other => panic!("expected delivery, got {other:?}"),
        }
    }

    #[test]
    fn loopback_delivers_immediately() {
        let t0 = Instant::now();
        let mut s = Shaper::new(LinkProfile::loopback(), 1);
        assert_eq!(s.admit(t0, 1200), Verdict::Deliver(t0));
    }

    #[test]
    fn delay_is_added_after_serialisation() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            delay_ms: 100,
            rate_bps: Some(64_000),
            ..LinkProfile::loopback()
        };
        let mut s = Shaper::new(profile, 1);
        // 1000 bytes at 64 kbit/s = 125 ms on the wire, then 100 ms propagation.
        for i in 1..=8u64 {
            assert_eq!(deliver(s.admit(t0, 1000)), t0 + ms(125 * i + 100));
        }
        // After the link drains, a new datagram does not wait.
        let later = t0 + ms(5_000);
        assert_eq!(deliver(s.admit(later, 1000)), later + ms(225));
    }

    #[test]
    fn full_queue_tail_drops() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            rate_bps: Some(64_000),
            queue_bytes_max: 4_000,
            ..LinkProfile::loopback()
        };
        let mut s = Shaper::new(profile, 1);
        let verdicts: Vec<_> = (0..10).map(|_| s.admit(t0, 1000)).collect();
        let delivered = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver(_)))
            .count();
        assert_eq!(delivered, 4);
        assert!(verdicts[4..].iter().all(|v| *v == Verdict::DropQueue));
        // Once one datagram has left, there is room for one more.
        assert!(matches!(s.admit(t0 + ms(125), 1000), Verdict::Deliver(_)));
        assert_eq!(s.admit(t0 + ms(125), 1000), Verdict::DropQueue);
    }

    #[test]
    fn datagrams_over_the_mtu_are_dropped_before_they_take_the_link() {
        let t0 = Instant::now();
        let mut s = Shaper::new(LinkProfile::weak_4g(), 1);
        // 1,472 bytes of UDP payload + 28 of headers fill a 1,500-byte MTU exactly.
        assert_eq!(s.admit(t0, 1_473), Verdict::DropTooBig);
        let profile = LinkProfile {
            loss: 0.0,
            ..LinkProfile::weak_4g()
        };
        let mut s = Shaper::new(profile, 1);
        assert_eq!(s.admit(t0, 6_500), Verdict::DropTooBig);
        // The dropped one did not occupy the link: the next leaves after its own 1,472 bytes.
        assert_eq!(
            deliver(s.admit(t0, 1_472)),
            t0 + serialisation(1_472, 1_000_000) + ms(100)
        );
    }

    #[test]
    fn idle_link_accepts_oversized_datagram() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            rate_bps: Some(1_000_000),
            queue_bytes_max: 100,
            ..LinkProfile::loopback()
        };
        let mut s = Shaper::new(profile, 1);
        assert!(matches!(s.admit(t0, 65_535), Verdict::Deliver(_)));
        assert_eq!(s.admit(t0, 10), Verdict::DropQueue);
    }

    #[test]
    fn jitter_without_reorder_stays_fifo() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            delay_ms: 50,
            jitter_ms: 40,
            ..LinkProfile::loopback()
        };
        let mut s = Shaper::new(profile.clone(), 7);
        let times: Vec<_> = (0..500u64)
            .map(|i| deliver(s.admit(t0 + Duration::from_micros(i * 100), 100)))
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times.iter().all(|t| *t >= t0 + ms(10)));

        let mut s = Shaper::new(
            LinkProfile {
                reorder: true,
                ..profile
            },
            7,
        );
        let times: Vec<_> = (0..500u64)
            .map(|i| deliver(s.admit(t0 + Duration::from_micros(i * 100), 100)))
            .collect();
        assert!(times.windows(2).any(|w| w[0] > w[1]));
    }

    #[test]
    fn loss_is_seeded_and_near_target() {
        let t0 = Instant::now();
        let profile = LinkProfile {
            loss: 0.2,
            ..LinkProfile::loopback()
        };
        let run = |seed| {
            let mut s = Shaper::new(profile.clone(), seed);
            (0..10_000)
                .map(|_| s.admit(t0, 100) == Verdict::DropLoss)
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        let lost = a.iter().filter(|l| **l).count();
        assert!((1_800..=2_200).contains(&lost), "lost {lost}");
    }

    #[test]
    fn derived_seeds_differ() {
        assert_ne!(derive_seed(1, 1), derive_seed(1, 2));
        assert_ne!(derive_seed(1, 1), derive_seed(2, 1));
    }
}
