//! The buddy allocator's free lists, linked through struct pages.
//!
//! Orders 0..=[`MAX_ORDER`] (4 KiB .. 4 MiB blocks). A free block of order
//! `k` starts at a frame aligned to `2^k`; its head struct page is in the
//! [`Free { order: k }`](PageState::Free) state and sits on list `k`, the
//! other frames are tails. Freeing merges a block with its buddy
//! (`pfn ^ 2^k`) while the buddy is a free head of the same order; a buddy
//! whose chunk is not initialized is never looked at (its struct page may not
//! have been written), so memory waiting behind the frontier cannot be merged
//! or handed out.
//!
//! Every state change goes through [`Page::transition`](super::page::Page::transition): the free lists are
//! the allocator's own invariant, so the checks are debug assertions.
//!
//! A `FreeArea` lives inside the zone lock: `&mut FreeArea` is the proof
//! that the caller holds it, which is what the struct-page accesses require.

use super::addr::{Pfn, PfnRange};
use super::memmap::Memmap;
use super::page::{PagePtr, PageState};

/// Largest block order: 2^10 frames = 4 MiB.
pub const MAX_ORDER: u32 = 10;
const NR_ORDERS: usize = MAX_ORDER as usize + 1;

/// A block [`FreeArea::take`] handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    /// Its first frame, now in the Allocated state.
    pub(crate) pfn: Pfn,
    /// It was cut from a larger block: list `order` was empty.
    pub(crate) split: bool,
}

/// The free lists of one zone.
pub(crate) struct FreeArea {
    heads: [u64; NR_ORDERS],
    nr_free: [u64; NR_ORDERS],
    /// Frames on the free lists.
    pub(crate) free_pages: u64,
}

fn free_state(order: u32) -> PageState {
    PageState::Free { order: order as u8 }
}

impl FreeArea {
    pub(crate) const fn new() -> FreeArea {
        FreeArea {
            heads: [0; NR_ORDERS],
            nr_free: [0; NR_ORDERS],
            free_pages: 0,
        }
    }

    fn page(&self, mm: &Memmap, pfn: Pfn) -> PagePtr {
        // SAFETY: only frames of free blocks reach here, and they lie in
        // initialized chunks; `&self`/`&mut self` of a `FreeArea` means the
        // zone lock is held.
        unsafe { mm.pfn_to_page(pfn) }
    }

    /// The first free block of `order`. Heads are stored as `pfn + 1` so
    /// that an empty free area is all zero bytes (and a static one lands in
    /// `.bss`, costing the guest nothing until used).
    #[inline]
    fn head(&self, order: u32) -> Option<Pfn> {
        self.heads[order as usize].checked_sub(1).map(Pfn)
    }

    #[inline]
    fn set_head(&mut self, order: u32, pfn: Option<Pfn>) {
        self.heads[order as usize] = pfn.map_or(0, |p| p.0 + 1);
    }

    /// Makes the tail `pfn` the head of a free block and links it first on
    /// list `order`.
    fn push(&mut self, mm: &Memmap, pfn: Pfn, order: u32) {
        let old = self.head(order);
        self.page(mm, pfn).update(|p| {
            p.transition(PageState::Tail, free_state(order));
            p.set_next(old);
        });
        if let Some(old) = old {
            self.page(mm, old).update(|p| p.set_prev(Some(pfn)));
        }
        self.set_head(order, Some(pfn));
        self.nr_free[order as usize] += 1;
    }

    /// Unlinks a free head and turns it into a tail.
    fn unlink(&mut self, mm: &Memmap, pfn: Pfn, order: u32) {
        let page = self.page(mm, pfn);
        let p = page.get();
        match p.prev() {
            None => self.set_head(order, p.next()),
            Some(prev) => self.page(mm, prev).update(|q| q.set_next(p.next())),
        }
        if let Some(next) = p.next() {
            self.page(mm, next).update(|q| q.set_prev(p.prev()));
        }
        page.update(|q| q.transition(free_state(order), PageState::Tail));
        self.nr_free[order as usize] -= 1;
    }

