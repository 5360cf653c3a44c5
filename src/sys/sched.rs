//! Thread scheduling for latency-critical threads.

/// Puts the calling thread in the `SCHED_FIFO` class at the lowest real-time priority, so it
/// runs as soon as it is runnable, ahead of every ordinary thread (vCPUs, bulk transfers). For
/// threads that block almost all the time and must answer quickly when woken, such as those
/// serving page faults a vCPU waits on. Needs CAP_SYS_NICE; without it nothing changes and the
/// error says why.
pub fn realtime_this_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the
    // call, which only reads it.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
