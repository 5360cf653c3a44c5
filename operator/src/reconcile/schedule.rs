//! `Scheduling`: the target pod, and waiting for it.

use super::*;

impl Reconciler<'_> {
    /// Scheduling: the target pod exists; wait for it to be ready.
    pub(super) async fn schedule(&self, mig: VirtualMachineMigration) -> Result<Next, Error> {
        let s = mig.status.clone().unwrap_or_default();
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
        let port = match pods::sidecar_port(&target) {
            Ok(p) => p,
            Err(e) => return self.abort(mig, Phase::Failed, e).await,
        };
        match pods::pod_state(&target, pods::ReadyWhen::Sidecar { port }) {
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

    pub(super) async fn create_target(
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
            Err(kube::Error::Api(e)) if e.code == 409 && e.reason == "AlreadyExists" => {}
            Err(kube::Error::Api(e)) => {
                return self
                    .target_rejected(mig, s, rejection(e.code, &e.message))
                    .await;
            }
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

    /// The API server refused the target pod. Lasting refusals (PodSecurity, LimitRange, a
    /// webhook's denial, an invalid pod) fail the migration now; ones that may pass (quota,
    /// an unavailable webhook, a server error) are retried until the scheduling bound, counted
    /// from admission. Either way the condition `TargetReady` says why, and the source was
    /// never touched.
    async fn target_rejected(
        &self,
        mig: VirtualMachineMigration,
        s: &VirtualMachineMigrationStatus,
        r: Rejection,
    ) -> Result<Next, Error> {
        let limit = self.cfg().scheduling_timeout;
        let since = s
            .start_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(|| self.now());
        let waited = self.now().duration_since(since);
        let mut n = s.clone();
        let final_ = !r.may_pass || waited > signed(limit);
        let msg = if final_ {
            format!("the target pod was refused ({}): {}", r.reason, r.message)
        } else {
            format!(
                "the target pod was refused ({}), retrying until {} after admission: {}",
                r.reason,
                human(limit),
                r.message
            )
        };
        self.set_condition(&mut n, condition::TARGET_READY, false, r.reason, &msg);
        if !final_ {
            if n.message.as_deref() != Some(msg.as_str()) {
                n.message = Some(msg);
                self.write_status(&mig, n).await?;
            }
            return Ok(Next::Wait(Action::requeue(self.cfg().poll_interval)));
        }
        let mig = self.write_status(&mig, n).await?;
        self.event(&mig, EventType::Warning, r.reason, &msg).await;
        self.abort(mig, Phase::Failed, msg).await
    }
}

/// Why the API server refused a pod, in a condition's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rejection {
    pub reason: &'static str,
    /// A retry may succeed (freed quota, a webhook back up).
    pub may_pass: bool,
    pub message: String,
}

/// Reads a refusal of a pod creation (KubeVirt names the quota case
/// `migrationRejectedByResourceQuota`; these are the same idea as condition reasons).
pub(super) fn rejection(code: u16, message: &str) -> Rejection {
    let (reason, may_pass) = if message.contains("exceeded quota") {
        ("RejectedByResourceQuota", true)
    } else if message.contains("violates PodSecurity") {
        ("RejectedByPodSecurity", false)
    } else if code == 403
        && (message.contains("per Container") || message.contains("per Pod"))
        && (message.contains("maximum") || message.contains("minimum"))
    {
        ("RejectedByLimitRange", false)
    } else if message.contains("failed calling webhook") {
        ("AdmissionWebhookUnavailable", true)
    } else if message.contains("admission webhook") {
        ("RejectedByAdmissionWebhook", false)
    } else if code == 422 {
        ("RejectedAsInvalid", false)
    } else if code == 429 || code >= 500 {
        ("TargetCreationFailed", true)
    } else {
        ("RejectedByAdmission", false)
    };
    Rejection {
        reason,
        may_pass,
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_named_and_only_passing_ones_retried() {
        let cases = [
            (
                403,
                r#"pods "vm-mig-1" is forbidden: exceeded quota: vms, requested: requests.memory=1100Mi, used: requests.memory=1100Mi, limited: requests.memory=2Gi"#,
                "RejectedByResourceQuota",
                true,
            ),
            (
                403,
                r#"pods "vm-mig-1" is forbidden: violates PodSecurity "baseline:latest": privileged (containers "vmm", "faultline-sidecar" must not set securityContext.privileged=true)"#,
                "RejectedByPodSecurity",
                false,
            ),
            (
                403,
                r#"pods "vm-mig-1" is forbidden: maximum memory usage per Container is 512Mi, but limit is 1200Mi"#,
                "RejectedByLimitRange",
                false,
            ),
            (
                400,
                r#"admission webhook "deny.example.com" denied the request: no VMs on Fridays"#,
                "RejectedByAdmissionWebhook",
                false,
            ),
            (
                500,
                r#"Internal error occurred: failed calling webhook "deny.example.com": connection refused"#,
                "AdmissionWebhookUnavailable",
                true,
            ),
            (
                422,
                r#"Pod "vm-mig-1" is invalid: spec.containers[0].image: Required value"#,
                "RejectedAsInvalid",
                false,
            ),
            (
                503,
                "the server is currently unable to handle the request",
                "TargetCreationFailed",
                true,
            ),
            (
                403,
                "something else forbids it",
                "RejectedByAdmission",
                false,
            ),
        ];
        for (code, msg, reason, may_pass) in cases {
            let r = rejection(code, msg);
            assert_eq!((r.reason, r.may_pass), (reason, may_pass), "{msg}");
            assert_eq!(r.message, msg);
        }
    }
}
