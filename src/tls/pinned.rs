//! TLS for the migration stream, bound to one migration.
//!
//! Both sidecars of a migration receive its secret from the operator (over the mutually
//! authenticated control API). From it each derives two Ed25519 identities, one per role, each
//! a key and a self-signed certificate built deterministically (fixed serial and validity;
//! Ed25519 signatures are deterministic). The source presents the source identity and accepts
//! only the exact target certificate; the target the reverse. So a peer without this
//! migration's secret cannot complete the handshake, credentials of another migration derive
//! other certificates, and every connection's keys are TLS 1.3 ephemeral ones: a recorded
//! handshake cannot be replayed.
//!
//! Nothing here is a new construction: the secret only seeds standard Ed25519 keys
//! (HMAC-SHA256 as the derivation function, label per role), and TLS 1.3 does the rest.

use std::sync::Arc;

use hmac::{KeyInit, Mac};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ED25519, SerialNumber};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName as TlsDn,
    ServerConfig, SignatureScheme,
};
use subtle::ConstantTimeEq;

use super::{TlsError, VERSIONS, provider};

/// The name a source puts in its ClientHello (checked by nothing: the certificate is pinned).
pub const SERVER_NAME: &str = "migration.faultline.internal";

/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Which end of the migration stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Dials (the TLS client).
    Source,
    /// Listens (the TLS server).
    Target,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Source => b"faultline migration tls v1: source",
            Self::Target => b"faultline migration tls v1: target",
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Source => Self::Target,
            Self::Target => Self::Source,
        }
    }
}

/// One side's identity for one migration.
struct Identity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn derive(secret: &[u8], migration_id: &str, side: Side) -> Result<Identity, TlsError> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
        .map_err(|e| TlsError::Invalid(format!("migration secret: {e}")))?;
    mac.update(side.label());
    mac.update(&[0]);
    mac.update(migration_id.as_bytes());
    let seed = mac.finalize().into_bytes();
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        match side {
            Side::Source => "faultline migration source",
            Side::Target => "faultline migration target",
        },
    );
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(&[1]));
    let cert = params.self_signed(&key)?;
    Ok(Identity {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(der),
    })
}

/// The source's configuration for migration `migration_id` with `secret`.
pub fn source_config(secret: &[u8], migration_id: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let me = derive(secret, migration_id, Side::Source)?;
    let peer = derive(secret, migration_id, Side::Source.other())?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(peer.cert)))
        .with_client_auth_cert(vec![me.cert], me.key)?;
    Ok(Arc::new(config))
}

/// The target's configuration for migration `migration_id` with `secret`.
pub fn target_config(secret: &[u8], migration_id: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let me = derive(secret, migration_id, Side::Target)?;
    let peer = derive(secret, migration_id, Side::Target.other())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_client_cert_verifier(Arc::new(Pinned::new(peer.cert)))
        .with_single_cert(vec![me.cert], me.key)?;
    // No resumption: every connection, reconnects included, does a full handshake.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The name the source dials with.
pub fn server_name() -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(SERVER_NAME.to_string()).map_err(|e| TlsError::Invalid(e.to_string()))
}

/// Accepts exactly one certificate, and the handshake signature made with its key.
#[derive(Debug)]
struct Pinned {
    expected: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn new(expected: CertificateDer<'static>) -> Self {
        Self {
            expected,
            provider: provider(),
        }
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let same: bool = end_entity.as_ref().ct_eq(self.expected.as_ref()).into();
        if same && intermediates.is_empty() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls12_refused() -> rustls::Error {
    rustls::Error::General("only TLS 1.3 is accepted".into())
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[TlsDn] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_deterministic_and_differ_by_secret_id_and_side() {
        let a = derive(&[7; 32], "m1", Side::Source).unwrap();
        assert_eq!(a.cert, derive(&[7; 32], "m1", Side::Source).unwrap().cert);
        for other in [
            derive(&[7; 32], "m1", Side::Target),
            derive(&[8; 32], "m1", Side::Source),
            derive(&[7; 32], "m2", Side::Source),
        ] {
            assert_ne!(a.cert, other.unwrap().cert);
        }
        assert_eq!(server_name().unwrap().to_str(), SERVER_NAME);
    }

    /// Runs a TLS 1.3 handshake in memory; `Err` carries the side that refused and why.
    fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Result<(), String> {
        let mut c = rustls::ClientConnection::new(client, server_name().unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
                s.process_new_packets()
                    .map_err(|e| format!("target: {e}"))?;
            }
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
                c.process_new_packets()
                    .map_err(|e| format!("source: {e}"))?;
            }
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("no progress".into())
    }

    /// The pinning works in both directions: only the two identities of one migration
    /// complete a handshake; another migration's full credentials (its id and its secret)
    /// are refused whichever end presents them (in TLS 1.3 the source sees the target's
    /// certificate first, so it is usually the source that ends the handshake).
    #[test]
    fn only_one_migrations_own_identities_complete_a_handshake() {
        let (ours, theirs) = ([1; 32], [2; 32]);
        handshake(
            source_config(&ours, "m1").unwrap(),
            target_config(&ours, "m1").unwrap(),
        )
        .expect("the migration's own identities");
        let e = handshake(
            source_config(&theirs, "m2").unwrap(),
            target_config(&ours, "m1").unwrap(),
        )
        .expect_err("another migration's source");
        assert!(e.contains("invalid peer certificate"), "{e}");
        let e = handshake(
            source_config(&ours, "m1").unwrap(),
            target_config(&theirs, "m2").unwrap(),
        )
        .expect_err("another migration's target");
        assert!(e.contains("invalid peer certificate"), "{e}");
        let e = handshake(
            source_config(&ours, "m2").unwrap(),
            target_config(&ours, "m1").unwrap(),
        )
        .expect_err("the same secret under another migration id");
        assert!(e.contains("invalid peer certificate"), "{e}");
    }
}
