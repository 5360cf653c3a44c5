//! The end-to-end tests on a real Kubernetes cluster (`e2e/cluster test`): Faultline installed
//! with helm, VM pods and migrations applied with kubectl, as a user does, and outcomes read
//! back from the API server and from the guests. It drives a running cluster and knows nothing
//! of how it was started (`e2e/cluster up` does that).
//!
//! The report also says where each scenario of the operator's mock-API-server tests
//! (operator/tests/reconcile.rs) runs: here too, or only there and why.

mod kube;
mod scenarios;
mod vm;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::report::{Status, TestResult};

pub struct Options {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub repo: PathBuf,
    /// Only these scenarios (all when empty); `helm-install` always runs first.
    pub only: Vec<String>,
}

/// Where a scenario of the mock-based reconcile tests also runs.
#[derive(Serialize, Debug, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub struct MockScenario {
    pub test: &'static str,
    /// The cluster scenarios that show the same behaviour, or empty.
    pub cluster: &'static [&'static str],
    /// Why it runs against the mock only.
    pub mock_only: &'static str,
}

/// Every test of operator/tests/reconcile.rs (a unit test keeps this list complete).
pub const MOCK_SCENARIOS: &[MockScenario] = &[
    MockScenario {
        test: "invalid_spec_fails_before_anything_is_created_and_deletion_releases_it",
        cluster: &["bad-specs-rejected"],
        mock_only: "",
    },
    MockScenario {
        test: "a_missing_source_pod_fails_the_migration",
        cluster: &["missing-source-pod"],
        mock_only: "",
    },
    MockScenario {
        test: "concurrency_limits_queue_migrations_in_pending",
        cluster: &["queued-by-node-limit"],
        mock_only: "",
    },
    MockScenario {
        test: "post_copy_migration_from_start_to_success",
        cluster: &["migrate-postcopy", "migrate-hybrid"],
        mock_only: "",
    },
    MockScenario {
        test: "an_unschedulable_target_fails_the_migration_after_the_bound",
        cluster: &["other-node-cordoned"],
        mock_only: "",
    },
    MockScenario {
        test: "a_target_that_never_becomes_ready_fails_after_the_bound",
        cluster: &[],
        mock_only: "needs a VMM that starts but never becomes ready in incoming mode only; faultline-vmm has no such fault",
    },
    MockScenario {
        test: "an_operator_restarted_at_every_step_carries_on",
        cluster: &["leader-killed"],
        mock_only: "a restart between every single API call, which only an in-process operator allows",
    },
    MockScenario {
        test: "pre_copy_migration_keeps_the_source_pod_when_asked",
        cluster: &["migrate-precopy", "keep-source-fenced"],
        mock_only: "",
    },
    MockScenario {
        test: "deleting_during_pre_copy_cancels_and_the_source_keeps_running",
        cluster: &["cancel-during-precopy"],
        mock_only: "",
    },
    MockScenario {
        test: "deleting_after_the_point_of_no_return_waits_for_completion",
        cluster: &[
            "delete-after-commit-waits",
            "foreground-delete-after-commit",
        ],
        mock_only: "",
    },
    MockScenario {
        test: "a_target_crash_before_commit_fails_the_migration_and_the_source_keeps_running",
        cluster: &["target-killed-before-commit"],
        mock_only: "",
    },
    MockScenario {
        test: "post_copy_without_a_mechanism_on_the_target_fails_before_anything_moves",
        cluster: &["postcopy-without-mechanism"],
        mock_only: "",
    },
    MockScenario {
        test: "a_concurrent_write_makes_the_reconciler_retry_instead_of_overwriting",
        cluster: &[],
        mock_only: "injects a write between the reconciler's read and its write, which needs the mock's request hook",
    },
    MockScenario {
        test: "progress_is_written_at_a_bounded_rate",
        cluster: &[],
        mock_only: "counts the operator's status writes, which only the mock logs",
    },
];

#[derive(Serialize, Debug)]
pub struct ClusterReport {
    pub kubeconfig: String,
    pub scenarios: Vec<TestResult>,
    pub mock_scenarios: Vec<MockScenario>,
}

