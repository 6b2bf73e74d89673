//! What several fuzz targets share: PEM armour for raw DER, and one CA (with a node it issued
//! and then revoked) made once per process, so signature checks run against real material.

use std::sync::OnceLock;

use communesync::trust::{enrol_request, Ca, Crl, NodeKey, Role};

/// The CA's certificate, a certificate it issued, and a CRL revoking it (all PEM).
pub struct Material {
    pub ca_pem: String,
    pub cert_pem: String,
    pub request_pem: String,
    pub crl: Crl,
}

/// Made on first use; the CA's directory lives as long as the process.
pub fn material() -> &'static Material {
    static MATERIAL: OnceLock<Material> = OnceLock::new();
    MATERIAL.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory").keep();
        let ca = Ca::init(dir.join("ca"), "qn").expect("a CA");
        let key = NodeKey::generate().expect("a node key");
        let request_pem = enrol_request(&key).expect("a request");
        let issued = ca
            .issue(&request_pem, "qn/binhlieu", Role::District, 30)
            .expect("a certificate");
        let crl = ca.revoke(key.node_id()).expect("a CRL");
        Material {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem,
            request_pem,
            crl,
        }
    })
}

/// `der` armoured as PEM under `label`, lines of 64 characters.
pub fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for group in der.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(if i <= group.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
