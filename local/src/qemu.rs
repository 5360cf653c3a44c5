//! QEMU beside Faultline on one machine: a `qemu-system-x86_64` process (KVM, one vCPU, a PC
//! boot image as its `-kernel`), its QMP monitor and its debug console, for the benchmark's
//! side-by-side comparison. It starts QEMU, speaks QMP and collects what the guest writes to
//! the console; what to migrate and what to measure is the caller's business.
//!
//! QEMU connects to sockets this side listens on (QMP and the console), so nothing the guest
//! writes before the harness is ready can be lost. `FAULTLINE_QEMU` names another binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::LocalError;
use crate::process::{POLL, READY_TIMEOUT, log_tail, scratch_dir};

/// How long one QMP command may take to answer.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// The QEMU binary: `FAULTLINE_QEMU`, or `qemu-system-x86_64` on the PATH.
pub fn qemu_binary() -> String {
    std::env::var("FAULTLINE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// QEMU's version line (`QEMU emulator version 7.2.19 (Debian …)`), which also proves it runs.
pub fn qemu_version() -> Result<String, LocalError> {
    let bin = qemu_binary();
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| LocalError::Other {
            what: format!("QEMU ({bin})"),
            why: format!(
                "cannot run it: {e} (install Debian's qemu-system-x86 or set FAULTLINE_QEMU)"
            ),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| out.status.success() && l.starts_with("QEMU"))
        .map(str::to_string)
        .ok_or_else(|| LocalError::Other {
            what: format!("QEMU ({bin})"),
            why: format!("`--version` answered {:?}", text.trim()),
        })
}

/// One record the guest wrote to the debug console: a port of the guest ABI (0xF0 heartbeat,
/// 0xF1 failure, 0xF2 status) and its 32-bit value, with the moment it arrived here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleRecord {
    pub at: Instant,
    pub port: u8,
    pub value: u32,
}

/// Everything a guest wrote to its debug console so far (read by a thread of its own).
#[derive(Clone, Default)]
pub struct Console {
    records: Arc<Mutex<Vec<ConsoleRecord>>>,
}

impl Console {
    /// Reads memtouch's PC-mode records: a start byte (top bit set, the port's low nibble)
    /// and five 7-bit groups of the value. Bytes before a start byte are the tail of a record
    /// the guest began on the other host before it migrated, and are skipped.
    fn read_from(&self, stream: UnixStream) {
        let records = Arc::clone(&self.records);
        std::thread::spawn(move || {
            let mut partial: Option<(u8, u32, u32)> = None;
            for byte in BufReader::new(stream).bytes() {
                let Ok(b) = byte else { return };
                partial = if b & 0x80 != 0 {
                    Some((0xF0 | (b & 0x0F), 0, 0))
                } else if let Some((port, value, n)) = partial {
                    let value = value | (u32::from(b) << (7 * n));
                    if n + 1 < 5 {
                        Some((port, value, n + 1))
                    } else {
                        let r = ConsoleRecord {
                            at: Instant::now(),
                            port,
                            value,
                        };
                        match records.lock() {
                            Ok(mut v) => v.push(r),
                            Err(_) => return,
                        }
                        None
                    }
                } else {
                    None
                };
            }
        });
    }

    pub fn records(&self) -> Vec<ConsoleRecord> {
        self.records.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The last record on `port` that arrived before `before`.
    pub fn last(&self, port: u8, before: Instant) -> Option<ConsoleRecord> {
        self.records()
            .into_iter()
            .rev()
            .find(|r| r.port == port && r.at <= before)
    }
}

/// A QMP connection (QEMU's JSON monitor protocol), past its capabilities negotiation.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn open(stream: UnixStream) -> Result<Self, LocalError> {
        let io = |e: std::io::Error| LocalError::Other {
            what: "QMP".into(),
            why: e.to_string(),
        };
        stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(LocalError::Other {
                what: "QMP".into(),
                why: format!("unexpected greeting {greeting}"),
            });
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, LocalError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| LocalError::Other {
                what: "QMP".into(),
                why: format!("reading: {e}"),
            })?;
        if n == 0 {
            return Err(LocalError::Other {
                what: "QMP".into(),
                why: "QEMU closed the monitor".into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| LocalError::Other {
            what: "QMP".into(),
            why: format!("not JSON ({e}): {line}"),
        })
    }

    /// Runs one command and returns its `return` value; QEMU's `error` becomes an error.
    /// Asynchronous events arriving meanwhile are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, LocalError> {
        let mut msg = json!({ "execute": command, "arguments": arguments }).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| LocalError::Other {
                what: format!("QMP {command}"),
                why: format!("writing: {e}"),
            })?;
        loop {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(LocalError::Other {
                    what: format!("QMP {command}"),
                    why: e
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU said no")
                        .to_string(),
                });
            }
        }
    }
}

