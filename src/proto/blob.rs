//! Scan transfer: per-chunk zstd with a cheap compressibility probe, bounded decompression,
//! and verification of every chunk against the manifest before it is stored.

use std::cell::RefCell;

use bytes::Bytes;

use super::wire::Hash32;
use super::ProtoError;

/// Bytes of a chunk compressed as a probe to decide whether compressing the chunk pays.
const PROBE_BYTES: usize = 16 * 1024;
/// A probe that does not shrink below this fraction means "incompressible" (JPEG, most PDFs).
const PROBE_RATIO_MAX: f64 = 0.90;

/// The "level" that sends chunks uncompressed (zstd itself reads 0 as its default, 3).
pub const LEVEL_RAW: i32 = 0;

/// zstd level for a link of `rate_bps`: a slow link spends CPU to save bytes, a fast one does
/// not, and one faster than the compressor gets raw chunks: zstd -1 runs at 90–400 MB/s per
/// core on scans (the noisier the page, the slower), under what loopback or a LAN beyond
/// 1 Gbit/s carries, and compressing and decompressing cost both ends more CPU than QUIC spends
/// on the bytes saved.
pub fn level_for_rate(rate_bps: u64) -> i32 {
    match rate_bps {
        0..=2_000_000 => 19,
        2_000_001..=20_000_000 => 9,
        20_000_001..=200_000_000 => 3,
        200_000_001..=1_000_000_000 => 1,
        _ => LEVEL_RAW,
    }
}

/// What the sender knows of the link when it picks a level for the next chunk.
#[derive(Debug, Clone, Copy)]
pub struct LinkView {
    /// Smoothed round-trip time.
    pub rtt: std::time::Duration,
    /// The congestion window, bytes.
    pub window_bytes: u64,
    /// The controller's pacing rate, bits/s, when it paces (BBR).
    pub pacing_bps: Option<u64>,
    /// Bytes the connection has sent so far.
    pub bytes_sent: u64,
}

/// Until a connection has sent this much, its controller still runs on its initial window,
/// which says nothing about the link.
const RATE_SAMPLE_BYTES: u64 = 512 * 1024;
/// An unmeasured link with a round trip this long is taken for a field link (2G, weak 4G and
/// VSAT all sit at 100 ms and above; loopback and office LANs far below).
const FIELD_LINK_RTT: std::time::Duration = std::time::Duration::from_millis(30);
/// The rate assumed for an unmeasured field link: weak 4G's.
const FIELD_LINK_BPS: u64 = 1_000_000;
/// BBR's largest pacing gain while it probes for bandwidth, and its window gain: its pacing
/// rate reads up to 1.25 × the bottleneck rate and its window is 2 × the bandwidth-delay product.
const BBR_PACING_GAIN_MAX: f64 = 1.25;
const BBR_WINDOW_GAIN: u64 = 2;

