//! Guest RAM: creation (anonymous, `MAP_NORESERVE`, 4 KiB host pages unless
//! huge pages are asked for), registration with KVM, and host-side residency
//! measurement with `mincore()`.
//!
//! Registration lives in [`Registrar`] alone: one memslot per 128 MiB block,
//! registered when the guest first needs the block. KVM allocates its
//! per-memslot metadata (about 2.2 MB per GiB on a PVM host) when a slot is
//! registered, so an idle guest that uses only its first block costs KVM the
//! metadata of 128 MiB, not of all its RAM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Host page size assumed by residency measurements.
const HOST_PAGE: u64 = 4096;

/// Errors creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {mib} MiB of guest RAM")]
    Map {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest-physical address {gpa:#x} is not guest RAM")]
    NotRam { gpa: u64 },
    #[error("KVM refused memory slot {slot} ({mib} MiB at {gpa:#x})")]
    Register {
        slot: u32,
        gpa: u64,
        mib: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps guest RAM for `ranges`; with `huge_pages` the host may back it with
/// transparent huge pages, otherwise it is kept at 4 KiB pages so residency
/// counts what the guest touched.
pub fn create_ram(ranges: &[(GuestAddress, u64)], huge_pages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let ranges: Vec<(GuestAddress, usize)> = ranges.iter().map(|(a, l)| (*a, *l as usize)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { mib: total >> 20, source })?;
    let advice = if huge_pages { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
    for region in mem.iter() {
        // SAFETY: the range is exactly one mapping owned by `mem`; madvise only
        // changes how the kernel backs it and cannot invalidate it. Failure
        // (e.g. a kernel without THP) leaves the default, which is harmless.
        unsafe {
            libc::madvise(region.as_ptr().cast(), region.len() as usize, advice);
        }
    }
    Ok(mem)
}

/// Registers guest RAM with KVM: the one place that does, in blocks of
/// [`guest_abi::MEMORY_BLOCK_SIZE`] (one memslot each, slot number = block
/// number). KVM allocates its per-memslot metadata when a slot is registered,
/// so blocks are registered when the guest first needs them (the guest's
/// `port::MEM_ONLINE`), not at boot. Any vCPU thread may call it.
pub struct Registrar {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    registered: Mutex<Vec<bool>>,
    registered_bytes: AtomicU64,
}

impl Registrar {
    /// A registrar for `mem` in `vm`, with nothing registered yet.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Registrar {
        let end = mem.iter().map(|r| r.start_addr().0 + r.len()).max().unwrap_or(0);
        let blocks = end.div_ceil(BLOCK) as usize;
        Registrar { vm, mem, registered: Mutex::new(vec![false; blocks]), registered_bytes: AtomicU64::new(0) }
    }

    /// Registers every block that overlaps `[start, end)` and is not yet
    /// registered. Parts outside guest RAM are an error.
    pub fn register_range(&self, start: u64, end: u64) -> Result<(), MemoryError> {
        if end <= start {
            return Ok(());
        }
        let mut done = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        for block in start / BLOCK..end.div_ceil(BLOCK) {
            let Some(slot_done) = done.get_mut(block as usize) else {
                return Err(MemoryError::NotRam { gpa: block * BLOCK });
            };
            if *slot_done {
                continue;
            }
            let gpa = block * BLOCK;
            let region = self.mem.find_region(GuestAddress(gpa)).ok_or(MemoryError::NotRam { gpa })?;
            let region_end = region.start_addr().0 + region.len();
            let len = (gpa + BLOCK).min(region_end) - gpa;
            let offset = gpa - region.start_addr().0;
            let r = kvm_userspace_memory_region {
                slot: block as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: len,
                // The block lies inside this one host mapping.
                userspace_addr: region.as_ptr() as u64 + offset,
            };
            // SAFETY: the host range is part of a live mapping owned by
            // `mem`, which the VM keeps alive as long as the VM fd exists.
            unsafe { self.vm.set_user_memory_region(r) }.map_err(|source| MemoryError::Register {
                slot: r.slot,
                gpa,
                mib: len >> 20,
                source,
            })?;
            *slot_done = true;
            self.registered_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Registers all guest RAM.
    pub fn register_all(&self) -> Result<(), MemoryError> {
        for r in self.mem.iter() {
            self.register_range(r.start_addr().0, r.start_addr().0 + r.len())?;
        }
        Ok(())
    }

    /// Bytes of guest RAM registered with KVM so far.
    pub fn registered_bytes(&self) -> u64 {
        self.registered_bytes.load(Ordering::Relaxed)
    }
}

const BLOCK: u64 = guest_abi::MEMORY_BLOCK_SIZE;

/// Bytes of `[gpa, gpa + len)` that are resident in host memory, by
/// `mincore()`; parts outside guest RAM count as not resident. `mincore()`
/// reports pages mapped in the VMM's page tables, which includes pages the
/// VMM itself only read (mapped to the shared zero page), so the VMM never
/// reads guest memory the guest has not written (the stats block and the
/// mailbox are written by the guest before it announces them).
pub fn resident_bytes(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> u64 {
    let start = gpa.0 & !(HOST_PAGE - 1);
    let Some(end) = gpa.0.checked_add(len) else { return 0 };
    let mut total = 0;
    for region in mem.iter() {
        let r_start = region.start_addr().0;
        let r_end = r_start + region.len();
        let lo = start.max(r_start);
        let hi = end.min(r_end);
        if lo >= hi {
            continue;
        }
        let hi = (hi + HOST_PAGE - 1).min(r_end);
        total += region_resident(region.as_ptr(), lo - r_start, hi - lo);
    }
    total
}

/// Bytes of all guest RAM resident in host memory.
pub fn ram_resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| region_resident(r.as_ptr(), 0, r.len())).sum()
}

fn region_resident(base: *mut u8, offset: u64, len: u64) -> u64 {
    const BATCH_PAGES: u64 = 64 * 1024;
    let mut vec = vec![0u8; BATCH_PAGES as usize];
    let mut resident = 0;
    let mut off = offset & !(HOST_PAGE - 1);
    let end = offset + len;
    while off < end {
        let chunk = (end - off).min(BATCH_PAGES * HOST_PAGE);
        let pages = chunk.div_ceil(HOST_PAGE);
        // SAFETY: `[base + off, base + off + chunk)` lies inside one live
        // mapping (callers clamp to the region); `vec` has room for one byte
        // per page of it. mincore only reads page-table state.
        let rc = unsafe { libc::mincore(base.add(off as usize).cast(), chunk as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            resident += vec[..pages as usize].iter().filter(|b| *b & 1 == 1).count() as u64 * HOST_PAGE;
        }
        off += chunk;
    }
    resident
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn fresh_ram_is_not_resident_and_writes_make_it_resident_page_by_page() {
        let mem = create_ram(&[(GuestAddress(0), 64 << 20)], false).unwrap();
        assert_eq!(ram_resident_bytes(&mem), 0);
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x30_0000)).unwrap();
        assert_eq!(ram_resident_bytes(&mem), 2 * HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0), 0x2000), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0x1fff), 2), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(0x2000), 0x10_0000), 0);
        // A host-side read of never-written memory maps the shared zero page,
        // which mincore() counts: the VMM must read only what the guest wrote.
        let _: u64 = mem.read_obj(GuestAddress(0x50_0000)).unwrap();
        assert_eq!(ram_resident_bytes(&mem), 3 * HOST_PAGE);
    }

    #[test]
    fn blocks_are_registered_once_and_only_inside_ram() {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        // 3.5 GiB: RAM to 3 GiB, the gap, then 512 MiB at 4 GiB; the last
        // block below 3 GiB is whole, the one at 4 GiB too.
        let mem = create_ram(&crate::arch::ram_ranges(3584 << 20), false).unwrap();
        let r = Registrar::new(vm, mem);
        assert_eq!(r.registered_bytes(), 0);
        r.register_range(0, 1).unwrap();
        assert_eq!(r.registered_bytes(), BLOCK);
        r.register_range(4096, 8192).unwrap();
        assert_eq!(r.registered_bytes(), BLOCK, "already registered");
        r.register_range(BLOCK - 1, BLOCK + 1).unwrap();
        assert_eq!(r.registered_bytes(), 2 * BLOCK, "a range across a boundary takes both blocks");
        assert!(matches!(r.register_range(3 << 30, (3 << 30) + 1), Err(MemoryError::NotRam { .. })), "the gap");
        assert!(matches!(r.register_range(64 << 30, (64 << 30) + 1), Err(MemoryError::NotRam { .. })));
        r.register_all().unwrap();
        assert_eq!(r.registered_bytes(), 3584 << 20);
    }

    #[test]
    fn ranges_outside_ram_count_nothing_and_never_fault() {
        let mem = create_ram(&[(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)], false).unwrap();
        mem.write_obj(1u8, GuestAddress(4 << 20)).unwrap();
        assert_eq!(resident_bytes(&mem, GuestAddress(0), 8 << 20), HOST_PAGE);
        assert_eq!(resident_bytes(&mem, GuestAddress(2 << 20), 1 << 20), 0);
        assert_eq!(resident_bytes(&mem, GuestAddress(u64::MAX - 10), 100), 0);
    }
}
