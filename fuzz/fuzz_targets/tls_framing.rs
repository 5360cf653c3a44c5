//! Fuzz target `tls_framing`: the migration stream as it really travels, wire frames inside
//! TLS 1.3 with the per-migration pinned identities (`faultline::tls::pinned`), in memory.
//!
//! `faultline::tls::TlsStream` needs a TCP socket, and a real handshake per input would cap
//! the campaign at a few thousand executions a second; so the harness keeps one source and
//! one target session (rustls, with the project's configurations) across inputs, and the
//! receiving side reads through a reader shaped like `TlsStream`'s: ciphertext arrives in
//! pieces, what rustls does not take at once waits in a pending buffer, and `FrameReader`
//! reads the plaintext. Three modes:
//!
//! - legitimate: a peer writes the fuzzer's plaintext (raw bytes and well-formed frames) in
//!   fuzzer-chosen writes, so record boundaries fall anywhere in a frame; the ciphertext
//!   arrives in fuzzer-chosen pieces and the reader asks for fuzzer-chosen read sizes, in
//!   either direction. Invariant: TLS is transparent; `FrameReader` decodes exactly what it
//!   decodes from the plaintext directly, and every byte sent arrives.
//! - tampered: the same, with the ciphertext altered in flight (a byte changed, bytes inserted
//!   or removed, the stream cut). Invariant: the receiver never hands out a byte that was not
//!   sent, in order; it stops with an error or at the cut. The session is set up again after.
//! - hostile handshake: a fresh target (or source) reads bytes from a peer without the
//!   migration's identity, optionally a real first flight with edits. Invariant: the
//!   handshake never completes and no plaintext is ever delivered.

#![no_main]

mod common;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use faultline::tls::pinned;
use faultline::wire::FrameReader;
use libfuzzer_sys::fuzz_target;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use common::Chunked;

const SECRET: [u8; 32] = [0x5a; 32];
const MIGRATION: &str = "fuzz/tls-framing";

struct Fixed {
    source: Arc<ClientConfig>,
    target: Arc<ServerConfig>,
    /// A real ClientHello from the source, and the target's answer to it.
    client_hello: Vec<u8>,
    server_flight: Vec<u8>,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let source = pinned::source_config(&SECRET, MIGRATION).expect("source config");
        let target = pinned::target_config(&SECRET, MIGRATION).expect("target config");
        let (mut c, mut s) = connections(&source, &target);
        let client_hello = drain(&mut c);
        feed_all(&mut s, &client_hello).expect("the target takes a real ClientHello");
        let server_flight = drain(&mut s);
        Fixed {
            source,
            target,
            client_hello,
            server_flight,
        }
    })
}

fn connections(source: &Arc<ClientConfig>, target: &Arc<ServerConfig>) -> (Connection, Connection) {
    let name = pinned::server_name().expect("server name");
    let c = ClientConnection::new(source.clone(), name).expect("client connection");
    let s = ServerConnection::new(target.clone()).expect("server connection");
    (c.into(), s.into())
}

/// Everything `conn` has to send.
fn drain(conn: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("writing to a Vec");
    }
    out
}

/// Hands all of `bytes` to `conn` and processes them.
fn feed_all(conn: &mut Connection, mut bytes: &[u8]) -> Result<(), rustls::Error> {
    while !bytes.is_empty() {
        conn.read_tls(&mut bytes).expect("reading from a slice");
        conn.process_new_packets()?;
    }
    Ok(())
}

struct Session {
    source: Connection,
    target: Connection,
}

impl Session {
    fn new() -> Self {
        let f = fixed();
        let (mut source, mut target) = connections(&f.source, &f.target);
        for _ in 0..10 {
            let flight = drain(&mut source);
            feed_all(&mut target, &flight).expect("the target accepts the source");
            let flight = drain(&mut target);
            feed_all(&mut source, &flight).expect("the source accepts the target");
            if !source.is_handshaking() && !target.is_handshaking() {
                // As `TlsStream` does: every write is encrypted at once.
                source.set_buffer_limit(None);
                target.set_buffer_limit(None);
                return Self { source, target };
            }
        }
        panic!("the pinned handshake did not complete");
    }
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

/// The receiving side of a session, read like `TlsStream` reads its socket. Returns end of
/// stream when the ciphertext of this input is used up (the session itself stays open).
struct Receiver<'a> {
    conn: &'a mut Connection,
    arrivals: VecDeque<Vec<u8>>,
    pending: Vec<u8>,
    read_cap: usize,
    delivered: Vec<u8>,
}

