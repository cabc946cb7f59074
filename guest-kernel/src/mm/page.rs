//! `struct page`: the 64-byte metadata the memmap keeps for every 4 KiB page,
//! its states, and the only transitions between them.
//!
//! The memmap is reserved out of guest RAM but never written in bulk: a
//! struct page is first written when its chunk is initialized, and whether a
//! chunk is initialized is recorded outside the memmap (the init bitmap in
//! [`super::memmap`]). Nothing reads a struct page of an uninitialized chunk,
//! so a struct page that exists is always in one of the states below (the
//! never-written slot of an uninitialized chunk has no state at all: it is
//! whatever the memory held, zero in practice).
//!
//! # States
//!
//! | State | Meaning | `refcount` | `next` / `prev` |
//! |-------|---------|------------|-----------------|
//! | [`Hole`](PageState::Hole) | no RAM behind the frame (a gap inside a section's memmap span); never changes | 0 | none |
//! | [`Reserved`](PageState::Reserved) | RAM the allocator does not manage: reserved by the caller (kernel image, boot data) or the memmap itself; never changes | 1 | none |
//! | [`Tail`](PageState::Tail) | any frame of a free or allocated block but its first; which block is known from the block's head only. Allocatable RAM is initialized in this state, then freed into the buddy | 0 | none |
//! | [`Free { order }`](PageState::Free) | first frame of a free block of `2^order` frames, on free list `order` | 0 | the free list |
//! | [`Allocated { order }`](PageState::Allocated) | first frame of an allocated block of `2^order` frames | 1 | the owner's list ([`super::BlockList`]), or none |
//!
//! # Transitions
//!
//! ```text
//!   chunk init ──► Hole, Reserved               (final)
//!   chunk init ──► Tail ◄──► Free { k }          (push on / unlink from free list k)
//!                   ▲ │
//!                   │ ▼
//!              Allocated { k }                   (handed out / freed)
//! ```
//!
//! Every other change is illegal. [`Page::try_transition`] checks the
//! current state and the edge and refuses with a [`PageTransitionError`]
//! (used where the caller's word is all there is: freeing a block);
//! [`Page::transition`] checks the same with a debug assertion (used where
//! the allocator's own invariants guarantee it: the free lists).
//!
//! Tails are never written by the allocator: splitting a block writes the
//! head of the upper half, merging turns the buddy's head into a tail, so an
//! order-10 allocation writes one struct page, not 1024 (as Linux's buddy).
//!
//! # Fields
//!
//! - `state`: the [`PageState`] (a one-byte tag and the block order).
//! - `refcount`: references, as in the table above (derived from the state
//!   by every transition; kept for future users such as the page cache).
//! - `next`, `prev`: list links as raw frame numbers ([`NO_PFN`] = none):
//!   the free list for a free head, the owner list (`next` only) for an
//!   allocated head.
//! - `flags`: [`REPORTED`] on a free head whose memory was reported to the
//!   VMM (free page reporting, [`super::reclaim`]): it is not reported again
//!   until it has been allocated or merged and freed again. Every state
//!   transition clears the flags, so only a block that stays on its free
//!   list keeps the mark (Linux's `PageReported`).
//! - `mapping`: owner tag for future users (page cache, slab); always 0 today.
//! - `pfn`: the frame this struct page describes, written at initialization
//!   so debug builds check that `pfn_to_page` round trips.
//! - `_reserved`: padding to 64 bytes; 0.

use core::fmt;

use super::addr::Pfn;

/// "No frame" in a list link.
pub const NO_PFN: u64 = u64::MAX;

/// Bit of `flags`: a free head whose block was reported to the VMM.
pub const REPORTED: u16 = 1 << 0;

/// The state of an initialized struct page (see the module documentation).
///
/// Stored in the struct page as a one-byte tag and a one-byte order. Tag 0
/// is no state, so a zeroed, never-written slot is never mistaken for one.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// No RAM behind the frame.
    Hole = 1,
    /// RAM the allocator does not manage.
    Reserved = 2,
    /// A frame of a block other than its head.
    Tail = 3,
    /// Head of a free block of `2^order` frames, on free list `order`.
    Free {
        /// Block order.
        order: u8,
    } = 4,
    /// Head of an allocated block of `2^order` frames.
    Allocated {
        /// Block order.
        order: u8,
    } = 5,
}

