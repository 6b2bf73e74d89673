//! The province certificate authority: issues node certificates and revokes them via CRLs.
//!
//! Directory layout (one CA per directory):
//! - `ca.pem`: the self-signed CA certificate, given to every node.
//! - `ca.key`: its private key (0600).
//! - `registry.json`: every certificate issued, revocations, and the last CRL number.
//! - `crl.pem`: the current CRL.
//! - `issued/<node id>-<serial>.pem`: a copy of each certificate issued.
//!
//! The CA is operated by one person from the CLI; concurrent CA commands on the same
//! directory are not coordinated.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::crl::{spki_alg_id, Crl};
use super::fsutil::{write_file_atomic, write_secret_file};
use super::identity::{cert_der_from_pem, URI_NODE, URI_ROLE, URI_UNIT};
use super::tls::SERVER_NAME;
use super::{validate_unit, NodeId, PeerIdentity, Result, Role, TrustError};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const REGISTRY: &str = "registry.json";
const CRL_FILE: &str = "crl.pem";
const ISSUED_DIR: &str = "issued";

const CA_VALIDITY: Duration = Duration::days(20 * 365 + 5);
/// Remote nodes' clocks drift; backdating keeps a fresh certificate valid on a node whose
/// clock is behind.
const BACKDATE: Duration = Duration::days(1);
/// CRL nextUpdate. Informational only: nodes do not enforce CRL expiry, because an offline
/// commune may go months without a fresh CRL and a stale CRL is better than none.
const CRL_NEXT_UPDATE: Duration = Duration::days(365);

/// A certificate just issued by [`Ca::issue`].
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// The certificate to hand back to the node, together with [`Ca::cert_pem`].
    pub cert_pem: String,
    pub identity: PeerIdentity,
    pub not_after: OffsetDateTime,
}

/// One line of the CA's registry of issued certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedRecord {
    pub node_id: NodeId,
    /// Serial, lowercase hex of the DER integer content bytes.
    pub serial: String,
    pub unit: String,
    pub role: Role,
    /// Unix seconds.
    pub issued_at: i64,
    pub not_after: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Registry {
    format: u32,
    unit: String,
    /// Number of the latest CRL; only ever increases.
    crl_number: u64,
    issued: Vec<IssuedRecord>,
}

/// The province CA, backed by a directory.
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
    cert_pem: String,
    unit: String,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("unit", &self.unit)
            .finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TrustError {
    let path = path.to_path_buf();
    move |source| TrustError::Io { op, path, source }
}

fn crypto_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> TrustError {
    move |e| TrustError::Crypto {
        what,
        reason: e.to_string(),
    }
}

fn random_serial() -> Vec<u8> {
    let mut serial: [u8; 16] = rand::random();
    // Positive with a non-zero top byte, so the DER encoding is exactly these 16 bytes and
    // the serial reads back identically from certificates and CRLs.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial.to_vec()
}

