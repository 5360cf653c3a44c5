//! Migrations between real VMMs through real sidecars on loopback: every mode on memfd and
//! anonymous memory with 1 and 2 vCPUs, the guest verified on the target afterwards; post-copy
//! at a heavy dirty rate; and the failure cases (target killed before commit, cancel during
//! pre-copy, wrong secret).

use std::time::{Duration, Instant};

use faultline::sidecar_api::{
    MigrationStatus, Mode, Phase, Policy, Role, StartMigration, Transport,
};
use faultline::vmm_protocol::messages::{VmState, VmStatus};
use faultline::wire::Secret;
use faultline_local::{SidecarProcess, VmmProcess};

fn kvm_available() -> bool {
    faultline_local::kvm_or_skip()
}

struct Side {
    vmm: VmmProcess,
    sidecar: SidecarProcess,
}

struct Pair {
    src: Side,
    dst: Side,
}

fn side(tag: &str, args: &[String]) -> Side {
    let vmm = VmmProcess::start(tag, args).expect("start VMM");
    let sidecar = SidecarProcess::start(tag, &vmm.socket).expect("start sidecar");
    Side { vmm, sidecar }
}

fn pair(tag: &str, vmm_args: &[&str]) -> Pair {
    let args: Vec<String> = vmm_args.iter().map(|s| s.to_string()).collect();
    let mut dst_args = args.clone();
    dst_args.push("--incoming".into());
    Pair {
        src: side(&format!("{tag}-src"), &args),
        dst: side(&format!("{tag}-dst"), &dst_args),
    }
}

fn request(
    id: &str,
    role: Role,
    peer: Option<String>,
    secret: &Secret,
    policy: &Policy,
) -> StartMigration {
    StartMigration {
        id: id.into(),
        role,
        peer,
        secret: secret.to_base64(),
        policy: policy.clone(),
    }
}

/// Starts the target, then the source; returns once the source's migration has started.
fn start(p: &Pair, id: &str, policy: &Policy, src_secret: &Secret, dst_secret: &Secret) {
    let t = p
        .dst
        .sidecar
        .client()
        .start(&request(id, Role::Target, None, dst_secret, policy))
        .expect("start target");
    assert_eq!(t.phase, Phase::Waiting);
    p.src
        .sidecar
        .client()
        .start(&request(
            id,
            Role::Source,
            Some(p.dst.sidecar.migration_addr()),
            src_secret,
            policy,
        ))
        .expect("start source");
}

fn wait_terminal(side: &Side, id: &str, timeout: Duration) -> MigrationStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = side.sidecar.client().status(id).expect("status");
        if s.phase.is_terminal() || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VMM's status now.
fn vmm_status(vmm: &VmmProcess) -> VmStatus {
    vmm.client()
        .expect("VMM client")
        .status()
        .expect("VMM status")
}

