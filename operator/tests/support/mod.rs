//! Test cluster for the reconciler: the Kubernetes API server is the only stand-in.
//!
//! - **API server.** `kube::Client` talks to a `tower_test::mock::pair`; a task answers each
//!   request from an in-memory object store with the API server's semantics that the operator
//!   relies on: create/get/list/patch (JSON merge patch, resourceVersion preconditions)/
//!   status replace (resourceVersion checked)/delete (uid preconditions, finalizers,
//!   owner-reference garbage collection), Kubernetes `Status` errors. Every request is logged
//!   as `METHOD /path?query` so tests assert the exact calls the reconciler makes.
//! - **Scheduler and kubelet.** A pod created through the API is scheduled onto one of three
//!   nodes honouring nodeSelector and required node affinity (or reported Unschedulable), and
//!   its containers are started as REAL processes: `faultline-vmm` and `faultline-sidecar`
//!   with the container's args and env, the pod's emptyDir at `/run/faultline` mapped to a
//!   private directory, and the sidecar's listen addresses moved to free loopback ports (every
//!   pod here shares 127.0.0.1). Once the sidecar reports ready the pod is Running/Ready with
//!   podIP 127.0.0.1 and the `faultline.dev/sidecar-port` / `migration-port` annotations set to
//!   the ports it got (an admission step a real cluster does not need, since each pod has its
//!   own IP). Deleting a pod kills its processes.
//!
//! The VMM and sidecar binaries come from the same target directory as the test (build the
//! workspace; `scripts/test` does).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultline_operator::crd::VirtualMachineMigration;
use faultline_operator::metrics::Metrics;
use faultline_operator::reconcile::{self, Clock, Config, Context};
use http::{Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

pub const NS: &str = "vms";

/// The operator's PKI on the local CA, which the local sidecars' certificates come from.
pub fn operator_pki() -> Arc<faultline_operator::pki::OperatorPki> {
    let local = faultline_local::pki::local().expect("local PKI");
    Arc::new(
        faultline_operator::pki::OperatorPki::new(local.ca.clone(), vec![7; 32])
            .expect("operator PKI"),
    )
}

/// A client for a local sidecar, as the operator dials it (namespace [`NS`]).
pub fn sidecar_client(
    api: std::net::SocketAddr,
    timeout: Duration,
) -> faultline_operator::sidecar::SidecarClient {
    faultline_operator::sidecar::SidecarClient::new(
        api,
        timeout,
        operator_pki().client_config(),
        NS,
    )
}

/// A small memtouch VM on memfd memory: the `faultline-vmm` arguments of a test pod.
pub const VM: &[&str] = &["--memory", "64M", "--vcpus", "1", "--backing", "memfd"];

/// The same VM writing hard, so pre-copy passes keep finding dirty pages.
pub const BUSY_VM: &[&str] = &[
    "--memory",
    "64M",
    "--vcpus",
    "1",
    "--backing",
    "memfd",
    "--dirty-rate",
    "heavy",
];

/// Nodes of the fake cluster: name and labels.
pub fn nodes() -> Vec<(&'static str, Value)> {
    vec![
        (
            "node-a",
            json!({"kubernetes.io/hostname": "node-a", "zone": "a", "kvm": "true"}),
        ),
        (
            "node-b",
            json!({"kubernetes.io/hostname": "node-b", "zone": "b", "kvm": "true"}),
        ),
        (
            "node-c",
            json!({"kubernetes.io/hostname": "node-c", "zone": "c"}),
        ),
    ]
}

/// True when KVM can be opened; tests that run VMs skip otherwise, or fail where
/// `FAULTLINE_REQUIRE_KVM` is set (CI), by the one rule in `faultline_local::kvm_or_skip`.
pub fn kvm_available() -> bool {
    faultline_local::kvm_or_skip()
}

/// How the kubelet treats the next pods created through the API.
#[derive(Clone, Debug, PartialEq)]
pub enum Kubelet {
    /// Schedule and run the containers.
    Run,
    /// Schedule, then never start the containers (image pull back-off).
    NeverReady,
}

type Key = (String, String, String); // (plural, namespace, name)

#[derive(Default)]
struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<String>,
    unexpected: Vec<String>,
    kubelet: Option<Kubelet>,
    /// Pods whose containers run, by uid.
    running: HashMap<String, PodProcesses>,
    /// Pod startups to perform (the kubelet task picks them up).
    to_start: Vec<Key>,
    /// A migration to modify right after its next GET (see `interfere_after_next_get`).
    interfere: Option<String>,
    /// Deleted objects with the resourceVersion of their deletion, for watches.
    tombstones: Vec<(Key, u64, Value)>,
}

