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
//! 3. Call [`MemoryManager::boot`] with the CPUs the strategy may use
//!    ([`Cpus`]); it does what the strategy needs before the guest is ready
//!    (see [`strategy`] and [`guest_abi::Strategy`]), runs the [`ApJob`] it
//!    posts on the other CPUs, and says what is left ([`Booted`]):
//!    - `Eager`: every chunk.
//!    - `Parallel`: every CPU initializes a share, then the boot CPU frees
//!      them all into the buddy.
//!    - `Deferred`: the first section; the rest on CPU 1 in the background
//!      or, on one CPU, by [`MemoryManager::background_step`] between
//!      commands.
//!    - `OnDemand`: the first chunk with allocatable memory.
//!
//!    [`MemoryManager::boot_init`], [`MemoryManager::parallel_init_share`]
//!    and [`MemoryManager::parallel_finish`] are the same steps one at a time.
//! 4. Allocate with [`MemoryManager::alloc_pages`], free with
//!    [`MemoryManager::free_pages`], keep blocks on a [`BlockList`].
//! 5. With `reclaim` on in the [`MmConfig`], call
//!    [`MemoryManager::reclaim`] when memory stayed free for the reclaim
//!    delay ([`MemoryManager::reclaim_wanted`] says whether it is worth it).
//! 6. Once [`MemoryManager::fully_initialized`] holds, switch [`GROW_CHECK`]
//!    off and patch its jump sites ([`static_key::patch_sites`]) where no
//!    other CPU runs allocator code (only a kernel with a single manager may:
//!    the key is global).
//!
//! Memory whose struct pages are not initialized is on no free list: it waits
//! behind the zone's frontier and is initialized chunk by chunk, in address
//! order. When the free lists cannot serve a request (or a request that had
//! to split a block leaves them below the low watermark) the allocator grows
//! the initialized memory itself, so allocations never fail while
//! uninitialized memory remains. An allocation served from its own free list
//! checks nothing.
//!
//! # Modules, leaves first
//!
//! - [`addr`]: typed addresses; [`spinlock`]; [`static_key`]: static keys
//!   and the key-named jump table;
//! - [`config`]: the configuration and set-up errors; [`stats`]: what the
//!   manager reports;
//! - [`page`]: the struct page, its states and transitions;
//! - [`memmap`]: layout, init bitmap, frame → struct page, chunk init;
//! - [`buddy`]: the free lists;
//! - [`zone`]: the zone lock's state and the allocation fast path;
//! - [`grow`]: claiming and initializing chunks, the grow check;
//! - [`strategy`]: the four strategies and which CPUs run them;
//! - [`reclaim`]: free page reporting and returning free chunks to
//!   uninitialized;
//! - [`manager`]: the [`MemoryManager`] facade.

pub mod addr;
pub mod buddy;
pub mod config;
pub mod grow;
pub mod manager;
pub mod memmap;
pub mod page;
pub mod reclaim;
pub mod spinlock;
pub mod static_key;
pub mod stats;
pub mod strategy;
#[cfg(test)]
mod testing;
pub mod zone;

pub use addr::{Pfn, PfnRange, PhysAddr, PhysRange};
pub use buddy::MAX_ORDER;
pub use config::{MmConfig, MmConfigError, MmInitError, MAX_SECTION_SIZE};
pub use grow::GROW_CHECK;
pub use manager::MemoryManager;
pub use page::{PageState, PageTransitionError};
pub use reclaim::{ReclaimOutcome, ReclaimSink};
pub use stats::{MemmapRanges, MmStats};
pub use strategy::{ApJob, Booted, Cpus, MmBootError, MmParallelError, MAX_PARALLEL_CPUS};
pub use zone::{BlockList, MmFreeError, MmListError};
