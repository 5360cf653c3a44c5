//! The trap operations of the VMM protocol: what an incoming VMM offers for each backing is
//! probed, said in hello, and agrees with what the operations then do.

mod common;

use common::*;
use faultline::trap::Backend;
use faultline::vmm_protocol::messages::{CapabilityName, ErrorCode, UffdMode};

fn check(backing: &str) {
    if !kvm_available() {
        return;
    }
    let vmm = start(
        &format!("traps-{backing}"),
        &["--memory", "64M", "--backing", backing, "--incoming"],
    );
    let mut c = client(&vmm);
    let (hello, _fds) = c.hello("test").expect("hello");
    let uffd = hello
        .capability(CapabilityName::Userfaultfd)
        .expect("userfaultfd listed")
        .clone();
    let kvm = hello
        .capability(CapabilityName::KvmUserfault)
        .expect("kvm-userfault listed")
        .clone();
    for cap in [&uffd, &kvm] {
        assert!(
            cap.available || cap.reason.as_deref().is_some_and(|r| !r.is_empty()),
            "{cap:?}"
        );
    }

    // Nothing armed yet: nothing to rejoin.
    let e = c.trap_rejoin().expect_err("no trap to rejoin");
    assert_eq!(e.refusal().map(|r| r.code), Some(ErrorCode::InvalidState));

    // KVM Userfault: arming works exactly when offered; the refusal carries the probe's reason.
    let mut events = client(&vmm);
    match events.kvm_userfault_arm(false) {
        Ok((reply, _fd, uffd)) => {
            assert!(uffd.is_none() && !reply.host_accesses);
            assert!(kvm.available, "armed although hello said unavailable");
            assert_eq!(reply.pages, 64 << 20 >> 12);
            let state = c.kvm_userfault_disarm().expect("disarm");
            assert_eq!(format!("{state:?}"), "Incoming");
        }
        Err(e) => {
            assert!(
                !kvm.available,
                "hello offered kvm-userfault but arming failed: {e}"
            );
            let refusal = e.refusal().expect("a refusal, not a transport error");
            assert_eq!(refusal.code, ErrorCode::Unavailable);
            assert_eq!(Some(refusal.message.as_str()), kvm.reason.as_deref());
        }
    }

    // userfaultfd: registering works exactly when offered.
    let registered = c.userfaultfd_register(UffdMode::Missing);
    assert_eq!(
        registered.is_ok(),
        uffd.available,
        "{registered:?} vs {uffd:?}"
    );
    if registered.is_ok() {
        let again = c
            .userfaultfd_register(UffdMode::Missing)
            .expect_err("registered twice");
        assert_eq!(
            again.refusal().map(|r| r.code),
            Some(ErrorCode::InvalidState)
        );
        // A receiver that restarted gets the userfaultfd again, and every page of a VM that
        // has received nothing is invalid (not present).
        let (r, fds, invalid) = c.trap_rejoin().expect("rejoin the userfaultfd");
        assert_eq!(r.trap, Backend::Userfaultfd);
        assert_eq!(fds.len(), 1);
        assert_eq!(r.pages, 64 << 20 >> 12);
        assert_eq!((invalid.count(), r.invalid), (r.pages, r.pages));
        c.userfaultfd_disarm().expect("disarm");
    }
}

#[test]
fn traps_on_anon() {
    check("anon");
}

#[test]
fn traps_on_memfd() {
    check("memfd");
}

#[test]
fn traps_on_guest_memfd() {
    check("guest-memfd");
}

/// A running (not incoming) VMM hands out no trap: its memory is live.
#[test]
fn no_traps_outside_incoming_mode() {
    if !kvm_available() {
        return;
    }
    let vmm = start("traps-running", &["--memory", "64M"]);
    let mut c = client(&vmm);
    for e in [
        c.userfaultfd_register(UffdMode::Missing)
            .map(|_| ())
            .expect_err("uffd"),
        client(&vmm)
            .kvm_userfault_arm(false)
            .map(|_| ())
            .expect_err("kvm-userfault"),
    ] {
        assert!(
            matches!(
                e.refusal().map(|r| r.code),
                Some(ErrorCode::InvalidState | ErrorCode::Unavailable)
            ),
            "{e}"
        );
    }
    let discard = c.discard(&faultline::bitmap::PageBitmap::new(64 << 20 >> 12));
    assert_eq!(
        discard.unwrap_err().refusal().map(|r| r.code),
        Some(ErrorCode::InvalidState)
    );
}
