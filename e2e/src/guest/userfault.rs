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

/// Two 2 MiB-aligned huge pages of anonymous memory backed by transparent huge pages, in a
/// memslot of a fresh test VM, and a vCPU that walks them (every 256 KiB).
struct HugeFixture {
    vm: TestVm,
    // Kept alive for the memslot; declared after the VM so it is dropped after it.
    _region: MmapRegion,
    slot: Memslot,
    bitmap: UserfaultBitmap,
    stats: VmStats,
    table: Vec<u32>,
}

impl HugeFixture {
    const HUGE: u64 = 2 << 20;
    const BYTES: u64 = 2 * Self::HUGE;
    const GPA: u64 = 4 << 20;

    /// The inner `Err` is why the kernel cannot run the test (no transparent huge pages).
    fn new() -> Result<std::result::Result<Self, String>> {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !(thp.contains("[always]") || thp.contains("[madvise]")) {
            return Ok(Err(format!(
                "transparent huge pages are off or absent (/sys/kernel/mm/transparent_hugepage/enabled: {:?})",
                thp.trim()
            )));
        }
        let vm = TestVm::new()?;
        let region = MmapRegion::anonymous((Self::BYTES + Self::HUGE) as usize)?;
        let base = region.as_ptr() as u64;
        let aligned = base.next_multiple_of(Self::HUGE);
        let offset = aligned - base;
        // SAFETY: [aligned, aligned + BYTES) lies inside `region`, which nothing else
        // references; MADV_HUGEPAGE only changes how the kernel backs it.
        unsafe {
            rustix::mm::madvise(
                aligned as *mut std::ffi::c_void,
                Self::BYTES as usize,
                rustix::mm::Advice::LinuxHugepage,
            )
        }
        .context("madvise(MADV_HUGEPAGE)")?;
        for off in (0..Self::BYTES).step_by(PAGE_SIZE as usize) {
            region.write(offset + off, &[1])?;
        }
        let slot = Memslot {
            slot: TEST_SLOT,
            guest_phys_addr: Self::GPA,
            memory_size: Self::BYTES,
            userspace_addr: aligned,
            ..Default::default()
        };
        let stats = VmStats::open(&vm.vm)?;
        let table = (0..Self::BYTES)
            .step_by((256 * 1024) as usize)
            .map(|o| (Self::GPA + o) as u32)
            .collect();
        Ok(Ok(Self {
            vm,
            _region: region,
            slot,
            bitmap: UserfaultBitmap::new(Self::BYTES / PAGE_SIZE),
            stats,
            table,
        }))
    }

    fn set(&self, armed: bool, log_dirty_pages: bool) -> Result<()> {
        let s = Memslot {
            userfault_bitmap: armed.then(|| self.bitmap.user_addr()),
            log_dirty_pages,
            ..self.slot
        };
        self.vm.set_memslot(&s).map_err(|e| {
            anyhow::anyhow!(
                "memslot {} = {}",
                faultline::trap::kvm_userfault::flag_names(s.flags()),
                errno_name(e)
            )
        })
    }

    fn walk(&self, vcpu: &mut kvm_ioctls::VcpuFd) -> Result<()> {
        rewind(vcpu, 0)?;
        for _ in &self.table {
            match run(vcpu) {
                Event::Value(_) => {}
                other => bail!("walking the huge-page region: {other:?}"),
            }
        }
        expect(vcpu, Event::Halted, "end of walk")
    }

    /// The fixture with vCPU 0 having walked it once without any flag, and the 2 MiB mappings
    /// that walk made (at least one, or the tests could not tell). The inner `Err` says why
    /// the kernel cannot run them.
    #[allow(clippy::type_complexity)]
    fn walked_baseline() -> Result<std::result::Result<(Self, kvm_ioctls::VcpuFd, u64), String>> {
        let f = match Self::new()? {
            Ok(f) => f,
            Err(why) => return Ok(Err(why)),
        };
        f.set(false, false)?;
        let mut vcpu = f.vm.vcpu(0, &f.table)?;
        f.walk(&mut vcpu)?;
        let baseline = f.huge()?;
        ensure!(
            baseline >= 1,
            "baseline: no 2M mappings without KVM Userfault (pages_2m = {baseline}), so the test cannot tell"
        );
        Ok(Ok((f, vcpu, baseline)))
    }

