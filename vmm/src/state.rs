//! The VM state blob: everything needed to resume every vCPU exactly where it stopped, plus
//! the VMM's own accounting, in a versioned binary format (`docs/vmm-protocol.md`, "State
//! blob"). Saving and restoring talk to KVM; encoding and decoding are pure and tested alone.
//!
//! Layout: `FLVMSTAT`, u32 version, u32 section count, then sections of
//! `u16 tag, u16 vcpu, u32 length, bytes`. KVM structures are stored as their raw bytes
//! (zerocopy), so the blob is exactly what KVM gave and takes.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, IntoBytes};

use crate::accounting::AccountingSnapshot;

pub const MAGIC: &[u8; 8] = b"FLVMSTAT";
pub const FORMAT: &str = "faultline-vmm-state";
pub const VERSION: u32 = 1;
/// The most vCPUs a VM of this VMM has (`--vcpus`), and so the most a blob may describe.
pub const MAX_VCPUS: usize = 64;
/// Upper bound on sections, so a hostile blob cannot make the decoder allocate without end.
const MAX_SECTIONS: u32 = MAX_VCPUS as u32 * 16 + 16;

const TAG_META: u16 = 1;
const TAG_REGS: u16 = 2;
const TAG_SREGS: u16 = 3;
const TAG_XSAVE: u16 = 4;
const TAG_XCRS: u16 = 5;
const TAG_EVENTS: u16 = 6;
const TAG_MP_STATE: u16 = 7;
const TAG_DEBUGREGS: u16 = 8;
const TAG_MSRS: u16 = 9;
const TAG_CPUID: u16 = 10;
const TAG_TSC_KHZ: u16 = 11;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("not a Faultline VMM state blob (bad magic)")]
    BadMagic,
    #[error("state blob version {0} is not supported (this VMM reads version {VERSION})")]
    Version(u32),
    #[error("state blob is truncated or malformed: {0}")]
    Malformed(String),
    #[error("state is for {theirs} vCPUs, this VM has {ours}")]
    VcpuCount { theirs: usize, ours: usize },
    #[error("state is for {theirs} bytes of RAM, this VM has {ours}")]
    RamSize { theirs: u64, ours: u64 },
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        vcpu: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// VM-wide facts, stored as JSON in the first section.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    pub vmm: String,
    pub vm_id: String,
    pub vcpus: usize,
    pub ram_size: u64,
    /// Which vCPUs had halted (they stay halted on the target).
    pub halted: Vec<bool>,
    pub accounting: AccountingSnapshot,
}

/// One vCPU's architectural state as KVM reports it.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub msrs: Vec<kvm_msr_entry>,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
}

pub struct VmState {
    pub meta: Meta,
    pub vcpus: Vec<VcpuState>,
}

