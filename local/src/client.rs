//! A blocking client for the sidecar HTTP API (docs/sidecar-api.md).

use std::time::Duration;

use serde::de::DeserializeOwned;

use faultline::sidecar_api::{ApiError, MigrationStatus, NodeInfo, StartMigration};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the sidecar at {base} answered {status}: {error}")]
    Api {
        base: String,
        status: u16,
        error: String,
    },
    #[error("cannot reach the sidecar at {base}: {source}")]
    Transport {
        base: String,
        #[source]
        source: Box<ureq::Error>,
    },
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

pub struct SidecarClient {
    base: String,
    agent: ureq::Agent,
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
    /// `api` is `host:port` of the sidecar's control API.
    pub fn new(api: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self {
            base: format!("http://{api}"),
            agent,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn decode<T: DeserializeOwned>(
        &self,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let mut resp = resp.map_err(|e| ClientError::Transport {
            base: self.base.clone(),
            source: Box::new(e),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Decode {
                base: self.base.clone(),
                what: e.to_string(),
            })?;
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
        serde_json::from_str(&body).map_err(|e| ClientError::Decode {
            base: self.base.clone(),
            what: format!("{e}: {body}"),
        })
    }

    pub fn ready(&self) -> bool {
        self.agent
            .get(format!("{}/readyz", self.base))
            .call()
            .is_ok_and(|r| r.status().as_u16() == 200)
    }

    pub fn node(&self) -> Result<NodeInfo, ClientError> {
        self.decode(self.agent.get(format!("{}/v1/node", self.base)).call())
    }

    pub fn start(&self, req: &StartMigration) -> Result<MigrationStatus, ClientError> {
        self.decode(
            self.agent
                .post(format!("{}/v1/migrations", self.base))
                .send_json(req),
        )
    }

    pub fn status(&self, id: &str) -> Result<MigrationStatus, ClientError> {
        self.decode(
            self.agent
                .get(format!("{}/v1/migrations/{}", self.base, encode_id(id)))
                .call(),
        )
    }

    pub fn cancel(&self, id: &str) -> Result<MigrationStatus, ClientError> {
        self.decode(
            self.agent
                .post(format!(
                    "{}/v1/migrations/{}/cancel",
                    self.base,
                    encode_id(id)
                ))
                .send_empty(),
        )
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let mut resp = self
            .agent
            .get(format!("{}/metrics", self.base))
            .call()
            .map_err(|e| ClientError::Transport {
                base: self.base.clone(),
                source: Box::new(e),
            })?;
        resp.body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Decode {
                base: self.base.clone(),
                what: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_encoded() {
        assert_eq!(super::encode_id("ns/mig-1.a_b"), "ns%2Fmig-1.a_b");
    }
}
