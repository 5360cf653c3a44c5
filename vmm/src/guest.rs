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
    fn presets_are_ordered() {
        let i = MemtouchArgs::preset(DirtyRate::Idle);
        let m = MemtouchArgs::preset(DirtyRate::Moderate);
        let h = MemtouchArgs::preset(DirtyRate::Heavy);
        assert!(i.writes_per_1024 < m.writes_per_1024 && m.writes_per_1024 < h.writes_per_1024);
        assert_eq!(h.to_args().len(), 6);
    }
}
