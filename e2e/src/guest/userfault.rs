//! Tests of KVM Userfault (Faultline's kernel patch), in the style of KVM's selftests: real
//! vCPUs on real KVM touch guest_memfd (or anonymous) memory armed with `KVM_MEM_USERFAULT`,
//! and each test checks the exits, the GPAs and flags they carry, and that clearing a bit lets
//! the vCPU go on with the page's real contents.
//!
//! Guest memory is filled so that the u32 at guest-physical address `a` holds `!a`; a guest
//! write stores `a` itself. A value a vCPU reports therefore proves which page it reached and
//! whether the page's contents survived.

use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use faultline::layout::{BackingKind, PAGE_SIZE};
use faultline::probe::{errno_name, probe_trap_backends};
use faultline::sys::MmapRegion;
use faultline::trap::Backend as TrapBackend;
use faultline::trap::kvm_userfault::{
    KVM_CAP_USERFAULT_FAULTLINE, KVM_MEMORY_EXIT_FLAG_PRIVATE, KVM_MEMORY_EXIT_FLAG_USERFAULT,
    Memslot, UserfaultBitmap,
};
use kvm_ioctls::Kvm;

use super::Outcome;
use super::stats::VmStats;
use super::testvm::{Event, TestVm, WRITE, expect, fd_u32, rewind, run};

/// Guest-physical base of the memory under test (slot 1).
const BASE: u64 = 0x10_0000;
const TEST_SLOT: u32 = 1;

fn addr(page: u64, offset: u64) -> u32 {
    (BASE + page * PAGE_SIZE + offset) as u32
}

fn fault_at(page: u64) -> Event {
    Event::MemoryFault {
        flags: KVM_MEMORY_EXIT_FLAG_USERFAULT,
        gpa: BASE + page * PAGE_SIZE,
        size: PAGE_SIZE,
    }
}

/// Fills `map` (guest-physical `gpa..`) with the `!address` pattern.
fn fill(map: &MmapRegion, gpa: u64) -> Result<()> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for off in (0..map.len() as u64).step_by(PAGE_SIZE as usize) {
        for (i, w) in page.chunks_exact_mut(4).enumerate() {
            let a = (gpa + off + 4 * i as u64) as u32;
            w.copy_from_slice(&(!a).to_le_bytes());
        }
        map.write(off, &page)?;
    }
    Ok(())
}

/// A test VM with `pages` pages of `backing` memory at `BASE`, filled with the pattern.
struct Fixture {
    // Drop order: the VM before the memory and bitmap it points at.
    vm: TestVm,
    gmem: Option<OwnedFd>,
    map: MmapRegion,
    bitmap: UserfaultBitmap,
    pages: u64,
}

impl Fixture {
    fn new(backing: BackingKind, pages: u64) -> Result<Self> {
        let vm = TestVm::new()?;
        let bytes = pages * PAGE_SIZE;
        let (gmem, map) = match backing {
            BackingKind::GuestMemfd => {
                let (fd, map) = vm.guest_memfd(bytes)?;
                (Some(fd), map)
            }
            BackingKind::Anon => (None, MmapRegion::anonymous(bytes as usize)?),
            BackingKind::Memfd => bail!("the userfault tests use guest_memfd or anon memory"),
        };
        fill(&map, BASE)?;
        Ok(Self {
            vm,
            gmem,
            map,
            bitmap: UserfaultBitmap::new(pages),
            pages,
        })
    }

    fn memslot(&self, armed: bool) -> Memslot {
        Memslot {
            slot: TEST_SLOT,
            guest_phys_addr: BASE,
            memory_size: self.pages * PAGE_SIZE,
            userspace_addr: self.map.as_ptr() as u64,
            guest_memfd: self.gmem.as_ref().map(|fd| (fd_u32(fd), 0)),
            log_dirty_pages: false,
            userfault_bitmap: armed.then(|| self.bitmap.user_addr()),
        }
    }

    /// Sets the memory-under-test memslot, armed or not; fails the test if KVM refuses.
    fn set(&self, armed: bool) -> Result<()> {
        let slot = self.memslot(armed);
        self.vm.set_memslot(&slot).map_err(|e| {
            anyhow::anyhow!(
                "KVM_SET_USER_MEMORY_REGION2({}) = {}",
                faultline::trap::kvm_userfault::flag_names(slot.flags()),
                errno_name(e)
            )
        })
    }
}

