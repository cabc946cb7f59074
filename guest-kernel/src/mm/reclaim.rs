//! Memory reclaim: free page reporting to the VMM, and returning wholly free
//! chunks to uninitialized so that their memmap and their KVM registration
//! go back to the host too (`reclaim=` on the guest command line; the
//! contract is `guest_abi::ReclaimRecord`).
//!
//! # When
//!
//! The kernel runs a pass ([`super::MemoryManager::reclaim`]) when its idle
//! wait for a command timed out after the reclaim delay, and only if a block
//! was freed since the last pass ([`super::MemoryManager::reclaim_wanted`]).
//! The guest does nothing else while it waits, so every page free at that
//! moment has stayed free for at least the delay (what Linux's
//! `page_reporting` delay gives).
//!
//! # What a pass reports
//!
//! The unit is a *wholly free chunk*: a chunk all of whose frames lie in free
//! blocks. With chunks of up to [`MAX_ORDER`] a wholly free chunk lies in one
//! free block of at least its order (the buddy merges free buddies, so an
//! aligned free range is one block); larger chunks are 2^k free blocks of
//! order [`MAX_ORDER`]. A pass walks the initialized chunks from the top of
//! memory down and, for each unit (the block, or the chunk's blocks):
//!
//! - `Full`, while the free pages left stay at or above the reserve
//!   ([`MmConfig::reclaim_reserve_pages`]): takes the unit off the free
//!   lists, clears its chunks' init bits, moves the frontier back to them
//!   and re-arms the grow check (`Grower::deinit_chunk` in [`super::grow`]).
//!   After the walk, the pass reports for these chunks:
//!   - each [`guest_abi::online_run`] that now has no initialized chunk
//!     and holds only allocatable RAM, as `OFFLINE` (the VMM deletes its
//!     memslot; the kernel onlines it again before the grow path writes it);
//!   - the rest of their memory as `DATA`;
//!   - each memmap page that now describes only uninitialized chunks as
//!     `MEMMAP` (with chunks of 128 KiB a memmap page describes two chunks:
//!     it goes once both are uninitialized).
//! - Otherwise (`Data`, or within the reserve): reports the unit as `DATA`
//!   unless its blocks carry the reported mark, and marks them
//!   ([`super::page::REPORTED`]). The mark lasts while the block stays on
//!   its free list; an allocation or a merge clears it, so memory is
//!   reported again only after it was used and freed again.
//!
//! Discarded memory reads as zeros afterwards. Nothing here or in the
//! allocator assumes anything of a free page's contents, and chunk
//! initialization writes every struct page whole, so a discarded memmap
//! page needs nothing either.
//!
//! Ranges go to the VMM in records of at most [`MAX_RECLAIM_RANGES`]
//! (several records per pass if needed), contiguous ranges of one kind
//! merged. A range the VMM rejects stays as it is: a marked block stays
//! marked (it is never reported again as is), an uninitialized chunk stays
//! uninitialized (its memory is resident but unused until the grow path
//! initializes it again).
//!
//! The whole pass runs under the zone lock: no CPU can allocate a block the
//! pass is reporting. A `Full` pass de-initializes only while no chunk is in
//! flight and [`GROW_CHECK`] is on (the kernel switches it back on, and
//! writes its jump sites back, before the pass).

use guest_abi::{
    online_run, reclaim_kind, Reclaim, ReclaimRecord, ReclaimRange, MAX_RECLAIM_RANGES,
    PAGE_SIZE, STRUCT_PAGE_SIZE,
};

use super::addr::{Pfn, PfnRange, PhysAddr};
use super::buddy::MAX_ORDER;
use super::grow::{Grower, GROW_CHECK};

#[cfg(doc)]
use super::config::MmConfig;

/// What one reclaim pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimOutcome {
    /// Records sent to the VMM.
    pub records: u64,
    /// Bytes of accepted ranges, all kinds together.
    pub accepted_bytes: u64,
    /// Bytes of rejected ranges.
    pub rejected_bytes: u64,
    /// Chunks returned to uninitialized.
    pub chunks_deinitialized: u64,
}

/// Where a pass sends a record: writes it where the VMM reads it, signals
/// the VMM, and returns the record's `accepted` bits as the VMM left them.
pub trait ReclaimSink {
    /// Sends `record` and returns which of its ranges were accepted.
    fn send(&mut self, record: &ReclaimRecord) -> u64;
}

impl<F: FnMut(&ReclaimRecord) -> u64> ReclaimSink for F {
    fn send(&mut self, record: &ReclaimRecord) -> u64 {
        self(record)
    }
}

