//! The scenarios run on the real cluster. Each starts from an empty VM namespace, acts as a
//! user would (helm, kubectl apply/delete/patch), and checks the outcome in the API server's
//! objects and in the guests themselves. Each returns a line saying what it saw.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::kube::{Kube, s, wait_for};
use super::vm::{self, NAMESPACE, VmVariant};

pub const OPERATOR_NAMESPACE: &str = "faultline-system";
const RELEASE: &str = "faultline";

pub struct Ctx<'a> {
    pub kube: &'a Kube,
    pub repo: &'a Path,
}

pub struct Scenario {
    pub name: &'static str,
    pub what: &'static str,
    pub run: fn(&Ctx<'_>) -> Result<String>,
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "helm-install",
        what: "helm install charts/faultline: CRD from the chart, two operator replicas under leader election, own service account",
        run: helm_install,
    },
    Scenario {
        name: "migrate-postcopy",
        what: "kubectl apply the example VM pod and migration-postcopy.yaml: Succeeded on the other node, guest verified there, source gone, spec immutable",
        run: |c| migrate_example(c, "postcopy", "PostCopy"),
    },
    Scenario {
        name: "migrate-hybrid",
        what: "the same with migration-hybrid.yaml",
        run: |c| migrate_example(c, "hybrid", "Hybrid"),
    },
    Scenario {
        name: "migrate-precopy",
        what: "the same with migration-precopy.yaml",
        run: |c| migrate_example(c, "precopy", "PreCopy"),
    },
    Scenario {
        name: "bad-specs-rejected",
        what: "out-of-range and contradictory specs are refused by the API server, naming the field; nothing is created",
        run: bad_specs_rejected,
    },
    Scenario {
        name: "missing-source-pod",
        what: "a migration of a pod that does not exist fails with a message naming it",
        run: missing_source_pod,
    },
    Scenario {
        name: "postcopy-without-mechanism",
        what: "post-copy of a guest_memfd VM on nodes without KVM Userfault fails before anything moves, quoting the probe; the source runs on",
        run: postcopy_without_mechanism,
    },
    Scenario {
        name: "cancel-during-precopy",
        what: "deleting a migration during pre-copy cancels it: object and target pod gone, the source VM verified where it was",
        run: cancel_during_precopy,
    },
    Scenario {
        name: "target-killed-before-commit",
        what: "the target pod force-deleted during pre-copy: Failed, not committed, the source VM verified where it was",
        run: target_killed_before_commit,
    },
    Scenario {
        name: "delete-after-commit-waits",
        what: "deleting a migration after the point of no return defers until it completes; the VM verified on the target",
        run: delete_after_commit_waits,
    },
    Scenario {
        name: "queued-by-node-limit",
        what: "three migrations leaving one node: the third waits in Pending (2 per node), then all succeed",
        run: queued_by_node_limit,
    },
    Scenario {
        name: "controlled-pods-refused",
        what: "VM pods of a StatefulSet and a ReplicaSet are refused before anything moves (Migratable=False, ControlledPod); the controller keeps its one pod",
        run: controlled_pods_refused,
    },
    Scenario {
        name: "unsafe-pods-refused",
        what: "restartPolicy Always and a hostPath volume are refused before anything moves, with their reasons",
        run: unsafe_pods_refused,
    },
    Scenario {
        name: "vmm-killed-stays-dead",
        what: "a VMM killed in a running VM pod is never restarted as a fresh VM; migrating that pod fails at once, saying so",
        run: vmm_killed_stays_dead,
    },
    Scenario {
        name: "keep-source-fenced",
        what: "keepSource: the source pod stays, its fenced VMM exited and was never restarted; the VM runs on the target",
        run: keep_source_fenced,
    },
    Scenario {
        name: "foreground-delete-after-commit",
        what: "kubectl delete --cascade=foreground after the point of no return: the target (the only VM) survives and the migration completes",
        run: foreground_delete_after_commit,
    },
    Scenario {
        name: "rejected-by-quota",
        what: "a ResourceQuota the target exceeds: Failed within the scheduling bound (RejectedByResourceQuota), the source untouched",
        run: rejected_by_quota,
    },
    Scenario {
        name: "rejected-by-podsecurity",
        what: "a namespace turned baseline: the privileged target is refused at once (RejectedByPodSecurity), the source untouched",
        run: rejected_by_podsecurity,
    },
    Scenario {
        name: "placement-a-b-a",
        what: "a VM migrated to the other node and back again: placement belongs to each migration",
        run: placement_a_b_a,
    },
    Scenario {
        name: "service-endpoints-follow-the-vm",
        what: "a Service over the VM: the target joins its endpoints only once the VM runs there",
        run: service_endpoints_follow_the_vm,
    },
    Scenario {
        name: "memory-charged-within-the-pod",
        what: "where a migrated VM's pages are charged (measured), and that the pod's limit covers them",
        run: memory_charged_within_the_pod,
    },
    Scenario {
        name: "other-node-cordoned",
        what: "the only other node cordoned: Failed after the scheduling bound, the source running",
        run: other_node_cordoned,
    },
    Scenario {
        name: "leader-killed",
        what: "the operator's leader killed mid-migration: the standby takes the lease and finishes it",
        run: leader_killed,
    },
    Scenario {
        name: "network-cut-after-commit",
        what: "the network between the nodes cut in post-copy: it pauses and says Stalled (condition, event) past its progress timeout, resumes by itself when healed and completes, guest verified",
        run: network_cut_after_commit,
    },
    Scenario {
        name: "target-sidecar-killed-in-postcopy",
        what: "the target pod's sidecar killed in post-copy: the kubelet restarts it, it rejoins from its record and the VMM's trap, and the migration completes, guest verified",
        run: target_sidecar_killed_in_postcopy,
    },
    Scenario {
        name: "strangers-refused",
        what: "a running VM's sidecar, called as a stranger would: no client certificate 401, another CA's operator certificate, an expired one from the cluster CA and the namespace's own sidecar certificate 403, for start, list, node and cancel; health open; nothing started, guest running",
        run: strangers_refused,
    },
    Scenario {
        name: "operator-rbac-clean",
        what: "no 403 in any operator replica's log: the chart's RBAC is what the operator needs",
        run: operator_rbac_clean,
    },
];

// --- helpers ------------------------------------------------------------------------------

fn ensure_namespace(c: &Ctx<'_>) -> Result<()> {
    let ns = c.repo.join("examples/namespace.yaml");
    c.kube.kubectl(&["apply", "-f", &ns.to_string_lossy()])?;
    // The namespace's default service account appears a moment after the namespace.
    wait_for(
        "service account vms/default",
        Duration::from_secs(30),
        || {
            Ok(
                match c.kube.get(Some(NAMESPACE), "serviceaccount", "default")? {
                    Some(_) => Ok(()),
                    None => Err("not yet".into()),
                },
            )
        },
    )
}

fn fresh(c: &Ctx<'_>) -> Result<()> {
    ensure_namespace(c)?;
    vm::reset(c.kube)
}

