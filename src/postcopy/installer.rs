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
//! Missing mode is used for shared memory too, not minor mode: on our development machines
//! every page-table update is expensive (UFFDIO_CONTINUE measured at ~10 µs per page), and
//! minor mode would have to map every pre-copied page into the VMM before it resumes (2.7 s for
//! 1 GiB). With missing mode, valid pages simply sit in the file and the VMM maps them as it
//! touches them, as any VMM does.

use std::sync::Mutex;

use crate::bitmap::PageBitmap;
use crate::guest_memory::{GuestMemory, GuestMemoryError};
use crate::layout::{BackingKind, PAGE_SIZE};
use crate::sys::uffd::{UffdError, Userfaultfd};
use crate::wire::PagesBatch;

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

/// How the target traps first accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// No trap: pre-copy only; every page must be valid before the VM resumes.
    None,
    /// userfaultfd in missing mode on the VMM's mapping.
    UserfaultfdMissing,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Memory(#[from] GuestMemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("{0} pages are not valid at switch-over and there is no trap to fetch them")]
    InvalidWithoutTrap(u64),
}

pub struct Installer {
    mem: GuestMemory,
    uffd: Option<Userfaultfd>,
    states: PageStates,
    /// Pages holding pre-copied data in the target (written into the file, or created in the
    /// VMM's anonymous memory).
    populated: Mutex<PageBitmap>,
    zeros: Vec<u8>,
}

impl Installer {
    pub fn new(mem: GuestMemory, uffd: Option<Userfaultfd>) -> Self {
        let pages = mem.total_pages();
        Self {
            mem,
            uffd,
            states: PageStates::new(pages),
            populated: Mutex::new(PageBitmap::new(pages)),
            zeros: vec![0u8; 256 * PAGE],
        }
    }

    pub fn trap(&self) -> TrapKind {
        if self.uffd.is_some() {
            TrapKind::UserfaultfdMissing
        } else {
            TrapKind::None
        }
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn states(&self) -> &PageStates {
        &self.states
    }

    pub fn uffd(&self) -> Option<&Userfaultfd> {
        self.uffd.as_ref()
    }

    fn populated(&self) -> std::sync::MutexGuard<'_, PageBitmap> {
        self.populated.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes a pre-copy batch (before switch-over; one thread).
    pub fn precopy_batch(&self, batch: &PagesBatch<'_>) -> Result<(), InstallError> {
        let mut populated = self.populated();
        for (page, data) in batch.pages() {
            let anon = self.mem.backing_of(page) == Some(BackingKind::Anon);
            let was = populated.test(page);
            match data {
                Some(bytes) => {
                    if anon
                        && !was
                        && let Some(uffd) = &self.uffd
                    {
                        uffd.copy(self.mem.host_addr(page)?, bytes)?;
                    } else {
                        self.mem.write(page, bytes)?;
                    }
                    populated.set(page);
                }
                None if was => {
                    // Was data, is zero now.
                    self.mem.write(page, &self.zeros[..PAGE])?;
                }
                None => {
                    // Zero and never written: the target's fresh memory already reads as zero.
                    if anon && let Some(uffd) = &self.uffd {
                        uffd.zeropage(self.mem.host_addr(page)?, PAGE_SIZE)?;
                        populated.set(page);
                    }
                }
            }
        }
        Ok(())
    }

    /// Switch-over: every page not in `invalid` becomes valid; the invalid pages that hold
    /// stale data are punched out of file-backed memory. Returns the stale anonymous pages,
    /// which only the VMM can drop (VMM protocol `discard`).
    pub fn switch_over(&self, invalid: &PageBitmap) -> Result<PageBitmap, InstallError> {
        let pages = self.mem.total_pages();
        if self.uffd.is_none() && !invalid.is_empty() {
            return Err(InstallError::InvalidWithoutTrap(invalid.count()));
        }
        let populated = self.populated();
        let mut discard = PageBitmap::new(pages);
        let mut punch = PageBitmap::new(pages);
        for p in 0..pages {
            if !invalid.test(p) {
                self.states.set_valid(p);
            } else if populated.test(p) {
                match self.mem.backing_of(p) {
                    Some(BackingKind::Anon) => discard.set(p),
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
        let Some(uffd) = &self.uffd else {
            match data {
                Some(bytes) => self.mem.write(page, bytes)?,
                None => self.mem.write(page, &self.zeros[..PAGE])?,
            }
            return Ok(());
        };
        let addr = self.mem.host_addr(page)?;
        let done = match data {
            Some(bytes) => uffd.copy(addr, bytes),
            None => uffd.zeropage(addr, PAGE_SIZE),
        };
        match done {
            Ok(()) => Ok(()),
            // Already present (the VMM or kernel created it): it is valid as far as the guest
            // can tell only if nothing stale was left, which switch-over guarantees.
            Err(e) if e.errno() == Some(rustix::io::Errno::EXIST) => {
                tracing::debug!(page, "page already present at install");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Wakes vCPUs waiting on `page` (after it became valid without a waking install).
    pub fn wake(&self, page: u64) -> Result<(), InstallError> {
        if let Some(uffd) = &self.uffd {
            uffd.wake(self.mem.host_addr(page)?, PAGE_SIZE)?;
        }
        Ok(())
    }

    /// Drops the userfaultfd (after the VMM disarmed it).
    pub fn release_trap(&mut self) {
        self.uffd = None;
    }
}
