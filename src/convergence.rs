//! When pre-copy should stop: the pure decision behind the `pre-copy`, `post-copy` and
//! `hybrid` modes, as a function of the policy and the passes so far. No I/O, so every rule is
//! unit-tested.

use std::time::Duration;

use crate::layout::PAGE_SIZE;
use crate::policy::{Mode, Policy, SwitchRule};

/// What one pre-copy pass did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pass {
    pub pages_sent: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// Pages the guest dirtied while the pass ran (still to send).
    pub dirtied: u64,
}

impl Pass {
    /// Pages dirtied per second during the pass.
    pub fn dirty_rate(&self) -> f64 {
        self.dirtied as f64 / self.duration.as_secs_f64().max(1e-6)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run another pass.
    Continue,
    /// Pause, send the rest, hand over: the rest fits the downtime budget.
    StopAndCopy,
    /// Pause, hand over with the rest missing, fetch it on demand.
    SwitchToPostCopy,
    /// Give up; the source keeps running. The reason is for people.
    Fail(String),
}

/// The pause sending `pages` would take at `bandwidth` bytes per second.
pub fn estimated_downtime(pages: u64, bandwidth: f64) -> Duration {
    if pages == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(pages as f64 * PAGE_SIZE as f64 / bandwidth.max(1.0))
}

/// Decides after `passes` (oldest first), with the measured `bandwidth` in bytes per second.
pub fn decide(policy: &Policy, passes: &[Pass], bandwidth: f64) -> Decision {
    let done = passes.len() as u32;
    let Some(last) = passes.last() else {
        return match policy.mode {
            Mode::PostCopy if policy.precopy_passes == 0 => Decision::SwitchToPostCopy,
            _ => Decision::Continue,
        };
    };
    let budget = Duration::from_millis(policy.max_downtime_ms);
    let needed = estimated_downtime(last.dirtied, bandwidth);
    let fits = needed <= budget;
    let out_of_passes = done >= policy.precopy_passes;
    match policy.mode {
        Mode::PreCopy if fits => Decision::StopAndCopy,
        Mode::PreCopy if out_of_passes => Decision::Fail(format!(
            "pre-copy did not converge in {done} passes: {} dirty pages would need {:.0} ms at {:.0} MB/s, over the {} ms downtime budget (the guest dirties {:.0} pages/s); allow post-copy (mode hybrid or post-copy) or a larger maxDowntimeMs",
            last.dirtied,
            needed.as_secs_f64() * 1e3,
            bandwidth / 1e6,
            policy.max_downtime_ms,
            last.dirty_rate(),
        )),
        Mode::PreCopy => Decision::Continue,
        Mode::PostCopy if out_of_passes => Decision::SwitchToPostCopy,
        Mode::PostCopy => Decision::Continue,
        Mode::Hybrid if fits => Decision::StopAndCopy,
        Mode::Hybrid if out_of_passes => Decision::SwitchToPostCopy,
        Mode::Hybrid => match policy.switch_rule {
            SwitchRule::Passes => Decision::Continue,
            SwitchRule::Auto => {
                let converging = passes.len() < 2
                    || (last.dirtied as f64)
                        <= policy.convergence_ratio * passes[passes.len() - 2].dirtied as f64;
                if converging {
                    Decision::Continue
                } else {
                    Decision::SwitchToPostCopy
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(dirtied: u64) -> Pass {
        Pass {
            pages_sent: 1000,
            bytes_sent: 4_096_000,
            duration: Duration::from_millis(100),
            dirtied,
        }
    }

    const BW: f64 = 1e9; // 1 GB/s: 300 ms holds ~73k pages

    fn policy(mode: Mode, passes: u32) -> Policy {
        Policy {
            mode,
            precopy_passes: passes,
            ..Policy::default()
        }
    }

    #[test]
    fn precopy_converges_or_fails() {
        let p = policy(Mode::PreCopy, 3);
        assert_eq!(decide(&p, &[], BW), Decision::Continue);
        assert_eq!(decide(&p, &[pass(10)], BW), Decision::StopAndCopy);
        assert_eq!(decide(&p, &[pass(500_000)], BW), Decision::Continue);
        let d = decide(&p, &[pass(500_000); 3], BW);
        assert!(
            matches!(d, Decision::Fail(ref why) if why.contains("did not converge")),
            "{d:?}"
        );
    }

    #[test]
    fn postcopy_switches_after_its_passes() {
        assert_eq!(
            decide(&policy(Mode::PostCopy, 0), &[], BW),
            Decision::SwitchToPostCopy
        );
        let p = policy(Mode::PostCopy, 1);
        assert_eq!(decide(&p, &[], BW), Decision::Continue);
        // Post-copy mode switches even when the rest would fit: the user asked for it.
        assert_eq!(decide(&p, &[pass(10)], BW), Decision::SwitchToPostCopy);
    }

    #[test]
    fn hybrid_switches_when_not_converging() {
        let p = policy(Mode::Hybrid, 8);
        assert_eq!(decide(&p, &[pass(10)], BW), Decision::StopAndCopy);
        assert_eq!(decide(&p, &[pass(900_000)], BW), Decision::Continue);
        assert_eq!(
            decide(&p, &[pass(900_000), pass(400_000)], BW),
            Decision::Continue
        );
        assert_eq!(
            decide(&p, &[pass(900_000), pass(400_000), pass(390_000)], BW),
            Decision::SwitchToPostCopy
        );
        assert_eq!(
            decide(&p, &vec![pass(400_000); 8], BW),
            Decision::SwitchToPostCopy
        );
        let by_passes = Policy {
            switch_rule: SwitchRule::Passes,
            ..policy(Mode::Hybrid, 3)
        };
        assert_eq!(
            decide(&by_passes, &[pass(900_000), pass(900_000)], BW),
            Decision::Continue
        );
        assert_eq!(
            decide(&by_passes, &[pass(900_000); 3], BW),
            Decision::SwitchToPostCopy
        );
    }

    #[test]
    fn downtime_estimate() {
        assert_eq!(estimated_downtime(0, BW), Duration::ZERO);
        let d = estimated_downtime(244_141, 1e9);
        assert!((d.as_secs_f64() - 1.0).abs() < 0.01);
    }
}
