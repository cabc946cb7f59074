//! The guest's own report: its stats block, read from untrusted guest memory
//! and validated.
//!
//! The block is read only through `vm-memory` (bounds-checked, copied out,
//! never referenced), under the guest's sequence counter, and every field is
//! checked for consistency with the others and with the VM's real size.
//! Anything wrong is a [`GuestReportError`] with the reason; nothing here
//! panics or reads outside guest RAM.

use crate::memory;
use guest_abi::{stats_flags, GpaRange, StatsBlock, Strategy, ABI_VERSION, MAX_MEMMAP_RANGES, PAGE_SIZE, STATS_MAGIC};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Attempts at a consistent (untorn) snapshot before giving up.
const SNAPSHOT_TRIES: usize = 64;

/// Why a guest report cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestReportError {
    #[error("the guest has not announced a stats block")]
    NotAnnounced,
    #[error("the stats block address {0:#x} is outside guest RAM")]
    OutOfRam(u64),
    #[error("the stats block kept changing while it was read (torn snapshot)")]
    Torn,
    #[error("the stats block has magic {0:#x}, not {STATS_MAGIC:#x}")]
    BadMagic(u32),
    #[error("the stats block is ABI version {0}; this VMM speaks version {ABI_VERSION}")]
    BadVersion(u32),
    #[error("the stats block names unknown strategy {0}")]
    BadStrategy(u32),
    #[error("the stats block is inconsistent: {0}")]
    Inconsistent(String),
}

/// Whether `[start, start + len)` lies inside one region of guest RAM.
pub fn range_in_ram(mem: &GuestMemoryMmap, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else { return false };
    mem.find_region(GuestAddress(start))
        .is_some_and(|r| end <= r.start_addr().0 + r.len())
}

/// Reads the stats block at `gpa` as a consistent snapshot.
pub fn read_snapshot(mem: &GuestMemoryMmap, gpa: GuestAddress) -> Result<StatsBlock, GuestReportError> {
    let size = core::mem::size_of::<StatsBlock>() as u64;
    if !range_in_ram(mem, gpa.0, size) {
        return Err(GuestReportError::OutOfRam(gpa.0));
    }
    let seq_addr = GuestAddress(gpa.0 + core::mem::offset_of!(StatsBlock, seq) as u64);
    for _ in 0..SNAPSHOT_TRIES {
        let block: StatsBlock = mem.read_obj(gpa).map_err(|_| GuestReportError::OutOfRam(gpa.0))?;
        let seq_after: u64 = mem.read_obj(seq_addr).map_err(|_| GuestReportError::OutOfRam(gpa.0))?;
        if block.seq.is_multiple_of(2) && block.seq == seq_after {
            return Ok(block);
        }
        std::thread::yield_now();
    }
    Err(GuestReportError::Torn)
}