fn check_flags(got: &Event) -> Result<()> {
    if let Event::MemoryFault { flags, .. } = got {
        ensure!(
            flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0,
            "memory fault exit without KVM_MEMORY_EXIT_FLAG_USERFAULT: flags {flags:#x}"
        );
        ensure!(
            flags & !(KVM_MEMORY_EXIT_FLAG_USERFAULT | KVM_MEMORY_EXIT_FLAG_PRIVATE) == 0,
            "unexpected memory fault flags {flags:#x}"
        );
    }
    Ok(())
}

/// The kernel reports `KVM_CAP_USERFAULT` (Faultline's number) exactly when it accepts the
/// memslot flag, and that matches what the matrix expects of this kernel.
pub fn capability(expect_present: bool) -> Result<Outcome> {
    let kvm = Kvm::new().map_err(|e| anyhow::anyhow!("open /dev/kvm: {e}"))?;
    let cap = kvm.check_extension_raw(KVM_CAP_USERFAULT_FAULTLINE.into());
    let probes = probe_trap_backends();
    let flag = probes
        .iter()
        .find(|p| p.backing == BackingKind::Anon && p.backend == TrapBackend::KvmUserfault)
        .context("the probe reported nothing for kvm-userfault on anon memory")?;
    let detail = format!(
        "KVM_CHECK_EXTENSION(KVM_CAP_USERFAULT = {KVM_CAP_USERFAULT_FAULTLINE}) = {cap}; {}",
        flag.reason
    );
    ensure!(
        (cap == 1) == flag.available,
        "capability and memslot flag disagree: {detail}"
    );
    ensure!(
        flag.available == expect_present,
        "expected KVM Userfault to be {}: {detail}",
        if expect_present { "present" } else { "absent" }
    );
    Ok(Outcome::Passed(detail))
}

/// A vCPU's first access to a marked page exits with the page's GPA, size and the userfault
/// flag, again and again until the bit is cleared; then the access completes with the page's
/// contents. KVM never writes the bitmap.
pub fn first_access(backing: BackingKind) -> Result<Outcome> {
    let f = Fixture::new(backing, 16)?;
    f.bitmap.mark(3);
    f.bitmap.mark(9);
    f.set(true)?;
    let table = [addr(0, 0x40), addr(3, 0x120), addr(5, 0x8)];
    let mut vcpu = f.vm.vcpu(0, &table)?;
    expect(&mut vcpu, Event::Value(!table[0]), "unmarked page 0")?;
    let got = run(&mut vcpu);
    check_flags(&got)?;
    ensure!(
        got == fault_at(3),
        "marked page 3: expected {:?}, got {got:?}",
        fault_at(3)
    );
    for _ in 0..3 {
        expect(&mut vcpu, fault_at(3), "page 3 while still marked")?;
    }
    ensure!(
        f.bitmap.is_marked(3) && f.bitmap.is_marked(9) && f.bitmap.count_marked() == 2,
        "KVM changed the userfault bitmap"
    );
    f.bitmap.clear(3);
    expect(
        &mut vcpu,
        Event::Value(!table[1]),
        "page 3 after its bit was cleared",
    )?;
    expect(&mut vcpu, Event::Value(!table[2]), "unmarked page 5")?;
    expect(&mut vcpu, Event::Halted, "end of table")?;
    Ok(Outcome::Passed(format!(
        "exit at GPA {:#x} (4 offsets into page 3 → page address), repeated until cleared, then read {:#x}",
        BASE + 3 * PAGE_SIZE,
        !table[1]
    )))
}

/// A write to a marked page exits before anything is written; after the bit is cleared the
/// write lands in the backing memory.
pub fn write_access(backing: BackingKind) -> Result<Outcome> {
    let f = Fixture::new(backing, 8)?;
    f.bitmap.mark(2);
    f.set(true)?;
    let target = addr(2, 0x10);
    let mut vcpu = f.vm.vcpu(0, &[target | WRITE, target])?;
    let got = run(&mut vcpu);
    check_flags(&got)?;
    ensure!(got == fault_at(2), "write to marked page 2: got {got:?}");
    let offset = u64::from(target) - BASE;
    let before = f.map.read_u64(offset)? as u32;
    ensure!(
        before == !target,
        "the faulting write reached memory: {before:#x}"
    );
    f.bitmap.clear(2);
    expect(&mut vcpu, Event::Value(target), "the write after clearing")?;
    expect(&mut vcpu, Event::Value(target), "reading it back")?;
    expect(&mut vcpu, Event::Halted, "end of table")?;
    let after = f.map.read_u64(offset)? as u32;
    ensure!(
        after == target,
        "backing memory holds {after:#x}, not the guest's write"
    );
    Ok(Outcome::Passed(format!(
        "write fault at GPA {:#x}; the write landed after clearing",
        BASE + 2 * PAGE_SIZE
    )))
}

