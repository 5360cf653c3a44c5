//! The target side of a migration: accept the source, arm the trap, install pre-copied pages,
//! restore the state, resume only after the source committed, then resolve faults and take in
//! the background push until every page is valid.
//!
//! Before the source commits, the target VM must not run: any failure here leaves it never
//! resumed (the operator discards the pod) and the source keeps the VM.

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use faultline::guest_memory::GuestMemory;
use faultline::layout::BackingKind;
use faultline::page_batch::PagesBatch;
use faultline::postcopy::{FaultOutcome, Installed, Installer};
use faultline::sidecar_api::{Mode, Phase};
use faultline::sys::uffd::{Event, Userfaultfd};
use faultline::trap::{Armed, Backend};
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::{Event as VmmEvent, HelloReply, UffdMode};
use faultline::wire::frame::{FrameReader, FrameType};
use faultline::wire::handshake::Channel;
use faultline::wire::{Control, FaultRequest, Needed, SwitchOver, WireError, layout_digest};
use rustix::event::{PollFd, PollFlags};

use crate::engine::{Link, Stop};
use crate::metrics::RoleLabel;
use crate::state::{Accepted, Migration, Sidecar};

pub fn run(
    sidecar: &Arc<Sidecar>,
    m: &Arc<Migration>,
    inbox: Receiver<Accepted>,
) -> Result<(), Stop> {
    let mut vmm = VmmClient::connect(&sidecar.vmm_socket).context("cannot reach the VMM")?;
    let (hello, fds) = vmm.hello("faultline-sidecar").context("VMM hello failed")?;
    if !hello.incoming {
        return Err(Stop::failed("the VMM is not in incoming mode"));
    }
    let mem = GuestMemory::open(&hello.layout, fds).context("cannot open guest memory")?;
    let total = mem.total_pages();
    m.counters.total_pages.store(total, Ordering::Relaxed);
    m.counters.remaining_pages.store(total, Ordering::Relaxed);
    let _ = m.digest.set(layout_digest(&hello.layout));
    m.set_phase(Phase::Waiting, "waiting for the source to connect");

    let deadline = m.started + Duration::from_secs(m.policy.completion_timeout_s);
    let mut conns = Conns {
        inbox,
        main: None,
        urgent: None,
    };
    let main = conns.take(Channel::Main, m, deadline)?;
    m.set_phase(Phase::Connecting, "source connected and authenticated");
    let mut t = Target {
        sidecar,
        m,
        vmm,
        hello,
        total,
        role: RoleLabel {
            role: "target".into(),
        },
    };
    let result = t.migrate(main, &mut conns, mem, deadline);
    if let Err(e) = &result
        && !m.committed()
    {
        tracing::warn!("target aborted before the commit point; the VM stays on the source: {e}");
    }
    result
}

/// Connections the listener hands over, in whatever order they arrive.
struct Conns {
    inbox: Receiver<Accepted>,
    main: Option<TcpStream>,
    urgent: Option<TcpStream>,
}

impl Conns {
    fn take(
        &mut self,
        channel: Channel,
        m: &Migration,
        deadline: Instant,
    ) -> Result<TcpStream, Stop> {
        loop {
            let slot = match channel {
                Channel::Main => &mut self.main,
                Channel::Urgent => &mut self.urgent,
            };
            if let Some(s) = slot.take() {
                return Ok(s);
            }
            if m.cancelled() {
                return Err(Stop::Cancelled(
                    "cancelled while waiting for the source".into(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::failed(
                    "the source never connected before the completion timeout",
                ));
            }
            match self
                .inbox
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(a) => match a.channel {
                    Channel::Main => self.main = Some(a.stream),
                    Channel::Urgent => self.urgent = Some(a.stream),
                },
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Stop::failed("the migration listener stopped"));
                }
            }
        }
    }
}

struct Target<'a> {
    sidecar: &'a Sidecar,
    m: &'a Migration,
    vmm: VmmClient,
    hello: HelloReply,
    total: u64,
    role: RoleLabel,
}

