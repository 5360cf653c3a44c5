//! `Connecting`, first visit: checking the target can take the VM, choosing the mechanism,
//! starting both sidecars.

use super::*;

impl Reconciler<'_> {
    /// Connecting, first visit: check the target node can take this VM, choose the trap
    /// mechanism, and start both sidecars (target first).
    pub(super) async fn connect(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
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
        let token = self
            .ctx
            .pki
            .migration_secret(&mig.uid().unwrap_or_default());
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
        let choice = match choose_mechanism(&mig.spec.policy, svm.backing, svm.memory_bytes, &tinfo)
        {
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
        s.transport = Some(choice.policy.transport.describe().to_string());
        s.target_address = Some(target_address.clone());
        s.waiting_since = None;
        s.message = Some(format!(
            "sidecars started ({} via {}, {}); source connects to {target_address}",
            mode_str(choice.mode),
            choice.mechanism,
            choice.policy.transport.describe()
        ));
        let mig = self.write_status(&mig, s).await?;
        self.event(
            &mig,
            EventType::Normal,
            "SidecarsStarted",
            &format!(
                "mode {}, mechanism {}, transport {}: {}",
                mode_str(choice.mode),
                choice.mechanism,
                choice.policy.transport.describe(),
                choice.reason
            ),
        )
        .await;
        Ok(Next::Continue(Box::new(mig)))
    }

    pub(super) async fn start_failed(
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
}
