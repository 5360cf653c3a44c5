//! The dirty log over the VMM protocol: pages the guest writes between two collects are
//! reported, pages it does not write are not.

mod common;

use std::time::Duration;

use common::*;
use faultline::bitmap::PageBitmap;
use faultline::vmm_protocol::messages::{CapabilityName, ErrorCode};

const RAM: u64 = 64 << 20;
/// The vCPU stacks: `call`/`ret` rewrite them with the same bytes, so KVM logs them dirty
/// although their contents do not change.
const STACKS: std::ops::Range<u64> = (0x8_0000 / 4096)..(0x10_0000 / 4096);

fn snapshot(mem: &TestMemory) -> Vec<u8> {
    let mut all = vec![0u8; RAM as usize];
    mem.read_at(0, &mut all);
    all
}

fn changed_pages(a: &[u8], b: &[u8]) -> PageBitmap {
    let mut bm = PageBitmap::new(RAM / 4096);
    for (i, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
        if x != y {
            bm.set(i as u64);
        }
    }
    bm
}

/// Runs the guest for a moment between two collects and compares KVM's answer with what
/// actually changed in memory.
fn check_window(
    c: &mut faultline::vmm_protocol::VmmClient,
    mem: &TestMemory,
) -> (PageBitmap, PageBitmap) {
    c.pause().expect("pause");
    c.dirty_log_collect().expect("collect to reset");
    let before = snapshot(mem);
    c.resume().expect("resume");
    std::thread::sleep(Duration::from_millis(400));
    c.pause().expect("pause");
    let dirty = c.dirty_log_collect().expect("collect");
    let after = snapshot(mem);
    let changed = changed_pages(&before, &after);
    for p in changed.iter_set() {
        assert!(dirty.test(p), "page {p} changed but was not reported dirty");
    }
    for p in dirty.iter_set() {
        assert!(
            changed.test(p) || STACKS.contains(&p),
            "page {p} reported dirty but the guest never wrote it"
        );
    }
    (dirty, changed)
}

fn dirty_log_matches_writes(backing: &str) {
    if !kvm_available() {
        return;
    }
    let mut vmm = start(
        &format!("dirty-{backing}"),
        &[
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--backing",
            backing,
            "--write-intensity",
            "0.25",
        ],
    );
    let mut c = client(&vmm);
    let (hello, fds) = c.hello("test").expect("hello");
    let cap = hello
        .capability(CapabilityName::DirtyLog)
        .expect("dirty-log capability listed")
        .clone();
    let mem = memory(&hello, fds);
    let started = c.dirty_log_start();
    if !cap.available {
        let refusal = started.expect_err("start must fail when unavailable");
        assert_eq!(
            refusal.refusal().map(|r| r.code),
            Some(ErrorCode::Unavailable)
        );
        eprintln!("dirty log unavailable on {backing}: {:?}", cap.reason);
        return;
    }
    started.expect("dirty_log_start");
    let (dirty, changed) = check_window(&mut c, &mem);
    assert!(
        changed.count() > 10,
        "the guest wrote too little to test: {}",
        changed.count()
    );
    assert!(dirty.count() >= changed.count());
    assert!(c.status().expect("status").dirty_log_active);

    // Stop and restart: the log starts clean.
    c.dirty_log_stop().expect("stop");
    assert!(
        c.dirty_log_collect().is_err(),
        "collect without a running log"
    );
    c.dirty_log_start().expect("restart");
    check_window(&mut c, &mem);
    drop(c);
    let (last, _) = vmm.shutdown().expect("shutdown");
    assert_eq!(last.failures, 0);
}

#[test]
fn dirty_log_memfd() {
    dirty_log_matches_writes("memfd");
}

#[test]
fn dirty_log_anon() {
    dirty_log_matches_writes("anon");
}

/// On guest_memfd the kernel decides; either way the answer is explicit and the capability
/// in hello agrees with what dirty_log_start does.
#[test]
fn dirty_log_guest_memfd_is_explicit() {
    dirty_log_matches_writes("guest-memfd");
}

/// A guest that only reads dirties nothing but its stack.
#[test]
fn read_only_guest_dirties_nothing() {
    if !kvm_available() {
        return;
    }
    let vmm = start(
        "dirty-ro",
        &[
            "--memory",
            "64M",
            "--vcpus",
            "1",
            "--backing",
            "memfd",
            "--write-intensity",
            "0",
        ],
    );
    let mut c = client(&vmm);
    let (hello, fds) = c.hello("test").expect("hello");
    let mem = memory(&hello, fds);
    // Past start-up, so the stack already holds its return addresses.
    wait_status(&mut c, Duration::from_secs(20), |s| s.heartbeats[0] > 1);
    c.dirty_log_start().expect("start");
    let (dirty, changed) = check_window(&mut c, &mem);
    assert!(
        changed.iter_set().all(|p| STACKS.contains(&p)),
        "a read-only guest changed memory"
    );
    assert!(
        dirty.iter_set().all(|p| STACKS.contains(&p)),
        "{:?}",
        dirty.iter_set().collect::<Vec<_>>()
    );
}