const _: () = assert!(core::mem::size_of::<PageState>() == 2);

impl PageState {
    /// Whether chunk initialization may write this state (Hole, Reserved or
    /// Tail: no block exists before the buddy frees one).
    pub const fn is_initial(self) -> bool {
        matches!(
            self,
            PageState::Hole | PageState::Reserved | PageState::Tail
        )
    }

    /// Whether `self → to` is one of the transitions in the module docs.
    pub const fn can_become(self, to: PageState) -> bool {
        matches!(
            (self, to),
            (PageState::Tail, PageState::Free { .. })
                | (PageState::Tail, PageState::Allocated { .. })
                | (PageState::Free { .. }, PageState::Tail)
                | (PageState::Allocated { .. }, PageState::Tail)
        )
    }

    /// The block order of a free or allocated head.
    pub const fn order(self) -> Option<u32> {
        match self {
            PageState::Free { order } | PageState::Allocated { order } => Some(order as u32),
            _ => None,
        }
    }

    /// The reference count a struct page in this state carries.
    pub const fn refcount(self) -> u32 {
        match self {
            PageState::Reserved | PageState::Allocated { .. } => 1,
            _ => 0,
        }
    }
}

/// Why [`Page::try_transition`] refused a state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageTransitionError {
    /// The struct page is not in the state the transition starts from.
    WrongState {
        /// The state the transition starts from.
        expected: PageState,
        /// The state the struct page is in.
        found: PageState,
    },
    /// No transition leads from `from` to `to`.
    Illegal {
        /// Where it would start.
        from: PageState,
        /// Where it would end.
        to: PageState,
    },
}

impl fmt::Display for PageTransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageTransitionError::WrongState { expected, found } => {
                write!(f, "struct page is {found:?}, not {expected:?}")
            }
            PageTransitionError::Illegal { from, to } => {
                write!(f, "a struct page cannot go from {from:?} to {to:?}")
            }
        }
    }
}

/// The metadata of one 4 KiB page. See the module documentation for its
/// states and fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    state: PageState,
    flags: u16,
    refcount: u32,
    next: u64,
    prev: u64,
    mapping: u64,
    pfn: u64,
    _reserved: [u64; 3],
}

const _: () = assert!(core::mem::size_of::<Page>() as u64 == guest_abi::STRUCT_PAGE_SIZE);
const _: () = assert!(core::mem::align_of::<Page>() == 8);

fn link(p: Option<Pfn>) -> u64 {
    p.map_or(NO_PFN, |p| p.0)
}

fn unlink(raw: u64) -> Option<Pfn> {
    (raw != NO_PFN).then_some(Pfn(raw))
}

impl Page {
    /// The struct page chunk initialization writes for `pfn`. `state` must
    /// be an initial one ([`PageState::is_initial`]; asserted in debug
    /// builds).
    pub const fn initial(state: PageState, pfn: Pfn) -> Page {
        debug_assert!(state.is_initial(), "not an initial struct page state");
        Page {
            state,
            flags: 0,
            refcount: state.refcount(),
            next: NO_PFN,
            prev: NO_PFN,
            mapping: 0,
            pfn: pfn.0,
            _reserved: [0; 3],
        }
    }

    /// The current state.
    #[inline]
    pub fn state(&self) -> PageState {
        self.state
    }

    /// The frame this struct page describes.
    pub fn pfn(&self) -> Pfn {
        Pfn(self.pfn)
    }

    /// References held (see the module documentation).
    pub fn refcount(&self) -> u32 {
        self.refcount
    }

    /// The next frame on this page's list.
    #[inline]
    pub fn next(&self) -> Option<Pfn> {
        unlink(self.next)
    }

    /// The previous frame on this page's free list.
    #[inline]
    pub fn prev(&self) -> Option<Pfn> {
        unlink(self.prev)
    }

    /// Whether this free head's block was reported to the VMM.
    #[inline]
    pub fn reported(&self) -> bool {
        self.flags & REPORTED != 0
    }

    /// Marks a free head's block as reported (cleared by the next transition).
    pub fn set_reported(&mut self) {
        debug_assert!(
            matches!(self.state, PageState::Free { .. }),
            "reported mark on a {:?}",
            self.state
        );
        self.flags |= REPORTED;
    }

