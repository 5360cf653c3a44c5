//! Trap mechanisms: what turns "a vCPU touched a page that has not arrived" into an event the
//! target sidecar can answer. The one home of
//!
//! - the **names** of the two backends ([`Backend`]) and of what a migration asks for
//!   ([`Preference`]), with the result of probing a backend on a node ([`BackendProbe`]);
//! - the **rule** that picks a backend, or falls back to pre-copy, from what a target offers
//!   ([`choose`]), used by the operator (from the node's probes) and the target sidecar (from its
//!   VMM's capabilities) alike, so both always reach the same answer;
//! - the **two backends** as the target uses them once armed ([`Armed`]): installing a page
//!   and waking the vCPUs that wait for it, over [`userfaultfd`] or [`kvm_userfault`].
//!
//! The raw system interfaces stay in `crate::sys`; this module must not decide when to arm or
//! disarm (the sidecar's engines do) and issues no KVM ioctls (only a VMM may).

pub mod kvm_userfault;
pub mod userfaultfd;

use serde::{Deserialize, Serialize};

use crate::guest_memory::{GuestMemory, GuestMemoryError};
use crate::layout::BackingKind;
use crate::policy::Mode;
use crate::sys::uffd::{UffdError, Userfaultfd};

use self::kvm_userfault::UserfaultBitmap;

/// A trap backend. Its kebab-case name is how the sidecar API, the wire protocol's `ready`
/// message, node probes and the VMM protocol's capabilities spell it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// userfaultfd on the VMM's mapping of guest memory (missing mode): every access that
    /// goes through the mapping traps, KVM's own accesses included.
    Userfaultfd,
    /// KVM Userfault (our kernel patch in `kernel/`): a per-page bitmap on the memslot; vCPU
    /// accesses to marked pages exit to the VMM. The only backend that traps guest_memfd.
    KvmUserfault,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Self::Userfaultfd, Self::KvmUserfault];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Userfaultfd => "userfaultfd",
            Self::KvmUserfault => "kvm-userfault",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which backend a migration asks for. On the sidecar API it is spelt `auto`, `userfaultfd` or
/// `kvm-userfault`; the operator's CRD spells the same values in PascalCase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Preference {
    /// The first backend the target offers, in [`auto_order`] for the VM's backing. A hybrid
    /// migration falls back to pre-copy when there is none.
    #[default]
    Auto,
    /// This backend and no other: a target without it fails the migration before anything
    /// moves.
    Only(Backend),
}

impl Preference {
    /// Every value, in the order documentation lists them.
    pub const ALL: [Preference; 3] = [
        Self::Auto,
        Self::Only(Backend::Userfaultfd),
        Self::Only(Backend::KvmUserfault),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Only(b) => b.as_str(),
        }
    }

    /// The backends this preference accepts for memory of `backing`, best first.
    pub fn candidates(self, backing: BackingKind) -> Vec<Backend> {
        match self {
            Self::Auto => auto_order(backing).to_vec(),
            Self::Only(b) => vec![b],
        }
    }
}

impl std::fmt::Display for Preference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Preference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown trap `{s}` (expected auto, userfaultfd or kvm-userfault)")
            })
    }
}

impl Serialize for Preference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Preference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `Auto`'s order, decided once here. For anonymous and memfd memory userfaultfd comes first:
/// it is the long-proven path and it also traps KVM's own accesses to guest memory (KVM
/// Userfault traps vCPU accesses only). guest_memfd memory is reached by vCPUs without a host
/// address, which only KVM Userfault traps, so there it comes first (today the kernel refuses
/// userfaultfd on guest_memfd anyway).
pub fn auto_order(backing: BackingKind) -> [Backend; 2] {
    match backing {
        BackingKind::GuestMemfd => [Backend::KvmUserfault, Backend::Userfaultfd],
        BackingKind::Anon | BackingKind::Memfd => [Backend::Userfaultfd, Backend::KvmUserfault],
    }
}

/// Whether `backend` works for memory of kind `backing` on a node, found by trying it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackendProbe {
    pub backing: BackingKind,
    pub backend: Backend,
    pub available: bool,
    /// What was probed and what the kernel answered, either way.
    pub reason: String,
}

/// What [`choose`] decided: the mode the migration will run in and the backend the target
/// arms (none for pre-copy), with the reason for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// The requested mode, or `PreCopy` when a hybrid migration fell back.
    pub mode: Mode,
    pub backend: Option<Backend>,
    /// What the target's probe said of the chosen backend, or why there is none.
    pub reason: String,
}