/// Checks a snapshot against itself and against the VM (`ram_bytes` of guest
/// RAM, `vcpus` vCPUs). Returns the strategy it names.
pub fn validate(b: &StatsBlock, mem: &GuestMemoryMmap, vcpus: u8) -> Result<Strategy, GuestReportError> {
    use GuestReportError::Inconsistent as Bad;
    if b.magic != STATS_MAGIC {
        return Err(GuestReportError::BadMagic(b.magic));
    }
    if b.abi_version != ABI_VERSION {
        return Err(GuestReportError::BadVersion(b.abi_version));
    }
    let strategy = Strategy::decode(b.strategy).ok_or(GuestReportError::BadStrategy(b.strategy))?;
    if guest_abi::Reclaim::decode(b.reclaim).is_none() {
        return Err(Bad(format!("unknown reclaim mode {}", b.reclaim)));
    }
    let known = stats_flags::GROW_CHECK_ON
        | stats_flags::MEMMAP_ON_MEMORY
        | stats_flags::FULLY_INITIALIZED
        | stats_flags::JUMP_SITES_PATCHED
        | stats_flags::RING3_ENTRY;
    if b.flags & stats_flags::TEST_CORRUPT != 0 {
        return Err(Bad("the guest marked it as test garbage".into()));
    }
    if b.flags & !known != 0 {
        return Err(Bad(format!("unknown flag bits {:#x}", b.flags & !known)));
    }
    let ram_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    let ram_pages = ram_bytes / PAGE_SIZE;
    let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(Bad(what.to_string())) };
    check(b.total_pages <= ram_pages, "more pages than the VM has RAM")?;
    check(b.initialized_pages <= b.total_pages, "more pages initialized than exist")?;
    let accounted = b.allocated_pages.checked_add(b.free_pages).and_then(|x| x.checked_add(b.reserved_pages));
    check(accounted.is_some_and(|a| a <= b.total_pages), "allocated + free + reserved pages exceed the total")?;
    check(b.free_pages <= b.initialized_pages, "more pages free than initialized")?;
    let chunk_ok = b.chunk_bytes.is_power_of_two()
        && (guest_abi::MIN_CHUNK_SIZE..=b.section_bytes.max(guest_abi::MIN_CHUNK_SIZE)).contains(&b.chunk_bytes);
    check(chunk_ok, "chunk size is not a power of two within the allowed range")?;
    check(b.section_bytes.is_power_of_two() && b.section_bytes <= 1 << 30, "section size is not a power of two up to 1 GiB")?;
    check(b.chunks_initialized <= b.chunks_total, "more chunks initialized than exist")?;
    check(b.chunks_total <= ram_bytes.div_ceil(guest_abi::MIN_CHUNK_SIZE) + 1024, "absurd chunk count")?;
    let max_memmap = ram_pages * guest_abi::STRUCT_PAGE_SIZE + 1024 * PAGE_SIZE;
    check(b.memmap_bytes_reserved <= max_memmap, "more memmap reserved than RAM needs")?;
    check(b.memmap_bytes_initialized <= b.memmap_bytes_reserved, "more memmap initialized than reserved")?;
    check(
        b.memmap_bytes_initialized <= b.initialized_pages.saturating_add(ram_pages).saturating_mul(guest_abi::STRUCT_PAGE_SIZE),
        "memmap initialized bytes do not match initialized pages",
    )?;
    check(b.cpus <= u32::from(vcpus), "more CPUs than the VM has")?;
    check(b.memmap_range_count as usize <= MAX_MEMMAP_RANGES, "too many memmap ranges")?;
    let mut ranges: Vec<GpaRange> = memmap_ranges(b).filter(|r| r.len != 0).collect();
    let mut range_bytes = 0u64;
    for r in &ranges {
        check(range_in_ram(mem, r.start, r.len), "a memmap range lies outside guest RAM")?;
        range_bytes = range_bytes.saturating_add(r.len);
    }
    check(range_bytes <= max_memmap, "memmap ranges are larger than RAM needs")?;
    // In RAM, so `start + len` cannot overflow.
    ranges.sort_unstable_by_key(|r| r.start);
    check(ranges.windows(2).all(|w| w[0].start + w[0].len <= w[1].start), "memmap ranges overlap")?;
    Ok(strategy)
}

/// The memmap ranges a (validated) block lists.
pub fn memmap_ranges(b: &StatsBlock) -> impl Iterator<Item = GpaRange> + '_ {
    b.memmap_ranges.iter().take((b.memmap_range_count as usize).min(MAX_MEMMAP_RANGES)).copied()
}

