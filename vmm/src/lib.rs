//! The library half of faultline-vmm: only the modules that must be reachable from outside the
//! binary, which are the state blob's codec (`state`, with the accounting it carries) and the
//! built-in guest programs (`guest`, which the `faultline` CLI also runs on QEMU).
//!
//! The blob arrives from the migration source through the sidecar, so its decoder reads
//! untrusted bytes and has a fuzz target (`fuzz/fuzz_targets/state_blobs.rs`); a fuzz target
//! can only link a library. Everything else of the VMM stays private to the binary.

pub mod accounting;
pub mod guest;
pub mod state;
