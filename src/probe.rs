//! The one capability probe for trap backends, shared by the sidecar, the CLI and the kernel
//! boot matrix: for each backing (anon, memfd, guest_memfd), does KVM Userfault work, and does
//! userfaultfd? Owns only the probing; the result types live in `crate::trap` so that
//! components without KVM can read them.
//!
//! It probes by doing, never by version strings or capability numbers:
//! - **kvm-userfault**: create a throwaway VM and memory of the backing, and set a memslot over
//!   it with `KVM_MEM_USERFAULT` and a userfault bitmap;
//! - **userfaultfd**: register a mapping of the backing with a userfaultfd that also traps
//!   kernel-mode faults (as KVM's accesses are), in each mode Faultline can use: MISSING for
//!   anonymous memory, MISSING and MINOR for memfd and guest_memfd mappings.
//!
//! Every result's `reason` names what was tried and what the kernel answered, either way.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::{Kvm, VmFd};

use crate::layout::{BackingKind, PAGE_SIZE};
use crate::sys::MmapRegion;
use crate::sys::uffd::{
    FEATURE_MINOR_SHMEM, FEATURE_MISSING_SHMEM, MODE_MINOR, MODE_MISSING, UffdError, Userfaultfd,
};
use crate::trap::kvm_userfault::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, Memslot, UserfaultBitmap, flag_names,
};
use crate::trap::{Backend, BackendProbe};

/// Pages of the throwaway memory each probe uses.
const PROBE_PAGES: u64 = 16;
const PROBE_BYTES: u64 = PROBE_PAGES * PAGE_SIZE;
/// Guest-physical address of the probe memslot.
const PROBE_GPA: u64 = 1 << 30;

/// Probes both trap backends on every backing kind, in the order of `BackingKind::ALL`
/// (kvm-userfault first for each backing).
pub fn probe_trap_backends() -> Vec<BackendProbe> {
    let mut out = Vec::with_capacity(BackingKind::ALL.len() * 2);
    for backing in BackingKind::ALL {
        out.push(verdict(
            backing,
            Backend::KvmUserfault,
            probe_kvm_userfault(backing),
        ));
        out.push(verdict(
            backing,
            Backend::Userfaultfd,
            probe_userfaultfd(backing),
        ));
    }
    out
}

fn verdict(backing: BackingKind, backend: Backend, result: Result<String, String>) -> BackendProbe {
    let (available, reason) = match result {
        Ok(reason) => (true, reason),
        Err(reason) => (false, reason),
    };
    tracing::debug!(%backing, %backend, available, reason, "trap backend probed");
    BackendProbe {
        backing,
        backend,
        available,
        reason,
    }
}

/// Whether a little memory of `backing` can be created and mapped here (for guest_memfd:
/// mmap-able and initially shared, as the VMM needs it). `Err` names what was tried and what
/// the kernel answered.
pub fn backing_usable(backing: BackingKind) -> Result<(), String> {
    probe_memory(backing, None).map(drop)
}

/// The symbolic name of an errno value, e.g. `EINVAL`.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENXIO => "ENXIO",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// Memory of one backing kind for a probe, plus what keeps it alive.
struct ProbeMemory {
    mapping: MmapRegion,
    /// The guest_memfd, for guest_memfd memory.
    gmem: Option<OwnedFd>,
    /// The VM the guest_memfd belongs to (a guest_memfd can only back that VM's memslots).
    vm: Option<VmFd>,
}

