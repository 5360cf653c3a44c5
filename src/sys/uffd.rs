//! userfaultfd: a thin safe wrapper over the syscall and its ioctls (Linux
//! `include/uapi/linux/userfaultfd.h`), written on rustix so no C toolchain or bindgen is
//! needed.
//!
//! The descriptor always traps kernel-mode faults too (never `UFFD_USER_MODE_ONLY`): KVM touches
//! guest memory from kernel mode on the vCPU's behalf, and a user-mode-only userfaultfd silently
//! lets those faults through. All resolving ioctls work from any process holding the
//! descriptor; addresses are in the address space of the process that created it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::ioctl::{Updater, ioctl, opcode};

const UFFDIO: u8 = 0xAA;
const UFFD_API: u64 = 0xAA;

/// `UFFDIO_REGISTER_MODE_*`.
pub const MODE_MISSING: u64 = 1 << 0;
pub const MODE_WP: u64 = 1 << 1;
pub const MODE_MINOR: u64 = 1 << 2;

/// `UFFD_FEATURE_*` that Faultline asks for.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;

/// Bits of the ioctl mask `UFFDIO_REGISTER` returns (bit n = ioctl number n).
pub const IOCTL_WAKE: u64 = 1 << 0x02;
pub const IOCTL_COPY: u64 = 1 << 0x03;
pub const IOCTL_ZEROPAGE: u64 = 1 << 0x04;
pub const IOCTL_CONTINUE: u64 = 1 << 0x07;

