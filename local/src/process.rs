//! Starting `faultline-vmm` and `faultline-sidecar` processes, each in a private temporary
//! directory, and stopping them when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::VmStatus;

/// How long a process may take to become ready (or to exit when asked).
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a wait for a process looks again.
pub(crate) const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "cannot find the `{name}` binary next to {here} (build the workspace: cargo build --workspace --release)"
    )]
    MissingBinary { name: String, here: String },
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited early ({status}); its log: {log}")]
    Exited {
        what: String,
        status: String,
        /// The exit code; 77 means the kernel lacks what was asked for.
        code: Option<i32>,
        log: String,
    },
    #[error("{what} did not become ready within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{what}: {why}")]
    Other { what: String, why: String },
}

/// Finds a Faultline binary: beside the running executable (or one level up, for test
/// executables in `target/<profile>/deps`), or through `FAULTLINE_BIN_DIR`.
pub fn binary(name: &str) -> Result<PathBuf, LocalError> {
    let here = std::env::current_exe().unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("FAULTLINE_BIN_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(d) = here.parent() {
        dirs.push(d.to_path_buf());
        if let Some(up) = d.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| LocalError::MissingBinary {
            name: name.into(),
            here: here.display().to_string(),
        })
}

pub(crate) fn scratch_dir(tag: &str) -> Result<PathBuf, LocalError> {
    let mut rand = [0u8; 6];
    let _ = getrandom::fill(&mut rand);
    let suffix: String = rand.iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::env::temp_dir().join(format!("faultline-{tag}-{}-{suffix}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| LocalError::Other {
        what: "scratch directory".into(),
        why: format!("{}: {e}", dir.display()),
    })?;
    Ok(dir)
}

