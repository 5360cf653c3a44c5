//! Fuzz target `state_blobs`: the VM state blob decoder (`faultline_vmm::state::VmState::
//! decode`). The blob is saved by the source VMM, crosses the network inside the switch-over
//! message, and is decoded by the target VMM, so it is peer-provided bytes.
//!
//! Two shapes of input: raw bytes, and a blob assembled from fuzzer-chosen sections (magic,
//! version and section count as given, lengths consistent or not, KVM structures of their
//! exact size or not, metadata JSON built from fuzzer-chosen values), which reaches the
//! per-vCPU decoding that raw bytes rarely would.
//!
//! Invariants, beyond "never panics" (and never allocating without bound):
//! - a decoded state has as many vCPUs as its metadata says, at most the VMM's maximum;
//! - re-encoding is a fixed point: `encode(decode(encode(s))) == encode(s)`, with the same
//!   metadata.

#![no_main]

use arbitrary::Arbitrary;
use faultline_vmm::accounting::AccountingSnapshot;
use faultline_vmm::state::{MAGIC, MAX_VCPUS, Meta, VERSION, VmState};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Body {
    /// The exact size of the structure the tag names, filled with one byte.
    Exact(u8),
    /// `n` entries of the tag's array type (MSRs, CPUID), filled with one byte.
    Entries(u8, u8),
    Bytes(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Section {
    /// Mostly the defined tags (1 to 11); others are to be refused.
    tag: u8,
    vcpu: u16,
    body: Body,
}

#[derive(Arbitrary, Debug)]
struct MetaIn {
    vmm: String,
    vm_id: String,
    vcpus: u64,
    halted: Vec<bool>,
    heartbeats: Vec<u64>,
    failures: u64,
    failed_pages: Vec<u64>,
    /// Extra vCPUs' worth of `halted` and `heartbeats`, so the counts can agree with a large
    /// `vcpus` without the input spelling every entry; taken modulo `MAX_VCPUS + 2` (counts
    /// just past the limit are worth trying, tens of thousands only made each run slow).
    pad: u16,
}

#[derive(Arbitrary, Debug)]
enum Case {
    Raw(Vec<u8>),
    Built {
        version_ok: bool,
        /// Added to the true section count.
        count_delta: i8,
        meta: Option<MetaIn>,
        sections: Vec<Section>,
        trailing: Vec<u8>,
    },
}

fn size_of_tag(tag: u16) -> usize {
    use std::mem::size_of;
    match tag {
        2 => size_of::<kvm_regs>(),
        3 => size_of::<kvm_sregs>(),
        4 => size_of::<kvm_xsave>(),
        5 => size_of::<kvm_xcrs>(),
        6 => size_of::<kvm_vcpu_events>(),
        7 => size_of::<kvm_mp_state>(),
        8 => size_of::<kvm_debugregs>(),
        9 => size_of::<kvm_msr_entry>(),
        10 => size_of::<kvm_cpuid_entry2>(),
        11 => 4,
        _ => 0,
    }
}

fn meta_json(m: &MetaIn) -> Vec<u8> {
    let pad = usize::from(m.pad) % (MAX_VCPUS + 2);
    let mut halted = m.halted.clone();
    halted.resize(halted.len() + pad, false);
    let mut heartbeats = m.heartbeats.clone();
    heartbeats.resize(heartbeats.len() + pad, 0);
    let meta = Meta {
        vmm: m.vmm.clone(),
        vm_id: m.vm_id.clone(),
        vcpus: m.vcpus as usize,
        ram_size: 64 << 20,
        halted,
        accounting: AccountingSnapshot {
            heartbeats,
            progress: Vec::new(),
            status_words: Vec::new(),
            failures: m.failures,
            failed_pages: m.failed_pages.clone(),
        },
    };
    serde_json::to_vec(&meta).expect("metadata serializes")
}

fn build(
    version_ok: bool,
    count_delta: i8,
    meta: Option<&MetaIn>,
    sections: &[Section],
    trailing: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    let mut count = 0u32;
    let mut push = |tag: u16, vcpu: u16, bytes: &[u8]| {
        body.extend_from_slice(&tag.to_le_bytes());
        body.extend_from_slice(&vcpu.to_le_bytes());
        body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(bytes);
        count += 1;
    };
    if let Some(m) = meta {
        push(1, 0, &meta_json(m));
    }
    for s in sections {
        let tag = u16::from(s.tag % 16);
        let bytes = match &s.body {
            Body::Exact(fill) => vec![*fill; size_of_tag(tag)],
            Body::Entries(n, fill) => vec![*fill; size_of_tag(tag) * usize::from(*n)],
            Body::Bytes(b) => b.clone(),
        };
        push(tag, s.vcpu, &bytes);
    }
    let mut blob = MAGIC.to_vec();
    let version = if version_ok { VERSION } else { VERSION + 1 };
    blob.extend_from_slice(&version.to_le_bytes());
    blob.extend_from_slice(
        &count
            .wrapping_add_signed(i32::from(count_delta))
            .to_le_bytes(),
    );
    blob.extend_from_slice(&body);
    blob.extend_from_slice(trailing);
    blob
}

fuzz_target!(|case: Case| {
    let blob = match &case {
        Case::Raw(b) => b.clone(),
        Case::Built {
            version_ok,
            count_delta,
            meta,
            sections,
            trailing,
        } => build(*version_ok, *count_delta, meta.as_ref(), sections, trailing),
    };
    if let Ok(state) = VmState::decode(&blob) {
        assert_eq!(state.vcpus.len(), state.meta.vcpus);
        assert!((1..=MAX_VCPUS).contains(&state.meta.vcpus));
        let once = state.encode();
        let again = VmState::decode(&once).expect("an encoded state decodes");
        assert_eq!(again.meta, state.meta);
        assert_eq!(again.encode(), once, "re-encoding is a fixed point");
    }
});
