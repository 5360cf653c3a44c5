//! The operator's sidecar client against real `faultline-sidecar` processes joined to real
//! `faultline-vmm` processes (run as pods by the test cluster's kubelet): every endpoint of
//! docs/sidecar-api.md the operator uses, including its error answers.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultline::sidecar_api::{MigrationStatus, Phase, Policy, Role, StartMigration};
use faultline::wire::Secret;
use faultline_operator::sidecar::SidecarClient;
use support::*;

fn client(c: &Cluster, pod: &str) -> SidecarClient {
    let (_, api) = c.pod_processes(pod).expect("pod processes");
    sidecar_client(api, Duration::from_secs(10))
}

/// Polls `c` until migration `id` is in a terminal phase; fails the test after `within`.
async fn wait_terminal(c: &SidecarClient, id: &str, within: Duration) -> MigrationStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = c.migration(id).await.expect("migration status");
        if s.phase.is_terminal() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not terminal within {within:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn start(
    id: &str,
    role: Role,
    peer: Option<String>,
    secret: &str,
    policy: Policy,
) -> StartMigration {
    StartMigration {
        id: id.into(),
        role,
        peer,
        secret: secret.into(),
        policy,
    }
}

#[tokio::test]
async fn readiness_reports_why_before_the_vmm_is_there() {
    // A sidecar whose VMM socket does not exist (yet).
    let dir = std::env::temp_dir().join(format!("faultline-optest-noready-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut child = Command::new(binary("faultline-sidecar"))
        .args(["--vmm-socket"])
        .arg(dir.join("vmm.sock"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--migration-listen",
            "127.0.0.1:0",
        ])
        .arg("--tls-dir")
        .arg(
            faultline_local::pki::local()
                .expect("local PKI")
                .sidecar_dir(),
        )
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sidecar");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("address line");
    let addrs: serde_json::Value = serde_json::from_str(&line).expect("JSON address line");
    let api: SocketAddr = addrs["api"]
        .as_str()
        .expect("api")
        .parse()
        .expect("address");
    let c = sidecar_client(api, Duration::from_secs(5));
    c.healthz().await.expect("alive");
    let why = c
        .readyz()
        .await
        .expect("readyz answers")
        .expect("not ready");
    assert!(!why.is_empty());
    let info = c.node().await.expect("node");
    assert!(info.vm.is_none(), "{info:?}");
    // A start now is refused as not ready (503), with the sidecar's reason.
    let e = c
        .start(&start(
            "a/b",
            Role::Target,
            None,
            &Secret::generate().expect("secret").to_base64(),
            Policy::default(),
        ))
        .await
        .expect_err("not joined");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_client_drives_a_real_migration_and_reads_every_answer() {
    if !kvm_available() {
        return;
    }
    let c = Cluster::new();
    c.add_vm_pod("src", "node-a", VM).await;
    c.add_vm_pod_with(
        "dst",
        "node-b",
        VM,
        &[("FAULTLINE_INCOMING", "true")],
        "incoming",
    )
    .await;
    let (src, dst) = (client(&c, "src"), client(&c, "dst"));

    src.healthz().await.expect("healthz");
    assert_eq!(src.readyz().await.expect("readyz"), None);
    let sinfo = src.node().await.expect("source node");
    let dinfo = dst.node().await.expect("target node");
    let (svm, dvm) = (sinfo.vm.expect("source vm"), dinfo.vm.expect("target vm"));
    assert!(!svm.incoming && dvm.incoming);
    assert_eq!((svm.vcpus, svm.memory_bytes), (dvm.vcpus, dvm.memory_bytes));
    assert!(!dinfo.trap_backends.is_empty(), "probes are reported");
    assert!(dinfo.migration_port > 0);

    let id = "vms/move/0123abcd";
    let secret = Secret::generate().expect("secret").to_base64();
    let policy = Policy {
        mode: faultline::sidecar_api::Mode::PreCopy,
        ..Policy::default()
    };
    // Unknown ids are 404, distinguishable from an unreachable sidecar.
    let e = dst.migration(id).await.expect_err("unknown");
    assert!(e.is_not_found() && !e.is_unreachable(), "{e}");
    // A malformed request is refused with the sidecar's message.
    let e = dst
        .start(&start(
            "bad id",
            Role::Target,
            None,
            &secret,
            policy.clone(),
        ))
        .await
        .expect_err("bad id");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(400), "{e}");
    assert!(e.to_string().contains("id"), "{e}");
    // The source refuses to be a target (its VM is not incoming).
    let e = src
        .start(&start(id, Role::Target, None, &secret, policy.clone()))
        .await
        .expect_err("source as target");
    assert!(e.is_conflict(), "{e}");

    let target_req = start(id, Role::Target, None, &secret, policy.clone());
    let t = dst.start(&target_req).await.expect("start target");
    assert!(t.created);
    assert_eq!(
        (t.status.role, t.status.phase),
        (Role::Target, Phase::Waiting)
    );
    // Repeating the same start is answered 200 with the current status (a restarted operator
    // re-sends it); a different body under the same id is a conflict.
    let again = dst.start(&target_req).await.expect("repeat");
    assert!(!again.created);
    let other = Secret::generate().expect("secret").to_base64();
    let e = dst
        .start(&start(id, Role::Target, None, &other, policy.clone()))
        .await
        .expect_err("different body");
    assert!(e.is_conflict(), "{e}");

    let peer = SocketAddr::from(([127, 0, 0, 1], dinfo.migration_port)).to_string();
    let s = src
        .start(&start(id, Role::Source, Some(peer), &secret, policy))
        .await
        .expect("start source");
    assert!(s.created);

    let done = wait_terminal(&dst, id, Duration::from_secs(60)).await;
    assert_eq!(done.phase, Phase::Completed, "{done:?}");
    assert!(done.committed, "{done:#?}");
    // The source measured the downtime (pause to target running).
    let s = src.migration(id).await.expect("source status");
    assert_eq!(s.phase, Phase::Completed, "{s:#?}");
    assert!(s.progress.downtime_ms.is_some_and(|d| d > 0.0), "{s:#?}");
    let list = src.migrations().await.expect("list");
    assert_eq!(list.first().map(|m| m.id.as_str()), Some(id));
    // Finished: cancel is refused with 409.
    let e = dst.cancel(id).await.expect_err("finished");
    assert!(e.is_conflict(), "{e}");
    let metrics = dst.metrics().await.expect("metrics");
    assert!(metrics.contains("faultline_sidecar_"), "{metrics}");
}

#[tokio::test]
async fn cancel_before_the_point_of_no_return_is_accepted() {
    if !kvm_available() {
        return;
    }
    let c = Cluster::new();
    c.add_vm_pod("src", "node-a", BUSY_VM).await;
    c.add_vm_pod_with(
        "dst",
        "node-b",
        VM,
        &[("FAULTLINE_INCOMING", "true")],
        "incoming",
    )
    .await;
    let (src, dst) = (client(&c, "src"), client(&c, "dst"));
    let port = dst.node().await.expect("node").migration_port;
    let id = "vms/cancel/1";
    let secret = Secret::generate().expect("secret").to_base64();
    // A post-copy migration switches only after all its passes: a long pre-copy (a thousand
    // paced passes over a busy VM's dirty pages).
    let policy = Policy {
        mode: faultline::sidecar_api::Mode::PostCopy,
        precopy_passes: 1000,
        bandwidth_limit: 64_000_000,
        ..Policy::default()
    };
    dst.start(&start(id, Role::Target, None, &secret, policy.clone()))
        .await
        .expect("target");
    src.start(&start(
        id,
        Role::Source,
        Some(format!("127.0.0.1:{port}")),
        &secret,
        policy,
    ))
    .await
    .expect("source");
    let deadline = Instant::now() + Duration::from_secs(30);
    while src.migration(id).await.expect("status").phase != Phase::PreCopy {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = src.cancel(id).await.expect("cancel accepted");
    assert!(!st.committed);
    let end = wait_terminal(&src, id, Duration::from_secs(30)).await;
    assert_eq!(end.phase, Phase::Cancelled, "{end:?}");
    assert!(!end.committed);
}
