//! A pre-check of Automerge bytes received from a peer or a bundle, run before Automerge sees
//! them: it walks the chunk headers and counts what loading would inflate (compressed change
//! chunks, DEFLATE columns of document chunks) through a capped reader, so a decompression bomb
//! is refused in bounded memory and time. It validates nothing else: Automerge still does.
//!
//! Automerge (0.12 as 0.7) inflates with `read_to_end` and no limit: a 310-byte frame whose
//! compressed change chunk inflates to 1 GiB made a node allocate and parse all of it. Since
//! 0.12 it also inflates DEFLATE columns of bundle chunks, which 0.7 refused.

use std::io::Read;

use flate2::bufread::DeflateDecoder;

/// Most bytes one document's received bytes may come to once inflated, all chunks together.
/// Four times the largest document a peer sends in one frame (`DOC_CHANGES_BYTES_MAX`, 8 MiB):
/// Automerge's own columns deflate about 2-4 times. The documents of one frame together get
/// twice this (node/replica.rs), so what Automerge inflates at once, with its copies, stays far
/// under the 512 MB a node may spend on a peer.
pub const INFLATED_BYTES_MAX: usize = 32 << 20;

/// Automerge's chunk magic.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_DOCUMENT: u8 = 0;
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;
const CHUNK_BUNDLE: u8 = 3;
/// The bit of a column specification that marks its data as DEFLATE-compressed.
const COLUMN_DEFLATE: u64 = 0b1000;
const HASH_BYTES: u64 = 32;
/// What the capped reader inflates at a time: its memory, whatever the bomb.
const INFLATE_STEP_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error(
        "Automerge data inflates to more than {bytes_max} bytes (a decompression bomb); \
         not loaded"
    )]
    TooLarge { bytes_max: usize },
    #[error("Automerge data does not parse: {0}")]
    Malformed(&'static str),
}

/// What a walk of Automerge bytes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflated {
    /// The bytes Automerge would hold: the chunks as they are, plus every compressed part
    /// inflated.
    pub bytes: usize,
    /// Whether the first chunk is a document chunk (what `save()` writes first): only then is
    /// a strict `load`, which takes the bytes whole, worth trying.
    pub document_first: bool,
}

/// Counts the bytes Automerge would hold after inflating `bytes`, refusing as soon as the
/// count passes `bytes_max`. Memory stays at one [`INFLATE_STEP_BYTES`] buffer; time at
/// inflating `bytes_max` bytes.
pub fn check_inflated(bytes: &[u8], bytes_max: usize) -> Result<Inflated, GuardError> {
    let mut count = Count {
        bytes: 0,
        bytes_max,
    };
    let mut input = Cursor { rest: bytes };
    let mut document_first = None;
    while !input.rest.is_empty() {
        let before = input.rest.len();
        if input.take(MAGIC.len() as u64)? != MAGIC {
            return Err(GuardError::Malformed(
                "a chunk does not start with the magic",
            ));
        }
        let _checksum = input.take(4)?;
        let kind = input.take(1)?[0];
        let len = input.leb()?;
        let data = input.take(len)?;
        count.add(before - input.rest.len())?;
        document_first.get_or_insert(kind == CHUNK_DOCUMENT);
        match kind {
            CHUNK_DOCUMENT => document_columns(data, &mut count)?,
            CHUNK_BUNDLE => bundle_columns(data, &mut count)?,
            CHUNK_COMPRESSED => count.inflate(data)?,
            // Automerge refuses compressed columns in change chunks.
            CHUNK_CHANGE => {}
            _ => return Err(GuardError::Malformed("unknown chunk type")),
        }
    }
    Ok(Inflated {
        bytes: count.bytes,
        document_first: document_first.unwrap_or(false),
    })
}

/// Walks a document chunk as Automerge parses it (actors, heads, change and op column
/// metadata, then the column data) and inflates each compressed column.
fn document_columns(data: &[u8], count: &mut Count) -> Result<(), GuardError> {
    let mut d = Cursor { rest: data };
    let actors = d.count()?;
    for _ in 0..actors {
        let len = d.leb()?;
        d.take(len)?;
    }
    let heads = d.count()?;
    d.take(
        heads
            .checked_mul(HASH_BYTES)
            .ok_or(GuardError::Malformed("too many heads"))?,
    )?;
    let change_columns = d.columns()?;
    let op_columns = d.columns()?;
    d.inflate_columns([change_columns, op_columns].concat(), count)
}

