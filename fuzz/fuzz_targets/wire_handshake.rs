//! Fuzz target `wire_handshake`: both ends of the wire handshake
//! (`faultline::wire::handshake`) against a hostile peer, over an in-memory connection.
//!
//! Four kinds of peer, chosen by the fuzzer:
//! - a client that sends arbitrary bytes, to the server side (`server_hello`, `server_finish`);
//! - a server that sends arbitrary bytes, to the client side (`client`);
//! - a scripted client that follows the protocol and computes its proof as
//!   docs/wire-protocol.md says, with or without the secret, and tampers with its frames as
//!   told (a flipped bit, a cut, bytes added, another frame type, a broken checksum, ...);
//! - a scripted server, likewise, which may also refuse with an error frame.
//!
//! Invariants, beyond "never panics":
//! - bytes from a peer that does not compute proofs are always refused;
//! - a scripted peer is accepted exactly when it holds the secret, its layout digest matches
//!   and it tampered with nothing; anything else is refused;
//! - a server answers `AuthOk` exactly when it accepts, and its challenge proves the secret;
//! - a client sends its proof only after the server proved the secret, and that proof and its
//!   digest are the ones the specification defines.

#![no_main]

mod common;

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::rc::Rc;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use faultline::wire::frame::{FrameReader, FrameType, WireError};
use faultline::wire::handshake::{self, Channel, LayoutDigest, NONCE_LEN, Secret};
use hmac::{KeyInit, Mac};
use libfuzzer_sys::fuzz_target;

use common::wire_frame;

const CLIENT_LABEL: &[u8] = b"faultline-wire-v1/client";
const SERVER_LABEL: &[u8] = b"faultline-wire-v1/server";
const SECRET: &str = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
const DIGEST: LayoutDigest = [7; 32];

fn secret() -> &'static Secret {
    static S: OnceLock<Secret> = OnceLock::new();
    S.get_or_init(|| Secret::from_base64(SECRET).expect("the fixed secret decodes"))
}

/// The proof docs/wire-protocol.md defines, computed here independently of the library.
fn proof(key: &[u8], label: &[u8], channel: u8, id: &[u8], nc: &[u8], ns: &[u8]) -> [u8; 32] {
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(label);
    mac.update(&[channel]);
    mac.update(&(id.len() as u32).to_le_bytes());
    mac.update(id);
    mac.update(nc);
    mac.update(ns);
    mac.finalize().into_bytes().into()
}

/// How a scripted peer spoils one of its frames.
#[derive(Arbitrary, Debug, Clone)]
enum Tamper {
    None,
    FlipBit(u16),
    Truncate(u16),
    Append(Vec<u8>),
    /// Another frame type (wire byte).
    Kind(u8),
    /// Another payload altogether.
    Replace(Vec<u8>),
    /// A byte of the encoded frame changed after the checksum was computed.
    Corrupt(u16, u8),
    /// The frame is never sent.
    Withhold,
}

impl Tamper {
    /// The frame's bytes on the wire, and whether they are still the honest ones.
    fn apply(&self, kind: FrameType, payload: &[u8]) -> (Vec<u8>, bool) {
        let honest = wire_frame(kind as u8, 0, payload);
        let bytes = match self {
            Self::None => honest.clone(),
            Self::FlipBit(at) => {
                let mut p = payload.to_vec();
                if !p.is_empty() {
                    let bit = usize::from(*at) % (p.len() * 8);
                    p[bit / 8] ^= 1 << (bit % 8);
                }
                wire_frame(kind as u8, 0, &p)
            }
            Self::Truncate(n) => wire_frame(
                kind as u8,
                0,
                &payload[..usize::from(*n).min(payload.len())],
            ),
            Self::Append(more) => {
                let mut p = payload.to_vec();
                p.extend_from_slice(more);
                wire_frame(kind as u8, 0, &p)
            }
            Self::Kind(k) => wire_frame(*k, 0, payload),
            Self::Replace(p) => wire_frame(kind as u8, 0, p),
            Self::Corrupt(at, x) => {
                let mut f = honest.clone();
                let i = usize::from(*at) % f.len();
                f[i] ^= x;
                f
            }
            Self::Withhold => Vec::new(),
        };
        let same = bytes == honest;
        (bytes, same)
    }
}

