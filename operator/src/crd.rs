//! The `VirtualMachineMigration` API (group `faultline.dev`, version `v1alpha1`): spec, status
//! and the schema rules the API server enforces. `crds/virtualmachinemigrations.yaml` is
//! generated from these types (`faultline-operator crd`) and never edited by hand.
//!
//! This module owns the API's shape and its server-side validation (OpenAPI ranges and CEL
//! rules, which mirror `faultline::policy::Policy::validate` and its `MAX_*` limits). It
//! must not talk to the API server or to sidecars.

use std::collections::BTreeMap;

use faultline::sidecar_api::{self, MAX_COMPLETION_TIMEOUT_S, MAX_DOWNTIME_MS, MAX_PRECOPY_PASSES};
use faultline::trap::Preference;
use k8s_openapi::api::core::v1::Affinity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "faultline.dev";
/// The finalizer the operator puts on every migration so a deletion can cancel it first.
pub const FINALIZER: &str = "faultline.dev/migration";

/// Moves a running VM pod to another node, live.
///
/// Deleting a migration before its point of no return cancels it (the source keeps running);
/// after that point the deletion waits until the migration has finished.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "faultline.dev",
    version = "v1alpha1",
    kind = "VirtualMachineMigration",
    plural = "virtualmachinemigrations",
    singular = "virtualmachinemigration",
    shortname = "vmmig",
    category = "faultline",
    namespaced,
    status = "VirtualMachineMigrationStatus",
    derive = "PartialEq",
    doc = "Live migration of a Faultline VM pod to another node",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".status.mode"),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "share of guest memory the target holds, in percent"
    ),
    printcolumn(
        name = "Downtime",
        type_ = "string",
        json_path = ".status.progress.downtime",
        description = "how long the VM was paused at switch-over"
    ),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source.pod", priority = 1),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetPod", priority = 1),
    printcolumn(name = "Mechanism", type_ = "string", json_path = ".status.mechanism", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec == oldSelf.spec"
    )
    .message("spec is immutable once the migration has started (phase beyond Pending); delete the migration and create a new one")
)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationSpec {
    /// The VM pod to move. It must run a Faultline sidecar beside its VMM.
    pub source: MigrationSource,
    /// Where the target pod may go. By default anywhere the source pod could go except the
    /// source's node.
    #[serde(default)]
    pub target: TargetPlacement,
    /// How memory moves.
    #[serde(default)]
    pub policy: MigrationPolicy,
    /// Keep the (fenced, stopped) source pod after a successful migration instead of deleting
    /// it, e.g. to inspect it. Its VM never runs again either way.
    #[serde(default)]
    pub keep_source: bool,
}

/// The pod whose VM is migrated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSource {
    /// Name of the VM pod, in the migration's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub pod: String,
}

/// Placement of the target pod. The target pod starts from the source pod's spec; these fields
/// narrow where it may run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetPlacement {
    /// Labels the target node must carry, in addition to the source pod's own nodeSelector.
    /// A key the source pod already selects with a different value is an error.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub node_selector: BTreeMap<String, String>,
    /// Replaces the source pod's affinity for the target pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Require a node other than the source's (a required node anti-affinity on the source
    /// node's name, as KubeVirt does). Turn off only to migrate within one node.
    #[serde(default = "yes")]
    pub avoid_source_node: bool,
}

fn yes() -> bool {
    true
}

impl Default for TargetPlacement {
    fn default() -> Self {
        Self {
            node_selector: BTreeMap::new(),
            affinity: None,
            avoid_source_node: true,
        }
    }
}