fn migration(name: &str, pod: &str, policy: Value) -> Value {
    json!({
        "apiVersion": "faultline.dev/v1alpha1",
        "kind": "VirtualMachineMigration",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"source": {"pod": pod}, "policy": policy},
    })
}

fn get_migration(c: &Ctx<'_>, name: &str) -> Result<Option<Value>> {
    c.kube.get(Some(NAMESPACE), "virtualmachinemigration", name)
}

fn phase(m: &Value) -> &str {
    s(m, &["status", "phase"])
}

fn is_terminal(m: &Value) -> bool {
    matches!(phase(m), "Succeeded" | "Failed" | "Cancelled")
}

/// Waits until the migration satisfies `until`; returns it then.
fn wait_migration(
    c: &Ctx<'_>,
    name: &str,
    what: &str,
    timeout: Duration,
    until: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_for(&format!("migration {name}: {what}"), timeout, || {
        let Some(m) = get_migration(c, name)? else {
            return Ok(Err("not found".into()));
        };
        if until(&m) {
            return Ok(Ok(m));
        }
        if is_terminal(&m) {
            bail!(
                "migration {name} ended {} before {what}: {}",
                phase(&m),
                s(&m, &["status", "message"])
            );
        }
        Ok(Err(format!(
            "{}: {}",
            phase(&m),
            s(&m, &["status", "message"])
        )))
    })
}

fn wait_terminal(c: &Ctx<'_>, name: &str, timeout: Duration) -> Result<Value> {
    wait_for(&format!("migration {name} finished"), timeout, || {
        let Some(m) = get_migration(c, name)? else {
            return Ok(Err("not found".into()));
        };
        Ok(if is_terminal(&m) {
            Ok(m)
        } else {
            Err(format!("{}: {}", phase(&m), s(&m, &["status", "message"])))
        })
    })
}

fn small_vm<'a>(name: &'a str, memory: &'a str) -> VmVariant<'a> {
    VmVariant {
        name,
        memory,
        backing: "memfd",
        node: None,
        prefill: false,
        dirty_rate: None,
    }
}

/// No pod labelled as a migration target is left in the namespace.
fn no_target_pods(c: &Ctx<'_>) -> Result<()> {
    wait_for("no target pod left", Duration::from_secs(60), || {
        let left = c
            .kube
            .list(Some(NAMESPACE), "pods", Some("faultline.dev/role=target"))?;
        Ok(if left.is_empty() {
            Ok(())
        } else {
            Err(left
                .iter()
                .map(|p| s(p, &["metadata", "name"]).to_string())
                .collect::<Vec<_>>()
                .join(", "))
        })
    })
}

// --- scenarios ----------------------------------------------------------------------------

fn helm_install(c: &Ctx<'_>) -> Result<String> {
    let chart = c.repo.join("charts/faultline");
    // A fresh install, as a new user does, so the operator runs the images just loaded.
    let installed = c.kube.helm(&["list", "-n", OPERATOR_NAMESPACE, "-q"])?;
    if installed.lines().any(|l| l.trim() == RELEASE) {
        c.kube.helm(&[
            "uninstall",
            RELEASE,
            "-n",
            OPERATOR_NAMESPACE,
            "--wait",
            "--timeout",
            "2m",
        ])?;
    }
    // The VM namespace first: the chart puts its NetworkPolicy there.
    ensure_namespace(c)?;
    c.kube.helm(&[
        "install",
        RELEASE,
        &chart.to_string_lossy(),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
        "--set",
        &format!("networkPolicy.vmNamespaces={{{NAMESPACE}}}"),
        // Bounds short enough for the failure scenarios to reach them.
        "--set",
        "timeouts.scheduling=30s",
        "--set",
        "timeouts.targetReady=90s",
        "--wait",
        "--timeout",
        "3m",
    ])?;
    let crd = c
        .kube
        .get(None, "crd", "virtualmachinemigrations.faultline.dev")?
        .context("the chart did not install the CRD")?;
    ensure!(
        crd["status"]["conditions"].as_array().is_some_and(|cs| cs
            .iter()
            .any(|x| x["type"] == "Established" && x["status"] == "True")),
        "the CRD is not Established"
    );
    let deploy = c
        .kube
        .get(Some(OPERATOR_NAMESPACE), "deployment", RELEASE)?
        .context("no operator Deployment")?;
    let ready = deploy["status"]["readyReplicas"].as_u64().unwrap_or(0);
    ensure!(ready == 2, "operator: {ready} of 2 replicas ready");
    let pods = c.kube.list(
        Some(OPERATOR_NAMESPACE),
        "pods",
        Some("app.kubernetes.io/name=faultline"),
    )?;
    for p in &pods {
        let sa = s(p, &["spec", "serviceAccountName"]);
        ensure!(sa == RELEASE, "operator pod runs as service account {sa:?}");
    }
    let names: Vec<&str> = pods.iter().map(|p| s(p, &["metadata", "name"])).collect();
    let holder = wait_for("a leader", Duration::from_secs(60), || {
        let lease = c.kube.get(Some(OPERATOR_NAMESPACE), "lease", RELEASE)?;
        let holder = lease
            .as_ref()
            .map(|l| s(l, &["spec", "holderIdentity"]).to_string())
            .unwrap_or_default();
        Ok(if names.contains(&holder.as_str()) {
            Ok(holder)
        } else {
            Err(format!("lease holder {holder:?}"))
        })
    })?;
    let mut nodes: Vec<String> = pods.iter().map(vm::node_of).collect();
    nodes.sort();
    nodes.dedup();
    ensure!(
        nodes.len() == 2,
        "both operator replicas run on {nodes:?}: one node's loss would take both"
    );
    // The leader issues the labelled namespace its sidecar certificate; VM pods mount it.
    let tls = wait_for(
        "the sidecar certificate Secret",
        Duration::from_secs(60),
        || {
            Ok(
                match c
                    .kube
                    .get(Some(NAMESPACE), "secret", "faultline-sidecar-tls")?
                {
                    Some(s) => Ok(s),
                    None => Err("not yet".into()),
                },
            )
        },
    )?;
    ensure!(
        s(&tls, &["type"]) == "kubernetes.io/tls",
        "the sidecar Secret has type {:?}",
        s(&tls, &["type"])
    );
    c.kube
        .get(Some(OPERATOR_NAMESPACE), "secret", "faultline-ca")?
        .context("no CA Secret in the operator's namespace")?;
    let policy = c
        .kube
        .get(
            Some(NAMESPACE),
            "networkpolicy",
            &format!("{RELEASE}-sidecars"),
        )?
        .context("the chart did not create the VM namespace's NetworkPolicy")?;
    let ports = policy["spec"]["ingress"].as_array().map_or(0, Vec::len);
    Ok(format!(
        "2/2 operator replicas, one on each of {nodes:?}, leader {holder}, CRD established; CA created, {NAMESPACE}/faultline-sidecar-tls issued, NetworkPolicy with {ports} ingress rules accepted"
    ))
}

