//! Patching static-key jump sites (see `guest_kernel::mm::static_key`).
//!
//! Each site is a 5-byte `jmp rel32` (0xE9) to the code that reads the key.
//! Once the key is off, [`patch_jump_sites`] overwrites every site with the
//! 5-byte NOP `0F 1F 44 00 00`, so the check disappears from the fast path.
//! Kernel text is identity-mapped writable (the kernel owns its page tables),
//! and the caller guarantees no other CPU executes a site meanwhile: x86 then
//! needs only a serializing instruction before the patched code runs again.

use core::sync::atomic::{AtomicBool, Ordering};

extern "C" {
    static __jump_table_start: u64;
    static __jump_table_end: u64;
}

const JMP_REL32: u8 = 0xe9;
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

static PATCHED: AtomicBool = AtomicBool::new(false);

/// Whether the sites have been patched.
pub fn patched() -> bool {
    PATCHED.load(Ordering::Acquire)
}

/// Turns every jump site into a NOP; returns how many were patched.
///
/// # Safety
///
/// Every static key must be off, and no other CPU may be executing code
/// that contains a jump site (the caller runs this between commands, with
/// every application processor parked).
pub unsafe fn patch_jump_sites() -> usize {
    if PATCHED.swap(true, Ordering::AcqRel) {
        return 0;
    }
    let start = &raw const __jump_table_start;
    let end = &raw const __jump_table_end;
    let mut n = 0;
    let mut p = start;
    while p < end {
        // SAFETY: `p` walks the linker-made table of site addresses.
        let site = unsafe { p.read() } as *mut u8;
        // SAFETY: each entry is the address of a 5-byte jump in kernel text,
        // which is mapped writable; no other CPU executes it (caller).
        unsafe {
            if site.read_volatile() == JMP_REL32 {
                for (i, b) in NOP5.iter().enumerate() {
                    site.add(i).write_volatile(*b);
                }
                n += 1;
            }
            p = p.add(1);
        }
    }
    // Serialize before any patched site runs (CPUID is serializing and
    // allowed in ring 3).
    core::arch::x86_64::__cpuid(0);
    n
}
