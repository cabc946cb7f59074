//! Identity mapping of all RAM, user-accessible (the kernel runs in ring 3).
//!
//! The first GiB is mapped by static tables (`entry.rs`). [`map_ram`] maps the
//! rest with 2 MiB pages, writing spare page directories from `.noinit` and
//! linking them into the PDPT. It runs in ring 3, natively: only the PDPT
//! writes trap (the PDPT is a live page table that the hypervisor shadows).
//! Entries go from not-present to present, so no TLB flush is needed.

use super::entry::PDPT;

/// Highest guest-physical address (exclusive) the kernel can map: 64 GiB.
pub const MAX_PHYS: u64 = 64 << 30;
const GIB: u64 = 1 << 30;
const SPARE_PDS: usize = (MAX_PHYS / GIB) as usize - 1;

#[repr(C, align(4096))]
struct PageDirectories([[u64; 512]; SPARE_PDS]);

#[link_section = ".noinit.pagetables"]
static mut SPARE: PageDirectories = PageDirectories([[0; 512]; SPARE_PDS]);

/// Maps `[1 GiB, end)` (rounded up to a GiB); returns the end actually
/// mapped, which is below `end` only if `end` exceeds [`MAX_PHYS`].
pub fn map_ram(end: u64) -> u64 {
    let end = end.min(MAX_PHYS);
    let gibs = end.div_ceil(GIB) as usize;
    let pdpt = (&raw const PDPT) as *mut u64;
    for g in 1..gibs {
        // SAFETY: g - 1 < SPARE_PDS because end <= MAX_PHYS; the spare tables
        // are used only here, once, on the boot CPU.
        let pd = unsafe { (&raw mut SPARE.0[g - 1]) as *mut u64 };
        for i in 0..512u64 {
            let phys = g as u64 * GIB + (i << 21);
            // SAFETY: `i` < 512, inside this page directory.
            unsafe { pd.add(i as usize).write_volatile(phys | 0x87) };
        }
        // SAFETY: `g` < 64 < 512; the PDPT is the kernel's own page table,
        // mapped writable; the entry was not present before.
        unsafe { pdpt.add(g).write_volatile(pd as u64 | 0x7) };
    }
    (gibs as u64 * GIB).min(end.max(GIB))
}
