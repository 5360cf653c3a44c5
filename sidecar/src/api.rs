//! The HTTP control API (docs/sidecar-api.md), on axum. Handlers translate between HTTP and
//! [`crate::lifecycle`] and [`crate::node`]; they hold no migration logic.
//!
//! Health, readiness and metrics are open; everything else answers only the operator
//! ([`Caller::Operator`], decided by [`crate::serve`] from the client certificate): 401
//! without a certificate, 403 with one that is not the operator's. A refused request changes
//! nothing.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use faultline::sidecar_api::{ApiError, NodeInfo, Phase, StartMigration};
use faultline::tls::control::Caller;

use crate::lifecycle::{self, StartError};
use crate::metrics::{PhaseLabels, role_name};
use crate::node::Sidecar;

/// The routes. Every request carries its connection's [`Caller`] as an extension.
pub fn router(sidecar: Arc<Sidecar>) -> Router {
    let operator_only = Router::new()
        .route("/v1/node", get(node))
        .route("/v1/migrations", post(start).get(list))
        .route("/v1/migrations/{*rest}", get(get_one).post(cancel))
        .route_layer(middleware::from_fn_with_state(
            sidecar.clone(),
            require_operator,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(operator_only)
        .with_state(sidecar)
}

async fn require_operator(State(s): State<Arc<Sidecar>>, req: Request, next: Next) -> Response {
    let caller = req.extensions().get::<Caller>().cloned();
    let refused = match caller {
        Some(Caller::Operator) => return next.run(req).await,
        Some(Caller::Refused(why)) => (StatusCode::FORBIDDEN, why),
        Some(Caller::Anonymous) | None => (
            StatusCode::UNAUTHORIZED,
            "a client certificate is required: only the Faultline operator may drive this sidecar"
                .to_string(),
        ),
    };
    tracing::warn!(
        method = %req.method(),
        path = %req.uri().path(),
        status = refused.0.as_u16(),
        "refused a control request: {}",
        refused.1
    );
    s.metrics.refused_requests.inc();
    error(refused.0, refused.1)
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    (status, axum::Json(body)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    json(
        status,
        &ApiError {
            error: message.into(),
        },
    )
}

async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

async fn readyz(State(s): State<Arc<Sidecar>>) -> Response {
    match s.vm() {
        Ok(_) => json(StatusCode::OK, &serde_json::json!({"ready": true})),
        Err(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"ready": false, "reason": reason}),
        ),
    }
}

async fn node(State(s): State<Arc<Sidecar>>) -> Response {
    // Ask the VMM now: a state a second old may say "paused" for a VM that just started.
    let fresh = s.clone();
    let probes = tokio::task::spawn_blocking(move || {
        let _ = fresh.refresh_vm();
        fresh.trap_backends()
    })
    .await
    .unwrap_or_default();
    json(
        StatusCode::OK,
        &NodeInfo {
            sidecar_version: env!("CARGO_PKG_VERSION").into(),
            migration_port: s.migration_port,
            vm: s.vm_info(),
            trap_backends: probes,
        },
    )
}

async fn start(State(s): State<Arc<Sidecar>>, body: Bytes) -> Response {
    let req: StartMigration = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid start request: {e}"),
            );
        }
    };
    let result = tokio::task::spawn_blocking(move || lifecycle::start(&s, req)).await;
    match result {
        Ok(Ok((m, created))) => json(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &m.status_for_caller(),
        ),
        Ok(Err(StartError::BadRequest(e))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(StartError::Conflict(e))) => error(StatusCode::CONFLICT, e),
        Ok(Err(StartError::NotReady(e))) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn list(State(s): State<Arc<Sidecar>>) -> Response {
    let all: Vec<_> = s.all().iter().map(|m| m.status_for_caller()).collect();
    json(StatusCode::OK, &all)
}

/// Splits `{id}` or `{id}/cancel` (ids may contain `/`, percent-encoded or not).
fn split(rest: &str) -> (String, bool) {
    let decoded = percent_decode(rest);
    match decoded.strip_suffix("/cancel") {
        Some(id) => (id.to_string(), true),
        None => (decoded, false),
    }
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn get_one(State(s): State<Arc<Sidecar>>, Path(rest): Path<String>) -> Response {
    let (id, cancel) = split(&rest);
    if cancel {
        return error(StatusCode::METHOD_NOT_ALLOWED, "use POST to cancel");
    }
    match s.find(&id) {
        Some(m) => json(StatusCode::OK, &m.status_for_caller()),
        None => error(StatusCode::NOT_FOUND, format!("no migration `{id}`")),
    }
}

async fn cancel(State(s): State<Arc<Sidecar>>, Path(rest): Path<String>) -> Response {
    let (id, cancel) = split(&rest);
    if !cancel {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST /v1/migrations/{id}/cancel",
        );
    }
    let Some(m) = s.find(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no migration `{id}`"));
    };
    match lifecycle::cancel(&m) {
        Ok(()) => json(StatusCode::ACCEPTED, &m.status_for_caller()),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn metrics(State(s): State<Arc<Sidecar>>) -> Response {
    if let Some(m) = s.current() {
        let current = m.phase();
        for phase in [
            Phase::Waiting,
            Phase::Connecting,
            Phase::PreCopy,
            Phase::SwitchOver,
            Phase::PostCopy,
            Phase::Completed,
            Phase::Failed,
            Phase::Cancelled,
        ] {
            let name = serde_json::to_value(phase)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
            s.metrics
                .phase
                .get_or_create(&PhaseLabels {
                    role: role_name(m.role).into(),
                    phase: name,
                })
                .set(i64::from(phase == current));
        }
        s.metrics.remaining_pages.set(
            m.counters
                .remaining_pages
                .load(std::sync::atomic::Ordering::Relaxed) as i64,
        );
    }
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_slashes() {
        assert_eq!(split("ns/mig/1"), ("ns/mig/1".into(), false));
        assert_eq!(split("ns%2Fmig%2F1/cancel"), ("ns/mig/1".into(), true));
        assert_eq!(split("a%2"), ("a%2".into(), false));
    }
}