    /// Puts the walk back in vCPU 0's table and walks.
    fn set_table_walk(&self, vcpu: &mut kvm_ioctls::VcpuFd) -> Result<()> {
        self.vm.set_table(0, &self.table)?;
        self.walk(vcpu)
    }

    fn huge(&self) -> Result<u64> {
        self.stats.read("pages_2m")
    }
}

/// While the flag is on only 4 KiB mappings are made: anonymous memory backed by transparent
/// huge pages is mapped with 2 MiB pages without the flag (the baseline), with none while the
/// flag is on, and gets 2 MiB mappings back when the flag is turned off.
pub fn only_4k_mappings() -> Result<Outcome> {
    let (f, mut vcpu, baseline) = match HugeFixture::walked_baseline()? {
        Ok(started) => started,
        Err(why) => return Ok(Outcome::Unavailable(why)),
    };
    f.set(true, false)?;
    let zapped = f.huge()?;
    let before_4k = f.stats.read("pages_4k")?;
    f.walk(&mut vcpu)?;
    let armed_2m = f.huge()?;
    let armed_4k = f.stats.read("pages_4k")?;
    ensure!(
        zapped == 0 && armed_2m == 0,
        "2M mappings while armed: {zapped} after arming, {armed_2m} after the walk"
    );
    ensure!(
        armed_4k >= before_4k + f.table.len() as u64,
        "the walk made {} 4K mappings, expected at least {}",
        armed_4k.saturating_sub(before_4k),
        f.table.len()
    );
    f.set(false, false)?;
    let recovered = f.huge()?;
    ensure!(
        recovered >= 1,
        "no 2M mappings recovered after turning the flag off"
    );
    Ok(Outcome::Passed(format!(
        "pages_2m: {baseline} without the flag, 0 while armed ({} new 4K mappings), {recovered} after disarming",
        armed_4k - before_4k
    )))
}

/// Turning KVM Userfault off while dirty logging stays on must not bring huge pages back (dirty
/// logging tracks 4 KiB pages; the patch recovers huge pages only when neither is on), and the
/// dirty log must keep recording writes across the change; turning dirty logging off then
/// recovers them.
pub fn dirty_log_then_disarm() -> Result<Outcome> {
    let (f, mut vcpu, _) = match HugeFixture::walked_baseline()? {
        Ok(started) => started,
        Err(why) => return Ok(Outcome::Unavailable(why)),
    };
    f.set(true, true)?;
    f.walk(&mut vcpu)?;
    ensure!(
        f.huge()? == 0,
        "2M mappings with dirty logging and KVM Userfault on"
    );
    // Clear the log, then turn only the userfault flag off.
    let bytes = HugeFixture::BYTES as usize;
    let _ =
        f.vm.vm
            .get_dirty_log(TEST_SLOT, bytes)
            .map_err(|e| anyhow::anyhow!("KVM_GET_DIRTY_LOG: {e}"))?;
    f.set(false, true)?;
    let after_disarm = f.huge()?;
    // Write two pages, one in each huge page, through the guest.
    let writes = [f.table[1], f.table[f.table.len() - 1]];
    f.vm.set_table(0, &[writes[0] | WRITE, writes[1] | WRITE])?;
    rewind(&vcpu, 0)?;
    for w in writes {
        expect(&mut vcpu, Event::Value(w), "a write with dirty logging on")?;
    }
    expect(&mut vcpu, Event::Halted, "end of the writes")?;
    let log =
        f.vm.vm
            .get_dirty_log(TEST_SLOT, bytes)
            .map_err(|e| anyhow::anyhow!("KVM_GET_DIRTY_LOG: {e}"))?;
    let dirty: Vec<u64> = (0..HugeFixture::BYTES / PAGE_SIZE)
        .filter(|p| {
            log.get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        })
        .collect();
    let want: Vec<u64> = writes
        .iter()
        .map(|&w| (u64::from(w) - HugeFixture::GPA) / PAGE_SIZE)
        .collect();
    ensure!(
        dirty == want,
        "dirty log after disarming: pages {dirty:?}, expected exactly {want:?}"
    );
    f.set_table_walk(&mut vcpu)?;
    let walked = f.huge()?;
    ensure!(
        after_disarm == 0 && walked == 0,
        "2M mappings while dirty logging is on: {after_disarm} after disarming, {walked} after a walk"
    );
    f.set(false, false)?;
    let recovered = f.huge()?;
    ensure!(
        recovered >= 1,
        "no 2M mappings recovered once dirty logging was off too"
    );
    Ok(Outcome::Passed(format!(
        "userfault off with dirty logging on: 0 2M mappings, dirty log exactly pages {want:?}; both off: {recovered} 2M mappings"
    )))
}

