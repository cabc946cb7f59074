//! The contract between the VMM and the guest kernel, in one place.
//!
//! Both sides build against this crate, so a port number, a command code or a
//! field offset cannot drift between them. Everything here is plain data:
//! `#[repr(C)]` structs with compile-time size checks, constants, and pure
//! decoding helpers. Nothing here trusts the other side: the VMM decodes every
//! raw field it reads from guest memory with the `TryFrom`/`decode` helpers,
//! which never panic.
//!
//! # The channel, step by step
//!
//! 1. The VMM boots the kernel with the Linux x86-64 64-bit boot protocol
//!    (`RSI` = `boot_params`). Nothing below is needed to boot: on a VMM that
//!    does not implement these ports the guest still boots and shuts down by
//!    i8042 reset.
//! 2. The guest reads [`port::IDENT`]. If it returns [`PV_MAGIC`], the
//!    paravirtual interface is present.
//! 3. The guest writes the guest-physical address of its [`StatsBlock`] to
//!    [`port::STATS`] and of its [`Mailbox`] to [`port::MAILBOX`] (each once,
//!    32-bit, below 4 GiB), and [`Phase::Ready`] to [`port::PHASE`] once it
//!    is ready for work.
//! 4. When idle, the guest reads [`port::WAIT`]: the VMM blocks that vCPU until
//!    it has written a command into the mailbox, so an idle VM costs no host
//!    CPU. The guest runs the command, fills in the result, and writes the
//!    command's sequence number to [`port::DONE`].
//! 5. The guest ends with an exit code on [`port::EXIT`] (or an i8042 reset).
//!
//! Memory reclaim (ABI version 3, `reclaim=` on the guest's command line):
//! before an idle `WAIT` the guest may write a delay to
//! [`port::WAIT_TIMEOUT`], so that `WAIT` returns [`WAIT_TIMED_OUT`] if no
//! command came in that time. The guest then reports memory that stayed free
//! by writing the address of a [`ReclaimRecord`] to [`port::RECLAIM`]. The VMM
//! validates every range, discards the accepted ones from the host (the guest
//! reads zeros there afterwards) and writes back which ones it accepted.
//!
//! Memory registered at boot (ABI version 4): the VMM registers with KVM,
//! before the vCPU first runs, what the guest will online while it boots
//! (computed with [`layout::ondemand_boot_ranges`], the function the guest
//! places its memmap with), and lists what it registered in a
//! [`BootOnline`] entry of the boot protocol's `setup_data` list
//! ([`SETUP_BOOT_ONLINE`]). The guest treats those runs as online, so an
//! idle guest boots without a [`port::MEM_ONLINE`] write.
//!
//! Starting in ring 3 ([`entry_note`]): the guest's ELF image carries a
//! note that says what its ring-0 prologue sets up, so that a VMM that
//! reads it can start the boot CPU in ring 3 (on PVM, every ring-0
//! instruction is emulated). A VMM that does not read it enters at the ELF
//! entry as step 1 says.
//!
//! The stats block is updated under a sequence counter (odd while the guest
//! writes), so the VMM can read a consistent snapshot while the guest runs.
#![no_std]

pub mod cmdline;
pub mod entry_note;
pub mod layout;

/// The records are plain integers with no padding holes that matter and no
/// invalid bit patterns, so any bytes are a valid value: the VMM may read
/// them from untrusted guest memory (and must validate the values).
#[cfg(feature = "vm-memory")]
mod byte_valued {
    // SAFETY: each type is `#[repr(C)]`, made only of integers (and arrays
    // of `GpaRange`, itself integers), so every byte pattern is valid.
    unsafe impl vm_memory::ByteValued for super::StatsBlock {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for super::Mailbox {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for super::ApBoot {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for super::GpaRange {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for super::ReclaimRange {}
    // SAFETY: as above (an array of `ReclaimRange`, itself integers).
    unsafe impl vm_memory::ByteValued for super::ReclaimRecord {}
    // SAFETY: as above.
    unsafe impl vm_memory::ByteValued for super::SetupDataHeader {}
    // SAFETY: as above (an array of `GpaRange`, itself integers).
    unsafe impl vm_memory::ByteValued for super::BootOnline {}
}

/// Version of this contract; bumped on any incompatible change. The guest
/// writes it into every structure it shares; the VMM rejects other versions.
///
/// Version 2: [`MEMORY_BLOCK_SIZE`] is 2 MiB (it was 128 MiB) and a
/// [`port::MEM_ONLINE`] write registers the [`online_run`] holding the
/// address, so a version-1 guest would use memory the VMM never registered.
///
/// Version 3: memory reclaim ([`port::WAIT_TIMEOUT`], [`port::RECLAIM`],
/// [`ReclaimRecord`]) and the reclaim fields of [`StatsBlock`].
///
/// Version 4: the [`BootOnline`] `setup_data` entry: runs the VMM
/// registered before the first entry, which the guest treats as online
/// without a [`port::MEM_ONLINE`] write.
pub const ABI_VERSION: u32 = 4;

/// Returned by a read of [`port::IDENT`] when the VMM implements this contract.
pub const PV_MAGIC: u32 = 0x4D4D_5650; // "PVMM", little-endian.

/// Magic at the start of [`StatsBlock`].
pub const STATS_MAGIC: u32 = 0x5354_4154; // "TATS"
/// Magic at the start of [`Mailbox`].
pub const MAILBOX_MAGIC: u32 = 0x584F_424D; // "MBOX"
/// Magic at the start of [`ReclaimRecord`].
pub const RECLAIM_MAGIC: u32 = 0x4D4C_4352; // "RCLM"
/// Magic at the start of [`ApBoot`].
pub const AP_BOOT_MAGIC: u32 = 0x544F_4241; // "ABOT"
/// Magic at the start of [`BootOnline`].
pub const BOOT_ONLINE_MAGIC: u32 = 0x4E4F_4F42; // "BOON"

/// Size of a guest page: the unit of the memmap, the allocator and `mincore`.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a `struct page` in the guest's memmap.
pub const STRUCT_PAGE_SIZE: u64 = 64;
/// Default memmap section: 128 MiB of memory (x86-64 Linux `SECTION_SIZE_BITS`).
pub const SECTION_SIZE: u64 = 128 << 20;
/// Default memory covered by one memmap chunk: 2 MiB (32 KiB of memmap).
pub const DEFAULT_CHUNK_SIZE: u64 = 2 << 20;
/// Smallest allowed chunk: 128 KiB of memory (2 KiB of memmap).
pub const MIN_CHUNK_SIZE: u64 = 128 << 10;

/// I/O ports. All paravirtual ports take or return 32-bit values.
pub mod port {
    /// COM1, a 16550 UART (8 ports).
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// i8042 command port: writing 0xFE resets the machine (the VM exits).
    pub const I8042_COMMAND: u16 = 0x64;
    /// i8042 value that requests a reset.
    pub const I8042_RESET: u8 = 0xfe;

