//! The 24-byte frame header and its validation. Pure functions over bytes, so every decoder
//! path can be unit-tested and fuzzed without a socket.

/// `FLVM` in ASCII: the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FLVM";
pub const HEADER_LEN: usize = 24;
/// Largest JSON part of a frame.
pub const MAX_JSON_LEN: u32 = 1 << 20;
/// Largest binary part of a frame (a dirty bitmap for 64 GiB is 2 MiB; a vCPU state blob for
/// 64 vCPUs is well under 1 MiB).
pub const MAX_BLOB_LEN: u64 = 256 << 20;

/// What a frame is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u16)]
pub enum FrameKind {
    /// Client → VMM.
    Request = 1,
    /// VMM → client: the request succeeded.
    Reply = 2,
    /// VMM → client: the request failed; the JSON part is an [`super::ErrorReply`].
    Error = 3,
    /// VMM → client, unsolicited (id 0).
    Event = 4,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Request,
            2 => Self::Reply,
            3 => Self::Error,
            4 => Self::Event,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: FrameKind,
    pub id: u32,
    pub json_len: u32,
    pub blob_len: u64,
}

/// A header that cannot be accepted. After any of these the byte stream cannot be trusted to
/// be at a frame boundary, so the connection must be closed after replying.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a Faultline VMM protocol frame")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this end speaks {ours})", ours = super::PROTOCOL_VERSION)]
    UnsupportedVersion(u16),
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("JSON part of {0} bytes exceeds the {MAX_JSON_LEN}-byte limit")]
    JsonTooLong(u32),
    #[error("binary part of {0} bytes exceeds the {MAX_BLOB_LEN}-byte limit")]
    BlobTooLong(u64),
}

impl FrameHeader {
    pub fn new(kind: FrameKind, id: u32, json_len: u32, blob_len: u64) -> Self {
        Self {
            version: super::PROTOCOL_VERSION,
            kind,
            id,
            json_len,
            blob_len,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.id.to_le_bytes());
        b[12..16].copy_from_slice(&self.json_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.blob_len.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != super::PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind_raw = u16::from_le_bytes([b[6], b[7]]);
        let kind = FrameKind::from_u16(kind_raw).ok_or(FrameError::UnknownKind(kind_raw))?;
        let id = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let json_len = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        let mut blob = [0u8; 8];
        blob.copy_from_slice(&b[16..24]);
        let blob_len = u64::from_le_bytes(blob);
        if json_len > MAX_JSON_LEN {
            return Err(FrameError::JsonTooLong(json_len));
        }
        if blob_len > MAX_BLOB_LEN {
            return Err(FrameError::BlobTooLong(blob_len));
        }
        Ok(Self {
            version,
            kind,
            id,
            json_len,
            blob_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let h = FrameHeader::new(FrameKind::Reply, 7, 12, 4096);
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn rejects() {
        let good = FrameHeader::new(FrameKind::Request, 1, 2, 0).encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::BadMagic(_))
        ));
        let mut b = good;
        b[4] = 9;
        assert_eq!(
            FrameHeader::decode(&b),
            Err(FrameError::UnsupportedVersion(9))
        );
        let mut b = good;
        b[6] = 77;
        assert_eq!(FrameHeader::decode(&b), Err(FrameError::UnknownKind(77)));
        let b = FrameHeader::new(FrameKind::Request, 1, MAX_JSON_LEN + 1, 0).encode();
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::JsonTooLong(_))
        ));
        let b = FrameHeader::new(FrameKind::Request, 1, 0, MAX_BLOB_LEN + 1).encode();
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(FrameError::BlobTooLong(_))
        ));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::array::uniform24(any::<u8>())) {
            let _ = FrameHeader::decode(&bytes);
        }
    }
}
