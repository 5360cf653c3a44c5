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
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{error, info, warn};

use crate::crd::VirtualMachineMigration;
use crate::metrics::{self, Health, Metrics};
use crate::pods::LABEL_ROLE;
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
    let make_ctx = || {
        Arc::new(Context::new(
            client.clone(),
            config.clone(),
            Recorder::new(client.clone(), reporter.clone()),
            metrics.clone(),
            system_clock(),
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

    'outer: loop {
        // Stand by until this replica leads.
        while !*leader.borrow_and_update() {
            tokio::select! {
                r = leader.changed() => if r.is_err() { break 'outer; },
                _ = &mut shutdown => break 'outer,
            }
        }
        info!(identity = %opts.identity, "leading: starting the controller");
        metrics.leader.set(1);
        let lost = async {
            loop {
                if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                    return;
                }
            }
        };
        tokio::select! {
            r = run_controller(make_ctx(), &config, opts.workers) => {
                if let Err(e) = r {
                    error!(error = %e, "controller stopped");
                }
                break 'outer;
            }
            // Dropping the controller stops every reconciliation at its next await, so a
            // replica that lost the lease stops acting at once.
            _ = lost => {
                metrics.leader.set(0);
                warn!(identity = %opts.identity, "lost the leader lease: controller stopped; standing by");
            }
            _ = &mut shutdown => break 'outer,
        }
    }
    metrics.leader.set(0);
    drop(leader);
    // Closing the channel makes the lease task release the lease.
    match lease_task.await {
        Ok(Ok(_)) => info!("leader lease released"),
        Ok(Err(e)) => warn!(error = %e, "releasing the leader lease failed"),
        Err(e) => warn!(error = %e, "lease task ended abnormally"),
    }
    server.abort();
    Ok(())
}

/// The controller proper: migrations, plus the target pods they control (so a target pod
/// becoming ready or failing wakes its migration at once rather than at the next poll).
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
    Controller::new(migs, watcher::Config::default())
        .owns(
            pods,
            watcher::Config::default().labels(&format!("{LABEL_ROLE}=target")),
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
    Ok(())
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
