//! The province's unit tree, versioned and signed by the CA, so that it can travel by sync
//! through relays that cannot alter it.
//!
//! Format (all integers big-endian): `b"CSUT1"`, version (u64), text length (u32), the tree's
//! TOML text (UTF-8), then the CA's ECDSA P-256 / SHA-256 signature (ASN.1 DER) over everything
//! before it.

use rcgen::SigningKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::cert_der_from_pem;
use super::{Ca, Result, TrustError};

const MAGIC: &[u8] = b"CSUT1";
/// Largest signed tree accepted (the text plus its header and signature): a province's tree of
/// a few thousand units is ~200 KB of TOML; this bounds what a hostile peer can hand over.
pub const SIGNED_TREE_BYTES_MAX: usize = 4 << 20;
/// A DER ECDSA P-256 signature is at most 72 bytes.
const SIGNATURE_BYTES_MAX: usize = 80;

/// A unit tree as the CA signed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedTree {
    pub version: u64,
    pub text: String,
    /// The whole signed encoding, as stored and sent.
    pub bytes: Vec<u8>,
}

fn bad(reason: impl Into<String>) -> TrustError {
    TrustError::BadTree {
        reason: reason.into(),
    }
}

impl Ca {
    /// Signs `text` as version `version` of the province's unit tree.
    pub fn sign_tree(&self, version: u64, text: &str) -> Result<SignedTree> {
        let mut bytes = Vec::with_capacity(text.len() + 100);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&version.to_be_bytes());
        let len = u32::try_from(text.len()).map_err(|_| bad("the tree text is too large"))?;
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(text.as_bytes());
        let sig = self.key().sign(&bytes).map_err(|e| TrustError::Crypto {
            what: "signing the unit tree",
            reason: e.to_string(),
        })?;
        bytes.extend_from_slice(&sig);
        if bytes.len() > SIGNED_TREE_BYTES_MAX {
            return Err(bad(format!(
                "the signed tree is {} bytes, over the {SIGNED_TREE_BYTES_MAX}-byte limit",
                bytes.len()
            )));
        }
        Ok(SignedTree {
            version,
            text: text.to_string(),
            bytes,
        })
    }
}

/// Reads a signed tree and checks the CA's signature over it; says nothing of its content.
pub fn verify_tree(ca_pem: &str, bytes: &[u8]) -> Result<SignedTree> {
    if bytes.len() > SIGNED_TREE_BYTES_MAX {
        return Err(bad(format!(
            "{} bytes, over the {SIGNED_TREE_BYTES_MAX}-byte limit",
            bytes.len()
        )));
    }
    let header = MAGIC.len() + 8 + 4;
    if bytes.len() < header || !bytes.starts_with(MAGIC) {
        return Err(bad("not a signed unit tree"));
    }
    let version = u64::from_be_bytes(bytes[MAGIC.len()..MAGIC.len() + 8].try_into().unwrap());
    let len = u32::from_be_bytes(bytes[MAGIC.len() + 8..header].try_into().unwrap()) as usize;
    let signed_len = header
        .checked_add(len)
        .filter(|&n| n <= bytes.len())
        .ok_or_else(|| bad("the tree text runs past the end"))?;
    let (signed, sig) = bytes.split_at(signed_len);
    if sig.is_empty() || sig.len() > SIGNATURE_BYTES_MAX {
        return Err(bad("the signature is missing or malformed"));
    }
    let ca = cert_der_from_pem("CA certificate", ca_pem)?;
    let (_, parsed) = X509Certificate::from_der(&ca).map_err(|e| TrustError::BadCert {
        what: "CA certificate",
        reason: e.to_string(),
    })?;
    let public_key = parsed.public_key().subject_public_key.data.to_vec();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(signed, sig)
        .map_err(|_| bad("the CA's signature does not match: it was not signed by this province's CA, or was altered"))?;
    let text = std::str::from_utf8(&signed[header..])
        .map_err(|_| bad("the tree text is not UTF-8"))?
        .to_string();
    Ok(SignedTree {
        version,
        text,
        bytes: bytes.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{enrol_request, NodeKey, Role};

    #[test]
    fn a_tree_signed_by_the_ca_verifies_and_any_change_or_other_signer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path().join("ca"), "qn").unwrap();
        let signed = ca.sign_tree(7, "[[unit]]\npath = \"qn\"\n").unwrap();
        let read = verify_tree(ca.cert_pem(), &signed.bytes).unwrap();
        assert_eq!(
            (read.version, read.text.as_str()),
            (7, signed.text.as_str())
        );

        // One byte changed anywhere: the version, the text or the signature.
        for at in [MAGIC.len() + 7, MAGIC.len() + 12, signed.bytes.len() - 3] {
            let mut altered = signed.bytes.clone();
            altered[at] ^= 1;
            assert!(verify_tree(ca.cert_pem(), &altered).is_err(), "byte {at}");
        }
        // Cut short, or empty.
        assert!(verify_tree(ca.cert_pem(), &signed.bytes[..20]).is_err());
        assert!(verify_tree(ca.cert_pem(), &[]).is_err());

        // Another CA's tree, and a tree an enrolled node signed with its own key.
        let other = Ca::init(dir.path().join("other"), "qn").unwrap();
        let foreign = other.sign_tree(8, &signed.text).unwrap();
        assert!(verify_tree(ca.cert_pem(), &foreign.bytes).is_err());
        let key = NodeKey::generate().unwrap();
        ca.issue(
            &enrol_request(&key).unwrap(),
            "qn/binhlieu",
            Role::District,
            30,
        )
        .unwrap();
        let mut forged = signed.bytes[..MAGIC.len() + 12 + signed.text.len()].to_vec();
        forged[MAGIC.len() + 7] = 9;
        let sig = key.sign(&forged).unwrap();
        forged.extend_from_slice(&sig);
        assert!(verify_tree(ca.cert_pem(), &forged).is_err());
    }
}
