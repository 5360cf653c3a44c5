//! The source's connections as the listener hands them over, in whatever order they arrive.

use faultline::tls::Stream;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use faultline::wire::Channel;

use crate::migration::{Accepted, Migration, Stop};

/// How often a wait for a connection looks up to check for a cancel.
const CHECK_INTERVAL: Duration = Duration::from_millis(200);

pub(super) struct Conns {
    inbox: Receiver<Accepted>,
    /// Until when the source may take to connect (the completion timeout).
    deadline: Instant,
    main: Option<Stream>,
    urgent: Option<Stream>,
}

impl Conns {
    pub fn new(inbox: Receiver<Accepted>, deadline: Instant) -> Self {
        Self {
            inbox,
            deadline,
            main: None,
            urgent: None,
        }
    }

    /// Waits for the source's `channel`, until the completion timeout or a cancel.
    pub fn take(&mut self, channel: Channel, m: &Migration) -> Result<Stream, Stop> {
        self.take_until(channel, m, self.deadline)
    }

    /// As [`Conns::take`], waiting `patience` beyond the completion timeout: past the commit
    /// point giving up loses the VM.
    pub fn take_after_commit(
        &mut self,
        channel: Channel,
        m: &Migration,
        patience: Duration,
    ) -> Result<Stream, Stop> {
        self.take_until(channel, m, self.deadline + patience)
    }

    /// Waits for the source to connect `channel` again after the link broke, for up to the
    /// completion timeout from now.
    pub fn retake(&mut self, channel: Channel, m: &Migration) -> Result<Stream, Stop> {
        let until = Instant::now() + m.completion_timeout();
        self.take_until(channel, m, until)
    }

    fn take_until(
        &mut self,
        channel: Channel,
        m: &Migration,
        deadline: Instant,
    ) -> Result<Stream, Stop> {
        loop {
            let slot = match channel {
                Channel::Main => &mut self.main,
                Channel::Urgent => &mut self.urgent,
            };
            if let Some(s) = slot.take() {
                return Ok(s);
            }
            if m.cancelled() {
                return Err(Stop::Cancelled(
                    "cancelled while waiting for the source".into(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::failed(
                    "the source never connected before the completion timeout",
                ));
            }
            match self.inbox.recv_timeout(left.min(CHECK_INTERVAL)) {
                Ok(a) => match a.channel {
                    Channel::Main => self.main = Some(a.stream),
                    Channel::Urgent => self.urgent = Some(a.stream),
                },
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Stop::failed("the migration listener stopped"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::sidecar_api::{Policy, Role};

    #[test]
    fn channels_are_taken_in_any_order_and_a_cancel_ends_the_wait() {
        let m = crate::testing::migration(Role::Target, Policy::default());
        let rx = m.open_inbox();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let connect =
            || Stream::Plain(std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap());
        m.deliver(Accepted {
            channel: Channel::Urgent,
            stream: connect(),
        })
        .unwrap();
        m.deliver(Accepted {
            channel: Channel::Main,
            stream: connect(),
        })
        .unwrap();
        let mut conns = Conns::new(rx, Instant::now() + Duration::from_secs(5));
        conns
            .take(Channel::Main, &m)
            .expect("main, though it came second");
        conns.take(Channel::Urgent, &m).expect("urgent, kept aside");
        m.request_cancel().unwrap();
        assert!(matches!(
            conns.take(Channel::Main, &m),
            Err(Stop::Cancelled(_))
        ));
    }

    #[test]
    fn a_source_that_never_connects_times_out() {
        let m = crate::testing::migration(Role::Target, Policy::default());
        let mut conns = Conns::new(m.open_inbox(), Instant::now() + Duration::from_millis(50));
        let e = conns.take(Channel::Main, &m).unwrap_err();
        assert!(e.to_string().contains("never connected"), "{e}");
    }
}