impl Read for Receiver<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let cap = buf.len().min(self.read_cap);
        let buf = &mut buf[..cap];
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => {
                    self.delivered.extend_from_slice(&buf[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let chunk = if self.pending.is_empty() {
                match self.arrivals.pop_front() {
                    Some(c) => c,
                    None => return Ok(0),
                }
            } else {
                std::mem::take(&mut self.pending)
            };
            let mut rest = &chunk[..];
            self.conn.read_tls(&mut rest)?;
            self.pending.extend_from_slice(rest);
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Raw(Vec<u8>),
    /// A well-formed frame, written in pieces cut at `cuts` (so records split it).
    Frame {
        kind: u8,
        flags: u16,
        payload: Vec<u8>,
        cuts: Vec<u16>,
    },
}

#[derive(Arbitrary, Debug)]
enum Tamper {
    Flip(u16, u8),
    Insert(u16, Vec<u8>),
    Remove(u16, u16),
    Cut(u16),
}

#[derive(Arbitrary, Debug)]
enum Case {
    Stream {
        to_source: bool,
        pieces: Vec<Piece>,
        arrivals: Vec<u16>,
        read_cap: u16,
        tamper: Option<Tamper>,
    },
    Handshake {
        to_source: bool,
        real_flight: bool,
        edits: Vec<(u16, u8)>,
        cut: Option<u16>,
        extra: Vec<u8>,
        arrivals: Vec<u16>,
    },
}

/// The writes a legitimate peer makes for `pieces`.
fn writes(pieces: &[Piece]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Raw(b) => out.push(b.clone()),
            Piece::Frame {
                kind,
                flags,
                payload,
                cuts,
            } => {
                let f = common::wire_frame(*kind, *flags, payload);
                let mut at = 0;
                for &c in cuts {
                    let end = (at + usize::from(c)).min(f.len());
                    out.push(f[at..end].to_vec());
                    at = end;
                }
                out.push(f[at..].to_vec());
            }
        }
    }
    out
}

/// `bytes` cut into pieces of the given sizes (cycled), none empty: an empty read means end
/// of stream to rustls.
fn split(bytes: &[u8], sizes: &[u16]) -> VecDeque<Vec<u8>> {
    let mut out = VecDeque::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let n = sizes
            .get(i % sizes.len().max(1))
            .map_or(bytes.len(), |&s| usize::from(s).max(1));
        let end = (at + n).min(bytes.len());
        out.push_back(bytes[at..end].to_vec());
        at = end;
        i += 1;
    }
    out
}

/// What `FrameReader` makes of `reader`: the frames, then how it stopped.
fn decode(reader: impl Read) -> (Vec<(u8, u16, Vec<u8>)>, String) {
    let mut r = FrameReader::new(reader);
    let mut frames = Vec::new();
    loop {
        match r.read() {
            Ok(f) => frames.push((f.kind as u8, f.flags, f.payload.to_vec())),
            Err(e) => return (frames, e.to_string()),
        }
    }
}

fn tamper(ct: &mut Vec<u8>, t: &Tamper) {
    let at = |i: u16, len: usize| usize::from(i) % (len + 1);
    match t {
        Tamper::Flip(i, x) => {
            if !ct.is_empty() {
                let i = usize::from(*i) % ct.len();
                ct[i] ^= x;
            }
        }
        Tamper::Insert(i, b) => {
            let i = at(*i, ct.len());
            ct.splice(i..i, b.iter().copied());
        }
        Tamper::Remove(i, n) => {
            let i = at(*i, ct.len());
            let end = (i + usize::from(*n)).min(ct.len());
            ct.drain(i..end);
        }
        Tamper::Cut(n) => ct.truncate(usize::from(*n)),
    }
}

