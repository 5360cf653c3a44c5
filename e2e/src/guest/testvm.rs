//! A minimal KVM test VM in the style of KVM's selftests: 32-bit protected mode with flat
//! segments and paging off, so guest code reaches any guest-physical address below 4 GiB
//! directly. Each vCPU runs one tiny program that walks a table of addresses: it reads the u32
//! at each address (or, if the address has bit 0 set, first writes the address itself there),
//! reports the value with `out 0x10, eax`, and halts at the end of the table.
//!
//! Owns the VM's fixed "system" memslot (code and tables, anonymous memory at GPA 0) and the
//! vCPU run loop; the memory under test is added by the tests themselves.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail, ensure};
use faultline::probe::errno_name;
use faultline::sys::MmapRegion;
use faultline::trap::kvm_userfault::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_EXIT_MEMORY_FAULT, Memslot,
};
use kvm_bindings::{kvm_create_guest_memfd, kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Where [`TestVm::vcpu_string_out`]'s two instructions live.
const STRING_OUT_GPA: u64 = 0x2000;
/// `outsd` (port dx, source ds:esi: KVM's instruction emulator reads the u32 from guest memory
/// through the memslot's host address), then `hlt`.
const STRING_OUT: [u8; 2] = [0x6F, 0xF4];

/// Size of the system memslot (slot 0) at GPA 0.
const SYSTEM_BYTES: u64 = 1 << 20;
/// Where the guest program is loaded.
const CODE_GPA: u64 = 0x1000;
/// vCPU `i`'s address table lives at `TABLE_GPA + i * 4096` (1023 entries plus the end mark).
const TABLE_GPA: u64 = 0x10000;
pub const MAX_VCPUS: u64 = 16;
pub const MAX_TABLE_ENTRIES: usize = 1023;
/// The port the guest reports values on.
pub const REPORT_PORT: u16 = 0x10;
/// End-of-table mark.
const END: u32 = 0xFFFF_FFFF;
/// Table entries with this bit set are writes (of the entry's own address, bit cleared).
pub const WRITE: u32 = 1;

/// The guest program (hand-assembled, 32-bit):
/// ```text
///  0: 8B 1E        loop:   mov ebx, [esi]
///  2: 83 FB FF             cmp ebx, -1
///  5: 74 17                je done
///  7: F6 C3 01             test bl, 1
/// 10: 75 04                jnz write
/// 12: 8B 03                mov eax, [ebx]
/// 14: EB 07                jmp report
/// 16: 83 E3 FE     write:  and ebx, -2
/// 19: 89 1B                mov [ebx], ebx
/// 21: 8B 03                mov eax, [ebx]
/// 23: E7 10        report: out 0x10, eax
/// 25: 83 C6 04             add esi, 4
/// 28: EB E2                jmp loop
/// 30: F4           done:   hlt
/// 31: EB FD                jmp done
/// ```
const PROGRAM: [u8; 33] = [
    0x8B, 0x1E, 0x83, 0xFB, 0xFF, 0x74, 0x17, 0xF6, 0xC3, 0x01, 0x75, 0x04, 0x8B, 0x03, 0xEB, 0x07,
    0x83, 0xE3, 0xFE, 0x89, 0x1B, 0x8B, 0x03, 0xE7, 0x10, 0x83, 0xC6, 0x04, 0xEB, 0xE2, 0xF4, 0xEB,
    0xFD,
];

/// What one KVM_RUN ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The guest reported a value (it read or wrote an address of its table).
    Value(u32),
    /// The guest reached the end of its table.
    Halted,
    /// KVM_RUN failed with EFAULT/EHWPOISON and a `KVM_EXIT_MEMORY_FAULT` exit.
    MemoryFault { flags: u64, gpa: u64, size: u64 },
    /// KVM_RUN failed without exit information.
    RunError(i32),
    /// Any other exit.
    Other(String),
}

pub struct TestVm {
    // Field order is drop order: the VM (and its vCPUs) before the memory it maps.
    pub vm: VmFd,
    system: MmapRegion,
}

