//! Helpers the fuzz targets share: an independent CRC32C and wire-frame encoder (so a harness
//! can build frames, well-formed or not, without trusting the codec under test), and a reader
//! that hands bytes out in small pieces as a socket does.
//!
//! Included by each target with `mod common;`; not every target uses every helper.

#![allow(dead_code)]

use std::io::Read;

/// CRC32C (Castagnoli), bit by bit.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A wire frame as docs/wire-protocol.md specifies it, with any type byte.
pub fn wire_frame(kind: u8, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + payload.len());
    f.extend_from_slice(b"FLWP");
    f.push(faultline::wire::WIRE_VERSION);
    f.push(kind);
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let crc = crc32c(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// Rewrites the CRC32C trailer of every frame-shaped chunk of a wire byte stream, front to
/// back, until the stream stops looking like frames: a mutation-based fuzzer cannot guess a
/// checksum, and without this it would hardly ever get past one.
pub fn fix_checksums(stream: &mut [u8]) {
    use faultline::wire::frame::{HEADER_LEN, MAX_PAYLOAD, TRAILER_LEN};
    let mut pos = 0;
    while stream.len() - pos >= HEADER_LEN + TRAILER_LEN {
        let h = &stream[pos..pos + HEADER_LEN];
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if len > MAX_PAYLOAD {
            return;
        }
        let end = pos + HEADER_LEN + len as usize;
        if end + TRAILER_LEN > stream.len() {
            return;
        }
        let crc = crc32c(&stream[pos..end]);
        stream[end..end + TRAILER_LEN].copy_from_slice(&crc.to_le_bytes());
        pos = end + TRAILER_LEN;
    }
}

/// A byte source that hands out at most `chunk` bytes per read and counts what it gave.
pub struct Chunked<'a> {
    pub data: &'a [u8],
    pub pos: usize,
    pub chunk: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], chunk: usize) -> Self {
        Self {
            data,
            pos: 0,
            chunk: chunk.max(1),
        }
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
