//! Serving the control API over mutual TLS: accept a connection, complete the handshake, name
//! its caller from the client certificate ([`faultline::tls::control::Authorizer`]) and hand
//! every request on it to [`crate::api::router`] with that [`Caller`] attached. Knows no routes
//! and no migrations.
//!
//! The certificate files (a mounted Secret) are read again whenever they change, so a
//! certificate the operator rotates is served from the next connection on, without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::Context;
use axum::Router;
use faultline::sync::lock;
use faultline::tls::control::{self, ControlServer};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// The TLS directory and what was last loaded from it.
pub struct TlsFiles {
    dir: PathBuf,
    loaded: Mutex<(Vec<Option<SystemTime>>, Arc<ControlServer>)>,
}

impl TlsFiles {
    /// Loads the certificate, key and CA from `dir`; the sidecar does not start without them.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let server = ControlServer::load(dir).with_context(|| {
            format!(
                "cannot load the control API's TLS material from {} (the namespace's \
                 faultline-sidecar-tls Secret, see docs/security.md)",
                dir.display()
            )
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            loaded: Mutex::new((stamps(dir), Arc::new(server))),
        })
    }

    /// The current configuration, reloaded if the files changed. A broken update keeps the
    /// last good one (and says so).
    fn current(&self) -> Arc<ControlServer> {
        let now = stamps(&self.dir);
        let mut g = lock(&self.loaded);
        if now != g.0 {
            match ControlServer::load(&self.dir) {
                Ok(server) => {
                    tracing::info!(dir = %self.dir.display(), "reloaded the control API certificate");
                    *g = (now, Arc::new(server));
                }
                Err(e) => tracing::warn!("keeping the previous control API certificate: {e}"),
            }
        }
        g.1.clone()
    }
}

fn stamps(dir: &Path) -> Vec<Option<SystemTime>> {
    [control::CERT_FILE, control::KEY_FILE, control::CA_FILE]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

/// Accepts connections until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<TlsFiles>,
    app: Router,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("control API accept failed: {e}");
                    continue;
                }
            },
        };
        let server = tls.current();
        let app = app.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
            let stream = match acceptor.accept(sock).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "control API TLS handshake failed: {e}");
                    return;
                }
            };
            let caller = server
                .authorizer
                .authorize(stream.get_ref().1.peer_certificates());
            let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(caller.clone());
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "control API connection ended: {e}");
            }
        });
    }
}
