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
//! left behind the frontier, the manager stops checking; the kernel then
//! switches the global [`GROW_CHECK`] static key off and patches its jump
//! sites ([`static_key::patch_sites`]).
//!
//! Modules: [`addr`] (typed addresses), [`config`] (configuration and
//! set-up errors), [`stats`] (what the manager reports), [`page`] (struct
//! page and its states), [`memmap`] (layout, init bitmap), [`buddy`] (free
//! lists), [`manager`] (the manager, its locking and strategies),
//! [`spinlock`], [`static_key`] (static keys and the key-named jump table).

pub mod addr;
pub mod buddy;
pub mod config;
pub mod manager;
pub mod memmap;
pub mod page;
pub mod spinlock;
pub mod static_key;
pub mod stats;
#[cfg(test)]
mod testing;

use core::fmt;

pub use addr::{Pfn, PfnRange, PhysAddr, PhysRange};
pub use buddy::MAX_ORDER;
pub use config::{MmConfig, MmConfigError, MmInitError, MAX_SECTION_SIZE};
pub use manager::{BlockList, MemoryManager, GROW_CHECK};
pub use page::{PageState, PageTransitionError};
pub use stats::{MemmapRanges, MmStats};

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

impl From<page::PageTransitionError> for MmFreeError {
    /// A refused `Allocated → Tail`: the head is allocated with another
    /// order, or not allocated at all.
    fn from(e: page::PageTransitionError) -> MmFreeError {
        match e {
            page::PageTransitionError::WrongState {
                found: page::PageState::Allocated { .. },
                ..
            } => MmFreeError::OrderMismatch,
            _ => MmFreeError::NotAllocated,
        }
    }
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
