//! faultline-attacker: an on-path attacker for Faultline's security tests, as a process of its
//! own between two sidecars (never deployed).
//!
//! - `relay`: a TCP relay the source dials instead of the target. It forwards both ways and,
//!   on the first connection, flips one bit of the byte at `--flip-at` (source to target),
//!   optionally recording what the source sent on that connection (`--record`).
//! - `replay`: sends a recording to an address, as a replayed handshake, and reports how the
//!   peer answered.
//!
//! The first line on stdout is JSON: `{"listen": "host:port"}` for `relay`, the outcome for
//! `replay`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "faultline-attacker",
    about = "An on-path attacker for Faultline's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relay connections to `--to`, tampering with the first one.
    Relay {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[arg(long)]
        to: String,
        /// Flip the lowest bit of this byte (counted from 0) of what the source sends on the
        /// first connection.
        #[arg(long)]
        flip_at: Option<u64>,
        /// Write what the source sent on the first connection here.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Send a recording to `--to` and report the answer.
    Replay {
        #[arg(long)]
        to: String,
        #[arg(long)]
        from: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Relay {
            listen,
            to,
            flip_at,
            record,
        } => relay(&listen, &to, flip_at, record),
        Command::Replay { to, from } => replay(&to, &from),
    }
}

fn relay(
    listen: &str,
    to: &str,
    flip_at: Option<u64>,
    record: Option<PathBuf>,
) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!(
        "{}",
        serde_json::json!({"listen": l.local_addr().context("address")?.to_string()})
    );
    let first = Arc::new(AtomicBool::new(true));
    let flipped = Arc::new(AtomicU64::new(0));
    for conn in l.incoming() {
        let client = conn.context("accept")?;
        let server = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
        let tamper = first.swap(false, Ordering::SeqCst);
        let (c2, s2) = (client.try_clone()?, server.try_clone()?);
        let record = if tamper { record.clone() } else { None };
        let flip = if tamper { flip_at } else { None };
        let flipped = flipped.clone();
        std::thread::spawn(move || pump(client, server, flip, record, &flipped));
        std::thread::spawn(move || pump(s2, c2, None, None, &AtomicU64::new(0)));
    }
    Ok(())
}

/// Copies `from` to `to` until either ends, tampering as asked.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    flip_at: Option<u64>,
    record: Option<PathBuf>,
    flipped: &AtomicU64,
) {
    let mut seen = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut log = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if record.is_some() {
            log.extend_from_slice(&buf[..n]);
        }
        if let Some(at) = flip_at
            && (seen..seen + n as u64).contains(&at)
        {
            buf[(at - seen) as usize] ^= 1;
            flipped.fetch_add(1, Ordering::SeqCst);
            eprintln!("flipped a bit of byte {at}");
        }
        seen += n as u64;
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    if let Some(path) = record {
        let _ = std::fs::write(path, &log);
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn replay(to: &str, from: &std::path::Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let mut s = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let sent = s.write_all(&bytes).map(|()| bytes.len()).unwrap_or(0);
    let mut answer = Vec::new();
    let ended = match s.read_to_end(&mut answer) {
        Ok(_) => "closed".to_string(),
        Err(e) => e.to_string(),
    };
    println!(
        "{}",
        serde_json::json!({"sent": sent, "received": answer.len(), "ended": ended})
    );
    Ok(())
}
