//! Fuzz target `vmm_messages`: the VMM protocol's JSON messages, as each end decodes them.
//!
//! - The VMM's side: `Request::parse` on arbitrary bytes (what a client sends).
//! - The sidecar's side: `VmmClient` (`faultline::vmm_protocol::client`) makes fuzzer-chosen
//!   calls against a fake VMM whose replies (kind, id, JSON, binary part, descriptors) the
//!   fuzzer writes; so the reply decoders run as the sidecar runs them: `hello` with its
//!   layout validation (`faultline::layout`) and trap offers, `dirty_log_collect` with its
//!   bitmap (`faultline::bitmap`), `save_state`, the descriptor-carrying replies, events
//!   (`faultline::strict_json`), error replies and status.
//!
//! Invariants, beyond "never panics":
//! - a request that parses re-encodes to JSON that parses to the same request, and its op is
//!   one the protocol defines; `UnknownOp` is said only of a string op the protocol lacks;
//! - a `hello` accepted has a valid layout whose descriptors all arrived, and its trap offers
//!   are for the first region's backing;
//! - a dirty bitmap accepted sets no page beyond its size; a saved state accepted is exactly
//!   as long as announced; a descriptor-carrying reply accepted carries exactly one.

#![no_main]

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use faultline::bitmap::PageBitmap;
use faultline::sys::fdpass;
use faultline::vmm_protocol::messages::{ErrorCode, UffdMode};
use faultline::vmm_protocol::{ClientError, Request, VmmClient};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Call {
    Hello,
    Pause,
    Resume,
    Fence,
    Shutdown,
    SaveState,
    RestoreState,
    DirtyLogStart,
    DirtyLogStop,
    DirtyLogCollect,
    UserfaultfdRegister(bool),
    UserfaultfdDisarm,
    KvmUserfaultArm(bool),
    KvmUserfaultDisarm,
    NextEvent,
    Discard(u16),
    Status,
}

#[derive(Arbitrary, Debug)]
enum Json {
    Bytes(Vec<u8>),
    Text(String),
}

impl Json {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Bytes(b) => b,
            Self::Text(t) => t.as_bytes(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Reply {
    /// 1 to 4 are the protocol's kinds (request, reply, error, event).
    kind: u8,
    /// `None`: the id of the call this reply answers, as a well-behaved VMM would.
    id: Option<u32>,
    json: Json,
    blob: Vec<u8>,
    fds: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    request: Json,
    replies: Vec<Reply>,
    calls: Vec<Call>,
}

fn memfd() -> &'static OwnedFd {
    static FD: OnceLock<OwnedFd> = OnceLock::new();
    FD.get_or_init(|| {
        rustix::fs::memfd_create("fuzz", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd")
    })
}

fn check_request(json: &[u8]) {
    match Request::parse(json) {
        Ok(r) => {
            assert!(Request::OPS.contains(&r.op()));
            let again = serde_json::to_vec(&r).expect("a request serializes");
            assert_eq!(Request::parse(&again), Ok(r));
        }
        Err(e) if e.code == ErrorCode::UnknownOp => {
            let v: serde_json::Value = serde_json::from_slice(json).expect("it was JSON");
            let op = v
                .get("op")
                .and_then(|o| o.as_str())
                .expect("it had a string op");
            assert!(!Request::OPS.contains(&op));
        }
        Err(e) => assert_eq!(e.code, ErrorCode::BadRequest),
    }
}

/// Whether the connection is still usable after a call's outcome.
fn usable<T>(r: &Result<T, ClientError>) -> bool {
    !matches!(r, Err(ClientError::Conn(_) | ClientError::Send(_)))
}

fuzz_target!(|input: Input| {
    check_request(input.request.bytes());

    let (client_end, vmm_end) = UnixStream::pair().expect("socket pair");
    // Nobody reads while the fake VMM writes: a socket buffer that fills (many small messages
    // carrying descriptors fill it long before 64 KiB) must end the replies, not block.
    vmm_end.set_nonblocking(true).expect("nonblocking");
    let mut budget = 64usize << 10;
    for (n, reply) in input.replies.iter().enumerate() {
        let json = reply.json.bytes();
        let size = 24 + json.len() + reply.blob.len();
        if size > budget {
            break;
        }
        budget -= size;
        // Call ids start at 1 and count up; reply n answers call n+1 unless told otherwise.
        let id = reply.id.unwrap_or(n as u32 + 1);
        let mut frame = Vec::with_capacity(size);
        frame.extend_from_slice(b"FLVM");
        frame.extend_from_slice(&faultline::vmm_protocol::PROTOCOL_VERSION.to_le_bytes());
        frame.extend_from_slice(&u16::from(reply.kind % 6).to_le_bytes());
        frame.extend_from_slice(&id.to_le_bytes());
        frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
        frame.extend_from_slice(&(reply.blob.len() as u64).to_le_bytes());
        frame.extend_from_slice(json);
        frame.extend_from_slice(&reply.blob);
        let fds = vec![memfd().as_fd(); usize::from(reply.fds % 4)];
        if fdpass::send_all_with_fds(&vmm_end, &frame, &fds).is_err() {
            // Full: the client reads what fitted, perhaps a frame cut short.
            break;
        }
    }
    // The fake VMM has said everything; it still takes the client's requests unread.
    vmm_end
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");

    let mut client = VmmClient::from_stream(client_end);
    for call in input.calls.iter().take(32) {
        let go_on = match call {
            Call::Hello => {
                let r = client.hello("fuzz");
                if let Ok((hello, fds)) = &r {
                    assert_eq!(hello.layout.validate(fds.len()), Ok(()));
                    let backing = hello.layout.regions[0].backing;
                    let offers = hello.trap_offers();
                    assert!(offers.len() <= 2);
                    assert!(offers.iter().all(|o| o.backing == backing));
                    let _ = hello.layout.total_pages();
                }
                usable(&r)
            }
            Call::Pause => usable(&client.pause()),
            Call::Resume => usable(&client.resume()),
            Call::Fence => usable(&client.fence()),
            Call::Shutdown => usable(&client.shutdown()),
            Call::SaveState => {
                let r = client.save_state();
                if let Ok((info, blob)) = &r {
                    assert_eq!(info.bytes, blob.len() as u64);
                }
                usable(&r)
            }
            Call::RestoreState => usable(&client.restore_state(b"state")),
            Call::DirtyLogStart => usable(&client.dirty_log_start()),
            Call::DirtyLogStop => usable(&client.dirty_log_stop()),
            Call::DirtyLogCollect => {
                let r = client.dirty_log_collect();
                if let Ok(b) = &r {
                    assert!(b.iter_set().all(|p| p < b.pages()));
                }
                usable(&r)
            }
            Call::UserfaultfdRegister(minor) => {
                let mode = if *minor {
                    UffdMode::Minor
                } else {
                    UffdMode::Missing
                };
                usable(&client.userfaultfd_register(mode))
            }
            Call::UserfaultfdDisarm => usable(&client.userfaultfd_disarm()),
            Call::KvmUserfaultArm(host) => usable(&client.kvm_userfault_arm(*host)),
            Call::KvmUserfaultDisarm => usable(&client.kvm_userfault_disarm()),
            Call::NextEvent => usable(&client.next_event()),
            Call::Discard(pages) => {
                let mut b = PageBitmap::new(u64::from(*pages));
                if *pages > 0 {
                    b.set(0);
                }
                usable(&client.discard(&b))
            }
            Call::Status => usable(&client.status()),
        };
        if !go_on {
            break;
        }
    }
});
