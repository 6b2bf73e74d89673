//! Bundle files: `read_header` (magic, format, bounded header and signature lengths, the JSON
//! header) and the frames after it. Inputs are read as a whole file, and also as a header's
//! JSON wrapped in a well-formed envelope so the JSON parser is reached at once.
#![no_main]

use communesync::node::bundle::{read_header, BundleHeader};
use communesync::proto::wire;
use libfuzzer_sys::fuzz_target;

fn check(file: &[u8]) {
    let mut rest = file;
    let Ok(read) = read_header(&mut rest) else {
        return;
    };
    assert!(read.json.len() <= 256 * 1024 && read.signature.len() <= u16::MAX as usize);
    assert_eq!(
        file.len() - rest.len(),
        9 + 4 + read.json.len() + 2 + read.signature.len()
    );
    // What the exporter would write for this header reads back the same.
    let json = serde_json::to_vec(&read.header).expect("a header serializes");
    let again: BundleHeader = serde_json::from_slice(&json).expect("a written header reads");
    assert_eq!(
        serde_json::to_value(&again).unwrap(),
        serde_json::to_value(&read.header).unwrap()
    );
    let _ = wire::decode_all(rest);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut file = b"CSBUNDLE\x01".to_vec();
    file.extend_from_slice(&(data.len() as u32).to_be_bytes());
    file.extend_from_slice(data);
    file.extend_from_slice(&[0, 1, 0xff]);
    check(&file);
});
