//! The benchmark's peer: QEMU's own live migration of the same workload, on this machine and
//! in the same run as Faultline's (`faultline bench --peer qemu`).
//!
//! Both VMMs run the same guest: memtouch, which QEMU boots through the PC boot image
//! (`faultline_vmm::guest::PC_BOOT`), with the same memory, one vCPU, every page written
//! before the migration, and the same dirty rate, paced in pages per second by the guest's
//! TSC. This module runs QEMU's side of a comparison, says how Faultline's side is run, and
//! turns both into one kind of row; judging the ratios is the benchmark's job.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faultline::sidecar_api::LatencySummary;
use faultline_local::qemu::{Console, QemuProcess};
use faultline_vmm::guest::MemtouchArgs;
use serde::Serialize;
use serde_json::{Value, json};

use crate::demo::{self, DemoArgs, DirtyRate, ModeArg, Progress, Report, TransportArg};

/// The guest ABI's ports, as the PC boot image's console records carry them.
const PORT_HEARTBEAT: u8 = 0xF0;
const PORT_FAILURE: u8 = 0xF1;
const PORT_STATUS: u8 = 0xF2;
/// The longest a comparison waits for a guest to prefill its memory or a migration to end.
const PATIENCE: Duration = Duration::from_secs(600);
/// How often QEMU's migration state is polled.
const POLL: Duration = Duration::from_millis(10);

/// When a migration switches to post-copy, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Pre-copy until the rest fits the downtime budget.
    Precopy,
    /// Post-copy right after the start: no page is sent before the switch.
    PostcopyAtStart,
    /// One full pre-copy pass, then post-copy.
    PostcopyAfterFirstPass,
}

impl Strategy {
    pub const ALL: [Strategy; 3] = [
        Strategy::Precopy,
        Strategy::PostcopyAtStart,
        Strategy::PostcopyAfterFirstPass,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Self::Precopy => "pre-copy",
            Self::PostcopyAtStart => "post-copy at start",
            Self::PostcopyAfterFirstPass => "post-copy after 1 pass",
        }
    }
}

/// What both VMMs run in one comparison.
#[derive(Debug, Clone)]
pub struct Workload {
    pub memory: u64,
    /// Pages the guest rewrites per second (one vCPU).
    pub pages_per_sec: u64,
    /// The guest TSC's ticks per millisecond, which the pacing counts in.
    pub tsc_khz: u64,
    pub warmup: Duration,
    pub verify_for: Duration,
    /// The downtime budget both get (QEMU's `downtime-limit`, Faultline's `maxDowntimeMs`).
    pub max_downtime_ms: u64,
}

/// One migration of the comparison, in the same terms for both VMMs.
#[derive(Serialize, Debug, Clone)]
pub struct PeerRun {
    /// `faultline` or `qemu`.
    pub vmm: &'static str,
    pub strategy: Strategy,
    /// How the memory crossed: Faultline's TLS 1.3 default, QEMU's plain TCP default.
    pub transport: &'static str,
    pub pages_per_sec: u64,
    /// The guest's iterations per second just before the migration (each rewrites a page).
    pub rate_before_per_sec: f64,
    /// The same on the target over the verification (a guest well above its rate before has
    /// lost its pace there, and its time lost is not reported).
    pub rate_after_per_sec: f64,
    pub total_ms: f64,
    /// The pause at the switch-over, as the VMM reports it: pre-copy's stop-and-copy, or the
    /// stop before post-copy starts on the target.
    pub downtime_ms: f64,
    pub bytes_sent: u64,
    /// Bytes sent over the whole migration time.
    pub throughput_bytes_per_sec: f64,
    /// Pages the target asked for out of order (post-copy faults; QEMU: postcopy-requests).
    pub faults: u64,
    /// Faultline's per-fault latency (QEMU 7.2 reports none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_latency_us: Option<LatencySummary>,
    /// QEMU's postcopy-blocktime: the time the vCPU spent blocked on faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocktime_ms: Option<u64>,
    /// Guest time the migration cost (window from the start to the end of the verification,
    /// less the time its work takes at the rate before; one definition for both).
    pub guest_time_lost_ms: Option<f64>,
    pub guest_failures: u64,
    /// Full verification sweeps the guest completed on the target afterwards.
    pub sweeps_after: u64,
}

