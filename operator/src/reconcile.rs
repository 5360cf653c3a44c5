//! The reconciler: one function of observed state that moves a `VirtualMachineMigration`
//! forward by one or more phases and records everything it learns in `.status`.
//!
//! Rules it keeps:
//! - **Status is the single source of truth.** Every reconciliation starts from the object as
//!   the API server has it now (a GET, not the watch cache) and status writes are replaces
//!   carrying the resourceVersion read, so a stale or second writer gets a conflict instead of
//!   overwriting. A restarted operator carries on from status; nothing lives only in memory
//!   except the admission lock and event de-duplication.
//! - **Idempotent steps.** Creating the Secret or the target pod tolerates finding them there;
//!   starting a sidecar migration again with the same body is answered 200 by the sidecar.
//! - **A VM never runs in two places.** Before the point of no return (the sidecars'
//!   `committed`) the operator may cancel and delete the target; after it, it never touches
//!   the target and waits for the migration to finish. When it cannot tell which side of that
//!   point a migration is on (the source sidecar cannot be asked), it does nothing destructive.
//!
//! The reconciler must not talk to anything but the Kubernetes API (through `kube::Client`) and
//! the sidecars' HTTP API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::sidecar_api::{self, MigrationStatus, NodeInfo, Role, StartMigration};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
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
use crate::pods::{self, PodState};
use crate::sidecar::{SidecarClient, SidecarError};

