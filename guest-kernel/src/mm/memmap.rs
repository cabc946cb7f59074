//! Memmap layout and the init bitmap: where each frame's struct page lives,
//! which frames are RAM, reserved or holes, and which chunks are initialized.
//!
//! # Layout
//!
//! Physical memory is cut into sections (`section_bytes`, 128 MiB by default)
//! and sections into chunks (`chunk_bytes`, 2 MiB by default). A section that
//! holds RAM gets memmap for its *span*: from the section start to the end of
//! its last RAM chunk. Sections without RAM get none. Gaps inside a span (e.g.
//! the legacy hole below 1 MiB) get struct pages in the [Hole] state.
//!
//! [Hole]: super::page::PageState::Hole
//!
//! The spans and the placement are computed by the contract's
//! [`guest_abi::layout`] functions, which the VMM also uses to predict what
//! an `ondemand` guest onlines while it boots.
//!
//! Placement (`memmap_on_memory`):
//! - `false`: every section's memmap is a slice of one array, in section
//!   order, reserved in low memory at the first fit in RAM after the end of
//!   the highest caller-reserved range below 4 GiB (after the kernel image).
//! - `true`: each section's memmap sits at the first fit in RAM inside the
//!   section itself: at the section start, or after the caller-reserved part
//!   when the section starts with reserved memory. A section whose RAM cannot
//!   hold its own memmap fails the initialization ([`MmInitError::MemmapDoesNotFit`]).
//!
//! Each section's memmap is rounded up to whole pages; its frames are reserved.
//!
//! # Bookkeeping without a heap
//!
//! The layout tables and the init bitmap are fixed-capacity arrays inside the
//! manager (which the kernel keeps in a `static`, so they are zero `.bss`):
//! [`MAX_RANGES`] RAM and reserved ranges, [`MAX_SECTIONS`] sections and one
//! bit per [`guest_abi::MIN_CHUNK_SIZE`] of [`MAX_PHYS_BYTES`] (128 KiB of
//! bitmap, of which a 64 GiB guest with 2 MiB chunks touches one page).
//! Only the entries that describe existing memory are ever written.

use core::sync::atomic::{AtomicU64, Ordering};

use guest_abi::layout::{self, MemmapGeometry};
use guest_abi::{GpaRange, MIN_CHUNK_SIZE, PAGE_SIZE, STRUCT_PAGE_SIZE};

use super::addr::{Pfn, PfnRange, PhysAddr, PhysRange, PAGE_SHIFT};
use super::config::{MmConfig, MmInitError};
use super::page::{Page, PagePtr, PageState};

/// Most RAM (and most reserved) ranges the caller may pass.
pub const MAX_RANGES: usize = 64;
/// Highest physical address the bookkeeping covers: 64 GiB of RAM plus the
/// PCI hole below 4 GiB, rounded up to a power of two.
pub const MAX_PHYS_BYTES: u64 = 128 << 30;
/// Most sections (so sections of 32 MiB or more always fit [`MAX_PHYS_BYTES`]):
/// the contract's [`guest_abi::layout::MAX_SECTIONS`].
pub const MAX_SECTIONS: usize = layout::MAX_SECTIONS;

const BITMAP_WORDS: usize = (MAX_PHYS_BYTES / MIN_CHUNK_SIZE / 64) as usize;

/// What backs a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageKind {
    /// No RAM.
    Hole,
    /// RAM reserved by the caller or by the memmap.
    Reserved,
    /// RAM the allocator manages.
    Free,
}

impl PageKind {
    /// The state chunk initialization writes: allocatable frames start as
    /// tails, which the buddy then frees into blocks.
    pub(crate) const fn initial_state(self) -> PageState {
        match self {
            PageKind::Hole => PageState::Hole,
            PageKind::Reserved => PageState::Reserved,
            PageKind::Free => PageState::Tail,
        }
    }
}

/// A sorted list of disjoint, non-adjacent frame ranges.
#[derive(Clone, Copy)]
pub(crate) struct RangeList {
    r: [PfnRange; MAX_RANGES],
    n: usize,
}

impl RangeList {
    const EMPTY: RangeList = RangeList {
        r: [PfnRange {
            start: Pfn(0),
            end: Pfn(0),
        }; MAX_RANGES],
        n: 0,
    };

    /// A list of `input`, normalized as [`RangeList::set`] does.
    #[cfg(test)]
    fn build(input: &[PhysRange], inner: bool) -> Result<RangeList, MmInitError> {
        let mut l = RangeList::EMPTY;
        l.set(input, inner)?;
        Ok(l)
    }