/// The `faultline demo` that is Faultline's side of a comparison.
pub fn faultline_args(w: &Workload, s: Strategy, backing: &str) -> DemoArgs {
    let (mode, passes) = match s {
        Strategy::Precopy => (ModeArg::Precopy, 8),
        Strategy::PostcopyAtStart => (ModeArg::Postcopy, 0),
        Strategy::PostcopyAfterFirstPass => (ModeArg::Postcopy, 1),
    };
    DemoArgs {
        memory: w.memory,
        below_4g: None,
        vcpus: 1,
        backing: backing.to_string(),
        mode,
        dirty_rate: DirtyRate::Heavy,
        pages_per_sec: Some(w.pages_per_sec),
        precopy_passes: Some(passes),
        max_downtime_ms: w.max_downtime_ms,
        prefill: true,
        warmup: w.warmup,
        verify_for: w.verify_for,
        transport: TransportArg::Tls,
        bandwidth_limit: 0,
        restart_target_sidecar: false,
        json: true,
    }
}

/// Faultline's side of a comparison, from its demo report.
pub fn faultline_row(r: &Report, w: &Workload, s: Strategy) -> anyhow::Result<PeerRun> {
    if r.result != "succeeded" || !r.guest.ok {
        bail!(
            "Faultline's {} migration failed: {}",
            s.describe(),
            serde_json::to_string(r)?
        );
    }
    Ok(PeerRun {
        vmm: "faultline",
        strategy: s,
        transport: r.transport.describe(),
        pages_per_sec: w.pages_per_sec,
        rate_before_per_sec: r.guest.rate_before_per_sec,
        rate_after_per_sec: r.guest.rate_after_per_sec,
        total_ms: r.total_ms,
        downtime_ms: r.downtime_ms.unwrap_or(0.0),
        bytes_sent: r.bytes_sent,
        throughput_bytes_per_sec: r.throughput_bytes_per_sec,
        faults: r.faults,
        fault_latency_us: (r.faults > 0).then_some(r.fault_latency_us),
        blocktime_ms: None,
        guest_time_lost_ms: r.guest.time_lost_ms,
        guest_failures: r.guest.failures,
        sweeps_after: r.guest.sweeps_after.iter().map(|&n| u64::from(n)).sum(),
    })
}

/// Runs Faultline's side of a comparison.
pub fn run_faultline(w: &Workload, s: Strategy, backing: &str) -> anyhow::Result<PeerRun> {
    let report = demo::migrate(&faultline_args(w, s, backing), false)?;
    faultline_row(&report, w, s)
}

fn last_heartbeat(c: &Console, before: Instant) -> anyhow::Result<Progress> {
    let r = c
        .last(PORT_HEARTBEAT, before)
        .context("the guest has not reported progress")?;
    Ok(Progress {
        at: r.at,
        iterations: u64::from(r.value),
    })
}

