//! Faultline on one machine: start real `faultline-vmm` and `faultline-sidecar` processes and
//! talk to the sidecars' HTTP API (and start QEMU, the benchmark's peer). What `faultline demo`, the benchmark and the tests use to
//! build a source and a target on loopback.
//!
//! A harness, not part of any deployed component: the VMM, the sidecar and the operator do not
//! link it (only their tests do). It must not hold migration logic; it starts processes, waits
//! for them and speaks the HTTP API as the operator would.

pub mod client;
pub mod pki;
pub mod process;
pub mod qemu;

pub use client::{ClientError, ClientTls, SidecarClient};
pub use process::{LocalError, SidecarProcess, VmmProcess, binary};

/// Set (to anything but `0`) to make a test that needs KVM fail where KVM is not usable,
/// instead of skipping. CI sets it (`.ci/run`): a runner without /dev/kvm must not report the
/// migration tests green without running them.
pub const REQUIRE_KVM_ENV: &str = "FAULTLINE_REQUIRE_KVM";

/// For tests that need KVM: true when KVM is usable. Otherwise the test skips — this prints
/// why and returns false — unless [`REQUIRE_KVM_ENV`] is set, in which case it panics with the
/// reason, failing the test.
pub fn kvm_or_skip() -> bool {
    run_or_skip(kvm_usable(), kvm_required())
}

/// The rule behind [`kvm_or_skip`]: run when usable; otherwise fail if `required`, else skip.
fn run_or_skip(usable: Result<(), String>, required: bool) -> bool {
    match usable {
        Ok(()) => true,
        Err(why) if required => {
            panic!("{REQUIRE_KVM_ENV} is set, so this test must run, but {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why} (set {REQUIRE_KVM_ENV}=1 to fail instead)");
            false
        }
    }
}

fn kvm_required() -> bool {
    std::env::var_os(REQUIRE_KVM_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether this process can use KVM; the error says why not.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm is not usable here ({e})"))
}

#[cfg(test)]
mod tests {
    use super::run_or_skip;

    #[test]
    fn a_test_runs_where_kvm_is_usable() {
        assert!(run_or_skip(Ok(()), true));
        assert!(run_or_skip(Ok(()), false));
    }

    #[test]
    fn without_kvm_a_test_skips_unless_kvm_is_required() {
        assert!(!run_or_skip(Err("no /dev/kvm".into()), false));
    }

    #[test]
    #[should_panic(
        expected = "FAULTLINE_REQUIRE_KVM is set, so this test must run, but no /dev/kvm"
    )]
    fn without_kvm_a_required_test_fails() {
        run_or_skip(Err("no /dev/kvm".into()), true);
    }
}
