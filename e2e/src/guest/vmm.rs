//! The reference VMM's KVM tests, run on the kernel under test: `faultline-vmm` runs memtouch
//! on each backing, and two VMMs hand a running VM over through the VMM protocol alone (the
//! target gets a copy of the source's memory through the descriptors from `hello`).
//!
//! Memory stays small (64 MiB): the nested KVM guest runs under QEMU's TCG emulator.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use faultline::guest_memory::GuestMemory;
use faultline::layout::{BackingKind, PAGE_SIZE};
use faultline::probe::backing_usable;
use faultline::sys::uffd::Userfaultfd;
use faultline::trap::kvm_userfault::UserfaultBitmap;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::{ErrorCode, Event, VmState, VmStatus};

use super::Outcome;

const MEMORY: &str = "64M";
const VCPUS: &str = "2";

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Waits for `child` up to `limit`, killing it when the time is up.
fn finish(mut child: Child, limit: Duration) -> Result<Output> {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for faultline-vmm")? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout).context("reading stdout")?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).context("reading stderr")?;
    }
    if status.is_none() {
        bail!("faultline-vmm still running after {limit:?}; stderr: {stderr}");
    }
    Ok(Output {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    })
}

fn final_status(out: &Output) -> Result<VmStatus> {
    let line = out.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| {
        format!(
            "faultline-vmm's final status is not JSON (exit {:?}): stdout {:?}, stderr {:?}",
            out.code, out.stdout, out.stderr
        )
    })
}

