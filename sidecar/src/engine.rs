//! Starting and cancelling migrations: validates a start request against the sidecar's state
//! and runs the role's engine ([`crate::source`] or [`crate::target`]) on its own thread.

use std::sync::Arc;

use faultline::sidecar_api::{Role, StartMigration, validate_id};
use faultline::vmm_protocol::messages::VmState;
use faultline::wire::{Secret, WireError};

use crate::metrics::ResultLabels;
use crate::state::{Migration, Sidecar};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotReady(String),
}

/// Why an engine stopped early. Cancellation is not a failure.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<faultline::wire::WireError> for Stop {
    fn from(e: faultline::wire::WireError) -> Self {
        Self::Failed(e.into())
    }
}

impl Stop {
    pub fn failed(msg: impl std::fmt::Display) -> Self {
        Self::Failed(anyhow::anyhow!("{msg}"))
    }
}

/// How a post-copy session ended badly.
pub enum Link {
    /// The connection broke: reconnect and carry on.
    Broken(String),
    /// Something no reconnect can fix.
    Fatal(Stop),
}

impl Link {
    pub fn from_wire(e: WireError) -> Self {
        match e {
            WireError::Closed | WireError::Io(_) => Self::Broken(e.to_string()),
            other => Self::Fatal(other.into()),
        }
    }

    pub fn from_send(e: crate::pages::SendError) -> Self {
        match e {
            crate::pages::SendError::Wire(w) => Self::from_wire(w),
            other => Self::Fatal(Stop::failed(other)),
        }
    }
}

/// Starts (or, for an identical repeated request, finds) a migration.
pub fn start(
    sidecar: &Arc<Sidecar>,
    req: StartMigration,
) -> Result<(Arc<Migration>, bool), StartError> {
    validate_id(&req.id).map_err(StartError::BadRequest)?;
    req.policy.validate().map_err(StartError::BadRequest)?;
    let secret = Secret::from_base64(&req.secret).map_err(StartError::BadRequest)?;
    match (req.role, &req.peer) {
        (Role::Source, None) => {
            return Err(StartError::BadRequest(
                "a source needs `peer`: the target's migration address".into(),
            ));
        }
        (Role::Source, Some(peer))
            if peer.parse::<std::net::SocketAddr>().is_err() && !peer.contains(':') =>
        {
            return Err(StartError::BadRequest(format!(
                "peer `{peer}` is not host:port"
            )));
        }
        (Role::Target, Some(_)) => {
            return Err(StartError::BadRequest(
                "a target takes no `peer`; the source connects to it".into(),
            ));
        }
        _ => {}
    }
    if let Some(existing) = sidecar.find(&req.id) {
        return if existing.request == req {
            Ok((existing, false))
        } else {
            Err(StartError::Conflict(format!(
                "migration `{}` already exists with a different request",
                req.id
            )))
        };
    }
    let vm = sidecar
        .refresh_vm()
        .map_err(|e| StartError::NotReady(format!("not joined to the VMM: {e}")))?;
    match req.role {
        Role::Source if vm.incoming || vm.state != VmState::Running => {
            return Err(StartError::Conflict(format!(
                "a migration source needs a running VM; this VM is {:?}{}",
                vm.state,
                if vm.incoming { " (incoming)" } else { "" }
            )));
        }
        Role::Target if !vm.incoming || vm.state != VmState::Incoming => {
            return Err(StartError::Conflict(format!(
                "a migration target needs a VMM in incoming mode that has not run; this one is {:?}",
                vm.state
            )));
        }
        _ => {}
    }
    let m = Arc::new(Migration::new(req, secret));
    let inbox = if m.role == Role::Target {
        let (tx, rx) = std::sync::mpsc::channel();
        *m.inbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        Some(rx)
    } else {
        None
    };
    sidecar
        .begin(m.clone())
        .map_err(|cur| StartError::Conflict(format!("migration `{}` is in progress", cur.id)))?;
    let (s, mm) = (sidecar.clone(), m.clone());
    std::thread::Builder::new()
        .name(format!("{:?}-engine", m.role).to_lowercase())
        .spawn(move || {
            let result = match inbox {
                None => crate::source::run(&s, &mm),
                Some(rx) => crate::target::run(&s, &mm, rx),
            };
            finish(&s, &mm, result);
        })
        .map_err(|e| StartError::NotReady(format!("cannot start the migration thread: {e}")))?;
    Ok((m, true))
}

fn finish(sidecar: &Sidecar, m: &Migration, result: Result<(), Stop>) {
    let outcome = match result {
        Ok(()) => "completed",
        Err(Stop::Cancelled(why)) => {
            m.set_phase(
                faultline::sidecar_api::Phase::Cancelled,
                format!("cancelled: {why}"),
            );
            "cancelled"
        }
        Err(Stop::Failed(e)) => {
            m.fail(format!("{e:#}"));
            "failed"
        }
    };
    *m.inbox.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let role = format!("{:?}", m.role).to_lowercase();
    sidecar
        .metrics
        .migrations
        .get_or_create(&ResultLabels {
            role,
            result: outcome.into(),
        })
        .inc();
}

/// Requests cancellation; only before the commit point (see [`Migration::request_cancel`]).
/// Success means the migration will not commit: the source keeps the VM.
pub fn cancel(m: &Migration) -> Result<(), String> {
    m.request_cancel()
}

/// What this node's kernel offers for trapping, probed once per process.
pub fn node_trap_backends() -> Vec<faultline::trap::BackendProbe> {
    static PROBES: std::sync::OnceLock<Vec<faultline::trap::BackendProbe>> =
        std::sync::OnceLock::new();
    PROBES
        .get_or_init(faultline::probe::probe_trap_backends)
        .clone()
}