impl Ca {
    /// Creates a new CA for `province_unit` in `dir` (created if missing, mode 0700).
    /// Refuses if `dir` already holds a CA.
    pub fn init(dir: impl AsRef<Path>, province_unit: &str) -> Result<Ca> {
        let dir = dir.as_ref().to_path_buf();
        validate_unit(province_unit)?;
        for name in [CA_CERT, CA_KEY, REGISTRY] {
            if dir.join(name).exists() {
                return Err(TrustError::CaExists { dir });
            }
        }
        create_private_dir(&dir)?;
        create_private_dir(&dir.join(ISSUED_DIR))?;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crypto_err("generating the CA key"))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("communesync CA {province_unit}"),
        );
        params.distinguished_name = dn;
        // Path length 0: the CA signs node certificates only, never sub-CAs.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(crypto_err("self-signing the CA certificate"))?;

        let ca = Ca {
            dir,
            key,
            cert_pem: cert.pem(),
            unit: province_unit.to_string(),
            not_after: params.not_after,
        };
        let registry = Registry {
            format: 1,
            unit: province_unit.to_string(),
            crl_number: 1,
            issued: Vec::new(),
        };
        // Key first: a crash leaves a directory that `init` refuses and `open` reports,
        // never a certificate without its key silently replaced later.
        write_secret_file(ca.path(CA_KEY), ca.key.serialize_pem().as_bytes())?;
        write_file_atomic(ca.path(CA_CERT), ca.cert_pem.as_bytes())?;
        ca.save_registry(&registry)?;
        // Every node can be given a CRL from day one, even before any revocation.
        ca.write_crl(&registry)?;
        Ok(ca)
    }

    /// Opens the CA in `dir`, completing a revocation interrupted by a crash.
    pub fn open(dir: impl AsRef<Path>) -> Result<Ca> {
        let dir = dir.as_ref().to_path_buf();
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| match source.kind() {
                ErrorKind::NotFound => TrustError::NoCa { dir: dir.clone() },
                _ => TrustError::Io {
                    op: "reading",
                    path,
                    source,
                },
            })
        };
        let cert_pem = read(CA_CERT)?;
        let key_pem = read(CA_KEY)?;
        let state = |name: &str, reason: String| TrustError::CaState {
            path: dir.join(name),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| state(CA_KEY, format!("not a PEM private key ({e})")))?;
        let cert_der = cert_der_from_pem("CA certificate", &cert_pem)
            .map_err(|_| state(CA_CERT, "not a PEM certificate".into()))?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|e| state(CA_CERT, format!("not an X.509 certificate ({e})")))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(state(CA_KEY, "does not match the CA certificate".into()));
        }
        let not_after = cert.validity().not_after.to_datetime();

        let mut ca = Ca {
            dir,
            key,
            cert_pem,
            unit: String::new(),
            not_after,
        };
        let registry = ca.load_registry()?;
        ca.unit = registry.unit.clone();
        // `revoke` saves the registry before the CRL; finish the job if it was cut short.
        let crl_ok = match ca.current_crl() {
            Ok(crl) => crl.number() >= registry.crl_number,
            Err(_) => false,
        };
        if !crl_ok {
            ca.write_crl(&registry)?;
        }
        Ok(ca)
    }

    /// The CA certificate (PEM) that every node trusts.
    pub(super) fn key(&self) -> &KeyPair {
        &self.key
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The province unit this CA was created for.
    pub fn unit(&self) -> &str {
        &self.unit
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a node certificate for the key in `request_pem` (from [`super::enrol_request`]).
    ///
    /// Only the request's public key is used: the node id comes from that key, and `unit`
    /// and `role` are the CA operator's decision, whatever the request asked for.
    pub fn issue(
        &self,
        request_pem: &str,
        unit: &str,
        role: Role,
        validity_days: u32,
    ) -> Result<IssuedCert> {
        validate_unit(unit)?;
        if validity_days == 0 {
            return Err(TrustError::BadValidity {
                days: 0,
                reason: "must be at least 1 day".into(),
            });
        }
        let now = OffsetDateTime::now_utc();
        let not_after = now + Duration::days(i64::from(validity_days));
        if not_after > self.not_after {
            return Err(TrustError::BadValidity {
                days: validity_days,
                reason: format!(
                    "would outlive the CA certificate (valid until {}); choose fewer days",
                    self.not_after.date()
                ),
            });
        }

        let (csr, node_id) = read_request(request_pem)?;

        let registry = self.load_registry()?;
        if registry
            .issued
            .iter()
            .any(|r| r.node_id == node_id && r.revoked_at.is_some())
        {
            return Err(TrustError::RevokedNode { node: node_id });
        }

        let serial = random_serial();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id.to_string());
        params.distinguished_name = dn;
        let ia5 = |s: String| {
            s.try_into().map_err(|e: rcgen::Error| TrustError::Crypto {
                what: "encoding a certificate name",
                reason: e.to_string(),
            })
        };
        params.subject_alt_names = vec![
            // Shared by all nodes so stock webpki server-name checks work.
            SanType::DnsName(ia5(SERVER_NAME.to_string())?),
            SanType::URI(ia5(format!("{URI_UNIT}{unit}"))?),
            SanType::URI(ia5(format!("{URI_ROLE}{role}"))?),
            SanType::URI(ia5(format!("{URI_NODE}{node_id}"))?),
        ];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer()?)
            .map_err(crypto_err("signing the node certificate"))?;

        let identity = PeerIdentity::from_cert_der(cert.der())?;
        if identity.node_id != node_id || identity.serial != serial {
            // Would mean rcgen re-encoded the key differently from the request.
            return Err(TrustError::Crypto {
                what: "issuing",
                reason: format!(
                    "certificate reads back as node {} instead of {node_id}",
                    identity.node_id
                ),
            });
        }

        let cert_pem = cert.pem();
        let serial_hex = hex::encode(&serial);
        write_file_atomic(
            self.path(ISSUED_DIR)
                .join(format!("{node_id}-{serial_hex}.pem")),
            cert_pem.as_bytes(),
        )?;
        let mut registry = registry;
        registry.issued.push(IssuedRecord {
            node_id,
            serial: serial_hex,
            unit: unit.to_string(),
            role,
            issued_at: now.unix_timestamp(),
            not_after: not_after.unix_timestamp(),
            revoked_at: None,
        });
        self.save_registry(&registry)?;
        Ok(IssuedCert {
            cert_pem,
            identity,
            not_after,
        })
    }

    /// Revokes every certificate issued to `node` and returns the new CRL (its number is
    /// one more than the previous CRL's). The node can never be issued a certificate again;
    /// it must generate a new key.
    pub fn revoke(&self, node: NodeId) -> Result<Crl> {
        let mut registry = self.load_registry()?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut found = false;
        let mut newly = false;
        for rec in registry.issued.iter_mut().filter(|r| r.node_id == node) {
            found = true;
            if rec.revoked_at.is_none() {
                rec.revoked_at = Some(now);
                newly = true;
            }
        }
        if !found {
            return Err(TrustError::UnknownNode { node });
        }
        if !newly {
            return Err(TrustError::AlreadyRevoked { node });
        }
        registry.crl_number += 1;
        // Registry first: `open` regenerates a missing or older CRL from it.
        self.save_registry(&registry)?;
        self.write_crl(&registry)
    }

    /// The latest CRL this CA has issued.
    pub fn current_crl(&self) -> Result<Crl> {
        let path = self.path(CRL_FILE);
        let pem = fs::read_to_string(&path).map_err(io_err("reading", &path))?;
        Crl::from_pem(&pem).map_err(|e| TrustError::CaState {
            path,
            reason: e.to_string(),
        })
    }

    /// Everything this CA has issued, oldest first.
    pub fn issued(&self) -> Result<Vec<IssuedRecord>> {
        Ok(self.load_registry()?.issued)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|e| TrustError::CaState {
            path: self.path(CA_CERT),
            reason: e.to_string(),
        })
    }

    fn load_registry(&self) -> Result<Registry> {
        let path = self.path(REGISTRY);
        let text = fs::read_to_string(&path).map_err(|source| match source.kind() {
            ErrorKind::NotFound => TrustError::NoCa {
                dir: self.dir.clone(),
            },
            _ => TrustError::Io {
                op: "reading",
                path: path.clone(),
                source,
            },
        })?;
        let registry: Registry = serde_json::from_str(&text).map_err(|e| TrustError::CaState {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if registry.format != 1 {
            return Err(TrustError::CaState {
                path,
                reason: format!("unknown format {}", registry.format),
            });
        }
        Ok(registry)
    }

    fn save_registry(&self, registry: &Registry) -> Result<()> {
        let mut text = serde_json::to_string_pretty(registry).map_err(|e| TrustError::CaState {
            path: self.path(REGISTRY),
            reason: e.to_string(),
        })?;
        text.push('\n');
        write_file_atomic(self.path(REGISTRY), text.as_bytes())
    }

    /// Signs a CRL listing every revoked certificate in `registry` and saves it.
    fn write_crl(&self, registry: &Registry) -> Result<Crl> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::new();
        for rec in &registry.issued {
            let Some(at) = rec.revoked_at else { continue };
            let serial = hex::decode(&rec.serial).map_err(|_| TrustError::CaState {
                path: self.path(REGISTRY),
                reason: format!("bad serial {:?}", rec.serial),
            })?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_NEXT_UPDATE,
            crl_number: SerialNumber::from_slice(&registry.crl_number.to_be_bytes()),
            // No issuing distribution point: the CRL then covers every certificate of this
            // CA, which is what makes webpki treat it as authoritative for all nodes.
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer()?)
            .map_err(crypto_err("signing the CRL"))?;
        let crl = Crl::from_der(crl.der().to_vec())?;
        write_file_atomic(self.path(CRL_FILE), crl.to_pem().as_bytes())?;
        Ok(crl)
    }
}

