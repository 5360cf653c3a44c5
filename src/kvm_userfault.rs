//! The KVM Userfault UAPI (the posted "KVM: Introduce KVM Userfault" v3 series, carried by
//! Faultline's own kernel patch in `kernel/`), and the few guest_memfd constants kvm-bindings
//! 0.14 lacks. Owns the numbers, the userfault bitmap as KVM reads it, and building the
//! memslot descriptor that carries the bitmap; it does not issue ioctls (the VMM does, since
//! KVM only takes them from the process that created the VM) and it does not decide when to
//! arm or disarm (the kvm-userfault trap backend does).
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
/// KVM reads the words concurrently.
#[derive(Debug)]
pub struct UserfaultBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl UserfaultBitmap {
    /// A bitmap for `pages` pages with no page marked.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        Self {
            words: (0..words.max(1)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// A bitmap for `pages` pages with every page marked (a post-copy target before any page
    /// arrived).
    pub fn all_marked(pages: u64) -> Self {
        let b = Self::new(pages);
        for page in 0..pages {
            b.mark(page);
        }
        b
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
        self.words[w].fetch_or(bit, Ordering::SeqCst);
    }

    /// Clears `page`'s mark with release ordering (after its contents were written); returns
    /// whether it was marked.
    pub fn clear(&self, page: u64) -> bool {
        let (w, bit) = self.locate(page);
        self.words[w].fetch_and(!bit, Ordering::Release) & bit != 0
    }

    pub fn is_marked(&self, page: u64) -> bool {
        let (w, bit) = self.locate(page);
        self.words[w].load(Ordering::Acquire) & bit != 0
    }

    /// How many pages are marked.
    pub fn count_marked(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The page of `gpa` in a memslot starting at `slot_gpa`, if the memslot covers it.
    pub fn page_of(&self, slot_gpa: u64, gpa: u64) -> Option<u64> {
        let page = gpa.checked_sub(slot_gpa)? / PAGE_SIZE;
        (page < self.pages).then_some(page)
    }

    /// The address to put in `kvm_userspace_memory_region2.userfault_bitmap`. Valid while
    /// `self` lives: drop the memslot (or clear its flag) before the bitmap.
    pub fn user_addr(&self) -> u64 {
        self.words.as_ptr() as u64
    }
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
