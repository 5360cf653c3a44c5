//! The target side of a migration, in the order it happens: accept the source
//! ([`listener`], [`conns`]), check its plan and arm the trap ([`arm`]), install pre-copied
//! pages ([`receive`]), restore the state and resume only after the source committed
//! ([`switchover`]), then resolve faults ([`faults`]) and take in the background push
//! ([`postcopy`]) until every page is valid, and disarm.
//!
//! Before the source commits, the target VM must not run: any failure here leaves it never
//! resumed (the operator discards the pod) and the source keeps the VM.

mod arm;
mod conns;
mod faults;
pub mod listener;
mod postcopy;
mod receive;
mod switchover;

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use anyhow::Context;
use faultline::guest_memory::GuestMemory;
use faultline::sidecar_api::Phase;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::HelloReply;
use faultline::wire::{Channel, Control, layout_digest};

use crate::migration::{Accepted, Migration, Stop};
use crate::node::{CLIENT_NAME, Sidecar};
use crate::transport::{Conn, Peer, expect};

use self::arm::ArmedTrap;
use self::conns::Conns;

/// Past the commit point the VM lives only here and giving up would lose it, so the target
/// waits this much longer than the completion timeout for the urgent channel (which the source
/// opened at the start and normally is already here).
const POST_COMMIT_PATIENCE: Duration = Duration::from_secs(3600);

/// Runs the target engine of `m` to its end; `inbox` delivers the source's connections.
pub fn run(
    sidecar: &Arc<Sidecar>,
    m: &Arc<Migration>,
    inbox: Receiver<Accepted>,
) -> Result<(), Stop> {
    let (mut t, mem) = Target::join(sidecar, m)?;
    m.set_phase(Phase::Waiting, "waiting for the source to connect");

    let mut conns = Conns::new(inbox, m.deadline());
    let main = Conn::new(conns.take(Channel::Main, m)?)?;
    m.set_phase(Phase::Connecting, "source connected and authenticated");
    let result = t.migrate(main, &mut conns, mem);
    if let Err(e) = &result
        && !m.committed()
    {
        tracing::warn!("target aborted before the commit point; the VM stays on the source: {e}");
    }
    result
}

/// Takes over migration `m` after this sidecar restarted past the commit point: the VM runs
/// here on memory that has not all arrived, and the trap an earlier run of this sidecar armed
/// still holds its faulting vCPUs. Gets the trap's handles and the pages still invalid from the
/// VMM, waits for the source to reconnect (it keeps trying while the link is down), tells it
/// what is missing, and finishes post-copy.
pub fn rejoin(
    sidecar: &Arc<Sidecar>,
    m: &Arc<Migration>,
    inbox: Receiver<Accepted>,
) -> Result<(), Stop> {
    // `crate::lifecycle` asked the VMM whether the VM ran here before it started this.
    let (mut t, mem) = Target::join(sidecar, m)?;
    let mut armed = t.rejoin_trap(mem)?;
    let invalid = t.total - armed.installer.states().valid_count();
    m.counters.set_remaining(invalid);
    m.set_phase(
        Phase::PostCopy,
        format!("rejoined after a restart: {invalid} pages to fetch; waiting for the source to reconnect"),
    );
    let mut conns = Conns::new(inbox, m.deadline());
    let main = t.postcopy(&mut armed, None, &mut conns)?;
    t.complete(&armed, main)
}

struct Target<'a> {
    sidecar: &'a Sidecar,
    m: &'a Migration,
    vmm: VmmClient,
    hello: HelloReply,
    total: u64,
}

impl<'a> Target<'a> {
    /// Joins the VMM in incoming mode for migration `m`: its memory, and the size and layout
    /// digest the source must match.
    fn join(sidecar: &'a Sidecar, m: &'a Migration) -> Result<(Self, GuestMemory), Stop> {
        let mut vmm = VmmClient::connect(&sidecar.vmm_socket).context("cannot reach the VMM")?;
        let (hello, fds) = vmm.hello(CLIENT_NAME).context("VMM hello failed")?;
        if !hello.incoming {
            return Err(Stop::failed("the VMM is not in incoming mode"));
        }
        let mem = GuestMemory::open(&hello.layout, fds).context("cannot open guest memory")?;
        let total = mem.total_pages();
        m.counters.set_total(total);
        let _ = m.digest.set(layout_digest(&hello.layout));
        let t = Target {
            sidecar,
            m,
            vmm,
            hello,
            total,
        };
        Ok((t, mem))
    }
}

impl Target<'_> {
    /// start → ready → pre-copy → switch-over → post-copy (if pages are missing) → complete.
    fn migrate(&mut self, mut main: Conn, conns: &mut Conns, mem: GuestMemory) -> Result<(), Stop> {
        let m = self.m;
        let (mode, total_pages, precopy, postcopy) =
            expect(&mut main.reader, Peer::Source, "start", |c| match *c {
                Control::Start {
                    mode,
                    total_pages,
                    precopy,
                    postcopy,
                    ..
                } => Some((mode, total_pages, precopy, postcopy)),
                _ => None,
            })?;
        if total_pages != self.total {
            return Err(Stop::failed(format!(
                "the source has {total_pages} pages, this VM {}",
                self.total
            )));
        }
        let mut armed = match self.arm(mode, postcopy, mem, precopy) {
            Ok(armed) => armed,
            Err(why) => {
                let _ = Control::Cancel {
                    reason: why.to_string(),
                }
                .write(&mut main.writer);
                return Err(why);
            }
        };
        Control::Ready {
            trap: armed.installer.trap(),
        }
        .write(&mut main.writer)?;

        if precopy {
            m.set_phase(Phase::PreCopy, "receiving pre-copy passes");
        }
        let switch = receive::precopy(
            m,
            &self.sidecar.metrics,
            &armed.installer,
            self.total,
            &mut main,
        )?;
        self.switch_over(&armed.installer, &switch, &mut main)?;

        if !armed.installer.states().all_valid() {
            let urgent = conns.take_after_commit(Channel::Urgent, m, POST_COMMIT_PATIENCE)?;
            main = self.postcopy(&mut armed, Some((main, urgent)), conns)?;
        }
        self.complete(&armed, main)
    }

    /// Every page is valid: disarm, tell the source, and record the end.
    fn complete(&mut self, armed: &ArmedTrap, mut main: Conn) -> Result<(), Stop> {
        let m = self.m;
        self.disarm(&armed.installer)?;
        let faults = m.counters.faults.load(std::sync::atomic::Ordering::Relaxed);
        Control::Complete { faults }.write(&mut main.writer)?;
        m.counters.set_remaining(0);
        m.set_phase(
            Phase::Completed,
            "completed: every page is here and the trap is disarmed",
        );
        Ok(())
    }
}
