//! Messages carried by wire frames: JSON control messages, page batches, fault requests and
//! the switch-over message.

use serde::{Deserialize, Serialize};

use super::frame::{FrameType, WireError, frame_len, write_frame};
use crate::bitmap::PageBitmap;
use crate::layout::PAGE_SIZE;
use crate::page_batch::{PageEntry, PagesBatch};
use crate::policy::Mode;
use crate::trap::Backend;

/// Control messages (frame type `Control`, JSON payload), in the order they normally flow.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Control {
    /// Source → target: what is about to happen.
    Start {
        mode: Mode,
        total_pages: u64,
        vcpus: u32,
        /// Whether the source will run pre-copy passes (the target then installs pages
        /// before switch-over).
        precopy: bool,
        /// Whether the migration may end in post-copy (the target must arm a trap).
        postcopy: bool,
    },
    /// Target → source: ready, with the trap it armed (None when no post-copy can happen).
    Ready { trap: Option<Backend> },
    /// Source → target: a pre-copy pass ended.
    RoundEnd { round: u32, sent: u64 },
    /// Target → source: every page of that pass is installed. The source times a pass until
    /// this arrives, so its bandwidth estimate includes the target's work, and it never pauses
    /// the VM while the target still has a backlog to install.
    RoundDone { round: u32 },
    /// Target → source: the state is restored and all valid pages installed; the target
    /// resumes as soon as the source commits.
    Prepared,
    /// Source → target: the source is fenced and will never run again. The point of no
    /// return.
    Commit,
    /// Target → source: the VM runs on the target.
    Resumed,
    /// Source → target: every page the target still needed has been sent (on one channel or
    /// the other).
    PushDone { pages: u64 },
    /// Target → source: every page is valid and the trap is disarmed.
    Complete { faults: u64 },
    /// Either side, before the commit point: stop; the source keeps running.
    Cancel { reason: String },
    /// Source → target, first on a new main connection after the link broke in post-copy:
    /// carry on. The target answers with a `Needed` frame.
    Resume,
}

impl Control {
    pub fn write(&self, w: &mut impl std::io::Write) -> Result<(), WireError> {
        let json =
            serde_json::to_vec(self).map_err(|e| WireError::malformed("control", e.to_string()))?;
        write_frame(w, FrameType::Control, 0, &[&json])
    }

    pub fn parse(payload: &[u8]) -> Result<Self, WireError> {
        crate::strict_json::from_slice(payload)
            .map_err(|e| WireError::malformed("control message", e))
    }
}

const ZERO_FLAG: u64 = 1 << 63;

/// Most pages in one batch.
pub const MAX_BATCH: usize = 256;

/// The `Pages` frame's codec; the batch itself is plain data (`crate::page_batch`).
impl<'a> PagesBatch<'a> {
    /// Writes a `Pages` frame: `u32 count, u32 reserved, count × u64 entry, data`. Returns the
    /// bytes the frame took on the wire.
    pub fn write(
        w: &mut impl std::io::Write,
        entries: &[PageEntry],
        data: &[u8],
    ) -> Result<u64, WireError> {
        Self::write_parts(w, entries, &[data])
    }

    /// As [`PagesBatch::write`], with the data of the non-zero pages in separate slices (sent
    /// with one vectored write, without copying them together first).
    pub fn write_parts(
        w: &mut impl std::io::Write,
        entries: &[PageEntry],
        data: &[&[u8]],
    ) -> Result<u64, WireError> {
        let mut head = Vec::with_capacity(8 + entries.len() * 8);
        head.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        for e in entries {
            head.extend_from_slice(&(e.page | if e.zero { ZERO_FLAG } else { 0 }).to_le_bytes());
        }
        let mut parts = Vec::with_capacity(data.len() + 1);
        parts.push(&head[..]);
        parts.extend_from_slice(data);
        write_frame(w, FrameType::Pages, 0, &parts)?;
        Ok(frame_len(parts.iter().map(|p| p.len()).sum()))
    }

