//! The sync protocol as a deterministic state machine: frames in, frames and actions out.
//!
//! No sockets, no clock, no tokio, no SQLite: the network layer ([`crate::net`]) feeds it frames
//! and carries what it emits; the node's store is reached only through the [`Replica`] trait,
//! so tests drive two sessions directly over a simulated link.

pub mod blob;
pub mod session;
pub mod wire;

pub use session::{Action, Applied, Replica, Session, SessionStats};
pub use wire::{ChangeSig, DocChanges, DocHeads, Frame, Hash32, MissingReason};

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed frame from peer: {0}")]
    Malformed(String),
    #[error("peer speaks protocol version {0}, this node speaks {ver}: upgrade the older node", ver = wire::VERSION)]
    Version(u16),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("peer refused the session: {0}")]
    PeerRefused(String),
    #[error("local store: {0}")]
    Local(String),
}
