//! The guest-physical memory layout at entry, and how RAM is split around
//! the MMIO gap.
//!
//! Low memory, as the guest sees it at entry:
//!
//! | address | what |
//! | --- | --- |
//! | `0x500` | GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18) |
//! | `0x520` | IDT (empty) |
//! | `0x7000` | `boot_params` (the zero page); `RSI` points here |
//! | `0x8ff0` | initial stack pointer |
//! | `0x9000` | PML4, then the PDPT at `0xa000` |
//! | `0x20000` | kernel command line (NUL-terminated, at most 4 KiB) |
//! | `0x21000` | `setup_data` entries (the guest's `guest_abi::BootOnline`) |
//! | `0x30000` | page directories, one per GiB of address space (2 MiB pages) |
//! | `0x9fc00` | end of low RAM (EBDA) |
//! | `0x100000` | the kernel's ELF segments (1 MiB, `HIMEM_START`) |
//!
//! RAM above 3 GiB starts at 4 GiB (the gap is left for MMIO, as on PCs).

use vm_memory::GuestAddress;

/// The boot GDT.
pub const GDT_START: u64 = 0x500;
/// The boot IDT.
pub const IDT_START: u64 = 0x520;
/// `boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial `RSP`.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line, NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// `setup_data` entries, linked from `boot_params.hdr.setup_data`.
pub const SETUP_DATA_START: u64 = 0x21000;
/// Room for them.
pub const SETUP_DATA_MAX_SIZE: u64 = 0x1000;
/// Page directories, one per GiB.
pub const PD_START: u64 = 0x30000;
/// End of usable low memory.
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 3 << 30;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 4 << 30;
/// Highest guest-physical address the boot page tables (and the guest
/// kernel) map: 64 GiB.
pub const MAX_PHYS: u64 = 64 << 30;
/// Most RAM a guest can have: everything below `MAX_PHYS` but the gap.
pub const MAX_RAM: u64 = MAX_PHYS - (MMIO_GAP_END - MMIO_GAP_START);

/// One GiB.
pub const GIB: u64 = 1 << 30;

// Page tables stay below the kernel and above the command line.
const _: () = assert!(PD_START + (MAX_PHYS / GIB) * 4096 <= EBDA_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= SETUP_DATA_START);
const _: () = assert!(SETUP_DATA_START + SETUP_DATA_MAX_SIZE <= PD_START);
// The guest reads `setup_data` only below this limit.
const _: () = assert!(SETUP_DATA_START + SETUP_DATA_MAX_SIZE <= guest_abi::SETUP_DATA_LIMIT);

/// The guest RAM ranges for `mem_bytes` of memory: up to 3 GiB at 0, the rest at 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(2 << 30), vec![(GuestAddress(0), 2 << 30)]);
        assert_eq!(ram_ranges(5 << 30), vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]);
    }
}