/// How memory moves: mirrors `faultline::sidecar_api::Policy` in Kubernetes naming
/// (PascalCase enum values). Every field has a default.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(default, rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.mode) && self.mode == 'PreCopy' && has(self.precopyPasses) && self.precopyPasses == 0)",
        "message": "mode PreCopy needs at least one pre-copy pass (precopyPasses >= 1)"
    }
]))]
pub struct MigrationPolicy {
    /// `PreCopy`: iterate until the rest fits `maxDowntimeMs`, then stop and copy; fail if it
    /// does not converge within `precopyPasses`. `PostCopy`: switch to post-copy after
    /// `precopyPasses` passes (0: at once). `Hybrid`: pre-copy while it converges, then
    /// post-copy; if the target offers no post-copy mechanism, pre-copy only.
    pub mode: MigrationMode,
    /// Most pre-copy passes (the first sends every page, later ones the dirtied pages).
    #[schemars(range(max = 1000))]
    pub precopy_passes: u32,
    /// `Auto`: leave pre-copy when the rest fits the downtime budget, when a pass stops
    /// converging (see `convergenceRatio`) or after `precopyPasses`. `Passes`: after exactly
    /// `precopyPasses` passes.
    pub switch_rule: SwitchRule,
    /// A pass whose dirty set is more than this fraction of the previous pass's is "not
    /// converging". In (0, 1].
    #[schemars(range(min = 0.0, max = 1.0), extend("exclusiveMinimum" = true))]
    pub convergence_ratio: f64,
    /// The pause the workload may see at switch-over, in milliseconds.
    #[schemars(range(min = 1, max = 600_000))]
    pub max_downtime_ms: u64,
    /// Cap on pre-copy and background-push bandwidth in bytes per second (0: none). Replies to
    /// post-copy faults are never limited.
    pub bandwidth_limit: u64,
    /// Fail if not done in this many seconds per GiB of guest memory (KubeVirt's
    /// completionTimeoutPerGiB; 150 gives a 64 GiB VM 2 h 40 min). Before the point of no
    /// return the source keeps running; after it the migration can only complete.
    #[schemars(range(min = 1, max = 86_400))]
    #[serde(rename = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: u64,
    /// A fixed completion timeout in seconds, instead of one per GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604_800))]
    pub completion_timeout_s: Option<u64>,
    /// No byte moved for this many seconds: before the point of no return the migration fails
    /// (the source runs on); after it the migration is marked `Stalled` (condition, event,
    /// metric) until bytes move again, because it can only complete.
    #[schemars(range(min = 10, max = 86_400))]
    pub progress_timeout_s: u64,
    /// The post-copy trap mechanism on the target: `Auto` picks the best one the target node
    /// offers for the VM's memory backing.
    #[serde(with = "trap_preference")]
    #[schemars(schema_with = "trap_preference::schema")]
    pub trap: Preference,
    /// How guest memory crosses the network between the nodes. `TLS` (the default): TLS 1.3,
    /// both sidecars authenticated by keys that exist only for this migration. `Plaintext`:
    /// unencrypted, for a network you trust; say so here explicitly to get it.
    pub transport: MigrationTransport,
}

// The schema's literal bounds above must equal the core library's limits; a test checks the
// generated CRD against these constants too.
const _: () = assert!(MAX_PRECOPY_PASSES == 1000);
const _: () = assert!(MAX_DOWNTIME_MS == 600_000);
const _: () = assert!(MAX_COMPLETION_TIMEOUT_S == 604_800);

/// Seconds of completion timeout per GiB of guest memory, by default (KubeVirt's default).
pub const DEFAULT_COMPLETION_TIMEOUT_PER_GIB: u64 = 150;
/// Seconds without progress that make a migration stall, by default (KubeVirt's default).
pub const DEFAULT_PROGRESS_TIMEOUT_S: u64 = 150;
const GIB: u64 = 1 << 30;

impl Default for MigrationPolicy {
    fn default() -> Self {
        Self::from_sidecar(&sidecar_api::Policy::default())
    }
}

impl MigrationPolicy {
    /// The completion timeout for a VM of `memory_bytes`: the fixed one if given, else per
    /// GiB (at least one GiB), within the sidecar's limit.
    pub fn completion_timeout(&self, memory_bytes: u64) -> u64 {
        self.completion_timeout_s.unwrap_or_else(|| {
            let gib = memory_bytes.div_ceil(GIB).max(1);
            self.completion_timeout_per_gib
                .saturating_mul(gib)
                .min(MAX_COMPLETION_TIMEOUT_S)
        })
    }

    /// The same policy in the sidecar's terms, for a VM of `memory_bytes`.
    pub fn to_sidecar(&self, memory_bytes: u64) -> sidecar_api::Policy {
        sidecar_api::Policy {
            mode: self.mode.into(),
            precopy_passes: self.precopy_passes,
            switch_rule: match self.switch_rule {
                SwitchRule::Auto => sidecar_api::SwitchRule::Auto,
                SwitchRule::Passes => sidecar_api::SwitchRule::Passes,
            },
            convergence_ratio: self.convergence_ratio,
            max_downtime_ms: self.max_downtime_ms,
            bandwidth_limit: self.bandwidth_limit,
            completion_timeout_s: self.completion_timeout(memory_bytes),
            trap: self.trap,
            transport: self.transport.into(),
        }
    }

