//! The reconciler: one function of observed state that moves a `VirtualMachineMigration`
//! forward by one or more phases and records everything it learns in `.status`.
//!
//! Rules it keeps:
//! - **Status is the single source of truth.** Every reconciliation starts from the object as
//!   the API server has it now (a GET, not the watch cache) and status writes are replaces
//!   carrying the resourceVersion read, so a stale or second writer gets a conflict instead of
//!   overwriting. A restarted operator carries on from status; nothing lives only in memory
//!   except the admission lock and event de-duplication.
//! - **Idempotent steps.** Creating the target pod tolerates finding it there;
//!   starting a sidecar migration again with the same body is answered 200 by the sidecar.
//! - **A VM never runs in two places.** Before the point of no return (the sidecars'
//!   `committed`) the operator may cancel and delete the target; after it, it never touches
//!   the target and waits for the migration to finish. When it cannot tell which side of that
//!   point a migration is on (the source sidecar cannot be asked), it does nothing destructive.
//!
//! The reconciler must not talk to anything but the Kubernetes API (through `kube::Client`) and
//! the sidecars' HTTP API.

mod admission;
mod admit;
mod calls;
mod connect;
mod drive;
mod finalize;
mod outcome;
mod schedule;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::sidecar_api::{self, MigrationStatus, NodeInfo, Role, StartMigration};
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use thiserror::Error;
use tracing::{info, warn};

use crate::crd::{
    FINALIZER, MigrationMode, Phase, PhaseTransition, VirtualMachineMigration,
    VirtualMachineMigrationStatus, condition,
};
use crate::decide::{
    Evidence, choose_mechanism, map_phase, merge_progress, migration_id, phases_between,
    strip_time, validate_spec,
};
use crate::metrics::Metrics;
use crate::migratable;
use crate::pods::{self, PodState};
use crate::sidecar::{SidecarClient, SidecarError};

/// Tunables; the CLI's flags set them (see `main.rs`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Most migrations past Pending and not finished, cluster-wide (KubeVirt: 5).
    pub max_parallel: usize,
    /// Most such migrations per source node (KubeVirt: 2).
    pub max_parallel_per_node: usize,
    /// How often an active migration's sidecars are polled.
    pub poll_interval: Duration,
    /// How often a queued (Pending) migration re-checks for a free slot.
    pub queue_interval: Duration,
    /// Progress-only status writes are at least this far apart (phase changes go at once).
    pub status_interval: Duration,
    /// An unschedulable target pod fails the migration after this long (KubeVirt: 5 min).
    pub scheduling_timeout: Duration,
    /// A target pod that does not become ready fails the migration after this long.
    pub target_ready_timeout: Duration,
    /// A sidecar or pod that stays unavailable this long fails the migration (before the
    /// point of no return).
    pub unavailable_timeout: Duration,
    /// Deadline of one HTTP request to a sidecar.
    pub sidecar_request_timeout: Duration,
    /// Watch and count migrations only in this namespace (default: all).
    pub namespace: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_parallel: 5,
            max_parallel_per_node: 2,
            poll_interval: Duration::from_secs(2),
            queue_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(2),
            scheduling_timeout: Duration::from_secs(300),
            target_ready_timeout: Duration::from_secs(600),
            unavailable_timeout: Duration::from_secs(120),
            sidecar_request_timeout: Duration::from_secs(10),
            namespace: None,
        }
    }
}

/// The wall clock, replaceable so tests can make time pass.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(Timestamp::now)
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    /// The operator's TLS identity and the migration secrets' master key.
    pub pki: Arc<crate::pki::OperatorPki>,
    /// Serialises admission so two reconciliations never both take the last slot.
    admission: tokio::sync::Mutex<()>,
}

