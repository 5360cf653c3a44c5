//! Trap mechanisms: the names of the backends that turn "the guest touched a page that is not
//! here yet" into an event, and the result of probing whether one works for a backing. Plain
//! data, usable without KVM (the operator reads these from sidecars).

use serde::{Deserialize, Serialize};

use crate::layout::BackingKind;

/// A trap backend (DESIGN §3).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum TrapBackend {
    /// KVM Userfault: a per-page bitmap on the memslot; vCPU accesses exit to the VMM.
    KvmUserfault,
    /// userfaultfd on the VMM's mapping of guest memory.
    Userfaultfd,
}

impl std::fmt::Display for TrapBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::KvmUserfault => "kvm-userfault",
            Self::Userfaultfd => "userfaultfd",
        })
    }
}

/// Whether `backend` works for memory of kind `backing` on this kernel, found by trying it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackendProbe {
    pub backing: BackingKind,
    pub backend: TrapBackend,
    pub available: bool,
    /// What was probed and what the kernel answered, either way.
    pub reason: String,
}
