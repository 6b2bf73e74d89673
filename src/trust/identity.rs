//! Node keys, node ids, enrolment requests and the identity a certificate proves.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::fsutil::write_secret_file;
use super::{tls, validate_unit, Result, Role, TrustError};

/// URI SAN prefixes carrying what the CA decided about a node.
pub(crate) const URI_UNIT: &str = "urn:communesync:unit:";
pub(crate) const URI_ROLE: &str = "urn:communesync:role:";
pub(crate) const URI_NODE: &str = "urn:communesync:node:";

/// A node's stable identity: the first 16 bytes of blake3 over its public key's
/// SubjectPublicKeyInfo DER. Derivable from the key and from any certificate for the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 16]);

impl NodeId {
    /// The id of the key in a DER SubjectPublicKeyInfo (a certificate's or a key pair's).
    pub fn from_spki_der(spki_der: &[u8]) -> NodeId {
        let hash = blake3::hash(spki_der);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        NodeId(id)
    }

    pub fn from_bytes(bytes: [u8; 16]) -> NodeId {
        NodeId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl FromStr for NodeId {
    type Err = TrustError;

    fn from_str(s: &str) -> Result<Self> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|_| TrustError::BadNodeId {
            input: s.to_string(),
        })?;
        Ok(NodeId(id))
    }
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node's ECDSA P-256 key pair (stored as PKCS#8 PEM).
pub struct NodeKey {
    pair: KeyPair,
}

impl fmt::Debug for NodeKey {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey({})", self.node_id())
    }
}

impl NodeKey {
    pub fn generate() -> Result<NodeKey> {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| {
            TrustError::Crypto {
                what: "generating a node key",
                reason: e.to_string(),
            }
        })?;
        Ok(NodeKey { pair })
    }

    pub fn from_pem(pem: &str) -> Result<NodeKey> {
        let pair = KeyPair::from_pem(pem).map_err(|e| TrustError::BadKey {
            reason: format!("not a PKCS#8 PEM private key ({e})"),
        })?;
        if pair.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(TrustError::BadKey {
                reason: "not an ECDSA P-256 key".to_string(),
            });
        }
        Ok(NodeKey { pair })
    }

    /// PKCS#8 PEM; secret, write it with [`write_secret_file`].
    pub fn to_pem(&self) -> String {
        self.pair.serialize_pem()
    }

    /// Reads a key written by [`NodeKey::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<NodeKey> {
        let path = path.as_ref();
        let pem = std::fs::read_to_string(path).map_err(|source| TrustError::Io {
            op: "reading node key",
            path: path.to_path_buf(),
            source,
        })?;
        NodeKey::from_pem(&pem).map_err(|e| match e {
            TrustError::BadKey { reason } => TrustError::BadKey {
                reason: format!("{}: {reason}", path.display()),
            },
            other => other,
        })
    }

    /// Writes the key atomically with mode 0600.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        write_secret_file(path, self.to_pem().as_bytes())
    }

    pub fn node_id(&self) -> NodeId {
        NodeId::from_spki_der(&self.spki_der())
    }

    /// DER SubjectPublicKeyInfo of the public key.
    pub fn spki_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.pair
    }

    pub(crate) fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialize_der()))
    }
}

/// Makes the PKCS#10 request (PEM) a node sends to the CA: subject CN = its node id, no
/// extensions, since unit and role are the CA's decision.
pub fn enrol_request(key: &NodeKey) -> Result<String> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, key.node_id().to_string());
    params.distinguished_name = dn;
    params
        .serialize_request(key.key_pair())
        .and_then(|csr| csr.pem())
        .map_err(|e| TrustError::Crypto {
            what: "making the certificate request",
            reason: e.to_string(),
        })
}

/// What a certificate issued by the CA says about its holder.
///
/// Parsing alone proves nothing: only trust a `PeerIdentity` taken from a certificate that
/// was verified against the CA (a TLS handshake, or [`install_check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Derived from the certificate's public key, so it cannot be claimed falsely.
    pub node_id: NodeId,
    pub unit: String,
    pub role: Role,
    /// The certificate serial (DER integer content bytes), as listed in CRLs.
    pub serial: Vec<u8>,
}

