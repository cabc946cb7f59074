//! Memory the guest gives back (`port::RECLAIM`): checking every range it
//! reports against what the VMM knows of the VM ([`check_record`], a pure
//! function), and discarding the accepted ones from the host ([`discard`]).
//!
//! A range is accepted only if it is, by kind (`guest_abi::reclaim_kind`):
//! - `DATA`: whole chunks (the stats block's `chunk_bytes`), chunk-aligned;
//! - `MEMMAP`: whole pages inside one of the stats block's memmap ranges;
//! - `OFFLINE`: exactly one [`guest_abi::online_run`], aligned to it;
//!
//! and in every case inside one region of guest RAM, disjoint from the
//! record's earlier accepted ranges, allowed by the VM's reclaim mode, and
//! outside the kernel image and the boot data; `DATA` also outside the
//! memmap. An `OFFLINE` run may hold memmap pages: the guest takes a run
//! offline once its memmap describes only uninitialized chunks, so that the
//! memslot of a run that held only memmap goes too (`MEMMAP` may discard
//! any memmap page already, so this gives a guest nothing more). So a guest
//! whose report is bogus can at most discard its own memory, which then
//! reads as zeros: never the kernel the VMM loaded or the boot data; and
//! its own metadata only where it says that metadata is unused.
//!
//! What is counted ([`ReclaimStats`]): a range accepted adds its length to
//! `accepted_bytes` (what the guest reported), but the discarded bytes of its
//! kind grow only by what the host had resident in it just before the
//! discard ([`discard`] asks `mincore()` first). So a guest that reports the
//! same memory again and again, or memory it never touched, makes
//! `accepted_bytes` grow and the discarded figures not: those count only
//! what the host really released. One caveat of `mincore()`: a page the
//! guest only read since its last discard is mapped to the host's shared
//! zero page, which `mincore()` counts, so it counts again when reported
//! again; the guest pays a page fault for each such page, and the host
//! released a page-table entry for it.

use super::residency;
use guest_abi::{reclaim_kind, GpaRange, Reclaim, ReclaimRange, PAGE_SIZE};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// What the VMM itself knows about the VM, fixed at build time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimPolicy {
    /// The VM's reclaim mode: which kinds are allowed.
    pub mode: Reclaim,
    /// Regions of guest RAM, `[start, end)`.
    pub ram: Vec<(u64, u64)>,
    /// Ranges no report may touch, `[start, end)`: the kernel's segments and
    /// the boot data.
    pub protected: Vec<(u64, u64)>,
}

impl ReclaimPolicy {
    /// The policy for `mem` in `mode`, protecting `protected` (`[start, end)`).
    pub fn new(mode: Reclaim, mem: &GuestMemoryMmap, protected: Vec<(u64, u64)>) -> ReclaimPolicy {
        let ram = mem.iter().map(|r| (r.start_addr().0, r.start_addr().0 + r.len())).collect();
        ReclaimPolicy { mode, ram, protected }
    }
}

/// What the guest's (validated) stats block says, read at the report.
#[derive(Debug, Clone, Copy)]
pub struct GuestLayout<'a> {
    /// Memory per memmap chunk (a power of two of at least one page).
    pub chunk_bytes: u64,
    /// Where the memmap lives.
    pub memmap: &'a [GpaRange],
}

/// What the VMM did with the guest's reports, for the memory report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReclaimStats {
    /// Reports (`port::RECLAIM` writes) the guest made.
    pub events: u64,
    /// Ranges accepted and discarded.
    pub ranges_accepted: u64,
    /// Ranges (or whole records) rejected.
    pub ranges_rejected: u64,
    /// Bytes of the ranges accepted, as the guest reported them, all kinds
    /// together. A range reported twice (in two records) counts twice here,
    /// as it does in the guest's own count; the guest's count never exceeds
    /// this one.
    pub accepted_bytes: u64,
    /// Bytes of accepted `DATA` ranges that the host had resident and
    /// released (at most their length, 0 for memory already discarded).
    pub data_bytes: u64,
    /// Bytes of accepted `MEMMAP` ranges that the host had resident and
    /// released.
    pub memmap_bytes: u64,
    /// Bytes of accepted `OFFLINE` runs that the host had resident and
    /// released (their memslots are deleted once all their memory is
    /// offline).
    pub offline_bytes: u64,
    /// Why the first rejected range or record was rejected: the guest's
    /// report is not to be trusted from then on.
    pub first_rejection: Option<String>,
    /// The registrar's figures, read under the same lock as the counters
    /// above: a report taken while the VMM works through a record then never
    /// shows the record's discards without its unregistrations (`GET
    /// /memory` read the registered bytes first, and showed them lagging).
    /// `None` when no registrar tracks the VM.
    pub kvm: Option<KvmRegistration>,
}

