//! The host's view of a VM's memory: the VMM process's own footprint from
//! `/proc/self/smaps` (guest RAM excluded), the part of guest RAM that is
//! still the page cache's (from the same pass), and KVM's per-memslot
//! metadata estimated from the registered bytes.

use guest_abi::PAGE_SIZE;
use std::io::BufRead;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// What one pass over `/proc/self/smaps` finds, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmapsSums {
    /// RSS of every mapping outside the skipped (guest RAM) ranges.
    pub rss: u64,
    /// PSS of the same mappings.
    pub pss: u64,
    /// Resident pages of the skipped mappings that are not anonymous: guest
    /// RAM still mapped from the page cache (the built-in kernel's pages
    /// that the guest has not written, see `crate::loader`), which every VM
    /// on the host shares.
    pub skipped_file: u64,
}

/// The VMM process's own memory, from `/proc/self/smaps`: RSS and PSS in
/// bytes, excluding the mappings that back guest RAM, and how much of guest
/// RAM is page cache. The heap is trimmed first ([`crate::heap::trim`]), so
/// the figure is what the VMM holds, not what its allocator kept from earlier
/// requests; the file is read a line at a time rather than whole (it is tens
/// of KiB).
pub fn vmm_own_memory(mem: &GuestMemoryMmap) -> Option<SmapsSums> {
    let guest: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.as_ptr() as u64 + r.len())).collect();
    own_memory(&guest)
}

/// The sums of the whole process with the mappings inside `skip` set apart,
/// as [`vmm_own_memory`] measures them.
pub fn own_memory(skip: &[(u64, u64)]) -> Option<SmapsSums> {
    crate::heap::trim();
    let smaps = std::fs::File::open("/proc/self/smaps").ok()?;
    sum_smaps(std::io::BufReader::with_capacity(SMAPS_BUFFER_BYTES, smaps), skip).ok()
}

/// The read buffer for `/proc/self/smaps`.
const SMAPS_BUFFER_BYTES: usize = 4096;

/// Sums `Rss:` and `Pss:` of every mapping in an smaps text except those
/// inside one of `skip` (host address ranges), and `Rss:` less `Anonymous:`
/// of those inside.
pub fn sum_smaps(mut smaps: impl BufRead, skip: &[(u64, u64)]) -> std::io::Result<SmapsSums> {
    let mut sums = SmapsSums::default();
    let mut skipping = false;
    let mut line = String::new();
    loop {
        line.clear();
        if smaps.read_line(&mut line)? == 0 {
            return Ok(sums);
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                skipping = skip.iter().any(|&(s, e)| start >= s && end <= e);
                continue;
            }
        }
        let kib = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        match (skipping, line.split_once(':').map(|(k, _)| k)) {
            // A mapping's `Anonymous:` follows its `Rss:` and is at most it.
            (true, Some("Rss")) => sums.skipped_file += kib(&line),
            (true, Some("Anonymous")) => sums.skipped_file = sums.skipped_file.saturating_sub(kib(&line)),
            (false, Some("Rss")) => sums.rss += kib(&line),
            (false, Some("Pss")) => sums.pss += kib(&line),
            _ => {}
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
7f00-7f40 rw-p 00000000 00:00 0
Rss:                4096 kB
Pss:                4096 kB
Anonymous:          4096 kB
7f40-7f50 rw-p 0005f000 08:01 1 /usr/bin/vmm
Rss:                  96 kB
Pss:                  30 kB
Anonymous:            16 kB
7f50-7f80 rw-p 00000000 00:00 0
Rss:                  12 kB
Pss:                  12 kB
Anonymous:            12 kB
7f80-7f90 rw-p 00000000 00:00 0
Rss:                   8 kB
Pss:                   8 kB
Anonymous:             8 kB
";
        let sums = |rss: u64, pss: u64, file: u64| SmapsSums { rss: rss * 1024, pss: pss * 1024, skipped_file: file * 1024 };
        // Guest RAM (0x7f00-0x7f80) is three mappings: anonymous memory and
        // 96 KiB mapped from a file, 16 KiB of which the guest wrote.
        assert_eq!(sum_smaps(smaps.as_bytes(), &[(0x7f00, 0x7f80)]).unwrap(), sums(108, 58, 80));
        assert_eq!(sum_smaps(smaps.as_bytes(), &[]).unwrap(), sums(4312, 4196, 0));
    }

    #[test]
    fn kvm_estimate_is_about_2_mib_per_gib() {
        assert_eq!(kvm_memslot_estimate(1 << 30), (2 << 20) + 4096);
    }
}
