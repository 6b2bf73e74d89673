//! The integration tests, built as one binary with one module per area (ripgrep's layout):
//! each runs the real `communesync` binary on nodes in temporary directories.
//!
//! The modules live in `tests/<area>/mod.rs` rather than `tests/<area>.rs` because Cargo builds
//! every `tests/*.rs` as a test binary of its own unless `autotests = false` is set.

mod crash;
mod field;
mod local;
mod ops;
mod s3;
mod status;
mod sync;
mod tree;
mod util;
