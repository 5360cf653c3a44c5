//! Artifacts built on the host from our binaries: root file systems, tar archives and OCI
//! images. Nothing here runs them.

pub mod image;
pub mod rootfs;
pub mod tar;
