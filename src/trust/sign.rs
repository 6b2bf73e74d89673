//! Detached signatures by node keys (bundles carried on a USB stick), verified against the
//! signer's certificate, the CA and the revocation list, like a TLS handshake would.

use rcgen::SigningKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::cert_der_from_pem;
use super::{tls, Crl, NodeKey, PeerIdentity, Result, TrustError};

impl NodeKey {
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER) over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        self.key_pair().sign(msg).map_err(|e| TrustError::Crypto {
            what: "signing",
            reason: e.to_string(),
        })
    }
}

/// Checks that `cert_pem` is a node certificate of the CA, not revoked, and that it signed
/// `msg`; returns the signer's identity.
pub fn verify_signed(
    cert_pem: &str,
    ca_pem: &str,
    crl: Option<&Crl>,
    msg: &[u8],
    signature: &[u8],
) -> Result<PeerIdentity> {
    let cert = cert_der_from_pem("signer certificate", cert_pem)?;
    let ca = cert_der_from_pem("CA certificate", ca_pem)?;
    tls::verify_node_cert(&cert, &ca)?;
    let identity = PeerIdentity::from_cert_der(&cert)?;
    if crl.is_some_and(|crl| crl.is_revoked(&identity.serial)) {
        return Err(TrustError::RevokedNode {
            node: identity.node_id,
        });
    }
    let (_, parsed) = X509Certificate::from_der(&cert).map_err(|e| TrustError::BadCert {
        what: "signer certificate",
        reason: e.to_string(),
    })?;
    let public_key = parsed.public_key().subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(msg, signature)
        .map_err(|_| TrustError::BadSignature)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{enrol_request, Ca, Role};

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path().join("ca"), "qn").unwrap();
        let key = NodeKey::generate().unwrap();
        let issued = ca
            .issue(
                &enrol_request(&key).unwrap(),
                "qn/binhlieu/tinhhuc",
                Role::Commune,
                30,
            )
            .unwrap();
        let sig = key.sign(b"bundle bytes").unwrap();
        let who =
            verify_signed(&issued.cert_pem, ca.cert_pem(), None, b"bundle bytes", &sig).unwrap();
        assert_eq!(who.unit, "qn/binhlieu/tinhhuc");
        assert!(matches!(
            verify_signed(&issued.cert_pem, ca.cert_pem(), None, b"bundle bytez", &sig),
            Err(TrustError::BadSignature)
        ));
        let crl = ca.revoke(who.node_id).unwrap();
        assert!(matches!(
            verify_signed(
                &issued.cert_pem,
                ca.cert_pem(),
                Some(&crl),
                b"bundle bytes",
                &sig
            ),
            Err(TrustError::RevokedNode { .. })
        ));
        let other = Ca::init(dir.path().join("other"), "qn").unwrap();
        assert!(verify_signed(
            &issued.cert_pem,
            other.cert_pem(),
            None,
            b"bundle bytes",
            &sig
        )
        .is_err());
    }
}
