//! The operator's side of Faultline's TLS (docs/security.md): it keeps the cluster CA, proves
//! itself to sidecars with a client certificate it issues itself, hands every VM namespace the
//! sidecars' server certificate, and derives each migration's secret.
//!
//! - The CA and a master key live in the Secret [`CA_SECRET`] of the operator's namespace,
//!   created by the first replica that finds it missing. Deleting it rotates everything: the
//!   next start makes a new CA, and the namespace certificates are reissued from it.
//! - Namespaces labelled [`NAMESPACE_LABEL`]`=enabled` get the Secret [`SIDECAR_SECRET`]
//!   (`tls.crt`, `tls.key`, `ca.crt`), which their VM pods mount; it is renewed well before it
//!   expires and whenever the CA changes.
//! - A migration's secret is HMAC-SHA256(master key, migration uid): nothing to store, nothing
//!   to read back, and so no per-migration Secret and no right to read Secrets in VM
//!   namespaces.
//!
//! It must not decide anything about migrations.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine;
use faultline::tls::control::{self, Credentials};
use faultline::tls::pki::{Ca, Issued, OPERATOR_NAME, Usage, sidecar_name};
use hmac::{KeyInit, Mac};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use rustls::ClientConfig;
use tracing::{info, warn};

/// The Secret in the operator's namespace holding the CA and the master key.
pub const CA_SECRET: &str = "faultline-ca";
/// The Secret in each VM namespace that VM pods mount for their sidecar.
pub const SIDECAR_SECRET: &str = "faultline-sidecar-tls";
/// Namespaces with this label set to `enabled` get [`SIDECAR_SECRET`].
pub const NAMESPACE_LABEL: &str = "faultline.dev/vms";
/// Annotation on [`SIDECAR_SECRET`]: when its certificate expires (Unix seconds).
pub const NOT_AFTER_ANNOTATION: &str = "faultline.dev/not-after";

const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";
const MASTER_KEY: &str = "master.key";

const DAY: Duration = Duration::from_secs(24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SIDECAR_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A namespace certificate with less than this left is reissued (kubelets take up to a
/// minute or so to update mounted Secrets, and sidecars reload on change).
const SIDECAR_RENEW_BEFORE: Duration = Duration::from_secs(90 * 24 * 3600);
const OPERATOR_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
const OPERATOR_RENEW_BEFORE: Duration = Duration::from_secs(15 * 24 * 3600);
/// How often namespaces are checked for their sidecar Secret.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(30);

/// The CA, the master key and the operator's current client identity.
pub struct OperatorPki {
    ca: Ca,
    master: Vec<u8>,
    client: RwLock<(SystemTime, Arc<ClientConfig>)>,
}

impl std::fmt::Debug for OperatorPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorPki").finish_non_exhaustive()
    }
}

impl OperatorPki {
    pub fn new(ca: Ca, master: Vec<u8>) -> anyhow::Result<Self> {
        let client = issue_client(&ca)?;
        Ok(Self {
            ca,
            master,
            client: RwLock::new(client),
        })
    }

    /// The client configuration sidecars accept: renewed when its certificate nears expiry.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let (not_after, config) = match self.client.read() {
            Ok(g) => (g.0, g.1.clone()),
            Err(p) => (p.get_ref().0, p.get_ref().1.clone()),
        };
        if not_after > SystemTime::now() + OPERATOR_RENEW_BEFORE {
            return config;
        }
        match issue_client(&self.ca) {
            Ok(fresh) => {
                let config = fresh.1.clone();
                match self.client.write() {
                    Ok(mut g) => *g = fresh,
                    Err(p) => *p.into_inner() = fresh,
                }
                info!("renewed the operator's client certificate");
                config
            }
            Err(e) => {
                warn!("cannot renew the operator's client certificate: {e:#}");
                config
            }
        }
    }

    /// The secret both sidecars of migration `uid` get (base64), derived, never stored.
    pub fn migration_secret(&self, uid: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.master)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"faultline migration secret v1\0");
        mac.update(uid.as_bytes());
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    /// Credentials for an administrator: the operator's name, valid for `validity`.
    pub fn issue_admin(&self, validity: Duration) -> anyhow::Result<Credentials> {
        let issued = self.ca.issue(OPERATOR_NAME, Usage::Client, validity)?;
        Ok(self.credentials(issued))
    }

    fn credentials(&self, issued: Issued) -> Credentials {
        Credentials {
            ca_pem: self.ca.cert_pem.clone(),
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem,
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }
}

fn issue_client(ca: &Ca) -> anyhow::Result<(SystemTime, Arc<ClientConfig>)> {
    let issued = ca.issue(OPERATOR_NAME, Usage::Client, OPERATOR_VALIDITY)?;
    let config = control::client_config(&ca.cert_pem, Some((&issued.cert_pem, &issued.key_pem)))?;
    Ok((issued.not_after, config))
}

fn data(s: &Secret, key: &str) -> anyhow::Result<Vec<u8>> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .with_context(|| format!("Secret {CA_SECRET} has no `{key}`"))
}

