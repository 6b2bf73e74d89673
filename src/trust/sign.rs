//! Detached signatures by node keys (bundles carried on a USB stick, and every Automerge change
//! a node makes), verified against the signer's certificate, the CA and the revocation list,
//! like a TLS handshake would.

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

/// Bytes of a change signature: ECDSA P-256 / SHA-256, fixed-size `r || s`.
const CHANGE_SIG_BYTES: usize = 64;

/// A change signature as it travels and is stored.
type ChangeSig = [u8; CHANGE_SIG_BYTES];

/// What a node signs for one of its changes: a domain tag, the document id and the Automerge
/// change hash. The hash covers the change's actor, sequence number, dependencies, operations,
/// time and note; the document id keeps a document's first change (which has no
/// dependencies) from being replayed as the start of another document.
fn change_sig_message(doc: &str, hash: &[u8; 32]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(CHANGE_SIG_DOMAIN.len() + doc.len() + 33);
    msg.extend_from_slice(CHANGE_SIG_DOMAIN);
    msg.extend_from_slice(doc.as_bytes());
    msg.push(0);
    msg.extend_from_slice(hash);
    msg
}

const CHANGE_SIG_DOMAIN: &[u8] = b"communesync change signature v1\0";

/// What a node signs of the status it publishes (`proto::wire::status_body`): its own domain, so
/// no signature made for a change can pass for a status or the other way round.
const STATUS_SIG_DOMAIN: &[u8] = b"communesync status signature v1\0";

fn status_sig_message(body: &[u8]) -> Vec<u8> {
    [STATUS_SIG_DOMAIN, body].concat()
}

/// Signs changes with a node key (ring's fixed-size ECDSA, prepared once).
pub struct ChangeSigner {
    pair: ring::signature::EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl std::fmt::Debug for ChangeSigner {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChangeSigner")
    }
}

impl ChangeSigner {
    pub fn new(key: &NodeKey) -> Result<ChangeSigner> {
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.key_pair().serialize_der(),
            &rng,
        )
        .map_err(|e| TrustError::BadKey {
            reason: format!("not usable for signing changes ({e})"),
        })?;
        Ok(ChangeSigner { pair, rng })
    }

    /// The signature of change `hash` of document `doc`.
    pub fn sign(&self, doc: &str, hash: &[u8; 32]) -> Result<ChangeSig> {
        self.sign_message("signing a change", &change_sig_message(doc, hash))
    }

    /// The signature of this node's published status, `body` as `proto::wire::status_body`
    /// encodes it.
    pub fn sign_status(&self, body: &[u8]) -> Result<ChangeSig> {
        self.sign_message("signing a status", &status_sig_message(body))
    }

    fn sign_message(&self, what: &'static str, msg: &[u8]) -> Result<ChangeSig> {
        let sig = self
            .pair
            .sign(&self.rng, msg)
            .map_err(|e| TrustError::Crypto {
                what,
                reason: e.to_string(),
            })?;
        sig.as_ref().try_into().map_err(|_| TrustError::Crypto {
            what,
            reason: format!("a signature of {} bytes", sig.as_ref().len()),
        })
    }
}

/// The key of a node that authored changes, read once from its certificate (which the caller
/// has checked against the CA, [`verify_node_cert_der`]).
#[derive(Debug, Clone)]
pub struct AuthorKey {
    pub identity: PeerIdentity,
    /// The uncompressed P-256 point of the certificate's public key.
    public_key: Vec<u8>,
}

