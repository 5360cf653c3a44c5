//! Guest RAM: allocating it on the chosen backing, registering it with KVM as a memslot, and
//! describing it to the VMM protocol. Owns the memory and its file descriptor; it does not
//! decide what is written into it (that is `boot`) and never touches vCPUs.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use faultline::layout::{BackingKind, MemoryLayout, PAGE_SIZE, Region};
use faultline::sys::MmapRegion;
use faultline::trap::kvm_userfault::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS, Memslot,
};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_create_guest_memfd, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, VmFd};

/// The one memslot the reference VMM uses for RAM.
const RAM_SLOT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest-memfd backing needs {capability}, which this kernel does not offer ({probe})")]
    MissingCapability {
        capability: &'static str,
        probe: String,
    },
    #[error("cannot create the {what}: {source}")]
    Create {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Map(#[from] faultline::sys::MmapError),
    #[error("KVM refused the RAM memslot (flags {flags:#x}): {source}")]
    Memslot {
        flags: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

pub struct GuestMemory {
    backing: BackingKind,
    mapping: MmapRegion,
    /// The memfd or guest_memfd; for anonymous memory, this process's `/proc/self/mem`.
    fd: OwnedFd,
    size: u64,
}

impl GuestMemory {
    /// Allocates `size` bytes of RAM on `backing`. The size must be a multiple of 2 MiB (the
    /// boot page tables map RAM in 2 MiB pages).
    pub fn new(vm: &VmFd, backing: BackingKind, size: u64) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::Create {
            what: "guest RAM",
            source: std::io::Error::other("size does not fit this address space"),
        })?;
        let (fd, mapping) = match backing {
            BackingKind::Anon => {
                let mapping = MmapRegion::anonymous(len)?;
                let mem = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open("/proc/self/mem")
                    .map_err(|source| MemoryError::Create {
                        what: "/proc/self/mem handle for anonymous RAM",
                        source,
                    })?;
                (OwnedFd::from(mem), mapping)
            }
            BackingKind::Memfd => {
                let fd = rustix::fs::memfd_create(
                    "faultline-guest-ram",
                    rustix::fs::MemfdFlags::CLOEXEC,
                )
                .map_err(|e| MemoryError::Create {
                    what: "memfd",
                    source: e.into(),
                })?;
                rustix::fs::ftruncate(&fd, size).map_err(|e| MemoryError::Create {
                    what: "memfd of the requested size",
                    source: e.into(),
                })?;
                let mapping = MmapRegion::shared(fd.as_fd(), 0, len)?;
                (fd, mapping)
            }
            BackingKind::GuestMemfd => {
                probe_guest_memfd(vm)?;
                let raw = vm
                    .create_guest_memfd(kvm_create_guest_memfd {
                        size,
                        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
                        ..Default::default()
                    })
                    .map_err(|e| MemoryError::Create {
                        what: "guest_memfd (KVM_CREATE_GUEST_MEMFD with MMAP|INIT_SHARED)",
                        source: std::io::Error::from_raw_os_error(e.errno()),
                    })?;
                // SAFETY: KVM_CREATE_GUEST_MEMFD returned a fresh descriptor that nothing else
                // owns; wrapping it transfers ownership so it is closed exactly once.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let mapping = MmapRegion::shared(fd.as_fd(), 0, len)?;
                (fd, mapping)
            }
        };
        Ok(Self {
            backing,
            mapping,
            fd,
            size,
        })
    }

    pub fn backing(&self) -> BackingKind {
        self.backing
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn mapping(&self) -> &MmapRegion {
        &self.mapping
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The layout as the VMM protocol describes it: one region at guest-physical 0, whose
    /// fd is descriptor 0 of the hello reply.
    pub fn layout(&self) -> MemoryLayout {
        let host_addr = self.mapping.as_ptr() as u64;
        MemoryLayout {
            regions: vec![Region {
                guest_phys_addr: 0,
                size: self.size,
                backing: self.backing,
                fd: 0,
                file_offset: match self.backing {
                    BackingKind::Anon => host_addr,
                    BackingKind::Memfd | BackingKind::GuestMemfd => 0,
                },
                page_size: PAGE_SIZE,
                host_addr,
            }],
        }
    }

    /// Creates or updates the RAM memslot. `log_dirty` turns KVM dirty logging on or off;
    /// `userfault_bitmap` (the bitmap's address) arms KVM Userfault.
    pub fn set_memslot(
        &self,
        vm: &VmFd,
        log_dirty: bool,
        userfault_bitmap: Option<u64>,
    ) -> Result<(), MemoryError> {
        let userspace_addr = self.mapping.as_ptr() as u64;
        let guest_memfd =
            (self.backing == BackingKind::GuestMemfd).then(|| (self.fd.as_raw_fd() as u32, 0));
        if guest_memfd.is_none() && userfault_bitmap.is_none() {
            // The original ioctl, so kernels without KVM_SET_USER_MEMORY_REGION2 work too.
            let flags = if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            let region = kvm_userspace_memory_region {
                slot: RAM_SLOT,
                flags,
                guest_phys_addr: 0,
                memory_size: self.size,
                userspace_addr,
            };
            // SAFETY: the region describes `self.mapping`, which outlives the VM's use of it
            // (the VM is dropped before its memory).
            return unsafe { vm.set_user_memory_region(region) }
                .map_err(|source| MemoryError::Memslot { flags, source });
        }
        let slot = Memslot {
            slot: RAM_SLOT,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr,
            guest_memfd,
            log_dirty_pages: log_dirty,
            userfault_bitmap,
        };
        // SAFETY: the region describes `self.mapping` and `self.fd`, and the bitmap the caller
        // keeps alive while the flag is on; all outlive the VM's use of them.
        unsafe { vm.set_user_memory_region2(slot.region2()) }.map_err(|source| {
            MemoryError::Memslot {
                flags: slot.flags(),
                source,
            }
        })
    }

    /// Writes `data` at guest-physical `gpa` from the VMM side: pwrite for memfd (no page
    /// tables of ours to fill), the mapping otherwise.
    pub fn write(&self, gpa: u64, data: &[u8]) -> std::io::Result<()> {
        match self.backing {
            BackingKind::Memfd => {
                let mut done = 0;
                while done < data.len() {
                    done += rustix::io::pwrite(&self.fd, &data[done..], gpa + done as u64)?;
                }
                Ok(())
            }
            BackingKind::Anon | BackingKind::GuestMemfd => {
                self.mapping.write(gpa, data).map_err(std::io::Error::other)
            }
        }
    }

    /// Drops `len` bytes of RAM at `offset` so they read as missing (zero, or a userfaultfd
    /// fault when registered): MADV_DONTNEED for anonymous memory, a punched hole in the file
    /// otherwise.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match self.backing {
            BackingKind::Anon => self
                .mapping
                .discard(offset, len as usize)
                .map_err(std::io::Error::other),
            BackingKind::Memfd | BackingKind::GuestMemfd => rustix::fs::fallocate(
                &self.fd,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .map_err(std::io::Error::from),
        }
    }

    /// Reads KVM's dirty bitmap for RAM (and resets it).
    pub fn collect_dirty(&self, vm: &VmFd) -> Result<Vec<u64>, kvm_ioctls::Error> {
        vm.get_dirty_log(RAM_SLOT, self.size as usize)
    }
}

/// Checks the capabilities guest-memfd backing needs, naming the first one missing.
fn probe_guest_memfd(vm: &VmFd) -> Result<(), MemoryError> {
    if !vm.check_extension(Cap::UserMemory2) {
        return Err(MemoryError::MissingCapability {
            capability: "KVM_CAP_USER_MEMORY2",
            probe: "KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY2) = 0".into(),
        });
    }
    if !vm.check_extension(Cap::GuestMemfd) {
        return Err(MemoryError::MissingCapability {
            capability: "KVM_CAP_GUEST_MEMFD",
            probe: "KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD) = 0".into(),
        });
    }
    let flags = vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS as _);
    let needed = (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) as i32;
    if flags < 0 || flags & needed != needed {
        return Err(MemoryError::MissingCapability {
            capability: "GUEST_MEMFD_FLAG_MMAP and GUEST_MEMFD_FLAG_INIT_SHARED",
            probe: format!("KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS = 244) = {flags}"),
        });
    }
    Ok(())
}
