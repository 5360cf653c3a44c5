//! faultline-e2e: Faultline's kernel boot matrix.
//!
//! On the host, `matrix` boots each kernel of `e2e/kernels.json` (Debian's stock kernels and
//! our own KVM Userfault build) under QEMU/TCG with an initramfs it assembles, and reports the
//! trap-backend probe and test results from inside each one. Inside the guest, `guest` runs the
//! plan it finds in the initramfs. `e2e/kernel-matrix` is the documented entry point.

mod build;
mod cluster;
mod guest;
mod host;
mod report;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::report::{ExecTest, Plan};

#[derive(Parser, Debug)]
#[command(name = "faultline-e2e", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log filter (tracing env-filter syntax), also read from RUST_LOG.
    #[arg(long, env = "RUST_LOG", default_value = "warn", global = true)]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot every kernel (or those named) and run the tests inside; print a table, or JSON.
    Matrix {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Only this kernel (repeatable).
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Only this guest test (repeatable), instead of each kernel's full plan.
        #[arg(long = "test")]
        tests: Vec<String>,
        /// An extra program to put in the initramfs's /bin, with its libraries (repeatable).
        #[arg(long = "extra-bin")]
        extra_bins: Vec<PathBuf>,
        /// A test that runs a command in the guest and passes if it exits 0:
        /// `NAME=PROGRAM ARG...` (repeatable). The hook for the migration demo.
        #[arg(long = "exec-test", value_parser = parse_exec)]
        exec_tests: Vec<ExecTest>,
        /// Seconds one kernel's boot and tests may take.
        #[arg(long, default_value_t = host::matrix::default_timeout().as_secs())]
        timeout: u64,
        /// vCPUs of the QEMU machine.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// QEMU's TCG threading: `single` (default; stock kernels sometimes die of an int3
        /// Oops while patching their own code under multi-threaded TCG) or `multi`.
        #[arg(long, default_value = "single", value_parser = ["single", "multi"])]
        tcg_threads: String,
        /// Memory of the QEMU machine in MiB.
        #[arg(long, default_value_t = 2048)]
        memory_mib: u32,
        /// The repository (for e2e/kernels.json, e2e/fetch-debs and kernel/build).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// The faultline-vmm binary to run inside (default: next to this program).
        #[arg(long)]
        vmm: Option<PathBuf>,
    },
    /// Build an OCI image archive holding one program and the shared libraries it needs, in a
    /// minimal root file system; `ctr images import`, `docker load` and `podman load` read it.
    Image {
        /// Full reference: `registry/repository:tag`.
        #[arg(long)]
        reference: String,
        /// The program, installed as /usr/bin/NAME and run as the entrypoint.
        #[arg(long)]
        binary: PathBuf,
        /// An argument the entrypoint always gets, before the pod's own (repeatable).
        #[arg(long = "arg")]
        args: Vec<String>,
        /// `uid[:gid]` to run as unless the pod says otherwise.
        #[arg(long)]
        user: Option<String>,
        /// An image label `KEY=VALUE` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Timestamps, in seconds since the epoch (reproducible builds pass the commit time).
        #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
        epoch: u64,
        /// Where to write the archive.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the end-to-end scenarios against a running cluster (`e2e/cluster test` calls this).
    ClusterTest {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long, default_value = "kubectl")]
        kubectl: PathBuf,
        #[arg(long, default_value = "helm")]
        helm: PathBuf,
        /// The repository (charts/ and examples/ come from it).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Only this scenario (repeatable); helm-install always runs first.
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// List the scenarios and exit.
        #[arg(long)]
        list: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The demand-paging benchmark on this machine: vCPUs reading their own pages of memory
    /// that is not there yet, each first access resolved by the trap; pages per second.
    DemandPaging {
        /// vCPUs, each with its own pages.
        #[arg(long, default_value_t = 2)]
        vcpus: u64,
        /// Pages per vCPU (at most 1023).
        #[arg(long, default_value_t = 1023)]
        pages_per_vcpu: u64,
        /// Only this trap (repeatable; default: all three).
        #[arg(long = "trap", value_enum)]
        traps: Vec<guest::demand_paging::Trap>,
        /// Runs per trap; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// List the kernels and the guest tests.
    List {
        #[arg(long, default_value = ".")]
        repo: PathBuf,
    },
    /// Inside the kernel under test: run a plan and write one JSON result line per item.
    Guest {
        /// The plan (JSON).
        #[arg(long)]
        plan: PathBuf,
        /// Where to write the result lines (default: stdout).
        #[arg(long)]
        results: Option<PathBuf>,
    },
}

