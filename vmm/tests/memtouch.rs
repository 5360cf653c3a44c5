//! memtouch in the reference VMM: it runs and verifies on every backing, it catches a page
//! corrupted behind its back, and the guest ABI is what docs/guest-abi.md says.

mod common;

use std::time::Duration;

use common::*;
use faultline::vmm_protocol::messages::{VcpuState, VmState};

/// Runs memtouch with a control socket, checks heartbeats rise on every vCPU between two
/// status reads, then shuts it down and checks the final report.
fn runs_clean(backing: &str, vcpus: u32) {
    if !kvm_available() {
        return;
    }
    let n = vcpus.to_string();
    let mut vmm = start(
        &format!("run-{backing}-{vcpus}"),
        &["--memory", "128M", "--vcpus", &n, "--backing", backing],
    );
    let mut c = client(&vmm);
    let first = wait_status(&mut c, Duration::from_secs(30), |s| {
        s.heartbeats.iter().all(|&h| h > 0)
    });
    assert!(
        first.heartbeats.iter().all(|&h| h > 0),
        "no heartbeats: {first:?}"
    );
    let second = wait_status(&mut c, Duration::from_secs(30), |s| {
        s.heartbeats
            .iter()
            .zip(&first.heartbeats)
            .all(|(b, a)| b > a)
    });
    assert!(
        second
            .heartbeats
            .iter()
            .zip(&first.heartbeats)
            .all(|(b, a)| b > a),
        "heartbeats did not rise on every vCPU: {:?} then {:?}",
        first.heartbeats,
        second.heartbeats
    );
    assert_eq!(second.state, VmState::Running);
    drop(c);
    let (last, code) = vmm.shutdown().expect("shutdown");
    assert_eq!(last.failures, 0, "guest reported failures: {last:?}");
    assert!(last.failed_pages.is_empty());
    assert_eq!(last.heartbeats.len(), vcpus as usize);
    assert_eq!(code, 0);
}

#[test]
fn memtouch_anon_1_vcpu() {
    runs_clean("anon", 1);
}

#[test]
fn memtouch_anon_4_vcpus() {
    runs_clean("anon", 4);
}

#[test]
fn memtouch_memfd_1_vcpu() {
    runs_clean("memfd", 1);
}

#[test]
fn memtouch_memfd_4_vcpus() {
    runs_clean("memfd", 4);
}

#[test]
fn memtouch_guest_memfd_1_vcpu() {
    runs_clean("guest-memfd", 1);
}

#[test]
fn memtouch_guest_memfd_4_vcpus() {
    runs_clean("guest-memfd", 4);
}

