//! The `faultline` CLI end to end: `faultline demo` migrates a live memtouch VM between two
//! real VMMs through two real sidecars and reports the documented JSON; `faultline probe`
//! reports this kernel's trap backends.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_faultline");

fn kvm_available() -> bool {
    faultline_local::kvm_or_skip()
}

fn demo(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("demo")
        .args(args)
        .args(["--memory", "128M", "--json", "--warmup", "500ms"])
        .output()
        .expect("run faultline demo");
    assert!(
        out.status.success(),
        "demo failed ({:?}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn demo_postcopy_reports_and_the_guest_verifies() {
    if !kvm_available() {
        return;
    }
    let r = demo(&["--mode", "postcopy", "--precopy-passes", "0", "--prefill"]);
    for key in [
        "mode",
        "total_ms",
        "downtime_ms",
        "precopy_rounds",
        "bytes_sent",
        "faults",
        "fault_latency_us",
        "guest",
    ] {
        assert!(r.get(key).is_some(), "missing `{key}` in {r}");
    }
    assert_eq!(r["result"], "succeeded");
    assert_eq!(r["mode"], "post-copy");
    assert_eq!(r["precopy_rounds"], 0);
    assert!(
        r["faults"].as_u64().unwrap_or(0) > 0,
        "post-copy of a prefilled guest faults"
    );
    for k in ["p50", "p99", "max"] {
        assert!(r["fault_latency_us"][k].is_u64());
    }
    assert_eq!(r["guest"]["failures"], 0);
    let after = r["guest"]["heartbeats_after"].as_array().expect("array");
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|h| h.as_u64().unwrap_or(0) > 0));
    assert!(r["guest"]["verified_for_s"].as_f64().unwrap_or(0.0) >= 3.0);
}

#[test]
fn demo_precopy_on_anonymous_memory() {
    if !kvm_available() {
        return;
    }
    let r = demo(&["--mode", "precopy", "--backing", "anon"]);
    assert_eq!(r["result"], "succeeded");
    assert_eq!(r["faults"], 0);
    assert_eq!(r["guest"]["failures"], 0);
}

/// The demo's restart switch kills the target sidecar mid-post-copy and starts it again; the
/// migration still succeeds and the report counts the restart.
#[test]
fn demo_survives_a_target_sidecar_restart() {
    if !kvm_available() {
        return;
    }
    let r = demo(&[
        "--mode",
        "postcopy",
        "--precopy-passes",
        "0",
        "--vcpus",
        "1",
        "--dirty-rate",
        "heavy",
        "--bandwidth-limit",
        "16M",
        "--restart-target-sidecar",
    ]);
    assert_eq!(r["result"], "succeeded", "{r}");
    assert_eq!(r["target_sidecar_restarts"], 1);
    assert_eq!(r["guest"]["failures"], 0);
}

#[test]
fn probe_lists_every_backing_and_backend() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(BIN)
        .args(["probe", "--json"])
        .output()
        .expect("run faultline probe");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let probes = v.as_array().expect("array");
    assert_eq!(probes.len(), 6);
    for p in probes {
        assert!(p["reason"].as_str().is_some_and(|r| !r.is_empty()));
    }
}

/// Post-copy of guest_memfd memory works where the kernel offers KVM Userfault (our kernel, in
/// the boot matrix) and is reported unavailable — exit 77, with the probed reasons — where it
/// does not (the development machines), never as a silent fallback.
#[test]
fn demo_guest_memfd_postcopy_is_done_or_explicitly_unavailable() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(BIN)
        .args(["demo", "--backing", "guest-memfd", "--mode", "postcopy"])
        .args([
            "--precopy-passes",
            "0",
            "--memory",
            "64M",
            "--json",
            "--warmup",
            "200ms",
        ])
        .output()
        .expect("run faultline demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
            assert_eq!(r["trap"], "kvm-userfault");
            assert_eq!(r["guest"]["failures"], 0);
        }
        Some(77) => {
            assert!(stderr.contains("unavailable"), "{stderr}");
            assert!(
                stderr.contains("kvm-userfault") && stderr.contains("userfaultfd"),
                "{stderr}"
            );
        }
        other => panic!("exit {other:?}: {stderr}"),
    }
}
