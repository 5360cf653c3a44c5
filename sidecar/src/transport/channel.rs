//! One authenticated channel (main or urgent) as a reader and a writer over the same
//! connection: TLS or plaintext as the migration's [`Protection`] says.

use std::net::{TcpStream, ToSocketAddrs};

use faultline::tls::Stream;
use std::time::Duration;

use anyhow::Context;
use faultline::wire::WireError;
use faultline::wire::frame::FrameReader;
use faultline::wire::handshake::{self, Channel, LayoutDigest, Secret};

use crate::migration::Stop;
use crate::transport::Protection;

/// How long the source waits for a TCP connection to the target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a side may take to answer a control message before the other gives up on it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a thread blocked reading a channel looks up to check whether it should stop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A connected, authenticated channel: reader and writer halves of one socket.
pub struct Conn {
    pub reader: FrameReader<Stream>,
    pub writer: Stream,
}

impl Conn {
    /// Splits an authenticated connection into a reader and a writer.
    pub fn new(stream: Stream) -> Result<Self, Stop> {
        let reader = FrameReader::new(stream.try_clone().context("clone socket")?);
        Ok(Self {
            reader,
            writer: stream,
        })
    }

    /// Another reader and writer on the same socket. The reader buffers nothing between
    /// frames, so a new one carries on exactly where the old one stopped.
    pub fn try_clone(&self) -> Result<Self, Stop> {
        Self::new(self.writer.try_clone().context("clone socket")?)
    }

    /// Source: dials the target sidecar at `peer`, protects the connection as `protection`
    /// says, and authenticates `channel` of migration `id` with the shared secret and this
    /// VM's layout digest.
    pub fn connect(
        protection: &Protection,
        peer: &str,
        channel: Channel,
        id: &str,
        secret: &Secret,
        digest: &LayoutDigest,
    ) -> Result<Self, Stop> {
        let addr = peer
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve peer {peer}"))?
            .next()
            .ok_or_else(|| Stop::failed(format!("peer {peer} resolves to nothing")))?;
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("cannot connect to the target sidecar at {peer}"))?;
        stream.set_nodelay(true).context("TCP_NODELAY")?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .context("read timeout")?;
        let stream = protection
            .dial(stream)
            .with_context(|| format!("TLS handshake with the target at {peer} failed"))?;
        let mut conn = Self::new(stream)?;
        handshake::client(
            &mut conn.reader,
            &mut conn.writer,
            channel,
            id,
            secret,
            digest,
        )
        .with_context(|| format!("handshake with the target at {peer} failed"))?;
        Ok(conn)
    }

    /// Makes reads return a timeout after `every`, so the reading thread can look up.
    pub fn poll_every(&self, every: Duration) {
        let _ = self.reader.get_ref().set_read_timeout(Some(every));
    }

    /// Ends the connection both ways (the peer's reads see it closed).
    pub fn shutdown(&self) {
        let _ = self.writer.shutdown();
    }
}

/// Whether a read failed only because its timeout passed (see [`Conn::poll_every`]).
pub fn is_timeout(e: &WireError) -> bool {
    matches!(e, WireError::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ))
}
