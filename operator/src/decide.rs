//! Pure decisions the reconciler makes from what it observed: the migration id, spec checks,
//! the trap mechanism for a target node, and how the two sidecars' reports combine into one
//! phase and one progress record.
//!
//! No I/O here: everything is a function of its arguments, so it is tested directly.

use faultline::sidecar_api::{self, MigrationStatus, NodeInfo};
use faultline::trap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{
    MigrationMode, MigrationPolicy, MigrationProgress, Phase, VirtualMachineMigration,
};

/// The id both sidecars know a migration by: `namespace/name/uid-prefix`, or
/// `namespace/uid` when that would exceed the sidecars' 128 characters.
pub fn migration_id(ns: &str, name: &str, uid: &str) -> String {
    let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    let id = format!("{ns}/{name}/{short}");
    if id.len() <= 128 {
        id
    } else {
        format!("{ns}/{uid}")
    }
}

/// Checks what the API server's schema may not have (objects written around it, or an older
/// CRD): the policy's ranges and combinations, and the migration id.
pub fn validate_spec(mig: &VirtualMachineMigration) -> Result<(), String> {
    mig.spec.policy.validate()?;
    let id = migration_id(
        &mig.namespace().unwrap_or_default(),
        &mig.name_any(),
        &mig.uid().unwrap_or_default(),
    );
    sidecar_api::validate_id(&id)?;
    if mig.spec.source.pod.is_empty() {
        return Err("spec.source.pod must name the VM pod".into());
    }
    Ok(())
}

/// The mode and trap mechanism a migration will use, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct MechanismChoice {
    pub mode: MigrationMode,
    /// `userfaultfd`, `kvm-userfault` or `none` (pre-copy only).
    pub mechanism: String,
    pub reason: String,
    /// The policy the sidecars get: the spec's, with the trap made explicit and the mode
    /// possibly reduced to pre-copy.
    pub policy: sidecar_api::Policy,
}

/// Picks the post-copy trap mechanism from what the target node offers for the VM's backing,
/// by the core library's one rule (`faultline::trap::choose`, which the target sidecar applies
/// too): `Auto`'s order per backing, and a `Hybrid` migration under `Auto` falls back to
/// pre-copy when nothing is offered; `PostCopy`, or an explicit mechanism that is missing, is an
/// error naming what the target's probes said.
pub fn choose_mechanism(
    policy: &MigrationPolicy,
    backing: faultline::BackingKind,
    memory_bytes: u64,
    target: &NodeInfo,
) -> Result<MechanismChoice, String> {
    let spec = policy.to_sidecar(memory_bytes);
    let choice = trap::choose(spec.trap, spec.mode, backing, &target.trap_backends)
        .map_err(|e| e.to_string())?;
    Ok(MechanismChoice {
        mode: choice.mode.into(),
        mechanism: choice
            .backend
            .map_or("none", trap::Backend::as_str)
            .to_string(),
        policy: spec.resolved(&choice),
        reason: choice.reason,
    })
}

/// A sidecar phase as an operator phase (terminal ones have no counterpart here).
pub fn map_phase(p: sidecar_api::Phase) -> Option<Phase> {
    use sidecar_api::Phase as S;
    match p {
        S::Waiting | S::Connecting => Some(Phase::Connecting),
        S::PreCopy => Some(Phase::PreCopy),
        S::SwitchOver => Some(Phase::SwitchOver),
        S::PostCopy => Some(Phase::PostCopy),
        S::Completed | S::Failed | S::Cancelled => None,
    }
}

/// What the sidecars' reports prove about phases the operator may not have seen between two
/// polls (a switch-over lasts only the downtime).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evidence {
    /// Pre-copy passes the source completed.
    pub precopy_rounds: u32,
    /// The source was fenced: a switch-over happened.
    pub committed: bool,
    /// The target ran before holding every page: post-copy happened. True for a `PostCopy`
    /// migration once committed; for `Hybrid` only when post-copy was seen or faults served.
    pub post_copy: bool,
}

impl Evidence {
    pub fn from_reports(
        mode: MigrationMode,
        src: Option<&MigrationStatus>,
        tgt: Option<&MigrationStatus>,
        committed: bool,
    ) -> Self {
        let seen_post = [src, tgt]
            .into_iter()
            .flatten()
            .any(|x| x.phase == sidecar_api::Phase::PostCopy);
        let faults = tgt.is_some_and(|t| t.progress.faults > 0);
        Self {
            precopy_rounds: src.map(|s| s.progress.precopy_rounds).unwrap_or_default(),
            committed,
            post_copy: committed
                && (mode == MigrationMode::PostCopy
                    || (mode == MigrationMode::Hybrid && (seen_post || faults))),
        }
    }
}

