//! Automerge bytes from a peer or a bundle: the inflation pre-check `check_inflated`, then, as
//! `node/replica.rs` does once it passes, a strict `AutoCommit::load` or `load_incremental`.
//! The count is exact (the bound it reports passes, one byte less does not) and a document
//! that loads saves and loads again with the same heads.
#![no_main]

use automerge::AutoCommit;
use communesync::model::guard::{check_inflated, GuardError};
use libfuzzer_sys::fuzz_target;

/// Smaller than the node's 32 MiB so each input stays quick; the logic is the same.
const BYTES_MAX: usize = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(inflated) = check_inflated(data, BYTES_MAX) else {
        return;
    };
    assert!(
        inflated.bytes >= data.len(),
        "chunks count as they are, at least"
    );
    assert_eq!(check_inflated(data, inflated.bytes), Ok(inflated));
    if inflated.bytes > 0 {
        assert_eq!(
            check_inflated(data, inflated.bytes - 1),
            Err(GuardError::TooLarge {
                bytes_max: inflated.bytes - 1
            })
        );
    }
    let strict = if inflated.document_first {
        AutoCommit::load(data).ok()
    } else {
        None
    };
    let doc = strict.or_else(|| {
        let mut doc = AutoCommit::new();
        doc.load_incremental(data).ok().map(|_| doc)
    });
    if let Some(mut doc) = doc {
        let saved = doc.save();
        let mut again = AutoCommit::load(&saved).expect("a saved document loads");
        assert_eq!(again.get_heads(), doc.get_heads());
    }
});