    /// Makes `self` the normalized `input`: page-rounded (`inner` for RAM,
    /// outward for reserved memory), empty ones dropped, sorted, overlaps
    /// merged. Sorts and merges in place, so no list is built on the stack
    /// (two lists of [`MAX_RANGES`] were 2 KiB of boot stack). Leaves `self`
    /// alone on error.
    fn set(&mut self, input: &[PhysRange], inner: bool) -> Result<(), MmInitError> {
        if input.len() > MAX_RANGES {
            return Err(MmInitError::TooManyRanges);
        }
        self.n = 0;
        for r in input {
            let p = if inner {
                PfnRange::inner(*r)
            } else {
                PfnRange::outer(*r)
            };
            if p.pages() == 0 {
                continue;
            }
            // Insertion sort by start.
            let mut i = self.n;
            while i > 0 && self.r[i - 1].start > p.start {
                self.r[i] = self.r[i - 1];
                i -= 1;
            }
            self.r[i] = p;
            self.n += 1;
        }
        // Merge: `out` <= `i`, so entry `i` is read before anything lands on it.
        let mut out = 0usize;
        for i in 0..self.n {
            let p = self.r[i];
            match out.checked_sub(1) {
                Some(last) if self.r[last].end >= p.start => {
                    self.r[last].end = self.r[last].end.max(p.end);
                }
                _ => {
                    self.r[out] = p;
                    out += 1;
                }
            }
        }
        self.n = out;
        Ok(())
    }

    pub(crate) fn as_slice(&self) -> &[PfnRange] {
        &self.r[..self.n]
    }

    /// The ranges in bytes, as `guest_abi::layout` takes them (the first
    /// `.1` entries).
    fn byte_ranges(&self) -> ([GpaRange; MAX_RANGES], usize) {
        let mut out = [GpaRange::default(); MAX_RANGES];
        for (o, r) in out.iter_mut().zip(self.as_slice()) {
            *o = GpaRange {
                start: r.start.addr().0,
                len: r.pages() * PAGE_SIZE,
            };
        }
        (out, self.n)
    }
}

/// One section's memmap.
#[derive(Clone, Copy, Debug)]
struct Section {
    /// Address of the struct page of the section's first frame.
    memmap: PhysAddr,
    /// Frames covered from the section start (0: no memmap).
    span_pages: u64,
    /// Bytes of memmap reserved for the section (whole pages).
    memmap_bytes: u64,
}

const NO_SECTION: Section = Section {
    memmap: PhysAddr(0),
    span_pages: 0,
    memmap_bytes: 0,
};

/// Counts computed from the layout at initialization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LayoutTotals {
    /// Frames of RAM.
    pub total_pages: u64,
    /// Frames of RAM that are reserved (caller or memmap).
    pub reserved_pages: u64,
    /// Frames of RAM the allocator manages.
    pub allocatable_pages: u64,
    /// Chunks with memmap.
    pub chunks_total: u64,
    /// Chunks with memmap and at least one allocatable frame.
    pub chunks_allocatable: u64,
    /// Bytes of RAM reserved for the memmap.
    pub memmap_bytes: u64,
}

/// The memmap layout and the init bitmap. `repr(C)`, with the scalars first
/// and each table after them in the order a boot touches them, so that a
/// small guest's layout (its ranges and first sections) fits one page.
#[repr(C)]
pub(crate) struct Memmap {
    direct_map: *mut u8,
    chunk_shift: u32,
    section_shift: u32,
    on_memory: bool,
    /// The single memmap array (empty when `on_memory`).
    global: PfnRange,
    nsections: usize,
    totals: LayoutTotals,
    ram: RangeList,
    reserved: RangeList,
    sections: [Section; MAX_SECTIONS],
    bitmap: [AtomicU64; BITMAP_WORDS],
}

// SAFETY: the layout is written only by `build` (through `&mut self`) and
// read-only afterwards; the bitmap is atomic; the direct-map pointer is only
// dereferenced by `init_chunk` and `pfn_to_page`, whose callers promise
// exclusive ownership of the chunk or the zone lock.
unsafe impl Sync for Memmap {}
// SAFETY: as above; nothing in the layout is tied to the creating thread.
unsafe impl Send for Memmap {}

impl Memmap {
    /// An empty layout (no memory).
    pub(crate) const fn empty() -> Memmap {
        Memmap {
            direct_map: core::ptr::null_mut(),
            chunk_shift: 0,
            section_shift: 0,
            on_memory: false,
            ram: RangeList::EMPTY,
            reserved: RangeList::EMPTY,
            global: PfnRange {
                start: Pfn(0),
                end: Pfn(0),
            },
            nsections: 0,
            sections: [NO_SECTION; MAX_SECTIONS],
            totals: LayoutTotals {
                total_pages: 0,
                reserved_pages: 0,
                allocatable_pages: 0,
                chunks_total: 0,
                chunks_allocatable: 0,
                memmap_bytes: 0,
            },
            bitmap: [const { AtomicU64::new(0) }; BITMAP_WORDS],
        }
    }

