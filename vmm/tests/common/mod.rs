//! Test support: start real `faultline-vmm` processes and talk to them over their control
//! sockets. Tests skip (with a message) when /dev/kvm is not usable.

#![allow(dead_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use faultline::layout::{BackingKind, MemoryLayout};
use faultline::sys::MmapRegion;
use faultline::vmm_protocol::VmmClient;
use faultline::vmm_protocol::messages::{HelloReply, VmStatus};

pub const BIN: &str = env!("CARGO_BIN_EXE_faultline-vmm");

/// True when KVM can be opened; tests print why they skip otherwise.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipping: /dev/kvm is not usable here ({e})");
            false
        }
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "faultline-test-{tag}-{}-{:x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(u64::from(std::process::id()));
    h.finish()
}

/// A running VMM process with a control socket; killed when dropped.
pub struct Vmm {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Vmm {
    /// Starts `faultline-vmm` with `args` plus a control socket, and waits for the socket.
    pub fn start(tag: &str, args: &[&str]) -> Self {
        let dir = temp_dir(tag);
        let socket = dir.join("vmm.sock");
        let child = Command::new(BIN)
            .args(args)
            .arg("--control")
            .arg(&socket)
            .args(["--quiet", "--json", "--log", "warn"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn faultline-vmm");
        let mut vmm = Self { child, socket, dir };
        vmm.wait_for_socket();
        vmm
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("faultline-vmm exited early with {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("faultline-vmm control socket never appeared");
    }

    pub fn client(&self) -> VmmClient {
        VmmClient::connect(&self.socket).expect("connect to the VMM")
    }

    /// Asks the VMM to shut down and returns its final JSON status and exit code.
    pub fn shutdown(mut self) -> (VmStatus, i32) {
        let _ = self.client().shutdown();
        self.wait_exit()
    }

    /// Waits for the process to exit on its own; returns its final status and exit code.
    pub fn wait_exit(&mut self) -> (VmStatus, i32) {
        let child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        let out = child.wait_with_output().expect("wait for faultline-vmm");
        let status: VmStatus = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "final status is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (status, out.status.code().unwrap_or(-1))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Guest memory of another process, reached through the descriptors from hello.
pub struct RemoteMemory {
    pub layout: MemoryLayout,
    fds: Vec<OwnedFd>,
    maps: Vec<Option<MmapRegion>>,
}

impl RemoteMemory {
    pub fn open(hello: &HelloReply, fds: Vec<OwnedFd>) -> Self {
        let maps = hello
            .layout
            .regions
            .iter()
            .map(|r| match r.backing {
                // Anonymous memory arrives as the VMM's /proc/self/mem: use pread/pwrite.
                BackingKind::Anon => None,
                _ => Some(
                    MmapRegion::shared(fds[r.fd as usize].as_fd(), r.file_offset, r.size as usize)
                        .expect("map guest memory"),
                ),
            })
            .collect();
        Self {
            layout: hello.layout.clone(),
            fds,
            maps,
        }
    }

    fn locate(&self, gpa: u64) -> (usize, u64) {
        let i = self
            .layout
            .regions
            .iter()
            .position(|r| r.contains_gpa(gpa))
            .expect("gpa inside RAM");
        (i, gpa - self.layout.regions[i].guest_phys_addr)
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        let (i, off) = self.locate(gpa);
        match &self.maps[i] {
            Some(m) => m.read(off, buf).expect("read guest memory"),
            None => {
                let r = &self.layout.regions[i];
                let n = rustix::io::pread(&self.fds[r.fd as usize], &mut *buf, r.file_offset + off)
                    .expect("pread guest memory");
                assert_eq!(n, buf.len());
            }
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let (i, off) = self.locate(gpa);
        match &self.maps[i] {
            Some(m) => m.write(off, data).expect("write guest memory"),
            None => {
                let r = &self.layout.regions[i];
                let n = rustix::io::pwrite(&self.fds[r.fd as usize], data, r.file_offset + off)
                    .expect("pwrite guest memory");
                assert_eq!(n, data.len());
            }
        }
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn size(&self) -> u64 {
        self.layout.total_bytes()
    }
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

/// memtouch's memory layout for a RAM size (mirrors guest/memtouch.S).
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
