//! Prometheus metrics of the sidecar (names and meanings in docs/sidecar-api.md). Counters are
//! incremented by the engines as work happens, so they stay monotonic across migrations.
//!
//! A leaf: it only holds and encodes the metrics.

use faultline::sidecar_api::Role;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// A role as metrics label it: `source`, `target`.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Target => "target",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

impl RoleLabel {
    pub fn of(role: Role) -> Self {
        Self {
            role: role_name(role).into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub role: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub role: String,
    pub phase: String,
}

pub struct Metrics {
    registry: Registry,
    pub vmm_connected: Gauge,
    pub guest_failures: Gauge,
    pub guest_heartbeats: Gauge,
    pub migrations: Family<ResultLabels, Counter>,
    pub phase: Family<PhaseLabels, Gauge>,
    pub pages: Family<RoleLabel, Counter>,
    pub bytes: Family<RoleLabel, Counter>,
    pub zero_pages: Family<RoleLabel, Counter>,
    pub remaining_pages: Gauge,
    pub faults: Counter,
    pub fault_latency: Histogram,
    pub downtime: Gauge<f64, AtomicU64>,
    /// How long the oldest fault still unanswered has waited (0 when none waits).
    pub oldest_fault_wait: Gauge<f64, AtomicU64>,
    /// Faults unanswered for longer than the wait deadline.
    pub faults_past_deadline: Gauge,
    /// Control requests refused for want of the operator's certificate.
    pub refused_requests: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("faultline_sidecar");
        let vmm_connected = Gauge::default();
        let guest_failures = Gauge::default();
        let guest_heartbeats = Gauge::default();
        let migrations = Family::<ResultLabels, Counter>::default();
        let phase = Family::<PhaseLabels, Gauge>::default();
        let pages = Family::<RoleLabel, Counter>::default();
        let bytes = Family::<RoleLabel, Counter>::default();
        let zero_pages = Family::<RoleLabel, Counter>::default();
        let remaining_pages = Gauge::default();
        let faults = Counter::default();
        // 10 µs .. ~10 s.
        let fault_latency = Histogram::new(exponential_buckets(10e-6, 2.0, 21));
        let downtime = Gauge::<f64, AtomicU64>::default();
        let oldest_fault_wait = Gauge::<f64, AtomicU64>::default();
        let faults_past_deadline = Gauge::default();
        let refused_requests = Counter::default();
        registry.register(
            "refused_requests",
            "Control API requests refused: no client certificate (401) or not the operator's (403)",
            refused_requests.clone(),
        );
        registry.register(
            "vmm_connected",
            "1 while joined to the VMM",
            vmm_connected.clone(),
        );
        registry.register(
            "vm_guest_failures",
            "Verification failures the guest reported to its VMM (VMM protocol status)",
            guest_failures.clone(),
        );
        registry.register(
            "vm_guest_heartbeats",
            "Heartbeats of all the guest's vCPUs, as its VMM reports them",
            guest_heartbeats.clone(),
        );
        registry.register(
            "migrations",
            "Finished migrations by result",
            migrations.clone(),
        );
        registry.register(
            "migration_phase",
            "1 for the current migration's phase",
            phase.clone(),
        );
        registry.register(
            "pages_transferred",
            "Pages sent or received, zero markers included",
            pages.clone(),
        );
        registry.register("bytes_transferred", "Page bytes on the wire", bytes.clone());
        registry.register(
            "zero_pages",
            "Zero-page markers sent or received",
            zero_pages.clone(),
        );
        registry.register(
            "remaining_pages",
            "Pages the target does not hold yet",
            remaining_pages.clone(),
        );
        registry.register(
            "faults",
            "Post-copy faults served (counted on the target, where they happen)",
            faults.clone(),
        );
        registry.register(
            "fault_latency_seconds",
            "Post-copy fault latency: fault read to page installed",
            fault_latency.clone(),
        );
        registry.register(
            "downtime_seconds",
            "Downtime of the last switch-over",
            downtime.clone(),
        );
        registry.register(
            "oldest_fault_wait_seconds",
            "Age of the oldest post-copy fault not yet answered; 0 when none waits. A vCPU (or KVM) waits on it: alert when it grows",
            oldest_fault_wait.clone(),
        );
        registry.register(
            "faults_past_deadline",
            "Post-copy faults unanswered for longer than the wait deadline (10 s): vCPUs are stuck on them",
            faults_past_deadline.clone(),
        );
        Self {
            registry,
            vmm_connected,
            guest_failures,
            guest_heartbeats,
            migrations,
            phase,
            pages,
            bytes,
            zero_pages,
            remaining_pages,
            faults,
            fault_latency,
            downtime,
            oldest_fault_wait,
            faults_past_deadline,
            refused_requests,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
