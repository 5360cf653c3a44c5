//! A blocking TLS stream over a TCP socket that, like the socket, can be cloned so one thread
//! reads while another writes (the sidecar reads faults and control messages on one thread and
//! streams pages on another).
//!
//! rustls keeps one state per connection, so the clones share it behind a mutex, held only
//! while records are encrypted or decrypted, never while the socket blocks. Two more locks keep
//! the socket's byte order equal to the record order: one for the sending side (encrypt and
//! send as one step) and one for the receiving side (receive and decrypt as one step).
//! Ciphertext read but not yet decrypted lives in the shared state too, so a new clone reads on
//! exactly where an earlier one stopped.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use crate::sync::lock;

/// How much ciphertext one socket read takes.
const RECV_CHUNK: usize = 64 * 1024;

struct State {
    conn: Connection,
    /// Ciphertext received but not yet handed to rustls.
    pending: Pending,
}

/// Ciphertext waiting for rustls, which takes at most a few KiB per `read_tls` while it still
/// holds plaintext the reader has not taken. Consumed from a moving start rather than drained
/// from the front: draining a 64 KiB socket read 4 KiB at a time moved every byte of it about
/// eight times over, which cost more than decrypting it.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    start: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.start == self.bytes.len()
    }

    /// Hands rustls what it takes of the waiting bytes.
    fn feed(&mut self, conn: &mut Connection) -> io::Result<()> {
        let mut rest = &self.bytes[self.start..];
        let before = rest.len();
        conn.read_tls(&mut rest)?;
        self.start += before - rest.len();
        if self.is_empty() {
            self.bytes.clear();
            self.start = 0;
        }
        Ok(())
    }

    /// Keeps what rustls did not take of a socket read.
    fn keep(&mut self, rest: &[u8]) {
        self.bytes.drain(..self.start);
        self.start = 0;
        self.bytes.extend_from_slice(rest);
    }
}

struct Shared {
    state: Mutex<State>,
    /// Held while encrypting and sending: the ciphertext buffer lives here.
    send: Mutex<Vec<u8>>,
    /// Held while receiving and decrypting.
    recv: Mutex<Vec<u8>>,
}

