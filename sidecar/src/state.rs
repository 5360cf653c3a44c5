//! The sidecar's shared state: the VMM it is joined to, the current and past migrations with
//! their status and progress counters, and the metrics. Read by the HTTP API, written by the
//! migration engines.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use faultline::sidecar_api::{
    GuestHealth, LatencySummary, MigrationStatus, Phase, Policy, Progress, Role, StartMigration,
    VmInfo,
};
use faultline::trap::Backend as TrapBackend;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::HelloReply;
use faultline::wire::{LayoutDigest, Secret};

use crate::metrics::Metrics;

/// How many finished migrations `GET /v1/migrations` remembers.
const HISTORY: usize = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Sidecar {
    pub vmm_socket: PathBuf,
    pub migration_port: u16,
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
    pub fn new(vmm_socket: PathBuf, migration_port: u16) -> Self {
        Self {
            vmm_socket,
            migration_port,
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
        lock(&self.vm).as_ref().map(|h| VmInfo {
            vm_id: h.vm_id.clone(),
            vcpus: h.vcpus,
            memory_bytes: h.layout.total_bytes(),
            backing: h.layout.regions[0].backing,
            incoming: h.incoming,
            state: h.state,
            guest: lock(&self.guest).clone(),
        })
    }

    /// Asks the VMM now (rather than trusting the last periodic look) and updates the cache.
    pub fn refresh_vm(&self) -> Result<HelloReply, String> {
        let mut client = VmmClient::connect(&self.vmm_socket).map_err(|e| e.to_string());
        let hello = client
            .as_mut()
            .map_err(|e| e.clone())
            .and_then(|c| look(c).map_err(|e| e.to_string()));
        self.set_vm(hello.clone().map(|(h, _)| h));
        if let Ok((_, guest)) = &hello {
            self.set_guest(guest.clone());
        }
        hello.map(|(h, _)| h)
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
        let connected = hello.is_ok();
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
        self.metrics.vmm_connected.set(i64::from(connected));
    }

    pub fn current(&self) -> Option<Arc<Migration>> {
        lock(&self.migrations).current.clone()
    }

    pub fn all(&self) -> Vec<Arc<Migration>> {
        let m = lock(&self.migrations);
        m.current.iter().chain(m.finished.iter()).cloned().collect()
    }

    pub fn find(&self, id: &str) -> Option<Arc<Migration>> {
        self.all().into_iter().find(|m| m.id == id)
    }

    /// Installs `m` as the current migration unless one is active.
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
fn look(
    c: &mut VmmClient,
) -> Result<(HelloReply, Option<GuestHealth>), faultline::vmm_protocol::ClientError> {
    let (hello, _fds) = c.hello(concat!("faultline-sidecar/", env!("CARGO_PKG_VERSION")))?;
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
                std::thread::sleep(Duration::from_millis(if client.is_some() {
                    1000
                } else {
                    200
                }));
            }
        })
        .map(|_| ())
}

/// Progress counters, updated lock-free by the engines.
pub struct Counters {
    pub total_pages: AtomicU64,
    pub transferred_pages: AtomicU64,
    pub transferred_bytes: AtomicU64,
    pub zero_pages: AtomicU64,
    pub remaining_pages: AtomicU64,
    pub precopy_rounds: AtomicU32,
    pub reconnects: AtomicU32,
    pub faults: AtomicU64,
    dirty_rate: AtomicU64,
    bandwidth: AtomicU64,
    downtime_us: AtomicU64,
    latency: Mutex<hdrhistogram::Histogram<u64>>,
}

impl Counters {
    fn new() -> Self {
        Self {
            total_pages: AtomicU64::new(0),
            transferred_pages: AtomicU64::new(0),
            transferred_bytes: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            remaining_pages: AtomicU64::new(0),
            precopy_rounds: AtomicU32::new(0),
            reconnects: AtomicU32::new(0),
            faults: AtomicU64::new(0),
            dirty_rate: AtomicU64::new(0),
            bandwidth: AtomicU64::new(0),
            downtime_us: AtomicU64::new(u64::MAX),
            // 1 µs .. 100 s, 3 significant digits.
            latency: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 100_000_000, 3)
                    .expect("static histogram bounds are valid"),
            ),
        }
    }

    pub fn set_dirty_rate(&self, pages_per_sec: f64) {
        self.dirty_rate
            .store(pages_per_sec.to_bits(), Ordering::Relaxed);
    }

    pub fn set_bandwidth(&self, bytes_per_sec: f64) {
        self.bandwidth
            .store(bytes_per_sec.to_bits(), Ordering::Relaxed);
    }

    pub fn set_downtime(&self, d: Duration) {
        self.downtime_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn downtime(&self) -> Option<Duration> {
        match self.downtime_us.load(Ordering::Relaxed) {
            u64::MAX => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    pub fn record_fault_latency(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 100_000_000);
        let _ = lock(&self.latency).record(us);
    }

    pub fn latency(&self) -> LatencySummary {
        let h = lock(&self.latency);
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            max: h.max(),
        }
    }

    pub fn progress(&self) -> Progress {
        let r = Ordering::Relaxed;
        Progress {
            total_pages: self.total_pages.load(r),
            transferred_pages: self.transferred_pages.load(r),
            transferred_bytes: self.transferred_bytes.load(r),
            zero_pages: self.zero_pages.load(r),
            remaining_pages: self.remaining_pages.load(r),
            precopy_rounds: self.precopy_rounds.load(r),
            dirty_rate_pages_per_sec: f64::from_bits(self.dirty_rate.load(r)),
            bandwidth_bytes_per_sec: f64::from_bits(self.bandwidth.load(r)),
            faults: self.faults.load(r),
            fault_latency_us: self.latency(),
            downtime_ms: self.downtime().map(|d| d.as_secs_f64() * 1e3),
            reconnects: self.reconnects.load(r),
        }
    }
}

