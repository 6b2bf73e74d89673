//! communesync: an offline-first sync node for remote communes.
//!
//! Layout (dependencies point downwards only):
//!
//! - [`cli`]: command-line definitions, output formatting and exit codes.
//! - [`http`]: the read-only status page and `/metrics` that `serve` offers (beside [`cli`]:
//!   another way to show [`node`]'s figures).
//! - [`service`]: the one-shot `sync` and the `serve` daemon, built from [`net`] sessions.
//! - [`node`]: one node's operations (init, config, local writes, queries, administration).
//! - [`net`]: QUIC (quinn) endpoints that drive [`proto`] sessions over real sockets.
//! - [`proto`]: the sync protocol as a state machine: no sockets, no clock, no tokio, no SQLite.
//! - [`trust`]: the provincial certificate authority, enrolment, revocation, TLS configs.
//! - [`store`]: SQLite persistence: documents, blobs, index tables, checkpoints.
//! - [`model`]: Automerge document schemas for dispatches, assignments and dossiers.
//! - [`units`]: the unit tree (province, districts, communes) and scope rules.

pub mod cli;
pub mod http;
pub mod model;
pub mod net;
pub mod node;
pub mod proto;
pub mod service;
pub mod store;
pub mod trust;
pub mod units;
