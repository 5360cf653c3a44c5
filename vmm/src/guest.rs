//! The guest programs the VMM can run: the built-in ones (assembled from `guest/*.S` at build
//! time) and their arguments. Public in the library because the `faultline` CLI runs the same
//! memtouch on another VMM (QEMU, through the PC boot image) for the benchmark's comparison.

use clap::ValueEnum;

/// The first byte of RAM a guest program may use freely (the guest ABI's RCX).
pub const FREE_ADDR: u64 = 0x20_0000;

/// Where the PC boot image's argument block starts: its tag.
const PC_ARGS_TAG: &[u8; 8] = b"FLTARGS1";
/// How many arguments the PC boot image's block holds.
const PC_ARGS_MAX: usize = 16;
/// memtouch flag bits (argument 2; guest/memtouch.S).
const FLAG_FULL_VERIFY: u64 = 1;
const FLAG_PC: u64 = 2;
const FLAG_PREFILL: u64 = 4;
/// A paced memtouch reports about this often (its heartbeat interval follows the pace).
const PACED_HEARTBEATS_PER_SEC: u64 = 200;

/// memtouch, assembled by build.rs from guest/memtouch.S.
pub const MEMTOUCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memtouch.bin"));

/// memtouch behind a multiboot boot stub (guest/pc-boot.S), for VMMs that boot PC kernels:
/// the same workload on another VMM. Fill in its arguments with [`pc_boot_image`].
pub const PC_BOOT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pc-boot.bin"));

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
    /// Iterations per second on each vCPU, kept to with the TSC; 0: as fast as it runs.
    pub pace_per_sec: u64,
    /// The guest's TSC ticks per millisecond (needed with a pace; [`guest_tsc_khz`]).
    pub tsc_khz: u64,
    /// The guest writes its own pages' first generation before it starts (for VMMs that
    /// cannot prefill from the host).
    pub guest_prefill: bool,
}

/// What can go wrong preparing a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot ask KVM for the guest TSC frequency: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("the PC boot image has no argument block (build problem)")]
    NoArgBlock,
}

/// The TSC frequency a KVM guest sees on this host, in kHz (KVM_GET_TSC_KHZ on a scratch vCPU:
/// the rate memtouch's pacing counts in, for our VMM and for QEMU alike).
pub fn guest_tsc_khz() -> Result<u64, GuestError> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    Ok(u64::from(vcpu.get_tsc_khz()?))
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
            pace_per_sec: 0,
            tsc_khz: 0,
            guest_prefill: false,
        }
    }

    /// A guest that writes `pages_per_sec` pages a second on each vCPU (every iteration
    /// rewrites its page, the iterations paced by the TSC), whatever VMM runs it.
    pub fn paced(pages_per_sec: u64, tsc_khz: u64) -> Self {
        Self {
            writes_per_1024: 1024,
            heartbeat_every: (pages_per_sec / PACED_HEARTBEATS_PER_SEC).max(1),
            sleep_us: 0,
            pace_per_sec: pages_per_sec,
            tsc_khz,
            ..Self::preset(DirtyRate::Heavy)
        }
    }

    pub fn to_args(&self) -> Vec<u64> {
        vec![
            self.working_set_permille,
            self.writes_per_1024,
            self.flags(),
            self.heartbeat_every.max(1),
            self.sleep_us,
            self.seed,
            self.pace_per_sec,
            self.tsc_khz,
        ]
    }

    fn flags(&self) -> u64 {
        let mut f = 0;
        if self.full_verify {
            f |= FLAG_FULL_VERIFY;
        }
        if self.guest_prefill {
            f |= FLAG_PREFILL;
        }
        f
    }

    /// The PC boot image (multiboot, for QEMU's `-kernel`) running memtouch with these
    /// arguments in PC mode: reports on the debug console, sleeps on the APIC timer.
    pub fn pc_boot_image(&self) -> Result<Vec<u8>, GuestError> {
        let mut image = PC_BOOT.to_vec();
        let at = image
            .windows(PC_ARGS_TAG.len())
            .position(|w| w == PC_ARGS_TAG)
            .ok_or(GuestError::NoArgBlock)?;
        let mut args = self.to_args();
        args[2] |= FLAG_PC;
        debug_assert!(args.len() <= PC_ARGS_MAX);
        let mut block = (args.len() as u64).to_le_bytes().to_vec();
        for a in args {
            block.extend_from_slice(&a.to_le_bytes());
        }
        let start = at + PC_ARGS_TAG.len();
        image
            .get_mut(start..start + block.len())
            .ok_or(GuestError::NoArgBlock)?
            .copy_from_slice(&block);
        Ok(image)
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
        let base = FREE_ADDR;
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
        assert_eq!(h.to_args().len(), 8);
    }

    #[test]
    fn pacing_sets_a_heartbeat_every_5_ms() {
        let p = MemtouchArgs::paced(50_000, 2_445_406);
        assert_eq!(p.heartbeat_every, 250);
        assert_eq!(p.writes_per_1024, 1024);
        assert_eq!(&p.to_args()[6..], &[50_000, 2_445_406]);
        assert_eq!(MemtouchArgs::paced(10, 1).heartbeat_every, 1);
    }

    #[test]
    fn the_pc_image_carries_the_arguments_in_pc_mode() {
        let mut a = MemtouchArgs::paced(2000, 1_000_000);
        a.guest_prefill = true;
        let img = a.pc_boot_image().unwrap();
        assert_eq!(img.len(), PC_BOOT.len());
        let at = img.windows(8).position(|w| w == PC_ARGS_TAG).unwrap() + 8;
        let word =
            |i: usize| u64::from_le_bytes(img[at + 8 * i..at + 8 * i + 8].try_into().unwrap());
        assert_eq!(word(0), 8);
        assert_eq!(word(1 + 2), FLAG_PC | FLAG_PREFILL);
        assert_eq!(word(1 + 6), 2000);
        // The multiboot header leads the image.
        assert_eq!(&img[..4], &0x1BAD_B002u32.to_le_bytes());
        // memtouch itself is in there, whole.
        assert!(img.windows(MEMTOUCH.len()).any(|w| w == MEMTOUCH));
    }
}
