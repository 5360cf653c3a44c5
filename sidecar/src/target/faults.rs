//! The fault handler: where a vCPU's touch of a missing page becomes a request to the source
//! and, when the page arrives, an installed page and a woken vCPU.
//!
//! It reads fault events — from the userfaultfd, or from the VMM's event connection under KVM
//! Userfault — and fault replies on the urgent channel, until every page is valid. A first
//! fault on a missing page sends a request; a fault on a page being installed waits for that
//! install to wake it; a fault on a page that became valid meanwhile is woken at once.

use faultline::tls::Stream;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faultline::guest_memory::GuestMemory;
use faultline::page_batch::PagesBatch;
use faultline::postcopy::{FaultOutcome, Installer};
use faultline::sync::lock;
use faultline::sys::uffd::Userfaultfd;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::Event as VmmEvent;
use faultline::wire::FaultRequest;
use faultline::wire::frame::{FrameReader, FrameType};
use faultline::wire::messages::MAX_BATCH;
use rustix::event::{PollFd, PollFlags};

use super::Target;
use super::postcopy::Waiting;
use crate::migration::{Link, Stop};

/// How long one wait for fault events or replies lasts before the handler looks whether every
/// page is valid or the session ended.
const POLL_TIMEOUT: Duration = Duration::from_millis(50);
/// A fault unanswered for this long is reported: in the migration's status message and in
/// the `faults_past_deadline` metric.
const FAULT_WAIT_DEADLINE: Duration = Duration::from_secs(10);
/// At the end, replies still in flight are read and dropped for this long...
const DRAIN_WINDOW: Duration = Duration::from_millis(500);
/// ...each read waiting at most this much.
const DRAIN_READ_TIMEOUT: Duration = Duration::from_millis(100);

/// Where fault events come from.
enum Faults<'a> {
    /// The userfaultfd reports host addresses in the VMM.
    Userfaultfd(&'a Userfaultfd, &'a GuestMemory),
    /// The VMM reports one page per event under KVM Userfault (vCPU accesses); KVM's and the
    /// VMM's own accesses, when the VMM traps them, arrive on the host userfaultfd.
    Vmm(
        &'a mut VmmClient,
        Option<(&'a Userfaultfd, &'a GuestMemory)>,
    ),
}

impl Faults<'_> {
    /// The descriptors fault events arrive on (one or two).
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        match self {
            Self::Userfaultfd(uffd, _) => vec![uffd.as_fd()],
            Self::Vmm(client, host) => {
                let mut fds = vec![client.socket()];
                fds.extend(host.map(|(uffd, _)| uffd.as_fd()));
                fds
            }
        }
    }

    /// Appends the pages of the pending fault events on the descriptors marked ready (in the
    /// order of [`Faults::fds`]) to `pages`.
    fn read(&mut self, ready: &[bool], total: u64, pages: &mut Vec<u64>) -> Result<(), Link> {
        let from_uffd = |uffd: &Userfaultfd, mem: &GuestMemory, pages: &mut Vec<u64>| {
            faultline::trap::userfaultfd::read_faults(uffd, mem, pages)
                .map_err(|e| Link::fatal(format!("reading faults: {e}")))
        };
        match self {
            Self::Userfaultfd(uffd, mem) => from_uffd(uffd, mem, pages),
            Self::Vmm(client, host) => {
                if ready.first().copied().unwrap_or(false) {
                    let VmmEvent::Userfault { page, .. } = client.next_event().map_err(|e| {
                        Link::fatal(format!("the VMM's userfault events stopped: {e}"))
                    })?;
                    if page < total {
                        pages.push(page);
                    }
                }
                if let Some((uffd, mem)) = host
                    && ready.get(1).copied().unwrap_or(false)
                {
                    from_uffd(uffd, mem, pages)?;
                }
                Ok(())
            }
        }
    }
}