impl Context {
    pub fn new(
        client: Client,
        config: Config,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        clock: Clock,
        pki: Arc<crate::pki::OperatorPki>,
    ) -> Self {
        Self {
            client,
            config,
            recorder,
            metrics,
            clock,
            pki,
            admission: tokio::sync::Mutex::new(()),
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the migration object has no {0}")]
    MissingMetadata(&'static str),
}

/// Requeue after an error (API unavailable, conflict with a concurrent write).
pub fn error_policy(mig: Arc<VirtualMachineMigration>, err: &Error, _ctx: Arc<Context>) -> Action {
    warn!(
        migration = %mig.name_any(),
        namespace = mig.namespace().unwrap_or_default(),
        error = %err,
        "reconcile failed; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}

/// Reconciles one migration. The object is only a name: the current state is read from the
/// API server.
pub async fn reconcile(
    mig: Arc<VirtualMachineMigration>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let name = mig.name_any();
    let namespace = mig.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let r = Reconciler::new(&ctx, &namespace, &name);
    let result = r.run().await;
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&vec![("result", label.to_string())])
        .inc();
    result
}

/// Where a step leaves the reconciliation.
enum Next {
    /// The phase advanced (or status changed in a way the next step needs); keep going with
    /// the object as written.
    Continue(Box<VirtualMachineMigration>),
    /// Nothing more to do now.
    Wait(Action),
}

/// Whether the hand-over can still be stopped.
enum CancelOutcome {
    /// The source will not commit (never started, finished without committing, or accepted
    /// the cancel): the target may go.
    Stopped,
    /// Past the point of no return.
    Committed,
    /// Cannot tell; do nothing destructive.
    Unknown(String),
}

struct Reconciler<'a> {
    ctx: &'a Context,
    ns: &'a str,
    name: &'a str,
    migrations: Api<VirtualMachineMigration>,
    pods: Api<Pod>,
}

impl<'a> Reconciler<'a> {
    fn new(ctx: &'a Context, ns: &'a str, name: &'a str) -> Self {
        Self {
            ctx,
            ns,
            name,
            migrations: Api::namespaced(ctx.client.clone(), ns),
            pods: Api::namespaced(ctx.client.clone(), ns),
        }
    }

    fn now(&self) -> Timestamp {
        (self.ctx.clock)()
    }

    fn cfg(&self) -> &Config {
        &self.ctx.config
    }

    async fn run(&self) -> Result<Action, Error> {
        let Some(mig) = self.migrations.get_opt(self.name).await? else {
            return Ok(Action::await_change());
        };
        if mig.metadata.deletion_timestamp.is_some() {
            return self.finalize(mig).await;
        }
        let mig = self.ensure_finalizer(mig).await?;
        Ok(self.advance(mig).await?.1)
    }

    /// Runs steps until one waits. Returns the last object written and the action.
    async fn advance(
        &self,
        mut mig: VirtualMachineMigration,
    ) -> Result<(VirtualMachineMigration, Action), Error> {
        loop {
            let status = mig.status.clone().unwrap_or_default();
            let next = match status.phase {
                None => self.accept(mig.clone()).await?,
                Some(Phase::Pending) => self.admit(mig.clone()).await?,
                Some(Phase::Scheduling) => self.schedule(mig.clone()).await?,
                Some(Phase::Connecting) if status.mechanism.is_none() => {
                    self.connect(mig.clone()).await?
                }
                Some(Phase::Connecting | Phase::PreCopy | Phase::SwitchOver | Phase::PostCopy) => {
                    self.drive(mig.clone()).await?
                }
                Some(Phase::Succeeded | Phase::Failed | Phase::Cancelled) => {
                    Next::Wait(Action::await_change())
                }
            };
            match next {
                Next::Continue(m) => mig = *m,
                Next::Wait(a) => return Ok((mig, a)),
            }
        }
    }
}

fn mode_str(m: MigrationMode) -> &'static str {
    match m {
        MigrationMode::PreCopy => "PreCopy",
        MigrationMode::PostCopy => "PostCopy",
        MigrationMode::Hybrid => "Hybrid",
    }
}

fn sidecar_phase_str(p: sidecar_api::Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{p:?}"))
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
