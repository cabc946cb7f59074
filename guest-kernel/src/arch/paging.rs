//! Identity mapping of all RAM, user-accessible (the kernel runs in ring 3).
//!
//! The first two GiB are mapped by static tables (`entry.rs`, whose PDPT
//! links the second GiB's page directory `PD1`, filled at build time, in
//! `.data`). [`map_ram`] maps the rest with 2 MiB pages, by writing spare page
//! directories from `.noinit`, and links them into the PDPT. It runs in ring
//! 3, natively: only the PDPT writes trap (the PDPT is a live page table that
//! the hypervisor shadows). A guest of at most 2 GiB writes no page table.
//! Entries go from not-present to present, so no TLB flush is needed.

use super::entry::PDPT;
use core::cell::UnsafeCell;

/// Highest guest-physical address (exclusive) the kernel can map: 64 GiB.
pub const MAX_PHYS: u64 = 64 << 30;
const GIB: u64 = 1 << 30;
/// Page directories written at boot: one per GiB above the second.
const SPARE_PDS: usize = (MAX_PHYS / GIB) as usize - 2;
/// A 2 MiB page entry: present, writable, user, large page.
const PD_ENTRY: u64 = 0x87;
/// Accessed and dirty, set ahead in [`PD1`] (the kernel never reads them).
const ACCESSED_DIRTY: u64 = 0x60;

#[repr(C, align(4096))]
struct PageDirectories([[u64; 512]; SPARE_PDS]);

#[repr(C, align(4096))]
struct PageDirectory(UnsafeCell<[u64; 512]>);
// SAFETY: nothing in the kernel writes the table; only the CPU reads it
// (its accessed and dirty bits are set already, so no page walk writes it).
unsafe impl Sync for PageDirectory {}

/// The second GiB's page directory, filled at build time: a guest with more
/// than 1 GiB of RAM links it as it is, so no guest writes it and every VM
/// reads the one page-cache page the loader maps from the kernel image
/// (a spare directory written at boot costs each VM a page of host memory).
/// Its accessed and dirty bits are set so that a shadow-paging hypervisor,
/// which sets them on a page walk, has no reason to write (and so copy) it.
/// `entry.rs`'s PDPT links it by name.
#[export_name = "PD1"]
static PD1: PageDirectory = PageDirectory(UnsafeCell::new(gib_entries(1, ACCESSED_DIRTY)));

/// The 512 entries that identity-map GiB `g` with 2 MiB pages.
const fn gib_entries(g: u64, extra: u64) -> [u64; 512] {
    let mut e = [0; 512];
    let mut i = 0;
    while i < 512 {
        e[i] = (g * GIB + ((i as u64) << 21)) | PD_ENTRY | extra;
        i += 1;
    }
    e
}

#[link_section = ".noinit.pagetables"]
static mut SPARE: PageDirectories = PageDirectories([[0; 512]; SPARE_PDS]);

/// Maps `[1 GiB, end)` (rounded up to a GiB); returns the end actually
/// mapped, which is below `end` only if `end` exceeds [`MAX_PHYS`].
pub fn map_ram(end: u64) -> u64 {
    let end = end.min(MAX_PHYS);
    let gibs = end.div_ceil(GIB) as usize;
    let pdpt = (&raw const PDPT) as *mut u64;
    // GiB 1 is linked statically (`entry.rs`): writing its entry again, even
    // with the same value, would make the PDPT a private page.
    for g in 2..gibs {
        // SAFETY: g - 2 < SPARE_PDS because end <= MAX_PHYS; the spare
        // tables are used only here, once, on the boot CPU.
        let pd = unsafe { (&raw mut SPARE.0[g - 2]) as *mut u64 };
        for i in 0..512u64 {
            let phys = g as u64 * GIB + (i << 21);
            // SAFETY: `i` < 512, inside this page directory.
            unsafe { pd.add(i as usize).write_volatile(phys | PD_ENTRY) };
        }
        // SAFETY: `g` < 64 < 512; the PDPT is the kernel's own page table,
        // mapped writable; the entry was not present before.
        unsafe { pdpt.add(g).write_volatile(pd as u64 | 0x7) };
    }
    (gibs as u64 * GIB).min(end.max(GIB))
}