fn kvm_err(vcpu: usize, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { vcpu, what, source }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_indices` are the MSRs to save
    /// (KVM_GET_MSR_INDEX_LIST); those KVM cannot read are skipped.
    pub fn save(vcpu: usize, fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        let e = |what| kvm_err(vcpu, what);
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?;
        Ok(Self {
            mp_state: fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
            events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
            msrs: read_msrs(vcpu, fd, msr_indices)?,
            cpuid: cpuid.as_slice().to_vec(),
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }

    /// Loads this state into a vCPU that has never run, in the order KVM requires (CPUID
    /// first; MSRs before events).
    pub fn restore(&self, vcpu: usize, fd: &VcpuFd) -> Result<(), StateError> {
        let e = |what| kvm_err(vcpu, what);
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| StateError::Malformed(format!("vCPU {vcpu}: too many CPUID entries")))?;
        fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz
            && fd.get_tsc_khz().ok() != Some(khz)
        {
            fd.set_tsc_khz(khz).map_err(e("KVM_SET_TSC_KHZ"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB layout KVM_GET_XSAVE produced, so KVM reads
        // no more than the struct holds.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        write_msrs(vcpu, fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads MSRs in batches; an MSR KVM refuses to read ends a batch early and is skipped.
fn read_msrs(vcpu: usize, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut next = 0;
    while next < indices.len() {
        let batch = &indices[next..indices.len().min(next + kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| StateError::Malformed("MSR batch too large".into()))?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(vcpu, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        next += read;
        if read < batch.len() {
            next += 1; // KVM could not read this one
        }
    }
    Ok(out)
}

/// Writes MSRs; one KVM refuses is logged and skipped (the blob may come from a host whose
/// KVM exposes MSRs this one does not).
fn write_msrs(vcpu: usize, fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let msrs = Msrs::from_entries(batch)
            .map_err(|_| StateError::Malformed("MSR batch too large".into()))?;
        let written = fd.set_msrs(&msrs).map_err(kvm_err(vcpu, "KVM_SET_MSRS"))?;
        if written < batch.len() {
            let refused = batch[written];
            // Often harmless: the MSR already holds the value (e.g. a disabled paravirtual
            // feature whose "off" value KVM will not accept being written).
            let current = read_msrs(vcpu, fd, &[refused.index])?;
            if current.first().map(|m| m.data) == Some(refused.data) {
                tracing::debug!(
                    vcpu,
                    msr = format_args!("{:#x}", refused.index),
                    "MSR already holds the saved value"
                );
            } else {
                tracing::warn!(
                    vcpu,
                    msr = format_args!("{:#x}", refused.index),
                    "KVM refused to restore an MSR; skipping it"
                );
            }
            rest = &rest[written + 1..];
        } else {
            rest = &rest[batch.len()..];
        }
    }
    Ok(())
}

struct Writer(Vec<u8>, u32);

impl Writer {
    fn section(&mut self, tag: u16, vcpu: usize, bytes: &[u8]) {
        self.0.extend_from_slice(&tag.to_le_bytes());
        self.0.extend_from_slice(&(vcpu as u16).to_le_bytes());
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.0.extend_from_slice(bytes);
        self.1 += 1;
    }
}

impl VmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new(), 0);
        let meta = serde_json::to_vec(&self.meta).unwrap_or_default();
        w.section(TAG_META, 0, &meta);
        for (i, v) in self.vcpus.iter().enumerate() {
            w.section(TAG_REGS, i, v.regs.as_bytes());
            w.section(TAG_SREGS, i, v.sregs.as_bytes());
            w.section(TAG_XSAVE, i, v.xsave.as_bytes());
            w.section(TAG_XCRS, i, v.xcrs.as_bytes());
            w.section(TAG_EVENTS, i, v.events.as_bytes());
            w.section(TAG_MP_STATE, i, v.mp_state.as_bytes());
            w.section(TAG_DEBUGREGS, i, v.debugregs.as_bytes());
            w.section(TAG_MSRS, i, v.msrs.as_slice().as_bytes());
            w.section(TAG_CPUID, i, v.cpuid.as_slice().as_bytes());
            if let Some(khz) = v.tsc_khz {
                w.section(TAG_TSC_KHZ, i, &khz.to_le_bytes());
            }
        }
        let mut out = Vec::with_capacity(16 + w.0.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&w.1.to_le_bytes());
        out.extend_from_slice(&w.0);
        out
    }

    pub fn decode(blob: &[u8]) -> Result<Self, StateError> {
        let bad = |what: String| StateError::Malformed(what);
        if blob.len() < 16 || &blob[..8] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = u32::from_le_bytes([blob[8], blob[9], blob[10], blob[11]]);
        if version != VERSION {
            return Err(StateError::Version(version));
        }
        let count = u32::from_le_bytes([blob[12], blob[13], blob[14], blob[15]]);
        if count > MAX_SECTIONS {
            return Err(bad(format!("{count} sections")));
        }
        let mut rest = &blob[16..];
        let mut meta: Option<Meta> = None;
        let mut parts: Vec<Partial> = Vec::new();
        for n in 0..count {
            if rest.len() < 8 {
                return Err(bad(format!("section {n} header cut short")));
            }
            let tag = u16::from_le_bytes([rest[0], rest[1]]);
            let vcpu = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
            let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            rest = &rest[8..];
            if rest.len() < len {
                return Err(bad(format!("section {n} (tag {tag}) cut short")));
            }
            let (bytes, tail) = rest.split_at(len);
            rest = tail;
            if tag == TAG_META {
                let m: Meta = serde_json::from_slice(bytes)
                    .map_err(|e| bad(format!("metadata section: {e}")))?;
                // The count sizes an allocation below: a peer's number is checked first.
                if m.vcpus == 0 || m.vcpus > MAX_VCPUS {
                    return Err(bad(format!(
                        "metadata names {} vCPUs (1 to {MAX_VCPUS})",
                        m.vcpus
                    )));
                }
                meta = Some(m);
                continue;
            }
            let vcpus = meta
                .as_ref()
                .ok_or_else(|| bad("vCPU section before the metadata".into()))?
                .vcpus;
            if vcpu >= vcpus {
                return Err(bad(format!("section for vCPU {vcpu} of {vcpus}")));
            }
            if parts.len() < vcpus {
                parts.resize_with(vcpus, Partial::default);
            }
            parts[vcpu]
                .take(tag, bytes)
                .map_err(|what| bad(format!("vCPU {vcpu} section tag {tag}: {what}")))?;
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        let meta = meta.ok_or_else(|| bad("no metadata section".into()))?;
        if meta.halted.len() != meta.vcpus || meta.accounting.heartbeats.len() != meta.vcpus {
            return Err(bad("metadata vCPU counts disagree".into()));
        }
        parts.resize_with(meta.vcpus, Partial::default);
        let vcpus = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                p.finish()
                    .map_err(|what| bad(format!("vCPU {i}: missing {what}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { meta, vcpus })
    }
}

#[derive(Default)]
struct Partial {
    regs: Option<kvm_regs>,
    sregs: Option<kvm_sregs>,
    xsave: Option<kvm_xsave>,
    xcrs: Option<kvm_xcrs>,
    events: Option<kvm_vcpu_events>,
    mp_state: Option<kvm_mp_state>,
    debugregs: Option<kvm_debugregs>,
    msrs: Option<Vec<kvm_msr_entry>>,
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    tsc_khz: Option<u32>,
}

fn exact<T: FromBytes>(bytes: &[u8]) -> Result<T, String> {
    T::read_from_bytes(bytes).map_err(|_| {
        format!(
            "{} bytes where {} were expected",
            bytes.len(),
            std::mem::size_of::<T>()
        )
    })
}

fn array<T: FromBytes + Clone>(bytes: &[u8]) -> Result<Vec<T>, String> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes is not a whole number of {size}-byte entries",
            bytes.len()
        ));
    }
    bytes.chunks_exact(size).map(exact::<T>).collect()
}

impl Partial {
    fn take(&mut self, tag: u16, bytes: &[u8]) -> Result<(), String> {
        match tag {
            TAG_REGS => self.regs = Some(exact(bytes)?),
            TAG_SREGS => self.sregs = Some(exact(bytes)?),
            TAG_XSAVE => self.xsave = Some(exact(bytes)?),
            TAG_XCRS => self.xcrs = Some(exact(bytes)?),
            TAG_EVENTS => self.events = Some(exact(bytes)?),
            TAG_MP_STATE => self.mp_state = Some(exact(bytes)?),
            TAG_DEBUGREGS => self.debugregs = Some(exact(bytes)?),
            TAG_MSRS => self.msrs = Some(array(bytes)?),
            TAG_CPUID => {
                let cpuid: Vec<kvm_cpuid_entry2> = array(bytes)?;
                if cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
                    return Err(format!("{} CPUID entries", cpuid.len()));
                }
                self.cpuid = Some(cpuid)
            }
            TAG_TSC_KHZ => self.tsc_khz = Some(exact(bytes)?),
            other => return Err(format!("unknown tag {other}")),
        }
        Ok(())
    }

    fn finish(self) -> Result<VcpuState, &'static str> {
        Ok(VcpuState {
            regs: self.regs.ok_or("registers")?,
            sregs: self.sregs.ok_or("system registers")?,
            xsave: self.xsave.ok_or("XSAVE area")?,
            xcrs: self.xcrs.ok_or("XCRs")?,
            events: self.events.ok_or("pending events")?,
            mp_state: self.mp_state.ok_or("MP state")?,
            debugregs: self.debugregs.ok_or("debug registers")?,
            msrs: self.msrs.ok_or("MSRs")?,
            cpuid: self.cpuid.ok_or("CPUID")?,
            tsc_khz: self.tsc_khz,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(vcpus: usize) -> VmState {
        let vcpu = |i: u64| VcpuState {
            regs: kvm_regs {
                rip: 0x100000 + i,
                rax: 42,
                ..Default::default()
            },
            sregs: kvm_sregs {
                cr3: 0x3000,
                ..Default::default()
            },
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                reserved: 0,
                data: 12345,
            }],
            cpuid: vec![kvm_cpuid_entry2::default(); 3],
            tsc_khz: Some(2_000_000),
        };
        VmState {
            meta: Meta {
                vmm: "test".into(),
                vm_id: "vm".into(),
                vcpus,
                ram_size: 64 << 20,
                halted: vec![false; vcpus],
                accounting: AccountingSnapshot {
                    heartbeats: vec![7; vcpus],
                    progress: vec![1; vcpus],
                    status_words: vec![2; vcpus],
                    failures: 1,
                    failed_pages: vec![99],
                },
            },
            vcpus: (0..vcpus as u64).map(vcpu).collect(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample(3);
        let d = VmState::decode(&s.encode()).unwrap();
        assert_eq!(d.meta, s.meta);
        assert_eq!(d.vcpus.len(), 3);
        assert_eq!(d.vcpus[2].regs.rip, 0x100002);
        assert_eq!(d.vcpus[0].msrs[0].data, 12345);
        assert_eq!(d.vcpus[1].cpuid.len(), 3);
        assert_eq!(d.vcpus[1].tsc_khz, Some(2_000_000));
    }

    #[test]
    fn rejects_damage() {
        let blob = sample(2).encode();
        assert!(matches!(
            VmState::decode(b"nope"),
            Err(StateError::BadMagic)
        ));
        let mut v = blob.clone();
        v[8] = 9;
        assert!(matches!(VmState::decode(&v), Err(StateError::Version(9))));
        for cut in [17, 40, blob.len() / 2, blob.len() - 1] {
            assert!(VmState::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut v = blob.clone();
        v.push(0);
        assert!(VmState::decode(&v).is_err());
    }

    /// Found by the `state_blobs` fuzz target: a metadata section naming 2^60 vCPUs made
    /// the decoder size a vector by it (capacity overflow, a panic in the target VMM).
    #[test]
    fn a_vcpu_count_beyond_the_maximum_is_refused_before_anything_is_allocated() {
        for vcpus in [0, MAX_VCPUS + 1, 1 << 60] {
            let mut s = sample(1);
            s.meta.vcpus = vcpus;
            let blob = s.encode();
            match VmState::decode(&blob) {
                Err(StateError::Malformed(why)) => assert!(why.contains("vCPUs"), "{why}"),
                Err(other) => panic!("{vcpus} vCPUs: {other}"),
                Ok(_) => panic!("{vcpus} vCPUs accepted"),
            }
        }
        // The limit itself is a VM this VMM can run, so its state must still decode.
        let full = VmState::decode(&sample(MAX_VCPUS).encode()).expect("MAX_VCPUS decodes");
        assert_eq!(full.vcpus.len(), MAX_VCPUS);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut blob = MAGIC.to_vec();
            blob.extend_from_slice(&VERSION.to_le_bytes());
            blob.extend_from_slice(&bytes);
            let _ = VmState::decode(&blob);
        }

        #[test]
        fn flipped_bytes_never_panic(pos in 0usize..4000, val in any::<u8>()) {
            let mut blob = sample(1).encode();
            let p = pos % blob.len();
            blob[p] = val;
            let _ = VmState::decode(&blob);
        }
    }
}
