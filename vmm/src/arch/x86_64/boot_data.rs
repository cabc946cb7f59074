//! Writes everything the guest finds in memory at its first instruction:
//! the boot GDT and IDT, the page tables, the command line and `boot_params`.

use super::boot_params::build_boot_params;
use super::gdt::BOOT_GDT;
use super::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, GDT_START, GIB, IDT_START, ZERO_PAGE_START};
use super::paging::identity_page_tables;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why the guest's boot data could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchSetupError {
    #[error("cannot write {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write boot_params")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("kernel command line is too long ({len} bytes; at most {max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
}

/// Writes the boot GDT, IDT, page tables, command line and `boot_params`.
/// With `first_gib_only` the page tables map only the first GiB, as
/// Firecracker's do.
pub fn write_boot_data(mem: &GuestMemoryMmap, cmdline: &str, first_gib_only: bool) -> Result<(), ArchSetupError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(ArchSetupError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
    }
    if cmdline.contains('\0') {
        return Err(ArchSetupError::CmdlineNul);
    }
    let gm = |what| move |source| ArchSetupError::GuestMemory { what, source };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8)).map_err(gm("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START)).map_err(gm("the IDT"))?;
    let mut top = mem.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0);
    if first_gib_only {
        top = top.min(GIB);
    }
    for (addr, table) in identity_page_tables(top) {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(gm("page tables"))?;
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START)).map_err(gm("the command line"))?;

    let params = build_boot_params(mem, cmdline.len());
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(ArchSetupError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::super::layout::EBDA_START;
    use super::*;

    #[test]
    fn boot_params_carry_the_e820_map_and_command_line() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_boot_data(&mem, "workload=exit cpl=3", false).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.boot_flag }, 0xaa55);
        assert_eq!({ params.hdr.header }, 0x5372_6448);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!(params.e820_entries, 2);
        let e0 = params.e820_table[0];
        assert_eq!(({ e0.addr }, { e0.size }, { e0.r#type }), (0, EBDA_START, 1));
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmd, b"workload=exit cpl=3\0");
    }

    #[test]
    fn overlong_or_nul_command_lines_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(write_boot_data(&mem, &long, false), Err(ArchSetupError::CmdlineTooLong { .. })));
        assert!(matches!(write_boot_data(&mem, "a\0b", false), Err(ArchSetupError::CmdlineNul)));
    }
}