    /// First paravirtual port.
    pub const PV_BASE: u16 = 0x510;
    /// in: [`crate::PV_MAGIC`] if the paravirtual interface is present.
    pub const IDENT: u16 = PV_BASE;
    /// out: the guest's exit code; the VM stops.
    pub const EXIT: u16 = PV_BASE + 4;
    /// out: a [`crate::Phase`] the guest reached (for boot timings).
    pub const PHASE: u16 = PV_BASE + 8;
    /// out: guest-physical address of the [`crate::StatsBlock`].
    pub const STATS: u16 = PV_BASE + 12;
    /// out: guest-physical address of the [`crate::Mailbox`].
    pub const MAILBOX: u16 = PV_BASE + 16;
    /// in: blocks until a command is in the mailbox; returns its sequence number.
    pub const WAIT: u16 = PV_BASE + 20;
    /// in: like `WAIT` but never blocks; returns 0 when no command is pending.
    pub const POLL: u16 = PV_BASE + 24;
    /// out: the sequence number of the command the guest has finished.
    pub const DONE: u16 = PV_BASE + 28;
    /// out: from an exception handler; `RDI` = vector, `RSI` = error code,
    /// `R8` = faulting RIP, `R9` = CR2, `R10` = faulting CS. The VM stops
    /// with a failure.
    pub const EXCEPTION: u16 = PV_BASE + 32;
    /// out: guest-physical address of an [`crate::ApBoot`]; the VMM starts the
    /// application processors in long mode at its entry.
    pub const AP_BOOT: u16 = PV_BASE + 36;
    /// in (on an application processor): blocks until the BSP writes
    /// `AP_RELEASE`; returns the release generation.
    pub const AP_PARK: u16 = PV_BASE + 40;
    /// out (on the BSP): wakes every application processor parked on `AP_PARK`.
    pub const AP_RELEASE: u16 = PV_BASE + 44;
    /// in: number of vCPUs the VM has (the BSP included).
    pub const CPU_COUNT: u16 = PV_BASE + 48;
    /// out: `gpa >> 20`: the guest is about to use memory in the
    /// [`crate::online_run`] run holding `gpa`; the VMM registers that run
    /// (or more) with KVM before the write returns (memory hotplug, driven
    /// by the guest's allocator). Blocks holding the kernel are registered
    /// at boot; using another block before onlining it stops the VM.
    pub const MEM_ONLINE: u16 = PV_BASE + 52;
    /// out: milliseconds; the next `WAIT` read returns
    /// [`crate::WAIT_TIMED_OUT`] if no command arrived within that time
    /// (one-shot; 0 cancels; the VMM clamps it to
    /// [`crate::MAX_WAIT_TIMEOUT_MS`]). How the guest waits out its reclaim delay.
    pub const WAIT_TIMEOUT: u16 = PV_BASE + 56;
    /// out: guest-physical address of a [`crate::ReclaimRecord`] (32-bit,
    /// below 4 GiB, 8-byte aligned, inside RAM). Before the write returns the
    /// VMM has validated each range, discarded the accepted ones and written
    /// [`crate::ReclaimRecord::accepted`].
    pub const RECLAIM: u16 = PV_BASE + 60;
    /// Last paravirtual port (exclusive).
    pub const PV_END: u16 = PV_BASE + 64;
}

/// The guest onlines RAM ([`port::MEM_ONLINE`]) in aligned blocks of this
/// size: one default memmap chunk, so an idle guest has the VMM register
/// about what it uses. The VMM registers at least the block, and may
/// register a larger aligned power-of-two block holding it (it does when
/// the host's memslots could not hold every 2 MiB block of a large VM);
/// the guest cannot tell and need not know.
pub const MEMORY_BLOCK_SIZE: u64 = DEFAULT_CHUNK_SIZE;

/// Largest run one [`port::MEM_ONLINE`] write registers: 128 MiB.
pub const MAX_ONLINE_RUN: u64 = 128 << 20;

/// What one [`port::MEM_ONLINE`] write for `gpa` registers: the aligned
/// run of this many bytes holding `gpa`. It is an eighth of the
/// power-of-two range `[2^k, 2^(k+1))` that holds `gpa`, between
/// [`MEMORY_BLOCK_SIZE`] and [`MAX_ONLINE_RUN`], so it is the same for
/// every address of the run, and runs never cross the 128 MiB-aligned hole
/// below 4 GiB. Low memory goes block by block (an idle guest registers
/// about what it uses); a guest that grows into all its RAM needs a few
/// dozen writes and memslots, not one per block. The guest may treat the
/// whole run as online once the write returns.
pub const fn online_run(gpa: u64) -> u64 {
    let octave = if gpa == 0 { 0 } else { 1u64 << (63 - gpa.leading_zeros()) };
    let run = octave / 8;
    if run < MEMORY_BLOCK_SIZE {
        MEMORY_BLOCK_SIZE
    } else if run > MAX_ONLINE_RUN {
        MAX_ONLINE_RUN
    } else {
        run
    }
}

/// The run starts of every [`online_run`] lying wholly inside
/// `[start, end)`, in address order (runs the range only partly covers are
/// left out).
pub fn online_runs_in(start: u64, end: u64) -> impl Iterator<Item = u64> {
    let mut at = start;
    core::iter::from_fn(move || {
        while at < end {
            let run = online_run(at);
            let run_start = at - at % run;
            let run_end = run_start.checked_add(run)?;
            at = run_end;
            if run_start >= start && run_end <= end {
                return Some(run_start);
            }
        }
        None
    })
}

/// `setup_data` type of a [`BootOnline`] entry. Linux's own types are small
/// numbers (`SETUP_E820_EXT` = 1 ... `SETUP_RNG_SEED` = 9) and bit 31 is
/// `SETUP_INDIRECT`; this one is "ONLN" in ASCII, little-endian.
pub const SETUP_BOOT_ONLINE: u32 = 0x4E4C_4E4F;

/// A `setup_data` entry's header (Linux `struct setup_data`,
/// `arch/x86/include/uapi/asm/bootparam.h`): the list starts at
/// `boot_params.hdr.setup_data` (offset [`SETUP_DATA_OFFSET`]) and `len`
/// payload bytes follow the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetupDataHeader {
    /// Guest-physical address of the next entry; 0 ends the list.
    pub next: u64,
    /// The entry's type ([`SETUP_BOOT_ONLINE`] for ours).
    pub kind: u32,
    /// Payload bytes after this header.
    pub len: u32,
}

const _: () = assert!(core::mem::size_of::<SetupDataHeader>() == 16);

/// Offset of `hdr.setup_data` (a `u64`) in `boot_params`.
pub const SETUP_DATA_OFFSET: u64 = 0x250;

/// The guest reads `setup_data` entries only if they lie wholly in RAM
/// below this address (the boot data area, identity-mapped at entry), and
/// follows at most [`MAX_SETUP_DATA_ENTRIES`] of them.
pub const SETUP_DATA_LIMIT: u64 = 0x10_0000;
/// Most `setup_data` entries the guest follows (a cycle ends there).
pub const MAX_SETUP_DATA_ENTRIES: usize = 16;

/// Most ranges a [`BootOnline`] entry lists.
pub const MAX_BOOT_ONLINE_RANGES: usize = 8;

/// The payload of the [`SETUP_BOOT_ONLINE`] `setup_data` entry: the guest
/// RAM the VMM registered with KVM before the vCPU first ran.
///
/// Each range is aligned to [`MEMORY_BLOCK_SIZE`], a whole number of
/// blocks, and inside the guest's RAM (below the end of its highest e820
/// RAM entry). The guest treats every [`online_run`] lying wholly inside a
/// range as online ([`online_runs_in`]), so its first allocation there
/// writes no [`port::MEM_ONLINE`]. A record that does not check
/// ([`BootOnline::ranges`]) is ignored as a whole: the guest then onlines
/// what it uses as a guest of an older VMM does. Runs the VMM registered
/// but the guest does not use cost KVM metadata only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootOnline {
    /// [`BOOT_ONLINE_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of valid entries in `ranges` (at most [`MAX_BOOT_ONLINE_RANGES`]).
    pub count: u32,
    /// Reserved; zero.
    pub reserved: u32,
    /// The registered ranges.
    pub ranges: [GpaRange; MAX_BOOT_ONLINE_RANGES],
}

const _: () = assert!(core::mem::size_of::<BootOnline>() == 16 + 16 * MAX_BOOT_ONLINE_RANGES);
const _: () = assert!(core::mem::offset_of!(BootOnline, count) == 8);
const _: () = assert!(core::mem::offset_of!(BootOnline, ranges) == 16);

/// Why a [`BootOnline`] record is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootOnlineError {
    /// `magic` is not [`BOOT_ONLINE_MAGIC`].
    BadMagic,
    /// `abi_version` is not this [`ABI_VERSION`].
    BadVersion(u32),
    /// `count` is above [`MAX_BOOT_ONLINE_RANGES`].
    TooMany(u32),
    /// Range `i` is empty, not block-aligned, or not inside RAM.
    BadRange(usize),
}

impl core::fmt::Display for BootOnlineError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootOnlineError::BadMagic => f.write_str("bad magic"),
            BootOnlineError::BadVersion(v) => write!(f, "ABI version {v}, not {ABI_VERSION}"),
            BootOnlineError::TooMany(n) => write!(f, "{n} ranges, at most {MAX_BOOT_ONLINE_RANGES}"),
            BootOnlineError::BadRange(i) => write!(f, "range {i} is empty, misaligned or outside RAM"),
        }
    }
}

