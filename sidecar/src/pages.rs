//! Reading guest pages and sending them as wire batches, for every source-side stream
//! (pre-copy passes, fault replies, background push): zero pages become markers, consecutive
//! pages are read with one call, and page data goes to the socket straight from the read
//! buffer.

use std::io::Write;
use std::time::{Duration, Instant};

use faultline::bitmap::PageBitmap;
use faultline::guest_memory::{GuestMemory, is_zero};
use faultline::layout::PAGE_SIZE;
use faultline::page_batch::PageEntry;
use faultline::page_batch::PagesBatch;
use faultline::wire::WireError;

const PAGE: usize = PAGE_SIZE as usize;
/// Pages per batch: 256 KiB of data at most, small enough that a fault reply queued behind a
/// batch on the same host waits little, large enough to amortize the per-frame cost.
pub const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("cannot read guest memory: {0}")]
    Memory(#[from] faultline::guest_memory::GuestMemoryError),
}

/// What a send did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub pages: u64,
    pub zero: u64,
    /// Bytes of frames written.
    pub bytes: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.zero += o.zero;
        self.bytes += o.bytes;
    }
}

/// Paces a stream to a byte rate (0: unlimited).
pub struct Pacer {
    limit: u64,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn account(&mut self, bytes: u64) {
        if self.limit == 0 {
            return;
        }
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.limit as f64);
        let spent = self.start.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }
}

pub struct PageSender<'a> {
    mem: &'a GuestMemory,
    buf: Vec<u8>,
}

impl<'a> PageSender<'a> {
    pub fn new(mem: &'a GuestMemory) -> Self {
        Self {
            mem,
            buf: vec![0u8; BATCH * PAGE],
        }
    }

    /// Sends `pages` (any order) in batches. Pages in `known_zero` are sent as zero markers
    /// without reading them.
    pub fn send(
        &mut self,
        w: &mut impl Write,
        pages: impl IntoIterator<Item = u64>,
        known_zero: Option<&PageBitmap>,
        pacer: &mut Pacer,
    ) -> Result<Sent, SendError> {
        let mut total = Sent::default();
        let mut batch = Vec::with_capacity(BATCH);
        let mut pages = pages.into_iter().peekable();
        while let Some(p) = pages.next() {
            batch.push(p);
            if batch.len() == BATCH || pages.peek().is_none() {
                let sent = self.send_batch(w, &batch, known_zero)?;
                pacer.account(sent.bytes);
                total += sent;
                batch.clear();
            }
        }
        Ok(total)
    }

    /// Sends at most [`BATCH`] pages as one frame.
    pub fn send_batch(
        &mut self,
        w: &mut impl Write,
        pages: &[u64],
        known_zero: Option<&PageBitmap>,
    ) -> Result<Sent, SendError> {
        debug_assert!(pages.len() <= BATCH);
        // Read runs of consecutive pages in one call each.
        let mut slot = 0usize;
        let mut i = 0usize;
        let mut slots = [usize::MAX; BATCH];
        while i < pages.len() {
            if known_zero.is_some_and(|z| z.test(pages[i])) {
                i += 1;
                continue;
            }
            let first = pages[i];
            let limit = self.mem.contiguous_from(first);
            let mut n = 1usize;
            while i + n < pages.len()
                && pages[i + n] == first + n as u64
                && (n as u64) < limit
                && !known_zero.is_some_and(|z| z.test(pages[i + n]))
            {
                n += 1;
            }
            self.mem
                .read(first, &mut self.buf[slot * PAGE..(slot + n) * PAGE])?;
            for k in 0..n {
                slots[i + k] = slot + k;
            }
            slot += n;
            i += n;
        }
        let mut entries = Vec::with_capacity(pages.len());
        let mut parts: Vec<&[u8]> = Vec::with_capacity(pages.len());
        let mut zero = 0u64;
        for (k, &page) in pages.iter().enumerate() {
            let data = (slots[k] != usize::MAX)
                .then(|| &self.buf[slots[k] * PAGE..(slots[k] + 1) * PAGE])
                .filter(|d| !is_zero(d));
            match data {
                Some(d) => {
                    entries.push(PageEntry { page, zero: false });
                    parts.push(d);
                }
                None => {
                    entries.push(PageEntry { page, zero: true });
                    zero += 1;
                }
            }
        }
        let bytes = PagesBatch::write_parts(w, &entries, &parts)?;
        Ok(Sent {
            pages: pages.len() as u64,
            zero,
            bytes,
        })
    }
}

/// Makes the calling thread (one serving faults) real-time, best effort.
pub fn prioritize_this_thread() {
    if let Err(e) = faultline::sys::sched::realtime_this_thread() {
        tracing::debug!("cannot make the fault thread real-time: {e}");
    }
}

/// Lowers the calling thread's CPU priority (nice 10) for bulk work, so that on a busy host
/// the threads serving faults run first: a vCPU is waiting on those, nobody on the bulk.
pub fn deprioritize_this_thread() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), 10) {
        tracing::debug!("cannot lower the bulk thread's priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_the_rate() {
        let mut p = Pacer::new(10_000_000);
        let t = Instant::now();
        for _ in 0..10 {
            p.account(100_000);
        }
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(95),
            "1 MB at 10 MB/s took {took:?}"
        );
        assert!(
            took < Duration::from_millis(400),
            "over-throttled: {took:?}"
        );
        let mut unlimited = Pacer::new(0);
        let t = Instant::now();
        unlimited.account(1 << 30);
        assert!(t.elapsed() < Duration::from_millis(10));
    }
}
