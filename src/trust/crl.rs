//! Certificate revocation lists: parsing, PEM encoding, and checking the CA's signature.

use std::fmt;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateRevocationListDer;
use x509_parser::asn1_rs::Any;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use super::identity::cert_der_from_pem;
use super::{Result, TrustError};

/// An X.509 CRL issued by the province CA. `number` is its CRL number: a later CRL always
/// has a larger one, so a node keeps the CRL with the highest number it has verified.
#[derive(Clone, PartialEq, Eq)]
pub struct Crl {
    der: Vec<u8>,
    number: u64,
    revoked: Vec<Vec<u8>>,
}

impl fmt::Debug for Crl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Crl")
            .field("number", &self.number)
            .field("revoked", &self.revoked.len())
            .finish()
    }
}

fn bad(reason: impl Into<String>) -> TrustError {
    TrustError::BadCrl {
        reason: reason.into(),
    }
}

impl Crl {
    /// Parses a DER CRL. This does NOT check who signed it: use [`verify_crl`] for any CRL
    /// that came from a peer or a file.
    pub fn from_der(der: Vec<u8>) -> Result<Crl> {
        let (number, revoked) = {
            let (rest, crl) = CertificateRevocationList::from_der(&der)
                .map_err(|e| bad(format!("not an X.509 CRL ({e})")))?;
            if !rest.is_empty() {
                return Err(bad("trailing bytes after the CRL"));
            }
            let number = crl
                .crl_number()
                .ok_or_else(|| bad("no CRL number"))?
                .to_u64_digits();
            let number = match number.as_slice() {
                [] => 0,
                [n] => *n,
                _ => return Err(bad("CRL number does not fit in 64 bits")),
            };
            let revoked = crl
                .iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec())
                .collect();
            (number, revoked)
        };
        Ok(Crl {
            der,
            number,
            revoked,
        })
    }

    /// Parses a PEM (`X509 CRL`) CRL; like [`Crl::from_der`], no signature check.
    pub fn from_pem(pem: &str) -> Result<Crl> {
        let der = CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| bad("not a PEM CRL (expected -----BEGIN X509 CRL-----)"))?;
        Crl::from_der(der.to_vec())
    }

    pub fn to_pem(&self) -> String {
        pem_encode("X509 CRL", &self.der)
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn number(&self) -> u64 {
        self.number
    }

    /// Serials (DER integer content bytes, as in [`super::PeerIdentity::serial`]).
    pub fn revoked_serials(&self) -> &[Vec<u8>] {
        &self.revoked
    }

    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.revoked.iter().any(|s| s == serial)
    }
}

/// Parses `crl_der` and checks it was issued and signed by the CA in `ca_cert_pem`.
pub fn verify_crl(ca_cert_pem: &str, crl_der: &[u8]) -> Result<Crl> {
    let ca_der = cert_der_from_pem("CA certificate", ca_cert_pem)?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| TrustError::BadCert {
        what: "CA certificate",
        reason: format!("not an X.509 certificate ({e})"),
    })?;
    let crl = Crl::from_der(crl_der.to_vec())?;
    let (_, parsed) = CertificateRevocationList::from_der(crl_der)
        .map_err(|e| bad(format!("not an X.509 CRL ({e})")))?;
    if parsed.issuer().as_raw() != ca.subject().as_raw() {
        return Err(bad(format!(
            "issued by {:?}, not by this CA ({:?})",
            parsed.issuer().to_string(),
            ca.subject().to_string()
        )));
    }
    if parsed.tbs_cert_list.signature != parsed.signature_algorithm {
        return Err(bad("inner and outer signature algorithms differ"));
    }

    let (tbs, sig_alg_id) = split_signed(crl_der).ok_or_else(|| bad("malformed DER"))?;
    let key_alg_id = spki_alg_id(ca.public_key().raw).ok_or_else(|| TrustError::BadCert {
        what: "CA certificate",
        reason: "malformed public key".into(),
    })?;
    // Verify with the same ring-backed algorithms rustls uses, so no second crypto stack.
    let provider = rustls::crypto::ring::default_provider();
    let alg = provider
        .signature_verification_algorithms
        .all
        .iter()
        .find(|a| {
            a.public_key_alg_id().as_ref() == key_alg_id
                && a.signature_alg_id().as_ref() == sig_alg_id
        })
        .ok_or_else(|| bad("signature algorithm does not match the CA key"))?;
    alg.verify_signature(
        &ca.public_key().subject_public_key.data,
        tbs,
        &parsed.signature_value.data,
    )
    .map_err(|_| bad("signature is not by this CA (wrong CA or corrupted CRL)"))?;
    Ok(crl)
}

/// Splits a DER `SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING }` into the raw tbs bytes
/// (what was signed) and the contents of the AlgorithmIdentifier.
fn split_signed(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (_, outer) = Any::from_der(der).ok()?;
    let body = outer.data;
    let (after_tbs, _) = Any::from_der(body).ok()?;
    let tbs = &body[..body.len() - after_tbs.len()];
    let (_, alg) = Any::from_der(after_tbs).ok()?;
    Some((tbs, alg.data))
}