/// Key of the per-migration Secret's data holding the base64 token given to both sidecars.
pub const SECRET_KEY: &str = "key";

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
    ) -> Self {
        Self {
            client,
            config,
            recorder,
            metrics,
            clock,
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
    secrets: Api<Secret>,
}

impl<'a> Reconciler<'a> {
    fn new(ctx: &'a Context, ns: &'a str, name: &'a str) -> Self {
        Self {
            ctx,
            ns,
            name,
            migrations: Api::namespaced(ctx.client.clone(), ns),
            pods: Api::namespaced(ctx.client.clone(), ns),
            secrets: Api::namespaced(ctx.client.clone(), ns),
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

    // ----- finalizer -------------------------------------------------------------------

    async fn ensure_finalizer(
        &self,
        mig: VirtualMachineMigration,
    ) -> Result<VirtualMachineMigration, Error> {
        if mig.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(mig);
        }
        let mut finalizers = mig.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        self.patch_finalizers(&mig, finalizers).await
    }

    async fn patch_finalizers(
        &self,
        mig: &VirtualMachineMigration,
        finalizers: Vec<String>,
    ) -> Result<VirtualMachineMigration, Error> {
        let patch = json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": mig.resource_version(),
        }});
        Ok(self
            .migrations
            .patch(self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?)
    }

    /// Deletion: cancel before the point of no return, wait for completion after it, then
    /// let the object go.
    async fn finalize(&self, mut mig: VirtualMachineMigration) -> Result<Action, Error> {
        if !mig.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let status = mig.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(Phase::Pending);
        let mut action = Action::await_change();
        if phase.is_active() {
            // Before the point of no return (always so while Scheduling) deletion cancels.
            if !status.deletion_deferred && !status.committed {
                match self
                    .abort(
                        mig,
                        Phase::Cancelled,
                        "cancelled: the migration was deleted".into(),
                    )
                    .await?
                {
                    Next::Continue(m) => mig = *m,
                    Next::Wait(a) => return Ok(a),
                }
            }
            if mig.phase().is_some_and(|p| !p.is_terminal()) {
                let mut s = mig.status.clone().unwrap_or_default();
                if !s.deletion_deferred {
                    s.deletion_deferred = true;
                    s.message = Some(
                        "deletion requested after the point of no return: the migration finishes first, then the object goes"
                            .into(),
                    );
                    mig = self.write_status(&mig, s).await?;
                    self.event(&mig, EventType::Normal, "DeletionDeferred",
                        "deleted after the point of no return; waiting for the migration to complete").await;
                }
                let (m, a) = self.advance(mig).await?;
                mig = m;
                action = a;
            }
        }
        if mig
            .phase()
            .is_none_or(|p| p.is_terminal() || p == Phase::Pending)
        {
            let finalizers = mig
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            self.patch_finalizers(&mig, finalizers).await?;
            info!(
                migration = self.name,
                namespace = self.ns,
                "finalizer removed"
            );
            return Ok(Action::await_change());
        }
        Ok(action)
    }

    // ----- phases ------------------------------------------------------------------------

    /// A new object: validate the spec and queue it.
    async fn accept(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let uid = mig.uid().ok_or(Error::MissingMetadata("uid"))?;
        let mut s = mig.status.clone().unwrap_or_default();
        s.migration_id = Some(migration_id(self.ns, self.name, &uid));
        s.mode = Some(mig.spec.policy.mode);
        if let Err(e) = validate_spec(&mig) {
            return self
                .finish(mig, s, Phase::Failed, format!("invalid spec: {e}"))
                .await
                .map(|m| Next::Continue(Box::new(m)));
        }
        self.enter(&mut s, Phase::Pending);
        s.message = Some("waiting for admission".into());
        let mig = self.write_status(&mig, s).await?;
        self.phase_event(&mig, Phase::Pending, "accepted; waiting for admission")
            .await;
        Ok(Next::Continue(Box::new(mig)))
    }

    /// Pending: admit when the source is ready and a concurrency slot is free.
    async fn admit(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let src_name = mig.spec.source.pod.clone();
        let Some(source) = self.pods.get_opt(&src_name).await? else {
            return self
                .fail_plain(mig, format!("source pod {src_name} not found"))
                .await;
        };
        match pods::pod_state(&source) {
            PodState::Ready => {}
            PodState::Finished(why) | PodState::Unschedulable(why) => {
                return self
                    .fail_plain(mig, format!("source pod {src_name} is not running: {why}"))
                    .await;
            }
            PodState::Terminating => {
                return self
                    .fail_plain(mig, format!("source pod {src_name} is being deleted"))
                    .await;
            }
            PodState::Starting(why) => {
                return self
                    .stall(
                        mig,
                        format!("waiting for source pod {src_name} to be ready: {why}"),
                    )
                    .await;
            }
        }
        if let Err(e) = pods::check_node_selector(&mig, &source) {
            return self.fail_plain(mig, e).await;
        }
        let Some(node) = source.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            return self
                .stall(mig, format!("source pod {src_name} has no node yet"))
                .await;
        };
        let (ip, port) = match (pods::pod_ip(&source), pods::sidecar_port(&source)) {
            (Ok(Some(ip)), Ok(port)) => (ip, port),
            (Err(e), _) | (_, Err(e)) => return self.fail_plain(mig, e).await,
            (Ok(None), _) => {
                return self
                    .stall(mig, format!("source pod {src_name} has no IP yet"))
                    .await;
            }
        };
        let labels = source.labels();
        if labels.get(pods::LABEL_ROLE).is_some_and(|r| r == "target")
            && let Some(other) = labels.get(pods::LABEL_MIGRATION_UID)
            && pods::controlled_by(&source, other)
        {
            return self
                .stall(mig, format!(
                    "source pod {src_name} is still the target of an unfinished migration (uid {other})"
                ))
                .await;
        }

        // Concurrency: count under the lock, and keep holding it until this migration's
        // own status says it took a slot.
        let slot = self.ctx.admission.lock().await;
        let all: Api<VirtualMachineMigration> = match &self.cfg().namespace {
            Some(ns) => Api::namespaced(self.ctx.client.clone(), ns),
            None => Api::all(self.ctx.client.clone()),
        };
        let list = all.list(&Default::default()).await?;
        let uid = mig.uid().unwrap_or_default();
        let mut active = 0usize;
        let mut on_node = 0usize;
        let mut queued = 0i64;
        for m in &list.items {
            if m.uid().as_deref() == Some(uid.as_str()) {
                continue;
            }
            let phase = m.phase();
            if phase == Some(Phase::Pending) {
                queued += 1;
            }
            if !phase.is_some_and(Phase::is_active) {
                continue;
            }
            if m.namespace().as_deref() == Some(self.ns) && m.spec.source.pod == src_name {
                return self
                    .fail_plain(
                        mig,
                        format!(
                            "migration {} of pod {src_name} is already in progress",
                            m.name_any()
                        ),
                    )
                    .await;
            }
            active += 1;
            let their_node = m.status.as_ref().and_then(|s| s.source_node.as_deref());
            if their_node == Some(node.as_str()) {
                on_node += 1;
            }
        }
        self.ctx.metrics.queued.set(queued + 1);
        let limit = self.cfg().max_parallel;
        let node_limit = self.cfg().max_parallel_per_node;
        if active >= limit || on_node >= node_limit {
            let why = if active >= limit {
                format!("queued: {active} migrations are running cluster-wide (limit {limit})")
            } else {
                format!("queued: {on_node} migrations are leaving node {node} (limit {node_limit})")
            };
            let mut s = mig.status.clone().unwrap_or_default();
            if s.message.as_deref() != Some(why.as_str()) {
                s.message = Some(why);
                self.write_status(&mig, s).await?;
            }
            return Ok(Next::Wait(Action::requeue(self.cfg().queue_interval)));
        }
        self.ctx.metrics.queued.set(queued);

        // The source's sidecar must be joined to a running VM.
        let sidecar = SidecarClient::for_pod(ip, port, self.cfg().sidecar_request_timeout);
        let info = match self.node_info(&sidecar).await {
            Ok(i) => i,
            Err(e) => {
                drop(slot);
                return self
                    .stall(mig, format!("waiting for the source sidecar: {e}"))
                    .await;
            }
        };
        let Some(vm) = info.vm.as_ref() else {
            drop(slot);
            return self
                .stall(mig, "waiting for the source sidecar to join its VMM".into())
                .await;
        };
        if vm.incoming {
            return self
                .fail_plain(mig, format!(
                    "the VM in pod {src_name} is in incoming mode (it is a migration target that never received a VM)"
                ))
                .await;
        }
        let state = serde_json::to_value(vm.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        if state == "paused" {
            drop(slot);
            return self
                .stall(
                    mig,
                    format!("waiting for the VM in pod {src_name} to run (it is paused)"),
                )
                .await;
        }
        if state != "running" {
            return self
                .fail_plain(
                    mig,
                    format!(
                        "the VM in pod {src_name} is {state}; only a running VM can be migrated"
                    ),
                )
                .await;
        }

        let mut s = mig.status.clone().unwrap_or_default();
        let target = pods::target_pod_name(&src_name, &uid);
        s.source_node = Some(node.clone());
        s.source_pod_uid = source.uid();
        s.source_sidecar = Some(SocketAddr::new(ip, port).to_string());
        s.target_pod = Some(target.clone());
        s.secret_name = Some(pods::secret_name(&uid));
        s.start_time = Some(Time(self.now()));
        s.waiting_since = None;
        self.set_condition(
            &mut s,
            condition::ADMITTED,
            true,
            "Admitted",
            "a concurrency slot was free and the source is ready",
        );
        self.enter(&mut s, Phase::Scheduling);
        s.message = Some(format!("creating target pod {target}"));
        let mig = self.write_status(&mig, s).await?;
        drop(slot);
        self.phase_event(
            &mig,
            Phase::Scheduling,
            &format!("admitted: VM of {src_name} on node {node}; creating target pod {target}"),
        )
        .await;
        Ok(Next::Continue(Box::new(mig)))
    }

    /// Scheduling: the Secret and the target pod exist; wait for the pod to be ready.
    async fn schedule(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        if let Err(e) = self.ensure_secret(&mig, &s).await? {
            return self.abort(mig, Phase::Failed, e).await;
        }
        let target_name = s.target_pod.clone().unwrap_or_default();
        let uid = mig.uid().unwrap_or_default();
        let Some(target) = self.pods.get_opt(&target_name).await? else {
            return self.create_target(mig, &s).await;
        };
        if !pods::is_target_of(&target, &uid) {
            return self
                .abort(
                    mig,
                    Phase::Failed,
                    format!("pod {target_name} exists and is not this migration's target"),
                )
                .await;
        }
        let since = s
            .start_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(|| self.now());
        let waited = self.now().duration_since(since);
        match pods::pod_state(&target) {
            PodState::Ready => {
                let ip = match pods::pod_ip(&target) {
                    Ok(Some(ip)) => ip,
                    Ok(None) => {
                        return self
                            .note(
                                mig,
                                format!("waiting for target pod {target_name} to get an IP"),
                            )
                            .await;
                    }
                    Err(e) => return self.abort(mig, Phase::Failed, e).await,
                };
                let (port, mport) = match (
                    pods::sidecar_port(&target),
                    pods::migration_port_annotation(&target),
                ) {
                    (Ok(p), Ok(m)) => (p, m),
                    (Err(e), _) | (_, Err(e)) => return self.abort(mig, Phase::Failed, e).await,
                };
                let mut s = s;
                s.target_pod_uid = target.uid();
                s.target_node = target.spec.as_ref().and_then(|p| p.node_name.clone());
                s.target_sidecar = Some(SocketAddr::new(ip, port).to_string());
                s.target_address = mport.map(|p| SocketAddr::new(ip, p).to_string());
                s.waiting_since = None;
                self.set_condition(
                    &mut s,
                    condition::TARGET_READY,
                    true,
                    "PodReady",
                    &format!("target pod {target_name} is ready"),
                );
                self.enter(&mut s, Phase::Connecting);
                let node = s.target_node.clone().unwrap_or_else(|| "?".into());
                s.message = Some(format!(
                    "target pod {target_name} ready on node {node}; starting the sidecars"
                ));
                let mig = self.write_status(&mig, s).await?;
                self.phase_event(
                    &mig,
                    Phase::Connecting,
                    &format!("target pod {target_name} is ready on node {node}"),
                )
                .await;
                Ok(Next::Continue(Box::new(mig)))
            }
            PodState::Finished(why) => {
                self.abort(
                    mig,
                    Phase::Failed,
                    format!("target pod {target_name} stopped: {why}"),
                )
                .await
            }
            PodState::Terminating => {
                self.abort(
                    mig,
                    Phase::Failed,
                    format!("target pod {target_name} is being deleted"),
                )
                .await
            }
            PodState::Unschedulable(why) => {
                let limit = self.cfg().scheduling_timeout;
                if waited > signed(limit) {
                    return self
                        .abort(
                            mig,
                            Phase::Failed,
                            format!(
                                "target pod {target_name} could not be scheduled within {}: {why}",
                                human(limit)
                            ),
                        )
                        .await;
                }
                self.note(
                    mig,
                    format!(
                        "target pod {target_name} is unschedulable (giving up after {}): {why}",
                        human(limit)
                    ),
                )
                .await
            }
            PodState::Starting(why) => {
                let limit = self.cfg().target_ready_timeout;
                if waited > signed(limit) {
                    return self
                        .abort(
                            mig,
                            Phase::Failed,
                            format!(
                                "target pod {target_name} did not become ready within {}: {why}",
                                human(limit)
                            ),
                        )
                        .await;
                }
                self.note(mig, format!("waiting for target pod {target_name}: {why}"))
                    .await
            }
        }
    }

    async fn create_target(
        &self,
        mig: VirtualMachineMigration,
        s: &VirtualMachineMigrationStatus,
    ) -> Result<Next, Error> {
        let src_name = mig.spec.source.pod.clone();
        let source =
            match self.pods.get_opt(&src_name).await? {
                Some(p) if p.uid() == s.source_pod_uid => p,
                _ => {
                    return self
                    .abort(mig, Phase::Failed, format!(
                        "source pod {src_name} disappeared before the target pod was created"
                    ))
                    .await;
                }
            };
        let node = s.source_node.clone().unwrap_or_default();
        let pod = match pods::build_target_pod(&mig, &source, &node) {
            Ok(p) => p,
            Err(e) => return self.abort(mig, Phase::Failed, e).await,
        };
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            // Created by an earlier reconciliation whose answer was lost: the next one sees it.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        let name = pod.metadata.name.unwrap_or_default();
        info!(migration = self.name, namespace = self.ns, pod = %name, "target pod created");
        self.note(
            mig,
            format!("target pod {name} created; waiting for it to be scheduled"),
        )
        .await
    }

    /// The Secret holds the token both sidecars get; it is created once and read back each
    /// time, so a restarted operator sends the same token.
    async fn ensure_secret(
        &self,
        mig: &VirtualMachineMigration,
        s: &VirtualMachineMigrationStatus,
    ) -> Result<Result<String, String>, Error> {
        let name = s.secret_name.clone().unwrap_or_default();
        let uid = mig.uid().unwrap_or_default();
        if let Some(secret) = self.secrets.get_opt(&name).await? {
            return Ok(read_secret(&secret, &uid));
        }
        let token = match faultline::wire::handshake::Secret::generate() {
            Ok(t) => t.to_base64(),
            Err(e) => return Ok(Err(format!("generating the migration secret: {e}"))),
        };
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.ns.to_string()),
                labels: Some([(pods::LABEL_MIGRATION_UID.to_string(), uid.clone())].into()),
                owner_references: Some(vec![self.owner_ref(mig)?]),
                ..Default::default()
            },
            data: Some(
                [(
                    SECRET_KEY.to_string(),
                    ByteString(token.clone().into_bytes()),
                )]
                .into(),
            ),
            type_: Some("Opaque".into()),
            immutable: Some(true),
            ..Default::default()
        };
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(created) => Ok(read_secret(&created, &uid)),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let existing = self.secrets.get(&name).await?;
                Ok(read_secret(&existing, &uid))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Connecting, first visit: check the target node can take this VM, choose the trap
    /// mechanism, and start both sidecars (target first).
    async fn connect(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        let Some((src, tgt)) = self.sidecar_pair(&s) else {
            return self
                .abort(
                    mig,
                    Phase::Failed,
                    "status lacks the sidecar addresses".into(),
                )
                .await;
        };
        let token = match self.ensure_secret(&mig, &s).await? {
            Ok(t) => t,
            Err(e) => return self.abort(mig, Phase::Failed, e).await,
        };
        let tinfo = match self.node_info(&tgt).await {
            Ok(i) => i,
            Err(e) => {
                return self
                    .stall(mig, format!("waiting for the target sidecar: {e}"))
                    .await;
            }
        };
        let sinfo = match self.node_info(&src).await {
            Ok(i) => i,
            Err(e) => {
                return self
                    .stall(mig, format!("waiting for the source sidecar: {e}"))
                    .await;
            }
        };
        let Some(tvm) = tinfo.vm.as_ref() else {
            return self
                .stall(mig, "waiting for the target sidecar to join its VMM".into())
                .await;
        };
        let Some(svm) = sinfo.vm.as_ref() else {
            return self
                .stall(mig, "waiting for the source sidecar to join its VMM".into())
                .await;
        };
        if !tvm.incoming {
            return self
                .abort(mig, Phase::Failed, format!(
                    "the target VMM is not in incoming mode (its containers get {}=true; does the VMM honour it?)",
                    pods::ENV_INCOMING
                ))
                .await;
        }
        if (svm.vcpus, svm.memory_bytes, svm.backing) != (tvm.vcpus, tvm.memory_bytes, tvm.backing)
        {
            return self
                .abort(mig, Phase::Failed, format!(
                    "the target VM does not match the source: {} vCPUs, {} bytes of {} memory versus {} vCPUs, {} bytes of {}",
                    tvm.vcpus, tvm.memory_bytes, tvm.backing, svm.vcpus, svm.memory_bytes, svm.backing
                ))
                .await;
        }
        let choice = match choose_mechanism(&mig.spec.policy, svm.backing, &tinfo) {
            Ok(c) => c,
            Err(e) => return self.abort(mig, Phase::Failed, e).await,
        };
        let target_address = match &s.target_address {
            Some(a) => a.clone(),
            None => SocketAddr::new(tgt.addr().ip(), tinfo.migration_port).to_string(),
        };
        let id = s.migration_id.clone().unwrap_or_default();
        let policy = choice.policy.clone();
        let target_req = StartMigration {
            id: id.clone(),
            role: Role::Target,
            peer: None,
            secret: token.clone(),
            policy: policy.clone(),
        };
        if let Err(e) = self.start(&tgt, &target_req).await {
            return self.start_failed(mig, "target", e).await;
        }
        let source_req = StartMigration {
            id,
            role: Role::Source,
            peer: Some(target_address.clone()),
            secret: token,
            policy,
        };
        if let Err(e) = self.start(&src, &source_req).await {
            return self.start_failed(mig, "source", e).await;
        }
        let mut s = s;
        s.mechanism = Some(choice.mechanism.clone());
        s.mechanism_reason = Some(choice.reason.clone());
        s.mode = Some(choice.mode);
        s.target_address = Some(target_address.clone());
        s.waiting_since = None;
        s.message = Some(format!(
            "sidecars started ({} via {}); source connects to {target_address}",
            mode_str(choice.mode),
            choice.mechanism
        ));
        let mig = self.write_status(&mig, s).await?;
        self.event(
            &mig,
            EventType::Normal,
            "SidecarsStarted",
            &format!(
                "mode {}, mechanism {}: {}",
                mode_str(choice.mode),
                choice.mechanism,
                choice.reason
            ),
        )
        .await;
        Ok(Next::Continue(Box::new(mig)))
    }

    async fn start_failed(
        &self,
        mig: VirtualMachineMigration,
        side: &str,
        e: SidecarError,
    ) -> Result<Next, Error> {
        if e.is_unreachable() {
            return self
                .stall(mig, format!("waiting for the {side} sidecar: {e}"))
                .await;
        }
        self.abort(
            mig,
            Phase::Failed,
            format!("the {side} sidecar refused the migration: {e}"),
        )
        .await
    }

    /// The sidecars run the migration: mirror their progress, finish on their outcome.
    async fn drive(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        let Some((src, tgt)) = self.sidecar_pair(&s) else {
            return self
                .abort(
                    mig,
                    Phase::Failed,
                    "status lacks the sidecar addresses".into(),
                )
                .await;
        };
        let id = s.migration_id.clone().unwrap_or_default();
        let src_r = self.sidecar_status(&src, &id).await;
        let tgt_r = self.sidecar_status(&tgt, &id).await;
        let src_s = src_r.as_ref().ok();
        let tgt_s = tgt_r.as_ref().ok();
        let committed =
            s.committed || src_s.is_some_and(|x| x.committed) || tgt_s.is_some_and(|x| x.committed);

        if let Some(t) = tgt_s
            && t.phase == sidecar_api::Phase::Completed
        {
            return self.succeed(mig, src_s, t).await;
        }

        if committed {
            let lost = src_s.is_some_and(|x| x.vm_lost)
                || tgt_s.is_some_and(|x| {
                    x.vm_lost || (x.phase.is_terminal() && x.phase != sidecar_api::Phase::Completed)
                });
            if lost {
                let why = tgt_s
                    .and_then(|x| x.error.clone())
                    .or_else(|| src_s.and_then(|x| x.error.clone()))
                    .unwrap_or_else(|| "the target sidecar reports the migration failed".into());
                return self.lose(mig, src_s, tgt_s, why).await;
            }
            if let Err(e) = &tgt_r {
                if e.is_not_found() {
                    return self
                        .lose(mig, src_s, None, format!(
                            "the target sidecar no longer knows migration {id} after the point of no return (was it restarted?)"
                        ))
                        .await;
                }
                // Unreachable after the point of no return: only the pod can tell us more.
                return self
                    .target_unreachable_after_commit(mig, src_s, e.to_string())
                    .await;
            }
        } else {
            // Before the point of no return: any failure cancels, the source keeps running.
            let failed = [src_s, tgt_s]
                .into_iter()
                .flatten()
                .find(|x| x.phase.is_terminal());
            if let Some(f) = failed {
                let side = if f.role == Role::Source {
                    "source"
                } else {
                    "target"
                };
                let why = f.error.clone().unwrap_or_else(|| f.message.clone());
                return self
                    .abort(
                        mig,
                        Phase::Failed,
                        format!(
                            "the {side} sidecar reports the migration {}: {why}",
                            sidecar_phase_str(f.phase)
                        ),
                    )
                    .await;
            }
            for (side, r) in [("source", &src_r), ("target", &tgt_r)] {
                if let Err(e) = r {
                    if e.is_not_found() {
                        return self
                            .abort(mig, Phase::Failed, format!(
                                "the {side} sidecar no longer knows migration {id} (was it restarted?)"
                            ))
                            .await;
                    }
                    return self
                        .stall(mig, format!("cannot reach the {side} sidecar: {e}"))
                        .await;
                }
            }
        }

        // In progress: mirror it.
        let mut n = s.clone();
        let current = s.phase.unwrap_or(Phase::Connecting);
        let seen = [src_s, tgt_s]
            .into_iter()
            .flatten()
            .filter_map(|x| map_phase(x.phase))
            .max()
            .unwrap_or(current);
        let phase = seen.max(current);
        let now = self.now();
        n.waiting_since = None;
        let newly_committed = committed && !s.committed;
        if newly_committed {
            n.committed = true;
            n.commit_time = Some(Time(now));
            self.set_condition(
                &mut n,
                condition::COMMITTED,
                true,
                "PointOfNoReturn",
                "the source VM is fenced; the migration can only complete",
            );
        }
        let progress = merge_progress(src_s, tgt_s, now);
        let message = src_s
            .filter(|x| x.role == Role::Source && !committed)
            .or(tgt_s)
            .or(src_s)
            .map(|x| x.message.clone());
        let progress_due = s
            .progress
            .as_ref()
            .and_then(|p| p.updated.as_ref())
            .is_none_or(|u| now.duration_since(u.0) >= signed(self.cfg().status_interval));
        let progress_changed = s.progress.as_ref().map(strip_time) != Some(strip_time(&progress));
        let phase_changed = phase != current;
        let mode = s.mode.unwrap_or(mig.spec.policy.mode);
        let entered = phases_between(
            current,
            phase,
            Evidence::from_reports(mode, src_s, tgt_s, committed),
        );
        for p in &entered {
            self.enter(&mut n, *p);
        }
        if phase_changed
            || newly_committed
            || s.waiting_since.is_some()
            || (progress_changed && progress_due)
        {
            n.progress = Some(progress);
            if let Some(m) = message {
                n.message = Some(if s.deletion_deferred {
                    format!("deletion waits for completion (past the point of no return); {m}")
                } else {
                    m
                });
            }
            let mig = self.write_status(&mig, n).await?;
            if newly_committed {
                self.event(&mig, EventType::Normal, "Committed",
                    "point of no return passed: the source VM is fenced and the VM runs on the target from now on").await;
            }
            let msg = mig
                .status
                .as_ref()
                .and_then(|s| s.message.clone())
                .unwrap_or_default();
            for p in &entered {
                self.phase_event(&mig, *p, &msg).await;
            }
        }
        Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)))
    }

    async fn target_unreachable_after_commit(
        &self,
        mig: VirtualMachineMigration,
        src_s: Option<&MigrationStatus>,
        err: String,
    ) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        let name = s.target_pod.clone().unwrap_or_default();
        let gone = match self.pods.get_opt(&name).await? {
            None => Some(format!("target pod {name} is gone")),
            Some(p) if p.uid() != s.target_pod_uid => {
                Some(format!("target pod {name} was replaced"))
            }
            Some(p) => match pods::pod_state(&p) {
                PodState::Finished(why) => Some(format!("target pod {name} stopped: {why}")),
                PodState::Terminating => Some(format!("target pod {name} is being deleted")),
                _ => None,
            },
        };
        if let Some(why) = gone {
            return self
                .lose(
                    mig,
                    src_s,
                    None,
                    format!("{why} after the point of no return"),
                )
                .await;
        }
        // The pod is there: the sidecar may be restarting. Keep waiting, and say so.
        let mut s = s;
        let msg = format!("past the point of no return; cannot reach the target sidecar: {err}");
        if s.message.as_deref() != Some(msg.as_str()) {
            s.message = Some(msg);
            self.write_status(&mig, s).await?;
        }
        Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)))
    }

    // ----- outcomes ----------------------------------------------------------------------

    async fn succeed(
        &self,
        mig: VirtualMachineMigration,
        src_s: Option<&MigrationStatus>,
        tgt_s: &MigrationStatus,
    ) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        let uid = mig.uid().unwrap_or_default();
        let src_name = mig.spec.source.pod.clone();
        let source = self
            .pods
            .get_opt(&src_name)
            .await?
            .filter(|p| p.uid() == s.source_pod_uid);
        // Hand the target pod to whatever owned the source pod, so the migration's deletion
        // does not take the VM's new home with it.
        if let Some(target_name) = &s.target_pod
            && let Some(target) = self.pods.get_opt(target_name).await?
            && pods::controlled_by(&target, &uid)
        {
            let owners: Vec<OwnerReference> = source
                .as_ref()
                .and_then(|p| p.metadata.owner_references.clone())
                .unwrap_or_default();
            let patch = json!({"metadata": {
                "ownerReferences": owners,
                "labels": {pods::LABEL_ROLE: null},
            }});
            self.pods
                .patch(target_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        if !mig.spec.keep_source
            && let Some(src) = &source
        {
            self.delete_pod(&src_name, src.uid()).await?;
        }
        self.delete_secret(&s).await?;

        let mut n = s;
        let now = self.now();
        n.committed = true;
        let newly_committed = n.commit_time.is_none();
        if newly_committed {
            n.commit_time = Some(Time(now));
            self.set_condition(
                &mut n,
                condition::COMMITTED,
                true,
                "PointOfNoReturn",
                "the source VM is fenced; the migration can only complete",
            );
        }
        n.progress = Some(merge_progress(src_s, Some(tgt_s), now));
        let downtime = n.progress.as_ref().and_then(|p| p.downtime_ms);
        let took = n
            .start_time
            .as_ref()
            .map(|t| now.duration_since(t.0).as_secs_f64())
            .unwrap_or_default();
        let node = n.target_node.clone().unwrap_or_else(|| "?".into());
        let msg = format!(
            "migrated to node {node} in {took:.1}s; downtime {}",
            downtime
                .map(|d| format!("{d:.1}ms"))
                .unwrap_or_else(|| "unknown".into())
        );
        self.set_condition(&mut n, condition::SUCCEEDED, true, "Completed", &msg);
        let current = n.phase.unwrap_or(Phase::Connecting);
        let mode = n.mode.unwrap_or(mig.spec.policy.mode);
        let mut passed = phases_between(
            current,
            Phase::Succeeded,
            Evidence::from_reports(mode, src_s, Some(tgt_s), true),
        );
        passed.pop();
        let mig = self
            .finish_via(mig, n, &passed, Phase::Succeeded, msg)
            .await?;
        if newly_committed {
            self.event(
                &mig,
                EventType::Normal,
                "Committed",
                "point of no return passed (between two polls): the source VM is fenced",
            )
            .await;
        }
        if let Some(d) = downtime {
            self.ctx.metrics.downtime_seconds.observe(d / 1000.0);
        }
        self.ctx.metrics.migration_seconds.observe(took);
        Ok(Next::Continue(Box::new(mig)))
    }

    /// Failure after the point of no return with the VM gone: say so plainly; leave the pods
    /// for inspection (they hold nothing that can run).
    async fn lose(
        &self,
        mig: VirtualMachineMigration,
        src_s: Option<&MigrationStatus>,
        tgt_s: Option<&MigrationStatus>,
        why: String,
    ) -> Result<Next, Error> {
        let mut n = mig.status.clone().unwrap_or_default();
        n.vm_lost = true;
        n.committed = true;
        n.progress = Some(merge_progress(src_s, tgt_s, self.now()));
        self.delete_secret(&n).await?;
        let msg = format!("the VM is lost: {why}");
        self.finish(mig, n, Phase::Failed, msg)
            .await
            .map(|m| Next::Continue(Box::new(m)))
    }

    /// Stops a migration that has not passed the point of no return: cancel the sidecars,
    /// delete the target pod and the Secret, record `phase`. If the sidecars say the point
    /// of no return has passed after all, record that and carry on instead; if it cannot be
    /// told, do nothing destructive and wait.
    async fn abort(
        &self,
        mig: VirtualMachineMigration,
        phase: Phase,
        why: String,
    ) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        if s.source_sidecar.is_some() && s.phase.is_some_and(|p| p >= Phase::Connecting) {
            match self.cancel_sidecars(&s).await {
                CancelOutcome::Stopped => {}
                CancelOutcome::Committed => {
                    let mut n = s;
                    n.committed = true;
                    if n.commit_time.is_none() {
                        n.commit_time = Some(Time(self.now()));
                    }
                    self.set_condition(
                        &mut n,
                        condition::COMMITTED,
                        true,
                        "PointOfNoReturn",
                        "the source VM is fenced; the migration can only complete",
                    );
                    n.message = Some(format!(
                        "past the point of no return, so not stopped ({why}); waiting for completion"
                    ));
                    // The next step mirrors the migration from here on.
                    return Ok(Next::Continue(Box::new(self.write_status(&mig, n).await?)));
                }
                CancelOutcome::Unknown(reason) => {
                    let mut n = s;
                    let msg = format!(
                        "stopping ({why}), but cannot tell whether the hand-over committed: {reason}; nothing is deleted until a sidecar answers"
                    );
                    if n.message.as_deref() != Some(msg.as_str()) {
                        n.message = Some(msg);
                        self.write_status(&mig, n).await?;
                    }
                    return Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)));
                }
            }
        }
        if let Some(name) = &s.target_pod
            && let Some(p) = self.pods.get_opt(name).await?
            && pods::is_target_of(&p, &mig.uid().unwrap_or_default())
            && pods::controlled_by(&p, &mig.uid().unwrap_or_default())
        {
            self.delete_pod(name, p.uid()).await?;
        }
        self.delete_secret(&s).await?;
        let mut n = s;
        n.waiting_since = None;
        self.finish(mig, n, phase, why)
            .await
            .map(|m| Next::Continue(Box::new(m)))
    }

    /// Asks the sidecars to stop, and finds out whether the hand-over can still be stopped.
    /// Only the source decides commit, so only its answer (or the target's having committed)
    /// settles it.
    async fn cancel_sidecars(&self, s: &VirtualMachineMigrationStatus) -> CancelOutcome {
        let id = s.migration_id.clone().unwrap_or_default();
        let (Some(src), tgt) = (
            self.sidecar(&s.source_sidecar),
            self.sidecar(&s.target_sidecar),
        ) else {
            return CancelOutcome::Stopped;
        };
        let outcome = match self.sidecar_status(&src, &id).await {
            Err(e) if e.is_not_found() => CancelOutcome::Stopped,
            Ok(x) if x.committed => CancelOutcome::Committed,
            Ok(x) if x.phase.is_terminal() => CancelOutcome::Stopped,
            Ok(_) => self.stop_source(&src, &id).await,
            Err(src_err) => {
                // The source cannot be asked. The target can still settle it: if it has not
                // reached switch-over, cancelling it makes a commit impossible.
                match &tgt {
                    None => CancelOutcome::Unknown(src_err.to_string()),
                    Some(t) => match self.sidecar_status(t, &id).await {
                        Ok(x) if x.committed => CancelOutcome::Committed,
                        Err(e) if e.is_not_found() => CancelOutcome::Stopped,
                        Ok(x) if x.phase.is_terminal() => CancelOutcome::Stopped,
                        Ok(x)
                            if matches!(
                                x.phase,
                                sidecar_api::Phase::Waiting
                                    | sidecar_api::Phase::Connecting
                                    | sidecar_api::Phase::PreCopy
                            ) =>
                        {
                            match self.cancel(t, &id).await {
                                Ok(_) => CancelOutcome::Stopped,
                                Err(e) => CancelOutcome::Unknown(format!("{src_err}; target: {e}")),
                            }
                        }
                        Ok(x) => CancelOutcome::Unknown(format!(
                            "{src_err}; the target is in {}",
                            sidecar_phase_str(x.phase)
                        )),
                        Err(e) => CancelOutcome::Unknown(format!("{src_err}; target: {e}")),
                    },
                }
            }
        };
        if matches!(outcome, CancelOutcome::Stopped)
            && let Some(t) = &tgt
        {
            // The target would notice the source going away; telling it is quicker. Its
            // pod is deleted next either way.
            match self.sidecar_status(t, &id).await {
                Ok(x) if !x.phase.is_terminal() => {
                    let _ = self.cancel(t, &id).await;
                }
                _ => {}
            }
        }
        outcome
    }

    /// Asks the source to cancel and waits (briefly) for its final word. A 202 only says the
    /// request was taken: the source may be committing at this very moment, so only a terminal
    /// state without commit means it will not commit.
    async fn stop_source(&self, src: &SidecarClient, id: &str) -> CancelOutcome {
        if let Err(e) = self.cancel(src, id).await
            && !(e.is_conflict() || e.is_not_found())
        {
            return CancelOutcome::Unknown(e.to_string());
        }
        let mut outcome = CancelOutcome::Unknown("the source sidecar has not answered".into());
        for _ in 0..20 {
            outcome = match self.sidecar_status(src, id).await {
                Ok(x) if x.committed => return CancelOutcome::Committed,
                Ok(x) if x.phase.is_terminal() => return CancelOutcome::Stopped,
                Err(e) if e.is_not_found() => return CancelOutcome::Stopped,
                Ok(x) => CancelOutcome::Unknown(format!(
                    "the source sidecar is still {} after the cancel request",
                    sidecar_phase_str(x.phase)
                )),
                Err(e) => CancelOutcome::Unknown(e.to_string()),
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        outcome
    }

    /// Records a terminal phase with its message, event and metrics.
    async fn finish(
        &self,
        mig: VirtualMachineMigration,
        s: VirtualMachineMigrationStatus,
        phase: Phase,
        message: String,
    ) -> Result<VirtualMachineMigration, Error> {
        self.finish_via(mig, s, &[], phase, message).await
    }

    /// [`Self::finish`], first recording `passed`: phases the migration went through since the
    /// last poll.
    async fn finish_via(
        &self,
        mig: VirtualMachineMigration,
        mut s: VirtualMachineMigrationStatus,
        passed: &[Phase],
        phase: Phase,
        message: String,
    ) -> Result<VirtualMachineMigration, Error> {
        for p in passed {
            self.enter(&mut s, *p);
        }
        self.enter(&mut s, phase);
        s.completion_time = Some(Time(self.now()));
        s.message = Some(message.clone());
        s.waiting_since = None;
        if phase != Phase::Succeeded {
            self.set_condition(
                &mut s,
                condition::SUCCEEDED,
                false,
                phase.as_str(),
                &message,
            );
        }
        let mig = self.write_status(&mig, s).await?;
        let result = phase.as_str().to_ascii_lowercase();
        self.ctx
            .metrics
            .migrations_finished
            .get_or_create(&vec![("result", result)])
            .inc();
        info!(migration = self.name, namespace = self.ns, phase = %phase, message = %message, "migration finished");
        for p in passed {
            self.phase_event(&mig, *p, "passed between two polls").await;
        }
        self.phase_event(&mig, phase, &message).await;
        Ok(mig)
    }

    /// Fails a migration that has created nothing yet.
    async fn fail_plain(&self, mig: VirtualMachineMigration, why: String) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        self.finish(mig, s, Phase::Failed, why)
            .await
            .map(|m| Next::Continue(Box::new(m)))
    }

    /// Something needed is not there yet: say what, and fail once it has lasted too long.
    async fn stall(&self, mig: VirtualMachineMigration, what: String) -> Result<Next, Error> {
        let mut s = mig.status.clone().unwrap_or_default();
        let now = self.now();
        let since = s.waiting_since.as_ref().map(|t| t.0).unwrap_or(now);
        let limit = self.cfg().unavailable_timeout;
        if now.duration_since(since) > signed(limit) {
            let why = format!("{what} (for more than {})", human(limit));
            return if s.phase.is_some_and(|p| p >= Phase::Scheduling) {
                self.abort(mig, Phase::Failed, why).await
            } else {
                self.fail_plain(mig, why).await
            };
        }
        if s.waiting_since.is_none() || s.message.as_deref() != Some(what.as_str()) {
            s.waiting_since = Some(Time(since));
            s.message = Some(what);
            self.write_status(&mig, s).await?;
        }
        let interval = if mig.phase() == Some(Phase::Pending) {
            self.cfg().queue_interval
        } else {
            self.cfg().poll_interval
        };
        Ok(Next::Wait(Action::requeue(interval)))
    }

    /// Updates the message (if it changed) and waits a poll interval.
    async fn note(&self, mig: VirtualMachineMigration, message: String) -> Result<Next, Error> {
        let mut s = mig.status.clone().unwrap_or_default();
        if s.message.as_deref() != Some(message.as_str()) {
            s.message = Some(message);
            self.write_status(&mig, s).await?;
        }
        Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)))
    }

    // ----- helpers -----------------------------------------------------------------------

    fn enter(&self, s: &mut VirtualMachineMigrationStatus, phase: Phase) {
        s.phase = Some(phase);
        s.phase_transitions.push(PhaseTransition {
            phase,
            time: Time(self.now()),
        });
        self.ctx
            .metrics
            .phase_transitions
            .get_or_create(&vec![("phase", phase.as_str().to_string())])
            .inc();
    }

    fn set_condition(
        &self,
        s: &mut VirtualMachineMigrationStatus,
        type_: &str,
        ok: bool,
        reason: &str,
        message: &str,
    ) {
        let status = if ok { "True" } else { "False" };
        let now = Time(self.now());
        match s.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = now;
                }
                c.status = status.into();
                c.reason = reason.into();
                c.message = message.into();
            }
            None => s.conditions.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason: reason.into(),
                message: message.into(),
                last_transition_time: now,
                observed_generation: None,
            }),
        }
    }

    /// Replaces the status, conditional on the resourceVersion read: a concurrent writer
    /// makes this fail (and the reconciliation retry) instead of being overwritten.
    async fn write_status(
        &self,
        mig: &VirtualMachineMigration,
        mut status: VirtualMachineMigrationStatus,
    ) -> Result<VirtualMachineMigration, Error> {
        status.observed_generation = mig.metadata.generation;
        let mut obj = mig.clone();
        obj.status = Some(status);
        Ok(self
            .migrations
            .replace_status(self.name, &PostParams::default(), &obj)
            .await?)
    }

    async fn delete_pod(&self, name: &str, uid: Option<String>) -> Result<(), Error> {
        let dp = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.pods.delete(name, &dp).await {
            Ok(_) => Ok(()),
            // Gone already, or a different pod by now (uid precondition): not ours to delete.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_secret(&self, s: &VirtualMachineMigrationStatus) -> Result<(), Error> {
        let Some(name) = &s.secret_name else {
            return Ok(());
        };
        match self.secrets.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn owner_ref(&self, mig: &VirtualMachineMigration) -> Result<OwnerReference, Error> {
        mig.controller_owner_ref(&())
            .ok_or(Error::MissingMetadata("uid"))
    }

    /// Clients for the source and target sidecars named in `s`, if both addresses are there.
    fn sidecar_pair(
        &self,
        s: &VirtualMachineMigrationStatus,
    ) -> Option<(SidecarClient, SidecarClient)> {
        Some((
            self.sidecar(&s.source_sidecar)?,
            self.sidecar(&s.target_sidecar)?,
        ))
    }

    fn sidecar(&self, addr: &Option<String>) -> Option<SidecarClient> {
        let addr: SocketAddr = addr.as_deref()?.parse().ok()?;
        Some(SidecarClient::new(addr, self.cfg().sidecar_request_timeout))
    }

    async fn node_info(&self, c: &SidecarClient) -> Result<NodeInfo, SidecarError> {
        let r = c.node().await;
        self.count("node", &r);
        r
    }

    async fn sidecar_status(
        &self,
        c: &SidecarClient,
        id: &str,
    ) -> Result<MigrationStatus, SidecarError> {
        let r = c.migration(id).await;
        self.count("status", &r);
        r
    }

    async fn start(&self, c: &SidecarClient, req: &StartMigration) -> Result<(), SidecarError> {
        let r = c.start(req).await;
        self.count("start", &r);
        r.map(|_| ())
    }

    async fn cancel(&self, c: &SidecarClient, id: &str) -> Result<MigrationStatus, SidecarError> {
        let r = c.cancel(id).await;
        self.count("cancel", &r);
        r
    }

    fn count<T>(&self, op: &'static str, r: &Result<T, SidecarError>) {
        let result = match r {
            Ok(_) => "ok",
            Err(e) if e.is_unreachable() => "unreachable",
            Err(_) => "error",
        };
        self.ctx.metrics.sidecar_request(op, result);
    }

    async fn phase_event(&self, mig: &VirtualMachineMigration, phase: Phase, note: &str) {
        let type_ = if phase == Phase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.event(mig, type_, phase.as_str(), note).await;
    }

    /// Events are best effort: a failure to publish one is logged, never fatal.
    async fn event(
        &self,
        mig: &VirtualMachineMigration,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        info!(
            migration = self.name,
            namespace = self.ns,
            reason,
            note,
            "event"
        );
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: "Migrate".into(),
            secondary: None,
        };
        if let Err(e) = self.ctx.recorder.publish(&ev, &mig.object_ref(&())).await {
            warn!(migration = self.name, namespace = self.ns, error = %e, "publishing an event failed");
        }
    }
}

fn read_secret(secret: &Secret, uid: &str) -> Result<String, String> {
    let name = secret.name_any();
    let owned = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid);
    if !owned {
        return Err(format!(
            "Secret {name} exists and is not owned by this migration"
        ));
    }
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_KEY))
        .ok_or_else(|| format!("Secret {name} has no `{SECRET_KEY}`"))?;
    let token = String::from_utf8(bytes.0.clone())
        .map_err(|_| format!("Secret {name}: `{SECRET_KEY}` is not text"))?;
    faultline::wire::handshake::Secret::from_base64(&token)
        .map_err(|e| format!("Secret {name}: {e}"))?;
    Ok(token)
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
