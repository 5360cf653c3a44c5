//! `faultline demo`: a source VMM + sidecar and a target VMM + sidecar on loopback, a live
//! memtouch guest migrated between them with progress shown, and the guest left running on the
//! target long enough to prove it lost nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use faultline::policy::Transport;
use faultline::sidecar_api::{
    LatencySummary, MigrationStatus, Mode, Phase, Policy, Role, StartMigration,
};
use faultline::trap::Backend;
use faultline::units::{format_size, human_bytes, parse_duration, parse_size};
use faultline::vmm_protocol::messages::{HelloReply, VmStatus};
use faultline::wire::Secret;
use faultline_local::{LocalError, SidecarProcess, VmmProcess};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeArg {
    Precopy,
    Postcopy,
    Hybrid,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Precopy => Mode::PreCopy,
            ModeArg::Postcopy => Mode::PostCopy,
            ModeArg::Hybrid => Mode::Hybrid,
        }
    }
}

/// memtouch's dirty-rate presets (faultline-vmm --dirty-rate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRate {
    Idle,
    Moderate,
    Heavy,
}

impl DirtyRate {
    fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Moderate => "moderate",
            Self::Heavy => "heavy",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Guest RAM (64M to 64G, a multiple of 2M).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// How much of the RAM lies below 4 GiB, the rest continuing at 4 GiB in a second memslot
    /// (the VMM's `--below-4g`; its default is 3G, as on a PC).
    #[arg(long = "below-4g", value_parser = parse_size)]
    pub below_4g: Option<u64>,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// anon, memfd or guest-memfd.
    #[arg(long, default_value = "memfd")]
    pub backing: String,
    #[arg(long, value_enum, default_value = "hybrid")]
    pub mode: ModeArg,
    /// memtouch dirty-rate preset.
    #[arg(long, value_enum, default_value = "moderate")]
    pub dirty_rate: DirtyRate,
    /// Instead of a preset: every vCPU rewrites this many pages per second, paced by the
    /// guest's TSC (the benchmark's workload, the same on QEMU); the report then says how much
    /// guest time the migration cost.
    #[arg(long, conflicts_with = "dirty_rate", value_parser = clap::value_parser!(u64).range(1..))]
    pub pages_per_sec: Option<u64>,
    /// Pre-copy passes before switching (post-copy) or at most (pre-copy, hybrid). Default:
    /// 1 for post-copy, the policy default otherwise.
    #[arg(long)]
    pub precopy_passes: Option<u32>,
    #[arg(long, default_value_t = 300)]
    pub max_downtime_ms: u64,
    /// Give every guest page data before the guest starts (so every page has to move).
    #[arg(long)]
    pub prefill: bool,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// How long the guest keeps running and verifying on the target afterwards (at least 3 s).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub verify_for: Duration,
    /// How memory crosses between the sidecars: tls (the default) or plaintext (only for a
    /// network you trust).
    #[arg(long, value_enum, default_value = "tls")]
    pub transport: TransportArg,
    /// Cap the migration stream at this many bytes per second (e.g. 8M); 0: no cap.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub bandwidth_limit: u64,
    /// Kill the target sidecar once post-copy is under way and vCPUs have faulted, keep it down
    /// for a second, and start it again: it must rejoin the migration and finish it (a test of
    /// the restart path; the report counts the restart).
    #[arg(long)]
    pub restart_target_sidecar: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    Tls,
    Plaintext,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Tls => Transport::Tls,
            TransportArg::Plaintext => Transport::Plaintext,
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct GuestVerdict {
    /// Verification failures over the guest's whole life (source and target).
    pub failures: u64,
    pub failed_pages: Vec<u64>,
    /// Heartbeats per vCPU while the guest ran on the target after the migration.
    pub heartbeats_after: Vec<u64>,
    /// Full verification sweeps per vCPU completed on the target after the migration.
    pub sweeps_after: Vec<u32>,
    pub verified_for_s: f64,
    /// memtouch iterations per second (all vCPUs) just before the migration started.
    pub rate_before_per_sec: f64,
    /// The same on the target, over the verification.
    pub rate_after_per_sec: f64,
    /// Guest time the migration cost, from its start to the end of the verification: the
    /// window less the time the work done in it takes at `rate_before_per_sec`.
    pub time_lost_ms: Option<f64>,
    pub ok: bool,
}

/// A guest's progress counter (memtouch's iterations, summed over vCPUs) at a moment.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub at: Instant,
    pub iterations: u64,
}

