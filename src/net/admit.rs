//! Admission before authentication: what a source that has shown no certificate yet may make a
//! node spend. A bounded number of TLS handshakes in progress, kept apart from the pool of
//! authenticated sessions; a few per source address; QUIC address validation (Retry) once
//! handshakes crowd; a short handshake timeout. Must touch no storage: the path MTUs it hands
//! out before a handshake come from memory, filled only after authenticated sessions.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// TLS handshakes in progress at once, all sources together. A handshake holds one of these,
/// never a slot of the authenticated pool (`sync.connections_max`), so sources that never show a
/// certificate cannot lock out enrolled peers.
pub const HANDSHAKES_MAX: usize = 64;
/// Handshakes in progress from one source address. Communes behind one NAT share an address
/// (a mobile carrier's NAT puts many behind a few); each reconnects with a single handshake, so
/// eight leave room for several at once, while one address can hold at most an eighth of
/// [`HANDSHAKES_MAX`].
pub const HANDSHAKES_PER_SOURCE_MAX: usize = 8;
/// Past this many handshakes in progress, a source whose address QUIC has not validated is
/// sent a Retry: it must echo a token (one more round trip) before it costs a handshake, which
/// a flood of forged or fire-and-forget Initials never does.
pub const RETRY_ABOVE_HANDSHAKES: usize = 8;
/// Longest a handshake may take before its slot is given back. A mutual-TLS handshake is 2-3
/// round trips; on a 2G link (round trips up to 1.5 s) with a lost flight or two it still ends
/// in about 10 s, where quinn's idle timeout would hold the slot for 30 s or more.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Path MTUs held in memory, one per peer address; past this, new addresses are not cached and
/// their paths are probed.
const PATHS_CACHED_MAX: usize = 4096;

/// What to do with an incoming connection attempt.
pub enum Admit {
    /// Handshake now, holding this slot until the handshake ends.
    Handshake(HandshakeSlot),
    /// Ask the source to prove its address first (`Incoming::retry`).
    Retry,
    /// Refuse (`Incoming::refuse`): the budget is spent even for validated sources.
    Refuse,
}

/// The handshake budget of one endpoint.
#[derive(Default)]
pub struct Admission {
    state: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn state(&self) -> MutexGuard<'_, Pending> {
        // The counts stay consistent even if a holder panicked: each change is one statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides on an attempt from `source`, whose address QUIC has validated or not.
    pub fn admit(self: &Arc<Self>, source: IpAddr, validated: bool) -> Admit {
        let mut pending = self.state();
        let from_source = pending.by_source.get(&source).copied().unwrap_or(0);
        let crowded =
            pending.total >= RETRY_ABOVE_HANDSHAKES || from_source >= HANDSHAKES_PER_SOURCE_MAX;
        if crowded && !validated {
            return Admit::Retry;
        }
        if pending.total >= HANDSHAKES_MAX || from_source >= HANDSHAKES_PER_SOURCE_MAX {
            return Admit::Refuse;
        }
        pending.total += 1;
        *pending.by_source.entry(source).or_default() += 1;
        Admit::Handshake(HandshakeSlot {
            admission: self.clone(),
            source,
        })
    }

    /// Handshakes in progress.
    pub fn pending(&self) -> usize {
        self.state().total
    }
}

/// One handshake in progress; dropping it gives the slot back.
pub struct HandshakeSlot {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut pending = self.admission.state();
        pending.total -= 1;
        if let Some(n) = pending.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                pending.by_source.remove(&self.source);
            }
        }
    }
}

/// Path MTUs of peers that authenticated, by address, so that a connection's transport is
/// chosen before its handshake without opening the database for an unknown source.
#[derive(Default)]
pub struct PathCache {
    /// None: a handshake that started with the remembered MTU failed (see [`Self::failed`]).
    mtus: Mutex<HashMap<IpAddr, Option<u16>>>,
}

impl PathCache {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn mtus(&self) -> MutexGuard<'_, HashMap<IpAddr, Option<u16>>> {
        self.mtus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The MTU to start a connection from `ip` with (None: probe the path).
    pub fn get(&self, ip: IpAddr) -> Option<u16> {
        self.mtus().get(&ip).copied().flatten()
    }

    /// Records what the store knows of the path to `ip` after an authenticated session.
    pub fn set(&self, ip: IpAddr, mtu: Option<u16>) {
        let mut mtus = self.mtus();
        match mtu {
            Some(mtu) if mtus.len() < PATHS_CACHED_MAX || mtus.contains_key(&ip) => {
                mtus.insert(ip, Some(mtu));
            }
            Some(_) => {}
            None => {
                mtus.remove(&ip);
            }
        }
    }

    /// A handshake that started with the remembered MTU failed: the path may no longer carry
    /// it. The next connection probes, and the store forgets it once a peer there authenticates
    /// (not before: the failed source showed no certificate).
    pub fn handshake_failed(&self, ip: IpAddr) {
        if let Some(mtu) = self.mtus().get_mut(&ip) {
            *mtu = None;
        }
    }

    /// Whether the store's MTU for `ip` failed a handshake since it was read.
    pub fn failed(&self, ip: IpAddr) -> bool {
        matches!(self.mtus().get(&ip), Some(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_crowd_of_handshakes_is_asked_to_validate_and_capped_per_source_and_in_all() {
        let a = Admission::new();
        let mut held = Vec::new();
        // Quiet: anyone is let in, up to the per-source bound, without a Retry.
        for _ in 0..HANDSHAKES_PER_SOURCE_MAX {
            let Admit::Handshake(slot) = a.admit(ip(1), false) else {
                panic!("a quiet endpoint takes a handshake")
            };
            held.push(slot);
        }
        assert!(matches!(a.admit(ip(1), false), Admit::Retry));
        assert!(matches!(a.admit(ip(1), true), Admit::Refuse));
        // Crowded: unvalidated sources get a Retry, validated ones a slot up to the total.
        for n in 2.. {
            if a.pending() >= RETRY_ABOVE_HANDSHAKES {
                break;
            }
            let Admit::Handshake(slot) = a.admit(ip(n), false) else {
                panic!("under the retry threshold")
            };
            held.push(slot);
        }
        assert!(matches!(a.admit(ip(200), false), Admit::Retry));
        for n in 0..(HANDSHAKES_MAX - a.pending()) {
            let Admit::Handshake(slot) = a.admit(IpAddr::from([10, 1, 0, n as u8]), true) else {
                panic!("validated, under the total")
            };
            held.push(slot);
        }
        assert!(matches!(a.admit(ip(201), true), Admit::Refuse));
        // Ended handshakes give their slots back.
        held.clear();
        assert_eq!(a.pending(), 0);
        assert!(matches!(a.admit(ip(1), false), Admit::Handshake(_)));
    }

    #[test]
    fn a_remembered_mtu_that_failed_a_handshake_is_probed_until_a_peer_authenticates() {
        let paths = PathCache::new();
        paths.handshake_failed(ip(1));
        assert!(
            !paths.failed(ip(1)),
            "nothing remembered, nothing to forget"
        );
        paths.set(ip(1), Some(1452));
        assert_eq!(paths.get(ip(1)), Some(1452));
        paths.handshake_failed(ip(1));
        assert_eq!(paths.get(ip(1)), None);
        assert!(paths.failed(ip(1)));
        paths.set(ip(1), None);
        assert!(!paths.failed(ip(1)));
    }
}
