//! vCPU threads and the run control that starts, pauses and stops them.
//!
//! Each vCPU has one thread that owns the KVM_RUN loop. The control side never calls into a
//! running vCPU: it clears the run flag and kicks the threads with a real-time signal; the
//! handler sets `immediate_exit` in the thread's `kvm_run`, so a kick that lands just before
//! KVM_RUN is never lost. A thread that stops re-enters KVM_RUN once with `immediate_exit`
//! set, which completes any pending port I/O so the saved state is consistent (KVM API docs,
//! "KVM_RUN"). Only then does it report itself paused and release its vCPU fd, which is when
//! the control side may read or write that vCPU's state.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use faultline::vmm_protocol::messages::VcpuState;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::accounting::Accounting;
use crate::userfault::UserfaultTrap;

pub const PORT_HEARTBEAT: u16 = 0xF0;
pub const PORT_FAILURE: u16 = 0xF1;
pub const PORT_STATUS: u16 = 0xF2;
pub const PORT_SLEEP: u16 = 0xF3;
/// The longest sleep one write to the sleep port may ask for.
const MAX_SLEEP: Duration = Duration::from_secs(1);

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's kvm_run mapping, which
        // outlives the thread; a single byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The kick signal: the first real-time signal, which the C runtime leaves alone.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler; once per process, before any vCPU thread starts.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// What the VMM wants of its vCPUs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    Pause,
    Run,
    Exit,
}

struct Inner {
    want: Want,
    states: Vec<VcpuState>,
    errors: Vec<Option<String>>,
}

/// Shared between the control side and every vCPU thread.
pub struct RunControl {
    inner: Mutex<Inner>,
    changed: Condvar,
    /// Mirrors `want == Run` for the vCPU threads' lock-free check before each KVM_RUN.
    running: AtomicBool,
}

