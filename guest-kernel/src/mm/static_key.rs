//! A `StaticKey`: a boolean the fast path tests once and that is switched off
//! for good (Linux `static_branch_unlikely`).
//!
//! It is an `AtomicBool` today, read with a relaxed load. It is kept alone in
//! this module, with only [`StaticKey::is_enabled`] and [`StaticKey::disable`],
//! so it can later become a code-patching jump label without touching callers.

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
        !self.disabled.load(Ordering::Relaxed)
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
