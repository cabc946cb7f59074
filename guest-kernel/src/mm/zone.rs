//! The zone: everything its lock protects — the free lists, the counters,
//! the frontier's position — and the allocator's fast path over it:
//! `Zone::alloc`, `Zone::free` and the owner lists ([`BlockList`]).
//!
//! A `&mut Zone` is the proof that the caller holds the zone lock, which is
//! what every struct-page access requires (see `PagePtr` in [`super::page`]).
//!
//! # The fast path pays nothing for on-demand
//!
//! `Zone::alloc` takes a block from the free lists and tells the caller
//! whether it must grow the initialized memory ([`super::grow`]):
//! `Take::Empty` when nothing fits, `Take::Short` when the take had to
//! split a larger block (its own list was empty) and left fewer free pages
//! than `Zone::pregrow_below`. A take served from its own list answers
//! `Take::Hit` without looking at anything else, whatever the strategy; the
//! watermark is compared only on the split path, which already writes a
//! struct page per level. Linux, likewise, grows only after its watermark
//! check has failed.

use core::fmt;

use super::addr::Pfn;
use super::buddy::{FreeArea, Taken, MAX_ORDER};
use super::memmap::{Memmap, PageKind};
use super::page::{PageState, PageTransitionError};

/// Where the frontier stands. The fields are plain data under the zone
/// lock; [`super::grow`] moves them.
pub(crate) struct Frontier {
    /// Next chunk the frontier may claim.
    pub(crate) next: u64,
    /// No chunk is left to claim.
    pub(crate) exhausted: bool,
    /// Chunks claimed but not yet freed into the buddy.
    pub(crate) in_flight: u64,
    /// `boot_init` has opened the frontier.
    pub(crate) booted: bool,
    /// `Parallel` between `boot_init` and `parallel_finish`: the shares
    /// initialize the chunks, nobody claims them.
    pub(crate) parallel_pending: bool,
}

/// State under the zone lock.
pub(crate) struct Zone {
    /// The free lists.
    pub(crate) area: FreeArea,
    /// Pages handed out.
    pub(crate) allocated_pages: u64,
    /// A take that splits a block and leaves fewer free pages than this asks
    /// its caller to grow ahead (`Take::Short`): the low watermark while
    /// memory is pending, 0 before boot and once nothing is.
    pub(crate) pregrow_below: u64,
    /// Where growth stands.
    pub(crate) frontier: Frontier,
    /// Chunks initialized because an allocation needed them.
    pub(crate) grow_events: u64,
    /// Allocations that failed after growing.
    pub(crate) alloc_failures: u64,
    /// Memory reclaim's state and counters ([`super::reclaim`]).
    pub(crate) reclaim: ReclaimState,
}

/// Memory reclaim's state under the zone lock (all zero when empty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReclaimState {
    /// A block was freed since the last reclaim pass: a pass may find
    /// something to report.
    pub(crate) dirty: bool,
    /// Records sent to the VMM.
    pub(crate) events: u64,
    /// Bytes of ranges the VMM accepted, all kinds together.
    pub(crate) reported_bytes: u64,
    /// Bytes of ranges the VMM rejected.
    pub(crate) rejected_bytes: u64,
    /// Chunks returned from initialized to uninitialized.
    pub(crate) chunks_deinitialized: u64,
}

/// What `Zone::alloc` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(crate) enum Take {
    /// A block; nothing else to do.
    Hit(Pfn),
    /// A block, but the free lists are running short: grow one chunk ahead.
    Short(Pfn),
    /// No free block fits (or the order is above [`MAX_ORDER`]).
    Empty,
}

/// Why [`MemoryManager::free_pages`](super::MemoryManager::free_pages)
/// refused a block.
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

impl From<PageTransitionError> for MmFreeError {
    /// A refused `Allocated → Tail`: the head is allocated with another
    /// order, or not allocated at all.
    fn from(e: PageTransitionError) -> MmFreeError {
        match e {
            PageTransitionError::WrongState {
                found: PageState::Allocated { .. },
                ..
            } => MmFreeError::OrderMismatch,
            _ => MmFreeError::NotAllocated,
        }
    }
}

