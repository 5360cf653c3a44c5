//! The sidecar's HTTP control API, as data: the request and status types that the sidecar
//! serves and the operator sends (docs/sidecar-api.md). Types only — no HTTP code lives in the
//! core library.
//!
//! Requests (`StartMigration`, `Policy`) refuse unknown fields: a typo must not pass as a
//! default. Answers accept them, so a newer sidecar (one more field) does not break an older
//! operator while a rolling upgrade is under way.

use serde::{Deserialize, Serialize};

use crate::layout::BackingKind;
pub use crate::policy::{
    MAX_COMPLETION_TIMEOUT_S, MAX_DOWNTIME_MS, MAX_PRECOPY_PASSES, Mode, Policy, SwitchRule,
    Transport,
};
use crate::trap::{Backend, BackendProbe};

/// Which side of a migration a sidecar plays.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Source,
    Target,
}

/// `POST /v1/migrations`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StartMigration {
    /// Names the migration on both sides; 1 to 128 characters of `[A-Za-z0-9._/-]`.
    pub id: String,
    pub role: Role,
    /// Source only: the target sidecar's migration address (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The per-migration shared secret, base64 (standard alphabet), at least 32 bytes once
    /// decoded. It proves each side to the other and never crosses the wire.
    pub secret: String,
    #[serde(default)]
    pub policy: Policy,
}

/// Where a migration is, from one sidecar's point of view.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Target: listening for the source.
    Waiting,
    /// Authenticating the peer and comparing layouts.
    Connecting,
    PreCopy,
    /// The source VM is paused; state and the final pages are moving.
    SwitchOver,
    /// The target runs; missing pages are fetched on fault and pushed in the background.
    PostCopy,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
pub struct LatencySummary {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(default, rename_all = "camelCase")]
pub struct Progress {
    pub total_pages: u64,
    /// Pages sent (source) or received (target), zero-page markers included.
    pub transferred_pages: u64,
    /// Bytes on the wire in both directions' page streams.
    pub transferred_bytes: u64,
    pub zero_pages: u64,
    /// Pages the target does not hold yet.
    pub remaining_pages: u64,
    pub precopy_rounds: u32,
    pub dirty_rate_pages_per_sec: f64,
    pub bandwidth_bytes_per_sec: f64,
    /// Post-copy faults served.
    pub faults: u64,
    /// Fault latency in microseconds (target side: fault read to page installed).
    pub fault_latency_us: LatencySummary,
    /// Source paused to target running, once known (reported by the source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Times the post-copy link broke and was re-established.
    pub reconnects: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub id: String,
    pub role: Role,
    pub phase: Phase,
    pub mode: Mode,
    /// The trap mechanism in use (target) or agreed (source), once chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trap: Option<Backend>,
    /// How the migration stream is protected (the policy's `transport`).
    #[serde(default)]
    pub transport: Transport,
    /// The point of no return has passed: the source is fenced and will never run again.
    pub committed: bool,
    /// After a failure past the commit point: the VM is gone.
    #[serde(default)]
    pub vm_lost: bool,
    pub progress: Progress,
    /// Seconds since the sidecar accepted the migration.
    pub elapsed_s: f64,
    /// What is happening, for people.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The VM a sidecar is attached to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    pub vm_id: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub backing: BackingKind,
    pub incoming: bool,
    pub state: crate::vmm_protocol::messages::VmState,
    /// What the guest reported, from the VMM's `status`: absent while the VMM does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestHealth>,
}

/// The guest's own account of itself, as its VMM reports it (VMM protocol `status`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GuestHealth {
    /// Heartbeats of all vCPUs together, those before a migration included: rising while the
    /// guest runs.
    pub heartbeats: u64,
    /// Verification failures the guest reported in this VMM process (0 for a sound VM).
    pub failures: u64,
    /// Milliseconds the vCPUs have been allowed to run in this VMM process.
    pub run_ms: u64,
    /// The last value each vCPU wrote to its status port (memtouch: full verification sweeps
    /// completed, kept in guest memory, so they carry across a migration).
    pub status_words: Vec<u32>,
}

impl From<&crate::vmm_protocol::messages::VmStatus> for GuestHealth {
    fn from(s: &crate::vmm_protocol::messages::VmStatus) -> Self {
        Self {
            heartbeats: s.heartbeats.iter().sum(),
            failures: s.failures,
            run_ms: s.run_ms,
            status_words: s.vcpu_status.iter().map(|v| v.status_word).collect(),
        }
    }
}

/// `GET /v1/node`: what this sidecar and its node can do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub sidecar_version: String,
    /// The TCP port the sidecar accepts migration connections on.
    pub migration_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    pub trap_backends: Vec<BackendProbe>,
}

/// The body of every 4xx/5xx answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]

pub struct ApiError {
    pub error: String,
}

/// Checks a migration id: 1 to 128 characters of `[A-Za-z0-9._/-]`.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err("id must be 1 to 128 characters".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
    {
        return Err(format!(
            "id contains `{c}`; allowed are A-Z a-z 0-9 . _ / -"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("default/mig-1/3f2a").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a b").is_err());
        assert!(validate_id(&"x".repeat(129)).is_err());
    }
}
