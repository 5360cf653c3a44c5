//! The kernel boot matrix: for each kernel, decide the plan, assemble the initramfs, boot it,
//! judge what came back (adding the host-side checks), and print a table or one JSON object.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use faultline::layout::BackingKind;
use faultline::trap::Backend as TrapBackend;

use super::initramfs::Initramfs;
use super::kernels::{self, KernelList, KernelSpec};
use super::qemu::{self, QemuOptions};
use crate::guest;
use crate::report::{ExecTest, GuestLine, KernelReport, MatrixReport, Plan, Status, TestResult};

pub struct MatrixOptions {
    pub repo: PathBuf,
    pub cache: PathBuf,
    pub kernels_file: PathBuf,
    pub only_kernels: Vec<String>,
    pub only_tests: Vec<String>,
    pub extra_bins: Vec<PathBuf>,
    pub exec_tests: Vec<ExecTest>,
    pub vmm: PathBuf,
    pub e2e: PathBuf,
    pub qemu: QemuOptions,
}

/// Lines of a console log that mean the kernel complained.
const KERNEL_TROUBLE: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "Call Trace:",
    "general protection fault",
    "Kernel panic",
    "UBSAN:",
    "KASAN:",
];

/// Each kernel's plan: the capability check, the KVM Userfault tests on kernels that carry it,
/// the VMM's tests and the benchmarks everywhere. The migration demo joins through
/// `--extra-bin` and `--exec-test` (as `e2e/kernel-matrix` does) and runs after them.
fn planned_tests(spec: &KernelSpec, only: &[String]) -> Vec<String> {
    if !only.is_empty() {
        return only.to_vec();
    }
    let mut tests = vec!["kvm-userfault-capability".to_string()];
    if spec.userfault {
        tests.extend(guest::userfault_tests().map(String::from));
    }
    tests.extend(guest::vmm_tests().map(String::from));
    tests.extend(guest::bench_tests().map(String::from));
    tests
}

fn failed(name: &str, detail: String) -> TestResult {
    TestResult {
        name: name.into(),
        passed: false,
        status: Status::Failed,
        detail,
        seconds: 0.0,
    }
}

fn host_result(name: &str, ok: bool, detail: String) -> TestResult {
    let status = if ok { Status::Passed } else { Status::Failed };
    TestResult {
        name: name.into(),
        passed: ok,
        status,
        detail,
        seconds: 0.0,
    }
}

fn build_initramfs(
    opts: &MatrixOptions,
    plan: &Plan,
    modules: &[(String, Vec<u8>)],
    dir: &Path,
) -> Result<PathBuf> {
    let mut ird = Initramfs::new();
    let busybox = Path::new("/bin/busybox");
    let data =
        std::fs::read(busybox).context("reading /bin/busybox (apt-get install busybox-static)")?;
    let ldd = std::process::Command::new("ldd")
        .arg(busybox)
        .output()
        .context("running ldd")?;
    if !String::from_utf8_lossy(&ldd.stdout).contains("not a dynamic executable")
        && !String::from_utf8_lossy(&ldd.stderr).contains("not a dynamic executable")
    {
        bail!("/bin/busybox is dynamically linked: install busybox-static");
    }
    ird.file("bin/busybox", 0o755, data);
    ird.modules(modules);
    let strip_dir = opts.cache.join("stripped");
    ird.binary(&opts.e2e, &strip_dir)?;
    ird.binary(&opts.vmm, &strip_dir)?;
    for b in &opts.extra_bins {
        ird.binary(b, &strip_dir)?;
    }
    let plan_json = serde_json::to_vec_pretty(plan).context("encoding the plan")?;
    ird.file("faultline/plan.json", 0o644, plan_json);
    let out = dir.join("initramfs.cpio");
    ird.write(&out)?;
    Ok(out)
}

