//! Starting, finishing and cancelling migrations: the top of the sidecar. A start request is
//! checked against itself and the VM, becomes the current [`Migration`], and its role's engine
//! ([`crate::source`] or [`crate::target`]) runs on a thread of its own inside the migration's
//! tracing span; when the engine returns, the outcome is recorded.
//!
//! Nothing below this module calls back into it.

use std::sync::Arc;

use faultline::sidecar_api::{Role, StartMigration, validate_id};
use faultline::vmm_protocol::messages::{HelloReply, VmState};
use faultline::wire::Secret;

use crate::metrics::{ResultLabels, role_name};
use crate::migration::{Migration, Stop};
use crate::node::Sidecar;
use crate::transport::Protection;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request conflicts with the VM or another migration (409).
    #[error("{0}")]
    Conflict(String),
    /// The sidecar cannot start anything yet (503).
    #[error("{0}")]
    NotReady(String),
}

/// Checks a start request on its own, without the VM: id, policy, secret, and the peer the
/// role needs. Returns the decoded secret.
pub fn check_request(req: &StartMigration) -> Result<Secret, StartError> {
    validate_id(&req.id).map_err(StartError::BadRequest)?;
    req.policy.validate().map_err(StartError::BadRequest)?;
    let secret = Secret::from_base64(&req.secret).map_err(StartError::BadRequest)?;
    match (req.role, &req.peer) {
        (Role::Source, None) => Err(StartError::BadRequest(
            "a source needs `peer`: the target's migration address".into(),
        )),
        (Role::Source, Some(peer))
            if peer.parse::<std::net::SocketAddr>().is_err() && !peer.contains(':') =>
        {
            Err(StartError::BadRequest(format!(
                "peer `{peer}` is not host:port"
            )))
        }
        (Role::Target, Some(_)) => Err(StartError::BadRequest(
            "a target takes no `peer`; the source connects to it".into(),
        )),
        _ => Ok(secret),
    }
}

/// Checks that the VM can play `role`: a source's must be running (a VM that arrived by an
/// earlier migration, in a VMM started in incoming mode, may leave again), a target's VMM must
/// be in incoming mode and never have run.
pub fn check_vm(role: Role, vm: &HelloReply) -> Result<(), StartError> {
    match role {
        Role::Source if vm.state != VmState::Running => Err(StartError::Conflict(format!(
            "a migration source needs a running VM; this VM is {:?}",
            vm.state
        ))),
        Role::Target if !vm.incoming || vm.state != VmState::Incoming => {
            Err(StartError::Conflict(format!(
                "a migration target needs a VMM in incoming mode that has not run; this one is {:?}",
                vm.state
            )))
        }
        _ => Ok(()),
    }
}

/// Starts (or, for an identical repeated request, finds) a migration. The flag says whether
/// it was created now.
pub fn start(
    sidecar: &Arc<Sidecar>,
    req: StartMigration,
) -> Result<(Arc<Migration>, bool), StartError> {
    let secret = check_request(&req)?;
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
    check_vm(req.role, &vm)?;
    let protection = Protection::new(req.policy.transport, req.role, &secret, &req.id)
        .map_err(|e| StartError::NotReady(format!("cannot set up the migration's TLS: {e}")))?;
    if req.role == Role::Target
        && let Some(dir) = &sidecar.state_dir
        && let Err(e) = crate::record::save(dir, &req)
    {
        // The migration works without it; only a restart of this sidecar could not rejoin.
        tracing::warn!("cannot keep the migration record, a restart could not rejoin: {e:#}");
    }
    launch(sidecar, req, secret, protection, Engine::Fresh)
}

/// How a migration's engine begins.
enum Engine {
    Fresh,
    /// A target rejoining after this sidecar restarted.
    Rejoin,
}

/// Makes `req` the current migration and runs its engine on a thread of its own.
fn launch(
    sidecar: &Arc<Sidecar>,
    req: StartMigration,
    secret: Secret,
    protection: Protection,
    engine: Engine,
) -> Result<(Arc<Migration>, bool), StartError> {
    let m = Arc::new(Migration::new(req, secret, protection));
    if matches!(engine, Engine::Rejoin) {
        // Known before the migration becomes visible: the VM already ran here.
        m.commit();
    }
    // The target's inbox opens before the migration is visible, so the listener never finds
    // a current target migration that cannot take its connections.
    let inbox = (m.role == Role::Target).then(|| m.open_inbox());
    sidecar
        .begin(m.clone())
        .map_err(|cur| StartError::Conflict(format!("migration `{}` is in progress", cur.id)))?;
    let (s, mm) = (sidecar.clone(), m.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("{}-engine", role_name(m.role)))
        .spawn(move || {
            let span = tracing::info_span!("migration", id = %mm.id, role = role_name(mm.role));
            let _in = span.enter();
            let result = match (inbox, engine) {
                (None, _) => crate::source::run(&s, &mm),
                (Some(rx), Engine::Fresh) => crate::target::run(&s, &mm, rx),
                (Some(rx), Engine::Rejoin) => crate::target::rejoin(&s, &mm, rx),
            };
            finish(&s, &mm, result);
        });
    if let Err(e) = spawned {
        // The migration is current: end it, so that it neither blocks the next one nor looks
        // like it runs.
        m.close_inbox();
        m.fail(format!("cannot start the migration thread: {e}"));
        return Err(StartError::NotReady(format!(
            "cannot start the migration thread: {e}"
        )));
    }
    Ok((m, true))
}

