//! Test support for the reference VMM's tests: real `faultline-vmm` processes (through the
//! core library's `local` harness) and their guest memory (through `GuestMemory`, as the
//! sidecar reaches it). Tests skip, saying why, when /dev/kvm is not usable.

#![allow(dead_code)]

use std::time::{Duration, Instant};

pub use faultline::guest_memory::GuestMemory;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::{HelloReply, VmStatus};
use faultline_local::VmmProcess;

pub const BIN: &str = env!("CARGO_BIN_EXE_faultline-vmm");

pub fn kvm_available() -> bool {
    faultline_local::kvm_or_skip()
}

/// Starts `faultline-vmm` (the one cargo built beside this test) with `args` and a control
/// socket.
pub fn start(tag: &str, args: &[&str]) -> VmmProcess {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    VmmProcess::start(tag, &args).unwrap_or_else(|e| panic!("start faultline-vmm: {e}"))
}

pub fn client(vmm: &VmmProcess) -> VmmClient {
    vmm.client().expect("connect to the VMM")
}

/// A VMM's guest memory, opened from its hello reply as the sidecar opens it; accesses
/// panic on error, as test assertions do.
pub struct TestMemory(pub GuestMemory);

impl TestMemory {
    pub fn read_at(&self, gpa: u64, buf: &mut [u8]) {
        self.0.read_at(gpa, buf).expect("read guest memory");
    }

    pub fn write_at(&self, gpa: u64, data: &[u8]) {
        self.0.write_at(gpa, data).expect("write guest memory");
    }

    pub fn read_u64_at(&self, gpa: u64) -> u64 {
        self.0.read_u64_at(gpa).expect("read guest memory")
    }

    pub fn size(&self) -> u64 {
        self.0.layout().total_bytes()
    }
}

pub fn memory(hello: &HelloReply, fds: Vec<std::os::fd::OwnedFd>) -> TestMemory {
    TestMemory(GuestMemory::open(&hello.layout, fds).expect("open guest memory"))
}

pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("faultline-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Polls `status` until `pred` holds or `timeout` passes; returns the last status.
pub fn wait_status(
    client: &mut VmmClient,
    timeout: Duration,
    mut pred: impl FnMut(&VmStatus) -> bool,
) -> VmStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = client.status().expect("status");
        if pred(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// memtouch's memory layout for a RAM size, derived independently of the VMM from the
/// guest ABI document (docs/guest-abi.md), so the tests check the program against the spec.
pub struct MemtouchLayout {
    pub table: u64,
    pub data: u64,
    pub usable_pages: u64,
}

pub fn memtouch_layout(ram: u64) -> MemtouchLayout {
    let base = 0x20_0000u64;
    let total = (ram - base) >> 12;
    let table_pages = total.div_ceil(1024);
    MemtouchLayout {
        table: base,
        data: base + table_pages * 4096,
        usable_pages: total - table_pages,
    }
}
