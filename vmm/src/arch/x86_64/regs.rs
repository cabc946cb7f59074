//! vCPU register state at entry: long-mode special registers with the boot
//! GDT, the general registers of the boot CPU and of application processors,
//! the boot CPU's ring-3 entry state from the guest's entry note, and the
//! FPU at reset.

use super::gdt::{segment_from_gdt, tss_descriptor, BOOT_GDT};
use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, ZERO_PAGE_START};
use guest_abi::entry_note::Ring3Entry;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Why the boot vCPU cannot start at the guest's ring-3 entry (it then
/// enters at the ELF entry in ring 0).
#[derive(Debug, thiserror::Error)]
pub enum Ring3SetupError {
    #[error("the guest's {what} descriptor {raw:#x} is not a present DPL-3 one")]
    Descriptor { what: &'static str, raw: u64 },
    #[error("cannot access the guest's {what}")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
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

/// The boot CPU's state at the guest's ring-3 entry (`e`, checked against
/// the image by `Image::ring3_entry`): what the ring-0 prologue of `_start`
/// would have left. The user code and data descriptors are read from the
/// guest's GDT and must be present 64-bit code and writable data of DPL 3;
/// then the boot CPU's busy TSS descriptor goes into the GDT at
/// `e.tss_selector` and `e.rsp0` into its `TSS.RSP0`, as the prologue
/// writes them. Returns the special registers (long mode, `CR3` = the
/// guest's page tables, `CS`/`SS`/`DS`/`ES`/`FS`/`GS` the user segments,
/// `TR` the TSS, the guest's GDT and IDT) and the general ones (`RIP` =
/// entry, `RSP` = boot stack, `RSI` = `boot_params`, `RFLAGS` = `0x2`: IF
/// and IOPL 0). Nothing is written unless both descriptors pass.
pub fn ring3_entry_state(
    mem: &GuestMemoryMmap,
    sregs: kvm_sregs,
    e: &Ring3Entry,
) -> Result<(kvm_sregs, kvm_regs), Ring3SetupError> {
    let gdt_entry = |sel: u16, what| {
        mem.read_obj::<u64>(GuestAddress(e.gdt_base.wrapping_add(u64::from(sel & !7))))
            .map_err(|source| Ring3SetupError::GuestMemory { what, source })
    };
    let (code_raw, data_raw) = (gdt_entry(e.user_cs, "user code")?, gdt_entry(e.user_ss, "user data")?);
    let mut code = segment_from_gdt(code_raw, (e.user_cs >> 3) as u8);
    let mut data = segment_from_gdt(data_raw, (e.user_ss >> 3) as u8);
    let user = |s: &kvm_bindings::kvm_segment| s.present == 1 && s.s == 1 && s.dpl == 3;
    if !(user(&code) && code.type_ & 0x8 != 0 && code.l == 1 && code.db == 0) {
        return Err(Ring3SetupError::Descriptor { what: "user code", raw: code_raw });
    }
    if !(user(&data) && data.type_ & 0xa == 0x2) {
        return Err(Ring3SetupError::Descriptor { what: "user data", raw: data_raw });
    }
    (code.selector, data.selector) = (e.user_cs, e.user_ss);
    let tss = tss_descriptor(e.tss_base, e.tss_limit);
    let at = GuestAddress(e.gdt_base.wrapping_add(u64::from(e.tss_selector & !7)));
    mem.write_obj(tss, at).map_err(|source| Ring3SetupError::GuestMemory { what: "TSS descriptor", source })?;
    mem.write_obj(e.rsp0, GuestAddress(e.tss_base.wrapping_add(4)))
        .map_err(|source| Ring3SetupError::GuestMemory { what: "TSS.RSP0", source })?;
    let mut s = long_mode_sregs(sregs, e.cr3);
    s.cs = code;
    (s.ss, s.ds, s.es, s.fs, s.gs) = (data, data, data, data, data);
    s.tr = segment_from_gdt(tss[0], (e.tss_selector >> 3) as u8);
    s.tr.base = e.tss_base;
    s.gdt.base = e.gdt_base;
    s.gdt.limit = e.gdt_limit;
    s.idt.base = e.idt_base;
    s.idt.limit = e.idt_limit;
    let regs = kvm_regs { rflags: 0x2, rip: e.entry, rsp: e.stack_top, rsi: ZERO_PAGE_START, ..Default::default() };
    Ok((s, regs))
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

#[cfg(test)]
mod tests {
    use super::super::layout::PML4_START;
    use super::*;

    #[test]
    fn sregs_enter_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default(), PML4_START);
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & (1 << 31), 0);
        assert_ne!(s.cr4 & (1 << 5), 0);
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!(s.cs.l, 1);
    }

