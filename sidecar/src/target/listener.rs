//! The migration port: accepts connections from source sidecars, authenticates them against
//! the current target migration (wire handshake), and hands the authenticated streams to the
//! target engine. A connection that fails the handshake gets an error frame and is closed; it
//! never disturbs the migration it tried to join.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline::sidecar_api::Role;
use faultline::wire::frame::FrameReader;
use faultline::wire::handshake::{self, refuse};

use crate::migration::Accepted;
use crate::node::Sidecar;

/// Time a peer has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a handshake that arrived before the target engine knew its layout looks again.
const LAYOUT_POLL: Duration = Duration::from_millis(5);

pub fn spawn(listener: TcpListener, sidecar: Arc<Sidecar>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("migration-listener".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let sidecar = sidecar.clone();
                        let spawned = std::thread::Builder::new()
                            .name("migration-handshake".into())
                            .spawn(move || {
                                let peer = stream.peer_addr().ok();
                                if let Err(e) = accept(stream, &sidecar) {
                                    tracing::warn!(?peer, "refused a migration connection: {e}");
                                    if let Some(m) = sidecar.current() {
                                        m.set_message(format!(
                                            "refused a connection from {peer:?}: {e}"
                                        ));
                                    }
                                }
                            });
                        if let Err(e) = spawned {
                            tracing::error!("cannot start a handshake thread: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("migration accept failed: {e}"),
                }
            }
        })
        .map(|_| ())
}

fn accept(sock: TcpStream, sidecar: &Sidecar) -> Result<(), String> {
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    // The connection is protected as the current target migration's policy says (TLS with
    // that migration's identities); with no target migration here there is nothing to join.
    let Some(current) = sidecar
        .current()
        .filter(|m| m.role == Role::Target && !m.phase().is_terminal())
    else {
        return Err("no target migration is waiting here".into());
    };
    let stream = current
        .protection
        .accept(sock)
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let hello = handshake::server_hello(&mut reader).map_err(|e| e.to_string())?;
    let Some(m) = sidecar
        .current()
        .filter(|m| Arc::ptr_eq(m, &current) && m.id == hello.id && !m.phase().is_terminal())
    else {
        return Err(refuse(
            &mut writer,
            format!("no target migration `{}` is waiting here", hello.id),
        )
        .to_string());
    };
    // The target engine learns its layout right after the migration starts; a source that
    // connects at once waits for it rather than being turned away.
    let ready_by = Instant::now() + HANDSHAKE_TIMEOUT;
    let digest = loop {
        if let Some(d) = m.digest.get() {
            break d;
        }
        if m.phase().is_terminal() || Instant::now() > ready_by {
            return Err(refuse(&mut writer, "the target is not ready".into()).to_string());
        }
        std::thread::sleep(LAYOUT_POLL);
    };
    handshake::server_finish(&mut reader, &mut writer, &hello, &m.secret, digest)
        .map_err(|e| e.to_string())?;
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    m.deliver(Accepted {
        channel: hello.channel,
        stream,
    })
}
