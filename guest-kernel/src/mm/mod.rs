//! The physical memory manager: struct pages, a lazily initialized memmap and
//! a buddy allocator, with four ways to initialize the memmap.
//!
//! A Linux guest keeps a 64-byte struct page per 4 KiB page (1.56% of RAM).
//! This manager reserves that memmap out of guest RAM but writes a piece of
//! it only when the struct pages in it are initialized, so the host never
//! backs metadata for memory the guest never used.
//!
//! # Using it
//!
//! 1. Keep one [`MemoryManager`] in a `static` (`static MM: MemoryManager =
//!    MemoryManager::empty();`; it holds its own fixed-size bookkeeping, no
//!    heap is needed).
//! 2. Call [`MemoryManager::init`] once with a [`MmConfig`], the usable RAM
//!    ranges from e820 and the ranges already in use (kernel image, boot
//!    data, stacks). It computes the layout and writes no memmap.
//! 3. Call [`MemoryManager::boot_init`]: it initializes what the strategy
//!    needs before the guest is ready (see [`guest_abi::Strategy`]):
//!    - `Eager`: every chunk.
//!    - `Parallel`: nothing; every CPU then calls
//!      [`MemoryManager::parallel_init_share`] and one CPU, after all shares
//!      are done, [`MemoryManager::parallel_finish`]. No allocation succeeds
//!      before that.
//!    - `Deferred`: the first section with memory; then
//!      [`MemoryManager::background_step`] initializes one chunk per call,
//!      from another CPU or between commands.
//!    - `OnDemand`: the first chunk with allocatable memory.
//! 4. Allocate with [`MemoryManager::alloc_pages`], free with
//!    [`MemoryManager::free_pages`], keep blocks on a [`BlockList`].
//!
//! Memory whose struct pages are not initialized is on no free list: it waits
//! behind the zone's frontier and is initialized chunk by chunk, in address
//! order. When the free lists cannot serve a request (or drop below the low
//! watermark) the allocator grows the initialized memory itself, so
//! allocations never fail while uninitialized memory remains. Once nothing is
//! left behind the frontier, a [`static_key::StaticKey`] switches the grow
//! check off.
//!
//! Modules: [`addr`] (typed addresses), [`page`] (struct page and its
//! states), [`memmap`] (layout, init bitmap), [`buddy`] (free lists),
//! [`manager`] (the manager, its locking and strategies), [`spinlock`],
//! [`static_key`].

pub mod addr;
pub mod buddy;
pub mod manager;
pub mod memmap;
pub mod page;
pub mod spinlock;
pub mod static_key;

use core::fmt;

use guest_abi::{
    stats_flags, GpaRange, StatsBlock, Strategy, DEFAULT_CHUNK_SIZE, MAX_MEMMAP_RANGES,
    MIN_CHUNK_SIZE, SECTION_SIZE,
};

pub use addr::{Pfn, PfnRange, PhysAddr, PhysRange};
pub use buddy::MAX_ORDER;
pub use manager::{BlockList, MemoryManager};

/// Largest section allowed (the memmap of a section must fit in the section
/// with `memmap_on_memory`).
pub const MAX_SECTION_SIZE: u64 = 1 << 30;

/// How the memory manager lays out and initializes the memmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmConfig {
    /// When struct pages are initialized.
    pub strategy: Strategy,
    /// Memory covered by one init chunk (a bit of the init bitmap): a power of
    /// two from [`MIN_CHUNK_SIZE`] to `section_bytes`.
    pub chunk_bytes: u64,
    /// Memory covered by one memmap section: a power of two from
    /// `chunk_bytes` to [`MAX_SECTION_SIZE`].
    pub section_bytes: u64,
    /// Put each section's memmap in the section itself instead of one array
    /// in low memory.
    pub memmap_on_memory: bool,
    /// Low watermark, in pages. While memory is still uninitialized, an
    /// allocation that leaves fewer free pages than this on the free lists
    /// initializes one more chunk before it returns, so the next allocations
    /// find pages without growing. 0 (the default) grows only when a request
    /// cannot be served, which keeps `OnDemand` at its minimum footprint.
    pub low_watermark_pages: u64,
}