    /// Decodes a batch, checking every page index is below `total_pages` and the data length
    /// matches the non-zero entries exactly.
    pub fn parse(payload: &'a [u8], total_pages: u64) -> Result<Self, WireError> {
        let bad = |why: String| WireError::malformed("page batch", why);
        if payload.len() < 8 {
            return Err(bad("shorter than its header".into()));
        }
        let count = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        if count > MAX_BATCH {
            return Err(bad(format!("{count} pages (limit {MAX_BATCH})")));
        }
        let entries_end = 8 + count * 8;
        if payload.len() < entries_end {
            return Err(bad("entries cut short".into()));
        }
        let mut entries = Vec::with_capacity(count);
        let mut data_pages = 0usize;
        for chunk in payload[8..entries_end].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            let raw = u64::from_le_bytes(b);
            let entry = PageEntry {
                page: raw & !ZERO_FLAG,
                zero: raw & ZERO_FLAG != 0,
            };
            if entry.page >= total_pages {
                return Err(bad(format!(
                    "page {} is beyond the {total_pages}-page layout",
                    entry.page
                )));
            }
            if !entry.zero {
                data_pages += 1;
            }
            entries.push(entry);
        }
        let data = &payload[entries_end..];
        if data.len() != data_pages * PAGE_SIZE as usize {
            return Err(bad(format!(
                "{} data bytes for {data_pages} non-zero pages",
                data.len()
            )));
        }
        Ok(Self { entries, data })
    }
}

/// Target → source on the urgent channel: pages vCPUs are waiting for.
pub struct FaultRequest;

impl FaultRequest {
    pub fn write(w: &mut impl std::io::Write, pages: &[u64]) -> Result<(), WireError> {
        let mut b = Vec::with_capacity(pages.len() * 8);
        for p in pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        write_frame(w, FrameType::FaultRequest, 0, &[&b])
    }

    pub fn parse(payload: &[u8], total_pages: u64) -> Result<Vec<u64>, WireError> {
        if payload.is_empty() || !payload.len().is_multiple_of(8) || payload.len() > MAX_BATCH * 8 {
            return Err(WireError::malformed(
                "fault request",
                format!("{} bytes", payload.len()),
            ));
        }
        payload
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                let p = u64::from_le_bytes(b);
                if p < total_pages {
                    Ok(p)
                } else {
                    Err(WireError::malformed(
                        "fault request",
                        format!("page {p} beyond the layout"),
                    ))
                }
            })
            .collect()
    }
}

/// Target → source after a reconnect: the pages the target does not hold yet.
pub struct Needed;

impl Needed {
    /// `u64 pages, bitmap`.
    pub fn write(w: &mut impl std::io::Write, needed: &PageBitmap) -> Result<(), WireError> {
        write_frame(
            w,
            FrameType::Needed,
            0,
            &[&needed.pages().to_le_bytes(), &needed.to_le_bytes()],
        )
    }

    pub fn parse(payload: &[u8], total_pages: u64) -> Result<PageBitmap, WireError> {
        let bad = |why: String| WireError::malformed("needed-pages bitmap", why);
        if payload.len() < 8 {
            return Err(bad("shorter than its header".into()));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[..8]);
        let pages = u64::from_le_bytes(b);
        if pages != total_pages {
            return Err(bad(format!(
                "for {pages} pages, the layout has {total_pages}"
            )));
        }
        PageBitmap::from_le_bytes(&payload[8..], pages).map_err(|e| bad(e.to_string()))
    }
}

/// Source → target with the VM paused: which pages the target must not trust (never sent, or
/// written after they were last sent) and the VM state blob.
#[derive(Debug)]
pub struct SwitchOver {
    /// Set bits: pages the target must fetch (post-copy) or that follow on the main channel
    /// before this message (pre-copy's final pass sends them first, so the set is empty).
    pub invalid: PageBitmap,
    pub state: Vec<u8>,
}

