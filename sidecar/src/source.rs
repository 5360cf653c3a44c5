//! The source side of a migration: pre-copy passes from the VMM's dirty log, the two-phase
//! switch-over, and — in post-copy — serving fault requests while pushing the rest.
//!
//! Until the commit point every failure resumes the source VM (if it was paused) and leaves it
//! running with nothing lost. The commit point is `fence`: from then on this VM never runs
//! again, so the engine only moves forward.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use faultline::bitmap::{AtomicPageBitmap, PageBitmap};
use faultline::convergence::{self, Decision, Pass};
use faultline::guest_memory::GuestMemory;
use faultline::layout::PAGE_SIZE;
use faultline::sidecar_api::{Mode, Phase, Policy};
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::CapabilityName;
use faultline::wire::frame::{FrameReader, FrameType};
use faultline::wire::handshake::{self, Channel};
use faultline::wire::{Control, FaultRequest, Needed, SwitchOver, WireError, layout_digest};

use crate::engine::{Link, Stop};
use crate::metrics::RoleLabel;
use crate::pages::{BATCH, Pacer, PageSender, Sent};
use crate::state::{Migration, Sidecar};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the target may take to answer a control message before the source gives up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages sent between checks for cancellation and timeouts (1 MiB: a cancel is noticed within
/// a second even at a 1 MB/s bandwidth limit).
const CHUNK: usize = 256;
const NO_HINT: u64 = u64::MAX;
/// How long `complete` may trail the end of the urgent channel.
const URGENT_GRACE: Duration = Duration::from_secs(5);

/// Why (and since when) the urgent channel is down, as the fault server saw it.
type Broken = std::sync::Mutex<Option<(String, Instant)>>;

pub fn run(sidecar: &Arc<Sidecar>, m: &Arc<Migration>) -> Result<(), Stop> {
    let mut vmm = VmmClient::connect(&sidecar.vmm_socket).context("cannot reach the VMM")?;
    let (hello, fds) = vmm.hello("faultline-sidecar").context("VMM hello failed")?;
    let mem = Arc::new(GuestMemory::open(&hello.layout, fds).context("cannot open guest memory")?);
    let total = mem.total_pages();
    m.counters.total_pages.store(total, Ordering::Relaxed);
    m.counters.remaining_pages.store(total, Ordering::Relaxed);
    let dirty_log = hello.has(CapabilityName::DirtyLog);

    let peer = m
        .peer
        .clone()
        .ok_or_else(|| Stop::failed("no peer address"))?;
    let digest = layout_digest(&hello.layout);
    let mut main = connect(&peer, Channel::Main, m, &digest)?;
    let urgent = connect(&peer, Channel::Urgent, m, &digest)?;

    let mut src = Source {
        sidecar,
        m,
        vmm,
        mem,
        total,
        deadline: m.started + Duration::from_secs(m.policy.completion_timeout_s),
        role: RoleLabel {
            role: "source".into(),
        },
        digest,
    };
    let result = src.migrate(&mut main, urgent, hello.vcpus, dirty_log);
    if result.is_err() && !m.committed() {
        src.recover();
        let reason = match &result {
            Err(Stop::Cancelled(why)) => why.clone(),
            Err(Stop::Failed(e)) => format!("{e:#}"),
            Ok(()) => String::new(),
        };
        let _ = Control::Cancel { reason }.write(&mut main.1);
    }
    result
}

/// A connected, authenticated channel: reader and writer halves.
type Conn = (FrameReader<TcpStream>, TcpStream);

fn connect(peer: &str, channel: Channel, m: &Migration, digest: &[u8; 32]) -> Result<Conn, Stop> {
    let addr = peer
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve peer {peer}"))?
        .next()
        .ok_or_else(|| Stop::failed(format!("peer {peer} resolves to nothing")))?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("cannot connect to the target sidecar at {peer}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .context("read timeout")?;
    let mut reader = FrameReader::new(stream.try_clone().context("clone socket")?);
    let mut writer = stream;
    handshake::client(&mut reader, &mut writer, channel, &m.id, &m.secret, digest)
        .with_context(|| format!("handshake with the target at {peer} failed"))?;
    Ok((reader, writer))
}

struct Source<'a> {
    sidecar: &'a Sidecar,
    m: &'a Migration,
    vmm: VmmClient,
    mem: Arc<GuestMemory>,
    total: u64,
    deadline: Instant,
    role: RoleLabel,
    digest: [u8; 32],
}

/// How the pre-copy phase ended.
enum Switch {
    StopAndCopy,
    PostCopy,
}

impl Source<'_> {
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

    fn account(&self, sent: Sent) {
        let c = &self.m.counters;
        c.transferred_pages.fetch_add(sent.pages, Ordering::Relaxed);
        c.transferred_bytes.fetch_add(sent.bytes, Ordering::Relaxed);
        c.zero_pages.fetch_add(sent.zero, Ordering::Relaxed);
        let mt = &self.sidecar.metrics;
        mt.pages.get_or_create(&self.role).inc_by(sent.pages);
        mt.bytes.get_or_create(&self.role).inc_by(sent.bytes);
        mt.zero_pages.get_or_create(&self.role).inc_by(sent.zero);
    }

    /// Sends `pages` in chunks, checking for cancellation between chunks.
    fn send(
        &self,
        w: &mut TcpStream,
        pages: &[u64],
        known_zero: Option<&PageBitmap>,
        pacer: &mut Pacer,
        check: bool,
    ) -> Result<Sent, Stop> {
        let mut sender = PageSender::new(&self.mem);
        let mut total = Sent::default();
        for chunk in pages.chunks(CHUNK) {
            if check {
                self.check()?;
            }
            let sent = sender
                .send(w, chunk.iter().copied(), known_zero, pacer)
                .context("sending pages failed")?;
            self.account(sent);
            total += sent;
        }
        Ok(total)
    }

    fn wait_control(&self, r: &mut FrameReader<TcpStream>, what: &str) -> Result<Control, Stop> {
        let frame = r
            .read()
            .with_context(|| format!("the target did not answer ({what})"))?;
        if frame.kind != FrameType::Control {
            return Err(Stop::failed(format!(
                "expected {what}, got a {:?} frame",
                frame.kind
            )));
        }
        let msg = Control::parse(frame.payload)?;
        if let Control::Cancel { reason } = &msg {
            return Err(Stop::failed(format!("the target refused: {reason}")));
        }
        Ok(msg)
    }

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
        let postcopy_wanted = policy.mode != Mode::PreCopy;
        Control::Start {
            mode: policy.mode,
            total_pages: self.total,
            vcpus,
            precopy: precopy || policy.mode == Mode::PreCopy,
            postcopy: postcopy_wanted,
        }
        .write(&mut main.1)?;
        m.set_phase(Phase::Connecting, "waiting for the target to arm its trap");
        let Control::Ready { trap } = self.wait_control(&mut main.0, "ready")? else {
            return Err(Stop::failed(
                "the target answered start with something other than ready",
            ));
        };
        m.set_trap(trap);
        // A hybrid migration whose target cannot trap falls back to pre-copy (its policy allows
        // stop-and-copy); a post-copy one cannot go on.
        let effective = match (policy.mode, trap) {
            (Mode::PostCopy, None) => {
                return Err(Stop::failed(
                    "the target has no trap mechanism for this VM's memory, so post-copy is impossible",
                ));
            }
            (Mode::Hybrid, None) => Policy {
                mode: Mode::PreCopy,
                ..policy.clone()
            },
            _ => policy.clone(),
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
        self.switch_over(main, urgent, switch, pending, dirty_log && precopy)
    }

    /// Runs pre-copy passes until the policy decides; returns how to switch and the pages
    /// still to send.
    fn precopy(
        &mut self,
        (r, w): &mut Conn,
        policy: &Policy,
        pacer: &mut Pacer,
    ) -> Result<(Switch, PageBitmap), Stop> {
        let m = self.m;
        self.vmm
            .dirty_log_start()
            .context("cannot start the dirty log")?;
        let holes = self.mem.holes();
        let mut pending: Vec<u64> = (0..self.total).collect();
        let mut passes: Vec<Pass> = Vec::new();
        loop {
            let round = passes.len() as u32 + 1;
            m.set_phase(
                Phase::PreCopy,
                format!("pre-copy pass {round}: sending {} pages", pending.len()),
            );
            let started = Instant::now();
            let known_zero = (round == 1).then_some(&holes);
            let sent = self.send(w, &pending, known_zero, pacer, true)?;
            Control::RoundEnd {
                round,
                sent: sent.pages,
            }
            .write(w)?;
            match self.wait_control(r, "round done")? {
                Control::RoundDone { round: done } if done == round => {}
                other => {
                    return Err(Stop::failed(format!(
                        "expected round {round} done, got {other:?}"
                    )));
                }
            }
            let duration = started.elapsed();
            let dirty = self
                .vmm
                .dirty_log_collect()
                .context("cannot collect the dirty log")?;
            let pass = Pass {
                pages_sent: sent.pages,
                bytes_sent: sent.bytes,
                duration,
                dirtied: dirty.count(),
            };
            passes.push(pass);
            let bandwidth = measured_bandwidth(&passes);
            let c = &m.counters;
            c.precopy_rounds.store(round, Ordering::Relaxed);
            c.set_dirty_rate(pass.dirty_rate());
            c.set_bandwidth(bandwidth);
            c.remaining_pages.store(dirty.count(), Ordering::Relaxed);
            tracing::info!(
                round,
                sent = sent.pages,
                zero = sent.zero,
                ms = duration.as_millis() as u64,
                dirty = dirty.count(),
                "pre-copy pass done"
            );
            match convergence::decide(policy, &passes, bandwidth) {
                Decision::Continue => pending = dirty.iter_set().collect(),
                Decision::StopAndCopy => return Ok((Switch::StopAndCopy, dirty)),
                Decision::SwitchToPostCopy => return Ok((Switch::PostCopy, dirty)),
                Decision::Fail(why) => return Err(Stop::failed(why)),
            }
        }
    }

    fn switch_over(
        &mut self,
        main: &mut Conn,
        urgent: Conn,
        switch: Switch,
        mut pending: PageBitmap,
        logging: bool,
    ) -> Result<(), Stop> {
        let m = self.m;
        m.set_phase(Phase::SwitchOver, "pausing the source VM");
        // Downtime starts here: this thread must not wait behind vCPUs for a core.
        let realtime = faultline::sys::sched::RealtimeWindow::enter();
        let paused_at = Instant::now();
        self.vmm.pause().context("cannot pause the source VM")?;
        let t_paused = paused_at.elapsed();
        if logging {
            let last = self.vmm.dirty_log_collect().context("final dirty log")?;
            pending.union_with(&last);
            let _ = self.vmm.dirty_log_stop();
        }
        let t_collected = paused_at.elapsed();
        let invalid = match switch {
            Switch::StopAndCopy => {
                let pages: Vec<u64> = pending.iter_set().collect();
                m.set_message(format!(
                    "stop-and-copy: sending the last {} pages",
                    pages.len()
                ));
                let mut unpaced = Pacer::new(0);
                self.send(&mut main.1, &pages, None, &mut unpaced, false)?;
                PageBitmap::new(self.total)
            }
            Switch::PostCopy => pending,
        };
        let t_sent = paused_at.elapsed();
        let (_, state) = self
            .vmm
            .save_state()
            .context("cannot save the source VM's state")?;
        let t_saved = paused_at.elapsed();
        SwitchOver {
            invalid: invalid.clone(),
            state,
        }
        .write(&mut main.1)?;
        match self.wait_control(&mut main.0, "prepared")? {
            Control::Prepared => {}
            other => return Err(Stop::failed(format!("expected prepared, got {other:?}"))),
        }
        let t_prepared = paused_at.elapsed();
        if !m.try_begin_commit() {
            return Err(Stop::Cancelled(
                "cancelled by request before the commit point".into(),
            ));
        }
        // The point of no return.
        let t_fence = Instant::now();
        self.vmm.fence().context("cannot fence the source VM")?;
        tracing::info!(
            fence_us = t_fence.elapsed().as_micros() as u64,
            "source fenced"
        );
        m.commit();
        m.set_message("committed: the source is fenced; the target resumes");
        Control::Commit.write(&mut main.1)?;
        match self.wait_control(&mut main.0, "resumed")? {
            Control::Resumed => {}
            other => return Err(Stop::failed(format!("expected resumed, got {other:?}"))),
        }
        let downtime = paused_at.elapsed();
        tracing::info!(
            pause_us = t_paused.as_micros() as u64,
            collect_us = (t_collected - t_paused).as_micros() as u64,
            final_pages_us = (t_sent - t_collected).as_micros() as u64,
            save_us = (t_saved - t_sent).as_micros() as u64,
            prepare_us = (t_prepared - t_saved).as_micros() as u64,
            commit_us = (downtime - t_prepared).as_micros() as u64,
            "switch-over timings"
        );
        drop(realtime);
        m.counters.set_downtime(downtime);
        self.sidecar.metrics.downtime.set(downtime.as_secs_f64());
        tracing::info!(downtime_ms = downtime.as_secs_f64() * 1e3, "target resumed");

        if invalid.is_empty() {
            m.counters.remaining_pages.store(0, Ordering::Relaxed);
            match self.wait_control(&mut main.0, "complete")? {
                Control::Complete { faults } => m.counters.faults.store(faults, Ordering::Relaxed),
                other => return Err(Stop::failed(format!("expected complete, got {other:?}"))),
            }
        } else {
            // The reader buffers nothing between frames, so a new one on the same socket
            // carries on exactly where this one stopped.
            let main = (
                FrameReader::new(main.1.try_clone().context("clone socket")?),
                main.1.try_clone().context("clone socket")?,
            );
            self.postcopy(main, urgent, &invalid)?;
        }
        if let Err(e) = self.vmm.shutdown() {
            tracing::warn!("the source VMM did not shut down cleanly: {e}");
        }
        m.set_phase(Phase::Completed, "completed: the VM runs on the target");
        Ok(())
    }

    /// Post-copy: serve faults and push what the target still needs until it reports
    /// complete. A broken link does not end it — the VM lives on the target now — so the source
    /// reconnects and resumes from the pages the target says it still needs.
    fn postcopy(&mut self, main: Conn, urgent: Conn, invalid: &PageBitmap) -> Result<(), Stop> {
        let m = self.m;
        m.set_phase(
            Phase::PostCopy,
            format!("post-copy: {} pages to move", invalid.count()),
        );
        crate::pages::deprioritize_this_thread();
        let mut needed = invalid.clone();
        let mut link = Some((main, urgent));
        loop {
            let (main, urgent) = match link.take() {
                Some(l) => l,
                None => {
                    let (l, n) = self.reconnect()?;
                    needed = n;
                    l
                }
            };
            match self.postcopy_session(main, urgent, &needed) {
                Ok(()) => return Ok(()),
                Err(Link::Broken(why)) => {
                    tracing::warn!("post-copy link to the target broke: {why}; reconnecting");
                    m.set_message(format!(
                        "post-copy paused: the link to the target broke ({why}); reconnecting"
                    ));
                }
                Err(Link::Fatal(stop)) => return Err(stop),
            }
        }
    }

    /// Connects both channels again and asks the target what it still needs.
    fn reconnect(&self) -> Result<((Conn, Conn), PageBitmap), Stop> {
        let m = self.m;
        let peer = m.peer.clone().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(m.policy.completion_timeout_s);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let tried = connect(&peer, Channel::Main, m, &self.digest).and_then(|mut main| {
                Control::Resume.write(&mut main.1)?;
                let frame = main
                    .0
                    .read()
                    .map_err(|e| Stop::failed(format!("no answer to resume: {e}")))?;
                if frame.kind != FrameType::Needed {
                    return Err(Stop::failed(format!(
                        "expected the needed pages, got {:?}",
                        frame.kind
                    )));
                }
                let needed = Needed::parse(frame.payload, self.total)?;
                let urgent = connect(&peer, Channel::Urgent, m, &self.digest)?;
                Ok(((main, urgent), needed))
            });
            match tried {
                Ok((link, needed)) => {
                    m.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        attempt,
                        still_needed = needed.count(),
                        "post-copy link re-established"
                    );
                    m.set_message(format!(
                        "post-copy resumed after reconnecting: {} pages to move",
                        needed.count()
                    ));
                    return Ok((link, needed));
                }
                Err(e) if Instant::now() < deadline => {
                    m.set_message(format!(
                        "post-copy paused: reconnecting to the target (attempt {attempt}: {e})"
                    ));
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    return Err(Stop::failed(format!(
                        "could not reconnect to the target after the post-copy link broke: {e}"
                    )));
                }
            }
        }
    }

    /// One connection's worth of post-copy. Ends with the target's `complete`, a broken link,
    /// or a fatal error.
    fn postcopy_session(&self, main: Conn, urgent: Conn, needed: &PageBitmap) -> Result<(), Link> {
        let (mut reader, mut writer) = main;
        let needed = AtomicPageBitmap::from_bitmap(needed);
        let hint = AtomicU64::new(NO_HINT);
        let stop = AtomicBool::new(false);
        let broken: Broken = std::sync::Mutex::new(None);
        std::thread::scope(|scope| -> Result<(), Link> {
            let server = std::thread::Builder::new()
                .name("fault-server".into())
                .spawn_scoped(scope, || {
                    crate::pages::prioritize_this_thread();
                    let result = self.serve_faults(urgent, &needed, &hint, &stop);
                    if let Err(e) = result
                        && !stop.load(Ordering::Acquire)
                    {
                        *broken.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((e.to_string(), Instant::now()));
                    }
                })
                .map_err(|e| {
                    Link::Fatal(Stop::failed(format!("cannot start the fault server: {e}")))
                })?;
            let result = self.push_and_wait(&mut reader, &mut writer, &needed, &hint, &broken);
            stop.store(true, Ordering::Release);
            if result.is_err() {
                let _ = writer.shutdown(std::net::Shutdown::Both);
            }
            let _ = server.join();
            result
        })
    }

    /// Pushes every page still needed, nearest the latest fault first, then waits for the
    /// target's `complete`.
    fn push_and_wait(
        &self,
        reader: &mut FrameReader<TcpStream>,
        writer: &mut TcpStream,
        needed: &AtomicPageBitmap,
        hint: &AtomicU64,
        broken: &Broken,
    ) -> Result<(), Link> {
        let m = self.m;
        let broken_link = || broken.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut sender = PageSender::new(&self.mem);
        let mut pacer = Pacer::new(m.policy.bandwidth_limit);
        let mut cursor = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let mut pushed = 0u64;
        loop {
            if let Some((why, _)) = broken_link() {
                return Err(Link::Broken(format!("urgent channel: {why}")));
            }
            let h = hint.swap(NO_HINT, Ordering::AcqRel);
            if h != NO_HINT {
                cursor = h + 1;
            }
            batch.clear();
            while batch.len() < BATCH {
                match needed.next_set(cursor) {
                    Some(p) => {
                        cursor = p + 1;
                        if needed.take(p) {
                            batch.push(p);
                        }
                    }
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let sent = sender
                .send(writer, batch.iter().copied(), None, &mut pacer)
                .map_err(Link::from_send)?;
            self.account(sent);
            pushed += sent.pages;
            m.counters
                .remaining_pages
                .store(needed.count(), Ordering::Relaxed);
        }
        Control::PushDone { pages: pushed }
            .write(writer)
            .map_err(Link::from_wire)?;
        m.set_message("post-copy: every page sent; waiting for the target to install the last");
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match reader.read() {
                Ok(frame) if frame.kind == FrameType::Control => {
                    match Control::parse(frame.payload).map_err(|e| Link::Fatal(e.into()))? {
                        Control::Complete { faults } => {
                            m.counters.faults.store(faults, Ordering::Relaxed);
                            return Ok(());
                        }
                        other => {
                            return Err(Link::Fatal(Stop::failed(format!(
                                "expected complete, got {other:?}"
                            ))));
                        }
                    }
                }
                Ok(frame) => {
                    return Err(Link::Fatal(Stop::failed(format!(
                        "expected complete, got a {:?} frame",
                        frame.kind
                    ))));
                }
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    // Around completion the target closes the urgent channel, maybe before its
                    // `complete` reaches us: only a quiet main channel after that is a break.
                    if let Some((why, at)) = broken_link()
                        && at.elapsed() > URGENT_GRACE
                    {
                        return Err(Link::Broken(format!("urgent channel: {why}")));
                    }
                    if Instant::now() > deadline {
                        return Err(Link::Broken("the target stopped answering".into()));
                    }
                }
                Err(e) => return Err(Link::from_wire(e)),
            }
        }
    }

    /// Answers fault requests on the urgent channel until told to stop. Every request is
    /// answered, even for pages already pushed: the copy on the main channel may be queued
    /// behind megabytes of other pages.
    fn serve_faults(
        &self,
        (mut reader, mut writer): Conn,
        needed: &AtomicPageBitmap,
        hint: &AtomicU64,
        stop: &AtomicBool,
    ) -> Result<(), WireError> {
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let mut sender = PageSender::new(&self.mem);
        loop {
            let frame = match reader.read() {
                Ok(f) => f,
                Err(WireError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if frame.kind != FrameType::FaultRequest {
                return Err(WireError::malformed(
                    "urgent channel",
                    format!("unexpected {:?} frame", frame.kind),
                ));
            }
            let pages = FaultRequest::parse(frame.payload, self.total)?;
            for &p in &pages {
                needed.take(p);
            }
            if let Some(&last) = pages.last() {
                hint.store(last, Ordering::Release);
            }
            let mut unpaced = Pacer::new(0);
            let sent = match sender.send(&mut writer, pages, None, &mut unpaced) {
                Ok(sent) => sent,
                Err(crate::pages::SendError::Wire(e)) => return Err(e),
                Err(e) => {
                    return Err(WireError::Io(std::io::Error::other(e.to_string())));
                }
            };
            self.account(sent);
            self.sidecar.metrics.faults.inc_by(sent.pages);
        }
    }
}

/// Bytes per second over the passes so far (data and markers), never below 100 MB/s so that a
/// pass of mostly zero markers cannot promise an absurd bandwidth.
fn measured_bandwidth(passes: &[Pass]) -> f64 {
    let bytes: u64 = passes.iter().map(|p| p.bytes_sent).sum();
    let secs: f64 = passes.iter().map(|p| p.duration.as_secs_f64()).sum();
    let data_rate = bytes as f64 / secs.max(1e-6);
    let page_rate =
        passes.iter().map(|p| p.pages_sent).sum::<u64>() as f64 * PAGE_SIZE as f64 / secs.max(1e-6);
    data_rate.min(page_rate).max(100e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_floor() {
        let p = Pass {
            pages_sent: 1000,
            bytes_sent: 8000,
            duration: Duration::from_secs(1),
            dirtied: 0,
        };
        assert_eq!(measured_bandwidth(&[p]), 100e6);
    }
}
