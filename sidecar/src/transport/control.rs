//! Reading the control message a step of the migration expects, the same way on both sides.

use std::io::Read;

use anyhow::Context;
use faultline::wire::Control;
use faultline::wire::frame::{FrameReader, FrameType};

use crate::migration::Stop;

/// Who is at the other end of a channel: it says how its silence and its `cancel` read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The source decides; its `cancel` ends the migration as cancelled.
    Source,
    /// A target cancels only when it cannot go on, which fails the migration.
    Target,
}

/// Reads the next frame, which must be a control message other than `cancel` (what the
/// migration is waiting for is `what`, for the error message).
pub fn read_control(
    r: &mut FrameReader<impl Read>,
    from: Peer,
    what: &str,
) -> Result<Control, Stop> {
    let frame = r.read().with_context(|| match from {
        Peer::Source => format!("the source went away (waiting for {what})"),
        Peer::Target => format!("the target did not answer ({what})"),
    })?;
    if frame.kind != FrameType::Control {
        return Err(Stop::failed(format!(
            "expected {what}, got a {:?} frame",
            frame.kind
        )));
    }
    match Control::parse(frame.payload)? {
        Control::Cancel { reason } => Err(match from {
            Peer::Source => Stop::Cancelled(format!("the source cancelled: {reason}")),
            Peer::Target => Stop::failed(format!("the target refused: {reason}")),
        }),
        c => Ok(c),
    }
}

/// Reads the control message `what`, which `pick` recognises (and takes its fields from);
/// any other message fails the migration.
pub fn expect<T>(
    r: &mut FrameReader<impl Read>,
    from: Peer,
    what: &str,
    pick: impl FnOnce(&Control) -> Option<T>,
) -> Result<T, Stop> {
    let c = read_control(r, from, what)?;
    pick(&c).ok_or_else(|| Stop::failed(format!("expected {what}, got {c:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(msgs: &[Control]) -> FrameReader<std::io::Cursor<Vec<u8>>> {
        let mut wire = Vec::new();
        for m in msgs {
            m.write(&mut wire).unwrap();
        }
        FrameReader::new(std::io::Cursor::new(wire))
    }

    #[test]
    fn a_cancel_reads_by_who_sent_it() {
        let cancel = Control::Cancel {
            reason: "no".into(),
        };
        let e = read_control(
            &mut reader(std::slice::from_ref(&cancel)),
            Peer::Source,
            "x",
        )
        .unwrap_err();
        assert!(matches!(e, Stop::Cancelled(ref w) if w == "the source cancelled: no"));
        let e = read_control(&mut reader(&[cancel]), Peer::Target, "x").unwrap_err();
        assert!(matches!(e, Stop::Failed(_)));
        assert_eq!(e.to_string(), "the target refused: no");
    }

    #[test]
    fn expect_takes_the_awaited_message_and_names_any_other() {
        let mut r = reader(&[Control::Complete { faults: 7 }, Control::Resumed]);
        let faults = expect(&mut r, Peer::Target, "complete", |c| match c {
            Control::Complete { faults } => Some(*faults),
            _ => None,
        });
        assert_eq!(faults.unwrap(), 7);
        let e = expect(&mut r, Peer::Target, "prepared", |c| {
            matches!(c, Control::Prepared).then_some(())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "expected prepared, got Resumed");
        let e = read_control(&mut r, Peer::Source, "commit").unwrap_err();
        assert!(
            e.to_string()
                .contains("the source went away (waiting for commit)")
        );
    }
}
