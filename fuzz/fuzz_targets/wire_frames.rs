//! Frames from a peer (and a bundle's payload): `decode`, `decode_shared` and `decode_all` on
//! any bytes, zstd-compressed bodies included. A frame that decodes encodes back to bytes that
//! decode to the same frame, and decoding allocated no more than `decoded_bytes` announced.
#![no_main]

use bytes::Bytes;
use communesync::proto::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode_all(data);
    let plain = wire::decode(data);
    let shared = wire::decode_shared(&Bytes::copy_from_slice(data));
    assert_eq!(
        plain.is_ok(),
        shared.is_ok(),
        "decode and decode_shared disagree"
    );
    let Ok(frame) = plain else { return };
    assert_eq!(Some(&frame), shared.as_ref().ok());
    let budget = wire::decoded_bytes(data).expect("a frame that decodes has a readable header");
    assert!(budget >= data.len() && budget <= data.len() + wire::FRAME_RAW_BYTES_MAX);
    // A scan chunk is never compressed on the way out: one inflated from a zstd body could
    // exceed a frame, which the sender's batching rules out.
    if budget > wire::FRAME_BYTES_MAX / 2 {
        return;
    }
    for level in [1, 3] {
        let again = wire::encode(&frame, level);
        let len = wire::frame_len(again[..4].try_into().unwrap()).expect("a sane length");
        assert_eq!(len, again.len() - 4);
        assert_eq!(
            wire::decode(&again[4..]).expect("re-encoded frame decodes"),
            frame
        );
    }
});