impl SwitchOver {
    /// `u64 pages, u64 bitmap bytes, bitmap, state`.
    pub fn write(&self, w: &mut impl std::io::Write) -> Result<(), WireError> {
        let bitmap = self.invalid.to_le_bytes();
        let mut head = Vec::with_capacity(16);
        head.extend_from_slice(&self.invalid.pages().to_le_bytes());
        head.extend_from_slice(&(bitmap.len() as u64).to_le_bytes());
        write_frame(w, FrameType::SwitchOver, 0, &[&head, &bitmap, &self.state])
    }

    pub fn parse(payload: &[u8], total_pages: u64) -> Result<Self, WireError> {
        let bad = |why: String| WireError::malformed("switch-over", why);
        if payload.len() < 16 {
            return Err(bad("shorter than its header".into()));
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[0..8]);
        let pages = u64::from_le_bytes(b);
        b.copy_from_slice(&payload[8..16]);
        let len = u64::from_le_bytes(b);
        if pages != total_pages {
            return Err(bad(format!(
                "bitmap for {pages} pages, layout has {total_pages}"
            )));
        }
        let end = 16u64
            .checked_add(len)
            .filter(|&e| e <= payload.len() as u64)
            .ok_or_else(|| bad("bitmap cut short".into()))? as usize;
        let invalid =
            PageBitmap::from_le_bytes(&payload[16..end], pages).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            invalid,
            state: payload[end..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::FrameReader;
    use proptest::prelude::*;

    #[test]
    fn pages_round_trip() {
        let entries = [
            PageEntry {
                page: 3,
                zero: false,
            },
            PageEntry {
                page: 4,
                zero: true,
            },
            PageEntry {
                page: 9,
                zero: false,
            },
        ];
        let mut data = vec![1u8; 4096];
        data.extend(vec![2u8; 4096]);
        let mut wire = Vec::new();
        PagesBatch::write(&mut wire, &entries, &data).unwrap();
        let mut r = FrameReader::new(&wire[..]);
        let f = r.read().unwrap();
        let b = PagesBatch::parse(f.payload, 10).unwrap();
        let pages: Vec<_> = b.pages().map(|(p, d)| (p, d.map(|d| d[0]))).collect();
        assert_eq!(pages, vec![(3, Some(1)), (4, None), (9, Some(2))]);
        assert!(
            PagesBatch::parse(f.payload, 9).is_err(),
            "page 9 beyond a 9-page layout"
        );
        assert!(PagesBatch::parse(&f.payload[..f.payload.len() - 1], 10).is_err());
    }

    #[test]
    fn control_and_switchover_round_trip() {
        let mut wire = Vec::new();
        Control::Cancel { reason: "x".into() }
            .write(&mut wire)
            .unwrap();
        let mut invalid = PageBitmap::new(100);
        invalid.set(42);
        SwitchOver {
            invalid: invalid.clone(),
            state: b"state".to_vec(),
        }
        .write(&mut wire)
        .unwrap();
        let mut r = FrameReader::new(&wire[..]);
        let c = Control::parse(r.read().unwrap().payload).unwrap();
        assert_eq!(c, Control::Cancel { reason: "x".into() });
        let s = SwitchOver::parse(r.read().unwrap().payload, 100).unwrap();
        assert_eq!(s.invalid, invalid);
        assert_eq!(s.state, b"state");
        assert!(Control::parse(br#"{"type":"commit","extra":1}"#).is_err());
        assert!(FaultRequest::parse(&[0; 7], 10).is_err());
        let mut needed = PageBitmap::new(70);
        needed.set(69);
        let mut wire = Vec::new();
        Needed::write(&mut wire, &needed).unwrap();
        let f = FrameReader::new(&wire[..])
            .read()
            .map(|f| f.payload.to_vec())
            .unwrap();
        assert_eq!(Needed::parse(&f, 70).unwrap(), needed);
        assert!(Needed::parse(&f, 71).is_err());
        assert!(FaultRequest::parse(&20u64.to_le_bytes(), 10).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = PagesBatch::parse(&bytes, 1000);
            let _ = SwitchOver::parse(&bytes, 1000);
            let _ = FaultRequest::parse(&bytes, 1000);
            let _ = Needed::parse(&bytes, 1000);
            let _ = Control::parse(&bytes);
        }
    }
}