/// The fake cluster: API server, scheduler and kubelet.
pub struct Cluster {
    store: Arc<Mutex<Store>>,
    pub client: kube::Client,
    clock_offset: Arc<Mutex<SignedDuration>>,
    server: tokio::task::JoinHandle<()>,
    kubelet: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.server.abort();
        self.kubelet.abort();
        // Processes die with their PodProcesses.
        if let Ok(mut s) = self.store.lock() {
            s.running.clear();
        }
    }
}

fn lock(m: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    pub fn new() -> Self {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let store = Arc::new(Mutex::new(Store {
            kubelet: Some(Kubelet::Run),
            ..Default::default()
        }));
        let s = store.clone();
        let server = tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let resp = serve(&s, req).await;
                send.send_response(resp);
            }
        });
        let s = store.clone();
        let kubelet = tokio::spawn(async move {
            loop {
                let next = lock(&s).to_start.pop();
                match next {
                    Some(key) => start_pod(&s, key).await,
                    None => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Self {
            store,
            client: kube::Client::new(svc, NS),
            clock_offset: Arc::new(Mutex::new(SignedDuration::ZERO)),
            server,
            kubelet,
        }
    }

    /// An operator: a reconciler context with fresh in-memory state (events cache, metrics,
    /// admission lock). Two calls model two operator processes (or a restart).
    pub fn operator(&self, config: Config) -> Arc<Context> {
        let offset = self.clock_offset.clone();
        let clock: Clock = Arc::new(move || {
            let o = *offset.lock().unwrap_or_else(|p| p.into_inner());
            Timestamp::now() + o
        });
        Arc::new(Context::new(
            self.client.clone(),
            config,
            Recorder::new(
                self.client.clone(),
                Reporter {
                    controller: "faultline-operator".into(),
                    instance: Some("test".into()),
                },
            ),
            Arc::new(Metrics::new()),
            clock,
            operator_pki(),
        ))
    }

    /// Moves the operator's clock forward (timeouts), not the processes'.
    pub fn advance_clock(&self, by: Duration) {
        let mut o = self.clock_offset.lock().unwrap_or_else(|p| p.into_inner());
        *o += SignedDuration::try_from(by).unwrap_or(SignedDuration::MAX);
    }

    pub fn set_kubelet(&self, k: Kubelet) {
        lock(&self.store).kubelet = Some(k);
    }

    /// One reconciliation of migration `name` by `op`; returns its action and the API
    /// requests it made.
    pub async fn reconcile(&self, op: &Arc<Context>, name: &str) -> (Action, Vec<String>) {
        self.take_log();
        let obj = self
            .migration(name)
            .unwrap_or_else(|| panic!("no migration {name}"));
        let action = reconcile::reconcile(Arc::new(obj), op.clone())
            .await
            .unwrap_or_else(|e| panic!("reconcile {name}: {e}"));
        let log = self.take_log();
        let unexpected = std::mem::take(&mut lock(&self.store).unexpected);
        assert!(
            unexpected.is_empty(),
            "requests the API server cannot answer: {unexpected:?}"
        );
        (action, log)
    }

    /// One reconciliation that may fail; returns its result and the requests it made.
    pub async fn try_reconcile(
        &self,
        op: &Arc<Context>,
        name: &str,
    ) -> (Result<Action, reconcile::Error>, Vec<String>) {
        self.take_log();
        let obj = self
            .migration(name)
            .unwrap_or_else(|| panic!("no migration {name}"));
        let result = reconcile::reconcile(Arc::new(obj), op.clone()).await;
        (result, self.take_log())
    }

    /// Reconciles until `done` holds for the migration (or it is gone), up to `timeout`,
    /// pausing `every` between reconciliations. Returns each reconciliation's request log.
    pub async fn reconcile_until(
        &self,
        op: &Arc<Context>,
        name: &str,
        timeout: Duration,
        every: Duration,
        done: impl Fn(Option<&VirtualMachineMigration>) -> bool,
    ) -> Vec<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut logs = Vec::new();
        loop {
            let now = self.migration(name);
            if done(now.as_ref()) {
                return logs;
            }
            assert!(
                !now.as_ref()
                    .and_then(|m| m.phase())
                    .is_some_and(|p| p.is_terminal()),
                "finished without reaching the awaited state: {:#?}",
                now.and_then(|m| m.status)
            );
            assert!(
                Instant::now() < deadline,
                "timed out; migration is now {:#?}",
                self.migration(name).map(|m| m.status)
            );
            if self.migration(name).is_none() {
                panic!("migration {name} is gone");
            }
            logs.push(self.reconcile(op, name).await.1);
            if std::env::var_os("FAULTLINE_TEST_TRACE").is_some()
                && let Some(st) = self.migration(name).and_then(|m| m.status)
            {
                eprintln!(
                    "{:?} {:?} {:?} {:?}",
                    st.phase,
                    st.message,
                    st.progress.as_ref().map(|p| (
                        p.percent,
                        p.remaining_pages,
                        p.transferred_bytes,
                        p.precopy_rounds,
                        p.faults
                    )),
                    Instant::now()
                );
            }
            tokio::time::sleep(every).await;
        }
    }

    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.store).log)
    }

    pub fn get(&self, plural: &str, name: &str) -> Option<Value> {
        lock(&self.store)
            .objects
            .get(&(plural.to_string(), NS.to_string(), name.to_string()))
            .cloned()
    }

    pub fn migration(&self, name: &str) -> Option<VirtualMachineMigration> {
        self.get("virtualmachinemigrations", name)
            .map(|v| serde_json::from_value(v).expect("stored migration parses"))
    }

    pub fn pods(&self) -> Vec<Value> {
        lock(&self.store)
            .objects
            .iter()
            .filter(|(k, _)| k.0 == "pods")
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many Secrets the API server holds.
    pub fn secret_count(&self) -> usize {
        lock(&self.store)
            .objects
            .keys()
            .filter(|k| k.0 == "secrets")
            .count()
    }

    pub fn events(&self) -> Vec<Value> {
        lock(&self.store)
            .objects
            .iter()
            .filter(|(k, _)| k.0 == "events")
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Reasons of the events about migration `name`, oldest first.
    pub fn event_reasons(&self, name: &str) -> Vec<String> {
        let mut evs: Vec<Value> = self
            .events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == name)
            .collect();
        evs.sort_by_key(|e| e["eventTime"].as_str().unwrap_or_default().to_string());
        evs.iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Stores an object as a user would create it (no request is logged).
    pub fn create(&self, plural: &str, obj: Value) -> Value {
        let mut s = lock(&self.store);
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        let key = (plural.to_string(), NS.to_string(), name);
        let obj = s.admit_new(&key, obj);
        s.objects.insert(key, obj.clone());
        obj
    }

    /// Creates a migration as `kubectl apply` would.
    pub fn create_migration(&self, name: &str, spec: Value) -> VirtualMachineMigration {
        let obj = self.create(
            "virtualmachinemigrations",
            json!({
                "apiVersion": "faultline.dev/v1alpha1",
                "kind": "VirtualMachineMigration",
                "metadata": {"name": name, "namespace": NS},
                "spec": spec,
            }),
        );
        serde_json::from_value(obj).expect("migration")
    }

    /// Stores a migration in another state (other migrations competing for slots).
    pub fn put_migration(&self, ns: &str, name: &str, spec: Value, status: Value) {
        let mut s = lock(&self.store);
        let key = (
            "virtualmachinemigrations".to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let mut obj = s.admit_new(
            &key,
            json!({
                "apiVersion": "faultline.dev/v1alpha1",
                "kind": "VirtualMachineMigration",
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
            }),
        );
        obj["status"] = status;
        s.objects.insert(key, obj);
    }

    pub fn set_migration_status(&self, ns: &str, name: &str, status: Value) {
        let mut s = lock(&self.store);
        let key = (
            "virtualmachinemigrations".to_string(),
            ns.to_string(),
            name.to_string(),
        );
        let rv = s.next_rv();
        let o = s.objects.get_mut(&key).expect("migration");
        o["status"] = status;
        o["metadata"]["resourceVersion"] = json!(rv);
    }

    /// `kubectl delete vmmig NAME`: with finalizers, marks it for deletion.
    pub fn delete_migration(&self, name: &str) {
        let mut s = lock(&self.store);
        let key = (
            "virtualmachinemigrations".to_string(),
            NS.to_string(),
            name.to_string(),
        );
        s.delete(&key, None).expect("delete migration");
    }

    /// Creates a VM pod already bound to `node` (as if created earlier) and runs it: a
    /// memtouch VM with `vmm_args` plus the Faultline sidecar, per NOTES.txt. Waits until ready
    /// and the VM runs.
    pub async fn add_vm_pod(&self, name: &str, node: &str, vmm_args: &[&str]) -> Value {
        self.add_vm_pod_with(name, node, vmm_args, &[], "running")
            .await
    }

    /// Like [`Self::add_vm_pod`] with extra container env (e.g. `FAULTLINE_INCOMING`), waiting
    /// until the sidecar reports the VM in `state`.
    pub async fn add_vm_pod_with(
        &self,
        name: &str,
        node: &str,
        vmm_args: &[&str],
        env: &[(&str, &str)],
        state: &str,
    ) -> Value {
        let mut args = vec!["--control", "/run/faultline/vmm.sock"];
        args.extend_from_slice(vmm_args);
        args.extend_from_slice(&["--quiet", "--log", "warn"]);
        let env: Vec<Value> = env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NS,
                         "labels": {"app": "web", "vm": name}},
            "spec": {
                "nodeName": node,
                "restartPolicy": "Never",
                "volumes": [{"name": "faultline-run", "emptyDir": {}}],
                "containers": [
                    {"name": "vmm", "image": "faultline-vmm:test", "args": args, "env": env,
                     "volumeMounts": [{"name": "faultline-run", "mountPath": "/run/faultline"}]},
                    {"name": "faultline-sidecar", "image": "faultline-sidecar:test",
                     "args": ["--vmm-socket", "/run/faultline/vmm.sock",
                              "--listen", "0.0.0.0:9180", "--migration-listen", "0.0.0.0:9181"],
                     "securityContext": {"privileged": true},
                     "volumeMounts": [{"name": "faultline-run", "mountPath": "/run/faultline"}]}
                ]
            }
        });
        let pod = self.create("pods", pod);
        let key = ("pods".to_string(), NS.to_string(), name.to_string());
        start_pod(&self.store, key).await;
        let ready = self
            .wait_pod(name, Duration::from_secs(60), is_ready)
            .await
            .unwrap_or_else(|| panic!("VM pod {name} did not become ready: {pod:#}"));
        // The sidecar is ready once joined; the VM itself starts running a moment later.
        let (_, api) = self.pod_processes(name).expect("VM pod processes");
        let sidecar = sidecar_client(api, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = sidecar
                .node()
                .await
                .ok()
                .and_then(|n| n.vm)
                .and_then(|vm| serde_json::to_value(vm.state).ok());
            if now.as_ref().and_then(Value::as_str) == Some(state) {
                return ready;
            }
            assert!(
                Instant::now() < deadline,
                "the VM in {name} is not {state}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes the next GET of migration `name` be followed by a write from someone else (its
    /// resourceVersion moves on), as a second operator or a user would.
    pub fn interfere_after_next_get(&self, name: &str) {
        lock(&self.store).interfere = Some(name.to_string());
    }

    /// Waits until pod `name` satisfies `pred`; `None` on timeout.
    pub async fn wait_pod(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.get("pods", name)
                && pred(&p)
            {
                return Some(p);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The running processes of a pod: (VMM control socket, sidecar API address).
    pub fn pod_processes(&self, name: &str) -> Option<(PathBuf, SocketAddr)> {
        let s = lock(&self.store);
        let uid = s
            .objects
            .get(&("pods".to_string(), NS.to_string(), name.to_string()))?["metadata"]["uid"]
            .as_str()?
            .to_string();
        let p = s.running.get(&uid)?;
        Some((p.vmm_socket.clone(), p.sidecar_api?))
    }

    /// Kills a pod's processes (a crash); the pod object stays, not ready.
    pub fn crash_pod(&self, name: &str) {
        let mut s = lock(&self.store);
        let key = ("pods".to_string(), NS.to_string(), name.to_string());
        let uid = s.objects[&key]["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        s.running.remove(&uid);
        let rv = s.next_rv();
        if let Some(p) = s.objects.get_mut(&key) {
            p["metadata"]["resourceVersion"] = json!(rv);
            p["status"]["conditions"] = json!([
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}]);
            p["status"]["containerStatuses"] = json!([
                {"name": "vmm", "ready": false, "restartCount": 1, "image": "", "imageID": "",
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]);
        }
    }

    pub fn process_count(&self) -> usize {
        lock(&self.store).running.len()
    }
}

pub fn is_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

// ----- the API server ------------------------------------------------------------------------

impl Store {
    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    /// Unique in the process: tests run side by side, and pods' scratch directories are named
    /// after their uid.
    fn next_uid(&mut self) -> String {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:08x}-7e57-4000-8000-{n:012x}", 0x5eed0000u64 + n)
    }

    /// What the API server adds to a created object.
    fn admit_new(&mut self, key: &Key, mut obj: Value) -> Value {
        let rv = self.next_rv();
        let uid = self.next_uid();
        let m = &mut obj["metadata"];
        m["namespace"] = json!(key.1);
        m["uid"] = json!(uid);
        m["resourceVersion"] = json!(rv);
        m["creationTimestamp"] = json!(Timestamp::now().to_string());
        if key.0 == "virtualmachinemigrations" {
            m["generation"] = json!(1);
        }
        if key.0 == "pods" && obj.get("status").is_none_or(Value::is_null) {
            obj["status"] = json!({"phase": "Pending"});
        }
        obj
    }

    fn delete(
        &mut self,
        key: &Key,
        precondition_uid: Option<&str>,
    ) -> Result<Value, Box<Response<Body>>> {
        let Some(obj) = self.objects.get(key).cloned() else {
            return Err(Box::new(status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{}\" not found", key.0, key.2),
            )));
        };
        if let Some(uid) = precondition_uid
            && obj["metadata"]["uid"] != uid
        {
            return Err(Box::new(status_error(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    obj["metadata"]["uid"]
                ),
            )));
        }
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            let rv = self.next_rv();
            let o = self.objects.get_mut(key).expect("present");
            if o["metadata"]["deletionTimestamp"].is_null() {
                o["metadata"]["deletionTimestamp"] = json!(Timestamp::now().to_string());
                let g = o["metadata"]["generation"].as_i64().unwrap_or(0);
                o["metadata"]["generation"] = json!(g + 1);
            }
            o["metadata"]["resourceVersion"] = json!(rv);
            return Ok(o.clone());
        }
        self.remove(key);
        Ok(obj)
    }

    /// Removes an object, and (background garbage collection) everything it owns.
    fn remove(&mut self, key: &Key) {
        let Some(obj) = self.objects.remove(key) else {
            return;
        };
        self.rv += 1;
        let rv = self.rv;
        self.tombstones.push((key.clone(), rv, obj.clone()));
        let uid = obj["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if key.0 == "pods" {
            self.running.remove(&uid);
        }
        let owned: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in owned {
            self.remove(&k);
        }
    }
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("JSON")))
        .expect("response")
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

