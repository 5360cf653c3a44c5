//! The CRD: the committed YAML is what the Rust types generate, and its schema (OpenAPI
//! ranges evaluated with a JSON-schema validator, CEL rules evaluated with kube-cel) rejects
//! the specs the API server must reject — the same ones `Policy::validate` rejects.

use std::path::PathBuf;

use faultline::sidecar_api::{self, MAX_COMPLETION_TIMEOUT_S, MAX_DOWNTIME_MS, MAX_PRECOPY_PASSES};
use faultline_operator::crd::{MigrationPolicy, VirtualMachineMigration, crd_yaml};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use proptest::prelude::*;
use serde_json::{Value, json};

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/virtualmachinemigrations.yaml")
}

fn schema() -> Value {
    let crd = VirtualMachineMigration::crd();
    let v = &crd.spec.versions[0];
    serde_json::to_value(
        v.schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("openAPIV3Schema"),
    )
    .expect("schema as JSON")
}

/// Validates `obj` as the API server would on create (or on update, given `old`): the
/// structural schema first, then the CEL rules. Returns every complaint.
struct ApiServerRules {
    schema: Value,
    structural: jsonschema::Validator,
    cel: kube_cel::Validator,
}

impl ApiServerRules {
    fn new() -> Self {
        let schema = schema();
        // OpenAPI v3.0 schemas are JSON Schema draft 4 with extensions (boolean
        // exclusiveMinimum, `x-kubernetes-*`, `nullable`), which draft 4 ignores or shares.
        let structural = jsonschema::draft4::new(&schema).expect("the schema compiles");
        Self {
            schema,
            structural,
            cel: kube_cel::Validator::new(),
        }
    }

    fn check(&self, obj: &Value, old: Option<&Value>) -> Vec<String> {
        let mut errs: Vec<String> = self
            .structural
            .iter_errors(obj)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if errs.is_empty()
            && let Err(e) = self.cel.validate(&self.schema, obj, old)
        {
            errs.extend(e.iter().map(|e| format!("{}: {}", e.field_path, e.message)));
        }
        errs
    }
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "faultline.dev/v1alpha1",
        "kind": "VirtualMachineMigration",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": spec,
    })
}

fn with_status(mut obj: Value, phase: &str) -> Value {
    obj["status"] = json!({"phase": phase});
    obj
}

#[test]
fn committed_crd_matches_the_types() {
    let generated = crd_yaml().expect("render");
    let committed = std::fs::read_to_string(committed_path()).unwrap_or_default();
    assert!(
        committed == generated,
        "crds/virtualmachinemigrations.yaml is out of date; regenerate it with\n\n    \
         cargo run -p faultline-operator -- crd > crds/virtualmachinemigrations.yaml\n"
    );
    // And it is a CRD Kubernetes can read back.
    let parsed: CustomResourceDefinition =
        serde_saphyr::from_str(&committed).expect("the committed YAML parses as a CRD");
    assert_eq!(parsed, VirtualMachineMigration::crd());
}

