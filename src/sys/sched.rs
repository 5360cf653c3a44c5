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

/// Puts the calling thread back in the ordinary (`SCHED_OTHER`) class.
pub fn ordinary_this_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `realtime_this_thread`.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Real-time scheduling for the calling thread while the guard lives (best effort): for
/// short windows where every microsecond is a guest's downtime, such as a switch-over.
pub struct RealtimeWindow {
    active: bool,
}

impl RealtimeWindow {
    pub fn enter() -> Self {
        Self {
            active: realtime_this_thread().is_ok(),
        }
    }
}

impl Drop for RealtimeWindow {
    fn drop(&mut self) {
        if self.active {
            let _ = ordinary_this_thread();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_restores_the_ordinary_class() {
        let w = RealtimeWindow::enter();
        drop(w);
        // SAFETY: querying the calling thread's policy has no preconditions.
        let policy = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(policy, libc::SCHED_OTHER);
    }
}
