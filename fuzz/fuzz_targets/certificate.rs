//! Node certificates from a TLS peer or a bundle's signer: `PeerIdentity::from_cert_der` and
//! `from_cert_pem`, and `verify_signed` against a real CA as a bundle's header is checked.
//! An identity read from DER reads the same from its PEM.
#![no_main]

use communesync::trust::{verify_signed, PeerIdentity};
use communesync_fuzz::{material, pem};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = material();
    let armoured = pem("CERTIFICATE", data);
    let from_der = PeerIdentity::from_cert_der(data);
    if let Ok(identity) = &from_der {
        assert_eq!(
            PeerIdentity::from_cert_pem(&armoured).ok().as_ref(),
            Some(identity)
        );
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PeerIdentity::from_cert_pem(text);
    }
    // A certificate the CA did not issue never verifies, whatever it claims.
    let signed = verify_signed(&armoured, &m.ca_pem, None, b"header", &[0; 64]);
    assert!(signed.is_err(), "a signature of zeros verified");
});