#[test]
fn crd_names_scope_columns_and_subresources() {
    let crd = VirtualMachineMigration::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("virtualmachinemigrations.faultline.dev")
    );
    assert_eq!(crd.spec.group, "faultline.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "VirtualMachineMigration");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["vmmig".to_string()][..])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.served && v.storage);
    assert!(
        v.subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let cols: Vec<(String, String, String)> = v
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| (c.name.clone(), c.json_path.clone(), c.type_.clone()))
        .collect();
    let want = [
        ("Phase", ".status.phase", "string"),
        ("Mode", ".status.mode", "string"),
        ("Progress", ".status.progress.percent", "integer"),
        ("Downtime", ".status.progress.downtime", "string"),
        ("Age", ".metadata.creationTimestamp", "date"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(cols, want);
}

#[test]
fn schema_limits_are_the_core_library_limits() {
    let s = schema();
    let p = &s["properties"]["spec"]["properties"]["policy"]["properties"];
    assert_eq!(
        p["precopyPasses"]["maximum"].as_f64(),
        Some(f64::from(MAX_PRECOPY_PASSES))
    );
    assert_eq!(
        p["maxDowntimeMs"]["maximum"].as_f64(),
        Some(MAX_DOWNTIME_MS as f64)
    );
    assert_eq!(
        p["completionTimeoutS"]["maximum"].as_f64(),
        Some(MAX_COMPLETION_TIMEOUT_S as f64)
    );
    // Defaults in the schema are the sidecar's defaults, so an omitted field means the same
    // to the API server, the operator and the sidecar; only the completion timeout is the
    // operator's, per GiB of guest memory.
    let mut d = sidecar_api::Policy::default();
    let back: MigrationPolicy =
        serde_json::from_value(s["properties"]["spec"]["properties"]["policy"]["default"].clone())
            .expect("policy default");
    d.completion_timeout_s = 4 * faultline_operator::crd::DEFAULT_COMPLETION_TIMEOUT_PER_GIB;
    assert_eq!(back.to_sidecar(4 << 30), d);
    // 64 GiB: two hours and forty minutes; a fixed timeout overrides.
    assert_eq!(back.completion_timeout(64 << 30), 9600);
    assert_eq!(back.completion_timeout(100 << 20), 150);
    let fixed: MigrationPolicy =
        serde_json::from_value(json!({"completionTimeoutS": 60})).expect("policy");
    assert_eq!(fixed.completion_timeout(64 << 30), 60);
}

#[test]
fn good_specs_are_accepted() {
    let rules = ApiServerRules::new();
    for spec in [
        json!({"source": {"pod": "web-vm"}}),
        json!({"source": {"pod": "web-vm.v2"}, "keepSource": true,
               "target": {"nodeSelector": {"zone": "b"}, "avoidSourceNode": false,
                          "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                              {"nodeSelectorTerms": [{"matchExpressions": [{"key": "kvm", "operator": "Exists"}]}]}}}},
               "policy": {"mode": "PostCopy", "precopyPasses": 0, "switchRule": "Passes",
                          "convergenceRatio": 1.0, "maxDowntimeMs": 600000, "bandwidthLimit": 1073741824,
                          "completionTimeoutS": 604800, "trap": "KvmUserfault"}}),
        json!({"source": {"pod": "a"}, "policy": {"mode": "PreCopy", "precopyPasses": 1,
               "convergenceRatio": 0.01, "maxDowntimeMs": 1, "completionTimeoutS": 1, "trap": "Userfaultfd"}}),
    ] {
        let errs = rules.check(&object(spec.clone()), None);
        assert!(errs.is_empty(), "{spec}: {errs:?}");
    }
}

#[test]
fn bad_specs_are_rejected_with_the_field_named() {
    let rules = ApiServerRules::new();
    let cases: &[(Value, &str)] = &[
        (json!({}), "source"),
        (json!({"source": {}}), "pod"),
        (json!({"source": {"pod": ""}}), "/spec/source/pod"),
        (json!({"source": {"pod": "Web_VM"}}), "/spec/source/pod"),
        (
            json!({"source": {"pod": "x".repeat(254)}}),
            "/spec/source/pod",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"mode": "Fast"}}),
            "/spec/policy/mode",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"mode": "pre-copy"}}),
            "/spec/policy/mode",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"precopyPasses": 1001}}),
            "/spec/policy/precopyPasses",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"precopyPasses": -1}}),
            "/spec/policy/precopyPasses",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"convergenceRatio": 0}}),
            "/spec/policy/convergenceRatio",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"convergenceRatio": 1.5}}),
            "/spec/policy/convergenceRatio",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"maxDowntimeMs": 0}}),
            "/spec/policy/maxDowntimeMs",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"maxDowntimeMs": 600001}}),
            "/spec/policy/maxDowntimeMs",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"completionTimeoutS": 0}}),
            "/spec/policy/completionTimeoutS",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"completionTimeoutS": 604801}}),
            "/spec/policy/completionTimeoutS",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"bandwidthLimit": -5}}),
            "/spec/policy/bandwidthLimit",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"trap": "ebpf"}}),
            "/spec/policy/trap",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"switchRule": "Never"}}),
            "/spec/policy/switchRule",
        ),
        (
            json!({"source": {"pod": "vm"}, "keepSource": "yes"}),
            "/spec/keepSource",
        ),
        (
            json!({"source": {"pod": "vm"}, "policy": {"mode": "PreCopy", "precopyPasses": 0}}),
            "policy",
        ),
    ];
    for (spec, field) in cases {
        let errs = rules.check(&object(spec.clone()), None);
        assert!(!errs.is_empty(), "accepted: {spec}");
        assert!(
            errs.iter().any(|e| e.contains(field)),
            "{spec}: the complaint does not name {field}: {errs:?}"
        );
    }
}