struct Inner {
    phase: Phase,
    trap: Option<TrapBackend>,
    /// Source: decided to fence (a cancel can no longer win).
    committing: bool,
    /// Target: state restored and `prepared` sent (only the source may still cancel).
    prepared: bool,
    committed: bool,
    vm_lost: bool,
    message: String,
    error: Option<String>,
    finished: Option<Instant>,
}

/// An accepted, authenticated connection from a source, handed to the target engine.
pub struct Accepted {
    pub channel: faultline::wire::Channel,
    pub stream: std::net::TcpStream,
}

pub struct Migration {
    pub id: String,
    pub role: Role,
    pub policy: Policy,
    pub peer: Option<String>,
    pub secret: Secret,
    pub request: StartMigration,
    pub started: Instant,
    pub cancel: AtomicBool,
    pub counters: Counters,
    inner: Mutex<Inner>,
    /// Target: the layout digest peers must match, once the engine knows its VMM.
    pub digest: OnceLock<LayoutDigest>,
    /// Target: where the listener delivers authenticated connections.
    pub inbox: Mutex<Option<std::sync::mpsc::Sender<Accepted>>>,
}

impl Migration {
    pub fn new(request: StartMigration, secret: Secret) -> Self {
        let phase = match request.role {
            Role::Source => Phase::Connecting,
            Role::Target => Phase::Waiting,
        };
        Self {
            id: request.id.clone(),
            role: request.role,
            policy: request.policy.clone(),
            peer: request.peer.clone(),
            secret,
            started: Instant::now(),
            cancel: AtomicBool::new(false),
            counters: Counters::new(),
            inner: Mutex::new(Inner {
                phase,
                trap: None,
                committing: false,
                prepared: false,
                committed: false,
                vm_lost: false,
                message: "accepted".into(),
                error: None,
                finished: None,
            }),
            digest: OnceLock::new(),
            inbox: Mutex::new(None),
            request,
        }
    }

    pub fn phase(&self) -> Phase {
        lock(&self.inner).phase
    }

    pub fn set_phase(&self, phase: Phase, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(migration = %self.id, role = ?self.role, ?phase, "{message}");
        let mut g = lock(&self.inner);
        g.phase = phase;
        g.message = message;
        if phase.is_terminal() && g.finished.is_none() {
            g.finished = Some(Instant::now());
        }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        lock(&self.inner).message = message.into();
    }

    pub fn set_trap(&self, trap: Option<TrapBackend>) {
        lock(&self.inner).trap = trap;
    }

    pub fn commit(&self) {
        lock(&self.inner).committed = true;
    }

    /// Source, just before fencing: claims the commit unless a cancel came first. Cancel and
    /// commit decide under one lock, so a cancel that was accepted always wins.
    pub fn try_begin_commit(&self) -> bool {
        let mut g = lock(&self.inner);
        if self.cancel.load(Ordering::Acquire) {
            return false;
        }
        g.committing = true;
        true
    }

    /// Target: `prepared` was sent; from now on only the source can cancel.
    pub fn set_prepared(&self) {
        lock(&self.inner).prepared = true;
    }

    /// Requests cancellation, unless the migration is past deciding it.
    pub fn request_cancel(&self) -> Result<(), String> {
        let mut g = lock(&self.inner);
        if g.phase.is_terminal() {
            return Err(format!(
                "migration `{}` has already ended ({:?})",
                self.id, g.phase
            ));
        }
        if g.committed || g.committing {
            return Err(format!(
                "migration `{}` is past the point of no return (the source is fenced); it can only complete",
                self.id
            ));
        }
        if g.prepared {
            return Err(format!(
                "migration `{}` is prepared on the target and waits for the source's decision; cancel it at the source",
                self.id
            ));
        }
        self.cancel.store(true, Ordering::Release);
        g.message = "cancellation requested".into();
        Ok(())
    }

    pub fn committed(&self) -> bool {
        lock(&self.inner).committed
    }

    /// Ends the migration with an error. After the commit point the VM is lost with it.
    pub fn fail(&self, error: String) {
        let mut g = lock(&self.inner);
        if g.phase.is_terminal() {
            return;
        }
        tracing::error!(migration = %self.id, role = ?self.role, "migration failed: {error}");
        g.vm_lost = g.committed;
        g.message = if g.committed {
            format!("failed after the point of no return; the VM is lost: {error}")
        } else {
            format!("failed; the source VM keeps running: {error}")
        };
        g.error = Some(error);
        g.phase = Phase::Failed;
        g.finished = Some(Instant::now());
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    pub fn status(&self) -> MigrationStatus {
        let g = lock(&self.inner);
        let end = g.finished.unwrap_or_else(Instant::now);
        MigrationStatus {
            id: self.id.clone(),
            role: self.role,
            phase: g.phase,
            mode: self.policy.mode,
            trap: g.trap,
            committed: g.committed,
            vm_lost: g.vm_lost,
            progress: self.counters.progress(),
            elapsed_s: end.duration_since(self.started).as_secs_f64(),
            message: g.message.clone(),
            error: g.error.clone(),
        }
    }
}
