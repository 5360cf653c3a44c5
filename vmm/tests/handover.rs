//! Hand-over between two reference VMMs through the VMM protocol alone: A pauses and saves
//! its state, B (started with --incoming) receives a copy of A's memory through the fds from
//! hello plus the state, resumes, and memtouch keeps verifying with zero failures.

mod common;

use std::time::Duration;

use common::*;
use faultline::layout::MemoryLayout;
use faultline::vmm_protocol::messages::{ErrorCode, VmState};

const RAM: &str = "128M";

fn handover(backing: &str, vcpus: u32) {
    handover_with(backing, vcpus, &[]);
}

/// A hand-over of VMs started with `extra` arguments too; returns A's layout.
fn handover_with(backing: &str, vcpus: u32, extra: &[&str]) -> Option<MemoryLayout> {
    if !kvm_available() {
        return None;
    }
    let n = vcpus.to_string();
    let mut common_args = vec!["--memory", RAM, "--vcpus", &n, "--backing", backing];
    common_args.extend_from_slice(extra);
    let tag = format!("{backing}-{vcpus}{}", extra.concat());
    let mut a = start(&format!("ho-src-{tag}"), &common_args);
    let mut b_args = common_args.to_vec();
    b_args.push("--incoming");
    let mut b = start(&format!("ho-dst-{tag}"), &b_args);
    let mut ca = client(&a);
    let mut cb = client(&b);

    // Let A run until every vCPU has verified its whole share at least once.
    let before = wait_status(&mut ca, Duration::from_secs(60), |s| {
        s.vcpu_status.iter().all(|v| v.status_word >= 1)
    });
    assert!(
        before.vcpu_status.iter().all(|v| v.status_word >= 1),
        "{before:?}"
    );

    let (hello_b, fds_b) = cb.hello("test").expect("hello B");
    assert!(hello_b.incoming);
    assert_eq!(hello_b.state, VmState::Incoming);
    // Nothing runs in B before a state arrives.
    assert_eq!(
        cb.resume()
            .expect_err("B must not run before a state arrives")
            .refusal()
            .map(|r| r.code),
        Some(ErrorCode::InvalidState)
    );

    assert_eq!(ca.pause().expect("pause A"), VmState::Paused);
    let (hello_a, fds_a) = ca.hello("test").expect("hello A");
    assert!(hello_a.layout.compatible_with(&hello_b.layout));
    let (info, blob) = ca.save_state().expect("save A");
    assert_eq!(info.bytes as usize, blob.len());
    let at_pause = ca.status().expect("status A");

    let mem_a = memory(&hello_a, fds_a);
    let mem_b = memory(&hello_b, fds_b);
    let mut page = vec![0u8; 1 << 20];
    for region in &hello_a.layout.regions {
        for gpa in (region.guest_phys_addr..region.end()).step_by(page.len()) {
            mem_a.read_at(gpa, &mut page);
            mem_b.write_at(gpa, &page);
        }
    }
    assert_eq!(cb.restore_state(&blob).expect("restore B"), VmState::Paused);
    // Source commits: from here on it must never run again.
    assert_eq!(ca.fence().expect("fence A"), VmState::Fenced);
    assert_eq!(
        ca.resume()
            .expect_err("a fenced A must not run again")
            .refusal()
            .map(|r| r.code),
        Some(ErrorCode::InvalidState)
    );
    assert_eq!(cb.resume().expect("resume B"), VmState::Running);

    // B continues A's counts and keeps verifying: every vCPU completes at least one more
    // full sweep of its share, so every page was checked after the hand-over.
    let restored = cb.status().expect("status B");
    for (rb, ra) in restored.heartbeats.iter().zip(&at_pause.heartbeats) {
        assert!(rb >= ra, "B's counts start from A's: {rb} < {ra}");
    }
    let after = wait_status(&mut cb, Duration::from_secs(90), |s| {
        s.vcpu_status
            .iter()
            .zip(&at_pause.vcpu_status)
            .all(|(v, a)| v.status_word > a.status_word && v.heartbeats > a.heartbeats)
    });
    for (v, a) in after.vcpu_status.iter().zip(&at_pause.vcpu_status) {
        assert!(
            v.heartbeats > a.heartbeats,
            "vCPU {} did not run on B",
            v.index
        );
        assert!(
            v.status_word > a.status_word,
            "vCPU {} did not finish a verification sweep on B",
            v.index
        );
    }
    assert_eq!(
        after.failures, 0,
        "guest found damage after the hand-over: {after:?}"
    );
    drop((ca, cb));
    let (final_a, _) = a.shutdown().expect("shutdown");
    assert_eq!(final_a.state, VmState::Fenced);
    let (final_b, code) = b.shutdown().expect("shutdown");
    assert_eq!(final_b.failures, 0);
    assert_eq!(code, 0);
    Some(hello_a.layout)
}

