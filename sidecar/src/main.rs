//! faultline-sidecar: runs beside a VMM in the VM's pod. It joins the VMM over the VMM protocol
//! (docs/vmm-protocol.md), serves the HTTP control API (docs/sidecar-api.md) and Prometheus
//! metrics, and moves the VM's memory to or from a peer sidecar over the wire protocol
//! (docs/wire-protocol.md).
//!
//! The modules follow a migration's shape, from the top down (nothing imports upwards):
//!
//! - [`api`]: HTTP in and out; no migration logic.
//! - [`lifecycle`]: start, cancel, finish: runs a role's engine on its own thread.
//! - [`source`], [`target`]: the two engines, one file per step of the migration.
//! - [`node`]: this sidecar, its VMM and its migrations; [`migration`]: one migration's state,
//!   counters and outcome; [`transport`]: channels and page streams; [`metrics`],
//!   [`threads`]: leaves.

mod api;
mod lifecycle;
mod metrics;
mod migration;
mod node;
mod record;
mod serve;
mod source;
mod target;
#[cfg(test)]
mod testing;
mod threads;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use crate::node::Sidecar;

/// Where the VMM's control socket is in a VM pod (a volume both containers mount).
const VMM_SOCKET: &str = "/run/faultline/vmm.sock";
/// The ports docs/sidecar-api.md and the operator assume.
const API_LISTEN: &str = "0.0.0.0:9180";
const MIGRATION_LISTEN: &str = "0.0.0.0:9181";
/// How long a sidecar asked to stop keeps answering after a migration ended whose outcome
/// nobody has read: the kubelet stops a source pod's sidecar as soon as its fenced VMM exits,
/// often before the operator's next poll has read the outcome (the downtime, the counters).
const LINGER: std::time::Duration = std::time::Duration::from_secs(8);
/// Where a VM pod mounts the namespace's sidecar certificate.
const TLS_DIR: &str = "/var/run/faultline/tls";

#[derive(Parser, Debug)]
#[command(name = "faultline-sidecar", version, about, long_about = None)]
struct Cli {
    /// The VMM's control socket.
    #[arg(long, env = "FAULTLINE_VMM_SOCKET", default_value = VMM_SOCKET)]
    vmm_socket: PathBuf,
    /// Address of the control API and /metrics (HTTPS; only the operator's client certificate
    /// may drive migrations).
    #[arg(long, env = "FAULTLINE_LISTEN", default_value = API_LISTEN)]
    listen: SocketAddr,
    /// Address where a target sidecar accepts the source's migration connections.
    #[arg(long, env = "FAULTLINE_MIGRATION_LISTEN", default_value = MIGRATION_LISTEN)]
    migration_listen: SocketAddr,
    /// Directory with the control API's certificate (tls.crt, tls.key) and the CA that issued
    /// the operator's (ca.crt): the namespace's `faultline-sidecar-tls` Secret, mounted.
    #[arg(long, env = "FAULTLINE_TLS_DIR", default_value = TLS_DIR)]
    tls_dir: PathBuf,
    /// Where a target keeps the record of its migration (secret included, mode 0600), so that
    /// this sidecar, restarted in the middle of a post-copy, rejoins the migration and finishes
    /// it. Give it a directory that lives as long as the pod and no longer (an emptyDir).
    #[arg(long, env = "FAULTLINE_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log filter (tracing env-filter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines (for log collectors) instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr);
    if cli.log_json {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }

    let tls = Arc::new(serve::TlsFiles::load(&cli.tls_dir)?);
    let migration_listener = std::net::TcpListener::bind(cli.migration_listen)
        .with_context(|| format!("cannot listen for migrations on {}", cli.migration_listen))?;
    let migration_port = migration_listener
        .local_addr()
        .context("migration listener address")?
        .port();
    let sidecar = Arc::new(Sidecar::new(
        cli.vmm_socket.clone(),
        migration_port,
        cli.state_dir.clone(),
    ));
    node::spawn_vmm_watch(sidecar.clone()).context("cannot start the VMM watch")?;
    target::listener::spawn(migration_listener, sidecar.clone())
        .context("cannot start the migration listener")?;
    if let Err(e) = lifecycle::rejoin_recorded(&sidecar) {
        tracing::error!("cannot rejoin the recorded migration: {e:#}");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let http = tokio::net::TcpListener::bind(cli.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cli.listen))?;
        let api_addr = http.local_addr().context("API address")?;
        tracing::info!(
            api = %api_addr,
            migration_port,
            vmm_socket = %cli.vmm_socket.display(),
            "sidecar started"
        );
        // One JSON line on stdout with the bound addresses, for supervisors and tests that
        // asked for port 0.
        println!(
            "{}",
            serde_json::json!({"api": api_addr.to_string(), "migrationPort": migration_port})
        );
        // SIGTERM is how the kubelet stops a container; as PID 1 the sidecar would otherwise
        // ignore it and hold the pod's deletion for its whole grace period.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot install the SIGTERM handler")?;
        let lingering = sidecar.clone();
        serve::serve(http, tls, api::router(sidecar), async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            let until = tokio::time::Instant::now() + LINGER;
            while lingering.outcome_unread(LINGER) && tokio::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            tracing::info!("stopping on a signal");
        })
        .await;
        Ok(())
    })
}