fn open_kvm() -> Result<Kvm, String> {
    Kvm::new().map_err(|e| format!("open /dev/kvm = {}", errno_name(e.errno())))
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, String> {
    kvm.create_vm()
        .map_err(|e| format!("KVM_CREATE_VM = {}", errno_name(e.errno())))
}

/// Allocates `PROBE_BYTES` of `backing` memory. guest_memfd memory is created on `vm`, or on a
/// fresh VM when `vm` is `None`.
fn probe_memory(backing: BackingKind, vm: Option<VmFd>) -> Result<ProbeMemory, String> {
    match backing {
        BackingKind::Anon => Ok(ProbeMemory {
            mapping: MmapRegion::anonymous(PROBE_BYTES as usize)
                .map_err(|e| format!("anonymous mmap: {e}"))?,
            gmem: None,
            vm,
        }),
        BackingKind::Memfd => {
            let fd = rustix::fs::memfd_create("faultline-probe", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| format!("memfd_create = {}", errno_name(e.raw_os_error())))?;
            rustix::fs::ftruncate(&fd, PROBE_BYTES)
                .map_err(|e| format!("ftruncate(memfd) = {}", errno_name(e.raw_os_error())))?;
            let mapping = MmapRegion::shared(fd.as_fd(), 0, PROBE_BYTES as usize)
                .map_err(|e| format!("mmap(memfd): {e}"))?;
            Ok(ProbeMemory {
                mapping,
                gmem: None,
                vm,
            })
        }
        BackingKind::GuestMemfd => {
            let vm = match vm {
                Some(vm) => vm,
                None => create_vm(&open_kvm()?)?,
            };
            let raw = vm
                .create_guest_memfd(kvm_create_guest_memfd {
                    size: PROBE_BYTES,
                    flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                    ..Default::default()
                })
                .map_err(|e| {
                    format!(
                        "KVM_CREATE_GUEST_MEMFD(GUEST_MEMFD_FLAG_MMAP|GUEST_MEMFD_FLAG_INIT_SHARED) = {}",
                        errno_name(e.errno())
                    )
                })?;
            // SAFETY: KVM_CREATE_GUEST_MEMFD just returned this descriptor; nothing else owns
            // it, so wrapping it makes it closed exactly once.
            let gmem = unsafe { OwnedFd::from_raw_fd(raw) };
            let mapping = MmapRegion::shared(gmem.as_fd(), 0, PROBE_BYTES as usize)
                .map_err(|e| format!("mmap(guest_memfd): {e}"))?;
            Ok(ProbeMemory {
                mapping,
                gmem: Some(gmem),
                vm: Some(vm),
            })
        }
    }
}

/// KVM Userfault on `backing`: a memslot with `KVM_MEM_USERFAULT` and a bitmap.
fn probe_kvm_userfault(backing: BackingKind) -> Result<String, String> {
    let kvm = open_kvm()?;
    let vm = create_vm(&kvm)?;
    let bitmap = UserfaultBitmap::new(PROBE_PAGES);
    let mem = probe_memory(backing, Some(vm))?;
    let Some(vm) = mem.vm.as_ref() else {
        return Err("internal error: the probe VM went missing".into());
    };
    let slot = Memslot {
        slot: 0,
        guest_phys_addr: PROBE_GPA,
        memory_size: PROBE_BYTES,
        userspace_addr: mem.mapping.as_ptr() as u64,
        guest_memfd: mem.gmem.as_ref().map(|fd| (fd.as_raw_fd() as u32, 0)),
        log_dirty_pages: false,
        userfault_bitmap: Some(bitmap.user_addr()),
    };
    let what = format!(
        "KVM_SET_USER_MEMORY_REGION2({}) on {backing} memory",
        flag_names(slot.flags())
    );
    // SAFETY: the memslot covers `mem.mapping` (and `mem.gmem`) and points KVM at `bitmap`; all
    // of them outlive the VM, which is dropped first below, and no vCPU ever runs in it.
    let result = unsafe { vm.set_user_memory_region2(slot.region2()) };
    drop(mem.vm);
    drop(bitmap);
    match result {
        Ok(()) => Ok(format!("{what} = 0")),
        Err(e) => Err(format!("{what} = {}", errno_name(e.errno()))),
    }
}

/// userfaultfd on `backing`: registration of the backing's mapping in each usable mode.
fn probe_userfaultfd(backing: BackingKind) -> Result<String, String> {
    let modes: &[(u64, &str, u64)] = match backing {
        BackingKind::Anon => &[(MODE_MISSING, "MISSING", 0)],
        BackingKind::Memfd | BackingKind::GuestMemfd => &[
            (MODE_MISSING, "MISSING", FEATURE_MISSING_SHMEM),
            (MODE_MINOR, "MINOR", FEATURE_MINOR_SHMEM),
        ],
    };
    let mem = probe_memory(backing, None)?;
    let start = mem.mapping.as_ptr() as u64;
    let mut reasons = Vec::new();
    let mut any = false;
    for &(mode, mode_name, features) in modes {
        let what = format!("UFFDIO_REGISTER({backing} mapping, {mode_name})");
        match Userfaultfd::new(features) {
            Ok(uffd) => match uffd.register(start, PROBE_BYTES, mode) {
                Ok(_) => {
                    any = true;
                    reasons.push(format!("{what} = 0"));
                }
                Err(e) => reasons.push(format!("{what} = {}", uffd_errno(&e))),
            },
            Err(e) => reasons.push(format!(
                "userfaultfd for {mode_name} (features {features:#x}): {}",
                uffd_create_failure(&e)
            )),
        }
    }
    let reason = reasons.join("; ");
    if backing == BackingKind::GuestMemfd && any {
        // A kernel that lets guest_memfd mappings register (Faultline's, minor mode) still
        // resolves vCPU faults on guest_memfd memory from the file, never through a host
        // mapping: userfaultfd there traps only KVM's and the VMM's own accesses, and serves
        // beside KVM Userfault, not as a post-copy mechanism of its own.
        return Err(format!(
            "{reason}, but vCPU faults on guest_memfd memory do not go through a host mapping, so \
             userfaultfd alone cannot trap them (it traps KVM's own accesses, beside KVM Userfault)"
        ));
    }
    if any { Ok(reason) } else { Err(reason) }
}

/// Whether userfaultfd minor mode can register a guest_memfd mapping here: the half of the
/// guest_memfd post-copy trap that catches KVM's and the VMM's own accesses to guest memory
/// (through the memslot's host address), which KVM Userfault does not see. `Err` says what the
/// kernel answered.
pub fn probe_guest_memfd_minor() -> Result<String, String> {
    let mem = probe_memory(BackingKind::GuestMemfd, None)?;
    let start = mem.mapping.as_ptr() as u64;
    let what = "UFFDIO_REGISTER(guest-memfd mapping, MINOR)";
    let uffd = Userfaultfd::new(FEATURE_MINOR_SHMEM).map_err(|e| {
        format!(
            "userfaultfd for MINOR (features {FEATURE_MINOR_SHMEM:#x}): {}",
            uffd_create_failure(&e)
        )
    })?;
    match uffd.register(start, PROBE_BYTES, MODE_MINOR) {
        Ok(_) => Ok(format!("{what} = 0")),
        Err(e) => Err(format!("{what} = {}", uffd_errno(&e))),
    }
}

fn uffd_errno(e: &UffdError) -> String {
    match e.errno() {
        Some(errno) => errno_name(errno.raw_os_error()),
        None => e.to_string(),
    }
}

fn uffd_create_failure(e: &UffdError) -> String {
    match e {
        UffdError::Create { syscall, device } => format!(
            "userfaultfd() = {}, /dev/userfaultfd: {device}",
            errno_name(syscall.raw_os_error())
        ),
        UffdError::Api { errno, .. } => {
            format!("UFFDIO_API = {}", errno_name(errno.raw_os_error()))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(probes: &[BackendProbe], backing: BackingKind, backend: Backend) -> &BackendProbe {
        probes
            .iter()
            .find(|p| p.backing == backing && p.backend == backend)
            .unwrap_or_else(|| panic!("no probe for {backing}/{backend}: {probes:?}"))
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EINVAL), "EINVAL");
        assert_eq!(errno_name(libc::ENOTTY), "ENOTTY");
        assert_eq!(errno_name(4095), "errno 4095");
    }

    /// One result per backing and backend, each saying what it tried.
    #[test]
    fn probes_every_backing_with_both_backends() {
        let probes = probe_trap_backends();
        assert_eq!(probes.len(), 6, "{probes:?}");
        for backing in BackingKind::ALL {
            let k = find(&probes, backing, Backend::KvmUserfault);
            let u = find(&probes, backing, Backend::Userfaultfd);
            assert!(!k.reason.is_empty() && !u.reason.is_empty());
        }
        let json = serde_json::to_string(&probes).unwrap();
        let back: Vec<BackendProbe> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, probes);
        assert!(json.contains(r#""backend":"kvm-userfault""#), "{json}");
        assert!(json.contains(r#""backing":"guest-memfd""#), "{json}");
    }

    /// Anonymous and memfd memory are always there; guest_memfd exactly when the VMM's
    /// guest_memfd RAM is (KVM, mmap-able guest_memfd), and a refusal names the ioctl.
    #[test]
    fn backing_usable_says_what_can_back_a_vm() {
        assert_eq!(backing_usable(BackingKind::Anon), Ok(()));
        assert_eq!(backing_usable(BackingKind::Memfd), Ok(()));
        match backing_usable(BackingKind::GuestMemfd) {
            Ok(()) => {}
            Err(reason) => assert!(
                reason.starts_with("open /dev/kvm")
                    || reason.starts_with("KVM_CREATE_VM")
                    || reason.starts_with("KVM_CREATE_GUEST_MEMFD")
                    || reason.starts_with("mmap(guest_memfd)"),
                "{reason}"
            ),
        }
    }

    /// userfaultfd works on anonymous and memfd memory wherever a userfaultfd can be created
    /// at all; guest_memfd mappings refuse registration on kernels up to at least 7.3.
    #[test]
    fn userfaultfd_on_anon_and_memfd() {
        if let Err(e) = Userfaultfd::new(0) {
            eprintln!("skipping: no userfaultfd here ({e})");
            return;
        }
        let probes = probe_trap_backends();
        let anon = find(&probes, BackingKind::Anon, Backend::Userfaultfd);
        assert!(anon.available, "{anon:?}");
        assert_eq!(anon.reason, "UFFDIO_REGISTER(anon mapping, MISSING) = 0");
        let memfd = find(&probes, BackingKind::Memfd, Backend::Userfaultfd);
        assert!(memfd.available, "{memfd:?}");
        assert_eq!(
            memfd.reason,
            "UFFDIO_REGISTER(memfd mapping, MISSING) = 0; UFFDIO_REGISTER(memfd mapping, MINOR) = 0"
        );
        let gmem = find(&probes, BackingKind::GuestMemfd, Backend::Userfaultfd);
        if Kvm::new().is_ok() && !gmem.available {
            assert!(
                gmem.reason
                    .contains("UFFDIO_REGISTER(guest-memfd mapping, MISSING) = EINVAL")
                    || gmem.reason.starts_with("KVM_CREATE_GUEST_MEMFD"),
                "{gmem:?}"
            );
        }
    }
}