/// One TLS connection; clones share it (see the module comment).
pub struct TlsStream {
    sock: TcpStream,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer", &self.sock.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    /// Dials: runs the handshake as a client on a connected socket.
    pub fn client(
        sock: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Self> {
        let conn = ClientConnection::new(config, name).map_err(tls_error)?;
        Self::handshake(sock, conn.into())
    }

    /// Accepts: runs the handshake as a server on an accepted socket.
    pub fn server(sock: TcpStream, config: Arc<ServerConfig>) -> io::Result<Self> {
        let conn = ServerConnection::new(config).map_err(tls_error)?;
        Self::handshake(sock, conn.into())
    }

    fn handshake(mut sock: TcpStream, mut conn: Connection) -> io::Result<Self> {
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        // TLS 1.3 servers may send records (session tickets) right after the handshake; they
        // are read with the data that follows them.
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        // Every write is encrypted and sent at once, so rustls never holds plaintext back, and
        // a vectored write (a whole frame) becomes one socket write.
        conn.set_buffer_limit(None);
        Ok(Self {
            sock,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    conn,
                    pending: Pending::default(),
                }),
                send: Mutex::new(Vec::new()),
                recv: Mutex::new(vec![0; RECV_CHUNK]),
            }),
        })
    }

    /// Another handle on the same connection (for a reader or writer on another thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            sock: self.sock.try_clone()?,
            shared: self.shared.clone(),
        })
    }

    /// The underlying socket (for timeouts, shutdown and addresses).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The peer's certificates, end entity first.
    pub fn peer_certificates(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        lock(&self.shared.state)
            .conn
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
    }

    /// Whether bytes received are waiting to be read: a poll on the socket would not see them.
    pub fn buffered(&self) -> bool {
        let mut st = lock(&self.shared.state);
        if !st.pending.is_empty() {
            return true;
        }
        st.conn
            .process_new_packets()
            .map_or(true, |io| io.plaintext_bytes_to_read() > 0)
    }

    /// Sends what rustls has queued (alerts, key updates), in record order.
    fn flush_queued(&self) -> io::Result<()> {
        let mut out = lock(&self.shared.send);
        out.clear();
        {
            let mut st = lock(&self.shared.state);
            while st.conn.wants_write() {
                st.conn.write_tls(&mut *out)?;
            }
        }
        (&self.sock).write_all(&out)
    }

    fn write_parts(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.shared.send);
        out.clear();
        let n = {
            let mut st = lock(&self.shared.state);
            let n = st.conn.writer().write_vectored(bufs)?;
            while st.conn.wants_write() {
                st.conn.write_tls(&mut *out)?;
            }
            n
        };
        (&self.sock).write_all(&out)?;
        Ok(n)
    }

    fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut chunk = lock(&self.shared.recv);
        loop {
            let wants_write = {
                let mut st = lock(&self.shared.state);
                match st.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if !st.pending.is_empty() {
                    let State { conn, pending } = &mut *st;
                    pending.feed(conn)?;
                    conn.process_new_packets().map_err(tls_error)?;
                    continue;
                }
                st.conn.wants_write()
            };
            if wants_write {
                self.flush_queued()?;
            }
            // Nothing decrypted and nothing pending: wait for the socket, without the state
            // lock, so the writer goes on meanwhile. A read timeout surfaces as the socket's.
            let n = (&self.sock).read(&mut chunk)?;
            let mut st = lock(&self.shared.state);
            let State { conn, pending } = &mut *st;
            let mut rest: &[u8] = &chunk[..n];
            if n == 0 {
                // End of stream: rustls reports a clean close_notify as 0 and a cut as an error.
                conn.read_tls(&mut rest)?;
            } else {
                conn.read_tls(&mut rest)?;
                pending.keep(rest);
            }
            conn.process_new_packets().map_err(tls_error)?;
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_plain(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_parts(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_parts(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A migration connection: TLS, or plaintext where a policy says the network is trusted.
#[derive(Debug)]
pub enum Stream {
    Tls(TlsStream),
    Plain(TcpStream),
}

impl Stream {
    pub fn socket(&self) -> &TcpStream {
        match self {
            Self::Tls(t) => t.socket(),
            Self::Plain(s) => s,
        }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tls(t) => Self::Tls(t.try_clone()?),
            Self::Plain(s) => Self::Plain(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(t)
    }

    /// Ends the connection both ways (the peer's reads see it closed).
    pub fn shutdown(&self) -> io::Result<()> {
        self.socket().shutdown(Shutdown::Both)
    }

    /// Ends this side's sending; the peer reads the end, and may still send.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.socket().shutdown(Shutdown::Write)
    }

    /// Whether bytes already received wait to be read, which a poll on the socket would not
    /// report (TLS decrypts ahead of the reader).
    pub fn buffered(&self) -> bool {
        match self {
            Self::Tls(t) => t.buffered(),
            Self::Plain(_) => false,
        }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket().peer_addr()
    }

    /// Whether the bytes are encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }
}

impl std::os::fd::AsFd for Stream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.socket().as_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tls(t) => t.read(buf),
            Self::Plain(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tls(t) => t.write(buf),
            Self::Plain(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tls(t) => t.write_vectored(bufs),
            Self::Plain(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tls(t) => t.flush(),
            Self::Plain(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::tls::pinned;

    fn pair(server_secret: [u8; 32]) -> (io::Result<TlsStream>, io::Result<TlsStream>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let r = TlsStream::server(s, pinned::target_config(&server_secret, "m").unwrap());
            if r.is_err() {
                // Tell the client at once (as the sidecar does by closing).
                drop(r);
                return Err(io::Error::other("refused"));
            }
            r
        });
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let client = TlsStream::client(
            c,
            pinned::source_config(&[1; 32], "m").unwrap(),
            pinned::server_name().unwrap(),
        );
        (client, server.join().unwrap())
    }

    #[test]
    fn clones_read_and_write_concurrently_and_bytes_arrive_intact() {
        const TOTAL: usize = 3_000_000;
        let (client, server) = pair([1; 32]);
        let client = client.unwrap();
        let mut server = server.unwrap();
        let data: Vec<u8> = (0..TOTAL as u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut writer = client.try_clone().unwrap();
        let sent = data.clone();
        let w = std::thread::spawn(move || {
            for c in sent.chunks(100_000) {
                let n = writer
                    .write_vectored(&[IoSlice::new(&c[..10]), IoSlice::new(&c[10..])])
                    .unwrap();
                assert_eq!(n, c.len());
            }
        });
        // The server echoes in another thread while the client reads on a third.
        let mut echo = server.try_clone().unwrap();
        let e = std::thread::spawn(move || {
            let mut buf = vec![0; 50_000];
            let mut total = 0;
            while total < TOTAL {
                let n = server.read(&mut buf).unwrap();
                echo.write_all(&buf[..n]).unwrap();
                total += n;
            }
        });
        let mut back = vec![0; data.len()];
        let mut reader = client.try_clone().unwrap();
        reader.read_exact(&mut back).unwrap();
        w.join().unwrap();
        e.join().unwrap();
        assert!(back == data);
    }

    #[test]
    fn a_peer_with_another_secret_cannot_connect() {
        let (client, server) = pair([2; 32]);
        assert!(server.is_err());
        assert!(client.is_err());
    }
}
