//! The migration port: accepts connections from source sidecars, authenticates them against
//! the current target migration (wire handshake), and hands the authenticated streams to the
//! target engine. A connection that fails the handshake gets an error frame and is closed; it
//! never disturbs the migration it tried to join.

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use faultline::sidecar_api::Role;
use faultline::wire::frame::FrameReader;
use faultline::wire::handshake::{self, refuse};

use crate::state::{Accepted, Sidecar};

/// Time a peer has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

fn accept(stream: TcpStream, sidecar: &Sidecar) -> Result<(), String> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let hello = handshake::server_hello(&mut reader).map_err(|e| e.to_string())?;
    let Some(m) = sidecar
        .current()
        .filter(|m| m.role == Role::Target && m.id == hello.id && !m.phase().is_terminal())
    else {
        return Err(refuse(
            &mut writer,
            format!("no target migration `{}` is waiting here", hello.id),
        )
        .to_string());
    };
    // The target engine learns its layout right after the migration starts; a source that
    // connects at once waits for it rather than being turned away.
    let ready_by = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let digest = loop {
        if let Some(d) = m.digest.get() {
            break d;
        }
        if m.phase().is_terminal() || std::time::Instant::now() > ready_by {
            return Err(refuse(&mut writer, "the target is not ready".into()).to_string());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    handshake::server_finish(&mut reader, &mut writer, &hello, &m.secret, digest)
        .map_err(|e| e.to_string())?;
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    let inbox = m.inbox.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match inbox {
        Some(tx) => tx
            .send(Accepted {
                channel: hello.channel,
                stream,
            })
            .map_err(|_| "the target migration stopped listening".to_string()),
        None => Err("the target migration is not accepting connections".into()),
    }
}
