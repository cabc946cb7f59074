//! CPUID as the guest sees it: the host-supported leaves with each vCPU's
//! APIC ID, and a hypervisor leaf that reports the TSC frequency.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// First hypervisor CPUID leaf.
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// The leaf that reports the TSC frequency in kHz in EAX (the convention KVM
/// guests and VMware use).
const TSC_FREQ_LEAF: u32 = 0x4000_0010;

/// Adjusts the host-supported CPUID for vCPU `cpu`: its APIC ID, and the
/// TSC frequency leaf (so the guest can turn TSC cycles into time).
pub fn patch_cpuid(cpuid: &mut CpuId, cpu: u8, tsc_khz: Option<u32>) {
    let mut has_tsc_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(cpu) << 24),
            HYPERVISOR_LEAF if tsc_khz.is_some() => e.eax = e.eax.max(TSC_FREQ_LEAF),
            TSC_FREQ_LEAF => {
                has_tsc_leaf = true;
                e.eax = tsc_khz.unwrap_or(0);
            }
            _ => {}
        }
    }
    if let (false, Some(khz)) = (has_tsc_leaf, tsc_khz) {
        // A full table cannot take the leaf; the guest then measures no time.
        let _ = cpuid.push(kvm_cpuid_entry2 { function: TSC_FREQ_LEAF, eax: khz, ..Default::default() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_gets_apic_id_and_tsc_leaf() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_1234, ..Default::default() },
            kvm_cpuid_entry2 { function: HYPERVISOR_LEAF, eax: 0x4000_0001, ..Default::default() },
        ])
        .unwrap();
        patch_cpuid(&mut c, 3, Some(2_000_000));
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0300_1234);
        assert_eq!(e[1].eax, TSC_FREQ_LEAF);
        assert_eq!((e[2].function, e[2].eax), (TSC_FREQ_LEAF, 2_000_000));
    }
}
