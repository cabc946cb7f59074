//! How much of guest RAM the host backs, measured with `mincore()`.
//!
//! `mincore()` reports pages mapped in the VMM's page tables, which includes
//! pages the VMM itself only read (mapped to the shared zero page), so the
//! VMM never reads guest memory the guest has not written (the stats block
//! and the mailbox are written by the guest before it announces them).

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Host page size assumed by residency measurements.
const HOST_PAGE: u64 = 4096;

/// Bytes of `[gpa, gpa + len)` that are resident in host memory; parts
/// outside guest RAM count as not resident.
pub fn resident_bytes(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> u64 {
    let start = gpa.0 & !(HOST_PAGE - 1);
    let Some(end) = gpa.0.checked_add(len) else { return 0 };
    let mut total = 0;
    for region in mem.iter() {
        let r_start = region.start_addr().0;
        let r_end = r_start + region.len();
        let lo = start.max(r_start);
        let hi = end.min(r_end);
        if lo >= hi {
            continue;
        }
        // Whole pages: an end already on a page boundary stays there (it
        // used to be rounded one page further, counting the next page).
        let hi = hi.next_multiple_of(HOST_PAGE).min(r_end);
        total += region_resident(region.as_ptr(), lo - r_start, hi - lo);
    }
    total
}

/// Bytes of all guest RAM resident in host memory.
pub fn ram_resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| region_resident(r.as_ptr(), 0, r.len())).sum()
}

fn region_resident(base: *mut u8, offset: u64, len: u64) -> u64 {
    // One byte per page: 4 KiB of vector covers 16 MiB a call (128 calls
    // for 2 GiB, mostly unpopulated and cheap), and stays within pages the
    // heap already has.
    const BATCH_PAGES: u64 = 4 * 1024;
    let mut vec = vec![0u8; BATCH_PAGES as usize];
    let mut resident = 0;
    let mut off = offset & !(HOST_PAGE - 1);
    let end = offset + len;
    while off < end {
        let chunk = (end - off).min(BATCH_PAGES * HOST_PAGE);
        let pages = chunk.div_ceil(HOST_PAGE);
        // SAFETY: `[base + off, base + off + chunk)` lies inside one live
        // mapping (callers clamp to the region); `vec` has room for one byte
        // per page of it. mincore only reads page-table state.
        let rc = unsafe { libc::mincore(base.add(off as usize).cast(), chunk as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            resident += vec[..pages as usize].iter().filter(|b| *b & 1 == 1).count() as u64 * HOST_PAGE;
        }
        off += chunk;
    }
    resident
}

#[cfg(test)]
mod tests {
    use super::super::ram::create_ram;
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn fresh_ram_is_not_resident_and_writes_make_it_resident_page_by_page() {
        let mem = create_ram(&[(GuestAddress(0), 64 << 20)], false).unwrap();
        assert_eq!(ram_resident_bytes(&mem), 0);
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(ram_resident_bytes(&mem), 2 * HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0), 0x2000), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0x1fff), 2), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0x2000), 0x10_0000), 0);
        // A range that ends on a page boundary ends there: the written page
        // right after it is not counted.
        assert_eq!(resident_bytes(&mem, GuestAddress(0x20_0000), 0x10_0000), 0);
        assert_eq!(resident_bytes(&mem, GuestAddress(0x20_0000), 0x10_0001), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0x1000), 0x1000), HOST_PAGE);
        // A host-side read of never-written memory maps the shared zero page,
        // which mincore() counts: the VMM must read only what the guest wrote.
        let _: u64 = mem.read_obj(GuestAddress(0x50_0000)).unwrap();
        assert_eq!(ram_resident_bytes(&mem), 3 * HOST_PAGE);
    }

    #[test]
    fn ranges_outside_ram_count_nothing_and_never_fault() {
        let mem = create_ram(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)], false).unwrap();
        mem.write_obj(1u8, GuestAddress(4 << 20)).unwrap();
        assert_eq!(resident_bytes(&mem, GuestAddress(0), 8 << 20), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(2 << 20), 1 << 20), 0);
        assert_eq!(resident_bytes(&mem, GuestAddress(u64::MAX - 10), 100), 0);
    }
}
