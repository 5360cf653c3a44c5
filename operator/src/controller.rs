//! Runs the reconciler as a kube-rs `Controller`, only while this replica holds the leader
//! lease, beside the metrics endpoint.
//!
//! Owns process-level wiring: watches, leader election, shutdown. It must not contain
//! reconciliation logic (that is `reconcile.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use std::future::Future;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::crd::VirtualMachineMigration;
use crate::metrics::{self, Health, Metrics};
use crate::pods::{ANNOTATION_MIGRATION, LABEL_ROLE};
use crate::reconcile::{self, Config, Context, system_clock};

/// Process-level options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub metrics_addr: SocketAddr,
    /// Off only for a single replica run by hand; the chart always turns it on.
    pub leader_election: bool,
    pub lease_name: String,
    pub lease_namespace: String,
    /// This replica's identity in the lease (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub lease_grace: Duration,
    /// Reconciliations running at once (distinct migrations).
    pub workers: u16,
}

/// Runs until SIGTERM/SIGINT.
pub async fn run(client: Client, config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let server = tokio::spawn(metrics::serve(
        opts.metrics_addr,
        metrics.clone(),
        health.clone(),
    ));
    let reporter = Reporter {
        controller: "faultline-operator".into(),
        instance: Some(opts.identity.clone()),
    };
    // Every replica loads (or the first creates) the CA before it may lead.
    let pki = Arc::new(
        crate::pki::bootstrap(client.clone(), &opts.lease_namespace)
            .await
            .context("setting up the cluster CA (docs/security.md)")?,
    );
    let make_ctx = || {
        Arc::new(Context::new(
            client.clone(),
            config.clone(),
            Recorder::new(client.clone(), reporter.clone()),
            metrics.clone(),
            system_clock(),
            pki.clone(),
        ))
    };
    let mut shutdown = Box::pin(shutdown_signal());

    if !opts.leader_election {
        warn!("leader election is off: run only one replica like this");
        health.ready.store(true, Ordering::Relaxed);
        metrics.leader.set(1);
        tokio::select! {
            r = run_controller(make_ctx(), &config, opts.workers) => r?,
            _ = &mut shutdown => info!("shutting down"),
        }
        server.abort();
        return Ok(());
    }

    let secs = |d: Duration| d.as_secs().max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
        .with_namespace(&opts.lease_namespace)
        .with_identity(&opts.identity)
        .with_duration(secs(opts.lease_duration))
        .with_grace(secs(opts.lease_grace))
        .build()
        .await
        .context("setting up leader election")?;
    let (mut leader, lease_task) = manager.watch().await;
    // Waiting for the lease is a healthy state for a standby replica.
    health.ready.store(true, Ordering::Relaxed);
    info!(identity = %opts.identity, lease = %opts.lease_name, "waiting for the leader lease");

    let end = lead(&mut leader, &mut shutdown, &metrics, || {
        info!(identity = %opts.identity, "leading: starting the controller");
        run_controller(make_ctx(), &config, opts.workers)
    })
    .await;
    let result = match end {
        LeadEnd::WorkEnded(r) => r.context("the controller stopped"),
        LeadEnd::Shutdown => {
            info!("shutting down");
            Ok(())
        }
        LeadEnd::LeaseTaskGone => Err(anyhow::anyhow!(
            "the leader election task ended; exiting so a restart can campaign again"
        )),
    };
    metrics.leader.set(0);
    drop(leader);
    // Closing the channel makes the lease task release the lease.
    match lease_task.await {
        Ok(Ok(_)) => info!("leader lease released"),
        Ok(Err(e)) => warn!(error = %e, "releasing the leader lease failed"),
        Err(e) => warn!(error = %e, "lease task ended abnormally"),
    }
    server.abort();
    result
}

/// Why [`lead`] returned.
#[derive(Debug)]
pub enum LeadEnd {
    /// The work ended by itself (with its result).
    WorkEnded(anyhow::Result<()>),
    /// The shutdown signal came.
    Shutdown,
    /// The leader election task is gone: this replica can no longer know whether it leads.
    LeaseTaskGone,
}

