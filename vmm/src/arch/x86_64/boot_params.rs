//! `boot_params` (the zero page): the setup header a 64-bit entry needs and
//! the e820 memory map.

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The e820 map: low RAM below the EBDA, then RAM from 1 MiB up.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    let mut map = vec![boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM }];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(boot_e820_entry { addr: start, size: end - start, r#type: E820_RAM });
        }
    }
    map
}

/// Fills `boot_params`: the setup header a 64-bit entry needs, and the e820 map.
pub fn build_boot_params(mem: &GuestMemoryMmap, cmdline_len: usize) -> boot_params {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    let map = e820_map(mem);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn the_e820_map_skips_the_ebda_and_covers_ram_from_1_mib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let p = build_boot_params(&mem, 10);
        assert_eq!(p.e820_entries, 2);
        let e1 = p.e820_table[1];
        assert_eq!(({ e1.addr }, { e1.size }), (HIMEM_START, (64 << 20) - HIMEM_START));
        assert_eq!({ p.hdr.cmdline_size }, 10);
        // The boot_params layout is Linux's: e820_table at 0x2d0, count at 0x1e8.
        assert_eq!(core::mem::offset_of!(boot_params, e820_table), 0x2d0);
        assert_eq!(core::mem::offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(core::mem::size_of::<boot_params>(), 4096);
    }
}
