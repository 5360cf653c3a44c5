//! TLS 1.3 for Faultline's two network surfaces, on rustls with the ring provider (the one kube
//! uses, so a single crypto provider is compiled into every binary):
//!
//! - [`pki`]: the cluster CA and the certificates it issues (the operator's client certificate,
//!   a namespace's sidecar certificate), and the names they carry;
//! - [`control`]: the sidecar's control API: its server configuration, which asks for a client
//!   certificate, and the authorization of the caller that presented one (only the operator);
//!   and the configuration the operator (or an administrator with its credentials) dials with;
//! - [`pinned`]: the migration stream: each side's identity is derived from the migration's
//!   secret, so a connection is bound to one migration and to nothing else;
//! - [`stream`]: a blocking TLS stream whose reading and writing halves live on different
//!   threads, as the sidecar's engines need; and [`stream::Stream`], TLS or plaintext by policy.
//!
//! It invents no cryptography: key exchange, record protection and signatures are TLS 1.3's.
//! It must not know about HTTP, Kubernetes or migrations' phases.

pub mod control;
pub mod pinned;
pub mod pki;
pub mod stream;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

pub use stream::{Stream, TlsStream};

/// Errors building TLS material or configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0}")]
    Invalid(String),
}

/// The crypto provider every configuration is built with (ring; never the process default,
/// which panics when two providers are compiled in).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only: both ends are ours, so there is no older peer to accept.
pub(crate) const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
