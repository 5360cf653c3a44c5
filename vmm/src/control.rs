//! The VMM protocol server: accepts connections on the control socket and answers each
//! request frame from [`Vm`]'s operations. It translates and validates; it owns no VM logic.
//! A client that breaks framing gets an error reply and is disconnected; the VM is untouched.

use std::io::ErrorKind;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use faultline::vmm_protocol::conn::{ConnError, Connection, Frame};
use faultline::vmm_protocol::frame::{FrameError, FrameKind};
use faultline::vmm_protocol::messages::{
    DirtyLogReply, ErrorCode, ErrorReply, Request, StateReply,
};

use crate::vm::Vm;

/// Fails if another process listens on `path`, so two VMMs never share a socket.
pub fn check_free(path: &Path) -> anyhow::Result<()> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use by another process", path.display());
    }
    Ok(())
}

/// Binds the control socket. A stale socket file (no one listening) is replaced; a live one
/// is an error.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    check_free(path)?;
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Serves connections until the process exits.
pub fn serve(
    listener: UnixListener,
    vm: Arc<Vm>,
    frame_timeout: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let vm = vm.clone();
                        let spawned = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || {
                                // Requests are rare and short, and one of them ends a VM's
                                // downtime: answer ahead of the vCPUs it just woke.
                                let _ = faultline::sys::sched::realtime_this_thread();
                                handle(
                                    Connection::new(stream).with_frame_timeout(frame_timeout),
                                    &vm,
                                )
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a control connection thread: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("control socket accept failed: {e}"),
                }
            }
        })
}

fn handle(mut conn: Connection, vm: &Vm) {
    loop {
        let frame = match conn.read_frame() {
            Ok(frame) => frame,
            Err(ConnError::Closed) => return,
            Err(ConnError::Io(e)) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => {
                // The stream is no longer at a frame boundary: say why, then hang up.
                let code = match &e {
                    ConnError::Frame(FrameError::UnsupportedVersion(_)) => {
                        ErrorCode::UnsupportedVersion
                    }
                    _ => ErrorCode::BadFrame,
                };
                tracing::warn!("closing a control connection: {e}");
                let _ = reply_error(&mut conn, 0, ErrorReply::new(code, e.to_string()));
                return;
            }
        };
        let id = frame.header.id;
        // The two requests that may give this connection over to events; `respond` answers
        // every other one, and these too when malformed.
        let plain = frame.header.kind == FrameKind::Request
            && frame.fds.is_empty()
            && frame.blob.is_empty();
        match plain.then(|| Request::parse(&frame.json)) {
            Some(Ok(Request::KvmUserfaultArm { host_accesses })) => {
                // This connection becomes the event channel: arm, reply, and read no more.
                arm_kvm_userfault(conn, vm, id, host_accesses);
                return;
            }
            Some(Ok(Request::TrapRejoin)) => match rejoin_trap(&mut conn, vm, id) {
                // Under KVM Userfault the connection now carries events only.
                Ok(true) => return,
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("cannot answer trap_rejoin: {e}");
                    return;
                }
            },
            _ => {}
        }
        let shutdown = match respond(&mut conn, vm, frame) {
            Ok(shutdown) => shutdown,
            Err(e) => {
                tracing::debug!("control client went away: {e}");
                return;
            }
        };
        if shutdown {
            tracing::info!(request = id, "shutdown requested over the control socket");
            vm.request_shutdown();
        }
    }
}

fn arm_kvm_userfault(mut conn: Connection, vm: &Vm, id: u32, host_accesses: bool) {
    let events = match conn.stream().try_clone() {
        Ok(s) => Connection::new(s),
        Err(e) => {
            let _ = reply_error(
                &mut conn,
                id,
                ErrorReply::new(
                    ErrorCode::Failed,
                    format!("cannot share the connection: {e}"),
                ),
            );
            return;
        }
    };
    match vm.kvm_userfault_arm(events, host_accesses) {
        Ok((reply, bitmap, uffd)) => {
            let json = serde_json::to_vec(&reply).unwrap_or_default();
            let mut fds = vec![bitmap.as_fd()];
            fds.extend(uffd.as_ref().map(|u| u.as_fd()));
            if let Err(e) = conn.write_frame(FrameKind::Reply, id, &json, &[], &fds) {
                tracing::error!("cannot answer kvm_userfault_arm: {e}");
            }
        }
        Err(e) => {
            let _ = reply_error(&mut conn, id, e);
        }
    }
}

/// Answers `trap_rejoin`. Returns whether the connection became the event channel.
fn rejoin_trap(conn: &mut Connection, vm: &Vm, id: u32) -> std::io::Result<bool> {
    let rejoin = match vm.trap_rejoin() {
        Ok(r) => r,
        Err(e) => return reply_error(conn, id, e).map(|_| false),
    };
    let json = serde_json::to_vec(&rejoin.reply).unwrap_or_default();
    let blob = rejoin.invalid.to_le_bytes();
    let fds: Vec<_> = rejoin.fds.iter().map(|f| f.as_fd()).collect();
    if rejoin.takes_events {
        let events = Connection::new(conn.stream().try_clone()?);
        let resent = vm.userfault().rejoin(events, |c| {
            c.write_frame(FrameKind::Reply, id, &json, &blob, &fds)
        })?;
        tracing::info!(
            resent,
            invalid = rejoin.reply.invalid,
            "a receiver rejoined the KVM Userfault trap"
        );
    } else {
        conn.write_frame(FrameKind::Reply, id, &json, &blob, &fds)?;
        tracing::info!(
            invalid = rejoin.reply.invalid,
            "a receiver rejoined the userfaultfd trap"
        );
    }
    // Threads blocked in a userfaultfd fault (the trap's, or the host half's) fault again,
    // so that the new receiver hears of them.
    vm.wake_uffd_waiters();
    Ok(rejoin.takes_events)
}