fn wait_until(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + PATIENCE;
    while !done()? {
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {} s", PATIENCE.as_secs());
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

fn number(v: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_u64()
}

/// Runs QEMU's side of a comparison: boots memtouch in a source QEMU, waits for it to fill
/// its memory, migrates it to a second QEMU with QEMU's own migration (the `strategy`), lets
/// it run and verify there, and reports.
pub fn run_qemu(w: &Workload, s: Strategy) -> anyhow::Result<PeerRun> {
    let mut args = MemtouchArgs::paced(w.pages_per_sec, w.tsc_khz);
    args.guest_prefill = true;
    let image = args.pc_boot_image()?;
    let mut src = QemuProcess::start("peer-src", w.memory, &image, false)?;
    // The first heartbeat comes once the guest has written every page.
    wait_until("the guest on QEMU to fill its memory", || {
        Ok(src.console.last(PORT_HEARTBEAT, Instant::now()).is_some())
    })?;
    let mut dst = QemuProcess::start("peer-dst", w.memory, &image, true)?;
    let postcopy = s != Strategy::Precopy;
    let capability = |name: &str, on: bool| json!({ "capability": name, "state": on });
    dst.qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [capability("postcopy-ram", postcopy), capability("postcopy-blocktime", postcopy)] }),
    )?;
    src.qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [capability("postcopy-ram", postcopy)] }),
    )?;
    // QEMU 7.2 caps migration at 32 MiB/s unless told otherwise; Faultline has no cap.
    src.qmp.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": w.max_downtime_ms }),
    )?;
    let uri = format!("tcp:127.0.0.1:{}", free_port()?);
    dst.qmp
        .execute("migrate-incoming", json!({ "uri": uri.clone() }))?;

    let before = last_heartbeat(&src.console, Instant::now())?;
    std::thread::sleep(w.warmup);
    let at_start = last_heartbeat(&src.console, Instant::now())?;
    src.qmp.execute("migrate", json!({ "uri": uri }))?;
    let mut switched = false;
    if s == Strategy::PostcopyAtStart {
        src.qmp.execute("migrate-start-postcopy", json!({}))?;
        switched = true;
    }
    let mut info = Value::Null;
    wait_until("QEMU's migration to end", || {
        info = src.qmp.execute("query-migrate", json!({}))?;
        // The second dirty-bitmap sync ends the first pass.
        if !switched
            && s == Strategy::PostcopyAfterFirstPass
            && number(&info, &["ram", "dirty-sync-count"]).unwrap_or(0) >= 2
        {
            src.qmp.execute("migrate-start-postcopy", json!({}))?;
            switched = true;
        }
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => Ok(true),
            Some(st @ ("failed" | "cancelled")) => bail!(
                "QEMU's migration {st}: {}",
                info.get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            ),
            _ => Ok(false),
        }
    })?;
    let verify_from = Instant::now();
    // The rate on the target is taken from a third into the verification, once the guest
    // has certainly reported there.
    std::thread::sleep(w.verify_for / 3);
    let settled = last_heartbeat(&dst.console, Instant::now())
        .context("the guest did not run on the target QEMU")?;
    std::thread::sleep(w.verify_for - w.verify_for / 3);
    let end = last_heartbeat(&dst.console, Instant::now())
        .context("the guest did not run on the target QEMU")?;
    let running = dst.qmp.execute("query-status", json!({}))?;
    let dst_info = dst.qmp.execute("query-migrate", json!({}))?;
    let paced = demo::guest_time_lost(before, at_start, settled, end);
    let count = |c: &Console, port: u8, from: Option<Instant>| {
        c.records()
            .iter()
            .filter(|r| r.port == port && from.is_none_or(|f| r.at >= f))
            .count() as u64
    };
    // Failures over the guest's whole life, on either host.
    let guest_failures =
        count(&src.console, PORT_FAILURE, None) + count(&dst.console, PORT_FAILURE, None);
    let sweeps_after = count(&dst.console, PORT_STATUS, Some(verify_from));
    let heartbeats_after = count(&dst.console, PORT_HEARTBEAT, Some(verify_from));
    if running.get("status").and_then(Value::as_str) != Some("running")
        || heartbeats_after == 0
        || guest_failures > 0
    {
        bail!(
            "the guest did not come through QEMU's {} migration intact: {guest_failures} verification failure(s), {heartbeats_after} heartbeat(s) on the target, its state {running}; QEMU's log: {}",
            s.describe(),
            dst.log()
        );
    }
    src.quit();
    dst.quit();
    let total_ms = number(&info, &["total-time"]).unwrap_or(0) as f64;
    let bytes_sent = number(&info, &["ram", "transferred"]).unwrap_or(0);
    Ok(PeerRun {
        vmm: "qemu",
        strategy: s,
        transport: "plaintext",
        pages_per_sec: w.pages_per_sec,
        rate_before_per_sec: paced.rate_before_per_sec,
        rate_after_per_sec: paced.rate_after_per_sec,
        total_ms,
        downtime_ms: number(&info, &["downtime"]).unwrap_or(0) as f64,
        bytes_sent,
        throughput_bytes_per_sec: bytes_sent as f64 / (total_ms / 1e3).max(1e-6),
        faults: number(&info, &["ram", "postcopy-requests"]).unwrap_or(0),
        fault_latency_us: None,
        blocktime_ms: number(&dst_info, &["postcopy-blocktime"]),
        guest_time_lost_ms: paced.lost_ms,
        guest_failures,
        sweeps_after,
    })
}