/// What a migration cost a guest: its rate before (`before`..`start`), its rate once it had
/// settled on the target (`settled`..`end`), and the time it lost over `start`..`end` against
/// the rate before. One definition for every VMM the benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestPace {
    pub rate_before_per_sec: f64,
    pub rate_after_per_sec: f64,
    /// None without a measurable rate, or when the guest ran more than 10% faster than its
    /// rate before once on the target: its pace (kept with the TSC) broke there, and work
    /// done faster than asked would hide lost time.
    pub lost_ms: Option<f64>,
}

fn rate(from: Progress, to: Progress) -> f64 {
    let span = to.at.saturating_duration_since(from.at).as_secs_f64();
    if span <= 0.0 {
        return 0.0;
    }
    to.iterations.saturating_sub(from.iterations) as f64 / span
}

pub fn guest_time_lost(
    before: Progress,
    start: Progress,
    settled: Progress,
    end: Progress,
) -> GuestPace {
    let rate_before_per_sec = rate(before, start);
    let rate_after_per_sec = rate(settled, end);
    let window = end.at.saturating_duration_since(start.at).as_secs_f64();
    let done = end.iterations.saturating_sub(start.iterations) as f64;
    let paced = rate_after_per_sec <= rate_before_per_sec * 1.1;
    GuestPace {
        rate_before_per_sec,
        rate_after_per_sec,
        lost_ms: (rate_before_per_sec > 0.0 && paced)
            .then(|| (window - done / rate_before_per_sec) * 1e3),
    }
}

fn progress_of(vmm: &VmmProcess) -> anyhow::Result<Progress> {
    let st = vmm.client()?.status().context("VMM status")?;
    Ok(Progress {
        at: Instant::now(),
        iterations: st.vcpu_status.iter().map(|v| u64::from(v.progress)).sum(),
    })
}

