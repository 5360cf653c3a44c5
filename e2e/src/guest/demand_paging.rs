//! A demand-paging benchmark in the style of KVM's `demand_paging_test` and of the KVM Userfault
//! cover letter's measurements: N vCPUs each read their own pages of memory that is not there
//! yet, and every first access is resolved by the trap under test. Reports pages per second from
//! the first KVM_RUN to the last vCPU's halt.
//!
//! The traps: `uffd` (one userfaultfd, one handler thread, `UFFDIO_COPY`), `uffd-per-vcpu` (a
//! userfaultfd and handler thread per vCPU over that vCPU's pages) and `kvm-userfault` (every
//! page marked; the faulting vCPU thread writes the page and clears its bit, as the cover
//! letter's test does). Memory is anonymous for all three, so only the trap differs. Every value
//! a vCPU reads is checked, so a trap that resolved a fault with the wrong page fails the run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use faultline::layout::PAGE_SIZE;
use faultline::sys::MmapRegion;
use faultline::sys::uffd::{Event as UffdEvent, MODE_MISSING, Userfaultfd};
use faultline::trap::kvm_userfault::{KVM_MEMORY_EXIT_FLAG_USERFAULT, Memslot, UserfaultBitmap};
use serde::Serialize;

use super::testvm::{Event, MAX_TABLE_ENTRIES, MAX_VCPUS, TestVm, run};

/// Guest-physical base of the memory under test (slot 1).
const BASE: u64 = 0x10_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Trap {
    Uffd,
    UffdPerVcpu,
    KvmUserfault,
}

impl Trap {
    pub const ALL: [Trap; 3] = [Trap::Uffd, Trap::UffdPerVcpu, Trap::KvmUserfault];

    fn name(self) -> &'static str {
        match self {
            Self::Uffd => "uffd",
            Self::UffdPerVcpu => "uffd-per-vcpu",
            Self::KvmUserfault => "kvm-userfault",
        }
    }
}

/// One run's result.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub trap: Trap,
    pub vcpus: u64,
    pub pages: u64,
    /// `None` when the kernel lacks the trap (`unavailable` says why).
    pub seconds: Option<f64>,
    pub pages_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.unavailable, self.pages_per_second) {
            (Some(why), _) => write!(f, "{}: unavailable ({why})", self.trap.name()),
            (None, Some(rate)) => write!(
                f,
                "{}: {:.0} pages/s ({} pages, {} vCPUs)",
                self.trap.name(),
                rate,
                self.pages,
                self.vcpus
            ),
            (None, None) => write!(f, "{}: no result", self.trap.name()),
        }
    }
}

fn gpa(page: u64) -> u32 {
    (BASE + page * PAGE_SIZE) as u32
}

/// The contents every page is resolved with: the u32 at address `a` holds `!a`.
fn page_contents(page: u64) -> Vec<u8> {
    let start = u64::from(gpa(page));
    (0..PAGE_SIZE / 4)
        .flat_map(|i| (!((start + 4 * i) as u32)).to_le_bytes())
        .collect()
}

