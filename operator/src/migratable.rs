//! Whether a VM pod can be migrated at all, decided before anything moves (KubeVirt calls this
//! the LiveMigratable condition). A migration builds a second pod from the VM pod's spec and
//! runs both at once on two nodes until the hand-over, then keeps only the second; whatever in
//! the spec cannot survive that is refused here with a reason and a message saying what to
//! change. What Faultline handles itself instead (readiness probes that cannot pass while the
//! target waits for its VM, and Service endpoints) is done in pods.rs.
//!
//! Pure: the reconciler reads the pod's claims and their volumes and passes them in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};

/// Annotation with which a pod owner declares that its init containers may run again in the
/// target pod (they run there before the VM arrives).
pub const ANNOTATION_RERUN_INIT: &str = "faultline.dev/rerun-init-containers";

/// Why a pod cannot be migrated: `reason` is a condition reason, `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotMigratable {
    pub reason: &'static str,
    pub message: String,
}

/// A claim the pod mounts, and the volume it is bound to, as the API server has them.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub claim: Option<PersistentVolumeClaim>,
    pub volume: Option<PersistentVolume>,
}

/// Annotation keys (and key endings) by which CNI plugins pin a pod's address: two pods
/// cannot hold the same one at once.
const IDENTITY_KEYS: &[&str] = &[
    "cni.projectcalico.org/ipAddrs",
    "cni.projectcalico.org/ipv6Addrs",
    "cni.projectcalico.org/floatingIPs",
];
const IDENTITY_SUFFIXES: &[&str] = &["/ip_address", "/ip-address", "/mac_address", "/mac-address"];
const MULTUS_NETWORKS: &str = "k8s.v1.cni.cncf.io/networks";

