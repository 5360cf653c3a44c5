//! HTTPS client for the sidecar control API (docs/sidecar-api.md), speaking the request and
//! status types of `faultline::sidecar_api`.
//!
//! This module owns how the operator reaches a sidecar: one short HTTP/1.1 connection per
//! request over mutual TLS (the operator's client certificate; the sidecar must present its
//! namespace's certificate, `faultline::tls::pki::sidecar_name`), a deadline on each, and
//! errors that say which sidecar failed and how. It must not
//! decide anything about a migration; the reconciler interprets the answers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use faultline::sidecar_api::{ApiError, MigrationStatus, NodeInfo, StartMigration};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::net::TcpStream;

/// Default port of the sidecar's control API.
pub const DEFAULT_API_PORT: u16 = 9180;
/// Default port the target sidecar accepts migration connections on.
pub const DEFAULT_MIGRATION_PORT: u16 = 9181;

#[derive(Debug, Error)]
pub enum SidecarError {
    /// No connection, or it broke before an answer came (the sidecar may be down or gone).
    #[error("sidecar at {addr} is unreachable: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("sidecar at {addr} did not answer {what} within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        what: String,
        timeout: Duration,
    },
    /// The sidecar answered with an error status; `message` is its `{"error": …}` text.
    #[error("sidecar at {addr} answered {what} with {status}: {message}")]
    Status {
        addr: SocketAddr,
        what: String,
        status: StatusCode,
        message: String,
    },
    #[error("sidecar at {addr} sent an answer to {what} that is not valid: {reason}")]
    Decode {
        addr: SocketAddr,
        what: String,
        reason: String,
    },
}

impl SidecarError {
    /// The HTTP status, if the sidecar answered with one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT)
    }

    /// The sidecar could not be asked at all (as opposed to answering "no").
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }
}

/// The answer to a start request: 201 for a new migration, 200 for a repeated identical one.
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    pub status: MigrationStatus,
    pub created: bool,
}

/// A client for one sidecar's control API.
#[derive(Debug, Clone)]
pub struct SidecarClient {
    addr: SocketAddr,
    timeout: Duration,
    tls: Arc<ClientConfig>,
    /// The sidecars' namespace, whose name their certificate must carry.
    namespace: String,
}

