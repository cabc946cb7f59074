//! Registering guest RAM with KVM: the one place that does, in blocks of
//! one *grain* each (one memslot per block, slot number = block number).
//! Blocks are registered when the guest first needs them (its
//! `port::MEM_ONLINE`), not at boot. Any vCPU thread may call it.
//!
//! The guest onlines memory in [`guest_abi::MEMORY_BLOCK_SIZE`] blocks
//! (2 MiB, one memmap chunk). The grain is that block, or the smallest
//! power-of-two multiple of it that keeps every block of guest RAM within
//! the host's `KVM_CAP_NR_MEMSLOTS`, less [`SLOT_MARGIN`] ([`grain_for`]).
//! Registering the whole grain block that holds what the guest onlined is
//! always allowed by the contract (the VMM may register more than asked),
//! so the guest never needs to know the grain. For the same reason a
//! request is widened to the contract's aligned runs
//! ([`guest_abi::online_run`]: single blocks in low memory, up to 128 MiB
//! higher up), which the guest then treats as online, so a guest that uses
//! all its RAM costs a few dozen `MEM_ONLINE` exits and memslots, not one
//! per block.
//!
//! Memory goes offline again when the guest gives back a whole run it no
//! longer uses (`reclaim_kind::OFFLINE`, [`Registrar::unregister_run`]): its
//! blocks are marked offline, and a memslot is deleted
//! (`KVM_SET_USER_MEMORY_REGION` with size 0, which frees KVM's per-page
//! metadata for it) once *every* block it covers is offline. A memslot is
//! never split: one that also holds blocks still in use (the boot slot,
//! which holds the kernel; or a grain block larger than the run, on a host
//! with few memslots) stays registered until its last block goes offline.
//! The next `MEM_ONLINE` in an offline block marks it online again, and
//! registers it anew if its memslot was deleted. A guest that touches a
//! block whose memslot is deleted is stopped, as for one it never onlined.

use super::ram::ram_end;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Memslots left unused by guest RAM, for anything else a VM may one day
/// register (a device window, a ROM); KVM's own private slots are not
/// counted in `KVM_CAP_NR_MEMSLOTS`.
pub const SLOT_MARGIN: usize = 16;

/// The registration grain for guest RAM ending at `ram_end` on a host with
/// `nr_memslots` slots: [`guest_abi::MEMORY_BLOCK_SIZE`] doubled until the
/// blocks up to `ram_end` fit the slots less [`SLOT_MARGIN`] (or half the
/// slots, on a host with very few).
pub fn grain_for(ram_end: u64, nr_memslots: usize) -> u64 {
    let usable = if nr_memslots > 2 * SLOT_MARGIN { nr_memslots - SLOT_MARGIN } else { (nr_memslots / 2).max(1) };
    let mut grain = guest_abi::MEMORY_BLOCK_SIZE;
    while ram_end.div_ceil(grain) > usable as u64 {
        grain *= 2;
    }
    grain
}

