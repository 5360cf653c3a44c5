//! How one migration's connections are protected, decided once when it starts: TLS 1.3 with
//! the identities derived from its secret (`faultline::tls::pinned`), or plaintext where the
//! policy says the network is trusted. Every connection of the migration, reconnects included,
//! goes through here, so no path can skip it.

use std::net::TcpStream;
use std::sync::Arc;

use faultline::policy::Transport;
use faultline::sidecar_api::Role;
use faultline::tls::{self, Stream, TlsStream, pinned};
use faultline::wire::Secret;
use rustls::{ClientConfig, ServerConfig};

pub enum Protection {
    Plaintext,
    /// The source dials with this.
    Source(Arc<ClientConfig>),
    /// The target accepts with this.
    Target(Arc<ServerConfig>),
}

impl Protection {
    pub fn new(
        transport: Transport,
        role: Role,
        secret: &Secret,
        id: &str,
    ) -> Result<Self, tls::TlsError> {
        Ok(match (transport, role) {
            (Transport::Plaintext, _) => Self::Plaintext,
            (Transport::Tls, Role::Source) => {
                Self::Source(pinned::source_config(secret.bytes(), id)?)
            }
            (Transport::Tls, Role::Target) => {
                Self::Target(pinned::target_config(secret.bytes(), id)?)
            }
        })
    }

    /// Source: wraps a freshly connected socket (TLS handshake included).
    pub fn dial(&self, sock: TcpStream) -> std::io::Result<Stream> {
        match self {
            Self::Plaintext => Ok(Stream::Plain(sock)),
            Self::Source(config) => {
                let name = pinned::server_name().map_err(std::io::Error::other)?;
                Ok(Stream::Tls(TlsStream::client(sock, config.clone(), name)?))
            }
            Self::Target(_) => Err(std::io::Error::other("a target does not dial")),
        }
    }

    /// Target: wraps an accepted socket (TLS handshake included).
    pub fn accept(&self, sock: TcpStream) -> std::io::Result<Stream> {
        match self {
            Self::Plaintext => Ok(Stream::Plain(sock)),
            Self::Target(config) => Ok(Stream::Tls(TlsStream::server(sock, config.clone())?)),
            Self::Source(_) => Err(std::io::Error::other("a source does not accept")),
        }
    }
}
