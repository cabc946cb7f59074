//! What the memory manager reports: a snapshot of its counters
//! ([`MmStats`]) and where its memmap lives ([`MemmapRanges`]), both copied
//! into the VMM-facing stats block.

use guest_abi::{stats_flags, GpaRange, Reclaim, StatsBlock, Strategy, MAX_MEMMAP_RANGES};

use super::addr::PhysRange;

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
    /// The reclaim mode.
    pub reclaim: Reclaim,
    /// Bytes reported to the VMM and accepted, all kinds together.
    pub reclaim_reported_bytes: u64,
    /// Bytes reported to the VMM and rejected.
    pub reclaim_rejected_bytes: u64,
    /// Reclaim records sent to the VMM.
    pub reclaim_events: u64,
    /// Chunks returned from initialized to uninitialized.
    pub chunks_deinitialized: u64,
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
    /// `cpus`, timestamps, memmap ranges or the reclaim delay, which the
    /// kernel owns).
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
        b.reclaim = self.reclaim as u32;
        b.reclaim_reported_bytes = self.reclaim_reported_bytes;
        b.reclaim_events = self.reclaim_events;
        b.chunks_deinitialized = self.chunks_deinitialized;
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