/// Walks a bundle chunk as Automerge 0.12 parses it (dependencies, actors, then change and op
/// columns, each metadata followed by its data) and inflates each compressed column.
fn bundle_columns(data: &[u8], count: &mut Count) -> Result<(), GuardError> {
    let mut d = Cursor { rest: data };
    let deps = d.count()?;
    d.take(
        deps.checked_mul(HASH_BYTES)
            .ok_or(GuardError::Malformed("too many dependencies"))?,
    )?;
    let actors = d.count()?;
    for _ in 0..actors {
        let len = d.leb()?;
        d.take(len)?;
    }
    // Unlike a document chunk, each column metadata is followed by its own data.
    let change_columns = d.columns()?;
    d.inflate_columns(change_columns, count)?;
    let op_columns = d.columns()?;
    d.inflate_columns(op_columns, count)
}

/// The running count against its bound.
struct Count {
    bytes: usize,
    bytes_max: usize,
}

impl Count {
    fn add(&mut self, n: usize) -> Result<(), GuardError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.bytes_max {
            return Err(GuardError::TooLarge {
                bytes_max: self.bytes_max,
            });
        }
        Ok(())
    }

    /// Inflates a raw DEFLATE stream (as Automerge does, no zlib header) into a fixed buffer,
    /// counting, and stops at the bound.
    fn inflate(&mut self, deflated: &[u8]) -> Result<(), GuardError> {
        let mut decoder = DeflateDecoder::new(deflated);
        let mut step = vec![0u8; INFLATE_STEP_BYTES];
        loop {
            let n = decoder
                .read(&mut step)
                .map_err(|_| GuardError::Malformed("a compressed part does not inflate"))?;
            if n == 0 {
                return Ok(());
            }
            self.add(n)?;
        }
    }
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], GuardError> {
        let n = usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.rest.len())
            .ok_or(GuardError::Malformed("a length runs past the end"))?;
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    /// An unsigned LEB128 integer, as Automerge writes lengths.
    fn leb(&mut self) -> Result<u64, GuardError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f)
                .checked_shl(shift)
                .ok_or(GuardError::Malformed("an integer overflows"))?;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(GuardError::Malformed("an integer overflows"))
    }

    /// A count of items that each take at least one byte: more than the bytes left is malformed.
    fn count(&mut self) -> Result<u64, GuardError> {
        let n = self.leb()?;
        if n > self.rest.len() as u64 {
            return Err(GuardError::Malformed("a count runs past the end"));
        }
        Ok(n)
    }

    /// Column metadata: a count, then (specification, data length) pairs.
    fn columns(&mut self) -> Result<Vec<(u64, u64)>, GuardError> {
        let n = self.count()?;
        (0..n).map(|_| Ok((self.leb()?, self.leb()?))).collect()
    }

    /// The data of `columns`, in their order, inflating each compressed one.
    fn inflate_columns(
        &mut self,
        columns: Vec<(u64, u64)>,
        count: &mut Count,
    ) -> Result<(), GuardError> {
        for (spec, len) in columns {
            let column = self.take(len)?;
            if spec & COLUMN_DEFLATE != 0 {
                count.inflate(column)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use automerge::{transaction::Transactable, AutoCommit, ObjType, ROOT};
    use flate2::write::DeflateEncoder;
    use flate2::Compression;
    use std::io::Write;

    /// A raw DEFLATE stream of `mib` MiB of zeros, built from one flushed MiB repeated (each
    /// repeat only refers back into zeros), so a 1 GiB bomb costs about a megabyte and no time.
    pub(crate) fn zeros_deflated(mib: usize) -> Vec<u8> {
        let mib_zeros = vec![0u8; 1 << 20];
        let mut e = DeflateEncoder::new(Vec::new(), Compression::best());
        e.write_all(&mib_zeros).unwrap();
        e.flush().unwrap();
        let first = std::mem::take(e.get_mut());
        e.write_all(&mib_zeros).unwrap();
        e.flush().unwrap();
        let repeat = std::mem::take(e.get_mut());
        let last = e.finish().unwrap();
        let mut out = first;
        for _ in 1..mib {
            out.extend_from_slice(&repeat);
        }
        out.extend_from_slice(&last);
        out
    }

    fn leb(out: &mut Vec<u8>, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn chunk(kind: u8, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend([0, 0, 0, 0]);
        out.push(kind);
        leb(&mut out, data.len() as u64);
        out.extend_from_slice(data);
        out
    }

    /// A compressed change chunk (type 2) whose body inflates to `mib` MiB.
    pub(crate) fn change_bomb(mib: usize) -> Vec<u8> {
        chunk(CHUNK_COMPRESSED, &zeros_deflated(mib))
    }

    /// A document chunk with one change column marked compressed, inflating to `mib` MiB.
    fn document_bomb(mib: usize) -> Vec<u8> {
        let column = zeros_deflated(mib);
        let mut data = Vec::new();
        leb(&mut data, 1); // one actor
        leb(&mut data, 16);
        data.extend([7u8; 16]);
        leb(&mut data, 0); // no heads
        leb(&mut data, 1); // one change column: id 1, type 0, deflated
        leb(&mut data, (1 << 4) | COLUMN_DEFLATE);
        leb(&mut data, column.len() as u64);
        leb(&mut data, 0); // no op columns
        data.extend_from_slice(&column);
        chunk(CHUNK_DOCUMENT, &data)
    }

    #[test]
    fn a_compressed_change_chunk_inflating_to_a_gibibyte_is_refused_quickly() {
        let bomb = change_bomb(1024);
        assert!(bomb.len() < 2 << 20, "{}", bomb.len());
        let started = std::time::Instant::now();
        assert_eq!(
            check_inflated(&bomb, INFLATED_BYTES_MAX),
            Err(GuardError::TooLarge {
                bytes_max: INFLATED_BYTES_MAX
            })
        );
        // Stopping at the bound costs a thirtieth of inflating the whole gibibyte.
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // Below the bound the same shape is only counted.
        assert_eq!(
            check_inflated(&change_bomb(2), INFLATED_BYTES_MAX)
                .unwrap()
                .bytes,
            (2 << 20) + change_bomb(2).len()
        );
    }

    /// A bundle chunk (Automerge 0.12 inflates its compressed columns) with one change column
    /// inflating to `mib` MiB and an op column after it.
    fn bundle_bomb(mib: usize) -> Vec<u8> {
        let column = zeros_deflated(mib);
        let mut data = Vec::new();
        leb(&mut data, 0); // no dependencies
        leb(&mut data, 1); // one actor
        leb(&mut data, 16);
        data.extend([7u8; 16]);
        leb(&mut data, 1); // one change column: id 1, type 0, deflated, then its data
        leb(&mut data, (1 << 4) | COLUMN_DEFLATE);
        leb(&mut data, column.len() as u64);
        data.extend_from_slice(&column);
        leb(&mut data, 1); // one op column, deflated, then its data
        leb(&mut data, (2 << 4) | COLUMN_DEFLATE);
        leb(&mut data, column.len() as u64);
        data.extend_from_slice(&column);
        chunk(CHUNK_BUNDLE, &data)
    }

    #[test]
    fn compressed_columns_of_document_and_bundle_chunks_are_counted_inflated() {
        // Each bomb's compressed columns, and the MiB each inflates to.
        type Bomb = fn(usize) -> Vec<u8>;
        let bombs: [(Bomb, usize); 2] = [(document_bomb, 1), (bundle_bomb, 2)];
        for (bomb, columns) in bombs {
            assert!(matches!(
                check_inflated(&bomb(64), INFLATED_BYTES_MAX),
                Err(GuardError::TooLarge { .. })
            ));
            let small = bomb(1);
            assert_eq!(
                check_inflated(&small, INFLATED_BYTES_MAX).unwrap().bytes,
                small.len() + (columns << 20)
            );
        }
        // Chunks add up: two documents of 20 MiB each pass alone, not together.
        let one = document_bomb(20);
        assert!(check_inflated(&one, INFLATED_BYTES_MAX).is_ok());
        assert!(check_inflated(&[one.clone(), one].concat(), INFLATED_BYTES_MAX).is_err());
    }

    #[test]
    fn what_automerge_writes_passes_and_counts_its_compressed_columns() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        // Repetitive text: its columns are compressed in the document's save().
        doc.splice_text(&text, 0, 0, &"quyết định ".repeat(20_000))
            .unwrap();
        doc.commit();
        let heads = doc.get_heads();
        doc.put(ROOT, "status", "done").unwrap();
        doc.commit();
        let saved = doc.save();
        let inflated = check_inflated(&saved, INFLATED_BYTES_MAX).unwrap();
        assert!(inflated.document_first);
        assert!(
            inflated.bytes > 2 * saved.len(),
            "{} vs {}",
            inflated.bytes,
            saved.len()
        );
        let after = doc.save_after(&heads);
        assert!(
            !check_inflated(&after, INFLATED_BYTES_MAX)
                .unwrap()
                .document_first
        );
        let uncompressed = doc.save_nocompress();
        assert_eq!(
            check_inflated(&uncompressed, INFLATED_BYTES_MAX)
                .unwrap()
                .bytes,
            uncompressed.len()
        );
        // A bundle of the changes (its repetitive columns compressed) walks the same way.
        let changes: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bundle = doc.bundle(changes).unwrap();
        let counted = check_inflated(bundle.bytes(), INFLATED_BYTES_MAX).unwrap();
        assert!(
            counted.bytes > bundle.bytes().len(),
            "{} vs {}",
            counted.bytes,
            bundle.bytes().len()
        );
        // A snapshot followed by incremental chunks, as the store keeps them.
        let both = [saved, after].concat();
        assert!(check_inflated(&both, INFLATED_BYTES_MAX).is_ok());
        assert!(check_inflated(&[], INFLATED_BYTES_MAX).is_ok());
    }

    #[test]
    fn bytes_that_are_not_automerge_chunks_are_refused() {
        for bad in [
            &b"not automerge"[..],
            &chunk(9, b"x")[..],
            &chunk(CHUNK_COMPRESSED, b"\xff\xff\xff")[..],
            &chunk(CHUNK_CHANGE, b"abc")[..5],
            &[
                0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0x7f,
            ][..],
        ] {
            assert!(
                matches!(
                    check_inflated(bad, INFLATED_BYTES_MAX),
                    Err(GuardError::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    // Issue 11: the fuzz target's properties (fuzz/fuzz_targets/automerge_bytes.rs), in the
    // default test run.
    mod issue11_props {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// What a peer sends: a saved document, or the changes after it, or both.
        fn sample(text_len: usize, with_changes: bool) -> Vec<u8> {
            let mut doc = AutoCommit::new();
            let list = doc.put_object(ROOT, "visits", ObjType::List).unwrap();
            doc.insert(&list, 0, "x".repeat(text_len)).unwrap();
            let saved = doc.save();
            if !with_changes {
                return saved;
            }
            let heads = doc.get_heads();
            doc.put(ROOT, "status", "closed").unwrap();
            [saved, doc.save_after(&heads)].concat()
        }

        /// The count is exact: the bound it reports passes, one byte less does not.
        fn assert_exact(bytes: &[u8], inflated: Inflated) -> Result<(), TestCaseError> {
            prop_assert!(inflated.bytes >= bytes.len());
            prop_assert_eq!(check_inflated(bytes, inflated.bytes), Ok(inflated));
            if inflated.bytes > 0 {
                prop_assert_eq!(
                    check_inflated(bytes, inflated.bytes - 1),
                    Err(GuardError::TooLarge {
                        bytes_max: inflated.bytes - 1
                    })
                );
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn issue11_any_bytes_are_counted_within_the_bound(
                bytes in vec(any::<u8>(), 0..400),
                bytes_max in 0..2000usize,
            ) {
                if let Ok(inflated) = check_inflated(&bytes, bytes_max) {
                    prop_assert!(inflated.bytes <= bytes_max);
                    assert_exact(&bytes, inflated)?;
                }
            }

            /// Mutated documents: the guard's verdict is exact, and Automerge, reached only
            /// within the bound, refuses or loads them without panicking.
            #[test]
            fn issue11_mutated_documents_are_guarded_then_loaded_safely(
                text_len in 0..3000usize,
                with_changes in any::<bool>(),
                edits in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            ) {
                let mut bytes = sample(text_len, with_changes);
                for (at, byte) in edits {
                    let at = at.index(bytes.len());
                    bytes[at] = byte;
                }
                if let Ok(inflated) = check_inflated(&bytes, 1 << 20) {
                    assert_exact(&bytes, inflated)?;
                    if inflated.document_first {
                        let _ = AutoCommit::load(&bytes);
                    }
                    let _ = AutoCommit::new().load_incremental(&bytes);
                }
            }
        }
    }
}
