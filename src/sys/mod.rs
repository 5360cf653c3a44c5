//! Thin safe wrappers over the raw system interfaces Faultline needs: shared memory mappings
//! and file-descriptor passing. Every `unsafe` block of the core library lives here or in a
//! module like it, with the reason it holds written beside it.

pub mod fdpass;
pub mod futex;
pub mod mmap;
pub mod sched;
pub mod uffd;

pub use mmap::{MmapError, MmapRegion};
