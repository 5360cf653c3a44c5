//! Per-page state for the target of a migration, shared lock-free between the threads that
//! install pages (bulk receiver, fault handler) and the one that reads faults.
//!
//! A page is `ABSENT` (the target has no trustworthy copy), `INSTALLING` (one thread has
//! claimed it) or `VALID` (installed for good). The `REQUESTED` flag marks pages a vCPU is
//! waiting for. The installer sets VALID and reads REQUESTED in one atomic step, and the fault
//! reader sets REQUESTED and reads the state in one atomic step, so for every waiting vCPU at
//! least one of them sees the other and wakes it: no fault is ever left sleeping.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

const STATE_MASK: u8 = 0b11;
const ABSENT: u8 = 0;
const INSTALLING: u8 = 1;
const VALID: u8 = 2;
const REQUESTED: u8 = 0x80;

pub struct PageStates {
    states: Vec<AtomicU8>,
    valid: AtomicU64,
}

/// What a fault on a page means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// First fault on an absent page: fetch it.
    Fetch,
    /// Already requested, or being installed: the installer will wake the waiter.
    Pending,
    /// Already valid: the fault raced with the install; wake the waiter now.
    Wake,
}

impl PageStates {
    pub fn new(pages: u64) -> Self {
        Self {
            states: (0..pages).map(|_| AtomicU8::new(ABSENT)).collect(),
            valid: AtomicU64::new(0),
        }
    }

    pub fn pages(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn valid_count(&self) -> u64 {
        self.valid.load(Ordering::Acquire)
    }

    pub fn all_valid(&self) -> bool {
        self.valid_count() == self.pages()
    }

    pub fn is_valid(&self, page: u64) -> bool {
        self.states[page as usize].load(Ordering::Acquire) & STATE_MASK == VALID
    }

    /// Marks a page valid without installing it (it was installed before switch-over).
    pub fn set_valid(&self, page: u64) {
        let prev = self.states[page as usize].fetch_or(VALID, Ordering::AcqRel);
        if prev & STATE_MASK != VALID {
            self.valid.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Switch-over, before anything else touches the states: every page not in `invalid`
    /// becomes valid. Plain stores rather than read-modify-writes, so 1 GiB takes well under a
    /// millisecond of the VM's downtime.
    pub fn set_valid_except(&self, invalid: &crate::bitmap::PageBitmap) {
        let mut newly = 0u64;
        for (p, state) in self.states.iter().enumerate() {
            if !invalid.test(p as u64) && state.load(Ordering::Relaxed) & STATE_MASK != VALID {
                state.store(VALID, Ordering::Relaxed);
                newly += 1;
            }
        }
        self.valid.fetch_add(newly, Ordering::AcqRel);
    }

    /// Claims an absent page for installation. False if it is being or has been installed.
    pub fn try_claim(&self, page: u64) -> bool {
        self.states[page as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & STATE_MASK == ABSENT).then_some((s & !STATE_MASK) | INSTALLING)
            })
            .is_ok()
    }

    /// Releases a claim after a failed install, so the page can be installed later.
    pub fn unclaim(&self, page: u64) {
        let _ = self.states[page as usize].fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            (s & STATE_MASK == INSTALLING).then_some(s & !STATE_MASK)
        });
    }

    /// Completes a claimed install. Returns whether a vCPU was waiting (REQUESTED).
    pub fn finish(&self, page: u64) -> bool {
        let prev = self.states[page as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s & !STATE_MASK) | VALID)
            })
            .unwrap_or(0);
        if prev & STATE_MASK != VALID {
            self.valid.fetch_add(1, Ordering::AcqRel);
        }
        prev & REQUESTED != 0
    }

    /// Records a fault on `page` and says what to do about it.
    pub fn fault(&self, page: u64) -> FaultOutcome {
        let prev = self.states[page as usize].fetch_or(REQUESTED, Ordering::AcqRel);
        match prev & STATE_MASK {
            VALID => FaultOutcome::Wake,
            ABSENT if prev & REQUESTED == 0 => FaultOutcome::Fetch,
            _ => FaultOutcome::Pending,
        }
    }

    /// Pages a vCPU waits for that are not valid yet (to ask for again after a reconnect).
    pub fn waiting_pages(&self) -> Vec<u64> {
        self.states
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                let s = s.load(Ordering::Acquire);
                s & REQUESTED != 0 && s & STATE_MASK != VALID
            })
            .map(|(p, _)| p as u64)
            .collect()
    }

    /// The pages not valid yet.
    pub fn missing(&self) -> crate::bitmap::PageBitmap {
        let mut b = crate::bitmap::PageBitmap::new(self.pages());
        for (p, s) in self.states.iter().enumerate() {
            if s.load(Ordering::Acquire) & STATE_MASK != VALID {
                b.set(p as u64);
            }
        }
        b
    }

    /// Whether a vCPU waits for `page`.
    pub fn is_requested(&self, page: u64) -> bool {
        self.states[page as usize].load(Ordering::Acquire) & REQUESTED != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lifecycle() {
        let s = PageStates::new(4);
        assert_eq!(s.fault(1), FaultOutcome::Fetch);
        assert_eq!(
            s.fault(1),
            FaultOutcome::Pending,
            "second fault on the same page"
        );
        assert!(s.try_claim(1));
        assert!(!s.try_claim(1), "claimed twice");
        assert!(s.finish(1), "the waiter is reported");
        assert_eq!(s.fault(1), FaultOutcome::Wake);
        assert!(s.try_claim(2));
        assert_eq!(s.fault(2), FaultOutcome::Pending);
        assert!(s.finish(2));
        assert!(s.try_claim(3));
        s.unclaim(3);
        assert!(s.try_claim(3));
        assert!(!s.finish(3));
        assert_eq!(s.missing().iter_set().collect::<Vec<_>>(), vec![0]);
        let bulk = PageStates::new(130);
        let mut invalid = crate::bitmap::PageBitmap::new(130);
        invalid.set(7);
        invalid.set(129);
        bulk.set_valid_except(&invalid);
        assert_eq!(bulk.valid_count(), 128);
        assert_eq!(bulk.missing(), invalid);
        assert!(s.waiting_pages().is_empty());
        s.set_valid(0);
        s.set_valid(0);
        assert_eq!(s.valid_count(), 4);
        assert!(s.all_valid());
    }

    /// Many threads racing to install the same pages: each page installed exactly once, and
    /// every page faulted on is either woken by the installer or seen valid by the fault.
    #[test]
    fn exactly_once_under_races() {
        let s = Arc::new(PageStates::new(10_000));
        let installs: Arc<Vec<AtomicU8>> =
            Arc::new((0..10_000).map(|_| AtomicU8::new(0)).collect());
        let woken: Arc<Vec<AtomicU8>> = Arc::new((0..10_000).map(|_| AtomicU8::new(0)).collect());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (s, installs, woken) = (s.clone(), installs.clone(), woken.clone());
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        let p = if t % 2 == 0 { i } else { 9_999 - i };
                        if t == 3 {
                            if s.fault(p) == FaultOutcome::Wake {
                                woken[p as usize].fetch_add(1, Ordering::Relaxed);
                            }
                        } else if s.try_claim(p) {
                            installs[p as usize].fetch_add(1, Ordering::Relaxed);
                            if s.finish(p) {
                                woken[p as usize].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(s.all_valid());
        for p in 0..10_000 {
            assert_eq!(installs[p].load(Ordering::Relaxed), 1, "page {p}");
            assert!(
                woken[p].load(Ordering::Relaxed) >= 1,
                "fault on page {p} never woken"
            );
        }
    }
}
