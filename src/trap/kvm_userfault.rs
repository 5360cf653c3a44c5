//! The KVM Userfault UAPI (the posted "KVM: Introduce KVM Userfault" v3 series, carried by
//! Faultline's own kernel patch in `kernel/`), and the few guest_memfd constants kvm-bindings
//! 0.14 lacks. Owns the numbers, the userfault bitmap as KVM reads it, and building the
//! memslot descriptor that carries the bitmap, and installing a page the way this backend
//! needs (write, clear, wake). It does not issue ioctls (the VMM does, since KVM only takes
//! them from the process that created the VM) and it does not decide when to arm or disarm
//! (the sidecar's target engine does).
//!
//! The feature is out of tree, so nothing here may be trusted without a probe: detect it by
//! setting [`KVM_MEM_USERFAULT`] on a memslot (see `crate::probe`), never by a capability
//! number or kernel version.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::PAGE_SIZE;

/// Memslot flag: vCPU faults on pages marked in the memslot's userfault bitmap exit to
/// userspace (bit 3, after LOG_DIRTY_PAGES 1, READONLY 2, GUEST_MEMFD 4).
pub const KVM_MEM_USERFAULT: u32 = 1 << 3;
/// `KVM_MEM_GUEST_MEMFD`: the memslot's memory is a guest_memfd range.
pub const KVM_MEM_GUEST_MEMFD: u32 = 1 << 2;
/// `KVM_MEM_LOG_DIRTY_PAGES`.
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1 << 0;

/// `KVM_EXIT_MEMORY_FAULT`: the exit reason of a userfault exit (KVM_RUN returns -1/EFAULT).
pub const KVM_EXIT_MEMORY_FAULT: u32 = 39;
/// `memory_fault.flags` bit of an exit caused by a marked page.
pub const KVM_MEMORY_EXIT_FLAG_USERFAULT: u64 = 1 << 4;
/// `memory_fault.flags` bit of a fault on private (guest_memfd, CoCo) memory.
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;

/// Offset of `userfault_bitmap` in `struct kvm_userspace_memory_region2` (the first of the
/// fourteen reserved u64s that follow `pad1`).
pub const USERFAULT_BITMAP_OFFSET: usize = 48;

/// `KVM_CAP_USERFAULT` as Faultline's kernel patch numbers it: out of mainline's dense range
/// (mainline had reached 251 at 7.3, having reused every number the posted series tried: 236,
/// 239, 240, 243; a vendor carry uses 245). Informational only.
pub const KVM_CAP_USERFAULT_FAULTLINE: u32 = 1243;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18): the guest_memfd creation flags supported.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
/// `GUEST_MEMFD_FLAG_MMAP`: the guest_memfd can be mmap()ed.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
/// `GUEST_MEMFD_FLAG_INIT_SHARED`: its pages start shared, so userspace can fault them in.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// True if a `KVM_EXIT_MEMORY_FAULT`'s flags say a marked page caused it.
pub fn is_userfault_exit(flags: u64) -> bool {
    flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0
}

/// A userfault bitmap: bit `n` covers the memslot's page `n` (4 KiB pages), stored in u64
/// words as KVM reads it. KVM only reads it; userspace marks pages before the vCPUs may touch
/// them and clears each bit with release ordering once the page's contents are in place.
///
/// The words are atomics so that a fault handler can clear bits while vCPU threads run and
/// KVM reads the words concurrently. A bitmap is either private to one process, or **shared**:
/// kept in a memfd that the VMM (whose vCPUs KVM checks against it) and the sidecar (which
/// installs pages and clears their bits) both map. A vCPU waiting for a page of a shared bitmap
/// sleeps on the bitmap word itself (a futex on the half-word holding the page's bit, which
/// works across processes on shared memory); the installer wakes that half-word after clearing
/// the bit, so an install wakes only the vCPUs waiting on one of its 32 pages. A sleeper count
/// in the header spares the installer the system call when nobody sleeps.
#[derive(Debug)]
pub struct UserfaultBitmap {
    words: Words,
    count: usize,
    pages: u64,
}

#[derive(Debug)]
enum Words {
    Owned(Box<[AtomicU64]>),
    Shared {
        map: crate::sys::MmapRegion,
        fd: std::os::fd::OwnedFd,
    },
}