/// The contents of a DER SubjectPublicKeyInfo's AlgorithmIdentifier.
pub(crate) fn spki_alg_id(spki: &[u8]) -> Option<&[u8]> {
    let (_, outer) = Any::from_der(spki).ok()?;
    let (_, alg) = Any::from_der(outer.data).ok()?;
    Some(alg.data)
}

/// RFC 7468 PEM with 64-column base64 lines and Unix line ends.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{enrol_request, Ca, NodeKey, Role};

    #[test]
    fn pem_encoding_roundtrips() {
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = pem_encode("X509 CRL", &data);
            let back = CertificateRevocationListDer::from_pem_slice(pem.as_bytes());
            if len == 0 {
                continue;
            }
            assert_eq!(back.unwrap().as_ref(), &data[..], "len {len}");
        }
    }

    #[test]
    fn revoke_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path().join("ca"), "north").unwrap();
        let first = ca.current_crl().unwrap();
        assert!(first.revoked_serials().is_empty());
        verify_crl(ca.cert_pem(), first.der()).unwrap();

        let key_a = NodeKey::generate().unwrap();
        let key_b = NodeKey::generate().unwrap();
        let a = ca
            .issue(
                &enrol_request(&key_a).unwrap(),
                "north/a",
                Role::Commune,
                30,
            )
            .unwrap();
        let b = ca
            .issue(
                &enrol_request(&key_b).unwrap(),
                "north/b",
                Role::Commune,
                30,
            )
            .unwrap();

        let crl1 = ca.revoke(key_a.node_id()).unwrap();
        assert!(crl1.number() > first.number());
        assert!(crl1.is_revoked(&a.identity.serial));
        assert!(!crl1.is_revoked(&b.identity.serial));
        let crl2 = ca.revoke(key_b.node_id()).unwrap();
        assert!(crl2.number() > crl1.number());
        assert!(crl2.is_revoked(&a.identity.serial) && crl2.is_revoked(&b.identity.serial));
        assert_eq!(ca.current_crl().unwrap(), crl2);
        assert!(matches!(
            ca.revoke(key_b.node_id()),
            Err(TrustError::AlreadyRevoked { .. })
        ));
        assert!(matches!(
            ca.revoke(NodeKey::generate().unwrap().node_id()),
            Err(TrustError::UnknownNode { .. })
        ));

        let checked = verify_crl(ca.cert_pem(), crl2.der()).unwrap();
        assert_eq!(checked, crl2);
        assert_eq!(Crl::from_pem(&crl2.to_pem()).unwrap(), crl2);

        // Reopening sees the same state.
        let again = Ca::open(dir.path().join("ca")).unwrap();
        assert_eq!(again.current_crl().unwrap(), crl2);

        // A CRL signed by another CA is refused, even with the same subject name.
        let other = Ca::init(dir.path().join("other"), "north").unwrap();
        let foreign = other.current_crl().unwrap();
        assert!(matches!(
            verify_crl(ca.cert_pem(), foreign.der()),
            Err(TrustError::BadCrl { .. })
        ));

        // Corruption anywhere is refused: flip one bit in each byte position in turn.
        let der = crl2.der().to_vec();
        for i in (0..der.len()).step_by(7) {
            let mut bad = der.clone();
            bad[i] ^= 0x01;
            assert!(
                verify_crl(ca.cert_pem(), &bad).is_err(),
                "flipped byte {i} accepted"
            );
        }
    }

    // Issue 11: the fuzz target's properties (fuzz/fuzz_targets/crl.rs), in the default test
    // run.
    mod issue11_props {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};

        use crate::trust::mutation::{mutate, mutation};

        /// Any bytes, and the CA's real CRL with bytes changed: parsing never panics, a CRL that
        /// parses round-trips through PEM, and only the CA's own CRL verifies.
        #[test]
        fn issue11_any_and_mutated_crls_are_read_safely() {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init(dir.path().join("ca"), "north").unwrap();
            let key = NodeKey::generate().unwrap();
            let request = enrol_request(&key).unwrap();
            ca.issue(&request, "north/a", Role::Commune, 30).unwrap();
            let crl = ca.revoke(key.node_id()).unwrap();
            let mut runner = TestRunner::new(Config::with_cases(256));
            runner
                .run(&mutation(), |(edits, cut, noise)| {
                    let _ = Crl::from_der(noise.clone());
                    let _ = Crl::from_pem(&String::from_utf8_lossy(&noise));
                    let _ = Crl::from_pem(&pem_encode("X509 CRL", &noise));
                    let bytes = mutate(crl.der().to_vec(), edits, cut);
                    if let Ok(parsed) = Crl::from_der(bytes.clone()) {
                        prop_assert_eq!(Crl::from_pem(&parsed.to_pem()).unwrap(), parsed);
                    }
                    if let Ok(verified) = verify_crl(ca.cert_pem(), &bytes) {
                        prop_assert_eq!(verified.number(), crl.number());
                        prop_assert_eq!(verified.revoked_serials(), crl.revoked_serials());
                    }
                    Ok(())
                })
                .unwrap();
        }
    }
}
