//! Growing the initialized memory: claim a chunk at the frontier, initialize
//! its struct pages, free it into the zone; and the grow check on the
//! allocator's slow path. The counterpart of Linux's `deferred_grow_zone`
//! (mm/mm_init.c), which `get_page_from_freelist` calls once its watermark
//! check has failed.
//!
//! # Locking
//!
//! A chunk is initialized outside the zone lock, as Linux's `pgdatinit`
//! does: claim it under the lock by advancing the frontier (`in_flight` + 1),
//! write its struct pages without the lock (nobody else can reach them: the
//! chunk's bit in the init bitmap is clear), set its bit, then take the lock
//! again to free its pages into the buddy (`in_flight` - 1). An allocation
//! that finds the lists empty, the frontier exhausted and a chunk in flight
//! waits for it rather than failing.
//!
//! # The grow check
//!
//! [`GROW_CHECK`] is a static key, like Linux's `deferred_pages`: on while
//! memory may be left behind a frontier. The slow path
//! (`Grower::alloc_slow`) tests it at a jump site before it looks at the
//! frontier; nothing on the fast path tests it at all (see
//! [`super::zone`]). The key is global, so a manager
//! never switches it off itself: it cannot know it is the only one (the host
//! tests run many at once). The kernel, which has exactly one, switches it
//! off once that manager is fully initialized and then patches the key's
//! jump sites into NOPs (Linux does both in `page_alloc_init_late`). Each
//! manager also keeps its own state (`GrowState`), so growing stops where
//! its frontier ends whatever the key says.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use guest_abi::Strategy;

use super::addr::{Pfn, PhysRange};
use super::buddy::MAX_ORDER;
use super::config::MmConfig;
use super::memmap::Memmap;
use super::spinlock::{SpinGuard, SpinLock};
use super::static_key::{static_branch_likely, StaticKey};
use super::zone::{Take, Zone};

/// On while some memory manager may still have memory behind its frontier;
/// switched off by the kernel once its manager is fully initialized (see the
/// module docs).
pub static GROW_CHECK: StaticKey = StaticKey::new(true);

/// A manager's growth bookkeeping outside the zone lock: the online hook and
/// the counters the stats report. All zero when empty.
pub(crate) struct GrowState {
    /// `fn(PhysRange)` called before a chunk is initialized, with the
    /// chunk's memory and then its memmap (0: none). Stored as an address so
    /// an empty manager stays all zero bytes.
    online_hook: AtomicUsize,
    chunks_initialized: AtomicU64,
    struct_pages_initialized: AtomicU64,
    ram_pages_initialized: AtomicU64,
    init_cycles: AtomicU64,
    /// Nothing is left behind the frontier (set under the zone lock).
    fully_initialized: AtomicBool,
}

/// A snapshot of [`GrowState`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct GrowCounters {
    pub(crate) chunks_initialized: u64,
    pub(crate) struct_pages_initialized: u64,
    pub(crate) ram_pages_initialized: u64,
    pub(crate) init_cycles: u64,
}

impl GrowState {
    pub(crate) const fn new() -> GrowState {
        GrowState {
            online_hook: AtomicUsize::new(0),
            chunks_initialized: AtomicU64::new(0),
            struct_pages_initialized: AtomicU64::new(0),
            ram_pages_initialized: AtomicU64::new(0),
            init_cycles: AtomicU64::new(0),
            fully_initialized: AtomicBool::new(false),
        }
    }

    /// Sets the function called with a chunk's memory range and then its
    /// memmap range before the chunk is initialized.
    pub(crate) fn set_online_hook(&self, hook: fn(PhysRange)) {
        self.online_hook.store(hook as usize, Ordering::Release);
    }

    /// Whether nothing is left behind the frontier.
    #[inline]
    pub(crate) fn fully_initialized(&self) -> bool {
        self.fully_initialized.load(Ordering::Acquire)
    }

    pub(crate) fn counters(&self) -> GrowCounters {
        GrowCounters {
            chunks_initialized: self.chunks_initialized.load(Ordering::Acquire),
            struct_pages_initialized: self.struct_pages_initialized.load(Ordering::Relaxed),
            ram_pages_initialized: self.ram_pages_initialized.load(Ordering::Relaxed),
            init_cycles: self.init_cycles.load(Ordering::Relaxed),
        }
    }
}

