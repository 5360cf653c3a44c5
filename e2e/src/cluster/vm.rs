//! VM pods in the scenarios: the example VM pod (examples/vm-pod.yaml) as a user applies it,
//! or variants of it (name, memory, backing, node), and the guest's health read from the pod's
//! sidecar (`GET /v1/node`), which the host reaches through the cluster's routes to pod IPs.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use faultline::sidecar_api::{GuestHealth, NodeInfo};
use faultline::tls::control::Credentials;
use faultline::vmm_protocol::messages::VmState;
use faultline_local::{ClientTls, SidecarClient};
use serde_json::{Value, json};

use super::kube::{Kube, s, wait_for};

pub const NAMESPACE: &str = "vms";

/// A variant of the example VM pod.
#[derive(Debug, Clone)]
pub struct VmVariant<'a> {
    pub name: &'a str,
    /// faultline-vmm's `--memory`, e.g. `256M`.
    pub memory: &'a str,
    /// faultline-vmm's `--backing`.
    pub backing: &'a str,
    /// Put it on this node (`spec.nodeName`: bypassing the scheduler, so the pod itself
    /// carries no placement rule its target would inherit).
    pub node: Option<&'a str>,
    /// Give every page data before the guest starts (faultline-vmm `--prefill`), so that every
    /// page costs bandwidth: zero pages cross as markers only.
    pub prefill: bool,
    /// faultline-vmm's `--dirty-rate` preset, when not the example's (moderate). A moderate
    /// guest writes as fast as its emulated vCPU runs, which varies by machine and hour.
    pub dirty_rate: Option<&'a str>,
}

/// The example pod with the variant's name, memory (and pod memory that covers it), backing
/// and node.
pub fn variant(example: &Value, v: &VmVariant<'_>) -> Result<Value> {
    let mut pod = example.clone();
    pod["metadata"]["name"] = json!(v.name);
    let containers = pod["spec"]["containers"]
        .as_array_mut()
        .context("the example pod has no containers")?;
    let vmm = containers
        .iter_mut()
        .find(|c| c["name"] == "vmm")
        .context("the example pod has no `vmm` container")?;
    let args = vmm["args"]
        .as_array_mut()
        .context("the vmm container has no args")?;
    for a in args.iter_mut() {
        if let Some(text) = a.as_str() {
            if text.starts_with("--memory=") {
                *a = json!(format!("--memory={}", v.memory));
            } else if text.starts_with("--backing=") {
                *a = json!(format!("--backing={}", v.backing));
            }
        }
    }
    if v.prefill {
        args.push(json!("--prefill"));
    }
    if let Some(rate) = v.dirty_rate {
        args.push(json!(format!("--dirty-rate={rate}")));
    }
    let mib = parse_mib(v.memory)?;
    // As the example does: the pod's memory covers guest RAM and both processes, whichever
    // container the pages are charged to.
    pod["spec"]["resources"]["requests"]["memory"] = json!(format!("{}Mi", mib + 176));
    pod["spec"]["resources"]["limits"]["memory"] = json!(format!("{}Mi", mib + 376));
    if let Some(node) = v.node {
        pod["spec"]["nodeName"] = json!(node);
    }
    Ok(pod)
}

fn parse_mib(size: &str) -> Result<u64> {
    let (num, unit) = size.split_at(size.len().saturating_sub(1));
    let n: u64 = num
        .parse()
        .with_context(|| format!("memory size {size:?}"))?;
    match unit {
        "M" => Ok(n),
        "G" => Ok(n * 1024),
        _ => bail!("memory size {size:?} is not NNNM or NG"),
    }
}

/// The example VM pod, parsed.
pub fn example(kube: &Kube, repo: &Path) -> Result<Value> {
    kube.read_manifest(&repo.join("examples/vm-pod.yaml"))
}

/// Applies a pod and waits until it is Ready; returns the pod as it then is.
pub fn create(kube: &Kube, pod: &Value) -> Result<Value> {
    let name = s(pod, &["metadata", "name"]).to_string();
    kube.apply(&pod.to_string())?;
    wait_ready(kube, &name)
}

pub fn wait_ready(kube: &Kube, name: &str) -> Result<Value> {
    wait_for(
        &format!("pod {name} Ready"),
        Duration::from_secs(90),
        || {
            let Some(p) = kube.get(Some(NAMESPACE), "pod", name)? else {
                return Ok(Err("not found".into()));
            };
            let ready = p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            Ok(if ready {
                Ok(p)
            } else {
                Err(format!("phase {}", s(&p, &["status", "phase"])))
            })
        },
    )
}

pub fn node_of(pod: &Value) -> String {
    s(pod, &["spec", "nodeName"]).to_string()
}