    /// Bytes from the start of a `Memmap` to the end of its first `n`
    /// section entries: what a boot writes of the layout, for a guest with
    /// `n` sections (the init bitmap excepted).
    #[cfg(test)]
    pub(crate) const fn header_bytes(n: usize) -> usize {
        core::mem::offset_of!(Memmap, sections) + n * core::mem::size_of::<Section>()
    }

    /// Computes the layout. Writes nothing but `self` (not the memmap).
    /// `cfg` must be valid ([`MmConfig::validate`]).
    pub(crate) fn build(
        &mut self,
        cfg: &MmConfig,
        ram: &[PhysRange],
        reserved: &[PhysRange],
        direct_map: *mut u8,
    ) -> Result<(), MmInitError> {
        self.direct_map = direct_map;
        self.chunk_shift = (cfg.chunk_bytes >> PAGE_SHIFT).trailing_zeros();
        self.section_shift = (cfg.section_bytes >> PAGE_SHIFT).trailing_zeros();
        self.on_memory = cfg.memmap_on_memory;
        self.ram.set(ram, true)?;
        self.reserved.set(reserved, false)?;
        let ram_end = match self.ram.as_slice().last() {
            Some(r) => r.end,
            None => return Err(MmInitError::NoRam),
        };
        if ram_end.addr().0 > MAX_PHYS_BYTES {
            return Err(MmInitError::RamTooLarge);
        }
        // The layout itself is the contract's (`guest_abi::layout`), so the
        // VMM computes the same placement from the same inputs.
        let (ram_b, reserved_b) = (self.ram.byte_ranges(), self.reserved.byte_ranges());
        let (ram_b, reserved_b) = (&ram_b.0[..ram_b.1], &reserved_b.0[..reserved_b.1]);
        let geometry = MemmapGeometry {
            chunk_bytes: cfg.chunk_bytes,
            section_bytes: cfg.section_bytes,
            on_memory: cfg.memmap_on_memory,
        };
        let nsections = layout::section_count(ram_b, &geometry) as usize;
        if nsections > MAX_SECTIONS {
            return Err(MmInitError::TooManySections);
        }
        self.nsections = nsections;

        // Spans: from the section start to the end of its last RAM chunk.
        for (s, sec) in self.sections[..nsections].iter_mut().enumerate() {
            let span = layout::section_span(ram_b, &geometry, s as u64);
            sec.span_pages = span / PAGE_SIZE;
            sec.memmap_bytes = layout::memmap_bytes(span);
        }

        // Placement.
        if self.on_memory {
            for s in 0..nsections {
                let sec = self.sections[s];
                if sec.span_pages == 0 {
                    continue;
                }
                let lo = (s as u64) * cfg.section_bytes;
                let at = layout::first_fit(ram_b, reserved_b, lo, lo + cfg.section_bytes, sec.memmap_bytes)
                    .ok_or(MmInitError::MemmapDoesNotFit)?;
                self.sections[s].memmap = PhysAddr(at);
            }
        } else {
            let total: u64 = self.sections[..nsections]
                .iter()
                .map(|s| s.memmap_bytes)
                .sum();
            let at = layout::memmap_array_start(ram_b, reserved_b, total)
                .ok_or(MmInitError::MemmapDoesNotFit)?;
            self.global = PfnRange::outer(PhysRange::from_len(at, total));
            let mut next = PhysAddr(at);
            for sec in self.sections[..nsections].iter_mut() {
                sec.memmap = next;
                next = PhysAddr(next.0 + sec.memmap_bytes);
            }
        }

        // Totals, from the same classification the initialization uses.
        let mut t = LayoutTotals::default();
        let mut c = self.next_chunk(0);
        while let Some(chunk) = c {
            let mut allocatable = false;
            for (kind, run) in self.runs(chunk) {
                match kind {
                    PageKind::Hole => {}
                    PageKind::Reserved => t.reserved_pages += run.pages(),
                    PageKind::Free => {
                        t.allocatable_pages += run.pages();
                        allocatable = true;
                    }
                }
            }
            t.chunks_total += 1;
            t.chunks_allocatable += u64::from(allocatable);
            c = self.next_chunk(chunk + 1);
        }
        t.total_pages = t.reserved_pages + t.allocatable_pages;
        t.memmap_bytes = self.sections[..nsections]
            .iter()
            .map(|s| s.memmap_bytes)
            .sum();
        self.totals = t;
        Ok(())
    }

