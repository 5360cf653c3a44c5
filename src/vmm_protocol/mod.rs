//! The VMM protocol (v1): how a VMM and the Faultline sidecar talk over a Unix socket.
//!
//! The normative description is `docs/vmm-protocol.md`; this module is its implementation for
//! both ends: the frame codec ([`frame`]), the messages ([`messages`]), a framed connection
//! with descriptor passing ([`conn`]) and a blocking client ([`client`]). A VMM that is not
//! written in Rust implements the document, not this module.

pub mod client;
pub mod conn;
pub mod frame;
pub mod messages;

pub use client::{ClientError, VmmClient};
pub use conn::{ConnError, Connection, Frame};
pub use frame::{FrameError, FrameHeader, FrameKind};
pub use messages::{ErrorCode, ErrorReply, Request};

/// The protocol version this build speaks. 2: a vCPU waiting under KVM Userfault sleeps on its
/// bitmap word, not on a wake counter (`docs/vmm-protocol.md`, `kvm_userfault_arm`).
pub const PROTOCOL_VERSION: u16 = 2;
