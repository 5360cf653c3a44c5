//! `faultline-operator`: see `faultline_operator::cli` for the command line.

use std::io::Write as _;

use anyhow::Context as _;
use clap::Parser;
use faultline_operator::cli::{Cli, Command, CredentialsArgs, RunArgs};
use faultline_operator::controller::{self, RunOptions};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Credentials(args)) = &cli.command {
        let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
        return rt.block_on(credentials(args));
    }
    match cli.run_args() {
        None => {
            let yaml = faultline_operator::crd::crd_yaml().context("rendering the CRD")?;
            match std::io::stdout().lock().write_all(yaml.as_bytes()) {
                // `crd | head` is fine.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                r => r.context("writing the CRD to stdout"),
            }
        }
        Some(args) => {
            args.init_logging()?;
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(run(args))
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let config = args.config();
    let identity = match args.identity.clone() {
        Some(i) => i,
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .context("reading the hostname for the lease identity (set POD_NAME)")?;
            format!("{}-{}", host.trim(), std::process::id())
        }
    };
    controller::run(
        client,
        config,
        RunOptions {
            metrics_addr: args.metrics_listen,
            leader_election: args.leader_election,
            lease_name: args.lease_name,
            lease_namespace: args.lease_namespace,
            identity,
            lease_duration: args.lease_duration,
            lease_grace: args.lease_grace,
            workers: args.workers,
        },
    )
    .await
}

async fn credentials(args: &CredentialsArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (KUBECONFIG)")?;
    let pki = faultline_operator::pki::load(client, &args.namespace).await?;
    pki.issue_admin(args.valid_for)?
        .write(&args.out)
        .with_context(|| format!("writing credentials to {}", args.out.display()))?;
    println!(
        "operator credentials valid for {:?} written to {} (ca.crt, tls.crt, tls.key)",
        args.valid_for,
        args.out.display()
    );
    Ok(())
}
