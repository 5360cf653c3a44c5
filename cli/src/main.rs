//! `faultline`: the command line of Faultline.
//!
//! - `faultline demo` migrates a live, self-verifying VM between two VMMs on this machine and
//!   reports how it went;
//! - `faultline bench` measures the physical floors and Faultline against them (and, with
//!   `--peer qemu`, against QEMU's own live migration of the same guest);
//! - `faultline probe` says which trap mechanisms this kernel offers.

mod bench;
mod demo;
mod floors;
mod peer_qemu;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "faultline",
    version,
    about = "Live migration of KVM VMs with post-copy as a first-class mode"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing env-filter syntax) for this process.
    #[arg(long, global = true, env = "FAULTLINE_LOG", default_value = "warn")]
    log: String,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate a running memtouch VM between two VMMs on this machine, live.
    Demo(demo::DemoArgs),
    /// Measure the floors (loopback TCP, userfaultfd, KVM exits) and Faultline against them.
    Bench(bench::BenchArgs),
    /// Probe which trap mechanisms this kernel offers for each kind of guest memory.
    Probe {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Probe { json } => probe(json),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("faultline: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn probe(json: bool) -> anyhow::Result<i32> {
    let probes = faultline::probe::probe_trap_backends();
    if json {
        println!("{}", serde_json::to_string_pretty(&probes)?);
    } else {
        println!(
            "{:<12} {:<14} {:<10} reason",
            "backing", "backend", "available"
        );
        for p in &probes {
            println!(
                "{:<12} {:<14} {:<10} {}",
                p.backing.to_string(),
                p.backend.to_string(),
                if p.available { "yes" } else { "no" },
                p.reason
            );
        }
    }
    Ok(0)
}