fn run_kernel(opts: &MatrixOptions, spec: &KernelSpec) -> KernelReport {
    let mut report = KernelReport {
        name: spec.name.clone(),
        release: String::new(),
        source: String::new(),
        booted: false,
        boot_seconds: None,
        backends: Vec::new(),
        facts: Vec::new(),
        tests: Vec::new(),
        console_log: String::new(),
    };
    let started = Instant::now();
    eprintln!("kernel-matrix: {}: preparing", spec.name);
    let prepared = match kernels::prepare(spec, &opts.repo, &opts.cache.join("kernel")) {
        Ok(p) => p,
        Err(e) => {
            report
                .tests
                .push(failed("kernel-available", format!("{e:#}")));
            return report;
        }
    };
    report.release = prepared.release.clone();
    report.source = prepared.source.clone();
    let plan = Plan {
        expect_userfault: spec.userfault,
        vmm: "/bin/faultline-vmm".into(),
        tests: planned_tests(spec, &opts.only_tests),
        exec: opts.exec_tests.clone(),
    };
    let dir = opts.cache.join("kernel/runs").join(&spec.name);
    let boot = std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))
        .and_then(|_| build_initramfs(opts, &plan, &prepared.modules, &dir))
        .and_then(|initramfs| {
            eprintln!(
                "kernel-matrix: {}: booting {} ({} modules, {} tests; prepared in {:.0} s)",
                spec.name,
                prepared.release,
                prepared.modules.len(),
                plan.tests.len() + plan.exec.len(),
                started.elapsed().as_secs_f64()
            );
            qemu::boot(&prepared.image, &initramfs, &dir, &opts.qemu)
        });
    let boot = match boot {
        Ok(b) => b,
        Err(e) => {
            report.tests.push(failed("boot", format!("{e:#}")));
            return report;
        }
    };
    report.console_log = boot.console_log.display().to_string();
    report.boot_seconds = Some(boot.seconds);
    let mut done = false;
    for line in boot.lines {
        match line {
            GuestLine::Start { release } => {
                report.booted = true;
                report.release = release;
            }
            GuestLine::Probe { backends } => report.backends = backends,
            GuestLine::Fact(f) => report.facts.push(f),
            GuestLine::Test(t) => report.tests.push(t),
            GuestLine::Done => done = true,
        }
    }
    let expected: Vec<&String> = plan
        .tests
        .iter()
        .chain(plan.exec.iter().map(|e| &e.name))
        .collect();
    for name in expected {
        if !report.tests.iter().any(|t| &t.name == name) {
            report.tests.push(failed(
                name,
                "no result: the guest stopped before reporting it (see the console log)".into(),
            ));
        }
    }
    let how = if boot.timed_out {
        format!("killed after {:.0} s", boot.seconds)
    } else {
        format!(
            "QEMU exited with {:?} after {:.1} s",
            boot.exit, boot.seconds
        )
    };
    let mut completed = format!("{how}; {} result lines", report.tests.len());
    if !boot.garbled.is_empty() {
        completed.push_str(&format!(
            "; {} garbled lines: {:?}",
            boot.garbled.len(),
            boot.garbled
        ));
    }
    report.tests.push(host_result(
        "guest-completed",
        done && !boot.timed_out && boot.garbled.is_empty(),
        completed,
    ));
    report.tests.push(probe_matches(spec, &report));
    let trouble: Vec<&str> = boot
        .console
        .lines()
        .filter(|l| KERNEL_TROUBLE.iter().any(|t| l.contains(t)))
        .take(5)
        .collect();
    report.tests.push(host_result(
        "kernel-log-clean",
        trouble.is_empty() && report.booted,
        if trouble.is_empty() {
            format!("no warnings, oopses or panics in {}", report.console_log)
        } else {
            trouble.join(" | ")
        },
    ));
    report
}

/// kvm-userfault must be available on every backing on our patched kernel and on none of them
/// elsewhere, and the probe must have covered every backing with both backends.
fn probe_matches(spec: &KernelSpec, report: &KernelReport) -> TestResult {
    let mut problems = Vec::new();
    for backing in BackingKind::ALL {
        for backend in [TrapBackend::KvmUserfault, TrapBackend::Userfaultfd] {
            match report
                .backends
                .iter()
                .find(|p| p.backing == backing && p.backend == backend)
            {
                None => problems.push(format!("no probe of {backend} on {backing}")),
                Some(p)
                    if backend == TrapBackend::KvmUserfault && p.available != spec.userfault =>
                {
                    problems.push(format!(
                        "{backend} on {backing}: available = {} ({})",
                        p.available, p.reason
                    ))
                }
                Some(_) => {}
            }
        }
    }
    host_result(
        "probe-matches-kernel",
        problems.is_empty(),
        if problems.is_empty() {
            format!(
                "kvm-userfault {} on anon, memfd and guest-memfd, as expected of this kernel",
                if spec.userfault {
                    "available"
                } else {
                    "unavailable"
                }
            )
        } else {
            problems.join("; ")
        },
    )
}

