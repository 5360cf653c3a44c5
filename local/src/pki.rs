//! A certificate authority for Faultline on one machine, as the operator keeps one in a
//! cluster: created once per process, it issues the sidecars' server certificate (for the
//! namespace [`NAMESPACE`], and for 127.0.0.1, where local sidecars listen) and the operator's
//! client certificate, which [`crate::SidecarClient`] presents.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use faultline::tls::control::Credentials;
use faultline::tls::pki::{Ca, OPERATOR_NAME, Usage, sidecar_name};

use crate::LocalError;

/// The namespace local sidecars pose as by default.
pub const NAMESPACE: &str = "local";
/// Every namespace local sidecars pose as: [`NAMESPACE`], and `vms`, where the operator's
/// tests (and the examples) put VM pods.
pub const NAMESPACES: [&str; 2] = [NAMESPACE, "vms"];
/// Long enough for any test run.
const VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// The local CA and the two identities it issued.
pub struct LocalPki {
    pub ca: Ca,
    /// The operator's credentials (the CA, its client certificate and key).
    pub operator: Credentials,
    /// A directory with the sidecars' certificate, key and the CA (`--tls-dir`).
    pub sidecar_dir: PathBuf,
}

static PKI: OnceLock<Result<LocalPki, String>> = OnceLock::new();

/// This process's local PKI, created on first use.
pub fn local() -> Result<&'static LocalPki, LocalError> {
    PKI.get_or_init(|| create().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|why| LocalError::Other {
            what: "local PKI".into(),
            why: why.clone(),
        })
}

fn create() -> Result<LocalPki, Box<dyn std::error::Error>> {
    let ca = Ca::generate(VALIDITY)?;
    let operator = ca.issue(OPERATOR_NAME, Usage::Client, VALIDITY)?;
    let names: Vec<String> = NAMESPACES.iter().map(|ns| sidecar_name(ns)).collect();
    let sidecar = ca.issue_server(&names, Some(std::net::Ipv4Addr::LOCALHOST.into()), VALIDITY)?;
    let sidecar_dir = std::env::temp_dir().join(format!(
        "faultline-local-pki-{}/sidecar",
        std::process::id()
    ));
    Credentials {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: sidecar.cert_pem,
        key_pem: sidecar.key_pem,
    }
    .write(&sidecar_dir)?;
    Ok(LocalPki {
        operator: Credentials {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: operator.cert_pem,
            key_pem: operator.key_pem,
        },
        ca,
        sidecar_dir,
    })
}

impl LocalPki {
    /// Where the sidecars' TLS files are.
    pub fn sidecar_dir(&self) -> &Path {
        &self.sidecar_dir
    }
}