/// Unmarked pages never exit: first over a whole armed memslot with an empty bitmap, then with
/// every fifth page marked, where only the marked page visited last exits.
pub fn unmarked_never_exit(backing: BackingKind) -> Result<Outcome> {
    const PAGES: u64 = 512;
    let f = Fixture::new(backing, PAGES)?;
    f.set(true)?;
    let all: Vec<u32> = (0..PAGES).map(|p| addr(p, (p * 4) % PAGE_SIZE)).collect();
    let mut vcpu = f.vm.vcpu(0, &all)?;
    for (i, a) in all.iter().enumerate() {
        expect(
            &mut vcpu,
            Event::Value(!a),
            &format!("page {i} with an empty bitmap"),
        )?;
    }
    expect(&mut vcpu, Event::Halted, "end of the first walk")?;

    // A second VM: nothing mapped yet, every fifth page marked.
    let g = Fixture::new(backing, PAGES)?;
    for p in (0..PAGES).step_by(5) {
        g.bitmap.mark(p);
    }
    g.set(true)?;
    let mut table: Vec<u32> = (0..PAGES)
        .filter(|p| p % 5 != 0)
        .map(|p| addr(p, 0x44))
        .collect();
    table.push(addr(255, 0));
    let mut vcpu = g.vm.vcpu(0, &table)?;
    for a in &table[..table.len() - 1] {
        expect(&mut vcpu, Event::Value(!a), &format!("unmarked GPA {a:#x}"))?;
    }
    let got = run(&mut vcpu);
    check_flags(&got)?;
    ensure!(
        got == fault_at(255),
        "marked page 255 visited last: got {got:?}"
    );
    Ok(Outcome::Passed(format!(
        "{PAGES} pages with an empty bitmap and {} unmarked pages among marked ones: no exits; the marked page exited",
        table.len() - 1
    )))
}

