//! Post-copy on the source: the VM runs on the target and the rest of its memory is here.
//! A fault server answers the target's fault requests on the urgent channel at once, while
//! the main channel pushes every page still needed, nearest the latest fault first. A broken
//! link does not end it: the source reconnects and carries on from what the target says it
//! still needs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultline::bitmap::{AtomicPageBitmap, PageBitmap};
use faultline::guest_memory::FrozenMemory;
use faultline::sidecar_api::Phase;
use faultline::sync::lock;
use faultline::wire::frame::FrameType;
use faultline::wire::{Channel, Control, FaultRequest, Needed, WireError};

use super::Source;
use crate::migration::{Link, Stop};
use crate::threads;
use crate::transport::channel::{POLL_INTERVAL, REPLY_TIMEOUT};
use crate::transport::pages::SendError;
use crate::transport::{BATCH, Conn, Pacer, PageSender, is_timeout};

/// "No fault seen since the push last looked" in the hint the fault server leaves.
const NO_HINT: u64 = u64::MAX;
/// How long `complete` may trail the end of the urgent channel: around completion the target
/// closes the urgent channel, maybe before its `complete` reaches us.
const URGENT_GRACE: Duration = Duration::from_secs(5);
/// How often the source tries to reconnect a broken post-copy link.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);

/// Why (and since when) the urgent channel is down, as the fault server saw it.
type Broken = Mutex<Option<(String, Instant)>>;

impl Source<'_> {
    /// Post-copy: serve faults and push what the target still needs until it reports
    /// complete, across as many sessions as broken links require.
    pub(super) fn postcopy(
        &mut self,
        main: Conn,
        urgent: Conn,
        invalid: &PageBitmap,
    ) -> Result<(), Stop> {
        let m = self.m;
        m.set_phase(
            Phase::PostCopy,
            format!("post-copy: {} pages to move", invalid.count()),
        );
        threads::deprioritize_this_thread();
        // SAFETY: post-copy starts after the commit point: the source VMM is fenced, its vCPUs
        // never run again, and nothing else writes guest memory, so the memory cannot change
        // while the view lives (this function's end).
        let frozen = unsafe { self.mem.freeze() }.map_err(|e| {
            Stop::failed(format!(
                "cannot map the stopped VM's memory for sending: {e}"
            ))
        })?;
        let frozen = frozen.as_ref();
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
            match self.postcopy_session(main, urgent, &needed, frozen) {
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
        // After a break the source has the whole completion timeout again to reconnect.
        let deadline = Instant::now() + m.completion_timeout();
        let connect = |channel| {
            Conn::connect(
                &m.protection,
                &self.peer,
                channel,
                &m.id,
                &m.secret,
                &self.digest,
            )
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let tried = connect(Channel::Main).and_then(|mut main| {
                Control::Resume.write(&mut main.writer)?;
                let frame = main
                    .reader
                    .read()
                    .map_err(|e| Stop::failed(format!("no answer to resume: {e}")))?;
                if frame.kind != FrameType::Needed {
                    return Err(Stop::failed(format!(
                        "expected the needed pages, got {:?}",
                        frame.kind
                    )));
                }
                let needed = Needed::parse(frame.payload, self.total)?;
                let urgent = connect(Channel::Urgent)?;
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
                    std::thread::sleep(RECONNECT_INTERVAL);
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
    fn postcopy_session(
        &self,
        mut main: Conn,
        urgent: Conn,
        needed: &PageBitmap,
        frozen: Option<&FrozenMemory>,
    ) -> Result<(), Link> {
        let needed = AtomicPageBitmap::from_bitmap(needed);
        let hint = AtomicU64::new(NO_HINT);
        let stop = AtomicBool::new(false);
        let broken: Broken = Mutex::new(None);
        std::thread::scope(|scope| -> Result<(), Link> {
            let server = threads::spawn_scoped(scope, "fault-server", || {
                threads::prioritize_this_thread();
                let result = self.serve_faults(urgent, &needed, &hint, &stop, frozen);
                if let Err(e) = result
                    && !stop.load(Ordering::Acquire)
                {
                    *lock(&broken) = Some((e.to_string(), Instant::now()));
                }
            })
            .map_err(|e| Link::fatal(format!("cannot start the fault server: {e}")))?;
            let result = self.push_and_wait(&mut main, &needed, &hint, &broken, frozen);
            stop.store(true, Ordering::Release);
            if result.is_err() {
                main.shutdown();
            }
            let _ = server.join();
            result
        })
    }

    /// Pushes every page still needed, nearest the latest fault first, then waits for the
    /// target's `complete`.
    fn push_and_wait(
        &self,
        main: &mut Conn,
        needed: &AtomicPageBitmap,
        hint: &AtomicU64,
        broken: &Broken,
        frozen: Option<&FrozenMemory>,
    ) -> Result<(), Link> {
        let m = self.m;
        let broken_link = || lock(broken).clone();
        let mut sender = PageSender::with_frozen(&self.mem, frozen);
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
            let sent = sender.send(&mut main.writer, batch.iter().copied(), None, &mut pacer)?;
            m.account(&self.sidecar.metrics, sent);
            pushed += sent.pages;
            m.counters.set_remaining(needed.count());
        }
        Control::PushDone { pages: pushed }
            .write(&mut main.writer)
            .map_err(Link::from_wire)?;
        m.set_message("post-copy: every page sent; waiting for the target to install the last");
        main.poll_every(POLL_INTERVAL);
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            match main.reader.read() {
                Ok(frame) if frame.kind == FrameType::Control => {
                    return match Control::parse(frame.payload).map_err(Stop::from)? {
                        Control::Complete { faults } => {
                            m.counters.faults.store(faults, Ordering::Relaxed);
                            Ok(())
                        }
                        other => Err(Link::fatal(format!("expected complete, got {other:?}"))),
                    };
                }
                Ok(frame) => {
                    return Err(Link::fatal(format!(
                        "expected complete, got a {:?} frame",
                        frame.kind
                    )));
                }
                Err(e) if is_timeout(&e) => {
                    // Only a quiet main channel well after the urgent one ended is a break.
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
    /// behind megabytes of other pages. Faults are counted by the target, where they happen.
    fn serve_faults(
        &self,
        mut urgent: Conn,
        needed: &AtomicPageBitmap,
        hint: &AtomicU64,
        stop: &AtomicBool,
        frozen: Option<&FrozenMemory>,
    ) -> Result<(), SendError> {
        urgent.poll_every(POLL_INTERVAL);
        let mut sender = PageSender::with_frozen(&self.mem, frozen);
        loop {
            let frame = match urgent.reader.read() {
                Ok(f) => f,
                Err(e) if is_timeout(&e) => {
                    if stop.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if frame.kind != FrameType::FaultRequest {
                return Err(WireError::malformed(
                    "urgent channel",
                    format!("unexpected {:?} frame", frame.kind),
                )
                .into());
            }
            let pages = FaultRequest::parse(frame.payload, self.total)?;
            for &p in &pages {
                needed.take(p);
            }
            if let Some(&last) = pages.last() {
                hint.store(last, Ordering::Release);
            }
            let sent = sender.send(&mut urgent.writer, pages, None, &mut Pacer::unlimited())?;
            self.m.account(&self.sidecar.metrics, sent);
        }
    }
}