const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE` / `_MINOR`.
pub const FAULT_WRITE: u64 = 1 << 0;
pub const FAULT_MINOR: u64 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// Shared layout of `uffdio_zeropage` and `uffdio_continue`.
#[repr(C)]
#[derive(Default)]
struct UffdioRangeOp {
    range: UffdioRange,
    mode: u64,
    result: i64,
}

const OP_API: u32 = opcode::read_write::<UffdioApi>(UFFDIO, 0x3F);
const OP_REGISTER: u32 = opcode::read_write::<UffdioRegister>(UFFDIO, 0x00);
const OP_UNREGISTER: u32 = opcode::read::<UffdioRange>(UFFDIO, 0x01);
const OP_WAKE: u32 = opcode::read::<UffdioRange>(UFFDIO, 0x02);
const OP_COPY: u32 = opcode::read_write::<UffdioCopy>(UFFDIO, 0x03);
const OP_ZEROPAGE: u32 = opcode::read_write::<UffdioRangeOp>(UFFDIO, 0x04);
const OP_CONTINUE: u32 = opcode::read_write::<UffdioRangeOp>(UFFDIO, 0x07);
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd.
const OP_DEV_NEW: u32 = opcode::none(UFFDIO, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd (syscall: {syscall}; /dev/userfaultfd: {device})")]
    Create { syscall: Errno, device: String },
    #[error("UFFDIO_API refused features {features:#x}: {errno}")]
    Api { features: u64, errno: Errno },
    #[error("the kernel lacks userfaultfd features {missing:#x} (it offers {offered:#x})")]
    MissingFeatures { missing: u64, offered: u64 },
    #[error("UFFDIO_REGISTER of {len:#x} bytes at {start:#x} (mode {mode:#x}) failed: {errno}")]
    Register {
        start: u64,
        len: u64,
        mode: u64,
        errno: Errno,
    },
    #[error("{op} of {len:#x} bytes at {start:#x} failed: {errno}")]
    Op {
        op: &'static str,
        start: u64,
        len: u64,
        errno: Errno,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(Errno),
}

impl UffdError {
    /// The errno of a failed resolving operation, e.g. EEXIST when the page is already there.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Op { errno, .. } | Self::Register { errno, .. } | Self::Api { errno, .. } => {
                Some(*errno)
            }
            Self::Read(e) => Some(*e),
            _ => None,
        }
    }
}

/// An event read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `address` (page aligned unless EXACT_ADDRESS was asked for).
    PageFault {
        address: u64,
        flags: u64,
        thread: u32,
    },
    /// Another event type (fork, remap, remove, unmap), which Faultline does not register for.
    Other(u8),
}

/// An owned userfaultfd descriptor.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<OwnedFd> for Userfaultfd {
    /// Adopts a descriptor received from another process (already through `UFFDIO_API`).
    fn from(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl Userfaultfd {
    /// Creates a non-blocking, close-on-exec userfaultfd that also traps kernel-mode faults,
    /// and negotiates `features` with `UFFDIO_API`. Tries the syscall first, then
    /// `/dev/userfaultfd` (which grants kernel-mode faults to whoever may open it).
    pub fn new(features: u64) -> Result<Self, UffdError> {
        let flags = rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK;
        // SAFETY: creating a userfaultfd has no memory-safety preconditions; the result is a
        // new descriptor we own.
        let fd = match unsafe { rustix::mm::userfaultfd(flags) } {
            Ok(fd) => fd,
            Err(syscall) => Self::from_device(flags.bits())
                .map_err(|device| UffdError::Create { syscall, device })?,
        };
        let uffd = Self { fd };
        uffd.api(features)?;
        Ok(uffd)
    }

    fn from_device(flags: u32) -> Result<OwnedFd, String> {
        let dev = rustix::fs::open(
            "/dev/userfaultfd",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| e.to_string())?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as an integer and
        // returns a new descriptor or -1; `dev` is an open /dev/userfaultfd.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), OP_DEV_NEW as _, flags as libc::c_ulong) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: the kernel just created this descriptor for us; nothing else owns it.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }

    fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: OP_API takes a `struct uffdio_api`, which UffdioApi mirrors.
        unsafe { ioctl(&self.fd, Updater::<OP_API, _>::new(&mut api)) }
            .map_err(|errno| UffdError::Api { features, errno })?;
        if api.features & features != features {
            return Err(UffdError::MissingFeatures {
                missing: features & !api.features,
                offered: api.features,
            });
        }
        Ok(api.features)
    }

    /// Registers `[start, start + len)` of the creating process with `mode`; returns the
    /// mask of resolving ioctls the kernel allows on it (`IOCTL_*`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: OP_REGISTER takes a `struct uffdio_register`, mirrored by UffdioRegister.
        unsafe { ioctl(&self.fd, Updater::<OP_REGISTER, _>::new(&mut reg)) }.map_err(|errno| {
            UffdError::Register {
                start,
                len,
                mode,
                errno,
            }
        })?;
        Ok(reg.ioctls)
    }

    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: OP_UNREGISTER takes a `struct uffdio_range`.
        unsafe { ioctl(&self.fd, Updater::<OP_UNREGISTER, _>::new(&mut range)) }
            .map_err(|errno| op_err("UFFDIO_UNREGISTER", start, len, errno))
    }

    /// Wakes threads waiting on faults in the range (after the page appeared another way).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: OP_WAKE takes a `struct uffdio_range`.
        unsafe { ioctl(&self.fd, Updater::<OP_WAKE, _>::new(&mut range)) }
            .map_err(|errno| op_err("UFFDIO_WAKE", start, len, errno))
    }

    /// Atomically fills missing pages at `dst` (creator's address space) with `src` (this
    /// process's memory) and wakes their waiters. `src.len()` must be page-aligned.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<(), UffdError> {
        let len = src.len() as u64;
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: OP_COPY takes a `struct uffdio_copy`; the kernel only reads `len` bytes of
        // `src`, which is a live slice of exactly that length.
        unsafe { ioctl(&self.fd, Updater::<OP_COPY, _>::new(&mut c)) }
            .map_err(|errno| op_err("UFFDIO_COPY", dst, len, errno))
    }

    /// Maps the zero page at missing pages `[start, start + len)` and wakes their waiters.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut z = UffdioRangeOp {
            range: UffdioRange { start, len },
            ..Default::default()
        };
        // SAFETY: OP_ZEROPAGE takes a `struct uffdio_zeropage`, mirrored by UffdioRangeOp.
        unsafe { ioctl(&self.fd, Updater::<OP_ZEROPAGE, _>::new(&mut z)) }
            .map_err(|errno| op_err("UFFDIO_ZEROPAGE", start, len, errno))
    }

    /// Maps the page-cache pages already present behind `[start, start + len)` (minor faults)
    /// and wakes their waiters.
    pub fn continue_range(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut c = UffdioRangeOp {
            range: UffdioRange { start, len },
            ..Default::default()
        };
        // SAFETY: OP_CONTINUE takes a `struct uffdio_continue`, mirrored by UffdioRangeOp.
        unsafe { ioctl(&self.fd, Updater::<OP_CONTINUE, _>::new(&mut c)) }
            .map_err(|errno| op_err("UFFDIO_CONTINUE", start, len, errno))
    }

    /// Reads the pending events without blocking (an empty vector when there are none).
    pub fn read_events(&self, max: usize) -> Result<Vec<Event>, UffdError> {
        let mut buf = vec![0u8; 32 * max.max(1)];
        let n = match rustix::io::read(&self.fd, &mut buf) {
            Ok(n) => n,
            Err(Errno::AGAIN) => return Ok(Vec::new()),
            Err(Errno::INTR) => return Ok(Vec::new()),
            Err(e) => return Err(UffdError::Read(e)),
        };
        Ok(buf[..n - n % 32].chunks_exact(32).map(parse_msg).collect())
    }
}

fn op_err(op: &'static str, start: u64, len: u64, errno: Errno) -> UffdError {
    UffdError::Op {
        op,
        start,
        len,
        errno,
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// Decodes one `struct uffd_msg` (32 bytes).
fn parse_msg(b: &[u8]) -> Event {
    if b[0] == EVENT_PAGEFAULT {
        Event::PageFault {
            flags: le64(&b[8..16]),
            address: le64(&b[16..24]),
            thread: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
        }
    } else {
        Event::Other(b[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::MmapRegion;
    use std::sync::Arc;

    /// Waits for the next event on `uffd`.
    fn next_event(uffd: &Userfaultfd) -> Event {
        loop {
            let mut pfd = [rustix::event::PollFd::new(
                uffd,
                rustix::event::PollFlags::IN,
            )];
            rustix::event::poll(&mut pfd, None).unwrap();
            if let Some(e) = uffd.read_events(4).unwrap().into_iter().next() {
                return e;
            }
        }
    }

    fn uffd_or_skip(features: u64) -> Option<Userfaultfd> {
        match Userfaultfd::new(features) {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    #[test]
    fn parse_pagefault() {
        let mut msg = [0u8; 32];
        msg[0] = EVENT_PAGEFAULT;
        msg[8] = 1;
        msg[16..24].copy_from_slice(&0x7f00_1000u64.to_le_bytes());
        msg[24] = 42;
        assert_eq!(
            parse_msg(&msg),
            Event::PageFault {
                address: 0x7f00_1000,
                flags: 1,
                thread: 42
            }
        );
        msg[0] = 0x13;
        assert_eq!(parse_msg(&msg), Event::Other(0x13));
    }

    /// A missing anonymous page: the toucher blocks until UFFDIO_COPY fills it.
    #[test]
    fn missing_anon_resolved_by_copy() {
        let Some(uffd) = uffd_or_skip(FEATURE_THREAD_ID) else {
            return;
        };
        let mem = Arc::new(MmapRegion::anonymous(4 * 4096).unwrap());
        let base = mem.as_ptr() as u64;
        let ioctls = uffd.register(base, 4 * 4096, MODE_MISSING).unwrap();
        assert_ne!(ioctls & IOCTL_COPY, 0);
        let m = mem.clone();
        let toucher = std::thread::spawn(move || m.read_u64(4096 + 8).unwrap());
        let fault = next_event(&uffd);
        let Event::PageFault { address, flags, .. } = fault else {
            panic!("unexpected {fault:?}")
        };
        assert_eq!(address, base + 4096);
        assert_eq!(flags & FAULT_WRITE, 0);
        let mut page = vec![0u8; 4096];
        page[8..16].copy_from_slice(&77u64.to_le_bytes());
        uffd.copy(address, &page).unwrap();
        assert_eq!(toucher.join().unwrap(), 77);
        // Installing twice is refused with EEXIST, which callers treat as "already there".
        let again = uffd.copy(address, &page).unwrap_err();
        assert_eq!(again.errno(), Some(Errno::EXIST));
        uffd.zeropage(base, 4096).unwrap();
        assert_eq!(mem.read_u64(0).unwrap(), 0);
        uffd.unregister(base, 4 * 4096).unwrap();
    }

    /// A minor fault on a memfd page that exists in the page cache: write it through a second
    /// mapping, then UFFDIO_CONTINUE maps it.
    #[test]
    fn minor_memfd_resolved_by_continue() {
        let Some(uffd) = uffd_or_skip(FEATURE_MINOR_SHMEM) else {
            return;
        };
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 2 * 4096).unwrap();
        rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), 0, 2 * 4096).unwrap();
        let guest = Arc::new(MmapRegion::shared(fd.as_fd(), 0, 2 * 4096).unwrap());
        let installer = MmapRegion::shared(fd.as_fd(), 0, 2 * 4096).unwrap();
        let base = guest.as_ptr() as u64;
        let ioctls = uffd.register(base, 2 * 4096, MODE_MINOR).unwrap();
        assert_ne!(ioctls & IOCTL_CONTINUE, 0);
        let g = guest.clone();
        let toucher = std::thread::spawn(move || g.read_u64(4096).unwrap());
        let fault = next_event(&uffd);
        let Event::PageFault { address, flags, .. } = fault else {
            panic!("unexpected {fault:?}")
        };
        assert_eq!(address, base + 4096);
        assert_ne!(flags & FAULT_MINOR, 0);
        installer.write(4096, &99u64.to_le_bytes()).unwrap();
        uffd.continue_range(address, 4096).unwrap();
        assert_eq!(toucher.join().unwrap(), 99);
    }
}
