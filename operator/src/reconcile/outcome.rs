//! Outcomes: success (hand-over of the pods), loss after the point of no return, aborting
//! before it (cancelling the sidecars and finding out which side of the point they are on),
//! and the waits (`stall`, `note`) that fail a migration once they last too long.

use super::*;

impl Reconciler<'_> {
    pub(super) async fn succeed(
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
        // The target pod is the VM's home from now on: ready for Services, no longer a target.
        if let Some(target_name) = &s.target_pod
            && let Some(target) = self.pods.get_opt(target_name).await?
            && pods::is_target_of(&target, &uid)
        {
            self.mark_vm_running(target_name).await?;
            if pods::is_unfinished_target(&target).is_some() {
                let patch = json!({"metadata": {"labels": {pods::LABEL_ROLE: null}}});
                self.pods
                    .patch(target_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
        if !mig.spec.keep_source
            && let Some(src) = &source
        {
            self.delete_pod(&src_name, src.uid()).await?;
        }

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
        let mut progress = merge_progress(src_s, Some(tgt_s), now);
        // The source may be gone by now (its pod stops once its VMM exits): keep the downtime
        // an earlier poll read from it.
        if progress.downtime_ms.is_none()
            && let Some(earlier) = n.progress.as_ref().filter(|p| p.downtime_ms.is_some())
        {
            progress.downtime_ms = earlier.downtime_ms;
            progress.downtime = earlier.downtime.clone();
        }
        n.progress = Some(progress);
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
    pub(super) async fn lose(
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
        let msg = format!("the VM is lost: {why}");
        self.finish(mig, n, Phase::Failed, msg)
            .await
            .map(|m| Next::Continue(Box::new(m)))
    }

    /// Stops a migration that has not passed the point of no return: cancel the sidecars,
    /// delete the target pod, record `phase`. If the sidecars say the point
    /// of no return has passed after all, record that and carry on instead; if it cannot be
    /// told, do nothing destructive and wait.
    pub(super) async fn abort(
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
            && pods::is_unfinished_target(&p).is_some()
        {
            self.delete_pod(name, p.uid()).await?;
        }
        let mut n = s;
        n.waiting_since = None;
        self.finish(mig, n, phase, why)
            .await
            .map(|m| Next::Continue(Box::new(m)))
    }

    /// Asks the sidecars to stop, and finds out whether the hand-over can still be stopped.
    /// Only the source decides commit, so only its answer (or the target's having committed)
    /// settles it.
    pub(super) async fn cancel_sidecars(&self, s: &VirtualMachineMigrationStatus) -> CancelOutcome {
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
    pub(super) async fn stop_source(&self, src: &SidecarClient, id: &str) -> CancelOutcome {
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
    pub(super) async fn finish(
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
    pub(super) async fn finish_via(
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
    pub(super) async fn fail_plain(
        &self,
        mig: VirtualMachineMigration,
        why: String,
    ) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
        self.finish(mig, s, Phase::Failed, why)
            .await
            .map(|m| Next::Continue(Box::new(m)))
    }

    /// Something needed is not there yet: say what, and fail once it has lasted too long.
    pub(super) async fn stall(
        &self,
        mig: VirtualMachineMigration,
        what: String,
    ) -> Result<Next, Error> {
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
    pub(super) async fn note(
        &self,
        mig: VirtualMachineMigration,
        message: String,
    ) -> Result<Next, Error> {
        let mut s = mig.status.clone().unwrap_or_default();
        if s.message.as_deref() != Some(message.as_str()) {
            s.message = Some(message);
            self.write_status(&mig, s).await?;
        }
        Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)))
    }
}