impl BootOnline {
    /// A record listing `ranges` (the first [`MAX_BOOT_ONLINE_RANGES`]).
    pub fn new(ranges: &[GpaRange]) -> BootOnline {
        let mut rec = BootOnline { magic: BOOT_ONLINE_MAGIC, abi_version: ABI_VERSION, ..Default::default() };
        for (slot, r) in rec.ranges.iter_mut().zip(ranges) {
            *slot = *r;
            rec.count += 1;
        }
        rec
    }

    /// The ranges, if the whole record checks for a guest whose RAM ends
    /// at `ram_end`: magic, version, count, and every range non-empty,
    /// [`MEMORY_BLOCK_SIZE`]-aligned and below `ram_end`.
    pub fn ranges(&self, ram_end: u64) -> Result<&[GpaRange], BootOnlineError> {
        if self.magic != BOOT_ONLINE_MAGIC {
            return Err(BootOnlineError::BadMagic);
        }
        if self.abi_version != ABI_VERSION {
            return Err(BootOnlineError::BadVersion(self.abi_version));
        }
        let n = self.count as usize;
        if n > MAX_BOOT_ONLINE_RANGES {
            return Err(BootOnlineError::TooMany(self.count));
        }
        let ranges = &self.ranges[..n];
        for (i, r) in ranges.iter().enumerate() {
            let aligned = r.start % MEMORY_BLOCK_SIZE == 0 && r.len % MEMORY_BLOCK_SIZE == 0;
            if r.len == 0 || !aligned || r.start.checked_add(r.len).is_none_or(|e| e > ram_end) {
                return Err(BootOnlineError::BadRange(i));
            }
        }
        Ok(ranges)
    }
}

