//! Fuzz target `vmm_frames`: the VMM protocol's framing, as either end reads it
//! (`faultline::vmm_protocol::frame::FrameHeader::decode` and
//! `faultline::vmm_protocol::conn::Connection::read_frame`).
//!
//! A fuzzer-chosen 24-byte header is decoded alone; then a stream of raw bytes and frames
//! (any kind number, any lengths, with descriptors attached) is written into a Unix socket
//! pair whose writing end is then closed, and `read_frame` reads until it stops.
//!
//! Invariants, beyond "never panics":
//! - a header that decodes re-encodes to the same 24 bytes, and its lengths are within the
//!   limits; one that does not is refused for the reason its bytes give;
//! - every frame read is exactly the next bytes of the stream (header, JSON, blob);
//! - reading stops with `Closed` exactly at the end of the stream, with `Truncated` counting
//!   the bytes that really arrived, or with the header error of the bytes at that point;
//! - no more descriptors arrive than were sent.

#![no_main]

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use faultline::sys::fdpass;
use faultline::vmm_protocol::frame::{
    FrameError, FrameHeader, HEADER_LEN, MAX_BLOB_LEN, MAX_JSON_LEN,
};
use faultline::vmm_protocol::{ConnError, Connection};
use libfuzzer_sys::fuzz_target;

/// Bytes written into the socket pair per input, at most (plus one item).
const SOCKET_BUDGET: usize = 64 << 10;

#[derive(Arbitrary, Debug)]
enum Item {
    Raw(Vec<u8>),
    Frame {
        version: u16,
        kind: u16,
        id: u32,
        json: Vec<u8>,
        blob: Vec<u8>,
        /// Lengths claimed beyond (or short of) what follows.
        json_len_delta: i8,
        blob_len_delta: i8,
        fds: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    header: [u8; HEADER_LEN],
    items: Vec<Item>,
}

/// A descriptor to attach to frames (each send passes it again).
fn memfd() -> &'static OwnedFd {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| {
        rustix::fs::memfd_create("fuzz", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd")
    })
}

fn header(version: u16, kind: u16, id: u32, json_len: u32, blob_len: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(b"FLVM");
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&kind.to_le_bytes());
    b[8..12].copy_from_slice(&id.to_le_bytes());
    b[12..16].copy_from_slice(&json_len.to_le_bytes());
    b[16..24].copy_from_slice(&blob_len.to_le_bytes());
    b
}

fn check_header(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    let r = FrameHeader::decode(b);
    match &r {
        Ok(h) => {
            assert_eq!(&h.encode(), b, "a decoded header re-encodes to its bytes");
            assert!(h.json_len <= MAX_JSON_LEN && h.blob_len <= MAX_BLOB_LEN);
        }
        Err(FrameError::BadMagic(m)) => assert_ne!(m, b"FLVM"),
        Err(FrameError::UnsupportedVersion(v)) => {
            assert_eq!(&b[..4], b"FLVM");
            assert_ne!(*v, faultline::vmm_protocol::PROTOCOL_VERSION);
        }
        Err(FrameError::UnknownKind(k)) => assert!(*k == 0 || *k > 4),
        Err(FrameError::JsonTooLong(n)) => assert!(*n > MAX_JSON_LEN),
        Err(FrameError::BlobTooLong(n)) => assert!(*n > MAX_BLOB_LEN),
    }
    r
}

fuzz_target!(|input: Input| {
    let _ = check_header(&input.header);

    let (mut tx, rx) = UnixStream::pair().expect("socket pair");
    let mut stream = Vec::new();
    let mut fds_sent = 0;
    for item in &input.items {
        // Everything is written before anything is read: stay well within a socket buffer.
        if stream.len() > SOCKET_BUDGET {
            break;
        }
        match item {
            Item::Raw(b) => {
                tx.write_all(b).expect("send");
                stream.extend_from_slice(b);
            }
            Item::Frame {
                version,
                kind,
                id,
                json,
                blob,
                json_len_delta,
                blob_len_delta,
                fds,
            } => {
                let json_len = (json.len() as u32).wrapping_add_signed(i32::from(*json_len_delta));
                let blob_len = (blob.len() as u64).wrapping_add_signed(i64::from(*blob_len_delta));
                let mut bytes = header(*version, *kind, *id, json_len, blob_len).to_vec();
                bytes.extend_from_slice(json);
                bytes.extend_from_slice(blob);
                let n = usize::from(*fds % 4);
                let fd = memfd().as_fd();
                fdpass::send_all_with_fds(&tx, &bytes, &vec![fd; n]).expect("send");
                fds_sent += n;
                stream.extend_from_slice(&bytes);
            }
        }
    }
    tx.shutdown(std::net::Shutdown::Write).expect("shutdown");

    let mut conn = Connection::new(rx);
    let mut pos = 0usize;
    let mut fds_received = 0;
    loop {
        match conn.read_frame() {
            Ok(f) => {
                let h = check_header(
                    stream[pos..pos + HEADER_LEN]
                        .try_into()
                        .expect("a frame starts with a whole header"),
                )
                .expect("the header read is the one in the stream");
                assert_eq!(h, f.header);
                pos += HEADER_LEN;
                assert_eq!(f.json, stream[pos..pos + f.json.len()]);
                assert_eq!(f.json.len(), h.json_len as usize);
                pos += f.json.len();
                assert_eq!(f.blob, stream[pos..pos + f.blob.len()]);
                assert_eq!(f.blob.len() as u64, h.blob_len);
                pos += f.blob.len();
                fds_received += f.fds.len();
            }
            Err(ConnError::Closed) => {
                assert_eq!(pos, stream.len(), "closed between frames only at the end");
                break;
            }
            Err(ConnError::Truncated { expected, got, .. }) => {
                assert!(got < expected);
                assert_eq!(got, (stream.len() - pos) as u64, "counts what arrived");
                break;
            }
            Err(ConnError::Frame(e)) => {
                let b: [u8; HEADER_LEN] = stream[pos..pos + HEADER_LEN]
                    .try_into()
                    .expect("a header error comes from a whole header");
                assert_eq!(check_header(&b), Err(e));
                break;
            }
            Err(ConnError::Io(e)) => panic!("socket error on a healthy socket: {e}"),
        }
    }
    assert!(fds_received <= fds_sent);
});
