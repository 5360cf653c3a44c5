//! A blocking VMM protocol client: what the sidecar, the CLI and the tests use to drive a VMM.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::conn::{ConnError, Connection, Frame};
use super::frame::FrameKind;
use super::messages::{
    DirtyLogReply, ErrorReply, Event, HelloReply, KvmUserfaultArmReply, Request, SavedState,
    StateReply, TrapRejoinReply, UffdMode, UffdRegisterReply, VmState, VmStatus,
};
use crate::bitmap::PageBitmap;
use crate::trap::Backend;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM control socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM connection failed: {0}")]
    Conn(#[from] ConnError),
    #[error("cannot send to the VMM: {0}")]
    Send(#[source] std::io::Error),
    #[error("the VMM refused `{op}`: {reply}")]
    Refused { op: &'static str, reply: ErrorReply },
    #[error("the VMM's reply to `{op}` is malformed: {what}")]
    BadReply { op: &'static str, what: String },
}

impl ClientError {
    /// The VMM's error reply, if the VMM refused the request (as opposed to a transport error).
    pub fn refusal(&self) -> Option<&ErrorReply> {
        match self {
            Self::Refused { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// One connection to one VMM.
pub struct VmmClient {
    conn: Connection,
    next_id: u32,
}

impl VmmClient {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::from_stream(stream))
    }

    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            conn: Connection::new(stream),
            next_id: 1,
        }
    }

    /// Sends `request` with `blob` and waits for its reply, returning the reply frame.
    /// Unsolicited event frames that arrive meanwhile are skipped.
    pub fn call(&mut self, request: &Request, blob: &[u8]) -> Result<Frame, ClientError> {
        let op = request.op();
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let json = serde_json::to_vec(request).map_err(|e| ClientError::BadReply {
            op,
            what: e.to_string(),
        })?;
        self.conn
            .write_frame(FrameKind::Request, id, &json, blob, &[])
            .map_err(ClientError::Send)?;
        loop {
            let frame = self.conn.read_frame()?;
            match frame.header.kind {
                FrameKind::Event => continue,
                FrameKind::Error => {
                    let reply: ErrorReply =
                        serde_json::from_slice(&frame.json).map_err(|e| ClientError::BadReply {
                            op,
                            what: format!("error reply is not valid: {e}"),
                        })?;
                    return Err(ClientError::Refused { op, reply });
                }
                FrameKind::Reply if frame.header.id == id => return Ok(frame),
                kind => {
                    return Err(ClientError::BadReply {
                        op,
                        what: format!("unexpected {kind:?} frame with id {}", frame.header.id),
                    });
                }
            }
        }
    }

    fn call_json<T: DeserializeOwned>(
        &mut self,
        request: &Request,
        blob: &[u8],
    ) -> Result<(T, Frame), ClientError> {
        let op = request.op();
        let frame = self.call(request, blob)?;
        let value = serde_json::from_slice(&frame.json).map_err(|e| ClientError::BadReply {
            op,
            what: e.to_string(),
        })?;
        Ok((value, frame))
    }

    fn call_state(&mut self, request: Request) -> Result<VmState, ClientError> {
        let (reply, _): (StateReply, _) = self.call_json(&request, &[])?;
        Ok(reply.state)
    }

    /// Says hello; returns the VM description and the memory descriptors its layout indexes.
    pub fn hello(&mut self, client: &str) -> Result<(HelloReply, Vec<OwnedFd>), ClientError> {
        let request = Request::Hello {
            client: client.to_string(),
        };
        let (reply, frame): (HelloReply, _) = self.call_json(&request, &[])?;
        reply
            .layout
            .validate(frame.fds.len())
            .map_err(|e| ClientError::BadReply {
                op: "hello",
                what: e.to_string(),
            })?;
        Ok((reply, frame.fds))
    }

    pub fn pause(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::Pause)
    }

    pub fn resume(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::Resume)
    }

    pub fn fence(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::Fence)
    }

    pub fn shutdown(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::Shutdown)
    }

    pub fn save_state(&mut self) -> Result<(SavedState, Vec<u8>), ClientError> {
        let (info, frame): (SavedState, _) = self.call_json(&Request::SaveState, &[])?;
        if info.bytes != frame.blob.len() as u64 {
            return Err(ClientError::BadReply {
                op: "save_state",
                what: format!("announced {} bytes, sent {}", info.bytes, frame.blob.len()),
            });
        }
        Ok((info, frame.blob))
    }

    pub fn restore_state(&mut self, blob: &[u8]) -> Result<VmState, ClientError> {
        let (reply, _): (StateReply, _) = self.call_json(&Request::RestoreState, blob)?;
        Ok(reply.state)
    }

    pub fn dirty_log_start(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::DirtyLogStart)
    }

    pub fn dirty_log_stop(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::DirtyLogStop)
    }

    /// The pages written since the last collect, in global page numbering.
    pub fn dirty_log_collect(&mut self) -> Result<PageBitmap, ClientError> {
        let (reply, frame): (DirtyLogReply, _) = self.call_json(&Request::DirtyLogCollect, &[])?;
        let bitmap = PageBitmap::from_le_bytes(&frame.blob, reply.pages).map_err(|e| {
            ClientError::BadReply {
                op: "dirty_log_collect",
                what: e.to_string(),
            }
        })?;
        if bitmap.count() != reply.dirty {
            return Err(ClientError::BadReply {
                op: "dirty_log_collect",
                what: format!(
                    "announced {} dirty pages, bitmap has {}",
                    reply.dirty,
                    bitmap.count()
                ),
            });
        }
        Ok(bitmap)
    }

    /// Has the VMM register its RAM with a new userfaultfd, and returns it.
    pub fn userfaultfd_register(
        &mut self,
        mode: UffdMode,
    ) -> Result<(UffdRegisterReply, OwnedFd), ClientError> {
        let (reply, mut frame): (UffdRegisterReply, _) =
            self.call_json(&Request::UserfaultfdRegister { mode }, &[])?;
        if frame.fds.len() != 1 {
            return Err(ClientError::BadReply {
                op: "userfaultfd_register",
                what: format!("expected 1 descriptor, got {}", frame.fds.len()),
            });
        }
        Ok((reply, frame.fds.remove(0)))
    }

    /// Arms KVM Userfault; returns the shared bitmap's memfd, and with `host_accesses` the
    /// userfaultfd the host mapping is registered with in minor mode (if the VMM could). This
    /// connection then carries only events: read them with [`VmmClient::next_event`].
    pub fn kvm_userfault_arm(
        &mut self,
        host_accesses: bool,
    ) -> Result<(KvmUserfaultArmReply, OwnedFd, Option<OwnedFd>), ClientError> {
        let (reply, frame): (KvmUserfaultArmReply, _) =
            self.call_json(&Request::KvmUserfaultArm { host_accesses }, &[])?;
        let want = 1 + usize::from(reply.host_accesses);
        if frame.fds.len() != want || (reply.host_accesses && !host_accesses) {
            return Err(ClientError::BadReply {
                op: "kvm_userfault_arm",
                what: format!(
                    "expected {want} descriptor(s), got {} (host accesses asked: {host_accesses}, granted: {})",
                    frame.fds.len(),
                    reply.host_accesses
                ),
            });
        }
        let mut fds = frame.fds.into_iter();
        match (fds.next(), fds.next()) {
            (Some(bitmap), uffd) => Ok((reply, bitmap, uffd)),
            (None, _) => Err(ClientError::BadReply {
                op: "kvm_userfault_arm",
                what: "no descriptor".into(),
            }),
        }
    }

    /// Takes over the trap a receiver armed before it restarted: returns the reply, the trap's
    /// descriptors (see [`TrapRejoinReply`]) and the pages not yet valid. Under KVM Userfault
    /// this connection then carries only events, starting with those of vCPUs already waiting.
    pub fn trap_rejoin(
        &mut self,
    ) -> Result<(TrapRejoinReply, Vec<OwnedFd>, PageBitmap), ClientError> {
        let (reply, frame): (TrapRejoinReply, _) = self.call_json(&Request::TrapRejoin, &[])?;
        let bad = |what: String| ClientError::BadReply {
            op: "trap_rejoin",
            what,
        };
        let want = match reply.trap {
            Backend::Userfaultfd => 1,
            Backend::KvmUserfault => 1 + usize::from(reply.host_accesses),
        };
        if frame.fds.len() != want {
            return Err(bad(format!(
                "expected {want} descriptor(s) for {}, got {}",
                reply.trap,
                frame.fds.len()
            )));
        }
        let invalid =
            PageBitmap::from_le_bytes(&frame.blob, reply.pages).map_err(|e| bad(e.to_string()))?;
        if invalid.count() != reply.invalid {
            return Err(bad(format!(
                "announced {} invalid pages, bitmap has {}",
                reply.invalid,
                invalid.count()
            )));
        }
        Ok((reply, frame.fds, invalid))
    }

    pub fn kvm_userfault_disarm(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::KvmUserfaultDisarm)
    }

    /// Reads the next event frame (on a connection that armed KVM Userfault).
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        let frame = self.conn.read_frame()?;
        if frame.header.kind != FrameKind::Event {
            return Err(ClientError::BadReply {
                op: "kvm_userfault_arm",
                what: format!("expected an event, got a {:?} frame", frame.header.kind),
            });
        }
        crate::strict_json::from_slice(&frame.json).map_err(|what| ClientError::BadReply {
            op: "kvm_userfault_arm",
            what,
        })
    }

    pub fn userfaultfd_disarm(&mut self) -> Result<VmState, ClientError> {
        self.call_state(Request::UserfaultfdDisarm)
    }

    /// Drops the pages of `pages` (global numbering) from an incoming VM's memory.
    pub fn discard(&mut self, pages: &PageBitmap) -> Result<VmState, ClientError> {
        let (reply, _): (StateReply, _) =
            self.call_json(&Request::Discard, &pages.to_le_bytes())?;
        Ok(reply.state)
    }

    pub fn status(&mut self) -> Result<VmStatus, ClientError> {
        Ok(self.call_json(&Request::Status, &[])?.0)
    }

    /// The raw connection, for tests that misbehave on purpose.
    pub fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        self.conn.stream().as_fd()
    }
}