/// What growing needs of a manager, borrowed for one operation.
pub(crate) struct Grower<'a> {
    pub(crate) cfg: &'a MmConfig,
    pub(crate) mm: &'a Memmap,
    pub(crate) zone: &'a SpinLock<Zone>,
    pub(crate) state: &'a GrowState,
    pub(crate) clock: Option<fn() -> u64>,
}

impl Grower<'_> {
    /// Opens the frontier at the first chunk with memmap and arms the low
    /// watermark (`boot_init`); with `hold` the frontier stays closed until
    /// [`Grower::release_all`] (`Parallel`). False if it was already open.
    pub(crate) fn open(&self, hold: bool) -> bool {
        let mut z = self.zone.lock();
        if z.frontier.booted {
            return false;
        }
        z.frontier.booted = true;
        z.frontier.next = self.mm.next_chunk(0).unwrap_or(0);
        z.frontier.parallel_pending = hold;
        z.frontier.exhausted = hold;
        z.pregrow_below = self.cfg.low_watermark_pages;
        true
    }

    /// Whether the frontier is open.
    pub(crate) fn is_open(&self) -> bool {
        self.zone.lock().frontier.booted
    }

    /// Whether the allocator may still grow: the global key is on (a jump
    /// site in the guest) and this manager has memory behind its frontier.
    #[inline]
    pub(crate) fn grow_check_on(&self) -> bool {
        static_branch_likely!(GROW_CHECK) && !self.state.fully_initialized()
    }

    /// The allocator's slow path, for when the free lists could not serve
    /// `order`: takes again (another CPU may have freed or grown), and while
    /// the grow check is on claims and initializes chunks, or waits for one
    /// another CPU claimed, until a block fits. `None` when memory is
    /// exhausted (counted in `alloc_failures`) or `order > MAX_ORDER`.
    pub(crate) fn alloc_slow(&self, order: u32) -> Option<Pfn> {
        loop {
            let mut z = self.zone.lock();
            match z.alloc(self.mm, order) {
                Take::Hit(pfn) => return Some(pfn),
                Take::Short(pfn) => {
                    drop(z);
                    self.grow_ahead();
                    return Some(pfn);
                }
                Take::Empty => {}
            }
            if order > MAX_ORDER || !self.grow_check_on() {
                z.alloc_failures += 1;
                return None;
            }
            match self.claim(&mut z, u64::MAX) {
                Some(chunk) => {
                    z.grow_events += 1;
                    drop(z);
                    self.init_and_release(chunk);
                }
                None if z.frontier.in_flight > 0 => {
                    drop(z);
                    core::hint::spin_loop();
                }
                None => {
                    z.alloc_failures += 1;
                    return None;
                }
            }
        }
    }

    /// Grows one chunk ahead of need: a take split a block below the low
    /// watermark ([`Take::Short`]).
    pub(crate) fn grow_ahead(&self) {
        self.grow_one(u64::MAX, true);
    }

    /// Claims, initializes and frees one chunk below `limit`; false if none
    /// was left. `from_alloc` counts it as a grow event.
    pub(crate) fn grow_one(&self, limit: u64, from_alloc: bool) -> bool {
        let chunk = {
            let mut z = self.zone.lock();
            let c = self.claim(&mut z, limit);
            match c {
                None => self.check_done(&mut z),
                Some(_) if from_alloc => z.grow_events += 1,
                Some(_) => {}
            }
            c
        };
        match chunk {
            Some(c) => {
                self.init_and_release(c);
                true
            }
            None => false,
        }
    }

    /// Whether chunks remain behind the frontier.
    pub(crate) fn pending(&self) -> bool {
        let z = self.zone.lock();
        !z.frontier.exhausted && self.mm.next_chunk(z.frontier.next).is_some()
    }

    /// Claims the next chunk below `limit` at the frontier (`OnDemand` skips
    /// chunks without an allocatable page: nobody would allocate from them).
    fn claim(&self, z: &mut SpinGuard<'_, Zone>, limit: u64) -> Option<u64> {
        let f = &mut z.frontier;
        if !f.booted || f.exhausted {
            return None;
        }
        let skip_reserved = self.cfg.strategy == Strategy::OnDemand;
        loop {
            let Some(c) = self.mm.next_chunk(f.next) else {
                f.exhausted = true;
                return None;
            };
            if c >= limit {
                return None;
            }
            f.next = c + 1;
            // Memory reclaim may have moved the frontier back below chunks
            // that are initialized (none is in flight then).
            if self.mm.is_initialized(self.mm.chunk_range(c).start) {
                continue;
            }
            if skip_reserved && !self.mm.chunk_has_allocatable(c) {
                continue;
            }
            f.in_flight += 1;
            return Some(c);
        }
    }

    /// Second half of a claim: init outside the lock, then free under it.
    fn init_and_release(&self, chunk: u64) {
        // SAFETY: `claim` advanced the frontier past `chunk` under the lock,
        // so this caller is the only one that got it.
        unsafe { self.init_chunk(chunk) };
        let mut z = self.zone.lock();
        self.release_chunk(&mut z, chunk);
        z.frontier.in_flight -= 1;
        self.check_done(&mut z);
    }

    /// Onlines a chunk (its memory, then its memmap), writes its struct
    /// pages and sets its bit.
    ///
    /// # Safety
    /// The caller must own `chunk` exclusively: claimed at the frontier, or
    /// in its own parallel share.
    pub(crate) unsafe fn init_chunk(&self, chunk: u64) {
        let t0 = self.now();
        self.online(self.mm.chunk_range(chunk).to_phys());
        self.online(self.mm.chunk_memmap(chunk));
        // SAFETY: the caller owns the chunk.
        let ram_pages = unsafe { self.mm.init_chunk(chunk) };
        let s = self.state;
        s.struct_pages_initialized
            .fetch_add(self.mm.chunk_pages(), Ordering::Relaxed);
        s.ram_pages_initialized
            .fetch_add(ram_pages, Ordering::Relaxed);
        s.chunks_initialized.fetch_add(1, Ordering::AcqRel);
        s.init_cycles
            .fetch_add(self.now().wrapping_sub(t0), Ordering::Relaxed);
    }

    /// Returns an initialized chunk to uninitialized (memory reclaim): clears
    /// its bit, takes it out of the counters and moves the frontier back to
    /// it, so the next allocation that needs it initializes it again through
    /// the same path; the manager is no longer fully initialized.
    ///
    /// # Safety
    /// `z` must be this manager's zone lock; no chunk may be in flight; the
    /// caller must have taken every frame of the chunk off the free lists
    /// and none may be allocated (a wholly free chunk).
    pub(crate) unsafe fn deinit_chunk(&self, z: &mut SpinGuard<'_, Zone>, chunk: u64) {
        debug_assert_eq!(z.frontier.in_flight, 0, "a chunk is in flight");
        let ram_pages: u64 = self
            .mm
            .runs(chunk)
            .filter(|(k, _)| *k != super::memmap::PageKind::Hole)
            .map(|(_, r)| r.pages())
            .sum();
        // SAFETY: the lock is held and no frame of the chunk is on a list
        // or allocated (the caller's contract).
        unsafe { self.mm.deinit_chunk(chunk) };
        let s = self.state;
        s.chunks_initialized.fetch_sub(1, Ordering::AcqRel);
        s.struct_pages_initialized
            .fetch_sub(self.mm.chunk_pages(), Ordering::Relaxed);
        s.ram_pages_initialized
            .fetch_sub(ram_pages, Ordering::Relaxed);
        let f = &mut z.frontier;
        f.next = f.next.min(chunk);
        f.exhausted = false;
        s.fully_initialized.store(false, Ordering::Release);
        z.pregrow_below = self.cfg.low_watermark_pages;
    }

    /// Frees the allocatable pages of an initialized chunk into the buddy.
    pub(crate) fn release_chunk(&self, z: &mut SpinGuard<'_, Zone>, chunk: u64) {
        let t0 = self.now();
        z.free_chunk(self.mm, chunk);
        self.state
            .init_cycles
            .fetch_add(self.now().wrapping_sub(t0), Ordering::Relaxed);
    }

    /// Frees every initialized chunk and opens the held frontier onto an
    /// exhausted one (`parallel_finish`, once every share is done).
    pub(crate) fn release_all(&self, z: &mut SpinGuard<'_, Zone>) {
        let mut c = self.mm.next_chunk(0);
        while let Some(chunk) = c {
            self.release_chunk(z, chunk);
            c = self.mm.next_chunk(chunk + 1);
        }
        z.frontier.parallel_pending = false;
        self.check_done(z);
    }

    /// Marks the manager fully initialized once nothing is left behind the
    /// frontier: from then on it never grows, and takes never ask to.
    fn check_done(&self, z: &mut SpinGuard<'_, Zone>) {
        let f = &mut z.frontier;
        if !f.booted || f.parallel_pending || f.in_flight > 0 || self.state.fully_initialized() {
            return;
        }
        if !f.exhausted && self.mm.next_chunk(f.next).is_none() {
            f.exhausted = true;
        }
        if f.exhausted {
            z.pregrow_below = 0;
            self.state.fully_initialized.store(true, Ordering::Release);
        }
    }

    fn now(&self) -> u64 {
        self.clock.map_or(0, |c| c())
    }

    fn online(&self, r: PhysRange) {
        let f = self.state.online_hook.load(Ordering::Acquire);
        if f != 0 {
            // SAFETY: a non-zero value was stored by `set_online_hook` from a
            // `fn(PhysRange)`; function pointers round-trip through usize.
            let hook: fn(PhysRange) = unsafe { core::mem::transmute::<usize, fn(PhysRange)>(f) };
            hook(r);
        }
    }
}

