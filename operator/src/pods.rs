//! Pods as the operator sees them: building the target pod from the source pod, reading a
//! pod's readiness and scheduling state, and finding a pod's sidecar.
//!
//! Conventions owned here (documented in docs/operator.md):
//! - a pod's sidecar listens on the pod IP, port 9180, unless the pod annotation
//!   `faultline.dev/sidecar-port` says otherwise; its migration port is 9181 or
//!   `faultline.dev/migration-port`;
//! - every container of a target pod gets `FAULTLINE_INCOMING=true`, which makes
//!   `faultline-vmm` (and any VMM following the convention) start in incoming mode;
//! - a target pod is labelled `faultline.dev/migration-uid=<migration uid>` and
//!   `faultline.dev/role=target` (until it succeeds). It has **no** owner reference to its
//!   migration: a dependent of the migration would be deleted by the garbage collector on a
//!   foreground deletion, even after the point of no return, when it holds the only VM. The
//!   migration's finalizer deletes a target that must go;
//! - a target pod carries the readiness gate `faultline.dev/vm-running`, which the operator
//!   sets once the VM runs there, so it joins Service endpoints only then;
//! - a target pod records, in the annotation `faultline.dev/placement`, the placement
//!   (nodeSelector, affinity) of the pod the VM was first migrated from: each migration adds
//!   its own placement to that one, never to the last migration's.
//!
//! Pure functions only: nothing here talks to the API server.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodReadinessGate, PodSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::{Deserialize, Serialize};

use crate::crd::VirtualMachineMigration;
use crate::sidecar::{DEFAULT_API_PORT, DEFAULT_MIGRATION_PORT};

pub const ANNOTATION_SIDECAR_PORT: &str = "faultline.dev/sidecar-port";
pub const ANNOTATION_MIGRATION_PORT: &str = "faultline.dev/migration-port";
pub const LABEL_MIGRATION_UID: &str = "faultline.dev/migration-uid";
pub const LABEL_ROLE: &str = "faultline.dev/role";
pub const ENV_INCOMING: &str = "FAULTLINE_INCOMING";
pub const ANNOTATION_PLACEMENT: &str = "faultline.dev/placement";
/// Names a target pod's migration (label values are too short for every migration name).
pub const ANNOTATION_MIGRATION: &str = "faultline.dev/migration";
/// The readiness gate of target pods: true once the VM runs in the pod.
pub const CONDITION_VM_RUNNING: &str = "faultline.dev/vm-running";

/// The target pod's name: derived from the source pod and the migration, so a restarted
/// operator finds the pod it created. At most 63 characters (it is also the pod's hostname).
pub fn target_pod_name(source_pod: &str, migration_uid: &str) -> String {
    let suffix: String = migration_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    // A VM that moves again keeps its first name: `vm-mig-1a2b3c4d` moves to `vm-mig-5e6f…`,
    // not `vm-mig-1a2b3c4d-mig-5e6f…`.
    let stem = match source_pod.rsplit_once("-mig-") {
        Some((stem, tail))
            if !stem.is_empty()
                && tail.len() == 8
                && tail
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) =>
        {
            stem
        }
        _ => source_pod,
    };
    let mut base: String = stem.chars().take(63 - 5 - suffix.len()).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}-mig-{suffix}")
}

/// Where a pod's sidecar serves its control API.
pub fn sidecar_port(pod: &Pod) -> Result<u16, String> {
    port_annotation(pod, ANNOTATION_SIDECAR_PORT, DEFAULT_API_PORT)
}

/// Where a (target) pod's sidecar accepts migration connections, if the pod says; otherwise
/// the sidecar's own report (`NodeInfo::migration_port`) or the default applies.
pub fn migration_port_annotation(pod: &Pod) -> Result<Option<u16>, String> {
    match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_MIGRATION_PORT))
    {
        None => Ok(None),
        Some(_) => {
            port_annotation(pod, ANNOTATION_MIGRATION_PORT, DEFAULT_MIGRATION_PORT).map(Some)
        }
    }
}

fn port_annotation(pod: &Pod, key: &str, default: u16) -> Result<u16, String> {
    match pod.metadata.annotations.as_ref().and_then(|a| a.get(key)) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!(
                "pod annotation {key}={v:?} is not a port number (1-65535)"
            )),
        },
    }
}

