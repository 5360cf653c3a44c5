//! Receiving pre-copy: page batches are written into the VM's memory (nothing runs there yet,
//! so a page may arrive many times), each pass is acknowledged once installed, until the
//! source's switch-over message.

use std::io::{Read, Write};

use anyhow::Context;

use faultline::postcopy::Installer;
use faultline::wire::frame::FrameReader;
use faultline::wire::{Control, SwitchOver};

use crate::metrics::Metrics;
use crate::migration::{Migration, Stop, Transferred};
use crate::transport::{Incoming, read_incoming};

/// Installs pre-copied pages until the switch-over message, which it returns. Reads from and
/// answers on the main channel (`reader`, `writer`).
pub(super) fn precopy(
    m: &Migration,
    metrics: &Metrics,
    installer: &Installer,
    total: u64,
    main: &mut crate::transport::Conn,
) -> Result<SwitchOver, Stop> {
    receive(
        m,
        metrics,
        installer,
        total,
        &mut main.reader,
        &mut main.writer,
    )
}

fn receive(
    m: &Migration,
    metrics: &Metrics,
    installer: &Installer,
    total: u64,
    reader: &mut FrameReader<impl Read>,
    writer: &mut impl Write,
) -> Result<SwitchOver, Stop> {
    loop {
        if m.cancelled() {
            let _ = Control::Cancel {
                reason: "cancelled on the target".into(),
            }
            .write(writer);
            return Err(Stop::Cancelled("cancelled by request".into()));
        }
        let incoming =
            read_incoming(reader, total).context("the source went away during pre-copy")?;
        match incoming {
            Incoming::Pages { batch, wire_len } => {
                installer
                    .precopy_batch(&batch)
                    .context("installing pre-copied pages")?;
                m.account(
                    metrics,
                    Transferred {
                        pages: batch.entries.len() as u64,
                        zero: batch.zero_pages(),
                        bytes: wire_len,
                    },
                );
            }
            Incoming::SwitchOver(switch) => return Ok(switch),
            Incoming::Control(Control::RoundEnd { round, sent }) => {
                m.counters
                    .precopy_rounds
                    .store(round, std::sync::atomic::Ordering::Relaxed);
                m.set_message(format!(
                    "pre-copy pass {round} received and installed ({sent} pages)"
                ));
                Control::RoundDone { round }.write(writer)?;
            }
            Incoming::Control(Control::Cancel { reason }) => {
                return Err(Stop::Cancelled(format!("the source cancelled: {reason}")));
            }
            Incoming::Control(other) => {
                return Err(Stop::failed(format!(
                    "unexpected {other:?} during pre-copy"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::bitmap::PageBitmap;
    use faultline::guest_memory::GuestMemory;
    use faultline::layout::PAGE_SIZE;
    use faultline::page_batch::{PageEntry, PagesBatch};
    use faultline::sidecar_api::{Policy, Role};

    const PAGES: u64 = 64;

    /// A target migration and an installer over fresh memory, with no trap.
    struct Setup {
        m: Migration,
        metrics: Metrics,
        installer: Installer,
    }

    impl Setup {
        fn new() -> Self {
            Self {
                m: crate::testing::migration(Role::Target, Policy::default()),
                metrics: Metrics::new(),
                installer: Installer::new(GuestMemory::memfd(PAGES).unwrap(), None),
            }
        }

        /// Receives from `wire`; what the target answers goes to `answers`.
        fn receive(&self, wire: &[u8], answers: &mut Vec<u8>) -> Result<SwitchOver, Stop> {
            let mut reader = FrameReader::new(wire);
            receive(
                &self.m,
                &self.metrics,
                &self.installer,
                PAGES,
                &mut reader,
                answers,
            )
        }
    }

    /// A pass of pages, its round end and the switch-over: the pages land in memory, the pass
    /// is acknowledged, the bytes counted are the frames' on the wire.
    #[test]
    fn installs_passes_acknowledges_them_and_returns_the_switch_over() {
        let t = Setup::new();
        let mut wire = Vec::new();
        let page = |b: u8| vec![b; PAGE_SIZE as usize];
        let entries = [
            PageEntry {
                page: 1,
                zero: false,
            },
            PageEntry {
                page: 2,
                zero: true,
            },
            PageEntry {
                page: 7,
                zero: false,
            },
        ];
        let data = [page(0xa1), page(0xa7)].concat();
        let batch_bytes = PagesBatch::write(&mut wire, &entries, &data).unwrap();
        Control::RoundEnd { round: 1, sent: 3 }
            .write(&mut wire)
            .unwrap();
        let mut invalid = PageBitmap::new(PAGES);
        invalid.set(9);
        SwitchOver {
            invalid: invalid.clone(),
            state: b"vm state".to_vec(),
        }
        .write(&mut wire)
        .unwrap();

        let mut answers = Vec::new();
        let switch = t.receive(&wire, &mut answers).unwrap();
        assert_eq!(switch.invalid, invalid);
        assert_eq!(switch.state, b"vm state");
        let mut buf = page(0);
        t.installer.memory().read(7, &mut buf).unwrap();
        assert_eq!(buf, page(0xa7));
        let said = Control::parse(FrameReader::new(&answers[..]).read().unwrap().payload);
        assert_eq!(said.unwrap(), Control::RoundDone { round: 1 });
        let p = t.m.counters.progress();
        assert_eq!((p.transferred_pages, p.zero_pages), (3, 1));
        assert_eq!(p.transferred_bytes, batch_bytes);
        assert_eq!(p.precopy_rounds, 1);
    }

    #[test]
    fn a_cancel_from_either_side_ends_it_as_cancelled() {
        let t = Setup::new();
        let mut wire = Vec::new();
        Control::Cancel {
            reason: "operator".into(),
        }
        .write(&mut wire)
        .unwrap();
        let e = t.receive(&wire, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(e, Stop::Cancelled(ref w) if w.contains("operator")),
            "{e}"
        );

        t.m.request_cancel().unwrap();
        let mut told = Vec::new();
        let e = t.receive(&[], &mut told).unwrap_err();
        assert!(matches!(e, Stop::Cancelled(_)));
        let said = Control::parse(FrameReader::new(&told[..]).read().unwrap().payload).unwrap();
        assert!(matches!(said, Control::Cancel { .. }), "the source is told");
    }

    #[test]
    fn a_page_beyond_the_layout_is_refused_whole() {
        let t = Setup::new();
        let mut wire = Vec::new();
        let entries = [PageEntry {
            page: PAGES,
            zero: true,
        }];
        PagesBatch::write(&mut wire, &entries, &[]).unwrap();
        let e = t.receive(&wire, &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("beyond"), "{e:#}");
        assert_eq!(t.m.counters.progress().transferred_pages, 0);
    }
}
