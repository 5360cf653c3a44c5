//! The connection handshake: both sides prove they know the per-migration secret (HMAC-SHA256
//! over both nonces, with a different label per direction so neither proof can be replayed as
//! the other), and agree that their memory layouts match. The secret never crosses the wire.
//!
//! ```text
//! client (source)                          server (target)
//!   Hello {version, channel, id, nonce_c}  ->
//!                                          <- Challenge {nonce_s, proof_s}
//!   Auth {proof_c, layout digest}          ->
//!                                          <- AuthOk {layout digest} | Error
//! ```

use std::io::{Read, Write};

use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::frame::{FrameReader, FrameType, WireError, write_frame};
use crate::layout::MemoryLayout;

pub const NONCE_LEN: usize = 32;
pub const MIN_SECRET_LEN: usize = 32;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Which of a migration's two connections this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Control messages and the bulk page stream.
    Main = 0,
    /// Fault requests and their replies only, so a fault never waits behind bulk data.
    Urgent = 1,
}

impl Channel {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Main),
            1 => Some(Self::Urgent),
            _ => None,
        }
    }
}

/// A per-migration secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Decodes a base64 secret, which must hold at least 32 bytes.
    pub fn from_base64(s: &str) -> Result<Self, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| format!("secret is not valid base64: {e}"))?;
        if bytes.len() < MIN_SECRET_LEN {
            return Err(format!(
                "secret has {} bytes; at least {MIN_SECRET_LEN} are required",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    /// A fresh random secret (for tools that run both sides, like `faultline demo`).
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut b = vec![0u8; MIN_SECRET_LEN];
        getrandom::fill(&mut b)?;
        Ok(Self(b))
    }

    /// The secret's bytes, for deriving the migration's TLS identities (`crate::tls::pinned`).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.0)
    }

    fn proof(&self, label: &[u8], channel: Channel, id: &str, nc: &[u8], ns: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        mac.update(label);
        mac.update(&[channel as u8]);
        mac.update(&(id.len() as u32).to_le_bytes());
        mac.update(id.as_bytes());
        mac.update(nc);
        mac.update(ns);
        mac.finalize().into_bytes().into()
    }
}

/// SHA-256 of the guest-physical shape of a layout (addresses, sizes, page sizes): equal on
/// two VMMs exactly when pages can move between them.
pub type LayoutDigest = [u8; 32];

pub fn layout_digest(layout: &MemoryLayout) -> LayoutDigest {
    let mut h = Sha256::new();
    h.update(b"faultline-layout-v1");
    for r in &layout.regions {
        h.update(r.guest_phys_addr.to_le_bytes());
        h.update(r.size.to_le_bytes());
        h.update(r.page_size.to_le_bytes());
    }
    h.finalize().into()
}

const CLIENT_LABEL: &[u8] = b"faultline-wire-v1/client";
const SERVER_LABEL: &[u8] = b"faultline-wire-v1/server";

fn nonce() -> Result<[u8; NONCE_LEN], WireError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| WireError::Io(std::io::Error::other(e.to_string())))?;
    Ok(n)
}

/// Sends an error frame (best effort) and returns the error.
pub fn refuse(w: &mut impl Write, message: String) -> WireError {
    let _ = write_frame(w, FrameType::Error, 0, &[message.as_bytes()]);
    WireError::Auth(message)
}

fn expect<'a>(
    frame: super::frame::RawFrame<'a>,
    kind: FrameType,
    expected: &'static str,
) -> Result<&'a [u8], WireError> {
    if frame.kind == FrameType::Error {
        return Err(WireError::Refused(
            String::from_utf8_lossy(frame.payload).into_owned(),
        ));
    }
    if frame.kind != kind {
        return Err(WireError::Unexpected {
            expected,
            got: frame.kind,
        });
    }
    Ok(frame.payload)
}

/// The connecting side (source). Returns once both sides are authenticated and the layouts
/// agree.
pub fn client<S: Read + Write>(
    reader: &mut FrameReader<S>,
    writer: &mut impl Write,
    channel: Channel,
    id: &str,
    secret: &Secret,
    digest: &LayoutDigest,
) -> Result<(), WireError> {
    let nc = nonce()?;
    let id_len = (id.len() as u16).to_le_bytes();
    write_frame(
        writer,
        FrameType::Hello,
        0,
        &[
            &[super::WIRE_VERSION, channel as u8],
            &id_len,
            id.as_bytes(),
            &nc,
        ],
    )?;
    let challenge = expect(reader.read()?, FrameType::Challenge, "challenge")?;
    if challenge.len() != 2 * NONCE_LEN {
        return Err(WireError::malformed("challenge", "wrong length"));
    }
    let (ns, proof_s) = challenge.split_at(NONCE_LEN);
    let ns: [u8; NONCE_LEN] = ns
        .try_into()
        .map_err(|_| WireError::malformed("challenge", "nonce"))?;
    let want = secret.proof(SERVER_LABEL, channel, id, &nc, &ns);
    if !bool::from(want.ct_eq(proof_s)) {
        return Err(refuse(
            writer,
            "the target could not prove it holds the migration secret".into(),
        ));
    }
    let proof_c = secret.proof(CLIENT_LABEL, channel, id, &nc, &ns);
    write_frame(writer, FrameType::Auth, 0, &[&proof_c, digest])?;
    let ok = expect(reader.read()?, FrameType::AuthOk, "auth-ok")?;
    if ok != digest {
        return Err(WireError::Auth(
            "the target's memory layout differs from the source's".into(),
        ));
    }
    Ok(())
}