    pub(crate) fn totals(&self) -> LayoutTotals {
        self.totals
    }

    /// Frames per chunk.
    pub(crate) fn chunk_pages(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// The chunk holding `pfn`.
    pub(crate) fn chunk_of(&self, pfn: Pfn) -> u64 {
        pfn.0 >> self.chunk_shift
    }

    /// The frames of chunk `c`.
    pub(crate) fn chunk_range(&self, c: u64) -> PfnRange {
        PfnRange {
            start: Pfn(c << self.chunk_shift),
            end: Pfn((c + 1) << self.chunk_shift),
        }
    }

    /// The first chunk at or after `c` that has memmap.
    pub(crate) fn next_chunk(&self, c: u64) -> Option<u64> {
        let per_section_shift = self.section_shift - self.chunk_shift;
        let mut s = (c >> per_section_shift) as usize;
        while s < self.nsections {
            let first = (s as u64) << per_section_shift;
            let end = first + (self.sections[s].span_pages >> self.chunk_shift);
            let cand = c.max(first);
            if cand < end {
                return Some(cand);
            }
            s += 1;
        }
        None
    }

    /// The memmap frames that can overlap section `s`.
    fn memmap_frames_for(&self, s: usize) -> PfnRange {
        if self.on_memory {
            let sec = &self.sections[s];
            let start = sec.memmap.pfn_down();
            PfnRange {
                start,
                end: start.add(sec.memmap_bytes / PAGE_SIZE),
            }
        } else {
            self.global
        }
    }

    /// The runs of same-kind frames in chunk `c`, in address order.
    pub(crate) fn runs(&self, c: u64) -> Runs<'_> {
        let r = self.chunk_range(c);
        let memmap = self.memmap_frames_for((r.start.0 >> self.section_shift) as usize);
        Runs {
            mm: self,
            cur: r.start,
            end: r.end,
            memmap,
        }
    }

    /// Whether chunk `c` has a frame the allocator manages.
    pub(crate) fn chunk_has_allocatable(&self, c: u64) -> bool {
        self.runs(c).any(|(k, _)| k == PageKind::Free)
    }

    /// The kind of `p` and the end of its run (at most `limit`).
    fn classify(&self, p: Pfn, limit: Pfn, memmap: PfnRange) -> (PageKind, Pfn) {
        let mut end = limit;
        match self.ram.as_slice().iter().find(|r| r.end > p) {
            Some(r) if r.start <= p => end = end.min(r.end),
            Some(r) => return (PageKind::Hole, end.min(r.start)),
            None => return (PageKind::Hole, end),
        }
        for res in self
            .reserved
            .as_slice()
            .iter()
            .chain(core::iter::once(&memmap))
        {
            if res.contains(p) {
                return (PageKind::Reserved, end.min(res.end));
            }
            if res.start > p {
                end = end.min(res.start);
            }
        }
        (PageKind::Free, end)
    }

    /// Whether `pfn`'s struct page is initialized (false for frames without memmap).
    #[inline]
    pub(crate) fn is_initialized(&self, pfn: Pfn) -> bool {
        let c = self.chunk_of(pfn);
        match self.bitmap.get((c / 64) as usize) {
            Some(w) => w.load(Ordering::Acquire) & (1 << (c % 64)) != 0,
            None => false,
        }
    }

    /// Clears chunk `c`'s bit: its struct pages are no longer initialized
    /// (memory reclaim returns a wholly free chunk to uninitialized).
    ///
    /// # Safety
    /// The caller must hold the zone lock and have taken every frame of the
    /// chunk off the free lists (none is allocated), so that nobody reads or
    /// writes its struct pages once the bit is clear.
    pub(crate) unsafe fn deinit_chunk(&self, c: u64) {
        self.bitmap[(c / 64) as usize].fetch_and(!(1 << (c % 64)), Ordering::Release);
    }

    /// One past the highest chunk index that can have memmap.
    pub(crate) fn chunk_limit(&self) -> u64 {
        let per_section_shift = self.section_shift - self.chunk_shift;
        (0..self.nsections)
            .rev()
            .find(|&s| self.sections[s].span_pages > 0)
            .map_or(0, |s| {
                ((s as u64) << per_section_shift)
                    + (self.sections[s].span_pages >> self.chunk_shift)
            })
    }

    /// `log2` of the frames per chunk.
    pub(crate) fn chunk_order(&self) -> u32 {
        self.chunk_shift
    }

