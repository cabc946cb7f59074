//! The [`MemoryManager`]: the facade over one zone and its memmap. It holds
//! what `init` fixes (configuration, layout, clock) and the state of the
//! parts, and hands each call to the part that owns it:
//!
//! - the fast path, [`MemoryManager::alloc_pages`] and
//!   [`MemoryManager::free_pages`], to the zone ([`super::zone`]), and to
//!   growth ([`super::grow`]) only when the zone says the free lists ran
//!   short or dry;
//! - boot-time and background initialization to the strategies
//!   ([`super::strategy`]).
//!
//! # Locking
//!
//! - The layout (`Memmap`) is written once by `init` and read-only after;
//!   `state` (released after the write) publishes it.
//! - The init bitmap is atomic: a chunk's bit is set (release) after all its
//!   struct pages are written; readers check it (acquire) before reading one.
//! - The zone lock (a [`SpinLock`]) protects the free lists, the frontier and
//!   every read or write of an initialized struct page.
//! - A chunk is initialized outside the lock by the one CPU that claimed it
//!   ([`super::grow`]) or whose parallel share owns it ([`super::strategy`]).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, Ordering};

use guest_abi::{Strategy, STRUCT_PAGE_SIZE};

use super::addr::{Pfn, PhysRange};
use super::config::{MmConfig, MmInitError};
use super::grow::{GrowState, Grower, GROW_CHECK};
use super::memmap::Memmap;
use super::reclaim::{self, ReclaimOutcome, ReclaimSink};
use super::spinlock::SpinLock;
use super::stats::{MemmapRanges, MmStats};
use super::strategy::{
    ApJob, Booted, Cpus, Initializer, MmBootError, MmParallelError, ParallelShares,
};
use super::zone::{BlockList, MmFreeError, MmListError, Take, Zone};

const STATE_EMPTY: u8 = 0;
const STATE_BUSY: u8 = 1;
const STATE_READY: u8 = 2;
const STATE_FAILED: u8 = 3;

/// What `init` fixes for the manager's lifetime. `repr(C)`: the small
/// fields ahead of the memmap's tables (see [`MemoryManager`]).
#[repr(C)]
struct Setup {
    cfg: MmConfig,
    clock: Option<fn() -> u64>,
    memmap: Memmap,
}