fn wait_status(vmm: &VmmProcess, timeout: Duration, pred: impl Fn(&VmStatus) -> bool) -> VmStatus {
    let mut c = vmm.client().expect("VMM client");
    let deadline = Instant::now() + timeout;
    loop {
        let s = c.status().expect("VMM status");
        if pred(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Migrates and checks both sides completed and the guest on the target verified every page
/// at least once after the migration (a full memtouch sweep on every vCPU) with no failure.
fn migrate_and_verify(
    tag: &str,
    backing: &str,
    vcpus: u32,
    policy: Policy,
    extra: &[&str],
) -> (MigrationStatus, MigrationStatus) {
    let n = vcpus.to_string();
    let mut args = vec!["--memory", "128M", "--vcpus", &n, "--backing", backing];
    args.extend_from_slice(extra);
    let mut p = pair(tag, &args);
    // Let the guest write a good part of its memory first.
    wait_status(&p.src.vmm, Duration::from_secs(30), |s| {
        s.vcpu_status.iter().all(|v| v.status_word >= 1)
    });
    let secret = Secret::generate().expect("secret");
    start(&p, tag, &policy, &secret, &secret);
    finish_and_verify(&mut p, tag)
}

/// Waits for both sides to complete, then checks the source VMM exited fenced and clean and the
/// guest on the target verified every page at least once more (a full memtouch sweep on every
/// vCPU) with no failure; shuts the target down.
fn finish_and_verify(p: &mut Pair, id: &str) -> (MigrationStatus, MigrationStatus) {
    let src = wait_terminal(&p.src, id, Duration::from_secs(120));
    let dst = wait_terminal(&p.dst, id, Duration::from_secs(30));
    assert_eq!(
        src.phase,
        Phase::Completed,
        "source: {src:#?}\n{}",
        p.src.sidecar.log()
    );
    assert_eq!(
        dst.phase,
        Phase::Completed,
        "target: {dst:#?}\n{}",
        p.dst.sidecar.log()
    );
    assert!(src.committed && dst.committed);
    assert_eq!(dst.progress.remaining_pages, 0);
    assert!(src.progress.downtime_ms.is_some());

    // The source VMM was told to exit, fenced; the guest found nothing wrong there either.
    let (final_src, _) = p
        .src
        .vmm
        .wait(Duration::from_secs(30))
        .expect("source VMM exits");
    assert_eq!(final_src.state, VmState::Fenced);
    assert_eq!(final_src.failures, 0);

    let at_end = vmm_status(&p.dst.vmm);
    assert_eq!(at_end.state, VmState::Running);
    let after = wait_status(&p.dst.vmm, Duration::from_secs(90), |s| {
        s.vcpu_status
            .iter()
            .zip(&at_end.vcpu_status)
            .all(|(v, a)| v.status_word > a.status_word)
    });
    for (v, a) in after.vcpu_status.iter().zip(&at_end.vcpu_status) {
        assert!(
            v.status_word > a.status_word,
            "vCPU {} did not complete a sweep on the target",
            v.index
        );
        assert!(v.heartbeats > a.heartbeats);
    }
    assert_eq!(
        after.failures, 0,
        "the guest found damage after migrating: {:?}",
        after.failed_pages
    );
    let (final_dst, code) = p.dst.vmm.shutdown().expect("target VMM shutdown");
    assert_eq!(final_dst.failures, 0);
    assert_eq!(code, 0);
    (src, dst)
}

fn policy(mode: Mode, passes: u32) -> Policy {
    Policy {
        mode,
        precopy_passes: passes,
        ..Policy::default()
    }
}

/// Migrates a `vcpus`-vCPU guest on `backing` memory in `mode` and checks what the mode
/// promises about traps and faults.
fn mode_test(tag: &str, backing: &str, vcpus: u32, mode: Mode, passes: u32) {
    if !kvm_available() {
        return;
    }
    let (src, dst) = migrate_and_verify(tag, backing, vcpus, policy(mode, passes), &[]);
    if mode == Mode::PreCopy {
        assert_eq!(src.progress.faults, 0, "pre-copy never faults");
        assert!(src.trap.is_none());
    }
    if mode == Mode::PostCopy {
        assert!(dst.trap.is_some());
    }
}

/// For each mode, a module of four tests: memfd and anonymous memory, 1 and 2 vCPUs.
macro_rules! mode_tests {
    ($($mode_name:ident: $mode:expr, $passes:expr;)*) => {$(
        mod $mode_name {
            use super::*;
            backings!($mode_name, $mode, $passes; memfd_1 "memfd" 1, memfd_2 "memfd" 2, anon_1 "anon" 1, anon_2 "anon" 2);
        }
    )*};
}

macro_rules! backings {
    ($mode_name:ident, $mode:expr, $passes:expr; $($test:ident $backing:literal $vcpus:literal),*) => {$(
        #[test]
        fn $test() {
            let tag = concat!(stringify!($mode_name), "_", stringify!($test));
            mode_test(tag, $backing, $vcpus, $mode, $passes);
        }
    )*};
}

mode_tests! {
    precopy: Mode::PreCopy, 8;
    postcopy: Mode::PostCopy, 1;
    hybrid: Mode::Hybrid, 8;
}

/// Pure post-copy of a guest that rewrites a page on every iteration: vCPUs fault while the
/// background push streams the same pages, so installs race and every page must still be
/// installed exactly once with the right contents.
#[test]
fn postcopy_heavy_dirty_rate_races_the_push() {
    if !kvm_available() {
        return;
    }
    for backing in ["memfd", "anon"] {
        let (src, dst) = migrate_and_verify(
            &format!("heavy-{backing}"),
            backing,
            2,
            policy(Mode::PostCopy, 0),
            &["--dirty-rate", "heavy"],
        );
        assert_eq!(src.progress.precopy_rounds, 0);
        assert!(
            dst.progress.faults > 0,
            "a guest running on missing memory must fault"
        );
        assert!(dst.progress.fault_latency_us.max > 0);
        assert_eq!(
            dst.progress.transferred_pages,
            src.progress.transferred_pages
        );
    }
}

/// RAM split around the hole below 4 GiB as a PC splits it (here at 64 MiB): two memslots,
/// the second at guest-physical 4 GiB. A hybrid migration reads KVM's dirty log of both slots
/// in its pre-copy passes, then the guest faults on pages of both during post-copy.
#[test]
fn ram_split_around_the_4g_hole_migrates() {
    if !kvm_available() {
        return;
    }
    for backing in ["memfd", "anon"] {
        let (src, dst) = migrate_and_verify(
            &format!("split-{backing}"),
            backing,
            2,
            policy(Mode::Hybrid, 2),
            &["--below-4g", "64M", "--dirty-rate", "heavy"],
        );
        assert!(src.progress.precopy_rounds >= 1, "{src:#?}");
        assert!(dst.trap.is_some());
        assert_eq!(
            dst.progress.transferred_pages,
            src.progress.transferred_pages
        );
    }
}

/// A target VMM whose RAM is laid out differently (one memslot where the source has two) is
/// refused before any page moves, and the source runs on.
#[test]
fn a_target_with_another_ram_layout_is_refused() {
    if !kvm_available() {
        return;
    }
    let tag = "layout";
    let src_args: Vec<String> = ["--memory", "128M", "--below-4g", "64M"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dst_args: Vec<String> = ["--memory", "128M", "--incoming"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = Pair {
        src: side(&format!("{tag}-src"), &src_args),
        dst: side(&format!("{tag}-dst"), &dst_args),
    };
    let secret = Secret::generate().expect("secret");
    start(&p, tag, &policy(Mode::PreCopy, 8), &secret, &secret);
    let s = wait_terminal(&p.src, tag, Duration::from_secs(60));
    assert_eq!(s.phase, Phase::Failed, "{s:#?}");
    assert!(s.message.contains("layouts differ"), "{}", s.message);
    assert!(!s.committed);
    assert_eq!(s.progress.transferred_pages, 0);
    assert_source_keeps_running(&p);
}

/// A pre-copy that stays in its first pass for many seconds, whatever the load on the host:
/// its bandwidth is capped (256 MiB at 16 MB/s is 16 s), and it could not converge anyway.
fn endless_precopy() -> Policy {
    Policy {
        mode: Mode::PreCopy,
        precopy_passes: 1000,
        max_downtime_ms: 1,
        bandwidth_limit: 16_000_000,
        ..Policy::default()
    }
}

/// Waits until the source has sent some pages of its first pass.
fn wait_precopy_underway(side: &Side, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = side.sidecar.client().status(id).expect("status");
        assert!(!s.phase.is_terminal(), "ended early: {s:#?}");
        if s.phase == Phase::PreCopy && s.progress.transferred_pages > 1000 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pre-copy never got going: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pair whose migration `tag` is well into a long pre-copy pass.
fn in_endless_precopy(tag: &str) -> Pair {
    let p = pair(
        tag,
        &[
            "--memory",
            "256M",
            "--vcpus",
            "2",
            "--dirty-rate",
            "heavy",
            "--prefill",
        ],
    );
    let secret = Secret::generate().expect("secret");
    start(&p, tag, &endless_precopy(), &secret, &secret);
    wait_precopy_underway(&p.src, tag);
    p
}

/// The source VM is running, has not been fenced, and its guest is healthy.
fn assert_source_keeps_running(p: &Pair) {
    let a = vmm_status(&p.src.vmm);
    assert_eq!(a.state, VmState::Running, "{a:?}");
    let b = wait_status(&p.src.vmm, Duration::from_secs(20), |s| {
        s.heartbeats.iter().zip(&a.heartbeats).all(|(x, y)| x > y)
    });
    assert!(
        b.heartbeats.iter().zip(&a.heartbeats).all(|(x, y)| x > y),
        "source guest stalled"
    );
    assert_eq!(b.failures, 0);
}

#[test]
fn target_killed_before_commit_leaves_the_source_running() {
    if !kvm_available() {
        return;
    }
    let mut p = in_endless_precopy("killed");
    // The whole target pod dies.
    drop(std::mem::replace(
        &mut p.dst.sidecar,
        SidecarProcess::start("killed-spare", &p.src.vmm.socket).expect("spare"),
    ));
    p.dst.vmm.kill();
    let s = wait_terminal(&p.src, "killed", Duration::from_secs(60));
    assert_eq!(s.phase, Phase::Failed, "{s:#?}");
    assert!(!s.committed && !s.vm_lost);
    assert!(s.message.contains("keeps running"), "{}", s.message);
    assert_source_keeps_running(&p);
    let (last, code) = p.src.vmm.shutdown().expect("shutdown");
    assert_eq!(last.failures, 0);
    assert_eq!(code, 0);
}

#[test]
fn cancel_during_precopy_leaves_the_source_running() {
    if !kvm_available() {
        return;
    }
    let mut p = in_endless_precopy("cancel");
    let c = p
        .src
        .sidecar
        .client()
        .cancel("cancel")
        .expect("cancel accepted");
    assert!(!c.committed);
    let s = wait_terminal(&p.src, "cancel", Duration::from_secs(60));
    assert_eq!(s.phase, Phase::Cancelled, "{s:#?}");
    let t = wait_terminal(&p.dst, "cancel", Duration::from_secs(30));
    assert!(
        matches!(t.phase, Phase::Cancelled | Phase::Failed),
        "{t:#?}"
    );
    assert!(!t.committed);
    assert_source_keeps_running(&p);
    // Cancelling twice, or something finished, is refused.
    let again = p
        .src
        .sidecar
        .client()
        .cancel("cancel")
        .expect_err("second cancel");
    assert_eq!(again.status(), Some(409));
    // The target VM never ran (it may have been prepared, if the cancel came at switch-over).
    let dst = vmm_status(&p.dst.vmm);
    assert_ne!(dst.state, VmState::Running);
    assert_eq!(dst.run_ms, 0, "the target VM ran: {dst:?}");
    let (last, _) = p.src.vmm.shutdown().expect("shutdown");
    assert_eq!(last.failures, 0);
}

/// A source with the wrong secret gets nowhere: over TLS (the default) its handshake fails,
/// because the secret derives the identities both sides pin; over plaintext (by policy) the
/// wire handshake's proof fails. Either way nothing moves and the target's migration goes on.
#[test]
fn wrong_secret_is_rejected_at_the_handshake() {
    if !kvm_available() {
        return;
    }
    for (transport, named) in [
        (Transport::Tls, "TLS handshake"),
        (Transport::Plaintext, "secret"),
    ] {
        let p = pair("secret", &["--memory", "64M", "--vcpus", "1"]);
        let (good, bad) = (
            Secret::generate().expect("secret"),
            Secret::generate().expect("secret"),
        );
        let pol = Policy {
            transport,
            ..policy(Mode::Hybrid, 4)
        };
        start(&p, "secret", &pol, &bad, &good);
        let s = wait_terminal(&p.src, "secret", Duration::from_secs(30));
        assert_eq!(s.phase, Phase::Failed);
        assert_eq!(s.transport, transport);
        assert!(
            s.error.as_deref().unwrap_or("").contains(named),
            "{transport:?}: the error names the {named}: {s:#?}"
        );
        assert_eq!(s.progress.transferred_pages, 0);
        // The target records the refusal on its own thread, which may come after the source
        // has already given up.
        let deadline = Instant::now() + Duration::from_secs(10);
        let t = loop {
            let t = p.dst.sidecar.client().status("secret").expect("status");
            if t.message.contains("refused") || Instant::now() > deadline {
                break t;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(
            t.progress.transferred_pages, 0,
            "nothing reached the target"
        );
        assert!(
            !t.phase.is_terminal(),
            "an impostor cannot end the target's migration"
        );
        assert!(t.message.contains("refused"), "{}", t.message);
        assert_source_keeps_running(&p);
    }
}

/// What a sidecar answers before it has joined a VMM: no KVM involved, so never skipped.
/// Requests are checked in full before the VM is consulted; a valid one is refused with 503.
#[test]
fn requests_are_checked_without_a_vmm() {
    let nowhere =
        std::env::temp_dir().join(format!("faultline-no-vmm-{}.sock", std::process::id()));
    let sidecar = SidecarProcess::spawn("no-vmm", &nowhere).expect("start sidecar");
    let c = sidecar.client();
    assert!(!c.ready(), "not ready without a VMM");
    let secret = Secret::generate().expect("secret");
    let status = |req: &StartMigration| c.start(req).unwrap_err().status();
    let peer = Some("127.0.0.1:1".to_string());
    assert_eq!(
        status(&request(
            "x",
            Role::Source,
            None,
            &secret,
            &Policy::default()
        )),
        Some(400)
    );
    let mut bad_id = request("a b", Role::Target, None, &secret, &Policy::default());
    assert_eq!(status(&bad_id), Some(400));
    bad_id.id = "x".into();
    bad_id.secret = "c2hvcnQ=".into();
    assert_eq!(status(&bad_id), Some(400));
    let bad_policy = Policy {
        max_downtime_ms: 0,
        ..Policy::default()
    };
    assert_eq!(
        status(&request(
            "x",
            Role::Source,
            peer.clone(),
            &secret,
            &bad_policy
        )),
        Some(400)
    );
    assert_eq!(
        status(&request(
            "x",
            Role::Target,
            peer,
            &secret,
            &Policy::default()
        )),
        Some(400)
    );
    // Well formed, but there is no VM to migrate.
    assert_eq!(
        status(&request(
            "x",
            Role::Target,
            None,
            &secret,
            &Policy::default()
        )),
        Some(503)
    );
    assert_eq!(c.status("x").unwrap_err().status(), Some(404));
    assert_eq!(c.cancel("x").unwrap_err().status(), Some(404));
    let node = c.node().expect("node");
    assert!(node.vm.is_none());
    assert_eq!(
        node.trap_backends.len(),
        6,
        "every backing and backend is probed"
    );
    let metrics = c.metrics().expect("metrics");
    assert!(
        metrics.contains("faultline_sidecar_vmm_connected 0"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_are_refused() {
    if !kvm_available() {
        return;
    }
    let p = pair("badreq", &["--memory", "64M", "--vcpus", "1"]);
    let secret = Secret::generate().expect("secret");
    let c = p.src.sidecar.client();
    // A source needs a peer; a target is refused on a running VM; secrets must be long.
    let no_peer = request("x", Role::Source, None, &secret, &Policy::default());
    assert_eq!(c.start(&no_peer).unwrap_err().status(), Some(400));
    let wrong_role = request("x", Role::Target, None, &secret, &Policy::default());
    assert_eq!(c.start(&wrong_role).unwrap_err().status(), Some(409));
    let mut short = request(
        "x",
        Role::Source,
        Some("127.0.0.1:1".into()),
        &secret,
        &Policy::default(),
    );
    short.secret = "c2hvcnQ=".into();
    assert_eq!(c.start(&short).unwrap_err().status(), Some(400));
    let bad_policy = request(
        "x",
        Role::Source,
        Some("127.0.0.1:1".into()),
        &secret,
        &Policy {
            max_downtime_ms: 0,
            ..Policy::default()
        },
    );
    assert_eq!(c.start(&bad_policy).unwrap_err().status(), Some(400));
    assert_eq!(c.status("nope").unwrap_err().status(), Some(404));
    let node = c.node().expect("node");
    assert!(node.vm.is_some());
    assert!(!node.trap_backends.is_empty());
}

/// Pure post-copy with a capped push, which keeps post-copy going for seconds (256 MiB at
/// 32 MB/s): time to break things in the middle of it.
fn capped_postcopy() -> Policy {
    Policy {
        mode: Mode::PostCopy,
        precopy_passes: 0,
        bandwidth_limit: 32_000_000,
        ..Policy::default()
    }
}

/// A TCP forwarder standing in for the network between the sidecars, whose connections the
/// test can cut while new ones still get through.
struct Proxy {
    addr: String,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let conns = live.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                conns.lock().expect("proxy list").extend([c2, s2]);
                pipe(
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                pipe(server, client);
            }
        });
        Self { addr, live }
    }

    /// Cuts every connection open now.
    fn sever(&self) -> usize {
        let mut live = self.live.lock().expect("proxy list");
        for s in live.iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let n = live.len();
        live.clear();
        n
    }
}

/// The link breaks in the middle of post-copy, when the VM already runs on the target and
/// only the source holds the rest of its memory: vCPUs that need missing pages wait, the source
/// reconnects, the target says what it still needs, and the migration completes with the
/// guest intact.
#[test]
fn postcopy_survives_a_broken_link() {
    if !kvm_available() {
        return;
    }
    let mut p = pair("relink", &["--memory", "256M", "--vcpus", "2", "--prefill"]);
    let proxy = Proxy::start(p.dst.sidecar.migration_addr());
    let secret = Secret::generate().expect("secret");
    let policy = capped_postcopy();
    p.dst
        .sidecar
        .client()
        .start(&request("relink", Role::Target, None, &secret, &policy))
        .expect("start target");
    p.src
        .sidecar
        .client()
        .start(&request(
            "relink",
            Role::Source,
            Some(proxy.addr.clone()),
            &secret,
            &policy,
        ))
        .expect("start source");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = p.src.sidecar.client().status("relink").expect("status");
        assert!(!s.phase.is_terminal(), "ended before the cut: {s:#?}");
        if s.phase == Phase::PostCopy && s.progress.transferred_pages > 8000 {
            break;
        }
        assert!(Instant::now() < deadline, "post-copy never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.sever() >= 4, "both channels were open");
    let (src, dst) = finish_and_verify(&mut p, "relink");
    assert!(src.progress.reconnects >= 1 && dst.progress.reconnects >= 1);
    assert!(!src.vm_lost && !dst.vm_lost);
    // The target exported how long its oldest fault waited, and nothing waits any more.
    let metrics = p.dst.sidecar.client().metrics().expect("target metrics");
    assert!(
        metrics.contains("faultline_sidecar_oldest_fault_wait_seconds 0.0"),
        "{metrics}"
    );
}

/// The target sidecar dies (SIGKILL, as when its container is killed) in the middle of
/// post-copy, when the VM runs on the target and the source holds the rest of its memory.
/// vCPUs that touch missing pages wait on the trap, which the VMM keeps armed. The sidecar,
/// restarted on the same ports, finds its migration record, takes the trap over from the VMM
/// (`trap_rejoin`), learns which pages are still missing, lets the source reconnect, and
/// finishes; the guest verifies every page afterwards.
#[test]
fn a_target_sidecar_restarted_mid_postcopy_rejoins_and_finishes() {
    if !kvm_available() {
        return;
    }
    for backing in ["memfd", "anon"] {
        let tag = format!("rejoin-{backing}");
        let mut p = pair(
            &tag,
            &[
                "--memory",
                "256M",
                "--vcpus",
                "2",
                "--prefill",
                "--dirty-rate",
                "heavy",
                "--backing",
                backing,
            ],
        );
        let secret = Secret::generate().expect("secret");
        let policy = capped_postcopy();
        start(&p, &tag, &policy, &secret, &secret);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = p.src.sidecar.client().status(&tag).expect("status");
            let d = p.dst.sidecar.client().status(&tag).expect("status");
            assert!(!s.phase.is_terminal(), "ended before the kill: {s:#?}");
            if d.phase == Phase::PostCopy && d.progress.faults > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "post-copy never got going");
            std::thread::sleep(Duration::from_millis(20));
        }
        p.dst
            .sidecar
            .restart(Duration::from_secs(1))
            .expect("restart the target sidecar");
        let rejoined = p.dst.sidecar.client().status(&tag).expect("status");
        assert!(rejoined.committed, "{rejoined:#?}");
        assert!(!rejoined.phase.is_terminal(), "{rejoined:#?}");
        let (src, dst) = finish_and_verify(&mut p, &tag);
        assert!(src.progress.reconnects >= 1 && dst.progress.reconnects >= 1);
        assert!(!src.vm_lost && !dst.vm_lost);
        assert!(
            p.dst.sidecar.log().contains("rejoining it"),
            "{}",
            p.dst.sidecar.log()
        );
    }
}

/// A target sidecar that dies before its VM arrived (before the commit point, so the source
/// keeps the VM) does not rejoin anything when it comes back: it drops its record and knows
/// no migration.
#[test]
fn a_restarted_target_whose_vm_never_arrived_rejoins_nothing() {
    if !kvm_available() {
        return;
    }
    let mut p = pair("norejoin", &["--memory", "64M", "--vcpus", "1"]);
    let secret = Secret::generate().expect("secret");
    p.dst
        .sidecar
        .client()
        .start(&request(
            "norejoin",
            Role::Target,
            None,
            &secret,
            &policy(Mode::PostCopy, 0),
        ))
        .expect("start target");
    p.dst
        .sidecar
        .restart(Duration::from_millis(100))
        .expect("restart the target sidecar");
    let e = p
        .dst
        .sidecar
        .client()
        .status("norejoin")
        .expect_err("no migration after the restart");
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(
        p.dst
            .sidecar
            .log()
            .contains("it never reached its commit point"),
        "{}",
        p.dst.sidecar.log()
    );
    assert_eq!(vmm_status(&p.dst.vmm).state, VmState::Incoming);
}

/// Only the operator drives a sidecar. A stranger asks the source to migrate its VM to a
/// listener the stranger owns, lists migrations and cancels: without a client certificate it
/// gets 401; with a certificate from another CA, an expired operator certificate, or the
/// namespace's own sidecar certificate (which every VM pod mounts) it gets 403. Nothing
/// starts, nothing reaches the stranger's listener, and the VM runs on untouched.
#[test]
fn strangers_cannot_drive_a_sidecar() {
    use faultline::tls::control::{Credentials, client_config};
    use faultline::tls::pki::{Ca, OPERATOR_NAME, Usage};
    use faultline_local::{ClientTls, SidecarClient};

    if !kvm_available() {
        return;
    }
    let p = pair("strangers", &["--memory", "64M", "--vcpus", "1"]);
    let pki = faultline_local::pki::local().expect("local PKI");
    let trap = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    trap.set_nonblocking(true).expect("nonblocking");
    let hour = Duration::from_secs(3600);
    let as_client = |identity: Option<(&str, &str)>| {
        let config = client_config(&pki.ca.cert_pem, identity).expect("config");
        SidecarClient::with_tls(
            &p.src.sidecar.api,
            ClientTls::for_namespace(config, faultline_local::pki::NAMESPACE).expect("tls"),
        )
    };
    let foreign = Ca::generate(hour)
        .expect("CA")
        .issue(OPERATOR_NAME, Usage::Client, hour)
        .expect("cert");
    let expired = pki
        .ca
        .issue(OPERATOR_NAME, Usage::Client, Duration::from_secs(1))
        .expect("cert");
    let sidecar = Credentials::load(pki.sidecar_dir()).expect("sidecar credentials");
    std::thread::sleep(Duration::from_secs(2));
    let secret = Secret::generate().expect("secret");
    let steal = request(
        "steal",
        Role::Source,
        Some(trap.local_addr().expect("addr").to_string()),
        &secret,
        &policy(Mode::PreCopy, 1),
    );
    let body = serde_json::to_vec(&steal).expect("json");
    for (who, client, code) in [
        ("anonymous", as_client(None), 401),
        (
            "another CA",
            as_client(Some((&foreign.cert_pem, &foreign.key_pem))),
            403,
        ),
        (
            "expired",
            as_client(Some((&expired.cert_pem, &expired.key_pem))),
            403,
        ),
        (
            "the sidecar's own certificate",
            as_client(Some((&sidecar.cert_pem, &sidecar.key_pem))),
            403,
        ),
    ] {
        for (method, path, body) in [
            ("POST", "/v1/migrations", Some(body.as_slice())),
            ("GET", "/v1/migrations", None),
            ("GET", "/v1/node", None),
            ("POST", "/v1/migrations/steal/cancel", None),
        ] {
            let (status, answer) = client.request(method, path, body).expect("an answer");
            assert_eq!(status, code, "{who}: {method} {path}: {answer}");
        }
        // What stays open stays open.
        let (status, _) = client.request("GET", "/healthz", None).expect("healthz");
        assert_eq!(status, 200, "{who}");
    }
    assert!(
        p.src.sidecar.client().list().expect("list").is_empty(),
        "a refused request started something"
    );
    assert!(
        trap.accept().is_err(),
        "the stranger's listener was dialled"
    );
    let metrics = p.src.sidecar.client().metrics().expect("metrics");
    assert!(
        metrics.contains("faultline_sidecar_refused_requests_total 16"),
        "{metrics}"
    );
    assert_source_keeps_running(&p);
}

/// The attacker process (`faultline-attacker relay`) between the sidecars; its address.
struct Attacker {
    child: std::process::Child,
    addr: String,
}

impl Attacker {
    fn relay(to: &str, extra: &[String]) -> Self {
        let mut child = std::process::Command::new(
            faultline_local::binary("faultline-attacker").expect("faultline-attacker"),
        )
        .args(["relay", "--to", to])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the attacker");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the attacker's address");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        let addr = v["listen"].as_str().expect("listen").to_string();
        Self { child, addr }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_via(p: &Pair, id: &str, policy: &Policy, secret: &Secret, peer: &str) {
    p.dst
        .sidecar
        .client()
        .start(&request(id, Role::Target, None, secret, policy))
        .expect("start target");
    p.src
        .sidecar
        .client()
        .start(&request(
            id,
            Role::Source,
            Some(peer.to_string()),
            secret,
            policy,
        ))
        .expect("start source");
}

/// One bit flipped by an attacker on the path, before the point of no return: TLS detects it
/// (the record fails authentication), the connection ends, the migration fails, the source
/// VM runs on untouched and the target VM never runs.
#[test]
fn a_flipped_bit_before_the_commit_point_fails_the_migration_and_the_source_runs_on() {
    if !kvm_available() {
        return;
    }
    let p = pair(
        "flip-pre",
        &[
            "--memory",
            "256M",
            "--vcpus",
            "2",
            "--dirty-rate",
            "heavy",
            "--prefill",
        ],
    );
    // 4 MiB into the main channel: pre-copy pages.
    let attacker = Attacker::relay(
        &p.dst.sidecar.migration_addr(),
        &["--flip-at".into(), (4u64 << 20).to_string()],
    );
    let secret = Secret::generate().expect("secret");
    start_via(&p, "flip-pre", &endless_precopy(), &secret, &attacker.addr);
    let s = wait_terminal(&p.src, "flip-pre", Duration::from_secs(60));
    let t = wait_terminal(&p.dst, "flip-pre", Duration::from_secs(30));
    assert_eq!(s.phase, Phase::Failed, "{s:#?}");
    assert!(!s.committed && !t.committed);
    assert!(t.phase.is_terminal(), "{t:#?}");
    let why = format!("{:?} {:?}", t.error, s.error);
    assert!(
        why.to_lowercase().contains("decrypt")
            || why.contains("BadRecordMac")
            || why.contains("alert"),
        "the failure names the TLS integrity check: {why}"
    );
    assert_source_keeps_running(&p);
    let dst = vmm_status(&p.dst.vmm);
    assert_eq!(dst.run_ms, 0, "the target VM ran: {dst:?}");
}

/// One bit flipped after the point of no return, in post-copy: TLS detects it, the link
/// breaks, the source reconnects (the attacker tampers only once) and resends what the target
/// still needs; nothing corrupt was installed, which the guest verifies on every page.
#[test]
fn a_flipped_bit_after_the_commit_point_breaks_the_link_and_nothing_corrupt_is_installed() {
    if !kvm_available() {
        return;
    }
    let mut p = pair(
        "flip-post",
        &["--memory", "256M", "--vcpus", "2", "--prefill"],
    );
    // 16 MiB into the main channel: past the switch-over, in the background push.
    let attacker = Attacker::relay(
        &p.dst.sidecar.migration_addr(),
        &["--flip-at".into(), (16u64 << 20).to_string()],
    );
    let secret = Secret::generate().expect("secret");
    let policy = Policy {
        mode: Mode::PostCopy,
        precopy_passes: 0,
        bandwidth_limit: 64_000_000,
        ..Policy::default()
    };
    start_via(&p, "flip-post", &policy, &secret, &attacker.addr);
    let (src, dst) = finish_and_verify(&mut p, "flip-post");
    assert!(
        src.progress.reconnects + dst.progress.reconnects >= 1,
        "the tampered link was not replaced: {src:#?} {dst:#?}"
    );
    drop(attacker);
}

/// A handshake recorded on the path and sent again, to a target waiting for a migration with
/// the very same id and secret: TLS 1.3's fresh keys make it worthless; refused, nothing moves.
#[test]
fn a_replayed_handshake_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("faultline-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let recording = dir.join("first-connection.bin");
    let secret = Secret::generate().expect("secret");
    let pol = policy(Mode::PreCopy, 2);
    {
        let mut p = pair("replay-1", &["--memory", "64M", "--vcpus", "1"]);
        let attacker = Attacker::relay(
            &p.dst.sidecar.migration_addr(),
            &["--record".into(), recording.display().to_string()],
        );
        start_via(&p, "replayed", &pol, &secret, &attacker.addr);
        finish_and_verify(&mut p, "replayed");
    }
    let recorded = std::fs::read(&recording).expect("the recording");
    assert!(recorded.len() > 1000, "recorded {} bytes", recorded.len());

    let p = pair("replay-2", &["--memory", "64M", "--vcpus", "1"]);
    p.dst
        .sidecar
        .client()
        .start(&request("replayed", Role::Target, None, &secret, &pol))
        .expect("start target");
    let out = std::process::Command::new(
        faultline_local::binary("faultline-attacker").expect("faultline-attacker"),
    )
    .args(["replay", "--to", &p.dst.sidecar.migration_addr(), "--from"])
    .arg(&recording)
    .output()
    .expect("replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = p.dst.sidecar.client().status("replayed").expect("status");
    assert_eq!(t.progress.transferred_pages, 0, "{t:#?}");
    assert!(!t.phase.is_terminal() && !t.committed, "{t:#?}");
    assert!(t.message.contains("refused"), "{}", t.message);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer holding the complete credentials of another migration (its id and its secret,
/// which the operator derives per migration) dials a target that waits for a different one:
/// its identity is pinned to neither, so the TLS handshake fails. Nothing moves, and the
/// target still waits for its own source.
#[test]
fn a_peer_with_another_migrations_credentials_is_refused() {
    if !kvm_available() {
        return;
    }
    let p = pair("other-creds", &["--memory", "64M", "--vcpus", "1"]);
    let pol = policy(Mode::PreCopy, 2);
    let (victim, other) = (
        Secret::generate().expect("secret"),
        Secret::generate().expect("secret"),
    );
    p.dst
        .sidecar
        .client()
        .start(&request("victim", Role::Target, None, &victim, &pol))
        .expect("start target");
    p.src
        .sidecar
        .client()
        .start(&request(
            "other",
            Role::Source,
            Some(p.dst.sidecar.migration_addr()),
            &other,
            &pol,
        ))
        .expect("start source");
    let s = wait_terminal(&p.src, "other", Duration::from_secs(30));
    assert_eq!(s.phase, Phase::Failed, "{s:#?}");
    assert!(
        s.error.as_deref().unwrap_or("").contains("TLS handshake"),
        "{s:#?}"
    );
    assert_eq!(s.progress.transferred_pages, 0);
    let t = p.dst.sidecar.client().status("victim").expect("status");
    assert_eq!(t.progress.transferred_pages, 0, "{t:#?}");
    assert!(!t.phase.is_terminal() && !t.committed, "{t:#?}");
    assert!(t.message.contains("refused"), "{}", t.message);
    assert_source_keeps_running(&p);
}
