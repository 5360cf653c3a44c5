//! Another process's guest memory, reached through the descriptors that came with the VMM
//! protocol's hello: memfd regions with pread/pwrite on the file, anonymous regions with
//! pread/pwrite on the VMM's `/proc/self/mem` at the region's address, and guest_memfd regions
//! (which have no read/write file operations) through a shared mapping.
//!
//! File I/O rather than mappings where possible: it copies through the kernel's direct map, so
//! the sidecar never pays for page-table entries of its own (measured here: a first touch of a
//! shmem page through a mapping costs 3–13 µs, a pwrite into an allocated page about 1 µs).
//! The exception is memory that no longer changes ([`FrozenMemory`], the source's post-copy):
//! read once, in order, and sent at once, it is lent straight from a read-only mapping, which
//! saves copying every page into a buffer on its way to the socket.
//!
//! Pages are addressed in the layout's global numbering. This type moves bytes; it does not
//! know about migrations or traps.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::bitmap::PageBitmap;
use crate::layout::{BackingKind, LayoutError, MemoryLayout, PAGE_SIZE, Region};
use crate::sys::{MmapError, MmapRegion};

#[derive(Debug, thiserror::Error)]
pub enum GuestMemoryError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("cannot map region {index} ({backing}): {source}")]
    Map {
        index: usize,
        backing: BackingKind,
        #[source]
        source: MmapError,
    },
    #[error("page {page} is outside the {total}-page layout")]
    OutOfRange { page: u64, total: u64 },
    #[error("{op} of {len} bytes at page {page} failed: {source}")]
    FileIo {
        op: &'static str,
        page: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} on region {index}'s file failed: {source}")]
    File {
        op: &'static str,
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

enum Access {
    Mapped(MmapRegion),
    /// pread/pwrite on the region's descriptor at `file_offset` (a memfd, or the VMM's
    /// `/proc/<pid>/mem` whose offsets are the VMM's virtual addresses).
    File,
}

struct RegionView {
    region: Region,
    first_page: u64,
    fd: Arc<OwnedFd>,
    access: Access,
}

pub struct GuestMemory {
    layout: MemoryLayout,
    regions: Vec<RegionView>,
    total_pages: u64,
}

const PAGE: usize = PAGE_SIZE as usize;

/// Guest memory that no longer changes, mapped read-only: pages lent as slices, so that
/// sending one costs no copy into a buffer first. Made by [`GuestMemory::freeze`], whose
/// contract (nothing writes the memory while this lives) makes the slices sound.
pub struct FrozenMemory {
    /// (first page, pages, mapping) per region.
    maps: Vec<(u64, u64, MmapRegion)>,
}

impl FrozenMemory {
    /// The bytes of `page`.
    pub fn page(&self, page: u64) -> Result<&[u8], GuestMemoryError> {
        let total = self.maps.iter().map(|(_, n, _)| n).sum();
        let (first, _, map) = self
            .maps
            .iter()
            .find(|(first, n, _)| page >= *first && page < first + n)
            .ok_or(GuestMemoryError::OutOfRange { page, total })?;
        // SAFETY: `GuestMemory::freeze`'s caller promised that nothing writes this memory
        // while the view lives, and the slice borrows the view.
        unsafe { map.slice_unchanging((page - first) * PAGE_SIZE, PAGE) }.map_err(|source| {
            GuestMemoryError::Map {
                index: 0,
                backing: BackingKind::Memfd,
                source,
            }
        })
    }
}

/// True when every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: any bit pattern is a valid u128; `align_to` only reinterprets the aligned
        // middle of the slice and returns the unaligned ends separately.
        unsafe { page.align_to::<u128>() }
    };
    prefix.iter().all(|&b| b == 0)
        && words.iter().fold(0u128, |acc, &w| acc | w) == 0
        && suffix.iter().all(|&b| b == 0)
}

impl GuestMemory {
    /// `pages` pages of fresh memfd memory of this process's own, laid out as one region at
    /// guest-physical 0: guest memory without a VMM, for tests and measurements.
    pub fn memfd(pages: u64) -> Result<Self, GuestMemoryError> {
        let (layout, fd) = Self::memfd_layout(pages, 0)?;
        Self::open(&layout, vec![fd])
    }