impl TestVm {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| anyhow::anyhow!("open /dev/kvm: {e}"))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| anyhow::anyhow!("KVM_CREATE_VM: {e}"))?;
        let system = MmapRegion::anonymous(SYSTEM_BYTES as usize)?;
        system.write(CODE_GPA, &PROGRAM)?;
        system.write(STRING_OUT_GPA, &STRING_OUT)?;
        let slot = Memslot {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: SYSTEM_BYTES,
            userspace_addr: system.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: the memslot maps `system`, which the VM's owner (`Self`) drops after the VM.
        unsafe { vm.set_user_memory_region2(slot.region2()) }
            .or_else(|_| {
                // Kernels before 6.8 have only KVM_SET_USER_MEMORY_REGION.
                let r = kvm_bindings::kvm_userspace_memory_region {
                    slot: 0,
                    flags: 0,
                    guest_phys_addr: 0,
                    memory_size: SYSTEM_BYTES,
                    userspace_addr: system.as_ptr() as u64,
                };
                // SAFETY: as above.
                unsafe { vm.set_user_memory_region(r) }
            })
            .map_err(|e| anyhow::anyhow!("system memslot: {e}"))?;
        Ok(Self { vm, system })
    }

    /// Creates vCPU `index` ready to walk `table` (guest-physical addresses, optionally
    /// `| WRITE`).
    pub fn vcpu(&self, index: u64, table: &[u32]) -> Result<VcpuFd> {
        ensure!(index < MAX_VCPUS, "at most {MAX_VCPUS} vCPUs");
        self.set_table(index, table)?;
        self.flat_vcpu(
            index,
            kvm_regs {
                rip: CODE_GPA,
                rsi: TABLE_GPA + index * 4096,
                rflags: 2,
                ..Default::default()
            },
        )
    }

    /// Creates vCPU `index` ready to run one `outsd` of the u32 at guest-physical `gpa` to
    /// [`REPORT_PORT`] (reported as [`Event::Value`]), then halt. The guest never touches
    /// `gpa` itself: KVM reads it while emulating the string instruction.
    pub fn vcpu_string_out(&self, index: u64, gpa: u32) -> Result<VcpuFd> {
        ensure!(index < MAX_VCPUS, "at most {MAX_VCPUS} vCPUs");
        self.flat_vcpu(
            index,
            kvm_regs {
                rip: STRING_OUT_GPA,
                rsi: u64::from(gpa),
                rdx: u64::from(REPORT_PORT),
                rflags: 2,
                ..Default::default()
            },
        )
    }

    /// A vCPU in 32-bit protected mode with flat segments and paging off, at `regs`.
    fn flat_vcpu(&self, index: u64, regs: kvm_regs) -> Result<VcpuFd> {
        let vcpu = self
            .vm
            .create_vcpu(index)
            .map_err(|e| anyhow::anyhow!("KVM_CREATE_VCPU: {e}"))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| anyhow::anyhow!("KVM_GET_SREGS: {e}"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector: 0x8,
            type_: 0xB,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 = 0x11; // PE | ET; paging off
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| anyhow::anyhow!("KVM_SET_SREGS: {e}"))?;
        vcpu.set_regs(&regs)
            .map_err(|e| anyhow::anyhow!("KVM_SET_REGS: {e}"))?;
        Ok(vcpu)
    }

    /// Replaces vCPU `index`'s table. A vCPU that halted must be rewound with [`rewind`].
    pub fn set_table(&self, index: u64, table: &[u32]) -> Result<()> {
        ensure!(
            table.len() <= MAX_TABLE_ENTRIES,
            "at most {MAX_TABLE_ENTRIES} addresses"
        );
        let mut bytes: Vec<u8> = table.iter().flat_map(|a| a.to_le_bytes()).collect();
        bytes.extend_from_slice(&END.to_le_bytes());
        self.system.write(TABLE_GPA + index * 4096, &bytes)?;
        Ok(())
    }

    /// Adds memory under test: a memslot as described (its addresses must stay valid as long
    /// as the VM). Returns the KVM error number on failure.
    pub fn set_memslot(&self, slot: &Memslot) -> std::result::Result<(), i32> {
        // SAFETY: callers keep the memory and bitmap named by `slot` alive until the VM is
        // dropped or the memslot is deleted; KVM validates the rest.
        match unsafe { self.vm.set_user_memory_region2(slot.region2()) } {
            Ok(()) => Ok(()),
            // Kernels before 6.8 have only KVM_SET_USER_MEMORY_REGION, which can describe a
            // plain memslot (no guest_memfd, no userfault bitmap) too.
            Err(e)
                if e.errno() == libc::ENOTTY
                    && slot.guest_memfd.is_none()
                    && slot.userfault_bitmap.is_none() =>
            {
                let r = kvm_bindings::kvm_userspace_memory_region {
                    slot: slot.slot,
                    flags: slot.flags(),
                    guest_phys_addr: slot.guest_phys_addr,
                    memory_size: slot.memory_size,
                    userspace_addr: slot.userspace_addr,
                };
                // SAFETY: as above.
                unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| e.errno())
            }
            Err(e) => Err(e.errno()),
        }
    }

    /// Creates an mmap-able, initially shared guest_memfd of `size` bytes and maps it.
    pub fn guest_memfd(&self, size: u64) -> Result<(OwnedFd, MmapRegion)> {
        let raw = self
            .vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                ..Default::default()
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED) = {}",
                    errno_name(e.errno())
                )
            })?;
        // SAFETY: KVM just created this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let map = MmapRegion::shared(std::os::fd::AsFd::as_fd(&fd), 0, size as usize)
            .context("mmap of the guest_memfd")?;
        Ok((fd, map))
    }
}

/// Rewinds a vCPU to the start of its table.
pub fn rewind(vcpu: &VcpuFd, index: u64) -> Result<()> {
    let regs = kvm_regs {
        rip: CODE_GPA,
        rsi: TABLE_GPA + index * 4096,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| anyhow::anyhow!("KVM_SET_REGS: {e}"))
}

/// Runs the vCPU until its next event.
pub fn run(vcpu: &mut VcpuFd) -> Event {
    match faultline::trap::kvm_userfault::run_vcpu(vcpu) {
        Ok(VcpuExit::IoOut(port, data)) if port == REPORT_PORT && data.len() == 4 => {
            Event::Value(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
        }
        Ok(VcpuExit::Hlt) => Event::Halted,
        Ok(VcpuExit::MemoryFault { flags, gpa, size }) => Event::MemoryFault { flags, gpa, size },
        Ok(other) => Event::Other(format!("{other:?}")),
        Err(e) => {
            let reason = vcpu.get_kvm_run().exit_reason;
            if reason == KVM_EXIT_MEMORY_FAULT {
                Event::Other(format!(
                    "KVM_RUN = {} with a memory fault exit",
                    errno_name(e.errno())
                ))
            } else {
                Event::RunError(e.errno())
            }
        }
    }
}

/// Runs the vCPU and requires `expected`.
pub fn expect(vcpu: &mut VcpuFd, expected: Event, what: &str) -> Result<()> {
    let got = run(vcpu);
    if got != expected {
        bail!("{what}: expected {expected:?}, got {got:?}");
    }
    Ok(())
}

/// The file descriptor number of a guest_memfd for a memslot.
pub fn fd_u32(fd: &OwnedFd) -> u32 {
    fd.as_raw_fd() as u32
}
