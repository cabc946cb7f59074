//! `struct page`: the 64-byte metadata the memmap keeps for every 4 KiB page.
//!
//! The memmap is reserved out of guest RAM but never written in bulk: a
//! struct page is first written when its chunk is initialized, and whether a
//! chunk is initialized is recorded outside the memmap (the init bitmap in
//! [`super::memmap`]). Nothing reads a struct page of an uninitialized chunk.
//!
//! # States
//!
//! Every initialized struct page has [`PG_INIT`] set (an uninitialized one is
//! whatever the memory held, zero in practice). On top of it, exactly one of:
//!
//! | State | `flags` | Meaning |
//! |-------|---------|---------|
//! | Hole | `INIT \| HOLE` | no RAM behind the frame (a gap inside a section's memmap span); never allocated |
//! | Reserved | `INIT \| RESERVED` | RAM the allocator does not manage: reserved by the caller (kernel image, boot data) or the memmap itself |
//! | Free head | `INIT \| BUDDY` | first frame of a free block of `2^order` frames, linked on free list `order` through `next`/`prev` |
//! | Allocated head | `INIT \| HEAD` | first frame of an allocated block of `2^order` frames; `refcount` is 1; `next`/`prev` belong to the owner list ([`super::BlockList`]) |
//! | Tail | `INIT` only | any other frame of a free or allocated block; which one is known from the block's head only |
//!
//! Tails are never written by the allocator: splitting a block writes the
//! head of the upper half, merging clears the head of the buddy, so an
//! order-10 allocation writes one struct page, not 1024 (as Linux's buddy).
//!
//! # Fields
//!
//! - `flags`: the state bits above.
//! - `refcount`: 1 for an allocated head and for a reserved frame, else 0.
//! - `order`: for a free or allocated head, log2 of the block's frame count; else 0.
//! - `next`, `prev`: list links as raw frame numbers ([`NO_PFN`] = none):
//!   the free list for a free head, the owner list for an allocated head.
//! - `mapping`: owner tag for future users (page cache, slab); always 0 today.
//! - `pfn`: the frame this struct page describes, written at initialization
//!   so debug builds can check `pfn_to_page` round trips.
//! - `_reserved`: padding to 64 bytes; 0.

/// The struct page is initialized (set on every initialized struct page).
pub const PG_INIT: u64 = 1 << 0;
/// Reserved frame: not managed by the allocator.
pub const PG_RESERVED: u64 = 1 << 1;
/// Head of a free block, on a free list.
pub const PG_BUDDY: u64 = 1 << 2;
/// Head of an allocated block.
pub const PG_HEAD: u64 = 1 << 3;
/// No RAM behind this frame.
pub const PG_HOLE: u64 = 1 << 4;

/// "No frame" in a list link.
pub const NO_PFN: u64 = u64::MAX;

/// The metadata of one 4 KiB page. See the module documentation for states.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// State bits (`PG_*`).
    pub flags: u64,
    /// References: 1 for allocated heads and reserved frames, else 0.
    pub refcount: u32,
    /// Block order for a free or allocated head, else 0.
    pub order: u32,
    /// Next frame on the free list or owner list, or [`NO_PFN`].
    pub next: u64,
    /// Previous frame on the free list, or [`NO_PFN`].
    pub prev: u64,
    /// Owner tag for future users; 0.
    pub mapping: u64,
    /// The frame this struct page describes.
    pub pfn: u64,
    /// Padding; 0.
    pub _reserved: [u64; 2],
}

const _: () = assert!(core::mem::size_of::<Page>() as u64 == guest_abi::STRUCT_PAGE_SIZE);
const _: () = assert!(core::mem::align_of::<Page>() == 8);

impl Page {
    /// The initial contents of a struct page of the given kind.
    pub const fn initial(flags: u64, pfn: u64) -> Page {
        let refcount = if flags & PG_RESERVED != 0 { 1 } else { 0 };
        Page {
            flags: PG_INIT | flags,
            refcount,
            order: 0,
            next: NO_PFN,
            prev: NO_PFN,
            mapping: 0,
            pfn,
            _reserved: [0; 2],
        }
    }
}

/// A pointer to an initialized struct page in the memmap.
///
/// Only [`super::memmap::Memmap::pfn_to_page`] creates one, which makes two
/// promises the accessors rely on: the pointer is valid and aligned for the
/// manager's lifetime, and the chunk holding it is initialized. Data races are
/// excluded by the locking protocol of [`super::MemoryManager`]: every access
/// to an initialized struct page happens under the zone lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PagePtr(*mut Page);

impl PagePtr {
    /// Wraps a memmap pointer.
    ///
    /// # Safety
    /// `p` must point to an initialized struct page that stays valid while the
    /// `PagePtr` is used, and accesses through it must follow the zone-lock
    /// protocol (see the type's documentation).
    pub(crate) const unsafe fn new(p: *mut Page) -> PagePtr {
        PagePtr(p)
    }

    /// Reads the whole struct page.
    pub(crate) fn get(self) -> Page {
        // SAFETY: valid, aligned and race-free by the constructor's contract.
        unsafe { self.0.read() }
    }

    /// Applies `f` to the struct page in place.
    pub(crate) fn update(self, f: impl FnOnce(&mut Page)) {
        // SAFETY: valid, aligned and race-free by the constructor's contract;
        // the reference does not outlive this call.
        unsafe { f(&mut *self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_is_64_bytes_and_initial_states_are_distinct() {
        assert_eq!(core::mem::size_of::<Page>(), 64);
        let r = Page::initial(PG_RESERVED, 7);
        assert_eq!((r.flags, r.refcount, r.pfn), (PG_INIT | PG_RESERVED, 1, 7));
        let t = Page::initial(0, 8);
        assert_eq!((t.flags, t.refcount, t.next), (PG_INIT, 0, NO_PFN));
        assert_ne!(Page::initial(PG_HOLE, 0).flags, t.flags);
    }
}