/// Ports below this number are granted to a ring-3 kernel through the TSS I/O
/// permission bitmap; every port this contract uses is below it.
pub const IO_BITMAP_PORTS: u16 = 0x600;

/// Boot phases the guest announces on [`port::PHASE`], in order.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Kernel entry, after the minimal ring-0 set-up (in ring 3 if `cpl=3`).
    Entered = 1,
    /// The memory manager has done its boot-time memmap work.
    MemoryReady = 2,
    /// The guest is ready for work (the boot is over).
    Ready = 3,
}

impl Phase {
    /// Decodes a value written by the guest.
    pub fn decode(raw: u32) -> Option<Phase> {
        match raw {
            1 => Some(Phase::Entered),
            2 => Some(Phase::MemoryReady),
            3 => Some(Phase::Ready),
            _ => None,
        }
    }
}

/// Exit codes the guest uses on [`port::EXIT`].
pub mod exit_code {
    /// Clean shutdown.
    pub const OK: u32 = 0;
    /// The kernel panicked.
    pub const PANIC: u32 = 101;
    /// The kernel could not boot (bad boot parameters, no memory, ...).
    pub const BOOT_FAILED: u32 = 102;
}

/// How the guest initializes its memmap (`memmap_init=` on its command line).
/// With the `serde` feature it is also the API's JSON value, spelled as
/// [`Strategy::name`] gives it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
pub enum Strategy {
    /// Every struct page before the guest is ready.
    Eager = 0,
    /// Like eager, split across all vCPUs.
    Parallel = 1,
    /// One section before ready, the rest in the background.
    Deferred = 2,
    /// One chunk at boot, more when an allocation needs it (the default).
    #[default]
    OnDemand = 3,
}

impl core::fmt::Display for Strategy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl Strategy {
    /// All strategies, in their numeric order.
    pub const ALL: [Strategy; 4] = [
        Strategy::Eager,
        Strategy::Parallel,
        Strategy::Deferred,
        Strategy::OnDemand,
    ];

    /// The name used on command lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::Eager => "eager",
            Strategy::Parallel => "parallel",
            Strategy::Deferred => "deferred",
            Strategy::OnDemand => "ondemand",
        }
    }

    /// Parses a name as written by [`Strategy::name`].
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }

    /// What the strategy does, in one line (for help texts).
    pub const fn summary(self) -> &'static str {
        match self {
            Strategy::Eager => "Every struct page before the guest is ready",
            Strategy::Parallel => "Eager, split across all vCPUs",
            Strategy::Deferred => "One section before ready, the rest in the background",
            Strategy::OnDemand => "One chunk at boot, more when allocations need it",
        }
    }

    /// Decodes the raw value from a [`StatsBlock`].
    pub fn decode(raw: u32) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| *s as u32 == raw)
    }
}

