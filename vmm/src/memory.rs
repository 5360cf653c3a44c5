//! Guest RAM: allocating it on the chosen backing, registering each of its parts with KVM as a
//! memslot, and describing it to the VMM protocol. Owns the memory and its file descriptor; it
//! does not decide where the parts lie (that is `ram_map`) or what is written into them (that
//! is `boot`), and never touches vCPUs.
//!
//! RAM is one file and one mapping; memslot `i` is part `i` of the map, at its offset in both.

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

use crate::ram_map::{RamMap, RamPart};

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
    #[error("KVM refused RAM memslot {slot} (flags {flags:#x}): {source}")]
    Memslot {
        slot: u32,
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
    map: RamMap,
    size: u64,
}

impl GuestMemory {
    /// Allocates RAM on `backing`, as much as `map` lays out.
    pub fn new(vm: &VmFd, backing: BackingKind, map: RamMap) -> Result<Self, MemoryError> {
        let size = map.size();
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
            map,
            size,
        })
    }

    pub fn map(&self) -> &RamMap {
        &self.map
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

    /// The layout as the VMM protocol describes it: one region per part of RAM, in order, all
    /// in descriptor 0 of the hello reply.
    pub fn layout(&self) -> MemoryLayout {
        let base = self.mapping.as_ptr() as u64;
        MemoryLayout {
            regions: self
                .map
                .parts()
                .iter()
                .map(|part| Region {
                    guest_phys_addr: part.gpa,
                    size: part.size,
                    backing: self.backing,
                    fd: 0,
                    file_offset: match self.backing {
                        BackingKind::Anon => base + part.offset,
                        BackingKind::Memfd | BackingKind::GuestMemfd => part.offset,
                    },
                    page_size: PAGE_SIZE,
                    host_addr: base + part.offset,
                })
                .collect(),
        }
    }

    /// Creates or updates every RAM memslot. `log_dirty` turns KVM dirty logging on or off;
    /// `userfault_bitmap` (the address of the bitmap's first word, page 0 of the global
    /// numbering) arms KVM Userfault, each memslot on its own slice of that bitmap.
    pub fn set_memslots(
        &self,
        vm: &VmFd,
        log_dirty: bool,
        userfault_bitmap: Option<u64>,
    ) -> Result<(), MemoryError> {
        for (slot, part) in self.map.parts().iter().enumerate() {
            // A part starts on a 2 MiB boundary, so its slice starts on a whole bitmap word.
            let bitmap = userfault_bitmap.map(|addr| addr + part.first_page() / 8);
            self.set_memslot(vm, slot as u32, part, log_dirty, bitmap)?;
        }
        Ok(())
    }

    fn set_memslot(
        &self,
        vm: &VmFd,
        slot: u32,
        part: &RamPart,
        log_dirty: bool,
        userfault_bitmap: Option<u64>,
    ) -> Result<(), MemoryError> {
        let userspace_addr = self.mapping.as_ptr() as u64 + part.offset;
        let guest_memfd = (self.backing == BackingKind::GuestMemfd)
            .then(|| (self.fd.as_raw_fd() as u32, part.offset));
        if guest_memfd.is_none() && userfault_bitmap.is_none() {
            // The original ioctl, so kernels without KVM_SET_USER_MEMORY_REGION2 work too.
            let flags = if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            };
            let region = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: part.gpa,
                memory_size: part.size,
                userspace_addr,
            };
            // SAFETY: the region describes part of `self.mapping`, which outlives the VM's use
            // of it (the VM is dropped before its memory).
            return unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
                MemoryError::Memslot {
                    slot,
                    flags,
                    source,
                }
            });
        }
        let memslot = Memslot {
            slot,
            guest_phys_addr: part.gpa,
            memory_size: part.size,
            userspace_addr,
            guest_memfd,
            log_dirty_pages: log_dirty,
            userfault_bitmap,
        };
        // SAFETY: the region describes part of `self.mapping` and `self.fd`, and the bitmap
        // the caller keeps alive while the flag is on; all outlive the VM's use of them.
        unsafe { vm.set_user_memory_region2(memslot.region2()) }.map_err(|source| {
            MemoryError::Memslot {
                slot,
                flags: memslot.flags(),
                source,
            }
        })
    }

    /// Writes `data` at `offset` in RAM (the guest's linear address) from the VMM side: pwrite
    /// for memfd (no page tables of ours to fill), the mapping otherwise.
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match self.backing {
            BackingKind::Memfd => {
                let mut done = 0;
                while done < data.len() {
                    done += rustix::io::pwrite(&self.fd, &data[done..], offset + done as u64)?;
                }
                Ok(())
            }
            BackingKind::Anon | BackingKind::GuestMemfd => self
                .mapping
                .write(offset, data)
                .map_err(std::io::Error::other),
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

    /// Reads KVM's dirty bitmaps of every memslot (and resets them), as one bitmap in the
    /// global page numbering: each part is a whole number of words, so the slots' words follow
    /// each other.
    pub fn collect_dirty(&self, vm: &VmFd) -> Result<Vec<u64>, kvm_ioctls::Error> {
        let mut words = Vec::with_capacity(self.pages().div_ceil(64) as usize);
        for (slot, part) in self.map.parts().iter().enumerate() {
            words.extend(vm.get_dirty_log(slot as u32, part.size as usize)?);
        }
        Ok(words)
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
