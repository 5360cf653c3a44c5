//! Installing pages into the target VMM's memory, before and after switch-over.
//!
//! Before switch-over the target VM has never run, nothing can fault, and pages may arrive
//! several times (every pre-copy pass resends what the guest dirtied), so they are simply
//! written — except anonymous pages arriving for the first time under userfaultfd, which only
//! `UFFDIO_COPY` can create. At switch-over the source names the pages the target must not
//! trust; they are made missing again (a punched hole, or an anonymous page the VMM discards)
//! so that the first access faults. After switch-over every install goes through
//! [`PageStates`] so each page is installed exactly once, with `UFFDIO_COPY` /
//! `UFFDIO_ZEROPAGE`, which map the page and wake every vCPU waiting for it in one step.
//!
//! Under KVM Userfault (guest_memfd memory, which userfaultfd cannot trap) a page faults while
//! its bit in the shared userfault bitmap is set, whatever memory holds: installing is writing
//! the page and then clearing its bit, and switch-over only sets the bits of the invalid pages.
//! That traps vCPU accesses only. Where the VMM registered its RAM mapping with userfaultfd in
//! minor mode as well (the host half), KVM's and the VMM's own accesses through that mapping
//! stop in a minor fault until the page is valid and mapped there with `UFFDIO_CONTINUE`; the
//! mapping starts with no page mapped, so no stale pre-copied contents can be read.
//!
//! Missing mode is used for shared memory too, not minor mode: on our development machines
//! every page-table update is expensive (UFFDIO_CONTINUE measured at ~10 µs per page), and
//! minor mode would have to map every pre-copied page into the VMM before it resumes (2.7 s for
//! 1 GiB). With missing mode, valid pages simply sit in the file and the VMM maps them as it
//! touches them, as any VMM does.

use std::sync::{Arc, Mutex};

use crate::bitmap::PageBitmap;
use crate::guest_memory::{GuestMemory, GuestMemoryError};
use crate::layout::{BackingKind, PAGE_SIZE};
use crate::page_batch::PagesBatch;
use crate::sync::lock;
use crate::sys::uffd::{UffdError, Userfaultfd};
use crate::trap::{Armed, Backend, TrapError};

use super::page_states::PageStates;

const PAGE: usize = PAGE_SIZE as usize;