/// Reads an enrolment request (PEM PKCS#10) as the CA does before issuing: its self-signature
/// must verify (proof the requester holds the key) and the node id it names must be its key's.
pub fn read_request(request_pem: &str) -> Result<(CertificateSigningRequestParams, NodeId)> {
    // rcgen checks the request's self-signature.
    let csr = CertificateSigningRequestParams::from_pem(request_pem).map_err(|e| {
        TrustError::BadRequest {
            reason: match e {
                rcgen::Error::CouldNotParseCertificationRequest => {
                    "not a PEM PKCS#10 request".into()
                }
                rcgen::Error::InvalidCertificationRequestSignature => {
                    "signature does not verify (altered or corrupted)".into()
                }
                other => other.to_string(),
            },
        }
    })?;
    Ok((csr, request_node_id(request_pem)?))
}

/// The node id of the key in a request, checked against the id the request names.
fn request_node_id(request_pem: &str) -> Result<NodeId> {
    let bad = |reason: String| TrustError::BadRequest { reason };
    let der = CertificateSigningRequestDer::from_pem_slice(request_pem.as_bytes())
        .map_err(|_| bad("not a PEM PKCS#10 request".into()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| bad(format!("not a PKCS#10 request ({e})")))?;
    let info = &csr.certification_request_info;
    let spki = info.subject_pki.raw;
    if spki_alg_id(spki) != Some(rustls_pki_types::alg_id::ECDSA_P256.as_ref()) {
        return Err(bad("the key is not ECDSA P-256".into()));
    }
    let node_id = NodeId::from_spki_der(spki);
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| bad("no subject common name".into()))?;
    if cn.parse::<NodeId>().ok() != Some(node_id) {
        return Err(bad(format!(
            "it names node {cn:?} but carries the key of node {node_id}"
        )));
    }
    Ok(node_id)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err("creating", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{enrol_request, install_check, NodeKey};

    fn new_ca(dir: &Path, name: &str) -> Ca {
        Ca::init(dir.join(name), "north").unwrap()
    }

    #[test]
    fn init_open_and_refuse_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = new_ca(tmp.path(), "ca");
        assert!(matches!(
            Ca::init(tmp.path().join("ca"), "north"),
            Err(TrustError::CaExists { .. })
        ));
        let opened = Ca::open(tmp.path().join("ca")).unwrap();
        assert_eq!(opened.cert_pem(), ca.cert_pem());
        assert_eq!(opened.unit(), "north");
        assert_eq!(opened.current_crl().unwrap().number(), 1);
        assert!(matches!(
            Ca::open(tmp.path().join("nothing")),
            Err(TrustError::NoCa { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(tmp.path().join("ca/ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let der = cert_der_from_pem("ca", ca.cert_pem()).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(cert.is_ca());
        assert_eq!(
            cert.subject().iter_common_name().next().unwrap().as_str(),
            Ok("communesync CA north")
        );
    }

    #[test]
    fn issue_roundtrip() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = new_ca(tmp.path(), "ca");
        let key = NodeKey::generate().unwrap();
        let issued = ca
            .issue(
                &enrol_request(&key).unwrap(),
                "north/riverbend",
                Role::District,
                365,
            )
            .unwrap();
        let id = PeerIdentity::from_cert_pem(&issued.cert_pem).unwrap();
        assert_eq!(id, issued.identity);
        assert_eq!(id.node_id, key.node_id());
        assert_eq!(id.unit, "north/riverbend");
        assert_eq!(id.role, Role::District);
        assert_eq!(id.serial.len(), 16);
        assert_eq!(
            install_check(&key, &issued.cert_pem, ca.cert_pem()).unwrap(),
            id
        );

        let records = ca.issued().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].node_id, key.node_id());
        assert_eq!(records[0].serial, hex::encode(&id.serial));
        assert!(tmp
            .path()
            .join(format!(
                "ca/issued/{}-{}.pem",
                id.node_id, records[0].serial
            ))
            .exists());

        // Renewal for the same key works and gets a new serial.
        let again = ca
            .issue(
                &enrol_request(&key).unwrap(),
                "north/riverbend",
                Role::District,
                30,
            )
            .unwrap();
        assert_ne!(again.identity.serial, id.serial);

        // After revocation the key cannot be certified again.
        ca.revoke(key.node_id()).unwrap();
        assert!(matches!(
            ca.issue(&enrol_request(&key).unwrap(), "north/x", Role::Commune, 30),
            Err(TrustError::RevokedNode { .. })
        ));
    }

    #[test]
    fn issue_refuses_bad_requests() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = new_ca(tmp.path(), "ca");
        let key = NodeKey::generate().unwrap();
        let pem = enrol_request(&key).unwrap();

        // Tamper with the signed content (one bit of the subject CN) and re-armour it.
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut der = der.to_vec();
        let cn = key.node_id().to_string();
        let at = der
            .windows(cn.len())
            .position(|w| w == cn.as_bytes())
            .unwrap();
        der[at] ^= 0x01;
        let tampered = crate::trust::crl::pem_encode("CERTIFICATE REQUEST", &der);
        let err = ca
            .issue(&tampered, "north/a", Role::Commune, 30)
            .unwrap_err();
        assert!(matches!(err, TrustError::BadRequest { .. }), "{err}");
        assert!(err.to_string().contains("signature"), "{err}");

        // A validly signed request naming someone else's node id.
        let other = NodeKey::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, other.node_id().to_string());
        params.distinguished_name = dn;
        let lying = params
            .serialize_request(key.key_pair())
            .unwrap()
            .pem()
            .unwrap();
        let err = ca.issue(&lying, "north/a", Role::Commune, 30).unwrap_err();
        assert!(matches!(err, TrustError::BadRequest { .. }), "{err}");

        assert!(matches!(
            ca.issue("garbage", "north/a", Role::Commune, 30),
            Err(TrustError::BadRequest { .. })
        ));
        assert!(matches!(
            ca.issue(&pem, "north a", Role::Commune, 30),
            Err(TrustError::BadUnit { .. })
        ));
        assert!(matches!(
            ca.issue(&pem, "north/a", Role::Commune, 0),
            Err(TrustError::BadValidity { .. })
        ));
        assert!(matches!(
            ca.issue(&pem, "north/a", Role::Commune, 365 * 30),
            Err(TrustError::BadValidity { .. })
        ));
        assert!(ca.issued().unwrap().is_empty());
    }

    #[test]
    fn install_check_refuses_wrong_key_and_wrong_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = new_ca(tmp.path(), "ca");
        let other_ca = new_ca(tmp.path(), "other");
        let key = NodeKey::generate().unwrap();
        let stranger = NodeKey::generate().unwrap();

        let for_stranger = ca
            .issue(
                &enrol_request(&stranger).unwrap(),
                "north/a",
                Role::Commune,
                30,
            )
            .unwrap();
        let err = install_check(&key, &for_stranger.cert_pem, ca.cert_pem()).unwrap_err();
        assert!(matches!(err, TrustError::WrongNode { .. }));
        assert_eq!(
            err.to_string().split(';').next().unwrap(),
            format!(
                "certificate is for node {}, this node is {}",
                stranger.node_id(),
                key.node_id()
            )
        );

        let from_other_ca = other_ca
            .issue(&enrol_request(&key).unwrap(), "north/a", Role::Commune, 30)
            .unwrap();
        assert!(matches!(
            install_check(&key, &from_other_ca.cert_pem, ca.cert_pem()),
            Err(TrustError::Untrusted { .. })
        ));
        assert!(matches!(
            install_check(&key, "not pem", ca.cert_pem()),
            Err(TrustError::BadCert { .. })
        ));
    }

    #[test]
    fn open_repairs_interrupted_revocation() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = new_ca(tmp.path(), "ca");
        let key = NodeKey::generate().unwrap();
        let issued = ca
            .issue(&enrol_request(&key).unwrap(), "north/a", Role::Commune, 30)
            .unwrap();
        let before = ca.current_crl().unwrap();
        // Simulate a crash after the registry was saved but before the CRL was.
        let mut registry = ca.load_registry().unwrap();
        registry.issued[0].revoked_at = Some(OffsetDateTime::now_utc().unix_timestamp());
        registry.crl_number += 1;
        ca.save_registry(&registry).unwrap();
        let reopened = Ca::open(tmp.path().join("ca")).unwrap();
        let crl = reopened.current_crl().unwrap();
        assert_eq!(crl.number(), before.number() + 1);
        assert!(crl.is_revoked(&issued.identity.serial));
    }

    #[test]
    fn peer_identity_rejects_mismatched_claims() {
        // A certificate whose CN and node URI name a different node than its key.
        let tmp = tempfile::tempdir().unwrap();
        let ca = new_ca(tmp.path(), "ca");
        let key = NodeKey::generate().unwrap();
        let liar = NodeKey::generate().unwrap().node_id();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, liar.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(format!("{URI_UNIT}north/a").try_into().unwrap()),
            SanType::URI(format!("{URI_ROLE}commune").try_into().unwrap()),
            SanType::URI(format!("{URI_NODE}{liar}").try_into().unwrap()),
        ];
        let cert = params
            .signed_by(key.key_pair(), &ca.issuer().unwrap())
            .unwrap();
        assert!(matches!(
            PeerIdentity::from_cert_der(cert.der()),
            Err(TrustError::BadCert { .. })
        ));
        // The CA certificate itself is not a node certificate.
        assert!(PeerIdentity::from_cert_pem(ca.cert_pem()).is_err());
    }
}
