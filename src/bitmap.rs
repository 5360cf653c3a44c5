//! Page bitmaps: one bit per 4 KiB page, in little-endian 64-bit words, bit `n` of word `w`
//! standing for page `64 * w + n` — the layout KVM's dirty log uses, so its output can be
//! adopted without conversion.

/// A fixed-size set of page indices.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

/// A bitmap that does not fit the page count it claims to describe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a bitmap for {pages} pages needs {expected} words, got {got}")]
pub struct BitmapSizeError {
    pub pages: u64,
    pub expected: usize,
    pub got: usize,
}

/// Number of 64-bit words needed for `pages` bits.
pub fn words_for(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl PageBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; words_for(pages)],
            pages,
        }
    }

    /// A bitmap with every page set.
    pub fn full(pages: u64) -> Self {
        let mut b = Self {
            words: vec![u64::MAX; words_for(pages)],
            pages,
        };
        b.clear_tail();
        b
    }

    /// Adopts words produced elsewhere (KVM, the wire). Bits beyond `pages` are cleared.
    pub fn from_words(words: Vec<u64>, pages: u64) -> Result<Self, BitmapSizeError> {
        let expected = words_for(pages);
        if words.len() != expected {
            return Err(BitmapSizeError {
                pages,
                expected,
                got: words.len(),
            });
        }
        let mut b = Self { words, pages };
        b.clear_tail();
        Ok(b)
    }

    /// Decodes little-endian bytes as produced by [`PageBitmap::to_le_bytes`].
    pub fn from_le_bytes(bytes: &[u8], pages: u64) -> Result<Self, BitmapSizeError> {
        let expected = words_for(pages);
        if bytes.len() != expected * 8 {
            return Err(BitmapSizeError {
                pages,
                expected,
                got: bytes.len() / 8,
            });
        }
        let words = bytes
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .collect();
        Self::from_words(words, pages)
    }

    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Sets page `page`. Panics if `page` is out of range: callers index with validated pages.
    pub fn set(&mut self, page: u64) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    pub fn clear(&mut self, page: u64) {
        assert!(page < self.pages, "page {page} out of range {}", self.pages);
        self.words[(page / 64) as usize] &= !(1 << (page % 64));
    }

    pub fn test(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page of `other` (same size) to `self`.
    pub fn union_with(&mut self, other: &PageBitmap) {
        assert_eq!(self.pages, other.pages, "bitmap sizes differ");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Copies `src` into this bitmap starting at page `at` (which must be a multiple of 64
    /// unless `src` is empty) — how per-region dirty logs become one layout-wide bitmap.
    pub fn splice(&mut self, at: u64, src: &PageBitmap) {
        assert!(at + src.pages <= self.pages, "splice out of range");
        if at.is_multiple_of(64) {
            let w0 = (at / 64) as usize;
            for (i, w) in src.words.iter().enumerate() {
                self.words[w0 + i] |= w;
            }
        } else {
            for p in src.iter_set() {
                self.set(at + p);
            }
        }
    }

    /// Runs of consecutive set pages, as `(first page, count)`, in ascending order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut set = self.iter_set().peekable();
        std::iter::from_fn(move || {
            let first = set.next()?;
            let mut count = 1;
            while set.next_if(|&p| p == first + count).is_some() {
                count += 1;
            }
            Some((first, count))
        })
    }

    /// Iterates over the set pages in ascending order.
    pub fn iter_set(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }
}

/// A page set that several threads update at once (e.g. the pages a migration target still
/// needs, cleared by whichever of the fault server and the background push sends them first).
pub struct AtomicPageBitmap {
    words: Vec<std::sync::atomic::AtomicU64>,
    pages: u64,
    count: std::sync::atomic::AtomicU64,
}

impl AtomicPageBitmap {
    pub fn from_bitmap(b: &PageBitmap) -> Self {
        use std::sync::atomic::AtomicU64;
        Self {
            words: b.words.iter().map(|&w| AtomicU64::new(w)).collect(),
            pages: b.pages,
            count: AtomicU64::new(b.count()),
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages still set.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn test(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / 64) as usize].load(std::sync::atomic::Ordering::Acquire)
                & (1 << (page % 64))
                != 0
    }

    /// Clears `page`; true if this call cleared it (it was set).
    pub fn take(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % 64);
        let prev =
            self.words[(page / 64) as usize].fetch_and(!bit, std::sync::atomic::Ordering::AcqRel);
        let taken = prev & bit != 0;
        if taken {
            self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        taken
    }

    /// The first set page at or after `from`, wrapping around once; None when empty.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if self.pages == 0 {
            return None;
        }
        let from = from % self.pages;
        let scan = |start: u64, end: u64| -> Option<u64> {
            let mut w = (start / 64) as usize;
            let mut mask = !0u64 << (start % 64);
            while (w as u64) * 64 < end {
                let bits = self.words[w].load(std::sync::atomic::Ordering::Acquire) & mask;
                if bits != 0 {
                    let p = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    return (p < end).then_some(p);
                }
                w += 1;
                mask = !0;
            }
            None
        };
        scan(from, self.pages).or_else(|| scan(0, from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basics() {
        let mut b = PageBitmap::new(130);
        assert!(b.is_empty());
        b.set(0);
        b.set(64);
        b.set(129);
        assert!(b.test(64) && !b.test(65) && !b.test(1000));
        assert_eq!(b.count(), 3);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0, 64, 129]);
        b.clear(64);
        assert_eq!(b.count(), 2);
        assert_eq!(PageBitmap::full(130).count(), 130);
    }

    #[test]
    fn runs() {
        let mut b = PageBitmap::new(200);
        for p in [1, 2, 3, 63, 64, 65, 100, 199] {
            b.set(p);
        }
        assert_eq!(
            b.runs().collect::<Vec<_>>(),
            vec![(1, 3), (63, 3), (100, 1), (199, 1)]
        );
        assert_eq!(PageBitmap::new(10).runs().count(), 0);
    }

    #[test]
    fn tail_bits_are_dropped() {
        let b = PageBitmap::from_words(vec![u64::MAX, u64::MAX], 70).unwrap();
        assert_eq!(b.count(), 70);
        assert!(PageBitmap::from_words(vec![0], 70).is_err());
    }

    #[test]
    fn splice_unaligned() {
        let mut big = PageBitmap::new(200);
        let mut small = PageBitmap::new(10);
        small.set(0);
        small.set(9);
        big.splice(65, &small);
        assert_eq!(big.iter_set().collect::<Vec<_>>(), vec![65, 74]);
        big.splice(128, &small);
        assert_eq!(big.count(), 4);
    }

    #[test]
    fn atomic_take_and_scan() {
        let mut b = PageBitmap::new(130);
        for p in [3, 64, 129] {
            b.set(p);
        }
        let a = AtomicPageBitmap::from_bitmap(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.next_set(0), Some(3));
        assert_eq!(a.next_set(4), Some(64));
        assert_eq!(a.next_set(65), Some(129));
        assert!(a.take(129));
        assert!(!a.take(129), "taken twice");
        assert_eq!(a.next_set(65), Some(3), "wraps around");
        assert!(a.take(3) && a.take(64));
        assert_eq!(a.next_set(0), None);
        assert_eq!(a.count(), 0);
    }

    proptest! {
        #[test]
        fn bytes_round_trip(pages in 1u64..2000, seed in proptest::collection::vec(0u64..2000, 0..50)) {
            let mut b = PageBitmap::new(pages);
            for p in seed.into_iter().filter(|&p| p < pages) { b.set(p); }
            let again = PageBitmap::from_le_bytes(&b.to_le_bytes(), pages).unwrap();
            prop_assert_eq!(&again, &b);
            prop_assert_eq!(again.iter_set().count() as u64, b.count());
        }
    }
}
