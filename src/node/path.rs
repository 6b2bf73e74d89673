//! What the node remembers of each network path: the MTU last found on it, so that a reconnect
//! starts at that MTU instead of probing for it again (the probes cost more than a whole
//! unchanged sync: about 10 KB against a few hundred bytes).

use std::net::IpAddr;
use std::path::Path;

use tracing::{debug, warn};

use super::{now_ms, DB_FILE};
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

/// Records what a connection that started at `started_at` (None: it probed) ended up using.
/// A probed path is stored as new; a known one only when black-hole detection lowered it.
pub fn remember(dir: &Path, ip: IpAddr, started_at: Option<u16>, conn: &quinn::Connection) {
    let current = conn.stats().path.current_mtu;
    if started_at.is_some_and(|known| current >= known) {
        return;
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
