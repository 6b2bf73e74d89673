//! Mutually authenticated TLS 1.3 configs (rustls, ring provider) for quinn endpoints.
//!
//! Both sides present a node certificate and require the peer's to chain to the province CA
//! and not be listed in the node's CRL. Every node certificate carries the DNS name
//! [`SERVER_NAME`], so the stock webpki verifiers apply unchanged; who the peer is comes
//! from its certificate via [`peer_identity`].

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

use super::identity::cert_der_from_pem;
use super::{verify_crl, Crl, NodeKey, PeerIdentity, Result, TrustError};

/// The TLS server name every node certificate carries and every client asks for.
pub const SERVER_NAME: &str = "node.communesync";

/// ALPN protocol id of the sync protocol, version 1.
pub const ALPN: &[u8] = b"communesync/1";

/// What a node needs for TLS: the CA it trusts, its certificate and key, and the newest
/// verified CRL it holds (if any).
#[derive(Debug)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key: NodeKey,
    pub crl: Option<Crl>,
}

impl TlsMaterial {
    /// Checks the certificate is this node's and chains to the CA (see
    /// [`super::install_check`]); returns this node's own identity.
    pub fn check(&self) -> Result<PeerIdentity> {
        super::install_check(&self.key, &self.cert_pem, &self.ca_pem)
    }
}

fn tls_err(e: impl std::fmt::Display) -> TrustError {
    TrustError::Tls {
        reason: e.to_string(),
    }
}

/// Always the ring provider, never the process default, so no other backend can sneak in.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: CertificateDer<'static>) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(|e| TrustError::BadCert {
        what: "CA certificate",
        reason: format!("not usable as a trust anchor ({e})"),
    })?;
    Ok(Arc::new(roots))
}

/// The CA certificate and the CRL list for the verifiers; the CRL is re-checked against
/// the CA here so a bad one fails now, with a clear message, not at every handshake.
fn trust_inputs(
    m: &TlsMaterial,
) -> Result<(
    Arc<RootCertStore>,
    Vec<CertificateRevocationListDer<'static>>,
)> {
    let ca = cert_der_from_pem("CA certificate", &m.ca_pem)?;
    let crls = match &m.crl {
        Some(crl) => {
            verify_crl(&m.ca_pem, crl.der())?;
            vec![CertificateRevocationListDer::from(crl.der().to_vec())]
        }
        None => Vec::new(),
    };
    Ok((roots(ca)?, crls))
}

/// Server side: requires a client certificate that chains to the CA and is not revoked.
///
/// Revocation policy: only the end-entity certificate is checked (the chain is CA -> node),
/// and an unknown revocation status is an error. Our CRL has no issuing distribution point,
/// so it is authoritative for every certificate the CA issues; "unknown" could only mean a
/// CRL from elsewhere, which must fail closed. CRL expiry (nextUpdate) is not enforced:
/// offline nodes may hold an old CRL for a long time.
pub fn server_config(m: &TlsMaterial) -> Result<Arc<rustls::ServerConfig>> {
    let (roots, crls) = trust_inputs(m)?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(tls_err)?;
    let cert = cert_der_from_pem("node certificate", &m.cert_pem)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], m.key.private_key_der())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection verifies a certificate against the current CRL.
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Client side: verifies the server's certificate chains to the CA for [`SERVER_NAME`] and
/// is not revoked (same policy as [`server_config`]); presents our certificate.
pub fn client_config(m: &TlsMaterial) -> Result<Arc<rustls::ClientConfig>> {
    let (roots, crls) = trust_inputs(m)?;
    let mut verifier = WebPkiServerVerifier::builder_with_provider(roots, provider());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(tls_err)?;
    let cert = cert_der_from_pem("node certificate", &m.cert_pem)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(vec![cert], m.key.private_key_der())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// [`server_config`] for quinn, with the caller's transport parameters.
pub fn quinn_server_config(
    m: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server_config(m)?).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// [`client_config`] for quinn, with the caller's transport parameters. Connect with
/// server name [`SERVER_NAME`].
pub fn quinn_client_config(
    m: &TlsMaterial,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_config(m)?).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// Who is on the other end of an established connection, read from the certificate the
/// handshake verified.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity> {
    PeerIdentity::from_cert_der(&peer_cert_der(conn)?)
}