    /// Whether every frame of `r` is RAM the allocator manages (no hole, no
    /// reserved frame, no memmap). The reclaim tests' simulated VMM checks
    /// ranges with it.
    #[cfg(test)]
    pub(crate) fn all_allocatable(&self, r: PfnRange) -> bool {
        if r.pages() == 0 {
            return false;
        }
        let mut c = self.chunk_of(r.start);
        let last = self.chunk_of(Pfn(r.end.0 - 1));
        while c <= last {
            if self.next_chunk(c) != Some(c) {
                return false;
            }
            for (kind, run) in self.runs(c) {
                if kind != PageKind::Free && run.start < r.end && run.end > r.start {
                    return false;
                }
            }
            c += 1;
        }
        true
    }

    /// The chunks whose struct pages lie (partly) in the memmap page at
    /// `page` (any page-aligned physical address): `[first, last]`, or
    /// `None` if `page` is in no section's memmap.
    fn memmap_page_chunks(&self, page: PhysAddr) -> Option<(u64, u64)> {
        let s = self.sections[..self.nsections].iter().position(|sec| {
            sec.memmap_bytes > 0 && page.0 >= sec.memmap.0 && page.0 < sec.memmap.0 + sec.memmap_bytes
        })?;
        let first_pfn = ((s as u64) << self.section_shift)
            + (page.0 - self.sections[s].memmap.0) / STRUCT_PAGE_SIZE;
        let last_pfn = first_pfn + PAGE_SIZE / STRUCT_PAGE_SIZE - 1;
        Some((self.chunk_of(Pfn(first_pfn)), self.chunk_of(Pfn(last_pfn))))
    }

    /// Whether the frames `r` (an online run) may go offline as a whole
    /// (memory reclaim): every chunk they touch has memmap and is
    /// uninitialized, and every frame is either RAM the allocator manages
    /// or a memmap page that describes only uninitialized chunks. No hole,
    /// no kernel or other reserved frame, and no struct page in use.
    pub(crate) fn run_can_go_offline(&self, r: PfnRange) -> bool {
        if r.pages() == 0 {
            return false;
        }
        let mut c = self.chunk_of(r.start);
        let last = self.chunk_of(Pfn(r.end.0 - 1));
        while c <= last {
            if self.next_chunk(c) != Some(c) || self.is_initialized(self.chunk_range(c).start) {
                return false;
            }
            for (kind, run) in self.runs(c) {
                let (s, e) = (run.start.0.max(r.start.0), run.end.0.min(r.end.0));
                match kind {
                    _ if s >= e => {}
                    PageKind::Free => {}
                    PageKind::Reserved => {
                        let describes_only_idle = |pfn: u64| {
                            self.memmap_page_chunks(Pfn(pfn).addr()).is_some_and(|(f, l)| {
                                (f..=l).all(|x| !self.is_initialized(self.chunk_range(x).start))
                            })
                        };
                        if !(s..e).all(describes_only_idle) {
                            return false;
                        }
                    }
                    PageKind::Hole => return false,
                }
            }
            c += 1;
        }
        true
    }

    /// The chunks whose struct pages lie (partly) in the memmap page at
    /// `page` (a page-aligned physical address in the memmap of chunk `c`'s
    /// section): `[first, last]`. Chunks past the section's span count
    /// among them (they have no memmap and are never initialized).
    pub(crate) fn chunks_of_memmap_page(&self, c: u64, page: PhysAddr) -> (u64, u64) {
        let s = (self.chunk_range(c).start.0 >> self.section_shift) as usize;
        let sec = &self.sections[s];
        let first_pfn = ((s as u64) << self.section_shift)
            + (page.0 - sec.memmap.0) / STRUCT_PAGE_SIZE;
        let last_pfn = first_pfn + PAGE_SIZE / STRUCT_PAGE_SIZE - 1;
        (self.chunk_of(Pfn(first_pfn)), self.chunk_of(Pfn(last_pfn)))
    }

    /// Writes every struct page of chunk `c` in its initial state, then sets
    /// the chunk's bit; returns how many of its frames are RAM.
    ///
    /// # Safety
    /// The caller must own chunk `c` exclusively (claimed at the frontier or
    /// in its parallel share): its bit is clear, so nobody else may access its
    /// struct pages, and no other caller initializes it.
    pub(crate) unsafe fn init_chunk(&self, c: u64) -> u64 {
        let range = self.chunk_range(c);
        let base = self.memmap_slot(range.start);
        let mut ram_pages = 0;
        for (kind, run) in self.runs(c) {
            if kind != PageKind::Hole {
                ram_pages += run.pages();
            }
            let state = kind.initial_state();
            for pfn in run.start.0..run.end.0 {
                // SAFETY: the chunk's memmap is contiguous from `base` and
                // lies in RAM that `init` reserved for it; the caller owns
                // the chunk, so nobody else accesses these struct pages.
                unsafe {
                    base.add((pfn - range.start.0) as usize)
                        .write(Page::initial(state, Pfn(pfn)))
                };
            }
        }
        self.bitmap[(c / 64) as usize].fetch_or(1 << (c % 64), Ordering::Release);
        ram_pages
    }