/// Rejoins the target migration an earlier run of this sidecar left a record of, if any: past
/// its commit point the VM runs here and only this sidecar can finish bringing its memory.
/// Returns the migration's id.
pub fn rejoin_recorded(sidecar: &Arc<Sidecar>) -> anyhow::Result<Option<String>> {
    let Some(dir) = &sidecar.state_dir else {
        return Ok(None);
    };
    let Some(req) = crate::record::load(dir)? else {
        return Ok(None);
    };
    let secret = match check_request(&req) {
        Ok(s) if req.role == Role::Target => s,
        Ok(_) => anyhow::bail!("the recorded migration `{}` is not a target's", req.id),
        Err(e) => anyhow::bail!("the recorded migration `{}` is invalid: {e}", req.id),
    };
    let id = req.id.clone();
    // Whether the commit point passed is the VMM's to say: the VM ran here only if the source
    // committed (the target resumes it only on the source's `commit`).
    let status = faultline::vmm_protocol::VmmClient::connect(&sidecar.vmm_socket)
        .and_then(|mut c| c.status())
        .map_err(|e| {
            anyhow::anyhow!("cannot ask the VMM whether migration `{id}` committed: {e}")
        })?;
    if status.run_ms == 0 && status.state != VmState::Running {
        let why = if status.state == VmState::Incoming {
            "it never reached its commit point (the source kept the VM)"
        } else {
            // Restored and paused: this sidecar died between `prepared` and resuming the VM,
            // and only the source knows whether it fenced its VM meanwhile.
            "this sidecar died in the switch-over, before the VM first ran here, and does not resume a VM whose source may still run"
        };
        tracing::warn!(
            id,
            "found the record of a migration that cannot be rejoined: {why}; dropping it"
        );
        crate::record::remove(dir)?;
        return Ok(None);
    }
    let protection = Protection::new(req.policy.transport, req.role, &secret, &req.id)
        .map_err(|e| anyhow::anyhow!("cannot set up the migration's TLS: {e}"))?;
    tracing::warn!(
        id,
        "found the record of a migration this sidecar was running; rejoining it"
    );
    launch(sidecar, req, secret, protection, Engine::Rejoin)
        .map_err(|e| anyhow::anyhow!("cannot rejoin migration `{id}`: {e}"))?;
    Ok(Some(id))
}

/// Records how an engine ended, in the migration and in the metrics.
fn finish(sidecar: &Sidecar, m: &Migration, result: Result<(), Stop>) {
    let outcome = m.end(&result);
    m.close_inbox();
    if m.role == Role::Target
        && let Some(dir) = &sidecar.state_dir
        && let Err(e) = crate::record::remove(dir)
    {
        tracing::warn!("cannot remove the migration record: {e:#}");
    }
    sidecar
        .metrics
        .migrations
        .get_or_create(&ResultLabels {
            role: role_name(m.role).into(),
            result: outcome.into(),
        })
        .inc();
}

/// Requests cancellation; only before the commit point (see [`Migration::request_cancel`]).
/// Success means the migration will not commit: the source keeps the VM.
pub fn cancel(m: &Migration) -> Result<(), String> {
    m.request_cancel()
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::sidecar_api::Policy;

    fn request(role: Role, peer: Option<&str>) -> StartMigration {
        StartMigration {
            id: "ns/m/1".into(),
            role,
            peer: peer.map(String::from),
            secret: Secret::generate().unwrap().to_base64(),
            policy: Policy::default(),
        }
    }

    fn bad(req: &StartMigration) -> String {
        match check_request(req) {
            Err(StartError::BadRequest(why)) => why,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn requests_are_checked_without_a_vm() {
        assert!(check_request(&request(Role::Source, Some("10.0.0.1:9181"))).is_ok());
        assert!(check_request(&request(Role::Source, Some("target.ns:9181"))).is_ok());
        assert!(check_request(&request(Role::Target, None)).is_ok());
        assert!(bad(&request(Role::Source, None)).contains("needs `peer`"));
        assert!(bad(&request(Role::Source, Some("nowhere"))).contains("host:port"));
        assert!(bad(&request(Role::Target, Some("a:1"))).contains("takes no `peer`"));
        let mut r = request(Role::Target, None);
        r.id = "a b".into();
        assert!(bad(&r).contains("id contains"));
        let mut r = request(Role::Target, None);
        r.secret = "c2hvcnQ=".into();
        bad(&r);
        let mut r = request(Role::Target, None);
        r.policy.max_downtime_ms = 0;
        assert!(bad(&r).contains("maxDowntimeMs"));
    }

    #[test]
    fn the_vm_must_fit_the_role() {
        let hello = |incoming: bool, state: VmState| -> HelloReply {
            serde_json::from_value(serde_json::json!({
                "protocol": 2, "vmm": "v", "vm_id": "vm", "vcpus": 1, "incoming": incoming,
                "state": state,
                "layout": {"regions": [{"guest_phys_addr": 0, "size": 4096, "backing": "memfd",
                    "fd": 0, "file_offset": 0, "page_size": 4096, "host_addr": 4096}]},
                "capabilities": []
            }))
            .unwrap()
        };
        assert_eq!(
            check_vm(Role::Source, &hello(false, VmState::Running)),
            Ok(())
        );
        // A VM that arrived by a migration (its VMM started in incoming mode) may leave again.
        assert_eq!(
            check_vm(Role::Source, &hello(true, VmState::Running)),
            Ok(())
        );
        assert_eq!(
            check_vm(Role::Target, &hello(true, VmState::Incoming)),
            Ok(())
        );
        for (role, vm) in [
            (Role::Source, hello(false, VmState::Paused)),
            (Role::Source, hello(true, VmState::Incoming)),
            (Role::Target, hello(false, VmState::Running)),
            (Role::Target, hello(true, VmState::Paused)),
        ] {
            assert!(
                matches!(check_vm(role, &vm), Err(StartError::Conflict(_))),
                "{role:?} on {:?}",
                vm.state
            );
        }
    }
}
