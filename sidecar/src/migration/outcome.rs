//! How an engine, or one post-copy session of it, stopped.

use faultline::wire::WireError;

/// Why an engine stopped early. Cancellation is not a failure.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<WireError> for Stop {
    fn from(e: WireError) -> Self {
        Self::Failed(e.into())
    }
}

impl Stop {
    pub fn failed(msg: impl std::fmt::Display) -> Self {
        Self::Failed(anyhow::anyhow!("{msg}"))
    }
}

/// How a post-copy session ended badly. After the commit point the VM lives on the target and
/// the rest of its memory on the source, so a broken link is not the end of the migration.
#[derive(Debug)]
pub enum Link {
    /// The connection broke: reconnect and carry on.
    Broken(String),
    /// Something no reconnect can fix.
    Fatal(Stop),
}

impl Link {
    /// A closed or failed connection is a broken link; anything else (a corrupt frame, a
    /// protocol violation) is fatal.
    pub fn from_wire(e: WireError) -> Self {
        match e {
            WireError::Closed | WireError::Io(_) => Self::Broken(e.to_string()),
            other => Self::Fatal(other.into()),
        }
    }

    pub fn fatal(msg: impl std::fmt::Display) -> Self {
        Self::Fatal(Stop::failed(msg))
    }
}

impl From<Stop> for Link {
    fn from(stop: Stop) -> Self {
        Self::Fatal(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lost_connection_is_a_broken_link() {
        assert!(matches!(
            Link::from_wire(WireError::Closed),
            Link::Broken(_)
        ));
        let io = WireError::Io(std::io::ErrorKind::ConnectionReset.into());
        assert!(matches!(Link::from_wire(io), Link::Broken(_)));
        let bad = WireError::malformed("page batch", "too short");
        assert!(matches!(Link::from_wire(bad), Link::Fatal(Stop::Failed(_))));
    }
}
