//! Static keys: a boolean a hot path tests and that is switched off for good
//! (Linux `static_branch_likely` + `static_branch_disable`), and the jump
//! table that records, for every place testing a key, which key it tests.
//!
//! # The key
//!
//! A [`StaticKey`]'s truth is an atomic. [`StaticKey::is_enabled`] reads it;
//! [`StaticKey::disable`] switches it off, [`StaticKey::enable`] back on
//! (memory reclaim does, when a chunk goes back to uninitialized).
//!
//! # Jump sites
//!
//! In the guest kernel (`target_os = "none"`), every
//! `static_branch_likely!` is also a *jump site*: a 5-byte `jmp rel32` to
//! the code that reads the key, and a [`JumpEntry`] (site address, key
//! address) in the `.jump_table` section, which `linker.ld` collects between
//! `__jump_table_start` and `__jump_table_end`. The linker fills in the key's
//! address, so a key with jump sites is a `static` (as Linux's
//! `DEFINE_STATIC_KEY_TRUE`), named by path at the site.
//!
//! While the key is on, a site costs a jump and the load. Once the key is
//! off, [`patch_sites`] rewrites the sites *of that key* — entries naming
//! another key are left alone — into 5-byte NOPs, so the site falls straight
//! through to `false` and the path pays nothing. It refuses while the key is
//! on. [`restore_sites`] writes the `jmp rel32` back (each entry records
//! its target), before the key is switched on again. The kernel calls it with the linker's table (`arch::jump_label`) at a
//! point where no other CPU runs code with a site of the key.
//!
//! On the host (tests), a site is the atomic load: text is not writable
//! there. The table logic ([`sites_to_patch`], [`patch_sites`]) is plain code
//! over a slice of entries and is tested with a fake table.

use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

/// First byte of a jump site as compiled: `jmp rel32`.
pub const JMP_REL32: u8 = 0xe9;
/// What a patched site holds: the 5-byte NOP `nopl 0(%rax,%rax,1)`.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// A switch tested on hot paths, off once nothing needs the guarded path.
pub struct StaticKey {
    /// Stored inverted so that an enabled key is all zero bytes.
    disabled: AtomicBool,
    /// Its jump sites have been patched into NOPs.
    patched: AtomicBool,
}

impl StaticKey {
    /// A key in the given state.
    pub const fn new(enabled: bool) -> StaticKey {
        StaticKey {
            disabled: AtomicBool::new(!enabled),
            patched: AtomicBool::new(false),
        }
    }

    /// Whether the key is still on (the atomic; a jump site is
    /// `static_branch_likely!`). A caller may see a stale `true` for a
    /// moment after [`StaticKey::disable`]; it must treat the key as a hint
    /// whose guarded path is correct (only slower) either way.
    #[inline(always)]
    pub fn is_enabled(&self) -> bool {
        !self.disabled.load(Ordering::Relaxed)
    }

    /// Switches the key off.
    pub fn disable(&self) {
        self.disabled.store(true, Ordering::Release);
    }

    /// Switches the key back on (memory reclaim returned memory behind the
    /// frontier). Call [`restore_sites`] first if its sites were patched:
    /// a patched site answers `false` whatever the key says.
    pub fn enable(&self) {
        self.disabled.store(false, Ordering::Release);
    }

    /// Whether [`patch_sites`] has patched this key's jump sites.
    pub fn sites_patched(&self) -> bool {
        self.patched.load(Ordering::Acquire)
    }
}

/// Whether the `static` [`StaticKey`] at `$key` (a path) is on. In the guest
/// kernel this is a jump site recorded with `$key`'s address (see the module
/// documentation); elsewhere it is [`StaticKey::is_enabled`].
macro_rules! static_branch_likely {
    ($key:path) => {{
        #[cfg(all(target_os = "none", target_arch = "x86_64"))]
        let on = {
            #[inline(always)]
            fn site() -> bool {
                // SAFETY: the asm is a jump to `on`, recorded with the key's
                // address in `.jump_table`; it touches no register or
                // memory. The kernel turns it into a NOP of the same length
                // only after this key is off, when `false` is the answer.
                unsafe {
                    ::core::arch::asm!(
                        "2:",
                        ".byte 0xe9",
                        ".long {on} - (2b + 5)",
                        ".pushsection .jump_table, \"aw\"",
                        ".balign 8",
                        ".quad 2b",
                        ".quad {key}",
                        ".quad {on}",
                        ".popsection",
                        key = sym $key,
                        on = label { return $key.is_enabled(); },
                        options(nostack, preserves_flags),
                    );
                }
                false
            }
            site()
        };
        #[cfg(not(all(target_os = "none", target_arch = "x86_64")))]
        let on = $key.is_enabled();
        on
    }};
}
pub(crate) use static_branch_likely;

/// One `.jump_table` entry, as `static_branch_likely!` emits it: two
/// 8-byte addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpEntry {
    /// The site: a 5-byte `jmp rel32` in kernel text.
    pub site: *mut u8,
    /// The key the site tests.
    pub key: *const StaticKey,
    /// Where the site's `jmp` goes (the code that reads the key), so that
    /// [`restore_sites`] can write it back.
    pub target: *const u8,
}

