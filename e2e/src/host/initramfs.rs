//! Assembling the initramfs a matrix boot runs: static busybox, an init script, the KVM
//! modules, our binaries with the shared libraries `ldd` says they need, and the plan. Written
//! as a `newc` cpio archive directly (no cpio tool, and byte-for-byte reproducible).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The init script: mount the basics, load the modules, run the plan, report, power off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /faultline/modules.order); do
    insmod /faultline/modules/$m.ko || echo "faultline-init: insmod $m failed"
done
ip link set lo up 2>/dev/null || echo "faultline-init: no loopback network"
echo "faultline-init: $(uname -r), $(nproc) CPUs, $(grep -c . /faultline/modules.order) modules"
RUST_LOG=info /bin/faultline-e2e guest --plan /faultline/plan.json --results /dev/ttyS1
echo "faultline-init: guest exited with $?"
sync
reboot -f
"#;

#[derive(Default)]
pub struct Initramfs {
    /// path in the archive → (mode, contents); directories have no contents.
    entries: BTreeMap<String, (u32, Option<Vec<u8>>)>,
}

impl Initramfs {
    pub fn new() -> Self {
        let mut me = Self::default();
        for d in [
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "faultline",
            "faultline/modules",
        ] {
            me.dir(d);
        }
        me.file("init", 0o755, INIT.as_bytes().to_vec());
        me
    }

    fn dir(&mut self, path: &str) {
        let mut p = String::new();
        for part in path.split('/').filter(|s| !s.is_empty()) {
            if !p.is_empty() {
                p.push('/');
            }
            p.push_str(part);
            self.entries.entry(p.clone()).or_insert((0o40755, None));
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = path.trim_start_matches('/').to_string();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path, (0o100000 | mode, Some(data)));
    }

    pub fn modules(&mut self, modules: &[(String, Vec<u8>)]) {
        let mut order = String::new();
        for (name, bytes) in modules {
            self.file(
                &format!("faultline/modules/{name}.ko"),
                0o644,
                bytes.clone(),
            );
            order.push_str(name);
            order.push('\n');
        }
        self.file("faultline/modules.order", 0o644, order.into_bytes());
    }

    /// Adds an executable at `/bin/NAME`, stripped of debug information, with the shared
    /// libraries it needs at the paths `ldd` gives.
    pub fn binary(&mut self, path: &Path, strip_dir: &Path) -> Result<()> {
        let name = path
            .file_name()
            .with_context(|| format!("{} has no file name", path.display()))?
            .to_string_lossy()
            .into_owned();
        std::fs::create_dir_all(strip_dir)
            .with_context(|| format!("creating {}", strip_dir.display()))?;
        let stripped = strip_dir.join(&name);
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(path)
            .status()
            .context("running strip (binutils)")?;
        ensure!(status.success(), "strip {} failed", path.display());
        let data =
            std::fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?;
        self.file(&format!("bin/{name}"), 0o755, data);
        for lib in shared_libraries(path)? {
            let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            self.file(&lib.to_string_lossy(), 0o755, data);
        }
        Ok(())
    }

    /// Writes the archive.
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut buf = Vec::new();
        for (ino, (path, (mode, data))) in self.entries.iter().enumerate() {
            push_entry(
                &mut buf,
                ino as u32 + 1,
                path,
                *mode,
                data.as_deref().unwrap_or(&[]),
            );
        }
        push_entry(&mut buf, 0, "TRAILER!!!", 0, &[]);
        std::fs::write(out, buf).with_context(|| format!("writing {}", out.display()))
    }
}

fn pad4(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// One `newc` entry: "070701", 13 eight-digit hex fields, the NUL-terminated name, data, each
/// padded to 4 bytes.
fn push_entry(buf: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let nlink = if mode & 0o40000 != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    buf.extend_from_slice(b"070701");
    for f in fields {
        buf.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    buf.extend_from_slice(name.as_bytes());
    buf.push(0);
    pad4(buf);
    buf.extend_from_slice(data);
    pad4(buf);
}

/// The shared libraries (including the dynamic loader) a binary needs, from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    ensure!(out.status.success(), "ldd {} failed", binary.display());
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            Some("not") => bail!("{}: missing library: {line}", binary.display()),
            _ => {}
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut i = Initramfs::new();
        i.file("faultline/plan.json", 0o644, b"{}".to_vec());
        let dir = std::env::temp_dir().join(format!("faultline-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("x.cpio");
        i.write(&out).unwrap();
        let b = std::fs::read(&out).unwrap();
        assert!(b.starts_with(b"070701"));
        assert_eq!(b.len() % 4, 0);
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
        assert!(b.windows(19).any(|w| w == b"faultline/plan.json"));
        // The plan's parent directory comes before it.
        let dir_pos = b.windows(10).position(|w| w == b"faultline\0").unwrap();
        let plan_pos = b
            .windows(19)
            .position(|w| w == b"faultline/plan.json")
            .unwrap();
        assert!(dir_pos < plan_pos);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ldd_finds_libc_and_the_loader() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
