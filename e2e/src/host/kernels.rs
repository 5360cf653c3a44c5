//! The kernels of the matrix (`e2e/kernels.json`) and getting each ready to boot: Debian
//! packages downloaded with `e2e/fetch-debs` and unpacked into the cache, or our own build from
//! `kernel/build`. Owns finding the kernel image, its release, and the KVM modules (kvm,
//! kvm-amd, irqbypass and whatever they depend on, decompressed) in load order.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct KernelSpec {
    pub name: String,
    /// Debian packages (`name=version`) holding the kernel image and modules.
    #[serde(default)]
    pub debian: Vec<String>,
    /// A script (relative to the repository) that builds the kernel and prints its directory.
    #[serde(default)]
    pub build: Option<String>,
    /// Whether the kernel carries Faultline's KVM Userfault patch.
    pub userfault: bool,
    #[serde(default)]
    pub note: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct KernelList {
    pub kernels: Vec<KernelSpec>,
}

impl KernelList {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: Self =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for k in &list.kernels {
            ensure!(
                k.debian.is_empty() != k.build.is_none(),
                "kernel {}: give exactly one of `debian` and `build`",
                k.name
            );
        }
        Ok(list)
    }
}

/// A kernel ready to boot.
pub struct Prepared {
    pub image: PathBuf,
    pub release: String,
    /// Where it came from: package names and versions, or the build directory.
    pub source: String,
    /// Modules to load, in order: (module name, uncompressed .ko bytes).
    pub modules: Vec<(String, Vec<u8>)>,
}

fn run_capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn prepare(spec: &KernelSpec, repo: &Path, cache: &Path) -> Result<Prepared> {
    match &spec.build {
        Some(script) => prepare_build(repo, script),
        None => prepare_debian(spec, repo, cache),
    }
}

fn prepare_build(repo: &Path, script: &str) -> Result<Prepared> {
    let out = run_capture(&mut Command::new(repo.join(script)))?;
    let dir = PathBuf::from(
        out.lines()
            .last()
            .context("the kernel build printed no directory")?
            .trim(),
    );
    let release = std::fs::read_to_string(dir.join("release"))
        .with_context(|| format!("reading {}/release", dir.display()))?
        .trim()
        .to_string();
    Ok(Prepared {
        image: dir.join("bzImage"),
        release,
        source: format!("{script} → {}", dir.display()),
        modules: Vec::new(),
    })
}

fn prepare_debian(spec: &KernelSpec, repo: &Path, cache: &Path) -> Result<Prepared> {
    let out = run_capture(Command::new(repo.join("e2e/fetch-debs")).args(&spec.debian))?;
    let debs: Vec<PathBuf> = out.lines().map(PathBuf::from).collect();
    ensure!(
        debs.len() == spec.debian.len(),
        "fetch-debs returned {} files for {} packages",
        debs.len(),
        spec.debian.len()
    );
    let names: Vec<String> = debs
        .iter()
        .filter_map(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let root = cache.join("debian").join(&spec.name);
    let stamp = root.join(".unpacked");
    let want = names.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        for deb in &debs {
            run_capture(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
        }
        std::fs::write(&stamp, &want).with_context(|| format!("writing {}", stamp.display()))?;
    }
    let (image, release, moddir) = find_image(&root)?;
    let modules = kvm_modules(&moddir)?;
    Ok(Prepared {
        image,
        release,
        source: names.join(" "),
        modules,
    })
}

/// Finds the kernel image and its release in an unpacked package tree: `boot/vmlinuz-REL`
/// (Debian ≤ 6.x) or `usr/lib/modules/REL/vmlinuz` (the split 7.x packages).
fn find_image(root: &Path) -> Result<(PathBuf, String, PathBuf)> {
    if let Ok(entries) = std::fs::read_dir(root.join("boot")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rel) = name.strip_prefix("vmlinuz-") {
                let moddir = [root.join("lib/modules"), root.join("usr/lib/modules")]
                    .into_iter()
                    .map(|d| d.join(rel))
                    .find(|d| d.is_dir())
                    .unwrap_or_else(|| root.join("lib/modules").join(rel));
                return Ok((e.path(), rel.to_string(), moddir));
            }
        }
    }
    for base in [root.join("usr/lib/modules"), root.join("lib/modules")] {
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                if e.path().join("vmlinuz").is_file() {
                    let rel = e.file_name().to_string_lossy().into_owned();
                    return Ok((e.path().join("vmlinuz"), rel, e.path()));
                }
            }
        }
    }
    bail!("no kernel image in {}", root.display())
}

fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))?;
    Some(stem.replace('-', "_"))
}

fn index_modules(dir: &Path, into: &mut BTreeMap<String, PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            index_modules(&path, into);
        } else if let Some(name) = module_name(&e.file_name().to_string_lossy()) {
            into.insert(name, path);
        }
    }
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc {}", path.display()))?;
            ensure!(out.status.success(), "{tool} -dc {} failed", path.display());
            Ok(out.stdout)
        }
    }
}

/// The value of `key` in a module's `.modinfo` section.
pub fn modinfo(elf: &[u8], key: &str) -> Result<Option<String>> {
    let u16_at = |o: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(
            elf.get(o..o + 2).context("truncated ELF")?.try_into()?,
        ))
    };
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            elf.get(o..o + 4).context("truncated ELF")?.try_into()?,
        ))
    };
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            elf.get(o..o + 8).context("truncated ELF")?.try_into()?,
        ))
    };
    ensure!(
        elf.starts_with(b"\x7fELF") && elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a little-endian ELF64 module"
    );
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3A)? as usize;
    let shnum = u16_at(0x3C)? as usize;
    let shstrndx = u16_at(0x3E)? as usize;
    let section = |i: usize| -> Result<(u32, usize, usize)> {
        let h = shoff + i * shentsize;
        Ok((
            u32_at(h)?,
            u64_at(h + 24)? as usize,
            u64_at(h + 32)? as usize,
        ))
    };
    let (_, stroff, strsize) = section(shstrndx)?;
    let strtab = elf
        .get(stroff..stroff + strsize)
        .context("bad section names")?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&c| c == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = elf.get(off..off + size).context("bad .modinfo")?;
            let prefix = format!("{key}=");
            return Ok(data
                .split(|&c| c == 0)
                .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned()));
        }
    }
    Ok(None)
}

/// kvm-amd and everything it needs, dependencies first. Modules the kernel has built in are
/// simply not found and not needed.
fn kvm_modules(moddir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut index = BTreeMap::new();
    index_modules(&moddir.join("kernel"), &mut index);
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            return Ok(()); // built in, or absent: the guest's probes will tell
        };
        let bytes = read_module(path)?;
        let deps = modinfo(&bytes, "depends")
            .with_context(|| format!("reading .modinfo of {}", path.display()))?
            .unwrap_or_default();
        for dep in deps.split(',').filter(|d| !d.is_empty()) {
            visit(&dep.replace('-', "_"), index, seen, order)?;
        }
        order.push((name.to_string(), bytes));
        Ok(())
    }
    for m in ["irqbypass", "kvm", "kvm_amd"] {
        visit(m, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}
