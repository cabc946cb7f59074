//! x86-64 boot set-up for the Linux 64-bit boot protocol: the guest memory
//! layout, identity-mapping page tables, the GDT, `boot_params` with the e820
//! map and command line, and the vCPU registers (Firecracker's layout).
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
//! | `0x30000` | page directories, one per GiB of address space (2 MiB pages) |
//! | `0x9fc00` | end of low RAM (EBDA) |
//! | `0x100000` | the kernel's ELF segments (1 MiB, `HIMEM_START`) |
//!
//! RAM above 3 GiB starts at 4 GiB (the gap is left for MMIO, as on PCs).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId, kvm_cpuid_entry2};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Memory layout constants.
pub mod layout {
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
}

use layout::*;

const GIB: u64 = 1 << 30;

/// Errors while preparing the guest to boot.
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

/// The guest RAM ranges for `mem_bytes` of memory: up to 3 GiB at 0, the rest at 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START),
        ]
    }
}

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

/// Page-table entry flags: present, writable, (for PDEs) 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_LARGE: u64 = 0x80;

/// Builds identity-mapping page tables covering `[0, top)` with 2 MiB pages
/// (rounded up to whole GiB), returned as (address, 4 KiB table) pairs.
pub fn identity_page_tables(top: u64) -> Vec<(u64, [u64; 512])> {
    let gibs = top.div_ceil(GIB).clamp(1, MAX_PHYS / GIB);
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_START | PTE_PRESENT_RW;
    let mut pdpt = [0u64; 512];
    let mut tables = Vec::with_capacity(2 + gibs as usize);
    for g in 0..gibs {
        let pd_addr = PD_START + g * 4096;
        pdpt[g as usize] = pd_addr | PTE_PRESENT_RW;
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            *e = (g * GIB + ((i as u64) << 21)) | PTE_PRESENT_RW | PDE_LARGE;
        }
        tables.push((pd_addr, pd));
    }
    tables.push((PML4_START, pml4));
    tables.push((PDPT_START, pdpt));
    tables
}

/// The boot GDT: null, code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code, selector 0x08
    0x00cf_9300_0000_ffff, // data, selector 0x10
    0x0080_8b00_0000_ffff, // TSS, selector 0x18
];

