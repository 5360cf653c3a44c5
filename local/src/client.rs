//! A blocking client for the sidecar's control API (docs/sidecar-api.md), over mutual TLS as
//! the operator speaks it: one HTTP/1.1 request per connection (`Connection: close`).
//!
//! By default it presents the local operator certificate ([`crate::pki`]) and expects the
//! local sidecars' certificate; [`SidecarClient::with_tls`] takes other credentials (a real
//! cluster's, or none, for tests of what a stranger gets).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde::de::DeserializeOwned;

use faultline::sidecar_api::{ApiError, MigrationStatus, NodeInfo, StartMigration};
use faultline::tls::pki::sidecar_name;

/// How long one request may take, connection and handshake included.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer accepted.
const MAX_RESPONSE: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the sidecar at {base} answered {status}: {error}")]
    Api {
        base: String,
        status: u16,
        error: String,
    },
    #[error("cannot reach the sidecar at {base}: {why}")]
    Transport { base: String, why: String },
    #[error("the sidecar at {base} sent an unreadable answer: {what}")]
    Decode { base: String, what: String },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What a client dials with: its TLS configuration (trust, and the certificate it presents if
/// any) and the name the sidecar's certificate must carry.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl ClientTls {
    /// `config`, expecting the sidecars of `namespace`.
    pub fn for_namespace(config: Arc<ClientConfig>, namespace: &str) -> Result<Self, String> {
        let server_name =
            ServerName::try_from(sidecar_name(namespace)).map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            server_name,
        })
    }

    /// The local operator's (see [`crate::pki`]).
    pub fn local_operator() -> Result<Self, String> {
        let pki = crate::pki::local().map_err(|e| e.to_string())?;
        let config = pki.operator.client_config().map_err(|e| e.to_string())?;
        Self::for_namespace(config, crate::pki::NAMESPACE)
    }
}

pub struct SidecarClient {
    api: String,
    base: String,
    tls: Result<ClientTls, String>,
}

/// Percent-encodes a migration id for the URL path.
fn encode_id(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl SidecarClient {
    /// `api` is `host:port` of a local sidecar's control API; the client is the local operator.
    pub fn new(api: &str) -> Self {
        Self::build(api, ClientTls::local_operator())
    }

    /// A client with other credentials.
    pub fn with_tls(api: &str, tls: ClientTls) -> Self {
        Self::build(api, Ok(tls))
    }

    fn build(api: &str, tls: Result<ClientTls, String>) -> Self {
        Self {
            api: api.to_string(),
            base: format!("https://{api}"),
            tls,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn transport(&self, why: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            base: self.base.clone(),
            why: why.to_string(),
        }
    }

    /// One request; the answer's status and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, String), ClientError> {
        let tls = self.tls.as_ref().map_err(|e| self.transport(e))?;
        let addr = self
            .api
            .to_socket_addrs()
            .map_err(|e| self.transport(e))?
            .next()
            .ok_or_else(|| self.transport("the address resolves to nothing"))?;
        let sock = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| self.transport(e))?;
        sock.set_read_timeout(Some(TIMEOUT))
            .and_then(|()| sock.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| self.transport(e))?;
        let conn = ClientConnection::new(tls.config.clone(), tls.server_name.clone())
            .map_err(|e| self.transport(e))?;
        let mut stream = StreamOwned::new(conn, sock);
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.api,
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .and_then(|()| stream.flush())
            .map_err(|e| self.transport(format!("TLS or HTTP failed: {e}")))?;
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&chunk[..n]),
                // A server may close without close_notify once the answer is complete.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {
                    break;
                }
                Err(e) => return Err(self.transport(format!("TLS or HTTP failed: {e}"))),
            }
            if raw.len() > MAX_RESPONSE {
                return Err(self.decode("answer too large"));
            }
        }
        parse_response(&raw).map_err(|what| self.decode(what))
    }

    fn decode(&self, what: impl Into<String>) -> ClientError {
        ClientError::Decode {
            base: self.base.clone(),
            what: what.into(),
        }
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ClientError> {
        let (status, body) = self.request(method, path, body)?;
        if status >= 400 {
            let error = serde_json::from_str::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or(body);
            return Err(ClientError::Api {
                base: self.base.clone(),
                status,
                error,
            });
        }
        serde_json::from_str(&body).map_err(|e| self.decode(format!("{e}: {body}")))
    }

    pub fn ready(&self) -> bool {
        self.request("GET", "/readyz", None)
            .is_ok_and(|(status, _)| status == 200)
    }

    pub fn node(&self) -> Result<NodeInfo, ClientError> {
        self.call("GET", "/v1/node", None)
    }

    pub fn start(&self, req: &StartMigration) -> Result<MigrationStatus, ClientError> {
        let body = serde_json::to_vec(req).map_err(|e| self.decode(e.to_string()))?;
        self.call("POST", "/v1/migrations", Some(&body))
    }

    pub fn status(&self, id: &str) -> Result<MigrationStatus, ClientError> {
        self.call("GET", &format!("/v1/migrations/{}", encode_id(id)), None)
    }

    pub fn list(&self) -> Result<Vec<MigrationStatus>, ClientError> {
        self.call("GET", "/v1/migrations", None)
    }

    pub fn cancel(&self, id: &str) -> Result<MigrationStatus, ClientError> {
        self.call(
            "POST",
            &format!("/v1/migrations/{}/cancel", encode_id(id)),
            None,
        )
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let (status, body) = self.request("GET", "/metrics", None)?;
        if status != 200 {
            return Err(ClientError::Api {
                base: self.base.clone(),
                status,
                error: body,
            });
        }
        Ok(body)
    }
}

/// Status and body of an HTTP/1.1 answer (content-length, chunked, or to the end).
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp
        .parse(raw)
        .map_err(|e| format!("bad HTTP answer: {e}"))?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Err("the answer ended inside its headers".into()),
    };
    let status = resp.code.ok_or("the answer has no status")?;
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &raw[head_len..];
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        rest.get(..len)
            .ok_or("the answer is shorter than its content-length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    String::from_utf8(body)
        .map(|b| (status, b))
        .map_err(|_| "the answer is not UTF-8".into())
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunk has no size line")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("a chunk is cut short")?);
        rest = rest.get(size + 2..).ok_or("a chunk is cut short")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded() {
        assert_eq!(super::encode_id("ns/mig-1.a_b"), "ns%2Fmig-1.a_b");
    }

    #[test]
    fn answers_parse_by_length_chunks_or_end() {
        let by_len = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(by_len).unwrap(), (201, "{}".into()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "abcde".into()));
        assert_eq!(
            parse_response(b"HTTP/1.1 401 Unauthorized\r\n\r\nno").unwrap(),
            (401, "no".into())
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"junk").is_err());
    }
}