/// Several vCPUs fault at once: each on pages of its own, and all of them on one shared page,
/// which is cleared only after every vCPU has exited on it. Every exit names the page its vCPU
/// touched, and every vCPU ends with the right contents.
pub fn multi_vcpu(backing: BackingKind) -> Result<Outcome> {
    const VCPUS: u64 = 4;
    const SHARED: u64 = 60;
    let f = Fixture::new(backing, 64)?;
    let own = |v: u64, k: u64| 10 + v * 3 + k;
    for v in 0..VCPUS {
        for k in 0..3 {
            f.bitmap.mark(own(v, k));
        }
    }
    f.bitmap.mark(SHARED);
    f.set(true)?;
    let plans: Vec<Vec<u64>> = (0..VCPUS)
        .map(|v| vec![own(v, 0), own(v, 1), SHARED, own(v, 2)])
        .collect();
    let mut vcpus = Vec::new();
    for (v, plan) in plans.iter().enumerate() {
        let table: Vec<u32> = plan.iter().map(|&p| addr(p, 4 * v as u64)).collect();
        vcpus.push(f.vm.vcpu(v as u64, &table)?);
    }

    // (vCPUs that have exited on the shared page, whether it was cleared)
    let shared = (Mutex::new((0u64, false)), Condvar::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(v, vcpu)| {
                let (plan, bitmap, shared) = (&plans[v], &f.bitmap, &shared);
                s.spawn(move || -> Result<Vec<u64>> {
                    let mut exits = Vec::new();
                    let mut next = 0;
                    loop {
                        match run(vcpu) {
                            Event::Value(x) => {
                                let want = !addr(plan[next], 4 * v as u64);
                                ensure!(x == want, "vCPU {v} read {x:#x}, expected {want:#x}");
                                next += 1;
                            }
                            Event::Halted => break,
                            ev @ Event::MemoryFault { gpa, .. } => {
                                check_flags(&ev)?;
                                let page = (gpa - BASE) / PAGE_SIZE;
                                ensure!(
                                    next < plan.len() && page == plan[next],
                                    "vCPU {v} exited on page {page} at step {next} of {plan:?}"
                                );
                                exits.push(page);
                                if page == SHARED {
                                    let (lock, cv) = shared;
                                    let mut st =
                                        lock.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                                    st.0 += 1;
                                    cv.notify_all();
                                    while !st.1 {
                                        let left =
                                            deadline.saturating_duration_since(Instant::now());
                                        ensure!(
                                            !left.is_zero(),
                                            "vCPU {v}: shared page never cleared"
                                        );
                                        st = cv
                                            .wait_timeout(st, left)
                                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                                            .0;
                                    }
                                } else {
                                    bitmap.clear(page);
                                }
                            }
                            other => bail!("vCPU {v}: unexpected {other:?}"),
                        }
                    }
                    ensure!(next == plan.len(), "vCPU {v} halted after {next} values");
                    Ok(exits)
                })
            })
            .collect();
        // Clear the shared page once every vCPU has exited on it.
        let (lock, cv) = &shared;
        let waited = (|| -> Result<()> {
            let mut st = lock.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            while st.0 < VCPUS {
                let left = deadline.saturating_duration_since(Instant::now());
                ensure!(
                    !left.is_zero(),
                    "only {} of {VCPUS} vCPUs exited on the shared page",
                    st.0
                );
                st = cv
                    .wait_timeout(st, left)
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .0;
            }
            f.bitmap.clear(SHARED);
            st.1 = true;
            cv.notify_all();
            Ok(())
        })();
        if let Err(e) = &waited {
            // Release the vCPU threads so the scope can end; the test fails below.
            if let Ok(mut st) = lock.lock() {
                st.1 = true;
            }
            cv.notify_all();
            tracing::error!("{e:#}");
        }
        let mut r: Vec<Result<Vec<u64>>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("vCPU thread panicked")))
            })
            .collect();
        if let Err(e) = waited {
            r.push(Err(e));
        }
        r
    });
    for (v, r) in results.into_iter().enumerate() {
        let exits = r?;
        if let Some(plan) = plans.get(v) {
            ensure!(
                &exits == plan,
                "vCPU {v} exited on pages {exits:?}, expected one exit on each of {plan:?}"
            );
        }
    }
    ensure!(f.bitmap.count_marked() == 0, "pages left marked");
    Ok(Outcome::Passed(format!(
        "{VCPUS} vCPUs: one exit per own page (3 each) and one each on shared page {SHARED}"
    )))
}

/// Toggles `KVM_MEM_USERFAULT` on a live memslot. Off: the bitmap is ignored. On: every page
/// faults again (the mappings were zapped), with the contents intact (for guest_memfd the
/// binding survives the flags-only change). Changing anything else of a guest_memfd memslot
/// stays forbidden.
pub fn toggle(backing: BackingKind) -> Result<Outcome> {
    const P: u64 = 6;
    let f = Fixture::new(backing, 16)?;
    f.set(false)?;
    let a = addr(P, 0x20);
    let mut vcpu = f.vm.vcpu(0, &[a])?;
    let read_ok = |vcpu: &mut kvm_ioctls::VcpuFd, what: &str| -> Result<()> {
        rewind(vcpu, 0)?;
        expect(vcpu, Event::Value(!a), what)?;
        expect(vcpu, Event::Halted, what)
    };
    read_ok(&mut vcpu, "flag off, page mapped")?;
    f.bitmap.mark(P);
    read_ok(&mut vcpu, "flag off ignores the bitmap")?;
    const CYCLES: usize = 5;
    for cycle in 0..CYCLES {
        f.set(true)
            .with_context(|| format!("cycle {cycle}: turning the flag on"))?;
        rewind(&vcpu, 0)?;
        let got = run(&mut vcpu);
        check_flags(&got)?;
        ensure!(
            got == fault_at(P),
            "cycle {cycle}: flag on must zap the mapped page and exit, got {got:?}"
        );
        if cycle % 2 == 0 {
            f.set(false)
                .with_context(|| format!("cycle {cycle}: turning the flag off"))?;
            read_ok(&mut vcpu, "flag off again")?;
        } else {
            f.bitmap.clear(P);
            expect(&mut vcpu, Event::Value(!a), "after clearing")?;
            expect(&mut vcpu, Event::Halted, "after clearing")?;
            f.bitmap.mark(P);
            f.set(false)
                .with_context(|| format!("cycle {cycle}: turning the flag off"))?;
        }
    }
    let mut refused = Vec::new();
    if let Some(gmem) = &f.gmem {
        let good = f.memslot(true);
        let cases = [
            (
                "another guest_memfd offset",
                Memslot {
                    guest_memfd: Some((fd_u32(gmem), PAGE_SIZE)),
                    ..good
                },
            ),
            (
                "KVM_MEM_LOG_DIRTY_PAGES",
                Memslot {
                    log_dirty_pages: true,
                    ..good
                },
            ),
            (
                "a moved GPA",
                Memslot {
                    guest_phys_addr: BASE + (1 << 20),
                    ..good
                },
            ),
        ];
        for (what, slot) in cases {
            match f.vm.set_memslot(&slot) {
                Err(e) if e == libc::EINVAL => refused.push(what),
                Err(e) => bail!("changing {what}: expected EINVAL, got {}", errno_name(e)),
                Ok(()) => bail!("KVM accepted changing {what} of a guest_memfd memslot"),
            }
        }
        read_ok(&mut vcpu, "after the refused changes")?;
    }
    Ok(Outcome::Passed(format!(
        "{CYCLES} on/off cycles on a live {backing} memslot: on zaps and exits, off ignores the bitmap, contents intact{}",
        if refused.is_empty() {
            String::new()
        } else {
            format!("; EINVAL for {}", refused.join(", "))
        }
    )))
}