/// A record being filled, sent when full and at the end of the pass.
struct Batch<'s, S: ReclaimSink> {
    rec: ReclaimRecord,
    sink: &'s mut S,
    out: ReclaimOutcome,
}

impl<S: ReclaimSink> Batch<'_, S> {
    /// Adds `[start, start + len)` of `kind`, merged with the last range of
    /// the same kind if it touches or holds it (never `OFFLINE`: each is
    /// exactly one run).
    fn push(&mut self, kind: u32, start: u64, len: u64) {
        let end = start + len;
        let n = self.rec.count as usize;
        let merge = if kind == reclaim_kind::OFFLINE { 0 } else { n };
        for r in self.rec.ranges[..merge].iter_mut().rev() {
            if r.kind != kind {
                continue;
            }
            let (rs, re) = (r.start, r.start + r.len);
            if start >= rs && end <= re {
                return;
            }
            if start == re {
                r.len += len;
                return;
            }
            if end == rs {
                r.start = start;
                r.len += len;
                return;
            }
            break;
        }
        if n == MAX_RECLAIM_RANGES {
            self.flush();
        }
        let n = self.rec.count as usize;
        self.rec.ranges[n] = ReclaimRange {
            start,
            len,
            kind,
            reserved: 0,
        };
        self.rec.count += 1;
    }

    /// Sends the ranges gathered so far, if any.
    fn flush(&mut self) {
        let n = self.rec.count as usize;
        if n == 0 {
            return;
        }
        self.rec.accepted = 0;
        let accepted = self.sink.send(&self.rec);
        self.out.records += 1;
        for (i, r) in self.rec.ranges[..n].iter().enumerate() {
            if accepted & (1 << i) != 0 {
                self.out.accepted_bytes += r.len;
            } else {
                self.out.rejected_bytes += r.len;
            }
        }
        self.rec = ReclaimRecord::default();
    }
}

/// Most disjoint chunk ranges one `Full` pass de-initializes (it stops
/// there and leaves the rest to the next pass).
const MAX_DEINIT_RANGES: usize = 32;

/// A unit a pass found: a wholly free range of chunks and its free blocks.
struct Unit {
    range: PfnRange,
    /// First block head; the blocks are `count` consecutive blocks of `order`.
    head: Pfn,
    order: u32,
    count: u64,
    reported: bool,
}

/// The wholly free unit holding chunk `c` (initialized), if any.
fn unit_at(g: &Grower<'_>, area: &super::buddy::FreeArea, c: u64) -> Option<Unit> {
    let mm = g.mm;
    let corder = mm.chunk_order();
    let start = mm.chunk_range(c).start;
    if corder <= MAX_ORDER {
        (corder..=MAX_ORDER).find_map(|k| {
            let head = Pfn(start.0 & !((1u64 << k) - 1));
            let (order, reported) = area.free_head_order(mm, head, k..=k)?;
            Some(Unit {
                range: PfnRange {
                    start: head,
                    end: head.add(1 << order),
                },
                head,
                order,
                count: 1,
                reported,
            })
        })
    } else {
        let count = 1u64 << (corder - MAX_ORDER);
        let mut reported = true;
        for i in 0..count {
            let head = start.add(i << MAX_ORDER);
            let (_, r) = area.free_head_order(mm, head, MAX_ORDER..=MAX_ORDER)?;
            reported &= r;
        }
        Some(Unit {
            range: mm.chunk_range(c),
            head: start,
            order: MAX_ORDER,
            count,
            reported,
        })
    }
}