/// Why a block could not be registered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegisterError {
    /// The address is not guest RAM (the guest's mistake).
    #[error("guest-physical address {gpa:#x} is not guest RAM")]
    NotRam { gpa: u64 },
    /// KVM refused the slot (the host's failure).
    #[error("KVM refused memory slot {slot} ({kib} KiB at {gpa:#x})")]
    Kvm {
        slot: u32,
        gpa: u64,
        kib: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What the registrar knows: which grain blocks are in a memslot, which
/// [`guest_abi::MEMORY_BLOCK_SIZE`] units the guest gave back, and the
/// memslots (first block, which is the slot number, to one past the last).
struct Blocks {
    registered: Vec<bool>,
    offline: Vec<bool>,
    slots: BTreeMap<u64, u64>,
}

/// The unit the guest onlines and offlines in.
const UNIT: u64 = guest_abi::MEMORY_BLOCK_SIZE;

/// Registers guest RAM with KVM, block by block.
pub struct Registrar {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    grain: u64,
    blocks: Mutex<Blocks>,
    registered_bytes: AtomicU64,
    slots_used: AtomicU64,
    slots_deleted: AtomicU64,
    online_requests: AtomicU64,
}

impl Registrar {
    /// A registrar for `mem` in `vm` on a host with `nr_memslots` memory
    /// slots (`Kvm::get_nr_memslots`), with nothing registered yet.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap, nr_memslots: usize) -> Registrar {
        let end = ram_end(&mem);
        let grain = grain_for(end, nr_memslots);
        let blocks = end.div_ceil(grain) as usize;
        Registrar {
            vm,
            mem,
            grain,
            blocks: Mutex::new(Blocks {
                registered: vec![false; blocks],
                offline: vec![false; end.div_ceil(UNIT) as usize],
                slots: BTreeMap::new(),
            }),
            registered_bytes: AtomicU64::new(0),
            slots_used: AtomicU64::new(0),
            slots_deleted: AtomicU64::new(0),
            online_requests: AtomicU64::new(0),
        }
    }

    fn blocks(&self) -> MutexGuard<'_, Blocks> {
        // Plain data, consistent after every step: a panic elsewhere leaves it usable.
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers every block that overlaps `[start, end)` and is not yet
    /// registered, and marks offline ones online again. Parts outside guest
    /// RAM are an error. Adjacent blocks
    /// that this call registers within one host mapping share one memslot
    /// (numbered after its first block), so a boot range of several blocks
    /// costs one `KVM_SET_USER_MEMORY_REGION`.
    pub fn register_range(&self, start: u64, end: u64) -> Result<(), RegisterError> {
        if end <= start {
            return Ok(());
        }
        let grain = self.grain;
        let mut guard = self.blocks();
        let Blocks { registered: done, offline, slots } = &mut *guard;
        let (mut first, mut last) = (start / grain, end.div_ceil(grain));
        // Widen to the contract's runs (`guest_abi::online_run`) at both
        // ends, inside the region holding `start` (never across the gap
        // below 4 GiB or past RAM).
        if let Some(region) = self.mem.find_region(GuestAddress(start)) {
            let (lo, hi) = (region.start_addr().0.div_ceil(grain), (region.start_addr().0 + region.len()).div_ceil(grain));
            let (run_lo, run_hi) = (guest_abi::online_run(start), guest_abi::online_run(end - 1));
            let (run_start, run_end) = (start - start % run_lo, end.div_ceil(run_hi).saturating_mul(run_hi));
            first = (run_start / grain).max(lo);
            last = (run_end.div_ceil(grain)).min(hi).max(last);
            // What the guest now treats as online is no longer offline.
            let (u0, u1) = (run_start / UNIT, run_end.div_ceil(UNIT).min(offline.len() as u64));
            for u in offline.iter_mut().take(u1 as usize).skip(u0 as usize) {
                *u = false;
            }
        }
        let mut block = first;
        while block < last {
            let Some(&already) = done.get(block as usize) else {
                return Err(RegisterError::NotRam { gpa: block * grain });
            };
            if already {
                block += 1;
                continue;
            }
            let gpa = block * grain;
            let region = self.mem.find_region(GuestAddress(gpa)).ok_or(RegisterError::NotRam { gpa })?;
            let region_end = region.start_addr().0 + region.len();
            // The run: this block and the unregistered ones after it, up to
            // `last` and inside this region.
            let mut run_end = block + 1;
            while run_end < last && run_end * grain < region_end && done.get(run_end as usize) == Some(&false) {
                run_end += 1;
            }
            let len = (run_end * grain).min(region_end) - gpa;
            let offset = gpa - region.start_addr().0;
            let r = kvm_userspace_memory_region {
                // `new` sized the blocks so that every block number is a
                // slot below the host's limit, and a run's blocks are
                // never the first block of another slot.
                slot: block as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: len,
                // The run lies inside this one host mapping.
                userspace_addr: region.as_ptr() as u64 + offset,
            };
            // SAFETY: the host range is part of a live mapping owned by
            // `mem`, which the VM keeps alive as long as the VM fd exists.
            unsafe { self.vm.set_user_memory_region(r) }.map_err(|source| RegisterError::Kvm {
                slot: r.slot,
                gpa,
                kib: len >> 10,
                source,
            })?;
            for d in &mut done[block as usize..run_end as usize] {
                *d = true;
            }
            slots.insert(block, run_end);
            self.registered_bytes.fetch_add(len, Ordering::Relaxed);
            self.slots_used.fetch_add(1, Ordering::Relaxed);
            block = run_end;
        }
        Ok(())
    }

    /// The guest gave back the run `[start, start + len)`: marks its
    /// 2 MiB units offline, then deletes every memslot all of whose memory is
    /// now offline. Returns how many memslots were deleted. Units the run
    /// only partly covers, and parts outside RAM, are left as they are (the
    /// caller checked the run against RAM and the contract's runs).
    pub fn unregister_run(&self, start: u64, len: u64) -> Result<u64, RegisterError> {
        let grain = self.grain;
        let Some(end) = start.checked_add(len) else { return Ok(0) };
        let mut guard = self.blocks();
        let Blocks { registered, offline, slots } = &mut *guard;
        let (u0, u1) = (start.div_ceil(UNIT), (end / UNIT).min(offline.len() as u64));
        for u in offline.iter_mut().take(u1 as usize).skip(u0 as usize) {
            *u = true;
        }
        // The slots overlapping the run: those starting before its end whose
        // end is past its start (slots are disjoint and sorted).
        let (first, last) = (start / grain, end.div_ceil(grain));
        let candidates: Vec<(u64, u64)> =
            slots.range(..last).rev().take_while(|&(_, &e)| e > first).map(|(&s, &e)| (s, e)).collect();
        let mut deleted = 0;
        for (s, e) in candidates {
            let gpa = s * grain;
            let region = self.mem.find_region(GuestAddress(gpa)).ok_or(RegisterError::NotRam { gpa })?;
            let slot_end = (e * grain).min(region.start_addr().0 + region.len());
            let units = offline.get((gpa / UNIT) as usize..slot_end.div_ceil(UNIT) as usize);
            if !units.is_some_and(|u| u.iter().all(|o| *o)) {
                continue;
            }
            let len = slot_end - gpa;
            let r = kvm_userspace_memory_region {
                slot: s as u32,
                flags: 0,
                guest_phys_addr: gpa,
                // Size 0 deletes the slot.
                memory_size: 0,
                userspace_addr: region.as_ptr() as u64 + (gpa - region.start_addr().0),
            };
            // SAFETY: deleting a slot this registrar created; KVM stops
            // using the host range, which stays mapped by `mem`.
            unsafe { self.vm.set_user_memory_region(r) }.map_err(|source| RegisterError::Kvm {
                slot: r.slot,
                gpa,
                kib: len >> 10,
                source,
            })?;
            for b in &mut registered[s as usize..e as usize] {
                *b = false;
            }
            slots.remove(&s);
            self.registered_bytes.fetch_sub(len, Ordering::Relaxed);
            self.slots_used.fetch_sub(1, Ordering::Relaxed);
            self.slots_deleted.fetch_add(1, Ordering::Relaxed);
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Registers every range of `ranges` (as [`Registrar::register_range`]),
    /// merged first where they touch the same or adjacent blocks, so that
    /// the boot data and the kernel's segments take as few memslots as
    /// they can.
    pub fn register_ranges(&self, ranges: &[(u64, u64)]) -> Result<(), RegisterError> {
        let grain = self.grain;
        let mut blocks: Vec<(u64, u64)> =
            ranges.iter().filter(|(s, e)| e > s).map(|(s, e)| (s / grain, e.div_ceil(grain))).collect();
        blocks.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
        for (s, e) in blocks {
            match merged.last_mut() {
                Some(m) if s <= m.1 => m.1 = m.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        for (s, e) in merged {
            self.register_range(s * grain, e * grain)?;
        }
        Ok(())
    }

    /// Registers all guest RAM.
    pub fn register_all(&self) -> Result<(), RegisterError> {
        for r in self.mem.iter() {
            self.register_range(r.start_addr().0, r.start_addr().0 + r.len())?;
        }
        Ok(())
    }

    /// Bytes of guest RAM registered with KVM now.
    pub fn registered_bytes(&self) -> u64 {
        self.registered_bytes.load(Ordering::Relaxed)
    }

    /// The guest's `port::MEM_ONLINE` write for `gpa`: registers the run
    /// holding it (as [`Registrar::register_range`]) and counts the
    /// request ([`Registrar::online_requests`]), whether or not anything
    /// was left to register.
    pub fn online(&self, gpa: u64) -> Result<(), RegisterError> {
        self.online_requests.fetch_add(1, Ordering::Relaxed);
        self.register_range(gpa, gpa.saturating_add(1))
    }

    /// `port::MEM_ONLINE` writes served so far ([`Registrar::online`]).
    pub fn online_requests(&self) -> u64 {
        self.online_requests.load(Ordering::Relaxed)
    }

    /// The guest-physical ranges registered now, one per memslot, by
    /// address: what the builder lists for the guest in its
    /// `guest_abi::BootOnline` entry.
    pub fn registered_ranges(&self) -> Vec<(u64, u64)> {
        let grain = self.grain;
        let blocks = self.blocks();
        blocks
            .slots
            .iter()
            .filter_map(|(&s, &e)| {
                let gpa = s * grain;
                let region = self.mem.find_region(GuestAddress(gpa))?;
                Some((gpa, (e * grain).min(region.start_addr().0 + region.len())))
            })
            .collect()
    }

    /// Memory slots registered now.
    pub fn slots_used(&self) -> u64 {
        self.slots_used.load(Ordering::Relaxed)
    }

    /// Memory slots deleted so far because the guest gave their memory back.
    pub fn slots_deleted(&self) -> u64 {
        self.slots_deleted.load(Ordering::Relaxed)
    }

    /// Bytes per registration block (see [`grain_for`]).
    pub fn grain(&self) -> u64 {
        self.grain
    }
}

#[cfg(test)]
mod tests {
    use super::super::ram::create_ram;
    use super::*;

    const MIB: u64 = 1 << 20;
    const BLOCK: u64 = guest_abi::MEMORY_BLOCK_SIZE;
    /// `KVM_CAP_NR_MEMSLOTS` on the development hosts (x86 KVM_USER_MEM_SLOTS).
    const HOST_SLOTS: usize = 32764;

    fn kvm() -> kvm_ioctls::Kvm {
        kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm")
    }

    #[test]
    fn the_grain_is_the_guest_block_unless_the_slots_run_out() {
        assert_eq!(BLOCK, 2 * MIB, "one memmap chunk");
        assert_eq!(grain_for(2048 * MIB, HOST_SLOTS), BLOCK);
        assert_eq!(grain_for(1, HOST_SLOTS), BLOCK);
        // The largest VM: 63 GiB of RAM ends at 64 GiB (the gap below
        // 4 GiB), 32768 blocks of 2 MiB: one too many, so 4 MiB.
        let biggest = crate::arch::ram_ranges(api::MAX_MEM_SIZE_MIB << 20);
        let end = biggest.iter().map(|(a, l)| a.0 + l).max().unwrap();
        assert_eq!(grain_for(end, HOST_SLOTS), 2 * BLOCK);
        for slots in [1, 2, 8, 32, 33, 509, 4096, HOST_SLOTS] {
            let g = grain_for(end, slots);
            assert!(g.is_power_of_two() && g >= BLOCK, "{slots}: {g}");
            let blocks = end.div_ceil(g) as usize;
            assert!(blocks <= slots.saturating_sub(SLOT_MARGIN).max(slots / 2).max(1), "{slots} slots: {blocks} blocks");
            assert!(g == BLOCK || end.div_ceil(g / 2) as usize > blocks, "{slots}: not the smallest grain");
        }
    }

    #[test]
    fn blocks_are_registered_once_and_only_inside_ram() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        // 3.5 GiB: RAM to 3 GiB, the gap, then 512 MiB at 4 GiB.
        let mem = create_ram(&crate::arch::ram_ranges(3584 << 20), false).unwrap();
        let r = Registrar::new(vm, mem, HOST_SLOTS);
        assert_eq!(r.grain(), BLOCK);
        assert_eq!((r.registered_bytes(), r.slots_used()), (0, 0));
        r.register_range(0, 1).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (BLOCK, 1));
        r.register_range(4096, 8192).unwrap();
        assert_eq!(r.registered_bytes(), BLOCK, "already registered");
        r.register_range(BLOCK - 1, BLOCK + 1).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (2 * BLOCK, 2), "a range across a boundary takes both blocks");
        assert!(matches!(r.register_range(3 << 30, (3 << 30) + 1), Err(RegisterError::NotRam { .. })), "the gap");
        assert!(matches!(r.register_range(64 << 30, (64 << 30) + 1), Err(RegisterError::NotRam { .. })));
        r.register_all().unwrap();
        assert_eq!(r.registered_bytes(), 3584 << 20);
        // One slot for the rest below 3 GiB, one for the RAM at 4 GiB.
        assert_eq!(r.slots_used(), 4);
    }

    #[test]
    fn adjacent_boot_ranges_share_a_slot_and_later_blocks_get_their_own() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(2048 * MIB), false).unwrap();
        let r = Registrar::new(vm, mem, HOST_SLOTS);
        // Boot data at 0, a kernel from 1 MiB to 4.6 MiB: blocks 0..3, one slot.
        r.register_ranges(&[(0, 1), (MIB, MIB + 4096), (MIB + 8192, 4 * MIB + (600 << 10)), (5, 5)]).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (3 * BLOCK, 1));
        // What the guest onlines later gets slots of its own: at 100 MiB
        // the contract's run is 8 MiB (96..104 MiB).
        r.register_range(100 * MIB, 100 * MIB + 1).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (7 * BLOCK, 2));
        r.register_range(2 * MIB, 8 * MIB).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (8 * BLOCK, 3), "6..8 MiB is the only new block");
        // Apart ranges are not merged across what nobody asked for.
        r.register_ranges(&[(20 * MIB, 21 * MIB), (30 * MIB, 31 * MIB)]).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (10 * BLOCK, 5));
        r.register_all().unwrap();
        assert_eq!(r.registered_bytes(), 2048 * MIB);
    }

    #[test]
    fn registered_ranges_list_the_slots_and_onlining_them_again_is_counted_and_costs_nothing() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(3584 * MIB), false).unwrap();
        let r = Registrar::new(vm, mem, HOST_SLOTS);
        assert!(r.registered_ranges().is_empty());
        // The boot blocks and the 4 MiB run at 36 MiB; a run at 4 GiB (past the hole).
        r.register_ranges(&[(0, 1), (MIB, 5 * MIB), (36 * MIB, 38 * MIB), (4096 * MIB, 4096 * MIB + 1)]).unwrap();
        assert_eq!(r.registered_ranges(), vec![(0, 6 * MIB), (36 * MIB, 40 * MIB), (4096 * MIB, 4224 * MIB)]);
        let before = (r.registered_bytes(), r.slots_used());
        for gpa in [0, 5 * MIB, 36 * MIB, 39 * MIB] {
            r.online(gpa).unwrap();
        }
        assert_eq!((r.registered_bytes(), r.slots_used()), before, "all of it was registered");
        assert_eq!(r.online_requests(), 4);
        assert!(matches!(r.online(3 << 30), Err(RegisterError::NotRam { .. })), "the hole");
        assert_eq!(r.online_requests(), 5, "a bad request counts too");
    }

    #[test]
    fn an_offline_run_loses_its_slot_and_comes_back_when_onlined() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(2048 * MIB), false).unwrap();
        let r = Registrar::new(vm, mem, HOST_SLOTS);
        r.register_ranges(&[(0, 1), (MIB, 5 * MIB)]).unwrap();
        let boot = r.registered_bytes();
        // The run at 100 MiB (96..104 MiB), then offline.
        r.register_range(100 * MIB, 100 * MIB + 1).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (boot + 8 * MIB, 2));
        assert_eq!(r.unregister_run(96 * MIB, 8 * MIB).unwrap(), 1);
        assert_eq!((r.registered_bytes(), r.slots_used(), r.slots_deleted()), (boot, 1, 1));
        assert_eq!(r.unregister_run(96 * MIB, 8 * MIB).unwrap(), 0, "already gone");
        // Onlined again: a new slot (KVM accepts the number again).
        r.register_range(97 * MIB, 97 * MIB + 1).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (boot + 8 * MIB, 2));
        // The boot slot holds the kernel: giving back its last block keeps it.
        assert_eq!(r.unregister_run(4 * MIB, 2 * MIB).unwrap(), 0);
        assert_eq!(r.registered_bytes(), boot + 8 * MIB);
        // A run never registered, or outside RAM, changes nothing.
        assert_eq!(r.unregister_run(512 * MIB, 128 * MIB).unwrap(), 0);
        assert_eq!(r.unregister_run(u64::MAX - 10, 100).unwrap(), 0);
        assert_eq!(r.unregister_run(64 << 30, 128 * MIB).unwrap(), 0);
        assert_eq!(r.registered_bytes(), boot + 8 * MIB);
    }

    #[test]
    fn a_grain_block_larger_than_the_run_goes_when_all_its_runs_are_offline() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(256 * MIB), false).unwrap();
        // 64 slots: 8 MiB grain; the runs at 8..16 MiB are 2 MiB each.
        let r = Registrar::new(vm, mem, 64);
        assert_eq!(r.grain(), 8 * MIB);
        r.register_range(10 * MIB, 10 * MIB + 1).unwrap();
        assert_eq!(r.registered_bytes(), 8 * MIB);
        // The guest onlined only the run at 10 MiB: the other three runs of
        // the grain block are online for KVM but were never offline, so
        // giving back the one run keeps the slot.
        assert_eq!(r.unregister_run(10 * MIB, 2 * MIB).unwrap(), 0);
        assert_eq!(r.registered_bytes(), 8 * MIB);
        for run in [8, 12] {
            assert_eq!(r.unregister_run(run * MIB, 2 * MIB).unwrap(), 0, "{run} MiB");
        }
        // Onlining one again, then giving back the last: still one in use.
        r.register_range(12 * MIB, 12 * MIB + 1).unwrap();
        assert_eq!(r.unregister_run(14 * MIB, 2 * MIB).unwrap(), 0);
        assert_eq!(r.unregister_run(12 * MIB, 2 * MIB).unwrap(), 1, "all four runs offline");
        assert_eq!((r.registered_bytes(), r.slots_used()), (0, 0));
        // The 8 MiB run at 64 MiB is one grain block.
        r.register_range(64 * MIB, 64 * MIB + 1).unwrap();
        assert_eq!(r.registered_bytes(), 8 * MIB);
        assert_eq!(r.unregister_run(64 * MIB, 8 * MIB).unwrap(), 1);
        assert_eq!((r.registered_bytes(), r.slots_used()), (0, 0));
    }

    #[test]
    fn a_slot_is_deleted_only_once_all_its_blocks_are_offline() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(2048 * MIB), false).unwrap();
        let r = Registrar::new(vm, mem, HOST_SLOTS);
        // One slot over 20..24 MiB (two 2 MiB runs registered together).
        r.register_range(20 * MIB, 24 * MIB).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (4 * MIB, 1));
        assert_eq!(r.unregister_run(20 * MIB, 2 * MIB).unwrap(), 0, "half the slot is in use");
        // The guest onlines the first half again, then gives back the second.
        r.register_range(20 * MIB, 20 * MIB + 1).unwrap();
        assert_eq!(r.unregister_run(22 * MIB, 2 * MIB).unwrap(), 0, "the first half is online again");
        assert_eq!(r.unregister_run(20 * MIB, 2 * MIB).unwrap(), 1);
        assert_eq!((r.registered_bytes(), r.slots_used()), (0, 0));
    }

    #[test]
    fn few_slots_make_a_coarser_grain_that_still_covers_what_the_guest_onlines() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(256 * MIB), false).unwrap();
        // 64 slots, 48 usable: 256 MiB needs 8 MiB blocks (32 of them).
        let r = Registrar::new(vm, mem, 64);
        assert_eq!(r.grain(), 8 * MIB);
        // The guest onlines one 2 MiB block; the whole 8 MiB block holding it is registered.
        r.register_range(10 * MIB, 10 * MIB + 1).unwrap();
        assert_eq!((r.registered_bytes(), r.slots_used()), (8 * MIB, 1));
        r.register_range(14 * MIB, 14 * MIB + 1).unwrap();
        assert_eq!(r.slots_used(), 1, "the same grain block");
        r.register_all().unwrap();
        assert_eq!(r.registered_bytes(), 256 * MIB);
        assert_eq!(r.slots_used(), 3, "before, the block, after");
    }

    #[test]
    fn the_largest_vm_registers_all_its_ram_within_the_hosts_slots() {
        let kvm = kvm();
        let slots = kvm.get_nr_memslots();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(api::MAX_MEM_SIZE_MIB << 20), false).unwrap();
        let r = Registrar::new(vm, mem, slots);
        // KVM accepts only slot numbers below its limit, so registering
        // every block on its own (as a guest onlining its memory block by
        // block does) proves the grain fits this host.
        let mut gpa = 0;
        while gpa < 64 << 30 {
            if !(3 << 30..4 << 30).contains(&gpa) {
                r.register_range(gpa, gpa + 1).unwrap();
            }
            gpa += r.grain();
        }
        assert_eq!(r.registered_bytes(), api::MAX_MEM_SIZE_MIB << 20);
        let used = r.slots_used() as usize;
        assert!(used <= slots - SLOT_MARGIN.min(slots / 2), "{used} of {slots}");
    }

    #[test]
    fn vcpus_onlining_everything_and_nonsense_at_once_register_ram_once_within_the_slots() {
        // What `attack-mem-online` does from several vCPUs: every MiB up to
        // 6 GiB (RAM is 0..3 and 4..5 GiB), each thread starting elsewhere,
        // odd (misaligned) MiBs too; one block again and again; the top.
        let kvm = kvm();
        let slots = kvm.get_nr_memslots();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(4096 * MIB), false).unwrap();
        let r = Arc::new(Registrar::new(vm, mem, slots));
        let span: u64 = 6 << 10;
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut not_ram = 0;
                    for i in 0..span {
                        let gpa = ((i + t * span / 4) % span) << 20;
                        match r.register_range(gpa, gpa + 1) {
                            Ok(()) => {}
                            Err(RegisterError::NotRam { .. }) => not_ram += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    for _ in 0..10_000 {
                        r.register_range(0, 1).unwrap();
                    }
                    let top = u64::from(u32::MAX) << 20;
                    assert!(matches!(r.register_range(top, top + 1), Err(RegisterError::NotRam { .. })));
                    not_ram
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 2 << 10, "the hole and the GiB past RAM");
        }
        assert_eq!(r.registered_bytes(), 4096 * MIB, "all RAM, once");
        assert!(r.slots_used() as usize <= slots - SLOT_MARGIN, "{} slots of {slots}", r.slots_used());
    }

    #[test]
    fn a_guest_onlining_all_its_ram_block_by_block_takes_few_slots_and_little_extra() {
        let vm = Arc::new(kvm().create_vm().unwrap());
        let mem = create_ram(&crate::arch::ram_ranges(2048 * MIB), false).unwrap();
        let r = Registrar::new(vm, mem, HOST_SLOTS);
        let mut gpa = 0;
        while gpa < 2048 * MIB {
            r.register_range(gpa, gpa + 1).unwrap();
            let used = gpa + BLOCK;
            assert!(r.registered_bytes() >= used);
            assert!(r.registered_bytes() <= used + used / 3 + BLOCK, "{} registered for {used} used", r.registered_bytes());
            gpa += BLOCK;
        }
        assert_eq!(r.registered_bytes(), 2048 * MIB);
        assert!(r.slots_used() <= 64, "{} slots", r.slots_used());
    }
}
