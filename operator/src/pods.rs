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
//!   `faultline.dev/role=target`, and is controlled by its migration until it succeeds.
//!
//! Pure functions only: nothing here talks to the API server.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::crd::VirtualMachineMigration;
use crate::sidecar::{DEFAULT_API_PORT, DEFAULT_MIGRATION_PORT};

pub const ANNOTATION_SIDECAR_PORT: &str = "faultline.dev/sidecar-port";
pub const ANNOTATION_MIGRATION_PORT: &str = "faultline.dev/migration-port";
pub const LABEL_MIGRATION_UID: &str = "faultline.dev/migration-uid";
pub const LABEL_ROLE: &str = "faultline.dev/role";
pub const ENV_INCOMING: &str = "FAULTLINE_INCOMING";

/// The target pod's name: derived from the source pod and the migration, so a restarted
/// operator finds the pod it created. At most 63 characters (it is also the pod's hostname).
pub fn target_pod_name(source_pod: &str, migration_uid: &str) -> String {
    let suffix: String = migration_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let mut base: String = source_pod.chars().take(63 - 5 - suffix.len()).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}-mig-{suffix}")
}

/// Name of the per-migration Secret.
pub fn secret_name(migration_uid: &str) -> String {
    format!("vmmig-{migration_uid}")
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
    /// Running, every container ready, with an IP.
    Ready,
    /// The scheduler found no node; the message says why.
    Unschedulable(String),
    /// Not ready yet (scheduling, pulling images, starting).
    Starting(String),
    /// Terminated: it will never become ready.
    Finished(String),
    /// Being deleted.
    Terminating,
}

pub fn pod_state(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Terminating;
    }
    let Some(status) = pod.status.as_ref() else {
        return PodState::Starting("no status yet".into());
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
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
    let ready = cond("Ready").is_some_and(|c| c.status == "True");
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

/// Whether `pod` was created as the target of the migration with this uid.
pub fn is_target_of(pod: &Pod, migration_uid: &str) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MIGRATION_UID))
        .is_some_and(|v| v == migration_uid)
}

/// Whether the migration still controls the pod (it hands control over on success).
pub fn controlled_by(pod: &Pod, uid: &str) -> bool {
    pod.metadata
        .owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)))
}

/// Checks that the migration's node selector can be combined with the source pod's.
pub fn check_node_selector(mig: &VirtualMachineMigration, source: &Pod) -> Result<(), String> {
    let own = source.spec.as_ref().and_then(|s| s.node_selector.as_ref());
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

/// Builds the target pod from the source pod: same containers and volumes, placed per the
/// migration's spec, starting its VMM in incoming mode, controlled by the migration.
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
    let annotations: BTreeMap<String, String> = source
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "kubectl.kubernetes.io/last-applied-configuration")
        .collect();

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(target_pod_name(source_name, uid)),
            namespace: source.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "faultline.dev/v1alpha1".into(),
                kind: "VirtualMachineMigration".into(),
                name: mig_name.into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
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
        let owner = &meta.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.kind, "VirtualMachineMigration");
        assert_eq!(owner.controller, Some(true));

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
        assert!(matches!(pod_state(&pod), PodState::Starting(_)));
        pod.status = Some(
            serde_json::from_value(json!({"phase": "Running", "podIP": "10.0.0.7",
            "conditions": [{"type": "Ready", "status": "True"}]}))
            .unwrap(),
        );
        assert_eq!(pod_state(&pod), PodState::Ready);
        pod.status = Some(
            serde_json::from_value(json!({"phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": "0/3 nodes are available"}]}))
            .unwrap(),
        );
        assert_eq!(
            pod_state(&pod),
            PodState::Unschedulable("0/3 nodes are available".into())
        );
        pod.status =
            Some(serde_json::from_value(json!({"phase": "Failed", "reason": "Evicted"})).unwrap());
        assert!(matches!(pod_state(&pod), PodState::Finished(m) if m.contains("Evicted")));
    }
}