    /// Where `pfn`'s struct page lives: the one place that maps a frame to
    /// its slot in the memmap. The slot may be uninitialized; readers go
    /// through [`Memmap::pfn_to_page`].
    pub(crate) fn memmap_slot(&self, pfn: Pfn) -> *mut Page {
        let s = (pfn.0 >> self.section_shift) as usize;
        let off = pfn.0 & ((1 << self.section_shift) - 1);
        debug_assert!(
            s < self.nsections && off < self.sections[s].span_pages,
            "{pfn:?} has no memmap"
        );
        let at = self.sections[s].memmap.0 + off * STRUCT_PAGE_SIZE;
        // The address stays inside the memmap the caller reserved for us, so
        // `wrapping_add` computes the same pointer as `add` would.
        self.direct_map.wrapping_add(at as usize).cast::<Page>()
    }

    /// The struct page of `pfn`.
    ///
    /// # Safety
    /// `pfn`'s chunk must be initialized (asserted in debug builds), and the
    /// result must be used under the zone lock (see [`PagePtr`]).
    #[inline]
    pub(crate) unsafe fn pfn_to_page(&self, pfn: Pfn) -> PagePtr {
        debug_assert!(
            self.is_initialized(pfn),
            "read of uninitialized struct page {pfn:?}"
        );
        // SAFETY: initialized chunks lie in the memmap, which the caller of
        // `MemoryManager::init` keeps valid; the caller keeps the lock protocol.
        let page = unsafe { PagePtr::new(self.memmap_slot(pfn)) };
        debug_assert_eq!(
            page.get().pfn(),
            pfn,
            "memmap slot of {pfn:?} describes another frame"
        );
        page
    }

    /// The struct page of `pfn` if its chunk is initialized.
    ///
    /// # Safety
    /// The result must be used under the zone lock (see [`PagePtr`]).
    #[inline]
    pub(crate) unsafe fn page_if_initialized(&self, pfn: Pfn) -> Option<PagePtr> {
        // SAFETY: checked initialized just before; the lock is the caller's.
        self.is_initialized(pfn)
            .then(|| unsafe { self.pfn_to_page(pfn) })
    }

    /// The memmap byte range describing chunk `c` (physical addresses).
    pub(crate) fn chunk_memmap(&self, c: u64) -> PhysRange {
        let first = self.chunk_range(c).start;
        let start = self.memmap_slot(first) as u64 - self.direct_map as u64;
        PhysRange::from_len(start, self.chunk_pages() * STRUCT_PAGE_SIZE)
    }

    /// The physical ranges holding the memmap, adjacent ones merged, in
    /// section order.
    pub(crate) fn memmap_ranges(&self) -> impl Iterator<Item = PhysRange> + '_ {
        let mut secs = self.sections[..self.nsections]
            .iter()
            .filter(|s| s.memmap_bytes > 0)
            .peekable();
        core::iter::from_fn(move || {
            let first = secs.next()?;
            let mut r = PhysRange::from_len(first.memmap.0, first.memmap_bytes);
            while let Some(n) = secs.peek() {
                if n.memmap != r.end {
                    break;
                }
                r.end = PhysAddr(r.end.0 + n.memmap_bytes);
                secs.next();
            }
            Some(r)
        })
    }

    /// Chunks per section.
    pub(crate) fn chunks_per_section(&self) -> u64 {
        1 << (self.section_shift - self.chunk_shift)
    }
}

/// Iterator over `(kind, frames)` runs of one chunk.
pub(crate) struct Runs<'a> {
    mm: &'a Memmap,
    cur: Pfn,
    end: Pfn,
    memmap: PfnRange,
}

impl Iterator for Runs<'_> {
    type Item = (PageKind, PfnRange);
    fn next(&mut self) -> Option<(PageKind, PfnRange)> {
        if self.cur >= self.end {
            return None;
        }
        let (kind, end) = self.mm.classify(self.cur, self.end, self.memmap);
        let run = PfnRange {
            start: self.cur,
            end,
        };
        self.cur = end;
        Some((kind, run))
    }
}

/// Checks for the tests.
#[cfg(test)]
impl Memmap {
    /// Whether chunk `c` is initialized.
    pub(crate) fn chunk_initialized(&self, c: u64) -> bool {
        self.is_initialized(self.chunk_range(c).start)
    }