impl PeerIdentity {
    /// Reads the identity from a node certificate (DER), rejecting one whose stated node id
    /// (subject CN or node URI) disagrees with its public key.
    pub fn from_cert_der(der: &[u8]) -> Result<PeerIdentity> {
        let bad = |reason: String| TrustError::BadCert {
            what: "node certificate",
            reason,
        };
        let (rest, cert) = X509Certificate::from_der(der)
            .map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the certificate".into()));
        }
        let node_id = NodeId::from_spki_der(cert.public_key().raw);

        let mut cns = cert.subject().iter_common_name();
        let cn = match (cns.next(), cns.next()) {
            (Some(cn), None) => cn
                .as_str()
                .map_err(|_| bad("subject common name is not a string".into()))?,
            _ => return Err(bad("subject must have exactly one common name".into())),
        };
        check_claim(cn, "subject common name", node_id)?;

        let san = cert
            .subject_alternative_name()
            .map_err(|e| bad(format!("unreadable subject alternative names ({e})")))?
            .ok_or_else(|| bad("no subject alternative names; reissue it with this CA".into()))?;
        let (mut unit, mut role, mut node) = (None, None, None);
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            let (slot, value) = if let Some(v) = uri.strip_prefix(URI_UNIT) {
                (&mut unit, v)
            } else if let Some(v) = uri.strip_prefix(URI_ROLE) {
                (&mut role, v)
            } else if let Some(v) = uri.strip_prefix(URI_NODE) {
                (&mut node, v)
            } else {
                continue;
            };
            if slot.replace(value).is_some() {
                return Err(bad(format!("more than one URI like {uri:?}")));
            }
        }
        let missing = |which: &str| bad(format!("no {which} URI; reissue it with this CA"));
        let unit = unit.ok_or_else(|| missing("unit"))?;
        validate_unit(unit)?;
        let role: Role = role
            .ok_or_else(|| missing("role"))?
            .parse()
            .map_err(|e: crate::units::UnitError| bad(e.to_string()))?;
        check_claim(node.ok_or_else(|| missing("node"))?, "node URI", node_id)?;

        Ok(PeerIdentity {
            node_id,
            unit: unit.to_string(),
            role,
            serial: cert.raw_serial().to_vec(),
        })
    }

    /// Parses the first certificate in a PEM file's contents.
    pub fn from_cert_pem(pem: &str) -> Result<PeerIdentity> {
        PeerIdentity::from_cert_der(&cert_der_from_pem("node certificate", pem)?)
    }
}

fn check_claim(claimed: &str, where_: &str, actual: NodeId) -> Result<()> {
    match claimed.parse::<NodeId>() {
        Ok(id) if id == actual => Ok(()),
        _ => Err(TrustError::BadCert {
            what: "node certificate",
            reason: format!("{where_} {claimed:?} does not match its key (node {actual})"),
        }),
    }
}

/// The first certificate in `pem`; `what` names the file for the error message.
pub(crate) fn cert_der_from_pem(what: &'static str, pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TrustError::BadCert {
        what,
        reason: "not a PEM certificate; pass the file written by `communesync ca issue`".into(),
    })
}