/// RAM split as a PC splits it, here at 64 MiB instead of 3 GiB: two memslots, the second
/// at guest-physical 4 GiB, both in one file. The guest's page tables put the high part right
/// after the low one, so memtouch's sweep covers both.
fn split_handover(backing: &str) {
    let Some(layout) = handover_with(backing, 2, &["--below-4g", "64M"]) else {
        return;
    };
    let regions: Vec<(u64, u64)> = layout
        .regions
        .iter()
        .map(|r| (r.guest_phys_addr, r.size))
        .collect();
    assert_eq!(regions, [(0, 64 << 20), (4 << 30, 64 << 20)]);
}

#[test]
fn handover_split_ram_memfd() {
    split_handover("memfd");
}

#[test]
fn handover_split_ram_guest_memfd() {
    split_handover("guest-memfd");
}

#[test]
fn handover_split_ram_anon() {
    split_handover("anon");
}

#[test]
fn handover_memfd_1_vcpu() {
    handover("memfd", 1);
}

#[test]
fn handover_memfd_4_vcpus() {
    handover("memfd", 4);
}

#[test]
fn handover_guest_memfd_1_vcpu() {
    handover("guest-memfd", 1);
}

#[test]
fn handover_guest_memfd_4_vcpus() {
    handover("guest-memfd", 4);
}

#[test]
fn handover_anon_2_vcpus() {
    handover("anon", 2);
}

/// If B does not get A's memory, memtouch on B must notice: the hand-over test above would
/// be worthless if a missing copy went unseen.
#[test]
fn handover_without_memory_is_detected() {
    if !kvm_available() {
        return;
    }
    let args = ["--memory", "64M", "--vcpus", "1", "--backing", "memfd"];
    let a = start("ho-nomem-src", &args);
    let mut b_args = args.to_vec();
    b_args.push("--incoming");
    let b = start("ho-nomem-dst", &b_args);
    let (mut ca, mut cb) = (client(&a), client(&b));
    wait_status(&mut ca, Duration::from_secs(30), |s| {
        s.vcpu_status[0].status_word >= 1
    });
    ca.pause().expect("pause");
    let (hello_a, fds_a) = ca.hello("t").expect("hello A");
    let (hello_b, fds_b) = cb.hello("t").expect("hello B");
    let (_, blob) = ca.save_state().expect("save");
    // Copy everything except memtouch's data pages: program, page tables, generation table.
    let layout = memtouch_layout(64 << 20);
    let (mem_a, mem_b) = (memory(&hello_a, fds_a), memory(&hello_b, fds_b));
    let mut buf = vec![0u8; layout.data as usize];
    mem_a.read_at(0, &mut buf);
    mem_b.write_at(0, &buf);
    cb.restore_state(&blob).expect("restore");
    cb.resume().expect("resume");
    let s = wait_status(&mut cb, Duration::from_secs(30), |s| s.failures > 0);
    assert!(s.failures > 0, "missing pages went unnoticed");
    assert!(s.failed_pages.iter().all(|&p| p >= layout.data / 4096));
}