    /// Sets the next link (a free or allocated head's list).
    #[inline]
    pub fn set_next(&mut self, next: Option<Pfn>) {
        debug_assert!(
            self.state.order().is_some(),
            "list link on a {:?}",
            self.state
        );
        self.next = link(next);
    }

    /// Sets the previous link (a free head's list).
    #[inline]
    pub fn set_prev(&mut self, prev: Option<Pfn>) {
        debug_assert!(
            matches!(self.state, PageState::Free { .. }),
            "free-list link on a {:?}",
            self.state
        );
        self.prev = link(prev);
    }

    /// Moves from `from` to `to` if the struct page is in `from` and the
    /// edge is legal; otherwise changes nothing. The links are cleared and
    /// the reference count follows the new state.
    pub fn try_transition(
        &mut self,
        from: PageState,
        to: PageState,
    ) -> Result<(), PageTransitionError> {
        if !from.can_become(to) {
            return Err(PageTransitionError::Illegal { from, to });
        }
        if self.state != from {
            return Err(PageTransitionError::WrongState {
                expected: from,
                found: self.state,
            });
        }
        self.set_state(to);
        Ok(())
    }

    /// [`Page::try_transition`] for a change the caller's invariants
    /// guarantee: checked by a debug assertion only.
    #[inline]
    pub fn transition(&mut self, from: PageState, to: PageState) {
        debug_assert!(
            from.can_become(to) && self.state == from,
            "illegal struct page transition of {:#x}: {:?} (expected {from:?}) -> {to:?}",
            self.pfn,
            self.state
        );
        self.set_state(to);
    }

    #[inline]
    fn set_state(&mut self, to: PageState) {
        self.state = to;
        self.flags = 0;
        self.refcount = to.refcount();
        self.next = NO_PFN;
        self.prev = NO_PFN;
    }
}

