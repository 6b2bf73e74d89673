//! CRLs from a peer (a `Crl` frame), a bundle's header or a file: `Crl::from_der`,
//! `Crl::from_pem` and `verify_crl` against a real CA. A CRL that parses round-trips through
//! PEM; one that verifies is the CA's (only the CA's own CRL, or a copy, may).
#![no_main]

use communesync::trust::{verify_crl, Crl};
use communesync_fuzz::material;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let m = material();
    if let Ok(crl) = Crl::from_der(data.to_vec()) {
        let again = Crl::from_pem(&crl.to_pem()).expect("a parsed CRL's PEM parses");
        assert_eq!(again, crl);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Crl::from_pem(text);
    }
    if let Ok(crl) = verify_crl(&m.ca_pem, data) {
        assert_eq!(crl.number(), m.crl.number(), "only the CA's CRL verifies");
    }
});
