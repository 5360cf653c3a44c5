//! The target side of post-copy: which pages are valid, and installing pages into the target
//! VMM's memory so that each is installed exactly once and every vCPU waiting for it wakes.
//!
//! Owns page state and installation; knows nothing of networks or policies (the sidecar feeds
//! it pages from the wire and fault events from the userfaultfd).

pub mod installer;
pub mod page_states;

pub use installer::{InstallError, Installed, Installer, Trap, TrapKind};
pub use page_states::{FaultOutcome, PageStates};