const _: () = assert!(core::mem::size_of::<JumpEntry>() == 24);
const _: () = assert!(core::mem::align_of::<JumpEntry>() == 8);

/// The sites in `table` that belong to `key`, or none while `key` is on: a
/// site may be patched only once its key can no longer be true.
pub fn sites_to_patch<'a>(
    table: &'a [JumpEntry],
    key: &'a StaticKey,
) -> impl Iterator<Item = *mut u8> + 'a {
    let off = !key.is_enabled();
    table
        .iter()
        .filter(move |e| off && core::ptr::eq(e.key, key))
        .map(|e| e.site)
}

/// Why [`patch_sites`] patched nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JumpPatchError {
    /// The key is still on.
    KeyEnabled,
    /// The key's sites were already patched.
    AlreadyPatched,
    /// [`restore_sites`]: the key's sites are not patched.
    NotPatched,
    /// A site of the key does not start with `jmp rel32` ([`patch_sites`])
    /// or does not hold the NOP ([`restore_sites`]).
    NotAJump {
        /// The site's address.
        site: usize,
    },
}

impl fmt::Display for JumpPatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JumpPatchError::KeyEnabled => f.write_str("the static key is still on"),
            JumpPatchError::AlreadyPatched => {
                f.write_str("the key's jump sites are already patched")
            }
            JumpPatchError::NotPatched => f.write_str("the key's jump sites are not patched"),
            JumpPatchError::NotAJump { site } => write!(f, "jump site {site:#x} holds no jmp"),
        }
    }
}

/// Rewrites every jump site of `key` in `table` into [`NOP5`] and returns
/// how many there were. Only when `key` is off, once per key; the sites are
/// all checked before the first is written, so an error changes nothing.
///
/// # Safety
/// Every site of `key` in `table` must be 5 readable and writable bytes of
/// code that no CPU executes meanwhile, and the caller must serialize (e.g.
/// with CPUID) before any of them runs again.
pub unsafe fn patch_sites(table: &[JumpEntry], key: &StaticKey) -> Result<usize, JumpPatchError> {
    if key.is_enabled() {
        return Err(JumpPatchError::KeyEnabled);
    }
    if key.patched.swap(true, Ordering::AcqRel) {
        return Err(JumpPatchError::AlreadyPatched);
    }
    for site in sites_to_patch(table, key) {
        // SAFETY: the caller promises every site of `key` is readable.
        if unsafe { site.read_volatile() } != JMP_REL32 {
            key.patched.store(false, Ordering::Release);
            return Err(JumpPatchError::NotAJump {
                site: site as usize,
            });
        }
    }
    let mut n = 0;
    for site in sites_to_patch(table, key) {
        for (i, b) in NOP5.iter().enumerate() {
            // SAFETY: the caller promises 5 writable bytes that no CPU
            // executes meanwhile.
            unsafe { site.add(i).write_volatile(*b) };
        }
        n += 1;
    }
    Ok(n)
}