/// The certificate (DER) the peer of an authenticated connection presented.
pub fn peer_cert_der(conn: &quinn::Connection) -> Result<Vec<u8>> {
    let any = conn.peer_identity().ok_or(TrustError::NoPeerIdentity {
        reason: "the peer presented no certificate",
    })?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TrustError::NoPeerIdentity {
            reason: "the connection is not using rustls certificates",
        })?;
    let leaf = certs.first().ok_or(TrustError::NoPeerIdentity {
        reason: "the peer's certificate chain is empty",
    })?;
    Ok(leaf.to_vec())
}

/// Full webpki check that `cert` is a node certificate of `ca`, usable both as a server
/// (for [`SERVER_NAME`]) and as a client.
pub(crate) fn verify_node_cert(cert: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> Result<()> {
    let untrusted = |e: rustls::Error| TrustError::Untrusted {
        reason: e.to_string(),
    };
    let roots = roots(ca.clone().into_owned())?;
    let now = UnixTime::now();
    let name = ServerName::try_from(SERVER_NAME).map_err(tls_err)?;
    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(tls_err)?
        .verify_server_cert(cert, &[], &name, &[], now)
        .map_err(untrusted)?;
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(tls_err)?
        .verify_client_cert(cert, &[], now)
        .map_err(untrusted)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::*;
    use crate::trust::{enrol_request, Ca, Role};

    fn enrol(ca: &Ca, trust_ca_pem: &str, unit: &str, role: Role) -> TlsMaterial {
        let key = NodeKey::generate().unwrap();
        let issued = ca
            .issue(&enrol_request(&key).unwrap(), unit, role, 30)
            .unwrap();
        TlsMaterial {
            ca_pem: trust_ca_pem.to_string(),
            cert_pem: issued.cert_pem,
            key,
            crl: None,
        }
    }

    fn transport() -> Arc<quinn::TransportConfig> {
        Arc::new(quinn::TransportConfig::default())
    }

    fn server(m: &TlsMaterial) -> quinn::Endpoint {
        let cfg = quinn_server_config(m, transport()).unwrap();
        quinn::Endpoint::server(cfg, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap()
    }

    /// One connection attempt: (what the server saw, what the client saw).
    async fn attempt(
        server: &quinn::Endpoint,
        client_cfg: quinn::ClientConfig,
    ) -> (
        std::result::Result<PeerIdentity, String>,
        std::result::Result<PeerIdentity, String>,
    ) {
        let addr = server.local_addr().unwrap();
        let server = server.clone();
        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.ok_or("endpoint closed")?;
            let conn = incoming.await.map_err(|e| e.to_string())?;
            let id = peer_identity(&conn).map_err(|e| e.to_string());
            // Hold the connection until the client is done with it.
            conn.closed().await;
            id
        });
        let client_ep =
            quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let client = async {
            let conn = client_ep
                .connect_with(client_cfg, addr, SERVER_NAME)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let id = peer_identity(&conn).map_err(|e| e.to_string())?;
            // A TLS 1.3 client finishes before the server has checked its certificate;
            // a refusal shows up as the connection closing right after.
            if let Ok(reason) =
                tokio::time::timeout(Duration::from_millis(300), conn.closed()).await
            {
                return Err(reason.to_string());
            }
            conn.close(0u32.into(), b"done");
            Ok(id)
        };
        let client = tokio::time::timeout(Duration::from_secs(5), client)
            .await
            .unwrap_or_else(|_| Err("client timed out".into()));
        let server_seen = tokio::time::timeout(Duration::from_secs(5), accept)
            .await
            .map_err(|_| "server timed out".to_string())
            .and_then(|j| j.map_err(|e| e.to_string()).and_then(|r| r));
        client_ep.wait_idle().await;
        (server_seen, client)
    }

    #[tokio::test]
    async fn mutual_tls_handshakes() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(tmp.path().join("ca"), "north").unwrap();
        let other_ca = Ca::init(tmp.path().join("other"), "north").unwrap();
        let province = enrol(&ca, ca.cert_pem(), "north", Role::Province);
        let commune = enrol(&ca, ca.cert_pem(), "north/riverbend/kalo", Role::Commune);
        let province_id = province.check().unwrap();
        let commune_id = commune.check().unwrap();

        // (a) Two enrolled nodes: each sees the other's identity.
        let ep = server(&province);
        let (s, c) = attempt(&ep, quinn_client_config(&commune, transport()).unwrap()).await;
        assert_eq!(s.unwrap(), commune_id);
        assert_eq!(c.unwrap(), province_id);

        // (b) A client whose certificate is from another CA is refused.
        let foreign = enrol(&other_ca, ca.cert_pem(), "north/x", Role::Commune);
        let (s, c) = attempt(&ep, quinn_client_config(&foreign, transport()).unwrap()).await;
        assert!(s.is_err(), "server accepted a foreign client: {s:?}");
        assert!(c.is_err(), "client thinks it is connected: {c:?}");

        // (c) A client with no certificate is refused.
        let (roots, _) = trust_inputs(&commune).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let mut anon = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        anon.alpn_protocols = vec![ALPN.to_vec()];
        let anon = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(anon).unwrap(),
        ));
        let (s, c) = attempt(&ep, anon).await;
        assert!(s.is_err(), "server accepted an anonymous client: {s:?}");
        assert!(c.is_err());
        ep.close(0u32.into(), b"");

        // (d) A revoked client is refused once the server has the CRL; others still pass.
        let crl = ca.revoke(commune_id.node_id).unwrap();
        let district = enrol(&ca, ca.cert_pem(), "north/riverbend", Role::District);
        let province = TlsMaterial {
            crl: Some(crl.clone()),
            ..province
        };
        let ep = server(&province);
        let (s, c) = attempt(&ep, quinn_client_config(&commune, transport()).unwrap()).await;
        assert!(s.is_err(), "server accepted a revoked client: {s:?}");
        assert!(c.is_err());
        let (s, c) = attempt(&ep, quinn_client_config(&district, transport()).unwrap()).await;
        assert_eq!(s.unwrap().role, Role::District);
        assert_eq!(c.unwrap(), province_id);
        ep.close(0u32.into(), b"");

        // And a client holding the CRL refuses a revoked server.
        let revoked_server = server(&commune);
        let district = TlsMaterial {
            crl: Some(crl),
            ..district
        };
        let (s, c) = attempt(
            &revoked_server,
            quinn_client_config(&district, transport()).unwrap(),
        )
        .await;
        assert!(c.is_err(), "client accepted a revoked server: {c:?}");
        assert!(s.is_err());
        revoked_server.close(0u32.into(), b"");
    }

    #[test]
    fn configs_reject_a_foreign_crl() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(tmp.path().join("ca"), "north").unwrap();
        let other = Ca::init(tmp.path().join("other"), "north").unwrap();
        let mut m = enrol(&ca, ca.cert_pem(), "north/a", Role::Commune);
        assert!(server_config(&m).is_ok() && client_config(&m).is_ok());
        m.crl = Some(other.current_crl().unwrap());
        assert!(matches!(server_config(&m), Err(TrustError::BadCrl { .. })));
        assert!(matches!(client_config(&m), Err(TrustError::BadCrl { .. })));
    }

    #[test]
    fn configs_reject_a_key_that_does_not_match() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::init(tmp.path().join("ca"), "north").unwrap();
        let m = enrol(&ca, ca.cert_pem(), "north/a", Role::Commune);
        let m = TlsMaterial {
            key: NodeKey::generate().unwrap(),
            ..m
        };
        assert!(matches!(server_config(&m), Err(TrustError::Tls { .. })));
        assert!(matches!(m.check(), Err(TrustError::WrongNode { .. })));
    }
}
