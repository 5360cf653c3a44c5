//! The `faultline` CLI end to end: `faultline demo` migrates a live memtouch VM between two
//! real VMMs through two real sidecars and reports the documented JSON; `faultline probe`
//! reports this kernel's trap backends.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_faultline");

fn kvm_available() -> bool {
    faultline_local::kvm_or_skip()
}

/// Runs `faultline ARGS`, which must succeed and print one JSON object.
fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run faultline");
    assert!(
        out.status.success(),
        "faultline {args:?} failed ({:?}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn demo(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--memory", "128M", "--json", "--warmup", "500ms"]);
    run_json(&all)
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

/// The paced guest keeps its pace on our VMM, and the report says what the migration cost it.
#[test]
fn demo_with_a_paced_guest_reports_the_guest_time_lost() {
    if !kvm_available() {
        return;
    }
    let r = demo(&[
        "--vcpus",
        "1",
        "--mode",
        "postcopy",
        "--precopy-passes",
        "0",
        "--prefill",
        "--pages-per-sec",
        "1000",
    ]);
    assert_eq!(r["result"], "succeeded");
    assert_eq!(r["pages_per_sec"], 1000);
    let rate = r["guest"]["rate_before_per_sec"].as_f64().expect("a rate");
    assert!(
        (900.0..1100.0).contains(&rate),
        "the guest kept 1000 pages/s within 10% before the migration, not {rate}"
    );
    assert!(r["guest"]["time_lost_ms"].is_f64(), "{r}");
}

/// The benchmark's comparison with QEMU, in its quick form: QEMU's own migration of the same
/// guest and Faultline's, for every strategy, side by side (QEMU is a prerequisite of the
/// suite: scripts/test installs Debian's qemu-system-x86).
#[test]
fn bench_quick_compares_with_qemu_side_by_side() {
    if !kvm_available() {
        return;
    }
    let r = run_json(&["bench", "--quick", "--peer", "qemu", "--json"]);
    let peer = &r["peer"];
    assert!(
        peer["peer"].as_str().unwrap_or("").starts_with("QEMU"),
        "{peer}"
    );
    let runs = peer["runs"].as_array().expect("runs");
    for vmm in ["qemu", "faultline"] {
        for strategy in ["precopy", "postcopy-at-start", "postcopy-after-first-pass"] {
            let run = runs
                .iter()
                .find(|x| x["vmm"] == vmm && x["strategy"] == strategy)
                .unwrap_or_else(|| panic!("no {vmm} {strategy} run in {peer}"));
            assert_eq!(run["guest_failures"], 0, "{run}");
            assert!(run["sweeps_after"].is_u64(), "{run}");
            assert!(run["total_ms"].as_f64().unwrap_or(0.0) > 0.0, "{run}");
            // Every page of the working set holds data: about 250 MiB must cross.
            assert!(
                run["bytes_sent"].as_u64().unwrap_or(0) >= 200 << 20,
                "{run}"
            );
            let rate = run["rate_before_per_sec"].as_f64().unwrap_or(0.0);
            let asked = run["pages_per_sec"].as_f64().unwrap_or(0.0);
            assert!(
                (rate - asked).abs() < asked * 0.1,
                "{vmm} kept the guest's pace within 10% before migrating: {run}"
            );
        }
    }
    // Post-copy from the start faults on both.
    for vmm in ["qemu", "faultline"] {
        let run = runs
            .iter()
            .find(|x| x["vmm"] == vmm && x["strategy"] == "postcopy-at-start")
            .expect("post-copy run");
        assert!(run["faults"].as_u64().unwrap_or(0) > 0, "{run}");
    }
    let names: Vec<&str> = peer["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    for t in [
        "postcopy_total_time_vs_qemu_busy",
        "postcopy_switchover_pause_vs_qemu_busy",
        "postcopy_guest_time_lost_vs_qemu_busy",
        "precopy_total_time_vs_qemu_busy",
        "precopy_downtime_vs_qemu_busy",
        "postcopy_push_vs_precopy_bulk_busy",
        "precopy_bulk_vs_fresh_memory_busy",
    ] {
        assert!(names.contains(&t), "target {t} missing from {names:?}");
    }
}