/// Decodes a GDT entry into the segment KVM wants.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the boot GDT, IDT, page tables, command line and `boot_params`.
/// With `first_gib_only` the page tables map only the first GiB, as
/// Firecracker's do.
pub fn write_boot_data(mem: &GuestMemoryMmap, cmdline: &str, first_gib_only: bool) -> Result<(), ArchSetupError> {
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

    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(ArchSetupError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
    }
    if cmdline.contains('\0') {
        return Err(ArchSetupError::CmdlineNul);
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

/// Special registers for 64-bit entry: long mode, paging with `cr3`, the boot GDT.
pub fn long_mode_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    const CR0_PE: u64 = 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & !(1 << 30 | 1 << 29); // caches on
    sregs.cr3 = cr3;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry: `RIP` = entry, `RSI` = `boot_params`.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Registers for an application processor started directly in long mode.
pub fn ap_regs(entry: u64, stack_top: u64, cpu: u64) -> kvm_regs {
    kvm_regs { rflags: 0x2, rip: entry, rsp: stack_top, rdi: cpu, ..Default::default() }
}

/// x87/SSE state at reset (FCW 0x37f, MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// First hypervisor CPUID leaf, and the one that reports the TSC frequency in
/// kHz in EAX (the convention KVM guests and VMware use).
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const TSC_FREQ_LEAF: u32 = 0x4000_0010;

/// Adjusts the host-supported CPUID for vCPU `cpu`: its APIC ID, and the
/// TSC frequency leaf (so the guest can turn TSC cycles into time).
pub fn patch_cpuid(cpuid: &mut CpuId, cpu: u8, tsc_khz: Option<u32>) {
    let mut has_tsc_leaf = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(cpu) << 24),
            HYPERVISOR_LEAF if tsc_khz.is_some() => e.eax = e.eax.max(TSC_FREQ_LEAF),
            TSC_FREQ_LEAF => {
                has_tsc_leaf = true;
                e.eax = tsc_khz.unwrap_or(0);
            }
            _ => {}
        }
    }
    if let (false, Some(khz)) = (has_tsc_leaf, tsc_khz) {
        let _ = cpuid.push(kvm_cpuid_entry2 { function: TSC_FREQ_LEAF, eax: khz, ..Default::default() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(2 << 30), vec![(GuestAddress(0), 2 << 30)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
    }

    #[test]
    fn page_tables_identity_map_every_gib_with_2mib_pages() {
        let tables = identity_page_tables(2 << 30);
        assert_eq!(tables.len(), 4); // 2 PDs, PML4, PDPT
        let pml4 = tables.iter().find(|(a, _)| *a == PML4_START).unwrap().1;
        assert_eq!(pml4[0], PDPT_START | 3);
        assert!(pml4[1..].iter().all(|e| *e == 0));
        let pdpt = tables.iter().find(|(a, _)| *a == PDPT_START).unwrap().1;
        assert_eq!(pdpt[0], PD_START | 3);
        assert_eq!(pdpt[1], (PD_START + 4096) | 3);
        assert_eq!(pdpt[2], 0);
        let pd1 = tables.iter().find(|(a, _)| *a == PD_START + 4096).unwrap().1;
        assert_eq!(pd1[0], GIB | 0x83);
        assert_eq!(pd1[511], (GIB + (511 << 21)) | 0x83);
    }

    // Page tables stay below the kernel and above the command line.
    const _: () = assert!(PD_START + (MAX_PHYS / GIB) * 4096 <= EBDA_START);
    const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= PD_START);

    #[test]
    fn small_and_huge_tops_are_clamped() {
        assert_eq!(identity_page_tables(1).len(), 3);
        assert_eq!(identity_page_tables(u64::MAX).len(), 2 + (MAX_PHYS / GIB) as usize);
    }

    #[test]
    fn gdt_segments_decode_like_the_hardware() {
        let code = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present, code.type_, code.s), (8, 1, 0, 1, 0xb, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!((data.selector, data.db, data.type_, data.l), (16, 1, 3, 0));
        let tss = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (24, 0xb, 0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

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
        let e1 = params.e820_table[1];
        assert_eq!(({ e0.addr }, { e0.size }, { e0.r#type }), (0, EBDA_START, 1));
        assert_eq!(({ e1.addr }, { e1.size }), (HIMEM_START, (64 << 20) - HIMEM_START));
        let mut cmd = [0u8; 20];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cmd, b"workload=exit cpl=3\0");
        // The boot_params layout is Linux's: e820_table at 0x2d0, count at 0x1e8.
        assert_eq!(core::mem::offset_of!(boot_params, e820_table), 0x2d0);
        assert_eq!(core::mem::offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(core::mem::size_of::<boot_params>(), 4096);
    }

    #[test]
    fn overlong_or_nul_command_lines_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(write_boot_data(&mem, &long, false), Err(ArchSetupError::CmdlineTooLong { .. })));
        assert!(matches!(write_boot_data(&mem, "a\0b", false), Err(ArchSetupError::CmdlineNul)));
    }

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default(), PML4_START);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & (1 << 31), 0);
        assert_ne!(s.cr4 & (1 << 5), 0);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn cpuid_gets_apic_id_and_tsc_leaf() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_1234, ..Default::default() },
            kvm_cpuid_entry2 { function: HYPERVISOR_LEAF, eax: 0x4000_0001, ..Default::default() },
        ])
        .unwrap();
        patch_cpuid(&mut c, 3, Some(2_000_000));
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0300_1234);
        assert_eq!(e[1].eax, TSC_FREQ_LEAF);
        assert_eq!((e[2].function, e[2].eax), (TSC_FREQ_LEAF, 2_000_000));
    }
}