/// The pod's IP, once it has one.
pub fn pod_ip(pod: &Pod) -> Result<Option<IpAddr>, String> {
    match pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        None | Some("") => Ok(None),
        Some(ip) => ip
            .parse()
            .map(Some)
            .map_err(|e| format!("pod IP {ip:?} does not parse: {e}")),
    }
}

/// What a pod is doing, as far as a migration cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Running with an IP, and ready in the sense asked for.
    Ready,
    /// The scheduler found no node; the message says why.
    Unschedulable(String),
    /// Not ready yet (scheduling, pulling images, starting).
    Starting(String),
    /// It will never become ready: the pod ended, or one of its containers terminated and
    /// will not be restarted (a VMM that exits under `restartPolicy: Never`).
    Finished(String),
    /// Being deleted.
    Terminating,
}

/// What "ready" means for a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyWhen {
    /// The pod's Ready condition: every container and readiness gate (a source VM pod).
    Pod,
    /// The container serving the sidecar API on this port is ready (a target pod: its VMM
    /// waits in incoming mode, so its other containers' probes may not pass yet, and its
    /// readiness gate is set only once the VM runs there). Without a container declaring the
    /// port, every container must be ready.
    Sidecar { port: u16 },
}

pub fn pod_state(pod: &Pod, when: ReadyWhen) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    let Some(status) = pod.status.as_ref() else {
        return PodState::Starting("no status yet".into());
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let never_restarts =
        pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("Never");
    if never_restarts
        && let Some(why) = status.container_statuses.iter().flatten().find_map(|c| {
            let t = c.state.as_ref()?.terminated.as_ref()?;
            Some(format!(
                "container {} terminated ({}, exit code {}) and is never restarted",
                c.name,
                t.reason.as_deref().unwrap_or("no reason given"),
                t.exit_code
            ))
        })
    {
        return PodState::Finished(why);
    }
    if matches!(phase, "Failed" | "Succeeded") {
        let why = status
            .message
            .clone()
            .or_else(|| status.reason.clone())
            .unwrap_or_default();
        return PodState::Finished(format!("pod phase {phase} {why}").trim().to_string());
    }
    let cond = |t: &str| {
        status
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == t))
    };
    if let Some(c) = cond("PodScheduled")
        && c.status == "False"
        && c.reason.as_deref() == Some("Unschedulable")
    {
        return PodState::Unschedulable(c.message.clone().unwrap_or_else(|| "no node fits".into()));
    }
    let ready = match when {
        ReadyWhen::Pod => cond("Ready").is_some_and(|c| c.status == "True"),
        ReadyWhen::Sidecar { port } => match sidecar_container(pod, port) {
            Some(name) => status
                .container_statuses
                .iter()
                .flatten()
                .chain(status.init_container_statuses.iter().flatten())
                .any(|c| c.name == name && c.ready),
            None => cond("ContainersReady").is_some_and(|c| c.status == "True"),
        },
    };
    let has_ip = matches!(pod_ip(pod), Ok(Some(_)));
    if phase == "Running" && ready && has_ip {
        return PodState::Ready;
    }
    let mut why = format!("pod phase {phase}");
    if !ready {
        why.push_str(", not ready");
        // Say which container holds it up and why, when the kubelet says.
        if let Some(w) = status.container_statuses.as_ref().and_then(|cs| {
            cs.iter().find_map(|c| {
                let waiting = c.state.as_ref()?.waiting.as_ref()?;
                Some(format!(
                    " ({}: {})",
                    c.name,
                    waiting.reason.clone().unwrap_or_else(|| "waiting".into())
                ))
            })
        }) {
            why.push_str(&w);
        }
    }
    if !has_ip {
        why.push_str(", no IP yet");
    }
    PodState::Starting(why)
}

/// The container (or native sidecar: a restartable init container) that declares the
/// sidecar API's port.
pub fn sidecar_container(pod: &Pod, port: u16) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| {
            c.ports
                .iter()
                .flatten()
                .any(|p| p.container_port == i32::from(port))
        })
        .map(|c| c.name.clone())
}

/// Whether `pod` was created as the target of the migration with this uid.
pub fn is_target_of(pod: &Pod, migration_uid: &str) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MIGRATION_UID))
        .is_some_and(|v| v == migration_uid)
}

/// Whether the pod is still a migration's target: created as one and not yet handed over
/// (success removes the role label).
pub fn is_unfinished_target(pod: &Pod) -> Option<&str> {
    let labels = pod.metadata.labels.as_ref()?;
    if labels.get(LABEL_ROLE).map(String::as_str) != Some("target") {
        return None;
    }
    labels.get(LABEL_MIGRATION_UID).map(String::as_str)
}

