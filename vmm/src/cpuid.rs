//! The CPUID each vCPU sees: what KVM supports, with the per-vCPU topology fields (APIC IDs)
//! filled in. Fresh VMs only; an incoming VM takes its CPUID from the state blob so the guest
//! sees no change across a hand-over.

use kvm_bindings::CpuId;

/// Leaf 1 EBX[31:24] is the initial APIC ID; leaves 0xB and 0x1F report the x2APIC ID in EDX.
pub fn for_vcpu(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00FF_FFFF) | (index << 24),
            0xB | 0x1F => entry.edx = index,
            _ => {}
        }
    }
    cpuid
}