/// Checks a certificate received from the CA before a node installs it: it must chain to
/// `ca_pem`, be usable for both TLS roles, and be for `key`. Returns what it certifies.
pub fn install_check(key: &NodeKey, cert_pem: &str, ca_pem: &str) -> Result<PeerIdentity> {
    let cert = cert_der_from_pem("node certificate", cert_pem)?;
    let ca = cert_der_from_pem("CA certificate", ca_pem)?;
    let identity = PeerIdentity::from_cert_der(&cert)?;
    if identity.node_id != key.node_id() {
        return Err(TrustError::WrongNode {
            cert_node: identity.node_id,
            this_node: key.node_id(),
        });
    }
    tls::verify_node_cert(&cert, &ca)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_text_roundtrip() {
        let key = NodeKey::generate().unwrap();
        let id = key.node_id();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s.parse::<NodeId>().unwrap(), id);
        assert!("abc".parse::<NodeId>().is_err());
        assert!(format!("{s}00").parse::<NodeId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
    }

    #[test]
    fn key_pem_roundtrip() {
        let key = NodeKey::generate().unwrap();
        let back = NodeKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(back.node_id(), key.node_id());
        assert!(matches!(
            NodeKey::from_pem("nonsense"),
            Err(TrustError::BadKey { .. })
        ));
        assert!(!format!("{key:?}").contains("PRIVATE"));

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.key");
        key.save(&p).unwrap();
        assert_eq!(NodeKey::load(&p).unwrap().node_id(), key.node_id());
    }

    #[test]
    fn enrol_request_names_the_node() {
        let key = NodeKey::generate().unwrap();
        let pem = enrol_request(&key).unwrap();
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        let cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .unwrap();
        assert_eq!(
            cn,
            &rcgen::DnValue::Utf8String(key.node_id().to_string()),
            "CN is the node id"
        );
    }

    // Issue 11: the fuzz targets' properties (fuzz/fuzz_targets/certificate.rs and
    // enrol_request.rs), in the default test run.
    mod issue11_props {
        use super::*;
        use crate::trust::crl::pem_encode;
        use crate::trust::{read_request, Ca};
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        use rustls_pki_types::CertificateSigningRequestDer;

        use crate::trust::mutation::{mutate, mutation};

        /// Any bytes, and a real certificate with bytes changed: reading never panics, and an
        /// identity read from DER reads the same from its PEM.
        #[test]
        fn issue11_any_and_mutated_certificates_are_read_safely() {
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::init(dir.path().join("ca"), "north").unwrap();
            let key = NodeKey::generate().unwrap();
            let issued = ca
                .issue(&enrol_request(&key).unwrap(), "north/a", Role::Commune, 30)
                .unwrap();
            let der = cert_der_from_pem("test", &issued.cert_pem)
                .unwrap()
                .to_vec();
            let mut runner = TestRunner::new(Config::with_cases(256));
            runner
                .run(&mutation(), |(edits, cut, noise)| {
                    let _ = PeerIdentity::from_cert_der(&noise);
                    let _ = PeerIdentity::from_cert_pem(&String::from_utf8_lossy(&noise));
                    let bytes = mutate(der.clone(), edits, cut);
                    if let Ok(identity) = PeerIdentity::from_cert_der(&bytes) {
                        let pem = pem_encode("CERTIFICATE", &bytes);
                        prop_assert_eq!(PeerIdentity::from_cert_pem(&pem).unwrap(), identity);
                    }
                    Ok(())
                })
                .unwrap();
        }

        /// A request reads back as its key's node; changed bytes are refused, or (when the
        /// change falls outside what is signed) still read as that node, never another.
        #[test]
        fn issue11_any_and_mutated_enrol_requests_are_read_safely() {
            let key = NodeKey::generate().unwrap();
            let request = enrol_request(&key).unwrap();
            assert_eq!(read_request(&request).unwrap().1, key.node_id());
            let der = CertificateSigningRequestDer::from_pem_slice(request.as_bytes())
                .unwrap()
                .to_vec();
            let mut runner = TestRunner::new(Config::with_cases(256));
            runner
                .run(&mutation(), |(edits, cut, noise)| {
                    let _ = read_request(&String::from_utf8_lossy(&noise));
                    let _ = read_request(&pem_encode("CERTIFICATE REQUEST", &noise));
                    let bytes = mutate(der.clone(), edits, cut);
                    if let Ok((_, node)) = read_request(&pem_encode("CERTIFICATE REQUEST", &bytes))
                    {
                        prop_assert_eq!(node, key.node_id());
                    }
                    Ok(())
                })
                .unwrap();
        }
    }
}
