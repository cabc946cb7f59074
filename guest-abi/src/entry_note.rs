//! The ring-3 entry note: a record the guest kernel publishes in its ELF
//! image (a `PT_NOTE` entry named [`NOTE_NAME`], of type [`NOTE_TYPE`]) so
//! that a VMM can start the boot CPU directly in ring 3, past the ring-0
//! prologue of `_start` (the same idea as the PVH entry note,
//! `XEN_ELFNOTE_PHYS32_ENTRY`, that `linux-loader` reads).
//!
//! The record ([`Ring3Entry`]) says where everything the prologue sets up
//! lives: the VMM loads that state with `KVM_SET_SREGS`/`KVM_SET_REGS`,
//! writes the two things the prologue writes into guest memory (the boot
//! CPU's `TSS.RSP0` and its 16-byte TSS descriptor in the GDT) and starts
//! the vCPU at [`Ring3Entry::entry`] in ring 3. At that instruction:
//!
//! - `CS` = [`Ring3Entry::user_cs`] (64-bit code, DPL 3), `SS`/`DS`/`ES` =
//!   [`Ring3Entry::user_ss`] (data, DPL 3); `TR` = [`Ring3Entry::tss_selector`]
//!   (an available-then-loaded, so busy, 64-bit TSS at [`Ring3Entry::tss_base`]
//!   with limit [`Ring3Entry::tss_limit`]); `GDTR` and `IDTR` as given;
//! - `CR3` = [`Ring3Entry::cr3`] (the guest's own page tables, user bits set),
//!   long mode, paging on; `RFLAGS` = `0x2` (interrupts off, IOPL 0: the TSS
//!   I/O bitmap grants the ports);
//! - `RSP` = [`Ring3Entry::stack_top`], `RSI` = `boot_params`, `RDI` = 0.
//!
//! A VMM that does not know the note (Firecracker) ignores it and enters at
//! the ELF entry in ring 0, which keeps working. Every value is the guest's:
//! the VMM validates each one ([`Ring3Entry::decode`] checks the record
//! itself; addresses are the VMM's to check against the loaded image) and
//! falls back to the ring-0 entry when anything is off.

/// The note's name (`n_namesz` = 9, padded to 12 in the note).
pub const NOTE_NAME: &[u8] = b"MVMGUEST\0";
/// The note's type (`n_type`): ours, under our name.
pub const NOTE_TYPE: u32 = 0x5233_0001;
/// [`Ring3Entry::magic`]: "R3EN", little-endian.
pub const ENTRY_MAGIC: u32 = 0x4E45_3352;
/// [`Ring3Entry::version`]: bumped on any incompatible change of the record
/// or of the state it promises (independent of [`crate::ABI_VERSION`], which
/// is about the ports).
pub const ENTRY_VERSION: u32 = 1;

/// The note's descriptor: what the boot CPU's ring-0 prologue would have
/// set up, and where to continue in ring 3. Addresses are guest-physical,
/// equal to virtual (the kernel is identity-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ring3Entry {
    /// [`ENTRY_MAGIC`].
    pub magic: u32,
    /// [`ENTRY_VERSION`].
    pub version: u32,
    /// `size_of::<Ring3Entry>()`.
    pub size: u32,
    /// Selector of the boot CPU's 16-byte TSS descriptor (RPL 0), which the
    /// VMM writes into the GDT.
    pub tss_selector: u16,
    /// 64-bit user code selector (RPL 3).
    pub user_cs: u16,
    /// User data selector (RPL 3), for `SS`, `DS` and `ES`.
    pub user_ss: u16,
    /// GDT limit (size - 1).
    pub gdt_limit: u16,
    /// IDT limit (size - 1).
    pub idt_limit: u16,
    /// TSS limit (size - 1, with the I/O bitmap and its terminator).
    pub tss_limit: u16,
    /// First ring-3 instruction.
    pub entry: u64,
    /// Top of the boot stack (16-byte aligned): `RSP` at entry.
    pub stack_top: u64,
    /// The top-level page table (4 KiB aligned, user bits set).
    pub cr3: u64,
    /// GDT base.
    pub gdt_base: u64,
    /// IDT base.
    pub idt_base: u64,
    /// The boot CPU's TSS.
    pub tss_base: u64,
    /// Top of the boot CPU's ring-0 stack, for `TSS.RSP0` (16-byte aligned).
    pub rsp0: u64,
}

/// Bytes of [`Ring3Entry`] (the note's `n_descsz`).
pub const ENTRY_SIZE: usize = core::mem::size_of::<Ring3Entry>();

const _: () = {
    use core::mem::offset_of;
    assert!(ENTRY_SIZE == 80);
    assert!(offset_of!(Ring3Entry, size) == 8);
    assert!(offset_of!(Ring3Entry, tss_selector) == 12);
    assert!(offset_of!(Ring3Entry, tss_limit) == 22);
    assert!(offset_of!(Ring3Entry, entry) == 24);
    assert!(offset_of!(Ring3Entry, rsp0) == 72);
    assert!(NOTE_NAME.len() == 9);
};

/// Why a note's descriptor is not a usable [`Ring3Entry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryNoteError {
    /// Fewer bytes than a [`Ring3Entry`], or `size` is not its size.
    BadSize(usize),
    /// `magic` is not [`ENTRY_MAGIC`].
    BadMagic(u32),
    /// `version` is not [`ENTRY_VERSION`].
    BadVersion(u32),
}

