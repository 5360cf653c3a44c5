//! The trap-backend probe against the kernel it runs on (needs KVM; see
//! `faultline_local::kvm_or_skip` for what happens without it).

use faultline::BackingKind;
use faultline::probe::probe_trap_backends;
use faultline::trap::kvm_userfault::KVM_CAP_USERFAULT_FAULTLINE;
use faultline::trap::{Backend, BackendProbe};
use kvm_ioctls::Kvm;

fn find(probes: &[BackendProbe], backing: BackingKind, backend: Backend) -> &BackendProbe {
    probes
        .iter()
        .find(|p| p.backing == backing && p.backend == backend)
        .unwrap_or_else(|| panic!("no probe for {backing}/{backend}: {probes:?}"))
}

/// On a kernel without KVM Userfault (the development host: a paravirtual KVM on 6.18),
/// the probe must say so with the memslot ioctl's EINVAL. A kernel that reports Faultline's
/// capability must instead accept the flag.
#[test]
fn kvm_userfault_matches_the_kernel() {
    if !faultline_local::kvm_or_skip() {
        return;
    }
    let kvm = Kvm::new().expect("KVM is usable");
    let patched = kvm.check_extension_raw(KVM_CAP_USERFAULT_FAULTLINE.into()) > 0;
    let probes = probe_trap_backends();
    for backing in [BackingKind::Anon, BackingKind::Memfd] {
        let p = find(&probes, backing, Backend::KvmUserfault);
        assert_eq!(p.available, patched, "{p:?}");
        if !patched {
            assert_eq!(
                p.reason,
                format!(
                    "KVM_SET_USER_MEMORY_REGION2(KVM_MEM_USERFAULT) on {backing} memory = EINVAL"
                )
            );
        }
    }
    let g = find(&probes, BackingKind::GuestMemfd, Backend::KvmUserfault);
    assert_eq!(g.available, patched, "{g:?}");
    if !patched {
        assert!(
            g.reason
                == "KVM_SET_USER_MEMORY_REGION2(KVM_MEM_GUEST_MEMFD|KVM_MEM_USERFAULT) on guest-memfd memory = EINVAL"
                || g.reason.starts_with("KVM_CREATE_GUEST_MEMFD"),
            "{g:?}"
        );
    }
}
