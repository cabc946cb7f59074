//! The guest's workload: memory a container's processes would hold, allocated
//! from the buddy allocator and written page by page, freed on request. (The
//! hostile workloads are in `attack.rs`.)

use crate::MM;
use guest_abi::{CommandStatus, PAGE_SIZE};
use guest_kernel::mm::{BlockList, Pfn, MAX_ORDER};

/// Blocks the workload holds, and their total size.
pub struct Workload {
    blocks: BlockList,
    held_pages: u64,
    /// Largest block order it asks for: at most one memmap chunk, so a
    /// request never makes the allocator initialize more chunks than the
    /// memory it hands out (an order above the chunk needs several adjacent
    /// chunks, and growing for it strands the free pages it could not use).
    max_order: u32,
}

impl Workload {
    pub const fn new() -> Workload {
        Workload { blocks: BlockList::new(), held_pages: 0, max_order: MAX_ORDER }
    }

    /// Limits block sizes to one chunk of `chunk_bytes`.
    pub fn set_chunk(&mut self, chunk_bytes: u64) {
        let pages = (chunk_bytes / PAGE_SIZE).max(1);
        self.max_order = (63 - pages.leading_zeros()).min(MAX_ORDER);
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> u64 {
        self.held_pages * PAGE_SIZE
    }

    /// Allocates `bytes` more (rounded up to pages), writing each page unless
    /// `no_write`. Takes the largest blocks the allocator has, smaller ones
    /// when it runs short; stops at the first order-0 failure (out of memory),
    /// keeping what it got.
    pub fn alloc(&mut self, bytes: u64, no_write: bool) -> CommandStatus {
        let mut want = bytes.div_ceil(PAGE_SIZE);
        let mut order = self.max_order;
        while want > 0 {
            while order > 0 && (1u64 << order) > want {
                order -= 1;
            }
            match MM.alloc_pages(order) {
                Some(pfn) => {
                    if !no_write {
                        touch(pfn, 1u64 << order);
                    }
                    if MM.list_push(&mut self.blocks, pfn, order).is_err() {
                        // Cannot happen for a block just allocated; give it back.
                        let _ = MM.free_pages(pfn, order);
                        return CommandStatus::Invalid;
                    }
                    self.held_pages += 1u64 << order;
                    want -= 1u64 << order;
                }
                None if order > 0 => order -= 1,
                None => return CommandStatus::OutOfMemory,
            }
        }
        CommandStatus::Ok
    }

    /// Frees at least `bytes` (whole blocks; if the last block is larger than
    /// needed, the rest is allocated again so the total is exact).
    pub fn free(&mut self, bytes: u64) -> CommandStatus {
        let target = self.held_pages.saturating_sub(bytes.div_ceil(PAGE_SIZE));
        self.shrink_to(target)
    }

    fn shrink_to(&mut self, target_pages: u64) -> CommandStatus {
        while self.held_pages > target_pages {
            let Some((pfn, order)) = MM.list_pop(&mut self.blocks) else { break };
            if MM.free_pages(pfn, order).is_err() {
                return CommandStatus::Invalid;
            }
            self.held_pages -= 1u64 << order;
        }
        if self.held_pages < target_pages {
            return self.alloc((target_pages - self.held_pages) * PAGE_SIZE, false);
        }
        CommandStatus::Ok
    }

    /// Allocates or frees so the workload holds `bytes` (rounded up to pages).
    pub fn set_target(&mut self, bytes: u64) -> CommandStatus {
        let target = bytes.div_ceil(PAGE_SIZE);
        if target >= self.held_pages {
            self.alloc((target - self.held_pages) * PAGE_SIZE, false)
        } else {
            self.shrink_to(target)
        }
    }
}

/// Writes one word in each page, as a process touching its memory would:
/// that is what makes the host back the page.
fn touch(pfn: Pfn, pages: u64) {
    for i in 0..pages {
        let addr = (pfn.0 + i) * PAGE_SIZE;
        // SAFETY: the pages were just allocated to us, are RAM, and are
        // identity-mapped; nobody else uses them.
        unsafe { (addr as *mut u64).write_volatile(pfn.0 + i) };
    }
}

/// Benchmark: `n` order-0 alloc+free pairs; returns TSC cycles taken (None
/// if memory ran out).
pub fn bench_alloc_free(n: u64) -> Option<u64> {
    let start = crate::arch::rdtsc();
    for _ in 0..n {
        let pfn = MM.alloc_pages(0)?;
        if MM.free_pages(pfn, 0).is_err() {
            return None;
        }
    }
    Some(crate::arch::rdtsc() - start)
}