impl SidecarClient {
    /// A client for the sidecar at `addr` in `namespace`, dialling with `tls`.
    pub fn new(
        addr: SocketAddr,
        timeout: Duration,
        tls: Arc<ClientConfig>,
        namespace: &str,
    ) -> Self {
        Self {
            addr,
            timeout,
            tls,
            namespace: namespace.to_string(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /healthz`: the process runs.
    pub async fn healthz(&self) -> Result<(), SidecarError> {
        self.request::<serde_json::Value>(Method::GET, "/healthz", None, "GET /healthz")
            .await
            .map(|_| ())
    }

    /// `GET /readyz`: `Ok(None)` once joined to its VMM, `Ok(Some(reason))` before.
    pub async fn readyz(&self) -> Result<Option<String>, SidecarError> {
        #[derive(serde::Deserialize)]
        struct Ready {
            ready: bool,
            #[serde(default)]
            reason: Option<String>,
        }
        let (status, body) = self
            .send(Method::GET, "/readyz", None, "GET /readyz")
            .await?;
        // 503 carries the reason in a `{"ready":false,…}` body rather than an ApiError.
        if status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE {
            let r: Ready = decode(self.addr, "GET /readyz", &body)?;
            return Ok(if r.ready {
                None
            } else {
                Some(r.reason.unwrap_or_else(|| "not ready".into()))
            });
        }
        Err(self.status_error("GET /readyz", status, &body))
    }

    /// `GET /v1/node`: the VM and the trap backends this node offers.
    pub async fn node(&self) -> Result<NodeInfo, SidecarError> {
        self.request(Method::GET, "/v1/node", None, "GET /v1/node")
            .await
            .map(|(_, v)| v)
    }

    /// `POST /v1/migrations`.
    pub async fn start(&self, req: &StartMigration) -> Result<Started, SidecarError> {
        let body = serde_json::to_vec(req).map_err(|e| SidecarError::Decode {
            addr: self.addr,
            what: "POST /v1/migrations".into(),
            reason: format!("request does not serialize: {e}"),
        })?;
        let (code, status) = self
            .request(
                Method::POST,
                "/v1/migrations",
                Some(body),
                "POST /v1/migrations",
            )
            .await?;
        Ok(Started {
            status,
            created: code == StatusCode::CREATED,
        })
    }

    /// `GET /v1/migrations/{id}`.
    pub async fn migration(&self, id: &str) -> Result<MigrationStatus, SidecarError> {
        let path = format!("/v1/migrations/{}", percent_encode(id));
        let what = format!("GET {path}");
        self.request(Method::GET, &path, None, &what)
            .await
            .map(|(_, v)| v)
    }

    /// `GET /v1/migrations`: the current and finished migrations, newest first.
    pub async fn migrations(&self) -> Result<Vec<MigrationStatus>, SidecarError> {
        self.request(Method::GET, "/v1/migrations", None, "GET /v1/migrations")
            .await
            .map(|(_, v)| v)
    }

    /// `POST /v1/migrations/{id}/cancel`: 202 while cancelling; 409 past the point of no return
    /// or once finished (see [`SidecarError::is_conflict`]).
    pub async fn cancel(&self, id: &str) -> Result<MigrationStatus, SidecarError> {
        let path = format!("/v1/migrations/{}/cancel", percent_encode(id));
        let what = format!("POST {path}");
        self.request(Method::POST, &path, Some(Vec::new()), &what)
            .await
            .map(|(_, v)| v)
    }

    /// `GET /metrics` as text.
    pub async fn metrics(&self) -> Result<String, SidecarError> {
        let (status, body) = self
            .send(Method::GET, "/metrics", None, "GET /metrics")
            .await?;
        if !status.is_success() {
            return Err(self.status_error("GET /metrics", status, &body));
        }
        String::from_utf8(body.to_vec()).map_err(|e| SidecarError::Decode {
            addr: self.addr,
            what: "GET /metrics".into(),
            reason: e.to_string(),
        })
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, T), SidecarError> {
        let (status, bytes) = self.send(method, path, body, what).await?;
        if !status.is_success() {
            return Err(self.status_error(what, status, &bytes));
        }
        Ok((status, decode(self.addr, what, &bytes)?))
    }

    fn status_error(&self, what: &str, status: StatusCode, body: &[u8]) -> SidecarError {
        let message = match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => e.error,
            Err(_) => String::from_utf8_lossy(body).chars().take(512).collect(),
        };
        SidecarError::Status {
            addr: self.addr,
            what: what.into(),
            status,
            message,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &str,
    ) -> Result<(StatusCode, Bytes), SidecarError> {
        match tokio::time::timeout(self.timeout, self.exchange(method, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(SidecarError::Timeout {
                addr: self.addr,
                what: what.into(),
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), SidecarError> {
        let unreachable = |reason: String| SidecarError::Unreachable {
            addr: self.addr,
            reason,
        };
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| unreachable(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let name = ServerName::try_from(faultline::tls::pki::sidecar_name(&self.namespace))
            .map_err(|e| unreachable(format!("namespace `{}`: {e}", self.namespace)))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, stream)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(format!("HTTP handshake: {e}")))?;
        // The connection task ends when the exchange is done or the future is dropped.
        let conn = tokio::spawn(conn);
        let has_body = body.is_some();
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::ACCEPT, "application/json");
        if has_body {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unreachable(format!("building the request: {e}")))?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| unreachable(format!("request: {e}")))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, bytes))
        }
        .await;
        conn.abort();
        result
    }
}

fn decode<T: DeserializeOwned>(
    addr: SocketAddr,
    what: &str,
    body: &[u8],
) -> Result<T, SidecarError> {
    serde_json::from_slice(body).map_err(|e| SidecarError::Decode {
        addr,
        what: what.into(),
        reason: e.to_string(),
    })
}

/// Percent-encodes a path segment: everything except RFC 3986 unreserved characters.
/// Migration ids contain `/`, which must not split the path.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_ids_as_one_segment() {
        assert_eq!(
            percent_encode("default/m-1/ab.c_d"),
            "default%2Fm-1%2Fab.c_d"
        );
        assert_eq!(percent_encode("a b%"), "a%20b%25");
    }

    #[tokio::test]
    async fn unreachable_sidecar_is_reported_as_such() {
        // Bind and drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind a free port");
        let tls = faultline::tls::control::client_config(
            &faultline::tls::pki::Ca::generate(Duration::from_secs(60))
                .expect("CA")
                .cert_pem,
            None,
        )
        .expect("config");
        let c = SidecarClient::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(2),
            tls,
            "ns",
        );
        let e = c.node().await.expect_err("nobody listens");
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains(&port.to_string()), "{e}");
    }
}
