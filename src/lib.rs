//! Faultline core library.
//!
//! Owns what every Faultline component shares and nothing that belongs to one of them: the
//! guest memory layout, page bitmaps, the VMM protocol (codec, messages and a blocking client),
//! size and duration units, and thin safe wrappers over the few raw system interfaces these need.
//!
//! It must not depend on Kubernetes or HTTP crates, and it never issues KVM ioctls on behalf of
//! a VMM: KVM only accepts them from the process that created the VM.

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
pub mod trap;
pub mod units;
pub mod vmm_protocol;
pub mod wire;

pub use layout::{BackingKind, MemoryLayout, PAGE_SIZE, Region};