/// Runs one reclaim pass (see the module docs); nothing with `Off`, before
/// the frontier opens, or while `Parallel` shares are pending.
pub(crate) fn pass<S: ReclaimSink>(g: &Grower<'_>, sink: &mut S) -> ReclaimOutcome {
    let mode = g.cfg.reclaim;
    if mode == Reclaim::Off {
        return ReclaimOutcome::default();
    }
    let mm = g.mm;
    let mut z = g.zone.lock();
    if !z.frontier.booted || z.frontier.parallel_pending {
        return ReclaimOutcome::default();
    }
    z.reclaim.dirty = false;
    // Nothing goes back to uninitialized while a chunk is being initialized,
    // or while the grow check is off (the allocator could not grow it
    // again): the next pass tries again.
    let full = mode == Reclaim::Full && z.frontier.in_flight == 0 && GROW_CHECK.is_enabled();
    if mode == Reclaim::Full && !full {
        z.reclaim.dirty = true;
    }
    let mut budget = z
        .area
        .free_pages
        .saturating_sub(g.cfg.reclaim_reserve_pages);
    let mut batch = Batch {
        rec: ReclaimRecord::default(),
        sink,
        out: ReclaimOutcome::default(),
    };
    // De-initialized chunk ranges, in descending address order.
    let mut deinit = [PfnRange::default(); MAX_DEINIT_RANGES];
    let mut ndeinit = 0;
    let mut c = mm.chunk_limit();
    while c > 0 {
        c -= 1;
        if !mm.is_initialized(mm.chunk_range(c).start) {
            continue;
        }
        let Some(u) = unit_at(g, &z.area, c) else {
            continue;
        };
        // Go on below the unit.
        c = mm.chunk_of(u.range.start);
        let pages = u.range.pages();
        let room = ndeinit < MAX_DEINIT_RANGES
            || deinit[ndeinit - 1].start == u.range.end;
        if full && pages <= budget && room {
            budget -= pages;
            for i in 0..u.count {
                z.area.remove_free(mm, u.head.add(i << u.order), u.order);
            }
            let (first, last) = (mm.chunk_of(u.range.start), mm.chunk_of(Pfn(u.range.end.0 - 1)));
            for chunk in first..=last {
                // SAFETY: the lock is held, no chunk is in flight (`full`),
                // and the unit's blocks, which cover the chunk, were just
                // taken off the free lists.
                unsafe { g.deinit_chunk(&mut z, chunk) };
            }
            z.reclaim.chunks_deinitialized += last - first + 1;
            batch.out.chunks_deinitialized += last - first + 1;
            match ndeinit.checked_sub(1) {
                Some(i) if deinit[i].start == u.range.end => deinit[i].start = u.range.start,
                _ => {
                    deinit[ndeinit] = u.range;
                    ndeinit += 1;
                }
            }
        } else {
            if full && pages <= budget {
                // Out of room for another range: the next pass goes on.
                z.reclaim.dirty = true;
            }
            if !u.reported {
                for i in 0..u.count {
                    z.area.mark_reported(mm, u.head.add(i << u.order));
                }
                let r = u.range.to_phys();
                batch.push(reclaim_kind::DATA, r.start.0, r.len());
            }
        }
    }
    // What the de-initialized chunks give back: whole runs, data, memmap.
    let mut offlined = [0u64; MAX_DEINIT_RANGES * 4];
    let mut noffl = 0;
    // The last memmap run looked at, and whether it went offline.
    let mut memmap_run: Option<(u64, bool)> = None;
    for r in deinit[..ndeinit].iter().rev() {
        let (start, end) = (r.start.addr().0, r.end.addr().0);
        let mut a = start;
        while a < end {
            let run = online_run(a);
            let rs = a - a % run;
            let seg_end = (rs + run).min(end);
            let run_pfns = PfnRange {
                start: PhysAddr(rs).pfn_down(),
                end: PhysAddr(rs + run).pfn_down(),
            };
            let seen = offlined[..noffl].contains(&rs);
            if seen {
                // Already in this pass's report.
            } else if noffl < offlined.len() && mm.run_can_go_offline(run_pfns) {
                offlined[noffl] = rs;
                noffl += 1;
                batch.push(reclaim_kind::OFFLINE, rs, run);
            } else {
                batch.push(reclaim_kind::DATA, a, seg_end - a);
            }
            a = seg_end;
        }
        for chunk in mm.chunk_of(r.start)..=mm.chunk_of(Pfn(r.end.0 - 1)) {
            let m = mm.chunk_memmap(chunk);
            let mut page = m.start.0 & !(PAGE_SIZE - 1);
            while page < m.end.0 {
                let (f, l) = mm.chunks_of_memmap_page(chunk, PhysAddr(page));
                if (f..=l).all(|x| !mm.is_initialized(mm.chunk_range(x).start)) {
                    // A run that now holds only memmap of uninitialized
                    // chunks (and free memory of uninitialized chunks)
                    // goes offline whole, so that its memslot goes too.
                    let run = online_run(page);
                    let rs = page - page % run;
                    let offline = match memmap_run {
                        Some((at, off)) if at == rs => off,
                        _ if offlined[..noffl].contains(&rs) => true,
                        _ => {
                            let run_pfns = PfnRange {
                                start: PhysAddr(rs).pfn_down(),
                                end: PhysAddr(rs + run).pfn_down(),
                            };
                            let off = noffl < offlined.len() && mm.run_can_go_offline(run_pfns);
                            if off {
                                offlined[noffl] = rs;
                                noffl += 1;
                                batch.push(reclaim_kind::OFFLINE, rs, run);
                            }
                            off
                        }
                    };
                    memmap_run = Some((rs, offline));
                    if !offline {
                        batch.push(reclaim_kind::MEMMAP, page, PAGE_SIZE);
                    }
                }
                page += PAGE_SIZE;
            }
        }
    }
    batch.flush();
    let out = batch.out;
    z.reclaim.events += out.records;
    z.reclaim.reported_bytes += out.accepted_bytes;
    z.reclaim.rejected_bytes += out.rejected_bytes;
    out
}

