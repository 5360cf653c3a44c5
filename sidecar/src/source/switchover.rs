//! The switch-over: pause, send the last pages or leave them missing, hand over the VM state,
//! and — once the target is prepared and no cancel came first — fence the source: the point
//! of no return. Downtime runs from the pause until the target says it resumed.

use std::time::Instant;

use anyhow::Context;
use faultline::bitmap::PageBitmap;
use faultline::sidecar_api::Phase;
use faultline::wire::{Control, SwitchOver};

use super::{Source, Switch};
use crate::migration::Stop;
use crate::transport::{Conn, Pacer, Peer, expect};

impl Source<'_> {
    pub(super) fn switch_over(
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
                self.send(
                    &mut main.writer,
                    &pages,
                    None,
                    &mut Pacer::unlimited(),
                    false,
                )?;
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
        .write(&mut main.writer)?;
        expect(&mut main.reader, Peer::Target, "prepared", |c| {
            matches!(c, Control::Prepared).then_some(())
        })?;
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
        Control::Commit.write(&mut main.writer)?;
        expect(&mut main.reader, Peer::Target, "resumed", |c| {
            matches!(c, Control::Resumed).then_some(())
        })?;
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
            m.counters.set_remaining(0);
            let faults = expect(&mut main.reader, Peer::Target, "complete", |c| match c {
                Control::Complete { faults } => Some(*faults),
                _ => None,
            })?;
            m.counters
                .faults
                .store(faults, std::sync::atomic::Ordering::Relaxed);
        } else {
            self.postcopy(main.try_clone()?, urgent, &invalid)?;
        }
        if let Err(e) = self.vmm.shutdown() {
            tracing::warn!("the source VMM did not shut down cleanly: {e}");
        }
        m.set_phase(Phase::Completed, "completed: the VM runs on the target");
        Ok(())
    }
}