#[derive(Arbitrary, Debug)]
enum Case {
    HostileClient {
        bytes: Vec<u8>,
        chunk: u8,
    },
    HostileServer {
        bytes: Vec<u8>,
        chunk: u8,
        channel: bool,
        id: String,
    },
    ScriptedClient {
        knows_secret: bool,
        same_layout: bool,
        urgent: bool,
        id: String,
        nonce: [u8; NONCE_LEN],
        hello: Tamper,
        auth: Tamper,
        chunk: u8,
    },
    ScriptedServer {
        knows_secret: bool,
        same_layout: bool,
        urgent: bool,
        id: String,
        nonce: [u8; NONCE_LEN],
        refuse: Option<String>,
        challenge: Tamper,
        ok: Tamper,
        chunk: u8,
    },
}

/// The peer's half of an in-memory connection: it answers when the side under test reads
/// and has nothing left to read.
trait Peer {
    /// `written`: everything the side under test has sent so far. Returns the next bytes.
    fn respond(&mut self, written: &[u8]) -> Vec<u8>;
}

struct Pipe {
    inbox: Vec<u8>,
    pos: usize,
    outbox: Vec<u8>,
    chunk: usize,
    peer: Box<dyn Peer>,
}

/// The side under test's end of the connection (clones share it, as a socket's do).
#[derive(Clone)]
struct End(Rc<RefCell<Pipe>>);

impl Read for End {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut p = self.0.borrow_mut();
        if p.pos == p.inbox.len() {
            let Pipe { outbox, peer, .. } = &mut *p;
            let more = peer.respond(outbox);
            p.inbox.extend_from_slice(&more);
        }
        let n = buf.len().min(p.chunk).min(p.inbox.len() - p.pos);
        let start = p.pos;
        buf[..n].copy_from_slice(&p.inbox[start..start + n]);
        p.pos += n;
        Ok(n)
    }
}