/// How much freed memory the guest gives back to the host (`reclaim=` on its
/// command line). With the `serde` feature it is also the API's JSON value.
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize), serde(rename_all = "lowercase"))]
pub enum Reclaim {
    /// Nothing: the host keeps whatever the guest once touched.
    #[default]
    Off = 0,
    /// Free data pages only ([`reclaim_kind::DATA`]), as a balloon with free
    /// page reporting gives Firecracker or Cloud Hypervisor.
    Data = 1,
    /// Data pages, the memmap of chunks that went back to uninitialized
    /// ([`reclaim_kind::MEMMAP`]) and whole runs with no initialized chunk
    /// left, whose KVM memslots the VMM deletes ([`reclaim_kind::OFFLINE`]).
    /// Only for the on-demand strategy.
    Full = 2,
}

impl Reclaim {
    /// All modes, in their numeric order.
    pub const ALL: [Reclaim; 3] = [Reclaim::Off, Reclaim::Data, Reclaim::Full];

    /// The name used on command lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Reclaim::Off => "off",
            Reclaim::Data => "data",
            Reclaim::Full => "full",
        }
    }

    /// Parses a name as written by [`Reclaim::name`].
    pub fn from_name(name: &str) -> Option<Reclaim> {
        Reclaim::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Decodes the raw value from a [`StatsBlock`].
    pub fn decode(raw: u32) -> Option<Reclaim> {
        Reclaim::ALL.into_iter().find(|r| *r as u32 == raw)
    }
}

impl core::fmt::Display for Reclaim {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Default delay before free memory is reported (`reclaim_delay_ms=`), as
/// Linux's `page_reporting` delay.
pub const DEFAULT_RECLAIM_DELAY_MS: u32 = 2000;

/// What a `WAIT` read returns when its [`port::WAIT_TIMEOUT`] passed with no
/// command (command sequence numbers start at 1).
pub const WAIT_TIMED_OUT: u32 = 0;

/// Longest [`port::WAIT_TIMEOUT`] the VMM honours; longer values are clamped.
pub const MAX_WAIT_TIMEOUT_MS: u32 = 60_000;

/// Kinds of [`ReclaimRange`].
pub mod reclaim_kind {
    /// Free data pages: chunk-aligned (the stats block's `chunk_bytes`),
    /// whole chunks, inside RAM, outside the memmap, the kernel and the boot
    /// data. The VMM discards them.
    pub const DATA: u32 = 1;
    /// Memmap pages that describe only uninitialized chunks: page-aligned,
    /// inside the stats block's memmap ranges. The VMM discards them.
    pub const MEMMAP: u32 = 2;
    /// A whole [`crate::online_run`] with no initialized chunk left (aligned
    /// to and as long as its run, outside the kernel and the boot data; its
    /// memmap pages, if any, describe only uninitialized chunks). The VMM
    /// discards it and deletes its KVM registration; the guest writes
    /// [`crate::port::MEM_ONLINE`] again before it uses it.
    pub const OFFLINE: u32 = 3;
}

/// Most ranges one [`ReclaimRecord`] carries.
pub const MAX_RECLAIM_RANGES: usize = 64;

/// One range of a [`ReclaimRecord`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimRange {
    /// First byte (guest-physical).
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// A [`reclaim_kind`] value.
    pub kind: u32,
    /// Reserved; zero.
    pub reserved: u32,
}

/// A report of memory the guest gives back, at the address written to
/// [`port::RECLAIM`].
///
/// The guest fills `magic`, `abi_version`, `count` and the first `count`
/// ranges, which must be disjoint. The VMM sets bit `i` of `accepted` for each
/// range it validated and discarded, and clears the others; the guest must
/// treat a rejected range as still resident and never report it again as is.
/// A record with a bad magic, version or count is rejected as a whole
/// (`accepted` = 0). A guest whose ranges the VMM rejects has its memory
/// report marked invalid.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReclaimRecord {
    /// [`RECLAIM_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of valid entries in `ranges` (at most [`MAX_RECLAIM_RANGES`]).
    pub count: u32,
    /// Reserved; zero.
    pub reserved: u32,
    /// Bit `i` set: range `i` was accepted and discarded (VMM writes).
    pub accepted: u64,
    /// The ranges.
    pub ranges: [ReclaimRange; MAX_RECLAIM_RANGES],
}

impl Default for ReclaimRecord {
    fn default() -> Self {
        ReclaimRecord {
            magic: RECLAIM_MAGIC,
            abi_version: ABI_VERSION,
            count: 0,
            reserved: 0,
            accepted: 0,
            ranges: [ReclaimRange::default(); MAX_RECLAIM_RANGES],
        }
    }
}

const _: () = assert!(core::mem::size_of::<ReclaimRange>() == 24);
const _: () = assert!(core::mem::size_of::<ReclaimRecord>() == 24 + 24 * MAX_RECLAIM_RANGES);
const _: () = assert!(MAX_RECLAIM_RANGES <= 64, "`accepted` has one bit per range");

