//! Where guest RAM lies in guest-physical space: the split a PC makes around the hole below
//! 4 GiB, where a real machine's PCI devices and firmware live. RAM up to `below_4g` bytes sits
//! at guest-physical 0; the rest starts at 4 GiB. Each part becomes one KVM memslot.
//!
//! Owns the arithmetic only. The RAM is one file and one mapping in which the parts follow each
//! other without a gap, so a part's offset in RAM is also its offset in the file, in the
//! mapping, and (divided by the page size) the first page of the part in the layout's global
//! page numbering. It allocates nothing and knows nothing of KVM.

use faultline::layout::PAGE_SIZE;

/// Where high RAM starts: the end of the 32-bit address space.
pub const HIGH_RAM_START: u64 = 4 << 30;
/// How much RAM a PC keeps below 4 GiB when the VMM is not told otherwise: the top GiB of the
/// 32-bit space is left to devices, as QEMU's q35 machine does for large guests.
pub const DEFAULT_BELOW_4G: u64 = 3 << 30;
/// Parts start and end on 2 MiB, the page size of the boot page tables (which also keeps every
/// part a whole number of 64-page bitmap words).
pub const PART_ALIGN: u64 = 2 << 20;
/// Low RAM must hold the boot image and some free memory above it.
pub const MIN_BELOW_4G: u64 = 4 << 20;

/// One contiguous guest-physical range of RAM: one memslot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamPart {
    pub gpa: u64,
    pub size: u64,
    /// Where the part starts in the RAM file and mapping.
    pub offset: u64,
}

impl RamPart {
    pub fn first_page(&self) -> u64 {
        self.offset / PAGE_SIZE
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamMapError {
    #[error("RAM below 4 GiB of {0} bytes is not a multiple of 2 MiB between 4 MiB and 4 GiB")]
    BadBelow4g(u64),
    #[error("RAM of {0} bytes is not a multiple of 2 MiB")]
    BadSize(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamMap {
    parts: Vec<RamPart>,
    size: u64,
}

impl RamMap {
    /// `size` bytes of RAM laid out as a PC lays it out with `below_4g` bytes under the hole.
    pub fn pc(size: u64, below_4g: u64) -> Result<Self, RamMapError> {
        if !(MIN_BELOW_4G..=HIGH_RAM_START).contains(&below_4g)
            || !below_4g.is_multiple_of(PART_ALIGN)
        {
            return Err(RamMapError::BadBelow4g(below_4g));
        }
        if size == 0 || !size.is_multiple_of(PART_ALIGN) {
            return Err(RamMapError::BadSize(size));
        }
        let low = size.min(below_4g);
        let mut parts = vec![RamPart {
            gpa: 0,
            size: low,
            offset: 0,
        }];
        if size > low {
            parts.push(RamPart {
                gpa: HIGH_RAM_START,
                size: size - low,
                offset: low,
            });
        }
        Ok(Self { parts, size })
    }

    pub fn parts(&self) -> &[RamPart] {
        &self.parts
    }

    /// All RAM, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest-physical address of the byte at `offset` in RAM (the guest's linear address:
    /// the boot page tables map RAM's parts one after the other).
    pub fn gpa_of_offset(&self, offset: u64) -> Option<u64> {
        self.parts
            .iter()
            .find(|p| offset >= p.offset && offset < p.offset + p.size)
            .map(|p| p.gpa + (offset - p.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_stays_below_the_hole() {
        let map = RamMap::pc(256 << 20, DEFAULT_BELOW_4G).unwrap();
        assert_eq!(
            map.parts(),
            &[RamPart {
                gpa: 0,
                size: 256 << 20,
                offset: 0
            }]
        );
        assert_eq!(map.gpa_of_offset(0x1234), Some(0x1234));
        assert_eq!(map.gpa_of_offset(256 << 20), None);
    }

    #[test]
    fn large_ram_continues_at_4g() {
        let map = RamMap::pc(5 << 30, DEFAULT_BELOW_4G).unwrap();
        assert_eq!(map.parts().len(), 2);
        assert_eq!(map.parts()[1].gpa, 4 << 30);
        assert_eq!(map.parts()[1].size, 2 << 30);
        assert_eq!(map.parts()[1].first_page(), (3 << 30) / PAGE_SIZE);
        assert_eq!(map.gpa_of_offset((3 << 30) - 1), Some((3 << 30) - 1));
        assert_eq!(map.gpa_of_offset(3 << 30), Some(4 << 30));
        assert_eq!(map.gpa_of_offset((5 << 30) - 1), Some((6 << 30) - 1));
    }

    #[test]
    fn exactly_below_4g_is_one_part() {
        let map = RamMap::pc(64 << 20, 64 << 20).unwrap();
        assert_eq!(map.parts().len(), 1);
        let map = RamMap::pc(66 << 20, 64 << 20).unwrap();
        assert_eq!(map.parts().len(), 2);
        assert_eq!(map.parts()[1].size, 2 << 20);
    }

    #[test]
    fn rejects_unaligned_or_out_of_range_splits() {
        for bad in [0, 2 << 20, (64 << 20) + 4096, (4 << 30) + (2 << 20)] {
            assert_eq!(
                RamMap::pc(128 << 20, bad),
                Err(RamMapError::BadBelow4g(bad))
            );
        }
        assert_eq!(
            RamMap::pc((128 << 20) + 4096, 64 << 20),
            Err(RamMapError::BadSize((128 << 20) + 4096))
        );
    }
}
