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
    c.kube.helm(&[
        "install",
        RELEASE,
        &chart.to_string_lossy(),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--create-namespace",
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
    Ok(format!(
        "2/2 operator replicas, one on each of {nodes:?}, leader {holder}, CRD established"
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
/// middle of it.
fn slow_migration(c: &Ctx<'_>, name: &str, pod: &str, policy: Value) -> Result<Value> {
    let example = vm::example(c.kube, c.repo)?;
    let source = vm::create(
        c.kube,
        &vm::variant(
            &example,
            &VmVariant {
                prefill: true,
                ..small_vm(pod, "256M")
            },
        )?,
    )?;
    let mut policy = policy;
    policy["bandwidthLimit"] = json!(8 << 20);
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
                ..small_vm(n, "64M")
            },
        )?;
        vm::create(c.kube, &pod)?;
    }
    for n in names {
        let mut m = migration(
            &format!("mig-{n}"),
            n,
            json!({"mode": "PreCopy", "bandwidthLimit": 4 << 20}),
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
