//! The threads of a migration: each runs inside the migration's tracing span (so every log line
//! names the migration and the role), and with the CPU priority its job deserves — threads a
//! vCPU waits on run first, bulk transfers last.
//!
//! A leaf: no migration logic.

use std::thread::{Scope, ScopedJoinHandle};

/// The nice value of bulk threads (the post-copy push and its receiver): below the vCPUs and
/// the VMM's control threads on a busy core, but not so far below that the push starves, for
/// the guest waits on it too. Measured with a 1 GiB guest rewriting 4,000 pages/s on two
/// cores (five runs each): nice 10 took 4.0 s and cost the guest 150 ms; nice 0 took 3.0 s
/// and cost it 340–440 ms; nice 5 took 3.1 s and cost it 150 ms.
const BULK_NICE: i32 = 5;

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