/// Post-copy was asked for and the target offers nothing that fits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "post-copy is impossible: the target offers no {} for {backing} memory ({said})",
    names(wanted)
)]
pub struct NoMechanism {
    /// The backends the preference accepted, best first.
    pub wanted: Vec<Backend>,
    pub backing: BackingKind,
    /// What the target's probes said, for people.
    pub said: String,
}

fn names(backends: &[Backend]) -> String {
    let names: Vec<&str> = backends.iter().map(|b| b.as_str()).collect();
    names.join(" or ")
}

/// The rule that picks a trap backend. A pre-copy migration needs none. Otherwise the first
/// backend of `preference` (see [`Preference::candidates`]) that `offers` says is available for
/// `backing` is chosen. When none is: a `Hybrid` migration under `Auto` falls back to pre-copy
/// (its policy allows stop-and-copy); a `PostCopy` one, or a preference that names a backend,
/// cannot go on, and the error says what the target's probes said.
pub fn choose(
    preference: Preference,
    mode: Mode,
    backing: BackingKind,
    offers: &[BackendProbe],
) -> Result<Choice, NoMechanism> {
    if mode == Mode::PreCopy {
        return Ok(Choice {
            mode,
            backend: None,
            reason: "pre-copy only: no trap needed".into(),
        });
    }
    let offers: Vec<&BackendProbe> = offers.iter().filter(|o| o.backing == backing).collect();
    let wanted = preference.candidates(backing);
    let pick = wanted
        .iter()
        .find_map(|w| offers.iter().find(|o| o.backend == *w && o.available));
    if let Some(p) = pick {
        return Ok(Choice {
            mode,
            backend: Some(p.backend),
            reason: p.reason.clone(),
        });
    }
    let said = if offers.is_empty() {
        format!("the target offers no trap backend for {backing} memory")
    } else {
        let said: Vec<String> = offers
            .iter()
            .map(|o| format!("{}: {}", o.backend, o.reason))
            .collect();
        said.join("; ")
    };
    if mode == Mode::Hybrid && preference == Preference::Auto {
        return Ok(Choice {
            mode: Mode::PreCopy,
            backend: None,
            reason: format!(
                "no post-copy mechanism for {backing} memory on the target ({said}); pre-copy only"
            ),
        });
    }
    Err(NoMechanism {
        wanted,
        backing,
        said,
    })
}

/// A trap the target has armed, holding what it needs to install pages and wake vCPUs.
pub enum Armed {
    /// A userfaultfd with the VMM's RAM registered in missing mode.
    Userfaultfd(Userfaultfd),
    /// The VMM's KVM Userfault bitmap, shared with it (every page marked when armed), and,
    /// when the VMM could register it, the userfaultfd its RAM mapping is registered with in
    /// minor mode: that half traps KVM's and the VMM's own accesses through the mapping,
    /// which the bitmap does not see.
    KvmUserfault {
        bitmap: UserfaultBitmap,
        host: Option<Userfaultfd>,
    },
}

