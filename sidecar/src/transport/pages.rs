//! Reading guest pages and sending them as wire batches, for every source-side stream
//! (pre-copy passes, fault replies, background push): zero pages become markers, consecutive
//! pages are read with one call, and page data goes to the socket straight from the read
//! buffer.

use std::io::Write;
use std::time::{Duration, Instant};

use faultline::bitmap::PageBitmap;
use faultline::guest_memory::{FrozenMemory, GuestMemory, GuestMemoryError, is_zero};
use faultline::layout::PAGE_SIZE;
use faultline::page_batch::{PageEntry, PagesBatch};
use faultline::wire::WireError;

use crate::migration::{Link, Transferred};

const PAGE: usize = PAGE_SIZE as usize;
/// Pages per batch: 256 KiB of data at most, small enough that a fault reply queued behind a
/// batch on the same host waits little, large enough to amortize the per-frame cost.
pub const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("cannot read guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
}

impl From<SendError> for Link {
    /// A connection that failed is a broken link; guest memory that cannot be read is fatal.
    fn from(e: SendError) -> Self {
        match e {
            SendError::Wire(w) => Link::from_wire(w),
            other => Link::fatal(other),
        }
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

    /// No limit: fault replies and the stop-and-copy pass are never paced.
    pub fn unlimited() -> Self {
        Self::new(0)
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
    /// Memory that no longer changes, sent straight from its mapping (post-copy).
    frozen: Option<&'a FrozenMemory>,
    buf: Vec<u8>,
}

impl<'a> PageSender<'a> {
    pub fn new(mem: &'a GuestMemory) -> Self {
        Self {
            mem,
            frozen: None,
            buf: vec![0u8; BATCH * PAGE],
        }
    }

    /// A sender that lends pages from `frozen`, where it has them, instead of reading them
    /// into its buffer: one copy less per page.
    pub fn with_frozen(mem: &'a GuestMemory, frozen: Option<&'a FrozenMemory>) -> Self {
        Self {
            frozen,
            ..Self::new(mem)
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
    ) -> Result<Transferred, SendError> {
        let mut total = Transferred::default();
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
    fn send_batch(
        &mut self,
        w: &mut impl Write,
        pages: &[u64],
        known_zero: Option<&PageBitmap>,
    ) -> Result<Transferred, SendError> {
        debug_assert!(pages.len() <= BATCH);
        if let Some(frozen) = self.frozen {
            return send_frozen(w, frozen, pages, known_zero);
        }
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
        Ok(Transferred {
            pages: pages.len() as u64,
            zero,
            bytes,
        })
    }
}

/// [`PageSender::send_batch`] for memory that no longer changes: pages straight from the
/// mapping.
fn send_frozen(
    w: &mut impl Write,
    frozen: &FrozenMemory,
    pages: &[u64],
    known_zero: Option<&PageBitmap>,
) -> Result<Transferred, SendError> {
    let mut entries = Vec::with_capacity(pages.len());
    let mut parts: Vec<&[u8]> = Vec::with_capacity(pages.len());
    for &page in pages {
        let data = if known_zero.is_some_and(|z| z.test(page)) {
            None
        } else {
            Some(frozen.page(page)?).filter(|d| !is_zero(d))
        };
        entries.push(PageEntry {
            page,
            zero: data.is_none(),
        });
        parts.extend(data);
    }
    let zero = entries.iter().filter(|e| e.zero).count() as u64;
    let bytes = PagesBatch::write_parts(w, &entries, &parts)?;
    Ok(Transferred {
        pages: pages.len() as u64,
        zero,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::wire::FrameReader;

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
        let mut unlimited = Pacer::unlimited();
        let t = Instant::now();
        unlimited.account(1 << 30);
        assert!(t.elapsed() < Duration::from_millis(10));
    }

    /// Memory that no longer changes goes out straight from its mapping, byte for byte the
    /// frames the copying path sends.
    #[test]
    fn frozen_memory_sends_the_same_frames() {
        let mem = GuestMemory::memfd(300).unwrap();
        for p in [0u64, 1, 2, 63, 64, 65, 200, 299] {
            mem.write(p, &[p as u8 ^ 0x5a; PAGE]).unwrap();
        }
        let mut known_zero = PageBitmap::new(300);
        known_zero.set(7);
        // SAFETY: nothing writes `mem` while the view lives.
        let frozen = unsafe { mem.freeze() }
            .unwrap()
            .expect("memfd memory can be frozen");
        let pages: Vec<u64> = (0..300).rev().step_by(3).chain(0..300).collect();
        let send = |frozen| {
            let mut wire = Vec::new();
            let sent = PageSender::with_frozen(&mem, frozen)
                .send(
                    &mut wire,
                    pages.iter().copied(),
                    Some(&known_zero),
                    &mut Pacer::unlimited(),
                )
                .unwrap();
            (sent, wire)
        };
        let (copied, copied_wire) = send(None);
        let (lent, lent_wire) = send(Some(&frozen));
        assert_eq!(copied, lent);
        assert_eq!(copied_wire, lent_wire);
        assert!(lent.zero > 0 && lent.zero < lent.pages);
    }

    /// Pages come out as batches of at most BATCH, zero pages (read or known) as markers, and
    /// the bytes counted are the frames' bytes on the wire, as the target counts them.
    #[test]
    fn batches_markers_and_wire_bytes() {
        let mem = GuestMemory::memfd(200).unwrap();
        for p in [3u64, 4, 100, 150] {
            mem.write(p, &[p as u8 + 1; PAGE]).unwrap();
        }
        let mut known_zero = PageBitmap::new(200);
        known_zero.set(150); // claimed zero: not even read
        let mut wire = Vec::new();
        let sent = PageSender::new(&mem)
            .send(
                &mut wire,
                0..200,
                Some(&known_zero),
                &mut Pacer::unlimited(),
            )
            .unwrap();
        assert_eq!(sent.pages, 200);
        assert_eq!(sent.zero, 197);
        assert_eq!(sent.bytes, wire.len() as u64);

        let mut r = FrameReader::new(&wire[..]);
        let (mut frames, mut data) = (0, Vec::new());
        while let Ok(f) = r.read() {
            frames += 1;
            let b = PagesBatch::parse(f.payload, 200).unwrap();
            assert!(b.entries.len() <= BATCH);
            data.extend(b.pages().filter_map(|(p, d)| d.map(|d| (p, d[0]))));
        }
        assert_eq!(frames, 200usize.div_ceil(BATCH));
        assert_eq!(data, [(3, 4), (4, 5), (100, 101)]);
    }
}