/// A bitmap KVM could not read in full is refused when the memslot is set: a kernel address, a
/// misaligned pointer, and one running past the end of the user address space; also as a
/// flags-only change of an existing memslot.
pub fn bad_bitmap(backing: BackingKind) -> Result<Outcome> {
    let f = Fixture::new(backing, 16)?;
    let good = f.memslot(true);
    let cases = [
        ("a kernel address", 0xffff_8000_0000_0000u64),
        ("a misaligned pointer", f.bitmap.user_addr() + 4),
        ("a bitmap past the end of user space", 0x7fff_ffff_fff8),
    ];
    let mut names = Vec::new();
    for (what, ptr) in cases {
        let slot = Memslot {
            userfault_bitmap: Some(ptr),
            ..good
        };
        match f.vm.set_memslot(&slot) {
            Err(e) if e == libc::EINVAL => names.push(what),
            Err(e) => bail!("{what} ({ptr:#x}): expected EINVAL, got {}", errno_name(e)),
            Ok(()) => bail!("KVM accepted {what} ({ptr:#x}) as a userfault bitmap"),
        }
    }
    f.set(true).context("the same memslot with a good bitmap")?;
    let slot = Memslot {
        userfault_bitmap: Some(0xffff_8000_0000_0000),
        ..good
    };
    match f.vm.set_memslot(&slot) {
        Err(e) if e == libc::EINVAL => {}
        other => bail!("flags-only change to a kernel-address bitmap: {other:?}"),
    }
    Ok(Outcome::Passed(format!(
        "EINVAL for {}, and when changing a live memslot's bitmap; accepted with a good bitmap",
        names.join(", ")
    )))
}

/// A bitmap that becomes unreadable after the memslot was set makes KVM_RUN fail with a bare
/// EFAULT (no memory fault exit), since KVM cannot tell whether the page is marked.
pub fn unreadable_bitmap(backing: BackingKind) -> Result<Outcome> {
    let f = Fixture::new(backing, 16)?;
    let page = MmapRegion::anonymous(PAGE_SIZE as usize)?;
    page.write(0, &(1u64 << 1).to_le_bytes())?;
    let slot = Memslot {
        userfault_bitmap: Some(page.as_ptr() as u64),
        ..f.memslot(true)
    };
    f.vm.set_memslot(&slot)
        .map_err(|e| anyhow::anyhow!("setting the memslot: {}", errno_name(e)))?;
    let mut vcpu = f.vm.vcpu(0, &[addr(0, 0), addr(1, 0), addr(2, 0)])?;
    expect(&mut vcpu, Event::Value(!addr(0, 0)), "unmarked page 0")?;
    let got = run(&mut vcpu);
    check_flags(&got)?;
    ensure!(
        got == fault_at(1),
        "page 1 marked in the mapped bitmap: {got:?}"
    );
    drop(page); // munmap: the bitmap is gone
    rewind(&vcpu, 0)?;
    // Page 0 is mapped already and does not consult the bitmap; page 1 still faults.
    expect(&mut vcpu, Event::Value(!addr(0, 0)), "mapped page 0")?;
    match run(&mut vcpu) {
        Event::RunError(e) if e == libc::EFAULT => {}
        other => {
            bail!("touching page 1 with an unmapped bitmap: expected a bare EFAULT, got {other:?}")
        }
    }
    Ok(Outcome::Passed(
        "KVM_RUN = EFAULT without exit information once the bitmap was unmapped".into(),
    ))
}

