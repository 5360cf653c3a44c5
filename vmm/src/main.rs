//! faultline-vmm: Faultline's reference KVM VMM.
//!
//! Runs a guest program (the built-in self-verifying `memtouch`, or a flat binary following
//! docs/guest-abi.md) on N vCPUs, prints its progress, and speaks the VMM protocol
//! (docs/vmm-protocol.md) on `--control` so a sidecar can migrate it.

mod boot;
mod control;
mod cpuid;
mod memory;
mod ram_map;
mod userfault;
mod vcpu;
mod vm;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use faultline::layout::BackingKind;
use faultline::units::{format_size, parse_duration, parse_size};
use faultline::vmm_protocol::messages::{VmState, VmStatus};
// The state codec lives in the library so that the fuzz targets can link it; the binary's
// modules keep reaching it as `crate::state` and `crate::accounting`.
use faultline_vmm::{accounting, state};

use crate::ram_map::RamMap;
use crate::vm::{Vm, VmConfig};
use faultline_vmm::guest::{self, DirtyRate, MemtouchArgs};

#[derive(Parser, Debug)]
#[command(name = "faultline-vmm", version, about, long_about = None)]
struct Cli {
    /// Number of vCPUs (1 to 64), one thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=state::MAX_VCPUS as i64))]
    vcpus: u32,
    /// Guest RAM, 64M to 64G, a multiple of 2M (e.g. 512M, 4G).
    #[arg(long, default_value = "256M", value_parser = parse_ram)]
    memory: u64,
    /// How much RAM lies below 4 GiB, as on a PC; the rest starts at guest-physical 4 GiB,
    /// in a second memslot. A multiple of 2M from 4M to 4G [default: 3G].
    #[arg(long = "below-4g", value_parser = parse_size_arg)]
    below_4g: Option<u64>,
    /// What backs guest RAM.
    #[arg(long, default_value = "memfd", value_parser = parse_backing)]
    backing: BackingKind,
    /// `memtouch` (built in) or the path of a flat 64-bit binary following docs/guest-abi.md.
    #[arg(long, default_value = "memtouch")]
    guest: String,
    /// A u64 argument for a `--guest FILE` program (repeatable; passed in order via R8/R9).
    #[arg(long = "guest-arg", value_name = "U64")]
    guest_args: Vec<u64>,
    /// memtouch: dirty-rate preset (sets write intensity, heartbeat interval and sleep).
    #[arg(long, value_enum, default_value = "moderate")]
    dirty_rate: DirtyRate,
    /// memtouch: rewrite this many pages per second on each vCPU, paced by the TSC (instead of
    /// a preset; a vCPU that falls behind does not catch up, so lost guest time shows).
    #[arg(long, conflicts_with_all = ["dirty_rate", "write_intensity"], value_parser = clap::value_parser!(u64).range(1..))]
    pages_per_sec: Option<u64>,
    /// memtouch: fraction of usable RAM in the working set (0 < f <= 1).
    #[arg(long, value_parser = parse_fraction)]
    working_set: Option<f64>,
    /// memtouch: fraction of iterations that rewrite their page (0 to 1; overrides the preset).
    #[arg(long, value_parser = parse_unit_interval)]
    write_intensity: Option<f64>,
    /// memtouch: verify and write every word of a page instead of three.
    #[arg(long)]
    full_verify: bool,
    /// memtouch: give every working-set page data (generation 1) before the guest starts, as
    /// memtouch would write it, so memory holds data at once (for benchmarks).
    #[arg(long)]
    prefill: bool,
    /// memtouch: seed of the page picker.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop the VM after this long (e.g. 5s, 2m); without it the VM runs until every vCPU
    /// halts or a shutdown request arrives.
    #[arg(long, value_parser = parse_duration)]
    run_for: Option<Duration>,
    /// Serve the VMM protocol on this Unix socket.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Create the VM and its memory but run nothing until a state is restored over the
    /// control socket (the target side of a migration).
    #[arg(long, requires = "control", env = "FAULTLINE_INCOMING")]
    incoming: bool,
    /// VM identifier reported over the protocol (default: derived from host and pid).
    #[arg(long)]
    vm_id: Option<String>,
    /// No status line every second.
    #[arg(long, short)]
    quiet: bool,
    /// Print the final status as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// How long the rest of a control frame may take once its first byte arrived.
    #[arg(long, hide = true, default_value = "10s", value_parser = parse_duration)]
    control_frame_timeout: Duration,
    /// Log filter (tracing env-filter syntax), also read from RUST_LOG.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

fn parse_ram(s: &str) -> Result<u64, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    if !(64 << 20..=boot::MAX_RAM).contains(&v) {
        return Err(format!("{s} is outside 64M..64G"));
    }
    if v % boot::RAM_ALIGN != 0 {
        return Err(format!("{s} is not a multiple of 2M"));
    }
    Ok(v)
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_backing(s: &str) -> Result<BackingKind, String> {
    s.parse()
}

fn parse_unit_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not between 0 and 1"))
    }
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v = parse_unit_interval(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("the working set must not be empty".into())
    }
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("faultline-vmm: error: {e:#}");
            // 77: this kernel lacks what was asked for (automake's "skipped"), so callers can
            // tell "cannot here" from "broken".
            let missing = e.chain().any(|c| {
                matches!(
                    c.downcast_ref::<memory::MemoryError>(),
                    Some(memory::MemoryError::MissingCapability { .. })
                ) || matches!(
                    c.downcast_ref::<vm::VmError>(),
                    Some(vm::VmError::Memory(
                        memory::MemoryError::MissingCapability { .. }
                    ))
                )
            });
            std::process::exit(if missing { 77 } else { 2 });
        }
    }
}

