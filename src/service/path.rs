//! What the node remembers of each network path: the MTU last found on it, so that a reconnect
//! starts at that MTU instead of probing for it again (the probes cost more than a whole
//! unchanged sync: about 10 KB against a few hundred bytes).

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::net;
use crate::node::{now_ms, DB_FILE};
use crate::store::Store;

/// A path is probed afresh after this long, so a route that changed is found again.
const REPROBE_AFTER_MS: i64 = 24 * 3600 * 1000;

/// The MTU a new connection on the path to `ip` should start at: what was found there, unless
/// that is too old (then the connection probes). The cache is an optimisation: if it cannot be
/// read the connection simply probes.
pub fn known_mtu(dir: &Path, ip: IpAddr) -> Option<u16> {
    let found = Store::open(&dir.join(DB_FILE), 1).and_then(|s| s.path_mtu(&ip.to_string()));
    match found {
        Ok(Some((mtu, probed_at))) if now_ms() - probed_at < REPROBE_AFTER_MS => Some(mtu),
        Ok(_) => None,
        Err(e) => {
            warn!(%ip, "cannot read the path MTU cache (the path will be probed): {e}");
            None
        }
    }
}

/// Round trips (each with quinn's 25 ms maximum ACK delay) after which a path-MTU search has
/// surely ended: one whose probes are lost (a tunnel narrower than its route) takes up to three
/// tries per step, each after a probe timeout of a few round trips, over 5–6 failing steps.
const SEARCH_ROUND_TRIPS: u32 = 60;
/// quinn's default maximum ACK delay, part of every probe timeout.
const ACK_DELAY: Duration = Duration::from_millis(25);

/// Records what a connection to `ip` that started at `started_at` (None: it probed) ended up
/// using. A probed path is stored as new once a probe has succeeded (that size is proven; a
/// search cut short by the end of the session leaves a smaller MTU than the path's, for a day),
/// or, still at 1,200 bytes, once the connection lived long enough for any search to end: a
/// short session whose probes had not come back yet would otherwise pin the path at 1,200 for
/// a day (through a 1,500-byte link on a 6,500-byte route, every probe until the fourth fails).
/// A known path is stored only when black-hole detection lowered it.
pub fn remember(
    dir: &Path,
    ip: IpAddr,
    started_at: Option<u16>,
    opened: Instant,
    conn: &quinn::Connection,
) {
    let current = conn.stats().path.current_mtu;
    match started_at {
        Some(known) if current >= known => return,
        Some(_) => {}
        None => {
            let searched_long_enough =
                opened.elapsed() >= (conn.rtt() + ACK_DELAY) * SEARCH_ROUND_TRIPS;
            if current <= net::UDP_PAYLOAD_MIN && !searched_long_enough {
                debug!(%ip, "no path MTU probe answered yet: not remembered");
                return;
            }
        }
    }
    let key = ip.to_string();
    let result = Store::open(&dir.join(DB_FILE), 1).and_then(|mut store| {
        // A lowered MTU keeps its probe time: the path is searched again when that expires.
        let probed_at = match started_at {
            None => now_ms(),
            Some(_) => store.path_mtu(&key)?.map_or(now_ms(), |(_, at)| at),
        };
        store.write(|tx| tx.set_path_mtu(&key, current, probed_at))
    });
    match result {
        Ok(()) => debug!(%ip, mtu = current, "path MTU remembered"),
        Err(e) => warn!(%ip, "cannot record the path MTU: {e}"),
    }
}

/// Drops what is known of a path after a failed handshake: the remembered MTU may no longer
/// pass (a route or tunnel changed), so the next attempt starts at 1200 bytes and probes.
pub fn forget(dir: &Path, ip: IpAddr) {
    let result = Store::open(&dir.join(DB_FILE), 1)
        .and_then(|mut s| s.write(|tx| tx.forget_path_mtu(&ip.to_string())));
    if let Err(e) = result {
        warn!(%ip, "cannot clear the path MTU cache: {e}");
    }
}
