//! Post-copy on the target: the VM runs here on memory that has not all arrived. Each session
//! runs the fault handler ([`super::faults`]) on the urgent channel and takes in the source's
//! background push on the main channel, until every page is valid. A broken link pauses it —
//! vCPUs that touch missing pages wait, the others run — until the source reconnects; the
//! target then says which pages it still needs and a new session starts.

use faultline::tls::Stream;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faultline::page_batch::PagesBatch;
use faultline::postcopy::{Installed, Installer};
use faultline::sidecar_api::Phase;
use faultline::sync::lock;
use faultline::vmm_protocol::VmmClient;
use faultline::wire::{Channel, Control, Needed};

use super::Target;
use super::arm::ArmedTrap;
use super::conns::Conns;
use crate::migration::{Link, Stop, Transferred};
use crate::threads;
use crate::transport::{Conn, Incoming, Peer, expect, read_incoming};

/// How long the last pages may take to arrive on the urgent channel once the source says it
/// pushed everything.
const LAST_PAGES_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the push receiver looks whether the last pages have been installed.
const SETTLE_POLL: Duration = Duration::from_millis(1);

/// Pages a vCPU waits for, with when the wait was noticed (for fault latency).
pub(super) type Waiting = Mutex<HashMap<u64, Instant>>;

impl Target<'_> {
    /// Post-copy until every page is valid, across as many sessions as broken links require,
    /// starting on `link` or, without one (a sidecar that restarted), by waiting for the
    /// source to reconnect. Returns the main connection of the last session.
    pub(super) fn postcopy(
        &self,
        armed: &mut ArmedTrap,
        link: Option<(Conn, Stream)>,
        conns: &mut Conns,
    ) -> Result<Conn, Stop> {
        let m = self.m;
        let installer = &armed.installer;
        m.set_phase(
            Phase::PostCopy,
            format!(
                "post-copy: {} pages to fetch",
                self.total - installer.states().valid_count()
            ),
        );
        threads::deprioritize_this_thread();
        let waiting: Waiting = Mutex::new(HashMap::new());
        let mut link = link;
        loop {
            let (mut main, urgent) = match link.take() {
                Some(l) => l,
                None => self.await_resume(installer, conns)?,
            };
            match self.postcopy_session(installer, &mut armed.events, &mut main, urgent, &waiting) {
                Ok(()) => return Ok(main),
                Err(Link::Broken(why)) => {
                    tracing::warn!(
                        "post-copy link to the source broke: {why}; waiting for it to reconnect"
                    );
                    m.set_message(format!(
                        "post-copy paused: the link to the source broke ({why}); faulting vCPUs wait while it reconnects"
                    ));
                    main.shutdown();
                }
                Err(Link::Fatal(stop)) => return Err(stop),
            }
        }
    }

    /// Waits for the source to reconnect both channels and tells it what is still missing.
    fn await_resume(
        &self,
        installer: &Installer,
        conns: &mut Conns,
    ) -> Result<(Conn, Stream), Stop> {
        let mut main = Conn::new(conns.retake(Channel::Main, self.m)?)?;
        expect(&mut main.reader, Peer::Source, "resume", |c| {
            matches!(c, Control::Resume).then_some(())
        })?;
        let missing = installer.states().missing();
        Needed::write(&mut main.writer, &missing)?;
        let urgent = conns.retake(Channel::Urgent, self.m)?;
        self.m.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(missing = missing.count(), "post-copy link re-established");
        self.m.set_message(format!(
            "post-copy resumed after the source reconnected: {} pages to fetch",
            missing.count()
        ));
        Ok((main, urgent))
    }

    /// One connection's worth of post-copy: the fault handler on the urgent channel, the
    /// background push on the main channel.
    fn postcopy_session(
        &self,
        installer: &Installer,
        events: &mut Option<VmmClient>,
        main: &mut Conn,
        urgent: Stream,
        waiting: &Waiting,
    ) -> Result<(), Link> {
        let done = AtomicBool::new(false);
        let main_socket = main
            .writer
            .try_clone()
            .map_err(|e| Link::fatal(format!("clone socket: {e}")))?;
        std::thread::scope(|scope| -> Result<(), Link> {
            let handler = threads::spawn_scoped(scope, "fault-handler", || {
                threads::prioritize_this_thread();
                let r = self.handle_faults(installer, events, urgent, waiting, &done);
                if r.is_err() {
                    // Unblock the push receiver: this session is over.
                    done.store(true, Ordering::Release);
                    let _ = main_socket.shutdown();
                }
                r
            })
            .map_err(|e| Link::fatal(format!("cannot start the fault handler: {e}")))?;
            let pushed = self.receive_push(installer, main, waiting, &done);
            done.store(true, Ordering::Release);
            let handled = handler
                .join()
                .map_err(|_| Link::fatal("the fault handler panicked"))?;
            // The handler's error explains a push interrupted on its account.
            handled.and(pushed)
        })
    }

    /// Installs what arrives on the main channel until the source says it has sent all, then
    /// waits for the last urgent installs.
    fn receive_push(
        &self,
        installer: &Installer,
        main: &mut Conn,
        waiting: &Waiting,
        done: &AtomicBool,
    ) -> Result<(), Link> {
        loop {
            match read_incoming(&mut main.reader, self.total).map_err(Link::from_wire)? {
                Incoming::Pages { batch, wire_len } => {
                    self.install_batch(installer, &batch, wire_len, waiting)?;
                }
                Incoming::Control(Control::PushDone { .. }) => break,
                Incoming::Control(other) => {
                    return Err(Link::fatal(format!(
                        "unexpected {other:?} during post-copy"
                    )));
                }
                Incoming::SwitchOver(_) => {
                    return Err(Link::fatal("a second switch-over during post-copy"));
                }
            }
        }
        // The last pages may still be on their way on the urgent channel.
        let deadline = Instant::now() + LAST_PAGES_TIMEOUT;
        while !installer.states().all_valid() {
            if done.load(Ordering::Acquire) {
                return Err(Link::Broken("the fault handler stopped".into()));
            }
            if Instant::now() > deadline {
                return Err(Link::fatal(format!(
                    "{} pages never arrived after the source finished pushing",
                    self.total - installer.states().valid_count()
                )));
            }
            std::thread::sleep(SETTLE_POLL);
        }
        Ok(())
    }

    /// Installs a batch that arrived on either channel after switch-over: each page exactly
    /// once (a page already installed from the other channel is skipped), the vCPUs waiting on
    /// it woken, and the latency of the fault that asked for it recorded.
    pub(super) fn install_batch(
        &self,
        installer: &Installer,
        batch: &PagesBatch<'_>,
        wire_len: u64,
        waiting: &Waiting,
    ) -> Result<(), Stop> {
        for (page, data) in batch.pages() {
            let installed = installer.install(page, data).map_err(|e| {
                Stop::Failed(anyhow::Error::new(e).context(format!("installing page {page}")))
            })?;
            if let Installed::Yes { waited: true } = installed
                && let Some(since) = lock(waiting).remove(&page)
            {
                let latency = since.elapsed();
                self.m.counters.record_fault_latency(latency);
                self.sidecar
                    .metrics
                    .fault_latency
                    .observe(latency.as_secs_f64());
            }
        }
        self.m.account(
            &self.sidecar.metrics,
            Transferred {
                pages: batch.entries.len() as u64,
                zero: batch.zero_pages(),
                bytes: wire_len,
            },
        );
        self.m
            .counters
            .set_remaining(self.total - installer.states().valid_count());
        Ok(())
    }
}
