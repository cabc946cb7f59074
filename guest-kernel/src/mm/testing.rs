//! Test support shared by the memory manager's unit tests: simulated guest
//! RAM and the layouts the tests use. A leaf: it imports nothing of the
//! manager but its address and configuration types.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering};

use guest_abi::Strategy;

use super::addr::{Pfn, PhysRange};
use super::config::MmConfig;

pub(crate) const MIB: u64 = 1 << 20;

/// Simulated guest RAM: a zeroed, lazily backed host allocation covering
/// physical addresses from 0 to the end of the highest range.
pub(crate) struct Ram {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the allocation is plain memory owned by this value.
unsafe impl Send for Ram {}
// SAFETY: shared access goes through the manager's locking protocol.
unsafe impl Sync for Ram {}

impl Ram {
    pub(crate) fn new(ram: &[PhysRange]) -> Ram {
        let size = ram.iter().map(|r| r.end.0).max().unwrap_or(4096) as usize;
        let layout = Layout::from_size_align(size, 4096).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Ram { ptr, layout }
    }

    /// The direct map: physical address `p` is at `ptr().add(p)`.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: allocated in `Ram::new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// A cycle counter for the manager's `clock`.
pub(crate) fn clock() -> u64 {
    static C: AtomicU64 = AtomicU64::new(0);
    C.fetch_add(1, Ordering::Relaxed)
}

/// 200 MiB with the legacy hole below 1 MiB and a kernel at 1..3 MiB.
pub(crate) fn pc_layout() -> ([PhysRange; 2], [PhysRange; 2]) {
    (
        [
            PhysRange::from_len(0, 0x9f000),
            PhysRange::from_len(MIB, 199 * MIB),
        ],
        [
            PhysRange::from_len(0, 4096),
            PhysRange::from_len(MIB, 2 * MIB),
        ],
    )
}

/// The default configuration with 64 MiB sections.
pub(crate) fn cfg(strategy: Strategy) -> MmConfig {
    MmConfig {
        section_bytes: 64 * MIB,
        ..MmConfig::new(strategy)
    }
}

/// A deterministic mixed workload (orders 0 to 10, two allocations for
/// every free) over an allocator; returns (pages held, failures seen). An
/// allocation may fail only once `pending()` (allocatable pages still behind
/// the frontier) is 0.
pub(crate) fn workload(
    alloc: impl Fn(u32) -> Option<Pfn>,
    free: impl Fn(Pfn, u32),
    pending: impl Fn() -> u64,
    seed: u64,
    steps: usize,
) -> (u64, u64) {
    let mut x = seed | 1;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut held = std::vec::Vec::new();
    let mut fails = 0;
    for _ in 0..steps {
        let r = rnd();
        if r % 3 != 0 || held.is_empty() {
            let order = [0, 0, 0, 1, 2, 3, 5, 9, 10][(r >> 8) as usize % 9];
            match alloc(order) {
                Some(p) => held.push((p, order)),
                None => {
                    assert_eq!(
                        pending(),
                        0,
                        "an allocation failed while memory was pending"
                    );
                    fails += 1;
                }
            }
        } else {
            let (p, o) = held.swap_remove((r >> 8) as usize % held.len());
            free(p, o);
        }
    }
    (held.iter().map(|(_, o)| 1u64 << o).sum(), fails)
}