/// Starts a Faultline binary with stdout piped and stderr in `log`; `FAULTLINE_CHILD_LOG`
/// sets its log filter (default `warn`).
fn spawn(bin: &str, args: &[String], what: &str, log: &Path) -> Result<Child, LocalError> {
    let err = |source| LocalError::Spawn {
        what: what.into(),
        source,
    };
    let log_file = std::fs::File::create(log).map_err(err)?;
    Command::new(binary(bin)?)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("FAULTLINE_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .map_err(err)
}

pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A running reference VMM with a control socket.
pub struct VmmProcess {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dir: PathBuf,
    log: PathBuf,
    name: String,
}

impl VmmProcess {
    /// Starts `faultline-vmm ARGS --control SOCKET --quiet --json` and waits for its socket.
    pub fn start(tag: &str, args: &[String]) -> Result<Self, LocalError> {
        let dir = scratch_dir(tag)?;
        let socket = dir.join("vmm.sock");
        let log = dir.join("vmm.log");
        let name = format!("faultline-vmm ({tag})");
        let mut control = vec!["--control".into(), socket.display().to_string()];
        control.extend(["--quiet".into(), "--json".into()]);
        let all: Vec<String> = args.iter().cloned().chain(control).collect();
        let child = spawn("faultline-vmm", &all, &name, &log)?;
        let mut vmm = Self {
            child: Some(child),
            socket,
            dir,
            log,
            name,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&vmm.socket).is_ok() {
                return Ok(vmm);
            }
            if let Some(status) = vmm.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(LocalError::Exited {
                    what: vmm.name.clone(),
                    status: status.to_string(),
                    code: status.code(),
                    log: log_tail(&vmm.log),
                });
            }
            if Instant::now() > deadline {
                return Err(LocalError::Timeout {
                    what: vmm.name.clone(),
                    secs: READY_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn client(&self) -> Result<VmmClient, LocalError> {
        VmmClient::connect(&self.socket).map_err(|e| LocalError::Other {
            what: self.name.clone(),
            why: e.to_string(),
        })
    }

    /// The process id (to kill it in failure tests).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the VMM to exit and returns its final status (its `--json` output) and exit
    /// code.
    pub fn wait(&mut self, timeout: Duration) -> Result<(VmStatus, i32), LocalError> {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() > deadline {
                return Err(LocalError::Timeout {
                    what: format!("{} to exit", self.name),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(POLL);
        }
        let child = self.child.take().ok_or_else(|| LocalError::Other {
            what: self.name.clone(),
            why: "already waited for".into(),
        })?;
        let out = child
            .wait_with_output()
            .map_err(|source| LocalError::Spawn {
                what: self.name.clone(),
                source,
            })?;
        let status = serde_json::from_slice(&out.stdout).map_err(|e| LocalError::Other {
            what: self.name.clone(),
            why: format!(
                "final status is not JSON ({e}): {}; log: {}",
                String::from_utf8_lossy(&out.stdout),
                log_tail(&self.log)
            ),
        })?;
        Ok((status, out.status.code().unwrap_or(-1)))
    }

    /// Asks the VMM to shut down and returns its final status and exit code.
    pub fn shutdown(&mut self) -> Result<(VmStatus, i32), LocalError> {
        if let Ok(mut c) = self.client() {
            let _ = c.shutdown();
        }
        self.wait(READY_TIMEOUT)
    }

    pub fn log(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running sidecar joined to a VMM, on loopback with kernel-chosen ports.
pub struct SidecarProcess {
    child: Child,
    /// `host:port` of the control API.
    pub api: String,
    pub migration_port: u16,
    tag: String,
    vmm_socket: PathBuf,
    log: PathBuf,
    _dir: PathBuf,
}

impl SidecarProcess {
    /// Starts a sidecar for the VMM at `vmm_socket` and waits until it has joined it (ready).
    pub fn start(tag: &str, vmm_socket: &Path) -> Result<Self, LocalError> {
        let sidecar = Self::spawn(tag, vmm_socket)?;
        sidecar.wait_ready()?;
        Ok(sidecar)
    }

    fn wait_ready(&self) -> Result<(), LocalError> {
        let client = self.client();
        let deadline = Instant::now() + READY_TIMEOUT;
        while !client.ready() {
            if Instant::now() > deadline {
                return Err(LocalError::Timeout {
                    what: format!("faultline-sidecar ({})", self.tag),
                    secs: READY_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Starts a sidecar and returns once its API listens, joined to its VMM or not (for tests
    /// of what a sidecar answers without one).
    pub fn spawn(tag: &str, vmm_socket: &Path) -> Result<Self, LocalError> {
        let dir = scratch_dir(&format!("{tag}-sidecar"))?;
        Self::spawn_in(tag, vmm_socket, dir, "127.0.0.1:0", "127.0.0.1:0")
    }

    fn spawn_in(
        tag: &str,
        vmm_socket: &Path,
        dir: PathBuf,
        api: &str,
        migration: &str,
    ) -> Result<Self, LocalError> {
        let log = dir.join("sidecar.log");
        let what = format!("faultline-sidecar ({tag})");
        let pki = crate::pki::local()?;
        let args = [
            "--tls-dir".to_string(),
            pki.sidecar_dir().display().to_string(),
            "--vmm-socket".to_string(),
            vmm_socket.display().to_string(),
            "--listen".into(),
            api.into(),
            "--migration-listen".into(),
            migration.into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ];
        let mut child = spawn("faultline-sidecar", &args, &what, &log)?;
        let stdout = child.stdout.take().ok_or_else(|| LocalError::Other {
            what: what.clone(),
            why: "no stdout".into(),
        })?;
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let addrs: serde_json::Value = match read {
            Ok(n) if n > 0 => serde_json::from_str(&line).map_err(|e| LocalError::Other {
                what: what.clone(),
                why: format!("bad address line `{line}`: {e}"),
            })?,
            _ => {
                let status = child.wait().ok();
                return Err(LocalError::Exited {
                    what,
                    status: status.map(|s| s.to_string()).unwrap_or_default(),
                    code: status.and_then(|s| s.code()),
                    log: log_tail(&log),
                });
            }
        };
        let api = addrs["api"].as_str().unwrap_or_default().to_string();
        let migration_port = addrs["migrationPort"].as_u64().unwrap_or(0) as u16;
        Ok(Self {
            child,
            api,
            migration_port,
            tag: tag.to_string(),
            vmm_socket: vmm_socket.to_path_buf(),
            log,
            _dir: dir,
        })
    }

    /// Kills the sidecar (SIGKILL: no chance to clean up, as when a container dies), leaves it
    /// down for `down`, and starts it again on the same ports and state directory, as a kubelet
    /// restarts a container in its pod; returns once it is ready. Its log so far is kept
    /// beside the new one.
    pub fn restart(&mut self, down: Duration) -> Result<(), LocalError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        let old_log = self._dir.join("sidecar.before-restart.log");
        let _ = std::fs::rename(&self.log, &old_log);
        let dir = std::mem::take(&mut self._dir);
        let api = self.api.clone();
        let migration = format!("127.0.0.1:{}", self.migration_port);
        let fresh = Self::spawn_in(&self.tag, &self.vmm_socket, dir, &api, &migration)?;
        // The old value's child is reaped (kill is then a no-op) and its directory was taken
        // above, so dropping it removes nothing the new sidecar uses.
        drop(std::mem::replace(self, fresh));
        self.wait_ready()
    }

    pub fn client(&self) -> crate::SidecarClient {
        crate::SidecarClient::new(&self.api)
    }

    /// The address a source uses to reach this sidecar's migration port.
    pub fn migration_addr(&self) -> String {
        format!("127.0.0.1:{}", self.migration_port)
    }

    pub fn log(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self._dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }
}
