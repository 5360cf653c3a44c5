//! The Faultline operator: reconciles `VirtualMachineMigration` objects by creating target
//! pods and driving the source and target sidecars through their HTTP API
//! (docs/sidecar-api.md). See docs/operator.md for the behaviour users rely on.
//!
//! The crate must not link KVM code: it uses the core library without its `kvm` feature.

pub mod cli;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod metrics;
pub mod migratable;
pub mod pki;
pub mod pods;
pub mod reconcile;
pub mod sidecar;