/// A backend refused to install a page or wake its waiters.
#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    #[error(transparent)]
    Memory(#[from] GuestMemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

impl Armed {
    pub fn backend(&self) -> Backend {
        match self {
            Self::Userfaultfd(_) => Backend::Userfaultfd,
            Self::KvmUserfault { .. } => Backend::KvmUserfault,
        }
    }

    /// Makes `page` hold `data` (zeros when `None`) and wakes every vCPU already waiting for
    /// it. Called once per page: the caller guarantees exactly-once (`postcopy::PageStates`).
    pub fn install(
        &self,
        mem: &GuestMemory,
        page: u64,
        data: Option<&[u8]>,
    ) -> Result<(), TrapError> {
        match self {
            Self::Userfaultfd(uffd) => userfaultfd::install(uffd, mem, page, data),
            Self::KvmUserfault { bitmap, .. } => kvm_userfault::install(bitmap, mem, page, data),
        }
    }

    /// Wakes whoever waits on `page`, which is valid: a fault read while someone else
    /// installed it, or a page installed while its fault was being read. Under KVM Userfault
    /// with the host half, the page is also mapped into the VMM with `UFFDIO_CONTINUE`, which
    /// wakes a KVM or VMM access stopped in a minor fault on it (an install alone does not:
    /// it writes through the sidecar's own mapping).
    pub fn wake(&self, mem: &GuestMemory, page: u64) -> Result<(), TrapError> {
        match self {
            Self::Userfaultfd(uffd) => userfaultfd::wake(uffd, mem, page),
            Self::KvmUserfault { bitmap, host } => {
                bitmap.wake_page(page);
                if let Some(uffd) = host {
                    userfaultfd::map_valid(uffd, mem, page)?;
                }
                Ok(())
            }
        }
    }

    /// The userfaultfd that reports KVM's and the VMM's own accesses under KVM Userfault.
    pub fn host_uffd(&self) -> Option<&Userfaultfd> {
        match self {
            Self::KvmUserfault { host, .. } => host.as_ref(),
            Self::Userfaultfd(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackingKind::*;

    fn offers(list: &[(BackingKind, Backend, bool)]) -> Vec<BackendProbe> {
        list.iter()
            .map(|&(backing, backend, available)| BackendProbe {
                backing,
                backend,
                available,
                reason: format!("probe of {backend} on {backing}: {available}"),
            })
            .collect()
    }

    const UFFD: Backend = Backend::Userfaultfd;
    const KVM: Backend = Backend::KvmUserfault;

    #[test]
    fn auto_prefers_userfaultfd_on_memfd_and_anon_and_kvm_userfault_on_guest_memfd() {
        let all = offers(&[
            (Anon, UFFD, true),
            (Anon, KVM, true),
            (Memfd, UFFD, true),
            (Memfd, KVM, true),
            (GuestMemfd, UFFD, true),
            (GuestMemfd, KVM, true),
        ]);
        for (backing, want) in [(Anon, UFFD), (Memfd, UFFD), (GuestMemfd, KVM)] {
            let c = choose(Preference::Auto, Mode::Hybrid, backing, &all).expect("offered");
            assert_eq!(c.backend, Some(want), "{backing}");
            assert_eq!(c.mode, Mode::Hybrid);
        }
        // Auto takes the other one where the first is missing.
        let only_kvm = offers(&[(Memfd, UFFD, false), (Memfd, KVM, true)]);
        let c = choose(Preference::Auto, Mode::PostCopy, Memfd, &only_kvm).expect("kvm");
        assert_eq!(c.backend, Some(KVM));
        // An explicit preference is honoured over Auto's order.
        let c = choose(Preference::Only(KVM), Mode::PostCopy, Memfd, &all).expect("kvm");
        assert_eq!(c.backend, Some(KVM));
    }

    #[test]
    fn only_hybrid_under_auto_falls_back_to_pre_copy() {
        let none = offers(&[(GuestMemfd, UFFD, false), (GuestMemfd, KVM, false)]);
        let c = choose(Preference::Auto, Mode::Hybrid, GuestMemfd, &none).expect("fallback");
        assert_eq!((c.mode, c.backend), (Mode::PreCopy, None));
        assert!(
            c.reason.contains("probe of kvm-userfault on guest-memfd"),
            "{}",
            c.reason
        );

        let e = choose(Preference::Auto, Mode::PostCopy, GuestMemfd, &none).expect_err("post");
        assert_eq!(e.wanted, [KVM, UFFD]);
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "post-copy is impossible: the target offers no kvm-userfault or userfaultfd for guest-memfd memory ("
            ),
            "{msg}"
        );
        let e =
            choose(Preference::Only(KVM), Mode::Hybrid, GuestMemfd, &none).expect_err("explicit");
        assert_eq!(e.wanted, [KVM]);
        let e = choose(Preference::Auto, Mode::PostCopy, Anon, &none).expect_err("nothing");
        assert!(
            e.to_string().contains("offers no trap backend for anon"),
            "{e}"
        );
    }

    #[test]
    fn pre_copy_needs_no_trap() {
        let c = choose(Preference::Only(KVM), Mode::PreCopy, GuestMemfd, &[]).expect("pre");
        assert_eq!((c.mode, c.backend), (Mode::PreCopy, None));
    }

    #[test]
    fn preference_names() {
        for p in Preference::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
            assert_eq!(serde_json::from_str::<Preference>(&json).unwrap(), p);
        }
        assert_eq!(
            serde_json::to_string(&Backend::KvmUserfault).unwrap(),
            "\"kvm-userfault\""
        );
        assert!("Auto".parse::<Preference>().is_err());
    }
}
