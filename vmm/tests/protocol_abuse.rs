//! Protocol abuse: garbage, truncated and stalled frames, unknown and malformed requests,
//! requests at the wrong time. Each gets an error reply; the VMM stays healthy and the guest
//! undisturbed.

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::conn::Connection;
use faultline::vmm_protocol::frame::{FrameHeader, FrameKind};
use faultline::vmm_protocol::messages::{ErrorCode, ErrorReply, Request, VmState};

fn start_vmm(tag: &str, extra: &[&str]) -> faultline_local::VmmProcess {
    let mut args = vec!["--memory", "64M", "--control-frame-timeout", "300ms"];
    args.extend_from_slice(extra);
    start(tag, &args)
}

/// Reads one frame and expects an error reply with `code`.
fn expect_error(conn: &mut Connection, code: ErrorCode) -> ErrorReply {
    let frame = conn.read_frame().expect("an error reply");
    assert_eq!(frame.header.kind, FrameKind::Error);
    let reply: ErrorReply = serde_json::from_slice(&frame.json).expect("error JSON");
    assert_eq!(reply.code, code, "{reply:?}");
    assert!(!reply.message.is_empty());
    reply
}

/// The connection was closed by the VMM (after its error reply).
fn expect_closed(conn: &Connection) {
    let mut s = conn.stream();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => assert_eq!(n, 0, "connection still open"),
        // Closing with our unread bytes still queued resets the connection: also closed.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

/// The VMM still answers, its guest still runs and has found nothing wrong.
fn assert_healthy(vmm: &faultline_local::VmmProcess) {
    let mut c = client(vmm);
    let a = c.status().expect("status after abuse");
    let b = wait_status(&mut c, Duration::from_secs(20), |s| {
        s.heartbeats[0] > a.heartbeats[0]
    });
    assert!(
        b.heartbeats[0] > a.heartbeats[0],
        "guest stopped making progress"
    );
    assert_eq!(b.failures, 0);
}

fn raw(vmm: &faultline_local::VmmProcess) -> Connection {
    Connection::new(UnixStream::connect(&vmm.socket).expect("connect"))
}

fn request(conn: &mut Connection, json: &[u8], blob: &[u8]) {
    conn.write_frame(FrameKind::Request, 9, json, blob, &[])
        .expect("send");
}

#[test]
fn framing_abuse() {
    if !kvm_available() {
        return;
    }
    let vmm = start_vmm("abuse-frames", &[]);

    // Garbage bytes: bad magic, error reply, connection closed.
    let mut c = raw(&vmm);
    c.write_raw(&[0x42; 100]).expect("send garbage");
    expect_error(&mut c, ErrorCode::BadFrame);
    expect_closed(&c);

    // A future protocol version.
    let mut c = raw(&vmm);
    let mut h = FrameHeader::new(FrameKind::Request, 1, 2, 0).encode();
    h[4..6].copy_from_slice(&(faultline::vmm_protocol::PROTOCOL_VERSION + 1).to_le_bytes());
    // One write: the VMM answers and hangs up as soon as it has read the header.
    c.write_raw(&[&h[..], b"{}"].concat()).expect("send");
    expect_error(&mut c, ErrorCode::UnsupportedVersion);
    expect_closed(&c);

    // Absurd lengths are refused before anything is allocated.
    let mut c = raw(&vmm);
    c.write_raw(&FrameHeader::new(FrameKind::Request, 1, u32::MAX, 0).encode())
        .expect("send");
    expect_error(&mut c, ErrorCode::BadFrame);

    // Truncated: the header promises more than arrives before the peer hangs up.
    let mut c = raw(&vmm);
    c.write_raw(&FrameHeader::new(FrameKind::Request, 1, 100, 0).encode())
        .expect("send");
    c.write_raw(br#"{"op":"#).expect("send");
    drop(c);

    // Stalled: half a header, then silence. The VMM gives up after its frame timeout.
    let mut c = raw(&vmm);
    c.write_raw(&FrameHeader::new(FrameKind::Request, 1, 15, 0).encode()[..7])
        .expect("send");
    expect_error(&mut c, ErrorCode::BadFrame);
    expect_closed(&c);

    // A frame of the wrong kind is refused, and the connection stays usable.
    let mut c = raw(&vmm);
    c.write_frame(FrameKind::Reply, 3, b"{}", &[], &[])
        .expect("send");
    expect_error(&mut c, ErrorCode::BadFrame);
    request(&mut c, br#"{"op":"status"}"#, &[]);
    assert_eq!(
        c.read_frame().expect("status reply").header.kind,
        FrameKind::Reply
    );

    // Descriptors are not accepted with requests (and are closed, not leaked).
    let memfd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    c.write_frame(
        FrameKind::Request,
        4,
        br#"{"op":"status"}"#,
        &[],
        &[memfd.as_fd()],
    )
    .expect("send");
    expect_error(&mut c, ErrorCode::BadRequest);

    assert_healthy(&vmm);
}

#[test]
fn request_abuse() {
    if !kvm_available() {
        return;
    }
    let mut vmm = start_vmm("abuse-requests", &[]);
    let mut c = raw(&vmm);
    for (json, code) in [
        (&b"not json"[..], ErrorCode::BadRequest),
        (b"[]", ErrorCode::BadRequest),
        (b"{}", ErrorCode::BadRequest),
        (br#"{"op":42}"#, ErrorCode::BadRequest),
        (br#"{"op":"format_disk"}"#, ErrorCode::UnknownOp),
        (br#"{"op":"pause","now":true}"#, ErrorCode::BadRequest),
        (br#"{"op":"hello"}"#, ErrorCode::BadRequest),
    ] {
        request(&mut c, json, &[]);
        expect_error(&mut c, code);
    }
    // A binary part where the op takes none.
    request(&mut c, br#"{"op":"pause"}"#, b"junk");
    expect_error(&mut c, ErrorCode::BadRequest);
    // Out of order: restore outside incoming mode, save while running, fence while running,
    // collect before start, rejoin a trap outside incoming mode.
    let mut client = client(&vmm);
    for (req, code) in [
        (Request::TrapRejoin, ErrorCode::InvalidState),
        (Request::RestoreState, ErrorCode::InvalidState),
        (Request::SaveState, ErrorCode::InvalidState),
        (Request::Fence, ErrorCode::InvalidState),
        (Request::DirtyLogCollect, ErrorCode::InvalidState),
    ] {
        let e = client.call(&req, b"").expect_err("must be refused");
        assert_eq!(e.refusal().map(|r| r.code), Some(code), "{req:?}: {e}");
    }
    assert_healthy(&vmm);
    drop((c, client));
    let (last, code) = vmm.shutdown().expect("shutdown");
    assert_eq!(last.failures, 0);
    assert_eq!(code, 0);
}

/// In incoming mode a bad state blob is refused and loses nothing: a good one still works.
#[test]
fn bad_state_blobs_are_refused_and_harmless() {
    if !kvm_available() {
        return;
    }
    let src = start_vmm("abuse-src", &[]);
    let dst = start_vmm("abuse-dst", &["--incoming"]);
    let mut cs = client(&src);
    let mut cd: VmmClient = client(&dst);
    wait_status(&mut cs, Duration::from_secs(20), |s| s.heartbeats[0] > 2);
    cs.pause().expect("pause");
    let (_, blob) = cs.save_state().expect("save");

    let mut damaged = blob.clone();
    damaged[20] ^= 0xFF;
    let bad_blobs: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        blob[..blob.len() / 2].to_vec(),
        {
            let mut v = blob.clone();
            v[8] = 99; // version
            v
        },
        damaged,
    ];
    for bad in &bad_blobs {
        let e = cd.restore_state(bad).expect_err("bad blob accepted");
        assert_eq!(
            e.refusal().map(|r| r.code),
            Some(ErrorCode::BadRequest),
            "{e}"
        );
        assert_eq!(cd.status().expect("status").state, VmState::Incoming);
    }
    // A blob for a different vCPU count.
    let other = start_vmm("abuse-other", &["--vcpus", "2"]);
    let mut co = client(&other);
    co.pause().expect("pause");
    let (_, two) = co.save_state().expect("save");
    let e = cd
        .restore_state(&two)
        .expect_err("wrong vCPU count accepted");
    assert!(e.to_string().contains("vCPUs"), "{e}");

    // The memory copy and a good blob still work.
    let (ha, fa) = cs.hello("t").expect("hello");
    let (hb, fb) = cd.hello("t").expect("hello");
    let (ma, mb) = (memory(&ha, fa), memory(&hb, fb));
    let mut buf = vec![0u8; ma.size() as usize];
    ma.read_at(0, &mut buf);
    mb.write_at(0, &buf);
    cd.restore_state(&blob).expect("good blob after bad ones");
    let e = cd.restore_state(&blob).expect_err("second restore");
    assert_eq!(e.refusal().map(|r| r.code), Some(ErrorCode::InvalidState));
    cs.fence().expect("fence");
    cd.resume().expect("resume");
    assert_healthy(&dst);
}
