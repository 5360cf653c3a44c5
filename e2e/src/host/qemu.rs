//! Booting one kernel under QEMU's TCG emulator with an EPYC CPU model (so kvm-amd loads, with
//! nested paging) and collecting what came out: the console (first serial port) and the
//! guest's result lines (second serial port).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::report::GuestLine;

pub struct Boot {
    pub console: String,
    pub lines: Vec<GuestLine>,
    /// Result-port lines that were not valid JSON (garbled or cut off).
    pub garbled: Vec<String>,
    pub seconds: f64,
    pub timed_out: bool,
    pub exit: Option<i32>,
    pub console_log: PathBuf,
}

pub struct QemuOptions {
    /// `single` (one host thread runs every vCPU, round robin) or `multi` (MTTCG).
    pub tcg_threads: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
}

pub fn boot(image: &Path, initramfs: &Path, logs: &Path, opts: &QemuOptions) -> Result<Boot> {
    std::fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let console_log = logs.join("console.log");
    let results_log = logs.join("results.log");
    let qemu_log = logs.join("qemu.log");
    for f in [&console_log, &results_log] {
        let _ = std::fs::remove_file(f);
    }
    let stderr = std::fs::File::create(&qemu_log)
        .with_context(|| format!("creating {}", qemu_log.display()))?;
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .arg("-accel")
        .arg(format!("tcg,thread={}", opts.tcg_threads))
        .args(["-cpu", "EPYC", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-smp", &opts.cpus.to_string()])
        .args(["-m", &opts.memory_mib.to_string()])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 loglevel=4 panic=-1 rdinit=/init transparent_hugepage=madvise",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .arg("-serial")
        .arg(format!("file:{}", results_log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let deadline = start + opts.timeout;
    let (exit, timed_out) = loop {
        if let Some(s) = child.try_wait().context("waiting for QEMU")? {
            break (s.code(), false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let seconds = start.elapsed().as_secs_f64();
    let console = std::fs::read(&console_log)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let results = std::fs::read(&results_log)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default();
    let mut lines = Vec::new();
    let mut garbled = Vec::new();
    for l in results.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<GuestLine>(l) {
            Ok(g) => lines.push(g),
            Err(_) => garbled.push(l.to_string()),
        }
    }
    Ok(Boot {
        console,
        lines,
        garbled,
        seconds,
        timed_out,
        exit,
        console_log,
    })
}
