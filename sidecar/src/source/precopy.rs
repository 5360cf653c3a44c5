//! Pre-copy passes: the first sends every page, later ones what the dirty log reported, until
//! the convergence rule (`faultline::convergence`) decides how to switch over.

use std::time::Instant;

use anyhow::Context;
use faultline::bitmap::PageBitmap;
use faultline::convergence::{self, Decision, Pass};
use faultline::sidecar_api::{Phase, Policy};
use faultline::wire::Control;

use super::{Source, Switch};
use crate::migration::Stop;
use crate::transport::{Conn, Pacer, Peer, expect};

impl Source<'_> {
    /// Runs pre-copy passes until the policy decides; returns how to switch and the pages
    /// still to send.
    pub(super) fn precopy(
        &mut self,
        main: &mut Conn,
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
            let sent = self.send(&mut main.writer, &pending, known_zero, pacer, true)?;
            Control::RoundEnd {
                round,
                sent: sent.pages,
            }
            .write(&mut main.writer)?;
            expect(&mut main.reader, Peer::Target, "round done", |c| {
                matches!(c, Control::RoundDone { round: done } if *done == round).then_some(())
            })?;
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
            c.precopy_rounds
                .store(round, std::sync::atomic::Ordering::Relaxed);
            c.set_dirty_rate(pass.dirty_rate());
            c.set_bandwidth(bandwidth);
            c.set_remaining(dirty.count());
            tracing::info!(
                round,
                sent = sent.pages,
                zero = sent.zero,
                ms = duration.as_millis() as u64,
                dirty = dirty.count(),
                bandwidth_mb_s = bandwidth / 1e6,
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
}

/// The bandwidth the passes so far achieved, in bytes per second: the bytes that went on the
/// wire over the time the passes took, each measured until the target had installed it. No
/// floor: a pass of mostly zero markers measures low, which only costs another pass (whose
/// dirtied pages carry data and measure the link), while a floor above a slow link would make
/// the downtime estimate optimistic by that ratio. 0 when nothing was measured yet.
pub(super) fn measured_bandwidth(passes: &[Pass]) -> f64 {
    let bytes: u64 = passes.iter().map(|p| p.bytes_sent).sum();
    let secs: f64 = passes.iter().map(|p| p.duration.as_secs_f64()).sum();
    if secs > 0.0 { bytes as f64 / secs } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::convergence::estimated_downtime;
    use faultline::layout::PAGE_SIZE;
    use std::time::Duration;

    fn pass(bytes_sent: u64, ms: u64) -> Pass {
        Pass {
            pages_sent: bytes_sent / PAGE_SIZE,
            bytes_sent,
            duration: Duration::from_millis(ms),
            dirtied: 0,
        }
    }

    #[test]
    fn bandwidth_is_what_the_link_carried() {
        assert_eq!(measured_bandwidth(&[]), 0.0);
        assert_eq!(measured_bandwidth(&[pass(10_000_000, 1000)]), 10e6);
        // Over all passes: 30 MB in 2 s.
        let two = [pass(10_000_000, 1000), pass(20_000_000, 1000)];
        assert_eq!(measured_bandwidth(&two), 15e6);
    }

    /// On a 10 MB/s link the estimate must say so: 1000 dirty pages take ~410 ms there, well
    /// over a 300 ms budget, where a 100 MB/s floor claimed 41 ms.
    #[test]
    fn a_slow_link_gives_an_honest_downtime_estimate() {
        let bw = measured_bandwidth(&[pass(10_000_000, 1000)]);
        let d = estimated_downtime(1000, bw);
        assert!(d > Duration::from_millis(400), "{d:?}");
    }

    /// A first pass of zero markers (8 bytes a page) measures low: pessimistic, so the rule asks
    /// for another pass rather than promising a short pause.
    #[test]
    fn zero_markers_make_the_estimate_pessimistic_not_optimistic() {
        let zeros = Pass {
            pages_sent: 100_000,
            bytes_sent: 800_016,
            duration: Duration::from_millis(100),
            dirtied: 1000,
        };
        let bw = measured_bandwidth(&[zeros]);
        assert!(bw < 10e6, "{bw}");
        let policy = Policy::default();
        assert_eq!(
            convergence::decide(&policy, &[zeros], bw),
            Decision::Continue
        );
    }
}