/// Guest RAM registered with KVM, and memslots deleted, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvmRegistration {
    /// Bytes of guest RAM registered now.
    pub registered_bytes: u64,
    /// Memslots deleted so far because the guest took their memory offline.
    pub memslots_deleted: u64,
}

impl ReclaimStats {
    /// Bytes the host had resident and released, all kinds together: never
    /// more than [`ReclaimStats::accepted_bytes`].
    pub fn discarded_bytes(&self) -> u64 {
        self.data_bytes.saturating_add(self.memmap_bytes).saturating_add(self.offline_bytes)
    }
}

/// Why one range of a report was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("unknown kind {0}")]
    UnknownKind(u32),
    #[error("kind {kind} is not allowed with reclaim={mode}")]
    NotAllowed { kind: &'static str, mode: Reclaim },
    #[error("the reserved field is not zero")]
    Reserved,
    #[error("it is empty")]
    Empty,
    #[error("it is not inside one region of guest RAM")]
    NotRam,
    #[error("it is not made of whole, aligned units of {0} bytes")]
    Misaligned(u64),
    #[error("it is not exactly one online run ({0} bytes, aligned)")]
    NotARun(u64),
    #[error("it overlaps the memmap")]
    Memmap,
    #[error("it is not inside one memmap range")]
    NotMemmap,
    #[error("it overlaps the kernel image or the boot data")]
    Protected,
    #[error("it overlaps an earlier range of the same report")]
    Overlap,
}

/// The name of a reclaim kind, for messages.
pub fn kind_name(kind: u32) -> &'static str {
    match kind {
        reclaim_kind::DATA => "data",
        reclaim_kind::MEMMAP => "memmap",
        reclaim_kind::OFFLINE => "offline",
        _ => "unknown",
    }
}

/// Whether `[a0, a1)` and `[b0, b1)` share a byte.
fn overlaps(a0: u64, a1: u64, b0: u64, b1: u64) -> bool {
    a0 < b1 && b0 < a1
}

/// Checks one range on its own (not against the record's others).
pub fn check_range(r: &ReclaimRange, policy: &ReclaimPolicy, guest: &GuestLayout<'_>) -> Result<(), RangeError> {
    let name = kind_name(r.kind);
    let allowed = match r.kind {
        reclaim_kind::DATA => policy.mode != Reclaim::Off,
        reclaim_kind::MEMMAP | reclaim_kind::OFFLINE => policy.mode == Reclaim::Full,
        other => return Err(RangeError::UnknownKind(other)),
    };
    if !allowed {
        return Err(RangeError::NotAllowed { kind: name, mode: policy.mode });
    }
    if r.reserved != 0 {
        return Err(RangeError::Reserved);
    }
    if r.len == 0 {
        return Err(RangeError::Empty);
    }
    let (start, end) = (r.start, r.start.checked_add(r.len).ok_or(RangeError::NotRam)?);
    if !policy.ram.iter().any(|&(s, e)| start >= s && end <= e) {
        return Err(RangeError::NotRam);
    }
    let in_memmap = |s: u64, e: u64| guest.memmap.iter().any(|m| overlaps(s, e, m.start, m.start.saturating_add(m.len)));
    match r.kind {
        reclaim_kind::MEMMAP => {
            if !start.is_multiple_of(PAGE_SIZE) || !r.len.is_multiple_of(PAGE_SIZE) {
                return Err(RangeError::Misaligned(PAGE_SIZE));
            }
            let inside = guest.memmap.iter().any(|m| start >= m.start && end <= m.start.saturating_add(m.len));
            if !inside {
                return Err(RangeError::NotMemmap);
            }
        }
        kind => {
            if kind == reclaim_kind::DATA {
                let chunk = guest.chunk_bytes;
                if !chunk.is_power_of_two() || chunk < PAGE_SIZE || !start.is_multiple_of(chunk) || !r.len.is_multiple_of(chunk) {
                    return Err(RangeError::Misaligned(chunk));
                }
                if in_memmap(start, end) {
                    return Err(RangeError::Memmap);
                }
            } else {
                let run = guest_abi::online_run(start);
                if !start.is_multiple_of(run) || r.len != run {
                    return Err(RangeError::NotARun(run));
                }
            }
        }
    }
    if policy.protected.iter().any(|&(s, e)| overlaps(start, end, s, e)) {
        return Err(RangeError::Protected);
    }
    Ok(())
}