fn migrate_example(c: &Ctx<'_>, file: &str, mode: &str) -> Result<String> {
    fresh(c)?;
    let source = vm::create(c.kube, &vm::example(c.kube, c.repo)?)?;
    let source_name = s(&source, &["metadata", "name"]).to_string();
    let source_node = vm::node_of(&source);
    vm::guest_running(c.kube, &source_name)?;

    let path = c.repo.join(format!("examples/migration-{file}.yaml"));
    let manifest = c.kube.read_manifest(&path)?;
    let name = s(&manifest, &["metadata", "name"]).to_string();
    let started = Instant::now();
    c.kube.kubectl(&["apply", "-f", &path.to_string_lossy()])?;
    let m = wait_terminal(c, &name, Duration::from_secs(300))?;
    let took = started.elapsed();
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    let st = &m["status"];
    ensure!(
        s(st, &["mode"]) == mode || (mode == "Hybrid" && s(st, &["mode"]) == "PreCopy"),
        "mode in effect {:?}, asked {mode}",
        s(st, &["mode"])
    );
    let target_name = s(st, &["targetPod"]).to_string();
    let target = c
        .kube
        .get(Some(NAMESPACE), "pod", &target_name)?
        .with_context(|| format!("target pod {target_name} does not exist"))?;
    let target_node = vm::node_of(&target);
    ensure!(
        target_node != source_node && !target_node.is_empty(),
        "target on {target_node:?}, source was on {source_node}"
    );
    ensure!(
        s(st, &["targetNode"]) == target_node,
        "status.targetNode {:?} but the pod runs on {target_node}",
        s(st, &["targetNode"])
    );
    // What `kubectl get vmmig` shows a person.
    let table = c
        .kube
        .kubectl(&["get", "vmmig", &name, "-n", NAMESPACE, "--no-headers"])?;
    let downtime = s(st, &["progress", "downtime"]).to_string();
    for want in ["Succeeded", s(st, &["mode"]), "100", downtime.as_str()] {
        ensure!(
            !want.is_empty() && table.contains(want),
            "`kubectl get vmmig` shows {table:?}, missing {want:?}"
        );
    }
    vm::wait_gone(c.kube, "pod", &source_name, Duration::from_secs(60))?;
    let guest = vm::verify_guest(c.kube, &target_name)?;

    // The spec is immutable once the migration has started.
    let patch = c.kube.try_kubectl(
        &[
            "patch",
            "vmmig",
            &name,
            "-n",
            NAMESPACE,
            "--type=merge",
            "-p",
            r#"{"spec":{"policy":{"maxDowntimeMs":999}}}"#,
        ],
        None,
    )?;
    ensure!(
        !patch.status.success(),
        "a spec change after the start was accepted"
    );
    let refusal = String::from_utf8_lossy(&patch.stderr);
    ensure!(
        refusal.contains("immutable") || refusal.contains("Invalid"),
        "refused, but not for immutability: {refusal}"
    );
    Ok(format!(
        "{source_node} → {target_node} in {:.1} s, mode {}, downtime {downtime}, {} faults; {guest}; spec change refused",
        took.as_secs_f64(),
        s(st, &["mode"]),
        st["progress"]["faults"].as_u64().unwrap_or(0)
    ))
}

fn bad_specs_rejected(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let cases: &[(&str, Value, &[&str])] = &[
        (
            "unknown mode",
            json!({"mode": "Teleport"}),
            &["spec.policy.mode", "Unsupported value"],
        ),
        (
            "zero downtime budget",
            json!({"maxDowntimeMs": 0}),
            &["spec.policy.maxDowntimeMs"],
        ),
        (
            "too many passes",
            json!({"precopyPasses": 100000}),
            &["spec.policy.precopyPasses"],
        ),
        (
            "convergence ratio above 1",
            json!({"convergenceRatio": 1.5}),
            &["spec.policy.convergenceRatio"],
        ),
        (
            "pre-copy without passes",
            json!({"mode": "PreCopy", "precopyPasses": 0}),
            &["precopyPasses"],
        ),
        (
            "unknown trap mechanism",
            json!({"trap": "Magic"}),
            &["spec.policy.trap"],
        ),
    ];
    let mut seen = Vec::new();
    for (i, (what, policy, wants)) in cases.iter().enumerate() {
        let m = migration(&format!("bad-{i}"), "vm", policy.clone());
        let said = c
            .kube
            .apply_refused(&m.to_string())
            .with_context(|| format!("{what}: {policy}"))?;
        for want in *wants {
            ensure!(
                said.contains(want),
                "{what}: refused with {said:?}, which does not name {want}"
            );
        }
        seen.push(*what);
    }
    let left = c.kube.list(Some(NAMESPACE), "vmmig", None)?;
    ensure!(left.is_empty(), "{} migrations were created", left.len());
    Ok(format!("refused: {}", seen.join(", ")))
}

fn missing_source_pod(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    c.kube
        .apply(&migration("no-such-vm", "no-such-pod", json!({})).to_string())?;
    let m = wait_terminal(c, "no-such-vm", Duration::from_secs(60))?;
    let msg = s(&m, &["status", "message"]);
    ensure!(phase(&m) == "Failed", "ended {}: {msg}", phase(&m));
    ensure!(
        msg.contains("no-such-pod"),
        "message does not name the pod: {msg}"
    );
    no_target_pods(c)?;
    Ok(format!("Failed: {msg}"))
}

fn postcopy_without_mechanism(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let pod = vm::variant(
        &example,
        &VmVariant {
            backing: "guest-memfd",
            ..small_vm("vm-gmem", "256M")
        },
    )?;
    let source = vm::create(c.kube, &pod)?;
    let backends = vm::node_info(c.kube, "vm-gmem")?.trap_backends;
    if backends
        .iter()
        .any(|b| b.backing == faultline::layout::BackingKind::GuestMemfd && b.available)
    {
        bail!(
            "these nodes can trap guest_memfd faults ({backends:?}): the scenario needs nodes that cannot"
        );
    }
    c.kube.apply(
        &migration(
            "gmem-postcopy",
            "vm-gmem",
            json!({"mode": "PostCopy", "precopyPasses": 0}),
        )
        .to_string(),
    )?;
    let m = wait_terminal(c, "gmem-postcopy", Duration::from_secs(120))?;
    let msg = s(&m, &["status", "message"]).to_string();
    ensure!(phase(&m) == "Failed", "ended {}: {msg}", phase(&m));
    ensure!(m["status"]["committed"] != true, "it committed");
    ensure!(
        m["status"]["progress"]["transferredPages"]
            .as_u64()
            .unwrap_or(0)
            == 0,
        "pages moved: {}",
        m["status"]["progress"]
    );
    ensure!(
        msg.contains("kvm-userfault") || msg.contains("post-copy"),
        "message does not say why: {msg}"
    );
    no_target_pods(c)?;
    let guest = vm::verify_guest(c.kube, "vm-gmem")?;
    Ok(format!(
        "Failed before anything moved: {msg}; source on {}: {guest}",
        vm::node_of(&source)
    ))
}