fn stream(
    session: &mut Session,
    to_source: bool,
    pieces: &[Piece],
    arrivals: &[u16],
    read_cap: u16,
    t: Option<&Tamper>,
) -> bool {
    let (sender, receiver) = if to_source {
        (&mut session.target, &mut session.source)
    } else {
        (&mut session.source, &mut session.target)
    };
    let writes = writes(pieces);
    let plain: Vec<u8> = writes.concat();
    for w in &writes {
        // One write, one or more records (an empty write makes none).
        io::Write::write_all(&mut sender.writer(), w).expect("plaintext is accepted");
    }
    let mut ct = drain(sender);
    let mut intact = true;
    if let Some(t) = t {
        let before = ct.clone();
        tamper(&mut ct, t);
        intact = ct == before;
    }
    let mut rx = Receiver {
        conn: receiver,
        arrivals: split(&ct, arrivals),
        pending: Vec::new(),
        read_cap: usize::from(read_cap).max(1),
        delivered: Vec::new(),
    };
    let (frames, end) = decode(&mut rx);
    assert!(
        plain.starts_with(&rx.delivered),
        "the receiver handed out bytes that were not sent"
    );
    if !intact {
        // The session cannot be trusted any more (nor can it be resynchronized).
        return false;
    }
    // Transparent: the same frames as from the plaintext itself, and the same way to stop.
    let direct = decode(Chunked::new(&plain, usize::MAX));
    assert_eq!(
        (frames, end),
        direct,
        "TLS changed what FrameReader decoded"
    );
    // The rest of the stream arrives too, and the session is in step for the next input.
    // (`delivered` records every read, these too.)
    let before = rx.delivered.len();
    let mut rest = Vec::new();
    rx.read_to_end(&mut rest)
        .expect("the rest of an intact stream reads");
    assert_eq!(rx.delivered[before..], rest[..]);
    assert_eq!(rx.delivered, plain, "every byte sent arrives, in order");
    let back = drain(rx.conn);
    assert!(back.is_empty(), "the receiver has nothing to say");
    true
}

fn handshake(
    to_source: bool,
    real_flight: bool,
    edits: &[(u16, u8)],
    cut: Option<u16>,
    extra: &[u8],
    arrivals: &[u16],
) {
    let f = fixed();
    let mut conn: Connection = if to_source {
        let name = pinned::server_name().expect("server name");
        let mut c = ClientConnection::new(f.source.clone(), name)
            .expect("client connection")
            .into();
        drain(&mut c); // its ClientHello goes nowhere
        c
    } else {
        ServerConnection::new(f.target.clone())
            .expect("server connection")
            .into()
    };
    let mut bytes = if !real_flight {
        Vec::new()
    } else if to_source {
        f.server_flight.clone()
    } else {
        f.client_hello.clone()
    };
    for &(i, x) in edits {
        if !bytes.is_empty() {
            let i = usize::from(i) % bytes.len();
            bytes[i] ^= x;
        }
    }
    if let Some(n) = cut {
        bytes.truncate(usize::from(n));
    }
    bytes.extend_from_slice(extra);
    for piece in split(&bytes, arrivals) {
        let mut rest = &piece[..];
        let mut failed = false;
        while !rest.is_empty() {
            if conn.read_tls(&mut rest).is_err() || conn.process_new_packets().is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
        drain(&mut conn);
    }
    assert!(
        conn.is_handshaking(),
        "a peer without the migration's identity completed a handshake"
    );
    let mut buf = [0u8; 64];
    assert!(
        !matches!(conn.reader().read(&mut buf), Ok(n) if n > 0),
        "plaintext from a peer without the migration's identity"
    );
}

fuzz_target!(|case: Case| {
    match case {
        Case::Stream {
            to_source,
            pieces,
            arrivals,
            read_cap,
            tamper,
        } => SESSION.with(|s| {
            let mut s = s.borrow_mut();
            let session = s.get_or_insert_with(Session::new);
            if !stream(
                session,
                to_source,
                &pieces,
                &arrivals,
                read_cap,
                tamper.as_ref(),
            ) {
                *s = None;
            }
        }),
        Case::Handshake {
            to_source,
            real_flight,
            edits,
            cut,
            extra,
            arrivals,
        } => handshake(to_source, real_flight, &edits, cut, &extra, &arrivals),
    }
});