/// The operator's credentials as an administrator gets them (`faultline-operator
/// credentials`, which reads the CA from the cluster `kube` points at), fetched once per run.
/// The kubeconfig is passed explicitly: a CI machine has no `KUBECONFIG` of its own.
pub fn admin_tls(kube: &Kube) -> Result<ClientTls> {
    static TLS: OnceLock<Result<ClientTls, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("faultline-e2e-admin-{}", std::process::id()));
        let operator = faultline_local::binary("faultline-operator").map_err(|e| e.to_string())?;
        let out = std::process::Command::new(operator)
            .env("KUBECONFIG", kube.kubeconfig())
            .args([
                "credentials",
                "-n",
                super::scenarios::OPERATOR_NAMESPACE,
                "--valid-for",
                "4h",
                "--out",
            ])
            .arg(&dir)
            .output()
            .map_err(|e| format!("running faultline-operator credentials: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "faultline-operator credentials failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let creds = Credentials::load(&dir).map_err(|e| e.to_string())?;
        let config = creds.client_config().map_err(|e| e.to_string())?;
        ClientTls::for_namespace(config, NAMESPACE)
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

fn sidecar(kube: &Kube, pod: &Value) -> Result<SidecarClient> {
    let ip = s(pod, &["status", "podIP"]);
    ensure!(
        !ip.is_empty(),
        "pod {} has no IP",
        s(pod, &["metadata", "name"])
    );
    Ok(SidecarClient::with_tls(
        &format!("{ip}:9180"),
        admin_tls(kube)?,
    ))
}

/// What a VM pod's sidecar says of its node and VM.
pub fn node_info(kube: &Kube, name: &str) -> Result<NodeInfo> {
    let pod = kube
        .get(Some(NAMESPACE), "pod", name)?
        .with_context(|| format!("pod {name} does not exist"))?;
    Ok(sidecar(kube, &pod)?.node()?)
}

fn health(kube: &Kube, name: &str) -> Result<(VmState, GuestHealth)> {
    let info = node_info(kube, name)?;
    let vm = info
        .vm
        .with_context(|| format!("{name}: the sidecar has not joined its VMM"))?;
    let guest = vm
        .guest
        .with_context(|| format!("{name}: the VMM reports no guest status"))?;
    Ok((vm.state, guest))
}

/// Checks that the VM in pod `name` runs: no verification failures, heartbeats rising.
pub fn guest_running(kube: &Kube, name: &str) -> Result<String> {
    let (_, first) = health(kube, name)?;
    let last = wait_for(
        &format!("{name}: guest heartbeats"),
        Duration::from_secs(30),
        || {
            let (state, now) = health(kube, name)?;
            if state != VmState::Running || now.failures != 0 {
                bail!(
                    "{name}: VM {state:?} with {} verification failures",
                    now.failures
                );
            }
            Ok(if now.heartbeats > first.heartbeats {
                Ok(now)
            } else {
                Err(format!("{now:?}"))
            })
        },
    )?;
    Ok(format!(
        "guest on {name}: running, 0 failures, heartbeats {} → {}",
        first.heartbeats, last.heartbeats
    ))
}

/// Checks that the VM in pod `name` runs and verifies itself: no failures, heartbeats rising,
/// and every vCPU completing at least one more full verification sweep of its memory than
/// when first asked (so every page was read back on this host). Returns a summary.
pub fn verify_guest(kube: &Kube, name: &str) -> Result<String> {
    let (state, first) = health(kube, name)?;
    ensure!(
        state == VmState::Running,
        "{name}: VM is {state:?}, not running"
    );
    ensure!(
        first.failures == 0,
        "{name}: the guest reported {} verification failures",
        first.failures
    );
    let last = wait_for(
        &format!("{name}: a full verification sweep on every vCPU"),
        Duration::from_secs(120),
        || {
            let (state, now) = health(kube, name)?;
            if state != VmState::Running || now.failures != 0 {
                bail!(
                    "{name}: VM {state:?} with {} verification failures",
                    now.failures
                );
            }
            let swept = now
                .status_words
                .iter()
                .zip(&first.status_words)
                .all(|(n, f)| n > f);
            Ok(if swept && now.heartbeats > first.heartbeats {
                Ok(now)
            } else {
                Err(format!("{now:?}"))
            })
        },
    )?;
    Ok(format!(
        "guest on {name}: 0 failures, sweeps {:?} → {:?}, heartbeats {} → {}",
        first.status_words, last.status_words, first.heartbeats, last.heartbeats
    ))
}

/// Waits until a pod no longer exists.
pub fn wait_gone(kube: &Kube, kind: &str, name: &str, timeout: Duration) -> Result<()> {
    wait_for(&format!("{kind} {name} gone"), timeout, || {
        Ok(match kube.get(Some(NAMESPACE), kind, name)? {
            None => Ok(()),
            Some(v) => Err(format!(
                "still there (phase {:?})",
                s(&v, &["status", "phase"])
            )),
        })
    })
}

/// Deletes every migration and pod in the VM namespace and waits until they are gone, so a
/// scenario starts from nothing. Migrations first: their finalizers need the pods' sidecars.
pub fn reset(kube: &Kube) -> Result<()> {
    for kind in ["virtualmachinemigrations", "pods"] {
        kube.kubectl(&[
            "delete",
            kind,
            "--all",
            "-n",
            NAMESPACE,
            "--wait=false",
            "--ignore-not-found",
        ])?;
        wait_for(
            &format!("every {kind} in {NAMESPACE} gone"),
            Duration::from_secs(120),
            || {
                let left = kube.list(Some(NAMESPACE), kind, None)?;
                Ok(if left.is_empty() {
                    Ok(())
                } else {
                    Err(left
                        .iter()
                        .map(|o| s(o, &["metadata", "name"]).to_string())
                        .collect::<Vec<_>>()
                        .join(", "))
                })
            },
        )?;
    }
    Ok(())
}

/// Kills every process of one container of a pod with SIGKILL, as a crash or the OOM killer
/// would: the host sees them in the container's cgroup (the nodes share this machine).
pub fn kill_container(kube: &Kube, pod: &str, container: &str) -> Result<usize> {
    let p = kube
        .get(Some(NAMESPACE), "pod", pod)?
        .with_context(|| format!("pod {pod} does not exist"))?;
    let id = p["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            p["status"]["initContainerStatuses"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .find(|c| c["name"] == container)
        .and_then(|c| c["containerID"].as_str())
        .and_then(|id| id.split("://").nth(1))
        .with_context(|| format!("pod {pod} has no running container {container}"))?
        .to_string();
    let mut killed = 0;
    for dir in find_dirs(Path::new("/sys/fs/cgroup/pids"), &id, 8) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("reading {}", dir.display()))?;
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) with a pid read from the container's own cgroup and SIGKILL;
            // no memory is shared with the target process.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
    }
    ensure!(
        killed > 0,
        "no process of {pod}/{container} ({id}) found to kill"
    );
    Ok(killed)
}

