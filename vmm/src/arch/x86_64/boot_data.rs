//! Writes everything the guest finds in memory at its first instruction:
//! the boot GDT and IDT, the page tables, the command line and `boot_params`,
//! and (once the builder has registered the boot memory) the
//! `guest_abi::BootOnline` `setup_data` entry.

use super::boot_params::build_boot_params;
use super::gdt::BOOT_GDT;
use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, GDT_START, GIB, IDT_START, SETUP_DATA_MAX_SIZE, SETUP_DATA_START, ZERO_PAGE_START,
};
use guest_abi::{BootOnline, GpaRange, SetupDataHeader, MEMORY_BLOCK_SIZE, SETUP_BOOT_ONLINE, SETUP_DATA_OFFSET};
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
    write_boot_info(mem, cmdline)?;
    write_entry_tables(mem, first_gib_only)
}

/// Writes what every guest reads, however it is entered: the command line
/// and `boot_params` (the first half of [`write_boot_data`]).
pub fn write_boot_info(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), ArchSetupError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(ArchSetupError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
    }
    if cmdline.contains('\0') {
        return Err(ArchSetupError::CmdlineNul);
    }
    let gm = |what| move |source| ArchSetupError::GuestMemory { what, source };
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

/// Writes the boot GDT, IDT and identity page tables that a vCPU entering
/// in ring 0 at the kernel's ELF entry runs on (the second half of
/// [`write_boot_data`]); application processors use the GDT. A single
/// vCPU started at the guest's ring-3 entry (`guest_abi::entry_note`) uses
/// the guest's own tables, so the builder leaves these five pages unwritten
/// then, and the host never backs them.
pub fn write_entry_tables(mem: &GuestMemoryMmap, first_gib_only: bool) -> Result<(), ArchSetupError> {
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
    Ok(())
}

/// Lists `registered` (guest-physical `[start, end)` ranges registered with
/// KVM before the first entry) for the guest in a `guest_abi::BootOnline`
/// `setup_data` entry at `SETUP_DATA_START`, pushed onto the front of
/// `boot_params.hdr.setup_data`'s list. Range ends are cut down to whole
/// `guest_abi::MEMORY_BLOCK_SIZE` blocks (the guest takes only whole blocks),
/// and only the first `guest_abi::MAX_BOOT_ONLINE_RANGES` are listed: what
/// the guest does not find there it onlines itself. Call after
/// [`write_boot_data`].
pub fn write_boot_online(mem: &GuestMemoryMmap, registered: &[(u64, u64)]) -> Result<(), ArchSetupError> {
    let gm = |source| ArchSetupError::GuestMemory { what: "the boot-online entry", source };
    let ranges: Vec<GpaRange> = registered
        .iter()
        .map(|&(s, e)| (s.next_multiple_of(MEMORY_BLOCK_SIZE), e - e % MEMORY_BLOCK_SIZE))
        .filter(|(s, e)| e > s)
        .map(|(s, e)| GpaRange { start: s, len: e - s })
        .collect();
    let record = BootOnline::new(&ranges);
    let head = GuestAddress(ZERO_PAGE_START + SETUP_DATA_OFFSET);
    let header = SetupDataHeader {
        next: mem.read_obj(head).map_err(gm)?,
        kind: SETUP_BOOT_ONLINE,
        len: core::mem::size_of::<BootOnline>() as u32,
    };
    const _: () = assert!(
        (core::mem::size_of::<SetupDataHeader>() + core::mem::size_of::<BootOnline>()) as u64 <= SETUP_DATA_MAX_SIZE
    );
    mem.write_obj(header, GuestAddress(SETUP_DATA_START)).map_err(gm)?;
    mem.write_obj(record, GuestAddress(SETUP_DATA_START + core::mem::size_of::<SetupDataHeader>() as u64))
        .map_err(gm)?;
    mem.write_obj(SETUP_DATA_START, head).map_err(gm)
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
    fn the_boot_online_entry_is_linked_from_boot_params_with_whole_blocks() {
        const MIB: u64 = 1 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 129usize << 20)]).unwrap();
        write_boot_data(&mem, "", false).unwrap();
        // Linux's offset of `hdr.setup_data`, which the guest reads.
        let linux = core::mem::offset_of!(boot_params, hdr)
            + core::mem::offset_of!(linux_loader::loader::bootparam::setup_header, setup_data);
        assert_eq!(linux as u64, SETUP_DATA_OFFSET);
        write_boot_online(&mem, &[(0, 6 * MIB), (36 * MIB, 40 * MIB), (128 * MIB, 129 * MIB), (MIB, 5 * MIB)]).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.setup_data }, SETUP_DATA_START);
        let h: SetupDataHeader = mem.read_obj(GuestAddress(SETUP_DATA_START)).unwrap();
        assert_eq!((h.next, h.kind, h.len as usize), (0, SETUP_BOOT_ONLINE, core::mem::size_of::<BootOnline>()));
        let rec: BootOnline = mem.read_obj(GuestAddress(SETUP_DATA_START + 16)).unwrap();
        // 128..129 MiB is no whole block and goes; 1..5 MiB keeps 2..4 MiB.
        let want = [GpaRange { start: 0, len: 6 * MIB }, GpaRange { start: 36 * MIB, len: 4 * MIB }, GpaRange { start: 2 * MIB, len: 2 * MIB }];
        assert_eq!(rec.ranges(129 * MIB), Ok(&want[..]), "the guest accepts what it is given");
    }

    #[test]
    fn overlong_or_nul_command_lines_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(write_boot_data(&mem, &long, false), Err(ArchSetupError::CmdlineTooLong { .. })));
        assert!(matches!(write_boot_data(&mem, "a\0b", false), Err(ArchSetupError::CmdlineNul)));
    }
}