impl Write for End {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().outbox.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn end(peer: Box<dyn Peer>, chunk: u8) -> End {
    End(Rc::new(RefCell::new(Pipe {
        inbox: Vec::new(),
        pos: 0,
        outbox: Vec::new(),
        chunk: usize::from(chunk).max(1),
        peer,
    })))
}

/// The frames in `bytes` (written by the side under test, so they must all be well formed).
fn frames(bytes: &[u8]) -> Vec<(FrameType, Vec<u8>)> {
    let mut r = FrameReader::new(bytes);
    let mut out = Vec::new();
    loop {
        match r.read() {
            Ok(f) => out.push((f.kind, f.payload.to_vec())),
            Err(WireError::Closed) => return out,
            Err(e) => panic!("the side under test wrote a bad frame: {e}"),
        }
    }
}

fn key(knows_secret: bool) -> Vec<u8> {
    if knows_secret {
        secret().bytes().to_vec()
    } else {
        vec![0x42; 32]
    }
}

fn digest(same_layout: bool) -> LayoutDigest {
    if same_layout { DIGEST } else { [8; 32] }
}

struct ScriptedClient {
    key: Vec<u8>,
    digest: LayoutDigest,
    channel: u8,
    id: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    hello: Tamper,
    auth: Tamper,
    step: u8,
    /// Whether every frame sent so far was the honest one (read by the harness afterwards).
    honest: Rc<Cell<bool>>,
}

impl Peer for ScriptedClient {
    fn respond(&mut self, written: &[u8]) -> Vec<u8> {
        self.step += 1;
        match self.step {
            1 => {
                let mut p = vec![faultline::wire::WIRE_VERSION, self.channel];
                p.extend_from_slice(&(self.id.len() as u16).to_le_bytes());
                p.extend_from_slice(&self.id);
                p.extend_from_slice(&self.nonce);
                let (bytes, honest) = self.hello.apply(FrameType::Hello, &p);
                self.honest.set(self.honest.get() && honest);
                bytes
            }
            2 => {
                let f = frames(written);
                let Some((FrameType::Challenge, challenge)) = f.first() else {
                    // A spoiled hello: the server refused it, or waits for the rest of a
                    // frame whose length was altered. Either way this client is done.
                    assert!(
                        !self.honest.get(),
                        "the server answered an honest hello with {f:?}"
                    );
                    return Vec::new();
                };
                assert_eq!(challenge.len(), 2 * NONCE_LEN);
                let (ns, proof_s) = challenge.split_at(NONCE_LEN);
                if self.honest.get() {
                    let want = proof(
                        secret().bytes(),
                        SERVER_LABEL,
                        self.channel,
                        &self.id,
                        &self.nonce,
                        ns,
                    );
                    assert_eq!(proof_s, want, "the server's proof is the specified one");
                }
                let proof_c = proof(
                    &self.key,
                    CLIENT_LABEL,
                    self.channel,
                    &self.id,
                    &self.nonce,
                    ns,
                );
                let mut p = proof_c.to_vec();
                p.extend_from_slice(&self.digest);
                let (bytes, honest) = self.auth.apply(FrameType::Auth, &p);
                self.honest.set(self.honest.get() && honest);
                bytes
            }
            _ => Vec::new(),
        }
    }
}

struct ScriptedServer {
    key: Vec<u8>,
    digest: LayoutDigest,
    channel: u8,
    id: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    refuse: Option<String>,
    challenge: Tamper,
    ok: Tamper,
    step: u8,
    honest: Rc<Cell<bool>>,
    /// The client's hello nonce, once read.
    nc: Vec<u8>,
}

impl Peer for ScriptedServer {
    fn respond(&mut self, written: &[u8]) -> Vec<u8> {
        self.step += 1;
        let f = frames(written);
        match self.step {
            1 => {
                let Some((FrameType::Hello, hello)) = f.first() else {
                    panic!("the client began with {f:?}");
                };
                let id_len = self.id.len();
                assert_eq!(hello.len(), 4 + id_len + NONCE_LEN);
                assert_eq!(hello[..2], [faultline::wire::WIRE_VERSION, self.channel]);
                assert_eq!(hello[2..4], (id_len as u16).to_le_bytes());
                assert_eq!(hello[4..4 + id_len], self.id[..]);
                self.nc = hello[4 + id_len..].to_vec();
                if let Some(why) = &self.refuse {
                    self.honest.set(false);
                    return wire_frame(FrameType::Error as u8, 0, why.as_bytes());
                }
                let proof_s = proof(
                    &self.key,
                    SERVER_LABEL,
                    self.channel,
                    &self.id,
                    &self.nc,
                    &self.nonce,
                );
                let mut p = self.nonce.to_vec();
                p.extend_from_slice(&proof_s);
                let (bytes, honest) = self.challenge.apply(FrameType::Challenge, &p);
                self.honest.set(self.honest.get() && honest);
                bytes
            }
            2 => {
                // The client only goes on to authenticate itself once the server proved it
                // holds the secret.
                match f.get(1) {
                    Some((FrameType::Auth, auth)) => {
                        assert!(
                            self.honest.get() && self.key == secret().bytes(),
                            "the client trusted a server that proved nothing"
                        );
                        let want = proof(
                            secret().bytes(),
                            CLIENT_LABEL,
                            self.channel,
                            &self.id,
                            &self.nc,
                            &self.nonce,
                        );
                        assert_eq!(auth[..32], want, "the client's proof is the specified one");
                        assert_eq!(auth[32..], DIGEST);
                        let (bytes, honest) = self.ok.apply(FrameType::AuthOk, &self.digest);
                        self.honest.set(self.honest.get() && honest);
                        bytes
                    }
                    other => {
                        self.honest.set(false);
                        assert!(
                            matches!(other, None | Some((FrameType::Error, _))),
                            "the client sent {other:?} after a challenge"
                        );
                        Vec::new()
                    }
                }
            }
            _ => Vec::new(),
        }
    }
}

/// A peer that sends the fuzzer's bytes, whatever it is told.
struct Hostile(Option<Vec<u8>>);

impl Peer for Hostile {
    fn respond(&mut self, _: &[u8]) -> Vec<u8> {
        self.0.take().unwrap_or_default()
    }
}

fn run_server(end: End) -> Result<(), WireError> {
    let mut writer = end.clone();
    let mut reader = FrameReader::new(end);
    let hello = handshake::server_hello(&mut reader)?;
    handshake::server_finish(&mut reader, &mut writer, &hello, secret(), &DIGEST)
}

fn run_client(end: End, channel: Channel, id: &str) -> Result<(), WireError> {
    let mut writer = end.clone();
    let mut reader = FrameReader::new(end);
    handshake::client(&mut reader, &mut writer, channel, id, secret(), &DIGEST)
}

/// What the server wrote: a challenge (when the hello was acceptable), then `AuthOk` exactly
/// when it accepted.
fn check_server_output(end: &End, accepted: bool) {
    let f = frames(&end.0.borrow().outbox);
    let auth_ok = f.iter().filter(|(k, _)| *k == FrameType::AuthOk).count();
    assert_eq!(auth_ok, usize::from(accepted));
    if let Some((kind, payload)) = f.first() {
        assert_eq!(*kind, FrameType::Challenge);
        assert_eq!(payload.len(), 2 * NONCE_LEN);
    }
    if accepted {
        assert_eq!(f.last().map(|(_, p)| &p[..]), Some(&DIGEST[..]));
    }
}

fn channel(urgent: bool) -> Channel {
    if urgent {
        Channel::Urgent
    } else {
        Channel::Main
    }
}

fuzz_target!(|case: Case| {
    match case {
        Case::HostileClient { bytes, chunk } => {
            let e = end(Box::new(Hostile(Some(bytes))), chunk);
            let r = run_server(e.clone());
            assert!(r.is_err(), "a client that computes no proof was accepted");
            check_server_output(&e, false);
        }
        Case::HostileServer {
            bytes,
            chunk,
            channel: urgent,
            id,
        } => {
            let e = end(Box::new(Hostile(Some(bytes))), chunk);
            let r = run_client(e, channel(urgent), &id);
            assert!(r.is_err(), "a server that computes no proof was trusted");
        }
        Case::ScriptedClient {
            knows_secret,
            same_layout,
            urgent,
            id,
            nonce,
            hello,
            auth,
            chunk,
        } => {
            let honest = Rc::new(Cell::new(true));
            let peer = ScriptedClient {
                key: key(knows_secret),
                digest: digest(same_layout),
                channel: channel(urgent) as u8,
                id: id.into_bytes(),
                nonce,
                hello,
                auth,
                step: 0,
                honest: honest.clone(),
            };
            let e = end(Box::new(peer), chunk);
            let r = run_server(e.clone());
            let should = honest.get() && knows_secret && same_layout;
            assert_eq!(
                r.is_ok(),
                should,
                "server verdict {r:?}, expected accept={should}"
            );
            check_server_output(&e, should);
        }
        Case::ScriptedServer {
            knows_secret,
            same_layout,
            urgent,
            id,
            nonce,
            refuse,
            challenge,
            ok,
            chunk,
        } => {
            let refused = refuse.is_some();
            let honest = Rc::new(Cell::new(true));
            let peer = ScriptedServer {
                key: key(knows_secret),
                digest: digest(same_layout),
                channel: channel(urgent) as u8,
                id: id.clone().into_bytes(),
                nonce,
                refuse,
                challenge,
                ok,
                step: 0,
                honest: honest.clone(),
                nc: Vec::new(),
            };
            let e = end(Box::new(peer), chunk);
            let r = run_client(e, channel(urgent), &id);
            if refused {
                assert!(matches!(r, Err(WireError::Refused(_))), "{r:?}");
            }
            let should = honest.get() && knows_secret && same_layout;
            assert_eq!(
                r.is_ok(),
                should,
                "client verdict {r:?}, expected accept={should}"
            );
        }
    }
});
