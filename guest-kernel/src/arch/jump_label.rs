//! The kernel's jump table and patching one static key's sites (see
//! `guest_kernel::mm::static_key`).
//!
//! `linker.ld` collects every `(site, key)` entry the library emitted into
//! `.jump_table`, between `__jump_table_start` and `__jump_table_end`.
//! [`patch`] hands that table and a key to
//! `guest_kernel::mm::static_key::patch_sites`, which rewrites the 5-byte
//! `jmp rel32` of that key's sites, and no other key's, into a 5-byte NOP,
//! and only once the key is off. Kernel text is identity-mapped writable
//! (the kernel owns its page tables), and the caller guarantees no other CPU
//! executes a site meanwhile: x86 then needs only a serializing instruction
//! before the patched code runs again.

use guest_kernel::mm::static_key::{self, JumpEntry, JumpPatchError, StaticKey};

extern "C" {
    static __jump_table_start: u8;
    static __jump_table_end: u8;
}

/// The linker's jump table.
fn table() -> &'static [JumpEntry] {
    let start = (&raw const __jump_table_start).cast::<JumpEntry>();
    let end = (&raw const __jump_table_end).cast::<JumpEntry>();
    let len = (end as usize - start as usize) / core::mem::size_of::<JumpEntry>();
    // SAFETY: linker.ld puts only `.jump_table` input sections between the
    // two symbols, 8-aligned, and every one is a run of `JumpEntry` records
    // emitted by `static_branch_likely!`; the table is never written.
    unsafe { core::slice::from_raw_parts(start, len) }
}

/// Turns every jump site of `key` into a NOP; returns how many were patched.
///
/// # Safety
///
/// No other CPU may be executing code that contains a jump site of `key`
/// (the caller runs this between commands, with every application processor
/// parked).
pub unsafe fn patch(key: &StaticKey) -> Result<usize, JumpPatchError> {
    // SAFETY: every site in the table is 5 bytes of kernel text, mapped
    // writable; no other CPU executes one of `key` (caller); we serialize
    // below before any of them runs again.
    let n = unsafe { static_key::patch_sites(table(), key) }?;
    // Serialize before any patched site runs (CPUID is serializing and
    // allowed in ring 3).
    core::arch::x86_64::__cpuid(0);
    Ok(n)
}

/// Writes the jump sites of `key` back (undoing [`patch`]), so the key can
/// be switched on again; returns how many were restored.
///
/// # Safety
///
/// As for [`patch`].
pub unsafe fn restore(key: &StaticKey) -> Result<usize, JumpPatchError> {
    // SAFETY: as in `patch`.
    let n = unsafe { static_key::restore_sites(table(), key) }?;
    core::arch::x86_64::__cpuid(0);
    Ok(n)
}
