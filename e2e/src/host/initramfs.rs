//! Assembling the initramfs a matrix boot runs: static busybox, an init script, the KVM
//! modules, our binaries with the shared libraries `ldd` says they need, and the plan. Written
//! as a `newc` cpio archive directly (no cpio tool, and byte-for-byte reproducible).

use std::path::Path;

use anyhow::{Context, Result};

use crate::build::rootfs::{Node, RootFs};

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

pub struct Initramfs {
    fs: RootFs,
}

impl Initramfs {
    pub fn new() -> Self {
        let mut fs = RootFs::new();
        for d in ["bin", "dev", "proc", "sys", "tmp", "faultline/modules"] {
            fs.dir(d, 0o755);
        }
        fs.file("init", 0o755, INIT.as_bytes().to_vec());
        Self { fs }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.fs.file(path, mode, data);
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
    /// libraries it needs.
    pub fn binary(&mut self, path: &Path, strip_dir: &Path) -> Result<()> {
        self.fs.binary("bin", path, strip_dir).map(drop)
    }

    /// Writes the archive.
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut buf = Vec::new();
        for (ino, (path, entry)) in self.fs.iter().enumerate() {
            let (kind, data) = match &entry.node {
                Node::Dir => (0o040000, &[][..]),
                Node::File(d) => (0o100000, &d[..]),
            };
            push_entry(&mut buf, ino as u32 + 1, path, kind | entry.mode, data);
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
}