/// Bits of [`StatsBlock::flags`].
pub mod stats_flags {
    /// The allocator's slow path still checks for uninitialized memory.
    pub const GROW_CHECK_ON: u32 = 1 << 0;
    /// Each section's memmap lives at the start of the section.
    pub const MEMMAP_ON_MEMORY: u32 = 1 << 1;
    /// Every struct page is initialized.
    pub const FULLY_INITIALIZED: u32 = 1 << 2;
    /// The grow check's jump sites are patched out of the allocator's code.
    pub const JUMP_SITES_PATCHED: u32 = 1 << 3;
    /// The boot CPU entered at the image's ring-3 entry
    /// ([`crate::entry_note`]): no ring-0 prologue ran.
    pub const RING3_ENTRY: u32 = 1 << 4;
    /// The block was filled by a test workload with deliberate garbage.
    pub const TEST_CORRUPT: u32 = 1 << 31;
}

/// A contiguous guest-physical range, `[start, start + len)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpaRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Most memmap ranges a stats block may list (one per section at most).
pub const MAX_MEMMAP_RANGES: usize = 32;

/// The guest's memory report, published at the address given on [`port::STATS`].
///
/// The guest increments `seq` to an odd value before it changes any field and
/// to the next even value after; a reader that sees the same even `seq`
/// before and after copying the block has a consistent snapshot. All byte
/// counts are bytes, page counts are 4 KiB pages, cycles are guest TSC cycles.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsBlock {
    /// [`STATS_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Sequence counter: odd while the guest is writing.
    pub seq: u64,
    /// [`Strategy`] as `u32`.
    pub strategy: u32,
    /// [`stats_flags`] bits.
    pub flags: u32,
    /// Memory covered by one memmap chunk, in bytes.
    pub chunk_bytes: u64,
    /// Memory covered by one memmap section, in bytes.
    pub section_bytes: u64,
    /// Pages of RAM covered by the memmap.
    pub total_pages: u64,
    /// Pages whose struct page is initialized.
    pub initialized_pages: u64,
    /// Pages handed out by the allocator.
    pub allocated_pages: u64,
    /// Pages on the allocator's free lists.
    pub free_pages: u64,
    /// Pages reserved (kernel, boot data, the memmap itself).
    pub reserved_pages: u64,
    /// Bytes of guest RAM set aside for the memmap.
    pub memmap_bytes_reserved: u64,
    /// Bytes of memmap written (initialized struct pages, in whole struct pages).
    pub memmap_bytes_initialized: u64,
    /// Chunks in the memmap.
    pub chunks_total: u64,
    /// Chunks whose struct pages are initialized.
    pub chunks_initialized: u64,
    /// Times the allocator's slow path grew the initialized memory.
    pub grow_events: u64,
    /// Guest TSC cycles spent initializing struct pages.
    pub init_cycles: u64,
    /// Allocations that failed after growing (out of memory).
    pub alloc_failures: u64,
    /// Number of vCPUs the guest runs on.
    pub cpus: u32,
    /// Number of valid entries in `memmap_ranges`.
    pub memmap_range_count: u32,
    /// Where the memmap lives in guest-physical memory.
    pub memmap_ranges: [GpaRange; MAX_MEMMAP_RANGES],
    /// Guest TSC at kernel entry.
    pub tsc_entry: u64,
    /// Guest TSC when the memory manager finished its boot-time work.
    pub tsc_memory_ready: u64,
    /// Guest TSC when the guest became ready.
    pub tsc_ready: u64,
    /// Guest TSC when background initialization finished (0 if not yet).
    pub tsc_fully_initialized: u64,
    /// [`Reclaim`] mode as `u32`.
    pub reclaim: u32,
    /// Delay, in ms, before free memory is reported.
    pub reclaim_delay_ms: u32,
    /// Bytes the guest reported and the VMM accepted, all kinds together.
    pub reclaim_reported_bytes: u64,
    /// [`port::RECLAIM`] writes the guest made.
    pub reclaim_events: u64,
    /// Chunks that went back from initialized to uninitialized.
    pub chunks_deinitialized: u64,
    /// Reserved for future fields; zero.
    pub reserved: [u64; 6],
}

const _: () = assert!(core::mem::size_of::<StatsBlock>() == 768);
const _: () = assert!(core::mem::size_of::<GpaRange>() == 16);

/// Commands the VMM puts in the [`Mailbox`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Refresh the stats block; no other effect.
    Report = 1,
    /// Allocate and write `arg0` bytes more (`arg1` bit 0: do not write them).
    Alloc = 2,
    /// Free `arg0` bytes of what earlier commands allocated.
    Free = 3,
    /// Allocate or free so the workload holds `arg0` bytes.
    SetTarget = 4,
    /// Shut down with exit code `arg0`.
    Shutdown = 5,
    /// Benchmark: `arg0` order-0 alloc+free pairs; `result0` = TSC cycles,
    /// `result1` bit 0 = grow check on, bit 1 = its jump sites patched out.
    BenchAllocFree = 6,
}

