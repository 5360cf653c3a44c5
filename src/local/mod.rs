//! Running Faultline on one machine: start real `faultline-vmm` and `faultline-sidecar`
//! processes and talk to the sidecars' HTTP API. What `faultline demo`, the benchmark and the
//! end-to-end tests use to build a source and a target on loopback.
//!
//! Behind the `cli` feature: it brings an HTTP client, which the library proper must not need.

pub mod client;
pub mod process;

pub use client::{ClientError, SidecarClient};
pub use process::{LocalError, SidecarProcess, VmmProcess, binary};

/// For tests: true when KVM is usable; otherwise prints why the test skips and returns false.
pub fn kvm_or_skip() -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("skipping: {why}");
            false
        }
    }
}

/// Whether this process can use KVM; the error says why not (tests print it and skip).
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable here ({e})"))
}
