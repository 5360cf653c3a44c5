//! TLS for the sidecar's control API: mutual TLS with the cluster CA ([`super::pki`]).
//!
//! The server asks every client for a certificate but does not require one at the TLS layer,
//! and defers the certificate's chain check to [`Authorizer`]: health, readiness and metrics
//! stay open to any caller, and a caller without the operator's certificate gets an HTTP 401
//! (none) or 403 (the wrong one, a foreign CA, an expired one) it can read, instead of a
//! handshake alert. The client's proof of possession of its key (the TLS 1.3 CertificateVerify
//! signature) is still checked during the handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use super::pki::{self, OPERATOR_NAME};
use super::{TlsError, VERSIONS, provider};

/// File names in a TLS directory: those of a Kubernetes `kubernetes.io/tls` Secret plus the CA.
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const CA_FILE: &str = "ca.crt";

/// Who called the control API, as its client certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// No client certificate.
    Anonymous,
    /// A certificate that is not a valid operator certificate of this cluster, and why.
    Refused(String),
    /// The operator (or an administrator holding its credentials).
    Operator,
}

/// Decides who a caller is from the certificates it presented.
#[derive(Debug, Clone)]
pub struct Authorizer {
    chain: Arc<dyn ClientCertVerifier>,
}

impl Authorizer {
    /// Trusts client certificates issued by the CAs in `ca_pem`.
    pub fn new(ca_pem: &str) -> Result<Self, TlsError> {
        let chain =
            WebPkiClientVerifier::builder_with_provider(Arc::new(pki::roots(ca_pem)?), provider())
                .build()?;
        Ok(Self { chain })
    }

    /// The caller behind `peer` (the connection's peer certificates, end entity first).
    pub fn authorize(&self, peer: Option<&[CertificateDer<'_>]>) -> Caller {
        let Some((end_entity, intermediates)) = peer.and_then(|p| p.split_first()) else {
            return Caller::Anonymous;
        };
        if let Err(e) = self
            .chain
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
        {
            return Caller::Refused(format!("client certificate not accepted: {e}"));
        }
        let named_operator = webpki::EndEntityCert::try_from(end_entity)
            .ok()
            .zip(ServerName::try_from(OPERATOR_NAME).ok())
            .is_some_and(|(ee, name)| ee.verify_is_valid_for_subject_name(&name).is_ok());
        if named_operator {
            Caller::Operator
        } else {
            Caller::Refused(format!(
                "client certificate is not the operator's (not issued to {OPERATOR_NAME})"
            ))
        }
    }
}

/// A control API server's TLS: its configuration and the authorizer for its callers.
#[derive(Debug, Clone)]
pub struct ControlServer {
    pub config: Arc<ServerConfig>,
    pub authorizer: Authorizer,
}

impl ControlServer {
    /// From PEM: the server's certificate chain and key, and the CA its clients must chain to.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, TlsError> {
        let authorizer = Authorizer::new(ca_pem)?;
        let deferred = Arc::new(Deferred {
            inner: authorizer.chain.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)?
            .with_client_cert_verifier(deferred)
            .with_single_cert(
                pki::certs_from_pem("server certificate", cert_pem)?,
                pki::key_from_pem("server key", key_pem)?,
            )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            authorizer,
        })
    }

    /// From a directory holding [`CERT_FILE`], [`KEY_FILE`] and [`CA_FILE`] (a mounted Secret).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let [cert, key, ca] = [CERT_FILE, KEY_FILE, CA_FILE].map(|f| read(dir, f));
        Self::from_pem(&cert?, &key?, &ca?)
    }
}

/// Reads a file of a TLS directory.
pub fn read(dir: &Path, file: &'static str) -> Result<String, TlsError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|source| TlsError::Read {
        what: file,
        path: path.display().to_string(),
        source,
    })
}

/// The configuration a client of the control API dials with: it trusts the CAs in `ca_pem`
/// for the server and presents `cert_pem`/`key_pem` when given (without them it is anonymous,
/// which only health, readiness and metrics accept).
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(pki::roots(ca_pem)?);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            pki::certs_from_pem("client certificate", cert)?,
            pki::key_from_pem("client key", key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS identity with the CA that vouches for its peers: what the operator dials sidecars
/// with, what an administrator exports (`faultline-operator credentials`), and what a sidecar
/// serves (the same three files).
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`] from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca_pem: read(dir, CA_FILE)?,
            cert_pem: read(dir, CERT_FILE)?,
            key_pem: read(dir, KEY_FILE)?,
        })
    }

    /// Writes the three files into `dir` (created if missing); the key readable by its owner
    /// only.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        for (file, text, mode) in [
            (CA_FILE, &self.ca_pem, 0o644),
            (CERT_FILE, &self.cert_pem, 0o644),
            (KEY_FILE, &self.key_pem, 0o600),
        ] {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(dir.join(file))?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
        }
        Ok(())
    }

    /// The configuration to dial a sidecar with, presenting this identity.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        client_config(&self.ca_pem, Some((&self.cert_pem, &self.key_pem)))
    }
}

/// Accepts any client certificate at the handshake (the [`Authorizer`] checks it per request)
/// but verifies the client's signature, so a certificate counts only with its key.
#[derive(Debug)]
struct Deferred {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for Deferred {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::tls::pki::{Ca, Usage, certs_from_pem, sidecar_name};

    #[test]
    fn only_the_operator_certificate_of_this_ca_is_the_operator() {
        let hour = Duration::from_secs(3600);
        let ca = Ca::generate(hour).unwrap();
        let foreign = Ca::generate(hour).unwrap();
        let auth = Authorizer::new(&ca.cert_pem).unwrap();
        let who = |cert_pem: &str| {
            let certs = certs_from_pem("c", cert_pem).unwrap();
            auth.authorize(Some(&certs))
        };
        assert_eq!(auth.authorize(None), Caller::Anonymous);
        assert_eq!(auth.authorize(Some(&[])), Caller::Anonymous);
        let op = ca.issue(OPERATOR_NAME, Usage::Client, hour).unwrap();
        assert_eq!(who(&op.cert_pem), Caller::Operator);
        let sidecar = ca.issue(&sidecar_name("vms"), Usage::Client, hour).unwrap();
        assert!(
            matches!(who(&sidecar.cert_pem), Caller::Refused(w) if w.contains("not the operator's"))
        );
        let alien = foreign.issue(OPERATOR_NAME, Usage::Client, hour).unwrap();
        assert!(matches!(who(&alien.cert_pem), Caller::Refused(w) if w.contains("not accepted")));
        // A server certificate is not a client certificate, whatever its name.
        let server = ca.issue(OPERATOR_NAME, Usage::Server, hour).unwrap();
        assert!(matches!(who(&server.cert_pem), Caller::Refused(_)));
    }
}