impl Target<'_> {
    /// Reads fault events and fault replies until every page is valid or `done` is set, then
    /// closes the urgent channel gracefully.
    pub(super) fn handle_faults(
        &self,
        installer: &Installer,
        events: &mut Option<VmmClient>,
        urgent: Stream,
        waiting: &Waiting,
        done: &AtomicBool,
    ) -> Result<(), Link> {
        let mut faults = match (installer.uffd(), events.as_mut()) {
            (Some(uffd), _) => Faults::Userfaultfd(uffd, installer.memory()),
            (None, Some(client)) => Faults::Vmm(
                client,
                installer.host_uffd().map(|u| (u, installer.memory())),
            ),
            (None, None) => return Err(Link::fatal("post-copy without a trap")),
        };
        let mut writer = urgent
            .try_clone()
            .map_err(|e| Link::fatal(format!("clone urgent socket: {e}")))?;
        let mut reader = FrameReader::new(urgent);
        let mut requests = Vec::new();
        let mut faulted = Vec::new();
        let mut stalled = false;
        // After a reconnect: ask again for what vCPUs were already waiting for.
        for chunk in installer.states().waiting_pages().chunks(MAX_BATCH) {
            FaultRequest::write(&mut writer, chunk).map_err(Link::from_wire)?;
        }
        let timeout = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: POLL_TIMEOUT.as_nanos() as i64,
        };
        let no_wait = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        while !installer.states().all_valid() && !done.load(Ordering::Acquire) {
            // Replies TLS has already decrypted do not show on the socket: look, don't wait.
            let buffered = reader.get_ref().buffered();
            let fault_fds = faults.fds();
            let mut fds: Vec<PollFd> = fault_fds
                .iter()
                .map(|fd| PollFd::new(fd, PollFlags::IN))
                .collect();
            fds.push(PollFd::new(reader.get_ref(), PollFlags::IN));
            let wait = if buffered { &no_wait } else { &timeout };
            match rustix::event::poll(&mut fds, Some(wait)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Link::fatal(format!("poll failed: {e}"))),
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            let (fault_ready, urgent_ready) = ready.split_at(fault_fds.len());
            let faulting = fault_ready.iter().any(|&r| r);
            let replied = buffered || urgent_ready.iter().any(|&r| r);
            let fault_ready = fault_ready.to_vec();
            drop(fds);
            drop(fault_fds);
            // One pass over the waiting faults: the oldest wait, and how many passed the deadline.
            let (oldest, late) = lock(waiting).values().map(Instant::elapsed).fold(
                (None, 0usize),
                |(oldest, late): (Option<Duration>, usize), waited| {
                    (
                        oldest.max(Some(waited)),
                        late + usize::from(waited > FAULT_WAIT_DEADLINE),
                    )
                },
            );
            self.sidecar
                .metrics
                .oldest_fault_wait
                .set(oldest.unwrap_or_default().as_secs_f64());
            self.sidecar.metrics.faults_past_deadline.set(late as i64);
            if late > 0 && !stalled {
                let waited = oldest.unwrap_or_default().as_secs();
                tracing::warn!(late, waited, "post-copy faults wait past the deadline");
                self.m.set_message(format!(
                    "post-copy stalled: {late} fault(s) unanswered for over {} s (oldest {waited} s); vCPUs wait on them",
                    FAULT_WAIT_DEADLINE.as_secs()
                ));
            } else if late == 0 && stalled {
                self.m.set_message("post-copy: faults are answered again");
            }
            stalled = late > 0;
            if faulting {
                faulted.clear();
                faults.read(&fault_ready, self.total, &mut faulted)?;
                requests.clear();
                for &page in &faulted {
                    match installer.states().fault(page) {
                        FaultOutcome::Fetch => {
                            lock(waiting).insert(page, Instant::now());
                            requests.push(page);
                        }
                        FaultOutcome::Wake => installer
                            .wake(page)
                            .map_err(|e| Link::fatal(format!("wake: {e}")))?,
                        FaultOutcome::Pending => {}
                    }
                }
                if !requests.is_empty() {
                    let n = requests.len() as u64;
                    self.m.counters.faults.fetch_add(n, Ordering::Relaxed);
                    self.sidecar.metrics.faults.inc_by(n);
                    for chunk in requests.chunks(MAX_BATCH) {
                        FaultRequest::write(&mut writer, chunk).map_err(Link::from_wire)?;
                    }
                }
            }
            if replied {
                let frame = reader.read().map_err(Link::from_wire)?;
                if frame.kind != FrameType::Pages {
                    return Err(Link::fatal(format!(
                        "unexpected {:?} frame on the urgent channel",
                        frame.kind
                    )));
                }
                let batch = PagesBatch::parse(frame.payload, self.total).map_err(Stop::from)?;
                self.install_batch(installer, &batch, frame.wire_len(), waiting)?;
            }
        }
        self.sidecar.metrics.oldest_fault_wait.set(0.0);
        self.sidecar.metrics.faults_past_deadline.set(0);
        // Close gracefully: replies still in flight are read and dropped, so the source sees
        // an orderly end rather than a reset.
        let _ = writer.shutdown_write();
        let _ = reader.get_ref().set_read_timeout(Some(DRAIN_READ_TIMEOUT));
        let until = Instant::now() + DRAIN_WINDOW;
        while Instant::now() < until && reader.read().is_ok() {}
        Ok(())
    }
}