impl MmConfig {
    /// The default layout (2 MiB chunks, 128 MiB sections, memmap in low
    /// memory, no watermark) with the given strategy.
    pub const fn new(strategy: Strategy) -> MmConfig {
        MmConfig {
            strategy,
            chunk_bytes: DEFAULT_CHUNK_SIZE,
            section_bytes: SECTION_SIZE,
            memmap_on_memory: false,
            low_watermark_pages: 0,
        }
    }

    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), MmConfigError> {
        if !self.chunk_bytes.is_power_of_two() {
            return Err(MmConfigError::ChunkNotPowerOfTwo);
        }
        if self.chunk_bytes < MIN_CHUNK_SIZE {
            return Err(MmConfigError::ChunkTooSmall);
        }
        if !self.section_bytes.is_power_of_two() {
            return Err(MmConfigError::SectionNotPowerOfTwo);
        }
        if self.section_bytes > MAX_SECTION_SIZE {
            return Err(MmConfigError::SectionTooLarge);
        }
        if self.chunk_bytes > self.section_bytes {
            return Err(MmConfigError::ChunkLargerThanSection);
        }
        Ok(())
    }
}

/// An invalid [`MmConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmConfigError {
    /// `chunk_bytes` is not a power of two.
    ChunkNotPowerOfTwo,
    /// `chunk_bytes` is below [`MIN_CHUNK_SIZE`].
    ChunkTooSmall,
    /// `chunk_bytes` is larger than `section_bytes`.
    ChunkLargerThanSection,
    /// `section_bytes` is not a power of two.
    SectionNotPowerOfTwo,
    /// `section_bytes` is above [`MAX_SECTION_SIZE`].
    SectionTooLarge,
}

impl fmt::Display for MmConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmConfigError::ChunkNotPowerOfTwo => "chunk size must be a power of two",
            MmConfigError::ChunkTooSmall => "chunk size must be at least 128 KiB",
            MmConfigError::ChunkLargerThanSection => "chunk size must not exceed the section size",
            MmConfigError::SectionNotPowerOfTwo => "section size must be a power of two",
            MmConfigError::SectionTooLarge => "section size must be at most 1 GiB",
        })
    }
}

/// Why [`MemoryManager::init`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmInitError {
    /// The configuration is invalid.
    Config(MmConfigError),
    /// `init` was already called on this manager.
    AlreadyInitialized,
    /// No whole page of RAM was given.
    NoRam,
    /// More than [`memmap::MAX_RANGES`] RAM or reserved ranges were given.
    TooManyRanges,
    /// RAM extends above [`memmap::MAX_PHYS_BYTES`].
    RamTooLarge,
    /// RAM spans more than [`memmap::MAX_SECTIONS`] sections.
    TooManySections,
    /// No unreserved RAM is large enough to hold the memmap where it must go.
    MemmapDoesNotFit,
}

impl fmt::Display for MmInitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmInitError::Config(e) => write!(f, "invalid memory configuration: {e}"),
            MmInitError::AlreadyInitialized => f.write_str("memory manager already initialized"),
            MmInitError::NoRam => f.write_str("no usable RAM"),
            MmInitError::TooManyRanges => f.write_str("too many memory ranges (at most 64)"),
            MmInitError::RamTooLarge => f.write_str("RAM above 128 GiB is not supported"),
            MmInitError::TooManySections => {
                f.write_str("too many sections; use a larger section size")
            }
            MmInitError::MemmapDoesNotFit => f.write_str("no free RAM large enough for the memmap"),
        }
    }
}

impl From<MmConfigError> for MmInitError {
    fn from(e: MmConfigError) -> MmInitError {
        MmInitError::Config(e)
    }
}

/// Why [`MemoryManager::boot_init`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmBootError {
    /// `init` has not succeeded.
    NotInitialized,
    /// `boot_init` was already called.
    AlreadyBooted,
}

impl fmt::Display for MmBootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmBootError::NotInitialized => "memory manager not initialized",
            MmBootError::AlreadyBooted => "memmap boot initialization already done",
        })
    }
}

/// Why a parallel-initialization call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmParallelError {
    /// The strategy is not `Parallel`.
    WrongStrategy,
    /// `boot_init` has not run.
    NotBooted,
    /// `cpu >= ncpus`, `ncpus` is 0 or above 64, or differs from an earlier call.
    BadShare,
    /// This CPU's share was already started.
    ShareTaken,
    /// `parallel_finish` ran before every share was done.
    SharesIncomplete,
    /// `parallel_finish` already ran.
    AlreadyFinished,
}