fn program_and_args(cli: &Cli) -> anyhow::Result<(Vec<u8>, Vec<u64>, Option<MemtouchArgs>)> {
    if cli.guest == "memtouch" {
        let mut args = match cli.pages_per_sec {
            Some(n) => MemtouchArgs::paced(
                n,
                guest::guest_tsc_khz().context("pacing memtouch needs the guest TSC rate")?,
            ),
            None => MemtouchArgs::preset(cli.dirty_rate),
        };
        if let Some(ws) = cli.working_set {
            args.working_set_permille = ((ws * 1000.0).round() as u64).clamp(1, 1000);
        }
        if let Some(w) = cli.write_intensity {
            args.writes_per_1024 = (w * 1024.0).round() as u64;
        }
        args.full_verify = cli.full_verify;
        if let Some(seed) = cli.seed {
            args.seed = seed;
        }
        if !cli.guest_args.is_empty() {
            bail!("--guest-arg is for --guest FILE programs; memtouch takes its own options");
        }
        Ok((guest::MEMTOUCH.to_vec(), args.to_args(), Some(args)))
    } else {
        if cli.prefill {
            bail!("--prefill is a memtouch option");
        }
        let program = std::fs::read(&cli.guest)
            .with_context(|| format!("cannot read guest program {}", cli.guest))?;
        Ok((program, cli.guest_args.clone(), None))
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let (program, args, memtouch) = program_and_args(&cli)?;
    let id = cli.vm_id.clone().unwrap_or_else(|| {
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        format!("{host}-{}", std::process::id())
    });
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .context("cannot install the SIGINT/SIGTERM handler")?;
    }
    // Refuse a socket in use before doing anything; listen only once the VM is ready (a
    // client that can connect may rely on the VM's state).
    if let Some(path) = cli.control.as_deref() {
        control::check_free(path)?;
    }

    let ram = RamMap::pc(
        cli.memory,
        cli.below_4g.unwrap_or(ram_map::DEFAULT_BELOW_4G),
    )?;
    let vm = Arc::new(
        Vm::new(VmConfig {
            id,
            vcpus: cli.vcpus,
            ram,
            backing: cli.backing,
            incoming: cli.incoming,
            program,
            args,
        })
        .context("cannot create the VM")?,
    );
    tracing::info!(
        vm = vm.id(),
        vcpus = cli.vcpus,
        memory = format_size(cli.memory),
        memslots = vm.memory().map().parts().len(),
        backing = %cli.backing,
        guest = cli.guest,
        incoming = cli.incoming,
        "VM created"
    );
    if let Some(mt) = memtouch.filter(|_| cli.prefill && !cli.incoming) {
        let started = Instant::now();
        mt.prefill(cli.memory, |offset, bytes| vm.memory().write(offset, bytes))
            .context("prefilling guest memory")?;
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            "memory prefilled"
        );
    }
    if !cli.incoming {
        vm.start();
    }
    if let Some(path) = cli.control.as_deref() {
        let listener = control::bind(path)?;
        control::serve(listener, vm.clone(), cli.control_frame_timeout)
            .context("cannot start the control server")?;
    }

    let started = Instant::now();
    let mut first_run: Option<Instant> = (!cli.incoming).then_some(started);
    let mut next_line = started + Duration::from_secs(1);
    let mut last_beats: Option<(Instant, u64)> = None;
    let end_reason = loop {
        vm.wait_for_change(Duration::from_millis(100));
        let state = vm.state();
        if state == VmState::Running && first_run.is_none() {
            first_run = Some(Instant::now());
        }
        if SIGNALLED.load(Ordering::SeqCst) {
            break "signal";
        }
        if vm.shutdown_requested() {
            break "shutdown request";
        }
        if state == VmState::Halted {
            break "all vCPUs halted";
        }
        if let (Some(limit), Some(t0)) = (cli.run_for, first_run)
            && t0.elapsed() >= limit
        {
            break "--run-for elapsed";
        }
        if !cli.quiet && Instant::now() >= next_line {
            next_line += Duration::from_secs(1);
            let status = vm.status();
            eprintln!("{}", status_line(&status, started, &mut last_beats));
        }
    };

    let _ = vm.pause();
    let status = vm.status();
    tracing::info!(reason = end_reason, "VM stopped");
    let failed_vcpus = status
        .vcpu_status
        .iter()
        .filter(|v| v.error.is_some())
        .count();
    let mut out = std::io::stdout().lock();
    if cli.json {
        serde_json::to_writer(&mut out, &status).context("cannot write the final status")?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", summary(&status, end_reason))?;
    }
    out.flush()?;
    Ok(if status.failures > 0 {
        1
    } else if failed_vcpus > 0 {
        3
    } else {
        0
    })
}