/// memtouch on `backing` for two seconds: every vCPU must beat and verify without failure.
pub fn memtouch(vmm: &Path, backing: BackingKind) -> Result<Outcome> {
    if let Err(reason) = backing_usable(backing) {
        return Ok(Outcome::Unavailable(reason));
    }
    let child = Command::new(vmm)
        .args(["--memory", MEMORY, "--vcpus", VCPUS, "--backing"])
        .arg(backing.as_str())
        .args(["--run-for", "2s", "--quiet", "--json", "--log", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", vmm.display()))?;
    let out = finish(child, Duration::from_secs(180))?;
    let status = final_status(&out)?;
    ensure!(
        out.code == Some(0),
        "faultline-vmm exited with {:?}: {status:?}; stderr {}",
        out.code,
        out.stderr
    );
    ensure!(status.failures == 0, "memtouch found damage: {status:?}");
    for v in &status.vcpu_status {
        ensure!(v.error.is_none(), "vCPU {} failed: {:?}", v.index, v.error);
        ensure!(v.heartbeats > 0, "vCPU {} never beat: {status:?}", v.index);
    }
    Ok(Outcome::Passed(format!(
        "{} vCPUs on {MEMORY} {backing}: heartbeats {:?}, sweeps {:?}, 0 failures in {} ms",
        status.vcpu_status.len(),
        status.heartbeats,
        status
            .vcpu_status
            .iter()
            .map(|v| v.status_word)
            .collect::<Vec<_>>(),
        status.run_ms
    )))
}

/// A running `faultline-vmm` with a control socket; killed when dropped.
struct Vmm {
    child: Option<Child>,
    socket: PathBuf,
}

impl Vmm {
    fn start(
        vmm: &Path,
        dir: &Path,
        name: &str,
        backing: BackingKind,
        incoming: bool,
    ) -> Result<Self> {
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(vmm);
        cmd.args(["--memory", MEMORY, "--vcpus", VCPUS, "--backing"])
            .arg(backing.as_str())
            .arg("--control")
            .arg(&socket)
            .args(["--quiet", "--json", "--log", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if incoming {
            cmd.arg("--incoming");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", vmm.display()))?;
        let mut me = Self {
            child: Some(child),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if let Some(c) = me.child.as_mut()
                && let Some(s) = c.try_wait().context("waiting for faultline-vmm")?
            {
                bail!("faultline-vmm {name} exited early with {s}");
            }
            ensure!(
                Instant::now() < deadline,
                "faultline-vmm {name}: no control socket after 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    fn client(&self) -> Result<VmmClient> {
        VmmClient::connect(&self.socket).context("connecting to faultline-vmm")
    }

    /// Shuts the VMM down and returns its final status and exit code.
    fn shutdown(mut self) -> Result<(VmStatus, Option<i32>)> {
        let _ = self.client()?.shutdown();
        let child = self.child.take().context("VMM already reaped")?;
        let out = finish(child, Duration::from_secs(60))?;
        Ok((final_status(&out)?, out.code))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_status(
    client: &mut VmmClient,
    limit: Duration,
    what: &str,
    done: impl Fn(&VmStatus) -> bool,
) -> Result<VmStatus> {
    let deadline = Instant::now() + limit;
    loop {
        let s = client.status().context("status")?;
        if done(&s) {
            return Ok(s);
        }
        ensure!(
            s.failures == 0,
            "memtouch found damage while waiting: {s:?}"
        );
        if Instant::now() >= deadline {
            bail!("{what}: not reached after {limit:?}: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Hand-over between two VMMs: A runs, pauses and saves; B (incoming) gets A's memory and
/// state, A is fenced, B resumes and keeps beating without verification failures.
pub fn handover(vmm: &Path, backing: BackingKind) -> Result<Outcome> {
    hand_over(vmm, backing, None)
}

/// The hand-over with KVM Userfault armed on the target and every page marked: the test plays
/// the sidecar, installs the first pages the vCPUs fault on (clear and wake), then stops
/// answering. Once every vCPU waits (as `status` must show, with the page), it disarms: the
/// waiting vCPUs must wake and run on, with no vCPU failed and no damage.
pub fn userfault_disarm_while_waiting(vmm: &Path, backing: BackingKind) -> Result<Outcome> {
    hand_over(vmm, backing, Some(SERVED_FAULTS))
}

/// Faults the userfault test installs before it stops answering.
const SERVED_FAULTS: usize = 16;

/// The target side of the KVM Userfault variant: the event channel, the shared bitmap and,
/// where the kernel has it, the host half (the VMM's RAM mapping in minor mode).
struct TargetTrap {
    events: VmmClient,
    bitmap: UserfaultBitmap,
    host: Option<Userfaultfd>,
}

/// Resolves every minor fault on the host half (all memory was copied, so every page is
/// valid) until `stop`; returns how many there were. KVM's own accesses to the memtouch
/// guest's memory are rare (instruction emulation), so this is usually zero.
fn serve_host_faults(uffd: &Userfaultfd, stop: &std::sync::atomic::AtomicBool) -> Result<u64> {
    use faultline::sys::uffd::Event as UffdEvent;
    let mut served = 0;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        let events = uffd
            .read_events(16)
            .context("reading the host userfaultfd")?;
        if events.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
        for e in events {
            if let UffdEvent::PageFault { address, .. } = e {
                let page = address & !(PAGE_SIZE - 1);
                match uffd.continue_range(page, PAGE_SIZE) {
                    Err(e) if e.errno() != Some(rustix::io::Errno::EXIST) => {
                        return Err(e).context("UFFDIO_CONTINUE");
                    }
                    _ => served += 1,
                }
            }
        }
    }
    Ok(served)
}

fn hand_over(vmm: &Path, backing: BackingKind, serve: Option<usize>) -> Result<Outcome> {
    if let Err(reason) = backing_usable(backing) {
        return Ok(Outcome::Unavailable(reason));
    }
    let dir = std::env::temp_dir().join(format!(
        "faultline-handover-{backing}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let a = Vmm::start(vmm, &dir, "source", backing, false)?;
    let b = Vmm::start(vmm, &dir, "target", backing, true)?;
    let (mut ca, mut cb) = (a.client()?, b.client()?);
    wait_status(
        &mut ca,
        Duration::from_secs(120),
        "source vCPUs beating",
        |s| s.vcpu_status.iter().all(|v| v.heartbeats >= 2),
    )?;
    let (hello_b, fds_b) = cb.hello("faultline-e2e").context("hello target")?;
    ensure!(
        hello_b.incoming && hello_b.state == VmState::Incoming,
        "target is not incoming: {hello_b:?}"
    );
    ensure!(
        ca.pause().context("pause source")? == VmState::Paused,
        "source did not pause"
    );
    let (hello_a, fds_a) = ca.hello("faultline-e2e").context("hello source")?;
    ensure!(
        hello_a.layout.compatible_with(&hello_b.layout),
        "layouts differ: {:?} vs {:?}",
        hello_a.layout,
        hello_b.layout
    );
    let mut trap = None;
    if serve.is_some() {
        let mut events = b.client()?;
        // With the host half where this kernel has it (Faultline's), and without otherwise.
        let (reply, fd, host) = match events.kvm_userfault_arm(true) {
            Ok(armed) => armed,
            Err(e)
                if e.refusal()
                    .is_some_and(|r| r.code == ErrorCode::Unavailable) =>
            {
                events = b.client()?;
                match events.kvm_userfault_arm(false) {
                    Ok(armed) => armed,
                    Err(e)
                        if e.refusal()
                            .is_some_and(|r| r.code == ErrorCode::Unavailable) =>
                    {
                        return Ok(Outcome::Unavailable(e.to_string()));
                    }
                    Err(e) => return Err(e).context("kvm_userfault_arm"),
                }
            }
            Err(e) => return Err(e).context("kvm_userfault_arm (host accesses)"),
        };
        let bitmap = UserfaultBitmap::open_shared(fd, reply.pages).context("mapping the bitmap")?;
        trap = Some(TargetTrap {
            events,
            bitmap,
            host: host.map(Userfaultfd::from),
        });
    }
    let (_, blob) = ca.save_state().context("save source state")?;
    let at_pause = ca.status().context("status source")?;
    let mem_a = GuestMemory::open(&hello_a.layout, fds_a).context("mapping source memory")?;
    let mem_b = GuestMemory::open(&hello_b.layout, fds_b).context("mapping target memory")?;
    let chunk = 256u64;
    let mut buf = vec![0u8; (chunk * PAGE_SIZE) as usize];
    let total = mem_a.total_pages();
    let mut page = 0;
    while page < total {
        let n = chunk.min(mem_a.contiguous_from(page)).max(1);
        let len = (n * PAGE_SIZE) as usize;
        mem_a
            .read(page, &mut buf[..len])
            .context("reading source memory")?;
        mem_b
            .write(page, &buf[..len])
            .context("writing target memory")?;
        page += n;
    }
    ensure!(
        cb.restore_state(&blob).context("restore target")? == VmState::Paused,
        "target not paused after restore"
    );
    ensure!(
        ca.fence().context("fence source")? == VmState::Fenced,
        "source not fenced"
    );
    ensure!(
        cb.resume().context("resume target")? == VmState::Running,
        "target not running"
    );
    let mut trap_note = String::new();
    if let (Some(t), Some(n)) = (trap.as_mut(), serve) {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (note, host_faults) = std::thread::scope(|s| -> Result<(String, Option<u64>)> {
            let server = t
                .host
                .as_ref()
                .map(|u| s.spawn(|| serve_host_faults(u, &stop)));
            let note = serve_then_disarm(&mut t.events, &t.bitmap, &mut cb, n);
            stop.store(true, std::sync::atomic::Ordering::Release);
            let host_faults = match server {
                Some(h) => Some(
                    h.join()
                        .map_err(|_| anyhow::anyhow!("host fault thread panicked"))??,
                ),
                None => None,
            };
            Ok((note?, host_faults))
        })?;
        trap_note = match host_faults {
            Some(n) => format!("{note}host half armed ({n} minor faults served); "),
            None => format!("{note}no host half on this kernel; "),
        };
    }
    let after = wait_status(
        &mut cb,
        Duration::from_secs(120),
        "target vCPUs beating on",
        |s| {
            s.vcpu_status
                .iter()
                .zip(&at_pause.vcpu_status)
                .all(|(v, p)| v.heartbeats >= p.heartbeats + 2)
        },
    )?;
    drop((ca, cb));
    let (final_a, _) = a.shutdown()?;
    ensure!(
        final_a.state == VmState::Fenced,
        "source ended {:?}, not fenced",
        final_a.state
    );
    let (final_b, code) = b.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        final_b.failures == 0 && code == Some(0),
        "target ended with exit {code:?}: {final_b:?}"
    );
    ensure!(
        final_b.vcpu_status.iter().all(|v| v.error.is_none()),
        "a target vCPU failed: {final_b:?}"
    );
    Ok(Outcome::Passed(format!(
        "{total} pages copied; {trap_note}heartbeats {:?} at pause → {:?} on the target, 0 failures",
        at_pause.heartbeats, after.heartbeats
    )))
}

/// Installs the first `n` faulted pages, lets every vCPU block on a marked page, checks that
/// `status` names the pages they wait for, and disarms. Returns a note for the result.
fn serve_then_disarm(
    events: &mut VmmClient,
    bitmap: &UserfaultBitmap,
    control: &mut VmmClient,
    n: usize,
) -> Result<String> {
    let vcpus = control.status().context("status")?.vcpu_status.len();
    let mut served = 0;
    while served < n {
        let Event::Userfault { page, .. } = events.next_event().context("userfault event")?;
        // The memory was copied in full: installing is clearing the bit and waking.
        if bitmap.clear(page) {
            bitmap.wake_page(page);
        }
        served += 1;
    }
    // A vCPU whose page was just cleared still shows as waiting until it wakes: wait until
    // every vCPU waits on a page that stays marked (nobody installs any more).
    let waiting = wait_status(
        control,
        Duration::from_secs(60),
        "every vCPU waiting for a marked page",
        |s| {
            s.vcpu_status
                .iter()
                .all(|v| v.waiting.is_some_and(|w| bitmap.is_marked(w.page)))
        },
    )?;
    let pages: Vec<u64> = waiting
        .vcpu_status
        .iter()
        .filter_map(|v| v.waiting.map(|w| w.page))
        .collect();
    ensure!(
        control
            .kvm_userfault_disarm()
            .context("kvm_userfault_disarm")?
            == VmState::Running,
        "target not running after disarming"
    );
    let after = wait_status(
        control,
        Duration::from_secs(60),
        "vCPUs released by disarming",
        |s| s.vcpu_status.iter().all(|v| v.waiting.is_none()),
    )?;
    ensure!(
        after.vcpu_status.iter().all(|v| v.error.is_none()),
        "a vCPU failed when the trap went away: {after:?}"
    );
    Ok(format!(
        "KVM Userfault: {served} faults served, then {vcpus} vCPUs waited on pages {pages:?} and were released by disarming; "
    ))
}
