//! The [`MemoryManager`]: one zone, its frontier, the four initialization
//! strategies and the locking that makes it usable from several CPUs.
//!
//! # Locking
//!
//! - The layout (`Memmap`) is written once by `init` and read-only after;
//!   `state` (released after the write) publishes it.
//! - The init bitmap is atomic: a chunk's bit is set (release) after all its
//!   struct pages are written; readers check it (acquire) before reading one.
//! - The zone lock (a [`SpinLock`]) protects the free lists, the frontier and
//!   every read or write of an initialized struct page.
//! - A chunk is initialized outside the lock, as Linux's `pgdatinit` does:
//!   claim it under the lock by advancing the frontier (`in_flight` + 1),
//!   write its struct pages without the lock (nobody else can reach them: the
//!   bit is clear), set its bit, then take the lock again to free its pages
//!   into the buddy (`in_flight` - 1). An allocation that finds the lists
//!   empty, the frontier exhausted and a chunk in flight waits for it rather
//!   than failing.
//! - `Parallel` shares are disjoint by construction: each `(cpu, ncpus)` runs
//!   once and owns a contiguous slice of the chunks; they only write struct
//!   pages and bits. `parallel_finish` frees everything under the lock.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use guest_abi::{Strategy, STRUCT_PAGE_SIZE};

use super::addr::{Pfn, PhysRange};
use super::buddy::{FreeArea, MAX_ORDER};
use super::memmap::{Memmap, PageKind};
use super::page::PageState;
use super::spinlock::{SpinGuard, SpinLock};
use super::static_key::{static_branch_likely, StaticKey};
use super::{
    MemmapRanges, MmBootError, MmConfig, MmFreeError, MmInitError, MmListError, MmParallelError,
    MmStats,
};

const STATE_EMPTY: u8 = 0;
const STATE_BUSY: u8 = 1;
const STATE_READY: u8 = 2;
const STATE_FAILED: u8 = 3;

/// Most CPUs that may take a parallel share.
pub const MAX_PARALLEL_CPUS: u64 = 64;

/// The grow check, like Linux's `deferred_pages` key: on while some memory
/// manager may still have memory behind its frontier. Global, so a manager
/// never switches it off itself (it cannot know it is the only one; the host
/// tests run many): the kernel, which has one, switches it off once that
/// manager is fully initialized and patches the key's jump sites. Each
/// manager also knows its own state (`fully_initialized`).
pub static GROW_CHECK: StaticKey = StaticKey::new(true);

/// What `init` fixes for the manager's lifetime.
struct Setup {
    cfg: MmConfig,
    clock: Option<fn() -> u64>,
    memmap: Memmap,
}

/// State under the zone lock.
struct Zone {
    area: FreeArea,
    allocated_pages: u64,
    /// Next chunk the frontier may claim.
    frontier: u64,
    /// No chunk is left to claim.
    frontier_done: bool,
    /// Chunks claimed but not yet freed into the buddy.
    in_flight: u64,
    /// `Parallel` between `boot_init` and `parallel_finish`.
    parallel_pending: bool,
    booted: bool,
    grow_events: u64,
    alloc_failures: u64,
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

/// The physical memory manager. See the [module docs](super) for its use.
///
/// Its bookkeeping is fixed-size and inside it (about 200 KiB, mostly the
/// init bitmap), so it lives in a `static` created by [`MemoryManager::empty`]
/// and is set up in place by [`MemoryManager::init`].
pub struct MemoryManager {
    state: AtomicU8,
    setup: UnsafeCell<Setup>,
    zone: SpinLock<Zone>,
    /// `fn(PhysRange)` called before a chunk is initialized, with the
    /// chunk's memory and then its memmap (0: none). The kernel uses it to
    /// make the VMM register memory with KVM on demand. Stored as an address
    /// so an empty manager stays all zero bytes.
    online_hook: AtomicUsize,
    chunks_initialized: AtomicU64,
    struct_pages_initialized: AtomicU64,
    ram_pages_initialized: AtomicU64,
    init_cycles: AtomicU64,
    fully_initialized: AtomicBool,
    parallel_ncpus: AtomicU64,
    parallel_started: AtomicU64,
}

// SAFETY: `setup` is written only by `init` while `state` is BUSY (no reader
// may look at it before READY), and only read afterwards; the raw direct-map
// pointer in it refers to memory the `init` caller promised stays valid and is
// accessed under the locking protocol of the module docs. Everything else is
// atomic or behind the spinlock.
unsafe impl Sync for MemoryManager {}
// SAFETY: as above; nothing in the manager is tied to the creating thread.
unsafe impl Send for MemoryManager {}

impl MemoryManager {
    /// A manager with no memory; call [`MemoryManager::init`] before use.
    pub const fn empty() -> MemoryManager {
        MemoryManager {
            state: AtomicU8::new(STATE_EMPTY),
            setup: UnsafeCell::new(Setup {
                // All zero, like the rest of `empty()`; `init` sets it.
                cfg: MmConfig {
                    strategy: Strategy::Eager,
                    chunk_bytes: 0,
                    section_bytes: 0,
                    memmap_on_memory: false,
                    low_watermark_pages: 0,
                },
                clock: None,
                memmap: Memmap::empty(),
            }),
            zone: SpinLock::new(Zone {
                area: FreeArea::new(),
                allocated_pages: 0,
                frontier: 0,
                frontier_done: false,
                in_flight: 0,
                parallel_pending: false,
                booted: false,
                grow_events: 0,
                alloc_failures: 0,
            }),
            online_hook: AtomicUsize::new(0),
            chunks_initialized: AtomicU64::new(0),
            struct_pages_initialized: AtomicU64::new(0),
            ram_pages_initialized: AtomicU64::new(0),
            init_cycles: AtomicU64::new(0),
            fully_initialized: AtomicBool::new(false),
            parallel_ncpus: AtomicU64::new(0),
            parallel_started: AtomicU64::new(0),
        }
    }

