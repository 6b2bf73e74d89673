//! A userspace UDP link simulator (delay, jitter, loss, rate, queue, outages) for tests and benchmarks.
//!
//! The kernel here has no netem, so [`LinkSim`] sits between a QUIC client and server on
//! loopback and shapes each direction independently with a [`LinkProfile`]:
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> Result<(), linksim::LinkSimError> {
//! use linksim::{LinkProfile, LinkSim};
//! let sim = LinkSim::start(
//!     "127.0.0.1:0".parse().unwrap(),
//!     server,
//!     LinkProfile::weak_4g(),
//!     "rate=1mbit,delay=100ms,loss=2%".parse()?,
//!     1,
//!     vec![],
//! )
//! .await?;
//! let dial = sim.local_addr(); // point the client here
//! sim.handle().set_up(false); // cut the link
//! # let _ = dial; Ok(()) }
//! ```

mod profile;
mod proxy;
mod shaper;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;

pub use profile::{
    LinkProfile, Outage, DEFAULT_QUEUE_BYTES, FIELD_MTU, MAX_DELAY_MS, MAX_QUEUE_BYTES,
    MIN_RATE_BPS, MTU_MAX, MTU_MIN, PRESET_NAMES, UDP_IPV4_HEADERS,
};
pub use proxy::{
    Direction, DirectionStats, LinkHandle, LinkSim, LinkStats, MAX_DATAGRAM, MAX_FLOWS, MAX_OUTAGES,
};

/// Errors from building or starting a simulated link.
#[derive(Debug, thiserror::Error)]
pub enum LinkSimError {
    #[error("invalid link spec {0}")]
    Spec(String),
    #[error("invalid link profile: {0}")]
    Profile(String),
    #[error("invalid outage {0}")]
    Outage(String),
    #[error("too many outages (max {max})")]
    TooManyOutages { max: usize },
    #[error("cannot bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("socket error")]
    Io(#[from] io::Error),
}

/// Result with [`LinkSimError`].
pub type Result<T, E = LinkSimError> = std::result::Result<T, E>;
