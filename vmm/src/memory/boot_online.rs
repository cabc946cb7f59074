//! What an `ondemand` guest onlines while it boots, so that the VMM can
//! register it before the vCPU first runs ([`boot_chunk_ranges`]).
//!
//! Registering a memslot once a vCPU has entered the guest waits for KVM's
//! SRCU grace period (`synchronize_srcu`), which takes milliseconds on a
//! loaded host; before the first entry there is no reader to wait for. The
//! guest's first allocation at boot initializes one chunk (the first one
//! with free memory) and writes that chunk's struct pages, so it onlines
//! the run holding the chunk and the run holding its memmap. Both follow
//! from the guest kernel's memmap layout (`guest-kernel/src/mm/memmap.rs`,
//! one array of every section's struct pages, placed right after the
//! kernel), which this module mirrors for the default layout only. It is a
//! prediction, not part of the contract: the VMM may register more than
//! the guest onlines (`guest_abi::MEMORY_BLOCK_SIZE`), and the guest still
//! writes `MEM_ONLINE` for the chunk, which then finds it registered. A
//! wrong prediction costs the guest one memslot change at boot, as before,
//! and KVM the metadata of one run the guest may not use.

use guest_abi::{PAGE_SIZE, SECTION_SIZE, STRUCT_PAGE_SIZE};

/// The guest-physical ranges (start, end) an `ondemand` guest with
/// `chunk`-byte chunks and its memmap in one array writes while it boots:
/// its first chunk with free memory, and that chunk's struct pages. `ram`
/// is the guest's RAM (start, length); `kernel_end` the end of the
/// kernel's segments. `None` if the memmap would not fit right after the
/// kernel (the guest then places it elsewhere).
pub fn boot_chunk_ranges(ram: &[(u64, u64)], kernel_end: u64, chunk: u64) -> Option<[(u64, u64); 2]> {
    if !chunk.is_power_of_two() || !(PAGE_SIZE..=SECTION_SIZE).contains(&chunk) {
        return None;
    }
    let ram_end = ram.iter().map(|(s, l)| s + l).max()?;
    let sections = ram_end.div_ceil(SECTION_SIZE);
    // Bytes of memmap per section: the section's span up to the end of its
    // last RAM chunk, 64 bytes per page, whole pages.
    let memmap_bytes = |sec: u64| -> u64 {
        let (lo, hi) = (sec * SECTION_SIZE, (sec + 1) * SECTION_SIZE);
        let span = ram
            .iter()
            .filter(|(s, l)| *s < hi && s + l > lo)
            .map(|(s, l)| ((s + l).min(hi) - lo).next_multiple_of(chunk))
            .max()
            .unwrap_or(0);
        (span / PAGE_SIZE * STRUCT_PAGE_SIZE).next_multiple_of(PAGE_SIZE)
    };
    let base = kernel_end.next_multiple_of(PAGE_SIZE);
    let total: u64 = (0..sections).map(memmap_bytes).sum();
    let first_free = base.checked_add(total)?;
    // The array must lie in the RAM range that holds the kernel.
    ram.iter().find(|(s, l)| *s <= base && first_free <= s + l)?;
    let first = first_free - first_free % chunk;
    let sec = first / SECTION_SIZE;
    let sec_memmap = base + (0..sec).map(memmap_bytes).sum::<u64>();
    let pages = sec_memmap + (first - sec * SECTION_SIZE) / PAGE_SIZE * STRUCT_PAGE_SIZE;
    Some([(first, first + chunk), (pages, pages + chunk / PAGE_SIZE * STRUCT_PAGE_SIZE)])
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_2_gib_guest_first_uses_the_chunk_after_its_memmap() {
        // 2 GiB: 16 sections of 2 MiB of memmap, after a kernel ending at
        // 5 MiB: the memmap ends at 37 MiB, in the chunk at 36 MiB, whose
        // struct pages are 18 chunks (576 KiB) into the array.
        let r = boot_chunk_ranges(&[(0, 2048 * MIB)], 5 * MIB, 2 * MIB).unwrap();
        assert_eq!(r, [(36 * MIB, 38 * MIB), (5 * MIB + 576 * 1024, 5 * MIB + 608 * 1024)]);
        // A chunk-aligned end: the chunk that starts there.
        let r = boot_chunk_ranges(&[(0, 2048 * MIB)], 4 * MIB, 2 * MIB).unwrap();
        assert_eq!(r[0], (36 * MIB, 38 * MIB));
    }

    #[test]
    fn sections_past_the_hole_count_and_bad_inputs_predict_nothing() {
        // 3.5 GiB: 24 sections below 3 GiB and 4 at 4 GiB, 2 MiB each.
        let ram = crate::arch::ram_ranges(3584 * MIB).iter().map(|(a, l)| (a.0, *l)).collect::<Vec<_>>();
        let r = boot_chunk_ranges(&ram, 5 * MIB, 2 * MIB).unwrap();
        assert_eq!(r[0].0, 60 * MIB);
        // A small guest: 128 MiB, 2 MiB of memmap; 128 KiB chunks.
        let r = boot_chunk_ranges(&[(0, 128 * MIB)], 5 * MIB, 128 << 10).unwrap();
        assert_eq!(r, [(7 * MIB, 7 * MIB + (128 << 10)), (5 * MIB + 112 * 1024, 5 * MIB + 114 * 1024)]);
        assert!(boot_chunk_ranges(&[(0, 16 * MIB)], 16 * MIB - 4096, 2 * MIB).is_none(), "no room after the kernel");
        assert!(boot_chunk_ranges(&[], 5 * MIB, 2 * MIB).is_none());
        assert!(boot_chunk_ranges(&[(0, 128 * MIB)], 5 * MIB, 3 * MIB).is_none());
    }
}
