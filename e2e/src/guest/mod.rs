//! The guest side of the boot matrix: runs inside the kernel under test (as a child of the
//! initramfs's init) and reports, one JSON line each, the kernel release, the trap-backend
//! probe, a few facts, and the result of every test in the plan.
//!
//! Owns the catalogue of guest tests and how a test's outcome becomes a result line.

pub mod demand_paging;
mod facts;
mod stats;
mod testvm;
mod userfault;
mod vmm;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use faultline::layout::BackingKind;

use crate::report::{ExecTest, GuestLine, Plan, Status, TestResult};

/// What a test that did not fail found.
pub enum Outcome {
    Passed(String),
    /// The kernel lacks something the test needs (found by trying): not a failure.
    Unavailable(String),
}

/// Every guest test by name. The KVM Userfault tests (`uf-*`) need Faultline's patched kernel.
pub const TESTS: &[&str] = &[
    "kvm-userfault-capability",
    "uf-first-access-guest-memfd",
    "uf-first-access-anon",
    "uf-write-access-guest-memfd",
    "uf-write-access-anon",
    "uf-unmarked-never-exit-guest-memfd",
    "uf-multi-vcpu-guest-memfd",
    "uf-multi-vcpu-anon",
    "uf-toggle-live-guest-memfd",
    "uf-toggle-live-anon",
    "uf-bad-bitmap-guest-memfd",
    "uf-bad-bitmap-anon",
    "uf-unreadable-bitmap-guest-memfd",
    "uf-4k-only-anon",
    "uf-dirty-log-then-disarm-anon",
    "uf-kvm-internal-access-guest-memfd",
    "uf-pre-fault-marked-guest-memfd",
    "uf-pre-fault-marked-anon",
    "uf-rebind-under-faults-guest-memfd",
    "vmm-memtouch-anon",
    "vmm-memtouch-memfd",
    "vmm-memtouch-guest-memfd",
    "vmm-handover-memfd",
    "vmm-handover-guest-memfd",
    "vmm-userfault-disarm-guest-memfd",
    "bench-demand-paging",
];

/// The tests of Faultline's KVM Userfault patch.
pub fn userfault_tests() -> impl Iterator<Item = &'static str> {
    TESTS.iter().copied().filter(|t| t.starts_with("uf-"))
}

/// The benchmarks (`bench-*`): they pass when every mechanism the kernel has ran correctly,
/// and their detail carries the figures.
pub fn bench_tests() -> impl Iterator<Item = &'static str> {
    TESTS.iter().copied().filter(|t| t.starts_with("bench-"))
}

/// The reference VMM's KVM tests.
pub fn vmm_tests() -> impl Iterator<Item = &'static str> {
    TESTS.iter().copied().filter(|t| t.starts_with("vmm-"))
}