/// Reads the CA Secret in `namespace`, creating it if missing.
pub async fn bootstrap(client: Client, namespace: &str) -> anyhow::Result<OperatorPki> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret = match api
        .get_opt(CA_SECRET)
        .await
        .with_context(|| format!("reading Secret {namespace}/{CA_SECRET}"))?
    {
        Some(s) => s,
        None => {
            let ca = Ca::generate(CA_VALIDITY)?;
            let mut master = vec![0u8; 32];
            getrandom::fill(&mut master).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
            let fresh = Secret {
                metadata: ObjectMeta {
                    name: Some(CA_SECRET.into()),
                    namespace: Some(namespace.into()),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([
                    (
                        CA_CERT_KEY.into(),
                        ByteString(ca.cert_pem.clone().into_bytes()),
                    ),
                    (
                        CA_KEY_KEY.into(),
                        ByteString(ca.key_pem().as_bytes().to_vec()),
                    ),
                    (MASTER_KEY.into(), ByteString(master)),
                ])),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &fresh).await {
                Ok(s) => {
                    info!(namespace, "created the cluster CA (Secret {CA_SECRET})");
                    s
                }
                // Another replica was first: use its CA.
                Err(kube::Error::Api(e)) if e.code == 409 => api
                    .get(CA_SECRET)
                    .await
                    .with_context(|| format!("reading Secret {namespace}/{CA_SECRET}"))?,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("creating Secret {namespace}/{CA_SECRET}"));
                }
            }
        }
    };
    from_secret(&secret, namespace)
}

/// Reads the CA Secret in `namespace` (for `faultline-operator credentials`); never creates it.
pub async fn load(client: Client, namespace: &str) -> anyhow::Result<OperatorPki> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret = api.get(CA_SECRET).await.with_context(|| {
        format!("reading Secret {namespace}/{CA_SECRET} (is Faultline installed in {namespace}, and may you read its Secrets?)")
    })?;
    from_secret(&secret, namespace)
}

fn from_secret(secret: &Secret, namespace: &str) -> anyhow::Result<OperatorPki> {
    let text = |k| -> anyhow::Result<String> {
        String::from_utf8(data(secret, k)?).with_context(|| format!("`{k}` is not text"))
    };
    let ca = Ca::from_pem(&text(CA_CERT_KEY)?, &text(CA_KEY_KEY)?)
        .with_context(|| format!("Secret {namespace}/{CA_SECRET}"))?;
    let master = data(secret, MASTER_KEY)?;
    anyhow::ensure!(
        master.len() >= 32,
        "Secret {CA_SECRET}: `{MASTER_KEY}` is shorter than 32 bytes"
    );
    OperatorPki::new(ca, master)
}

/// Keeps [`SIDECAR_SECRET`] current in every VM namespace (or only in `only`, when the
/// operator watches one namespace), until dropped.
pub async fn sync_namespaces(client: Client, pki: Arc<OperatorPki>, only: Option<String>) {
    loop {
        let namespaces = match &only {
            Some(ns) => Ok(vec![ns.clone()]),
            None => {
                let api: Api<Namespace> = Api::all(client.clone());
                let lp = ListParams::default().labels(&format!("{NAMESPACE_LABEL}=enabled"));
                api.list(&lp).await.map(|l| {
                    l.items
                        .into_iter()
                        .filter_map(|n| n.metadata.name)
                        .collect()
                })
            }
        };
        match namespaces {
            Ok(list) => {
                for ns in list {
                    if let Err(e) = ensure_sidecar_secret(&client, &pki, &ns).await {
                        warn!(namespace = %ns, "cannot provide {SIDECAR_SECRET}: {e:#}");
                    }
                }
            }
            Err(e) => warn!("cannot list VM namespaces: {e}"),
        }
        tokio::time::sleep(SYNC_INTERVAL).await;
    }
}

/// Creates or renews the sidecar certificate Secret of namespace `ns`.
pub async fn ensure_sidecar_secret(
    client: &Client,
    pki: &OperatorPki,
    ns: &str,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let existing = api.get_opt(SIDECAR_SECRET).await?;
    let current = existing.as_ref().is_some_and(|s| {
        let same_ca = s
            .data
            .as_ref()
            .and_then(|d| d.get(control::CA_FILE))
            .is_some_and(|b| b.0 == pki.ca_pem().as_bytes());
        let not_after = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NOT_AFTER_ANNOTATION))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
        same_ca && not_after.is_some_and(|t| t > SystemTime::now() + SIDECAR_RENEW_BEFORE)
    });
    if current {
        return Ok(());
    }
    let issued = pki
        .ca
        .issue(&sidecar_name(ns), Usage::Server, SIDECAR_VALIDITY)?;
    let not_after = issued
        .not_after
        .duration_since(UNIX_EPOCH)
        .unwrap_or(DAY)
        .as_secs();
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(SIDECAR_SECRET.into()),
            namespace: Some(ns.into()),
            annotations: Some(BTreeMap::from([(
                NOT_AFTER_ANNOTATION.into(),
                not_after.to_string(),
            )])),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".into(),
                "faultline-operator".into(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                control::CERT_FILE.into(),
                ByteString(issued.cert_pem.into_bytes()),
            ),
            (
                control::KEY_FILE.into(),
                ByteString(issued.key_pem.into_bytes()),
            ),
            (
                control::CA_FILE.into(),
                ByteString(pki.ca_pem().as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    };
    match existing {
        None => match api.create(&PostParams::default(), &secret).await {
            Ok(_) => info!(
                namespace = ns,
                "issued the sidecar certificate ({SIDECAR_SECRET})"
            ),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        },
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version;
            api.replace(SIDECAR_SECRET, &PostParams::default(), &secret)
                .await?;
            info!(
                namespace = ns,
                "renewed the sidecar certificate ({SIDECAR_SECRET})"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_secrets_are_per_uid_and_valid_for_the_sidecar() {
        let ca = Ca::generate(DAY).unwrap();
        let pki = OperatorPki::new(ca, vec![9; 32]).unwrap();
        let a = pki.migration_secret("uid-a");
        assert_eq!(a, pki.migration_secret("uid-a"));
        assert_ne!(a, pki.migration_secret("uid-b"));
        faultline::wire::Secret::from_base64(&a).unwrap();
        let other = OperatorPki::new(Ca::generate(DAY).unwrap(), vec![8; 32]).unwrap();
        assert_ne!(a, other.migration_secret("uid-a"));
    }
}
