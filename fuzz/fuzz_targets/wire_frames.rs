//! Fuzz target `wire_frames`: the sidecar-to-sidecar wire protocol as a receiving sidecar
//! decodes it. Arbitrary bytes go through `FrameReader` (handed over in fuzzer-chosen read
//! sizes, as a socket would), and every frame that passes its checksum goes through every
//! message decoder of `faultline::wire::messages`, with a fuzzer-chosen layout size.
//!
//! Input: `flags: u8, total_pages: u64 LE, stream...`. Flag bit 0 asks the harness to fix the
//! CRC32C of each frame-shaped chunk of the stream first: a mutation-based fuzzer cannot guess
//! a checksum, and without the fix it would hardly ever reach the message decoders.
//!
//! Invariants, beyond "never panics":
//! - a frame read is exactly the bytes it consumed, re-encoded by `write_frame`;
//! - a decoded page batch holds at most `MAX_BATCH` pages, each below `total_pages`, and data
//!   for exactly its non-zero pages, and re-encodes to its payload (reserved word aside);
//! - a fault request names only pages below `total_pages` and re-encodes to its payload;
//! - a needed-pages or switch-over bitmap describes exactly `total_pages` pages and sets none
//!   beyond them; a switch-over re-encodes to a message that decodes to the same value;
//! - a control message survives a re-encode and decode unchanged.

#![no_main]

mod common;

use common::{Chunked, fix_checksums};
use faultline::PAGE_SIZE;
use faultline::bitmap::PageBitmap;
use faultline::page_batch::PagesBatch;
use faultline::wire::frame::{HEADER_LEN, MAX_PAYLOAD, TRAILER_LEN};
use faultline::wire::messages::MAX_BATCH;
use faultline::wire::{
    Control, FaultRequest, FrameReader, FrameType, Needed, SwitchOver, WireError, write_frame,
};
use libfuzzer_sys::fuzz_target;

fn check_bitmap(b: &PageBitmap, total_pages: u64) {
    assert_eq!(b.pages(), total_pages);
    assert!(b.count() <= total_pages);
    if let Some(last) = b.iter_set().last() {
        assert!(
            last < total_pages,
            "bit {last} set beyond {total_pages} pages"
        );
    }
}

/// Every message decoder on `payload`, whatever the frame type: a payload one type's decoder
/// accepts is worth trying on the others too.
fn messages(payload: &[u8], total_pages: u64) {
    if let Ok(batch) = PagesBatch::parse(payload, total_pages) {
        assert!(batch.entries.len() <= MAX_BATCH);
        let mut with_data = 0;
        for (page, data) in batch.pages() {
            assert!(page < total_pages);
            if let Some(d) = data {
                assert_eq!(d.len(), PAGE_SIZE as usize);
                with_data += 1;
            }
        }
        assert_eq!(batch.data.len(), with_data * PAGE_SIZE as usize);
        assert_eq!(batch.zero_pages() as usize + with_data, batch.entries.len());
        let mut wire = Vec::new();
        PagesBatch::write(&mut wire, &batch.entries, batch.data).expect("re-encode a batch");
        let again = &wire[HEADER_LEN..wire.len() - TRAILER_LEN];
        assert_eq!(again[..4], payload[..4]);
        assert_eq!(
            again[8..],
            payload[8..],
            "a batch re-encodes to its payload"
        );
    }
    if let Ok(pages) = FaultRequest::parse(payload, total_pages) {
        assert!(!pages.is_empty() && pages.len() <= MAX_BATCH);
        assert!(pages.iter().all(|&p| p < total_pages));
        let mut wire = Vec::new();
        FaultRequest::write(&mut wire, &pages).expect("re-encode a fault request");
        assert_eq!(&wire[HEADER_LEN..wire.len() - TRAILER_LEN], payload);
    }
    if let Ok(needed) = Needed::parse(payload, total_pages) {
        check_bitmap(&needed, total_pages);
    }
    if let Ok(switch) = SwitchOver::parse(payload, total_pages) {
        check_bitmap(&switch.invalid, total_pages);
        let mut wire = Vec::new();
        switch.write(&mut wire).expect("re-encode a switch-over");
        let again = SwitchOver::parse(&wire[HEADER_LEN..wire.len() - TRAILER_LEN], total_pages)
            .expect("a re-encoded switch-over decodes");
        assert_eq!(again.invalid, switch.invalid);
        assert_eq!(again.state, switch.state);
    }
    if let Ok(control) = Control::parse(payload) {
        let mut wire = Vec::new();
        control
            .write(&mut wire)
            .expect("re-encode a control message");
        let mut r = FrameReader::new(&wire[..]);
        let frame = r.read().expect("a re-encoded control frame reads");
        assert_eq!(frame.kind, FrameType::Control);
        assert_eq!(Control::parse(frame.payload).ok(), Some(control));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let total_pages = u64::from_le_bytes(data[1..9].try_into().expect("8 bytes"));
    let mut stream = data[9..].to_vec();
    if flags & 1 != 0 {
        fix_checksums(&mut stream);
    }
    let chunk = match (flags >> 1) & 7 {
        7 => usize::MAX,
        n => 1 << (n * 2),
    };
    let mut reader = FrameReader::new(Chunked::new(&stream, chunk));
    let mut start = 0;
    loop {
        let (kind, flags, payload) = match reader.read() {
            Ok(f) => {
                assert!(f.payload.len() <= MAX_PAYLOAD as usize);
                (f.kind, f.flags, f.payload.to_vec())
            }
            Err(WireError::Closed) => break,
            Err(
                WireError::BadMagic(_)
                | WireError::Version(_)
                | WireError::UnknownType(_)
                | WireError::TooLong(_)
                | WireError::Checksum { .. },
            ) => break,
            Err(e) => panic!("FrameReader returned an error it never should on bytes: {e}"),
        };
        let end = reader.get_ref().pos;
        let mut again = Vec::new();
        write_frame(&mut again, kind, flags, &[&payload]).expect("re-encode a frame");
        assert_eq!(
            again,
            stream[start..end],
            "a frame is the bytes it consumed"
        );
        start = end;
        messages(&payload, total_pages);
    }
});