/// A VM of 256 MiB whose every page holds data and a migration whose bandwidth limit
/// (8 MiB/s) keeps it in pre-copy (or post-copy) for about half a minute: time to act in the
/// middle of it. Under pre-copy the guest is idle: a moderate guest writes as fast as its
/// emulated vCPU runs, 900–1700 pages/s on the same machine on different days, too close to
/// what the capped link moves for pre-copy to converge every time (and these scenarios are
/// about what happens meanwhile, not about convergence).
fn slow_migration(c: &Ctx<'_>, name: &str, pod: &str, policy: Value) -> Result<Value> {
    let example = vm::example(c.kube, c.repo)?;
    let precopy = policy.get("mode").and_then(Value::as_str) == Some("PreCopy");
    let source = vm::create(
        c.kube,
        &vm::variant(
            &example,
            &VmVariant {
                prefill: true,
                dirty_rate: precopy.then_some("idle"),
                ..small_vm(pod, "256M")
            },
        )?,
    )?;
    let mut policy = policy;
    policy["bandwidthLimit"] = json!(8 << 20);
    // A capped link behind a busy guest: pre-copy converges only with a downtime budget
    // the cap can meet (these scenarios are about what happens meanwhile).
    if policy.get("maxDowntimeMs").is_none() {
        policy["maxDowntimeMs"] = json!(2000);
    }
    c.kube.apply(&migration(name, pod, policy).to_string())?;
    Ok(source)
}

fn cancel_during_precopy(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let source = slow_migration(c, "slow-cancel", "vm-c", json!({"mode": "PreCopy"}))?;
    let m = wait_migration(
        c,
        "slow-cancel",
        "in pre-copy",
        Duration::from_secs(90),
        |m| phase(m) == "PreCopy",
    )?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    ensure!(!target.is_empty(), "no target pod in the status");
    c.kube.kubectl(&[
        "delete",
        "vmmig",
        "slow-cancel",
        "-n",
        NAMESPACE,
        "--wait=false",
    ])?;
    vm::wait_gone(
        c.kube,
        "virtualmachinemigration",
        "slow-cancel",
        Duration::from_secs(60),
    )?;
    vm::wait_gone(c.kube, "pod", &target, Duration::from_secs(60))?;
    let now = c
        .kube
        .get(Some(NAMESPACE), "pod", "vm-c")?
        .context("the source pod is gone")?;
    ensure!(
        vm::node_of(&now) == vm::node_of(&source),
        "the source pod moved"
    );
    let guest = vm::verify_guest(c.kube, "vm-c")?;
    Ok(format!(
        "deleted in pre-copy: migration and target {target} gone; {guest}"
    ))
}

fn target_killed_before_commit(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    slow_migration(c, "slow-kill", "vm-k", json!({"mode": "PreCopy"}))?;
    let m = wait_migration(
        c,
        "slow-kill",
        "in pre-copy",
        Duration::from_secs(90),
        |m| phase(m) == "PreCopy",
    )?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    c.kube.kubectl(&[
        "delete",
        "pod",
        &target,
        "-n",
        NAMESPACE,
        "--grace-period=0",
        "--force",
    ])?;
    let m = wait_terminal(c, "slow-kill", Duration::from_secs(180))?;
    let msg = s(&m, &["status", "message"]).to_string();
    ensure!(phase(&m) == "Failed", "ended {}: {msg}", phase(&m));
    ensure!(m["status"]["committed"] != true, "it committed");
    ensure!(m["status"]["vmLost"] != true, "it says the VM is lost");
    let guest = vm::verify_guest(c.kube, "vm-k")?;
    Ok(format!("Failed: {msg}; {guest}"))
}

fn delete_after_commit_waits(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    slow_migration(
        c,
        "slow-commit",
        "vm-d",
        json!({"mode": "PostCopy", "precopyPasses": 0}),
    )?;
    let m = wait_migration(
        c,
        "slow-commit",
        "committed",
        Duration::from_secs(90),
        |m| m["status"]["committed"] == true,
    )?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    c.kube.kubectl(&[
        "delete",
        "vmmig",
        "slow-commit",
        "-n",
        NAMESPACE,
        "--wait=false",
    ])?;
    let deferred = wait_migration(
        c,
        "slow-commit",
        "deletion deferred",
        Duration::from_secs(30),
        |m| m["status"]["deletionDeferred"] == true,
    )?;
    ensure!(
        !deferred["metadata"]["deletionTimestamp"].is_null(),
        "deferred without a deletion timestamp"
    );
    vm::wait_gone(
        c.kube,
        "virtualmachinemigration",
        "slow-commit",
        Duration::from_secs(180),
    )?;
    vm::wait_gone(c.kube, "pod", "vm-d", Duration::from_secs(60))?;
    let guest = vm::verify_guest(c.kube, &target)?;
    Ok(format!(
        "deleted after the commit point: deferred, gone once complete; {guest}"
    ))
}

