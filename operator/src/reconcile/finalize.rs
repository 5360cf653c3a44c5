//! Deletion: the finalizer that cancels a migration before the point of no return and
//! waits for completion after it, then lets the object go.

use super::*;

impl Reconciler<'_> {
    pub(super) async fn ensure_finalizer(
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

    pub(super) async fn patch_finalizers(
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
    pub(super) async fn finalize(&self, mut mig: VirtualMachineMigration) -> Result<Action, Error> {
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
}
