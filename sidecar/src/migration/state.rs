//! A migration's request and state machine. The decisions that must never both win — the
//! source fencing its VM (commit) and a cancel — are taken under one lock, here and nowhere
//! else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use faultline::sidecar_api::{MigrationStatus, Phase, Policy, Role, StartMigration};
use faultline::sync::lock;
use faultline::trap::Backend;
use faultline::wire::{Channel, LayoutDigest, Secret};

use super::{Counters, Stop};
use crate::transport::Protection;

/// An accepted, authenticated connection from a source, handed to the target engine.
pub struct Accepted {
    pub channel: Channel,
    pub stream: faultline::tls::Stream,
}

struct Inner {
    phase: Phase,
    trap: Option<Backend>,
    /// Source: decided to fence (a cancel can no longer win).
    committing: bool,
    /// Target: state restored and `prepared` sent (only the source may still cancel).
    prepared: bool,
    committed: bool,
    vm_lost: bool,
    message: String,
    error: Option<String>,
    finished: Option<Instant>,
}

pub struct Migration {
    pub id: String,
    pub role: Role,
    pub policy: Policy,
    pub peer: Option<String>,
    pub secret: Secret,
    /// TLS or plaintext, per the policy, for every connection of this migration.
    pub protection: Protection,
    pub request: StartMigration,
    pub started: Instant,
    pub counters: Counters,
    cancel: AtomicBool,
    /// Its final status has been served to a caller (the operator knows the outcome).
    outcome_read: AtomicBool,
    inner: Mutex<Inner>,
    /// Target: the layout digest peers must match, once the engine knows its VMM.
    pub digest: OnceLock<LayoutDigest>,
    /// Target: where the listener delivers authenticated connections, while the engine takes
    /// them.
    inbox: Mutex<Option<Sender<Accepted>>>,
}