    /// Computes the memmap layout for `ram` (usable ranges, e.g. e820 type 1)
    /// minus `reserved` (memory already in use) and reserves the memmap. No
    /// struct page is written. A failed `init` leaves the manager unusable.
    ///
    /// Physical address `p` is accessed at `direct_map.add(p)` (null in the
    /// guest, identity-mapped). `clock` returns a cycle counter (rdtsc).
    ///
    /// # Safety
    /// For every `p` in `ram`, `direct_map.add(p)` must be valid for reads
    /// and writes for the manager's whole lifetime, and nothing else may
    /// access the memmap (which `init` places in `ram` outside `reserved`).
    pub unsafe fn init(
        &self,
        cfg: MmConfig,
        ram: &[PhysRange],
        reserved: &[PhysRange],
        direct_map: *mut u8,
        clock: fn() -> u64,
    ) -> Result<(), MmInitError> {
        cfg.validate()?;
        if self
            .state
            .compare_exchange(
                STATE_EMPTY,
                STATE_BUSY,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return Err(MmInitError::AlreadyInitialized);
        }
        // SAFETY: the state moved EMPTY -> BUSY here, so this is the only
        // thread touching `setup`; readers wait for READY.
        let setup = unsafe { &mut *self.setup.get() };
        setup.cfg = cfg;
        setup.clock = Some(clock);
        match setup.memmap.build(&cfg, ram, reserved, direct_map) {
            Ok(()) => {
                self.state.store(STATE_READY, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.state.store(STATE_FAILED, Ordering::Release);
                Err(e)
            }
        }
    }

    fn ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_READY
    }

    fn setup(&self) -> &Setup {
        assert!(self.ready(), "memory manager used before a successful init");
        // SAFETY: READY was published after the only write to `setup`.
        unsafe { &*self.setup.get() }
    }

    fn mm(&self) -> &Memmap {
        &self.setup().memmap
    }

    /// The configuration given to `init`.
    pub fn config(&self) -> MmConfig {
        self.setup().cfg
    }

    /// Does the strategy's boot-time work (see the module docs).
    pub fn boot_init(&self) -> Result<(), MmBootError> {
        if !self.ready() {
            return Err(MmBootError::NotInitialized);
        }
        let mm = self.mm();
        {
            let mut z = self.zone.lock();
            if z.booted {
                return Err(MmBootError::AlreadyBooted);
            }
            z.booted = true;
            z.frontier = mm.next_chunk(0).unwrap_or(0);
            if self.setup().cfg.strategy == Strategy::Parallel {
                z.parallel_pending = true;
                z.frontier_done = true;
            }
        }
        match self.setup().cfg.strategy {
            Strategy::Eager => while self.grow_one(u64::MAX, false) {},
            Strategy::Parallel => {}
            Strategy::Deferred => {
                let per_section = mm.chunks_per_section();
                let first = mm.next_chunk(0).unwrap_or(0);
                let limit = (first / per_section + 1) * per_section;
                while self.grow_one(limit, false) {}
            }
            Strategy::OnDemand => {
                self.grow_one(u64::MAX, false);
            }
        }
        Ok(())
    }

    /// Initializes one more chunk at the frontier; returns whether chunks
    /// remain behind it. Safe to call from another CPU concurrently with
    /// allocations. Does nothing (false) when nothing is left, and before
    /// `parallel_finish` for `Parallel`.
    pub fn background_step(&self) -> bool {
        if !self.ready() || !self.zone.lock().booted {
            return false;
        }
        self.grow_one(u64::MAX, false);
        let z = self.zone.lock();
        !z.frontier_done && self.mm().next_chunk(z.frontier).is_some()
    }

    /// Initializes this CPU's share of the struct pages (`Parallel`, after
    /// `boot_init`): a contiguous slice, 1/`ncpus` of the chunks. May run
    /// concurrently on every CPU; each `cpu` once, with the same `ncpus`.
    pub fn parallel_init_share(&self, cpu: u64, ncpus: u64) -> Result<(), MmParallelError> {
        if !self.ready() || self.setup().cfg.strategy != Strategy::Parallel {
            return Err(MmParallelError::WrongStrategy);
        }
        {
            let z = self.zone.lock();
            if !z.booted {
                return Err(MmParallelError::NotBooted);
            }
            if !z.parallel_pending {
                return Err(MmParallelError::AlreadyFinished);
            }
        }
        if ncpus == 0 || ncpus > MAX_PARALLEL_CPUS || cpu >= ncpus {
            return Err(MmParallelError::BadShare);
        }
        match self
            .parallel_ncpus
            .compare_exchange(0, ncpus, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(n) if n == ncpus => {}
            Err(_) => return Err(MmParallelError::BadShare),
        }
        if self.parallel_started.fetch_or(1 << cpu, Ordering::AcqRel) & (1 << cpu) != 0 {
            return Err(MmParallelError::ShareTaken);
        }
        let mm = self.mm();
        let n = mm.totals().chunks_total;
        let (lo, hi) = (n * cpu / ncpus, n * (cpu + 1) / ncpus);
        let mut c = mm.next_chunk(0);
        let mut i = 0;
        while let Some(chunk) = c {
            if i >= hi {
                break;
            }
            if i >= lo {
                // This share owns chunks lo..hi of the ordered list, and the
                // claim bits above make every (cpu, ncpus) run at most once.
                self.init_chunk(chunk);
            }
            i += 1;
            c = mm.next_chunk(chunk + 1);
        }
        Ok(())
    }

