//! Reads the Linux `boot_params` ("zero page"): the e820 map, the command
//! line, and our `setup_data` entry listing the memory the VMM registered
//! at boot (`guest_abi::BootOnline`).

use guest_abi::{
    BootOnline, SetupDataHeader, MAX_SETUP_DATA_ENTRIES, SETUP_BOOT_ONLINE, SETUP_DATA_LIMIT, SETUP_DATA_OFFSET,
};

/// Offsets in `struct boot_params` (Linux `arch/x86/include/uapi/asm/bootparam.h`).
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const CMDLINE_SIZE: usize = 0x238;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One e820 entry, as `boot_params` holds it (20 bytes, unaligned).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

const _: () = assert!(core::mem::size_of::<E820Entry>() == 20);

/// What the kernel takes from `boot_params`: small, since it lives on the
/// boot stack (a copy of the 128-entry e820 table took 3 KiB there, copied
/// again on the way to `boot`, and every boot stack page costs the host a
/// page).
pub struct BootInfo {
    /// The e820 table, in the zero page itself (never written after the
    /// VMM, like the command line).
    pub e820: &'static [E820Entry],
    pub cmdline: &'static str,
    /// The VMM's [`BootOnline`] record, as found (not yet validated: see
    /// `BootOnline::ranges`).
    pub boot_online: Option<BootOnline>,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the boot protocol places boot_params and the command line in
    // identity-mapped low memory; reads are unaligned-safe.
    unsafe { (addr as *const T).read_unaligned() }
}

/// Parses the zero page at `zero_page`.
pub fn parse(zero_page: u64) -> BootInfo {
    let n = (read::<u8>(zero_page + E820_ENTRIES as u64) as usize).min(E820_MAX);
    // SAFETY: the table's `n` <= 128 entries of 20 bytes end at 0xcd0, inside
    // the identity-mapped zero page, which nothing writes after the VMM
    // (the kernel reads it only while booting, and reserves low memory, where
    // the VMM puts it, before its allocator hands out a page); `E820Entry`
    // is packed (alignment 1) and any bytes are a valid value.
    let e820 = unsafe { core::slice::from_raw_parts((zero_page + E820_TABLE as u64) as *const E820Entry, n) };
    let mut info = BootInfo { e820, cmdline: "", boot_online: None };
    let ptr = read::<u32>(zero_page + CMD_LINE_PTR as u64) as u64;
    let max = match read::<u32>(zero_page + CMDLINE_SIZE as u64) {
        0 => 2048,
        n => (n as usize).min(4096),
    };
    if ptr != 0 {
        let mut len = 0;
        while len < max && read::<u8>(ptr + len as u64) != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes at `ptr` were just read; the command line is
        // never written after boot.
        let bytes = unsafe { core::slice::from_raw_parts(ptr as *const u8, len) };
        info.cmdline = core::str::from_utf8(bytes).unwrap_or("");
    }
    info.boot_online = find_boot_online(&info, read(zero_page + SETUP_DATA_OFFSET));
    info
}

/// Walks the `setup_data` list from `first` for a [`SETUP_BOOT_ONLINE`]
/// entry. Only entries wholly inside e820 RAM below [`SETUP_DATA_LIMIT`]
/// are read (anything else ends the walk), and at most
/// [`MAX_SETUP_DATA_ENTRIES`] of them, so a malformed list cannot make the
/// kernel read outside the boot data or loop forever.
fn find_boot_online(info: &BootInfo, first: u64) -> Option<BootOnline> {
    let readable = |at: u64, len: u64| {
        at.checked_add(len).is_some_and(|end| {
            end <= SETUP_DATA_LIMIT && info.ram().any(|e| e.addr <= at && end <= e.addr.saturating_add(e.size))
        })
    };
    let header = core::mem::size_of::<SetupDataHeader>() as u64;
    let mut at = first;
    for _ in 0..MAX_SETUP_DATA_ENTRIES {
        if at == 0 || !readable(at, header) {
            return None;
        }
        let h: SetupDataHeader = read(at);
        let payload = at + header;
        if h.kind == SETUP_BOOT_ONLINE
            && h.len as usize >= core::mem::size_of::<BootOnline>()
            && readable(payload, u64::from(h.len))
        {
            return Some(read(payload));
        }
        at = h.next;
    }
    None
}

impl BootInfo {
    /// Usable RAM ranges.
    pub fn ram(&self) -> impl Iterator<Item = &E820Entry> {
        self.e820.iter().filter(|e| {
            let (kind, size) = (e.kind, e.size);
            kind == E820_RAM && size > 0
        })
    }

    /// End (exclusive) of the highest usable RAM.
    pub fn ram_end(&self) -> u64 {
        self.ram()
            .map(|e| e.addr.saturating_add(e.size))
            .max()
            .unwrap_or(0)
    }
}