/// Writes the `jmp rel32` of every site of `key` back (undoing
/// [`patch_sites`]) and returns how many there were; then the caller may
/// [`StaticKey::enable`] the key. Only while `key` is off and its sites are
/// patched; the sites are all checked before the first is written, so an
/// error changes nothing.
///
/// # Safety
/// As for [`patch_sites`].
pub unsafe fn restore_sites(table: &[JumpEntry], key: &StaticKey) -> Result<usize, JumpPatchError> {
    if key.is_enabled() {
        return Err(JumpPatchError::KeyEnabled);
    }
    if !key.sites_patched() {
        return Err(JumpPatchError::NotPatched);
    }
    let mine = || table.iter().filter(|e| core::ptr::eq(e.key, key));
    for e in mine() {
        let mut b = [0u8; 5];
        for (i, x) in b.iter_mut().enumerate() {
            // SAFETY: the caller promises every site of `key` is readable.
            *x = unsafe { e.site.add(i).read_volatile() };
        }
        if b != NOP5 {
            return Err(JumpPatchError::NotAJump {
                site: e.site as usize,
            });
        }
    }
    let mut n = 0;
    for e in mine() {
        let rel = (e.target as i64).wrapping_sub(e.site as i64 + 5) as i32;
        let mut b = [JMP_REL32, 0, 0, 0, 0];
        b[1..].copy_from_slice(&rel.to_le_bytes());
        for (i, x) in b.iter().enumerate() {
            // SAFETY: the caller promises 5 writable bytes that no CPU
            // executes meanwhile.
            unsafe { e.site.add(i).write_volatile(*x) };
        }
        n += 1;
    }
    key.patched.store(false, Ordering::Release);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_and_enable_switch_the_key() {
        let k = StaticKey::new(true);
        assert!(k.is_enabled());
        k.disable();
        k.disable();
        assert!(!k.is_enabled());
        assert!(!StaticKey::new(false).is_enabled());
        k.enable();
        assert!(k.is_enabled());
    }

    #[test]
    fn a_branch_on_the_host_reads_the_key() {
        static KEY: StaticKey = StaticKey::new(true);
        assert!(static_branch_likely!(KEY));
        KEY.disable();
        assert!(!static_branch_likely!(KEY));
    }

    /// Four sites of 5 bytes (`jmp rel32` each): 0 and 2 test `a`, 1 and 3
    /// test `b`.
    fn fake_text_and_table(text: &mut [u8; 20], a: &StaticKey, b: &StaticKey) -> [JumpEntry; 4] {
        for site in text.chunks_mut(5) {
            site.copy_from_slice(&[JMP_REL32, 0x10, 0, 0, 0]);
        }
        let base = text.as_mut_ptr();
        core::array::from_fn(|i| JumpEntry {
            site: base.wrapping_add(5 * i),
            key: if i % 2 == 0 { a } else { b },
            target: base.wrapping_add(5 * i + 5 + 0x10),
        })
    }

    #[test]
    fn only_the_sites_of_a_key_that_is_off_are_listed() {
        let (a, b) = (StaticKey::new(true), StaticKey::new(true));
        let mut text = [0u8; 20];
        let table = fake_text_and_table(&mut text, &a, &b);
        assert_eq!(sites_to_patch(&table, &a).count(), 0, "a is still on");
        a.disable();
        let sites: Vec<_> = sites_to_patch(&table, &a).collect();
        assert_eq!(sites, vec![table[0].site, table[2].site]);
        assert_eq!(sites_to_patch(&table, &b).count(), 0, "b is still on");
        let other = StaticKey::new(false);
        assert_eq!(
            sites_to_patch(&table, &other).count(),
            0,
            "a key with no sites"
        );
    }

    /// [`patch_sites`] over a fake table.
    fn patch(table: &[JumpEntry], key: &StaticKey) -> Result<usize, JumpPatchError> {
        // SAFETY: the tests' sites point into a byte array that nothing
        // executes.
        unsafe { patch_sites(table, key) }
    }

    #[test]
    fn patching_a_key_rewrites_its_sites_and_no_other() {
        let (a, b) = (StaticKey::new(true), StaticKey::new(true));
        let mut text = [0u8; 20];
        let table = fake_text_and_table(&mut text, &a, &b);
        assert_eq!(patch(&table, &a), Err(JumpPatchError::KeyEnabled));
        assert!(
            text.chunks(5).all(|s| s[0] == JMP_REL32),
            "nothing patched while on"
        );
        a.disable();
        assert_eq!(patch(&table, &a), Ok(2));
        assert!(a.sites_patched() && !b.sites_patched());
        assert_eq!(&text[0..5], &NOP5);
        assert_eq!(&text[10..15], &NOP5);
        assert_eq!(
            &text[5..10],
            &[JMP_REL32, 0x10, 0, 0, 0],
            "b's site untouched"
        );
        assert_eq!(
            &text[15..20],
            &[JMP_REL32, 0x10, 0, 0, 0],
            "b's site untouched"
        );
        assert_eq!(patch(&table, &a), Err(JumpPatchError::AlreadyPatched));
        assert_eq!(patch(&table, &b), Err(JumpPatchError::KeyEnabled));
        // Back on: the jumps come back as they were, b's are untouched.
        let before = text;
        // SAFETY: the sites point into `text`, which nothing executes.
        let restore = |t: &[JumpEntry], k: &StaticKey| unsafe { restore_sites(t, k) };
        assert_eq!(restore(&table, &b), Err(JumpPatchError::KeyEnabled));
        assert_eq!(restore(&table, &a), Ok(2));
        assert!(!a.sites_patched());
        assert!(text.chunks(5).all(|s| s == [JMP_REL32, 0x10, 0, 0, 0]), "{text:?}");
        assert_ne!(text, before);
        assert_eq!(restore(&table, &a), Err(JumpPatchError::NotPatched));
        a.enable();
        assert!(a.is_enabled());
        a.disable();
        assert_eq!(patch(&table, &a), Ok(2), "a key can be patched again");
    }


    #[test]
    fn a_site_that_holds_no_jump_stops_the_patch_before_any_write() {
        let (a, b) = (StaticKey::new(true), StaticKey::new(false));
        let mut text = [0u8; 20];
        let table = fake_text_and_table(&mut text, &a, &b);
        let bad = table[3].site;
        // SAFETY: the sites point into `text`, which nothing executes.
        unsafe { bad.write(0x90) };
        let r = patch(&table, &b);
        let bad = bad as usize;
        assert_eq!(r, Err(JumpPatchError::NotAJump { site: bad }));
        assert_eq!(
            text[5], JMP_REL32,
            "the good site of b was not written either"
        );
        assert!(!b.sites_patched());
        assert_eq!(
            std::format!("{}", JumpPatchError::NotAJump { site: 0x1000 }),
            "jump site 0x1000 holds no jmp"
        );
    }
}