fn run_test(name: &str, plan: &Plan) -> Result<Outcome> {
    use BackingKind::{Anon, GuestMemfd, Memfd};
    let vmm = Path::new(&plan.vmm);
    match name {
        "kvm-userfault-capability" => userfault::capability(plan.expect_userfault),
        "uf-first-access-guest-memfd" => userfault::first_access(GuestMemfd),
        "uf-first-access-anon" => userfault::first_access(Anon),
        "uf-write-access-guest-memfd" => userfault::write_access(GuestMemfd),
        "uf-write-access-anon" => userfault::write_access(Anon),
        "uf-unmarked-never-exit-guest-memfd" => userfault::unmarked_never_exit(GuestMemfd),
        "uf-multi-vcpu-guest-memfd" => userfault::multi_vcpu(GuestMemfd),
        "uf-multi-vcpu-anon" => userfault::multi_vcpu(Anon),
        "uf-toggle-live-guest-memfd" => userfault::toggle(GuestMemfd),
        "uf-toggle-live-anon" => userfault::toggle(Anon),
        "uf-bad-bitmap-guest-memfd" => userfault::bad_bitmap(GuestMemfd),
        "uf-bad-bitmap-anon" => userfault::bad_bitmap(Anon),
        "uf-unreadable-bitmap-guest-memfd" => userfault::unreadable_bitmap(GuestMemfd),
        "uf-4k-only-anon" => userfault::only_4k_mappings(),
        "uf-dirty-log-then-disarm-anon" => userfault::dirty_log_then_disarm(),
        "uf-kvm-internal-access-guest-memfd" => userfault::kvm_internal_access(),
        "uf-pre-fault-marked-guest-memfd" => userfault::pre_fault_marked(GuestMemfd),
        "uf-pre-fault-marked-anon" => userfault::pre_fault_marked(Anon),
        "uf-rebind-under-faults-guest-memfd" => userfault::rebind_under_faults(),
        "vmm-memtouch-anon" => vmm::memtouch(vmm, Anon),
        "vmm-memtouch-memfd" => vmm::memtouch(vmm, Memfd),
        "vmm-memtouch-guest-memfd" => vmm::memtouch(vmm, GuestMemfd),
        "vmm-handover-memfd" => vmm::handover(vmm, Memfd),
        "vmm-handover-guest-memfd" => vmm::handover(vmm, GuestMemfd),
        "vmm-userfault-disarm-guest-memfd" => vmm::userfault_disarm_while_waiting(vmm, GuestMemfd),
        // Small: the nested guest runs under QEMU's emulator (the host runs it bigger).
        "bench-demand-paging" => demand_paging::matrix_test(2, 256),
        other => anyhow::bail!("no guest test named {other}"),
    }
}

fn run_exec(t: &ExecTest) -> Result<Outcome> {
    let (prog, args) = t
        .argv
        .split_first()
        .with_context(|| format!("exec test {} has an empty command", t.name))?;
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog}"))?;
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    };
    // 77 is "this kernel cannot do it" (the automake convention `faultline demo` follows).
    if out.status.code() == Some(77) {
        return Ok(Outcome::Unavailable(tail(&out.stderr)));
    }
    anyhow::ensure!(
        out.status.success(),
        "{} exited with {}: {}",
        t.argv.join(" "),
        out.status,
        tail(&out.stderr)
    );
    Ok(Outcome::Passed(tail(&out.stdout)))
}

/// Runs `f` as one test, turning errors and panics into a failed result.
fn timed(name: &str, f: impl FnOnce() -> Result<Outcome>) -> TestResult {
    let start = Instant::now();
    tracing::info!(test = name, "running");
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the test panicked")));
    let (status, detail) = match outcome {
        Ok(Outcome::Passed(d)) => (Status::Passed, d),
        Ok(Outcome::Unavailable(d)) => (Status::Unavailable, d),
        Err(e) => (Status::Failed, format!("{e:#}")),
    };
    tracing::info!(test = name, ?status, detail, "done");
    TestResult {
        name: name.to_string(),
        passed: status == Status::Passed,
        status,
        detail,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn emit(out: &mut dyn Write, line: &GuestLine) -> Result<()> {
    let json = serde_json::to_string(line).context("encoding a result line")?;
    writeln!(out, "{json}").context("writing a result line")?;
    out.flush().context("flushing the result port")
}

/// Runs the plan, writing result lines to `out`. Returns whether no test failed.
pub fn run(plan: &Plan, out: &mut dyn Write) -> Result<bool> {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    emit(out, &GuestLine::Start { release })?;
    emit(
        out,
        &GuestLine::Probe {
            backends: faultline::probe::probe_trap_backends(),
        },
    )?;
    for fact in facts::facts() {
        emit(out, &GuestLine::Fact(fact))?;
    }
    let mut ok = true;
    for name in &plan.tests {
        let r = timed(name, || run_test(name, plan));
        ok &= r.status != Status::Failed;
        emit(out, &GuestLine::Test(r))?;
    }
    for t in &plan.exec {
        let r = timed(&t.name, || run_exec(t));
        ok &= r.status != Status::Failed;
        emit(out, &GuestLine::Test(r))?;
    }
    emit(out, &GuestLine::Done)?;
    Ok(ok)
}