fn reply_error(conn: &mut Connection, id: u32, e: ErrorReply) -> std::io::Result<()> {
    let json = serde_json::to_vec(&e).unwrap_or_default();
    conn.write_frame(FrameKind::Error, id, &json, &[], &[])
}

fn reply<T: serde::Serialize>(conn: &mut Connection, id: u32, value: &T) -> std::io::Result<()> {
    let json = serde_json::to_vec(value).unwrap_or_default();
    conn.write_frame(FrameKind::Reply, id, &json, &[], &[])
}

/// Answers one frame. Returns true when the request was a shutdown (already acknowledged).
fn respond(conn: &mut Connection, vm: &Vm, frame: Frame) -> std::io::Result<bool> {
    let id = frame.header.id;
    if frame.header.kind != FrameKind::Request {
        let e = ErrorReply::new(
            ErrorCode::BadFrame,
            format!("expected a request frame, got {:?}", frame.header.kind),
        );
        return reply_error(conn, id, e).map(|_| false);
    }
    if !frame.fds.is_empty() {
        // Dropping `frame` closes them: nothing a client may send carries descriptors.
        let e = ErrorReply::new(ErrorCode::BadRequest, "requests carry no file descriptors");
        return reply_error(conn, id, e).map(|_| false);
    }
    let request = match Request::parse(&frame.json) {
        Ok(r) => r,
        Err(e) => return reply_error(conn, id, e).map(|_| false),
    };
    if !frame.blob.is_empty() && !matches!(request, Request::RestoreState | Request::Discard) {
        let e = ErrorReply::new(
            ErrorCode::BadRequest,
            format!("`{}` takes no binary part", request.op()),
        );
        return reply_error(conn, id, e).map(|_| false);
    }
    tracing::debug!(op = request.op(), id, "control request");
    let state = |r: Result<_, ErrorReply>| r.map(|state| StateReply { state });
    match request {
        Request::Hello { client } => {
            tracing::info!(client, "control client said hello");
            let (hello, fds) = vm.hello();
            let json = serde_json::to_vec(&hello).unwrap_or_default();
            conn.write_frame(FrameKind::Reply, id, &json, &[], &fds)?;
        }
        Request::Pause => send(conn, id, state(vm.pause()))?,
        Request::Resume => send(conn, id, state(vm.resume()))?,
        Request::Fence => send(conn, id, state(vm.fence()))?,
        Request::RestoreState => send(conn, id, state(vm.restore_state(&frame.blob)))?,
        Request::DirtyLogStart => send(conn, id, state(vm.dirty_log_start()))?,
        Request::Discard => send(conn, id, state(vm.discard(&frame.blob)))?,
        Request::UserfaultfdDisarm => send(conn, id, state(vm.userfaultfd_disarm()))?,
        Request::KvmUserfaultDisarm => send(conn, id, state(vm.kvm_userfault_disarm()))?,
        // Handled in `handle`, which gives the connection over to events.
        Request::KvmUserfaultArm { .. } | Request::TrapRejoin => {
            let e = ErrorReply::new(
                ErrorCode::Failed,
                format!("{} reached the wrong path", request.op()),
            );
            reply_error(conn, id, e)?
        }
        Request::UserfaultfdRegister { mode } => match vm.userfaultfd_register(mode) {
            Ok((reply, fd)) => {
                let json = serde_json::to_vec(&reply).unwrap_or_default();
                conn.write_frame(FrameKind::Reply, id, &json, &[], &[fd.as_fd()])?;
            }
            Err(e) => reply_error(conn, id, e)?,
        },
        Request::DirtyLogStop => send(conn, id, state(vm.dirty_log_stop()))?,
        Request::Status => reply(conn, id, &vm.status())?,
        Request::SaveState => match vm.save_state() {
            Ok((info, blob)) => {
                let json = serde_json::to_vec(&info).unwrap_or_default();
                conn.write_frame(FrameKind::Reply, id, &json, &blob, &[])?;
            }
            Err(e) => reply_error(conn, id, e)?,
        },
        Request::DirtyLogCollect => match vm.dirty_log_collect() {
            Ok(bitmap) => {
                let info = DirtyLogReply {
                    pages: bitmap.pages(),
                    dirty: bitmap.count(),
                };
                let json = serde_json::to_vec(&info).unwrap_or_default();
                conn.write_frame(FrameKind::Reply, id, &json, &bitmap.to_le_bytes(), &[])?;
            }
            Err(e) => reply_error(conn, id, e)?,
        },
        Request::Shutdown => {
            reply(conn, id, &StateReply { state: vm.state() })?;
            return Ok(true);
        }
    }
    Ok(false)
}

fn send<T: serde::Serialize>(
    conn: &mut Connection,
    id: u32,
    result: Result<T, ErrorReply>,
) -> std::io::Result<()> {
    match result {
        Ok(v) => reply(conn, id, &v),
        Err(e) => reply_error(conn, id, e),
    }
}
