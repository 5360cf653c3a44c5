//! The target's half of the switch-over: trust every page the source did not name, make the
//! named ones fault again, restore the VM state, say `prepared`, and resume only once the
//! source says it is fenced (`commit`). The source's VM is paused throughout.

use std::time::Instant;

use anyhow::Context;
use faultline::postcopy::Installer;
use faultline::sidecar_api::Phase;
use faultline::wire::{Control, SwitchOver};

use super::Target;
use crate::migration::Stop;
use crate::transport::{Conn, Peer, expect};

impl Target<'_> {
    pub(super) fn switch_over(
        &mut self,
        installer: &Installer,
        switch: &SwitchOver,
        main: &mut Conn,
    ) -> Result<(), Stop> {
        let m = self.m;
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
        m.counters
            .set_remaining(self.total - installer.states().valid_count());
        m.set_prepared();
        Control::Prepared.write(&mut main.writer)?;
        tracing::info!(
            invalid = switch.invalid.count(),
            pages_us = (t1 - t0).as_micros() as u64,
            discard_us = (t2 - t1).as_micros() as u64,
            restore_us = (t3 - t2).as_micros() as u64,
            "target prepared"
        );
        expect(&mut main.reader, Peer::Source, "commit", |c| {
            matches!(c, Control::Commit).then_some(())
        })?;
        // The source is fenced: from here the VM exists only here.
        m.commit();
        let t = Instant::now();
        self.vmm.resume().context("cannot resume the target VM")?;
        Control::Resumed.write(&mut main.writer)?;
        drop(realtime);
        tracing::info!(resume_us = t.elapsed().as_micros() as u64, "target resumed");
        m.set_message("running on the target");
        Ok(())
    }
}