#[test]
fn pre_copy_without_passes_is_a_cel_rule_with_a_clear_message() {
    let rules = ApiServerRules::new();
    let errs = rules.check(
        &object(
            json!({"source": {"pod": "vm"}, "policy": {"mode": "PreCopy", "precopyPasses": 0}}),
        ),
        None,
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("at least one pre-copy pass"), "{errs:?}");
    // Omitted passes default to 8, so PreCopy alone is fine.
    let errs = rules.check(
        &object(json!({"source": {"pod": "vm"}, "policy": {"mode": "PreCopy"}})),
        None,
    );
    assert!(errs.is_empty(), "{errs:?}");
}

#[test]
fn spec_is_immutable_once_started() {
    let rules = ApiServerRules::new();
    let old_spec = json!({"source": {"pod": "vm"}, "policy": {"maxDowntimeMs": 300}});
    let new_spec = json!({"source": {"pod": "vm"}, "policy": {"maxDowntimeMs": 900}});
    // Before the operator has seen it, and while queued, the spec may change.
    assert!(
        rules
            .check(&object(new_spec.clone()), Some(&object(old_spec.clone())))
            .is_empty()
    );
    let pending = with_status(object(old_spec.clone()), "Pending");
    assert!(
        rules
            .check(
                &with_status(object(new_spec.clone()), "Pending"),
                Some(&pending)
            )
            .is_empty()
    );
    for phase in [
        "Scheduling",
        "Connecting",
        "PreCopy",
        "SwitchOver",
        "PostCopy",
        "Succeeded",
        "Failed",
        "Cancelled",
    ] {
        let old = with_status(object(old_spec.clone()), phase);
        let errs = rules.check(&with_status(object(new_spec.clone()), phase), Some(&old));
        assert!(
            errs.iter().any(|e| e.contains("spec is immutable")),
            "{phase}: {errs:?}"
        );
        // Status-only and metadata-only updates stay allowed.
        let mut relabelled = with_status(object(old_spec.clone()), "Succeeded");
        relabelled["metadata"]["labels"] = json!({"a": "b"});
        assert!(rules.check(&relabelled, Some(&old)).is_empty(), "{phase}");
    }
    // Defaults are applied to old and new alike first, so spelling a default out is no change.
    let old = with_status(object(json!({"source": {"pod": "vm"}})), "PreCopy");
    let explicit = with_status(
        object(json!({"source": {"pod": "vm"}, "policy": {"maxDowntimeMs": 300}})),
        "PreCopy",
    );
    assert!(rules.check(&explicit, Some(&old)).is_empty());
}

