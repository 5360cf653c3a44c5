//! The guest memory layout: which guest-physical ranges exist, what backs them, and where each
//! one lives in the file descriptor that was handed over with it.
//!
//! Pages are numbered globally across regions in layout order (region 0's pages first), which
//! is how page bitmaps and the wire protocol address them.

use serde::{Deserialize, Serialize};

/// The page size every Faultline bitmap and transfer works in.
pub const PAGE_SIZE: u64 = 4096;

/// What kind of memory backs a region.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[serde(rename_all = "kebab-case")]
pub enum BackingKind {
    /// Private anonymous memory of the VMM. Its fd is the VMM's `/proc/self/mem`, and the
    /// region's `file_offset` is the mapping's host virtual address.
    Anon,
    /// A memfd (shmem) file mapped shared by the VMM.
    Memfd,
    /// A KVM guest_memfd, mmap-able (`GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`).
    GuestMemfd,
}

impl BackingKind {
    pub const ALL: [BackingKind; 3] = [Self::Anon, Self::Memfd, Self::GuestMemfd];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Memfd => "memfd",
            Self::GuestMemfd => "guest-memfd",
        }
    }
}

impl std::fmt::Display for BackingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackingKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown backing `{s}` (expected anon, memfd or guest-memfd)"))
    }
}

/// One contiguous guest-physical range of RAM.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// First guest-physical address.
    pub guest_phys_addr: u64,
    /// Length in bytes (a multiple of `page_size`).
    pub size: u64,
    pub backing: BackingKind,
    /// Index into the file descriptors that came with the message carrying this layout.
    pub fd: u32,
    /// Offset of the region's first byte in that file.
    pub file_offset: u64,
    /// Page size of the backing (4096 unless huge pages are used).
    pub page_size: u64,
    /// Where the VMM has the region mapped in its own address space. userfaultfd reports faults
    /// by this address.
    pub host_addr: u64,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.guest_phys_addr + self.size
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.guest_phys_addr && gpa < self.end()
    }
}

/// A layout that is wrong in some way a peer must not act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("the layout has no regions")]
    Empty,
    #[error("region {index}: {what}")]
    BadRegion { index: usize, what: String },
    #[error("regions {a} and {b} overlap")]
    Overlap { a: usize, b: usize },
    #[error("region {index} names fd {fd}, but only {available} fds were received")]
    MissingFd {
        index: usize,
        fd: u32,
        available: usize,
    },
}

/// All RAM of one VM.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayout {
    pub regions: Vec<Region>,
}