    /// Takes a block of `2^order` frames, splitting a larger one if needed,
    /// and marks its head allocated. `order` must be at most [`MAX_ORDER`].
    #[inline]
    pub(crate) fn take(&mut self, mm: &Memmap, order: u32) -> Option<Taken> {
        let mut o = (order..=MAX_ORDER).find(|&o| self.heads[o as usize] != 0)?;
        let pfn = self.head(o)?;
        let split = o > order;
        self.unlink(mm, pfn, o);
        while o > order {
            o -= 1;
            self.push(mm, pfn.add(1 << o), o);
        }
        self.page(mm, pfn)
            .update(|p| p.transition(PageState::Tail, PageState::Allocated { order: order as u8 }));
        self.free_pages -= 1 << order;
        Some(Taken { pfn, split })
    }

    /// Puts a block on the free lists, merging it with free buddies. The
    /// block's frames must be initialized and belong to no list, and its
    /// head must be a tail (a freed head has gone Allocated → Tail).
    pub(crate) fn free_block(&mut self, mm: &Memmap, pfn: Pfn, order: u32) {
        debug_assert_eq!(
            self.page(mm, pfn).state(),
            PageState::Tail,
            "{pfn:?} freed as a head"
        );
        let mut pfn = pfn.0;
        let mut order = order;
        self.free_pages += 1 << order;
        while order < MAX_ORDER {
            let buddy = Pfn(pfn ^ (1 << order));
            // SAFETY: the zone lock is held (`&mut self`); the bitmap check
            // keeps us off struct pages that were never written.
            let Some(b) = (unsafe { mm.page_if_initialized(buddy) }) else {
                break;
            };
            if b.state() != free_state(order) {
                break;
            }
            self.unlink(mm, buddy, order);
            pfn &= !(1 << order);
            order += 1;
        }
        self.push(mm, Pfn(pfn), order);
    }

    /// Frees a run of tail frames as the largest aligned blocks that fit.
    pub(crate) fn free_run(&mut self, mm: &Memmap, run: PfnRange) {
        let mut s = run.start.0;
        while s < run.end.0 {
            let left = run.end.0 - s;
            let order = s
                .trailing_zeros()
                .min(MAX_ORDER)
                .min(63 - left.leading_zeros());
            self.free_block(mm, Pfn(s), order);
            s += 1 << order;
        }
    }

    /// The order of the free block whose head is `pfn`, if `pfn` is the
    /// head of a free block of an order in `orders` (its chunk must be
    /// initialized; checked).
    pub(crate) fn free_head_order(
        &self,
        mm: &Memmap,
        pfn: Pfn,
        orders: core::ops::RangeInclusive<u32>,
    ) -> Option<(u32, bool)> {
        // SAFETY: `&self` of a `FreeArea` means the zone lock is held; the
        // bitmap check keeps us off struct pages that were never written.
        let page = unsafe { mm.page_if_initialized(pfn) }?;
        let p = page.get();
        match p.state() {
            PageState::Free { order } if orders.contains(&u32::from(order)) => {
                Some((u32::from(order), p.reported()))
            }
            _ => None,
        }
    }

    /// Takes the free block with head `pfn` and order `order` off its list:
    /// its frames become tails that belong to nobody (memory reclaim, before
    /// the chunk goes back to uninitialized).
    pub(crate) fn remove_free(&mut self, mm: &Memmap, pfn: Pfn, order: u32) {
        debug_assert_eq!(self.page(mm, pfn).state(), free_state(order));
        self.unlink(mm, pfn, order);
        self.free_pages -= 1 << order;
    }

    /// Marks the free block with head `pfn` as reported to the VMM.
    pub(crate) fn mark_reported(&mut self, mm: &Memmap, pfn: Pfn) {
        self.page(mm, pfn).update(|p| p.set_reported());
    }

    /// Free blocks on list `order`.
    #[cfg(test)]
    pub(crate) fn nr_free(&self, order: u32) -> u64 {
        self.nr_free[order as usize]
    }

    /// Calls `f(pfn, head)` for every free block, list by list (for checks
    /// and tests).
    #[cfg(test)]
    pub(crate) fn for_each_free(&self, mm: &Memmap, mut f: impl FnMut(Pfn, super::page::Page)) {
        for order in 0..=MAX_ORDER {
            let mut at = self.head(order);
            while let Some(pfn) = at {
                let p = self.page(mm, pfn).get();
                f(pfn, p);
                at = p.next();
            }
        }
    }
}
