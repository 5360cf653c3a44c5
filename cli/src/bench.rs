//! `faultline bench`: measures the floors and then Faultline itself, in one run, and reports
//! every figure with its ratio to the floor it should be compared with (a noisy machine moves
//! both together). JSON with `--json`.

use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::demo::{self, DemoArgs, DirtyRate, ModeArg, Report, TransportArg};
use crate::floors::{self, Floors};
use crate::peer_qemu::{self, PeerRun, Strategy, Workload};
use faultline::policy::Transport;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// A reduced set (256 MiB guests, five migrations after the warm-up) that runs in under a
    /// minute.
    #[arg(long)]
    pub quick: bool,
    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Backing of the guests' memory.
    #[arg(long, default_value = "memfd")]
    pub backing: String,
    /// Also run another VMM's own live migration of the same guest, side by side with
    /// Faultline's (one vCPU, the same memory, prefilled, the same paced dirty rates).
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// QEMU (`qemu-system-x86_64` on the PATH, or FAULTLINE_QEMU), with KVM.
    Qemu,
}

/// The paced dirty rates the comparison runs at: a quiet guest, and a busy one that both VMMs
/// can still run at its pace on a KVM that emulates guest instructions (memtouch tops out at
/// about 4,000–9,000 iterations a second there).
const PEER_RATES: [(&str, u64); 2] = [("quiet", 2_000), ("busy", 4_000)];

#[derive(Serialize, Debug)]
pub struct PeerReport {
    /// QEMU's version line.
    pub peer: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// Faultline's memory backing (QEMU's is anonymous memory, its default).
    pub faultline_backing: String,
    pub rates: Vec<PeerRate>,
    pub runs: Vec<PeerRun>,
    pub targets: Vec<Target>,
}

#[derive(Serialize, Debug)]
pub struct PeerRate {
    pub name: &'static str,
    pub pages_per_sec: u64,
}

#[derive(Serialize, Debug)]
pub struct Target {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the value is compared with, in the same unit.
    pub reference: f64,
    pub reference_is: &'static str,
    pub ratio: f64,
    /// The ratio the issue asks for, and whether it is an upper or lower bound.
    pub limit: f64,
    pub bound: &'static str,
    pub met: bool,
}

#[derive(Serialize, Debug)]
pub struct BenchReport {
    pub command: String,
    pub quick: bool,
    pub host: Host,
    pub floors: Floors,
    /// The first migration of the run, which pays for memory the host never backed before.
    pub warmup: Report,
    pub runs: Vec<Report>,
    pub targets: Vec<Target>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerReport>,
    pub duration_s: f64,
}

#[derive(Serialize, Debug)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
}