/// The placement the VM's first pod had, before any migration added its own.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// The pod's own placement: from its `faultline.dev/placement` annotation if a migration made
/// it, else its spec.
pub fn original_placement(pod: &Pod) -> Result<Placement, String> {
    if let Some(text) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_PLACEMENT))
    {
        return serde_json::from_str(text)
            .map_err(|e| format!("pod annotation {ANNOTATION_PLACEMENT} does not parse: {e}"));
    }
    let spec = pod.spec.as_ref();
    Ok(Placement {
        node_selector: spec
            .and_then(|s| s.node_selector.clone())
            .filter(|m| !m.is_empty()),
        affinity: spec.and_then(|s| s.affinity.clone()),
    })
}

/// Checks that the migration's node selector can be combined with the VM's own placement.
pub fn check_node_selector(mig: &VirtualMachineMigration, source: &Pod) -> Result<(), String> {
    let placement = original_placement(source)?;
    let own = placement.node_selector.as_ref();
    for (k, v) in &mig.spec.target.node_selector {
        if let Some(theirs) = own.and_then(|m| m.get(k))
            && theirs != v
        {
            return Err(format!(
                "spec.target.nodeSelector {k}={v} contradicts the source pod's nodeSelector {k}={theirs}"
            ));
        }
    }
    Ok(())
}

/// Builds the target pod from the source pod: same containers and volumes, placed by the VM's
/// own placement plus the migration's, starting its VMM in incoming mode, ready for Services
/// only once the VM runs there.
pub fn build_target_pod(
    mig: &VirtualMachineMigration,
    source: &Pod,
    source_node: &str,
) -> Result<Pod, String> {
    let uid = mig
        .metadata
        .uid
        .as_deref()
        .ok_or("the migration has no uid yet")?;
    let mig_name = mig
        .metadata
        .name
        .as_deref()
        .ok_or("the migration has no name")?;
    let source_name = source
        .metadata
        .name
        .as_deref()
        .ok_or("source pod has no name")?;
    let mut spec: PodSpec = source.spec.clone().ok_or("source pod has no spec")?;

    // Not the source's node binding: the scheduler places the target.
    spec.node_name = None;
    // Ephemeral (debug) containers belong to the source pod's life, not the VM's.
    spec.ephemeral_containers = None;
    // The service-account token volume is injected per pod by admission; a copied one would
    // shadow the target's own.
    strip_injected_token_volumes(&mut spec);

    for c in &mut spec.containers {
        let env = c.env.get_or_insert_with(Vec::new);
        env.retain(|e| e.name != ENV_INCOMING);
        env.push(EnvVar {
            name: ENV_INCOMING.into(),
            value: Some("true".into()),
            value_from: None,
        });
    }

    // Placement belongs to one migration: start from the VM's own, never from what an
    // earlier migration added.
    let placement = original_placement(source)?;
    spec.node_selector = placement.node_selector.clone();
    spec.affinity = placement.affinity.clone();
    if !mig.spec.target.node_selector.is_empty() {
        let sel = spec.node_selector.get_or_insert_with(BTreeMap::new);
        for (k, v) in &mig.spec.target.node_selector {
            sel.insert(k.clone(), v.clone());
        }
    }
    if let Some(a) = &mig.spec.target.affinity {
        spec.affinity = Some(a.clone());
    }
    if mig.spec.target.avoid_source_node {
        avoid_node(&mut spec, source_node);
    }
    let gates = spec.readiness_gates.get_or_insert_with(Vec::new);
    if !gates
        .iter()
        .any(|g| g.condition_type == CONDITION_VM_RUNNING)
    {
        gates.push(PodReadinessGate {
            condition_type: CONDITION_VM_RUNNING.into(),
        });
    }

    let mut labels: BTreeMap<String, String> = source
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("faultline.dev/"))
        .collect();
    labels.insert(LABEL_MIGRATION_UID.into(), uid.into());
    labels.insert(LABEL_ROLE.into(), "target".into());
    let mut annotations: BTreeMap<String, String> = source
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "kubectl.kubernetes.io/last-applied-configuration")
        .collect();
    annotations.insert(ANNOTATION_MIGRATION.into(), mig_name.into());
    annotations.insert(
        ANNOTATION_PLACEMENT.into(),
        serde_json::to_string(&placement).map_err(|e| format!("encoding the placement: {e}"))?,
    );
    // Whatever owns the VM pod without controlling it owns its new home too, so garbage
    // collection treats both alike. Controlled pods are refused before anything moves
    // (migratable.rs). blockOwnerDeletion needs a permission on every owner's kind, so it
    // is not set.
    let owners: Vec<OwnerReference> = source
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller != Some(true))
        .map(|o| OwnerReference {
            block_owner_deletion: None,
            ..o.clone()
        })
        .collect();

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(target_pod_name(source_name, uid)),
            namespace: source.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: (!owners.is_empty()).then_some(owners),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