    /// The sidecar's policy in Kubernetes terms, with the operator's own timeouts at their
    /// defaults (the completion timeout per GiB rather than the sidecar's fixed one).
    fn from_sidecar(p: &sidecar_api::Policy) -> Self {
        Self {
            mode: p.mode.into(),
            precopy_passes: p.precopy_passes,
            switch_rule: match p.switch_rule {
                sidecar_api::SwitchRule::Auto => SwitchRule::Auto,
                sidecar_api::SwitchRule::Passes => SwitchRule::Passes,
            },
            convergence_ratio: p.convergence_ratio,
            max_downtime_ms: p.max_downtime_ms,
            bandwidth_limit: p.bandwidth_limit,
            completion_timeout_per_gib: DEFAULT_COMPLETION_TIMEOUT_PER_GIB,
            completion_timeout_s: None,
            progress_timeout_s: DEFAULT_PROGRESS_TIMEOUT_S,
            trap: p.trap,
            transport: p.transport.into(),
        }
    }

    /// The same checks the sidecar makes, and the operator's own, so a bad policy fails
    /// before anything moves (the API server's schema rejects these already; this guards
    /// objects written around it).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=86_400).contains(&self.completion_timeout_per_gib) {
            return Err("completionTimeoutPerGiB must be 1 to 86400 seconds".into());
        }
        if !(10..=86_400).contains(&self.progress_timeout_s) {
            return Err("progressTimeoutS must be 10 to 86400 seconds".into());
        }
        let mut p = self.to_sidecar(GIB);
        if let Some(t) = self.completion_timeout_s {
            p.completion_timeout_s = t;
        }
        p.validate()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum MigrationMode {
    PreCopy,
    PostCopy,
    #[default]
    Hybrid,
}

impl From<MigrationMode> for sidecar_api::Mode {
    fn from(m: MigrationMode) -> Self {
        match m {
            MigrationMode::PreCopy => Self::PreCopy,
            MigrationMode::PostCopy => Self::PostCopy,
            MigrationMode::Hybrid => Self::Hybrid,
        }
    }
}