/// What [`Installer::install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// Someone else installed (or is installing) the page.
    No,
    /// This call installed it; `waited` when a vCPU had faulted on it.
    Yes { waited: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Memory(#[from] GuestMemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Trap(#[from] TrapError),
    #[error("{0} pages are not valid at switch-over and there is no trap to fetch them")]
    InvalidWithoutTrap(u64),
    #[error("preallocating target memory failed: {0}")]
    Preallocation(String),
}

/// Installs pages into the target VMM's memory (see the module documentation).
pub struct Installer {
    mem: Arc<GuestMemory>,
    /// The armed trap; `None` for a pre-copy-only migration, where every page must be valid
    /// before the VM resumes.
    trap: Option<Armed>,
    states: PageStates,
    /// Pages holding pre-copied data in the target (written into the file, or created in the
    /// VMM's anonymous memory).
    populated: Mutex<PageBitmap>,
    /// Allocating file-backed memory ahead of the pre-copy writes, off the receive path.
    preallocation: Mutex<Option<std::thread::JoinHandle<Result<(), GuestMemoryError>>>>,
    preallocated: std::sync::atomic::AtomicBool,
    zeros: Vec<u8>,
}

impl Installer {
    pub fn new(mem: GuestMemory, trap: Option<Armed>) -> Self {
        let pages = mem.total_pages();
        Self {
            mem: Arc::new(mem),
            trap,
            states: PageStates::new(pages),
            populated: Mutex::new(PageBitmap::new(pages)),
            preallocation: Mutex::new(None),
            preallocated: std::sync::atomic::AtomicBool::new(false),
            zeros: vec![0u8; PAGE],
        }
    }

    /// Starts allocating every page of the file-backed regions on another thread, so the
    /// pre-copy writes land in allocated pages (on our machines allocating a shmem page while
    /// writing it costs ~5 µs, in bulk ~1.7 µs, and writing an allocated one ~1 µs). Only for
    /// migrations that pre-copy every page: at switch-over every page that is not valid is
    /// punched out again so it faults.
    pub fn start_preallocation(&self) -> std::io::Result<()> {
        let mem = self.mem.clone();
        self.preallocated
            .store(true, std::sync::atomic::Ordering::Release);
        // The caller's span (the migration's) follows the work onto the new thread.
        let span = tracing::Span::current();
        let handle = std::thread::Builder::new()
            .name("preallocate".into())
            .spawn(move || {
                let _in = span.enter();
                let t = std::time::Instant::now();
                let r = mem.allocate_all();
                tracing::debug!(
                    ms = t.elapsed().as_millis() as u64,
                    "target memory preallocated"
                );
                r
            })?;
        *lock(&self.preallocation) = Some(handle);
        Ok(())
    }

    fn finish_preallocation(&self) -> Result<(), InstallError> {
        let handle = lock(&self.preallocation).take();
        if let Some(h) = handle {
            h.join().map_err(|_| {
                InstallError::Preallocation("the preallocation thread panicked".into())
            })??;
        }
        Ok(())
    }

    /// The backend of the armed trap, if any.
    pub fn trap(&self) -> Option<Backend> {
        self.trap.as_ref().map(Armed::backend)
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn states(&self) -> &PageStates {
        &self.states
    }

    /// The userfaultfd, when that is the armed trap: faults are read from it.
    pub fn uffd(&self) -> Option<&Userfaultfd> {
        match &self.trap {
            Some(Armed::Userfaultfd(u)) => Some(u),
            _ => None,
        }
    }

    /// The userfaultfd that reports KVM's and the VMM's own accesses under KVM Userfault.
    pub fn host_uffd(&self) -> Option<&Userfaultfd> {
        self.trap.as_ref().and_then(Armed::host_uffd)
    }

    /// Writes a pre-copy batch (before switch-over; one thread). Consecutive pages with data
    /// that take the same path are written with one call.
    pub fn precopy_batch(&self, batch: &PagesBatch<'_>) -> Result<(), InstallError> {
        let mut populated = lock(&self.populated);
        let uffd = self.uffd();
        // (page, offset of its data in the batch) for every entry; zero pages have no data.
        let mut offset = 0usize;
        let entries: Vec<(u64, Option<usize>)> = batch
            .entries
            .iter()
            .map(|e| {
                let at = (!e.zero).then_some(offset);
                offset += if e.zero { 0 } else { PAGE };
                (e.page, at)
            })
            .collect();
        let copies = |p: u64, populated: &PageBitmap| {
            uffd.is_some()
                && !populated.test(p)
                && self.mem.backing_of(p) == Some(BackingKind::Anon)
        };
        let mut i = 0;
        while i < entries.len() {
            let (page, at) = entries[i];
            let Some(at) = at else {
                let anon = self.mem.backing_of(page) == Some(BackingKind::Anon);
                if populated.test(page) {
                    // Was data, is zero now.
                    self.mem.write(page, &self.zeros[..PAGE])?;
                } else if anon && let Some(uffd) = uffd {
                    // Zero and never written: anonymous memory under the trap needs the zero
                    // page mapped or it would fault; fresh files already read as zero.
                    uffd.zeropage(self.mem.host_addr(page)?, PAGE_SIZE)?;
                    populated.set(page);
                }
                i += 1;
                continue;
            };
            // Anonymous pages seen for the first time can only be created with UFFDIO_COPY;
            // everything else is written.
            let copy = copies(page, &populated);
            let limit = self.mem.contiguous_from(page);
            let mut n = 1usize;
            while i + n < entries.len()
                && (n as u64) < limit
                && entries[i + n] == (page + n as u64, Some(at + n * PAGE))
                && copies(page + n as u64, &populated) == copy
            {
                n += 1;
            }
            let run = &batch.data[at..at + n * PAGE];
            match uffd {
                Some(uffd) if copy => uffd.copy(self.mem.host_addr(page)?, run)?,
                _ => self.mem.write(page, run)?,
            }
            for k in 0..n as u64 {
                populated.set(page + k);
            }
            i += n;
        }
        Ok(())
    }

    /// Switch-over: every page not in `invalid` becomes valid; the invalid pages that hold
    /// stale data are punched out of file-backed memory. Returns the stale anonymous pages,
    /// which only the VMM can drop (VMM protocol `discard`).
    pub fn switch_over(&self, invalid: &PageBitmap) -> Result<PageBitmap, InstallError> {
        let pages = self.mem.total_pages();
        if self.trap.is_none() && !invalid.is_empty() {
            return Err(InstallError::InvalidWithoutTrap(invalid.count()));
        }
        if let Some(Armed::KvmUserfault { bitmap, .. }) = &self.trap {
            // Under KVM Userfault a page faults while marked, whatever memory holds: mark
            // exactly the invalid pages, and nothing needs punching or discarding.
            self.finish_preallocation()?;
            bitmap.keep_only(invalid);
            self.states.set_valid_except(invalid);
            return Ok(PageBitmap::new(pages));
        }
        // A page allocated by preallocation but not valid must be punched like a stale one.
        self.finish_preallocation()?;
        let preallocated = self.preallocated.load(std::sync::atomic::Ordering::Acquire);
        let populated = lock(&self.populated);
        let mut discard = PageBitmap::new(pages);
        let mut punch = PageBitmap::new(pages);
        self.states.set_valid_except(invalid);
        for p in invalid.iter_set() {
            if populated.test(p) || preallocated {
                match self.mem.backing_of(p) {
                    Some(BackingKind::Anon) if populated.test(p) => discard.set(p),
                    Some(BackingKind::Anon) => {}
                    _ => punch.set(p),
                }
            }
        }
        for (mut first, mut count) in punch.runs() {
            while count > 0 {
                let n = count.min(self.mem.contiguous_from(first));
                self.mem.punch(first, n)?;
                first += n;
                count -= n;
            }
        }
        Ok(discard)
    }

    /// Installs one page after switch-over if no one else has.
    pub fn install(&self, page: u64, data: Option<&[u8]>) -> Result<Installed, InstallError> {
        if !self.states.try_claim(page) {
            return Ok(Installed::No);
        }
        let result = self.place(page, data);
        match result {
            Ok(()) => {
                let waited = self.states.finish(page);
                if waited {
                    // UFFDIO_COPY/ZEROPAGE woke the vCPUs already waiting; one whose fault was
                    // being read while we installed is woken here.
                    self.wake(page)?;
                }
                Ok(Installed::Yes { waited })
            }
            Err(e) => {
                self.states.unclaim(page);
                Err(e)
            }
        }
    }

    fn place(&self, page: u64, data: Option<&[u8]>) -> Result<(), InstallError> {
        match &self.trap {
            Some(trap) => trap.install(&self.mem, page, data)?,
            // Nothing can fault without a trap: a plain write.
            None => self.mem.write(page, data.unwrap_or(&self.zeros))?,
        }
        Ok(())
    }

    /// Wakes vCPUs waiting on `page` (after it became valid without a waking install).
    pub fn wake(&self, page: u64) -> Result<(), InstallError> {
        if let Some(trap) = &self.trap {
            trap.wake(&self.mem, page)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page_batch::PageEntry;
    use crate::sys::uffd::FEATURE_MISSING_SHMEM;
    use crate::trap::kvm_userfault::UserfaultBitmap;

    const PAGES: u64 = 32;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE]
    }

    fn read(i: &Installer, p: u64) -> u8 {
        let mut buf = page(0xff);
        i.memory().read(p, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == buf[0]), "page {p} is torn");
        buf[0]
    }

    /// Pages `data` with contents, pages `zero` as markers, in one batch.
    fn precopy(i: &Installer, data: &[(u64, u8)], zero: &[u64]) {
        let mut entries: Vec<PageEntry> = data
            .iter()
            .map(|&(page, _)| PageEntry { page, zero: false })
            .collect();
        entries.extend(zero.iter().map(|&page| PageEntry { page, zero: true }));
        let bytes: Vec<u8> = data.iter().flat_map(|&(_, b)| page(b)).collect();
        i.precopy_batch(&PagesBatch {
            entries,
            data: &bytes,
        })
        .unwrap();
    }

    fn bitmap(pages: &[u64]) -> PageBitmap {
        let mut b = PageBitmap::new(PAGES);
        for &p in pages {
            b.set(p);
        }
        b
    }

    #[test]
    fn pre_copy_writes_and_rewrites_pages() {
        let i = Installer::new(GuestMemory::memfd(PAGES).unwrap(), None);
        precopy(&i, &[(1, 0x11), (2, 0x22), (3, 0x33), (9, 0x99)], &[]);
        assert_eq!((read(&i, 2), read(&i, 9)), (0x22, 0x99));
        // A later pass: page 2 is zero now, page 3 changed.
        precopy(&i, &[(3, 0x34)], &[2]);
        assert_eq!((read(&i, 2), read(&i, 3)), (0, 0x34));
        // Without a trap nothing may stay invalid at switch-over.
        let e = i.switch_over(&bitmap(&[5])).unwrap_err();
        assert!(matches!(e, InstallError::InvalidWithoutTrap(1)), "{e}");
        assert!(i.switch_over(&PageBitmap::new(PAGES)).unwrap().is_empty());
        assert!(i.states().all_valid());
    }

    /// Under KVM Userfault exactly the invalid pages stay marked; installing writes the page,
    /// clears its mark, and happens once however many channels deliver it.
    #[test]
    fn kvm_userfault_marks_the_invalid_pages_and_installs_each_once() {
        let trap = Armed::KvmUserfault {
            bitmap: UserfaultBitmap::all_marked(PAGES),
            host: None,
        };
        let i = Installer::new(GuestMemory::memfd(PAGES).unwrap(), Some(trap));
        assert_eq!(i.trap(), Some(Backend::KvmUserfault));
        precopy(&i, &[(1, 0x11), (4, 0x44)], &[]);
        let discard = i.switch_over(&bitmap(&[4, 7])).unwrap();
        assert!(discard.is_empty(), "nothing for the VMM to drop");
        let Some(Armed::KvmUserfault { bitmap: marks, .. }) = &i.trap else {
            unreachable!()
        };
        assert_eq!(marks.count_marked(), 2);
        assert!(marks.is_marked(4) && marks.is_marked(7) && !marks.is_marked(1));
        assert_eq!(i.states().valid_count(), PAGES - 2);

        assert_eq!(
            i.install(7, Some(&page(0x77))).unwrap(),
            Installed::Yes { waited: false }
        );
        assert!(!marks.is_marked(7));
        assert_eq!(read(&i, 7), 0x77);
        assert_eq!(i.install(7, Some(&page(0x78))).unwrap(), Installed::No);
        assert_eq!(
            read(&i, 7),
            0x77,
            "a second copy must not overwrite the first"
        );
        // A zero page installs as zeros over the stale pre-copied data.
        i.install(4, None).unwrap();
        assert_eq!(read(&i, 4), 0);
        assert!(i.states().all_valid() && marks.count_marked() == 0);
    }

    /// A vCPU that faulted while the page was on its way is reported as having waited.
    #[test]
    fn an_install_reports_a_waiting_fault() {
        let trap = Armed::KvmUserfault {
            bitmap: UserfaultBitmap::all_marked(PAGES),
            host: None,
        };
        let i = Installer::new(GuestMemory::memfd(PAGES).unwrap(), Some(trap));
        i.switch_over(&PageBitmap::full(PAGES)).unwrap();
        assert_eq!(i.states().fault(3), crate::postcopy::FaultOutcome::Fetch);
        assert_eq!(i.install(3, None).unwrap(), Installed::Yes { waited: true });
    }

    /// Under userfaultfd, shared memory the target holds stale copies of is punched out at
    /// switch-over so the first touch faults; preallocated pages are punched too.
    #[test]
    fn userfaultfd_switch_over_punches_stale_shared_pages() {
        let uffd = match Userfaultfd::new(FEATURE_MISSING_SHMEM) {
            Ok(u) => u,
            Err(e) => {
                // Not a KVM dependency: some sandboxes forbid userfaultfd altogether.
                eprintln!("skipping: {e}");
                return;
            }
        };
        let i = Installer::new(
            GuestMemory::memfd(PAGES).unwrap(),
            Some(Armed::Userfaultfd(uffd)),
        );
        i.start_preallocation().unwrap();
        precopy(&i, &[(1, 0x11), (2, 0x22)], &[]);
        let discard = i.switch_over(&bitmap(&[2, 20])).unwrap();
        assert!(
            discard.is_empty(),
            "memfd pages are punched here, not by the VMM"
        );
        assert_eq!((read(&i, 1), read(&i, 2)), (0x11, 0));
        assert!(i.states().is_valid(1) && !i.states().is_valid(2));
        let holes = i.memory().holes();
        assert!(
            holes.test(2) && holes.test(20) && !holes.test(1),
            "{holes:?}"
        );
    }
}
