//! The sidecar's HTTP control API, as data: the request and status types that the sidecar
//! serves and the operator sends (docs/sidecar-api.md). Types only — no HTTP code lives in the
//! core library.
//!
//! Requests (`StartMigration`, `Policy`) refuse unknown fields: a typo must not pass as a
//! default. Answers accept them, so a newer sidecar (one more field) does not break an older
//! operator while a rolling upgrade is under way.

use serde::{Deserialize, Serialize};

use crate::layout::BackingKind;
use crate::trap::{BackendProbe, TrapBackend};

/// Which side of a migration a sidecar plays.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Source,
    Target,
}

/// How memory moves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Iterate until the rest fits the downtime budget, then stop and copy. Fails if it does
    /// not converge within the pass limit.
    PreCopy,
    /// Switch to post-copy after `precopy_passes` passes (0: at once).
    PostCopy,
    /// Pre-copy while it converges, post-copy when it stops converging.
    #[default]
    Hybrid,
}

/// When a hybrid migration leaves pre-copy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchRule {
    /// When the dirty set stops shrinking (see `convergence_ratio`) or fits the downtime
    /// budget, or after `precopy_passes`, whichever comes first.
    #[default]
    Auto,
    /// After exactly `precopy_passes` passes.
    Passes,
}

/// Which trap mechanism to use on the target.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TrapChoice {
    /// The best mechanism the target offers for the VM's backing.
    #[default]
    Auto,
    Userfaultfd,
    KvmUserfault,
}

/// The migration policy. Every field has a default, so `{}` is a valid policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    pub mode: Mode,
    /// Most pre-copy passes (the first pass sends every page; later ones the dirtied pages).
    pub precopy_passes: u32,
    pub switch_rule: SwitchRule,
    /// Hybrid/auto: a pass whose dirty set is more than this fraction of the previous pass's
    /// is "not converging" (0 < r <= 1).
    pub convergence_ratio: f64,
    /// The pause the workload may see at switch-over, in milliseconds.
    pub max_downtime_ms: u64,
    /// Cap on pre-copy and background-push bandwidth in bytes per second (0: none). Fault
    /// replies are never limited.
    pub bandwidth_limit: u64,
    /// The migration fails (before the commit point: the source keeps running) if not done
    /// in this many seconds.
    pub completion_timeout_s: u64,
    pub trap: TrapChoice,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Hybrid,
            precopy_passes: 8,
            switch_rule: SwitchRule::Auto,
            convergence_ratio: 0.7,
            max_downtime_ms: 300,
            bandwidth_limit: 0,
            completion_timeout_s: 600,
            trap: TrapChoice::Auto,
        }
    }
}

/// Largest accepted values, shared with the CRD's validation.
pub const MAX_PRECOPY_PASSES: u32 = 1000;
pub const MAX_DOWNTIME_MS: u64 = 600_000;
pub const MAX_COMPLETION_TIMEOUT_S: u64 = 7 * 24 * 3600;

impl Policy {
    /// Checks ranges and combinations; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.precopy_passes > MAX_PRECOPY_PASSES {
            return Err(format!(
                "precopyPasses must be at most {MAX_PRECOPY_PASSES}"
            ));
        }
        if self.mode == Mode::PreCopy && self.precopy_passes == 0 {
            return Err("pre-copy mode needs at least one pre-copy pass".into());
        }
        if !(self.convergence_ratio > 0.0 && self.convergence_ratio <= 1.0) {
            return Err("convergenceRatio must be in (0, 1]".into());
        }
        if self.max_downtime_ms == 0 || self.max_downtime_ms > MAX_DOWNTIME_MS {
            return Err(format!("maxDowntimeMs must be in 1..={MAX_DOWNTIME_MS}"));
        }
        if self.completion_timeout_s == 0 || self.completion_timeout_s > MAX_COMPLETION_TIMEOUT_S {
            return Err(format!(
                "completionTimeoutS must be in 1..={MAX_COMPLETION_TIMEOUT_S}"
            ));
        }
        Ok(())
    }
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
    pub trap: Option<TrapBackend>,
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
    fn empty_policy_is_the_default() {
        let p: Policy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, Policy::default());
        assert!(p.validate().is_ok());
        let p: Policy =
            serde_json::from_str(r#"{"mode":"post-copy","precopyPasses":0,"trap":"userfaultfd"}"#)
                .unwrap();
        assert_eq!(p.mode, Mode::PostCopy);
        assert!(p.validate().is_ok());
        assert!(serde_json::from_str::<Policy>(r#"{"modes":"x"}"#).is_err());
    }

    #[test]
    fn policy_validation() {
        let bad = [
            Policy {
                mode: Mode::PreCopy,
                precopy_passes: 0,
                ..Default::default()
            },
            Policy {
                convergence_ratio: 0.0,
                ..Default::default()
            },
            Policy {
                max_downtime_ms: 0,
                ..Default::default()
            },
            Policy {
                completion_timeout_s: 0,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }

    #[test]
    fn ids() {
        assert!(validate_id("default/mig-1/3f2a").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a b").is_err());
        assert!(validate_id(&"x".repeat(129)).is_err());
    }
}