/// Layout of a shared bitmap's memfd: a 64-byte header (u32 at 0 reserved, u32 count of
/// sleeping vCPUs at 4), then the bitmap words.
pub const SHARED_HEADER: usize = 64;
const SLEEPERS: usize = 4;

/// A shared bitmap that does not fit its memfd.
#[derive(Debug, thiserror::Error)]
pub enum SharedBitmapError {
    #[error("cannot create the userfault bitmap memfd: {0}")]
    Create(#[source] std::io::Error),
    #[error("the userfault bitmap memfd holds {have} bytes; {pages} pages need {need}")]
    TooSmall { have: u64, need: u64, pages: u64 },
    #[error(transparent)]
    Map(#[from] crate::sys::MmapError),
}

impl UserfaultBitmap {
    /// A bitmap for `pages` pages with no page marked.
    pub fn new(pages: u64) -> Self {
        let count = (pages.div_ceil(64) as usize).max(1);
        Self {
            words: Words::Owned((0..count).map(|_| AtomicU64::new(0)).collect()),
            count,
            pages,
        }
    }

    /// A bitmap for `pages` pages with every page marked (a post-copy target before any page
    /// arrived).
    pub fn all_marked(pages: u64) -> Self {
        let b = Self::new(pages);
        b.mark_all();
        b
    }

    /// Bytes a shared bitmap's memfd holds for `pages` pages.
    pub fn shared_len(pages: u64) -> u64 {
        (SHARED_HEADER as u64 + pages.div_ceil(64).max(1) * 8).next_multiple_of(PAGE_SIZE)
    }

    /// A new shared bitmap in a memfd, every page marked.
    pub fn create_shared(pages: u64) -> Result<Self, SharedBitmapError> {
        use std::os::fd::AsFd;
        let fd = rustix::fs::memfd_create(
            "faultline-userfault-bitmap",
            rustix::fs::MemfdFlags::CLOEXEC,
        )
        .map_err(|e| SharedBitmapError::Create(e.into()))?;
        let len = Self::shared_len(pages);
        rustix::fs::ftruncate(&fd, len).map_err(|e| SharedBitmapError::Create(e.into()))?;
        let map = crate::sys::MmapRegion::shared(fd.as_fd(), 0, len as usize)?;
        let b = Self::from_shared(map, fd, pages);
        b.mark_all();
        Ok(b)
    }

    /// Maps a shared bitmap another process created (its memfd came over SCM_RIGHTS).
    pub fn open_shared(fd: std::os::fd::OwnedFd, pages: u64) -> Result<Self, SharedBitmapError> {
        use std::os::fd::AsFd;
        let need = Self::shared_len(pages);
        let have = rustix::fs::fstat(&fd)
            .map_err(|e| SharedBitmapError::Create(e.into()))?
            .st_size as u64;
        if have < need {
            return Err(SharedBitmapError::TooSmall { have, need, pages });
        }
        let map = crate::sys::MmapRegion::shared(fd.as_fd(), 0, need as usize)?;
        Ok(Self::from_shared(map, fd, pages))
    }

    fn from_shared(map: crate::sys::MmapRegion, fd: std::os::fd::OwnedFd, pages: u64) -> Self {
        Self {
            words: Words::Shared { map, fd },
            count: (pages.div_ceil(64) as usize).max(1),
            pages,
        }
    }

    /// The memfd of a shared bitmap, to hand to the other process.
    pub fn shared_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match &self.words {
            Words::Shared { fd, .. } => Some(fd.as_fd()),
            Words::Owned(_) => None,
        }
    }

    fn words(&self) -> &[AtomicU64] {
        match &self.words {
            Words::Owned(w) => w,
            // SAFETY: the mapping holds SHARED_HEADER + count * 8 bytes (checked when it was
            // created or opened), is page aligned so the words are 8-byte aligned, lives as
            // long as `self`, and is only ever accessed through atomics — by us, the other
            // process and KVM (which only reads it).
            Words::Shared { map, .. } => unsafe {
                std::slice::from_raw_parts(
                    map.as_ptr().add(SHARED_HEADER).cast::<AtomicU64>(),
                    self.count,
                )
            },
        }
    }

    fn header_word(&self, offset: usize) -> Option<&std::sync::atomic::AtomicU32> {
        match &self.words {
            Words::Owned(_) => None,
            // SAFETY: the header's first 8 bytes are two u32 words used only through atomics;
            // the mapping is page aligned and outlives the reference.
            Words::Shared { map, .. } => Some(unsafe {
                &*map
                    .as_ptr()
                    .add(offset)
                    .cast::<std::sync::atomic::AtomicU32>()
            }),
        }
    }

    /// Marks every page.
    pub fn mark_all(&self) {
        let words = self.words();
        for (i, w) in words.iter().enumerate() {
            let bits = if (i as u64 + 1) * 64 <= self.pages {
                u64::MAX
            } else {
                (1u64 << (self.pages % 64)) - 1
            };
            w.store(bits, Ordering::SeqCst);
        }
    }

    /// Leaves marked exactly the pages set in `still_missing` (a bitmap of the same size in
    /// [`crate::bitmap::PageBitmap`] layout), word by word.
    pub fn keep_only(&self, still_missing: &crate::bitmap::PageBitmap) {
        for (w, &bits) in self.words().iter().zip(still_missing.words()) {
            w.store(bits, Ordering::Release);
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn locate(&self, page: u64) -> (usize, u64) {
        assert!(
            page < self.pages,
            "page {page} outside a {}-page userfault bitmap",
            self.pages
        );
        ((page / 64) as usize, 1u64 << (page % 64))
    }

    /// Marks `page`: the next vCPU fault on it exits to userspace.
    pub fn mark(&self, page: u64) {
        let (w, bit) = self.locate(page);
        self.words()[w].fetch_or(bit, Ordering::SeqCst);
    }

    /// Clears `page`'s mark with release ordering (after its contents were written); returns
    /// whether it was marked.
    pub fn clear(&self, page: u64) -> bool {
        let (w, bit) = self.locate(page);
        self.words()[w].fetch_and(!bit, Ordering::Release) & bit != 0
    }

    pub fn is_marked(&self, page: u64) -> bool {
        let (w, bit) = self.locate(page);
        self.words()[w].load(Ordering::Acquire) & bit != 0
    }

    /// How many pages are marked.
    pub fn count_marked(&self) -> u64 {
        self.words()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The marked pages now, as a page bitmap (a snapshot: bits may clear meanwhile).
    pub fn marked(&self) -> crate::bitmap::PageBitmap {
        let mut marked = crate::bitmap::PageBitmap::new(self.pages);
        for (w, word) in self.words().iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                if page < self.pages {
                    marked.set(page);
                }
                bits &= bits - 1;
            }
        }
        marked
    }

    /// The page of `gpa` in a memslot starting at `slot_gpa`, if the memslot covers it.
    pub fn page_of(&self, slot_gpa: u64, gpa: u64) -> Option<u64> {
        let page = gpa.checked_sub(slot_gpa)? / PAGE_SIZE;
        (page < self.pages).then_some(page)
    }

    /// The address to put in `kvm_userspace_memory_region2.userfault_bitmap`. Valid while
    /// `self` lives: drop the memslot (or clear its flag) before the bitmap.
    pub fn user_addr(&self) -> u64 {
        self.words().as_ptr() as u64
    }

    /// Shared bitmaps: sleeps until `page` is cleared, or `timeout` passes, or a signal
    /// arrives (true when cleared). The vCPU sleeps on the 32-bit half of the bitmap word that
    /// holds the page's bit, expecting the value it just read, so only clears in those 32 pages
    /// wake it, and a clear between the check and the sleep makes the sleep return at once.
    pub fn wait_cleared(&self, page: u64, timeout: std::time::Duration) -> bool {
        use crate::sys::futex;
        let Some(sleepers) = self.header_word(SLEEPERS) else {
            return !self.is_marked(page);
        };
        let (w, bit) = self.locate(page);
        let word = &self.words()[w];
        let half = futex::Half::of_bit((page % 64) as u32);
        // Announce the sleep before the last look at the word: a clear that comes later sees
        // the sleeper and wakes the word (the installer clears, then reads the count).
        sleepers.fetch_add(1, Ordering::SeqCst);
        let seen = word.load(Ordering::SeqCst);
        if seen & bit != 0 {
            // Errors (none expected on our own mapping) end in the caller's re-check.
            let _ = futex::wait(word, half, half.value(seen), timeout);
        }
        sleepers.fetch_sub(1, Ordering::SeqCst);
        !self.is_marked(page)
    }

    /// Shared bitmaps: wakes the vCPUs sleeping in [`UserfaultBitmap::wait_cleared`] on
    /// `page`'s half-word, after its bit was cleared. Costs a system call only when some vCPU
    /// sleeps; vCPUs waiting on other pages' words stay asleep.
    pub fn wake_page(&self, page: u64) {
        let Some(sleepers) = self.header_word(SLEEPERS) else {
            return;
        };
        // Orders the caller's clear before the read of the count (the waiter's side: count
        // first, then the word).
        std::sync::atomic::fence(Ordering::SeqCst);
        if sleepers.load(Ordering::SeqCst) > 0 {
            let (w, _) = self.locate(page);
            let half = crate::sys::futex::Half::of_bit((page % 64) as u32);
            let _ = crate::sys::futex::wake_all(&self.words()[w], half);
        }
    }

    /// Shared bitmaps: how many vCPUs sleep in [`UserfaultBitmap::wait_cleared`] right now.
    pub fn sleepers(&self) -> u32 {
        self.header_word(SLEEPERS)
            .map_or(0, |s| s.load(Ordering::SeqCst))
    }

    /// Shared bitmaps: wakes every sleeping vCPU, whatever page it waits for (when the trap
    /// is taken down and waiters must re-enter KVM_RUN). One wake per half-word that still
    /// has a page marked, since only those can have sleepers.
    pub fn wake_all(&self) {
        let Some(sleepers) = self.header_word(SLEEPERS) else {
            return;
        };
        std::sync::atomic::fence(Ordering::SeqCst);
        if sleepers.load(Ordering::SeqCst) == 0 {
            return;
        }
        use crate::sys::futex::{Half, wake_all};
        for w in self.words() {
            let bits = w.load(Ordering::SeqCst);
            for half in [Half::Low, Half::High] {
                if half.value(bits) != 0 {
                    let _ = wake_all(w, half);
                }
            }
        }
    }
}

/// Installs `page` (zeros when `data` is `None`): its contents first, then its mark off with
/// release ordering, then a wake for the vCPUs sleeping on the shared bitmap. A vCPU that sees
/// the bit clear therefore sees the contents.
pub fn install(
    bitmap: &UserfaultBitmap,
    mem: &crate::guest_memory::GuestMemory,
    page: u64,
    data: Option<&[u8]>,
) -> Result<(), super::TrapError> {
    const ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
    mem.write(page, data.unwrap_or(&ZEROS))?;
    bitmap.clear(page);
    bitmap.wake_page(page);
    Ok(())
}

#[cfg(feature = "kvm")]
pub use memslot::Memslot;

#[cfg(feature = "kvm")]
mod memslot {
    use super::*;
    use kvm_bindings::kvm_userspace_memory_region2;

    // The bitmap pointer lives in the first reserved word; if kvm-bindings ever names the field,
    // this fails to compile rather than silently writing the wrong word.
    const _: () = assert!(
        std::mem::offset_of!(kvm_userspace_memory_region2, pad2) == USERFAULT_BITMAP_OFFSET
    );
    const _: () = assert!(std::mem::size_of::<kvm_userspace_memory_region2>() == 160);

    /// One memslot as `KVM_SET_USER_MEMORY_REGION2` takes it, with the KVM Userfault bitmap.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Memslot {
        pub slot: u32,
        pub guest_phys_addr: u64,
        pub memory_size: u64,
        /// Where the VMM maps the memory (for guest_memfd, any valid user address).
        pub userspace_addr: u64,
        /// `(guest_memfd fd, offset)` for a guest_memfd memslot.
        pub guest_memfd: Option<(u32, u64)>,
        pub log_dirty_pages: bool,
        /// `Some(UserfaultBitmap::user_addr())` arms KVM Userfault on the memslot.
        pub userfault_bitmap: Option<u64>,
    }

    impl Memslot {
        pub fn flags(&self) -> u32 {
            let mut flags = 0;
            if self.guest_memfd.is_some() {
                flags |= KVM_MEM_GUEST_MEMFD;
            }
            if self.log_dirty_pages {
                flags |= KVM_MEM_LOG_DIRTY_PAGES;
            }
            if self.userfault_bitmap.is_some() {
                flags |= KVM_MEM_USERFAULT;
            }
            flags
        }

        /// The descriptor, with the bitmap pointer at offset 48 when armed.
        pub fn region2(&self) -> kvm_userspace_memory_region2 {
            let (guest_memfd, guest_memfd_offset) = self.guest_memfd.unwrap_or((0, 0));
            let mut pad2 = [0u64; 14];
            pad2[0] = self.userfault_bitmap.unwrap_or(0);
            kvm_userspace_memory_region2 {
                slot: self.slot,
                flags: self.flags(),
                guest_phys_addr: self.guest_phys_addr,
                memory_size: self.memory_size,
                userspace_addr: self.userspace_addr,
                guest_memfd_offset,
                guest_memfd,
                pad1: 0,
                pad2,
            }
        }
    }

    /// Names the flags of a memslot the way the kernel headers do, e.g.
    /// `KVM_MEM_GUEST_MEMFD|KVM_MEM_USERFAULT`.
    pub fn flag_names(flags: u32) -> String {
        let names: Vec<&str> = [
            (KVM_MEM_LOG_DIRTY_PAGES, "KVM_MEM_LOG_DIRTY_PAGES"),
            (1 << 1, "KVM_MEM_READONLY"),
            (KVM_MEM_GUEST_MEMFD, "KVM_MEM_GUEST_MEMFD"),
            (KVM_MEM_USERFAULT, "KVM_MEM_USERFAULT"),
        ]
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect();
        if names.is_empty() {
            "0".into()
        } else {
            names.join("|")
        }
    }
}

#[cfg(feature = "kvm")]
pub use memslot::flag_names;

/// `KVM_RUN` on `vcpu`, with `kvm_run.exit_reason` reset first. KVM writes the exit reason only
/// for the exits it reports, and a memory-fault exit comes back as `-1/EFAULT` with
/// `exit_reason = KVM_EXIT_MEMORY_FAULT`; kvm-ioctls reads any EFAULT whose exit reason says so as
/// a memory fault. Without the reset, a bare EFAULT after an earlier userfault exit (an
/// unreadable bitmap, a bad host mapping) would look like a new userfault and the vCPU would wait
/// for a page instead of failing. Every KVM_RUN of the VMM and the tests goes through here.
#[cfg(feature = "kvm")]
pub fn run_vcpu(
    vcpu: &mut kvm_ioctls::VcpuFd,
) -> Result<kvm_ioctls::VcpuExit<'_>, kvm_ioctls::Error> {
    vcpu.get_kvm_run().exit_reason = kvm_bindings::KVM_EXIT_UNKNOWN;
    vcpu.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_marks_and_clears_single_pages() {
        let b = UserfaultBitmap::new(130);
        assert_eq!(b.count_marked(), 0);
        b.mark(0);
        b.mark(64);
        b.mark(129);
        assert!(b.is_marked(64) && !b.is_marked(63) && !b.is_marked(65));
        assert_eq!(b.count_marked(), 3);
        assert!(b.clear(64));
        assert!(!b.clear(64));
        assert!(!b.is_marked(64));
        assert_eq!(b.count_marked(), 2);
        // KVM reads bit n of the memslot at word n/64, bit n%64 (little-endian u64 words).
        // SAFETY: the bitmap owns three live u64 words at user_addr().
        let words = unsafe { std::slice::from_raw_parts(b.user_addr() as *const u64, 3) };
        assert_eq!(words, &[1, 0, 1 << 1]);
    }