/// The physical memory manager. See the [module docs](super) for its use.
///
/// Its bookkeeping is fixed-size and inside it (about 200 KiB, mostly the
/// init bitmap), so it lives in a `static` created by [`MemoryManager::empty`]
/// and is set up in place by [`MemoryManager::init`].
///
/// Laid out for a small boot working set (`repr(C)`, page-aligned): the
/// fields every boot writes (the state, the zone, the counters, the
/// configuration and the memmap's layout header with its first section
/// entries) come first and share the manager's first page; the big tables
/// follow, and a boot writes only the first entries of each.
#[repr(C, align(4096))]
pub struct MemoryManager {
    state: AtomicU8,
    growth: GrowState,
    shares: ParallelShares,
    zone: SpinLock<Zone>,
    setup: UnsafeCell<Setup>,
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
                    reclaim: guest_abi::Reclaim::Off,
                    reclaim_reserve_pages: 0,
                },
                clock: None,
                memmap: Memmap::empty(),
            }),
            zone: SpinLock::new(Zone::new()),
            growth: GrowState::new(),
            shares: ParallelShares::new(),
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

    #[inline]
    fn mm(&self) -> &Memmap {
        &self.setup().memmap
    }

    fn grower(&self) -> Grower<'_> {
        let s = self.setup();
        Grower {
            cfg: &s.cfg,
            mm: &s.memmap,
            zone: &self.zone,
            state: &self.growth,
            clock: s.clock,
        }
    }

    fn initializer(&self) -> Initializer<'_> {
        Initializer {
            grow: self.grower(),
            shares: &self.shares,
        }
    }

    /// The configuration given to `init`.
    pub fn config(&self) -> MmConfig {
        self.setup().cfg
    }

    /// Does the strategy's boot-time work on this CPU (see
    /// [`super::strategy`]; `Parallel` then needs
    /// [`MemoryManager::parallel_init_share`] on every CPU and
    /// [`MemoryManager::parallel_finish`]).
    pub fn boot_init(&self) -> Result<(), MmBootError> {
        if !self.ready() {
            return Err(MmBootError::NotInitialized);
        }
        self.initializer().boot_init()
    }

    /// Does all of the strategy's boot-time work, on this CPU and on the
    /// others `cpus` provides, and says what is left for this CPU to do (see
    /// [`super::strategy`]). Call [`MemoryManager::set_online_hook`] first.
    pub fn boot(&self, cpus: &impl Cpus) -> Result<Booted, MmBootError> {
        if !self.ready() {
            return Err(MmBootError::NotInitialized);
        }
        self.initializer().boot(cpus)
    }

    /// Runs a job [`MemoryManager::boot`] gave application processor `cpu`
    /// through [`Cpus::start`].
    pub fn run_ap_job(
        &self,
        job: ApJob,
        cpu: u64,
        cpus: &impl Cpus,
    ) -> Result<(), MmParallelError> {
        if !self.ready() {
            return Err(MmParallelError::NotBooted);
        }
        self.initializer().run_ap_job(job, cpu, cpus)
    }

    /// Initializes one more chunk at the frontier; returns whether chunks
    /// remain behind it. Safe to call from another CPU concurrently with
    /// allocations. Does nothing (false) when nothing is left, and before
    /// `parallel_finish` for `Parallel`.
    pub fn background_step(&self) -> bool {
        self.ready() && self.initializer().background_step()
    }

    /// Initializes this CPU's share of the struct pages (`Parallel`, after
    /// `boot_init`): a contiguous slice, 1/`ncpus` of the chunks. May run
    /// concurrently on every CPU; each `cpu` once, with the same `ncpus`.
    pub fn parallel_init_share(&self, cpu: u64, ncpus: u64) -> Result<(), MmParallelError> {
        if !self.ready() {
            return Err(MmParallelError::WrongStrategy);
        }
        self.initializer().parallel_init_share(cpu, ncpus)
    }

    /// Puts every initialized page on the free lists (`Parallel`, once, after
    /// every share is done).
    pub fn parallel_finish(&self) -> Result<(), MmParallelError> {
        if !self.ready() {
            return Err(MmParallelError::WrongStrategy);
        }
        self.initializer().parallel_finish()
    }

    /// Allocates `2^order` contiguous pages. Grows the initialized memory if
    /// the free lists cannot serve the request (or ran short, with a low
    /// watermark); `None` when memory is exhausted (counted in
    /// `alloc_failures`) or `order > MAX_ORDER`.
    #[inline]
    pub fn alloc_pages(&self, order: u32) -> Option<Pfn> {
        let mm = self.mm();
        let taken = self.zone.lock().alloc(mm, order);
        match taken {
            Take::Hit(pfn) => Some(pfn),
            Take::Short(pfn) => {
                self.grower().grow_ahead();
                Some(pfn)
            }
            Take::Empty => self.grower().alloc_slow(order),
        }
    }

    /// Frees a block returned by `alloc_pages` with the same order.
    #[inline]
    pub fn free_pages(&self, pfn: Pfn, order: u32) -> Result<(), MmFreeError> {
        let mm = self.mm();
        self.zone.lock().free(mm, pfn, order)
    }

    /// Puts an allocated block on `list` (linked through its head struct page).
    pub fn list_push(&self, list: &mut BlockList, pfn: Pfn, order: u32) -> Result<(), MmListError> {
        let mm = self.mm();
        self.zone.lock().list_push(mm, list, pfn, order)
    }

    /// Takes the most recently pushed block off `list`: `(pfn, order)`.
    pub fn list_pop(&self, list: &mut BlockList) -> Option<(Pfn, u32)> {
        if list.is_empty() {
            return None;
        }
        let mm = self.mm();
        self.zone.lock().list_pop(mm, list)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> MmStats {
        let s = self.setup();
        let t = s.memmap.totals();
        let c = self.growth.counters();
        let z = self.zone.lock();
        let free = z.area.free_pages;
        let allocated = z.allocated_pages;
        MmStats {
            strategy: s.cfg.strategy,
            chunk_bytes: s.cfg.chunk_bytes,
            section_bytes: s.cfg.section_bytes,
            memmap_on_memory: s.cfg.memmap_on_memory,
            total_pages: t.total_pages,
            initialized_pages: c.ram_pages_initialized,
            allocated_pages: allocated,
            free_pages: free,
            reserved_pages: t.reserved_pages,
            pending_pages: t.allocatable_pages - free - allocated,
            memmap_bytes_reserved: t.memmap_bytes,
            memmap_bytes_initialized: c.struct_pages_initialized * STRUCT_PAGE_SIZE,
            chunks_total: t.chunks_total,
            chunks_initialized: c.chunks_initialized,
            grow_events: z.grow_events,
            init_cycles: c.init_cycles,
            alloc_failures: z.alloc_failures,
            grow_check_on: self.grow_check_on(),
            fully_initialized: self.growth.fully_initialized(),
            reclaim: s.cfg.reclaim,
            reclaim_reported_bytes: z.reclaim.reported_bytes,
            reclaim_rejected_bytes: z.reclaim.rejected_bytes,
            reclaim_events: z.reclaim.events,
            chunks_deinitialized: z.reclaim.chunks_deinitialized,
        }
    }

    /// Whether a reclaim pass may find something to report: reclaim is on
    /// and a block was freed since the last pass. The kernel waits out the
    /// reclaim delay only then.
    pub fn reclaim_wanted(&self) -> bool {
        self.ready()
            && self.setup().cfg.reclaim != guest_abi::Reclaim::Off
            && self.zone.lock().reclaim.dirty
    }

    /// Runs one memory-reclaim pass ([`super::reclaim`]): reports the free
    /// memory that stayed free to the VMM through `sink` and, with
    /// `reclaim=full`, returns wholly free chunks beyond the reserve to
    /// uninitialized. Call it when every page free now has stayed free for
    /// the reclaim delay (the kernel: when its idle wait timed out).
    pub fn reclaim<S: ReclaimSink>(&self, sink: &mut S) -> ReclaimOutcome {
        if !self.ready() {
            return ReclaimOutcome::default();
        }
        reclaim::pass(&self.grower(), sink)
    }

    /// Where the memmap lives (at most 32 merged ranges).
    pub fn memmap_ranges(&self) -> MemmapRanges {
        MemmapRanges::collect(self.mm().memmap_ranges())
    }

    /// Whether the allocator still checks for uninitialized memory: the
    /// global [`GROW_CHECK`] is on and this manager has memory behind its
    /// frontier. Cheaper than [`MemoryManager::stats`].
    pub fn grow_check_on(&self) -> bool {
        GROW_CHECK.is_enabled() && !self.growth.fully_initialized()
    }

    /// Whether nothing is left behind the frontier: every chunk is
    /// initialized (`OnDemand`: every chunk with an allocatable page). The
    /// kernel switches [`GROW_CHECK`] off once this holds.
    pub fn fully_initialized(&self) -> bool {
        self.growth.fully_initialized()
    }

    /// Sets the function called with a chunk's memory range and then its
    /// memmap range before the chunk is initialized (call before
    /// [`MemoryManager::boot_init`]). It may run on several CPUs at once.
    pub fn set_online_hook(&self, hook: fn(PhysRange)) {
        self.growth.set_online_hook(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::PfnRange;
    use crate::mm::buddy::MAX_ORDER;
    use crate::mm::testing::{cfg, clock, pc_layout, Ram, MIB};
    use std::collections::{BTreeMap, HashSet};
    use std::vec::Vec;

    #[test]
    fn an_empty_manager_is_all_zero_bytes_so_its_static_costs_nothing() {
        // The kernel's `static MM` must land in .bss (not in the image, not
        // rewritten at boot): only the parts a boot uses are ever written.
        static MM: MemoryManager = MemoryManager::empty();
        // SAFETY: reads the bytes of a static that nothing writes; a
        // const-built static's bytes (padding included) are what the compiler
        // emitted, which is what decides between .data and .bss.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&raw const MM).cast::<u8>(),
                core::mem::size_of::<MemoryManager>(),
            )
        };
        assert!(
            bytes.iter().all(|b| *b == 0),
            "MemoryManager::empty() has non-zero bytes"
        );
    }

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

        /// Checks the buddy invariants, that no uninitialized memmap byte was
        /// ever written and the counters; returns the free blocks.
        fn check(&self) -> BTreeMap<u64, u32> {
            let m = self.mm.mm();
            let free = self.mm.zone.lock().check(m);
            let s = self.mm.stats();
            assert_eq!(
                s.free_pages + s.allocated_pages + s.reserved_pages + s.pending_pages,
                s.total_pages
            );
            assert_eq!(s.free_pages, free.values().map(|o| 1u64 << o).sum::<u64>());
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
            ONLINED
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.start.0 <= a && a + len <= r.end.0)
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
                assert!(
                    covered(pfn.0 * 4096, 8 * 4096),
                    "{strategy:?}: {pfn:?} handed out before it was onlined"
                );
            }
            let m = vm.mm.mm();
            for c in 0..m.totals().chunks_total {
                if m.chunk_initialized(c) {
                    let mm_range = m.chunk_memmap(c);
                    assert!(
                        covered(mm_range.start.0, mm_range.end.0 - mm_range.start.0),
                        "{strategy:?}: chunk {c} memmap"
                    );
                }
            }
        }
    }

    #[test]
    fn an_ondemand_boot_onlines_exactly_what_the_contracts_layout_predicts() {
        // The VMM registers `guest_abi::layout::ondemand_boot_ranges` before
        // the guest runs; the manager's boot must online exactly those.
        use guest_abi::layout::{ondemand_boot_ranges, MemmapGeometry};
        use guest_abi::GpaRange;
        use std::sync::Mutex;
        static ONLINED: Mutex<Vec<PhysRange>> = Mutex::new(Vec::new());
        fn hook(r: PhysRange) {
            ONLINED.lock().unwrap().push(r);
        }
        let gpa = |r: &[PhysRange]| -> Vec<GpaRange> {
            r.iter()
                .map(|r| GpaRange {
                    start: r.start.0,
                    len: r.end.0 - r.start.0,
                })
                .collect()
        };
        let pc = |mib: u64| {
            let mut ram = vec![PhysRange::from_len(0, 0x9f000)];
            if mib <= 3072 {
                ram.push(PhysRange::from_len(MIB, (mib - 1) * MIB));
            } else {
                ram.push(PhysRange::from_len(MIB, 3071 * MIB));
                ram.push(PhysRange::from_len(4096 * MIB, (mib - 3072) * MIB));
            }
            ram
        };
        let kernel = |end: u64| [PhysRange::from_len(0, MIB), PhysRange::from_len(MIB, end - MIB)];
        let cases = [
            (pc(2048), kernel(5 * MIB + 0x3000), 2 * MIB, false),
            (pc(2048), kernel(5 * MIB), 2 * MIB, true),
            (pc(3584), kernel(5 * MIB), 2 * MIB, false),
            (pc(128), kernel(3 * MIB), 128 << 10, false),
            (pc(512), kernel(2 * MIB), 8 * MIB, true),
        ];
        for (ram, res, chunk, on_memory) in cases {
            let c = MmConfig {
                chunk_bytes: chunk,
                section_bytes: guest_abi::SECTION_SIZE,
                memmap_on_memory: on_memory,
                ..MmConfig::new(Strategy::OnDemand)
            };
            let g = MemmapGeometry {
                chunk_bytes: chunk,
                section_bytes: guest_abi::SECTION_SIZE,
                on_memory,
            };
            let want = ondemand_boot_ranges(&gpa(&ram), &gpa(&res), &g).expect("the layout fits");
            ONLINED.lock().unwrap().clear();
            let vm = Vm::new(c, &ram, &res);
            vm.mm.set_online_hook(hook);
            vm.mm.boot_init().unwrap();
            let got = ONLINED.lock().unwrap().clone();
            assert_eq!(gpa(&got), want, "{} MiB, chunk {chunk}, on_memory {on_memory}", ram.last().unwrap().end.0 >> 20);
        }
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

    #[test]
    fn what_a_boot_writes_of_the_manager_shares_its_first_page() {
        use core::mem::offset_of;
        // A 2 GiB guest in 128 MiB sections: 16 section entries.
        let end = offset_of!(MemoryManager, setup) + offset_of!(Setup, memmap) + Memmap::header_bytes(16);
        assert!(end <= 4096, "the boot-written header ends at {end:#x}");
        assert_eq!(core::mem::align_of::<MemoryManager>(), 4096);
        assert!(offset_of!(Setup, cfg) < offset_of!(Setup, memmap));
        assert!(offset_of!(MemoryManager, state) < offset_of!(MemoryManager, setup));
    }
}