/// Checks every range of a report: each on its own ([`check_range`]) and
/// against the earlier ones accepted (a range overlapping one of them is
/// rejected). One verdict per range, in order.
pub fn check_record(
    ranges: &[ReclaimRange],
    policy: &ReclaimPolicy,
    guest: &GuestLayout<'_>,
) -> Vec<Result<(), RangeError>> {
    let mut accepted: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    ranges
        .iter()
        .map(|r| {
            check_range(r, policy, guest)?;
            // In RAM, so `start + len` does not overflow.
            let (s, e) = (r.start, r.start + r.len);
            if accepted.iter().any(|&(a, b)| overlaps(s, e, a, b)) {
                return Err(RangeError::Overlap);
            }
            accepted.push((s, e));
            Ok(())
        })
        .collect()
}

/// Why a range could not be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{len:#x} bytes at {gpa:#x} are not inside one region of guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("madvise(MADV_DONTNEED) failed for {len:#x} bytes at {gpa:#x}")]
    Madvise {
        gpa: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Gives `[gpa, gpa + len)` back to the host: `MADV_DONTNEED` on the
/// anonymous private mapping that backs it, found through vm-memory. The
/// guest reads zeros there afterwards, and the host backs a page again only
/// when the guest writes it. The range must lie inside one region and be
/// page-aligned. Returns the bytes of it that were resident (`mincore()`)
/// just before: what the host released. That check costs one byte of
/// `mincore()` vector per page, in batches, about what the discard itself
/// costs in page-table walking, so a record's cost stays bounded by the
/// size of guest RAM.
pub fn discard(mem: &GuestMemoryMmap, gpa: GuestAddress, len: u64) -> Result<u64, DiscardError> {
    let not_ram = || DiscardError::NotRam { gpa: gpa.0, len };
    if !gpa.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(not_ram());
    }
    let region = mem.find_region(gpa).ok_or_else(not_ram)?;
    let offset = gpa.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(not_ram());
    }
    let resident = residency::resident_bytes(mem, gpa, len);
    // SAFETY: `[as_ptr + offset, + len)` lies inside one live anonymous
    // private mapping owned by `mem` (checked just above). MADV_DONTNEED
    // only drops its pages, which then read as zero; it cannot unmap or
    // move the mapping, and no Rust reference into guest memory exists.
    let rc = unsafe { libc::madvise(region.as_ptr().add(offset as usize).cast(), len as usize, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(DiscardError::Madvise { gpa: gpa.0, len, source: std::io::Error::last_os_error() });
    }
    Ok(resident)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const CHUNK: u64 = 2 * MIB;
    const MEMMAP: [GpaRange; 1] = [GpaRange { start: 6 * MIB, len: 2 * MIB }];

    /// 256 MiB of RAM, the kernel at 1..5 MiB, the memmap at 6..8 MiB.
    fn policy(mode: Reclaim) -> ReclaimPolicy {
        ReclaimPolicy { mode, ram: vec![(0, 256 * MIB)], protected: vec![(0, MIB), (MIB, 5 * MIB)] }
    }

    fn guest() -> GuestLayout<'static> {
        GuestLayout { chunk_bytes: CHUNK, memmap: &MEMMAP }
    }

    fn range(kind: u32, start: u64, len: u64) -> ReclaimRange {
        ReclaimRange { start, len, kind, reserved: 0 }
    }

    fn check(mode: Reclaim, r: ReclaimRange) -> Result<(), RangeError> {
        check_range(&r, &policy(mode), &guest())
    }

    #[test]
    fn good_ranges_of_each_kind_are_accepted() {
        assert_eq!(check(Reclaim::Data, range(reclaim_kind::DATA, 10 * MIB, 4 * MIB)), Ok(()));
        assert_eq!(check(Reclaim::Full, range(reclaim_kind::DATA, 254 * MIB, 2 * MIB)), Ok(()));
        assert_eq!(check(Reclaim::Full, range(reclaim_kind::MEMMAP, 6 * MIB + 8192, 4096)), Ok(()));
        // At 100 MiB the run is 8 MiB: 96..104 MiB.
        assert_eq!(check(Reclaim::Full, range(reclaim_kind::OFFLINE, 96 * MIB, 8 * MIB)), Ok(()));
        assert_eq!(check(Reclaim::Full, range(reclaim_kind::OFFLINE, 8 * MIB, 2 * MIB)), Ok(()));
        // A run of the memmap (the guest says it describes only uninitialized chunks).
        assert_eq!(check(Reclaim::Full, range(reclaim_kind::OFFLINE, 6 * MIB, 2 * MIB)), Ok(()));
    }

    #[test]
    fn each_rule_rejects_with_its_reason() {
        use RangeError::*;
        let cases = [
            (Reclaim::Off, range(reclaim_kind::DATA, 10 * MIB, CHUNK), NotAllowed { kind: "data", mode: Reclaim::Off }),
            (Reclaim::Data, range(reclaim_kind::MEMMAP, 6 * MIB, 4096), NotAllowed { kind: "memmap", mode: Reclaim::Data }),
            (Reclaim::Data, range(reclaim_kind::OFFLINE, 8 * MIB, CHUNK), NotAllowed { kind: "offline", mode: Reclaim::Data }),
            (Reclaim::Full, range(9, 10 * MIB, CHUNK), UnknownKind(9)),
            (Reclaim::Full, ReclaimRange { reserved: 1, ..range(reclaim_kind::DATA, 10 * MIB, CHUNK) }, Reserved),
            (Reclaim::Full, range(reclaim_kind::DATA, 10 * MIB, 0), Empty),
            (Reclaim::Full, range(reclaim_kind::DATA, 256 * MIB, CHUNK), NotRam),
            (Reclaim::Full, range(reclaim_kind::DATA, 254 * MIB, 2 * CHUNK), NotRam),
            (Reclaim::Full, range(reclaim_kind::DATA, u64::MAX - 4095, 8192), NotRam),
            (Reclaim::Full, range(reclaim_kind::DATA, 10 * MIB + 4096, CHUNK), Misaligned(CHUNK)),
            (Reclaim::Full, range(reclaim_kind::DATA, 10 * MIB, CHUNK / 2), Misaligned(CHUNK)),
            (Reclaim::Full, range(reclaim_kind::DATA, 6 * MIB, CHUNK), Memmap),
            (Reclaim::Full, range(reclaim_kind::DATA, 4 * MIB, CHUNK), Protected),
            (Reclaim::Full, range(reclaim_kind::DATA, 0, CHUNK), Protected),
            (Reclaim::Full, range(reclaim_kind::MEMMAP, 6 * MIB + 1, 4096), Misaligned(PAGE_SIZE)),
            (Reclaim::Full, range(reclaim_kind::MEMMAP, 7 * MIB, 2 * MIB), NotMemmap),
            (Reclaim::Full, range(reclaim_kind::MEMMAP, 20 * MIB, 4096), NotMemmap),
            (Reclaim::Full, range(reclaim_kind::OFFLINE, 96 * MIB, 4 * MIB), NotARun(8 * MIB)),
            (Reclaim::Full, range(reclaim_kind::OFFLINE, 100 * MIB, 8 * MIB), NotARun(8 * MIB)),
            (Reclaim::Full, range(reclaim_kind::OFFLINE, 2 * MIB, CHUNK), Protected),
        ];
        for (mode, r, want) in cases {
            assert_eq!(check(mode, r), Err(want), "{r:?} under {mode}");
        }
    }

    #[test]
    fn overlapping_ranges_of_one_record_keep_only_the_first() {
        let rs = [
            range(reclaim_kind::DATA, 10 * MIB, 4 * MIB),
            range(reclaim_kind::DATA, 12 * MIB, 2 * MIB),
            range(reclaim_kind::DATA, 4 * MIB, CHUNK),
            range(reclaim_kind::DATA, 14 * MIB, 2 * MIB),
        ];
        let v = check_record(&rs, &policy(Reclaim::Data), &guest());
        assert_eq!(v, vec![Ok(()), Err(RangeError::Overlap), Err(RangeError::Protected), Ok(())]);
    }

    #[test]
    fn a_discarded_range_reads_zero_and_leaves_the_host() {
        let mem = super::super::ram::create_ram(&[(GuestAddress(0), 8 * MIB)], false).unwrap();
        for page in 0..512u64 {
            mem.write_obj(0xabu8, GuestAddress(2 * MIB + page * PAGE_SIZE)).unwrap();
        }
        mem.write_obj(0xcdu8, GuestAddress(4 * MIB)).unwrap();
        assert_eq!(super::super::ram_resident_bytes(&mem), 2 * MIB + PAGE_SIZE);
        assert_eq!(discard(&mem, GuestAddress(2 * MIB), 2 * MIB).unwrap(), 2 * MIB, "what was resident");
        assert_eq!(super::super::ram_resident_bytes(&mem), PAGE_SIZE, "only the page outside the range is left");
        // The same range again releases nothing; written again in part, that part.
        assert_eq!(discard(&mem, GuestAddress(2 * MIB), 2 * MIB).unwrap(), 0);
        for page in 0..4u64 {
            mem.write_obj(0xefu8, GuestAddress(2 * MIB + page * PAGE_SIZE)).unwrap();
        }
        assert_eq!(discard(&mem, GuestAddress(2 * MIB), 2 * MIB).unwrap(), 4 * PAGE_SIZE);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4 * MIB)).unwrap(), 0xcd);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(2 * MIB + 4096)).unwrap(), 0);
        assert!(matches!(discard(&mem, GuestAddress(7 * MIB), 2 * MIB), Err(DiscardError::NotRam { .. })));
        assert!(matches!(discard(&mem, GuestAddress(1), 4096), Err(DiscardError::NotRam { .. })));
        assert!(matches!(discard(&mem, GuestAddress(u64::MAX - 4095), 4096), Err(DiscardError::NotRam { .. })));
    }

    fn any_range() -> impl Strategy<Value = ReclaimRange> {
        let start = prop_oneof![0..300 * MIB, (0..150u64).prop_map(|c| c * CHUNK), any::<u64>()];
        let len = prop_oneof![0..16 * MIB, (0..5u64).prop_map(|c| c * CHUNK), Just(8 * MIB), any::<u64>()];
        (start, len, 0..5u32, prop_oneof![Just(0u32), any::<u32>()])
            .prop_map(|(start, len, kind, reserved)| ReclaimRange { start, len, kind, reserved })
    }

    proptest! {
        /// Whatever a guest reports, every accepted range is inside RAM,
        /// touches no protected byte, is disjoint from the others accepted,
        /// and is aligned for its kind; DATA never touches the memmap;
        /// nothing is accepted with reclaim off.
        #[test]
        fn accepted_ranges_keep_every_rule(rs in proptest::collection::vec(any_range(), 0..64), mode in 0..3u32) {
            let mode = Reclaim::decode(mode).unwrap();
            let p = policy(mode);
            let verdicts = check_record(&rs, &p, &guest());
            prop_assert_eq!(verdicts.len(), rs.len());
            let mut seen: Vec<(u64, u64)> = Vec::new();
            for (r, v) in rs.iter().zip(&verdicts) {
                if v.is_err() {
                    continue;
                }
                prop_assert!(mode != Reclaim::Off);
                let end = r.start.checked_add(r.len).unwrap();
                prop_assert!(r.len > 0 && end <= 256 * MIB);
                prop_assert!(p.protected.iter().all(|&(s, e)| !overlaps(r.start, end, s, e)));
                prop_assert!(seen.iter().all(|&(s, e)| !overlaps(r.start, end, s, e)));
                prop_assert!(r.start % PAGE_SIZE == 0 && r.len % PAGE_SIZE == 0);
                let touches_memmap = overlaps(r.start, end, MEMMAP[0].start, MEMMAP[0].start + MEMMAP[0].len);
                match r.kind {
                    reclaim_kind::DATA => prop_assert!(r.start % CHUNK == 0 && r.len % CHUNK == 0 && !touches_memmap),
                    reclaim_kind::OFFLINE => {
                        prop_assert!(mode == Reclaim::Full);
                        prop_assert_eq!(r.len, guest_abi::online_run(r.start));
                    }
                    reclaim_kind::MEMMAP => prop_assert!(mode == Reclaim::Full && touches_memmap),
                    _ => prop_assert!(false, "unknown kind accepted"),
                }
                seen.push((r.start, end));
            }
        }
    }
}