/// A grower over simulated RAM, for this module's tests and the strategy
/// tests (which cannot go through the manager without an import cycle).
#[cfg(test)]
pub(crate) struct GrowRig {
    pub(crate) cfg: MmConfig,
    pub(crate) mm: Box<Memmap>,
    pub(crate) zone: SpinLock<Zone>,
    pub(crate) state: GrowState,
    _ram: super::testing::Ram,
}

#[cfg(test)]
impl GrowRig {
    pub(crate) fn new(cfg: MmConfig, ram: &[PhysRange], res: &[PhysRange]) -> GrowRig {
        let r = super::testing::Ram::new(ram);
        let mut mm = Box::new(Memmap::empty());
        mm.build(&cfg, ram, res, r.ptr()).unwrap();
        GrowRig {
            cfg,
            mm,
            zone: SpinLock::new(Zone::new()),
            state: GrowState::new(),
            _ram: r,
        }
    }

    pub(crate) fn grower(&self) -> Grower<'_> {
        Grower {
            cfg: &self.cfg,
            mm: &self.mm,
            zone: &self.zone,
            state: &self.state,
            clock: Some(super::testing::clock),
        }
    }

    /// Checks the buddy invariants, that no uninitialized memmap byte was
    /// ever written and the counters; returns the free blocks.
    pub(crate) fn check(&self) -> std::collections::BTreeMap<u64, u32> {
        let free = self.zone.lock().check(&self.mm);
        let initialized = self.mm.assert_uninitialized_untouched();
        let c = self.state.counters();
        assert_eq!(initialized, c.chunks_initialized);
        assert_eq!(
            c.struct_pages_initialized,
            initialized * self.mm.chunk_pages()
        );
        free
    }

    /// The simulated RAM's direct map.
    pub(crate) fn ram(&self) -> *mut u8 {
        self._ram.ptr()
    }

    /// Pages on the free lists and handed out.
    pub(crate) fn pages(&self) -> (u64, u64) {
        let z = self.zone.lock();
        (z.area.free_pages, z.allocated_pages)
    }

    /// Allocatable pages still behind the frontier.
    pub(crate) fn pending_pages(&self) -> u64 {
        let (free, allocated) = self.pages();
        self.mm.totals().allocatable_pages - free - allocated
    }

    /// Frees a block through the zone (what `free_pages` does).
    pub(crate) fn free(&self, pfn: Pfn, order: u32) {
        self.zone.lock().free(&self.mm, pfn, order).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::testing::{cfg, pc_layout, MIB};
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::vec::Vec;

    /// An `OnDemand` rig whose frontier is open and whose first chunk with
    /// allocatable memory is initialized (what `boot_init` does).
    fn ondemand(c: MmConfig, ram: &[PhysRange], res: &[PhysRange]) -> GrowRig {
        let rig = GrowRig::new(c, ram, res);
        assert!(rig.grower().open(false));
        assert!(!rig.grower().open(false), "opens once");
        rig.grower().grow_one(u64::MAX, false);
        rig
    }

    #[test]
    fn ondemand_skips_wholly_reserved_chunks_and_stops_growing_at_the_end() {
        let (ram, res) = pc_layout();
        let rig = ondemand(cfg(Strategy::OnDemand), &ram, &res);
        assert_eq!(rig.state.counters().chunks_initialized, 1);
        let g = rig.grower();
        assert!(g.grow_check_on() && g.pending());
        let mut n = 0;
        while g.alloc_slow(0).is_some() {
            n += 1;
        }
        let t = rig.mm.totals();
        assert_eq!(n, t.total_pages - t.reserved_pages);
        let z = rig.zone.lock();
        assert_eq!((z.alloc_failures, z.pregrow_below), (1, 0));
        assert!(z.grow_events > 0);
        drop(z);
        assert!(rig.state.fully_initialized() && !g.grow_check_on() && !g.pending());
        // The memmap (3..7 MiB) and the kernel chunk (2..3 MiB is half
        // kernel): chunks 1.5 .. 3 hold no allocatable page.
        assert_eq!(rig.state.counters().chunks_initialized, t.chunks_total - 2);
        rig.check();
    }

    #[test]
    fn nothing_grows_before_the_frontier_opens() {
        let (ram, res) = pc_layout();
        let rig = GrowRig::new(cfg(Strategy::OnDemand), &ram, &res);
        assert_eq!(rig.grower().alloc_slow(0), None);
        assert!(!rig.grower().grow_one(u64::MAX, false));
        assert_eq!(rig.state.counters().chunks_initialized, 0);
        assert!(!rig.state.fully_initialized());
    }

    #[test]
    fn ondemand_initializes_about_what_it_hands_out() {
        // Chunks are wholly allocatable or wholly reserved here, so the bound
        // is exact: X/64 + one chunk of memmap after allocating X bytes.
        let ram = [PhysRange::from_len(0, 256 * MIB)];
        let res = [PhysRange::from_len(0, 2 * MIB)];
        for chunk in [128 << 10, 2 * MIB, 16 * MIB] {
            for order in [0, 3, 9] {
                let c = MmConfig {
                    chunk_bytes: chunk,
                    ..cfg(Strategy::OnDemand)
                };
                let rig = ondemand(c, &ram, &res);
                // Chunks are wholly allocatable or wholly reserved up to 2 MiB;
                // a 16 MiB chunk also holds the 6 MiB reserved at the start.
                let slack = if chunk <= 2 * MIB { 0 } else { 6 * MIB / 64 };
                let mut x = 0;
                for i in 0..2000u64 {
                    rig.grower().alloc_slow(order).unwrap();
                    x += 4096 << order;
                    if i % 97 == 0 || i == 1999 {
                        let init = rig.state.counters().struct_pages_initialized * 64;
                        assert!(
                            init <= x / 64 + chunk / 64 + slack,
                            "chunk {chunk} order {order}: {init} > {x}/64 + chunk"
                        );
                    }
                    if x > 200 * MIB {
                        break;
                    }
                }
                rig.check();
            }
        }
    }

    #[test]
    fn ondemand_growth_from_several_cpus_never_hands_a_page_out_twice() {
        let (ram, res) = pc_layout();
        let c = MmConfig {
            chunk_bytes: 256 << 10,
            ..cfg(Strategy::OnDemand)
        };
        let rig = Arc::new(ondemand(c, &ram, &res));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let rig = rig.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(p) = rig.grower().alloc_slow(2) {
                        mine.push(p.0);
                    }
                    mine
                })
            })
            .collect();
        let mut all = HashSet::new();
        for w in workers {
            for p in w.join().unwrap() {
                assert!(all.insert(p), "{p:#x} handed out twice");
            }
        }
        assert!(rig.state.fully_initialized());
        assert_eq!(rig.pages().1, all.len() as u64 * 4);
        // What is left are fragments below order 2 around reserved pages.
        assert!(rig.check().values().all(|&o| o < 2));
    }
}
