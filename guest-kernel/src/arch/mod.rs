//! x86-64 specifics: entry and ring-0 set-up, IDT, paging, port I/O, TSC.

pub mod entry;
pub mod idt;
pub mod jump_label;
pub mod paging;

use core::arch::asm;

/// Reads the time-stamp counter (allowed in ring 3: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O is granted by the TSS I/O bitmap (ring 3) or by the
    // privilege level (ring 0); the ports this kernel uses have no effect on
    // memory safety.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes 32 bits to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`. Not `nomem`: the VMM may read guest memory the
    // guest wrote before this exit (the mailbox), so the write must not be
    // reordered across it.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Reads 32 bits from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outl`; the VMM may have written guest memory before it
    // answers, so memory is not assumed unchanged.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    };
    value
}

/// The privilege level the kernel is running at.
pub fn cpl() -> u8 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    (cs & 3) as u8
}

/// Idles this CPU in `hlt` for good, with interrupts off, until the VMM
/// stops the VM: for a VMM without the paravirtual interface (Firecracker),
/// where there is no command to wait for. `hlt` needs ring 0: a kernel in
/// ring 3 gets there through the `ud2` gate ([`idt::continue_in_ring0`]),
/// which lands on an interrupt gate, so IF stays 0. That path is about ten
/// emulated ring-0 instructions before the first `hlt` (PVM emulates ring 0
/// at ~1 us per instruction), and two (`hlt`, `jmp`) per wake-up. With IF=0
/// no timer interrupt ends the `hlt`; an NMI or a spurious wake-up just
/// halts again.
pub fn halt_forever() -> ! {
    if cpl() == 0 {
        halt_loop(0)
    }
    idt::continue_in_ring0(halt_loop, 0)
}

/// `cli`, then `hlt` in a loop; ring 0 only.
extern "C" fn halt_loop(_: u64) -> ! {
    // SAFETY: clearing IF and halting touch no memory; the caller runs in
    // ring 0, where both are allowed.
    unsafe { asm!("cli", options(nomem, nostack)) };
    loop {
        // SAFETY: as above; a wake-up (NMI) falls through and halts again.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Stops this CPU for good: resets through the i8042 (the VM exits), then
/// spins in case nothing listens.
pub fn reset() -> ! {
    outb(guest_abi::port::I8042_COMMAND, guest_abi::port::I8042_RESET);
    loop {
        core::hint::spin_loop();
    }
}