pub fn run(opts: &Options) -> Result<ClusterReport> {
    let kube = kube::Kube::new(
        opts.kubectl.clone(),
        opts.helm.clone(),
        opts.kubeconfig.clone(),
    );
    let ctx = scenarios::Ctx {
        kube: &kube,
        repo: &opts.repo,
    };
    for name in &opts.only {
        anyhow::ensure!(
            scenarios::SCENARIOS.iter().any(|s| s.name == name),
            "no scenario {name:?}; `faultline-e2e cluster-test --list` names them"
        );
    }
    let mut results = Vec::new();
    for sc in scenarios::SCENARIOS {
        let wanted = opts.only.is_empty()
            || sc.name == "helm-install"
            || opts.only.iter().any(|o| o == sc.name);
        if !wanted {
            continue;
        }
        eprintln!("cluster-test: {} — {}", sc.name, sc.what);
        let t = Instant::now();
        let outcome = (sc.run)(&ctx);
        let seconds = t.elapsed().as_secs_f64();
        let (passed, detail) = match outcome {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        eprintln!(
            "cluster-test: {} {} in {seconds:.1} s: {detail}",
            sc.name,
            if passed { "passed" } else { "FAILED" }
        );
        results.push(TestResult {
            name: sc.name.into(),
            passed,
            status: if passed {
                Status::Passed
            } else {
                Status::Failed
            },
            detail,
            seconds,
        });
        // Without the operator nothing else can pass.
        if sc.name == "helm-install" && !passed {
            break;
        }
    }
    Ok(ClusterReport {
        kubeconfig: kube.kubeconfig().display().to_string(),
        scenarios: results,
        mock_scenarios: MOCK_SCENARIOS.to_vec(),
    })
}

pub fn list(out: &mut dyn Write) -> Result<()> {
    for s in scenarios::SCENARIOS {
        writeln!(out, "{:<28} {}", s.name, s.what)?;
    }
    Ok(())
}

pub fn print(report: &ClusterReport, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "Faultline on a real cluster ({})", report.kubeconfig)?;
    for t in &report.scenarios {
        let mark = if t.passed { "ok  " } else { "FAIL" };
        writeln!(
            out,
            "  {mark} {:<28} {:>6.1} s  {}",
            t.name, t.seconds, t.detail
        )?;
    }
    let passed = report.scenarios.iter().filter(|t| t.passed).count();
    writeln!(
        out,
        "  {passed} of {} scenarios passed",
        report.scenarios.len()
    )?;
    writeln!(
        out,
        "\nThe mock-API-server scenarios (operator/tests/reconcile.rs), and where they run:"
    )?;
    for m in &report.mock_scenarios {
        let ran: Vec<&str> = m
            .cluster
            .iter()
            .copied()
            .filter(|c| report.scenarios.iter().any(|t| t.name == *c))
            .collect();
        let place = if ran.is_empty() && m.cluster.is_empty() {
            format!("mock only: {}", m.mock_only)
        } else if ran.is_empty() {
            format!(
                "mock; on the cluster in {} (not run now)",
                m.cluster.join(", ")
            )
        } else if m.mock_only.is_empty() {
            format!("mock and cluster ({})", ran.join(", "))
        } else {
            format!(
                "mock and cluster ({}); mock only: {}",
                ran.join(", "),
                m.mock_only
            )
        };
        writeln!(out, "  {:<78} {place}", m.test)?;
    }
    Ok(())
}

pub fn any_failed(report: &ClusterReport) -> bool {
    report.scenarios.iter().any(|t| !t.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mock scenario table names exactly the tests in operator/tests/reconcile.rs, and
    /// every cluster scenario it names exists.
    #[test]
    fn mock_scenario_table_is_complete() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../operator/tests/reconcile.rs"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mut tests = Vec::new();
        let mut lines = text.lines().peekable();
        while let Some(l) = lines.next() {
            if l.trim() == "#[tokio::test]" || l.trim() == "#[test]" {
                let f = lines.next().unwrap_or_default().trim();
                let name = f
                    .trim_start_matches("async ")
                    .trim_start_matches("fn ")
                    .split('(')
                    .next()
                    .unwrap_or_default();
                tests.push(name.to_string());
            }
        }
        let mut listed: Vec<String> = MOCK_SCENARIOS.iter().map(|m| m.test.to_string()).collect();
        tests.sort();
        listed.sort();
        assert_eq!(tests, listed);
        for m in MOCK_SCENARIOS {
            assert!(
                !m.cluster.is_empty() || !m.mock_only.is_empty(),
                "{}: say where it runs",
                m.test
            );
            for c in m.cluster {
                assert!(
                    scenarios::SCENARIOS.iter().any(|s| s.name == *c),
                    "{}: no cluster scenario {c}",
                    m.test
                );
            }
        }
    }
}