/// While the flag is on only 4 KiB mappings are made: anonymous memory backed by transparent
/// huge pages is mapped with 2 MiB pages without the flag (the baseline), with none while the
/// flag is on, and gets 2 MiB mappings back when the flag is turned off.
pub fn only_4k_mappings() -> Result<Outcome> {
    const HUGE: u64 = 2 << 20;
    const BYTES: u64 = 2 * HUGE;
    const GPA: u64 = 4 << 20;
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !(thp.contains("[always]") || thp.contains("[madvise]")) {
        return Ok(Outcome::Unavailable(format!(
            "transparent huge pages are off or absent (/sys/kernel/mm/transparent_hugepage/enabled: {:?})",
            thp.trim()
        )));
    }
    let vm = TestVm::new()?;
    let region = MmapRegion::anonymous((BYTES + HUGE) as usize)?;
    let base = region.as_ptr() as u64;
    let aligned = base.next_multiple_of(HUGE);
    let offset = aligned - base;
    // SAFETY: [aligned, aligned + BYTES) lies inside `region`, which nothing else references;
    // MADV_HUGEPAGE only changes how the kernel backs it.
    unsafe {
        rustix::mm::madvise(
            aligned as *mut std::ffi::c_void,
            BYTES as usize,
            rustix::mm::Advice::LinuxHugepage,
        )
    }
    .context("madvise(MADV_HUGEPAGE)")?;
    for off in (0..BYTES).step_by(PAGE_SIZE as usize) {
        region.write(offset + off, &[1])?;
    }
    let bitmap = UserfaultBitmap::new(BYTES / PAGE_SIZE);
    let slot = Memslot {
        slot: TEST_SLOT,
        guest_phys_addr: GPA,
        memory_size: BYTES,
        userspace_addr: aligned,
        ..Default::default()
    };
    let set = |armed: bool| -> Result<()> {
        let s = Memslot {
            userfault_bitmap: armed.then(|| bitmap.user_addr()),
            ..slot
        };
        vm.set_memslot(&s)
            .map_err(|e| anyhow::anyhow!("memslot (armed: {armed}) = {}", errno_name(e)))
    };
    let stats = VmStats::open(&vm.vm)?;
    set(false)?;
    let table: Vec<u32> = (0..BYTES)
        .step_by((256 * 1024) as usize)
        .map(|o| (GPA + o) as u32)
        .collect();
    let mut vcpu = vm.vcpu(0, &table)?;
    let walk = |vcpu: &mut kvm_ioctls::VcpuFd| -> Result<()> {
        rewind(vcpu, 0)?;
        for _ in &table {
            match run(vcpu) {
                Event::Value(_) => {}
                other => bail!("walking the huge-page region: {other:?}"),
            }
        }
        expect(vcpu, Event::Halted, "end of walk")
    };
    walk(&mut vcpu)?;
    let baseline = stats.read("pages_2m")?;
    ensure!(
        baseline >= 1,
        "baseline: no 2M mappings without KVM Userfault (pages_2m = {baseline}), so the test cannot tell"
    );
    set(true)?;
    let zapped = stats.read("pages_2m")?;
    let before_4k = stats.read("pages_4k")?;
    walk(&mut vcpu)?;
    let armed_2m = stats.read("pages_2m")?;
    let armed_4k = stats.read("pages_4k")?;
    ensure!(
        zapped == 0 && armed_2m == 0,
        "2M mappings while armed: {zapped} after arming, {armed_2m} after the walk"
    );
    ensure!(
        armed_4k >= before_4k + table.len() as u64,
        "the walk made {} 4K mappings, expected at least {}",
        armed_4k.saturating_sub(before_4k),
        table.len()
    );
    set(false)?;
    let recovered = stats.read("pages_2m")?;
    ensure!(
        recovered >= 1,
        "no 2M mappings recovered after turning the flag off"
    );
    Ok(Outcome::Passed(format!(
        "pages_2m: {baseline} without the flag, 0 while armed ({} new 4K mappings), {recovered} after disarming",
        armed_4k - before_4k
    )))
}