/// A running QEMU.
pub struct QemuProcess {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    what: String,
    pub qmp: Qmp,
    pub console: Console,
}

impl QemuProcess {
    /// Boots `image` (a multiboot image) in a VM of `memory` bytes with one vCPU, or, with
    /// `incoming`, waits for a migration (`-incoming defer`: the caller sets capabilities and
    /// then calls `migrate-incoming`).
    pub fn start(tag: &str, memory: u64, image: &[u8], incoming: bool) -> Result<Self, LocalError> {
        let what = format!("QEMU ({tag})");
        let dir = scratch_dir(tag)?;
        let other = |why: String| LocalError::Other {
            what: what.clone(),
            why,
        };
        let kernel = dir.join("memtouch-pc.img");
        std::fs::write(&kernel, image).map_err(|e| other(format!("{}: {e}", kernel.display())))?;
        let qmp_path = dir.join("qmp.sock");
        let console_path = dir.join("console.sock");
        let listen = |p: &Path| {
            let l = UnixListener::bind(p).map_err(|e| other(format!("{}: {e}", p.display())))?;
            l.set_nonblocking(true)
                .map_err(|e| other(format!("{}: {e}", p.display())))?;
            Ok::<_, LocalError>(l)
        };
        let qmp_listener = listen(&qmp_path)?;
        let console_listener = listen(&console_path)?;
        let log = dir.join("qemu.log");
        let log_file = std::fs::File::create(&log).map_err(|e| other(e.to_string()))?;
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-name", &format!("faultline-{tag}")])
            .args(["-machine", "pc,accel=kvm"])
            // The host's CPU, less the one MSR this nested KVM refuses to set.
            .args(["-cpu", "host,-arch-capabilities"])
            .args(["-smp", "1", "-m", &format!("{}M", memory >> 20)])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-chardev")
            .arg(format!("socket,id=qmp,path={}", qmp_path.display()))
            .args(["-mon", "chardev=qmp,mode=control"])
            .arg("-chardev")
            .arg(format!("socket,id=con,path={}", console_path.display()))
            .args(["-device", "isa-debugcon,iobase=0xe9,chardev=con"]);
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| LocalError::Spawn {
                what: what.clone(),
                source: e,
            })?;
        let mut accept = |l: &UnixListener| -> Result<UnixStream, LocalError> {
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).map_err(|e| other(e.to_string()))?;
                        return Ok(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(other(format!("accepting QEMU: {e}"))),
                }
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(LocalError::Exited {
                        what: what.clone(),
                        status: status.to_string(),
                        code: status.code(),
                        log: log_tail(&log),
                    });
                }
                if Instant::now() > deadline {
                    return Err(LocalError::Timeout {
                        what: what.clone(),
                        secs: READY_TIMEOUT.as_secs(),
                    });
                }
                std::thread::sleep(POLL);
            }
        };
        // QEMU opens its character devices in command-line order: QMP first.
        let ready = accept(&qmp_listener).and_then(|q| {
            let console = accept(&console_listener)?;
            Ok((Qmp::open(q)?, console))
        });
        let (qmp, console_stream) = match ready {
            Ok(r) => r,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let console = Console::default();
        console.read_from(console_stream);
        Ok(Self {
            child,
            dir,
            log,
            what,
            qmp,
            console,
        })
    }

    /// The tail of QEMU's own log (its stderr).
    pub fn log(&self) -> String {
        log_tail(&self.log)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks QEMU to quit and waits for it (killing it after a grace period).
    pub fn quit(&mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }
}

impl std::fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProcess")
            .field("what", &self.what)
            .finish()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