/// Directories named `name` below `root`, at most `depth` levels down.
fn find_dirs(root: &Path, name: &str, depth: usize) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        if !path.is_dir() {
            continue;
        }
        if e.file_name() == name {
            found.push(path);
        } else if depth > 0 {
            found.extend(find_dirs(&path, name, depth - 1));
        }
    }
    found
}

/// What a container of a pod has been: its restart count and, if it stopped, its exit code.
pub fn container_state(pod: &Value, container: &str) -> Option<(u64, Option<i64>)> {
    pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            pod["status"]["initContainerStatuses"]
                .as_array()
                .into_iter()
                .flatten(),
        )
        .find(|c| c["name"] == container)
        .map(|c| {
            (
                c["restartCount"].as_u64().unwrap_or(0),
                c["state"]["terminated"]["exitCode"].as_i64(),
            )
        })
}

/// Memory charged to each container of a pod (memory cgroup v1 usage), and the pod's limit:
/// where the pages of a VM land.
pub fn memory_charges(kube: &Kube, pod: &str) -> Result<(Vec<(String, u64)>, u64)> {
    let p = kube
        .get(Some(NAMESPACE), "pod", pod)?
        .with_context(|| format!("pod {pod} does not exist"))?;
    let uid = s(&p, &["metadata", "uid"]).to_string();
    let pod_dir = find_dirs(Path::new("/sys/fs/cgroup/memory"), &format!("pod{uid}"), 6)
        .into_iter()
        .next()
        .with_context(|| format!("no memory cgroup for pod {pod}"))?;
    let read = |path: &Path| -> Result<u64> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds {text:?}", path.display()))
    };
    let mut out = Vec::new();
    for c in p["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            p["status"]["initContainerStatuses"]
                .as_array()
                .into_iter()
                .flatten(),
        )
    {
        let Some(id) = c["containerID"]
            .as_str()
            .and_then(|i| i.split("://").nth(1))
        else {
            continue;
        };
        let dir = pod_dir.join(id);
        if dir.is_dir() {
            let name = c["name"].as_str().unwrap_or("?").to_string();
            out.push((name, read(&dir.join("memory.usage_in_bytes"))?));
        }
    }
    Ok((out, read(&pod_dir.join("memory.limit_in_bytes"))?))
}
