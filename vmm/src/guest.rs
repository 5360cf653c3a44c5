//! The guest programs the VMM can run: the built-in ones (assembled from `guest/*.S` at build
//! time) and their arguments.

use clap::ValueEnum;

/// memtouch, assembled by build.rs from guest/memtouch.S.
pub const MEMTOUCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtouch.bin"));

/// Dirty-rate presets for memtouch, shared with the `faultline` CLI and benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRate {
    /// Rewrites about one page per thousand iterations and sleeps between heartbeats: a
    /// nearly idle guest that still verifies.
    Idle,
    /// Rewrites one page in 16 iterations.
    Moderate,
    /// Rewrites the page on every iteration, never sleeps.
    Heavy,
}

/// memtouch's arguments (the guest ABI's argument array; see guest/memtouch.S).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemtouchArgs {
    /// Working set in per mille of the usable pages.
    pub working_set_permille: u64,
    /// Out of every 1024 iterations, how many rewrite their page.
    pub writes_per_1024: u64,
    pub full_verify: bool,
    pub heartbeat_every: u64,
    pub sleep_us: u64,
    pub seed: u64,
}

impl MemtouchArgs {
    pub fn preset(rate: DirtyRate) -> Self {
        let (writes_per_1024, heartbeat_every, sleep_us) = match rate {
            DirtyRate::Idle => (1, 64, 10_000),
            DirtyRate::Moderate => (64, 256, 0),
            DirtyRate::Heavy => (1024, 256, 0),
        };
        Self {
            working_set_permille: 1000,
            writes_per_1024,
            full_verify: false,
            heartbeat_every,
            sleep_us,
            seed: 0x5EED,
        }
    }

    pub fn to_args(&self) -> Vec<u64> {
        vec![
            self.working_set_permille,
            self.writes_per_1024,
            u64::from(self.full_verify),
            self.heartbeat_every.max(1),
            self.sleep_us,
            self.seed,
        ]
    }
}

/// Where memtouch keeps things in a VM of `ram` bytes (mirrors the set-up code of
/// guest/memtouch.S).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemtouchLayout {
    /// Guest-physical address of the generation table (one u32 per usable page).
    pub table: u64,
    /// Guest-physical address of the first data page.
    pub data: u64,
    /// Pages of the working set.
    pub working_set: u64,
}

impl MemtouchArgs {
    pub fn layout(&self, ram: u64) -> MemtouchLayout {
        let base = crate::boot::FREE_ADDR;
        let total = (ram - base) >> 12;
        let table_pages = total.div_ceil(1024);
        let usable = total - table_pages;
        MemtouchLayout {
            table: base,
            data: base + table_pages * 4096,
            working_set: usable * self.working_set_permille / 1000,
        }
    }

    /// Writes generation 1 into every working-set page, exactly as memtouch itself would on
    /// first writing them, so that a benchmark's guest memory holds data from the start.
    /// `write(offset, bytes)` stores bytes at an offset in RAM (the guest's linear address).
    pub fn prefill(
        &self,
        ram: u64,
        mut write: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        const CHUNK: u64 = 256;
        let l = self.layout(ram);
        let table: Vec<u8> = 1u32.to_le_bytes().repeat(l.working_set as usize);
        write(l.table, &table)?;
        let mut buf = vec![0u8; (CHUNK * 4096) as usize];
        let mut first = 0;
        while first < l.working_set {
            let n = CHUNK.min(l.working_set - first);
            for k in 0..n {
                let gpa = l.data + (first + k) * 4096;
                let v = ((gpa >> 12) << 32) | 1;
                let page = &mut buf[(k * 4096) as usize..((k + 1) * 4096) as usize];
                let words: Vec<u64> = if self.full_verify {
                    (0..512).collect()
                } else {
                    vec![0, 256, 511]
                };
                page.fill(0);
                for w in words {
                    let at = (w * 8) as usize;
                    page[at..at + 8].copy_from_slice(&(v + w).to_le_bytes());
                }
            }
            write(l.data + first * 4096, &buf[..(n * 4096) as usize])?;
            first += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtouch_is_assembled() {
        assert!(MEMTOUCH.len() > 64 && MEMTOUCH.len() < 4096);
        // The program starts by checking its argument count: `cmp r9, 6`.
        assert_eq!(&MEMTOUCH[..4], &[0x49, 0x83, 0xf9, 0x06]);
    }

    #[test]
    fn layout_matches_the_guest() {
        let a = MemtouchArgs::preset(DirtyRate::Moderate);
        let l = a.layout(64 << 20);
        // (64 MiB - 2 MiB) / 4 KiB = 15872 pages; 16 table pages; 15856 usable.
        assert_eq!(l.table, 0x20_0000);
        assert_eq!(l.data, 0x20_0000 + 16 * 4096);
        assert_eq!(l.working_set, 15856);
        let mut written = Vec::new();
        a.prefill(64 << 20, |gpa, b| {
            written.push((gpa, b.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(written[0], (l.table, 15856 * 4));
        let pages: usize = written[1..].iter().map(|(_, n)| n / 4096).sum();
        assert_eq!(pages, 15856);
    }

    #[test]
    fn presets_are_ordered() {
        let i = MemtouchArgs::preset(DirtyRate::Idle);
        let m = MemtouchArgs::preset(DirtyRate::Moderate);
        let h = MemtouchArgs::preset(DirtyRate::Heavy);
        assert!(i.writes_per_1024 < m.writes_per_1024 && m.writes_per_1024 < h.writes_per_1024);
        assert_eq!(h.to_args().len(), 6);
    }
}