/// Pages a vCPU waits for, with when the wait was noticed (for fault latency).
type Waiting = Mutex<HashMap<u64, Instant>>;

fn read_control(r: &mut FrameReader<TcpStream>, what: &str) -> Result<Control, Stop> {
    let frame = r
        .read()
        .with_context(|| format!("the source went away (waiting for {what})"))?;
    if frame.kind != FrameType::Control {
        return Err(Stop::failed(format!(
            "expected {what}, got a {:?} frame",
            frame.kind
        )));
    }
    match Control::parse(frame.payload)? {
        Control::Cancel { reason } => {
            Err(Stop::Cancelled(format!("the source cancelled: {reason}")))
        }
        c => Ok(c),
    }
}

impl Target<'_> {
    fn account(&self, pages: u64, zero: u64, bytes: u64) {
        let c = &self.m.counters;
        c.transferred_pages.fetch_add(pages, Ordering::Relaxed);
        c.transferred_bytes.fetch_add(bytes, Ordering::Relaxed);
        c.zero_pages.fetch_add(zero, Ordering::Relaxed);
        let mt = &self.sidecar.metrics;
        mt.pages.get_or_create(&self.role).inc_by(pages);
        mt.bytes.get_or_create(&self.role).inc_by(bytes);
        mt.zero_pages.get_or_create(&self.role).inc_by(zero);
    }

    /// Picks (by the core's one rule, on what this VMM offers) and arms the trap the source's
    /// plan needs. `Ok(None)` when none is needed or a hybrid migration falls back to pre-copy.
    /// For KVM Userfault, also returns the connection the VMM reports faults on.
    fn arm_trap(
        &mut self,
        mode: Mode,
        postcopy: bool,
    ) -> Result<(Option<Armed>, Option<VmmClient>), String> {
        if !postcopy {
            return Ok((None, None));
        }
        let backing = self.hello.layout.regions[0].backing;
        let choice =
            faultline::trap::choose(self.m.policy.trap, mode, backing, &self.hello.trap_offers())
                .map_err(|e| e.to_string())?;
        match choice.backend {
            None => {
                tracing::warn!(
                    "post-copy unavailable, offering pre-copy only: {}",
                    choice.reason
                );
                self.m
                    .set_message(format!("post-copy unavailable: {}", choice.reason));
                Ok((None, None))
            }
            Some(Backend::KvmUserfault) => {
                let mut events = VmmClient::connect(&self.sidecar.vmm_socket)
                    .map_err(|e| format!("cannot open the VMM's event connection: {e}"))?;
                let (reply, fd) = events
                    .kvm_userfault_arm()
                    .map_err(|e| format!("the VMM could not arm KVM Userfault: {e}"))?;
                let bitmap =
                    faultline::trap::kvm_userfault::UserfaultBitmap::open_shared(fd, reply.pages)
                        .map_err(|e| format!("cannot map the VMM's userfault bitmap: {e}"))?;
                Ok((Some(Armed::KvmUserfault(bitmap)), Some(events)))
            }
            Some(Backend::Userfaultfd) => {
                let (_, fd) = self
                    .vmm
                    .userfaultfd_register(UffdMode::Missing)
                    .map_err(|e| format!("the VMM could not register RAM with userfaultfd: {e}"))?;
                Ok((Some(Armed::Userfaultfd(Userfaultfd::from(fd))), None))
            }
        }
    }

    fn migrate(
        &mut self,
        main: TcpStream,
        conns: &mut Conns,
        mem: GuestMemory,
        deadline: Instant,
    ) -> Result<(), Stop> {
        let m = self.m;
        let mut writer = main.try_clone().context("clone socket")?;
        let mut reader = FrameReader::new(main);
        let Control::Start {
            mode,
            total_pages,
            precopy,
            postcopy,
            ..
        } = read_control(&mut reader, "start")?
        else {
            return Err(Stop::failed("the source did not begin with start"));
        };
        if total_pages != self.total {
            return Err(Stop::failed(format!(
                "the source has {total_pages} pages, this VM {}",
                self.total
            )));
        }
        let (trap, events) = match self.arm_trap(mode, postcopy) {
            Ok(t) => t,
            Err(why) => {
                let _ = Control::Cancel {
                    reason: why.clone(),
                }
                .write(&mut writer);
                return Err(Stop::failed(why));
            }
        };
        let installer = Arc::new(Installer::new(mem, trap));
        let trap = installer.trap();
        m.set_trap(trap);
        if precopy
            && !self
                .hello
                .layout
                .regions
                .iter()
                .all(|r| r.backing == BackingKind::Anon)
        {
            installer
                .start_preallocation()
                .context("cannot start preallocating memory")?;
        }
        Control::Ready { trap }.write(&mut writer)?;

        // Pre-copy: pages until the switch-over message.
        if precopy {
            m.set_phase(Phase::PreCopy, "receiving pre-copy passes");
        }
        let switch = loop {
            if m.cancelled() {
                let _ = Control::Cancel {
                    reason: "cancelled on the target".into(),
                }
                .write(&mut writer);
                return Err(Stop::Cancelled("cancelled by request".into()));
            }
            let frame = reader
                .read()
                .context("the source went away during pre-copy")?;
            match frame.kind {
                FrameType::Pages => {
                    let batch = PagesBatch::parse(frame.payload, self.total)?;
                    installer
                        .precopy_batch(&batch)
                        .context("installing pre-copied pages")?;
                    let zero = batch.entries.iter().filter(|e| e.zero).count() as u64;
                    let n = batch.entries.len() as u64;
                    self.account(n, zero, frame.payload.len() as u64);
                }
                FrameType::SwitchOver => break SwitchOver::parse(frame.payload, self.total)?,
                FrameType::Control => match Control::parse(frame.payload)? {
                    Control::RoundEnd { round, sent } => {
                        m.counters.precopy_rounds.store(round, Ordering::Relaxed);
                        m.set_message(format!(
                            "pre-copy pass {round} received and installed ({sent} pages)"
                        ));
                        Control::RoundDone { round }.write(&mut writer)?;
                    }
                    Control::Cancel { reason } => {
                        return Err(Stop::Cancelled(format!("the source cancelled: {reason}")));
                    }
                    other => {
                        return Err(Stop::failed(format!(
                            "unexpected {other:?} during pre-copy"
                        )));
                    }
                },
                other => {
                    return Err(Stop::failed(format!(
                        "unexpected {other:?} frame during pre-copy"
                    )));
                }
            }
        };

        m.set_phase(Phase::SwitchOver, "restoring the VM state");
        // The source is paused from here until we say `resumed`.
        let realtime = faultline::sys::sched::RealtimeWindow::enter();
        let t0 = Instant::now();
        let discard = installer
            .switch_over(&switch.invalid)
            .context("switch-over")?;
        let t1 = Instant::now();
        if !discard.is_empty() {
            self.vmm
                .discard(&discard)
                .context("the VMM could not drop stale pages")?;
        }
        let t2 = Instant::now();
        self.vmm
            .restore_state(&switch.state)
            .context("the VMM refused the source's state")?;
        let t3 = Instant::now();
        let valid = installer.states().valid_count();
        m.counters
            .remaining_pages
            .store(self.total - valid, Ordering::Relaxed);
        m.set_prepared();
        Control::Prepared.write(&mut writer)?;
        tracing::info!(
            invalid = switch.invalid.count(),
            pages_us = (t1 - t0).as_micros() as u64,
            discard_us = (t2 - t1).as_micros() as u64,
            restore_us = (t3 - t2).as_micros() as u64,
            "target prepared"
        );
        match read_control(&mut reader, "commit")? {
            Control::Commit => {}
            other => return Err(Stop::failed(format!("expected commit, got {other:?}"))),
        }
        // The source is fenced: from here the VM exists only here.
        m.commit();
        let t = Instant::now();
        self.vmm.resume().context("cannot resume the target VM")?;
        Control::Resumed.write(&mut writer)?;
        drop(realtime);
        tracing::info!(resume_us = t.elapsed().as_micros() as u64, "target resumed");
        m.set_message("running on the target");

        if !installer.states().all_valid() {
            let urgent = conns.take(Channel::Urgent, m, deadline + Duration::from_secs(3600))?;
            writer = self.postcopy(&installer, events, (reader, writer), urgent, conns)?;
        }
        match installer.trap() {
            Some(Backend::Userfaultfd) => {
                self.vmm
                    .userfaultfd_disarm()
                    .context("cannot disarm the userfaultfd")?;
            }
            Some(Backend::KvmUserfault) => {
                self.vmm
                    .kvm_userfault_disarm()
                    .context("cannot disarm KVM Userfault")?;
            }
            None => {}
        }
        let faults = m.counters.faults.load(Ordering::Relaxed);
        Control::Complete { faults }.write(&mut writer)?;
        m.counters.remaining_pages.store(0, Ordering::Relaxed);
        m.set_phase(
            Phase::Completed,
            "completed: every page is here and the trap is disarmed",
        );
        Ok(())
    }

    /// Post-copy until every page is valid. A broken link pauses it — faulting vCPUs wait —
    /// until the source reconnects; the target then says which pages it still needs and the
    /// session starts again. Returns the main connection's writer of the last session.
    fn postcopy(
        &self,
        installer: &Arc<Installer>,
        mut events: Option<VmmClient>,
        main: (FrameReader<TcpStream>, TcpStream),
        urgent: TcpStream,
        conns: &mut Conns,
    ) -> Result<TcpStream, Stop> {
        let m = self.m;
        m.set_phase(
            Phase::PostCopy,
            format!(
                "post-copy: {} pages to fetch",
                self.total - installer.states().valid_count()
            ),
        );
        crate::pages::deprioritize_this_thread();
        let waiting: Waiting = Mutex::new(HashMap::new());
        let mut link = Some((main, urgent));
        loop {
            let ((mut reader, writer), urgent) = match link.take() {
                Some(l) => l,
                None => self.await_resume(installer, conns)?,
            };
            match self.postcopy_session(installer, &mut events, &mut reader, urgent, &waiting) {
                Ok(()) => return Ok(writer),
                Err(Link::Broken(why)) => {
                    tracing::warn!(
                        "post-copy link to the source broke: {why}; waiting for it to reconnect"
                    );
                    m.set_message(format!(
                        "post-copy paused: the link to the source broke ({why}); faulting vCPUs wait while it reconnects"
                    ));
                    let _ = writer.shutdown(std::net::Shutdown::Both);
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
    ) -> Result<((FrameReader<TcpStream>, TcpStream), TcpStream), Stop> {
        let deadline = Instant::now() + Duration::from_secs(self.m.policy.completion_timeout_s);
        let main = conns.take(Channel::Main, self.m, deadline)?;
        let mut reader = FrameReader::new(main.try_clone().context("clone socket")?);
        let mut writer = main;
        match read_control(&mut reader, "resume")? {
            Control::Resume => {}
            other => return Err(Stop::failed(format!("expected resume, got {other:?}"))),
        }
        let missing = installer.states().missing();
        Needed::write(&mut writer, &missing)?;
        let urgent = conns.take(Channel::Urgent, self.m, deadline)?;
        self.m.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(missing = missing.count(), "post-copy link re-established");
        self.m.set_message(format!(
            "post-copy resumed after the source reconnected: {} pages to fetch",
            missing.count()
        ));
        Ok(((reader, writer), urgent))
    }

    /// One connection's worth of post-copy: the fault handler on the urgent channel, the
    /// background push on the main channel.
    fn postcopy_session(
        &self,
        installer: &Installer,
        events: &mut Option<VmmClient>,
        reader: &mut FrameReader<TcpStream>,
        urgent: TcpStream,
        waiting: &Waiting,
    ) -> Result<(), Link> {
        let done = AtomicBool::new(false);
        let main = reader
            .get_ref()
            .try_clone()
            .map_err(|e| Link::Fatal(Stop::failed(e)))?;
        std::thread::scope(|scope| -> Result<(), Link> {
            let handler = std::thread::Builder::new()
                .name("fault-handler".into())
                .spawn_scoped(scope, || {
                    crate::pages::prioritize_this_thread();
                    let r = self.handle_faults(installer, events, urgent, waiting, &done);
                    if r.is_err() {
                        // Unblock the push receiver: this session is over.
                        done.store(true, Ordering::Release);
                        let _ = main.shutdown(std::net::Shutdown::Both);
                    }
                    r
                })
                .map_err(|e| {
                    Link::Fatal(Stop::failed(format!("cannot start the fault handler: {e}")))
                })?;
            let pushed = self.receive_push(installer, reader, waiting, &done);
            done.store(true, Ordering::Release);
            let handled = handler
                .join()
                .map_err(|_| Link::Fatal(Stop::failed("the fault handler panicked")))?;
            // The handler's error explains a push interrupted on its account.
            handled.and(pushed)
        })
    }

    /// Installs what arrives on the main channel until the source says it has sent all, then
    /// waits for the last urgent installs.
    fn receive_push(
        &self,
        installer: &Installer,
        reader: &mut FrameReader<TcpStream>,
        waiting: &Waiting,
        done: &AtomicBool,
    ) -> Result<(), Link> {
        let fatal = |e: anyhow::Error| Link::Fatal(Stop::Failed(e));
        loop {
            let frame = reader.read().map_err(Link::from_wire)?;
            match frame.kind {
                FrameType::Pages => {
                    let batch = PagesBatch::parse(frame.payload, self.total)
                        .map_err(|e| Link::Fatal(e.into()))?;
                    let mut zero = 0;
                    for (page, data) in batch.pages() {
                        zero += u64::from(data.is_none());
                        self.install(installer, page, data, waiting)
                            .map_err(|e| fatal(anyhow!("{e}")))?;
                    }
                    self.account(batch.entries.len() as u64, zero, frame.payload.len() as u64);
                    self.m.counters.remaining_pages.store(
                        self.total - installer.states().valid_count(),
                        Ordering::Relaxed,
                    );
                }
                FrameType::Control => {
                    match Control::parse(frame.payload).map_err(|e| Link::Fatal(e.into()))? {
                        Control::PushDone { .. } => break,
                        other => {
                            return Err(fatal(anyhow!("unexpected {other:?} during post-copy")));
                        }
                    }
                }
                other => {
                    return Err(fatal(anyhow!(
                        "unexpected {other:?} frame during post-copy"
                    )));
                }
            }
        }
        // The last pages may still be on their way on the urgent channel.
        let deadline = Instant::now() + Duration::from_secs(60);
        while !installer.states().all_valid() {
            if done.load(Ordering::Acquire) {
                return Err(Link::Broken("the fault handler stopped".into()));
            }
            if Instant::now() > deadline {
                return Err(fatal(anyhow!(
                    "{} pages never arrived after the source finished pushing",
                    self.total - installer.states().valid_count()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn install(
        &self,
        installer: &Installer,
        page: u64,
        data: Option<&[u8]>,
        waiting: &Waiting,
    ) -> Result<(), Stop> {
        if let Installed::Yes { waited: true } = installer
            .install(page, data)
            .with_context(|| format!("installing page {page}"))?
        {
            let since = waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&page);
            if let Some(t) = since {
                let latency = t.elapsed();
                self.m.counters.record_fault_latency(latency);
                self.sidecar
                    .metrics
                    .fault_latency
                    .observe(latency.as_secs_f64());
            }
        }
        Ok(())
    }

    /// Reads fault events (from the userfaultfd, or from the VMM under KVM Userfault) and
    /// fault replies until every page is valid: a first fault on a missing page sends a
    /// request on the urgent channel; a fault on a page that became valid meanwhile is woken
    /// at once.
    fn handle_faults(
        &self,
        installer: &Installer,
        events: &mut Option<VmmClient>,
        urgent: TcpStream,
        waiting: &Waiting,
        done: &AtomicBool,
    ) -> Result<(), Link> {
        self.handle_faults_inner(installer, events, urgent, waiting, done)
            .map_err(|e| match e.downcast::<WireError>() {
                Ok(wire) => Link::from_wire(wire),
                Err(other) => Link::Fatal(Stop::Failed(other)),
            })
    }

    fn handle_faults_inner(
        &self,
        installer: &Installer,
        events: &mut Option<VmmClient>,
        urgent: TcpStream,
        waiting: &Waiting,
        done: &AtomicBool,
    ) -> anyhow::Result<()> {
        let mem = installer.memory();
        let mut writer = urgent.try_clone().context("clone urgent socket")?;
        let mut reader = FrameReader::new(urgent);
        let mut requests = Vec::new();
        let mut faulted_pages = Vec::new();
        // After a reconnect: ask again for what vCPUs were already waiting for.
        let again = installer.states().waiting_pages();
        for chunk in again.chunks(faultline::wire::messages::MAX_BATCH) {
            FaultRequest::write(&mut writer, chunk)?;
        }
        while !installer.states().all_valid() && !done.load(Ordering::Acquire) {
            let source_fd = match (installer.uffd(), &events) {
                (Some(uffd), _) => uffd.as_fd(),
                (None, Some(client)) => client.socket(),
                (None, None) => bail!("post-copy without a trap"),
            };
            let mut fds = [
                PollFd::new(&source_fd, PollFlags::IN),
                PollFd::new(reader.get_ref(), PollFlags::IN),
            ];
            let timeout = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => bail!("poll failed: {e}"),
            }
            let (faulted, replied) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
            if faulted {
                faulted_pages.clear();
                if let Some(uffd) = installer.uffd() {
                    for event in uffd.read_events(64).context("reading faults")? {
                        let Event::PageFault { address, .. } = event else {
                            continue;
                        };
                        match mem.page_of_host_addr(address) {
                            Some(page) => faulted_pages.push(page),
                            None => tracing::warn!(
                                address = format_args!("{address:#x}"),
                                "fault outside guest RAM"
                            ),
                        }
                    }
                } else if let Some(client) = events.as_mut() {
                    let VmmEvent::Userfault { page, .. } = client
                        .next_event()
                        .context("the VMM's userfault events stopped")?;
                    if page < self.total {
                        faulted_pages.push(page);
                    }
                }
                requests.clear();
                for &page in &faulted_pages {
                    match installer.states().fault(page) {
                        FaultOutcome::Fetch => {
                            waiting
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(page, Instant::now());
                            requests.push(page);
                        }
                        FaultOutcome::Wake => installer.wake(page).context("wake")?,
                        FaultOutcome::Pending => {}
                    }
                }
                if !requests.is_empty() {
                    self.m
                        .counters
                        .faults
                        .fetch_add(requests.len() as u64, Ordering::Relaxed);
                    self.sidecar.metrics.faults.inc_by(requests.len() as u64);
                    for chunk in requests.chunks(faultline::wire::messages::MAX_BATCH) {
                        FaultRequest::write(&mut writer, chunk)?;
                    }
                }
            }
            if replied {
                let frame = reader.read()?;
                if frame.kind != FrameType::Pages {
                    bail!("unexpected {:?} frame on the urgent channel", frame.kind);
                }
                let batch = PagesBatch::parse(frame.payload, self.total)?;
                let mut zero = 0;
                for (page, data) in batch.pages() {
                    zero += u64::from(data.is_none());
                    self.install(installer, page, data, waiting)
                        .map_err(|e| anyhow!("{e}"))?;
                }
                self.account(batch.entries.len() as u64, zero, frame.payload.len() as u64);
            }
        }
        // Close gracefully: replies still in flight are read and dropped, so the source sees
        // an orderly end rather than a reset.
        let _ = writer.shutdown(std::net::Shutdown::Write);
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)));
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && reader.read().is_ok() {}
        Ok(())
    }
}
