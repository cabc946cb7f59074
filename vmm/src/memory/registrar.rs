//! Registering guest RAM with KVM: the one place that does, in blocks of
//! [`guest_abi::MEMORY_BLOCK_SIZE`] (one memslot each, slot number = block
//! number). Blocks are registered when the guest first needs them (its
//! `port::MEM_ONLINE`), not at boot. Any vCPU thread may call it.

use super::ram::ram_end;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Size of one registration block.
const BLOCK: u64 = guest_abi::MEMORY_BLOCK_SIZE;

/// Why a block could not be registered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegisterError {
    /// The address is not guest RAM (the guest's mistake).
    #[error("guest-physical address {gpa:#x} is not guest RAM")]
    NotRam { gpa: u64 },
    /// KVM refused the slot (the host's failure).
    #[error("KVM refused memory slot {slot} ({mib} MiB at {gpa:#x})")]
    Kvm {
        slot: u32,
        gpa: u64,
        mib: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Registers guest RAM with KVM, block by block.
pub struct Registrar {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    registered: Mutex<Vec<bool>>,
    registered_bytes: AtomicU64,
}

impl Registrar {
    /// A registrar for `mem` in `vm`, with nothing registered yet.
    pub fn new(vm: Arc<VmFd>, mem: GuestMemoryMmap) -> Registrar {
        let blocks = ram_end(&mem).div_ceil(BLOCK) as usize;
        Registrar { vm, mem, registered: Mutex::new(vec![false; blocks]), registered_bytes: AtomicU64::new(0) }
    }

    /// Registers every block that overlaps `[start, end)` and is not yet
    /// registered. Parts outside guest RAM are an error.
    pub fn register_range(&self, start: u64, end: u64) -> Result<(), RegisterError> {
        if end <= start {
            return Ok(());
        }
        let mut done = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        for block in start / BLOCK..end.div_ceil(BLOCK) {
            let Some(slot_done) = done.get_mut(block as usize) else {
                return Err(RegisterError::NotRam { gpa: block * BLOCK });
            };
            if *slot_done {
                continue;
            }
            let gpa = block * BLOCK;
            let region = self.mem.find_region(GuestAddress(gpa)).ok_or(RegisterError::NotRam { gpa })?;
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
            unsafe { self.vm.set_user_memory_region(r) }.map_err(|source| RegisterError::Kvm {
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
    pub fn register_all(&self) -> Result<(), RegisterError> {
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

#[cfg(test)]
mod tests {
    use super::super::ram::create_ram;
    use super::*;

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
        assert!(matches!(r.register_range(3 << 30, (3 << 30) + 1), Err(RegisterError::NotRam { .. })), "the gap");
        assert!(matches!(r.register_range(64 << 30, (64 << 30) + 1), Err(RegisterError::NotRam { .. })));
        r.register_all().unwrap();
        assert_eq!(r.registered_bytes(), 3584 << 20);
    }
}