/// Runs `work` only while `leader` says this replica holds the lease: waits while it does not,
/// starts `work` when it does, and drops `work` the moment the lease is lost (a dropped
/// future stops at its next await, so a former leader stops acting at once), then waits to
/// lead again.
pub async fn lead<W, F>(
    leader: &mut watch::Receiver<bool>,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    metrics: &Metrics,
    mut work: W,
) -> LeadEnd
where
    W: FnMut() -> F,
    F: Future<Output = anyhow::Result<()>>,
{
    loop {
        while !*leader.borrow_and_update() {
            tokio::select! {
                r = leader.changed() => if r.is_err() { return LeadEnd::LeaseTaskGone; },
                _ = &mut *shutdown => return LeadEnd::Shutdown,
            }
        }
        metrics.leader.set(1);
        let lost = async {
            loop {
                if leader.changed().await.is_err() {
                    return true;
                }
                if !*leader.borrow_and_update() {
                    return false;
                }
            }
        };
        let end = tokio::select! {
            r = work() => Some(LeadEnd::WorkEnded(r)),
            gone = lost => gone.then_some(LeadEnd::LeaseTaskGone),
            _ = &mut *shutdown => Some(LeadEnd::Shutdown),
        };
        metrics.leader.set(0);
        match end {
            Some(e) => return e,
            None => warn!("lost the leader lease: controller stopped; standing by"),
        }
    }
}

/// The controller proper: migrations, plus their target pods (so a target pod becoming ready
/// or failing wakes its migration at once rather than at the next poll). Target pods are not
/// owned by their migration (pods.rs says why); their annotation names it.
async fn run_controller(ctx: Arc<Context>, config: &Config, workers: u16) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let (migs, pods): (Api<VirtualMachineMigration>, Api<Pod>) = match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    // Fail early with a clear message if the CRD is not installed.
    migs.list(&kube::api::ListParams::default().limit(1))
        .await
        .context("listing VirtualMachineMigrations (is the CRD installed? see crds/)")?;
    // The leader keeps the VM namespaces' sidecar certificates current.
    let certificates = AbortOnDrop(tokio::spawn(crate::pki::sync_namespaces(
        client.clone(),
        ctx.pki.clone(),
        config.namespace.clone(),
    )));
    Controller::new(migs, watcher::Config::default())
        .watches(
            pods,
            watcher::Config::default().labels(&format!("{LABEL_ROLE}=target")),
            |pod: Pod| {
                let name = pod.annotations().get(ANNOTATION_MIGRATION)?.clone();
                Some(ObjectRef::new(&name).within(&pod.namespace()?))
            },
        )
        // Our own status writes trigger watch events too; coalescing them keeps the rate of
        // reconciliations (and sidecar polls) bounded.
        .with_config(
            ControllerConfig::default()
                .concurrency(workers)
                .debounce(Duration::from_millis(500)),
        )
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                match e {
                    kube::runtime::controller::Error::ReconcilerFailed(..) => {}
                    other => warn!(error = %other, "controller"),
                }
            }
        })
        .await;
    drop(certificates);
    Ok(())
}

/// Stops a task when its owner goes (a replica that loses the lease stops its work).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                futures::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {},
        r = tokio::signal::ctrl_c() => if let Err(e) = r { warn!(error = %e, "cannot listen for SIGINT"); futures::future::pending::<()>().await },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    /// Flags its drop, like a controller future cancelled mid-reconciliation.
    struct Running(Arc<AtomicBool>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn acts_only_while_holding_the_lease() {
        let (tx, mut rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let starts = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicBool::new(false));
        let (s, r, m) = (starts.clone(), running.clone(), metrics.clone());
        let task = tokio::spawn(async move {
            let mut shutdown = Box::pin(async {
                let _ = stop_rx.await;
            });
            lead(&mut rx, &mut shutdown, &m, || {
                let (s, r) = (s.clone(), r.clone());
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    r.store(true, Ordering::SeqCst);
                    let _guard = Running(r);
                    futures::future::pending::<anyhow::Result<()>>().await
                }
            })
            .await
        });

        settle().await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            0,
            "a standby replica does nothing"
        );
        tx.send(true).expect("send");
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert!(running.load(Ordering::SeqCst));
        assert!(metrics.render().contains("faultline_operator_leader 1"));

        tx.send(false).expect("send");
        settle().await;
        assert!(
            !running.load(Ordering::SeqCst),
            "losing the lease stops the work at once"
        );
        assert!(metrics.render().contains("faultline_operator_leader 0"));

        tx.send(true).expect("send");
        settle().await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            2,
            "leading again starts it again"
        );

        stop_tx.send(()).expect("stop");
        let end = task.await.expect("task");
        assert!(matches!(end, LeadEnd::Shutdown), "{end:?}");
        assert!(!running.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_vanished_lease_task_stops_the_leader() {
        let (tx, mut rx) = watch::channel(true);
        let metrics = Metrics::new();
        let mut shutdown = Box::pin(futures::future::pending::<()>());
        drop(tx);
        let end = lead(&mut rx, &mut shutdown, &metrics, || {
            futures::future::pending::<anyhow::Result<()>>()
        })
        .await;
        assert!(matches!(end, LeadEnd::LeaseTaskGone), "{end:?}");
        assert!(metrics.render().contains("faultline_operator_leader 0"));
    }
}
