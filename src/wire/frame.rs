//! Wire frames: `FLWP`, version, type, flags, length, payload, CRC32C of everything before it.
//! A frame whose checksum does not match is rejected whole, so nothing of it is installed.

use std::io::{Read, Write};

pub const MAGIC: [u8; 4] = *b"FLWP";
pub const HEADER_LEN: usize = 12;
/// Bytes after the payload: its CRC32C.
pub const TRAILER_LEN: usize = 4;
/// Largest payload: fits the switch-over message of the largest VM (a 2 MiB bitmap for
/// 64 GiB plus the state of 64 vCPUs) and page batches with room to spare.
pub const MAX_PAYLOAD: u32 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    Challenge = 2,
    Auth = 3,
    AuthOk = 4,
    Error = 5,
    /// JSON control messages (start, ready, round end, prepared, commit, ...).
    Control = 10,
    Pages = 12,
    /// The switch-over message: the pages the target must not trust, and the VM state.
    SwitchOver = 14,
    /// After a reconnect in post-copy: the pages the target still needs.
    Needed = 16,
    FaultRequest = 20,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Challenge,
            3 => Self::Auth,
            4 => Self::AuthOk,
            5 => Self::Error,
            10 => Self::Control,
            12 => Self::Pages,
            14 => Self::SwitchOver,
            16 => Self::Needed,
            20 => Self::FaultRequest,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("network I/O failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("bad magic {0:02x?}: the peer does not speak the Faultline wire protocol")]
    BadMagic([u8; 4]),
    #[error("peer speaks wire protocol version {0}, this sidecar speaks {ours}", ours = super::WIRE_VERSION)]
    Version(u8),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error(
        "checksum mismatch on a {kind:?} frame (CRC32C {got:#010x}, expected {expected:#010x}): the frame was discarded"
    )]
    Checksum {
        kind: FrameType,
        got: u32,
        expected: u32,
    },
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected {
        expected: &'static str,
        got: FrameType,
    },
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    Auth(String),
}

impl WireError {
    pub fn malformed(what: &'static str, why: impl Into<String>) -> Self {
        Self::Malformed {
            what,
            why: why.into(),
        }
    }
}

fn io(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// Bytes a frame with a payload of `payload_len` bytes takes on the wire: what both sides count
/// as transferred.
pub const fn frame_len(payload_len: usize) -> u64 {
    (HEADER_LEN + payload_len + TRAILER_LEN) as u64
}

/// Writes one frame whose payload is the concatenation of `parts` (so callers need not copy
/// page data into one buffer first).
pub fn write_frame(
    w: &mut impl Write,
    kind: FrameType,
    flags: u16,
    parts: &[&[u8]],
) -> Result<(), WireError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or(WireError::TooLong(u32::MAX))?;
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4] = super::WIRE_VERSION;
    header[5] = kind as u8;
    header[6..8].copy_from_slice(&flags.to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32c::crc32c(&header);
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    let mut slices: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(parts.len() + 2);
    slices.push(std::io::IoSlice::new(&header));
    slices.extend(parts.iter().map(|p| std::io::IoSlice::new(p)));
    let crc_bytes = crc.to_le_bytes();
    slices.push(std::io::IoSlice::new(&crc_bytes));
    write_all_vectored(w, &mut slices).map_err(io)
}

fn write_all_vectored(
    w: &mut impl Write,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads frames into a reused buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

/// One frame as read: its type, flags and payload (borrowed from the reader's buffer).
pub struct RawFrame<'a> {
    pub kind: FrameType,
    pub flags: u16,
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// The bytes this frame took on the wire.
    pub fn wire_len(&self) -> u64 {
        frame_len(self.payload.len())
    }
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Reads and verifies the next frame. `Err(Closed)` at a clean end between frames.
    pub fn read(&mut self) -> Result<RawFrame<'_>, WireError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut header[got..]) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        let magic = [header[0], header[1], header[2], header[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if header[4] != super::WIRE_VERSION {
            return Err(WireError::Version(header[4]));
        }
        let kind = FrameType::from_u8(header[5]).ok_or(WireError::UnknownType(header[5]))?;
        let flags = u16::from_le_bytes([header[6], header[7]]);
        let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLong(len));
        }
        self.buf.resize(len as usize + TRAILER_LEN, 0);
        self.inner.read_exact(&mut self.buf).map_err(io)?;
        let (payload, crc) = self.buf.split_at(len as usize);
        let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let got = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
        if got != expected {
            return Err(WireError::Checksum {
                kind,
                got,
                expected,
            });
        }
        Ok(RawFrame {
            kind,
            flags,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_corruption() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameType::Pages, 3, &[b"abc", b"def"]).unwrap();
        let mut r = FrameReader::new(&wire[..]);
        let f = r.read().unwrap();
        assert_eq!(f.wire_len(), wire.len() as u64);
        assert_eq!(f.kind, FrameType::Pages);
        assert_eq!(f.flags, 3);
        assert_eq!(f.payload, b"abcdef");
        assert!(matches!(r.read(), Err(WireError::Closed)));

        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x10;
            let mut r = FrameReader::new(&bad[..]);
            assert!(r.read().is_err(), "flipping byte {i} went unnoticed");
        }
        let mut r = FrameReader::new(&wire[..wire.len() - 1]);
        assert!(matches!(r.read(), Err(WireError::Closed)));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = FrameReader::new(&bytes[..]);
            while r.read().is_ok() {}
        }
    }
}
