//! The physical floors the benchmark compares Faultline with, measured in the same run:
//! loopback TCP bandwidth, a 4 KiB request/response round trip, a userfaultfd fault taken by a
//! real vCPU and resolved by a local handler, and a KVM exit round trip.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faultline::sys::MmapRegion;
use faultline::sys::uffd::{Event, MODE_MISSING, Userfaultfd};
use kvm_ioctls::{Kvm, VcpuExit, VmFd};
use serde::Serialize;

#[derive(Serialize, Debug, Clone)]
pub struct Floors {
    /// Raw loopback TCP bandwidth, bytes per second (one stream, 256 KiB writes).
    pub tcp_bandwidth_bytes_per_sec: f64,
    /// 8-byte request, 4 KiB response over loopback TCP: p50 and p99 in microseconds.
    pub tcp_rtt_4k_us_p50: f64,
    pub tcp_rtt_4k_us_p99: f64,
    /// A vCPU's first touch of a page registered with userfaultfd (missing mode), resolved by
    /// a polling handler thread with UFFDIO_COPY: microseconds per fault, with the same loop's
    /// cost on present pages subtracted.
    pub uffd_vcpu_fault_us: f64,
    /// The same loop on present pages (guest instructions and an ordinary access).
    pub uffd_loop_baseline_us: f64,
    /// One port-I/O exit from the guest to this process and back into the guest.
    pub kvm_exit_us: f64,
    /// Installing one 4 KiB page into fresh memory on the target, the cost no transfer can go
    /// below: `UFFDIO_COPY` into missing anonymous memory, `pwrite` into a memfd hole, and
    /// `pwrite` into an already allocated memfd page (microseconds per page).
    pub install_uffd_copy_us: f64,
    pub install_memfd_hole_us: f64,
    pub install_memfd_allocated_us: f64,
    /// Writing memory this process never touched (page faults, zeroing, and — on a VM like our
    /// development machines — the hypervisor backing the page), bytes per second over the
    /// guest size. Any target must write every page of a fresh VM once, so bulk transfer cannot
    /// beat this either.
    pub fresh_memory_write_bytes_per_sec: f64,
}

pub fn measure(quick: bool) -> anyhow::Result<Floors> {
    let (bw, (p50, p99)) = (
        tcp_bandwidth(if quick { 256 << 20 } else { 1 << 30 })?,
        tcp_rtt(if quick { 2000 } else { 10000 })?,
    );
    let (fault, baseline) = uffd_vcpu_fault(if quick { 3 } else { 9 })?;
    let exit = kvm_exit(if quick { 3 } else { 9 })?;
    let (copy, hole, allocated) = install_costs(if quick { 16384 } else { 65536 })?;
    let fresh = fresh_write(if quick { 256 << 20 } else { 1 << 30 })?;
    Ok(Floors {
        tcp_bandwidth_bytes_per_sec: bw,
        tcp_rtt_4k_us_p50: p50,
        tcp_rtt_4k_us_p99: p99,
        uffd_vcpu_fault_us: fault,
        uffd_loop_baseline_us: baseline,
        kvm_exit_us: exit,
        install_uffd_copy_us: copy,
        install_memfd_hole_us: hole,
        install_memfd_allocated_us: allocated,
        fresh_memory_write_bytes_per_sec: fresh,
    })
}

/// Bytes per second writing `len` bytes of memory never touched before, a page at a time.
fn fresh_write(len: usize) -> anyhow::Result<f64> {
    let mem = MmapRegion::anonymous(len)?;
    let page = vec![0x5Au8; 4096];
    let t = Instant::now();
    for p in (0..len).step_by(4096) {
        mem.write(p as u64, &page)?;
    }
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

/// Per-page cost of the three ways a target installs pages.
fn install_costs(pages: u64) -> anyhow::Result<(f64, f64, f64)> {
    let len = pages * 4096;
    let page = vec![0x5Au8; 4096];
    let per_page = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / pages as f64;

    let anon = MmapRegion::anonymous(len as usize)?;
    let uffd = Userfaultfd::new(0).context("userfaultfd")?;
    let base = anon.as_ptr() as u64;
    uffd.register(base, len, MODE_MISSING)?;
    let t = Instant::now();
    for p in 0..pages {
        uffd.copy(base + p * 4096, &page)?;
    }
    let copy = per_page(t);

    let fd = rustix::fs::memfd_create("bench", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, 2 * len)?;
    let t = Instant::now();
    for p in 0..pages {
        rustix::io::pwrite(&fd, &page, p * 4096)?;
    }
    let hole = per_page(t);
    rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), len, len)?;
    let t = Instant::now();
    for p in pages..2 * pages {
        rustix::io::pwrite(&fd, &page, p * 4096)?;
    }
    let allocated = per_page(t);
    Ok((copy, hole, allocated))
}

fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let a = TcpStream::connect(l.local_addr()?).context("connect")?;
    let (b, _) = l.accept().context("accept")?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

fn tcp_bandwidth(bytes: usize) -> anyhow::Result<f64> {
    let (mut tx, mut rx) = tcp_pair()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0;
        loop {
            match rx.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    });
    let chunk = vec![0x5Au8; 256 << 10];
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        tx.write_all(&chunk)?;
        sent += chunk.len();
    }
    drop(tx);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    if got != sent {
        bail!("sent {sent} bytes, received {got}");
    }
    Ok(sent as f64 / secs)
}

