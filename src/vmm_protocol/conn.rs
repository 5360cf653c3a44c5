//! A framed, descriptor-carrying connection over a Unix stream socket.
//!
//! Reading waits as long as it takes for a frame to *start*, then gives the rest of the frame
//! a bounded time to arrive, so a peer that sends half a frame and stalls gets an error instead
//! of holding the connection forever.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::frame::{FrameError, FrameHeader, FrameKind, HEADER_LEN};
use crate::sys::fdpass;

/// How long the rest of a frame may take to arrive once its first byte has.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    pub json: Vec<u8>,
    pub blob: Vec<u8>,
    /// Descriptors that arrived with any byte of this frame.
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("peer closed the connection")]
    Closed,
    #[error("frame truncated: {got} of {expected} bytes arrived before {why}")]
    Truncated {
        expected: u64,
        got: u64,
        why: &'static str,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Connection {
    stream: UnixStream,
    frame_timeout: Duration,
}

impl Connection {
    pub fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            frame_timeout: FRAME_TIMEOUT,
        }
    }

    pub fn with_frame_timeout(mut self, timeout: Duration) -> Self {
        self.frame_timeout = timeout;
        self
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Reads the next frame. `Err(ConnError::Closed)` means a clean end between frames.
    pub fn read_frame(&mut self) -> Result<Frame, ConnError> {
        let mut fds = Vec::new();
        let mut header = [0u8; HEADER_LEN];
        // The first byte may take forever (an idle client); the rest must not.
        let first = self.recv_some(&mut header, &mut fds, None)?;
        if first == 0 {
            return Err(ConnError::Closed);
        }
        let deadline = Instant::now() + self.frame_timeout;
        self.fill(
            &mut header[first..],
            &mut fds,
            deadline,
            HEADER_LEN as u64,
            first as u64,
        )?;
        let header = FrameHeader::decode(&header)?;
        let total = HEADER_LEN as u64 + u64::from(header.json_len) + header.blob_len;
        let mut json = vec![0u8; header.json_len as usize];
        self.fill(&mut json, &mut fds, deadline, total, HEADER_LEN as u64)?;
        let mut blob = vec![0u8; header.blob_len as usize];
        let before_blob = HEADER_LEN as u64 + u64::from(header.json_len);
        self.fill(&mut blob, &mut fds, deadline, total, before_blob)?;
        Ok(Frame {
            header,
            json,
            blob,
            fds,
        })
    }

    fn fill(
        &self,
        mut buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
        expected: u64,
        mut got: u64,
    ) -> Result<(), ConnError> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnError::Truncated {
                    expected,
                    got,
                    why: "the frame timeout",
                });
            }
            let n = self.recv_some(buf, fds, Some(left))?;
            if n == usize::MAX {
                continue; // poll timed out; the loop re-checks the deadline
            }
            if n == 0 {
                return Err(ConnError::Truncated {
                    expected,
                    got,
                    why: "the peer closed the connection",
                });
            }
            got += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// One `recvmsg`, after waiting up to `timeout` for data (`None`: forever). Returns
    /// `usize::MAX` when the wait timed out.
    fn recv_some(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        timeout: Option<Duration>,
    ) -> Result<usize, ConnError> {
        if let Some(t) = timeout {
            let mut pfd = [PollFd::new(&self.stream, PollFlags::IN)];
            let ts = rustix::time::Timespec {
                tv_sec: t.as_secs() as i64,
                tv_nsec: i64::from(t.subsec_nanos()),
            };
            match rustix::event::poll(&mut pfd, Some(&ts)) {
                Ok(0) => return Ok(usize::MAX),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => return Ok(usize::MAX),
                Err(e) => return Err(ConnError::Io(e.into())),
            }
        }
        loop {
            match fdpass::recv_with_fds(self.stream.as_fd(), buf, fds) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(0),
                other => return other.map_err(ConnError::Io),
            }
        }
    }

    /// Writes one frame, attaching `fds` to its first byte.
    pub fn write_frame(
        &mut self,
        kind: FrameKind,
        id: u32,
        json: &[u8],
        blob: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> std::io::Result<()> {
        let json_len = u32::try_from(json.len())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "JSON too long"))?;
        let header = FrameHeader::new(kind, id, json_len, blob.len() as u64);
        let mut head = Vec::with_capacity(HEADER_LEN + json.len());
        head.extend_from_slice(&header.encode());
        head.extend_from_slice(json);
        fdpass::send_all_with_fds(&self.stream, &head, fds)?;
        if !blob.is_empty() {
            (&self.stream).write_all(blob)?;
        }
        Ok(())
    }

    /// Writes raw bytes, for tests that speak the protocol badly on purpose.
    pub fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (&self.stream).write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_fds_cross() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Connection::new(a), Connection::new(b));
        let memfd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let blob = vec![7u8; 300_000];
        let writer = std::thread::spawn(move || {
            a.write_frame(FrameKind::Request, 5, b"{}", &blob, &[memfd.as_fd()])
                .unwrap();
            a
        });
        let f = b.read_frame().unwrap();
        assert_eq!(f.header.id, 5);
        assert_eq!(f.json, b"{}");
        assert_eq!(f.blob.len(), 300_000);
        assert_eq!(f.fds.len(), 1);
        drop(writer.join().unwrap());
        assert!(matches!(b.read_frame(), Err(ConnError::Closed)));
    }

    #[test]
    fn truncated_and_stalled_frames_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = Connection::new(a);
        let mut b = Connection::new(b).with_frame_timeout(Duration::from_millis(200));
        let header = FrameHeader::new(FrameKind::Request, 1, 10, 0).encode();
        a.write_raw(&header).unwrap();
        a.write_raw(b"{\"op\"").unwrap();
        // Stalled: the rest never comes.
        assert!(matches!(
            b.read_frame(),
            Err(ConnError::Truncated {
                why: "the frame timeout",
                ..
            })
        ));
        drop(a);
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = Connection::new(a);
        let mut b = Connection::new(b);
        a.write_raw(&header[..10]).unwrap();
        drop(a);
        assert!(matches!(
            b.read_frame(),
            Err(ConnError::Truncated { got: 10, .. })
        ));
    }

    #[test]
    fn garbage_is_a_frame_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = Connection::new(a);
        let mut b = Connection::new(b);
        a.write_raw(&[0xAB; 64]).unwrap();
        assert!(matches!(
            b.read_frame(),
            Err(ConnError::Frame(FrameError::BadMagic(_)))
        ));
    }
}
