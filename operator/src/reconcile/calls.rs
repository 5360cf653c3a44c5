//! Calls the reconciler makes: deleting pods, and every request to a sidecar
//! (counted in the metrics).

use super::*;

impl Reconciler<'_> {
    /// The claims a pod mounts and the volumes they are bound to, for the migratability check.
    pub(super) async fn claims_of(
        &self,
        pod: &Pod,
    ) -> Result<BTreeMap<String, migratable::Claim>, Error> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.ctx.client.clone(), self.ns);
        let volumes: Api<PersistentVolume> = Api::all(self.ctx.client.clone());
        let mut out = BTreeMap::new();
        let names = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| v.persistent_volume_claim.as_ref())
            .map(|c| c.claim_name.clone());
        for name in names {
            let claim = claims.get_opt(&name).await?;
            let bound = claim
                .as_ref()
                .and_then(|c| c.spec.as_ref())
                .and_then(|s| s.volume_name.clone());
            let volume = match bound {
                Some(v) => volumes.get_opt(&v).await?,
                None => None,
            };
            out.insert(name, migratable::Claim { claim, volume });
        }
        Ok(out)
    }

    /// Sets the target pod's readiness gate: the VM runs there, so it may serve (a strategic
    /// merge, so the kubelet's own conditions stay).
    pub(super) async fn mark_vm_running(&self, pod: &str) -> Result<(), Error> {
        let patch = json!({"status": {"conditions": [{
            "type": pods::CONDITION_VM_RUNNING,
            "status": "True",
            "reason": "VmRunning",
            "message": "the migrated VM runs in this pod",
            "lastTransitionTime": Time(self.now()),
        }]}});
        match self
            .pods
            .patch_status(pod, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

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

    /// A client for the sidecar at `addr`, a pod of this migration's namespace: it presents
    /// the operator's certificate and accepts only this namespace's sidecar certificate.
    pub(super) fn sidecar_at(&self, addr: SocketAddr) -> SidecarClient {
        SidecarClient::new(
            addr,
            self.cfg().sidecar_request_timeout,
            self.ctx.pki.client_config(),
            self.ns,
        )
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
        Some(self.sidecar_at(addr))
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
