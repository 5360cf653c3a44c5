//! A batch of guest pages as it arrives at the target: for each page its global number and
//! whether it is all zeros, and the contents of the non-zero ones in entry order.
//!
//! Plain data shared by the wire protocol (which encodes and decodes it, `crate::wire`) and the
//! post-copy installer (which writes it into guest memory, `crate::postcopy`), so that neither
//! depends on the other.

use crate::layout::PAGE_SIZE;

/// One page of a batch: its global index, and whether it is all zeros (then no data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    pub page: u64,
    pub zero: bool,
}

/// Entries, and the data of the non-zero ones in entry order (`PAGE_SIZE` bytes each).
#[derive(Debug)]
pub struct PagesBatch<'a> {
    pub entries: Vec<PageEntry>,
    pub data: &'a [u8],
}

impl<'a> PagesBatch<'a> {
    /// The entries with their data (`None` for zero pages).
    pub fn pages(&self) -> impl Iterator<Item = (u64, Option<&'a [u8]>)> + '_ {
        let mut offset = 0usize;
        let data = self.data;
        self.entries.iter().map(move |e| {
            if e.zero {
                (e.page, None)
            } else {
                let page = &data[offset..offset + PAGE_SIZE as usize];
                offset += PAGE_SIZE as usize;
                (e.page, Some(page))
            }
        })
    }

    /// How many entries are zero-page markers.
    pub fn zero_pages(&self) -> u64 {
        self.entries.iter().filter(|e| e.zero).count() as u64
    }
}
