//! Scan transfer: per-chunk zstd with a cheap compressibility probe, bounded decompression,
//! and verification of every chunk against the manifest before it is stored.

use std::cell::RefCell;

use super::wire::Hash32;
use super::ProtoError;

/// Bytes of a chunk compressed as a probe to decide whether compressing the chunk pays.
const PROBE_BYTES: usize = 16 * 1024;
/// A probe that does not shrink below this fraction means "incompressible" (JPEG, most PDFs).
const PROBE_RATIO_MAX: f64 = 0.90;

/// zstd level for a link of `rate_bps`: a slow link spends CPU to save bytes, a fast one does not.
pub fn level_for_rate(rate_bps: u64) -> i32 {
    match rate_bps {
        0..=2_000_000 => 19,
        2_000_001..=20_000_000 => 9,
        20_000_001..=200_000_000 => 3,
        _ => 1,
    }
}

thread_local! {
    /// One zstd context per thread, reused from chunk to chunk: a fresh one per 256 KiB chunk
    /// costs an allocation and the set-up of its tables each time.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let z = match slot {
            Some(z) => {
                z.set_compression_level(level)?;
                z
            }
            None => slot.insert(zstd::bulk::Compressor::new(level)?),
        };
        z.compress(data)
    })
}

fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let z = match slot {
            Some(z) => z,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        z.decompress(data, capacity)
    })
}

/// Encodes a chunk for the wire: compressed when that pays, raw otherwise. Returns (compressed, bytes).
pub fn encode_chunk(data: &[u8], level: i32) -> (bool, Vec<u8>) {
    let probe = &data[..data.len().min(PROBE_BYTES)];
    let worth_it = match compress(probe, 1) {
        Ok(z) => (z.len() as f64) < probe.len() as f64 * PROBE_RATIO_MAX,
        Err(_) => false,
    };
    if worth_it {
        if let Ok(z) = compress(data, level) {
            if z.len() < data.len() {
                return (true, z);
            }
        }
    }
    (false, data.to_vec())
}

/// Decodes a chunk, refusing anything that would expand past `raw_len` (itself bounded by the
/// chunk size announced in the manifest), then checks it against its manifest hash. A raw chunk
/// is returned in the buffer it came in, without a copy.
pub fn decode_chunk(
    compressed: bool,
    raw_len: u64,
    chunk_bytes: u64,
    data: Vec<u8>,
    expected: &Hash32,
) -> Result<Vec<u8>, ProtoError> {
    if raw_len > chunk_bytes {
        return Err(ProtoError::Malformed(format!(
            "chunk of {raw_len} bytes, larger than the announced {chunk_bytes}"
        )));
    }
    let raw = if compressed {
        let out = decompress(&data, raw_len as usize)
            .map_err(|e| ProtoError::Malformed(format!("chunk does not decompress: {e}")))?;
        if out.len() as u64 != raw_len {
            return Err(ProtoError::Malformed(
                "chunk decompressed to a different length than announced".into(),
            ));
        }
        out
    } else {
        if data.len() as u64 != raw_len {
            return Err(ProtoError::Malformed(
                "raw chunk length differs from announced".into(),
            ));
        }
        data
    };
    if blake3::hash(&raw).as_bytes() != expected {
        return Err(ProtoError::Malformed(
            "chunk does not match its hash in the manifest".into(),
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn compressible_chunks_shrink_and_random_ones_travel_raw() {
        let text: Vec<u8> = (0..256 * 1024)
            .map(|i| if (i / 40) % 3 == 0 { 20 } else { 240 })
            .collect();
        let (c, z) = encode_chunk(&text, 3);
        assert!(c && z.len() < text.len() / 10);
        let expected = *blake3::hash(&text).as_bytes();
        assert_eq!(
            decode_chunk(true, text.len() as u64, 256 * 1024, z, &expected).unwrap(),
            text
        );

        let mut noise = vec![0u8; 256 * 1024];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut noise);
        let (c, z) = encode_chunk(&noise, 19);
        assert!(
            !c && z.len() == noise.len(),
            "incompressible data is sent as is"
        );
    }

    #[test]
    fn bombs_and_tampering_are_refused() {
        let zeros = vec![0u8; 1 << 20];
        let z = zstd::bulk::compress(&zeros, 1).unwrap();
        let h = *blake3::hash(&zeros).as_bytes();
        assert!(
            decode_chunk(true, 1 << 20, 256 * 1024, z.clone(), &h).is_err(),
            "larger than the chunk size"
        );
        assert!(
            decode_chunk(true, 1000, 256 * 1024, z, &h).is_err(),
            "expands past its declared length"
        );
        let data = b"scan bytes".to_vec();
        assert!(
            decode_chunk(false, data.len() as u64, 64, data.clone(), &[0; 32]).is_err(),
            "wrong hash"
        );
    }
}