/// Checks everything; returns every problem found, the most fundamental first.
pub fn check(
    pod: &Pod,
    claims: &BTreeMap<String, Claim>,
    avoid_source_node: bool,
) -> Result<(), Vec<NotMigratable>> {
    let mut problems = Vec::new();
    let mut no =
        |reason: &'static str, message: String| problems.push(NotMigratable { reason, message });
    let name = pod.metadata.name.as_deref().unwrap_or("?");

    for o in pod.metadata.owner_references.iter().flatten() {
        if o.controller == Some(true) {
            no(
                "ControlledPod",
                format!(
                    "pod {name} is controlled by {} {}: a controller counts, deletes or recreates its pods, so it would delete the target or start a second VM; run VM pods without a controller",
                    o.kind, o.name
                ),
            );
        }
    }

    let Some(spec) = pod.spec.as_ref() else {
        no("NoSpec", format!("pod {name} has no spec"));
        return Err(problems);
    };
    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
    if policy != "Never" {
        no(
            "RestartPolicy",
            format!(
                "pod {name} has restartPolicy {policy}: a VMM that exits (its VM handed over, or lost) would be started again as a fresh VM; set restartPolicy: Never (a native sidecar, an init container with restartPolicy: Always, still restarts)"
            ),
        );
    }

    let rerun_ok = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_RERUN_INIT))
        .is_some_and(|v| v == "true");
    if !rerun_ok {
        for c in spec.init_containers.iter().flatten() {
            if c.restart_policy.as_deref() != Some("Always") {
                no(
                    "InitContainers",
                    format!(
                        "init container {} would run again in the target pod before the VM arrives; if that is safe, annotate the pod {ANNOTATION_RERUN_INIT}: \"true\"",
                        c.name
                    ),
                );
            }
        }
    }

    for v in spec.volumes.iter().flatten() {
        if v.host_path.is_some() {
            no(
                "HostPathVolume",
                format!(
                    "volume {} is a hostPath: its data stays on the source node",
                    v.name
                ),
            );
        }
        if v.ephemeral.is_some() {
            no(
                "EphemeralVolume",
                format!(
                    "volume {} is a generic ephemeral volume: the target pod would get a new, empty one",
                    v.name
                ),
            );
        }
        let Some(pvc) = &v.persistent_volume_claim else {
            continue;
        };
        let claim_name = &pvc.claim_name;
        let Some(claim) = claims.get(claim_name).and_then(|c| c.claim.as_ref()) else {
            no(
                "MissingVolume",
                format!(
                    "volume {} uses claim {claim_name}, which does not exist",
                    v.name
                ),
            );
            continue;
        };
        let modes: Vec<&str> = claim
            .status
            .as_ref()
            .and_then(|s| s.access_modes.as_ref())
            .or(claim.spec.as_ref().and_then(|s| s.access_modes.as_ref()))
            .map(|m| m.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let many = modes.contains(&"ReadWriteMany") || modes.contains(&"ReadOnlyMany");
        if modes.contains(&"ReadWriteOncePod") {
            no(
                "ReadWriteOncePodVolume",
                format!(
                    "claim {claim_name} is ReadWriteOncePod: the target pod cannot mount it while the source runs"
                ),
            );
        } else if modes.contains(&"ReadWriteOnce") && !many && avoid_source_node {
            no(
                "ReadWriteOnceVolume",
                format!(
                    "claim {claim_name} is ReadWriteOnce: it can be mounted on one node only, and source and target run at once on two"
                ),
            );
        }
        if let Some(pv) = claims.get(claim_name).and_then(|c| c.volume.as_ref())
            && let Some(pv_spec) = &pv.spec
        {
            let pinned = pv_spec.local.is_some()
                || pv_spec.host_path.is_some()
                || pv_spec
                    .node_affinity
                    .as_ref()
                    .is_some_and(|a| a.required.is_some());
            if pinned && avoid_source_node {
                no(
                    "LocalVolume",
                    format!(
                        "claim {claim_name} is bound to volume {}, which lives on particular nodes",
                        pv.metadata.name.as_deref().unwrap_or("?")
                    ),
                );
            }
        }
    }

    for (k, v) in pod.metadata.annotations.iter().flatten() {
        let pins = IDENTITY_KEYS.contains(&k.as_str())
            || IDENTITY_SUFFIXES.iter().any(|s| k.ends_with(s))
            || (k == MULTUS_NETWORKS && (v.contains("\"ips\"") || v.contains("\"mac\"")));
        if pins {
            no(
                "IdentityAnnotation",
                format!(
                    "annotation {k} pins the pod's address, and the target pod would ask for the same one while the source holds it"
                ),
            );
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One message for a condition: the first reason, every problem's text.
pub fn summarize(problems: &[NotMigratable]) -> (&'static str, String) {
    let reason = problems.first().map_or("NotMigratable", |p| p.reason);
    let text = problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    (reason, format!("not migratable: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn pod(patch: Value) -> Pod {
        let mut base = json!({
            "metadata": {"name": "vm", "namespace": "vms"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "vmm", "image": "vmm"}],
                "initContainers": [{"name": "faultline-sidecar", "image": "s", "restartPolicy": "Always"}],
                "volumes": [{"name": "run", "emptyDir": {}}]
            }
        });
        merge(&mut base, patch);
        serde_json::from_value(base).expect("pod")
    }

    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn reasons(r: Result<(), Vec<NotMigratable>>) -> Vec<&'static str> {
        r.err()
            .unwrap_or_default()
            .iter()
            .map(|p| p.reason)
            .collect()
    }

    #[test]
    fn the_example_pod_shape_is_migratable() {
        assert_eq!(check(&pod(json!({})), &BTreeMap::new(), true), Ok(()));
    }

    #[test]
    fn controllers_restart_policies_and_init_containers_are_refused() {
        let p = pod(json!({
            "metadata": {"ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-123", "uid": "u", "controller": true},
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "keep", "uid": "c"}
            ]},
            "spec": {"restartPolicy": "Always",
                     "initContainers": [{"name": "setup", "image": "x"}]}
        }));
        let r = check(&p, &BTreeMap::new(), true);
        assert_eq!(
            reasons(r.clone()),
            ["ControlledPod", "RestartPolicy", "InitContainers"]
        );
        let (reason, msg) = summarize(&r.unwrap_err());
        assert_eq!(reason, "ControlledPod");
        assert!(
            msg.contains("ReplicaSet web-123") && msg.contains("setup"),
            "{msg}"
        );
        // The default restart policy is Always.
        let mut p = pod(json!({}));
        p.spec.as_mut().unwrap().restart_policy = None;
        assert_eq!(
            reasons(check(&p, &BTreeMap::new(), true)),
            ["RestartPolicy"]
        );
        // Init containers the owner says may run again.
        let p = pod(json!({
            "metadata": {"annotations": {ANNOTATION_RERUN_INIT: "true"}},
            "spec": {"initContainers": [{"name": "setup", "image": "x"}]}
        }));
        assert_eq!(check(&p, &BTreeMap::new(), true), Ok(()));
    }

    #[test]
    fn volumes_bound_to_a_node_or_a_pod_are_refused() {
        let p = pod(json!({"spec": {"volumes": [
            {"name": "run", "emptyDir": {}},
            {"name": "h", "hostPath": {"path": "/var/lib/vm"}},
            {"name": "e", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}}},
            {"name": "rwo", "persistentVolumeClaim": {"claimName": "disk"}},
            {"name": "rwx", "persistentVolumeClaim": {"claimName": "shared"}},
            {"name": "local", "persistentVolumeClaim": {"claimName": "fast"}},
            {"name": "gone", "persistentVolumeClaim": {"claimName": "nope"}}
        ]}}));
        let claim = |modes: Value, pv: Option<Value>| Claim {
            claim: Some(
                serde_json::from_value(
                    json!({"metadata": {"name": "c"}, "spec": {"accessModes": modes}}),
                )
                .unwrap(),
            ),
            volume: pv.map(|v| serde_json::from_value(v).unwrap()),
        };
        let claims = BTreeMap::from([
            ("disk".to_string(), claim(json!(["ReadWriteOnce"]), None)),
            ("shared".to_string(), claim(json!(["ReadWriteMany"]), None)),
            (
                "fast".to_string(),
                claim(
                    json!(["ReadWriteMany"]),
                    Some(
                        json!({"metadata": {"name": "pv-local"}, "spec": {"local": {"path": "/mnt/ssd"}}}),
                    ),
                ),
            ),
        ]);
        assert_eq!(
            reasons(check(&p, &claims, true)),
            [
                "HostPathVolume",
                "EphemeralVolume",
                "ReadWriteOnceVolume",
                "LocalVolume",
                "MissingVolume"
            ]
        );
        // Within one node a ReadWriteOnce claim and a local volume can follow the VM.
        assert_eq!(
            reasons(check(&p, &claims, false)),
            ["HostPathVolume", "EphemeralVolume", "MissingVolume"]
        );
    }

    #[test]
    fn pinned_addresses_are_refused() {
        let p = pod(json!({"metadata": {"annotations": {
            "cni.projectcalico.org/ipAddrs": "[\"10.0.0.5\"]",
            "ovn.kubernetes.io/mac_address": "00:00:00:aa:bb:cc",
            "k8s.v1.cni.cncf.io/networks": "[{\"name\": \"net1\", \"ips\": [\"192.168.1.5/24\"]}]",
            "prometheus.io/scrape": "true"
        }}}));
        assert_eq!(
            reasons(check(&p, &BTreeMap::new(), true)),
            ["IdentityAnnotation"; 3]
        );
        let p = pod(json!({"metadata": {"annotations": {
            "k8s.v1.cni.cncf.io/networks": "net1,net2"
        }}}));
        assert_eq!(check(&p, &BTreeMap::new(), true), Ok(()));
    }
}
