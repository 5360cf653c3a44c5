//! `Pending`: accepting a new object and admitting it once its source is ready and a
//! concurrency slot is free (the counting itself is [`super::admission`]).

use super::*;

impl Reconciler<'_> {
    /// A new object: validate the spec and queue it.
    pub(super) async fn accept(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
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
    pub(super) async fn admit(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let src_name = mig.spec.source.pod.clone();
        let Some(source) = self.pods.get_opt(&src_name).await? else {
            return self
                .fail_plain(mig, format!("source pod {src_name} not found"))
                .await;
        };
        match pods::pod_state(&source, pods::ReadyWhen::Pod) {
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

        let claims = self.claims_of(&source).await?;
        if let Err(problems) =
            migratable::check(&source, &claims, mig.spec.target.avoid_source_node)
        {
            let (reason, msg) = migratable::summarize(&problems);
            let mut s = mig.status.clone().unwrap_or_default();
            self.set_condition(&mut s, condition::MIGRATABLE, false, reason, &msg);
            let mig = self.write_status(&mig, s).await?;
            return self.fail_plain(mig, msg).await;
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
        if let Some(other) = pods::is_unfinished_target(&source)
            && let Some(m) = list.items.iter().find(|m| {
                m.uid().as_deref() == Some(other) && m.phase().is_some_and(Phase::is_active)
            })
        {
            let why = format!(
                "source pod {src_name} is still the target of migration {}, which has not finished",
                m.name_any()
            );
            drop(slot);
            return self.stall(mig, why).await;
        }
        let me = admission::Candidate {
            uid: &uid,
            namespace: self.ns,
            source_pod: &src_name,
            source_node: &node,
        };
        let limits = admission::Limits {
            max_parallel: self.cfg().max_parallel,
            max_parallel_per_node: self.cfg().max_parallel_per_node,
        };
        match admission::decide(&list.items, me, limits) {
            admission::Admission::Duplicate { other } => {
                return self
                    .fail_plain(
                        mig,
                        format!("migration {other} of pod {src_name} is already in progress"),
                    )
                    .await;
            }
            admission::Admission::Queue { why, queued } => {
                self.ctx.metrics.queued.set(queued + 1);
                let mut s = mig.status.clone().unwrap_or_default();
                if s.message.as_deref() != Some(why.as_str()) {
                    s.message = Some(why);
                    self.write_status(&mig, s).await?;
                }
                return Ok(Next::Wait(Action::requeue(self.cfg().queue_interval)));
            }
            admission::Admission::Admit { queued } => {
                self.ctx.metrics.queued.set(queued);
            }
        }

        // The source's sidecar must be joined to a running VM.
        let sidecar = self.sidecar_at(SocketAddr::new(ip, port));
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
        let state = serde_json::to_value(vm.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        // A VM that arrived by a migration runs in a VMM started in incoming mode; only one
        // still waiting for its state has nothing to move.
        if state == "incoming" {
            return self
                .fail_plain(mig, format!(
                    "the VMM in pod {src_name} is in incoming mode and never received a VM (a migration target that did not complete)"
                ))
                .await;
        }
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
        s.start_time = Some(Time(self.now()));
        s.waiting_since = None;
        self.set_condition(
            &mut s,
            condition::MIGRATABLE,
            true,
            "Migratable",
            "nothing in the pod's spec stops a migration",
        );
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
}