    /// A ring-3 entry record over 64 KiB of fresh RAM holding its GDT.
    fn ring3_fixture() -> (GuestMemoryMmap, Ring3Entry) {
        let mem = crate::memory::create_ram(&[(GuestAddress(0), 64 << 10)], false).unwrap();
        let e = Ring3Entry {
            tss_selector: 0x28,
            user_cs: 0x23,
            user_ss: 0x1b,
            gdt_base: 0x1000,
            gdt_limit: 0x37,
            idt_base: 0x2000,
            idt_limit: 0xfff,
            tss_base: 0x3008,
            tss_limit: 0x127,
            entry: 0x4000,
            stack_top: 0x8000,
            cr3: 0x9000,
            rsp0: 0xa000,
            ..Default::default()
        };
        let gdt: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00cf_f300_0000_ffff, 0x00af_fb00_0000_ffff];
        mem.write_obj(gdt, GuestAddress(e.gdt_base)).unwrap();
        (mem, e)
    }

    #[test]
    fn the_ring3_entry_starts_in_the_guests_user_segments_with_its_tss() {
        let (mem, e) = ring3_fixture();
        let (s, r) = ring3_entry_state(&mem, kvm_sregs::default(), &e).unwrap();
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l, s.cs.type_), (0x23, 3, 1, 0xb));
        for d in [s.ss, s.ds, s.es, s.fs, s.gs] {
            assert_eq!((d.selector, d.dpl, d.type_, d.present), (0x1b, 3, 3, 1));
        }
        assert_eq!((s.tr.selector, s.tr.base, s.tr.limit, s.tr.type_, s.tr.s), (0x28, 0x3008, 0x127, 0xb, 0));
        assert_eq!((s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit, s.cr3), (0x1000, 0x37, 0x2000, 0xfff, 0x9000));
        assert_eq!(s.efer & 0x500, 0x500);
        assert_eq!((r.rip, r.rsp, r.rsi, r.rdi, r.rflags), (0x4000, 0x8000, ZERO_PAGE_START, 0, 0x2));
        // What the prologue writes: TSS.RSP0 and the busy TSS descriptor.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3008 + 4)).unwrap(), 0xa000);
        let desc: [u64; 2] = mem.read_obj(GuestAddress(0x1000 + 0x28)).unwrap();
        assert_eq!(desc, tss_descriptor(0x3008, 0x127));
    }

    #[test]
    fn kernel_or_missing_descriptors_refuse_the_ring3_entry_and_write_nothing() {
        for (sel_cs, sel_ss) in [(0x0b, 0x1b), (0x23, 0x13), (0x1b, 0x1b), (0x23, 0x23), (0x33, 0x1b)] {
            let (mem, e) = ring3_fixture();
            let e = Ring3Entry { user_cs: sel_cs, user_ss: sel_ss, ..e };
            let err = ring3_entry_state(&mem, kvm_sregs::default(), &e).unwrap_err();
            assert!(matches!(err, Ring3SetupError::Descriptor { .. }), "{sel_cs:#x}/{sel_ss:#x}: {err}");
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x3008 + 4)).unwrap(), 0);
            assert_eq!(mem.read_obj::<[u64; 2]>(GuestAddress(0x1028)).unwrap(), [0, 0]);
        }
        // A GDT past the end of RAM is an error, not a panic.
        let (mem, e) = ring3_fixture();
        let e = Ring3Entry { gdt_base: 64 << 10, ..e };
        assert!(matches!(ring3_entry_state(&mem, kvm_sregs::default(), &e), Err(Ring3SetupError::GuestMemory { .. })));
    }

    #[test]
    fn the_boot_cpu_gets_boot_params_in_rsi_and_aps_their_index_in_rdi() {
        let r = boot_regs(0x10_0000);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x10_0000, ZERO_PAGE_START, BOOT_STACK_POINTER));
        let a = ap_regs(0x20_0000, 0x9000, 3);
        assert_eq!((a.rip, a.rsp, a.rdi), (0x20_0000, 0x9000, 3));
    }
}