impl MemoryLayout {
    /// Checks the layout is well formed and that every fd index is below `fds_received`.
    pub fn validate(&self, fds_received: usize) -> Result<(), LayoutError> {
        if self.regions.is_empty() {
            return Err(LayoutError::Empty);
        }
        for (index, r) in self.regions.iter().enumerate() {
            let bad = |what: &str| {
                Err(LayoutError::BadRegion {
                    index,
                    what: what.to_string(),
                })
            };
            if r.page_size != PAGE_SIZE {
                return bad("page size must be 4096");
            }
            if r.size == 0 || r.size % PAGE_SIZE != 0 {
                return bad("size must be a non-zero multiple of the page size");
            }
            if r.guest_phys_addr % PAGE_SIZE != 0 || r.file_offset % PAGE_SIZE != 0 {
                return bad("guest-physical address and file offset must be page aligned");
            }
            if r.guest_phys_addr.checked_add(r.size).is_none()
                || r.file_offset.checked_add(r.size).is_none()
            {
                return bad("range overflows 64 bits");
            }
            if r.fd as usize >= fds_received {
                return Err(LayoutError::MissingFd {
                    index,
                    fd: r.fd,
                    available: fds_received,
                });
            }
        }
        for a in 0..self.regions.len() {
            for b in a + 1..self.regions.len() {
                let (x, y) = (&self.regions[a], &self.regions[b]);
                if x.guest_phys_addr < y.end() && y.guest_phys_addr < x.end() {
                    return Err(LayoutError::Overlap { a, b });
                }
            }
        }
        Ok(())
    }

    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(Region::pages).sum()
    }

    /// The global index of region `index`'s first page.
    pub fn first_page(&self, index: usize) -> u64 {
        self.regions[..index].iter().map(Region::pages).sum()
    }

    /// Maps a guest-physical address to its global page index.
    pub fn page_of_gpa(&self, gpa: u64) -> Option<u64> {
        let mut base = 0;
        for r in &self.regions {
            if r.contains_gpa(gpa) {
                return Some(base + (gpa - r.guest_phys_addr) / PAGE_SIZE);
            }
            base += r.pages();
        }
        None
    }

    /// Maps a global page index to (region index, page offset within the region in bytes).
    pub fn locate_page(&self, page: u64) -> Option<(usize, u64)> {
        let mut base = 0;
        for (i, r) in self.regions.iter().enumerate() {
            if page < base + r.pages() {
                return Some((i, (page - base) * PAGE_SIZE));
            }
            base += r.pages();
        }
        None
    }

    /// The guest-physical address of a global page index.
    pub fn gpa_of_page(&self, page: u64) -> Option<u64> {
        self.locate_page(page)
            .map(|(i, off)| self.regions[i].guest_phys_addr + off)
    }

    /// True when `other` describes the same guest-physical memory (addresses, sizes, page
    /// sizes), whatever the backing files and host addresses are. Two VMMs can exchange pages
    /// exactly when their layouts are compatible.
    pub fn compatible_with(&self, other: &MemoryLayout) -> bool {
        self.regions.len() == other.regions.len()
            && self.regions.iter().zip(&other.regions).all(|(a, b)| {
                a.guest_phys_addr == b.guest_phys_addr
                    && a.size == b.size
                    && a.page_size == b.page_size
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, size: u64, fd: u32) -> Region {
        Region {
            guest_phys_addr: gpa,
            size,
            backing: BackingKind::Memfd,
            fd,
            file_offset: 0,
            page_size: PAGE_SIZE,
            host_addr: 0x7f00_0000_0000,
        }
    }

    #[test]
    fn validates() {
        let good = MemoryLayout {
            regions: vec![region(0, 1 << 20, 0), region(1 << 32, 1 << 20, 1)],
        };
        assert_eq!(good.validate(2), Ok(()));
        assert!(matches!(
            good.validate(1),
            Err(LayoutError::MissingFd { .. })
        ));
        let overlap = MemoryLayout {
            regions: vec![region(0, 1 << 20, 0), region(4096, 4096, 0)],
        };
        assert_eq!(
            overlap.validate(1),
            Err(LayoutError::Overlap { a: 0, b: 1 })
        );
        let unaligned = MemoryLayout {
            regions: vec![region(0, 100, 0)],
        };
        assert!(matches!(
            unaligned.validate(1),
            Err(LayoutError::BadRegion { .. })
        ));
        assert_eq!(
            MemoryLayout { regions: vec![] }.validate(0),
            Err(LayoutError::Empty)
        );
    }

    #[test]
    fn page_numbering_spans_regions() {
        let l = MemoryLayout {
            regions: vec![region(0, 8192, 0), region(1 << 32, 4096 * 3, 1)],
        };
        assert_eq!(l.total_pages(), 5);
        assert_eq!(l.page_of_gpa(4096), Some(1));
        assert_eq!(l.page_of_gpa((1 << 32) + 4097), Some(3));
        assert_eq!(l.page_of_gpa(8192), None);
        assert_eq!(l.locate_page(4), Some((1, 8192)));
        assert_eq!(l.gpa_of_page(2), Some(1 << 32));
        assert_eq!(l.locate_page(5), None);
        assert_eq!(l.first_page(1), 2);
    }

    #[test]
    fn serde_names() {
        let json = serde_json::to_string(&BackingKind::GuestMemfd).unwrap();
        assert_eq!(json, "\"guest-memfd\"");
        assert_eq!("memfd".parse::<BackingKind>(), Ok(BackingKind::Memfd));
        assert!("hugetlb".parse::<BackingKind>().is_err());
    }
}
