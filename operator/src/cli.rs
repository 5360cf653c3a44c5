//! The command line: `faultline-operator [run]` reconciles VirtualMachineMigrations,
//! `faultline-operator crd` prints the CRD. In the library so tests can check that the Helm
//! chart's arguments parse.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::reconcile::Config;

#[derive(Parser, Debug)]
#[command(
    name = "faultline-operator",
    version,
    about = "Kubernetes operator for Faultline live migration",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand: the flags of `run`.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Reconcile VirtualMachineMigrations (the default).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinition YAML (what crds/virtualmachinemigrations.yaml holds).
    Crd,
    /// Write operator credentials for an administrator (ca.crt, tls.crt, tls.key) into a
    /// directory: with them a client such as `curl` can drive a sidecar as the operator does.
    /// Reads the CA from the cluster, so it needs the right to read Secrets in the operator's
    /// namespace.
    Credentials(CredentialsArgs),
}

#[derive(clap::Args, Debug)]
pub struct CredentialsArgs {
    /// The namespace Faultline is installed in.
    #[arg(long, short = 'n', default_value = "faultline-system")]
    pub namespace: String,
    /// Where to write the three files (created if missing; the key is mode 0600).
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// How long the certificate is valid.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub valid_for: Duration,
}

impl Cli {
    /// The `run` flags, whether given after `run` or with no subcommand; `None` for the
    /// other subcommands.
    pub fn run_args(self) -> Option<RunArgs> {
        match self.command {
            None => Some(self.run),
            Some(Command::Run(a)) => Some(*a),
            Some(Command::Crd | Command::Credentials(_)) => None,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Most migrations running at once in the cluster.
    #[arg(long, env = "FAULTLINE_MAX_PARALLEL", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: u32,
    /// Most migrations leaving one node at once.
    #[arg(long, env = "FAULTLINE_MAX_PARALLEL_PER_NODE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel_per_node: u32,
    /// How often active migrations' sidecars are polled.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Least time between two progress-only status updates of one migration.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// How often a queued migration re-checks for a free slot.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub queue_interval: Duration,
    /// Fail a migration whose target pod stays unschedulable this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub scheduling_timeout: Duration,
    /// Fail a migration whose target pod does not become ready this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub target_ready_timeout: Duration,
    /// Fail a migration (before its point of no return) when a sidecar stays unreachable
    /// this long.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub unavailable_timeout: Duration,
    /// Deadline of one request to a sidecar.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sidecar_request_timeout: Duration,
    /// Only watch this namespace (default: all namespaces).
    #[arg(long, env = "FAULTLINE_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Migrations reconciled at once.
    #[arg(long, default_value_t = 16)]
    pub workers: u16,
    /// Address of the /metrics, /healthz and /readyz endpoint.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// Elect a leader so only one replica acts (turn off only for a lone replica).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    #[arg(long, default_value = "faultline-operator")]
    pub lease_name: String,
    /// Namespace of the lease (default: the pod's namespace from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's name in the lease (default: the pod name from POD_NAME).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub lease_grace: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "FAULTLINE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    faultline::units::parse_duration(s).map_err(|e| e.to_string())
}

impl RunArgs {
    /// The reconciler's tunables from the flags.
    pub fn config(&self) -> Config {
        Config {
            max_parallel: self.max_parallel as usize,
            max_parallel_per_node: self.max_parallel_per_node as usize,
            poll_interval: self.poll_interval,
            queue_interval: self.queue_interval,
            status_interval: self.status_interval,
            scheduling_timeout: self.scheduling_timeout,
            target_ready_timeout: self.target_ready_timeout,
            unavailable_timeout: self.unavailable_timeout,
            sidecar_request_timeout: self.sidecar_request_timeout,
            namespace: self.namespace.clone(),
        }
    }

    pub fn init_logging(&self) -> anyhow::Result<()> {
        let filter = tracing_subscriber::EnvFilter::try_new(&self.log)
            .with_context(|| format!("--log {:?} is not a valid filter", self.log))?;
        let builder = tracing_subscriber::fmt().with_env_filter(filter);
        match self.log_format {
            LogFormat::Json => builder.json().flatten_event(true).init(),
            LogFormat::Text => builder.init(),
        }
        Ok(())
    }
}