impl fmt::Display for MmParallelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmParallelError::WrongStrategy => "memmap strategy is not parallel",
            MmParallelError::NotBooted => "boot_init has not run",
            MmParallelError::BadShare => "bad cpu or cpu count for a parallel share",
            MmParallelError::ShareTaken => "this cpu's share already ran",
            MmParallelError::SharesIncomplete => "not every share is done",
            MmParallelError::AlreadyFinished => "parallel initialization already finished",
        })
    }
}

/// Why [`MemoryManager::free_pages`] refused a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmFreeError {
    /// The order is above [`MAX_ORDER`].
    BadOrder,
    /// The frame is not aligned to the order.
    Misaligned,
    /// The frame is not the head of an allocated block.
    NotAllocated,
    /// The block was allocated with another order.
    OrderMismatch,
}

impl fmt::Display for MmFreeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MmFreeError::BadOrder => "order above MAX_ORDER",
            MmFreeError::Misaligned => "frame not aligned to its order",
            MmFreeError::NotAllocated => "frame is not an allocated block",
            MmFreeError::OrderMismatch => "block was allocated with another order",
        })
    }
}

/// Why [`MemoryManager::list_push`] refused a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmListError {
    /// The frame is not the head of an allocated block of that order.
    NotAllocatedBlock,
}

impl fmt::Display for MmListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("frame is not an allocated block of that order")
    }
}

/// A snapshot of the manager's counters. Page counts are 4 KiB pages of RAM.
///
/// `free_pages + allocated_pages + reserved_pages + pending_pages ==
/// total_pages` always holds: reserved pages are known from the layout at
/// `init` (initialized or not), pending pages are allocatable pages still
/// behind the frontier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmStats {
    /// Strategy in use.
    pub strategy: Strategy,
    /// Memory per chunk, bytes.
    pub chunk_bytes: u64,
    /// Memory per section, bytes.
    pub section_bytes: u64,
    /// Memmap placed in each section.
    pub memmap_on_memory: bool,
    /// Pages of RAM covered by the memmap.
    pub total_pages: u64,
    /// Pages of RAM whose struct page is initialized.
    pub initialized_pages: u64,
    /// Pages handed out.
    pub allocated_pages: u64,
    /// Pages on the free lists.
    pub free_pages: u64,
    /// Pages reserved (caller ranges and the memmap).
    pub reserved_pages: u64,
    /// Allocatable pages not yet initialized.
    pub pending_pages: u64,
    /// Bytes of RAM reserved for the memmap.
    pub memmap_bytes_reserved: u64,
    /// Initialized struct pages (holes inside a span included) × 64.
    pub memmap_bytes_initialized: u64,
    /// Chunks with memmap.
    pub chunks_total: u64,
    /// Chunks initialized.
    pub chunks_initialized: u64,
    /// Chunks initialized by the allocator's slow path (or watermark).
    pub grow_events: u64,
    /// Clock cycles spent initializing struct pages and freeing them into the
    /// buddy, summed over CPUs.
    pub init_cycles: u64,
    /// Allocations that failed after growing.
    pub alloc_failures: u64,
    /// The allocator still checks for uninitialized memory.
    pub grow_check_on: bool,
    /// Nothing is left behind the frontier: every chunk is initialized
    /// (`OnDemand`: every chunk with an allocatable page; wholly reserved
    /// chunks are never initialized by it).
    pub fully_initialized: bool,
}