impl Command {
    /// Decodes a raw command code.
    pub fn decode(raw: u32) -> Option<Command> {
        match raw {
            1 => Some(Command::Report),
            2 => Some(Command::Alloc),
            3 => Some(Command::Free),
            4 => Some(Command::SetTarget),
            5 => Some(Command::Shutdown),
            6 => Some(Command::BenchAllocFree),
            _ => None,
        }
    }
}

/// Outcome of a command, in [`Mailbox::status`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandStatus {
    /// Not finished (or never started).
    Pending = 0,
    /// Done.
    Ok = 1,
    /// The allocation could not be satisfied even after growing; what could
    /// be allocated stays allocated and the guest stays usable.
    OutOfMemory = 2,
    /// Unknown command or bad argument.
    Invalid = 3,
}

impl CommandStatus {
    /// Decodes a raw status.
    pub fn decode(raw: u32) -> Option<CommandStatus> {
        match raw {
            0 => Some(CommandStatus::Pending),
            1 => Some(CommandStatus::Ok),
            2 => Some(CommandStatus::OutOfMemory),
            3 => Some(CommandStatus::Invalid),
            _ => None,
        }
    }
}

/// The command mailbox, at the address given on [`port::MAILBOX`].
///
/// The VMM writes the whole record at once (`seq` one more than the last,
/// `cmd`, `arg0`, `arg1`, `status` = `Pending`, results zero) while the
/// guest's vCPU is out of the guest in its [`port::WAIT`] read, then answers
/// that read with `seq`; the guest therefore never sees a half-written
/// record. The guest writes `status`, `result0`, `result1`, then
/// `done_seq = seq`, then writes `seq` to [`port::DONE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mailbox {
    /// [`MAILBOX_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Sequence number of the current command (VMM writes).
    pub seq: u64,
    /// [`Command`] as `u32` (VMM writes).
    pub cmd: u32,
    /// [`CommandStatus`] as `u32` (guest writes).
    pub status: u32,
    /// First argument (VMM writes).
    pub arg0: u64,
    /// Second argument (VMM writes).
    pub arg1: u64,
    /// Sequence number of the last finished command (guest writes).
    pub done_seq: u64,
    /// First result (guest writes): bytes the workload holds afterwards, or
    /// the benchmark's cycles.
    pub result0: u64,
    /// Second result (guest writes): command-specific.
    pub result1: u64,
}

const _: () = assert!(core::mem::size_of::<Mailbox>() == 64);

/// Application-processor boot record, at the address given on [`port::AP_BOOT`].
///
/// The VMM starts vCPU `i` (1 <= i < `cpu_count`) in 64-bit mode with the
/// same segments and control registers as the BSP had at entry, `CR3` =
/// `cr3`, `RIP` = `entry`, `RSP` = `stacks_base + i * stack_size` (the top of
/// its stack; stack `i` spans `stacks_base + (i - 1) * stack_size ..`), and
/// `RDI` = `i`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApBoot {
    /// [`AP_BOOT_MAGIC`].
    pub magic: u32,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Guest-physical (identity-mapped) entry point for application processors.
    pub entry: u64,
    /// Page-table root the application processors start with.
    pub cr3: u64,
    /// Base of the application processors' stacks.
    pub stacks_base: u64,
    /// Size of each stack.
    pub stack_size: u64,
    /// Number of CPUs the guest wants started, BSP included.
    pub cpu_count: u32,
    /// Reserved; zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<ApBoot>() == 48);

