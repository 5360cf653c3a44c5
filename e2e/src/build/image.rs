//! OCI image archives, built without a container engine: one layer holding a `RootFs`, its
//! config and manifest, written as a tar that is at once an OCI image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/…`: what `ctr images import` reads) and a Docker archive
//! (`manifest.json`: what `docker load` and `podman load` read), the way `docker save` writes
//! one since Docker 25. The layer is stored uncompressed, which keeps the archive reproducible
//! byte for byte; `podman push` and `skopeo copy` compress it on the way to a registry.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::rootfs::{Node, RootFs};
use super::tar::{Kind, TarWriter};

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// What the image runs and how it is named.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// Full reference, `registry/repository:tag`.
    pub reference: String,
    pub entrypoint: Vec<String>,
    /// `uid[:gid]` the process runs as unless the pod says otherwise.
    pub user: Option<String>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch for `created` and every file's mtime (reproducible builds use
    /// the commit time, as SOURCE_DATE_EPOCH does).
    pub epoch: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub reference: String,
    /// `sha256:…` of the manifest: the image's digest in a registry.
    pub digest: String,
    pub archive_bytes: u64,
    pub layer_bytes: u64,
}

fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn blob_path(digest: &str) -> String {
    format!("blobs/{}", digest.replacen(':', "/", 1))
}

/// `repository:tag` → (repository, tag); a reference without a tag is refused rather than
/// silently becoming `latest`.
pub fn split_reference(reference: &str) -> Result<(&str, &str)> {
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    let colon = reference[slash..]
        .rfind(':')
        .map(|i| i + slash)
        .with_context(|| format!("image reference `{reference}` has no tag"))?;
    let (repo, tag) = (&reference[..colon], &reference[colon + 1..]);
    ensure!(
        !repo.is_empty() && !tag.is_empty(),
        "bad image reference `{reference}`"
    );
    Ok((repo, tag))
}

/// The files every image has: users root and nonroot (65532, the chart's operator user),
/// and writable /tmp.
pub fn base_rootfs() -> RootFs {
    let mut fs = RootFs::new();
    fs.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
            .to_vec(),
    );
    fs.file(
        "etc/group",
        0o644,
        b"root:x:0:\nnonroot:x:65532:\n".to_vec(),
    );
    fs.dir("tmp", 0o1777);
    fs.dir("root", 0o700);
    fs.dir("home/nonroot", 0o755);
    fs
}

fn layer(fs: &RootFs, mtime: u64) -> Result<Vec<u8>> {
    let mut t = TarWriter::new(mtime);
    for (path, e) in fs.iter() {
        let kind = match &e.node {
            Node::Dir => Kind::Dir,
            Node::File(d) => Kind::File(d),
        };
        t.append(path, e.mode, kind)?;
    }
    Ok(t.finish())
}

