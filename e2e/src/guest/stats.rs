//! KVM's binary statistics for a VM (`KVM_GET_STATS_FD`), read by name. Used to see how KVM
//! maps guest memory (`pages_4k`, `pages_2m`, `pages_1g` on x86).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};
use kvm_ioctls::VmFd;

/// `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xAE << 8 | 0xCE;

pub struct VmStats {
    fd: OwnedFd,
    /// (name, offset of its first u64 in the file)
    fields: Vec<(String, u64)>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl VmStats {
    pub fn open(vm: &VmFd) -> Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let raw = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_GET_STATS_FD as _) };
        if raw < 0 {
            bail!("KVM_GET_STATS_FD: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the ioctl just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut header = [0u8; 24];
        rustix::io::pread(&fd, &mut header, 0).context("reading the stats header")?;
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u32_at(&header, 16) as u64;
        let data_offset = u32_at(&header, 20) as u64;
        let desc_size = 16 + name_size;
        let mut descs = vec![0u8; desc_size * num_desc];
        rustix::io::pread(&fd, &mut descs, desc_offset).context("reading stats descriptors")?;
        let fields = descs
            .chunks_exact(desc_size)
            .map(|d| {
                let offset = u32_at(d, 8) as u64;
                let name = &d[16..];
                let len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                (
                    String::from_utf8_lossy(&name[..len]).into_owned(),
                    data_offset + offset,
                )
            })
            .collect();
        Ok(Self { fd, fields })
    }

    /// The current value of the named statistic (its first u64).
    pub fn read(&self, name: &str) -> Result<u64> {
        let Some((_, at)) = self.fields.iter().find(|(n, _)| n == name) else {
            bail!("KVM has no VM statistic named {name}");
        };
        let mut v = [0u8; 8];
        rustix::io::pread(&self.fd, &mut v, *at).with_context(|| format!("reading {name}"))?;
        Ok(u64::from_le_bytes(v))
    }
}