/// `--run-for` ends the VM on its own, printing one JSON object with the documented keys.
#[test]
fn run_for_prints_final_json() {
    if !kvm_available() {
        return;
    }
    let out = std::process::Command::new(BIN)
        .args([
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--run-for",
            "1500ms",
            "--json",
            "-q",
        ])
        .args(["--log", "warn"])
        .output()
        .expect("run faultline-vmm");
    assert!(out.status.success(), "exit {:?}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let beats = v["heartbeats"].as_array().expect("heartbeats array");
    assert_eq!(beats.len(), 2);
    assert!(beats.iter().all(|b| b.as_u64().unwrap_or(0) > 0));
    assert_eq!(v["failures"], 0);
    assert_eq!(v["failed_pages"], serde_json::json!([]));
}

/// Flips one byte of a page through the memory fd while the VM is paused; memtouch must
/// report exactly that page, once.
fn corruption_is_reported(backing: &str, full_verify: bool, offset_in_page: u64) {
    if !kvm_available() {
        return;
    }
    let mut args = vec![
        "--memory",
        "64M",
        "--vcpus",
        "1",
        "--backing",
        backing,
        "--working-set",
        "0.05",
        "--write-intensity",
        "0.5",
    ];
    if full_verify {
        args.push("--full-verify");
    }
    let mut vmm = start(&format!("corrupt-{backing}-{full_verify}"), &args);
    let mut c = client(&vmm);
    let (hello, fds) = c.hello("test").expect("hello");
    let mem = memory(&hello, fds);
    // Let memtouch write part of its working set, then stop it.
    wait_status(&mut c, Duration::from_secs(30), |s| {
        s.vcpu_status[0].status_word >= 2
    });
    c.pause().expect("pause");
    let layout = memtouch_layout(64 << 20);
    let ws_pages = layout.usable_pages * 50 / 1000;
    // Corrupt one written page and one never-written (all-zero) page, if there is one.
    let mut written = None;
    let mut zero = None;
    for i in 0..ws_pages {
        let gpa = layout.data + i * 4096;
        let gen_nonzero = mem.read_u64_at(layout.table + i * 4) & 0xFFFF_FFFF != 0;
        if gen_nonzero && written.is_none() {
            written = Some(gpa);
        }
        if !gen_nonzero && zero.is_none() {
            zero = Some(gpa);
        }
    }
    let written = written.expect("memtouch wrote at least one page");
    let mut targets = vec![written];
    targets.extend(zero);
    for &gpa in &targets {
        let mut b = [0u8; 1];
        mem.read_at(gpa + offset_in_page, &mut b);
        mem.write_at(gpa + offset_in_page, &[b[0] ^ 0x40]);
    }
    let before = c.status().expect("status").failures;
    assert_eq!(before, 0);
    c.resume().expect("resume");
    let s = wait_status(&mut c, Duration::from_secs(30), |s| {
        s.failures >= targets.len() as u64
    });
    let mut expected: Vec<u64> = targets.iter().map(|g| g / 4096).collect();
    expected.sort();
    let mut got = s.failed_pages.clone();
    got.sort();
    assert_eq!(
        got, expected,
        "reported pages differ from the corrupted ones"
    );
    // Each corruption is reported once: memtouch repairs the page after reporting it.
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status().expect("status");
    assert_eq!(
        s.failures,
        targets.len() as u64,
        "reported more than once: {s:?}"
    );
    drop(c);
    let (last, code) = vmm.shutdown().expect("shutdown");
    assert_eq!(last.failures, targets.len() as u64);
    assert_eq!(code, 1, "a guest failure makes the VMM exit non-zero");
}

#[test]
fn corruption_detected_memfd() {
    corruption_is_reported("memfd", false, 0);
}

#[test]
fn corruption_detected_guest_memfd() {
    corruption_is_reported("guest-memfd", false, 4088);
}

#[test]
fn corruption_detected_anon() {
    corruption_is_reported("anon", false, 2048);
}

#[test]
fn corruption_mid_page_detected_with_full_verify() {
    corruption_is_reported("memfd", true, 1234);
}

/// A user program (`--guest FILE`) sees the registers the ABI promises, its port writes are
/// counted per vCPU, and the VM ends when every vCPU has executed `hlt`.
#[test]
fn guest_abi_registers_ports_and_halt() {
    if !kvm_available() {
        return;
    }
    let dir = temp_dir("abi");
    let program: Vec<u8> = [
        &[0x89, 0xF8][..],         // mov eax, edi        (vCPU index)
        &[0xE7, 0xF2],             // out 0xF2, eax       (status word)
        &[0x89, 0xF0],             // mov eax, esi        (vCPU count)
        &[0xE7, 0xF0],             // out 0xF0, eax       (heartbeat 1)
        &[0x48, 0x89, 0xD0],       // mov rax, rdx        (RAM size)
        &[0x48, 0xC1, 0xE8, 0x14], // shr rax, 20
        &[0xE7, 0xF0],             // out 0xF0, eax       (heartbeat 2: RAM in MiB)
        &[0x49, 0x8B, 0x00],       // mov rax, [r8]       (first argument)
        &[0x4C, 0x01, 0xC8],       // add rax, r9         (+ argument count)
        &[0x48, 0x01, 0xC8],       // add rax, rcx        (+ first free byte)
        &[0x48, 0x01, 0xE0],       // add rax, rsp        (+ stack top)
        &[0xE7, 0xF0],             // out 0xF0, eax       (heartbeat 3)
        &[0xF4],                   // hlt
    ]
    .concat();
    let path = dir.join("abi.bin");
    std::fs::write(&path, &program).expect("write program");
    let out = std::process::Command::new(BIN)
        .args([
            "--memory", "96M", "--vcpus", "3", "--json", "-q", "--log", "warn",
        ])
        .arg("--guest")
        .arg(&path)
        .args(["--guest-arg", "1000", "--guest-arg", "5"])
        .output()
        .expect("run faultline-vmm");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "exit {:?}", out.status);
    let s: faultline::vmm_protocol::messages::VmStatus =
        serde_json::from_slice(&out.stdout).expect("final status");
    assert_eq!(s.state, VmState::Halted);
    assert_eq!(s.heartbeats, vec![3, 3, 3]);
    for v in &s.vcpu_status {
        assert_eq!(v.state, VcpuState::Halted);
        assert_eq!(v.status_word, v.index, "RDI is the vCPU index");
        let stack_top = 0x8_0000 + (u64::from(v.index) + 1) * 0x2000;
        let expected = 1000 + 2 + 0x20_0000 + stack_top;
        assert_eq!(u64::from(v.progress), expected, "R8/R9/RCX/RSP per the ABI");
    }
}

/// Options that make no sense are refused before any VM exists.
#[test]
fn bad_options_are_refused() {
    for args in [
        &["--memory", "63M"][..],
        &["--memory", "65M"],
        &["--memory", "128G"],
        &["--vcpus", "0"],
        &["--vcpus", "65"],
        &["--backing", "hugetlb"],
        &["--working-set", "0"],
        &["--write-intensity", "2"],
        &["--guest", "/nonexistent/program"],
        &["--incoming"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .args(["--run-for", "1s", "-q"])
            .output()
            .expect("run faultline-vmm");
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(!out.stderr.is_empty(), "{args:?} failed without saying why");
    }
}

/// A backing this kernel cannot provide ends the VMM with exit status 77 ("cannot here") and
/// the capability it probed, not with a generic failure.
#[test]
fn missing_capability_exits_77() {
    if !kvm_available() {
        return;
    }
    let out = std::process::Command::new(BIN)
        .args([
            "--memory",
            "64M",
            "--backing",
            "guest-memfd",
            "--run-for",
            "200ms",
            "-q",
        ])
        .output()
        .expect("run faultline-vmm");
    match out.status.code() {
        Some(0) => {} // this kernel has mmap-able guest_memfd
        Some(77) => {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("KVM_CAP_"), "names the capability: {err}");
        }
        other => panic!("exit {other:?}: {}", String::from_utf8_lossy(&out.stderr)),
    }
}
