//! The target's migration record on disk: what a sidecar that restarts needs to rejoin a
//! migration it was running — the start request, secret included. Written when a target
//! migration starts, removed when it ends; a record found at startup means the previous run of
//! this sidecar died in the middle of one.
//!
//! Owns the file and nothing else: deciding whether the migration can be rejoined is
//! `crate::lifecycle`'s and `crate::target`'s. The directory should not outlive the pod (an
//! emptyDir): the secret is only good for this one migration, and the file is readable by its
//! owner only.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use faultline::sidecar_api::StartMigration;

const FILE: &str = "target-migration.json";

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Writes the record atomically (a temporary file renamed over it), mode 0600.
pub fn save(dir: &Path, req: &StartMigration) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let json = serde_json::to_vec(req).context("cannot encode the migration record")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(&json)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path(dir))
        .with_context(|| format!("cannot move the record into place in {}", dir.display()))
}

/// The record left by an earlier run, if any.
pub fn load(dir: &Path) -> anyhow::Result<Option<StartMigration>> {
    let p = path(dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    };
    let req = faultline::strict_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a migration record: {e}", p.display()))?;
    Ok(Some(req))
}

pub fn remove(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove the record in {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline::sidecar_api::{Policy, Role};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_record_round_trips_privately_and_goes_away() {
        let dir = std::env::temp_dir().join(format!("faultline-record-{}", std::process::id()));
        assert!(load(&dir).unwrap().is_none());
        let req = StartMigration {
            id: "m1".into(),
            role: Role::Target,
            peer: None,
            secret: "c2VjcmV0".into(),
            policy: Policy::default(),
        };
        save(&dir, &req).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(req));
        let mode = std::fs::metadata(path(&dir)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        remove(&dir).unwrap();
        remove(&dir).unwrap();
        assert!(load(&dir).unwrap().is_none());
        std::fs::write(path(&dir), b"{not json").unwrap();
        assert!(load(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