    /// A fresh memfd of `pages` pages and the layout of one region over it at guest-physical 0,
    /// as a VMM would report it mapped at `host_addr`.
    pub fn memfd_layout(
        pages: u64,
        host_addr: u64,
    ) -> Result<(MemoryLayout, OwnedFd), GuestMemoryError> {
        let file_err = |op| {
            move |e: rustix::io::Errno| GuestMemoryError::File {
                op,
                index: 0,
                source: e.into(),
            }
        };
        let fd = rustix::fs::memfd_create("faultline-memory", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(file_err("memfd_create"))?;
        rustix::fs::ftruncate(&fd, pages * PAGE_SIZE).map_err(file_err("ftruncate"))?;
        let layout = MemoryLayout {
            regions: vec![Region {
                guest_phys_addr: 0,
                size: pages * PAGE_SIZE,
                backing: BackingKind::Memfd,
                fd: 0,
                file_offset: 0,
                page_size: PAGE_SIZE,
                host_addr,
            }],
        };
        Ok((layout, fd))
    }

    /// Opens the layout with the descriptors that came with it.
    pub fn open(layout: &MemoryLayout, fds: Vec<OwnedFd>) -> Result<Self, GuestMemoryError> {
        layout.validate(fds.len())?;
        let fds: Vec<Arc<OwnedFd>> = fds.into_iter().map(Arc::new).collect();
        let mut regions = Vec::with_capacity(layout.regions.len());
        let mut first_page = 0;
        for (index, r) in layout.regions.iter().enumerate() {
            let fd = fds[r.fd as usize].clone();
            let access = match r.backing {
                BackingKind::Anon | BackingKind::Memfd => Access::File,
                BackingKind::GuestMemfd => Access::Mapped(
                    MmapRegion::shared(fd.as_fd(), r.file_offset, r.size as usize).map_err(
                        |source| GuestMemoryError::Map {
                            index,
                            backing: r.backing,
                            source,
                        },
                    )?,
                ),
            };
            regions.push(RegionView {
                region: r.clone(),
                first_page,
                fd,
                access,
            });
            first_page += r.pages();
        }
        Ok(Self {
            layout: layout.clone(),
            regions,
            total_pages: first_page,
        })
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    fn locate(&self, page: u64, count: u64) -> Result<(&RegionView, u64), GuestMemoryError> {
        let out = || GuestMemoryError::OutOfRange {
            page,
            total: self.total_pages,
        };
        let v = self
            .regions
            .iter()
            .find(|v| page >= v.first_page && page < v.first_page + v.region.pages())
            .ok_or_else(out)?;
        let offset = page - v.first_page;
        if offset + count > v.region.pages() {
            return Err(out());
        }
        Ok((v, offset * PAGE_SIZE))
    }

    /// How many pages from `page` on lie in the same region (so can be read in one go).
    pub fn contiguous_from(&self, page: u64) -> u64 {
        self.regions
            .iter()
            .find(|v| page >= v.first_page && page < v.first_page + v.region.pages())
            .map(|v| v.first_page + v.region.pages() - page)
            .unwrap_or(0)
    }

    /// Finds the region holding `[gpa, gpa + len)` and the offset of `gpa` in it.
    fn locate_gpa(&self, gpa: u64, len: usize) -> Result<(&RegionView, u64), GuestMemoryError> {
        let out = || GuestMemoryError::OutOfRange {
            page: gpa / PAGE_SIZE,
            total: self.total_pages,
        };
        let v = self
            .regions
            .iter()
            .find(|v| v.region.contains_gpa(gpa))
            .ok_or_else(out)?;
        let offset = gpa - v.region.guest_phys_addr;
        if offset + len as u64 > v.region.size {
            return Err(out());
        }
        Ok((v, offset))
    }

    /// Copies `buf.len()` bytes at guest-physical `gpa` (within one region) into `buf`.
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let (v, offset) = self.locate_gpa(gpa, buf.len())?;
        let page = gpa / PAGE_SIZE;
        match &v.access {
            Access::Mapped(m) => m.read(offset, buf).map_err(|e| GuestMemoryError::Map {
                index: 0,
                backing: v.region.backing,
                source: e,
            }),
            Access::File => {
                let mut done = 0;
                while done < buf.len() {
                    let n = rustix::io::pread(
                        &*v.fd,
                        &mut buf[done..],
                        v.region.file_offset + offset + done as u64,
                    )
                    .map_err(|e| GuestMemoryError::FileIo {
                        op: "read",
                        page,
                        len: buf.len(),
                        source: e.into(),
                    })?;
                    if n == 0 {
                        return Err(GuestMemoryError::FileIo {
                            op: "read",
                            page,
                            len: buf.len(),
                            source: std::io::ErrorKind::UnexpectedEof.into(),
                        });
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Copies `data` to guest-physical `gpa` (within one region). On anonymous memory this
    /// goes through the VMM's `/proc/self/mem`, which faults the page in if it is absent:
    /// never use it on missing pages registered with userfaultfd (it would wait for its own
    /// fault).
    pub fn write_at(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let (v, offset) = self.locate_gpa(gpa, data.len())?;
        let page = gpa / PAGE_SIZE;
        match &v.access {
            Access::Mapped(m) => m.write(offset, data).map_err(|e| GuestMemoryError::Map {
                index: 0,
                backing: v.region.backing,
                source: e,
            }),
            Access::File => {
                let mut done = 0;
                while done < data.len() {
                    let n = rustix::io::pwrite(
                        &*v.fd,
                        &data[done..],
                        v.region.file_offset + offset + done as u64,
                    )
                    .map_err(|e| GuestMemoryError::FileIo {
                        op: "write",
                        page,
                        len: data.len(),
                        source: e.into(),
                    })?;
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Reads the little-endian u64 at guest-physical `gpa`.
    pub fn read_u64_at(&self, gpa: u64) -> Result<u64, GuestMemoryError> {
        let mut b = [0u8; 8];
        self.read_at(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn gpa(&self, page: u64, count: u64) -> Result<u64, GuestMemoryError> {
        let (v, offset) = self.locate(page, count)?;
        Ok(v.region.guest_phys_addr + offset)
    }

    /// Copies `buf.len() / 4096` pages starting at `page` (all in one region) into `buf`.
    pub fn read(&self, page: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let gpa = self.gpa(page, (buf.len() / PAGE) as u64)?;
        self.read_at(gpa, buf)
    }

    /// Copies `data` (whole pages, one region) into guest memory at `page`; see
    /// [`GuestMemory::write_at`] about anonymous memory.
    pub fn write(&self, page: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        let gpa = self.gpa(page, (data.len() / PAGE) as u64)?;
        self.write_at(gpa, data)
    }

    /// A read-only view of memfd memory that lends pages without copying them, for memory
    /// that no longer changes; None when a region is not a memfd (its pages are read as
    /// before). Mapping costs page-table entries of our own (the module comment), which pays
    /// where every page is read once and sent at once: the source's post-copy.
    ///
    /// # Safety
    ///
    /// The guest memory must not be written while the view lives: the source VM has stopped
    /// for good (after the switch-over's commit point) and nothing else writes its memory.
    pub unsafe fn freeze(&self) -> Result<Option<FrozenMemory>, GuestMemoryError> {
        let mut maps = Vec::with_capacity(self.regions.len());
        for (index, v) in self.regions.iter().enumerate() {
            if v.region.backing != BackingKind::Memfd {
                return Ok(None);
            }
            let map = MmapRegion::shared_read_only(
                v.fd.as_fd(),
                v.region.file_offset,
                v.region.size as usize,
            )
            .map_err(|source| GuestMemoryError::Map {
                index,
                backing: v.region.backing,
                source,
            })?;
            maps.push((v.first_page, v.region.pages(), map));
        }
        Ok(Some(FrozenMemory { maps }))
    }

    /// The VMM's address of `page` (where userfaultfd reports and resolves it).
    pub fn host_addr(&self, page: u64) -> Result<u64, GuestMemoryError> {
        let (v, offset) = self.locate(page, 1)?;
        Ok(v.region.host_addr + offset)
    }

    /// The page at a VMM address, if it is guest RAM.
    pub fn page_of_host_addr(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|v| {
            let start = v.region.host_addr;
            (addr >= start && addr < start + v.region.size)
                .then(|| v.first_page + (addr - start) / PAGE_SIZE)
        })
    }

    /// The backing of the region holding `page`.
    pub fn backing_of(&self, page: u64) -> Option<BackingKind> {
        self.locate(page, 1).ok().map(|(v, _)| v.region.backing)
    }

    /// Pages that certainly hold only zeros because their file has a hole there (memfd and
    /// guest_memfd regions, found with SEEK_DATA/SEEK_HOLE without touching memory). Pages
    /// of anonymous regions, and files that cannot tell, are never reported.
    pub fn holes(&self) -> PageBitmap {
        let mut holes = PageBitmap::new(self.total_pages);
        for v in &self.regions {
            if v.region.backing == BackingKind::Anon {
                continue;
            }
            let start = v.region.file_offset;
            let end = start + v.region.size;
            let mut pos = start;
            while pos < end {
                let data = match rustix::fs::seek(&*v.fd, rustix::fs::SeekFrom::Data(pos)) {
                    Ok(d) => d.min(end),
                    Err(rustix::io::Errno::NXIO) => end,
                    Err(_) => break, // the file cannot tell: report nothing more for it
                };
                for p in (pos - start) / PAGE_SIZE..(data - start) / PAGE_SIZE {
                    holes.set(v.first_page + p);
                }
                if data >= end {
                    break;
                }
                match rustix::fs::seek(&*v.fd, rustix::fs::SeekFrom::Hole(data)) {
                    Ok(h) => pos = h.min(end).next_multiple_of(PAGE_SIZE),
                    Err(_) => break,
                }
            }
        }
        holes
    }

    /// Punches `count` pages at `page` out of a file-backed region (they read as zero, or
    /// fault as missing under userfaultfd); on anonymous regions it does nothing and says so.
    pub fn punch(&self, page: u64, count: u64) -> Result<bool, GuestMemoryError> {
        let (v, offset) = self.locate(page, count)?;
        if v.region.backing == BackingKind::Anon {
            return Ok(false);
        }
        rustix::fs::fallocate(
            &*v.fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            v.region.file_offset + offset,
            count * PAGE_SIZE,
        )
        .map_err(|e| GuestMemoryError::File {
            op: "punch hole",
            index: 0,
            source: e.into(),
        })?;
        Ok(true)
    }

    /// Allocates every page of the file-backed regions up front, so later writes do not pay
    /// for allocation page by page.
    pub fn allocate_all(&self) -> Result<(), GuestMemoryError> {
        for (index, v) in self.regions.iter().enumerate() {
            if v.region.backing == BackingKind::Anon {
                continue;
            }
            rustix::fs::fallocate(
                &*v.fd,
                rustix::fs::FallocateFlags::empty(),
                v.region.file_offset,
                v.region.size,
            )
            .map_err(|e| GuestMemoryError::File {
                op: "fallocate",
                index,
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_holes() {
        let (layout, fd) = GuestMemory::memfd_layout(64, 0x7000_0000).unwrap();
        let probe = fd.try_clone().unwrap();
        let gm = GuestMemory::open(&layout, vec![fd]).unwrap();
        assert_eq!(gm.holes().count(), 64, "a fresh memfd is all holes");
        gm.write(5, &[7u8; 4096]).unwrap();
        gm.write(40, &[9u8; 8192]).unwrap();
        let mut page = [0u8; 4096];
        gm.read(41, &mut page).unwrap();
        assert_eq!(page[100], 9);
        let holes = gm.holes();
        assert!(!holes.test(5) && !holes.test(40) && !holes.test(41));
        assert!(holes.test(4) && holes.test(6) && holes.test(63));
        assert!(gm.read(64, &mut page).is_err());
        assert!(gm.write(63, &[0u8; 8192]).is_err());
        assert_eq!(gm.page_of_host_addr(0x7000_0000 + 4096 * 3 + 5), Some(3));
        assert_eq!(gm.page_of_host_addr(0x7000_0000 + 4096 * 64), None);
        gm.allocate_all().unwrap();
        let blocks = rustix::fs::fstat(&probe).unwrap().st_blocks as u64;
        assert!(blocks * 512 >= 64 * 4096, "every page allocated");
        // Allocated but never written pages still read as zeros, and shmem still says so.
        assert_eq!(gm.holes().count(), 61);
    }

    #[test]
    fn a_frozen_view_lends_what_reads_copy_and_only_memfd_freezes() {
        let gm = GuestMemory::memfd(8).unwrap();
        gm.write(3, &[0xab; 4096]).unwrap();
        // SAFETY: nothing writes `gm` while the view lives.
        let frozen = unsafe { gm.freeze() }.unwrap().expect("memfd freezes");
        assert!(frozen.page(3).unwrap().iter().all(|&b| b == 0xab));
        assert!(frozen.page(4).unwrap().iter().all(|&b| b == 0));
        assert!(frozen.page(8).is_err());

        let (_mem, anon) = anon_over_proc_mem(16);
        // SAFETY: as above.
        let view = unsafe { anon.freeze() }.unwrap();
        assert!(view.is_none(), "anonymous memory is read, not mapped");
    }

    /// Anonymous memory of this process's own, `pages` long, reached as a VMM's would be:
    /// through `/proc/self/mem` at its address.
    fn anon_over_proc_mem(pages: u64) -> (MmapRegion, GuestMemory) {
        let mem = MmapRegion::anonymous((pages * PAGE_SIZE) as usize).unwrap();
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/self/mem")
            .unwrap()
            .into();
        let addr = mem.as_ptr() as u64;
        let layout = MemoryLayout {
            regions: vec![Region {
                guest_phys_addr: 0,
                size: pages * PAGE_SIZE,
                backing: BackingKind::Anon,
                fd: 0,
                file_offset: addr,
                page_size: PAGE_SIZE,
                host_addr: addr,
            }],
        };
        let gm = GuestMemory::open(&layout, vec![fd]).unwrap();
        (mem, gm)
    }

    #[test]
    fn proc_mem_access() {
        let (mem, gm) = anon_over_proc_mem(16);
        gm.write(2, &[5u8; 4096]).unwrap();
        assert_eq!(mem.read_u64(2 * 4096 + 8).unwrap(), 0x0505_0505_0505_0505);
        let mut page = [1u8; 4096];
        gm.read(3, &mut page).unwrap();
        assert!(is_zero(&page));
        assert_eq!(gm.holes().count(), 0, "anonymous memory reports no holes");
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&p[1..]));
    }
}