#[derive(Serialize, Debug, Clone)]
pub struct RamRegion {
    pub guest_phys_addr: u64,
    pub bytes: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub result: String,
    pub mode: Mode,
    pub trap: Option<Backend>,
    /// How memory crossed between the sidecars, as they ran it.
    pub transport: Transport,
    pub backing: String,
    pub memory_bytes: u64,
    /// RAM's guest-physical regions (one memslot each), as the target VMM reported them.
    pub ram_regions: Vec<RamRegion>,
    /// How often the target sidecar was killed and restarted during the migration.
    pub target_sidecar_restarts: u32,
    pub vcpus: u32,
    pub dirty_rate: DirtyRate,
    /// The paced dirty rate per vCPU, if one was asked instead of the preset.
    pub pages_per_sec: Option<u64>,
    pub total_ms: f64,
    pub downtime_ms: Option<f64>,
    pub precopy_rounds: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub faults: u64,
    pub fault_latency_us: LatencySummary,
    /// Page bytes per second over the whole migration.
    pub throughput_bytes_per_sec: f64,
    pub guest: GuestVerdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Exit status when the kernel cannot do what was asked (the automake convention for "skipped").
pub const EXIT_UNAVAILABLE: i32 = 77;

pub fn run(args: &DemoArgs) -> anyhow::Result<i32> {
    let report = match migrate(args, !args.json) {
        Ok(r) => r,
        Err(e) => match e.downcast::<Unavailable>() {
            Ok(u) => {
                eprintln!("faultline demo: {u}");
                return Ok(EXIT_UNAVAILABLE);
            }
            Err(e) => return Err(e),
        },
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.result == "succeeded" && report.guest.ok {
        0
    } else {
        1
    })
}

/// Runs one demo migration and returns its report (also used by the benchmark).
pub fn migrate(args: &DemoArgs, show_progress: bool) -> anyhow::Result<Report> {
    if args.verify_for < Duration::from_secs(3) {
        bail!("--verify-for must be at least 3s: the guest has to prove itself on the target");
    }
    let memory = format_size(args.memory);
    let vcpus = args.vcpus.to_string();
    // Both VMMs get the same VM shape; the source runs memtouch, the target waits for it.
    let mut vm_args: Vec<String> = [
        "--memory",
        &memory,
        "--vcpus",
        &vcpus,
        "--backing",
        &args.backing,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(below) = args.below_4g {
        vm_args.extend(["--below-4g".into(), format_size(below)]);
    }
    let mut src_args = vm_args.clone();
    match args.pages_per_sec {
        Some(n) => src_args.extend(["--pages-per-sec".into(), n.to_string()]),
        None => src_args.extend(["--dirty-rate".into(), args.dirty_rate.as_str().into()]),
    }
    if args.prefill {
        src_args.push("--prefill".into());
    }
    let mut dst_args = vm_args;
    dst_args.push("--incoming".into());

    let step = |msg: &str| {
        if show_progress {
            eprintln!("• {msg}");
        }
    };
    step(&format!(
        "starting the source VMM (memtouch, {memory}, {vcpus} vCPUs, {}) and the target VMM (incoming)",
        args.backing
    ));
    let start_vmm = |tag: &str, args: &[String]| -> anyhow::Result<VmmProcess> {
        VmmProcess::start(tag, args).map_err(|e| match e {
            // The VMM exits 77 when the kernel lacks what the backing needs.
            LocalError::Exited {
                code: Some(77),
                log,
                ..
            } => Unavailable(log).into(),
            other => anyhow::Error::new(other).context(format!("{tag} VMM")),
        })
    };
    let mut src_vmm = start_vmm("demo-src", &src_args)?;
    let mut dst_vmm = start_vmm("demo-dst", &dst_args)?;
    let src = SidecarProcess::start("demo-src", &src_vmm.socket).context("source sidecar")?;
    let mut dst = SidecarProcess::start("demo-dst", &dst_vmm.socket).context("target sidecar")?;
    step(&format!(
        "sidecars up: source API {}, target API {} (migration port {})",
        src.api, dst.api, dst.migration_port
    ));
    let (target_hello, _fds) = dst_vmm
        .client()
        .context("target VMM")?
        .hello("faultline-demo")
        .context("target VMM hello")?;
    if let Some(why) = postcopy_unavailable(args, &target_hello)? {
        return Err(Unavailable(why).into());
    }
    let ram_regions: Vec<RamRegion> = target_hello
        .layout
        .regions
        .iter()
        .map(|r| RamRegion {
            guest_phys_addr: r.guest_phys_addr,
            bytes: r.size,
        })
        .collect();
    step(&format!("letting the guest run for {:?}", args.warmup));
    let before = progress_of(&src_vmm).context("source VMM")?;
    std::thread::sleep(args.warmup);

    let mut policy = Policy {
        mode: args.mode.into(),
        max_downtime_ms: args.max_downtime_ms,
        bandwidth_limit: args.bandwidth_limit,
        transport: args.transport.into(),
        ..Policy::default()
    };
    policy.precopy_passes = args.precopy_passes.unwrap_or(match args.mode {
        ModeArg::Postcopy => 1,
        _ => policy.precopy_passes,
    });
    let secret = Secret::generate().context("cannot generate a secret")?;
    let id = format!("demo-{}", std::process::id());
    let req = |role, peer| StartMigration {
        id: id.clone(),
        role,
        peer,
        secret: secret.to_base64(),
        policy: policy.clone(),
    };
    let (sc, dc) = (src.client(), dst.client());
    dc.start(&req(Role::Target, None))
        .context("starting the target")?;
    let at_start = progress_of(&src_vmm).context("source VMM")?;
    let started = Instant::now();
    sc.start(&req(Role::Source, Some(dst.migration_addr())))
        .context("starting the source")?;

    let bar = if show_progress {
        let b = ProgressBar::new(args.memory / 4096);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {percent:>3}% {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(100));
        b
    } else {
        ProgressBar::hidden()
    };
    let mut restarts = 0;
    let (final_src, final_dst) = loop {
        let s = sc.status(&id).context("source status")?;
        let d = dc.status(&id).context("target status")?;
        if args.restart_target_sidecar
            && restarts == 0
            && d.phase == Phase::PostCopy
            && d.progress.faults > 0
        {
            bar.suspend(|| {
                step("killing the target sidecar in the middle of post-copy; it restarts in 1 s")
            });
            dst.restart(Duration::from_secs(1))
                .context("restarting the target sidecar")?;
            restarts += 1;
            continue;
        }
        let total = s.progress.total_pages.max(1);
        bar.set_length(total);
        // Pre-copy: how far the source got (a later pass starts again); afterwards: what the
        // target holds.
        bar.set_position(if matches!(s.phase, Phase::PreCopy | Phase::Connecting) {
            s.progress.transferred_pages.min(total)
        } else {
            total - d.progress.remaining_pages.min(total)
        });
        bar.set_message(format!(
            "{:<11} sent {:>10}  left {:>7} pages  faults {:>6}  {}/s",
            phase_name(s.phase),
            human_bytes(s.progress.transferred_bytes),
            d.progress.remaining_pages,
            d.progress.faults,
            human_bytes((s.progress.transferred_bytes as f64 / s.elapsed_s.max(1e-3)) as u64),
        ));
        if s.phase.is_terminal() && (d.phase.is_terminal() || s.phase != Phase::Completed) {
            break (s, d);
        }
        if started.elapsed() > Duration::from_secs(policy.completion_timeout_s + 30) {
            bail!("the migration did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    if args.restart_target_sidecar && restarts == 0 && final_src.phase == Phase::Completed {
        bail!(
            "post-copy ended before the target sidecar could be restarted: cap the bandwidth (--bandwidth-limit) or give the VM more memory"
        );
    }

    if final_src.phase != Phase::Completed {
        step(&format!(
            "migration {}: {}",
            phase_name(final_src.phase),
            final_src.message
        ));
        // The VM must still be healthy on the source.
        let st = src_vmm
            .client()
            .context("source VMM")?
            .status()
            .context("source status")?;
        let report = report_from(
            args,
            &ram_regions,
            restarts,
            &final_src,
            &final_dst,
            GuestVerdict {
                failures: st.failures,
                failed_pages: st.failed_pages.clone(),
                heartbeats_after: vec![],
                sweeps_after: vec![],
                verified_for_s: 0.0,
                rate_before_per_sec: rate(before, at_start),
                rate_after_per_sec: 0.0,
                time_lost_ms: None,
                ok: st.failures == 0,
            },
        );
        return Ok(report);
    }
    step(&format!(
        "migrated in {:.0} ms (downtime {:.1} ms); the guest now runs on the target — verifying for {:?}",
        final_src.elapsed_s * 1e3,
        final_src.progress.downtime_ms.unwrap_or(0.0),
        args.verify_for
    ));
    let _ = src_vmm.wait(Duration::from_secs(30));
    let verdict = verify(&dst_vmm, args.verify_for, (before, at_start))?;
    let _ = dst_vmm.shutdown();
    Ok(report_from(
        args,
        &ram_regions,
        restarts,
        &final_src,
        &final_dst,
        verdict,
    ))
}

/// This kernel cannot do what was asked (reported as such, not as a failure).
#[derive(Debug, thiserror::Error)]
#[error("unavailable on this kernel: {0}")]
pub struct Unavailable(pub String);

/// The demo is about post-copy: in post-copy and hybrid mode it needs a trap on the target for
/// this memory, and says why there is none, if so (the rule the target sidecar applies,
/// `faultline::trap::choose`, on the same VMM's offers, with no fallback to pre-copy).
fn postcopy_unavailable(args: &DemoArgs, hello: &HelloReply) -> anyhow::Result<Option<String>> {
    if args.mode == ModeArg::Precopy {
        return Ok(None);
    }
    let backing = hello
        .layout
        .regions
        .first()
        .map(|r| r.backing)
        .context("the target VMM reports no memory")?;
    let chosen = faultline::trap::choose(
        Policy::default().trap,
        Mode::PostCopy,
        backing,
        &hello.trap_offers(),
    );
    Ok(chosen.err().map(|e| e.to_string()))
}

fn phase_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Lets the guest run on the target for `how_long` and checks it progressed on every vCPU
/// without a single verification failure.
/// `pace` holds the source's progress before and at the migration's start.
fn verify(
    vmm: &VmmProcess,
    how_long: Duration,
    pace: (Progress, Progress),
) -> anyhow::Result<GuestVerdict> {
    let mut c = vmm.client().context("target VMM")?;
    let before: VmStatus = c.status().context("target status")?;
    let t = Instant::now();
    std::thread::sleep(how_long);
    let after = c.status().context("target status")?;
    let end = Progress {
        at: Instant::now(),
        iterations: after
            .vcpu_status
            .iter()
            .map(|v| u64::from(v.progress))
            .sum(),
    };
    let settled = Progress {
        at: t,
        iterations: before
            .vcpu_status
            .iter()
            .map(|v| u64::from(v.progress))
            .sum(),
    };
    let paced = guest_time_lost(pace.0, pace.1, settled, end);
    let heartbeats_after: Vec<u64> = after
        .heartbeats
        .iter()
        .zip(&before.heartbeats)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let sweeps_after: Vec<u32> = after
        .vcpu_status
        .iter()
        .zip(&before.vcpu_status)
        .map(|(a, b)| a.status_word.saturating_sub(b.status_word))
        .collect();
    let ok = after.failures == 0 && heartbeats_after.iter().all(|&h| h > 0);
    Ok(GuestVerdict {
        failures: after.failures,
        failed_pages: after.failed_pages,
        heartbeats_after,
        sweeps_after,
        verified_for_s: t.elapsed().as_secs_f64(),
        rate_before_per_sec: paced.rate_before_per_sec,
        rate_after_per_sec: paced.rate_after_per_sec,
        time_lost_ms: paced.lost_ms,
        ok,
    })
}

fn report_from(
    args: &DemoArgs,
    ram_regions: &[RamRegion],
    restarts: u32,
    s: &MigrationStatus,
    d: &MigrationStatus,
    guest: GuestVerdict,
) -> Report {
    let p = &s.progress;
    Report {
        result: match s.phase {
            Phase::Completed => "succeeded".into(),
            Phase::Cancelled => "cancelled".into(),
            _ => "failed".into(),
        },
        mode: s.mode,
        trap: d.trap.or(s.trap),
        transport: s.transport,
        backing: args.backing.clone(),
        memory_bytes: args.memory,
        ram_regions: ram_regions.to_vec(),
        target_sidecar_restarts: restarts,
        vcpus: args.vcpus,
        dirty_rate: args.dirty_rate,
        pages_per_sec: args.pages_per_sec,
        total_ms: s.elapsed_s * 1e3,
        downtime_ms: p.downtime_ms,
        precopy_rounds: p.precopy_rounds,
        bytes_sent: p.transferred_bytes,
        pages_sent: p.transferred_pages,
        zero_pages: p.zero_pages,
        faults: d.progress.faults,
        fault_latency_us: d.progress.fault_latency_us,
        throughput_bytes_per_sec: p.transferred_bytes as f64 / s.elapsed_s.max(1e-6),
        guest,
        error: s.error.clone().or_else(|| d.error.clone()),
    }
}

fn print_report(r: &Report) {
    println!();
    println!(
        "Migration {} — {} of {} RAM, {} vCPUs, {} memory, {} guest",
        r.result.to_uppercase(),
        match r.mode {
            Mode::PreCopy => "pre-copy",
            Mode::PostCopy => "post-copy",
            Mode::Hybrid => "hybrid",
        },
        format_size(r.memory_bytes),
        r.vcpus,
        r.backing,
        match r.pages_per_sec {
            Some(n) => format!("{n} pages/s per vCPU"),
            None => r.dirty_rate.as_str().to_string(),
        }
    );
    if let Some(e) = &r.error {
        println!("  error:            {e}");
    }
    if r.target_sidecar_restarts > 0 {
        println!(
            "  target sidecar:   killed and restarted {} time(s) mid-migration; it rejoined",
            r.target_sidecar_restarts
        );
    }
    if r.ram_regions.len() > 1 {
        let regions: Vec<String> = r
            .ram_regions
            .iter()
            .map(|g| format!("{} at {:#x}", format_size(g.bytes), g.guest_phys_addr))
            .collect();
        println!("  RAM regions:      {}", regions.join(", "));
    }
    println!(
        "  trap:             {}",
        r.trap
            .map(|t| t.to_string())
            .unwrap_or_else(|| "none (pre-copy only)".into())
    );
    println!("  transport:        {}", r.transport.describe());
    println!("  total time:       {:.0} ms", r.total_ms);
    match r.downtime_ms {
        Some(d) => println!("  downtime:         {d:.2} ms (source paused → target running)"),
        None => println!("  downtime:         -"),
    }
    println!("  pre-copy rounds:  {}", r.precopy_rounds);
    println!(
        "  sent:             {} in {} pages ({} zero-page markers), {}/s",
        human_bytes(r.bytes_sent),
        r.pages_sent,
        r.zero_pages,
        human_bytes(r.throughput_bytes_per_sec as u64)
    );
    println!("  faults served:    {}", r.faults);
    if r.faults > 0 {
        let l = r.fault_latency_us;
        println!(
            "  fault latency:    p50 {} µs, p99 {} µs, max {} µs",
            l.p50, l.p99, l.max
        );
    }
    let g = &r.guest;
    println!(
        "  guest verdict:    {} — {} verification failures; on the target for {:.1} s: heartbeats {:?}, full sweeps {:?}",
        if g.ok { "OK" } else { "FAILED" },
        g.failures,
        g.verified_for_s,
        g.heartbeats_after,
        g.sweeps_after
    );
    match g.time_lost_ms {
        Some(lost) => println!(
            "  guest time lost:  {lost:.0} ms (against its {:.0} iterations/s before the migration)",
            g.rate_before_per_sec
        ),
        None if g.rate_after_per_sec > 0.0 => println!(
            "  guest time lost:  not measurable: {:.0} iterations/s before, {:.0} on the target",
            g.rate_before_per_sec, g.rate_after_per_sec
        ),
        None => {}
    }
    if !g.failed_pages.is_empty() {
        println!("  failed pages:     {:?}", g.failed_pages);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_lost_is_the_window_less_the_work_done_at_the_earlier_rate() {
        let t = Instant::now();
        let p = |ms: u64, iterations| Progress {
            at: t + Duration::from_millis(ms),
            iterations,
        };
        // 1000 iterations/s, then 2 s in which only 1500 were done: 500 ms lost.
        let g = guest_time_lost(p(0, 0), p(1000, 1000), p(2000, 1500), p(3000, 2500));
        assert!((g.rate_before_per_sec - 1000.0).abs() < 1e-6);
        assert!((g.rate_after_per_sec - 1000.0).abs() < 1e-6);
        assert!((g.lost_ms.unwrap() - 500.0).abs() < 1e-6);
        // A guest that ran faster than its pace on the target: nothing to say.
        let fast = guest_time_lost(p(0, 0), p(1000, 1000), p(2000, 1500), p(3000, 4000));
        assert_eq!(fast.lost_ms, None);
        assert!((fast.rate_after_per_sec - 2500.0).abs() < 1e-6);
        assert_eq!(
            guest_time_lost(p(0, 5), p(1000, 5), p(1500, 7), p(2000, 9)).lost_ms,
            None
        );
    }
}
