//! vCPU register state at entry: long-mode special registers with the boot
//! GDT, the general registers of the boot CPU and of application processors,
//! and the FPU at reset.

use super::gdt::{segment_from_gdt, BOOT_GDT};
use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, ZERO_PAGE_START};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

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

    #[test]
    fn the_boot_cpu_gets_boot_params_in_rsi_and_aps_their_index_in_rdi() {
        let r = boot_regs(0x10_0000);
        assert_eq!((r.rip, r.rsi, r.rsp), (0x10_0000, ZERO_PAGE_START, BOOT_STACK_POINTER));
        let a = ap_regs(0x20_0000, 0x9000, 3);
        assert_eq!((a.rip, a.rsp, a.rdi), (0x20_0000, 0x9000, 3));
    }
}