fn queued_by_node_limit(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let names = ["vm-q1", "vm-q2", "vm-q3"];
    for n in names {
        let pod = vm::variant(
            &example,
            &VmVariant {
                node: Some("node-a"),
                prefill: true,
                // As in `slow_migration`: convergence must not hang on the guest's speed.
                dirty_rate: Some("idle"),
                ..small_vm(n, "64M")
            },
        )?;
        vm::create(c.kube, &pod)?;
    }
    for n in names {
        let mut m = migration(
            &format!("mig-{n}"),
            n,
            // Slow enough to overlap, with a downtime budget a capped link can meet: the
            // scenario is about the queue, not about convergence.
            json!({"mode": "PreCopy", "bandwidthLimit": 4 << 20, "maxDowntimeMs": 2000}),
        );
        m["metadata"]["labels"] = json!({"e2e": "queue"});
        c.kube.apply(&m.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut most_active = 0;
    let mut queued_message = None;
    loop {
        let all = c.kube.list(Some(NAMESPACE), "vmmig", Some("e2e=queue"))?;
        let active = all
            .iter()
            .filter(|m| !is_terminal(m) && !matches!(phase(m), "" | "Pending"))
            .count();
        most_active = most_active.max(active);
        if let Some(q) = all
            .iter()
            .find(|m| phase(m) == "Pending" && s(m, &["status", "message"]).contains("limit"))
        {
            queued_message.get_or_insert_with(|| s(q, &["status", "message"]).to_string());
        }
        if all.len() == 3 && all.iter().all(is_terminal) {
            for m in &all {
                ensure!(
                    phase(m) == "Succeeded",
                    "{} ended {}: {}",
                    s(m, &["metadata", "name"]),
                    phase(m),
                    s(m, &["status", "message"])
                );
            }
            break;
        }
        ensure!(Instant::now() < deadline, "not all finished: {all:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        most_active <= 2,
        "{most_active} migrations left node-a at once"
    );
    let queued = queued_message.context("no migration was seen queued in Pending")?;
    Ok(format!(
        "at most {most_active} active at once; queued: {queued:?}; all three Succeeded"
    ))
}

// --- what may be migrated ------------------------------------------------------------------

/// Waits for a migration to fail before anything moved, and checks it said `reason` in its
/// `Migratable` (or `TargetReady`) condition and left no target pod.
fn refused_before_moving(c: &Ctx<'_>, name: &str, condition: &str, reason: &str) -> Result<String> {
    let m = wait_terminal(c, name, Duration::from_secs(90))?;
    let msg = s(&m, &["status", "message"]).to_string();
    ensure!(phase(&m) == "Failed", "ended {}: {msg}", phase(&m));
    let cond = m["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["type"] == condition)
        .with_context(|| format!("no {condition} condition: {}", m["status"]))?;
    ensure!(
        cond["status"] == "False" && cond["reason"] == reason,
        "{condition} is {} ({}), not False ({reason})",
        cond["status"],
        cond["reason"]
    );
    ensure!(m["status"]["committed"] != true, "it committed");
    no_target_pods(c)?;
    Ok(msg)
}

fn controlled_pods_refused(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let template = vm::variant(&example, &small_vm("ignored", "64M"))?;
    let mut seen = Vec::new();
    // Their templates must say restartPolicy Always (the API server insists), which is refused
    // too; the controller is named first.
    for (kind, api) in [("StatefulSet", "apps/v1"), ("ReplicaSet", "apps/v1")] {
        let name = format!("vm-{}", kind.to_ascii_lowercase());
        let mut spec = template["spec"].clone();
        spec["restartPolicy"] = json!("Always");
        let mut obj = json!({
            "apiVersion": api, "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": spec}},
        });
        if kind == "StatefulSet" {
            obj["spec"]["serviceName"] = json!(name);
        }
        c.kube.apply(&obj.to_string())?;
        let pod = wait_for(
            &format!("a pod of {kind} {name}"),
            Duration::from_secs(60),
            || {
                let pods = c
                    .kube
                    .list(Some(NAMESPACE), "pods", Some(&format!("app={name}")))?;
                Ok(match pods.first() {
                    Some(p) => Ok(s(p, &["metadata", "name"]).to_string()),
                    None => Err("none yet".into()),
                })
            },
        )?;
        vm::wait_ready(c.kube, &pod)?;
        let mig = format!("move-{}", kind.to_ascii_lowercase());
        c.kube
            .apply(&migration(&mig, &pod, json!({})).to_string())?;
        let msg = refused_before_moving(c, &mig, "Migratable", "ControlledPod")?;
        ensure!(
            msg.contains(kind),
            "the message does not name the {kind}: {msg}"
        );
        ensure!(
            c.kube.get(Some(NAMESPACE), "pod", &pod)?.is_some(),
            "the {kind}'s pod is gone"
        );
        let count = c
            .kube
            .list(Some(NAMESPACE), "pods", Some(&format!("app={name}")))?
            .len();
        ensure!(count == 1, "{count} pods of {kind} {name}");
        seen.push(format!("{kind}: {msg}"));
        c.kube.kubectl(&[
            "delete",
            &kind.to_ascii_lowercase(),
            &name,
            "-n",
            NAMESPACE,
            "--wait=false",
        ])?;
    }
    Ok(seen.join(" | "))
}

fn unsafe_pods_refused(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let mut restarts = vm::variant(&example, &small_vm("vm-always", "64M"))?;
    restarts["spec"]["restartPolicy"] = json!("Always");
    vm::create(c.kube, &restarts)?;
    c.kube
        .apply(&migration("move-always", "vm-always", json!({})).to_string())?;
    let a = refused_before_moving(c, "move-always", "Migratable", "RestartPolicy")?;

    let mut host = vm::variant(&example, &small_vm("vm-hostpath", "64M"))?;
    host["spec"]["volumes"]
        .as_array_mut()
        .context("volumes")?
        .push(json!({"name": "disk", "hostPath": {"path": "/tmp", "type": "Directory"}}));
    vm::create(c.kube, &host)?;
    c.kube
        .apply(&migration("move-hostpath", "vm-hostpath", json!({})).to_string())?;
    let b = refused_before_moving(c, "move-hostpath", "Migratable", "HostPathVolume")?;
    vm::guest_running(c.kube, "vm-hostpath")?;
    Ok(format!("{a} | {b}"))
}

// --- restarts --------------------------------------------------------------------------------

fn vmm_killed_stays_dead(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    vm::create(
        c.kube,
        &vm::variant(&example, &small_vm("vm-crash", "64M"))?,
    )?;
    let killed = vm::kill_container(c.kube, "vm-crash", "vmm")?;
    let pod = wait_for(
        "the VMM reported terminated",
        Duration::from_secs(60),
        || {
            let p = c
                .kube
                .get(Some(NAMESPACE), "pod", "vm-crash")?
                .context("the pod is gone")?;
            Ok(match vm::container_state(&p, "vmm") {
                Some((_, Some(code))) => Ok((p, code)),
                other => Err(format!("{other:?}")),
            })
        },
    )?;
    // Give the kubelet time to restart it, which it must not do.
    std::thread::sleep(Duration::from_secs(5));
    let p = c
        .kube
        .get(Some(NAMESPACE), "pod", "vm-crash")?
        .context("the pod is gone")?;
    let (restarts, code) = vm::container_state(&p, "vmm").context("no vmm status")?;
    ensure!(restarts == 0, "the VMM was restarted {restarts} times");
    c.kube
        .apply(&migration("move-crashed", "vm-crash", json!({})).to_string())?;
    let m = wait_terminal(c, "move-crashed", Duration::from_secs(60))?;
    let msg = s(&m, &["status", "message"]).to_string();
    ensure!(phase(&m) == "Failed", "ended {}: {msg}", phase(&m));
    ensure!(msg.contains("vmm") && msg.contains("terminated"), "{msg}");
    no_target_pods(c)?;
    Ok(format!(
        "{killed} process(es) killed; the VMM exited {} and was not restarted (restarts 0, exit {code:?}); migration: {msg}",
        pod.1
    ))
}

fn keep_source_fenced(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    vm::create(
        c.kube,
        &vm::variant(&example, &small_vm("vm-keep", "128M"))?,
    )?;
    let mut m = migration("keep", "vm-keep", json!({"mode": "PreCopy"}));
    m["spec"]["keepSource"] = json!(true);
    c.kube.apply(&m.to_string())?;
    let m = wait_terminal(c, "keep", Duration::from_secs(120))?;
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    let target = s(&m, &["status", "targetPod"]).to_string();
    let src = wait_for(
        "the fenced source VMM exited",
        Duration::from_secs(60),
        || {
            let p = c
                .kube
                .get(Some(NAMESPACE), "pod", "vm-keep")?
                .context("keepSource, yet the source pod is gone")?;
            Ok(match vm::container_state(&p, "vmm") {
                Some((r, Some(code))) => Ok((r, code)),
                other => Err(format!("{other:?}")),
            })
        },
    )?;
    std::thread::sleep(Duration::from_secs(5));
    let p = c
        .kube
        .get(Some(NAMESPACE), "pod", "vm-keep")?
        .context("the source pod is gone")?;
    let (restarts, _) = vm::container_state(&p, "vmm").context("no vmm status")?;
    ensure!(
        restarts == 0,
        "the fenced VMM was restarted {restarts} times"
    );
    let guest = vm::verify_guest(c.kube, &target)?;
    Ok(format!(
        "source pod kept, its VMM exited {} after the hand-over and stayed down; {guest}",
        src.1
    ))
}

// --- deletion and admission ------------------------------------------------------------------

fn foreground_delete_after_commit(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    slow_migration(
        c,
        "fg-commit",
        "vm-fg",
        json!({"mode": "PostCopy", "precopyPasses": 0}),
    )?;
    let m = wait_migration(c, "fg-commit", "committed", Duration::from_secs(90), |m| {
        m["status"]["committed"] == true
    })?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    c.kube.kubectl(&[
        "delete",
        "vmmig",
        "fg-commit",
        "-n",
        NAMESPACE,
        "--cascade=foreground",
        "--wait=false",
    ])?;
    // The garbage collector acts at once on a foreground deletion: give it time to do harm.
    std::thread::sleep(Duration::from_secs(3));
    let t = c
        .kube
        .get(Some(NAMESPACE), "pod", &target)?
        .context("the target pod, the only VM, was deleted")?;
    ensure!(
        t["metadata"]["deletionTimestamp"].is_null(),
        "the target pod is being deleted"
    );
    vm::wait_gone(
        c.kube,
        "virtualmachinemigration",
        "fg-commit",
        Duration::from_secs(180),
    )?;
    let guest = vm::verify_guest(c.kube, &target)?;
    Ok(format!(
        "foreground deletion after the commit point: target kept, migration completed first; {guest}"
    ))
}

fn rejected_by_quota(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let source = vm::create(
        c.kube,
        &vm::variant(&example, &small_vm("vm-quota", "64M"))?,
    )?;
    // Room for the source, not for a second pod like it.
    c.kube.apply(
        &json!({"apiVersion": "v1", "kind": "ResourceQuota",
                "metadata": {"name": "vm-memory", "namespace": NAMESPACE},
                "spec": {"hard": {"requests.memory": "400Mi"}}})
        .to_string(),
    )?;
    let started = Instant::now();
    c.kube
        .apply(&migration("over-quota", "vm-quota", json!({})).to_string())?;
    let result = refused_before_moving(c, "over-quota", "TargetReady", "RejectedByResourceQuota");
    let took = started.elapsed();
    c.kube
        .kubectl(&["delete", "resourcequota", "vm-memory", "-n", NAMESPACE])?;
    let msg = result?;
    ensure!(msg.contains("exceeded quota"), "{msg}");
    ensure!(
        took < Duration::from_secs(75),
        "took {took:?} against a 30 s bound"
    );
    let now = c
        .kube
        .get(Some(NAMESPACE), "pod", "vm-quota")?
        .context("the source is gone")?;
    ensure!(
        s(&now, &["metadata", "uid"]) == s(&source, &["metadata", "uid"]),
        "the source pod was replaced"
    );
    let guest = vm::guest_running(c.kube, "vm-quota")?;
    Ok(format!(
        "Failed after {:.0} s: {msg}; {guest}",
        took.as_secs_f64()
    ))
}

fn rejected_by_podsecurity(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    vm::create(c.kube, &vm::variant(&example, &small_vm("vm-pss", "64M"))?)?;
    let label = |level: &str| {
        c.kube.kubectl(&[
            "label",
            "namespace",
            NAMESPACE,
            &format!("pod-security.kubernetes.io/enforce={level}"),
            "--overwrite",
        ])
    };
    label("baseline")?;
    let started = Instant::now();
    let result = c
        .kube
        .apply(&migration("no-privilege", "vm-pss", json!({})).to_string())
        .and_then(|_| {
            refused_before_moving(c, "no-privilege", "TargetReady", "RejectedByPodSecurity")
        });
    let took = started.elapsed();
    label("privileged")?;
    let msg = result?;
    ensure!(
        took < Duration::from_secs(20),
        "a lasting refusal took {took:?}"
    );
    let guest = vm::guest_running(c.kube, "vm-pss")?;
    Ok(format!(
        "Failed after {:.0} s: {msg}; {guest}",
        took.as_secs_f64()
    ))
}

// --- placement and Services ------------------------------------------------------------------

fn placement_a_b_a(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let first = vm::create(c.kube, &vm::variant(&example, &small_vm("vm-aba", "128M"))?)?;
    let mut pod = "vm-aba".to_string();
    let mut nodes = vec![vm::node_of(&first)];
    for leg in ["there", "back"] {
        let name = format!("aba-{leg}");
        c.kube
            .apply(&migration(&name, &pod, json!({"mode": "PreCopy"})).to_string())?;
        let m = wait_terminal(c, &name, Duration::from_secs(120))?;
        ensure!(
            phase(&m) == "Succeeded",
            "{leg}: ended {}: {}",
            phase(&m),
            s(&m, &["status", "message"])
        );
        pod = s(&m, &["status", "targetPod"]).to_string();
        let p = c
            .kube
            .get(Some(NAMESPACE), "pod", &pod)?
            .context("target pod")?;
        nodes.push(vm::node_of(&p));
    }
    ensure!(
        nodes[0] == nodes[2] && nodes[0] != nodes[1],
        "the VM went {nodes:?}"
    );
    let guest = vm::verify_guest(c.kube, &pod)?;
    Ok(format!(
        "{} → {} → {}; {guest}",
        nodes[0], nodes[1], nodes[2]
    ))
}

fn endpoints(c: &Ctx<'_>, service: &str) -> Result<Vec<String>> {
    let slices = c.kube.list(
        Some(NAMESPACE),
        "endpointslices",
        Some(&format!("kubernetes.io/service-name={service}")),
    )?;
    Ok(slices
        .iter()
        .flat_map(|sl| sl["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] == true)
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect())
}

fn service_endpoints_follow_the_vm(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    c.kube.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "vm-svc", "namespace": NAMESPACE},
                "spec": {"selector": {"app.kubernetes.io/name": "faultline-vm"},
                         "ports": [{"port": 80, "targetPort": 9180}]}})
        .to_string(),
    )?;
    let source = slow_migration(c, "svc-move", "vm-svc", json!({"mode": "PreCopy"}))?;
    let src_ip = s(&source, &["status", "podIP"]).to_string();
    let m = wait_migration(c, "svc-move", "in pre-copy", Duration::from_secs(90), |m| {
        phase(m) == "PreCopy"
    })?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    let t = c
        .kube
        .get(Some(NAMESPACE), "pod", &target)?
        .context("target pod")?;
    let tgt_ip = s(&t, &["status", "podIP"]).to_string();
    let during = endpoints(c, "vm-svc")?;
    ensure!(
        during.contains(&src_ip) && !during.contains(&tgt_ip),
        "during pre-copy the endpoints are {during:?} (source {src_ip}, target {tgt_ip})"
    );
    let m = wait_terminal(c, "svc-move", Duration::from_secs(180))?;
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    let after = wait_for(
        "the target in the endpoints",
        Duration::from_secs(30),
        || {
            let e = endpoints(c, "vm-svc")?;
            Ok(if e == [tgt_ip.clone()] {
                Ok(e)
            } else {
                Err(format!("{e:?}"))
            })
        },
    )?;
    c.kube
        .kubectl(&["delete", "service", "vm-svc", "-n", NAMESPACE])?;
    Ok(format!(
        "endpoints during pre-copy {during:?}, after {after:?}: the target joined only once its VM ran"
    ))
}

