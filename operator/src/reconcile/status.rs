//! Writing status: phases, conditions, the conditional replace, and events.

use super::*;

impl Reconciler<'_> {
    pub(super) fn enter(&self, s: &mut VirtualMachineMigrationStatus, phase: Phase) {
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

    pub(super) fn set_condition(
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
    pub(super) async fn write_status(
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

    pub(super) async fn phase_event(
        &self,
        mig: &VirtualMachineMigration,
        phase: Phase,
        note: &str,
    ) {
        let type_ = if phase == Phase::Failed {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.event(mig, type_, phase.as_str(), note).await;
    }

    /// Events are best effort: a failure to publish one is logged, never fatal.
    pub(super) async fn event(
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