/// A pointer to an initialized struct page in the memmap.
///
/// Only [`super::memmap::Memmap::pfn_to_page`] creates one, which makes two
/// promises the accessors rely on: the pointer is valid and aligned for the
/// manager's lifetime, and the chunk holding it is initialized (so the bytes
/// are a valid [`Page`]). Data races are excluded by the locking protocol of
/// [`super::MemoryManager`]: every access to an initialized struct page
/// happens under the zone lock.
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
    #[inline]
    pub(crate) fn get(self) -> Page {
        // SAFETY: valid, aligned, initialized and race-free by the
        // constructor's contract.
        unsafe { self.0.read() }
    }

    /// The struct page's state.
    #[inline]
    pub(crate) fn state(self) -> PageState {
        // SAFETY: as in `get`; reads only the state field.
        unsafe { (*self.0).state }
    }

    /// Applies `f` to the struct page in place.
    #[inline]
    pub(crate) fn update<R>(self, f: impl FnOnce(&mut Page) -> R) -> R {
        // SAFETY: valid, aligned, initialized and race-free by the
        // constructor's contract; the reference does not outlive this call.
        unsafe { f(&mut *self.0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [PageState; 7] = [
        PageState::Hole,
        PageState::Reserved,
        PageState::Tail,
        PageState::Free { order: 0 },
        PageState::Free { order: 3 },
        PageState::Allocated { order: 0 },
        PageState::Allocated { order: 3 },
    ];

    #[test]
    fn page_is_64_bytes_and_initial_states_are_distinct() {
        assert_eq!(core::mem::size_of::<Page>(), 64);
        let r = Page::initial(PageState::Reserved, Pfn(7));
        assert_eq!(
            (r.state(), r.refcount(), r.pfn()),
            (PageState::Reserved, 1, Pfn(7))
        );
        let t = Page::initial(PageState::Tail, Pfn(8));
        assert_eq!(
            (t.state(), t.refcount(), t.next()),
            (PageState::Tail, 0, None)
        );
        assert_ne!(Page::initial(PageState::Hole, Pfn(0)).state(), t.state());
        assert!(ALL.iter().filter(|s| s.is_initial()).count() == 3);
    }

    #[test]
    fn a_zeroed_slot_is_no_state() {
        // Tag 0 is not a discriminant: a never-written (zero) struct page
        // cannot pass for an initialized one, whatever the debug checks.
        for s in ALL {
            // SAFETY: PageState is two plain bytes, tag first.
            let tag = unsafe { *(&raw const s).cast::<u8>() };
            assert_ne!(tag, 0, "{s:?}");
        }
    }

    #[test]
    fn only_the_documented_transitions_are_legal() {
        let legal = |a: PageState, b: PageState| {
            matches!(
                (a, b),
                (
                    PageState::Tail,
                    PageState::Free { .. } | PageState::Allocated { .. }
                ) | (
                    PageState::Free { .. } | PageState::Allocated { .. },
                    PageState::Tail
                )
            )
        };
        for from in ALL {
            for to in ALL {
                assert_eq!(from.can_become(to), legal(from, to), "{from:?} -> {to:?}");
            }
        }
        // Hole and Reserved are final; heads never turn into other heads
        // without going through Tail.
        for to in ALL {
            assert!(!PageState::Hole.can_become(to) && !PageState::Reserved.can_become(to));
        }
        assert!(!PageState::Free { order: 2 }.can_become(PageState::Allocated { order: 2 }));
    }

    #[test]
    fn a_block_goes_round_and_its_fields_follow_the_state() {
        let mut p = Page::initial(PageState::Tail, Pfn(16));
        p.try_transition(PageState::Tail, PageState::Free { order: 4 })
            .unwrap();
        p.set_next(Some(Pfn(32)));
        p.set_prev(Some(Pfn(48)));
        assert_eq!(
            (p.next(), p.prev(), p.refcount()),
            (Some(Pfn(32)), Some(Pfn(48)), 0)
        );
        p.try_transition(PageState::Free { order: 4 }, PageState::Tail)
            .unwrap();
        assert_eq!(
            (p.next(), p.prev()),
            (None, None),
            "links do not survive a transition"
        );
        p.try_transition(PageState::Tail, PageState::Allocated { order: 4 })
            .unwrap();
        assert_eq!((p.state().order(), p.refcount()), (Some(4), 1));
        p.try_transition(PageState::Allocated { order: 4 }, PageState::Tail)
            .unwrap();
        assert_eq!((p.state(), p.refcount()), (PageState::Tail, 0));
    }

    #[test]
    fn the_reported_mark_lasts_until_the_next_transition() {
        let mut p = Page::initial(PageState::Tail, Pfn(4));
        p.transition(PageState::Tail, PageState::Free { order: 2 });
        assert!(!p.reported());
        p.set_reported();
        assert!(p.reported());
        // Allocated (or merged into a buddy): the mark goes.
        p.transition(PageState::Free { order: 2 }, PageState::Tail);
        p.transition(PageState::Tail, PageState::Free { order: 2 });
        assert!(!p.reported());
    }

    #[test]
    fn illegal_or_mismatched_transitions_are_refused_and_change_nothing() {
        let mut p = Page::initial(PageState::Tail, Pfn(1));
        p.transition(PageState::Tail, PageState::Allocated { order: 1 });
        let before = p;
        // Freeing with another order: the state does not match.
        assert_eq!(
            p.try_transition(PageState::Allocated { order: 0 }, PageState::Tail),
            Err(PageTransitionError::WrongState {
                expected: PageState::Allocated { order: 0 },
                found: PageState::Allocated { order: 1 },
            })
        );
        // Freeing twice: a tail is not allocated.
        let mut t = Page::initial(PageState::Tail, Pfn(2));
        assert!(matches!(
            t.try_transition(PageState::Allocated { order: 0 }, PageState::Tail),
            Err(PageTransitionError::WrongState {
                found: PageState::Tail,
                ..
            })
        ));
        // An edge that does not exist, even from the right state.
        let mut r = Page::initial(PageState::Reserved, Pfn(3));
        assert_eq!(
            r.try_transition(PageState::Reserved, PageState::Free { order: 0 }),
            Err(PageTransitionError::Illegal {
                from: PageState::Reserved,
                to: PageState::Free { order: 0 },
            })
        );
        assert_eq!(p, before);
        assert_eq!(r.state(), PageState::Reserved);
        let e = PageTransitionError::Illegal {
            from: PageState::Hole,
            to: PageState::Tail,
        };
        assert_eq!(
            std::format!("{e}"),
            "a struct page cannot go from Hole to Tail"
        );
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "illegal struct page transition")]
    fn an_unchecked_illegal_transition_is_caught_in_debug_builds() {
        let mut p = Page::initial(PageState::Tail, Pfn(5));
        p.transition(PageState::Free { order: 0 }, PageState::Tail);
    }
}
