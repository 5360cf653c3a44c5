//! Moving bytes between the two sidecars over the wire protocol (docs/wire-protocol.md):
//! dialling and authenticating a channel, reading the control message a step expects, and
//! streaming guest pages as batches at a paced rate.
//!
//! Knows nothing of phases, VMMs or traps; the engines (`crate::source`, `crate::target`)
//! decide what to send and when.

pub mod channel;
pub mod control;
pub mod incoming;
pub mod pages;
pub mod protection;

pub use channel::{Conn, is_timeout};
pub use control::{Peer, expect};
pub use incoming::{Incoming, read_incoming};
pub use pages::{BATCH, Pacer, PageSender};
pub use protection::Protection;