impl AuthorKey {
    pub fn from_cert_der(der: &[u8]) -> Result<AuthorKey> {
        let identity = PeerIdentity::from_cert_der(der)?;
        let (_, parsed) = X509Certificate::from_der(der).map_err(|e| TrustError::BadCert {
            what: "author certificate",
            reason: e.to_string(),
        })?;
        Ok(AuthorKey {
            identity,
            public_key: parsed.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// An author key from what its certificate said when it was checked (stored columns).
    pub fn from_parts(identity: PeerIdentity, public_key: Vec<u8>) -> AuthorKey {
        AuthorKey {
            identity,
            public_key,
        }
    }

    /// The uncompressed P-256 point of the certificate's public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Whether `sig` is this node's signature of change `hash` of document `doc`.
    pub fn verifies(&self, doc: &str, hash: &[u8; 32], sig: &[u8]) -> bool {
        self.verifies_message(&change_sig_message(doc, hash), sig)
    }

    /// Whether `sig` is this node's signature of the status `body`.
    pub fn verifies_status(&self, body: &[u8], sig: &[u8]) -> bool {
        self.verifies_message(&status_sig_message(body), sig)
    }

    fn verifies_message(&self, msg: &[u8], sig: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &self.public_key,
        )
        .verify(msg, sig)
        .is_ok()
    }
}

/// Checks that `der` is a node certificate of the CA that the CRL (if any) does not revoke;
/// returns what it certifies. For certificates of authors that reach a node by sync.
pub fn verify_node_cert_der(der: &[u8], ca_pem: &str, crl: Option<&Crl>) -> Result<AuthorKey> {
    let ca = cert_der_from_pem("CA certificate", ca_pem)?;
    tls::verify_node_cert(&rustls::pki_types::CertificateDer::from(der), &ca)?;
    let author = AuthorKey::from_cert_der(der)?;
    if crl.is_some_and(|crl| crl.is_revoked(&author.identity.serial)) {
        return Err(TrustError::RevokedNode {
            node: author.identity.node_id,
        });
    }
    Ok(author)
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
    /// A CA in a fresh directory, and a node key it certified for `unit` as `role`.
    fn certified(unit: &str, role: Role) -> (tempfile::TempDir, Ca, NodeKey, IssuedCert) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path().join("ca"), "qn").unwrap();
        let key = NodeKey::generate().unwrap();
        let issued = ca
            .issue(&enrol_request(&key).unwrap(), unit, role, 30)
            .unwrap();
        (dir, ca, key, issued)
    }

    #[test]
    fn change_signatures_bind_the_author_document_and_change() {
        let (_dir, ca, key, issued) = certified("qn/binhlieu", Role::District);
        let der = cert_der_from_pem("node certificate", &issued.cert_pem).unwrap();
        let author = verify_node_cert_der(&der, ca.cert_pem(), None).unwrap();
        assert_eq!(author.identity.node_id, key.node_id());
        let sig = ChangeSigner::new(&key)
            .unwrap()
            .sign("dsp_1", &[7; 32])
            .unwrap();
        assert!(author.verifies("dsp_1", &[7; 32], &sig));
        assert!(
            !author.verifies("dsp_2", &[7; 32], &sig),
            "another document"
        );
        assert!(!author.verifies("dsp_1", &[8; 32], &sig), "another change");
        let other = ChangeSigner::new(&NodeKey::generate().unwrap()).unwrap();
        let forged = other.sign("dsp_1", &[7; 32]).unwrap();
        assert!(
            !author.verifies("dsp_1", &[7; 32], &forged),
            "another node's key"
        );
    }

    #[test]
    fn status_signatures_are_their_own_domain() {
        let (_dir, ca, key, issued) = certified("qn/binhlieu/tinhhuc", Role::Commune);
        let der = cert_der_from_pem("node certificate", &issued.cert_pem).unwrap();
        let author = verify_node_cert_der(&der, ca.cert_pem(), None).unwrap();
        let signer = ChangeSigner::new(&key).unwrap();
        let sig = signer.sign_status(b"status body").unwrap();
        assert!(author.verifies_status(b"status body", &sig));
        assert!(!author.verifies_status(b"status bodY", &sig), "altered");
        // A change signature over the same bytes is no status signature, nor the other way.
        let mut doc_hash = [0; 32];
        doc_hash[..11].copy_from_slice(b"status body");
        let change = signer.sign("x", &doc_hash).unwrap();
        assert!(!author.verifies_status(b"status body", &change));
        assert!(!author.verifies("x", &doc_hash, &sig));
    }

    use super::*;
    use crate::trust::{enrol_request, Ca, IssuedCert, Role};

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let (dir, ca, key, issued) = certified("qn/binhlieu/tinhhuc", Role::Commune);
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
        let der = cert_der_from_pem("node certificate", &issued.cert_pem).unwrap();
        assert!(verify_node_cert_der(&der, other.cert_pem(), None).is_err());
        assert!(matches!(
            verify_node_cert_der(&der, ca.cert_pem(), Some(&crl)),
            Err(TrustError::RevokedNode { .. })
        ));
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