fn host() -> Host {
    let uname = rustix::system::uname();
    Host {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel: uname.release().to_string_lossy().into_owned(),
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let say = |m: &str| {
        if !args.json {
            eprintln!("{m}");
        }
    };
    say(
        "measuring floors: loopback TCP bandwidth and 4 KiB round trip, a vCPU's userfaultfd fault, a KVM exit …",
    );
    let floors = floors::measure(args.quick)?;
    let memory: u64 = if args.quick { 256 << 20 } else { 1 << 30 };
    // Every migration over TLS (the default), and the two idle ones again in plaintext: the
    // price of encryption, measured in the same run. Each plaintext run sits next to its TLS
    // twin, in alternating order, so neither side of a comparison gets a quieter moment.
    use TransportArg::{Plaintext, Tls};
    let plan: Vec<(ModeArg, DirtyRate, u32, TransportArg)> = if args.quick {
        vec![
            (ModeArg::Postcopy, DirtyRate::Idle, 0, Tls),
            (ModeArg::Postcopy, DirtyRate::Idle, 0, Plaintext),
            (ModeArg::Precopy, DirtyRate::Idle, 8, Plaintext),
            (ModeArg::Precopy, DirtyRate::Idle, 8, Tls),
            (ModeArg::Hybrid, DirtyRate::Heavy, 8, Tls),
        ]
    } else {
        vec![
            (ModeArg::Precopy, DirtyRate::Idle, 8, Tls),
            (ModeArg::Precopy, DirtyRate::Idle, 8, Plaintext),
            (ModeArg::Postcopy, DirtyRate::Idle, 0, Plaintext),
            (ModeArg::Postcopy, DirtyRate::Idle, 0, Tls),
            (ModeArg::Hybrid, DirtyRate::Idle, 8, Tls),
            (ModeArg::Precopy, DirtyRate::Heavy, 8, Tls),
            (ModeArg::Postcopy, DirtyRate::Heavy, 0, Tls),
            (ModeArg::Hybrid, DirtyRate::Heavy, 8, Tls),
        ]
    };
    let migrate = |mode: ModeArg, rate: DirtyRate, passes: u32, transport: TransportArg| {
        say(&format!(
            "migrating a {} guest, {mode:?}, {rate:?} dirty rate, {transport:?} …",
            faultline::units::format_size(memory)
        ));
        let demo_args = DemoArgs {
            memory,
            below_4g: None,
            bandwidth_limit: 0,
            restart_target_sidecar: false,
            vcpus: 2,
            backing: args.backing.clone(),
            mode,
            dirty_rate: rate,
            pages_per_sec: None,
            precopy_passes: Some(passes),
            // The downtime the issue asks for: pre-copy only stops to copy what fits in it.
            max_downtime_ms: 20,
            prefill: true,
            warmup: Duration::from_millis(500),
            verify_for: Duration::from_secs(3),
            transport,
            json: true,
        };
        let report = demo::migrate(&demo_args, false)?;
        if report.result != "succeeded" || !report.guest.ok {
            anyhow::bail!(
                "benchmark migration failed: {}",
                serde_json::to_string(&report)?
            );
        }
        Ok(report)
    };
    // The first migration on a machine that is itself a VM runs into guest memory its host has
    // never backed, and measured up to half as fast as the ones after it: run one first, and
    // keep it out of the comparisons.
    say("warm-up migration (reported apart, in no target) …");
    let warmup = migrate(ModeArg::Precopy, DirtyRate::Idle, 8, Plaintext)?;
    let mut runs = Vec::new();
    for (mode, rate, passes, transport) in plan {
        runs.push(migrate(mode, rate, passes, transport)?);
    }
    let targets = targets(&floors, &runs, memory);
    let peer = match args.peer {
        Some(Peer::Qemu) => Some(compare_with_qemu(args, &floors, &say)?),
        None => None,
    };
    let report = BenchReport {
        command: format!(
            "faultline bench{}{}{}",
            if args.quick { " --quick" } else { "" },
            if args.peer.is_some() {
                " --peer qemu"
            } else {
                ""
            },
            if args.json { " --json" } else { "" }
        ),
        quick: args.quick,
        host: host(),
        floors,
        warmup,
        runs,
        targets,
        peer,
        duration_s: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(0)
}

/// The TLS run of `mode` at `rate` (what users get by default).
fn find(runs: &[Report], mode: faultline::sidecar_api::Mode, rate: DirtyRate) -> Option<&Report> {
    find_over(runs, mode, rate, Transport::Tls)
}

fn find_over(
    runs: &[Report],
    mode: faultline::sidecar_api::Mode,
    rate: DirtyRate,
    transport: Transport,
) -> Option<&Report> {
    runs.iter()
        .find(|r| r.mode == mode && r.dirty_rate == rate && r.transport == transport)
}

fn targets(f: &Floors, runs: &[Report], memory: u64) -> Vec<Target> {
    use faultline::sidecar_api::Mode;
    let mut out = Vec::new();
    let fault_floor = f.uffd_vcpu_fault_us + f.tcp_rtt_4k_us_p50;
    if let Some(pc) = find(runs, Mode::PostCopy, DirtyRate::Idle) {
        let l = pc.fault_latency_us;
        for (name, value, limit) in [
            ("postcopy_fault_latency_p50", l.p50 as f64, 2.0),
            ("postcopy_fault_latency_p99", l.p99 as f64, 5.0),
        ] {
            let ratio = value / fault_floor;
            out.push(Target {
                name: name.into(),
                value,
                unit: "us",
                reference: fault_floor,
                reference_is: "userfaultfd vCPU fault + 4 KiB TCP round trip (p50)",
                ratio,
                limit,
                bound: "at most",
                met: ratio <= limit,
            });
        }
        let ideal_ms = memory as f64 / f.tcp_bandwidth_bytes_per_sec * 1e3;
        let ratio = pc.total_ms / ideal_ms;
        out.push(Target {
            name: "postcopy_total_time_idle".into(),
            value: pc.total_ms,
            unit: "ms",
            reference: ideal_ms,
            reference_is: "guest RAM / raw loopback TCP bandwidth",
            ratio,
            limit: 1.3,
            bound: "at most",
            met: ratio <= 1.3,
        });
    }
    if let Some(pre) = find(runs, Mode::PreCopy, DirtyRate::Idle) {
        let ratio = pre.throughput_bytes_per_sec / f.tcp_bandwidth_bytes_per_sec;
        out.push(Target {
            name: "bulk_throughput".into(),
            value: pre.throughput_bytes_per_sec,
            unit: "bytes/s",
            reference: f.tcp_bandwidth_bytes_per_sec,
            reference_is: "raw loopback TCP bandwidth",
            ratio,
            limit: 0.7,
            bound: "at least",
            met: ratio >= 0.7,
        });
        // Informational: the same throughput against writing fresh memory, which the target
        // cannot avoid.
        let ratio = pre.throughput_bytes_per_sec / f.fresh_memory_write_bytes_per_sec;
        out.push(Target {
            name: "bulk_throughput_vs_fresh_memory".into(),
            value: pre.throughput_bytes_per_sec,
            unit: "bytes/s",
            reference: f.fresh_memory_write_bytes_per_sec,
            reference_is: "writing never-touched memory (the target must, once per page)",
            ratio,
            limit: 0.7,
            bound: "at least",
            met: ratio >= 0.7,
        });
    }
    // The price of TLS: the same idle migrations in plaintext, in this run.
    let plain = |mode| find_over(runs, mode, DirtyRate::Idle, Transport::Plaintext);
    if let (Some(tls), Some(plain)) = (
        find(runs, Mode::PreCopy, DirtyRate::Idle),
        plain(Mode::PreCopy),
    ) {
        let ratio = tls.throughput_bytes_per_sec / plain.throughput_bytes_per_sec.max(1.0);
        out.push(Target {
            name: "tls_bulk_throughput".into(),
            value: tls.throughput_bytes_per_sec,
            unit: "bytes/s",
            reference: plain.throughput_bytes_per_sec,
            reference_is: "the same pre-copy migration in plaintext",
            ratio,
            limit: 0.9,
            bound: "at least",
            met: ratio >= 0.9,
        });
    }
    if let (Some(tls), Some(plain)) = (
        find(runs, Mode::PostCopy, DirtyRate::Idle),
        plain(Mode::PostCopy),
    ) {
        // The bound is absolute: at most 10 µs added to the plaintext p50.
        let tls_p50 = tls.fault_latency_us.p50 as f64;
        let reference = plain.fault_latency_us.p50 as f64;
        let added = tls_p50 - reference;
        out.push(Target {
            name: "tls_fault_latency_p50_added".into(),
            value: added,
            unit: "us",
            reference,
            reference_is: "the same post-copy migration in plaintext (p50); ratio is TLS p50 / plaintext p50",
            ratio: tls_p50 / reference.max(1.0),
            limit: 10.0,
            bound: "at most (us added)",
            met: added <= 10.0,
        });
    }
    let worst = runs
        .iter()
        .filter_map(|r| r.downtime_ms)
        .fold(0.0f64, f64::max);
    out.push(Target {
        name: "downtime_worst_2_vcpus".into(),
        value: worst,
        unit: "ms",
        reference: 20.0,
        reference_is: "20 ms budget",
        ratio: worst / 20.0,
        limit: 1.0,
        bound: "at most",
        met: worst <= 20.0,
    });
    out
}

fn print_table(r: &BenchReport) {
    let f = &r.floors;
    println!(
        "\nFloors (this run, {} CPUs, kernel {}):",
        r.host.cpus, r.host.kernel
    );
    println!(
        "  loopback TCP bandwidth       {:>10.0} MB/s",
        f.tcp_bandwidth_bytes_per_sec / 1e6
    );
    println!(
        "  4 KiB TCP round trip         {:>10.1} µs p50, {:.1} µs p99",
        f.tcp_rtt_4k_us_p50, f.tcp_rtt_4k_us_p99
    );
    println!(
        "  vCPU userfaultfd fault       {:>10.1} µs (loop baseline {:.1} µs)",
        f.uffd_vcpu_fault_us, f.uffd_loop_baseline_us
    );
    println!("  KVM exit round trip          {:>10.1} µs", f.kvm_exit_us);
    println!(
        "  page install on the target   {:>10.1} µs UFFDIO_COPY, {:.1} µs pwrite into a memfd hole, {:.1} µs into an allocated page",
        f.install_uffd_copy_us, f.install_memfd_hole_us, f.install_memfd_allocated_us
    );
    println!(
        "  writing never-touched memory {:>10.0} MB/s",
        f.fresh_memory_write_bytes_per_sec / 1e6
    );
    println!(
        "\nMigrations ({} guests, 2 vCPUs, prefilled):",
        faultline::units::format_size(r.runs.first().map(|x| x.memory_bytes).unwrap_or(0))
    );
    println!(
        "  {:<10} {:<9} {:<9} {:>9} {:>10} {:>7} {:>10} {:>7} {:>9} {:>9}",
        "mode",
        "dirty",
        "transport",
        "total ms",
        "downtime",
        "rounds",
        "MB/s",
        "faults",
        "p50 µs",
        "p99 µs"
    );
    for x in &r.runs {
        println!(
            "  {:<10} {:<9} {:<9} {:>9.0} {:>10.2} {:>7} {:>10.0} {:>7} {:>9} {:>9}",
            format!("{:?}", x.mode).to_lowercase(),
            format!("{:?}", x.dirty_rate).to_lowercase(),
            x.transport.describe(),
            x.total_ms,
            x.downtime_ms.unwrap_or(0.0),
            x.precopy_rounds,
            x.throughput_bytes_per_sec / 1e6,
            x.faults,
            x.fault_latency_us.p50,
            x.fault_latency_us.p99
        );
    }
    println!("\nTargets (ratios to the floors above):");
    print_targets(&r.targets);
    if let Some(p) = &r.peer {
        print_peer(p);
    }
    println!("\n{} in {:.0} s", r.command, r.duration_s);
}

/// Runs the side-by-side comparison with QEMU: for each paced rate and each strategy, QEMU's
/// migration and Faultline's of the same guest, one after the other (alternating which goes
/// first, so neither always gets the quieter moment).
fn compare_with_qemu(
    args: &BenchArgs,
    floors: &Floors,
    say: &dyn Fn(&str),
) -> anyhow::Result<PeerReport> {
    let peer = faultline_local::qemu::qemu_version()?;
    let tsc_khz = faultline_vmm::guest::guest_tsc_khz()?;
    let memory: u64 = if args.quick { 256 << 20 } else { 1 << 30 };
    // The quick form keeps every strategy on both VMMs (so none can rot) at the busy rate.
    let rates: Vec<(&'static str, u64)> = if args.quick {
        PEER_RATES[1..].to_vec()
    } else {
        PEER_RATES.to_vec()
    };
    let mut runs = Vec::new();
    let mut qemu_first = true;
    for &(name, pages_per_sec) in &rates {
        let w = Workload {
            memory,
            pages_per_sec,
            tsc_khz,
            warmup: Duration::from_secs(1),
            verify_for: Duration::from_secs(3),
            max_downtime_ms: 20,
        };
        for s in Strategy::ALL {
            say(&format!(
                "side by side with {peer}: {} guest, 1 vCPU, {name} ({pages_per_sec} pages/s), {} …",
                faultline::units::format_size(memory),
                s.describe()
            ));
            let qemu = || peer_qemu::run_qemu(&w, s);
            let ours = || peer_qemu::run_faultline(&w, s, &args.backing);
            if qemu_first {
                runs.push(qemu()?);
                runs.push(ours()?);
            } else {
                runs.push(ours()?);
                runs.push(qemu()?);
            }
            qemu_first = !qemu_first;
        }
    }
    let targets = peer_targets(floors, &runs, &rates);
    Ok(PeerReport {
        peer,
        memory_bytes: memory,
        vcpus: 1,
        faultline_backing: args.backing.clone(),
        rates: rates
            .iter()
            .map(|&(name, pages_per_sec)| PeerRate {
                name,
                pages_per_sec,
            })
            .collect(),
        runs,
        targets,
    })
}

fn peer_targets(f: &Floors, runs: &[PeerRun], rates: &[(&'static str, u64)]) -> Vec<Target> {
    let mut out = Vec::new();
    let find = |vmm: &str, s: Strategy, rate: u64| {
        runs.iter()
            .find(|r| r.vmm == vmm && r.strategy == s && r.pages_per_sec == rate)
    };
    let mut push =
        |name: String, value: f64, unit, reference: f64, reference_is, limit, at_most| {
            let ratio = value / reference.max(1e-9);
            out.push(Target {
                name,
                value,
                unit,
                reference,
                reference_is,
                ratio,
                limit,
                bound: if at_most { "at most" } else { "at least" },
                met: if at_most {
                    ratio <= limit
                } else {
                    ratio >= limit
                },
            });
        };
    for &(rate_name, rate) in rates {
        let pair = |s| find("faultline", s, rate).zip(find("qemu", s, rate));
        if let Some((ours, qemu)) = pair(Strategy::PostcopyAtStart) {
            push(
                format!("postcopy_total_time_vs_qemu_{rate_name}"),
                ours.total_ms,
                "ms",
                qemu.total_ms,
                "QEMU's post-copy at start, same guest, same run",
                0.7,
                true,
            );
            push(
                format!("postcopy_switchover_pause_vs_qemu_{rate_name}"),
                ours.downtime_ms,
                "ms",
                qemu.downtime_ms,
                "QEMU's post-copy switch-over downtime",
                0.2,
                true,
            );
            if let (Some(a), Some(b)) = (ours.guest_time_lost_ms, qemu.guest_time_lost_ms) {
                push(
                    format!("postcopy_guest_time_lost_vs_qemu_{rate_name}"),
                    a.max(0.0),
                    "ms",
                    b.max(0.0),
                    "guest time QEMU's post-copy cost the same guest",
                    0.5,
                    true,
                );
            }
        }
        if let Some((ours, qemu)) = pair(Strategy::Precopy) {
            push(
                format!("precopy_total_time_vs_qemu_{rate_name}"),
                ours.total_ms,
                "ms",
                qemu.total_ms,
                "QEMU's pre-copy, same guest, same run",
                0.5,
                true,
            );
            push(
                format!("precopy_downtime_vs_qemu_{rate_name}"),
                ours.downtime_ms,
                "ms",
                qemu.downtime_ms,
                "QEMU's pre-copy downtime",
                0.1,
                true,
            );
        }
        let ours = |s| find("faultline", s, rate);
        if let (Some(post), Some(pre)) = (ours(Strategy::PostcopyAtStart), ours(Strategy::Precopy))
        {
            push(
                format!("postcopy_push_vs_precopy_bulk_{rate_name}"),
                post.throughput_bytes_per_sec,
                "bytes/s",
                pre.throughput_bytes_per_sec,
                "Faultline's own pre-copy throughput, same guest",
                0.9,
                false,
            );
            push(
                format!("precopy_bulk_vs_fresh_memory_{rate_name}"),
                pre.throughput_bytes_per_sec,
                "bytes/s",
                f.fresh_memory_write_bytes_per_sec,
                "writing never-touched memory (floor of this run)",
                0.8,
                false,
            );
        }
    }
    out
}

fn print_peer(p: &PeerReport) {
    println!(
        "\nSide by side with {} ({} guests, 1 vCPU, every page written first; Faultline on {} memory over TLS 1.3, QEMU on anonymous memory over plain TCP):",
        p.peer,
        faultline::units::format_size(p.memory_bytes),
        p.faultline_backing
    );
    println!(
        "  {:<6} {:<23} {:<9} {:>9} {:>11} {:>9} {:>9} {:>7} {:>12} {:>10}",
        "rate",
        "strategy",
        "vmm",
        "it/s",
        "total ms",
        "pause ms",
        "MB/s",
        "faults",
        "blocked",
        "lost ms"
    );
    for r in &p.runs {
        let rate = p
            .rates
            .iter()
            .find(|x| x.pages_per_sec == r.pages_per_sec)
            .map(|x| x.name)
            .unwrap_or("?");
        let blocked = match (r.fault_latency_us, r.blocktime_ms) {
            (Some(l), _) => format!("p50 {} µs", l.p50),
            (None, Some(b)) => format!("{b} ms"),
            (None, None) => "-".into(),
        };
        println!(
            "  {:<6} {:<23} {:<9} {:>9.0} {:>11.0} {:>9.2} {:>9.0} {:>7} {:>12} {:>10}",
            rate,
            r.strategy.describe(),
            r.vmm,
            r.rate_before_per_sec,
            r.total_ms,
            r.downtime_ms,
            r.throughput_bytes_per_sec / 1e6,
            r.faults,
            blocked,
            r.guest_time_lost_ms
                .map(|l| format!("{l:.0}"))
                .unwrap_or_else(|| format!("- ({:.0} it/s after)", r.rate_after_per_sec))
        );
    }
    println!("\nTargets against the peer (ratios within this run):");
    print_targets(&p.targets);
}

fn print_targets(targets: &[Target]) {
    for t in targets {
        println!(
            "  {:<44} {:>12.1} {:<7} ratio {:>6.2} ({} {}) {}",
            t.name,
            t.value,
            t.unit,
            t.ratio,
            t.bound,
            t.limit,
            if t.met { "met" } else { "MISSED" }
        );
    }
}