fn strip_injected_token_volumes(spec: &mut PodSpec) {
    let injected: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.name.starts_with("kube-api-access-") && v.projected.is_some())
        .map(|v| v.name.clone())
        .collect();
    if injected.is_empty() {
        return;
    }
    if let Some(vols) = spec.volumes.as_mut() {
        vols.retain(|v| !injected.contains(&v.name));
    }
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten())
    {
        if let Some(m) = c.volume_mounts.as_mut() {
            m.retain(|m| !injected.contains(&m.name));
        }
    }
}

/// Adds a required node affinity excluding `node` by name (`metadata.name NotIn [node]`) to
/// every required term, so it holds whichever term the scheduler picks.
fn avoid_node(spec: &mut PodSpec, node: &str) {
    let req = NodeSelectorRequirement {
        key: "metadata.name".into(),
        operator: "NotIn".into(),
        values: Some(vec![node.into()]),
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    let required = na
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: Vec::new(),
        });
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        let fields = term.match_fields.get_or_insert_with(Vec::new);
        if !fields.contains(&req) {
            fields.push(req.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MigrationSource, VirtualMachineMigrationSpec};
    use serde_json::json;

    fn source_pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web-vm", "namespace": "vms", "uid": "src-uid",
                "labels": {"app": "web", "faultline.dev/role": "target",
                           "faultline.dev/migration-uid": "old"},
                "annotations": {"faultline.dev/sidecar-port": "9200",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {
                "nodeName": "node-a",
                "nodeSelector": {"kvm": "true"},
                "containers": [
                    {"name": "vmm", "image": "faultline-vmm",
                     "args": ["--control", "/run/faultline/vmm.sock"],
                     "env": [{"name": "FAULTLINE_INCOMING", "value": "false"}],
                     "volumeMounts": [{"name": "run", "mountPath": "/run/faultline"},
                        {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]},
                    {"name": "sidecar", "image": "faultline-sidecar",
                     "args": ["--vmm-socket", "/run/faultline/vmm.sock"]}
                ],
                "volumes": [{"name": "run", "emptyDir": {}},
                            {"name": "kube-api-access-x1", "projected": {"sources": []}}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7"}
        }))
        .expect("pod")
    }

    fn migration(target: serde_json::Value) -> VirtualMachineMigration {
        let mut m = VirtualMachineMigration::new(
            "mig-1",
            VirtualMachineMigrationSpec {
                source: MigrationSource {
                    pod: "web-vm".into(),
                },
                target: serde_json::from_value(target).expect("placement"),
                policy: Default::default(),
                keep_source: false,
            },
        );
        m.metadata.namespace = Some("vms".into());
        m.metadata.uid = Some("0d9c5b4e-1111-2222-3333-444455556666".into());
        m
    }

    #[test]
    fn target_pod_follows_the_conventions() {
        let mig = migration(json!({"nodeSelector": {"zone": "b"}}));
        let pod = build_target_pod(&mig, &source_pod(), "node-a").expect("build");
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("web-vm-mig-0d9c5b4e"));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["app"], "web");
        assert_eq!(
            labels[LABEL_MIGRATION_UID],
            mig.metadata.uid.clone().unwrap()
        );
        assert_eq!(labels[LABEL_ROLE], "target");
        let ann = meta.annotations.as_ref().expect("annotations");
        assert_eq!(ann[ANNOTATION_SIDECAR_PORT], "9200");
        assert!(!ann.contains_key("kubectl.kubernetes.io/last-applied-configuration"));
        // No owner reference to the migration: a foreground deletion of the migration must
        // never take the VM's new home with it.
        assert_eq!(meta.owner_references, None);
        let placement: Placement = serde_json::from_str(&ann[ANNOTATION_PLACEMENT]).unwrap();
        assert_eq!(
            placement.node_selector,
            Some(BTreeMap::from([("kvm".to_string(), "true".to_string())]))
        );

        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name, None);
        assert_eq!(spec.node_selector.as_ref().unwrap()["zone"], "b");
        assert_eq!(spec.node_selector.as_ref().unwrap()["kvm"], "true");
        for c in &spec.containers {
            let env = c.env.as_ref().expect("env");
            let incoming: Vec<_> = env.iter().filter(|e| e.name == ENV_INCOMING).collect();
            assert_eq!(incoming.len(), 1, "{}", c.name);
            assert_eq!(incoming[0].value.as_deref(), Some("true"));
            assert!(
                c.volume_mounts
                    .iter()
                    .flatten()
                    .all(|m| !m.name.starts_with("kube-api-access-"))
            );
        }
        assert_eq!(spec.volumes.as_ref().unwrap().len(), 1);
        assert_eq!(
            spec.readiness_gates.as_ref().unwrap()[0].condition_type,
            CONDITION_VM_RUNNING
        );
        let terms = &spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("required node affinity")
            .node_selector_terms;
        assert_eq!(terms.len(), 1);
        let f = &terms[0].match_fields.as_ref().unwrap()[0];
        assert_eq!(
            (f.key.as_str(), f.operator.as_str(), f.values.as_deref()),
            ("metadata.name", "NotIn", Some(&["node-a".to_string()][..]))
        );
    }

    #[test]
    fn anti_affinity_is_added_to_every_term_of_a_given_affinity_and_can_be_turned_off() {
        let aff = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}
        ]}}});
        let mig = migration(json!({"affinity": aff}));
        let pod = build_target_pod(&mig, &source_pod(), "node-a").expect("build");
        let terms = pod
            .spec
            .unwrap()
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        assert_eq!(terms.len(), 2);
        for t in terms {
            assert_eq!(t.match_expressions.as_ref().unwrap().len(), 1);
            assert_eq!(
                t.match_fields.as_ref().unwrap()[0].values.as_ref().unwrap()[0],
                "node-a"
            );
        }
        let mig = migration(json!({"avoidSourceNode": false}));
        let pod = build_target_pod(&mig, &source_pod(), "node-a").expect("build");
        assert!(pod.spec.unwrap().affinity.is_none());
    }

    #[test]
    fn placement_belongs_to_one_migration_so_a_vm_can_come_back() {
        // A -> B: the target avoids node-a.
        let there = migration(json!({"nodeSelector": {"zone": "b"}}));
        let mut on_b = build_target_pod(&there, &source_pod(), "node-a").expect("build");
        on_b.spec.as_mut().unwrap().node_name = Some("node-b".into());
        // B -> A: built from the migrated pod, it avoids node-b only and keeps no zone.
        let mut back = migration(json!({}));
        back.metadata.uid = Some("9f9f9f9f-1111-2222-3333-444455556666".into());
        let pod = build_target_pod(&back, &on_b, "node-b").expect("build");
        let spec = pod.spec.clone().unwrap();
        assert_eq!(
            spec.node_selector,
            Some(BTreeMap::from([("kvm".to_string(), "true".to_string())]))
        );
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        let excluded: Vec<String> = terms
            .iter()
            .flat_map(|t| t.match_fields.iter().flatten())
            .flat_map(|f| f.values.clone().unwrap_or_default())
            .collect();
        assert_eq!(excluded, ["node-b"]);
        // The original placement is carried on unchanged.
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[ANNOTATION_PLACEMENT],
            on_b.metadata.annotations.as_ref().unwrap()[ANNOTATION_PLACEMENT]
        );
        // And a later migration to another zone is no contradiction.
        let other_zone = migration(json!({"nodeSelector": {"zone": "c"}}));
        assert!(check_node_selector(&other_zone, &pod).is_ok());
    }

    #[test]
    fn owners_that_do_not_control_follow_the_vm_without_blocking() {
        let mut src = source_pod();
        src.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "example.com/v1".into(),
            kind: "VmGroup".into(),
            name: "group".into(),
            uid: "g".into(),
            controller: None,
            block_owner_deletion: Some(true),
        }]);
        let pod = build_target_pod(&migration(json!({})), &src, "node-a").expect("build");
        let owners = pod.metadata.owner_references.unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "VmGroup");
        assert_eq!(owners[0].block_owner_deletion, None);
    }

    #[test]
    fn node_selector_contradiction_is_reported() {
        let mig = migration(json!({"nodeSelector": {"kvm": "false"}}));
        let e = check_node_selector(&mig, &source_pod()).expect_err("contradiction");
        assert!(e.contains("kvm=false") && e.contains("kvm=true"), "{e}");
        let mig = migration(json!({"nodeSelector": {"kvm": "true", "zone": "c"}}));
        assert!(check_node_selector(&mig, &source_pod()).is_ok());
    }

    #[test]
    fn names_stay_short_and_valid() {
        let long = "a".repeat(200);
        let n = target_pod_name(&long, "ABCDEF12-3456");
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("-mig-abcdef12"), "{n}");
        let n = target_pod_name(&format!("{}-x", "b".repeat(48)), "12345678");
        assert!(!n.contains("--"), "{n}");
        // Moving again does not grow the name.
        assert_eq!(
            target_pod_name("vm-mig-0d9c5b4e", "9f9f9f9f-1"),
            "vm-mig-9f9f9f9f"
        );
        assert_eq!(
            target_pod_name("vm-mig-short", "9f9f9f9f-1"),
            "vm-mig-short-mig-9f9f9f9f"
        );
    }

    #[test]
    fn ports_come_from_annotations_or_defaults() {
        let mut pod = source_pod();
        assert_eq!(sidecar_port(&pod), Ok(9200));
        assert_eq!(migration_port_annotation(&pod), Ok(None));
        pod.metadata.annotations = Some(BTreeMap::from([(
            ANNOTATION_MIGRATION_PORT.to_string(),
            "x".to_string(),
        )]));
        assert_eq!(sidecar_port(&pod), Ok(DEFAULT_API_PORT));
        assert!(migration_port_annotation(&pod).is_err());
    }

    #[test]
    fn pod_states() {
        let mut pod = source_pod();
        assert!(matches!(
            pod_state(&pod, ReadyWhen::Pod),
            PodState::Starting(_)
        ));
        pod.status = Some(
            serde_json::from_value(json!({"phase": "Running", "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True"}]}))
            .unwrap(),
        );
        assert_eq!(pod_state(&pod, ReadyWhen::Pod), PodState::Ready);
        pod.status = Some(
            serde_json::from_value(json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": "0/3 nodes are available"}]}))
            .unwrap(),
        );
        assert_eq!(
            pod_state(&pod, ReadyWhen::Pod),
            PodState::Unschedulable("0/3 nodes are available".into())
        );
        pod.status =
            Some(serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted"})).unwrap());
        assert!(
            matches!(pod_state(&pod, ReadyWhen::Pod), PodState::Finished(m) if m.contains("Evicted"))
        );
    }

    #[test]
    fn a_target_is_ready_when_its_sidecar_is_and_a_dead_vmm_never_comes_back() {
        let mut pod = source_pod();
        {
            let spec = pod.spec.as_mut().unwrap();
            spec.restart_policy = Some("Never".into());
            spec.containers[1].ports = Some(vec![
                serde_json::from_value(json!({"containerPort": 9200})).unwrap(),
            ]);
        }
        // The VMM container is not ready (incoming), the sidecar is, the gate is unset.
        pod.status = Some(
            serde_json::from_value(json!({"phase": "Running", "podIP": "10.0.0.8",
                "conditions": [{"type": "Ready", "status": "False"},
                               {"type": "ContainersReady", "status": "False"}],
                "containerStatuses": [
                    {"name": "vmm", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                     "state": {"running": {}}},
                    {"name": "sidecar", "ready": true, "restartCount": 0, "image": "i", "imageID": "",
                     "state": {"running": {}}}]}))
            .unwrap(),
        );
        assert_eq!(
            pod_state(&pod, ReadyWhen::Sidecar { port: 9200 }),
            PodState::Ready
        );
        assert!(matches!(
            pod_state(&pod, ReadyWhen::Pod),
            PodState::Starting(_)
        ));
        // No container declares the port: every container must be ready.
        assert!(matches!(
            pod_state(&pod, ReadyWhen::Sidecar { port: 9180 }),
            PodState::Starting(_)
        ));
        // The VMM exited under restartPolicy Never: it never comes back.
        let st = pod.status.as_mut().unwrap();
        st.container_statuses.as_mut().unwrap()[0].state = Some(
            serde_json::from_value(json!({"terminated": {"exitCode": 137, "reason": "Error"}}))
                .unwrap(),
        );
        assert!(matches!(
            pod_state(&pod, ReadyWhen::Sidecar { port: 9200 }),
            PodState::Finished(m) if m.contains("vmm") && m.contains("137")
        ));
    }
}