    #[test]
    fn shared_bitmap_crosses_mappings_and_wakes_sleepers() {
        let vmm = std::sync::Arc::new(UserfaultBitmap::create_shared(100).unwrap());
        assert_eq!(vmm.count_marked(), 100);
        let fd = vmm.shared_fd().unwrap().try_clone_to_owned().unwrap();
        let sidecar = UserfaultBitmap::open_shared(fd, 100).unwrap();
        assert!(sidecar.is_marked(77));
        let waiter = {
            let vmm = vmm.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                let cleared = vmm.wait_cleared(77, std::time::Duration::from_secs(10));
                (cleared, t.elapsed())
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(sidecar.clear(77));
        sidecar.wake_page(77);
        let (cleared, waited) = waiter.join().unwrap();
        assert!(cleared);
        assert!(
            waited < std::time::Duration::from_secs(5),
            "woken, not timed out"
        );
        assert!(!vmm.is_marked(77));
        let mut missing = crate::bitmap::PageBitmap::new(100);
        missing.set(3);
        sidecar.keep_only(&missing);
        assert_eq!(vmm.count_marked(), 1);
        assert!(vmm.is_marked(3));
        let short = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        assert!(UserfaultBitmap::open_shared(short, 100).is_err());
    }

    #[test]
    fn a_wake_reaches_only_the_vcpus_waiting_on_that_half_word() {
        let vmm = std::sync::Arc::new(UserfaultBitmap::create_shared(256).unwrap());
        let fd = vmm.shared_fd().unwrap().try_clone_to_owned().unwrap();
        let sidecar = UserfaultBitmap::open_shared(fd, 256).unwrap();
        // One sleep, no retry: a wake that is not for page 77 would end it with `false`.
        let waiter = {
            let vmm = vmm.clone();
            std::thread::spawn(move || vmm.wait_cleared(77, std::time::Duration::from_secs(20)))
        };
        while sidecar.sleepers() == 0 {
            std::thread::yield_now();
        }
        // Page 10 is in another word, page 100 in the other half of page 77's word.
        for other in [10, 100] {
            assert!(sidecar.clear(other));
            sidecar.wake_page(other);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!waiter.is_finished(), "woken by another word's install");
        assert!(sidecar.clear(77));
        sidecar.wake_page(77);
        assert!(waiter.join().unwrap(), "woken without page 77 cleared");
        // Cleared before the wait: no sleep at all.
        assert!(vmm.wait_cleared(77, std::time::Duration::from_secs(20)));
    }

    #[test]
    fn wake_all_releases_a_waiter_whose_page_stays_marked() {
        let vmm = std::sync::Arc::new(UserfaultBitmap::create_shared(256).unwrap());
        let fd = vmm.shared_fd().unwrap().try_clone_to_owned().unwrap();
        let sidecar = UserfaultBitmap::open_shared(fd, 256).unwrap();
        let waiter = {
            let vmm = vmm.clone();
            std::thread::spawn(move || vmm.wait_cleared(200, std::time::Duration::from_secs(60)))
        };
        // A wake can land between the sleeper's announcement and its sleep (the bit did not
        // change, so nothing tells the sleep to skip): callers re-check in slices, and here the
        // wake is repeated. Without a working wake_all the waiter would sleep for a minute.
        let t = std::time::Instant::now();
        while !waiter.is_finished() && t.elapsed() < std::time::Duration::from_secs(10) {
            sidecar.wake_all();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(waiter.is_finished(), "still asleep after 10 s of wake_all");
        assert!(!waiter.join().unwrap());
    }

    #[test]
    fn all_marked_and_page_of() {
        let b = UserfaultBitmap::all_marked(70);
        assert_eq!(b.count_marked(), 70);
        assert_eq!(b.page_of(0x10_0000, 0x10_0000 + 5 * 4096 + 12), Some(5));
        assert_eq!(b.page_of(0x10_0000, 0xf_f000), None);
        assert_eq!(b.page_of(0x10_0000, 0x10_0000 + 70 * 4096), None);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_range_page_panics() {
        UserfaultBitmap::new(3).mark(3);
    }

    #[cfg(feature = "kvm")]
    #[test]
    fn region2_carries_bitmap_at_offset_48() {
        let bitmap = UserfaultBitmap::new(16);
        let slot = Memslot {
            slot: 1,
            guest_phys_addr: 0x10_0000,
            memory_size: 16 * 4096,
            userspace_addr: 0x7000_0000,
            guest_memfd: Some((7, 4096)),
            log_dirty_pages: false,
            userfault_bitmap: Some(bitmap.user_addr()),
        };
        let r = slot.region2();
        assert_eq!(r.flags, KVM_MEM_GUEST_MEMFD | KVM_MEM_USERFAULT);
        assert_eq!(r.flags, 12);
        // SAFETY: `r` is a plain-old-data struct of 160 bytes; reading its bytes is sound.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts((&r as *const _) as *const u8, std::mem::size_of_val(&r))
        };
        let at48 = u64::from_ne_bytes(bytes[48..56].try_into().unwrap());
        assert_eq!(at48, bitmap.user_addr());
        assert_eq!(flag_names(r.flags), "KVM_MEM_GUEST_MEMFD|KVM_MEM_USERFAULT");
        let off = Memslot {
            userfault_bitmap: None,
            ..slot
        }
        .region2();
        assert_eq!(off.flags, KVM_MEM_GUEST_MEMFD);
        assert_eq!(off.pad2, [0; 14]);
    }
}
