//! The wire protocol between sidecars (docs/wire-protocol.md): framing with a CRC32C per
//! frame, the mutual HMAC handshake, and the page and control messages.
//!
//! Pure codecs over `Read`/`Write`; no threads, no policy. Every decoder rejects what it does
//! not understand with a [`WireError`] and never panics on input.

pub mod frame;
pub mod handshake;
pub mod messages;

pub use frame::{FrameReader, FrameType, WireError, frame_len, write_frame};
pub use handshake::{Channel, LayoutDigest, Secret, layout_digest};
pub use messages::{Control, FaultRequest, Needed, SwitchOver};

/// The wire protocol version this build speaks.
pub const WIRE_VERSION: u8 = 1;