fn parse_exec(s: &str) -> Result<ExecTest, String> {
    let (name, cmd) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=COMMAND"))?;
    let argv: Vec<String> = cmd.split_whitespace().map(String::from).collect();
    if name.is_empty() || argv.is_empty() {
        return Err(format!("`{s}` needs a name and a command"));
    }
    Ok(ExecTest {
        name: name.into(),
        argv,
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(c) = std::env::var_os("FAULTLINE_CACHE") {
        return Ok(PathBuf::from(c));
    }
    let home = std::env::var_os("HOME").context("neither FAULTLINE_CACHE nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/faultline"))
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("faultline-e2e: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Guest { plan, results } => {
            let text = std::fs::read_to_string(&plan)
                .with_context(|| format!("reading {}", plan.display()))?;
            let plan: Plan = serde_json::from_str(&text).context("parsing the plan")?;
            let ok = match results {
                Some(path) => {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    guest::run(&plan, &mut f)?
                }
                None => guest::run(&plan, &mut std::io::stdout().lock())?,
            };
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::DemandPaging {
            vcpus,
            pages_per_vcpu,
            traps,
            runs,
            json,
        } => {
            use guest::demand_paging::{Trap, measure};
            let traps = if traps.is_empty() {
                Trap::ALL.to_vec()
            } else {
                traps
            };
            let mut results = Vec::new();
            for trap in traps {
                let mut all = Vec::new();
                for _ in 0..runs.max(1) {
                    all.push(measure(trap, vcpus, pages_per_vcpu)?);
                }
                // The median by rate; an unavailable trap is unavailable in every run.
                all.sort_by(|a, b| {
                    a.pages_per_second
                        .partial_cmp(&b.pages_per_second)
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
                let median = all.swap_remove(all.len() / 2);
                if !json {
                    println!("{median}");
                }
                results.push(median);
            }
            if json {
                let release = rustix::system::uname()
                    .release()
                    .to_string_lossy()
                    .into_owned();
                let doc = serde_json::json!({
                    "benchmark": "demand-paging",
                    "kernel": release,
                    "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                    "runs": runs.max(1),
                    "results": results,
                });
                serde_json::to_writer_pretty(std::io::stdout().lock(), &doc)
                    .context("writing JSON")?;
                println!();
            }
            Ok(0)
        }
        Cmd::Image {
            reference,
            binary,
            args,
            user,
            labels,
            epoch,
            out,
        } => {
            let mut fs = build::image::base_rootfs();
            let strip_dir = out.with_extension("strip.d");
            let program = fs.binary("usr/bin", &binary, &strip_dir)?;
            std::fs::remove_dir_all(&strip_dir)
                .with_context(|| format!("removing {}", strip_dir.display()))?;
            let mut entrypoint = vec![format!("/{program}")];
            entrypoint.extend(args);
            let cfg = build::image::ImageConfig {
                reference,
                entrypoint,
                user,
                env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
                labels: labels.into_iter().collect(),
                epoch,
            };
            let written = build::image::write(&fs, &cfg, &out)?;
            serde_json::to_writer(std::io::stdout().lock(), &written).context("writing JSON")?;
            println!();
            Ok(0)
        }
        Cmd::ClusterTest {
            kubeconfig,
            kubectl,
            helm,
            repo,
            scenarios,
            list,
            json,
        } => {
            let mut out = std::io::stdout().lock();
            if list {
                cluster::list(&mut out)?;
                return Ok(0);
            }
            let repo = repo
                .canonicalize()
                .with_context(|| format!("resolving {}", repo.display()))?;
            let report = cluster::run(&cluster::Options {
                kubeconfig,
                kubectl,
                helm,
                repo,
                only: scenarios,
            })?;
            if json {
                serde_json::to_writer_pretty(&mut out, &report).context("writing JSON")?;
                writeln!(out)?;
            } else {
                cluster::print(&report, &mut out)?;
            }
            Ok(if cluster::any_failed(&report) { 1 } else { 0 })
        }
        Cmd::List { repo } => {
            let list = host::kernels::KernelList::load(&repo.join("e2e/kernels.json"))?;
            for k in &list.kernels {
                let source = if k.debian.is_empty() {
                    k.build.clone().unwrap_or_default()
                } else {
                    k.debian.join(" ")
                };
                println!(
                    "kernel {:<16} userfault={:<5} {source}\n       {}",
                    k.name, k.userfault, k.note
                );
            }
            for t in guest::TESTS {
                println!("test {t}");
            }
            Ok(0)
        }
        Cmd::Matrix {
            json,
            kernels,
            tests,
            extra_bins,
            exec_tests,
            timeout,
            cpus,
            tcg_threads,
            memory_mib,
            repo,
            vmm,
        } => {
            let e2e = std::env::current_exe().context("locating this program")?;
            let vmm = match vmm {
                Some(v) => v,
                None => e2e
                    .parent()
                    .context("this program has no directory")?
                    .join("faultline-vmm"),
            };
            anyhow::ensure!(
                vmm.is_file(),
                "{} not found: build faultline-vmm (cargo build --release -p faultline-vmm) or pass --vmm",
                vmm.display()
            );
            let repo = repo
                .canonicalize()
                .with_context(|| format!("resolving {}", repo.display()))?;
            let opts = host::matrix::MatrixOptions {
                kernels_file: repo.join("e2e/kernels.json"),
                repo,
                cache: cache_dir()?,
                only_kernels: kernels,
                only_tests: tests,
                extra_bins,
                exec_tests,
                vmm,
                e2e,
                qemu: host::qemu::QemuOptions {
                    tcg_threads,
                    cpus,
                    memory_mib,
                    timeout: Duration::from_secs(timeout),
                },
            };
            let report = host::matrix::run(&opts)?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &report).context("writing JSON")?;
                writeln!(out)?;
            } else {
                host::matrix::print_table(&report, &mut out)?;
            }
            Ok(if host::matrix::any_failed(&report) {
                1
            } else {
                0
            })
        }
    }
}
