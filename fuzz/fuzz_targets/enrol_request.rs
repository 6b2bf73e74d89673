//! Enrolment requests as the CA reads them (`read_request`: PEM, PKCS#10, self-signature, the
//! node id against the key). Inputs are tried as the PEM file, and as the DER inside one.
#![no_main]

use communesync::trust::{read_request, NodeId};
use communesync_fuzz::pem;
use libfuzzer_sys::fuzz_target;

fn check(request_pem: &str) {
    if let Ok((_, node_id)) = read_request(request_pem) {
        assert_eq!(node_id.to_string().parse::<NodeId>().ok(), Some(node_id));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
    check(&pem("CERTIFICATE REQUEST", data));
});