#[cfg(test)]
extern crate std;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategy_names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::from_name(s.name()), Some(s));
            assert_eq!(Strategy::decode(s as u32), Some(s));
        }
        assert_eq!(Strategy::from_name("lazy"), None);
        assert_eq!(Strategy::decode(4), None);
    }

    #[test]
    fn command_and_status_decode_rejects_unknown_values() {
        assert_eq!(Command::decode(2), Some(Command::Alloc));
        assert_eq!(Command::decode(0), None);
        assert_eq!(Command::decode(u32::MAX), None);
        assert_eq!(CommandStatus::decode(2), Some(CommandStatus::OutOfMemory));
        assert_eq!(CommandStatus::decode(9), None);
        assert_eq!(Phase::decode(3), Some(Phase::Ready));
        assert_eq!(Phase::decode(0), None);
    }

    // The port map is checked at compile time.
    const _: () = assert!(port::PV_BASE >= port::SERIAL_COM1 + 8, "paravirtual ports overlap COM1");
    const _: () = assert!(port::PV_END <= IO_BITMAP_PORTS, "the ring-3 I/O bitmap misses a port");

    #[test]
    fn reclaim_names_round_trip() {
        for r in Reclaim::ALL {
            assert_eq!(Reclaim::from_name(r.name()), Some(r));
            assert_eq!(Reclaim::decode(r as u32), Some(r));
        }
        assert_eq!(Reclaim::from_name("all"), None);
        assert_eq!(Reclaim::decode(3), None);
    }

    #[test]
    fn ports_are_32_bit_aligned() {
        for p in [port::IDENT, port::EXIT, port::PHASE, port::STATS, port::MAILBOX, port::WAIT, port::POLL, port::DONE,
                  port::EXCEPTION, port::AP_BOOT, port::AP_PARK, port::AP_RELEASE, port::CPU_COUNT, port::MEM_ONLINE,
                  port::WAIT_TIMEOUT, port::RECLAIM] {
            assert_eq!((p - port::PV_BASE) % 4, 0, "{p:#x}");
            assert!(p < port::PV_END);
        }
    }

    #[test]
    fn default_chunk_is_32_kib_of_memmap() {
        assert_eq!(DEFAULT_CHUNK_SIZE / PAGE_SIZE * STRUCT_PAGE_SIZE, 32 << 10);
        assert_eq!(SECTION_SIZE % DEFAULT_CHUNK_SIZE, 0);
        // `port::MEM_ONLINE` carries `gpa >> 20`: a block is whole MiBs.
        assert!(MEMORY_BLOCK_SIZE.is_power_of_two() && MEMORY_BLOCK_SIZE >= 1 << 20);
    }

    #[test]
    fn a_boot_online_record_checks_as_a_whole() {
        const MIB: u64 = 1 << 20;
        let ranges = [GpaRange { start: 0, len: 6 * MIB }, GpaRange { start: 36 * MIB, len: 4 * MIB }];
        let rec = BootOnline::new(&ranges);
        assert_eq!(rec.ranges(2048 * MIB), Ok(&ranges[..]));
        assert_eq!(rec.ranges(38 * MIB), Err(BootOnlineError::BadRange(1)), "past the end of RAM");
        let bad = |f: fn(&mut BootOnline)| {
            let mut r = rec;
            f(&mut r);
            r.ranges(2048 * MIB).map(|x| x.to_vec())
        };
        assert_eq!(bad(|r| r.magic ^= 1), Err(BootOnlineError::BadMagic));
        assert_eq!(bad(|r| r.abi_version = 3), Err(BootOnlineError::BadVersion(3)));
        assert_eq!(bad(|r| r.count = 9), Err(BootOnlineError::TooMany(9)));
        assert_eq!(bad(|r| r.count = u32::MAX), Err(BootOnlineError::TooMany(u32::MAX)));
        assert_eq!(bad(|r| r.ranges[0].start = MIB), Err(BootOnlineError::BadRange(0)), "misaligned");
        assert_eq!(bad(|r| r.ranges[1].len = MIB), Err(BootOnlineError::BadRange(1)), "part of a block");
        assert_eq!(bad(|r| r.ranges[1].len = 0), Err(BootOnlineError::BadRange(1)));
        assert_eq!(bad(|r| r.ranges[1] = GpaRange { start: u64::MAX - MEMORY_BLOCK_SIZE + 1, len: 2 * MEMORY_BLOCK_SIZE }), Err(BootOnlineError::BadRange(1)));
        // Only the first `count` ranges count; more than fit are cut.
        assert_eq!(bad(|r| r.count = 1), Ok(ranges[..1].to_vec()));
        assert_eq!(BootOnline::new(&[ranges[0]; 20]).count as usize, MAX_BOOT_ONLINE_RANGES);
        assert_eq!(core::mem::offset_of!(SetupDataHeader, len), 12);
    }

    #[test]
    fn online_runs_in_a_range_are_the_whole_ones() {
        const MIB: u64 = 1 << 20;
        let runs = |s, e| online_runs_in(s, e).collect::<std::vec::Vec<_>>();
        assert_eq!(runs(0, 6 * MIB), [0, 2 * MIB, 4 * MIB]);
        // 36..40 MiB is one 4 MiB run; 34..38 holds no run wholly.
        assert_eq!(runs(36 * MIB, 40 * MIB), [36 * MIB]);
        assert_eq!(runs(34 * MIB, 38 * MIB), [] as [u64; 0]);
        assert_eq!(runs(30 * MIB, 40 * MIB), [30 * MIB, 32 * MIB, 36 * MIB]);
        assert_eq!(runs(5, 4), [] as [u64; 0]);
        assert_eq!(runs(u64::MAX - MIB, u64::MAX), [] as [u64; 0]);
        for r in runs(0, 4 << 30) {
            assert_eq!(r % online_run(r), 0);
        }
    }

    #[test]
    fn online_runs_grow_with_the_address_and_are_constant_within_a_run() {
        const MIB: u64 = 1 << 20;
        assert_eq!(online_run(0), MEMORY_BLOCK_SIZE);
        assert_eq!(online_run(15 * MIB), MEMORY_BLOCK_SIZE);
        assert_eq!(online_run(32 * MIB), 4 * MIB);
        assert_eq!(online_run(63 * MIB), 4 * MIB);
        assert_eq!(online_run(1 << 30), MAX_ONLINE_RUN);
        assert_eq!(online_run(u64::MAX), MAX_ONLINE_RUN);
        let mut gpa = 0;
        let mut runs = 0;
        while gpa < 64 << 30 {
            let run = online_run(gpa);
            assert!(run.is_power_of_two() && gpa % run == 0, "{gpa:#x}");
            assert_eq!(online_run(gpa + run - 1), run, "{gpa:#x}");
            // No run crosses the hole below 4 GiB.
            assert!(gpa + run <= 3 << 30 || gpa >= 3 << 30);
            if gpa < 2 << 30 {
                runs += 1;
            }
            gpa += run;
        }
        assert_eq!(runs, 64, "2 GiB: 8 blocks below 16 MiB, 8 runs per octave, 8 of 128 MiB");
    }
}