impl Migration {
    pub fn new(request: StartMigration, secret: Secret, protection: Protection) -> Self {
        let phase = match request.role {
            Role::Source => Phase::Connecting,
            Role::Target => Phase::Waiting,
        };
        Self {
            id: request.id.clone(),
            role: request.role,
            policy: request.policy.clone(),
            peer: request.peer.clone(),
            secret,
            protection,
            started: Instant::now(),
            counters: Counters::new(),
            cancel: AtomicBool::new(false),
            outcome_read: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                phase,
                trap: None,
                committing: false,
                prepared: false,
                committed: false,
                vm_lost: false,
                message: "accepted".into(),
                error: None,
                finished: None,
            }),
            digest: OnceLock::new(),
            inbox: Mutex::new(None),
            request,
        }
    }

    /// The policy's completion timeout.
    pub fn completion_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.policy.completion_timeout_s)
    }

    /// When the completion timeout expires, counted from the start request.
    pub fn deadline(&self) -> Instant {
        self.started + self.completion_timeout()
    }

    /// The status to serve a caller; once it is final, the outcome counts as read.
    pub fn status_for_caller(&self) -> MigrationStatus {
        let s = self.status();
        if s.phase.is_terminal() {
            self.outcome_read.store(true, Ordering::Release);
        }
        s
    }

    /// Still running, or ended less than `within` ago and nobody has read how.
    pub fn outcome_unread(&self, within: std::time::Duration) -> bool {
        match lock(&self.inner).finished {
            None => true,
            Some(t) => !self.outcome_read.load(Ordering::Acquire) && t.elapsed() < within,
        }
    }

    pub fn phase(&self) -> Phase {
        lock(&self.inner).phase
    }

    pub fn set_phase(&self, phase: Phase, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(?phase, "{message}");
        let mut g = lock(&self.inner);
        g.phase = phase;
        g.message = message;
        if phase.is_terminal() && g.finished.is_none() {
            g.finished = Some(Instant::now());
        }
    }

    pub fn set_message(&self, message: impl Into<String>) {
        lock(&self.inner).message = message.into();
    }

    pub fn set_trap(&self, trap: Option<Backend>) {
        lock(&self.inner).trap = trap;
    }

    /// Both sides: the source is fenced; from here the VM exists only on the target.
    pub fn commit(&self) {
        lock(&self.inner).committed = true;
    }

    pub fn committed(&self) -> bool {
        lock(&self.inner).committed
    }

    /// Source, just before fencing: claims the commit unless a cancel came first. Cancel and
    /// commit decide under one lock, so a cancel that was accepted always wins and a cancel
    /// that comes later is refused.
    pub fn try_begin_commit(&self) -> bool {
        let mut g = lock(&self.inner);
        if self.cancel.load(Ordering::Acquire) {
            return false;
        }
        g.committing = true;
        true
    }

    /// Target: `prepared` was sent; from now on only the source can cancel.
    pub fn set_prepared(&self) {
        lock(&self.inner).prepared = true;
    }

    /// Requests cancellation, unless the migration is past deciding it. Success is a promise:
    /// the migration will not commit.
    pub fn request_cancel(&self) -> Result<(), String> {
        let mut g = lock(&self.inner);
        if g.phase.is_terminal() {
            return Err(format!(
                "migration `{}` has already ended ({:?})",
                self.id, g.phase
            ));
        }
        if g.committed || g.committing {
            return Err(format!(
                "migration `{}` is past the point of no return (the source is fenced); it can only complete",
                self.id
            ));
        }
        if g.prepared {
            return Err(format!(
                "migration `{}` is prepared on the target and waits for the source's decision; cancel it at the source",
                self.id
            ));
        }
        self.cancel.store(true, Ordering::Release);
        g.message = "cancellation requested".into();
        Ok(())
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Ends the migration with an error. After the commit point the VM is lost with it.
    pub fn fail(&self, error: String) {
        let mut g = lock(&self.inner);
        if g.phase.is_terminal() {
            return;
        }
        tracing::error!("migration failed: {error}");
        g.vm_lost = g.committed;
        g.message = if g.committed {
            format!("failed after the point of no return; the VM is lost: {error}")
        } else {
            format!("failed; the source VM keeps running: {error}")
        };
        g.error = Some(error);
        g.phase = Phase::Failed;
        g.finished = Some(Instant::now());
    }

    /// Records how the engine ended and returns the result's metrics label (`completed`,
    /// `cancelled`, `failed`). A completed engine has set `Completed` itself.
    pub fn end(&self, result: &Result<(), Stop>) -> &'static str {
        match result {
            Ok(()) => "completed",
            Err(Stop::Cancelled(why)) => {
                self.set_phase(Phase::Cancelled, format!("cancelled: {why}"));
                "cancelled"
            }
            Err(Stop::Failed(e)) => {
                self.fail(format!("{e:#}"));
                "failed"
            }
        }
    }

    /// Target: opens the inbox the listener delivers connections to; the engine reads it.
    pub fn open_inbox(&self) -> Receiver<Accepted> {
        let (tx, rx) = std::sync::mpsc::channel();
        *lock(&self.inbox) = Some(tx);
        rx
    }

    /// Target: no more connections are taken (the engine ended).
    pub fn close_inbox(&self) {
        *lock(&self.inbox) = None;
    }

    /// Target: hands an authenticated connection to the engine.
    pub fn deliver(&self, accepted: Accepted) -> Result<(), String> {
        match lock(&self.inbox).as_ref() {
            Some(tx) => tx
                .send(accepted)
                .map_err(|_| "the target migration stopped listening".to_string()),
            None => Err("the target migration is not accepting connections".into()),
        }
    }

    pub fn status(&self) -> MigrationStatus {
        let g = lock(&self.inner);
        let end = g.finished.unwrap_or_else(Instant::now);
        MigrationStatus {
            id: self.id.clone(),
            role: self.role,
            phase: g.phase,
            mode: self.policy.mode,
            trap: g.trap,
            transport: self.policy.transport,
            committed: g.committed,
            vm_lost: g.vm_lost,
            progress: self.counters.progress(),
            elapsed_s: end.duration_since(self.started).as_secs_f64(),
            message: g.message.clone(),
            error: g.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn migration(role: Role) -> Migration {
        crate::testing::migration(role, Policy::default())
    }

    #[test]
    fn a_cancel_before_the_commit_wins_and_one_after_is_refused() {
        let m = migration(Role::Source);
        m.request_cancel().expect("cancel before anything");
        assert!(m.cancelled());
        assert!(!m.try_begin_commit(), "an accepted cancel must win");

        let m = migration(Role::Source);
        assert!(m.try_begin_commit());
        let e = m.request_cancel().expect_err("past the point of no return");
        assert!(e.contains("point of no return"), "{e}");
        assert!(!m.cancelled());
        m.commit();
        assert!(m.request_cancel().is_err());
    }

    /// Cancel and commit race from two threads, many times: exactly one of them wins every
    /// time, and a 202 (cancel accepted) is never followed by a fence.
    #[test]
    fn cancel_against_commit_race_has_exactly_one_winner() {
        for _ in 0..2000 {
            let m = Arc::new(migration(Role::Source));
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (m2, b2) = (m.clone(), barrier.clone());
            let canceller = std::thread::spawn(move || {
                b2.wait();
                m2.request_cancel().is_ok()
            });
            barrier.wait();
            let committed = m.try_begin_commit();
            let cancelled = canceller.join().unwrap();
            assert!(
                committed != cancelled,
                "commit {committed}, cancel {cancelled}: exactly one must win"
            );
            assert_eq!(m.cancelled(), cancelled);
        }
    }

    #[test]
    fn a_prepared_target_leaves_the_decision_to_the_source() {
        let m = migration(Role::Target);
        m.set_prepared();
        let e = m.request_cancel().expect_err("prepared");
        assert!(e.contains("cancel it at the source"), "{e}");
    }

    #[test]
    fn an_ended_migration_cannot_be_cancelled_and_stays_ended() {
        let m = migration(Role::Source);
        assert_eq!(m.end(&Err(Stop::failed("boom"))), "failed");
        let s = m.status();
        assert_eq!(s.phase, Phase::Failed);
        assert!(
            !s.vm_lost,
            "failed before the commit: the source keeps the VM"
        );
        assert!(s.message.contains("keeps running"), "{}", s.message);
        assert!(m.request_cancel().is_err());
        m.fail("again".into());
        assert_eq!(m.status().error.as_deref(), Some("boom"));

        let m = migration(Role::Target);
        m.commit();
        m.end(&Err(Stop::failed("gone")));
        let s = m.status();
        assert!(s.vm_lost && s.committed, "{s:?}");

        let m = migration(Role::Source);
        assert_eq!(m.end(&Err(Stop::Cancelled("asked".into()))), "cancelled");
        assert_eq!(m.status().phase, Phase::Cancelled);
    }

    /// A stopping sidecar waits for the operator to read how a migration ended, and only for
    /// that: a running migration holds it, a read outcome or an old one releases it.
    #[test]
    fn an_outcome_is_unread_until_a_caller_sees_the_final_status() {
        let long = std::time::Duration::from_secs(60);
        let m = migration(Role::Source);
        assert!(m.outcome_unread(long), "still running");
        m.status_for_caller();
        assert!(
            m.outcome_unread(long),
            "a running status is not the outcome"
        );
        m.end(&Err(Stop::failed("boom")));
        assert!(m.outcome_unread(long), "ended, nobody read it");
        assert!(
            !m.outcome_unread(std::time::Duration::ZERO),
            "ended longer ago than the caller waits"
        );
        assert_eq!(m.status_for_caller().phase, Phase::Failed);
        assert!(!m.outcome_unread(long), "read");
    }

    #[test]
    fn the_inbox_takes_connections_only_while_open() {
        let m = migration(Role::Target);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = || Accepted {
            channel: Channel::Main,
            stream: faultline::tls::Stream::Plain(
                std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap(),
            ),
        };
        assert!(m.deliver(conn()).is_err(), "not open yet");
        let rx = m.open_inbox();
        m.deliver(conn()).expect("open");
        assert_eq!(rx.try_recv().map(|a| a.channel).ok(), Some(Channel::Main));
        m.close_inbox();
        assert!(m.deliver(conn()).is_err(), "closed");
    }
}