/// Why [`MemoryManager::list_push`](super::MemoryManager::list_push)
/// refused a block.
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

/// Blocks a workload holds, linked through their head struct pages (not
/// through the memory itself, which is never touched). Owned by one user.
#[derive(Debug)]
pub struct BlockList {
    head: Option<Pfn>,
    blocks: u64,
    pages: u64,
}

impl BlockList {
    /// An empty list.
    pub const fn new() -> BlockList {
        BlockList {
            head: None,
            blocks: 0,
            pages: 0,
        }
    }

    /// Whether the list holds no block.
    pub fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    /// Blocks on the list.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Pages in the listed blocks.
    pub fn pages(&self) -> u64 {
        self.pages
    }
}

impl Default for BlockList {
    fn default() -> BlockList {
        BlockList::new()
    }
}

impl Zone {
    /// An empty zone (all zero bytes).
    pub(crate) const fn new() -> Zone {
        Zone {
            area: FreeArea::new(),
            allocated_pages: 0,
            pregrow_below: 0,
            frontier: Frontier {
                next: 0,
                exhausted: false,
                in_flight: 0,
                booted: false,
                parallel_pending: false,
            },
            grow_events: 0,
            alloc_failures: 0,
            reclaim: ReclaimState {
                dirty: false,
                events: 0,
                reported_bytes: 0,
                rejected_bytes: 0,
                chunks_deinitialized: 0,
            },
        }
    }

    /// Takes a block of `2^order` pages off the free lists (see the module
    /// docs for what the answer asks of the caller).
    #[inline]
    pub(crate) fn alloc(&mut self, mm: &Memmap, order: u32) -> Take {
        if order > MAX_ORDER {
            return Take::Empty;
        }
        match self.area.take(mm, order) {
            Some(Taken { pfn, split }) => {
                self.allocated_pages += 1 << order;
                if split && self.area.free_pages < self.pregrow_below {
                    Take::Short(pfn)
                } else {
                    Take::Hit(pfn)
                }
            }
            None => Take::Empty,
        }
    }

    /// Frees a block handed out by `Zone::alloc` with the same order: its
    /// head goes `Allocated { order } → Tail` (checked: the caller's word is
    /// all there is) and the block joins the free lists.
    pub(crate) fn free(&mut self, mm: &Memmap, pfn: Pfn, order: u32) -> Result<(), MmFreeError> {
        if order > MAX_ORDER {
            return Err(MmFreeError::BadOrder);
        }
        if pfn.0 & ((1 << order) - 1) != 0 {
            return Err(MmFreeError::Misaligned);
        }
        // SAFETY: `&mut self` means the zone lock is held; the bitmap check
        // comes first.
        let page = unsafe { mm.page_if_initialized(pfn) }.ok_or(MmFreeError::NotAllocated)?;
        let allocated = PageState::Allocated { order: order as u8 };
        page.update(|p| p.try_transition(allocated, PageState::Tail))?;
        self.area.free_block(mm, pfn, order);
        self.allocated_pages -= 1 << order;
        self.reclaim.dirty = true;
        Ok(())
    }

    /// Puts an allocated block on `list` (linked through its head struct page).
    pub(crate) fn list_push(
        &mut self,
        mm: &Memmap,
        list: &mut BlockList,
        pfn: Pfn,
        order: u32,
    ) -> Result<(), MmListError> {
        // SAFETY: `&mut self` means the zone lock is held; the bitmap check
        // comes first.
        let page = unsafe { mm.page_if_initialized(pfn) }.ok_or(MmListError::NotAllocatedBlock)?;
        if page.state() != (PageState::Allocated { order: order as u8 }) {
            return Err(MmListError::NotAllocatedBlock);
        }
        page.update(|p| p.set_next(list.head));
        list.head = Some(pfn);
        list.blocks += 1;
        list.pages += 1 << order;
        Ok(())
    }