impl MmStats {
    /// The [`stats_flags`] bits.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.grow_check_on {
            f |= stats_flags::GROW_CHECK_ON;
        }
        if self.memmap_on_memory {
            f |= stats_flags::MEMMAP_ON_MEMORY;
        }
        if self.fully_initialized {
            f |= stats_flags::FULLY_INITIALIZED;
        }
        f
    }

    /// Copies the counters into the VMM-facing block (not `magic`, `seq`,
    /// `cpus`, timestamps or memmap ranges, which the kernel owns).
    pub fn write_to(&self, b: &mut StatsBlock) {
        b.strategy = self.strategy as u32;
        b.flags = (b.flags & stats_flags::TEST_CORRUPT) | self.flags();
        b.chunk_bytes = self.chunk_bytes;
        b.section_bytes = self.section_bytes;
        b.total_pages = self.total_pages;
        b.initialized_pages = self.initialized_pages;
        b.allocated_pages = self.allocated_pages;
        b.free_pages = self.free_pages;
        b.reserved_pages = self.reserved_pages;
        b.memmap_bytes_reserved = self.memmap_bytes_reserved;
        b.memmap_bytes_initialized = self.memmap_bytes_initialized;
        b.chunks_total = self.chunks_total;
        b.chunks_initialized = self.chunks_initialized;
        b.grow_events = self.grow_events;
        b.init_cycles = self.init_cycles;
        b.alloc_failures = self.alloc_failures;
    }
}

/// The physical ranges holding the memmap, adjacent ones merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapRanges {
    ranges: [PhysRange; MAX_MEMMAP_RANGES],
    count: usize,
    complete: bool,
}

impl MemmapRanges {
    pub(crate) fn collect(iter: impl Iterator<Item = PhysRange>) -> MemmapRanges {
        let mut m = MemmapRanges {
            ranges: [PhysRange::default(); MAX_MEMMAP_RANGES],
            count: 0,
            complete: true,
        };
        for r in iter {
            if m.count == MAX_MEMMAP_RANGES {
                m.complete = false;
                break;
            }
            m.ranges[m.count] = r;
            m.count += 1;
        }
        m
    }

    /// The ranges, in address order of their sections.
    pub fn as_slice(&self) -> &[PhysRange] {
        &self.ranges[..self.count]
    }

    /// False if there were more than [`MAX_MEMMAP_RANGES`] ranges (only with
    /// `memmap_on_memory` and more than 32 sections); the first ones are kept.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Copies the ranges into the VMM-facing block.
    pub fn write_to(&self, b: &mut StatsBlock) {
        b.memmap_ranges = [GpaRange::default(); MAX_MEMMAP_RANGES];
        for (dst, src) in b.memmap_ranges.iter_mut().zip(self.as_slice()) {
            *dst = src.to_gpa();
        }
        b.memmap_range_count = self.count as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_problem() {
        let ok = MmConfig::new(Strategy::OnDemand);
        assert_eq!(ok.validate(), Ok(()));
        let c = |chunk, section| MmConfig {
            chunk_bytes: chunk,
            section_bytes: section,
            ..ok
        };
        assert_eq!(
            c(3 << 20, SECTION_SIZE).validate(),
            Err(MmConfigError::ChunkNotPowerOfTwo)
        );
        assert_eq!(
            c(64 << 10, SECTION_SIZE).validate(),
            Err(MmConfigError::ChunkTooSmall)
        );
        assert_eq!(
            c(256 << 20, SECTION_SIZE).validate(),
            Err(MmConfigError::ChunkLargerThanSection)
        );
        assert_eq!(
            c(2 << 20, 96 << 20).validate(),
            Err(MmConfigError::SectionNotPowerOfTwo)
        );
        assert_eq!(
            c(2 << 20, 2 << 30).validate(),
            Err(MmConfigError::SectionTooLarge)
        );
        assert_eq!(c(MIN_CHUNK_SIZE, MIN_CHUNK_SIZE).validate(), Ok(()));
        assert_eq!(c(SECTION_SIZE, SECTION_SIZE).validate(), Ok(()));
        let e = MmInitError::from(MmConfigError::ChunkTooSmall);
        assert_eq!(
            std::format!("{e}"),
            "invalid memory configuration: chunk size must be at least 128 KiB"
        );
    }

    #[test]
    fn memmap_ranges_keep_the_first_32() {
        let many = (0..40).map(|i| PhysRange::from_len(i * 0x10000, 0x1000));
        let m = MemmapRanges::collect(many);
        assert!(!m.is_complete());
        assert_eq!(m.as_slice().len(), MAX_MEMMAP_RANGES);
        let mut b = StatsBlock::default();
        m.write_to(&mut b);
        assert_eq!(b.memmap_range_count, 32);
        assert_eq!(
            b.memmap_ranges[1],
            GpaRange {
                start: 0x10000,
                len: 0x1000
            }
        );
    }
}