struct Route {
    plural: String,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest: &[&str] = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    match rest {
        ["namespaces", ns, plural] => Some(Route {
            plural: plural.to_string(),
            ns: Some(ns.to_string()),
            name: None,
            status: false,
        }),
        ["namespaces", ns, plural, name] => Some(Route {
            plural: plural.to_string(),
            ns: Some(ns.to_string()),
            name: Some(name.to_string()),
            status: false,
        }),
        ["namespaces", ns, plural, name, "status"] => Some(Route {
            plural: plural.to_string(),
            ns: Some(ns.to_string()),
            name: Some(name.to_string()),
            status: true,
        }),
        [plural] => Some(Route {
            plural: plural.to_string(),
            ns: None,
            name: None,
            status: false,
        }),
        _ => None,
    }
}

fn query_param(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%2F", "/")
                .replace("%3D", "=")
                .replace("%2f", "/")
                .replace("%3d", "=")
        })
    })
}

/// A watch, answered as a long poll: every change after the given resourceVersion (objects
/// with a newer resourceVersion, deletions after it), waiting briefly when there is none. The
/// watcher re-watches from the last version it saw, so this behaves like a stream.
async fn watch(store: &Arc<Mutex<Store>>, path: &str, uri: &http::Uri) -> Response<Body> {
    let Some(r) = route(path) else {
        return status_error(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    let since: u64 = query_param(uri, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector: Vec<(String, String)> = query_param(uri, "labelSelector")
        .map(|s| {
            s.split(',')
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    let matches = |k: &Key, o: &Value| {
        k.0 == r.plural
            && r.ns.as_ref().is_none_or(|n| *n == k.1)
            && selector
                .iter()
                .all(|(lk, lv)| o["metadata"]["labels"][lk.as_str()] == lv.as_str())
    };
    for attempt in 0..2 {
        let lines = {
            let s = lock(store);
            let mut events: Vec<(u64, String)> = Vec::new();
            for (k, o) in &s.objects {
                let rv: u64 = o["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if rv > since && matches(k, o) {
                    events.push((rv, json!({"type": "MODIFIED", "object": o}).to_string()));
                }
            }
            for (k, rv, o) in &s.tombstones {
                if *rv > since && matches(k, o) {
                    let mut o = o.clone();
                    o["metadata"]["resourceVersion"] = json!(rv.to_string());
                    events.push((*rv, json!({"type": "DELETED", "object": o}).to_string()));
                }
            }
            events.sort_by_key(|(rv, _)| *rv);
            events.into_iter().map(|(_, l)| l).collect::<Vec<_>>()
        };
        if !lines.is_empty() || attempt == 1 {
            let mut body = lines.join("\n");
            body.push('\n');
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(Body::from(body.into_bytes()))
                .expect("response");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    respond(StatusCode::OK, &Value::Null)
}

async fn serve(store: &Arc<Mutex<Store>>, req: Request<Body>) -> Response<Body> {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let path = uri.path().to_string();
    let line = match uri.query() {
        Some(q) if !q.is_empty() => format!("{method} {path}?{q}"),
        _ => format!("{method} {path}"),
    };
    if method == http::Method::GET && query_param(&uri, "watch").as_deref() == Some("true") {
        return watch(store, &path, &uri).await;
    }
    let body = req.into_body().collect_bytes().await.unwrap_or_default();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    };
    let mut s = lock(store);
    s.log.push(line.clone());
    let Some(r) = route(&path) else {
        s.unexpected.push(line);
        return status_error(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    let list_kind = |plural: &str| match plural {
        "virtualmachinemigrations" => ("faultline.dev/v1alpha1", "VirtualMachineMigrationList"),
        "pods" => ("v1", "PodList"),
        "secrets" => ("v1", "SecretList"),
        _ => ("v1", "List"),
    };
    match (method.as_str(), r) {
        (
            "GET",
            Route {
                plural,
                ns,
                name: None,
                ..
            },
        ) => {
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|(k, _)| k.0 == plural && ns.as_ref().is_none_or(|n| *n == k.1))
                .map(|(_, v)| v.clone())
                .collect();
            let (api_version, kind) = list_kind(&plural);
            let rv = s.rv.to_string();
            respond(
                StatusCode::OK,
                &json!({"apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        (
            "POST",
            Route {
                plural,
                ns: Some(ns),
                name: None,
                ..
            },
        ) => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = (plural.clone(), ns, name.clone());
            if s.objects.contains_key(&key) {
                return status_error(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{plural} \"{name}\" already exists"),
                );
            }
            let mut obj = s.admit_new(&key, body);
            if plural == "pods" {
                schedule(&mut obj, s.kubelet.clone().unwrap_or(Kubelet::Run));
                if obj["spec"]["nodeName"].is_string() && s.kubelet == Some(Kubelet::Run) {
                    s.to_start.push(key.clone());
                }
            }
            s.objects.insert(key, obj.clone());
            respond(StatusCode::CREATED, &obj)
        }
        (
            "GET",
            Route {
                plural,
                ns: Some(ns),
                name: Some(name),
                status: false,
            },
        ) => {
            let key = (plural.clone(), ns, name.clone());
            let answer = s.objects.get(&key).cloned();
            if answer.is_some() && s.interfere.as_deref() == Some(name.as_str()) {
                s.interfere = None;
                let rv = s.next_rv();
                if let Some(o) = s.objects.get_mut(&key) {
                    o["metadata"]["resourceVersion"] = json!(rv);
                    o["metadata"]["labels"]["touched-by"] = json!("someone-else");
                }
            }
            match answer {
                Some(o) => respond(StatusCode::OK, &o),
                None => status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (
            "PATCH",
            Route {
                plural,
                ns: Some(ns),
                name: Some(name),
                status,
            },
        ) => {
            let key = (plural.clone(), ns, name.clone());
            let Some(mut obj) = s.objects.get(&key).cloned() else {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                );
            };
            if let Some(want) = body["metadata"]["resourceVersion"].as_str()
                && obj["metadata"]["resourceVersion"] != want
            {
                return status_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            let old_spec = obj["spec"].clone();
            let mut patch = body.clone();
            if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            if status {
                patch = json!({"status": patch["status"].clone()});
                // Pod conditions merge by type (the strategic merge the operator sends).
                if plural == "pods"
                    && let Some(new) = patch["status"]["conditions"].as_array().cloned()
                {
                    let mut conds = obj["status"]["conditions"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    for c in new {
                        match conds.iter_mut().find(|o| o["type"] == c["type"]) {
                            Some(o) => *o = c,
                            None => conds.push(c),
                        }
                    }
                    patch["status"]["conditions"] = Value::Array(conds);
                }
            } else if plural != "events" {
                // The main resource ignores status changes.
                if let Some(p) = patch.as_object_mut() {
                    p.remove("status");
                }
            }
            merge_patch(&mut obj, &patch);
            if obj["spec"] != old_spec && plural == "virtualmachinemigrations" {
                let g = obj["metadata"]["generation"].as_i64().unwrap_or(0);
                obj["metadata"]["generation"] = json!(g + 1);
            }
            obj["metadata"]["resourceVersion"] = json!(s.next_rv());
            let gone = !obj["metadata"]["deletionTimestamp"].is_null()
                && obj["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty());
            s.objects.insert(key.clone(), obj.clone());
            if gone {
                s.remove(&key);
            }
            respond(StatusCode::OK, &obj)
        }
        (
            "PUT",
            Route {
                plural,
                ns: Some(ns),
                name: Some(name),
                status: true,
            },
        ) => {
            let key = (plural.clone(), ns, name.clone());
            let Some(mut obj) = s.objects.get(&key).cloned() else {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                );
            };
            if body["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"] {
                return status_error(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            obj["status"] = body["status"].clone();
            obj["metadata"]["resourceVersion"] = json!(s.next_rv());
            s.objects.insert(key, obj.clone());
            respond(StatusCode::OK, &obj)
        }
        (
            "DELETE",
            Route {
                plural,
                ns: Some(ns),
                name: Some(name),
                status: false,
            },
        ) => {
            let key = (plural, ns, name);
            let uid = body["preconditions"]["uid"].as_str().map(str::to_string);
            match s.delete(&key, uid.as_deref()) {
                Ok(o) => respond(StatusCode::OK, &o),
                Err(e) => *e,
            }
        }
        _ => {
            s.unexpected.push(line);
            status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not supported by the test API server",
            )
        }
    }
}

// ----- the scheduler ---------------------------------------------------------------------

fn matches_requirement(node: &str, labels: &Value, req: &Value, field: bool) -> bool {
    let key = req["key"].as_str().unwrap_or_default();
    let value = if field {
        (key == "metadata.name").then(|| node.to_string())
    } else {
        labels[key].as_str().map(str::to_string)
    };
    let values: Vec<&str> = req["values"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match req["operator"].as_str().unwrap_or_default() {
        "In" => value.is_some_and(|v| values.contains(&v.as_str())),
        "NotIn" => value.is_none_or(|v| !values.contains(&v.as_str())),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

fn fits(node: &str, labels: &Value, spec: &Value) -> bool {
    let selector_ok = spec["nodeSelector"]
        .as_object()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels[k] == *v));
    let terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let affinity_ok = terms.is_empty()
        || terms.iter().any(|t| {
            t["matchExpressions"].as_array().is_none_or(|rs| {
                rs.iter()
                    .all(|r| matches_requirement(node, labels, r, false))
            }) && t["matchFields"].as_array().is_none_or(|rs| {
                rs.iter()
                    .all(|r| matches_requirement(node, labels, r, true))
            })
        });
    selector_ok && affinity_ok
}

fn schedule(pod: &mut Value, kubelet: Kubelet) {
    if pod["spec"]["nodeName"].is_string() {
        return;
    }
    let spec = pod["spec"].clone();
    let all = nodes();
    match all.iter().find(|(n, l)| fits(n, l, &spec)) {
        Some((node, _)) => {
            pod["spec"]["nodeName"] = json!(node);
            pod["status"] = match kubelet {
                Kubelet::Run => json!({"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"}]}),
                Kubelet::NeverReady => json!({"phase": "Pending",
                    "conditions": [{"type": "PodScheduled", "status": "True"},
                                   {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
                    "containerStatuses": [{"name": "vmm", "ready": false, "restartCount": 0,
                        "image": "", "imageID": "",
                        "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}),
            };
        }
        None => {
            pod["status"] = json!({"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": format!("0/{} nodes are available: {} node(s) didn't match Pod's node affinity/selector.", all.len(), all.len())
            }]});
        }
    }
}

// ----- the kubelet -----------------------------------------------------------------------

/// A pod's running containers; killed when dropped.
pub struct PodProcesses {
    children: Vec<Child>,
    dir: PathBuf,
    pub vmm_socket: PathBuf,
    pub sidecar_api: Option<SocketAddr>,
    pub migration_port: Option<u16>,
}

impl Drop for PodProcesses {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // FAULTLINE_KEEP_TEST_DIRS=1 keeps the containers' logs for a post-mortem.
        if std::env::var_os("FAULTLINE_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Finds a workspace binary beside the test executable (`target/<profile>/deps/..`).
pub fn binary(name: &str) -> PathBuf {
    faultline_local::binary(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a scheduled pod's containers and reports it Ready once its sidecar is.
async fn start_pod(store: &Arc<Mutex<Store>>, key: Key) {
    let Some(pod) = lock(store).objects.get(&key).cloned() else {
        return;
    };
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let started = tokio::task::spawn_blocking(move || run_containers(&pod))
        .await
        .expect("kubelet thread");
    let procs = match started {
        Ok(p) => p,
        Err(why) => {
            let mut s = lock(store);
            let rv = s.next_rv();
            if let Some(p) = s.objects.get_mut(&key) {
                p["status"] = json!({"phase": "Failed", "reason": "Error", "message": why});
                p["metadata"]["resourceVersion"] = json!(rv);
            }
            return;
        }
    };
    let api = procs.sidecar_api;
    let mport = procs.migration_port;
    lock(store).running.insert(uid.clone(), procs);
    // Ready once the sidecar is (its readiness probe: joined to the VMM).
    if let Some(api) = api {
        let c = sidecar_client(api, Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(None) = c.readyz().await {
                break;
            }
            if Instant::now() > deadline || !lock(store).running.contains_key(&uid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut s = lock(store);
    let rv = s.next_rv();
    if let Some(p) = s.objects.get_mut(&key)
        && p["metadata"]["uid"] == uid.as_str()
    {
        if let (Some(api), Some(m)) = (api, mport) {
            p["metadata"]["annotations"]["faultline.dev/sidecar-port"] =
                json!(api.port().to_string());
            p["metadata"]["annotations"]["faultline.dev/migration-port"] = json!(m.to_string());
        }
        p["metadata"]["resourceVersion"] = json!(rv);
        p["status"] = json!({
            "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"}
            ]
        });
    }
}

fn run_containers(pod: &Value) -> Result<PodProcesses, String> {
    let name = pod["metadata"]["name"].as_str().unwrap_or("pod");
    let dir = std::env::temp_dir().join(format!(
        "faultline-optest-{}-{name}-{}",
        std::process::id(),
        pod["metadata"]["uid"].as_str().unwrap_or_default()
    ));
    let run_dir = dir.join("run-faultline");
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let mut procs = PodProcesses {
        children: Vec::new(),
        dir: dir.clone(),
        vmm_socket: run_dir.join("vmm.sock"),
        sidecar_api: None,
        migration_port: None,
    };
    let map = |a: &str| a.replace("/run/faultline", run_dir.to_str().unwrap_or_default());
    for c in pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let image = c["image"].as_str().unwrap_or_default();
        let cname = c["name"].as_str().unwrap_or_default();
        let mut args: Vec<String> = c["args"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(map).collect())
            .unwrap_or_default();
        let envs: Vec<(String, String)> = c["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| {
                        Some((
                            e["name"].as_str()?.to_string(),
                            e["value"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let log =
            std::fs::File::create(dir.join(format!("{cname}.log"))).map_err(|e| e.to_string())?;
        if image.starts_with("faultline-vmm") {
            let child = Command::new(binary("faultline-vmm"))
                .args(&args)
                .env_clear()
                .envs(envs)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting {cname}: {e}"))?;
            procs.children.push(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while std::os::unix::net::UnixStream::connect(&procs.vmm_socket).is_err() {
                if Instant::now() > deadline {
                    return Err(format!(
                        "{cname}: no control socket; log: {}",
                        read_log(&dir, cname)
                    ));
                }
                if let Some(c) = procs.children.last_mut()
                    && let Ok(Some(st)) = c.try_wait()
                {
                    return Err(format!(
                        "{cname} exited ({st}); log: {}",
                        read_log(&dir, cname)
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        } else if image.starts_with("faultline-sidecar") {
            // Pod networking: every pod here shares loopback, so each gets its own ports.
            for flag in ["--listen", "--migration-listen"] {
                if let Some(i) = args.iter().position(|a| a == flag) {
                    args[i + 1] = "127.0.0.1:0".into();
                } else {
                    args.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
                }
            }
            // The namespace's certificate Secret, as a real pod mounts it.
            let pki = faultline_local::pki::local().map_err(|e| e.to_string())?;
            args.extend([
                "--tls-dir".to_string(),
                pki.sidecar_dir().display().to_string(),
            ]);
            let mut child = Command::new(binary("faultline-sidecar"))
                .args(&args)
                .env_clear()
                .envs(envs)
                .env(
                    "RUST_LOG",
                    std::env::var("FAULTLINE_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting {cname}: {e}"))?;
            let stdout = child.stdout.take().ok_or("sidecar has no stdout")?;
            procs.children.push(child);
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|e| format!("{cname}: {e}"))?;
            let addrs: Value = serde_json::from_str(&line).map_err(|e| {
                format!(
                    "{cname} printed `{line}` ({e}); log: {}",
                    read_log(&dir, cname)
                )
            })?;
            procs.sidecar_api = addrs["api"].as_str().and_then(|a| a.parse().ok());
            procs.migration_port = addrs["migrationPort"].as_u64().map(|p| p as u16);
        } else {
            return Err(format!("unknown image {image}"));
        }
    }
    Ok(procs)
}

fn read_log(dir: &std::path::Path, cname: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{cname}.log"))).unwrap_or_default()
}

/// Test configuration: short intervals, every progress change written.
pub fn fast_config() -> Config {
    Config {
        max_parallel: 5,
        max_parallel_per_node: 2,
        poll_interval: Duration::from_millis(100),
        queue_interval: Duration::from_millis(100),
        status_interval: Duration::ZERO,
        scheduling_timeout: Duration::from_secs(300),
        target_ready_timeout: Duration::from_secs(600),
        unavailable_timeout: Duration::from_secs(120),
        sidecar_request_timeout: Duration::from_secs(5),
        namespace: None,
    }
}

/// Path of a migration object, for request logs.
pub fn mig_path(name: &str) -> String {
    format!("/apis/faultline.dev/v1alpha1/namespaces/{NS}/virtualmachinemigrations/{name}")
}

pub fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/pods/{name}")
}

pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/vms/events";
pub const PODS: &str = "/api/v1/namespaces/vms/pods";
pub const ALL_MIGRATIONS: &str = "/apis/faultline.dev/v1alpha1/virtualmachinemigrations";

/// Requests without their query strings.
pub fn paths(log: &[String]) -> Vec<String> {
    log.iter()
        .map(|l| l.split('?').next().unwrap_or_default().to_string())
        .collect()
}