/// The phases a migration went through on its way from `from` to `to` (exclusive of `from`,
/// inclusive of `to`), filling in those the reports prove happened between two polls.
pub fn phases_between(from: Phase, to: Phase, ev: Evidence) -> Vec<Phase> {
    let mut out = Vec::new();
    for p in [Phase::PreCopy, Phase::SwitchOver, Phase::PostCopy] {
        let happened = match p {
            Phase::PreCopy => ev.precopy_rounds > 0,
            Phase::SwitchOver => ev.committed,
            _ => ev.post_copy,
        };
        if p > from && p < to && happened {
            out.push(p);
        }
    }
    if to > from {
        out.push(to);
    }
    out
}

/// Combines both sides' reports: what was sent comes from the source, what is held and the
/// faults from the target.
pub fn merge_progress(
    src: Option<&MigrationStatus>,
    tgt: Option<&MigrationStatus>,
    now: Timestamp,
) -> MigrationProgress {
    let sp = src.map(|s| &s.progress);
    let tp = tgt.map(|s| &s.progress);
    let either = |f: fn(&sidecar_api::Progress) -> u64| {
        sp.map(f)
            .filter(|v| *v > 0)
            .or(tp.map(f))
            .unwrap_or_default()
    };
    let total = tp
        .map(|p| p.total_pages)
        .filter(|t| *t > 0)
        .or(sp.map(|p| p.total_pages))
        .unwrap_or_default();
    let remaining = match (tp, sp) {
        (Some(t), _) if t.total_pages > 0 => t.remaining_pages,
        (_, Some(s)) => s.remaining_pages,
        _ => total,
    };
    let percent = (total.saturating_sub(remaining).saturating_mul(100))
        .checked_div(total)
        .unwrap_or(0)
        .min(100) as u32;
    let downtime_ms = tp
        .and_then(|p| p.downtime_ms)
        .or(sp.and_then(|p| p.downtime_ms));
    let lat = tp.map(|p| p.fault_latency_us).unwrap_or_default();
    MigrationProgress {
        percent,
        total_pages: total,
        transferred_pages: either(|p| p.transferred_pages),
        transferred_bytes: either(|p| p.transferred_bytes),
        zero_pages: either(|p| p.zero_pages),
        remaining_pages: remaining,
        precopy_rounds: sp.map(|p| p.precopy_rounds).unwrap_or_default(),
        dirty_rate_pages_per_sec: sp.map(|p| p.dirty_rate_pages_per_sec).unwrap_or_default(),
        bandwidth_bytes_per_sec: sp
            .map(|p| p.bandwidth_bytes_per_sec)
            .filter(|b| *b > 0.0)
            .or(tp.map(|p| p.bandwidth_bytes_per_sec))
            .unwrap_or_default(),
        faults: tp.map(|p| p.faults).unwrap_or_default(),
        fault_latency_p50_us: lat.p50,
        fault_latency_p99_us: lat.p99,
        fault_latency_max_us: lat.max,
        downtime_ms,
        downtime: downtime_ms.map(|d| format!("{d:.1}ms")),
        updated: Some(Time(now)),
    }
}

