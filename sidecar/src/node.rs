//! This sidecar and its node: the VMM it is joined to (kept fresh by a watch thread), the
//! guest's health as the VMM reports it, the trap backends this node's kernel offers, and the
//! current and past migrations.
//!
//! Read by the HTTP API and the listener, used by the engines for the VMM's socket and the
//! metrics. It must not run migrations (`crate::lifecycle` starts them).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use faultline::sidecar_api::{GuestHealth, VmInfo};
use faultline::sync::lock;
use faultline::trap::BackendProbe;
use faultline::vmm_protocol::messages::HelloReply;
use faultline::vmm_protocol::{ClientError, VmmClient};

use crate::metrics::Metrics;
use crate::migration::Migration;

/// How many finished migrations `GET /v1/migrations` remembers.
const HISTORY: usize = 16;
/// How often the watch refreshes what the VMM says while joined (readiness, `/v1/node`).
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the watch tries to reach a VMM that is not there (yet).
const REJOIN_INTERVAL: Duration = Duration::from_millis(200);

/// How this sidecar introduces itself to its VMM.
pub const CLIENT_NAME: &str = concat!("faultline-sidecar/", env!("CARGO_PKG_VERSION"));

pub struct Sidecar {
    pub vmm_socket: PathBuf,
    pub migration_port: u16,
    /// Where a target keeps its migration record so that it can rejoin after a restart.
    pub state_dir: Option<PathBuf>,
    pub metrics: Metrics,
    vm: Mutex<Option<HelloReply>>,
    guest: Mutex<Option<GuestHealth>>,
    vmm_error: Mutex<Option<String>>,
    migrations: Mutex<Migrations>,
}

#[derive(Default)]
struct Migrations {
    current: Option<Arc<Migration>>,
    finished: VecDeque<Arc<Migration>>,
}

impl Sidecar {
    pub fn new(vmm_socket: PathBuf, migration_port: u16, state_dir: Option<PathBuf>) -> Self {
        Self {
            vmm_socket,
            migration_port,
            state_dir,
            metrics: Metrics::new(),
            vm: Mutex::new(None),
            guest: Mutex::new(None),
            vmm_error: Mutex::new(Some("not connected to the VMM yet".into())),
            migrations: Mutex::new(Migrations::default()),
        }
    }

    /// The VM as last seen, or why there is none.
    pub fn vm(&self) -> Result<HelloReply, String> {
        lock(&self.vm)
            .clone()
            .ok_or_else(|| lock(&self.vmm_error).clone().unwrap_or_default())
    }

    pub fn vm_info(&self) -> Option<VmInfo> {
        let vm = lock(&self.vm);
        let h = vm.as_ref()?;
        Some(VmInfo {
            vm_id: h.vm_id.clone(),
            vcpus: h.vcpus,
            memory_bytes: h.layout.total_bytes(),
            backing: h.layout.regions.first()?.backing,
            incoming: h.incoming,
            state: h.state,
            guest: lock(&self.guest).clone(),
        })
    }

    /// Asks the VMM now (rather than trusting the last periodic look) and updates the cache.
    pub fn refresh_vm(&self) -> Result<HelloReply, String> {
        let looked = VmmClient::connect(&self.vmm_socket)
            .and_then(|mut c| look(&mut c))
            .map_err(|e| e.to_string());
        match looked {
            Ok((hello, guest)) => {
                self.set_vm(Ok(hello.clone()));
                self.set_guest(guest);
                Ok(hello)
            }
            Err(e) => {
                self.set_vm(Err(e.clone()));
                Err(e)
            }
        }
    }

    fn set_guest(&self, guest: Option<GuestHealth>) {
        if let Some(g) = &guest {
            self.metrics
                .guest_failures
                .set(i64::try_from(g.failures).unwrap_or(i64::MAX));
            self.metrics
                .guest_heartbeats
                .set(i64::try_from(g.heartbeats).unwrap_or(i64::MAX));
        }
        *lock(&self.guest) = guest;
    }

    fn set_vm(&self, hello: Result<HelloReply, String>) {
        self.metrics.vmm_connected.set(i64::from(hello.is_ok()));
        match hello {
            Ok(h) => {
                *lock(&self.vm) = Some(h);
                *lock(&self.vmm_error) = None;
            }
            Err(e) => {
                *lock(&self.vm) = None;
                *lock(&self.guest) = None;
                *lock(&self.vmm_error) = Some(e);
            }
        }
    }

    /// What this node's kernel offers for trapping, probed once per process.
    pub fn trap_backends(&self) -> Vec<BackendProbe> {
        static PROBES: OnceLock<Vec<BackendProbe>> = OnceLock::new();
        PROBES
            .get_or_init(faultline::probe::probe_trap_backends)
            .clone()
    }

    pub fn current(&self) -> Option<Arc<Migration>> {
        lock(&self.migrations).current.clone()
    }

    pub fn all(&self) -> Vec<Arc<Migration>> {
        let m = lock(&self.migrations);
        m.current.iter().chain(m.finished.iter()).cloned().collect()
    }

    /// Whether a migration is running, or ended less than `within` ago and nobody has read its
    /// outcome.
    pub fn outcome_unread(&self, within: std::time::Duration) -> bool {
        self.all().iter().any(|m| m.outcome_unread(within))
    }

    pub fn find(&self, id: &str) -> Option<Arc<Migration>> {
        self.all().into_iter().find(|m| m.id == id)
    }

    /// Installs `m` as the current migration unless one is active (then returns that one).
    pub fn begin(&self, m: Arc<Migration>) -> Result<(), Arc<Migration>> {
        let mut g = lock(&self.migrations);
        if let Some(cur) = &g.current {
            if !cur.phase().is_terminal() {
                return Err(cur.clone());
            }
            let done = cur.clone();
            g.finished.push_front(done);
            g.finished.truncate(HISTORY);
        }
        g.current = Some(m);
        Ok(())
    }
}

/// One look at the VMM: its hello, and the guest's health when the VMM answers `status` (a
/// VMM restoring a state may not yet). The descriptors hello sends are dropped: migrations
/// open their own.
fn look(c: &mut VmmClient) -> Result<(HelloReply, Option<GuestHealth>), ClientError> {
    let (hello, _fds) = c.hello(CLIENT_NAME)?;
    let guest = c.status().ok().map(|s| GuestHealth::from(&s));
    Ok((hello, guest))
}

/// Keeps the sidecar joined to its VMM: reconnects while it is away and refreshes what hello
/// says every second, so readiness and `GET /v1/node` stay true.
pub fn spawn_vmm_watch(sidecar: Arc<Sidecar>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("vmm-watch".into())
        .spawn(move || {
            let mut client: Option<VmmClient> = None;
            loop {
                if client.is_none() {
                    match VmmClient::connect(&sidecar.vmm_socket) {
                        Ok(c) => client = Some(c),
                        Err(e) => sidecar.set_vm(Err(e.to_string())),
                    }
                }
                if let Some(c) = client.as_mut() {
                    match look(c) {
                        Ok((hello, guest)) => {
                            sidecar.set_vm(Ok(hello));
                            sidecar.set_guest(guest);
                        }
                        Err(e) => {
                            sidecar.set_vm(Err(format!("lost the VMM: {e}")));
                            client = None;
                        }
                    }
                }
                std::thread::sleep(if client.is_some() {
                    WATCH_INTERVAL
                } else {
                    REJOIN_INTERVAL
                });
            }
        })
        .map(|_| ())
}
