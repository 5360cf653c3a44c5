//! The userfaultfd backend as the target uses it once the VMM registered its RAM (VMM protocol
//! `userfaultfd_register`, missing mode): faults arrive as events with the VMM's host
//! addresses; a page is installed with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, which map it and wake
//! every thread waiting on it in one step.
//!
//! The system call and its ioctls are in `crate::sys::uffd`; this module only knows how a
//! migration uses them.

use crate::guest_memory::GuestMemory;
use crate::layout::PAGE_SIZE;
use crate::sys::uffd::{Event, Userfaultfd};

use super::TrapError;

/// Most events read per call: one `read` of this many 32-byte messages.
pub const EVENTS_PER_READ: usize = 64;

/// Installs `page` (zeros when `data` is `None`) through the VMM's mapping, waking its
/// waiters.
pub fn install(
    uffd: &Userfaultfd,
    mem: &GuestMemory,
    page: u64,
    data: Option<&[u8]>,
) -> Result<(), TrapError> {
    let addr = mem.host_addr(page)?;
    let done = match data {
        Some(bytes) => uffd.copy(addr, bytes),
        None => uffd.zeropage(addr, PAGE_SIZE),
    };
    match done {
        Ok(()) => Ok(()),
        // Already present (the VMM or kernel created it): it is valid as far as the guest can
        // tell only if nothing stale was left, which switch-over guarantees.
        Err(e) if e.errno() == Some(rustix::io::Errno::EXIST) => {
            tracing::debug!(page, "page already present at install");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Maps valid `page` into the registering process with `UFFDIO_CONTINUE` (minor mode), which
/// also wakes whoever waits on it. Already mapped (`EEXIST`) is fine: someone mapped it first.
pub fn map_valid(uffd: &Userfaultfd, mem: &GuestMemory, page: u64) -> Result<(), TrapError> {
    match uffd.continue_range(mem.host_addr(page)?, PAGE_SIZE) {
        Err(e) if e.errno() == Some(rustix::io::Errno::EXIST) => Ok(()),
        other => Ok(other?),
    }
}

/// Wakes the threads waiting on `page`.
pub fn wake(uffd: &Userfaultfd, mem: &GuestMemory, page: u64) -> Result<(), TrapError> {
    uffd.wake(mem.host_addr(page)?, PAGE_SIZE)?;
    Ok(())
}

/// Reads the pending fault events (without blocking) and appends the global page numbers they
/// name to `pages`. Faults outside guest RAM are logged and dropped.
pub fn read_faults(
    uffd: &Userfaultfd,
    mem: &GuestMemory,
    pages: &mut Vec<u64>,
) -> Result<(), TrapError> {
    for event in uffd.read_events(EVENTS_PER_READ)? {
        let Event::PageFault { address, .. } = event else {
            continue;
        };
        match mem.page_of_host_addr(address) {
            Some(page) => pages.push(page),
            None => tracing::warn!(
                address = format_args!("{address:#x}"),
                "fault outside guest RAM"
            ),
        }
    }
    Ok(())
}