    /// Asserts that every frame of `r` is one the allocator manages.
    pub(crate) fn assert_allocatable(&self, r: PfnRange) {
        for c in self.chunk_of(r.start)..=self.chunk_of(Pfn(r.end.0 - 1)) {
            for (kind, run) in self.runs(c) {
                if run.start < r.end && run.end > r.start {
                    assert_eq!(
                        kind,
                        PageKind::Free,
                        "block {r:?} covers {kind:?} frames {run:?}"
                    );
                }
            }
        }
    }

    /// Asserts that the memmap of every uninitialized chunk was never
    /// written (is still all zero); returns how many chunks are initialized.
    pub(crate) fn assert_uninitialized_untouched(&self) -> u64 {
        self.assert_uninitialized_untouched_but(|_| false)
    }

    /// [`Memmap::assert_uninitialized_untouched`], skipping the chunks for
    /// which `skip` holds.
    pub(crate) fn assert_uninitialized_untouched_but(&self, skip: impl Fn(u64) -> bool) -> u64 {
        let mut initialized = 0;
        let mut c = self.next_chunk(0);
        while let Some(chunk) = c {
            if self.chunk_initialized(chunk) {
                initialized += 1;
            } else if !skip(chunk) {
                let r = self.chunk_memmap(chunk);
                // SAFETY: the memmap lies in the RAM behind the direct map.
                let bytes = unsafe {
                    core::slice::from_raw_parts(
                        self.direct_map.add(r.start.0 as usize),
                        r.len() as usize,
                    )
                };
                assert!(
                    bytes.iter().all(|&b| b == 0),
                    "uninitialized chunk {chunk} memmap was written"
                );
            }
            c = self.next_chunk(chunk + 1);
        }
        initialized
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::testing::{pc_layout, Ram, MIB};
    use guest_abi::Strategy;

    fn cfg(chunk: u64, section: u64, on_memory: bool) -> MmConfig {
        MmConfig {
            strategy: Strategy::Eager,
            chunk_bytes: chunk,
            section_bytes: section,
            memmap_on_memory: on_memory,
            ..MmConfig::new(Strategy::Eager)
        }
    }

    fn build(
        c: &MmConfig,
        ram: &[PhysRange],
        res: &[PhysRange],
    ) -> Result<Box<Memmap>, MmInitError> {
        let mut m = Box::new(Memmap::empty());
        m.build(c, ram, res, core::ptr::null_mut())?;
        Ok(m)
    }

    #[test]
    fn ranges_are_sorted_merged_and_rounded() {
        let l = RangeList::build(
            &[
                PhysRange::from_len(0x5000, 0x1000),
                PhysRange::from_len(0x800, 0x1000),
                PhysRange::from_len(0x1000, 0x10),
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            l.as_slice(),
            &[
                PfnRange {
                    start: Pfn(0),
                    end: Pfn(2)
                },
                PfnRange {
                    start: Pfn(5),
                    end: Pfn(6)
                }
            ]
        );
        let l = RangeList::build(&[PhysRange::from_len(0x800, 0x1000)], true).unwrap();
        assert!(l.as_slice().is_empty());
    }

    #[test]
    fn setting_a_list_replaces_it_and_an_error_leaves_it_alone() {
        let mut l = RangeList::build(&[PhysRange::from_len(0, 0x10_000)], false).unwrap();
        l.set(
            &[
                PhysRange::from_len(0x9000, 0x1000),
                PhysRange::from_len(0x2000, 0x3000),
                PhysRange::from_len(0x4000, 0x2000),
                PhysRange::from_len(0x7000, 0x1000),
            ],
            false,
        )
        .unwrap();
        let want = [
            PfnRange { start: Pfn(2), end: Pfn(6) },
            PfnRange { start: Pfn(7), end: Pfn(8) },
            PfnRange { start: Pfn(9), end: Pfn(10) },
        ];
        assert_eq!(l.as_slice(), &want);
        let many = [PhysRange::from_len(0, 4096); MAX_RANGES + 1];
        assert!(matches!(l.set(&many, false), Err(MmInitError::TooManyRanges)));
        assert_eq!(l.as_slice(), &want);
    }

    #[test]
    fn single_array_goes_after_the_highest_reserved_range_below_4g() {
        let ram = [
            PhysRange::from_len(0, 0x9f000),
            PhysRange::from_len(MIB, 255 * MIB),
        ];
        let res = [
            PhysRange::from_len(0, 4096),
            PhysRange::from_len(MIB, 3 * MIB),
        ];
        let m = build(&cfg(2 * MIB, 128 * MIB, false), &ram, &res).unwrap();
        let ranges: Vec<_> = m.memmap_ranges().collect();
        assert_eq!(ranges, vec![PhysRange::from_len(4 * MIB, 4 * MIB)]);
        let t = m.totals();
        assert_eq!(t.total_pages, (0x9f000 + 255 * MIB) / 4096);
        assert_eq!(t.reserved_pages, 1 + 3 * 256 + 4 * 256);
        assert_eq!(t.chunks_total, 128);
        assert_eq!(t.memmap_bytes, 4 * MIB);
        assert!(!m.chunk_has_allocatable(2) && !m.chunk_has_allocatable(3));
        assert!(m.chunk_has_allocatable(0) && m.chunk_has_allocatable(4));
    }

    #[test]
    fn on_memory_places_each_section_after_its_reserved_start() {
        let ram = [PhysRange::from_len(0, 200 * MIB)];
        let res = [
            PhysRange::from_len(0, 5 * MIB),
            PhysRange::from_len(64 * MIB, MIB),
        ];
        let m = build(&cfg(2 * MIB, 64 * MIB, true), &ram, &res).unwrap();
        let ranges: Vec<_> = m.memmap_ranges().collect();
        assert_eq!(
            ranges,
            vec![
                PhysRange::from_len(5 * MIB, MIB),
                PhysRange::from_len(65 * MIB, MIB),
                PhysRange::from_len(128 * MIB, MIB),
                PhysRange::from_len(192 * MIB, 8 * MIB / 64),
            ]
        );
        // Holes past the last RAM chunk get no memmap.
        assert_eq!(m.next_chunk(100), None);
        assert_eq!(m.totals().chunks_total, 100);
    }

    #[test]
    fn sections_without_ram_get_no_memmap() {
        let ram = [
            PhysRange::from_len(0, 16 * MIB),
            PhysRange::from_len(96 * MIB, 16 * MIB),
        ];
        let m = build(&cfg(MIB, 32 * MIB, false), &ram, &[]).unwrap();
        assert_eq!(m.next_chunk(16), Some(96));
        assert_eq!(m.totals().chunks_total, 32);
        assert_eq!(m.memmap_ranges().count(), 1);
        assert_eq!(m.totals().memmap_bytes, 32 * MIB / 64);
    }

    #[test]
    fn chunk_init_writes_each_frame_in_its_initial_state() {
        let (ram, res) = pc_layout();
        let r = Ram::new(&ram);
        let mut m = Box::new(Memmap::empty());
        m.build(&cfg(2 * MIB, 64 * MIB, false), &ram, &res, r.ptr())
            .unwrap();
        // SAFETY: this test is the memmap's only user.
        let ram_pages = unsafe { m.init_chunk(0) };
        assert_eq!(ram_pages, 0x9f + 256);
        assert_eq!(m.assert_uninitialized_untouched(), 1);
        for (pfn, state) in [
            (0, PageState::Reserved),
            (1, PageState::Tail),
            (0xa0, PageState::Hole),
            (0x100, PageState::Reserved),
        ] {
            // SAFETY: chunk 0 is initialized; no other thread exists.
            let p = unsafe { m.pfn_to_page(Pfn(pfn)) }.get();
            assert_eq!((p.state(), p.pfn()), (state, Pfn(pfn)));
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "uninitialized struct page")]
    fn reading_an_uninitialized_struct_page_is_caught() {
        let (ram, res) = pc_layout();
        let r = Ram::new(&ram);
        let mut m = Box::new(Memmap::empty());
        m.build(&cfg(2 * MIB, 64 * MIB, false), &ram, &res, r.ptr())
            .unwrap();
        // SAFETY: deliberately violated to check the debug assertion fires
        // before any read.
        let _ = unsafe { m.pfn_to_page(Pfn(150 << 8)) };
    }

    #[test]
    fn layout_errors_are_reported() {
        let c = cfg(2 * MIB, 128 * MIB, false);
        assert!(matches!(build(&c, &[], &[]), Err(MmInitError::NoRam)));
        let big = [PhysRange::from_len(0, MAX_PHYS_BYTES + MIB)];
        assert!(matches!(
            build(&c, &big, &[]),
            Err(MmInitError::RamTooLarge)
        ));
        let full = [PhysRange::from_len(0, 8 * MIB)];
        assert!(matches!(
            build(&c, &full, &full),
            Err(MmInitError::MemmapDoesNotFit)
        ));
        let many = [PhysRange::from_len(0, 4096); MAX_RANGES + 1];
        assert!(matches!(
            build(&c, &many, &[]),
            Err(MmInitError::TooManyRanges)
        ));
    }
}
