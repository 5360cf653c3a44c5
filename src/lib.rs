//! Faultline core library.
//!
//! Owns what more than one Faultline component needs, and nothing that belongs to one of them:
//!
//! - data: the guest memory [`layout`], page [`bitmap`]s, [`page_batch`]es, the migration
//!   [`policy`], [`units`];
//! - protocols: the VMM protocol ([`vmm_protocol`]: codec, messages, a blocking client), the
//!   sidecar-to-sidecar [`wire`] protocol, the sidecar HTTP API's types ([`sidecar_api`]);
//! - rules, as pure functions: when pre-copy stops ([`convergence`]) and which trap backend a
//!   migration uses ([`trap::choose`]);
//! - the target's machinery: trap backends ([`trap`]), page states and the installer
//!   ([`postcopy`]), another process's [`guest_memory`], the capability [`probe`];
//! - TLS for the control API and the migration stream ([`tls`]);
//! - thin safe wrappers over raw system calls ([`sys`]) and the one lock helper ([`sync`]).
//!
//! It must not depend on Kubernetes or HTTP crates, and it never issues KVM ioctls on behalf of
//! a VMM: KVM only accepts them from the process that created the VM. ARCHITECTURE.md shows how
//! the parts fit.

pub mod bitmap;
pub mod convergence;
pub mod guest_memory;
pub mod layout;
pub mod page_batch;
pub mod policy;
pub mod postcopy;
#[cfg(feature = "kvm")]
pub mod probe;
pub mod sidecar_api;
pub mod strict_json;
pub mod sync;
pub mod sys;
pub mod tls;
pub mod trap;
pub mod units;
pub mod vmm_protocol;
pub mod wire;

pub use layout::{BackingKind, MemoryLayout, PAGE_SIZE, Region};