    /// Puts every initialized page on the free lists (`Parallel`, once, after
    /// every share is done).
    pub fn parallel_finish(&self) -> Result<(), MmParallelError> {
        if !self.ready() || self.setup().cfg.strategy != Strategy::Parallel {
            return Err(MmParallelError::WrongStrategy);
        }
        let mm = self.mm();
        let mut z = self.zone.lock();
        if !z.booted {
            return Err(MmParallelError::NotBooted);
        }
        if !z.parallel_pending {
            return Err(MmParallelError::AlreadyFinished);
        }
        if self.chunks_initialized.load(Ordering::Acquire) != mm.totals().chunks_total {
            return Err(MmParallelError::SharesIncomplete);
        }
        let mut c = mm.next_chunk(0);
        while let Some(chunk) = c {
            self.release_chunk(&mut z, chunk);
            c = mm.next_chunk(chunk + 1);
        }
        z.parallel_pending = false;
        self.check_done(&mut z);
        Ok(())
    }

    /// Allocates `2^order` contiguous pages. Grows the initialized memory if
    /// the free lists cannot serve the request; `None` when memory is
    /// exhausted (counted in `alloc_failures`) or `order > MAX_ORDER`.
    pub fn alloc_pages(&self, order: u32) -> Option<Pfn> {
        let mm = self.mm();
        loop {
            let mut z = self.zone.lock();
            if order <= MAX_ORDER {
                if let Some(pfn) = z.area.take(mm, order).map(|t| t.pfn) {
                    z.allocated_pages += 1 << order;
                    let low = self.may_grow()
                        && z.area.free_pages < self.setup().cfg.low_watermark_pages;
                    drop(z);
                    if low {
                        self.grow_one(u64::MAX, true);
                    }
                    return Some(pfn);
                }
            }
            if order > MAX_ORDER || !self.may_grow() {
                z.alloc_failures += 1;
                return None;
            }
            // Slow path: claim a chunk, or wait for one another CPU claimed.
            match self.claim(&mut z, u64::MAX) {
                Some(chunk) => {
                    z.grow_events += 1;
                    drop(z);
                    self.init_and_release(chunk);
                }
                None if z.in_flight > 0 => {
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

    /// Frees a block returned by `alloc_pages` with the same order.
    pub fn free_pages(&self, pfn: Pfn, order: u32) -> Result<(), MmFreeError> {
        if order > MAX_ORDER {
            return Err(MmFreeError::BadOrder);
        }
        if pfn.0 & ((1 << order) - 1) != 0 {
            return Err(MmFreeError::Misaligned);
        }
        let mm = self.mm();
        let mut z = self.zone.lock();
        // SAFETY: the zone lock is held; the bitmap check comes first.
        let page = unsafe { mm.page_if_initialized(pfn) }.ok_or(MmFreeError::NotAllocated)?;
        let allocated = PageState::Allocated { order: order as u8 };
        page.update(|p| p.try_transition(allocated, PageState::Tail))?;
        z.area.free_block(mm, pfn, order);
        z.allocated_pages -= 1 << order;
        Ok(())
    }

    /// Puts an allocated block on `list` (linked through its head struct page).
    pub fn list_push(&self, list: &mut BlockList, pfn: Pfn, order: u32) -> Result<(), MmListError> {
        let mm = self.mm();
        let _z = self.zone.lock();
        // SAFETY: the zone lock is held; the bitmap check comes first.
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
    pub fn list_pop(&self, list: &mut BlockList) -> Option<(Pfn, u32)> {
        let pfn = list.head?;
        let mm = self.mm();
        let _z = self.zone.lock();
        // SAFETY: the zone lock is held; list_push only links allocated
        // heads, which are in initialized chunks.
        let page = unsafe { mm.pfn_to_page(pfn) };
        let p = page.get();
        let order = p.state().order().expect("a listed block is an allocated head");
        page.update(|p| p.set_next(None));
        list.head = p.next();
        list.blocks -= 1;
        list.pages -= 1 << order;
        Some((pfn, order))
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MmStats {
        let s = self.setup();
        let t = s.memmap.totals();
        let z = self.zone.lock();
        let free = z.area.free_pages;
        let allocated = z.allocated_pages;
        MmStats {
            strategy: s.cfg.strategy,
            chunk_bytes: s.cfg.chunk_bytes,
            section_bytes: s.cfg.section_bytes,
            memmap_on_memory: s.cfg.memmap_on_memory,
            total_pages: t.total_pages,
            initialized_pages: self.ram_pages_initialized.load(Ordering::Relaxed),
            allocated_pages: allocated,
            free_pages: free,
            reserved_pages: t.reserved_pages,
            pending_pages: t.allocatable_pages - free - allocated,
            memmap_bytes_reserved: t.memmap_bytes,
            memmap_bytes_initialized: self.struct_pages_initialized.load(Ordering::Relaxed)
                * STRUCT_PAGE_SIZE,
            chunks_total: t.chunks_total,
            chunks_initialized: self.chunks_initialized.load(Ordering::Relaxed),
            grow_events: z.grow_events,
            init_cycles: self.init_cycles.load(Ordering::Relaxed),
            alloc_failures: z.alloc_failures,
            grow_check_on: self.grow_check_on(),
            fully_initialized: self.fully_initialized.load(Ordering::Acquire),
        }
    }

    /// Where the memmap lives (at most 32 merged ranges).
    pub fn memmap_ranges(&self) -> MemmapRanges {
        MemmapRanges::collect(self.mm().memmap_ranges())
    }

    /// Claims the next chunk below `limit` at the frontier (`OnDemand` skips
    /// chunks without an allocatable page).
    fn claim(&self, z: &mut SpinGuard<'_, Zone>, limit: u64) -> Option<u64> {
        if z.frontier_done {
            return None;
        }
        let mm = self.mm();
        let skip_reserved = self.setup().cfg.strategy == Strategy::OnDemand;
        loop {
            let Some(c) = mm.next_chunk(z.frontier) else {
                z.frontier_done = true;
                return None;
            };
            if c >= limit {
                return None;
            }
            z.frontier = c + 1;
            if skip_reserved && !mm.chunk_has_allocatable(c) {
                continue;
            }
            z.in_flight += 1;
            return Some(c);
        }
    }

    /// Claims, initializes and frees one chunk; false if none was left.
    fn grow_one(&self, limit: u64, from_alloc: bool) -> bool {
        let chunk = {
            let mut z = self.zone.lock();
            let c = self.claim(&mut z, limit);
            if c.is_none() {
                self.check_done(&mut z);
            } else if from_alloc {
                z.grow_events += 1;
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

    /// Second half of a claim: init outside the lock, then free under it.
    fn init_and_release(&self, chunk: u64) {
        self.init_chunk(chunk);
        let mut z = self.zone.lock();
        self.release_chunk(&mut z, chunk);
        z.in_flight -= 1;
        self.check_done(&mut z);
    }

    /// Marks the manager fully initialized once nothing is left behind the
    /// frontier: from then on it never grows.
    fn check_done(&self, z: &mut SpinGuard<'_, Zone>) {
        if z.booted
            && !z.parallel_pending
            && z.in_flight == 0
            && !self.fully_initialized.load(Ordering::Relaxed)
        {
            if !z.frontier_done && self.mm().next_chunk(z.frontier).is_none() {
                z.frontier_done = true;
            }
            if z.frontier_done {
                self.fully_initialized.store(true, Ordering::Release);
            }
        }
    }

    /// Whether the allocator may grow: the global key is on (a jump site
    /// in the guest) and this manager has memory behind its frontier.
    #[inline]
    fn may_grow(&self) -> bool {
        static_branch_likely!(GROW_CHECK) && !self.fully_initialized.load(Ordering::Relaxed)
    }

    /// Whether the allocator still checks for uninitialized memory: the
    /// global [`GROW_CHECK`] is on and this manager has memory behind its
    /// frontier. Cheaper than [`MemoryManager::stats`].
    pub fn grow_check_on(&self) -> bool {
        GROW_CHECK.is_enabled() && !self.fully_initialized.load(Ordering::Acquire)
    }

    /// Whether nothing is left behind the frontier: every chunk is
    /// initialized (`OnDemand`: every chunk with an allocatable page). The
    /// kernel switches [`GROW_CHECK`] off once this holds.
    pub fn fully_initialized(&self) -> bool {
        self.fully_initialized.load(Ordering::Acquire)
    }

    /// Sets the function called with a chunk's memory range and then its
    /// memmap range before the chunk is initialized (call before
    /// [`MemoryManager::boot_init`]). It may run on several CPUs at once.
    pub fn set_online_hook(&self, hook: fn(PhysRange)) {
        self.online_hook.store(hook as usize, Ordering::Release);
    }

    fn online(&self, r: PhysRange) {
        let f = self.online_hook.load(Ordering::Acquire);
        if f != 0 {
            // SAFETY: a non-zero value was stored by `set_online_hook` from a
            // `fn(PhysRange)`; function pointers round-trip through usize.
            let hook: fn(PhysRange) = unsafe { core::mem::transmute::<usize, fn(PhysRange)>(f) };
            hook(r);
        }
    }

    /// Writes every struct page of a chunk this CPU exclusively owns (claimed
    /// at the frontier or in its parallel share), then sets its bit.
    fn init_chunk(&self, chunk: u64) {
        let s = self.setup();
        let mm = &s.memmap;
        let t0 = s.clock.map_or(0, |c| c());
        self.online(mm.chunk_range(chunk).to_phys());
        self.online(mm.chunk_memmap(chunk));
        // SAFETY: this CPU owns the chunk exclusively (claimed at the
        // frontier or in its parallel share).
        let ram_pages = unsafe { mm.init_chunk(chunk) };
        self.struct_pages_initialized
            .fetch_add(mm.chunk_pages(), Ordering::Relaxed);
        self.ram_pages_initialized
            .fetch_add(ram_pages, Ordering::Relaxed);
        self.chunks_initialized.fetch_add(1, Ordering::AcqRel);
        self.init_cycles
            .fetch_add(s.clock.map_or(0, |c| c()).wrapping_sub(t0), Ordering::Relaxed);
    }

    /// Frees the allocatable pages of an initialized chunk into the buddy.
    fn release_chunk(&self, z: &mut SpinGuard<'_, Zone>, chunk: u64) {
        let s = self.setup();
        let t0 = s.clock.map_or(0, |c| c());
        for (kind, run) in s.memmap.runs(chunk) {
            if kind == PageKind::Free {
                z.area.free_run(&s.memmap, run);
            }
        }
        self.init_cycles
            .fetch_add(s.clock.map_or(0, |c| c()).wrapping_sub(t0), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_empty_manager_is_all_zero_bytes_so_its_static_costs_nothing() {
        // The kernel's `static MM` must land in .bss (not in the image, not
        // rewritten at boot): only the parts a boot uses are ever written.
        static MM: MemoryManager = MemoryManager::empty();
        // SAFETY: reads the bytes of a static that nothing writes; a
        // const-built static's bytes (padding included) are what the compiler
        // emitted, which is what decides between .data and .bss.
        let bytes = unsafe {
            core::slice::from_raw_parts((&raw const MM).cast::<u8>(), core::mem::size_of::<MemoryManager>())
        };
        assert!(bytes.iter().all(|b| *b == 0), "MemoryManager::empty() has non-zero bytes");
    }
    use super::*;
    use crate::mm::addr::PfnRange;
    use crate::mm::testing::{cfg, clock, pc_layout, Ram, MIB};
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Arc;
    use std::vec::Vec;

    /// A manager over simulated RAM (the manager drops first).
    struct Vm {
        mm: Box<MemoryManager>,
        ram: Ram,
    }

    impl Vm {
        fn new(cfg: MmConfig, ram: &[PhysRange], reserved: &[PhysRange]) -> Vm {
            Vm::try_new(cfg, ram, reserved).unwrap()
        }

        fn try_new(
            cfg: MmConfig,
            ram: &[PhysRange],
            reserved: &[PhysRange],
        ) -> Result<Vm, MmInitError> {
            let vm = Vm {
                mm: Box::new(MemoryManager::empty()),
                ram: Ram::new(ram),
            };
            // SAFETY: every RAM address is inside the allocation, which lives
            // as long as the manager.
            unsafe { vm.mm.init(cfg, ram, reserved, vm.ram.ptr(), clock)? };
            Ok(vm)
        }

        fn booted(cfg: MmConfig, ram: &[PhysRange], reserved: &[PhysRange]) -> Vm {
            let vm = Vm::new(cfg, ram, reserved);
            vm.mm.boot_init().unwrap();
            if cfg.strategy == Strategy::Parallel {
                vm.mm.parallel_init_share(0, 1).unwrap();
                vm.mm.parallel_finish().unwrap();
            }
            vm
        }

        /// Checks the buddy invariants and that no uninitialized memmap byte
        /// was ever written; returns the free blocks.
        fn check(&self) -> BTreeMap<u64, u32> {
            let m = self.mm.mm();
            let z = self.mm.zone.lock();
            let mut free = BTreeMap::new();
            z.area.for_each_free(m, |pfn, head| {
                let order = head.state().order().expect("a free-list entry is a head");
                assert_eq!(head.state(), PageState::Free { order: order as u8 });
                assert_eq!(pfn.0 % (1 << order), 0, "free block {pfn:?} misaligned for order {order}");
                assert_eq!(head.pfn(), pfn);
                assert!(free.insert(pfn.0, order).is_none());
            });
            let mut end = 0;
            let mut sum = 0;
            for (&pfn, &order) in &free {
                assert!(pfn >= end, "free blocks overlap at {pfn:#x}");
                end = pfn + (1 << order);
                sum += 1 << order;
                m.assert_allocatable(PfnRange {
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
            assert_eq!(sum, z.area.free_pages);
            let by_order: u64 = (0..=MAX_ORDER).map(|o| z.area.nr_free(o)).sum();
            assert_eq!(by_order, free.len() as u64);
            drop(z);
            let s = self.mm.stats();
            assert_eq!(
                s.free_pages + s.allocated_pages + s.reserved_pages + s.pending_pages,
                s.total_pages
            );
            assert_eq!(s.free_pages, sum);
            let initialized = m.assert_uninitialized_untouched();
            assert_eq!(initialized, s.chunks_initialized);
            assert_eq!(
                s.memmap_bytes_initialized,
                initialized * m.chunk_pages() * 64
            );
            free
        }
    }

    /// The shared mixed workload over the manager.
    fn workload(mm: &MemoryManager, seed: u64, steps: usize) -> (u64, u64) {
        crate::mm::testing::workload(
            |o| mm.alloc_pages(o),
            |p, o| mm.free_pages(p, o).unwrap(),
            || mm.stats().pending_pages,
            seed,
            steps,
        )
    }

    #[test]
    fn eager_initializes_every_chunk_at_boot() {
        let (ram, res) = pc_layout();
        let vm = Vm::booted(cfg(Strategy::Eager), &ram, &res);
        let s = vm.mm.stats();
        assert_eq!(s.chunks_initialized, s.chunks_total);
        assert_eq!(s.chunks_total, 100);
        assert!(s.fully_initialized && !s.grow_check_on);
        assert_eq!(s.initialized_pages, s.total_pages);
        assert_eq!(s.pending_pages, 0);
        // Three full 64 MiB sections (1 MiB of memmap each) and 8 MiB of a fourth.
        let memmap = 3 * MIB + 128 * 1024;
        assert_eq!(s.memmap_bytes_reserved, memmap);
        assert_eq!(s.reserved_pages, 1 + 512 + memmap / 4096);
        assert_eq!(
            vm.mm.memmap_ranges().as_slice(),
            &[PhysRange::from_len(3 * MIB, memmap)]
        );
        vm.check();
        assert_eq!(vm.mm.boot_init(), Err(MmBootError::AlreadyBooted));
    }

    #[test]
    fn same_workload_gives_same_totals_under_every_strategy() {
        let (ram, res) = pc_layout();
        let mut totals = Vec::new();
        for s in Strategy::ALL {
            let vm = Vm::booted(cfg(s), &ram, &res);
            let (held, fails) = workload(&vm.mm, 42, 600);
            assert_eq!(fails, 0, "{s:?}");
            assert_eq!(vm.mm.stats().allocated_pages, held);
            vm.check();
            totals.push(held);
        }
        assert!(totals.windows(2).all(|w| w[0] == w[1]), "{totals:?}");
    }

    #[test]
    fn every_page_handed_out_and_every_memmap_write_was_onlined_first() {
        use std::sync::Mutex;
        static ONLINED: Mutex<Vec<PhysRange>> = Mutex::new(Vec::new());
        fn hook(r: PhysRange) {
            ONLINED.lock().unwrap().push(r);
        }
        let covered = |a: u64, len: u64| {
            ONLINED.lock().unwrap().iter().any(|r| r.start.0 <= a && a + len <= r.end.0)
        };
        let ram = [PhysRange::from_len(0, 256 * MIB)];
        let res = [PhysRange::from_len(0, 2 * MIB)];
        for strategy in [Strategy::OnDemand, Strategy::Eager, Strategy::Deferred] {
            ONLINED.lock().unwrap().clear();
            let vm = Vm::new(cfg(strategy), &ram, &res);
            vm.mm.set_online_hook(hook);
            vm.mm.boot_init().unwrap();
            if strategy == Strategy::Deferred {
                while vm.mm.background_step() {}
            }
            for _ in 0..300 {
                let pfn = vm.mm.alloc_pages(3).unwrap();
                assert!(covered(pfn.0 * 4096, 8 * 4096), "{strategy:?}: {pfn:?} handed out before it was onlined");
            }
            let m = vm.mm.mm();
            for c in 0..m.totals().chunks_total {
                if m.chunk_initialized(c) {
                    let mm_range = m.chunk_memmap(c);
                    assert!(covered(mm_range.start.0, mm_range.end.0 - mm_range.start.0), "{strategy:?}: chunk {c} memmap");
                }
            }
        }
    }

    #[test]
    fn ondemand_initializes_about_what_it_hands_out() {
        // Chunks are wholly allocatable or wholly reserved here, so the bound
        // is exact: X/64 + one chunk of memmap after allocating X bytes.
        let ram = [PhysRange::from_len(0, 256 * MIB)];
        let res = [PhysRange::from_len(0, 2 * MIB)];
        for chunk in [128 << 10, 2 * MIB, 16 * MIB] {
            for order in [0, 3, 9] {
                let vm = Vm::booted(
                    MmConfig {
                        chunk_bytes: chunk,
                        ..cfg(Strategy::OnDemand)
                    },
                    &ram,
                    &res,
                );
                // Chunks are wholly allocatable or wholly reserved up to 2 MiB;
                // a 16 MiB chunk also holds the 6 MiB reserved at the start.
                let slack = if chunk <= 2 * MIB { 0 } else { 6 * MIB / 64 };
                let mut x = 0;
                for i in 0..2000u64 {
                    vm.mm.alloc_pages(order).unwrap();
                    x += 4096 << order;
                    if i % 97 == 0 || i == 1999 {
                        let s = vm.mm.stats();
                        assert!(
                            s.memmap_bytes_initialized <= x / 64 + chunk / 64 + slack,
                            "chunk {chunk} order {order}: {} > {x}/64 + chunk",
                            s.memmap_bytes_initialized
                        );
                    }
                    if x > 200 * MIB {
                        break;
                    }
                }
                let s = vm.check();
                assert!(!s.is_empty() || x > 0);
            }
        }
    }

    #[test]
    fn ondemand_skips_wholly_reserved_chunks_and_switches_the_check_off() {
        let (ram, res) = pc_layout();
        let vm = Vm::booted(cfg(Strategy::OnDemand), &ram, &res);
        assert_eq!(vm.mm.stats().chunks_initialized, 1);
        let mut n = 0;
        while vm.mm.alloc_pages(0).is_some() {
            n += 1;
        }
        let s = vm.mm.stats();
        assert_eq!(n, s.total_pages - s.reserved_pages);
        assert_eq!(s.alloc_failures, 1);
        assert!(s.fully_initialized && !s.grow_check_on);
        // The memmap (3..7 MiB) and the kernel chunk (2..3 MiB is half
        // kernel) : chunks 1.5 .. 3 hold no allocatable page.
        assert_eq!(s.chunks_initialized, s.chunks_total - 2);
        assert!(s.grow_events > 0);
        vm.check();
    }

    #[test]
    fn memmap_on_memory_puts_each_sections_memmap_in_the_section() {
        let (ram, res) = pc_layout();
        for s in Strategy::ALL {
            let c = MmConfig {
                memmap_on_memory: true,
                ..cfg(s)
            };
            let vm = Vm::booted(c, &ram, &res);
            let r = vm.mm.memmap_ranges();
            assert_eq!(
                r.as_slice(),
                &[
                    PhysRange::from_len(3 * MIB, MIB),
                    PhysRange::from_len(64 * MIB, MIB),
                    PhysRange::from_len(128 * MIB, MIB),
                    PhysRange::from_len(192 * MIB, 8 * MIB / 64),
                ]
            );
            assert!(r.is_complete());
            let (_, fails) = workload(&vm.mm, 7, 400);
            assert_eq!(fails, 0);
            assert!(vm.mm.stats().flags() & guest_abi::stats_flags::MEMMAP_ON_MEMORY != 0);
            vm.check();
        }
    }

    #[test]
    fn every_chunk_size_from_128k_to_a_section_works() {
        let ram = [
            PhysRange::from_len(0, 0x9f000),
            PhysRange::from_len(MIB, 71 * MIB),
        ];
        let res = [
            PhysRange::from_len(0, 4096),
            PhysRange::from_len(MIB, 2 * MIB),
        ];
        let mut chunk = guest_abi::MIN_CHUNK_SIZE;
        while chunk <= 32 * MIB {
            for s in [Strategy::Eager, Strategy::Deferred, Strategy::OnDemand] {
                let c = MmConfig {
                    chunk_bytes: chunk,
                    section_bytes: 32 * MIB,
                    memmap_on_memory: chunk == 4 * MIB,
                    ..MmConfig::new(s)
                };
                let vm = Vm::booted(c, &ram, &res);
                workload(&vm.mm, chunk, 150);
                vm.check();
                while vm.mm.background_step() {}
                let st = vm.mm.stats();
                assert!(st.fully_initialized && !st.grow_check_on, "{chunk} {s:?}");
                vm.check();
            }
            chunk *= 2;
        }
    }

    #[test]
    fn out_of_memory_returns_none_and_the_manager_stays_usable() {
        let ram = [PhysRange::from_len(0, 24 * MIB)];
        let res = [PhysRange::from_len(0, MIB)];
        for s in Strategy::ALL {
            let vm = Vm::booted(
                MmConfig {
                    chunk_bytes: MIB,
                    ..cfg(s)
                },
                &ram,
                &res,
            );
            let mut held = BlockList::new();
            while let Some(p) = vm.mm.alloc_pages(3) {
                vm.mm.list_push(&mut held, p, 3).unwrap();
            }
            assert_eq!(vm.mm.alloc_pages(MAX_ORDER + 1), None);
            let st = vm.mm.stats();
            assert_eq!(st.alloc_failures, 2);
            assert_eq!(st.allocated_pages, held.pages());
            assert!(st.free_pages < 8);
            vm.check();
            let mut seen = HashSet::new();
            while let Some((p, o)) = vm.mm.list_pop(&mut held) {
                assert!(seen.insert(p), "{p:?} handed out twice");
                vm.mm.free_pages(p, o).unwrap();
            }
            assert!(held.is_empty());
            let big = vm.mm.alloc_pages(MAX_ORDER).expect("memory coalesced back");
            vm.mm.free_pages(big, MAX_ORDER).unwrap();
            let free = vm.check();
            assert_eq!(vm.mm.stats().allocated_pages, 0);
            assert!(free.values().any(|&o| o == MAX_ORDER));
        }
    }

    #[test]
    fn parallel_init_on_threads_matches_eager() {
        let (ram, res) = pc_layout();
        let eager = Vm::booted(cfg(Strategy::Eager), &ram, &res);
        let par = Arc::new(Vm::new(
            MmConfig {
                chunk_bytes: 512 << 10,
                ..cfg(Strategy::Parallel)
            },
            &ram,
            &res,
        ));
        par.mm.boot_init().unwrap();
        assert_eq!(par.mm.alloc_pages(0), None);
        assert_eq!(
            par.mm.parallel_finish(),
            Err(MmParallelError::NotBooted).or(Err(MmParallelError::SharesIncomplete))
        );
        let threads: Vec<_> = (0..4)
            .map(|cpu| {
                let vm = par.clone();
                std::thread::spawn(move || vm.mm.parallel_init_share(cpu, 4))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(
            par.mm.parallel_init_share(1, 4),
            Err(MmParallelError::ShareTaken)
        );
        par.mm.parallel_finish().unwrap();
        assert_eq!(
            par.mm.parallel_finish(),
            Err(MmParallelError::AlreadyFinished)
        );
        let (a, b) = (eager.check(), par.check());
        assert_eq!(a, b);
        let (sa, sb) = (eager.mm.stats(), par.mm.stats());
        assert_eq!(
            (sa.free_pages, sa.reserved_pages, sa.initialized_pages),
            (sb.free_pages, sb.reserved_pages, sb.initialized_pages)
        );
        assert!(sb.fully_initialized && !sb.grow_check_on);
        assert_eq!(sb.chunks_initialized, sb.chunks_total);
        assert_eq!(
            eager.mm.parallel_init_share(0, 1),
            Err(MmParallelError::WrongStrategy)
        );
    }

    #[test]
    fn deferred_background_runs_while_another_cpu_allocates() {
        let (ram, res) = pc_layout();
        for chunk in [128 << 10, 2 * MIB] {
            let vm = Arc::new(Vm::booted(
                MmConfig {
                    chunk_bytes: chunk,
                    ..cfg(Strategy::Deferred)
                },
                &ram,
                &res,
            ));
            let st = vm.mm.stats();
            assert_eq!(
                st.chunks_initialized,
                64 * MIB / chunk,
                "boot initializes the first section"
            );
            let bg = {
                let vm = vm.clone();
                std::thread::spawn(move || {
                    let mut steps = 0;
                    while vm.mm.background_step() {
                        steps += 1;
                    }
                    steps
                })
            };
            let workers: Vec<_> = (0..2)
                .map(|i| {
                    let vm = vm.clone();
                    std::thread::spawn(move || workload(&vm.mm, 99 + i, 1200))
                })
                .collect();
            let mut held = 0;
            for w in workers {
                // Two such workloads may exhaust the 200 MiB; the workload
                // checks a failure happens only when nothing is pending.
                held += w.join().unwrap().0;
            }
            // The workers may have grown everything themselves first.
            let _steps = bg.join().unwrap();
            let st = vm.mm.stats();
            assert!(st.fully_initialized && !st.grow_check_on);
            assert_eq!(st.chunks_initialized, st.chunks_total);
            assert_eq!(st.allocated_pages, held);
            vm.check();
        }
    }

    #[test]
    fn ondemand_growth_from_several_cpus_never_hands_a_page_out_twice() {
        let (ram, res) = pc_layout();
        let vm = Arc::new(Vm::booted(
            MmConfig {
                chunk_bytes: 256 << 10,
                ..cfg(Strategy::OnDemand)
            },
            &ram,
            &res,
        ));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let vm = vm.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    while let Some(p) = vm.mm.alloc_pages(2) {
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
        let st = vm.mm.stats();
        assert!(st.fully_initialized);
        assert_eq!(st.allocated_pages, all.len() as u64 * 4);
        // What is left are fragments below order 2 around reserved pages.
        assert!(vm.check().values().all(|&o| o < 2));
    }

    #[test]
    fn low_watermark_grows_ahead_of_need() {
        let ram = [PhysRange::from_len(0, 64 * MIB)];
        let res = [PhysRange::from_len(0, 2 * MIB)];
        let c = MmConfig {
            low_watermark_pages: 256,
            ..cfg(Strategy::OnDemand)
        };
        let vm = Vm::booted(c, &ram, &res);
        for _ in 0..600 {
            vm.mm.alloc_pages(0).unwrap();
            let st = vm.mm.stats();
            assert!(st.free_pages >= 256 || st.fully_initialized);
        }
        assert!(vm.mm.stats().grow_events >= 1);
        vm.check();
    }

    #[test]
    fn bad_frees_and_list_pushes_are_refused() {
        let (ram, res) = pc_layout();
        let vm = Vm::booted(cfg(Strategy::OnDemand), &ram, &res);
        let p = vm.mm.alloc_pages(2).unwrap();
        assert!(matches!(
            vm.mm.free_pages(p, 3),
            Err(MmFreeError::OrderMismatch | MmFreeError::Misaligned)
        ));
        assert_eq!(vm.mm.free_pages(p, 1), Err(MmFreeError::OrderMismatch));
        assert_eq!(vm.mm.free_pages(p, 11), Err(MmFreeError::BadOrder));
        assert_eq!(
            vm.mm.free_pages(p.add(1), 0),
            Err(MmFreeError::NotAllocated)
        );
        assert_eq!(
            vm.mm.free_pages(Pfn(40 << 8), 0),
            Err(MmFreeError::NotAllocated)
        );
        assert_eq!(
            vm.mm.free_pages(Pfn(1 << 30), 0),
            Err(MmFreeError::NotAllocated)
        );
        let mut l = BlockList::new();
        assert_eq!(
            vm.mm.list_push(&mut l, p, 1),
            Err(MmListError::NotAllocatedBlock)
        );
        vm.mm.list_push(&mut l, p, 2).unwrap();
        assert_eq!(vm.mm.list_pop(&mut l), Some((p, 2)));
        assert_eq!(vm.mm.list_pop(&mut l), None);
        vm.mm.free_pages(p, 2).unwrap();
        assert_eq!(vm.mm.free_pages(p, 2), Err(MmFreeError::NotAllocated));
        vm.check();
    }

    #[test]
    fn init_errors_are_reported_and_init_runs_once() {
        let (ram, res) = pc_layout();
        let bad = MmConfig {
            chunk_bytes: 3 * MIB,
            ..cfg(Strategy::Eager)
        };
        assert!(matches!(
            Vm::try_new(bad, &ram, &res),
            Err(MmInitError::Config(_))
        ));
        let vm = Vm::new(cfg(Strategy::Eager), &ram, &res);
        // SAFETY: refused before touching anything.
        let again = unsafe {
            vm.mm
                .init(cfg(Strategy::Eager), &ram, &res, vm.ram.ptr(), clock)
        };
        assert_eq!(again, Err(MmInitError::AlreadyInitialized));
        assert_eq!(
            MemoryManager::empty().boot_init(),
            Err(MmBootError::NotInitialized)
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use proptest::strategy::Strategy as _;

        #[derive(Clone, Debug)]
        enum Op {
            Alloc(u32),
            Free(usize),
            Step,
        }

        fn op() -> impl proptest::strategy::Strategy<Value = Op> {
            prop_oneof![
                5 => prop_oneof![4 => 0u32..3, 2 => 3u32..8, 1 => 8u32..=MAX_ORDER].prop_map(Op::Alloc),
                3 => any::<usize>().prop_map(Op::Free),
                1 => Just(Op::Step),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

            #[test]
            fn random_alloc_free_keeps_the_buddy_invariants(
                strategy in 0usize..4,
                chunk_shift in 17u32..=24,
                on_memory in any::<bool>(),
                ram_mib in 12u64..48,
                ops in proptest::collection::vec(op(), 1..160),
            ) {
                let s = guest_abi::Strategy::ALL[strategy];
                let c = MmConfig {
                    chunk_bytes: 1 << chunk_shift,
                    section_bytes: 16 * MIB,
                    memmap_on_memory: on_memory,
                    ..MmConfig::new(s)
                };
                let ram = [PhysRange::from_len(0, 0x9f000), PhysRange::from_len(MIB, (ram_mib - 1) * MIB)];
                let res = [PhysRange::from_len(0, 4096), PhysRange::from_len(MIB, MIB + 0x3000)];
                let vm = Vm::booted(c, &ram, &res);
                let mut held: Vec<(Pfn, u32)> = Vec::new();
                let mut owned = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Alloc(order) => {
                            if let Some(p) = vm.mm.alloc_pages(order) {
                                prop_assert_eq!(p.0 % (1 << order), 0);
                                let before = owned.range(..p.0 + (1 << order)).next_back();
                                if let Some((&q, &o)) = before {
                                    prop_assert!(q + (1u64 << o) <= p.0, "overlap {:#x} {:#x}", q, p.0);
                                }
                                owned.insert(p.0, order);
                                held.push((p, order));
                            } else {
                                prop_assert_eq!(vm.mm.stats().pending_pages, 0);
                            }
                        }
                        Op::Free(i) if !held.is_empty() => {
                            let (p, o) = held.swap_remove(i % held.len());
                            owned.remove(&p.0);
                            vm.mm.free_pages(p, o).unwrap();
                        }
                        Op::Free(_) => {}
                        Op::Step => { vm.mm.background_step(); }
                    }
                    if let Some(p) = vm.mm.alloc_pages(0) {
                        vm.mm.free_pages(p, 0).unwrap();
                    }
                }
                let free = vm.check();
                for (&p, &o) in &owned {
                    vm.mm.mm().assert_allocatable(PfnRange { start: Pfn(p), end: Pfn(p + (1 << o)) });
                    let next_free = free.range(..p + (1 << o)).next_back();
                    if let Some((&f, &fo)) = next_free {
                        prop_assert!(f + (1u64 << fo) <= p || f >= p + (1 << o), "allocated {:#x} is free", p);
                    }
                }
                prop_assert_eq!(vm.mm.stats().allocated_pages, owned.values().map(|o| 1u64 << o).sum::<u64>());
            }
        }
    }
}