/// Policies the sidecar would reject are exactly the ones the API server rejects.
fn policy_value() -> impl Strategy<Value = Value> {
    let mode = prop_oneof![Just("PreCopy"), Just("PostCopy"), Just("Hybrid")];
    let passes = prop_oneof![Just(0u64), Just(1), Just(1000), Just(1001), 0u64..1200];
    let ratio = prop_oneof![
        Just(0.0f64),
        Just(1.0),
        Just(1.0000001),
        Just(-0.5),
        0.0f64..1.2
    ];
    let downtime = prop_oneof![
        Just(0u64),
        Just(1),
        Just(600_000),
        Just(600_001),
        0u64..700_000
    ];
    let timeout = prop_oneof![
        Just(0u64),
        Just(1),
        Just(604_800),
        Just(604_801),
        0u64..700_000
    ];
    (mode, passes, ratio, downtime, timeout, any::<u32>()).prop_map(|(m, p, r, d, t, bw)| {
        json!({"mode": m, "precopyPasses": p, "convergenceRatio": r, "maxDowntimeMs": d,
               "completionTimeoutS": t, "bandwidthLimit": bw})
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn schema_agrees_with_policy_validate(policy in policy_value()) {
        thread_local! { static RULES: ApiServerRules = ApiServerRules::new(); }
        let accepted = RULES.with(|r| r.check(&object(json!({"source": {"pod": "vm"}, "policy": policy.clone()})), None).is_empty());
        let sidecar = serde_json::from_value::<MigrationPolicy>(policy.clone())
            .ok()
            .map(|p| p.validate());
        let sidecar_ok = matches!(sidecar, Some(Ok(())));
        prop_assert_eq!(accepted, sidecar_ok, "policy {} sidecar says {:?}", policy, sidecar);
    }
}

/// Checks the rules of a structural schema (what the API server requires of a CRD's
/// openAPIV3Schema) on one node and below; returns every violation with its path.
fn structural_violations(node: &Value, path: &str, in_junctor: bool, out: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        out.push(format!("{path}: not a schema object"));
        return;
    };
    for forbidden in [
        "$ref",
        "definitions",
        "$defs",
        "$schema",
        "patternProperties",
        "dependencies",
    ] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: `{forbidden}` is not allowed"));
        }
    }
    let escape = obj.contains_key("x-kubernetes-int-or-string")
        || obj.contains_key("x-kubernetes-preserve-unknown-fields");
    if in_junctor {
        for k in [
            "type",
            "default",
            "additionalProperties",
            "nullable",
            "description",
        ] {
            if obj.contains_key(k) {
                out.push(format!("{path}: `{k}` inside allOf/anyOf/oneOf/not"));
            }
        }
    } else if !escape && !obj.contains_key("type") {
        out.push(format!("{path}: no `type`"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!(
            "{path}: both `properties` and `additionalProperties`"
        ));
    }
    if let Some(t) = obj.get("type").and_then(Value::as_str)
        && !["object", "array", "string", "integer", "number", "boolean"].contains(&t)
    {
        out.push(format!("{path}: type `{t}`"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural_violations(v, &format!("{path}.{k}"), in_junctor, out);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_violations(items, &format!("{path}[]"), in_junctor, out);
    }
    if let Some(ap) = obj.get("additionalProperties")
        && ap.is_object()
    {
        structural_violations(ap, &format!("{path}{{}}"), in_junctor, out);
    }
    for j in ["allOf", "anyOf", "oneOf"] {
        for (i, s) in obj
            .get(j)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            structural_violations(s, &format!("{path}.{j}[{i}]"), true, out);
        }
    }
    if let Some(n) = obj.get("not") {
        structural_violations(n, &format!("{path}.not"), true, out);
    }
}

#[test]
fn the_schema_is_structural() {
    let s = schema();
    let mut out = Vec::new();
    structural_violations(&s, "", false, &mut out);
    assert!(out.is_empty(), "{out:#?}");
    // The root may only hold apiVersion, kind, metadata, spec and status.
    let keys: Vec<&String> = s["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .collect();
    for k in keys {
        assert!(
            ["apiVersion", "kind", "metadata", "spec", "status"].contains(&k.as_str()),
            "{k}"
        );
    }
    // Every default is valid against the schema it sits in (the API server checks that too):
    // an object whose spec is all defaults passes.
    let rules = ApiServerRules::new();
    assert!(
        rules
            .check(&object(json!({"source": {"pod": "vm"}})), None)
            .is_empty()
    );
    // Every CEL rule compiles (kube-cel reports compile errors as validation errors).
    let compiled = kube_cel::compile_schema(&s);
    assert!(
        !compiled.has_errors(),
        "{:?}",
        compiled.compilation_errors()
    );
}