fn status_line(s: &VmStatus, started: Instant, last: &mut Option<(Instant, u64)>) -> String {
    let total: u64 = s.heartbeats.iter().sum();
    let now = Instant::now();
    let rate = last
        .map(|(t, b)| (total.saturating_sub(b)) as f64 / now.duration_since(t).as_secs_f64())
        .unwrap_or(0.0);
    *last = Some((now, total));
    let sweeps: Vec<String> = s
        .vcpu_status
        .iter()
        .map(|v| v.status_word.to_string())
        .collect();
    format!(
        "[{:>4}s] {:<8} heartbeats {:?} ({rate:.0}/s)  status {}  failures {}",
        started.elapsed().as_secs(),
        format!("{:?}", s.state).to_lowercase(),
        s.heartbeats,
        sweeps.join(","),
        s.failures
    )
}

fn summary(s: &VmStatus, reason: &str) -> String {
    let mut text = format!(
        "VM {} stopped ({reason}) after {:.1} s of running\n  heartbeats per vCPU: {:?}\n  guest status words: {:?}\n  verification failures: {}",
        s.vm_id,
        s.run_ms as f64 / 1000.0,
        s.heartbeats,
        s.vcpu_status
            .iter()
            .map(|v| v.status_word)
            .collect::<Vec<_>>(),
        s.failures
    );
    if !s.failed_pages.is_empty() {
        text.push_str(&format!(" (pages {:?})", s.failed_pages));
    }
    for v in &s.vcpu_status {
        if let Some(e) = &v.error {
            text.push_str(&format!("\n  vCPU {} failed: {e}", v.index));
        }
    }
    text
}