/// The bottleneck rate the sender should assume, bits/s, erring low: a level too high costs CPU
/// the sender has on a slow link, a level too low costs bytes on exactly the links short of them.
pub fn link_rate_bps(link: &LinkView) -> u64 {
    let rtt = link.rtt.as_secs_f64().max(1e-4);
    let window_rate = (link.window_bytes as f64 * 8.0 / rtt) as u64;
    // On a LAN or loopback the link is as fast as the higher reading: the pacing rate falls
    // while the sender itself is the bottleneck (compressing, say), and the window collapses to
    // a few packets for BBR's 200 ms RTT probe (which quinn's BBR starts as soon as a new
    // connection first fills its window) and in loss recovery. Either alone would pick a level
    // that makes the sender slower still.
    if link.rtt < FIELD_LINK_RTT {
        return window_rate.max(link.pacing_bps.unwrap_or(0));
    }
    if link.bytes_sent < RATE_SAMPLE_BYTES {
        return window_rate.min(FIELD_LINK_BPS);
    }
    match link.pacing_bps {
        Some(pacing) if pacing > 0 => {
            ((pacing as f64 / BBR_PACING_GAIN_MAX) as u64).min(window_rate / BBR_WINDOW_GAIN)
        }
        _ => window_rate,
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

/// Encodes a chunk for the wire: compressed when that pays at `level`, otherwise the chunk
/// itself, not copied. Returns (compressed, bytes).
pub fn encode_chunk(data: Bytes, level: i32) -> (bool, Bytes) {
    if level == LEVEL_RAW {
        return (false, data);
    }
    let probe = &data[..data.len().min(PROBE_BYTES)];
    let worth_it = match compress(probe, 1) {
        Ok(z) => (z.len() as f64) < probe.len() as f64 * PROBE_RATIO_MAX,
        Err(_) => false,
    };
    if worth_it {
        if let Ok(z) = compress(&data, level) {
            if z.len() < data.len() {
                return (true, z.into());
            }
        }
    }
    (false, data)
}

/// Decodes a chunk, refusing anything that would expand past `raw_len` (itself bounded by the
/// chunk size announced in the manifest), then checks it against its manifest hash. A raw chunk
/// is returned in the buffer it came in, without a copy.
pub fn decode_chunk(
    compressed: bool,
    raw_len: u64,
    chunk_bytes: u64,
    data: Bytes,
    expected: &Hash32,
) -> Result<Bytes, ProtoError> {
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
        out.into()
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
        let (c, z) = encode_chunk(text.clone().into(), 3);
        assert!(c && z.len() < text.len() / 10);
        let expected = *blake3::hash(&text).as_bytes();
        assert_eq!(
            decode_chunk(true, text.len() as u64, 256 * 1024, z, &expected).unwrap(),
            text
        );
        let (c, z) = encode_chunk(text.clone().into(), LEVEL_RAW);
        assert!(
            !c && z == text,
            "a link faster than zstd gets the chunk raw"
        );

        let mut noise = vec![0u8; 256 * 1024];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut noise);
        let noise = Bytes::from(noise);
        let (c, z) = encode_chunk(noise.clone(), 19);
        assert!(
            !c && z.as_ptr() == noise.as_ptr() && z.len() == noise.len(),
            "incompressible data is sent as is, not copied"
        );
    }

    #[test]
    fn the_level_follows_the_link_and_errs_towards_compressing() {
        use std::time::Duration;
        let view = |rtt_ms, window_bytes, pacing_bps, bytes_sent| LinkView {
            rtt: Duration::from_millis(rtt_ms),
            window_bytes,
            pacing_bps,
            bytes_sent,
        };
        let level = |v: LinkView| level_for_rate(link_rate_bps(&v));
        // Unmeasured: BBR's initial window of 240 KB over a 200 ms handshake reads 9.6 Mbit/s.
        assert_eq!(level(view(200, 240_000, Some(27_000_000), 6_000)), 19);
        assert_eq!(
            level(view(1, 240_000, Some(2_000_000_000), 6_000)),
            LEVEL_RAW,
            "loopback"
        );
        // A gigabit LAN at 1 ms with about one BDP in flight: still worth level 1.
        assert_eq!(level(view(1, 100_000, None, 64 << 20)), 1);
        // Weak 4G measured by BBR: a window of 2 × BDP over a queue-inflated RTT, pacing 1.25 ×.
        assert_eq!(level(view(300, 75_000, Some(1_250_000), 2 << 20)), 19);
        // VSAT, 10 Mbit/s at 650 ms, BBR cruising.
        assert_eq!(level(view(650, 1_625_000, Some(10_000_000), 8 << 20)), 9);
        // Cubic: the window is about one BDP.
        assert_eq!(level(view(200, 25_000, None, 2 << 20)), 19);
        assert_eq!(level(view(1, 4 << 20, None, 64 << 20)), LEVEL_RAW);
        // Loopback with the sender as the bottleneck: BBR's pacing rate reads low.
        assert_eq!(
            level(view(1, 4 << 20, Some(50_000_000), 64 << 20)),
            LEVEL_RAW
        );
        // Loopback during BBR's RTT probe: the window is 4 packets, the pacing rate still high.
        assert_eq!(
            level(view(1, 5_808, Some(2_000_000_000), 64 << 20)),
            LEVEL_RAW
        );
    }

    #[test]
    fn bombs_and_tampering_are_refused() {
        let zeros = vec![0u8; 1 << 20];
        let z = zstd::bulk::compress(&zeros, 1).unwrap();
        let h = *blake3::hash(&zeros).as_bytes();
        assert!(
            decode_chunk(true, 1 << 20, 256 * 1024, z.clone().into(), &h).is_err(),
            "larger than the chunk size"
        );
        assert!(
            decode_chunk(true, 1000, 256 * 1024, z.into(), &h).is_err(),
            "expands past its declared length"
        );
        let data = Bytes::from_static(b"scan bytes");
        assert!(
            decode_chunk(false, data.len() as u64, 64, data.clone(), &[0; 32]).is_err(),
            "wrong hash"
        );
    }

    // Issue 11: the fuzz target's properties (fuzz/fuzz_targets/scan_chunk.rs), in the default
    // test run.
    mod issue11_props {
        use super::*;
        use crate::store::blobs::CHUNK_BYTES;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Text-like bytes (compressible) or any bytes.
        fn chunk() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                vec(any::<u8>(), 0..4000),
                ("[a-z ]{1,40}", 0..400usize).prop_map(|(s, n)| s.repeat(n).into_bytes()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn issue11_encoded_chunks_decode_to_themselves(data in chunk(), level in -1..6i32) {
                let hash = *blake3::hash(&data).as_bytes();
                let (compressed, wire) = encode_chunk(data.clone().into(), level);
                let back = decode_chunk(compressed, data.len() as u64, CHUNK_BYTES as u64, wire, &hash);
                prop_assert_eq!(back.unwrap(), data);
            }

            /// Whatever arrives, a chunk is returned only at its announced length and hash; a
            /// compressed one is never inflated past that length.
            #[test]
            fn issue11_any_chunk_is_accepted_only_as_announced(
                data in chunk(),
                compress in any::<bool>(),
                compressed in any::<bool>(),
                len_delta in -2i64..2,
                right_hash in any::<bool>(),
            ) {
                let wire: Vec<u8> = if compress { zstd::bulk::compress(&data, 1).unwrap() } else { data.clone() };
                let raw_len = (data.len() as i64 + len_delta).max(0) as u64;
                let expected = if right_hash { *blake3::hash(&data).as_bytes() } else { [7; 32] };
                match decode_chunk(compressed, raw_len, CHUNK_BYTES as u64, wire.into(), &expected) {
                    Ok(raw) => {
                        prop_assert_eq!(raw.len() as u64, raw_len);
                        prop_assert_eq!(*blake3::hash(&raw).as_bytes(), expected);
                    }
                    Err(_) => prop_assert!(
                        !right_hash || len_delta != 0 || compress != compressed,
                        "a chunk as announced was refused"
                    ),
                }
            }

            /// A chunk announced larger than the manifest's chunk size is refused before it is
            /// inflated, however small it is on the wire.
            #[test]
            fn issue11_chunks_over_the_manifest_size_are_refused(extra in 1..1_000_000u64) {
                let z = zstd::bulk::compress(&vec![0u8; CHUNK_BYTES], 1).unwrap();
                let raw_len = CHUNK_BYTES as u64 + extra;
                prop_assert!(decode_chunk(true, raw_len, CHUNK_BYTES as u64, z.into(), &[0; 32]).is_err());
            }
        }
    }
}
