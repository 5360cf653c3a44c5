//! The target side of post-copy: which pages are valid, and installing pages into the target
//! VMM's memory so that each is installed exactly once and every vCPU waiting for it wakes.
//!
//! Owns page state and installation; knows nothing of networks or policies (the sidecar feeds
//! it page batches it decoded and the faults its trap reported). How each trap backend
//! installs a page lives in `crate::trap`.

pub mod installer;
pub mod page_states;

pub use installer::{InstallError, Installed, Installer};
pub use page_states::{FaultOutcome, PageStates};