pub fn run(opts: &MatrixOptions) -> Result<MatrixReport> {
    let list = KernelList::load(&opts.kernels_file)?;
    for k in &opts.only_kernels {
        if !list.kernels.iter().any(|s| &s.name == k) {
            bail!("no kernel named {k} in {}", opts.kernels_file.display());
        }
    }
    for t in &opts.only_tests {
        if !guest::TESTS.contains(&t.as_str()) {
            bail!("no guest test named {t} (see `faultline-e2e list`)");
        }
    }
    let mut kernels = Vec::new();
    for spec in &list.kernels {
        if !opts.only_kernels.is_empty() && !opts.only_kernels.contains(&spec.name) {
            continue;
        }
        let start = Instant::now();
        let r = run_kernel(opts, spec);
        let bad = r
            .tests
            .iter()
            .filter(|t| t.status == Status::Failed)
            .count();
        eprintln!(
            "kernel-matrix: {}: {} tests, {bad} failed, {:.0} s",
            spec.name,
            r.tests.len(),
            start.elapsed().as_secs_f64()
        );
        kernels.push(r);
    }
    Ok(MatrixReport { kernels })
}

/// Whether any test failed anywhere.
pub fn any_failed(report: &MatrixReport) -> bool {
    report
        .kernels
        .iter()
        .any(|k| k.tests.iter().any(|t| t.status == Status::Failed))
}

fn yes_no(available: Option<bool>) -> &'static str {
    match available {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

pub fn print_table(report: &MatrixReport, out: &mut dyn Write) -> Result<()> {
    writeln!(
        out,
        "{:<16} {:<28} {:<12} {:<14} {:<12}",
        "KERNEL", "RELEASE", "BACKING", "KVM-USERFAULT", "USERFAULTFD"
    )?;
    for k in &report.kernels {
        for (i, backing) in BackingKind::ALL.iter().enumerate() {
            let find = |b: TrapBackend| {
                k.backends
                    .iter()
                    .find(|p| p.backing == *backing && p.backend == b)
                    .map(|p| p.available)
            };
            let (name, rel) = if i == 0 {
                (k.name.as_str(), k.release.as_str())
            } else {
                ("", "")
            };
            writeln!(
                out,
                "{name:<16} {rel:<28} {:<12} {:<14} {:<12}",
                backing.as_str(),
                yes_no(find(TrapBackend::KvmUserfault)),
                yes_no(find(TrapBackend::Userfaultfd))
            )?;
        }
        let count = |s: Status| k.tests.iter().filter(|t| t.status == s).count();
        writeln!(
            out,
            "  tests: {} passed, {} failed, {} unavailable; boot+tests {:.0} s; source {}",
            count(Status::Passed),
            count(Status::Failed),
            count(Status::Unavailable),
            k.boot_seconds.unwrap_or(0.0),
            k.source
        )?;
        for t in &k.tests {
            let mark = match t.status {
                Status::Passed => "ok  ",
                Status::Failed => "FAIL",
                Status::Unavailable => "n/a ",
            };
            writeln!(
                out,
                "    {mark} {:<36} {:>6.1}s  {}",
                t.name, t.seconds, t.detail
            )?;
        }
        for p in &k.backends {
            if !p.available {
                writeln!(
                    out,
                    "    unavailable: {} on {}: {}",
                    p.backend, p.backing, p.reason
                )?;
            }
        }
        for f in &k.facts {
            writeln!(
                out,
                "    fact: {}: {} ({})",
                f.name,
                yes_no(Some(f.available)),
                f.reason
            )?;
        }
        if !k.console_log.is_empty() {
            writeln!(out, "    console: {}", k.console_log)?;
        }
        if count(Status::Failed) > 0
            && let Ok(console) = std::fs::read_to_string(&k.console_log)
        {
            let lines: Vec<&str> = console.lines().collect();
            writeln!(out, "    console tail:")?;
            for l in &lines[lines.len().saturating_sub(40)..] {
                writeln!(out, "      | {l}")?;
            }
        }
    }
    let all = || report.kernels.iter().flat_map(|k| &k.tests);
    let count = |s: Status| all().filter(|t| t.status == s).count();
    writeln!(
        out,
        "matrix: {} passed, {} failed, {} skipped",
        count(Status::Passed),
        count(Status::Failed),
        count(Status::Unavailable)
    )?;
    Ok(())
}

pub fn default_timeout() -> Duration {
    Duration::from_secs(1200)
}