fn rfc3339(epoch: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm): no date crate for one timestamp.
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Writes the image archive to `out`.
pub fn write(fs: &RootFs, cfg: &ImageConfig, out: &Path) -> Result<Written> {
    let (_, tag) = split_reference(&cfg.reference)?;
    let layer = layer(fs, cfg.epoch)?;
    let layer_digest = sha256(&layer);
    let created = rfc3339(cfg.epoch);
    let mut config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": cfg.entrypoint,
            "Env": cfg.env,
            "WorkingDir": "/",
            "Labels": cfg.labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": created, "created_by": "faultline-e2e image"}],
    });
    if let Some(user) = &cfg.user {
        config["config"]["User"] = json!(user);
    }
    let config = serde_json::to_vec(&config)?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer.len()}],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_TYPE,
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": cfg.reference,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;
    let docker_manifest = serde_json::to_vec(&json!([{
        "Config": blob_path(&config_digest),
        "RepoTags": [cfg.reference],
        "Layers": [blob_path(&layer_digest)],
    }]))?;

    let mut t = TarWriter::new(cfg.epoch);
    t.append("blobs", 0o755, Kind::Dir)?;
    t.append("blobs/sha256", 0o755, Kind::Dir)?;
    for (digest, bytes) in [
        (&config_digest, &config),
        (&layer_digest, &layer),
        (&manifest_digest, &manifest),
    ] {
        t.append(&blob_path(digest), 0o644, Kind::File(bytes))?;
    }
    t.append("index.json", 0o644, Kind::File(&index))?;
    t.append("manifest.json", 0o644, Kind::File(&docker_manifest))?;
    t.append(
        "oci-layout",
        0o644,
        Kind::File(br#"{"imageLayoutVersion":"1.0.0"}"#),
    )?;
    let archive = t.finish();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, &archive).with_context(|| format!("writing {}", out.display()))?;
    Ok(Written {
        reference: cfg.reference.clone(),
        digest: manifest_digest,
        archive_bytes: archive.len() as u64,
        layer_bytes: layer.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn references_need_a_tag() {
        assert_eq!(
            split_reference("ghcr.io/faultline-dev/faultline-vmm:0.1.0").unwrap(),
            ("ghcr.io/faultline-dev/faultline-vmm", "0.1.0")
        );
        assert_eq!(
            split_reference("localhost:5000/vmm:dev").unwrap(),
            ("localhost:5000/vmm", "dev")
        );
        assert!(split_reference("localhost:5000/vmm").is_err());
        assert!(split_reference("vmm:").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_547_200), "2025-12-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn archive_is_an_oci_layout_and_a_docker_archive_and_reproducible() {
        let mut fs = base_rootfs();
        fs.file("usr/bin/hello", 0o755, b"#!/bin/true\n".to_vec());
        let cfg = ImageConfig {
            reference: "example.test/hello:1".into(),
            entrypoint: vec!["/usr/bin/hello".into()],
            user: Some("65532".into()),
            env: vec!["PATH=/usr/bin".into()],
            labels: BTreeMap::new(),
            epoch: 1_700_000_000,
        };
        let dir = std::env::temp_dir().join(format!("faultline-image-{}", std::process::id()));
        let (a, b) = (dir.join("a.tar"), dir.join("b.tar"));
        let wa = write(&fs, &cfg, &a).unwrap();
        let wb = write(&fs, &cfg, &b).unwrap();
        assert_eq!(wa.digest, wb.digest);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());

        let unpacked = dir.join("x");
        std::fs::create_dir_all(&unpacked).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&a)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .unwrap();
        assert!(st.success());
        let read_json = |p: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(unpacked.join(p)).unwrap()).unwrap()
        };
        let index = read_json("index.json");
        let m = &index["manifests"][0];
        assert_eq!(m["digest"], wa.digest.as_str());
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "example.test/hello:1"
        );
        // Every digest names the bytes it points at.
        let manifest_bytes = std::fs::read(unpacked.join(blob_path(&wa.digest))).unwrap();
        assert_eq!(sha256(&manifest_bytes), wa.digest);
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        for d in [&manifest["config"], &manifest["layers"][0]] {
            let digest = d["digest"].as_str().unwrap();
            let bytes = std::fs::read(unpacked.join(blob_path(digest))).unwrap();
            assert_eq!(sha256(&bytes), digest);
            assert_eq!(d["size"], bytes.len());
        }
        let docker = read_json("manifest.json");
        assert_eq!(docker[0]["RepoTags"][0], "example.test/hello:1");
        assert_eq!(
            docker[0]["Layers"][0],
            blob_path(manifest["layers"][0]["digest"].as_str().unwrap())
        );
        let config = read_json(docker[0]["Config"].as_str().unwrap());
        assert_eq!(config["config"]["User"], "65532");
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            manifest["layers"][0]["digest"]
        );
        // The layer holds the file tree.
        let layer = unpacked.join(docker[0]["Layers"][0].as_str().unwrap());
        let out = Command::new("tar").arg("-tf").arg(&layer).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains("usr/bin/hello"), "{listing}");
        assert!(listing.contains("etc/passwd"), "{listing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