const _: () = assert!(PAGE_SIZE.is_multiple_of(STRUCT_PAGE_SIZE));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::PhysRange;
    use crate::mm::config::MmConfig;
    use crate::mm::grow::GrowRig;
    use crate::mm::strategy::{Initializer, ParallelShares};
    use crate::mm::testing::MIB;
    use guest_abi::{Strategy, ABI_VERSION, RECLAIM_MAGIC};
    use std::cell::RefCell;
    use std::collections::{BTreeMap, BTreeSet};
    use std::vec::Vec;

    std::thread_local! {
        /// Runs the simulated VMM deleted (an accepted `OFFLINE`) that were
        /// not onlined again since, by start.
        static OFFLINE: RefCell<BTreeSet<u64>> = const { RefCell::new(BTreeSet::new()) };
    }

    /// The online hook: the runs `r` touches are registered again.
    fn online_hook(r: PhysRange) {
        OFFLINE.with(|o| {
            let mut o = o.borrow_mut();
            let mut a = r.start.0;
            while a < r.end.0 {
                let run = online_run(a);
                let rs = a - a % run;
                o.remove(&rs);
                a = rs + run;
            }
        });
    }

    fn offline(pfn: u64) -> bool {
        let a = pfn * PAGE_SIZE;
        let rs = a - a % online_run(a);
        OFFLINE.with(|o| o.borrow().contains(&rs))
    }

    /// The simulated VMM: checks every range as the real one must accept
    /// it, discards the accepted ones (zeroes them) and keeps the host's
    /// view of residency.
    struct Host {
        /// Data pages the guest wrote and the host has not discarded since.
        resident: BTreeSet<u64>,
        accepted_bytes: u64,
        records: u64,
        /// `Some(seed)`: reject every other range.
        reject: Option<u64>,
    }

    struct Sink<'a> {
        rig: &'a GrowRig,
        host: &'a mut Host,
    }

    fn initialized(rig: &GrowRig, c: u64) -> bool {
        rig.mm.is_initialized(rig.mm.chunk_range(c).start)
    }

    impl ReclaimSink for Sink<'_> {
        fn send(&mut self, rec: &ReclaimRecord) -> u64 {
            let (mm, host) = (&*self.rig.mm, &mut *self.host);
            assert_eq!((rec.magic, rec.abi_version), (RECLAIM_MAGIC, ABI_VERSION));
            let n = rec.count as usize;
            assert!((1..=MAX_RECLAIM_RANGES).contains(&n), "{n} ranges");
            let rs = &rec.ranges[..n];
            for (i, a) in rs.iter().enumerate() {
                for b in &rs[..i] {
                    assert!(a.start + a.len <= b.start || b.start + b.len <= a.start, "{a:?} overlaps {b:?}");
                }
            }
            let chunk = mm.chunk_pages() * PAGE_SIZE;
            let pfns = |r: &ReclaimRange| PfnRange {
                start: PhysAddr(r.start).pfn_down(),
                end: PhysAddr(r.start + r.len).pfn_down(),
            };
            let chunks_idle = |r: PfnRange| {
                (mm.chunk_of(r.start)..=mm.chunk_of(Pfn(r.end.0 - 1))).all(|c| !initialized(self.rig, c))
            };
            let mut accepted = 0;
            for (i, r) in rs.iter().enumerate() {
                assert!(r.len > 0 && r.reserved == 0, "{r:?}");
                match r.kind {
                    reclaim_kind::DATA => {
                        assert!(r.start % chunk == 0 && r.len % chunk == 0, "{r:?} not whole chunks");
                        assert!(mm.all_allocatable(pfns(r)), "{r:?} holds reserved memory");
                    }
                    reclaim_kind::OFFLINE => {
                        assert_eq!((r.start % online_run(r.start), r.len), (0, online_run(r.start)), "{r:?}");
                        assert!(chunks_idle(pfns(r)), "{r:?} offlines an initialized chunk");
                        // Allocatable memory, or memmap that describes
                        // only uninitialized chunks: never the kernel's.
                        for pfn in pfns(r).start.0..pfns(r).end.0 {
                            let one = PfnRange { start: Pfn(pfn), end: Pfn(pfn + 1) };
                            if mm.all_allocatable(one) {
                                continue;
                            }
                            let a = pfn * PAGE_SIZE;
                            assert!(mm.memmap_ranges().any(|m| m.start.0 <= a && a < m.end.0), "{r:?} holds reserved memory at {a:#x}");
                            let mut c = mm.next_chunk(0);
                            while let Some(x) = c {
                                let m = mm.chunk_memmap(x);
                                if m.start.0 < a + PAGE_SIZE && a < m.end.0 {
                                    assert!(!initialized(self.rig, x), "{r:?} offlines the memmap of chunk {x}");
                                }
                                c = mm.next_chunk(x + 1);
                            }
                        }
                    }
                    reclaim_kind::MEMMAP => {
                        assert!(r.start % PAGE_SIZE == 0 && r.len % PAGE_SIZE == 0, "{r:?}");
                        assert!(mm.memmap_ranges().any(|m| m.start.0 <= r.start && r.start + r.len <= m.end.0));
                        // No page may describe an initialized chunk.
                        let mut c = mm.next_chunk(0);
                        while let Some(x) = c {
                            let m = mm.chunk_memmap(x);
                            if m.start.0 < r.start + r.len && r.start < m.end.0 {
                                assert!(!initialized(self.rig, x), "{r:?} describes chunk {x}");
                            }
                            c = mm.next_chunk(x + 1);
                        }
                    }
                    k => panic!("kind {k}"),
                }
                if let Some(seed) = host.reject {
                    // Every other range, starting with the first one or not.
                    if (seed + host.records + i as u64).is_multiple_of(2) {
                        continue;
                    }
                }
                accepted |= 1 << i;
                host.accepted_bytes += r.len;
                // SAFETY: the range is inside the simulated RAM (checked
                // above), which is what discarding does to it on a host.
                unsafe { self.rig.ram().add(r.start as usize).write_bytes(0, r.len as usize) };
                if r.kind != reclaim_kind::MEMMAP {
                    let p = pfns(r);
                    let gone: Vec<u64> = host.resident.range(p.start.0..p.end.0).copied().collect();
                    for g in gone {
                        host.resident.remove(&g);
                    }
                }
                if r.kind == reclaim_kind::OFFLINE {
                    OFFLINE.with(|o| o.borrow_mut().insert(r.start));
                }
            }
            host.records += 1;
            accepted
        }
    }

    /// A booted manager (grower rig) with its simulated host and workload.
    struct Sim {
        rig: GrowRig,
        host: Host,
        held: Vec<(Pfn, u32)>,
        owned: BTreeMap<u64, u32>,
    }

    const TAG: u64 = 0x5a5a_0000_0000_0000;

    impl Sim {
        fn boot(c: MmConfig, ram: &[PhysRange], res: &[PhysRange], reject: Option<u64>) -> Sim {
            OFFLINE.with(|o| o.borrow_mut().clear());
            let rig = GrowRig::new(c, ram, res);
            rig.state.set_online_hook(online_hook);
            let shares = ParallelShares::new();
            let init = Initializer {
                grow: rig.grower(),
                shares: &shares,
            };
            init.boot_init().unwrap();
            match c.strategy {
                Strategy::Parallel => {
                    init.parallel_init_share(0, 1).unwrap();
                    init.parallel_finish().unwrap();
                }
                Strategy::Deferred => while init.background_step() {},
                _ => {}
            }
            Sim {
                rig,
                host: Host {
                    resident: BTreeSet::new(),
                    accepted_bytes: 0,
                    records: 0,
                    reject,
                },
                held: Vec::new(),
                owned: BTreeMap::new(),
            }
        }

        fn word(&self, pfn: u64) -> *mut u64 {
            self.rig.ram().wrapping_add((pfn * PAGE_SIZE) as usize).cast::<u64>()
        }

        /// Allocates and writes every page (the host backs them).
        fn alloc(&mut self, order: u32) -> Option<Pfn> {
            let p = self.rig.grower().alloc_slow(order)?;
            let end = p.0 + (1 << order);
            if let Some((&q, &o)) = self.owned.range(..end).next_back() {
                assert!(q + (1u64 << o) <= p.0, "{p:?} handed out twice");
            }
            self.owned.insert(p.0, order);
            self.held.push((p, order));
            for pfn in p.0..end {
                assert!(!offline(pfn), "{pfn:#x} handed out in an offline run");
                // SAFETY: the page is in the simulated RAM and was just
                // allocated to this workload.
                unsafe { self.word(pfn).write(TAG ^ pfn) };
                self.host.resident.insert(pfn);
            }
            Some(p)
        }

        /// Frees a held block after checking nobody discarded or wrote it.
        fn free(&mut self, i: usize) {
            let (p, o) = self.held.swap_remove(i % self.held.len());
            self.owned.remove(&p.0);
            for pfn in p.0..p.0 + (1 << o) {
                // SAFETY: as in `alloc`; the page is still ours.
                assert_eq!(unsafe { self.word(pfn).read() }, TAG ^ pfn, "allocated {pfn:#x} lost its data");
            }
            self.rig.free(p, o);
        }

        fn pass(&mut self) -> ReclaimOutcome {
            let mut sink = Sink {
                rig: &self.rig,
                host: &mut self.host,
            };
            pass(&self.rig.grower(), &mut sink)
        }

        fn dirty(&self) -> bool {
            self.rig.zone.lock().reclaim.dirty
        }

        /// The free blocks, and whether chunk `c` is wholly free (with the
        /// pages of the unit holding it).
        fn wholly_free(&self, free: &BTreeMap<u64, u32>, c: u64) -> Option<u64> {
            let r = self.rig.mm.chunk_range(c);
            let (mut covered, mut unit) = (0, 0);
            for (&p, &o) in free.range(..r.end.0) {
                let e = p + (1 << o);
                if e > r.start.0 {
                    covered += e.min(r.end.0) - p.max(r.start.0);
                    unit = unit.max(1u64 << o);
                }
            }
            (covered == r.pages()).then_some(unit.max(r.pages()))
        }

        /// Checks the allocator against its layout and the host after any step.
        fn check(&self) -> BTreeMap<u64, u32> {
            let (rig, mm) = (&self.rig, &*self.rig.mm);
            let free = rig.zone.lock().check(mm);
            let pairs = mm.chunk_pages() < PAGE_SIZE / STRUCT_PAGE_SIZE;
            // A deinitialized chunk's memmap is zero again once discarded:
            // not if the host rejected it, nor while the chunk sharing its
            // memmap page is initialized.
            let rejecting = self.host.reject.is_some();
            let inited =
                mm.assert_uninitialized_untouched_but(|c| rejecting || (pairs && initialized(rig, c ^ 1)));
            let counters = rig.state.counters();
            assert_eq!(inited, counters.chunks_initialized);
            assert_eq!(counters.struct_pages_initialized, inited * mm.chunk_pages());
            // Every allocatable page of an initialized chunk is free or
            // allocated; no other page is either.
            let (mut allocatable, mut ram) = (0, 0);
            let mut c = mm.next_chunk(0);
            while let Some(x) = c {
                if initialized(rig, x) {
                    for (kind, run) in mm.runs(x) {
                        allocatable += if kind == super::super::memmap::PageKind::Free { run.pages() } else { 0 };
                        ram += if kind == super::super::memmap::PageKind::Hole { 0 } else { run.pages() };
                    }
                }
                c = mm.next_chunk(x + 1);
            }
            let (f, a) = rig.pages();
            assert_eq!(f + a, allocatable);
            assert_eq!(counters.ram_pages_initialized, ram);
            assert_eq!(rig.zone.lock().reclaim.reported_bytes, self.host.accepted_bytes);
            for (&p, &o) in &self.owned {
                for pfn in p..p + (1 << o) {
                    // SAFETY: as in `alloc`.
                    assert_eq!(unsafe { self.word(pfn).read() }, TAG ^ pfn, "allocated {pfn:#x} lost its data");
                }
            }
            free
        }

        /// After a pass that the host accepted whole: nothing free for the
        /// delay is resident, and `Full` kept no more than the reserve.
        fn check_after_pass(&self) {
            let free = self.check();
            let mm = &*self.rig.mm;
            let (f, _) = self.rig.pages();
            let reserve = self.rig.cfg.reclaim_reserve_pages;
            let full = self.rig.cfg.reclaim == Reclaim::Full;
            let mut c = mm.next_chunk(0);
            while let Some(x) = c {
                let r = mm.chunk_range(x);
                let unit = if initialized(&self.rig, x) { self.wholly_free(&free, x) } else { Some(0) };
                if let Some(unit) = unit {
                    let left = self.host.resident.range(r.start.0..r.end.0).next();
                    assert_eq!(left, None, "chunk {x} is free or uninitialized but resident");
                    if full && unit > 0 && !self.dirty() {
                        assert!(f < reserve + unit, "chunk {x} kept though {f} pages are free");
                    }
                }
                c = mm.next_chunk(x + 1);
            }
        }
    }

    /// The layout of a small PC: a hole below 1 MiB, a kernel at 1..2 MiB.
    fn layout(ram_mib: u64) -> ([PhysRange; 2], [PhysRange; 2]) {
        (
            [PhysRange::from_len(0, 0x9f000), PhysRange::from_len(MIB, (ram_mib - 1) * MIB)],
            [PhysRange::from_len(0, 4096), PhysRange::from_len(MIB, MIB + 0x3000)],
        )
    }

    #[test]
    fn full_reclaim_returns_everything_freed_and_reallocation_grows_the_same_way() {
        let ram = [PhysRange::from_len(0, 256 * MIB)];
        let res = [PhysRange::from_len(0, 2 * MIB)];
        let c = MmConfig {
            section_bytes: 64 * MIB,
            reclaim: Reclaim::Full,
            ..MmConfig::new(Strategy::OnDemand)
        };
        let mut sim = Sim::boot(c, &ram, &res, None);
        let idle_chunks = sim.rig.state.counters().chunks_initialized;
        let mut grows = Vec::new();
        for round in 0..2 {
            let before = sim.rig.zone.lock().grow_events;
            for _ in 0..64 {
                sim.alloc(9).unwrap();
            }
            grows.push(sim.rig.zone.lock().grow_events - before);
            sim.check();
            while !sim.held.is_empty() {
                sim.free(0);
            }
            assert!(sim.dirty());
            let out = sim.pass();
            assert!(out.chunks_deinitialized >= 64, "round {round}: {out:?}");
            assert_eq!(out.rejected_bytes, 0);
            sim.check_after_pass();
            // The memmap (2..6 MiB) leaves chunk 3 the first allocatable one:
            // every chunk with allocatable memory went back.
            assert_eq!(sim.rig.state.counters().chunks_initialized, 0, "round {round}");
            assert!(idle_chunks <= 1);
            assert!(sim.host.resident.is_empty());
            // Every run the allocations used, above the memmap, is offline.
            let mut a = 6 * MIB;
            while a < 6 * MIB + 128 * MIB {
                assert!(offline(a / PAGE_SIZE), "run at {a:#x} still registered");
                a += online_run(a);
            }
            // So are the runs of the memmap (2..6 MiB): every chunk they
            // describe is uninitialized, so their memslots go too. The
            // reserved run below them stays.
            for run in [2 * MIB, 4 * MIB] {
                assert!(offline(run / PAGE_SIZE), "memmap run at {run:#x} still registered");
            }
            assert!(!offline(0), "the reserved run went offline");
            assert!(!sim.dirty());
            assert_eq!(sim.pass(), ReclaimOutcome::default(), "a second pass has nothing to report");
        }
        // The first allocation found the boot chunk initialized; the second
        // initializes it again too.
        assert_eq!(grows[1], grows[0] + idle_chunks, "reallocation initializes what the first allocation did");
    }

    #[test]
    fn data_reclaim_reports_free_chunks_once_and_keeps_them_initialized() {
        let (ram, res) = layout(64);
        for strategy in Strategy::ALL {
            let c = MmConfig {
                section_bytes: 16 * MIB,
                reclaim: Reclaim::Data,
                ..MmConfig::new(strategy)
            };
            let mut sim = Sim::boot(c, &ram, &res, None);
            for _ in 0..40 {
                sim.alloc(8).unwrap();
            }
            let chunks = sim.rig.state.counters().chunks_initialized;
            for i in 0..20 {
                sim.free(i * 7);
            }
            let out = sim.pass();
            assert!(out.accepted_bytes >= 4 * MIB, "{strategy:?}: {out:?}");
            assert_eq!(out.chunks_deinitialized, 0);
            assert_eq!(sim.rig.state.counters().chunks_initialized, chunks, "{strategy:?}");
            sim.check_after_pass();
            assert_eq!(sim.pass(), ReclaimOutcome::default(), "{strategy:?}: reported twice");
            // Allocated again and freed again, memory is reported again.
            let held = sim.held.len();
            while sim.alloc(8).is_some() && sim.held.len() < held + 10 {}
            while !sim.held.is_empty() {
                sim.free(0);
            }
            assert!(sim.pass().accepted_bytes > 0);
            sim.check_after_pass();
        }
    }

    #[test]
    fn reserve_stays_initialized_but_its_data_is_reported() {
        let (ram, res) = layout(64);
        for reserve in [0, 256, 1024, 3000] {
            let c = MmConfig {
                section_bytes: 16 * MIB,
                reclaim: Reclaim::Full,
                reclaim_reserve_pages: reserve,
                ..MmConfig::new(Strategy::OnDemand)
            };
            let mut sim = Sim::boot(c, &ram, &res, None);
            while sim.alloc(9).is_some() {}
            while !sim.held.is_empty() {
                sim.free(0);
            }
            sim.pass();
            sim.check_after_pass();
            let (f, _) = sim.rig.pages();
            assert!(f >= reserve, "reserve {reserve}: {f} free");
            assert!(f < reserve + 512 + 1024, "reserve {reserve}: {f} free");
            assert!(sim.host.resident.is_empty(), "reserve {reserve}");
        }
    }

    #[test]
    fn a_vmm_that_rejects_ranges_leaves_the_allocator_sound() {
        let (ram, res) = layout(48);
        for (strategy, mode) in [(Strategy::OnDemand, Reclaim::Full), (Strategy::Eager, Reclaim::Data)] {
            let c = MmConfig {
                section_bytes: 16 * MIB,
                chunk_bytes: 512 << 10,
                reclaim: mode,
                ..MmConfig::new(strategy)
            };
            let mut sim = Sim::boot(c, &ram, &res, Some(0));
            let (mut accepted, mut rejected) = (0, 0);
            for round in 0..4 {
                while sim.alloc(7).is_some() && sim.held.len() < 200 {}
                while sim.held.len() > 10 * round {
                    sim.free(round * 3 + 1);
                }
                let out = sim.pass();
                (accepted, rejected) = (accepted + out.accepted_bytes, rejected + out.rejected_bytes);
                sim.check();
                assert_eq!(sim.pass().records, 0, "a rejected range is not sent again as is");
            }
            assert!(accepted > 0 && rejected > 0, "{strategy:?}: {accepted} {rejected}");
            assert_eq!(sim.rig.zone.lock().reclaim.rejected_bytes, rejected);
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use proptest::strategy::Strategy as _;

        #[derive(Clone, Debug)]
        enum Op {
            Alloc(u32),
            Free(usize),
            FreeMany(usize),
            Reclaim,
        }

        fn op() -> impl proptest::strategy::Strategy<Value = Op> {
            prop_oneof![
                6 => prop_oneof![3 => 0u32..3, 2 => 3u32..8, 2 => 8u32..=MAX_ORDER].prop_map(Op::Alloc),
                3 => any::<usize>().prop_map(Op::Free),
                1 => (1usize..40).prop_map(Op::FreeMany),
                2 => Just(Op::Reclaim),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

            #[test]
            fn random_alloc_free_reclaim_keeps_the_allocator_and_the_host_agreeing(
                strategy in 0usize..4,
                full in any::<bool>(),
                chunk_shift in 17u32..=24,
                on_memory in any::<bool>(),
                ram_mib in 12u64..48,
                reserve in prop_oneof![Just(0u64), 1u64..2048],
                reject in prop_oneof![3 => Just(None), 1 => any::<u64>().prop_map(Some)],
                ops in proptest::collection::vec(op(), 1..120),
            ) {
                let s = guest_abi::Strategy::ALL[strategy];
                let mode = if full && s == guest_abi::Strategy::OnDemand { Reclaim::Full } else { Reclaim::Data };
                let c = MmConfig {
                    chunk_bytes: 1 << chunk_shift,
                    section_bytes: 16 * MIB,
                    memmap_on_memory: on_memory,
                    reclaim: mode,
                    reclaim_reserve_pages: reserve,
                    ..MmConfig::new(s)
                };
                let (ram, res) = layout(ram_mib);
                let mut sim = Sim::boot(c, &ram, &res, reject);
                for op in ops {
                    match op {
                        Op::Alloc(order) => {
                            if sim.alloc(order).is_none() {
                                // Only when nothing is left behind the frontier
                                // that could hold the block.
                                let (f, a) = sim.rig.pages();
                                let pending = sim.rig.mm.totals().allocatable_pages - f - a;
                                prop_assert_eq!(pending, 0, "order {} failed", order);
                            }
                        }
                        Op::Free(i) if !sim.held.is_empty() => sim.free(i),
                        Op::Free(_) => {}
                        Op::FreeMany(n) => {
                            for i in 0..n.min(sim.held.len()) {
                                sim.free(i);
                            }
                        }
                        Op::Reclaim => {
                            sim.pass();
                            if reject.is_none() {
                                sim.check_after_pass();
                            } else {
                                sim.check();
                            }
                            if !sim.dirty() {
                                prop_assert_eq!(sim.pass().records, 0, "a second pass reported again");
                            }
                        }
                    }
                }
                while !sim.held.is_empty() {
                    sim.free(0);
                }
                while sim.dirty() {
                    sim.pass();
                }
                sim.check();
                if reject.is_none() {
                    sim.check_after_pass();
                }
                // Everything can be allocated again.
                let mut n = 0;
                while sim.alloc(0).is_some() {
                    n += 1;
                }
                prop_assert_eq!(n, sim.rig.mm.totals().allocatable_pages);
                sim.check();
            }
        }
    }
}
