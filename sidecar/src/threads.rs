//! The threads of a migration: each runs inside the migration's tracing span (so every log line
//! names the migration and the role), and with the CPU priority its job deserves — threads a
//! vCPU waits on run first, bulk transfers last.
//!
//! A leaf: no migration logic.

use std::thread::{Scope, ScopedJoinHandle};

/// The nice value of bulk threads (pre-copy passes, background push): low enough that the
/// threads serving faults, the vCPUs and the VMM's control threads win a busy core.
const BULK_NICE: i32 = 10;

/// Spawns `f` on a named scoped thread that enters the caller's current span.
pub fn spawn_scoped<'scope, T: Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::io::Result<ScopedJoinHandle<'scope, T>> {
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(name.into())
        .spawn_scoped(scope, move || span.in_scope(f))
}

/// Makes the calling thread (one serving faults) real-time, best effort.
pub fn prioritize_this_thread() {
    if let Err(e) = faultline::sys::sched::realtime_this_thread() {
        tracing::debug!("cannot make the fault thread real-time: {e}");
    }
}

/// Lowers the calling thread's CPU priority for bulk work, so that on a busy host the threads
/// serving faults run first: a vCPU is waiting on those, nobody on the bulk.
pub fn deprioritize_this_thread() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), BULK_NICE) {
        tracing::debug!("cannot lower the bulk thread's priority: {e}");
    }
}
