//! The host's view of a VM's memory: the VMM process's own footprint from
//! `/proc/self/smaps` (guest RAM excluded), and KVM's per-memslot metadata
//! estimated from the registered bytes.

use guest_abi::PAGE_SIZE;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The VMM process's own memory, from `/proc/self/smaps`: RSS and PSS in
/// bytes, excluding the mappings that back guest RAM.
pub fn vmm_own_memory(mem: &GuestMemoryMmap) -> Option<(u64, u64)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let guest: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len())).collect();
    Some(sum_smaps(&smaps, &guest))
}

/// Sums `Rss:` and `Pss:` of every mapping in an smaps text except those
/// inside one of `skip` (host address ranges).
pub fn sum_smaps(smaps: &str, skip: &[(u64, u64)]) -> (u64, u64) {
    let (mut rss, mut pss) = (0u64, 0u64);
    let mut skipping = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                skipping = skip.iter().any(|&(s, e)| start >= s && end <= e);
                continue;
            }
        }
        if skipping {
            continue;
        }
        let kib = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        if line.starts_with("Rss:") {
            rss += kib(line);
        } else if line.starts_with("Pss:") {
            pss += kib(line);
        }
    }
    (rss, pss)
}

/// KVM's per-memslot metadata for `registered` bytes of guest RAM, estimated:
/// the reverse map (8 bytes per 4 KiB page) plus large-page tracking (8 bytes
/// per 2 MiB page), which KVM allocates when a memslot is registered.
pub fn kvm_memslot_estimate(registered: u64) -> u64 {
    registered / PAGE_SIZE * 8 + registered / (2 << 20) * 8
}

/// Note that travels with [`kvm_memslot_estimate`] in reports.
pub const KVM_ESTIMATE_NOTE: &str = "estimate from registered memory: KVM's reverse map (8 bytes per 4 KiB page) and \
large-page tracking (8 bytes per 2 MiB page); excludes per-VM and per-vCPU structures and shadow page tables \
(measure those with MemAvailable, as `vmm density` does)";


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_sums_skip_guest_ram() {
        let smaps = "\
55d0-55e0 r-xp 00000000 08:01 1 /usr/bin/vmm
Rss:                 100 kB
Pss:                  50 kB
7f00-7f80 rw-p 00000000 00:00 0
Rss:                4096 kB
Pss:                4096 kB
7f80-7f90 rw-p 00000000 00:00 0
Rss:                   8 kB
Pss:                   8 kB
";
        assert_eq!(sum_smaps(smaps, &[(0x7f00, 0x7f80)]), (108 * 1024, 58 * 1024));
        assert_eq!(sum_smaps(smaps, &[]), (4204 * 1024, 4154 * 1024));
    }

    #[test]
    fn kvm_estimate_is_about_2_mib_per_gib() {
        assert_eq!(kvm_memslot_estimate(1 << 30), (2 << 20) + 4096);
    }
}