impl RunControl {
    pub fn new(vcpus: usize, initial: VcpuState) -> Self {
        Self {
            inner: Mutex::new(Inner {
                want: Want::Pause,
                states: vec![initial; vcpus],
                errors: vec![None; vcpus],
            }),
            changed: Condvar::new(),
            running: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn states(&self) -> Vec<VcpuState> {
        self.lock().states.clone()
    }

    pub fn errors(&self) -> Vec<Option<String>> {
        self.lock().errors.clone()
    }

    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Marks vCPUs that were restored (or booted) as ready to run, and those that had halted
    /// on the source as halted.
    pub fn set_ready(&self, halted: &[bool]) {
        let mut g = self.lock();
        for (i, s) in g.states.iter_mut().enumerate() {
            *s = if halted.get(i).copied().unwrap_or(false) {
                VcpuState::Halted
            } else {
                VcpuState::Paused
            };
        }
        self.changed.notify_all();
    }

    /// Lets every ready vCPU run.
    pub fn resume(&self) {
        let mut g = self.lock();
        if g.want != Want::Exit {
            g.want = Want::Run;
            self.running.store(true, Ordering::Release);
        }
        self.changed.notify_all();
    }

    /// Stops every vCPU and waits until none is in KVM_RUN.
    pub fn pause(&self, threads: &[JoinHandle<()>]) {
        self.stop(Want::Pause, threads);
    }

    /// Stops every vCPU thread for good.
    pub fn exit(&self, threads: &[JoinHandle<()>]) {
        self.stop(Want::Exit, threads);
    }

    fn stop(&self, want: Want, threads: &[JoinHandle<()>]) {
        {
            let mut g = self.lock();
            if g.want != Want::Exit {
                g.want = want;
            }
            self.running.store(false, Ordering::Release);
            self.changed.notify_all();
        }
        let mut g = self.lock();
        while g.states.contains(&VcpuState::Running) {
            for (t, s) in threads.iter().zip(&g.states) {
                if *s == VcpuState::Running {
                    // A kick to a thread that already left KVM_RUN is harmless.
                    let _ = t.kill(kick_signal());
                }
            }
            g = self
                .changed
                .wait_timeout(g, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Parks vCPU `index` until it may run; false when it must exit.
    fn wait_to_run(&self, index: usize) -> bool {
        let mut g = self.lock();
        loop {
            match (g.want, g.states[index]) {
                (Want::Exit, s) => {
                    if s == VcpuState::Running {
                        g.states[index] = VcpuState::Paused;
                        self.changed.notify_all();
                    }
                    return false;
                }
                (Want::Run, VcpuState::Paused | VcpuState::Running) => {
                    g.states[index] = VcpuState::Running;
                    return true;
                }
                (_, VcpuState::Running) => {
                    g.states[index] = VcpuState::Paused;
                    self.changed.notify_all();
                }
                _ => {}
            }
            g = self.changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finished(&self, index: usize, state: VcpuState, error: Option<String>) {
        let mut g = self.lock();
        g.states[index] = state;
        g.errors[index] = error;
        self.changed.notify_all();
    }

    /// Sleeps for `d` or until the vCPUs are told to stop, whichever is first.
    fn sleep(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut g = self.lock();
        while g.want == Want::Run {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Wakes whoever waits in [`RunControl::wait_for_change`].
    pub fn notify(&self) {
        let _g = self.lock();
        self.changed.notify_all();
    }

    /// Waits until something changes or `timeout` passes (the main loop's tick).
    pub fn wait_for_change(&self, timeout: Duration) {
        let g = self.lock();
        let _ = self.changed.wait_timeout(g, timeout);
    }
}

/// One vCPU: its KVM fd (locked by its thread while running) and its index.
pub struct Vcpu {
    pub index: usize,
    pub fd: Mutex<VcpuFd>,
}

impl Vcpu {
    pub fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Stop {
    Pause,
    Halt,
    Fail(String),
}

/// Starts the thread of `vcpu`.
pub fn spawn(
    vcpu: Arc<Vcpu>,
    control: Arc<RunControl>,
    accounting: Arc<Accounting>,
    userfault: Arc<UserfaultTrap>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.index))
        .spawn(move || {
            let run_ptr: *mut kvm_run = vcpu.lock().get_kvm_run();
            KVM_RUN.with(|c| c.set(run_ptr));
            while control.wait_to_run(vcpu.index) {
                let mut fd = vcpu.lock();
                let stop = run(&mut fd, vcpu.index, &control, &accounting, &userfault);
                drop(fd);
                match stop {
                    Stop::Pause => {}
                    Stop::Halt => control.finished(vcpu.index, VcpuState::Halted, None),
                    Stop::Fail(why) => {
                        tracing::error!(vcpu = vcpu.index, "vCPU stopped: {why}");
                        control.finished(vcpu.index, VcpuState::Failed, Some(why));
                    }
                }
            }
            KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        })
}

fn run(
    fd: &mut VcpuFd,
    index: usize,
    control: &RunControl,
    acct: &Accounting,
    userfault: &UserfaultTrap,
) -> Stop {
    loop {
        if !control.is_running() {
            return complete_pending_io(fd);
        }
        match faultline::trap::kvm_userfault::run_vcpu(fd) {
            Ok(VcpuExit::IoOut(port, data)) => {
                let value = le_value(data);
                match port {
                    PORT_HEARTBEAT => acct.heartbeat(index, value),
                    PORT_FAILURE => {
                        tracing::warn!(
                            vcpu = index,
                            page = value,
                            "guest reported a verification failure"
                        );
                        acct.failure(u64::from(value));
                    }
                    PORT_STATUS => acct.status_word(index, value),
                    PORT_SLEEP => {
                        control.sleep(Duration::from_micros(u64::from(value)).min(MAX_SLEEP))
                    }
                    _ => tracing::debug!(vcpu = index, port, value, "write to an unused port"),
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => data.fill(0xFF),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xFF),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::Hlt) => return Stop::Halt,
            Ok(VcpuExit::MemoryFault { flags, gpa, .. })
                if faultline::trap::kvm_userfault::is_userfault_exit(flags) =>
            {
                if let Err(why) = userfault.wait_for(index, gpa, || control.is_running()) {
                    return Stop::Fail(why);
                }
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                return Stop::Fail(format!(
                    "KVM memory fault at {gpa:#x} (+{size:#x}, flags {flags:#x}) that is not a userfault"
                ));
            }
            Ok(VcpuExit::Shutdown) => {
                return Stop::Fail("the guest triple-faulted (KVM_EXIT_SHUTDOWN)".into());
            }
            Ok(VcpuExit::InternalError) => {
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Stop::Fail(format!(
                    "KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR) at rip {rip:#x}"
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Stop::Fail(format!(
                    "VM entry failed on host CPU {cpu}, hardware reason {reason:#x}"
                ));
            }
            Ok(other) => return Stop::Fail(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return Stop::Fail(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// Re-enters KVM_RUN with `immediate_exit` set so KVM completes an in-flight I/O exit.
fn complete_pending_io(fd: &mut VcpuFd) -> Stop {
    fd.set_kvm_immediate_exit(1);
    let result = faultline::trap::kvm_userfault::run_vcpu(fd)
        .map(|_| ())
        .map_err(|e| e.errno());
    fd.set_kvm_immediate_exit(0);
    match result {
        Ok(()) | Err(libc::EINTR) | Err(libc::EAGAIN) => Stop::Pause,
        Err(errno) => Stop::Fail(format!(
            "KVM_RUN to complete pending I/O failed: errno {errno}"
        )),
    }
}

fn le_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}
