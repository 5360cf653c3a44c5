//! One migration as this sidecar tracks it: the request, the state machine (phase, and the
//! commit and cancel decisions taken under one lock), the progress counters, and how an engine
//! says why it stopped.
//!
//! Read by the HTTP API, written by the engines. A leaf: it must not start engines, touch the
//! network or talk to the VMM (`crate::lifecycle`, `crate::source` and `crate::target` do).

pub mod counters;
pub mod outcome;
pub mod state;

pub use counters::{Counters, Transferred};
pub use outcome::{Link, Stop};
pub use state::{Accepted, Migration};
