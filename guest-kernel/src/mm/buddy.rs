//! The buddy allocator's free lists, linked through struct pages.
//!
//! Orders 0..=[`MAX_ORDER`] (4 KiB .. 4 MiB blocks). A free block of order
//! `k` starts at a frame aligned to `2^k`; its head struct page is in the
//! Free head state and sits on list `k`, the other frames are tails. Freeing
//! merges a block with its buddy (`pfn ^ 2^k`) while the buddy is a free head
//! of the same order; a buddy whose chunk is not initialized is never looked
//! at (its struct page may not have been written), so memory waiting behind
//! the frontier cannot be merged or handed out.
//!
//! A [`FreeArea`] lives inside the zone lock: `&mut FreeArea` is the proof
//! that the caller holds it, which is what the struct-page accesses require.

use super::addr::{Pfn, PfnRange};
use super::memmap::Memmap;
use super::page::{PagePtr, NO_PFN, PG_BUDDY, PG_HEAD, PG_INIT};

/// Largest block order: 2^10 frames = 4 MiB.
pub const MAX_ORDER: u32 = 10;
const NR_ORDERS: usize = MAX_ORDER as usize + 1;

/// The free lists of one zone.
pub(crate) struct FreeArea {
    heads: [u64; NR_ORDERS],
    nr_free: [u64; NR_ORDERS],
    /// Frames on the free lists.
    pub(crate) free_pages: u64,
}

impl FreeArea {
    pub(crate) const fn new() -> FreeArea {
        FreeArea {
            heads: [0; NR_ORDERS],
            nr_free: [0; NR_ORDERS],
            free_pages: 0,
        }
    }

    fn page(&self, mm: &Memmap, pfn: u64) -> PagePtr {
        // SAFETY: only frames of free blocks reach here, and they lie in
        // initialized chunks; `&self`/`&mut self` of a `FreeArea` means the
        // zone lock is held.
        unsafe { mm.pfn_to_page(Pfn(pfn)) }
    }

    /// The first free block of `order`, or `NO_PFN`. Heads are stored as
    /// `pfn + 1` so that an empty free area is all zero bytes (and a static
    /// one lands in `.bss`, costing the guest nothing until used).
    fn head(&self, order: u32) -> u64 {
        self.heads[order as usize].wrapping_sub(1)
    }

    fn set_head(&mut self, order: u32, pfn: u64) {
        self.heads[order as usize] = pfn.wrapping_add(1);
    }

    fn push(&mut self, mm: &Memmap, pfn: u64, order: u32) {
        let old = self.head(order);
        self.page(mm, pfn).update(|p| {
            p.flags = PG_INIT | PG_BUDDY;
            p.order = order;
            p.refcount = 0;
            p.prev = NO_PFN;
            p.next = old;
        });
        if old != NO_PFN {
            self.page(mm, old).update(|p| p.prev = pfn);
        }
        self.set_head(order, pfn);
        self.nr_free[order as usize] += 1;
    }

    /// Unlinks a free head and turns it into a tail.
    fn unlink(&mut self, mm: &Memmap, pfn: u64, order: u32) {
        let page = self.page(mm, pfn);
        let p = page.get();
        debug_assert!(p.flags & PG_BUDDY != 0 && p.order == order);
        if p.prev == NO_PFN {
            self.set_head(order, p.next);
        } else {
            self.page(mm, p.prev).update(|q| q.next = p.next);
        }
        if p.next != NO_PFN {
            self.page(mm, p.next).update(|q| q.prev = p.prev);
        }
        page.update(make_tail);
        self.nr_free[order as usize] -= 1;
    }

    /// Takes a block of `2^order` frames, splitting a larger one if needed,
    /// and marks its head allocated.
    pub(crate) fn take(&mut self, mm: &Memmap, order: u32) -> Option<Pfn> {
        let mut o = (order..=MAX_ORDER).find(|&o| self.head(o) != NO_PFN)?;
        let pfn = self.head(o);
        self.unlink(mm, pfn, o);
        while o > order {
            o -= 1;
            self.push(mm, pfn + (1 << o), o);
        }
        self.page(mm, pfn).update(|p| {
            p.flags = PG_INIT | PG_HEAD;
            p.order = order;
            p.refcount = 1;
            p.next = NO_PFN;
            p.prev = NO_PFN;
        });
        self.free_pages -= 1 << order;
        Some(Pfn(pfn))
    }

    /// Puts a block on the free lists, merging it with free buddies. The
    /// block's frames must be initialized and belong to no list.
    pub(crate) fn free_block(&mut self, mm: &Memmap, pfn: Pfn, order: u32) {
        let mut pfn = pfn.0;
        let mut order = order;
        self.free_pages += 1 << order;
        self.page(mm, pfn).update(make_tail);
        while order < MAX_ORDER {
            let buddy = pfn ^ (1 << order);
            // SAFETY: the zone lock is held (`&mut self`); the bitmap check
            // keeps us off struct pages that were never written.
            let Some(b) = (unsafe { mm.page_if_initialized(Pfn(buddy)) }) else {
                break;
            };
            let bp = b.get();
            if bp.flags & PG_BUDDY == 0 || bp.order != order {
                break;
            }
            self.unlink(mm, buddy, order);
            pfn &= !(1 << order);
            order += 1;
        }
        self.push(mm, pfn, order);
    }

    /// Frees a run of frames as the largest aligned blocks that fit.
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

    /// Free blocks on list `order`.
    #[cfg(test)]
    pub(crate) fn nr_free(&self, order: u32) -> u64 {
        self.nr_free[order as usize]
    }

    /// Calls `f(pfn, order)` for every free block (for checks and tests).
    #[cfg(test)]
    pub(crate) fn for_each_free(&self, mm: &Memmap, mut f: impl FnMut(Pfn, u32)) {
        for order in 0..=MAX_ORDER {
            let mut pfn = self.head(order);
            while pfn != NO_PFN {
                f(Pfn(pfn), order);
                pfn = self.page(mm, pfn).get().next;
            }
        }
    }
}

/// Turns a head struct page into a tail (the state of every non-head frame).
fn make_tail(p: &mut super::page::Page) {
    p.flags = PG_INIT;
    p.order = 0;
    p.refcount = 0;
    p.next = NO_PFN;
    p.prev = NO_PFN;
}
