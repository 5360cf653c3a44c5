//! The migration policy: how memory moves (mode, pre-copy passes, switch rule, downtime budget,
//! bandwidth cap, completion timeout, trap preference) and the checks every policy must pass.
//!
//! Plain data shared by the sidecar HTTP API (`StartMigration.policy`), the wire protocol's
//! `start` message, the convergence rule and the operator, so none of them depends on another's
//! types. Owns the defaults and the limits; it decides nothing about a running migration
//! (`crate::convergence` and `crate::trap::choose` do).

use serde::{Deserialize, Serialize};

use crate::trap::Preference;

/// How memory moves.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Iterate until the rest fits the downtime budget, then stop and copy. Fails if it does
    /// not converge within the pass limit.
    PreCopy,
    /// Switch to post-copy after `precopy_passes` passes (0: at once).
    PostCopy,
    /// Pre-copy while it converges, post-copy when it stops converging.
    #[default]
    Hybrid,
}

/// When a hybrid migration leaves pre-copy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchRule {
    /// When the dirty set stops shrinking (see `convergence_ratio`) or fits the downtime
    /// budget, or after `precopy_passes`, whichever comes first.
    #[default]
    Auto,
    /// After exactly `precopy_passes` passes.
    Passes,
}

/// How the migration stream is protected between the two sidecars.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// TLS 1.3, both sides authenticated by keys derived from the migration's secret
    /// (`crate::tls::pinned`).
    #[default]
    Tls,
    /// Guest memory in the clear (the handshake still proves the secret). Only for a network
    /// the user trusts, and only when a policy asks for it.
    Plaintext,
}

impl Transport {
    /// How status and reports name it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Tls => "TLS 1.3",
            Self::Plaintext => "plaintext",
        }
    }
}

/// The migration policy. Every field has a default, so `{}` is a valid policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    pub mode: Mode,
    /// Most pre-copy passes (the first pass sends every page; later ones the dirtied pages).
    pub precopy_passes: u32,
    pub switch_rule: SwitchRule,
    /// Hybrid/auto: a pass whose dirty set is more than this fraction of the previous pass's
    /// is "not converging" (0 < r <= 1).
    pub convergence_ratio: f64,
    /// The pause the workload may see at switch-over, in milliseconds.
    pub max_downtime_ms: u64,
    /// Cap on pre-copy and background-push bandwidth in bytes per second (0: none). Fault
    /// replies are never limited.
    pub bandwidth_limit: u64,
    /// The migration fails (before the commit point: the source keeps running) if not done
    /// in this many seconds.
    pub completion_timeout_s: u64,
    /// Which trap mechanism the target uses for post-copy (see [`crate::trap::choose`]).
    pub trap: Preference,
    /// How guest memory crosses the network.
    pub transport: Transport,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: Mode::Hybrid,
            precopy_passes: 8,
            switch_rule: SwitchRule::Auto,
            convergence_ratio: 0.7,
            max_downtime_ms: 300,
            bandwidth_limit: 0,
            completion_timeout_s: 600,
            trap: Preference::Auto,
            transport: Transport::Tls,
        }
    }
}

/// Largest accepted values, shared with the CRD's validation.
pub const MAX_PRECOPY_PASSES: u32 = 1000;
pub const MAX_DOWNTIME_MS: u64 = 600_000;
pub const MAX_COMPLETION_TIMEOUT_S: u64 = 7 * 24 * 3600;

impl Policy {
    /// This policy as the sidecars should run it once [`crate::trap::choose`] has decided: the
    /// mode in effect, the chosen backend made explicit (so both sidecars use exactly what was
    /// chosen), and at least the default pre-copy passes when the migration fell back to
    /// pre-copy (which needs one).
    pub fn resolved(&self, choice: &crate::trap::Choice) -> Self {
        let mut p = self.clone();
        p.mode = choice.mode;
        if let Some(backend) = choice.backend {
            p.trap = Preference::Only(backend);
        }
        if p.mode == Mode::PreCopy && p.precopy_passes == 0 {
            p.precopy_passes = Self::default().precopy_passes;
        }
        p
    }

    /// Checks ranges and combinations; the message says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.precopy_passes > MAX_PRECOPY_PASSES {
            return Err(format!(
                "precopyPasses must be at most {MAX_PRECOPY_PASSES}"
            ));
        }
        if self.mode == Mode::PreCopy && self.precopy_passes == 0 {
            return Err("pre-copy mode needs at least one pre-copy pass".into());
        }
        if !(self.convergence_ratio > 0.0 && self.convergence_ratio <= 1.0) {
            return Err("convergenceRatio must be in (0, 1]".into());
        }
        if self.max_downtime_ms == 0 || self.max_downtime_ms > MAX_DOWNTIME_MS {
            return Err(format!("maxDowntimeMs must be in 1..={MAX_DOWNTIME_MS}"));
        }
        if self.completion_timeout_s == 0 || self.completion_timeout_s > MAX_COMPLETION_TIMEOUT_S {
            return Err(format!(
                "completionTimeoutS must be in 1..={MAX_COMPLETION_TIMEOUT_S}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_policy_is_the_default() {
        let p: Policy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, Policy::default());
        assert!(p.validate().is_ok());
        let p: Policy =
            serde_json::from_str(r#"{"mode":"post-copy","precopyPasses":0,"trap":"userfaultfd"}"#)
                .unwrap();
        assert_eq!(p.mode, Mode::PostCopy);
        assert!(p.validate().is_ok());
        assert!(serde_json::from_str::<Policy>(r#"{"modes":"x"}"#).is_err());
    }

    #[test]
    fn policy_validation() {
        let bad = [
            Policy {
                mode: Mode::PreCopy,
                precopy_passes: 0,
                ..Default::default()
            },
            Policy {
                convergence_ratio: 0.0,
                ..Default::default()
            },
            Policy {
                max_downtime_ms: 0,
                ..Default::default()
            },
            Policy {
                completion_timeout_s: 0,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
    }

    #[test]
    fn trap_preference_keeps_its_api_names() {
        let p: Policy = serde_json::from_str(r#"{"trap":"kvm-userfault"}"#).unwrap();
        assert_eq!(p.trap, Preference::Only(crate::trap::Backend::KvmUserfault));
        assert_eq!(
            serde_json::to_value(Policy::default()).unwrap()["trap"],
            "auto"
        );
        assert!(serde_json::from_str::<Policy>(r#"{"trap":"ebpf"}"#).is_err());
    }
}