fn memory_charged_within_the_pod(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let pod = vm::variant(
        &example,
        &VmVariant {
            prefill: true,
            ..small_vm("vm-mem", "512M")
        },
    )?;
    vm::create(c.kube, &pod)?;
    let (before, limit) = vm::memory_charges(c.kube, "vm-mem")?;
    c.kube.apply(
        &migration(
            "mem-move",
            "vm-mem",
            json!({"mode": "PostCopy", "precopyPasses": 1}),
        )
        .to_string(),
    )?;
    let m = wait_terminal(c, "mem-move", Duration::from_secs(120))?;
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    let target = s(&m, &["status", "targetPod"]).to_string();
    let (after, tlimit) = vm::memory_charges(c.kube, &target)?;
    let total: u64 = after.iter().map(|(_, b)| b).sum();
    ensure!(
        total >= 512 << 20,
        "the target's containers hold {total} bytes, less than the guest's 512 MiB"
    );
    ensure!(
        tlimit >= total && limit == tlimit,
        "pod limits {limit}/{tlimit} for {total} bytes"
    );
    let mib = |v: &[(String, u64)]| {
        v.iter()
            .map(|(n, b)| format!("{n} {} MiB", b >> 20))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vm::verify_guest(c.kube, &target)?;
    Ok(format!(
        "512 MiB guest: on the source {}; on the target {}; pod limit {} MiB",
        mib(&before),
        mib(&after),
        tlimit >> 20
    ))
}

// --- failures ----------------------------------------------------------------------------------

fn other_node_cordoned(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    let example = vm::example(c.kube, c.repo)?;
    let source = vm::create(
        c.kube,
        &vm::variant(&example, &small_vm("vm-cordon", "64M"))?,
    )?;
    let here = vm::node_of(&source);
    let other = if here == "node-a" { "node-b" } else { "node-a" };
    c.kube.kubectl(&["cordon", other])?;
    let started = Instant::now();
    let result = c
        .kube
        .apply(&migration("nowhere", "vm-cordon", json!({})).to_string())
        .and_then(|_| wait_terminal(c, "nowhere", Duration::from_secs(120)));
    let took = started.elapsed();
    c.kube.kubectl(&["uncordon", other])?;
    let m = result?;
    let msg = s(&m, &["status", "message"]).to_string();
    ensure!(phase(&m) == "Failed", "ended {}: {msg}", phase(&m));
    ensure!(msg.contains("could not be scheduled"), "{msg}");
    ensure!(
        took >= Duration::from_secs(30),
        "failed after {took:?}, before the 30 s bound"
    );
    no_target_pods(c)?;
    let guest = vm::guest_running(c.kube, "vm-cordon")?;
    Ok(format!(
        "{other} cordoned: Failed after {:.0} s: {msg}; {guest}",
        took.as_secs_f64()
    ))
}

fn leader_killed(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    slow_migration(c, "lead", "vm-lead", json!({"mode": "PreCopy"}))?;
    wait_migration(c, "lead", "in pre-copy", Duration::from_secs(90), |m| {
        phase(m) == "PreCopy"
    })?;
    let lease = c
        .kube
        .get(Some(OPERATOR_NAMESPACE), "lease", RELEASE)?
        .context("no lease")?;
    let leader = s(&lease, &["spec", "holderIdentity"]).to_string();
    c.kube.kubectl(&[
        "delete",
        "pod",
        &leader,
        "-n",
        OPERATOR_NAMESPACE,
        "--grace-period=0",
        "--force",
    ])?;
    let next = wait_for("another leader", Duration::from_secs(90), || {
        let l = c.kube.get(Some(OPERATOR_NAMESPACE), "lease", RELEASE)?;
        let h = l
            .as_ref()
            .map(|l| s(l, &["spec", "holderIdentity"]).to_string())
            .unwrap_or_default();
        Ok(if !h.is_empty() && h != leader {
            Ok(h)
        } else {
            Err(h)
        })
    })?;
    let m = wait_terminal(c, "lead", Duration::from_secs(240))?;
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    let target = s(&m, &["status", "targetPod"]).to_string();
    let guest = vm::verify_guest(c.kube, &target)?;
    // The Deployment replaces the killed replica; wait, so later scenarios have two again.
    wait_for(
        "two operator replicas again",
        Duration::from_secs(90),
        || {
            let d = c
                .kube
                .get(Some(OPERATOR_NAMESPACE), "deployment", RELEASE)?;
            let ready = d
                .map(|d| d["status"]["readyReplicas"].as_u64().unwrap_or(0))
                .unwrap_or(0);
            Ok(if ready == 2 {
                Ok(())
            } else {
                Err(format!("{ready} ready"))
            })
        },
    )?;
    Ok(format!(
        "leader {leader} killed in pre-copy; {next} took over and finished it; {guest}"
    ))
}

fn network_cut_after_commit(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    slow_migration(
        c,
        "cut",
        "vm-cut",
        json!({"mode": "PostCopy", "precopyPasses": 0, "progressTimeoutS": 10}),
    )?;
    let m = wait_migration(c, "cut", "committed", Duration::from_secs(90), |m| {
        m["status"]["committed"] == true
    })?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    let cluster = c.repo.join("e2e/cluster");
    let run = |what: &str| -> Result<()> {
        let st = std::process::Command::new(&cluster)
            .arg(what)
            .status()
            .with_context(|| format!("running e2e/cluster {what}"))?;
        ensure!(st.success(), "e2e/cluster {what} failed");
        Ok(())
    };
    let stalled = |m: &Value| {
        m["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["type"] == "Stalled" && x["status"] == "True")
    };
    run("partition")?;
    let cut = Instant::now();
    // Nothing moves: past its 10 s progress timeout the migration says it stalled.
    let seen = wait_migration(c, "cut", "stalled", Duration::from_secs(40), stalled);
    let stalled_after = cut.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    run("heal")?;
    let seen = seen?;
    ensure!(!is_terminal(&seen), "during the cut: {}", seen["status"]);
    let m = wait_terminal(c, "cut", Duration::from_secs(240))?;
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    ensure!(!stalled(&m), "still marked stalled: {}", m["status"]);
    let events = c.kube.kubectl(&[
        "get",
        "events",
        "-n",
        NAMESPACE,
        "--field-selector",
        "involvedObject.name=cut,reason=Stalled",
        "-o",
        "name",
    ])?;
    ensure!(!events.trim().is_empty(), "no Stalled event was recorded");
    let guest = vm::verify_guest(c.kube, &target)?;
    Ok(format!(
        "network cut after the commit point: Stalled after {:.0} s, healed 3 s later; completed, Stalled cleared; {guest}",
        stalled_after.as_secs_f64()
    ))
}

fn target_sidecar_killed_in_postcopy(c: &Ctx<'_>) -> Result<String> {
    fresh(c)?;
    slow_migration(
        c,
        "rejoin",
        "vm-rejoin",
        json!({"mode": "PostCopy", "precopyPasses": 0}),
    )?;
    // Past the commit point and the switch-over: the VM runs on the target.
    let m = wait_migration(c, "rejoin", "post-copy", Duration::from_secs(90), |m| {
        m["status"]["committed"] == true && m["status"]["phase"] == "PostCopy"
    })?;
    let target = s(&m, &["status", "targetPod"]).to_string();
    let killed = vm::kill_container(c.kube, &target, "faultline-sidecar")?;
    ensure!(killed > 0, "no sidecar process found in {target}");
    let killed_at = Instant::now();
    let m = wait_terminal(c, "rejoin", Duration::from_secs(240))?;
    ensure!(
        phase(&m) == "Succeeded",
        "ended {}: {}",
        phase(&m),
        s(&m, &["status", "message"])
    );
    ensure!(m["status"]["vmLost"] != true, "{}", m["status"]);
    let pod = c
        .kube
        .get(Some(NAMESPACE), "pod", &target)?
        .context("the target pod is gone")?;
    let (restarts, _) =
        vm::container_state(&pod, "faultline-sidecar").context("no sidecar status")?;
    ensure!(restarts >= 1, "the target sidecar was not restarted");
    // The restarted sidecar's own log: it found its record and took the trap over.
    let log = c
        .kube
        .kubectl(&["logs", "-n", NAMESPACE, &target, "-c", "faultline-sidecar"])?;
    let rejoined = log
        .lines()
        .find(|l| l.contains("trap rejoined"))
        .with_context(|| format!("the restarted sidecar did not rejoin the trap:\n{log}"))?;
    let invalid = serde_json::from_str::<Value>(rejoined)
        .ok()
        .and_then(|l| l["fields"]["invalid"].as_u64());
    let guest = vm::verify_guest(c.kube, &target)?;
    Ok(format!(
        "target sidecar killed after the commit point ({killed} process(es)); restarted {restarts} time(s), it rejoined the trap with {} pages still missing and the migration completed {:.0} s later; {guest}",
        invalid.map_or_else(|| "?".into(), |n| n.to_string()),
        killed_at.elapsed().as_secs_f64()
    ))
}

/// The value of `key` in Secret `ns/name`, as text.
fn secret_value(c: &Ctx<'_>, ns: &str, name: &str, key: &str) -> Result<String> {
    use base64::Engine;
    let secret = c
        .kube
        .get(Some(ns), "secret", name)?
        .with_context(|| format!("no Secret {ns}/{name}"))?;
    let b64 = secret["data"][key]
        .as_str()
        .with_context(|| format!("Secret {ns}/{name} has no {key}"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .with_context(|| format!("Secret {ns}/{name}: {key} is not base64"))?;
    String::from_utf8(bytes).with_context(|| format!("Secret {ns}/{name}: {key} is not text"))
}

fn strangers_refused(c: &Ctx<'_>) -> Result<String> {
    use faultline::tls::control::client_config;
    use faultline::tls::pki::{Ca, OPERATOR_NAME, Usage};
    use faultline_local::{ClientTls, SidecarClient};

    fresh(c)?;
    let pod = vm::create(c.kube, &vm::example(c.kube, c.repo)?)?;
    let name = s(&pod, &["metadata", "name"]).to_string();
    vm::guest_running(c.kube, &name)?;
    let ip = s(&pod, &["status", "podIP"]).to_string();
    let api = format!("{ip}:9180");
    let ca_pem = secret_value(c, OPERATOR_NAMESPACE, "faultline-ca", "ca.crt")?;
    let ca_key = secret_value(c, OPERATOR_NAMESPACE, "faultline-ca", "ca.key")?;
    let cluster_ca = Ca::from_pem(&ca_pem, &ca_key)?;
    let hour = Duration::from_secs(3600);
    let foreign = Ca::generate(hour)?.issue(OPERATOR_NAME, Usage::Client, hour)?;
    let expired = cluster_ca.issue(OPERATOR_NAME, Usage::Client, Duration::from_secs(1))?;
    let sidecar_cert = secret_value(c, NAMESPACE, "faultline-sidecar-tls", "tls.crt")?;
    let sidecar_key = secret_value(c, NAMESPACE, "faultline-sidecar-tls", "tls.key")?;
    std::thread::sleep(Duration::from_secs(2));
    let as_client = |identity: Option<(&str, &str)>| -> Result<SidecarClient> {
        let tls = ClientTls::for_namespace(client_config(&ca_pem, identity)?, NAMESPACE)
            .map_err(|e| anyhow::anyhow!(e))?;
        Ok(SidecarClient::with_tls(&api, tls))
    };
    let steal = json!({"id": "stolen", "role": "source", "peer": "10.244.1.250:9181",
        "secret": "c3RvbGVuc3RvbGVuc3RvbGVuc3RvbGVuc3RvbGVuc3RvbGVu", "policy": {"mode": "pre-copy"}})
    .to_string();
    let mut seen = Vec::new();
    for (who, client, want) in [
        ("no certificate", as_client(None)?, 401),
        (
            "another CA",
            as_client(Some((&foreign.cert_pem, &foreign.key_pem)))?,
            403,
        ),
        (
            "expired",
            as_client(Some((&expired.cert_pem, &expired.key_pem)))?,
            403,
        ),
        (
            "the namespace's sidecar certificate",
            as_client(Some((&sidecar_cert, &sidecar_key)))?,
            403,
        ),
    ] {
        for (method, path, body) in [
            ("POST", "/v1/migrations", Some(steal.as_bytes())),
            ("GET", "/v1/migrations", None),
            ("GET", "/v1/node", None),
            ("POST", "/v1/migrations/stolen/cancel", None),
        ] {
            let (status, answer) = client.request(method, path, body)?;
            ensure!(
                status == want,
                "{who}: {method} {path} answered {status}, not {want}: {answer}"
            );
        }
        let (status, _) = client.request("GET", "/healthz", None)?;
        ensure!(status == 200, "{who}: /healthz answered {status}");
        seen.push(format!("{who} {want}"));
    }
    let admin = SidecarClient::with_tls(&api, vm::admin_tls(c.kube)?);
    let started = admin.list()?;
    ensure!(started.is_empty(), "a refused request started {started:?}");
    let guest = vm::guest_running(c.kube, &name)?;
    Ok(format!("{}; nothing started; {guest}", seen.join(", ")))
}

fn operator_rbac_clean(c: &Ctx<'_>) -> Result<String> {
    let logs = c.kube.kubectl(&[
        "logs",
        "-n",
        OPERATOR_NAMESPACE,
        "-l",
        "app.kubernetes.io/name=faultline",
        "--all-containers",
        "--prefix",
        "--tail=-1",
    ])?;
    let lines = logs.lines().count();
    let bad: Vec<&str> = logs
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("forbidden") || l.contains("\"code\":403") || l.contains("code: 403")
        })
        .take(5)
        .collect();
    ensure!(bad.is_empty(), "the operator was refused: {bad:#?}");
    ensure!(lines > 0, "the operator logged nothing");
    Ok(format!(
        "{lines} log lines from the operator replicas, none refused"
    ))
}
