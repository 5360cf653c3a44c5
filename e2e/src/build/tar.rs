//! A POSIX ustar writer, enough for image layers and image archives: directories and regular
//! files, owned by root, with one fixed modification time so the same input gives
//! the same bytes.

use anyhow::{Result, ensure};

const BLOCK: usize = 512;

/// Appends tar entries to a byte buffer; `finish` adds the two zero blocks that end an archive.
pub struct TarWriter {
    buf: Vec<u8>,
    mtime: u64,
}

#[derive(Clone, Copy)]
pub enum Kind<'a> {
    Dir,
    File(&'a [u8]),
}

fn octal(field: &mut [u8], value: u64) -> Result<()> {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    ensure!(
        text.len() == digits,
        "{value} does not fit a {digits}-digit tar field"
    );
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
    Ok(())
}

/// Splits a path into ustar's `prefix` (155 bytes) and `name` (100 bytes) at a `/`.
fn split_name(path: &str) -> Result<(&str, &str)> {
    if path.len() <= 100 {
        return Ok(("", path));
    }
    for (i, _) in path.match_indices('/') {
        let (prefix, name) = (&path[..i], &path[i + 1..]);
        if prefix.len() <= 155 && name.len() <= 100 && !name.is_empty() {
            return Ok((prefix, name));
        }
    }
    anyhow::bail!("path too long for ustar: {path}")
}

impl TarWriter {
    pub fn new(mtime: u64) -> Self {
        Self {
            buf: Vec::new(),
            mtime,
        }
    }

    /// Appends one entry; `path` is relative, directories without a trailing slash.
    pub fn append(&mut self, path: &str, mode: u32, kind: Kind<'_>) -> Result<()> {
        let full = match kind {
            Kind::Dir => format!("{path}/"),
            _ => path.to_string(),
        };
        let (prefix, name) = split_name(&full)?;
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], u64::from(mode & 0o7777))?;
        octal(&mut h[108..116], 0)?;
        octal(&mut h[116..124], 0)?;
        let (size, typeflag) = match kind {
            Kind::Dir => (0, b'5'),
            Kind::File(d) => (d.len() as u64, b'0'),
        };
        octal(&mut h[124..136], size)?;
        octal(&mut h[136..148], self.mtime)?;
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        // The checksum is computed with its own field read as eight spaces.
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        octal(&mut h[148..155], sum)?;
        h[155] = b' ';
        self.buf.extend_from_slice(&h);
        if let Kind::File(d) = kind {
            self.buf.extend_from_slice(d);
            let pad = (BLOCK - d.len() % BLOCK) % BLOCK;
            self.buf.resize(self.buf.len() + pad, 0);
        }
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.resize(self.buf.len() + 2 * BLOCK, 0);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn gnu_tar_reads_what_we_write() {
        let mut t = TarWriter::new(1_700_000_000);
        t.append("usr", 0o755, Kind::Dir).unwrap();
        t.append("usr/bin", 0o755, Kind::Dir).unwrap();
        t.append("usr/bin/hello", 0o755, Kind::File(b"#!/bin/sh\necho hi\n"))
            .unwrap();
        let deep = format!("{}/file", "d".repeat(120));
        t.append(&deep, 0o644, Kind::File(&[7u8; 700])).unwrap();
        let bytes = t.finish();
        assert_eq!(bytes.len() % BLOCK, 0);
        let dir = std::env::temp_dir().join(format!("faultline-tar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("t.tar");
        std::fs::write(&archive, &bytes).unwrap();
        let out = Command::new("tar")
            .arg("-tvf")
            .arg(&archive)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listing.contains("usr/bin/hello"), "{listing}");
        assert!(listing.contains(&deep), "{listing}");
        assert!(listing.contains("-rwxr-xr-x root/root"), "{listing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_long_paths_are_refused() {
        let mut t = TarWriter::new(0);
        assert!(t.append(&"x".repeat(101), 0o644, Kind::File(b"")).is_err());
    }
}