/// Bytes of the memmap ranges resident in host memory.
pub fn memmap_resident(mem: &GuestMemoryMmap, b: &StatsBlock) -> u64 {
    memmap_ranges(b).map(|r| memory::resident_bytes(mem, GuestAddress(r.start), r.len)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn good() -> StatsBlock {
        let mut b = StatsBlock {
            magic: STATS_MAGIC,
            abi_version: ABI_VERSION,
            seq: 4,
            strategy: Strategy::OnDemand as u32,
            flags: stats_flags::GROW_CHECK_ON,
            chunk_bytes: 2 << 20,
            section_bytes: 128 << 20,
            total_pages: 16384,
            initialized_pages: 512,
            allocated_pages: 10,
            free_pages: 400,
            reserved_pages: 700,
            memmap_bytes_reserved: 1 << 20,
            memmap_bytes_initialized: 32 << 10,
            chunks_total: 32,
            chunks_initialized: 1,
            cpus: 1,
            memmap_range_count: 1,
            ..Default::default()
        };
        b.memmap_ranges[0] = GpaRange { start: 0x20_0000, len: 1 << 20 };
        b
    }

    #[test]
    fn a_good_block_validates_and_round_trips_through_guest_memory() {
        let mem = ram();
        mem.write_obj(good(), GuestAddress(0x1000)).unwrap();
        let b = read_snapshot(&mem, GuestAddress(0x1000)).unwrap();
        assert_eq!(validate(&b, &mem, 1), Ok(Strategy::OnDemand));
    }

    #[test]
    fn addresses_outside_ram_are_refused_without_reading() {
        let mem = ram();
        for gpa in [64 << 20, (64 << 20) - 100, u64::MAX - 10, u64::MAX] {
            assert_eq!(read_snapshot(&mem, GuestAddress(gpa)), Err(GuestReportError::OutOfRam(gpa)));
        }
    }

    #[test]
    fn ranges_must_fit_in_one_region() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)]).unwrap();
        assert!(range_in_ram(&mem, 0, 1 << 20));
        assert!(!range_in_ram(&mem, 4096, 1 << 20), "spans two regions");
        assert!(!range_in_ram(&mem, 2 << 20, 1));
        assert!(!range_in_ram(&mem, u64::MAX, 2));
    }

    #[test]
    fn an_odd_sequence_is_a_torn_snapshot() {
        let mem = ram();
        mem.write_obj(StatsBlock { seq: 5, ..good() }, GuestAddress(0)).unwrap();
        assert_eq!(read_snapshot(&mem, GuestAddress(0)), Err(GuestReportError::Torn));
    }

    #[test]
    fn every_kind_of_garbage_is_refused_with_a_reason() {
        let mem = ram();
        let cases: Vec<(StatsBlock, &str)> = vec![
            (StatsBlock { magic: 1, ..good() }, "magic"),
            (StatsBlock { abi_version: 9, ..good() }, "version"),
            (StatsBlock { strategy: 7, ..good() }, "strategy"),
            (StatsBlock { flags: u32::MAX, ..good() }, "garbage"),
            (StatsBlock { flags: 1 << 9, ..good() }, "unknown flag"),
            (StatsBlock { total_pages: u64::MAX, ..good() }, "more pages than"),
            (StatsBlock { initialized_pages: 1 << 40, ..good() }, "initialized than exist"),
            (StatsBlock { allocated_pages: u64::MAX, ..good() }, "exceed"),
            (StatsBlock { free_pages: 600, ..good() }, "free than initialized"),
            (StatsBlock { chunk_bytes: 3 << 20, ..good() }, "chunk size"),
            (StatsBlock { memmap_bytes_initialized: 2 << 20, ..good() }, "initialized than reserved"),
            (StatsBlock { memmap_bytes_reserved: 1 << 40, ..good() }, "reserved than RAM"),
            (StatsBlock { cpus: 4, ..good() }, "CPUs"),
            (StatsBlock { memmap_range_count: u32::MAX, ..good() }, "ranges"),
            (StatsBlock { chunks_initialized: 99, ..good() }, "chunks"),
            (StatsBlock { reclaim: 3, ..good() }, "reclaim mode"),
        ];
        for (b, needle) in cases {
            let e = validate(&b, &mem, 1).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        }
        let mut b = good();
        b.memmap_ranges[0] = GpaRange { start: 63 << 20, len: 2 << 20 };
        assert!(validate(&b, &mem, 1).unwrap_err().to_string().contains("outside guest RAM"));
        b.memmap_ranges[0] = GpaRange { start: u64::MAX - 5, len: 10 };
        assert!(validate(&b, &mem, 1).is_err());
        // The same range twice, or two that overlap, would count memory twice.
        let mut b = good();
        b.memmap_range_count = 2;
        b.memmap_ranges[1] = b.memmap_ranges[0];
        assert!(validate(&b, &mem, 1).unwrap_err().to_string().contains("overlap"));
        b.memmap_ranges[1] = GpaRange { start: 0x20_0000 + 4096, len: 4096 };
        assert!(validate(&b, &mem, 1).unwrap_err().to_string().contains("overlap"));
        b.memmap_ranges[1] = GpaRange { start: 0x30_0000, len: 4096 };
        assert!(validate(&b, &mem, 1).is_ok(), "adjacent ranges are fine");
    }

    #[test]
    fn random_blocks_never_panic() {
        let mem = ram();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut bytes = [0u8; core::mem::size_of::<StatsBlock>()];
            for b in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            mem.write_slice(&bytes, GuestAddress(0x4000)).unwrap();
            if let Ok(b) = read_snapshot(&mem, GuestAddress(0x4000)) {
                let _ = validate(&b, &mem, 2);
                let _ = memmap_resident(&mem, &b);
            }
        }
    }
}
