//! The operator's Prometheus metrics (prefix `faultline_operator_`) and the small HTTP server
//! that exposes them with liveness and readiness probes.
//!
//! This module owns metric names and their meaning; it must not read cluster state itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations by result (`ok`, `error`).
    pub reconciles: Family<Labels, Counter>,
    pub reconcile_seconds: Histogram,
    /// Phases entered.
    pub phase_transitions: Family<Labels, Counter>,
    /// Finished migrations by result (`succeeded`, `failed`, `cancelled`).
    pub migrations_finished: Family<Labels, Counter>,
    /// Downtime of succeeded migrations, as the sidecars measured it.
    pub downtime_seconds: Histogram,
    /// Admission to success.
    pub migration_seconds: Histogram,
    /// Migrations held in Pending by a concurrency limit, as last counted.
    pub queued: Gauge,
    /// 1 while this replica holds the leader lease and acts.
    pub leader: Gauge,
    /// Requests to sidecars by operation and result (`ok`, `error`, `unreachable`).
    pub sidecar_requests: Family<Labels, Counter>,
    /// Post-copy migrations that stalled (moved nothing for their progress timeout).
    pub stalls: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("faultline_operator");
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciliations by result",
            reconciles.clone(),
        );
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 4.0, 9));
        registry.register(
            "reconcile_seconds",
            "Time one reconciliation took",
            reconcile_seconds.clone(),
        );
        let phase_transitions = Family::<Labels, Counter>::default();
        registry.register(
            "phase_transitions",
            "Migration phases entered",
            phase_transitions.clone(),
        );
        let stalls = Counter::default();
        registry.register(
            "migration_stalls",
            "Post-copy migrations that moved nothing for their progress timeout",
            stalls.clone(),
        );
        let migrations_finished = Family::<Labels, Counter>::default();
        registry.register(
            "migrations_finished",
            "Finished migrations by result",
            migrations_finished.clone(),
        );
        let downtime_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "migration_downtime_seconds",
            "Switch-over downtime of succeeded migrations",
            downtime_seconds.clone(),
        );
        let migration_seconds = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        registry.register(
            "migration_duration_seconds",
            "Admission to success of succeeded migrations",
            migration_seconds.clone(),
        );
        let queued = Gauge::default();
        registry.register(
            "migrations_queued",
            "Migrations waiting in Pending for a concurrency slot",
            queued.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let sidecar_requests = Family::<Labels, Counter>::default();
        registry.register(
            "sidecar_requests",
            "Requests to sidecars by operation and result",
            sidecar_requests.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_seconds,
            phase_transitions,
            migrations_finished,
            stalls,
            downtime_seconds,
            migration_seconds,
            queued,
            leader,
            sidecar_requests,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn sidecar_request(&self, op: &'static str, result: &'static str) {
        self.sidecar_requests
            .get_or_create(&vec![
                ("op", op.to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }
}

/// Liveness and readiness as the probes see them.
#[derive(Default)]
pub struct Health {
    /// Set once the controller runs (or is waiting for the lease, which is healthy too).
    pub ready: AtomicBool,
}

struct ServerState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> anyhow::Result<()> {
    let state = Arc::new(ServerState { metrics, health });
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr}"))?;
    axum::serve(listener, app)
        .await
        .context("serving the metrics endpoint")
}

async fn metrics_handler(State(s): State<Arc<ServerState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn ready_handler(State(s): State<Arc<ServerState>>) -> impl IntoResponse {
    if s.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.phase_transitions
            .get_or_create(&vec![("phase", "Scheduling".to_string())])
            .inc();
        m.sidecar_request("start", "ok");
        m.downtime_seconds.observe(0.004);
        let text = m.render();
        assert!(
            text.contains("faultline_operator_phase_transitions_total{phase=\"Scheduling\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "faultline_operator_sidecar_requests_total{op=\"start\",result=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("faultline_operator_migration_downtime_seconds_count 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_and_probes_over_http() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let metrics = Arc::new(Metrics::new());
        metrics.leader.set(1);
        let health = Arc::new(Health::default());
        let server = tokio::spawn(serve(addr, metrics, health.clone()));

        let get = |path: &'static str| async move {
            for _ in 0..50 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let req =
                        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                    s.write_all(req.as_bytes()).await.expect("write");
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.expect("read");
                    return out;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("metrics server did not start");
        };
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        health.ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get("/metrics").await;
        assert!(m.contains("faultline_operator_leader 1"), "{m}");
        server.abort();
    }
}
