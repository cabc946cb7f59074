//! The IDT: exception handlers that report to the VMM, and the gate a ring-3
//! kernel uses to continue in ring 0 (`cpl=0`).
//!
//! Every exception (vectors 0-31) lands, in ring 0, on a stub that loads the
//! vector, error code, faulting RIP, CS and CR2 into registers and writes
//! [`guest_abi::port::EXCEPTION`]; the VMM reads the registers and stops the
//! VM with a failure. On a VMM without that port the stub resets the machine
//! through the i8042. The table is filled from ring 3 (it is ordinary,
//! user-writable memory), so it costs no emulated ring-0 instructions.
//!
//! Moving from ring 3 to ring 0 (`cpl=0`) goes through an exception, not a
//! software-interrupt gate: PVM does not deliver `int n` from ring 3 (it
//! raises #UD), while exceptions are delivered. The #UD handler recognizes
//! the `ud2` at `enter_ring0_trap` and continues in ring 0 instead of
//! reporting it.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;


#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    zero: u32,
}
const _: () = assert!(core::mem::size_of::<Gate>() == 16);

impl Gate {
    /// A not-present gate.
    const EMPTY: Gate = Gate { offset_lo: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_hi: 0, zero: 0 };

    fn new(handler: u64, dpl: u8) -> Gate {
        Gate {
            offset_lo: handler as u16,
            selector: super::entry::KERNEL_CS,
            ist: 0,
            // Present, 64-bit interrupt gate (interrupts stay off).
            type_attr: 0x8e | (dpl << 5),
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            zero: 0,
        }
    }
}

/// 16-byte aligned (as the SDM advises), not page-aligned: the linker
/// script sorts it after the small statics, so that the 32 gates `init`
/// writes share their page (see `linker.ld`).
#[repr(C, align(16))]
pub struct Idt(UnsafeCell<[Gate; 256]>);
// SAFETY: written only by `init` on the boot CPU before any other CPU runs.
unsafe impl Sync for Idt {}

#[no_mangle]
static IDT: Idt = Idt(UnsafeCell::new([Gate::EMPTY; 256]));

extern "C" {
    static ISR_TABLE: [u64; 32];
    fn enter_ring0_trap() -> !;
}

/// Fills the IDT with the exception stubs.
pub fn init() {
    let base = IDT.0.get() as *mut Gate;
    // SAFETY: ISR_TABLE is a constant table of 32 stub addresses (below).
    let table: &[u64; 32] = unsafe { &ISR_TABLE };
    for (v, &handler) in table.iter().enumerate() {
        // SAFETY: `v` < 256; the IDT is only written here, on the boot CPU,
        // before any other CPU starts.
        unsafe { base.add(v).write_volatile(Gate::new(handler, 0)) };
    }
}

/// Points exception `vector` at `handler` (a ring-0 entry that ends in
/// `iretq`), on every CPU: the IDT is shared.
pub fn set_handler(vector: u8, handler: u64) {
    let base = IDT.0.get() as *mut Gate;
    // SAFETY: `vector` < 256; a gate is written whole while no exception
    // of that vector can be in flight on this CPU (the caller runs
    // between faults), and only one CPU (the attacks' boot CPU) writes.
    unsafe { base.add(usize::from(vector)).write_volatile(Gate::new(handler, 0)) };
}

/// Clears the IDT, so the next exception triple-faults (the `fault` workload).
pub fn clear() {
    let base = IDT.0.get() as *mut Gate;
    for v in 0..256 {
        // SAFETY: `v` < 256; only the workload calls this, on one CPU.
        unsafe { base.add(v).write_volatile(Gate::EMPTY) };
    }
}

/// Continues in ring 0 by calling `f(arg)` on this CPU's ring-0 stack; never
/// returns. Ring 0 runs the same code, just privileged (and, on a PVM host,
/// emulated: about a thousand times slower).
pub fn continue_in_ring0(f: extern "C" fn(u64) -> !, arg: u64) -> ! {
    // SAFETY: `enter_ring0_trap` raises #UD at a known address; the #UD
    // handler then calls `f(arg)` on the ring-0 stack and never returns.
    unsafe {
        asm!("jmp {t}", t = sym enter_ring0_trap, in("rdi") f as *const () as usize, in("rsi") arg, options(noreturn));
    }
}

global_asm!(
    r#"
    .section .text.isr, "ax"
    .macro ISR_NOERR n
isr_\n:
    push 0
    push \n
    jmp isr_common
    .endm
    .macro ISR_ERR n
isr_\n:
    push \n
    jmp isr_common
    .endm

    .irp n, 0,1,2,3,4,5,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    ISR_NOERR \n
    .endr
    .irp n, 8,10,11,12,13,14,17,21,29,30
    ISR_ERR \n
    .endr

isr_common:
    mov rdi, [rsp]                  // vector
    mov rsi, [rsp + 8]              // error code
    mov r8, [rsp + 16]              // faulting RIP
    mov r10, [rsp + 24]             // CS (its low bits: the ring)
    mov r9, cr2
    mov eax, edi
    mov dx, {exc_port}
    out dx, eax
    mov al, 0xfe                    // no paravirtual port: i8042 reset
    out 0x64, al
5:  hlt
    jmp 5b

    // #UD: the ring-0 gate if it came from enter_ring0_trap, else a fault.
isr_6:
    push rax
    lea rax, [rip + enter_ring0_trap]
    cmp rax, [rsp + 8]
    pop rax
    jne 6f
    mov rax, rdi                    // f
    mov rdi, rsi                    // arg
    and rsp, -16
    call rax
6:  push 0
    push 6
    jmp isr_common

    .global enter_ring0_trap
enter_ring0_trap:
    ud2

    .section .rodata.isr, "a"
    .balign 8
    .global ISR_TABLE
ISR_TABLE:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\n
    .endr
    "#,
    exc_port = const guest_abi::port::EXCEPTION,
);