/// Runs the benchmark for `trap` with `vcpus` vCPUs touching `per_vcpu` pages each.
pub fn measure(trap: Trap, vcpus: u64, per_vcpu: u64) -> Result<Measured> {
    ensure!((1..=MAX_VCPUS).contains(&vcpus), "1 to {MAX_VCPUS} vCPUs");
    ensure!(
        (1..=MAX_TABLE_ENTRIES as u64).contains(&per_vcpu),
        "1 to {MAX_TABLE_ENTRIES} pages per vCPU"
    );
    let pages = vcpus * per_vcpu;
    let unavailable = |why: String| Measured {
        trap,
        vcpus,
        pages,
        seconds: None,
        pages_per_second: None,
        unavailable: Some(why),
    };
    let vm = TestVm::new()?;
    let map = MmapRegion::anonymous((pages * PAGE_SIZE) as usize)?;
    let bitmap = UserfaultBitmap::all_marked(pages);
    let slot = Memslot {
        slot: 1,
        guest_phys_addr: BASE,
        memory_size: pages * PAGE_SIZE,
        userspace_addr: map.as_ptr() as u64,
        guest_memfd: None,
        log_dirty_pages: false,
        userfault_bitmap: (trap == Trap::KvmUserfault).then(|| bitmap.user_addr()),
    };
    // The userfaultfds, registered before the memslot exists so no access escapes them.
    let mut uffds = Vec::new();
    if trap != Trap::KvmUserfault {
        let ranges: Vec<(u64, u64)> = match trap {
            Trap::Uffd => vec![(0, pages)],
            _ => (0..vcpus).map(|v| (v * per_vcpu, per_vcpu)).collect(),
        };
        for (first, count) in ranges {
            let uffd = match Userfaultfd::new(0) {
                Ok(u) => u,
                Err(e) => return Ok(unavailable(format!("userfaultfd: {e}"))),
            };
            if let Err(e) = uffd.register(
                map.as_ptr() as u64 + first * PAGE_SIZE,
                count * PAGE_SIZE,
                MODE_MISSING,
            ) {
                return Ok(unavailable(format!("UFFDIO_REGISTER(anon, MISSING): {e}")));
            }
            uffds.push(uffd);
        }
    }
    if let Err(e) = vm.set_memslot(&slot) {
        let why = format!(
            "KVM_SET_USER_MEMORY_REGION2({}) = {}",
            faultline::trap::kvm_userfault::flag_names(slot.flags()),
            faultline::probe::errno_name(e)
        );
        return if trap == Trap::KvmUserfault {
            Ok(unavailable(why))
        } else {
            bail!("{why}")
        };
    }
    let mut cpus = Vec::new();
    for v in 0..vcpus {
        let table: Vec<u32> = (0..per_vcpu).map(|k| gpa(v * per_vcpu + k)).collect();
        cpus.push((v, vm.vcpu(v, &table)?));
    }
    let stop = AtomicBool::new(false);
    let base = map.as_ptr() as u64;
    let started = Instant::now();
    let elapsed = std::thread::scope(|s| -> Result<Duration> {
        let handlers: Vec<_> = uffds
            .iter()
            .map(|uffd| s.spawn(|| serve_uffd(uffd, base, &stop)))
            .collect();
        let workers: Vec<_> = cpus
            .iter_mut()
            .map(|(v, vcpu)| {
                let (v, map, bitmap) = (*v, &map, &bitmap);
                s.spawn(move || -> Result<()> {
                    let mut next = 0;
                    loop {
                        match run(vcpu) {
                            Event::Value(x) => {
                                let want = !gpa(v * per_vcpu + next);
                                ensure!(x == want, "vCPU {v} read {x:#x}, expected {want:#x}");
                                next += 1;
                            }
                            Event::Halted => break,
                            Event::MemoryFault { flags, gpa: at, .. }
                                if flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0 =>
                            {
                                let page = (at - BASE) / PAGE_SIZE;
                                map.write(page * PAGE_SIZE, &page_contents(page))?;
                                bitmap.clear(page);
                            }
                            other => bail!("vCPU {v}: unexpected {other:?}"),
                        }
                    }
                    ensure!(next == per_vcpu, "vCPU {v} halted after {next} pages");
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for w in workers {
            let r = w
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("vCPU thread panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Release);
        for h in handlers {
            h.join()
                .map_err(|_| anyhow::anyhow!("fault handler panicked"))??;
        }
        result.map(|()| elapsed)
    })?;
    let seconds = elapsed.as_secs_f64();
    Ok(Measured {
        trap,
        vcpus,
        pages,
        seconds: Some(seconds),
        pages_per_second: Some(pages as f64 / seconds),
        unavailable: None,
    })
}

/// A fault handler thread: resolves every missing-page fault with the page's contents.
fn serve_uffd(uffd: &Userfaultfd, base: u64, stop: &AtomicBool) -> Result<()> {
    use rustix::event::{PollFd, PollFlags};
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(uffd, PollFlags::IN)];
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 20_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => bail!("poll on the userfaultfd: {e}"),
        }
        for event in uffd.read_events(64).context("reading faults")? {
            if let UffdEvent::PageFault { address, .. } = event {
                let at = address & !(PAGE_SIZE - 1);
                let page = (at - base) / PAGE_SIZE;
                match uffd.copy(at, &page_contents(page)) {
                    Err(e) if e.errno() != Some(rustix::io::Errno::EXIST) => {
                        return Err(e).context("UFFDIO_COPY");
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Every trap in turn, for the boot matrix: passes when every available trap ran correctly.
pub fn matrix_test(vcpus: u64, per_vcpu: u64) -> Result<super::Outcome> {
    let mut lines = Vec::new();
    let mut ran = 0;
    for trap in Trap::ALL {
        let m = measure(trap, vcpus, per_vcpu)?;
        ran += usize::from(m.unavailable.is_none());
        lines.push(m.to_string());
    }
    ensure!(ran > 0, "no trap available: {}", lines.join("; "));
    Ok(super::Outcome::Passed(lines.join("; ")))
}
