//! The frames a target reads on the main channel after the handshake, decoded: page batches,
//! control messages and the switch-over. Anything else there is a protocol violation.

use std::io::Read;

use faultline::page_batch::PagesBatch;
use faultline::wire::frame::{FrameReader, FrameType};
use faultline::wire::{Control, SwitchOver, WireError};

/// One decoded main-channel frame.
pub enum Incoming<'a> {
    Pages {
        batch: PagesBatch<'a>,
        /// The frame's bytes on the wire, as the source counted them.
        wire_len: u64,
    },
    Control(Control),
    SwitchOver(SwitchOver),
}

/// Reads and decodes the next main-channel frame of a VM with `total` pages.
pub fn read_incoming(
    r: &mut FrameReader<impl Read>,
    total: u64,
) -> Result<Incoming<'_>, WireError> {
    let frame = r.read()?;
    Ok(match frame.kind {
        FrameType::Pages => Incoming::Pages {
            wire_len: frame.wire_len(),
            batch: PagesBatch::parse(frame.payload, total)?,
        },
        FrameType::Control => Incoming::Control(Control::parse(frame.payload)?),
        FrameType::SwitchOver => Incoming::SwitchOver(SwitchOver::parse(frame.payload, total)?),
        got => {
            return Err(WireError::Unexpected {
                expected: "pages, control or switch-over",
                got,
            });
        }
    })
}
