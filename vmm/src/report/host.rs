//! The host's view of a VM's memory: the VMM process's own footprint from
//! `/proc/self/smaps` (guest RAM excluded), and KVM's per-memslot metadata
//! estimated from the registered bytes.

use guest_abi::PAGE_SIZE;
use std::io::BufRead;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The VMM process's own memory, from `/proc/self/smaps`: RSS and PSS in
/// bytes, excluding the mappings that back guest RAM. The heap is trimmed
/// first ([`crate::heap::trim`]), so the figure is what the VMM holds, not
/// what its allocator kept from earlier requests; the file is read a line at
/// a time rather than whole (it is tens of KiB).
pub fn vmm_own_memory(mem: &GuestMemoryMmap) -> Option<(u64, u64)> {
    let guest: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len())).collect();
    own_memory(&guest)
}

/// RSS and PSS of the whole process but the mappings inside `skip`, as
/// [`vmm_own_memory`] measures them.
pub fn own_memory(skip: &[(u64, u64)]) -> Option<(u64, u64)> {
    crate::heap::trim();
    let smaps = std::fs::File::open("/proc/self/smaps").ok()?;
    sum_smaps(std::io::BufReader::with_capacity(SMAPS_BUFFER_BYTES, smaps), skip).ok()
}

/// The read buffer for `/proc/self/smaps`.
const SMAPS_BUFFER_BYTES: usize = 4096;

/// Sums `Rss:` and `Pss:` of every mapping in an smaps text except those
/// inside one of `skip` (host address ranges).
pub fn sum_smaps(mut smaps: impl BufRead, skip: &[(u64, u64)]) -> std::io::Result<(u64, u64)> {
    let (mut rss, mut pss) = (0u64, 0u64);
    let mut skipping = false;
    let mut line = String::new();
    loop {
        line.clear();
        if smaps.read_line(&mut line)? == 0 {
            return Ok((rss, pss));
        }
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
            rss += kib(&line);
        } else if line.starts_with("Pss:") {
            pss += kib(&line);
        }
    }
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
        assert_eq!(sum_smaps(smaps.as_bytes(), &[(0x7f00, 0x7f80)]).unwrap(), (108 * 1024, 58 * 1024));
        assert_eq!(sum_smaps(smaps.as_bytes(), &[]).unwrap(), (4204 * 1024, 4154 * 1024));
    }

    #[test]
    fn kvm_estimate_is_about_2_mib_per_gib() {
        assert_eq!(kvm_memslot_estimate(1 << 30), (2 << 20) + 4096);
    }
}