impl core::fmt::Display for EntryNoteError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EntryNoteError::BadSize(n) => write!(f, "{n} bytes, not {ENTRY_SIZE}"),
            EntryNoteError::BadMagic(m) => write!(f, "magic {m:#x}, not {ENTRY_MAGIC:#x}"),
            EntryNoteError::BadVersion(v) => write!(f, "version {v}, not {ENTRY_VERSION}"),
        }
    }
}

impl Ring3Entry {
    /// Decodes the record from a note's descriptor bytes (little-endian,
    /// any alignment) and checks its size, magic and version. Never panics.
    pub fn decode(desc: &[u8]) -> Result<Ring3Entry, EntryNoteError> {
        let bytes: &[u8; ENTRY_SIZE] = desc
            .get(..ENTRY_SIZE)
            .and_then(|b| b.try_into().ok())
            .ok_or(EntryNoteError::BadSize(desc.len()))?;
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        let e = Ring3Entry {
            magic: u32_at(0),
            version: u32_at(4),
            size: u32_at(8),
            tss_selector: u16_at(12),
            user_cs: u16_at(14),
            user_ss: u16_at(16),
            gdt_limit: u16_at(18),
            idt_limit: u16_at(20),
            tss_limit: u16_at(22),
            entry: u64_at(24),
            stack_top: u64_at(32),
            cr3: u64_at(40),
            gdt_base: u64_at(48),
            idt_base: u64_at(56),
            tss_base: u64_at(64),
            rsp0: u64_at(72),
        };
        if e.magic != ENTRY_MAGIC {
            return Err(EntryNoteError::BadMagic(e.magic));
        }
        if e.version != ENTRY_VERSION {
            return Err(EntryNoteError::BadVersion(e.version));
        }
        if e.size as usize != ENTRY_SIZE || desc.len() != ENTRY_SIZE {
            return Err(EntryNoteError::BadSize(e.size as usize));
        }
        Ok(e)
    }

    /// The record's bytes, as the guest lays them out (for tests and tools).
    pub fn to_bytes(&self) -> [u8; ENTRY_SIZE] {
        let mut out = [0u8; ENTRY_SIZE];
        let mut put = |o: usize, b: &[u8]| out[o..o + b.len()].copy_from_slice(b);
        put(0, &self.magic.to_le_bytes());
        put(4, &self.version.to_le_bytes());
        put(8, &self.size.to_le_bytes());
        put(12, &self.tss_selector.to_le_bytes());
        put(14, &self.user_cs.to_le_bytes());
        put(16, &self.user_ss.to_le_bytes());
        put(18, &self.gdt_limit.to_le_bytes());
        put(20, &self.idt_limit.to_le_bytes());
        put(22, &self.tss_limit.to_le_bytes());
        put(24, &self.entry.to_le_bytes());
        put(32, &self.stack_top.to_le_bytes());
        put(40, &self.cr3.to_le_bytes());
        put(48, &self.gdt_base.to_le_bytes());
        put(56, &self.idt_base.to_le_bytes());
        put(64, &self.tss_base.to_le_bytes());
        put(72, &self.rsp0.to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ring3Entry {
        Ring3Entry {
            magic: ENTRY_MAGIC,
            version: ENTRY_VERSION,
            size: ENTRY_SIZE as u32,
            tss_selector: 0x28,
            user_cs: 0x23,
            user_ss: 0x1b,
            gdt_limit: 0x227,
            idt_limit: 0xfff,
            tss_limit: 0xc0,
            entry: 0x10_0040,
            stack_top: 0x40_0000,
            cr3: 0x20_0000,
            gdt_base: 0x21_0000,
            idt_base: 0x22_0000,
            tss_base: 0x21_0400,
            rsp0: 0x50_0000,
        }
    }

    #[test]
    fn a_record_round_trips_through_its_bytes() {
        let e = sample();
        assert_eq!(Ring3Entry::decode(&e.to_bytes()), Ok(e));
        // Unaligned bytes decode the same.
        let mut shifted = [0u8; ENTRY_SIZE + 1];
        shifted[1..].copy_from_slice(&e.to_bytes());
        assert_eq!(Ring3Entry::decode(&shifted[1..]), Ok(e));
    }

    #[test]
    fn truncated_foreign_and_newer_records_are_refused() {
        let b = sample().to_bytes();
        assert_eq!(Ring3Entry::decode(&b[..ENTRY_SIZE - 1]), Err(EntryNoteError::BadSize(ENTRY_SIZE - 1)));
        assert_eq!(Ring3Entry::decode(&[]), Err(EntryNoteError::BadSize(0)));
        let mut longer = [0u8; ENTRY_SIZE + 8];
        longer[..ENTRY_SIZE].copy_from_slice(&b);
        assert!(matches!(Ring3Entry::decode(&longer), Err(EntryNoteError::BadSize(_))));
        let e = Ring3Entry { magic: 0x1234, ..sample() };
        assert_eq!(Ring3Entry::decode(&e.to_bytes()), Err(EntryNoteError::BadMagic(0x1234)));
        let e = Ring3Entry { version: 2, ..sample() };
        assert_eq!(Ring3Entry::decode(&e.to_bytes()), Err(EntryNoteError::BadVersion(2)));
        let e = Ring3Entry { size: 72, ..sample() };
        assert_eq!(Ring3Entry::decode(&e.to_bytes()), Err(EntryNoteError::BadSize(72)));
    }
}
