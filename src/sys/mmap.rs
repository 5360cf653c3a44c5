//! An owned memory mapping: anonymous, or a shared view of a file (memfd, guest_memfd).
//!
//! Guest memory is written concurrently by vCPUs while Faultline reads it, so the mapping is
//! only ever accessed through raw-pointer copies (never through Rust references to its bytes),
//! the same discipline rust-vmm's `vm-memory` follows.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    #[error("mmap of {len} bytes failed: {source}")]
    Map {
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte mapping")]
    OutOfRange {
        offset: u64,
        len: usize,
        size: usize,
    },
    #[error("madvise failed: {0}")]
    Advise(#[source] std::io::Error),
    #[error("mincore failed: {0}")]
    Mincore(#[source] std::io::Error),
}

/// An owned mapping, unmapped on drop.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; all accesses go through raw-pointer
// copies that tolerate concurrent writers (see the module comment), so sharing it between
// threads cannot create references to racing bytes.
unsafe impl Send for MmapRegion {}
// SAFETY: as above.
unsafe impl Sync for MmapRegion {}

impl MmapRegion {
    /// Private anonymous memory of `len` bytes, zero-filled on first touch. `MAP_NORESERVE`
    /// because guest RAM is committed lazily, as the guest touches it.
    pub fn anonymous(len: usize) -> Result<Self, MmapError> {
        // SAFETY: a fresh anonymous mapping at an address the kernel picks cannot alias any
        // existing Rust object.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .map_err(|e| MmapError::Map {
            len,
            source: e.into(),
        })?;
        Self::adopt(ptr.cast(), len)
    }

    /// A shared, read-write view of `len` bytes of `fd` starting at `offset`.
    pub fn shared(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Self, MmapError> {
        Self::map_fd(fd, offset, len, ProtFlags::READ | ProtFlags::WRITE)
    }

    /// A shared, read-only view of `len` bytes of `fd` starting at `offset`.
    pub fn shared_read_only(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> Result<Self, MmapError> {
        Self::map_fd(fd, offset, len, ProtFlags::READ)
    }

    fn map_fd(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: ProtFlags,
    ) -> Result<Self, MmapError> {
        // SAFETY: a new mapping at a kernel-chosen address aliases no Rust object; the file's
        // contents may change under us, which the access discipline above allows for.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                MapFlags::SHARED,
                fd,
                offset,
            )
        }
        .map_err(|e| MmapError::Map {
            len,
            source: e.into(),
        })?;
        Self::adopt(ptr.cast(), len)
    }

    fn adopt(ptr: *mut u8, len: usize) -> Result<Self, MmapError> {
        NonNull::new(ptr)
            .map(|ptr| Self { ptr, len })
            .ok_or(MmapError::Map {
                len,
                source: std::io::Error::other("mmap returned a null pointer"),
            })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping's address, for handing to KVM or userfaultfd.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, MmapError> {
        let out = MmapError::OutOfRange {
            offset,
            len,
            size: self.len,
        };
        let start = usize::try_from(offset).map_err(|_| MmapError::OutOfRange {
            offset,
            len,
            size: self.len,
        })?;
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(out),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), MmapError> {
        let start = self.check(offset, buf.len())?;
        // SAFETY: the range was bounds-checked against the live mapping; the destination is a
        // distinct Rust buffer, so the two cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Lends `len` bytes at `offset` as a slice, without copying.
    ///
    /// # Safety
    ///
    /// Nothing may write the range (through any mapping of the same memory, in any process)
    /// while the slice lives: the module's rule against references holds only for memory
    /// that cannot change, such as a stopped VM's.
    pub unsafe fn slice_unchanging(&self, offset: u64, len: usize) -> Result<&[u8], MmapError> {
        let start = self.check(offset, len)?;
        // SAFETY: bounds-checked against the live mapping, which outlives `&self`; the caller
        // guarantees the bytes do not change while borrowed.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len) })
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), MmapError> {
        let start = self.check(offset, data.len())?;
        // SAFETY: bounds-checked as in `read`; the source is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len())
        };
        Ok(())
    }

    /// Reads one little-endian u64 at `offset` with a single volatile load.
    pub fn read_u64(&self, offset: u64) -> Result<u64, MmapError> {
        let start = self.check(offset, 8)?;
        // SAFETY: bounds-checked; `read_unaligned` has no alignment requirement, and the
        // volatile-free unaligned read of plain memory is sound for any bit pattern.
        Ok(u64::from_le(unsafe {
            std::ptr::read_unaligned(self.ptr.as_ptr().add(start).cast::<u64>())
        }))
    }

    /// Drops the pages of `[offset, offset + len)` (MADV_DONTNEED): anonymous memory reads
    /// back as zero afterwards. Used to discard guest pages that will be re-sent.
    pub fn discard(&self, offset: u64, len: usize) -> Result<(), MmapError> {
        let start = self.check(offset, len)?;
        // SAFETY: the range lies inside this mapping, and nothing holds references into it.
        unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().add(start).cast(),
                len,
                rustix::mm::Advice::LinuxDontNeed,
            )
        }
        .map_err(|e| MmapError::Advise(e.into()))
    }
}

impl MmapRegion {
    /// Which pages of the mapping are present (mincore): for anonymous memory, mapped in this
    /// process; for a shared file mapping, in the file's page cache. One byte per page, bit 0
    /// set when present. Touches nothing, so it never faults a page in.
    pub fn resident(&self) -> Result<Vec<u8>, MmapError> {
        let page = crate::layout::PAGE_SIZE as usize;
        let mut out = vec![0u8; self.len.div_ceil(page)];
        // SAFETY: `ptr`/`len` describe this mapping (page aligned, as mmap returned it) and
        // `out` has one byte for each of its pages, which is what mincore writes.
        let rc = unsafe { libc::mincore(self.ptr.as_ptr().cast(), self.len, out.as_mut_ptr()) };
        if rc != 0 {
            return Err(MmapError::Mincore(std::io::Error::last_os_error()));
        }
        Ok(out)
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and still owns; nothing
        // can use it after drop.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_read_write() {
        let m = MmapRegion::anonymous(8192).unwrap();
        m.write(4093, b"hello!").unwrap();
        let mut buf = [0u8; 6];
        m.read(4093, &mut buf).unwrap();
        assert_eq!(&buf, b"hello!");
        assert!(m.write(8190, b"abc").is_err());
        assert!(m.read(u64::MAX, &mut buf).is_err());
        m.discard(4096, 4096).unwrap();
        m.read(4093, &mut buf).unwrap();
        assert_eq!(&buf, b"hel\0\0\0");
    }

    #[test]
    fn memfd_views_share_bytes() {
        use std::os::fd::AsFd;
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        let a = MmapRegion::shared(fd.as_fd(), 0, 4096).unwrap();
        let b = MmapRegion::shared_read_only(fd.as_fd(), 0, 4096).unwrap();
        a.write(8, &0xdead_beef_u64.to_le_bytes()).unwrap();
        assert_eq!(b.read_u64(8).unwrap(), 0xdead_beef);
    }
}
