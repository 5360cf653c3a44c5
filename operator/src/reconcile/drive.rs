//! `Connecting` to `PostCopy`: mirroring the sidecars into status until an outcome.

use super::*;

impl Reconciler<'_> {
    /// The sidecars run the migration: mirror their progress, finish on their outcome.
    pub(super) async fn drive(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
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
            // The VM resumes on the target now: it may serve from there.
            if let Some(t) = &s.target_pod {
                self.mark_vm_running(t).await?;
            }
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
        // What the sidecars say they run, over what the operator asked for.
        if let Some(t) = tgt_s.or(src_s).map(|x| x.transport.describe().to_string())
            && n.transport.as_deref() != Some(t.as_str())
        {
            n.transport = Some(t);
        }
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

        // The progress timeout: bytes moved since the progress last written, or not for too long.
        let moved = |p: Option<&crate::crd::MigrationProgress>| {
            p.map_or(0, |p| p.transferred_bytes + p.faults)
        };
        let progressed = moved(Some(&progress)) > moved(s.progress.as_ref());
        let quiet_since = s.last_progress_time.as_ref().map(|t| t.0);
        let limit = Duration::from_secs(mig.spec.policy.progress_timeout_s);
        let quiet_too_long =
            !progressed && quiet_since.is_some_and(|t| now.duration_since(t) > signed(limit));
        if quiet_too_long && !committed {
            return self
                .abort(
                    mig,
                    Phase::Failed,
                    format!(
                        "no progress for more than {} (nothing moved): {}",
                        human(limit),
                        message.unwrap_or_default()
                    ),
                )
                .await;
        }
        let stall = self.stall_transition(&mut n, quiet_too_long, progressed, limit);
        let first_look = quiet_since.is_none();
        if progressed || first_look {
            n.last_progress_time = Some(Time(now));
        }

        if phase_changed
            || newly_committed
            || s.waiting_since.is_some()
            || (progress_changed && progress_due)
            || stall != StallChange::None
            || first_look
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
            self.stall_events(&mig, stall, limit).await;
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

    pub(super) async fn target_unreachable_after_commit(
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
            Some(p) => match pods::pod_state(&p, pods::ReadyWhen::Pod) {
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
        // The pod is there: the sidecar may be restarting, or the network between the nodes
        // is cut. Keep waiting, and say so; nothing observed moving counts toward the stall
        // bound exactly as a quiet sidecar does.
        let mut n = s.clone();
        let msg = format!("past the point of no return; cannot reach the target sidecar: {err}");
        let limit = Duration::from_secs(mig.spec.policy.progress_timeout_s);
        let now = self.now();
        let quiet_too_long = s
            .last_progress_time
            .as_ref()
            .is_some_and(|t| now.duration_since(t.0) > signed(limit));
        let stall = self.stall_transition(&mut n, quiet_too_long, false, limit);
        if s.message.as_deref() != Some(msg.as_str()) || stall != StallChange::None {
            n.message = Some(msg);
            let mig = self.write_status(&mig, n).await?;
            self.stall_events(&mig, stall, limit).await;
        }
        Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)))
    }

    /// The one rule for the `Stalled` condition after the point of no return: set once nothing
    /// has moved for the progress timeout, cleared when bytes move again.
    fn stall_transition(
        &self,
        n: &mut VirtualMachineMigrationStatus,
        quiet_too_long: bool,
        progressed: bool,
        limit: Duration,
    ) -> StallChange {
        if quiet_too_long && !n.stalled {
            n.stalled = true;
            self.set_condition(
                n,
                condition::STALLED,
                true,
                "NoProgress",
                &format!(
                    "post-copy has moved nothing for more than {}; it can only complete, so it waits",
                    human(limit)
                ),
            );
            self.ctx.metrics.stalls.inc();
            StallChange::Started
        } else if progressed && n.stalled {
            n.stalled = false;
            self.set_condition(
                n,
                condition::STALLED,
                false,
                "Progressing",
                "bytes move again",
            );
            StallChange::Ended
        } else {
            StallChange::None
        }
    }

    async fn stall_events(
        &self,
        mig: &VirtualMachineMigration,
        change: StallChange,
        limit: Duration,
    ) {
        match change {
            StallChange::Started => {
                self.event(
                    mig,
                    EventType::Warning,
                    "Stalled",
                    &format!(
                        "post-copy has moved nothing for more than {}; waiting for it to resume",
                        human(limit)
                    ),
                )
                .await
            }
            StallChange::Ended => {
                self.event(
                    mig,
                    EventType::Normal,
                    "Resumed",
                    "post-copy moves bytes again",
                )
                .await
            }
            StallChange::None => {}
        }
    }
}

/// What one observation did to the `Stalled` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StallChange {
    None,
    Started,
    Ended,
}
