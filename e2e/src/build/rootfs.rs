//! A root file system held in memory: directories and files by path, and executables
//! added with the shared libraries `ldd` says they need. The initramfs of a matrix boot and the
//! OCI images are both written from one of these; this module knows no archive format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// What a path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits only (e.g. 0o755); the kind is in `node`.
    pub mode: u32,
    pub node: Node,
}

/// Paths are relative (no leading `/`), parents always present, iterated in sorted order so
/// that parents come before their children and archives are reproducible.
#[derive(Debug, Default, Clone)]
pub struct RootFs {
    entries: BTreeMap<String, Entry>,
}

fn relative(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl RootFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a directory and its missing parents (0755; `mode` applies to the last one).
    pub fn dir(&mut self, path: &str, mode: u32) {
        let path = relative(path);
        let mut p = String::new();
        for part in path.split('/').filter(|s| !s.is_empty()) {
            if !p.is_empty() {
                p.push('/');
            }
            p.push_str(part);
            self.entries.entry(p.clone()).or_insert(Entry {
                mode: 0o755,
                node: Node::Dir,
            });
        }
        if let Some(e) = self.entries.get_mut(&path) {
            e.mode = mode;
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            let parent = parent.to_string();
            if !self.entries.contains_key(&parent) {
                self.dir(&parent, 0o755);
            }
        }
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = relative(path);
        self.parent(&path);
        self.entries.insert(
            path,
            Entry {
                mode,
                node: Node::File(data),
            },
        );
    }

    /// Adds an executable at `DIR/NAME`, stripped of debug information, with the shared
    /// libraries it needs at the paths `ldd` gives. Returns its path in the tree.
    pub fn binary(&mut self, dir: &str, path: &Path, strip_dir: &Path) -> Result<String> {
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
        let at = format!("{}/{name}", relative(dir));
        self.file(&at, 0o755, data);
        for lib in shared_libraries(path)? {
            let data = std::fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            self.file(&lib.to_string_lossy(), 0o755, data);
        }
        Ok(at)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }
}

/// The shared libraries (including the dynamic loader) a binary needs, from `ldd`.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if [&text, &err]
        .iter()
        .any(|t| t.contains("not a dynamic executable") || t.contains("statically linked"))
    {
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
    fn parents_come_first_and_modes_stick() {
        let mut fs = RootFs::new();
        fs.file("/etc/passwd", 0o644, b"root:x:0:0::/:/bin/false\n".to_vec());
        fs.dir("tmp", 0o1777);
        let entries: Vec<(&str, u32, bool)> = fs
            .iter()
            .map(|(p, e)| (p, e.mode, e.node == Node::Dir))
            .collect();
        assert_eq!(
            entries,
            [
                ("etc", 0o755, true),
                ("etc/passwd", 0o644, false),
                ("tmp", 0o1777, true)
            ]
        );
    }

    #[test]
    fn static_programs_need_no_libraries() {
        let dir = std::env::temp_dir().join(format!("faultline-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, exe) = (dir.join("s.c"), dir.join("s"));
        std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
        let built = Command::new("gcc")
            .args(["-static", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(built.success());
        assert_eq!(shared_libraries(&exe).unwrap(), Vec::<PathBuf>::new());
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
