//! Test-only: byte mutations of real DER for the decoders' property tests (issue 11).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

/// `bytes` with a few bytes replaced, and maybe cut short.
pub fn mutate(mut bytes: Vec<u8>, edits: Vec<(Index, u8)>, cut: Option<Index>) -> Vec<u8> {
    for (at, byte) in edits {
        let at = at.index(bytes.len());
        bytes[at] = byte;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut.index(bytes.len()));
    }
    bytes
}

/// Up to three byte edits, a cut one time in five, and arbitrary bytes besides.
pub fn mutation() -> impl Strategy<Value = (Vec<(Index, u8)>, Option<Index>, Vec<u8>)> {
    (
        vec((any::<Index>(), any::<u8>()), 0..4),
        proptest::option::weighted(0.2, any::<Index>()),
        vec(any::<u8>(), 0..300),
    )
}
