//! Calls the reconciler makes: deleting pods and Secrets, and every request to a sidecar
//! (counted in the metrics).

use super::*;

impl Reconciler<'_> {
    pub(super) async fn delete_pod(&self, name: &str, uid: Option<String>) -> Result<(), Error> {
        let dp = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.pods.delete(name, &dp).await {
            Ok(_) => Ok(()),
            // Gone already, or a different pod by now (uid precondition): not ours to delete.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn delete_secret(
        &self,
        s: &VirtualMachineMigrationStatus,
    ) -> Result<(), Error> {
        let Some(name) = &s.secret_name else {
            return Ok(());
        };
        match self.secrets.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn owner_ref(&self, mig: &VirtualMachineMigration) -> Result<OwnerReference, Error> {
        mig.controller_owner_ref(&())
            .ok_or(Error::MissingMetadata("uid"))
    }

    /// Clients for the source and target sidecars named in `s`, if both addresses are there.
    pub(super) fn sidecar_pair(
        &self,
        s: &VirtualMachineMigrationStatus,
    ) -> Option<(SidecarClient, SidecarClient)> {
        Some((
            self.sidecar(&s.source_sidecar)?,
            self.sidecar(&s.target_sidecar)?,
        ))
    }

    pub(super) fn sidecar(&self, addr: &Option<String>) -> Option<SidecarClient> {
        let addr: SocketAddr = addr.as_deref()?.parse().ok()?;
        Some(SidecarClient::new(addr, self.cfg().sidecar_request_timeout))
    }

    pub(super) async fn node_info(&self, c: &SidecarClient) -> Result<NodeInfo, SidecarError> {
        let r = c.node().await;
        self.count("node", &r);
        r
    }

    pub(super) async fn sidecar_status(
        &self,
        c: &SidecarClient,
        id: &str,
    ) -> Result<MigrationStatus, SidecarError> {
        let r = c.migration(id).await;
        self.count("status", &r);
        r
    }

    pub(super) async fn start(
        &self,
        c: &SidecarClient,
        req: &StartMigration,
    ) -> Result<(), SidecarError> {
        let r = c.start(req).await;
        self.count("start", &r);
        r.map(|_| ())
    }

    pub(super) async fn cancel(
        &self,
        c: &SidecarClient,
        id: &str,
    ) -> Result<MigrationStatus, SidecarError> {
        let r = c.cancel(id).await;
        self.count("cancel", &r);
        r
    }

    pub(super) fn count<T>(&self, op: &'static str, r: &Result<T, SidecarError>) {
        let result = match r {
            Ok(_) => "ok",
            Err(e) if e.is_unreachable() => "unreachable",
            Err(_) => "error",
        };
        self.ctx.metrics.sidecar_request(op, result);
    }
}