    /// Takes the most recently pushed block off `list`: `(pfn, order)`.
    pub(crate) fn list_pop(&mut self, mm: &Memmap, list: &mut BlockList) -> Option<(Pfn, u32)> {
        let pfn = list.head?;
        // SAFETY: `&mut self` means the zone lock is held; `list_push` only
        // links allocated heads, which are in initialized chunks.
        let page = unsafe { mm.pfn_to_page(pfn) };
        let p = page.get();
        let order = p
            .state()
            .order()
            .expect("a listed block is an allocated head");
        page.update(|p| p.set_next(None));
        list.head = p.next();
        list.blocks -= 1;
        list.pages -= 1 << order;
        Some((pfn, order))
    }

    /// Frees the allocatable frames of an initialized chunk (all tails) into
    /// the free lists.
    pub(crate) fn free_chunk(&mut self, mm: &Memmap, chunk: u64) {
        for (kind, run) in mm.runs(chunk) {
            if kind == PageKind::Free {
                self.area.free_run(mm, run);
            }
        }
    }

    /// Checks the buddy invariants (alignment, states, no overlap, nothing
    /// but allocatable frames, buddies merged, counts); returns the free
    /// blocks as `pfn → order`.
    #[cfg(test)]
    pub(crate) fn check(&self, mm: &Memmap) -> std::collections::BTreeMap<u64, u32> {
        use std::collections::BTreeMap;
        let mut free = BTreeMap::new();
        self.area.for_each_free(mm, |pfn, head| {
            let order = head.state().order().expect("a free-list entry is a head");
            assert_eq!(head.state(), PageState::Free { order: order as u8 });
            assert_eq!(
                pfn.0 % (1 << order),
                0,
                "free block {pfn:?} misaligned for order {order}"
            );
            assert_eq!(head.pfn(), pfn);
            assert!(free.insert(pfn.0, order).is_none());
        });
        let mut end = 0;
        let mut sum = 0;
        for (&pfn, &order) in &free {
            assert!(pfn >= end, "free blocks overlap at {pfn:#x}");
            end = pfn + (1 << order);
            sum += 1 << order;
            mm.assert_allocatable(super::addr::PfnRange {
                start: Pfn(pfn),
                end: Pfn(end),
            });
            if order < MAX_ORDER {
                assert_ne!(
                    free.get(&(pfn ^ (1 << order))),
                    Some(&order),
                    "unmerged buddies at {pfn:#x}"
                );
            }
        }
        assert_eq!(sum, self.area.free_pages);
        let by_order: u64 = (0..=MAX_ORDER).map(|o| self.area.nr_free(o)).sum();
        assert_eq!(by_order, free.len() as u64);
        free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::PhysRange;
    use crate::mm::config::MmConfig;
    use crate::mm::testing::{cfg, pc_layout, Ram, MIB};
    use guest_abi::Strategy;

    /// A zone over simulated RAM whose first `chunks` chunks with memmap are
    /// initialized and free.
    struct Rig {
        mm: Box<Memmap>,
        zone: Zone,
        _ram: Ram,
    }

    impl Rig {
        fn new(c: MmConfig, ram: &[PhysRange], res: &[PhysRange], chunks: usize) -> Rig {
            let r = Ram::new(ram);
            let mut mm = Box::new(Memmap::empty());
            mm.build(&c, ram, res, r.ptr()).unwrap();
            let mut zone = Zone::new();
            let mut at = mm.next_chunk(0);
            for _ in 0..chunks {
                let Some(c) = at else { break };
                // SAFETY: this test is the only user of the memmap.
                unsafe { mm.init_chunk(c) };
                zone.free_chunk(&mm, c);
                at = mm.next_chunk(c + 1);
            }
            Rig { mm, zone, _ram: r }
        }

        fn alloc(&mut self, order: u32) -> Take {
            self.zone.alloc(&self.mm, order)
        }
    }

    fn pfn(t: Take) -> Pfn {
        match t {
            Take::Hit(p) | Take::Short(p) => p,
            Take::Empty => panic!("no block"),
        }
    }

    #[test]
    fn bad_frees_and_list_pushes_are_refused() {
        let (ram, res) = pc_layout();
        // Chunks 0..2: 0..6 MiB; 40 MiB is not initialized.
        let mut r = Rig::new(cfg(Strategy::OnDemand), &ram, &res, 3);
        let p = pfn(r.alloc(2));
        let (mm, z) = (&*r.mm, &mut r.zone);
        assert!(matches!(
            z.free(mm, p, 3),
            Err(MmFreeError::OrderMismatch | MmFreeError::Misaligned)
        ));
        assert_eq!(z.free(mm, p, 1), Err(MmFreeError::OrderMismatch));
        assert_eq!(z.free(mm, p, 11), Err(MmFreeError::BadOrder));
        assert_eq!(z.free(mm, p.add(1), 0), Err(MmFreeError::NotAllocated));
        assert_eq!(z.free(mm, Pfn(40 << 8), 0), Err(MmFreeError::NotAllocated));
        assert_eq!(z.free(mm, Pfn(1 << 30), 0), Err(MmFreeError::NotAllocated));
        // A reserved frame (the kernel at 1..3 MiB) and a free head.
        assert_eq!(z.free(mm, Pfn(1 << 8), 0), Err(MmFreeError::NotAllocated));
        let free_head = *z.check(mm).keys().next().unwrap();
        assert_eq!(
            z.free(mm, Pfn(free_head), 0),
            Err(MmFreeError::NotAllocated)
        );
        let mut l = BlockList::new();
        assert_eq!(
            z.list_push(mm, &mut l, p, 1),
            Err(MmListError::NotAllocatedBlock)
        );
        assert_eq!(
            z.list_push(mm, &mut l, Pfn(40 << 8), 0),
            Err(MmListError::NotAllocatedBlock)
        );
        z.list_push(mm, &mut l, p, 2).unwrap();
        assert_eq!((l.blocks(), l.pages()), (1, 4));
        assert_eq!(z.list_pop(mm, &mut l), Some((p, 2)));
        assert_eq!(z.list_pop(mm, &mut l), None);
        assert!(l.is_empty());
        z.free(mm, p, 2).unwrap();
        assert_eq!(z.free(mm, p, 2), Err(MmFreeError::NotAllocated));
        assert_eq!(z.allocated_pages, 0);
        z.check(mm);
    }

    #[test]
    fn a_block_freed_back_merges_with_its_buddies() {
        let ram = [PhysRange::from_len(0, 16 * MIB)];
        let res = [PhysRange::from_len(0, 4 * MIB)];
        let mut r = Rig::new(cfg(Strategy::Eager), &ram, &res, usize::MAX);
        let before = r.zone.check(&r.mm);
        let held: Vec<_> = [0, 3, 0, 1, 10, 5]
            .iter()
            .map(|&o| (pfn(r.alloc(o)), o))
            .collect();
        for (p, o) in held.into_iter().rev() {
            r.zone.free(&r.mm, p, o).unwrap();
        }
        assert_eq!(r.zone.check(&r.mm), before);
    }

    #[test]
    fn only_a_split_below_the_watermark_asks_to_grow() {
        let (ram, res) = pc_layout();
        let mut r = Rig::new(cfg(Strategy::OnDemand), &ram, &res, 4);
        let total = r.zone.area.free_pages;
        // No watermark: never short.
        for _ in 0..100 {
            assert!(matches!(r.alloc(0), Take::Hit(_)));
        }
        let mark = r.zone.area.free_pages / 2;
        r.zone.pregrow_below = mark;
        let (mut unchecked_below, mut short) = (0, 0);
        loop {
            let own_list = r.zone.area.nr_free(0) > 0;
            let t = r.alloc(0);
            let below = r.zone.area.free_pages < mark;
            match t {
                Take::Empty => break,
                Take::Hit(_) => {
                    assert!(
                        own_list || !below,
                        "a split below the mark must ask to grow"
                    );
                    unchecked_below += u64::from(below);
                }
                Take::Short(_) => {
                    assert!(
                        !own_list && below,
                        "only a split below the mark asks to grow"
                    );
                    short += 1;
                }
            }
        }
        assert!(
            unchecked_below > 0 && short > 0,
            "{unchecked_below} {short}"
        );
        assert_eq!((r.zone.area.free_pages, r.zone.allocated_pages), (0, total));
        assert_eq!(r.alloc(MAX_ORDER + 1), Take::Empty);
    }
}
