//! Trust: the provincial certificate authority, node keys and enrolment, revocation, TLS configs.
//!
//! A node's identity is the hash of its public key ([`NodeId`]); the CA binds that key to a
//! unit and a [`Role`] in an X.509 certificate, and peers learn each other's identity only
//! from certificates that chain to the CA ([`PeerIdentity::from_cert_der`]), never from
//! anything a peer says about itself.

mod ca;
mod crl;
pub mod fsutil;
mod identity;
#[cfg(test)]
mod mutation;
mod sign;
mod tls;
mod tree;

use std::path::PathBuf;

pub use ca::{read_request, Ca, IssuedCert, IssuedRecord};
pub(crate) use crl::pem_encode;
pub use crl::{verify_crl, Crl};
pub use fsutil::{write_file_atomic, write_secret_file};
pub(crate) use identity::cert_der_from_pem;
pub use identity::{enrol_request, install_check, NodeId, NodeKey, PeerIdentity};
pub use sign::{verify_node_cert_der, verify_signed, AuthorKey, ChangeSigner};
pub use tls::{
    client_config, peer_cert_der, peer_identity, quinn_client_config, quinn_server_config,
    server_config, TlsMaterial, ALPN, SERVER_NAME,
};
pub use tree::{verify_tree, SignedTree, SIGNED_TREE_BYTES_MAX};

/// Result type of the trust module.
pub type Result<T, E = TrustError> = std::result::Result<T, E>;

/// Everything that can go wrong in the trust module.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node key: {reason}; pass the PKCS#8 PEM key file this node generated")]
    BadKey { reason: String },
    #[error("{what} failed: {reason}")]
    Crypto { what: &'static str, reason: String },
    #[error("invalid node id {input:?}: expected 32 hex characters")]
    BadNodeId { input: String },
    #[error("unknown role {input:?}: expected commune, district or province")]
    BadRole { input: String },
    #[error("invalid unit path {input:?}: {reason}")]
    BadUnit { input: String, reason: &'static str },
    #[error("certificate request: {reason}; generate a fresh request on the node and resend it")]
    BadRequest { reason: String },
    #[error("{what}: {reason}")]
    BadCert { what: &'static str, reason: String },
    #[error("certificate is for node {cert_node}, this node is {this_node}; install the certificate issued for this node's request")]
    WrongNode {
        cert_node: NodeId,
        this_node: NodeId,
    },
    #[error("certificate is not valid under this CA: {reason}; install the certificate and CA file from the same `communesync ca issue`")]
    Untrusted { reason: String },
    #[error("the signature does not match the signed content: the file was altered or damaged in transit; export it again")]
    BadSignature,
    #[error("unit tree from the province: {reason}")]
    BadTree { reason: String },
    #[error("CRL: {reason}; fetch the current CRL from the province CA")]
    BadCrl { reason: String },
    #[error(
        "CA directory {dir}: already holds a CA; open it instead, or choose an empty directory"
    )]
    CaExists { dir: PathBuf },
    #[error("CA directory {dir}: no CA found; run `communesync ca init` first, or pass the right directory")]
    NoCa { dir: PathBuf },
    #[error("CA state {path}: {reason}; restore the CA directory from its backup")]
    CaState { path: PathBuf, reason: String },
    #[error("no certificate was issued to node {node}; check the node id")]
    UnknownNode { node: NodeId },
    #[error("node {node} is already revoked; distribute the current CRL")]
    AlreadyRevoked { node: NodeId },
    #[error("node {node} was revoked; the node must generate a new key and enrol again")]
    RevokedNode { node: NodeId },
    #[error("validity of {days} days: {reason}")]
    BadValidity { days: u32, reason: String },
    #[error(
        "TLS setup: {reason}; check that the node's certificate, key and CA files belong together"
    )]
    Tls { reason: String },
    #[error(
        "peer identity: {reason}; the peer must present a certificate issued by the province CA"
    )]
    NoPeerIdentity { reason: &'static str },
}

pub use crate::units::Role;

/// Checks a unit path is one the unit tree accepts before it goes into a certificate URI.
pub fn validate_unit(unit: &str) -> Result<()> {
    crate::units::validate_path(unit).map_err(|_| TrustError::BadUnit {
        input: unit.to_string(),
        reason: "use lowercase slugs separated by '/', like qn/binhlieu/tinhhuc",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_validation() {
        assert!(validate_unit("qn/binhlieu/tinhhuc").is_ok());
        assert!(validate_unit("").is_err());
        assert!(validate_unit("a b").is_err());
        assert!(validate_unit("é").is_err());
    }
}
