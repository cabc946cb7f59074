//! Publishing the memory manager's figures into the VMM-facing stats block.
//! A leaf that the boot flow (`kernel`) and the application processors
//! (`smp`) both call, so neither imports the other for it.

use crate::arch::rdtsc;
use crate::{pv, MM};
use core::sync::atomic::{AtomicBool, Ordering};
use guest_kernel::mm::GROW_CHECK;

/// Set by `workload=corrupt-stats`: every publication writes garbage.
static CORRUPT: AtomicBool = AtomicBool::new(false);

/// Set when the boot CPU came in at the ring-3 entry (`_start_ring3`).
static RING3_ENTRY: AtomicBool = AtomicBool::new(false);

/// Records that the boot CPU entered at the ring-3 entry of the image's
/// note, so that every publication says so
/// (`guest_abi::stats_flags::RING3_ENTRY`).
pub fn entered_in_ring3() {
    RING3_ENTRY.store(true, Ordering::Relaxed);
}

/// The [`guest_abi::stats_flags`] bits of how the boot CPU entered.
pub fn entry_flags() -> u32 {
    if RING3_ENTRY.load(Ordering::Relaxed) {
        guest_abi::stats_flags::RING3_ENTRY
    } else {
        0
    }
}

/// Makes every later publication write garbage (`workload=corrupt-stats`).
pub fn corrupt() {
    CORRUPT.store(true, Ordering::Relaxed);
}

/// Copies the memory manager's figures into the stats block.
pub fn publish_memory_stats() {
    let st = MM.stats();
    let ranges = MM.memmap_ranges();
    let corrupt = CORRUPT.load(Ordering::Relaxed);
    let patched = GROW_CHECK.sites_patched();
    pv::publish_stats(|s| {
        st.write_to(s);
        ranges.write_to(s);
        s.reclaim_delay_ms = pv::reclaim_delay();
        if patched {
            s.flags |= guest_abi::stats_flags::JUMP_SITES_PATCHED;
        }
        s.flags |= entry_flags();
        if st.fully_initialized && s.tsc_fully_initialized == 0 {
            s.tsc_fully_initialized = rdtsc();
        }
        if corrupt {
            s.total_pages = 10;
            s.initialized_pages = 1 << 40;
            s.memmap_range_count = u32::MAX;
        }
    });
}