/// What the server learns from a client's hello before it can authenticate it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub channel: Channel,
    pub id: String,
    nonce: [u8; NONCE_LEN],
}

/// Reads the client's hello (the server then looks up the secret for `id`).
pub fn server_hello<S: Read>(reader: &mut FrameReader<S>) -> Result<ClientHello, WireError> {
    let hello = expect(reader.read()?, FrameType::Hello, "hello")?;
    if hello.len() < 4 + NONCE_LEN {
        return Err(WireError::malformed("hello", "too short"));
    }
    if hello[0] != super::WIRE_VERSION {
        return Err(WireError::Version(hello[0]));
    }
    let channel = Channel::from_u8(hello[1])
        .ok_or_else(|| WireError::malformed("hello", format!("unknown channel {}", hello[1])))?;
    let id_len = u16::from_le_bytes([hello[2], hello[3]]) as usize;
    if hello.len() != 4 + id_len + NONCE_LEN {
        return Err(WireError::malformed(
            "hello",
            "length does not match the id length",
        ));
    }
    let id = std::str::from_utf8(&hello[4..4 + id_len])
        .map_err(|_| WireError::malformed("hello", "id is not UTF-8"))?
        .to_string();
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&hello[4 + id_len..]);
    Ok(ClientHello { channel, id, nonce })
}

/// Completes the server side after [`server_hello`]. On any failure the client gets an error
/// frame saying why, and nothing else.
pub fn server_finish<S: Read>(
    reader: &mut FrameReader<S>,
    writer: &mut impl Write,
    hello: &ClientHello,
    secret: &Secret,
    digest: &LayoutDigest,
) -> Result<(), WireError> {
    let ns = nonce()?;
    let proof_s = secret.proof(SERVER_LABEL, hello.channel, &hello.id, &hello.nonce, &ns);
    write_frame(writer, FrameType::Challenge, 0, &[&ns, &proof_s])?;
    let auth = expect(reader.read()?, FrameType::Auth, "auth")?;
    if auth.len() != 64 {
        return Err(refuse(writer, "malformed auth frame".into()));
    }
    let want = secret.proof(CLIENT_LABEL, hello.channel, &hello.id, &hello.nonce, &ns);
    if !bool::from(want.ct_eq(&auth[..32])) {
        return Err(refuse(
            writer,
            "the source could not prove it holds the migration secret".into(),
        ));
    }
    if auth[32..] != digest[..] {
        return Err(refuse(
            writer,
            "memory layouts differ: the target VMM was not started like the source".into(),
        ));
    }
    write_frame(writer, FrameType::AuthOk, 0, &[digest])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn run(
        client_secret: Secret,
        server_secret: Secret,
        client_digest: LayoutDigest,
    ) -> (Result<(), WireError>, Result<(), WireError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = FrameReader::new(s.try_clone().unwrap());
            let mut w = s;
            let hello = server_hello(&mut r)?;
            assert_eq!(hello.id, "ns/mig");
            server_finish(&mut r, &mut w, &hello, &server_secret, &[7; 32])
        });
        let s = TcpStream::connect(addr).unwrap();
        let mut r = FrameReader::new(s.try_clone().unwrap());
        let mut w = s;
        let c = client(
            &mut r,
            &mut w,
            Channel::Main,
            "ns/mig",
            &client_secret,
            &client_digest,
        );
        (c, server.join().unwrap())
    }

    #[test]
    fn matching_secrets_and_layouts_pass() {
        let s = Secret::generate().unwrap();
        let (c, srv) = run(s.clone(), s, [7; 32]);
        c.unwrap();
        srv.unwrap();
    }

    #[test]
    fn wrong_secret_is_refused_both_ways() {
        let (c, srv) = run(
            Secret::generate().unwrap(),
            Secret::generate().unwrap(),
            [7; 32],
        );
        assert!(matches!(c, Err(WireError::Auth(_))), "{c:?}");
        assert!(srv.is_err());
    }

    #[test]
    fn layout_mismatch_is_refused() {
        let s = Secret::generate().unwrap();
        let (c, srv) = run(s.clone(), s, [8; 32]);
        assert!(matches!(c, Err(WireError::Refused(m)) if m.contains("layouts differ")));
        assert!(srv.is_err());
    }

    #[test]
    fn secrets_must_be_long_enough() {
        assert!(Secret::from_base64("c2hvcnQ=").is_err());
        assert!(Secret::from_base64("not base64!").is_err());
        let s = Secret::generate().unwrap();
        assert!(Secret::from_base64(&s.to_base64()).is_ok());
    }

    #[test]
    fn digest_depends_on_shape_only() {
        use crate::layout::{BackingKind, Region};
        let mk = |backing, host_addr, size| MemoryLayout {
            regions: vec![Region {
                guest_phys_addr: 0,
                size,
                backing,
                fd: 0,
                file_offset: 0,
                page_size: 4096,
                host_addr,
            }],
        };
        let a = layout_digest(&mk(BackingKind::Memfd, 1, 1 << 30));
        assert_eq!(a, layout_digest(&mk(BackingKind::Anon, 2, 1 << 30)));
        assert_ne!(a, layout_digest(&mk(BackingKind::Memfd, 1, 2 << 30)));
    }
}
