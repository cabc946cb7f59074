//! A `StaticKey`: a boolean the fast path tests and that is switched off for
//! good (Linux `static_branch_likely` + `static_branch_disable`).
//!
//! The truth is an `AtomicBool`. In the guest kernel (`target_os = "none"`)
//! every inlined [`StaticKey::is_enabled`] is also a *jump site*: a 5-byte
//! `jmp rel32` to the code that reads the atomic, recorded in the
//! `.jump_table` section. While the key is on the site costs a jump and the
//! load; once the key is off and the kernel has patched the sites into 5-byte
//! NOPs (`patch_jump_sites` in the kernel, called at a point where no other
//! CPU runs allocator code), the site falls straight through to `false`: the
//! fast path pays nothing. On the host (tests), text is not writable, so it
//! stays the atomic load.
//!
//! The table does not say which key a site belongs to: the kernel has exactly
//! one key (the memory manager's grow check), and it patches only once that
//! key is off.

use core::sync::atomic::{AtomicBool, Ordering};

/// A one-way switch tested on hot paths.
pub struct StaticKey {
    /// Stored inverted so that an enabled key is all zero bytes.
    disabled: AtomicBool,
}

impl StaticKey {
    /// A key in the given state.
    pub const fn new(enabled: bool) -> StaticKey {
        StaticKey {
            disabled: AtomicBool::new(!enabled),
        }
    }

    /// Whether the key is still on. A caller may see a stale `true` for a
    /// moment after [`StaticKey::disable`]; it must treat the key as a hint
    /// whose guarded path is correct (only slower) either way.
    #[inline(always)]
    pub fn is_enabled(&self) -> bool {
        #[cfg(all(target_os = "none", target_arch = "x86_64"))]
        {
            // SAFETY: the asm is a jump to `on`, whose address is recorded in
            // `.jump_table`; it touches no register or memory. The kernel
            // turns it into a NOP of the same length only after the key is
            // off, when `false` is the right answer.
            unsafe {
                core::arch::asm!(
                    "2:",
                    ".byte 0xe9",
                    ".long {on} - (2b + 5)",
                    ".pushsection .jump_table, \"aw\"",
                    ".balign 8",
                    ".quad 2b",
                    ".popsection",
                    on = label { return !self.disabled.load(Ordering::Relaxed); },
                    options(nostack, preserves_flags),
                );
            }
            false
        }
        #[cfg(not(all(target_os = "none", target_arch = "x86_64")))]
        {
            !self.disabled.load(Ordering::Relaxed)
        }
    }

    /// Switches the key off for good.
    pub fn disable(&self) {
        self.disabled.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_is_one_way() {
        let k = StaticKey::new(true);
        assert!(k.is_enabled());
        k.disable();
        k.disable();
        assert!(!k.is_enabled());
    }
}
