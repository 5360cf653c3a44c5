//! The source side of a migration: pre-copy passes from the VMM's dirty log
//! ([`precopy`]), the two-phase switch-over with the point of no return ([`switchover`]), and
//! in post-copy serving fault requests while pushing the rest ([`postcopy`]).
//!
//! Until the commit point every failure resumes the source VM (if it was paused) and leaves it
//! running with nothing lost. The commit point is `fence`: from then on this VM never runs
//! again, so the engine only moves forward.

mod postcopy;
mod precopy;
mod switchover;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use faultline::bitmap::PageBitmap;
use faultline::guest_memory::GuestMemory;
use faultline::sidecar_api::{Mode, Phase, Policy};
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::CapabilityName;
use faultline::wire::{Channel, Control, LayoutDigest, layout_digest};

use crate::migration::{Migration, Stop, Transferred};
use crate::node::{CLIENT_NAME, Sidecar};
use crate::transport::{Conn, Pacer, PageSender, Peer, expect};

/// Pages sent between checks for cancellation and timeouts (1 MiB: a cancel is noticed within
/// a second even at a 1 MB/s bandwidth limit).
const CHUNK: usize = 256;

/// Runs the source engine of `m` to its end.
pub fn run(sidecar: &Arc<Sidecar>, m: &Arc<Migration>) -> Result<(), Stop> {
    let mut vmm = VmmClient::connect(&sidecar.vmm_socket).context("cannot reach the VMM")?;
    let (hello, fds) = vmm.hello(CLIENT_NAME).context("VMM hello failed")?;
    let mem = Arc::new(GuestMemory::open(&hello.layout, fds).context("cannot open guest memory")?);
    let total = mem.total_pages();
    m.counters.set_total(total);

    let peer = m
        .peer
        .clone()
        .ok_or_else(|| Stop::failed("no peer address"))?;
    let digest = layout_digest(&hello.layout);
    let mut main = Conn::connect(
        &m.protection,
        &peer,
        Channel::Main,
        &m.id,
        &m.secret,
        &digest,
    )?;
    let urgent = Conn::connect(
        &m.protection,
        &peer,
        Channel::Urgent,
        &m.id,
        &m.secret,
        &digest,
    )?;

    let mut src = Source {
        sidecar,
        m,
        vmm,
        mem,
        total,
        deadline: m.deadline(),
        peer,
        digest,
    };
    let result = src.migrate(
        &mut main,
        urgent,
        hello.vcpus,
        hello.has(CapabilityName::DirtyLog),
    );
    if result.is_err() && !m.committed() {
        src.recover();
        let reason = match &result {
            Err(Stop::Cancelled(why)) => why.clone(),
            Err(Stop::Failed(e)) => format!("{e:#}"),
            Ok(()) => String::new(),
        };
        let _ = Control::Cancel { reason }.write(&mut main.writer);
    }
    result
}

struct Source<'a> {
    sidecar: &'a Sidecar,
    m: &'a Migration,
    vmm: VmmClient,
    mem: Arc<GuestMemory>,
    total: u64,
    deadline: Instant,
    /// The target sidecar's migration address.
    peer: String,
    digest: LayoutDigest,
}

/// How the pre-copy phase ended.
enum Switch {
    StopAndCopy,
    PostCopy,
}

impl Source<'_> {
    /// Stops the engine if it was cancelled or its completion timeout expired.
    fn check(&self) -> Result<(), Stop> {
        if self.m.cancelled() {
            return Err(Stop::Cancelled("cancelled by request".into()));
        }
        if Instant::now() > self.deadline {
            return Err(Stop::failed(format!(
                "the completion timeout of {} s expired",
                self.m.policy.completion_timeout_s
            )));
        }
        Ok(())
    }

    /// Back to where we started: dirty logging off, VM running.
    fn recover(&mut self) {
        let _ = self.vmm.dirty_log_stop();
        match self.vmm.resume() {
            Ok(state) => tracing::info!(?state, "source VM resumed after an aborted migration"),
            Err(e) => tracing::error!("could not resume the source VM: {e}"),
        }
    }

    /// Sends `pages` in chunks, checking for cancellation between chunks when `check`.
    fn send(
        &self,
        w: &mut faultline::tls::Stream,
        pages: &[u64],
        known_zero: Option<&PageBitmap>,
        pacer: &mut Pacer,
        check: bool,
    ) -> Result<Transferred, Stop> {
        let mut sender = PageSender::new(&self.mem);
        let mut total = Transferred::default();
        for chunk in pages.chunks(CHUNK) {
            if check {
                self.check()?;
            }
            let sent = sender
                .send(w, chunk.iter().copied(), known_zero, pacer)
                .context("sending pages failed")?;
            self.m.account(&self.sidecar.metrics, sent);
            total += sent;
        }
        Ok(total)
    }

    /// Start → ready → pre-copy (if any) → switch-over → post-copy (if pages are left).
    fn migrate(
        &mut self,
        main: &mut Conn,
        urgent: Conn,
        vcpus: u32,
        dirty_log: bool,
    ) -> Result<(), Stop> {
        let m = self.m;
        let policy = &m.policy;
        // Without a dirty log (KVM refuses it on guest_memfd memslots) there is nothing to
        // iterate on: pre-copy becomes one stop-and-copy, hybrid and post-copy go straight to
        // post-copy.
        let precopy = dirty_log && policy.precopy_passes > 0;
        Control::Start {
            mode: policy.mode,
            total_pages: self.total,
            vcpus,
            precopy: precopy || policy.mode == Mode::PreCopy,
            postcopy: policy.mode != Mode::PreCopy,
        }
        .write(&mut main.writer)?;
        m.set_phase(Phase::Connecting, "waiting for the target to arm its trap");
        let trap = expect(&mut main.reader, Peer::Target, "ready", |c| match c {
            Control::Ready { trap } => Some(*trap),
            _ => None,
        })?;
        m.set_trap(trap);
        // The target chose by `faultline::trap::choose` (it has the offers): a trap means the
        // mode stands; none means pre-copy only (a hybrid migration that fell back). A
        // post-copy migration without a trap would have been refused there.
        let effective = match (policy.mode, trap) {
            (_, Some(_)) => policy.clone(),
            (Mode::PostCopy, None) => {
                return Err(Stop::failed(
                    "the target armed no trap for this VM's memory, so post-copy is impossible",
                ));
            }
            (_, None) => Policy {
                mode: Mode::PreCopy,
                ..policy.clone()
            },
        };

        let mut pacer = Pacer::new(policy.bandwidth_limit);
        let (switch, pending) = if precopy {
            self.precopy(main, &effective, &mut pacer)?
        } else if effective.mode == Mode::PreCopy {
            (Switch::StopAndCopy, PageBitmap::full(self.total))
        } else {
            (Switch::PostCopy, PageBitmap::full(self.total))
        };
        self.check()?;
        self.switch_over(main, urgent, switch, pending, precopy)
    }
}