fn tcp_rtt(rounds: usize) -> anyhow::Result<(f64, f64)> {
    let (mut c, mut s) = tcp_pair()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let page = vec![7u8; 4096];
        let mut req = [0u8; 8];
        loop {
            if s.read_exact(&mut req).is_err() {
                return Ok(());
            }
            s.write_all(&page)?;
        }
    });
    let mut page = vec![0u8; 4096];
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds + 100 {
        let t = Instant::now();
        c.write_all(&(i as u64).to_le_bytes())?;
        c.read_exact(&mut page)?;
        if i >= 100 {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(c);
    let _ = server.join();
    Ok((
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    ))
}

pub fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// A real-mode VM with 1 MiB of anonymous RAM and `code` at 0x1000.
struct TinyVm {
    _kvm: Kvm,
    vm: VmFd,
    ram: MmapRegion,
}

const RAM: usize = 1 << 20;

impl TinyVm {
    fn new(code: &[u8]) -> anyhow::Result<Self> {
        let kvm = Kvm::new().context("open /dev/kvm")?;
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let ram = MmapRegion::anonymous(RAM)?;
        ram.write(0x1000, code)?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM as u64,
            userspace_addr: ram.as_ptr() as u64,
        };
        // SAFETY: the region describes `ram`, which lives as long as the VM (same struct,
        // dropped after `vm`).
        unsafe { vm.set_user_memory_region(region) }.context("memslot")?;
        Ok(Self { _kvm: kvm, vm, ram })
    }

    /// Runs the code on a fresh vCPU until `hlt`; returns the time spent.
    fn run(&self) -> anyhow::Result<Duration> {
        let mut vcpu = self.vm.create_vcpu(0).context("vCPU")?;
        let mut sregs = vcpu.get_sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)?;
        let regs = kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)?;
        let t = Instant::now();
        loop {
            match faultline::trap::kvm_userfault::run_vcpu(&mut vcpu).context("KVM_RUN")? {
                VcpuExit::Hlt => return Ok(t.elapsed()),
                VcpuExit::IoOut(..) => {}
                other => bail!("unexpected exit {other:?}"),
            }
        }
    }
}

/// Touches `PAGES` consecutive 4 KiB pages from 0x10000, one store each, then halts.
const PAGES: u16 = 128;
fn touch_code() -> Vec<u8> {
    let mut c = vec![0xB9];
    c.extend_from_slice(&PAGES.to_le_bytes()); // mov cx, PAGES
    c.extend_from_slice(&[0xB8, 0x00, 0x10]); // mov ax, 0x1000
    c.extend_from_slice(&[0x8E, 0xC0]); // l: mov es, ax
    c.extend_from_slice(&[0x26, 0xA2, 0x00, 0x00]); // mov [es:0], al
    c.extend_from_slice(&[0x05, 0x00, 0x01]); // add ax, 0x100
    c.extend_from_slice(&[0xE2, 0xF5]); // loop l
    c.push(0xF4); // hlt
    c
}

fn uffd_vcpu_fault(reps: usize) -> anyhow::Result<(f64, f64)> {
    let mut with_faults = Vec::new();
    let mut baseline = Vec::new();
    for _ in 0..reps {
        // Present pages: the loop's own cost.
        let vm = TinyVm::new(&touch_code())?;
        vm.ram.write(0x10000, &vec![1u8; PAGES as usize * 4096])?;
        baseline.push(vm.run()?.as_secs_f64() * 1e6 / f64::from(PAGES));

        // Missing pages, resolved by a polling handler.
        let vm = TinyVm::new(&touch_code())?;
        let uffd = Arc::new(Userfaultfd::new(0).context("userfaultfd")?);
        let base = vm.ram.as_ptr() as u64;
        uffd.register(base + 0x10000, (RAM - 0x10000) as u64, MODE_MISSING)?;
        let handler = {
            let uffd = uffd.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let page = vec![3u8; 4096];
                let mut served = 0;
                while served < PAGES {
                    let mut pfd = [rustix::event::PollFd::new(
                        &*uffd,
                        rustix::event::PollFlags::IN,
                    )];
                    rustix::event::poll(&mut pfd, None)?;
                    for e in uffd.read_events(16)? {
                        if let Event::PageFault { address, .. } = e {
                            uffd.copy(address & !4095, &page)?;
                            served += 1;
                        }
                    }
                }
                Ok(())
            })
        };
        with_faults.push(vm.run()?.as_secs_f64() * 1e6 / f64::from(PAGES));
        handler
            .join()
            .map_err(|_| anyhow::anyhow!("handler panicked"))??;
    }
    let b = percentile(&mut baseline, 0.5);
    let f = percentile(&mut with_faults, 0.5);
    Ok(((f - b).max(0.0), b))
}

fn kvm_exit(reps: usize) -> anyhow::Result<f64> {
    const N: u16 = 2000;
    let mut c = vec![0xB9];
    c.extend_from_slice(&N.to_le_bytes()); // mov cx, N
    c.extend_from_slice(&[0xE6, 0xF0]); // l: out 0xF0, al
    c.extend_from_slice(&[0xE2, 0xFC]); // loop l
    c.push(0xF4);
    let mut samples = Vec::new();
    for _ in 0..reps {
        let vm = TinyVm::new(&c)?;
        samples.push(vm.run()?.as_secs_f64() * 1e6 / f64::from(N));
    }
    Ok(percentile(&mut samples, 0.5))
}
