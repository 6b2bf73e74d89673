//! Scan chunks from a peer or a bundle: `decode_chunk` checks a chunk against the length and
//! BLAKE3 hash of its manifest entry, inflating a compressed one no further than announced.
//! Input: a flags byte (bit 0 compressed, bit 1 the hash is the right one), the announced raw
//! length (u32 LE), then the chunk as it came.
#![no_main]

use bytes::Bytes;
use communesync::proto::blob::{decode_chunk, encode_chunk};
use communesync::store::blobs::CHUNK_BYTES;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((len, payload)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let compressed = flags & 1 != 0;
    // Mostly within the chunk size, sometimes past it.
    let raw_len = u64::from(u32::from_le_bytes(*len)) % (2 * CHUNK_BYTES as u64);
    let chunk_bytes = CHUNK_BYTES as u64;
    // The right hash, found the independent way (the zstd crate's one-shot call).
    let reference: Option<Vec<u8>> = if !compressed {
        Some(payload.to_vec())
    } else {
        zstd::bulk::decompress(payload, raw_len as usize).ok()
    }
    .filter(|raw| raw.len() as u64 == raw_len && raw_len <= chunk_bytes);
    let expected = match (&reference, flags & 2 != 0) {
        (Some(raw), true) => *blake3::hash(raw).as_bytes(),
        _ => [flags; 32],
    };
    let got = decode_chunk(
        compressed,
        raw_len,
        chunk_bytes,
        Bytes::copy_from_slice(payload),
        &expected,
    );
    match &got {
        Ok(raw) => {
            assert_eq!(raw.len() as u64, raw_len);
            assert_eq!(blake3::hash(raw).as_bytes(), &expected);
            assert_eq!(Some(&raw[..]), reference.as_deref());
        }
        Err(_) => assert!(
            reference.is_none() || flags & 2 == 0,
            "a chunk that matches its manifest entry was refused"
        ),
    }
    // Whatever the sender encodes, the receiver decodes back.
    if payload.len() <= CHUNK_BYTES {
        let (c, wire) = encode_chunk(Bytes::copy_from_slice(payload), i32::from(flags % 4));
        let hash = *blake3::hash(payload).as_bytes();
        let back = decode_chunk(c, payload.len() as u64, chunk_bytes, wire, &hash)
            .expect("an encoded chunk decodes");
        assert_eq!(&back[..], payload);
    }
});
