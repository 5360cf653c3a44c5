//! Shared (cross-process) futex wait and wake on one 32-bit half of a 64-bit atomic word.
//!
//! For the KVM Userfault bitmap, whose u64 words other processes and KVM also read and write:
//! a futex word is 32 bits, and no Rust reference to half of the word as a `u32` may exist, so
//! the kernel is given its address and reads it itself. Not `FUTEX_PRIVATE_FLAG`: the waker is
//! another process sharing the memory.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Which 32 bits of a little-endian u64 word: bits 0–31 (`Low`) sit at the word's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Low,
    High,
}

impl Half {
    /// The half holding bit `bit` (0–63).
    pub fn of_bit(bit: u32) -> Self {
        if bit < 32 { Self::Low } else { Self::High }
    }

    /// This half's value within `word`.
    pub fn value(self, word: u64) -> u32 {
        match self {
            Self::Low => word as u32,
            Self::High => (word >> 32) as u32,
        }
    }

    fn address(self, word: &AtomicU64) -> *const u32 {
        let base = word.as_ptr().cast::<u32>().cast_const();
        // wrapping_add: no dereference here; the result stays inside the 8-byte word.
        match self {
            Self::Low => base,
            Self::High => base.wrapping_add(1),
        }
    }
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Woken by a `wake` (or spuriously): re-check the condition.
    Woken,
    /// The word no longer held the expected value when the kernel looked.
    Changed,
    /// The timeout passed.
    TimedOut,
    /// A signal arrived (the VMM's kick).
    Interrupted,
}

/// Sleeps while `half` of `word` holds `expected`, for at most `timeout`.
pub fn wait(
    word: &AtomicU64,
    half: Half,
    expected: u32,
    timeout: Duration,
) -> std::io::Result<Wait> {
    let addr = half.address(word);
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `addr` is 4-byte aligned and inside `word`, which the borrow keeps alive; FUTEX_WAIT
    // only reads it (atomically, in the kernel) and reads `ts`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            addr,
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
    if rc == 0 {
        return Ok(Wait::Woken);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(Wait::Changed),
        Some(libc::ETIMEDOUT) => Ok(Wait::TimedOut),
        Some(libc::EINTR) => Ok(Wait::Interrupted),
        _ => Err(e),
    }
}

/// Wakes every waiter sleeping on `half` of `word`; returns how many woke.
pub fn wake_all(word: &AtomicU64, half: Half) -> std::io::Result<usize> {
    let addr = half.address(word);
    // SAFETY: FUTEX_WAKE only looks waiters up by the address (inside `word`); it reads and
    // writes no user memory.
    let rc = unsafe { libc::syscall(libc::SYS_futex, addr, libc::FUTEX_WAKE, i32::MAX) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_changed_half_does_not_sleep_and_a_wake_ends_a_sleep() {
        let w = Arc::new(AtomicU64::new(5 | (7 << 32)));
        assert_eq!(
            wait(&w, Half::Low, 4, Duration::from_secs(5)).unwrap(),
            Wait::Changed
        );
        assert_eq!(
            wait(&w, Half::High, 7, Duration::from_millis(20)).unwrap(),
            Wait::TimedOut
        );
        let sleeper = {
            let w = w.clone();
            std::thread::spawn(move || {
                let t = std::time::Instant::now();
                while Half::High.value(w.load(Ordering::SeqCst)) == 7 {
                    wait(&w, Half::High, 7, Duration::from_secs(10)).unwrap();
                }
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        w.fetch_and(!(1 << 32), Ordering::SeqCst);
        wake_all(&w, Half::High).unwrap();
        assert!(sleeper.join().unwrap() < Duration::from_secs(5));
    }

    #[test]
    fn halves() {
        assert_eq!(Half::of_bit(31), Half::Low);
        assert_eq!(Half::of_bit(32), Half::High);
        assert_eq!(Half::High.value(0xAAAA_BBBB_0000_0001), 0xAAAA_BBBB);
        assert_eq!(Half::Low.value(0xAAAA_BBBB_0000_0001), 1);
    }
}