pub fn strip_time(p: &MigrationProgress) -> MigrationProgress {
    MigrationProgress {
        updated: None,
        ..p.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::BackingKind;
    use faultline::trap::{Backend as TrapBackend, BackendProbe, Preference};
    use serde_json::json;

    fn node(backends: &[(BackingKind, TrapBackend, bool)]) -> NodeInfo {
        NodeInfo {
            sidecar_version: "0.1.0".into(),
            migration_port: 9181,
            vm: None,
            trap_backends: backends
                .iter()
                .map(|(backing, backend, available)| BackendProbe {
                    backing: *backing,
                    backend: *backend,
                    available: *available,
                    reason: format!("probe of {backend} on {backing}: {available}"),
                })
                .collect(),
        }
    }

    fn policy(v: serde_json::Value) -> MigrationPolicy {
        serde_json::from_value(v).expect("policy")
    }

    #[test]
    fn auto_prefers_userfaultfd_and_takes_kvm_userfault_for_guest_memfd() {
        use BackingKind::*;
        use TrapBackend::*;
        let n = node(&[
            (Memfd, Userfaultfd, true),
            (Memfd, KvmUserfault, true),
            (GuestMemfd, Userfaultfd, false),
            (GuestMemfd, KvmUserfault, true),
        ]);
        let c = choose_mechanism(&policy(json!({})), Memfd, 1 << 30, &n).expect("memfd");
        assert_eq!(
            (c.mode, c.mechanism.as_str()),
            (MigrationMode::Hybrid, "userfaultfd")
        );
        assert_eq!(c.policy.trap, Preference::Only(TrapBackend::Userfaultfd));
        let c = choose_mechanism(&policy(json!({})), GuestMemfd, 1 << 30, &n).expect("guest-memfd");
        assert_eq!(c.mechanism, "kvm-userfault");
        assert_eq!(c.policy.trap, Preference::Only(TrapBackend::KvmUserfault));
        let c = choose_mechanism(&policy(json!({"trap": "KvmUserfault"})), Memfd, 1 << 30, &n)
            .expect("explicit");
        assert_eq!(c.mechanism, "kvm-userfault");
    }

    #[test]
    fn hybrid_falls_back_to_pre_copy_but_post_copy_and_explicit_choices_fail() {
        use BackingKind::*;
        use TrapBackend::*;
        // The development machines: guest_memfd has no post-copy mechanism.
        let n = node(&[
            (GuestMemfd, Userfaultfd, false),
            (GuestMemfd, KvmUserfault, false),
            (Memfd, Userfaultfd, true),
        ]);
        let c = choose_mechanism(
            &policy(json!({"precopyPasses": 0})),
            GuestMemfd,
            1 << 30,
            &n,
        )
        .expect("hybrid falls back");
        assert_eq!(
            (c.mode, c.mechanism.as_str()),
            (MigrationMode::PreCopy, "none")
        );
        assert_eq!(c.policy.mode, sidecar_api::Mode::PreCopy);
        assert!(
            c.policy.validate().is_ok(),
            "the fallback policy must be valid"
        );
        assert!(
            c.reason.contains("probe of kvm-userfault on guest-memfd"),
            "{}",
            c.reason
        );

        let e = choose_mechanism(
            &policy(json!({"mode": "PostCopy"})),
            GuestMemfd,
            1 << 30,
            &n,
        )
        .expect_err("post-copy needs a mechanism");
        assert!(
            e.contains("post-copy is impossible") && e.contains("guest-memfd"),
            "{e}"
        );
        let e = choose_mechanism(&policy(json!({"trap": "KvmUserfault"})), Memfd, 1 << 30, &n)
            .expect_err("explicit kvm-userfault is missing");
        assert!(e.contains("kvm-userfault"), "{e}");
        let e = choose_mechanism(&policy(json!({"mode": "PostCopy"})), Anon, 1 << 30, &n)
            .expect_err("nothing offered for anon");
        assert!(e.contains("offers no trap backend for anon"), "{e}");
        // Pre-copy needs nothing.
        let c = choose_mechanism(&policy(json!({"mode": "PreCopy"})), GuestMemfd, 1 << 30, &n)
            .expect("pre-copy");
        assert_eq!(c.mechanism, "none");
    }

    #[test]
    fn ids_fit_the_sidecar_limit() {
        let uid = "0d9c5b4e-1111-2222-3333-444455556666";
        let id = migration_id("vms", "web", uid);
        assert_eq!(id, "vms/web/0d9c5b4e1111");
        assert!(sidecar_api::validate_id(&id).is_ok());
        let long = migration_id(&"n".repeat(63), &"m".repeat(253), uid);
        assert!(
            long.len() <= 128 && sidecar_api::validate_id(&long).is_ok(),
            "{long}"
        );
    }

    fn status(role: &str, phase: &str, progress: serde_json::Value) -> MigrationStatus {
        serde_json::from_value(json!({
            "id": "a/b/c", "role": role, "phase": phase, "mode": "hybrid", "committed": false,
            "progress": progress, "elapsedS": 1.0, "message": "m"
        }))
        .expect("status")
    }

    #[test]
    fn progress_takes_sent_from_the_source_and_held_from_the_target() {
        let src = status(
            "source",
            "post-copy",
            json!({"totalPages": 1000, "transferredPages": 900,
            "transferredBytes": 3_600_000, "remainingPages": 150, "precopyRounds": 3,
            "dirtyRatePagesPerSec": 12.5, "bandwidthBytesPerSec": 1e9}),
        );
        let tgt = status(
            "target",
            "post-copy",
            json!({"totalPages": 1000, "transferredPages": 880,
            "remainingPages": 120, "faults": 17,
            "faultLatencyUs": {"p50": 70, "p99": 190, "max": 400}, "downtimeMs": 4.25}),
        );
        let p = merge_progress(Some(&src), Some(&tgt), Timestamp::UNIX_EPOCH);
        assert_eq!(p.percent, 88);
        assert_eq!(p.remaining_pages, 120);
        assert_eq!(p.transferred_pages, 900);
        assert_eq!(p.transferred_bytes, 3_600_000);
        assert_eq!(
            (p.faults, p.fault_latency_p50_us, p.fault_latency_p99_us),
            (17, 70, 190)
        );
        assert_eq!(p.downtime.as_deref(), Some("4.2ms"));
        assert_eq!(p.precopy_rounds, 3);
        // Without the target, the source's view of what remains.
        let p = merge_progress(Some(&src), None, Timestamp::UNIX_EPOCH);
        assert_eq!((p.percent, p.remaining_pages), (85, 150));
        // Nothing known yet.
        assert_eq!(merge_progress(None, None, Timestamp::UNIX_EPOCH).percent, 0);
    }

    #[test]
    fn phases_seen_between_polls_are_filled_in_from_evidence() {
        use Phase::*;
        let all = Evidence {
            precopy_rounds: 2,
            committed: true,
            post_copy: true,
        };
        assert_eq!(
            phases_between(Connecting, Succeeded, all),
            [PreCopy, SwitchOver, PostCopy, Succeeded]
        );
        assert_eq!(
            phases_between(PreCopy, PostCopy, all),
            [SwitchOver, PostCopy]
        );
        // Post-copy with no pre-copy pass; pre-copy mode never posts.
        let pc0 = Evidence {
            precopy_rounds: 0,
            committed: true,
            post_copy: true,
        };
        assert_eq!(
            phases_between(Connecting, PostCopy, pc0),
            [SwitchOver, PostCopy]
        );
        let pre = Evidence {
            precopy_rounds: 3,
            committed: true,
            post_copy: false,
        };
        assert_eq!(
            phases_between(Connecting, Succeeded, pre),
            [PreCopy, SwitchOver, Succeeded]
        );
        // Nothing proven: only the phase seen. Never backwards.
        assert_eq!(
            phases_between(Connecting, PreCopy, Evidence::default()),
            [PreCopy]
        );
        assert_eq!(phases_between(PostCopy, PreCopy, all), Vec::<Phase>::new());
        assert_eq!(phases_between(PreCopy, PreCopy, all), Vec::<Phase>::new());
    }

    #[test]
    fn evidence_of_post_copy_depends_on_the_mode() {
        let src = status("source", "completed", json!({"precopyRounds": 2}));
        let tgt = status("target", "completed", json!({"faults": 0}));
        let e = Evidence::from_reports(MigrationMode::PostCopy, Some(&src), Some(&tgt), true);
        assert_eq!(
            e,
            Evidence {
                precopy_rounds: 2,
                committed: true,
                post_copy: true
            }
        );
        let e = Evidence::from_reports(MigrationMode::Hybrid, Some(&src), Some(&tgt), true);
        assert!(
            !e.post_copy,
            "a hybrid migration may have ended with stop-and-copy"
        );
        let tgt = status("target", "completed", json!({"faults": 5}));
        assert!(
            Evidence::from_reports(MigrationMode::Hybrid, Some(&src), Some(&tgt), true).post_copy
        );
        assert!(
            !Evidence::from_reports(MigrationMode::PostCopy, Some(&src), None, false).post_copy
        );
    }

    #[test]
    fn sidecar_phases_map_in_order() {
        use sidecar_api::Phase as S;
        let order: Vec<_> = [
            S::Waiting,
            S::Connecting,
            S::PreCopy,
            S::SwitchOver,
            S::PostCopy,
        ]
        .into_iter()
        .map(|p| map_phase(p).expect("non-terminal"))
        .collect();
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
        assert_eq!(order.last(), Some(&Phase::PostCopy));
        for t in [S::Completed, S::Failed, S::Cancelled] {
            assert_eq!(map_phase(t), None);
        }
    }
}
