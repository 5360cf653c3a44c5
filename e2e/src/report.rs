//! What the guest reports and what the matrix prints: the plan the host hands the guest, the
//! result lines the guest writes (one JSON object per line on its second serial port), and the
//! per-kernel report of `kernel-matrix --json`.

use faultline::trap::BackendProbe;
use serde::{Deserialize, Serialize};

/// What to run inside one boot.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Whether this kernel is expected to have KVM Userfault (our patched kernel).
    pub expect_userfault: bool,
    /// Path of faultline-vmm inside the guest.
    pub vmm: String,
    /// Guest test names, in order (see `guest::TESTS`).
    pub tests: Vec<String>,
    /// Extra tests that run a command inside the guest and pass if it exits 0.
    #[serde(default)]
    pub exec: Vec<ExecTest>,
}

/// A test that runs a program inside the guest: the hook for end-to-end programs such as the
/// migration demo.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecTest {
    pub name: String,
    pub argv: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Passed,
    Failed,
    /// Cannot run on this kernel, for the reason in `detail` (found by trying).
    Unavailable,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestResult {
    pub name: String,
    pub passed: bool,
    pub status: Status,
    pub detail: String,
    pub seconds: f64,
}

/// A kernel property worth knowing that is not a trap backend, found by trying it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fact {
    pub name: String,
    pub available: bool,
    pub reason: String,
}

impl Fact {
    /// A fact found by trying: `Ok` holds what worked, `Err` what the kernel answered.
    pub fn from_result(name: &str, r: Result<String, String>) -> Self {
        let (available, reason) = match r {
            Ok(reason) => (true, reason),
            Err(reason) => (false, reason),
        };
        Self {
            name: name.into(),
            available,
            reason,
        }
    }
}

/// One line the guest writes on its result port.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum GuestLine {
    Start { release: String },
    Probe { backends: Vec<BackendProbe> },
    Fact(Fact),
    Test(TestResult),
    Done,
}

/// One kernel of the matrix, as `--json` prints it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KernelReport {
    pub name: String,
    /// `uname -r` inside the guest (or the expected release if it never booted).
    pub release: String,
    /// Debian packages (name=version) or our build's key.
    pub source: String,
    pub booted: bool,
    pub boot_seconds: Option<f64>,
    pub backends: Vec<BackendProbe>,
    pub facts: Vec<Fact>,
    pub tests: Vec<TestResult>,
    /// Where the console log of the boot is kept.
    pub console_log: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct MatrixReport {
    pub kernels: Vec<KernelReport>,
}