impl From<sidecar_api::Mode> for MigrationMode {
    fn from(m: sidecar_api::Mode) -> Self {
        match m {
            sidecar_api::Mode::PreCopy => Self::PreCopy,
            sidecar_api::Mode::PostCopy => Self::PostCopy,
            sidecar_api::Mode::Hybrid => Self::Hybrid,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum MigrationTransport {
    #[default]
    #[serde(rename = "TLS")]
    Tls,
    Plaintext,
}

impl From<MigrationTransport> for sidecar_api::Transport {
    fn from(t: MigrationTransport) -> Self {
        match t {
            MigrationTransport::Tls => Self::Tls,
            MigrationTransport::Plaintext => Self::Plaintext,
        }
    }
}

impl From<sidecar_api::Transport> for MigrationTransport {
    fn from(t: sidecar_api::Transport) -> Self {
        match t {
            sidecar_api::Transport::Tls => Self::Tls,
            sidecar_api::Transport::Plaintext => Self::Plaintext,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum SwitchRule {
    #[default]
    Auto,
    Passes,
}

/// The core library's trap preference (`faultline::trap::Preference`) in Kubernetes naming:
/// `Auto`, `Userfaultfd`, `KvmUserfault` (the sidecar API spells the same values `auto`,
/// `userfaultfd`, `kvm-userfault`). Only the spelling lives here; the meaning is the core's.
mod trap_preference {
    use faultline::trap::{Backend, Preference};
    use serde::{Deserialize, Deserializer, Serializer};

    const NAMES: [(Preference, &str); 3] = [
        (Preference::Auto, "Auto"),
        (Preference::Only(Backend::Userfaultfd), "Userfaultfd"),
        (Preference::Only(Backend::KvmUserfault), "KvmUserfault"),
    ];

    fn name(p: Preference) -> &'static str {
        NAMES
            .iter()
            .find(|(q, _)| *q == p)
            .map_or("Auto", |(_, n)| n)
    }

    pub fn serialize<S: Serializer>(p: &Preference, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name(*p))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Preference, D::Error> {
        let s = String::deserialize(d)?;
        NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(p, _)| *p)
            .ok_or_else(|| {
                serde::de::Error::unknown_variant(&s, &["Auto", "Userfaultfd", "KvmUserfault"])
            })
    }

    pub fn schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let names: Vec<&str> = NAMES.iter().map(|(_, n)| *n).collect();
        schemars::json_schema!({"type": "string", "enum": names})
    }
}

/// Where a migration is. `Pending → Scheduling → Connecting → PreCopy → SwitchOver →
/// PostCopy → Succeeded`, or `Failed` / `Cancelled`. A pre-copy-only migration skips
/// `PostCopy`; a post-copy one with no pre-copy passes skips `PreCopy`.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum Phase {
    /// Accepted, waiting for admission (concurrency limits, source readiness).
    Pending,
    /// The target pod is being created and scheduled.
    Scheduling,
    /// Both sidecars are being started and authenticate each other.
    Connecting,
    PreCopy,
    /// The source VM is paused; its state and last pages move.
    SwitchOver,
    /// The VM runs on the target; missing pages are fetched on fault.
    PostCopy,
    Succeeded,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Holds a concurrency slot: admitted and not finished.
    pub fn is_active(self) -> bool {
        !self.is_terminal() && self != Self::Pending
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Scheduling => "Scheduling",
            Self::Connecting => "Connecting",
            Self::PreCopy => "PreCopy",
            Self::SwitchOver => "SwitchOver",
            Self::PostCopy => "PostCopy",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the operator knows about a migration. The operator keeps all its state here, so a
/// restarted operator carries on from it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// What is happening, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Admitted`, `TargetReady`, `Committed` (the point of no return has passed),
    /// `Succeeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The id both sidecars know this migration by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// The mode in effect: the requested one, or `PreCopy` when a `Hybrid` migration's target
    /// offers no post-copy mechanism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigrationMode>,
    /// The post-copy trap mechanism chosen on the target (`userfaultfd`, `kvm-userfault`), or
    /// `none` for a pre-copy-only migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    /// How guest memory crosses the network: `TLS 1.3` or `plaintext`, as the sidecars report it
    /// (until they do, as they were asked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Why that mechanism: what the target node's probe said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mechanism_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod_uid: Option<String>,
    /// The source sidecar's control address (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sidecar: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    /// The target sidecar's control address (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_sidecar: Option<String>,
    /// Where the source sends memory: the target's migration listener (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    /// The point of no return has passed: the source VM is fenced and will never run again.
    #[serde(default)]
    pub committed: bool,
    /// The migration failed after the point of no return and the VM is gone.
    #[serde(default)]
    pub vm_lost: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<MigrationProgress>,
    /// When the migration was admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the operator first saw the point of no return passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<Time>,
    /// When the migration reached Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// When each phase was entered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transitions: Vec<PhaseTransition>,
    /// Since when something the migration needs (a sidecar, the source pod) has been
    /// unavailable; the migration fails once this lasts too long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Time>,
    /// Deletion was requested after the point of no return; the migration finishes first.
    #[serde(default)]
    pub deletion_deferred: bool,
    /// When the migration last moved a byte (progress timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_progress_time: Option<Time>,
    /// No byte has moved for the progress timeout, after the point of no return.
    #[serde(default)]
    pub stalled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    pub phase: Phase,
    pub time: Time,
}

/// Progress as the sidecars report it (source for what was sent, target for what it holds
/// and for faults).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationProgress {
    /// Share of guest pages the target holds, 0–100.
    pub percent: u32,
    pub total_pages: u64,
    pub transferred_pages: u64,
    pub transferred_bytes: u64,
    pub zero_pages: u64,
    pub remaining_pages: u64,
    pub precopy_rounds: u32,
    pub dirty_rate_pages_per_sec: f64,
    pub bandwidth_bytes_per_sec: f64,
    /// Post-copy faults served.
    pub faults: u64,
    /// Fault latency percentiles in microseconds (fault read to page installed).
    pub fault_latency_p50_us: u64,
    pub fault_latency_p99_us: u64,
    pub fault_latency_max_us: u64,
    /// Source paused to target running, in milliseconds, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// `downtimeMs` for people (e.g. `4.2ms`), shown by `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<String>,
    /// When the operator last copied these numbers from the sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
}

impl VirtualMachineMigration {
    pub fn phase(&self) -> Option<Phase> {
        self.status.as_ref().and_then(|s| s.phase)
    }
}

/// Condition types.
pub mod condition {
    /// Whether the VM pod can be migrated at all (checked before anything moves).
    pub const MIGRATABLE: &str = "Migratable";
    pub const ADMITTED: &str = "Admitted";
    pub const TARGET_READY: &str = "TargetReady";
    pub const COMMITTED: &str = "Committed";
    /// True while post-copy has moved nothing for the progress timeout.
    pub const STALLED: &str = "Stalled";
    pub const SUCCEEDED: &str = "Succeeded";
}

/// The CRD as YAML, as committed in `crds/`.
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt;
    let yaml = serde_saphyr::to_string(&VirtualMachineMigration::crd())?;
    Ok(format!(
        "# Generated by `cargo run -p faultline-operator -- crd`; do not edit.\n{yaml}"
    ))
}