/// KVM's own access to a page that has not arrived: the guest runs `outsd` from a marked page,
/// which KVM emulates by reading guest memory through the memslot's host address — a path
/// KVM Userfault does not check. First without more (what KVM reads is recorded), then with
/// the other half of the trap: the host mapping registered with userfaultfd in minor mode and
/// its page-table entries dropped. Then the read must stop in a minor fault on that page until
/// the test (playing the receiver) has written the migrated contents through a second mapping
/// of the guest_memfd and resolved it with `UFFDIO_CONTINUE`; the value KVM hands to the port
/// must be the migrated one, never the stale one.
pub fn kvm_internal_access() -> Result<Outcome> {
    use faultline::sys::uffd::Event as UffdEvent;
    use faultline::sys::uffd::{FAULT_MINOR, FEATURE_MINOR_SHMEM, MODE_MINOR, Userfaultfd};
    const P: u64 = 5;
    const OFFSET: u64 = 0x40;
    let gpa = addr(P, OFFSET);
    let stale = !gpa;
    let migrated = 0xC0DE_0000 | gpa & 0xFFFF;

    // Without the userfaultfd half: what KVM reads from a marked page.
    let without = {
        let f = Fixture::new(BackingKind::GuestMemfd, 16)?;
        f.bitmap.mark(P);
        f.set(true)?;
        let mut vcpu = f.vm.vcpu_string_out(0, gpa)?;
        match run(&mut vcpu) {
            Event::Value(v) if v == stale => "KVM read the stale contents".to_string(),
            other => format!("KVM's read ended in {other:?}"),
        }
    };

    let f = Fixture::new(BackingKind::GuestMemfd, 16)?;
    let gmem = f.gmem.as_ref().context("the fixture has no guest_memfd")?;
    // The receiver's own mapping of the same file: writing through it raises no fault.
    let receiver = MmapRegion::shared(std::os::fd::AsFd::as_fd(gmem), 0, f.map.len())
        .context("a second mapping of the guest_memfd")?;
    let uffd = Userfaultfd::new(FEATURE_MINOR_SHMEM).context("userfaultfd (minor)")?;
    let base = f.map.as_ptr() as u64;
    uffd.register(base, f.map.len() as u64, MODE_MINOR)
        .context("registering the guest_memfd host mapping in minor mode")?;
    // The fill left every page mapped in the host mapping; a mapped page never faults.
    f.map
        .discard(0, f.map.len())
        .context("dropping the host mapping's page-table entries")?;
    f.bitmap.mark(P);
    f.set(true)?;
    let mut vcpu = f.vm.vcpu_string_out(0, gpa)?;
    let fault_addr = base + P * PAGE_SIZE;
    let (event, value) = std::thread::scope(|s| -> Result<(UffdEvent, Event)> {
        let vcpu_thread = s.spawn(|| run(&mut vcpu));
        let deadline = Instant::now() + Duration::from_secs(60);
        let event = loop {
            if let Some(e) = uffd
                .read_events(1)
                .context("reading the userfaultfd")?
                .pop()
            {
                break e;
            }
            if vcpu_thread.is_finished() || Instant::now() >= deadline {
                let got = vcpu_thread
                    .join()
                    .map_err(|_| anyhow::anyhow!("vCPU thread panicked"))?;
                bail!(
                    "no minor fault for KVM's read of page {P} (stale {stale:#x}, migrated {migrated:#x}): the vCPU ended in {got:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The vCPU is blocked inside KVM_RUN on the fault: install, then continue.
        let mut page = vec![0u8; PAGE_SIZE as usize];
        page[OFFSET as usize..OFFSET as usize + 4].copy_from_slice(&migrated.to_le_bytes());
        receiver.write(P * PAGE_SIZE, &page)?;
        f.bitmap.clear(P);
        uffd.continue_range(fault_addr, PAGE_SIZE)
            .context("UFFDIO_CONTINUE")?;
        let value = vcpu_thread
            .join()
            .map_err(|_| anyhow::anyhow!("vCPU thread panicked"))?;
        Ok((event, value))
    })?;
    match event {
        UffdEvent::PageFault { address, flags, .. } => ensure!(
            address & !(PAGE_SIZE - 1) == fault_addr && flags & FAULT_MINOR != 0,
            "fault at {address:#x} flags {flags:#x}, expected a minor fault at {fault_addr:#x}"
        ),
        other => bail!("unexpected userfaultfd event {other:?}"),
    }
    ensure!(
        value == Event::Value(migrated),
        "KVM handed the port {value:?}; the migrated value is {migrated:#x}, the stale one {stale:#x}"
    );
    expect(&mut vcpu, Event::Halted, "after the string instruction")?;
    Ok(Outcome::Passed(format!(
        "without userfaultfd: {without}; with it: a minor fault at page {P}, and KVM read the migrated {migrated:#x}"
    )))
}

/// `KVM_PRE_FAULT_MEMORY` = `_IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)` (64 bytes).
const KVM_PRE_FAULT_MEMORY: libc::c_ulong = (3 << 30) | (64 << 16) | (0xAE << 8) | 0xD5;

/// `KVM_PRE_FAULT_MEMORY` over `[gpa, gpa + size)`: `Ok(range left)` as KVM updated it, or the
/// errno.
fn pre_fault(
    vcpu: &kvm_ioctls::VcpuFd,
    gpa: u64,
    size: u64,
) -> std::result::Result<(u64, u64), i32> {
    use std::os::fd::AsRawFd;
    let mut range = kvm_bindings::kvm_pre_fault_memory {
        gpa,
        size,
        ..Default::default()
    };
    // SAFETY: KVM_PRE_FAULT_MEMORY reads and updates a `struct kvm_pre_fault_memory`, which
    // `range` is (kvm-bindings checks its size, 64 bytes) and which outlives the call.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_PRE_FAULT_MEMORY as _, &mut range) };
    if rc < 0 {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok((range.gpa, range.size))
    }
}

/// `KVM_PRE_FAULT_MEMORY` must not map a marked page: over three pages with the middle one
/// marked it maps the first and stops at the marked one (KVM reports the progress and the
/// range left); starting at the marked page it fails with EFAULT. The guest then reads the
/// first page without an exit and exits on the marked one, which the pre-fault left unmapped.
pub fn pre_fault_marked(backing: BackingKind) -> Result<Outcome> {
    let f = Fixture::new(backing, 8)?;
    f.bitmap.mark(1);
    f.set(true)?;
    let mut vcpu = f.vm.vcpu(0, &[addr(0, 0x10), addr(1, 0x10)])?;
    let page = |p: u64| BASE + p * PAGE_SIZE;
    match pre_fault(&vcpu, page(0), 3 * PAGE_SIZE) {
        Err(e) if e == libc::EOPNOTSUPP || e == libc::ENOTTY || e == libc::EINVAL => {
            return Ok(Outcome::Unavailable(format!(
                "KVM_PRE_FAULT_MEMORY = {} (needs two-dimensional paging)",
                errno_name(e)
            )));
        }
        Err(e) => bail!("KVM_PRE_FAULT_MEMORY over pages 0–2 = {}", errno_name(e)),
        Ok((gpa, size)) => ensure!(
            gpa == page(1) && size == 2 * PAGE_SIZE,
            "pre-faulting pages 0–2 stopped at {gpa:#x} with {size:#x} left; expected the marked page 1"
        ),
    }
    match pre_fault(&vcpu, page(1), 2 * PAGE_SIZE) {
        Err(e) if e == libc::EFAULT => {}
        other => bail!("KVM_PRE_FAULT_MEMORY from the marked page: expected EFAULT, got {other:?}"),
    }
    expect(
        &mut vcpu,
        Event::Value(!addr(0, 0x10)),
        "pre-faulted page 0",
    )?;
    let got = run(&mut vcpu);
    check_flags(&got)?;
    ensure!(
        got == fault_at(1),
        "the marked page after the pre-fault: expected an exit, got {got:?}"
    );
    f.bitmap.clear(1);
    expect(
        &mut vcpu,
        Event::Value(!addr(1, 0x10)),
        "page 1 after clearing",
    )?;
    Ok(Outcome::Passed(
        "pre-fault stopped at the marked page (range left: 2 pages), EFAULT from it; the guest then exited on it".into(),
    ))
}

/// Flags-only changes of a live guest_memfd memslot (KVM Userfault on and off, which moves the
/// guest_memfd binding to the new memslot) while two vCPUs keep faulting on its pages: each
/// vCPU walks its own pages over and over, clearing the bit of every page it exits on, while
/// the main thread marks every page and toggles the flag. Every value read must be the page's
/// own, every exit a userfault on a page of the walk, and both vCPUs must keep making progress.
pub fn rebind_under_faults() -> Result<Outcome> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const VCPUS: u64 = 2;
    const PER_VCPU: u64 = 24;
    const CYCLES: usize = 40;
    let f = Fixture::new(BackingKind::GuestMemfd, VCPUS * PER_VCPU)?;
    f.set(false)?;
    let tables: Vec<Vec<u32>> = (0..VCPUS)
        .map(|v| {
            (0..PER_VCPU)
                .map(|k| addr(v * PER_VCPU + k, 8 * v + 4 * (k % 4)))
                .collect()
        })
        .collect();
    let mut vcpus = Vec::new();
    for (v, t) in tables.iter().enumerate() {
        vcpus.push(f.vm.vcpu(v as u64, t)?);
    }
    let stop = AtomicBool::new(false);
    let walks = [AtomicU64::new(0), AtomicU64::new(0)];
    let exits = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(300);
    let toggled = std::thread::scope(|s| -> Result<usize> {
        let handles: Vec<_> = vcpus
            .iter_mut()
            .enumerate()
            .map(|(v, vcpu)| {
                let (table, f, stop, walks, exits) = (&tables[v], &f, &stop, &walks, &exits);
                s.spawn(move || -> Result<()> {
                    while !stop.load(Ordering::Acquire) || walks[v].load(Ordering::Acquire) == 0 {
                        ensure!(Instant::now() < deadline, "vCPU {v}: no end in sight");
                        rewind(vcpu, v as u64)?;
                        let mut next = 0;
                        loop {
                            match run(vcpu) {
                                Event::Value(x) => {
                                    let want = table.get(next).map(|a| !a);
                                    ensure!(
                                        Some(x) == want,
                                        "vCPU {v} step {next}: read {x:#x}, expected {want:?}"
                                    );
                                    next += 1;
                                }
                                Event::Halted => break,
                                ev @ Event::MemoryFault { gpa, .. } => {
                                    check_flags(&ev)?;
                                    let page = (gpa - BASE) / PAGE_SIZE;
                                    let want = table.get(next).map(|&a| (u64::from(a) - BASE) / PAGE_SIZE);
                                    ensure!(
                                        Some(page) == want,
                                        "vCPU {v} step {next}: exit on page {page}, expected {want:?}"
                                    );
                                    exits.fetch_add(1, Ordering::Relaxed);
                                    f.bitmap.clear(page);
                                }
                                other => bail!("vCPU {v}: unexpected {other:?}"),
                            }
                        }
                        ensure!(next == table.len(), "vCPU {v} halted after {next} values");
                        walks[v].fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(())
                })
            })
            .collect();
        let toggling = (|| -> Result<usize> {
            for cycle in 0..CYCLES {
                f.bitmap.mark_all();
                f.set(true)
                    .with_context(|| format!("cycle {cycle}: flag on"))?;
                std::thread::sleep(Duration::from_millis(3));
                f.set(false)
                    .with_context(|| format!("cycle {cycle}: flag off"))?;
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(CYCLES)
        })();
        stop.store(true, Ordering::Release);
        for (v, h) in handles.into_iter().enumerate() {
            h.join()
                .map_err(|_| anyhow::anyhow!("vCPU {v} thread panicked"))??;
        }
        toggling
    })?;
    let walked: Vec<u64> = walks.iter().map(|w| w.load(Ordering::Acquire)).collect();
    Ok(Outcome::Passed(format!(
        "{toggled} on/off cycles of a live guest_memfd memslot under {VCPUS} faulting vCPUs: walks {walked:?}, {} userfault exits, every value the page's own",
        exits.load(Ordering::Relaxed)
    )))
}
