//! Property tests on the inputs of the fuzz targets (fuzz/), run on stable
//! by `make test`: the stats block and its validator, port I/O sequences
//! against the devices, kernel images, and reclaim reports with their stats
//! block. Nothing may panic, a stats block that is accepted satisfies the
//! report's invariants, and a reclaim report changes nothing but the ranges
//! the VMM accepted.

use guest_abi::{stats_flags, GpaRange, StatsBlock, Strategy as GuestStrategy, ABI_VERSION, MAX_MEMMAP_RANGES, STATS_MAGIC};
use proptest::prelude::*;
use guest_abi::{ReclaimRange, ReclaimRecord, RECLAIM_MAGIC};
use vmm::fuzzing::{self, RECLAIM_RAM, STATS_RAM};
use vmm::report::guest::{memmap_ranges, range_in_ram};

/// The bytes of a block, as the guest leaves them in memory.
fn bytes_of(b: &StatsBlock) -> Vec<u8> {
    // SAFETY: StatsBlock is a #[repr(C)] plain-data struct of integers with
    // no padding holes that matter here; reading its bytes is sound.
    unsafe { std::slice::from_raw_parts((b as *const StatsBlock).cast::<u8>(), std::mem::size_of::<StatsBlock>()) }
        .to_vec()
}

/// A block that passes every check but the memmap ranges, which the test
/// draws: near-valid input, so that the validator accepts some.
fn plausible(ranges: &[(u64, u64)], count: u32) -> StatsBlock {
    let mut b = StatsBlock {
        magic: STATS_MAGIC,
        abi_version: ABI_VERSION,
        seq: 2,
        strategy: GuestStrategy::OnDemand as u32,
        flags: stats_flags::GROW_CHECK_ON,
        chunk_bytes: 2 << 20,
        section_bytes: 128 << 20,
        total_pages: 256,
        initialized_pages: 128,
        allocated_pages: 10,
        free_pages: 100,
        reserved_pages: 20,
        memmap_bytes_reserved: 16 << 10,
        memmap_bytes_initialized: 8 << 10,
        chunks_total: 1,
        chunks_initialized: 1,
        cpus: 1,
        memmap_range_count: count,
        ..Default::default()
    };
    for (slot, &(start, len)) in b.memmap_ranges.iter_mut().zip(ranges) {
        *slot = GpaRange { start, len };
    }
    b
}

/// The stats-block input: the announced address (0x100, after the header
/// bytes the target reads), the vCPU count, then the block.
fn input(block: &StatsBlock, vcpus: u8) -> Vec<u8> {
    let mut data = vec![0u8; 0x100];
    data[..4].copy_from_slice(&0x100u32.to_le_bytes());
    data[4] = vcpus;
    data.extend(bytes_of(block));
    data
}

/// An address near the edges of the test RAM (its regions and the hole).
fn edge_addr() -> impl Strategy<Value = u64> {
    let edges: Vec<u64> = STATS_RAM.iter().flat_map(|&(a, l)| [a, a + l as u64]).collect();
    (prop::sample::select(edges), -8192i64..8192).prop_map(|(e, d)| e.saturating_add_signed(d))
}

fn assert_invariants(out: &fuzzing::StatsOutcome) -> Result<(), TestCaseError> {
    if let (Some(b), Ok(_)) = (&out.block, &out.verdict) {
        let mut ranges: Vec<_> = memmap_ranges(b).filter(|r| r.len != 0).collect();
        for r in &ranges {
            prop_assert!(range_in_ram(&out.mem, r.start, r.len), "accepted a range outside RAM: {:?}", r);
        }
        ranges.sort_by_key(|r| r.start);
        for w in ranges.windows(2) {
            prop_assert!(w[0].start + w[0].len <= w[1].start, "accepted overlapping ranges: {:?}", w);
        }
        prop_assert!(b.total_pages * 4096 <= STATS_RAM.iter().map(|&(_, l)| l as u64).sum::<u64>());
    }
    Ok(())
}

/// Bytes of a reclaim record, as the guest leaves it in memory.
fn record_bytes(r: &ReclaimRecord) -> Vec<u8> {
    // SAFETY: as in `bytes_of`: ReclaimRecord is #[repr(C)] integers.
    unsafe { std::slice::from_raw_parts((r as *const ReclaimRecord).cast::<u8>(), std::mem::size_of::<ReclaimRecord>()) }
        .to_vec()
}

/// Where the reclaim input puts its stats block and its record.
const RECLAIM_STATS_AT: usize = 0x100;
const RECORD_AT: usize = 0x1000;

/// A reclaim input: a valid stats block (128 KiB chunks, the memmap at
/// 0x30000..0x31000), `reports` reports of one record of `ranges`
/// (`header` replaces its magic, version and count when set), in `mode`.
fn reclaim_input(ranges: &[ReclaimRange], header: Option<(u32, u32, u32)>, mode: u8, reports: u8) -> Vec<u8> {
    let mut b = plausible(&[(0x3_0000, 0x1000)], 1);
    // 512 KiB of RAM: 128 pages in four chunks, half of them initialized.
    (b.chunk_bytes, b.total_pages, b.initialized_pages, b.free_pages) = (128 << 10, 128, 64, 34);
    (b.chunks_total, b.chunks_initialized, b.memmap_bytes_reserved, b.memmap_bytes_initialized) = (4, 2, 8 << 10, 4 << 10);
    let mut rec = ReclaimRecord { count: ranges.len() as u32, ..Default::default() };
    rec.ranges[..ranges.len()].copy_from_slice(ranges);
    if let Some((magic, version, count)) = header {
        (rec.magic, rec.abi_version, rec.count) = (magic, version, count);
    }
    let mut data = vec![0u8; RECORD_AT + std::mem::size_of::<ReclaimRecord>()];
    data[..4].copy_from_slice(&(RECLAIM_STATS_AT as u32).to_le_bytes());
    (data[4], data[5], data[6]) = (1, mode, reports);
    for r in 0..4 {
        data[8 + 4 * r..12 + 4 * r].copy_from_slice(&(RECORD_AT as u32).to_le_bytes());
    }
    data[RECLAIM_STATS_AT..RECLAIM_STATS_AT + std::mem::size_of::<StatsBlock>()].copy_from_slice(&bytes_of(&b));
    data[RECORD_AT..].copy_from_slice(&record_bytes(&rec));
    data
}

/// A range near what the reclaim target's checks look at: chunk and page
/// boundaries of its RAM, the protected ranges, the memmap, the record.
fn reclaim_range() -> impl Strategy<Value = ReclaimRange> {
    let chunk = 128u64 << 10;
    let edges: Vec<u64> = RECLAIM_RAM
        .iter()
        .flat_map(|&(a, l)| [a, a + chunk, a + l as u64])
        .chain([0x2_0000, 0x3_0000, RECORD_AT as u64])
        .collect();
    let start = prop_oneof![
        (prop::sample::select(edges), -4i64..4).prop_map(|(e, d)| e.saturating_add_signed(d * 4096)),
        any::<u64>(),
    ];
    let len = prop_oneof![Just(chunk), Just(2 * chunk), Just(4096u64), 0u64..(1 << 20), any::<u64>()];
    (start, len, 0u32..5, prop_oneof![4 => Just(0u32), 1 => any::<u32>()])
        .prop_map(|(start, len, kind, reserved)| ReclaimRange { start, len, kind, reserved })
}

proptest! {
    #[test]
    fn reclaim_reports_on_random_memory_change_nothing_but_what_was_accepted(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        if let Err(e) = fuzzing::reclaim_report(&data) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn near_valid_reclaim_reports_change_nothing_but_what_was_accepted(
        ranges in proptest::collection::vec(reclaim_range(), 0..12),
        header in prop_oneof![4 => Just(None), 1 => (prop_oneof![Just(RECLAIM_MAGIC), any::<u32>()], 2u32..5, 0u32..80).prop_map(Some)],
        mode in 0u8..3,
        reports in 0u8..4,
    ) {
        if let Err(e) = fuzzing::reclaim_report(&reclaim_input(&ranges, header, mode, reports)) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn the_stats_validator_never_panics_on_random_memory(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        assert_invariants(&fuzzing::stats_block(&data))?;
    }

    #[test]
    fn accepted_stats_blocks_list_disjoint_ranges_inside_ram(
        ranges in proptest::collection::vec((edge_addr(), prop_oneof![0u64..8192, 0u64..(2 << 20), Just(u64::MAX)]), 0..6),
        extra in 0u32..3,
        vcpus in 0u8..3,
    ) {
        let count = (ranges.len() as u32 + extra).min(MAX_MEMMAP_RANGES as u32 + 1);
        let out = fuzzing::stats_block(&input(&plausible(&ranges, count), vcpus));
        assert_invariants(&out)?;
    }

    #[test]
    fn port_io_sequences_never_panic_or_block(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::port_io(&data);
    }

    #[test]
    fn kernel_images_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = fuzzing::kernel_image(&data);
    }

    #[test]
    fn elf_shaped_images_never_panic(
        phoff in prop_oneof![Just(64u64), any::<u64>()],
        count in any::<u16>(),
        entsize in prop_oneof![Just(56u16), any::<u16>()],
        tail in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut image = vec![0u8; 64];
        image[..4].copy_from_slice(b"\x7fELF");
        image[4] = 2; // 64-bit
        image[5] = 1; // little-endian
        image[6] = 1;
        image[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        image[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        image[0x20..0x28].copy_from_slice(&phoff.to_le_bytes());
        image[0x36..0x38].copy_from_slice(&entsize.to_le_bytes());
        image[0x38..0x3a].copy_from_slice(&count.to_le_bytes());
        image.extend(tail);
        let _ = fuzzing::kernel_image(&image);
    }

    #[test]
    fn ring3_entry_notes_never_panic_and_an_accepted_one_points_into_the_image(
        fields in proptest::collection::vec(any::<u64>(), 7),
        small in proptest::collection::vec(any::<u16>(), 6),
        header_ok in any::<bool>(),
        near in any::<bool>(),
    ) {
        use guest_abi::entry_note::{Ring3Entry, ENTRY_MAGIC, ENTRY_SIZE, ENTRY_VERSION};
        // The built-in kernel with its record replaced: a valid header (or
        // not) and arbitrary values, or values near the real ones.
        let mut image = vmm::loader::EMBEDDED_KERNEL.to_vec();
        let phoff = u64::from_le_bytes(image[0x20..0x28].try_into().unwrap()) as usize;
        let count = usize::from(u16::from_le_bytes([image[0x38], image[0x39]]));
        let h = (0..count).map(|i| phoff + i * 56).find(|&h| image[h] == 4).unwrap();
        let at = u64::from_le_bytes(image[h + 8..h + 16].try_into().unwrap()) as usize + 24;
        let real = Ring3Entry::decode(&image[at..at + ENTRY_SIZE]).unwrap();
        let e = if near {
            // One field of the real record moved a little (or a selector's
            // low bits flipped): the checks decide at the edges.
            let mut e = Ring3Entry { magic: if header_ok { ENTRY_MAGIC } else { fields[0] as u32 }, ..real };
            let delta = (fields[1] % 64).wrapping_sub(32);
            match small[0] % 10 {
                0 => e.entry = e.entry.wrapping_add(delta),
                1 => e.stack_top = e.stack_top.wrapping_add(delta),
                2 => e.cr3 = e.cr3.wrapping_add(delta),
                3 => e.gdt_base = e.gdt_base.wrapping_add(delta),
                4 => e.idt_base = e.idt_base.wrapping_add(delta),
                5 => e.tss_base = e.tss_base.wrapping_add(delta),
                6 => e.rsp0 = e.rsp0.wrapping_add(delta),
                7 => e.tss_selector ^= small[1] & 0x1f,
                8 => e.user_cs ^= small[1] & 0x1f,
                _ => e.user_ss ^= small[1] & 0x1f,
            }
            e
        } else {
            Ring3Entry {
                magic: if header_ok { ENTRY_MAGIC } else { fields[0] as u32 },
                version: if header_ok { ENTRY_VERSION } else { (fields[0] >> 32) as u32 },
                size: if header_ok { ENTRY_SIZE as u32 } else { fields[1] as u32 },
                tss_selector: small[0],
                user_cs: small[1],
                user_ss: small[2],
                gdt_limit: small[3],
                idt_limit: small[4],
                tss_limit: small[5],
                entry: fields[0],
                stack_top: fields[1],
                cr3: fields[2],
                gdt_base: fields[3],
                idt_base: fields[4],
                tss_base: fields[5],
                rsp0: fields[6],
            }
        };
        image[at..at + ENTRY_SIZE].copy_from_slice(&e.to_bytes());
        let image = vmm::loader::Image::from_bytes(image, "prop");
        if let Ok(got) = image.ring3_entry() {
            prop_assert_eq!(got, e);
            let segments = image.segments();
            for addr in [e.entry, e.cr3, e.gdt_base, e.idt_base, e.tss_base, e.stack_top - 1, e.rsp0 - 1] {
                prop_assert!(segments.iter().any(|&(s, end)| (s..end).contains(&addr)), "{:#x}", addr);
            }
        }
        // Applied to guest RAM that does not hold the image: errors, never a panic.
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 10)]).unwrap();
        let _ = vmm::arch::ring3_entry_state(&mem, kvm_bindings::kvm_sregs::default(), &e);
    }
}

#[test]
fn a_plausible_block_is_accepted_and_an_overlapping_one_refused() {
    // The near-valid generator really reaches the accepting path.
    let out = fuzzing::stats_block(&input(&plausible(&[(0x2000, 0x1000)], 1), 1));
    assert!(out.verdict.is_ok(), "{:?}", out.verdict);
    let out = fuzzing::stats_block(&input(&plausible(&[(0x2000, 0x1000), (0x2800, 0x1000)], 2), 1));
    assert!(out.verdict.is_err());
}

#[test]
fn a_near_valid_reclaim_report_is_accepted_where_it_may_be() {
    // The generator reaches the accepting path: with reclaim=data (mode 1),
    // a chunk of the second region goes; one over a protected range does not.
    let chunk = 128u64 << 10;
    let good = ReclaimRange { start: RECLAIM_RAM[1].0, len: chunk, kind: guest_abi::reclaim_kind::DATA, reserved: 0 };
    let bad = ReclaimRange { start: 0x2_0000, ..good };
    let data = reclaim_input(&[good, bad], None, 1, 0);
    assert_eq!(fuzzing::reclaim_report(&data), Ok(()));
    // Prove it was accepted: the same input run by hand shows `accepted`.
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&RECLAIM_RAM.map(|(a, l)| (vm_memory::GuestAddress(a), l))).unwrap();
    let (tx, _rx) = vmm::events::channel();
    let d = vmm::devices::paravirt::Paravirt::new(mem.clone(), tx, std::sync::Arc::new(vmm::timings::Timings::new()), Default::default());
    use vm_memory::Bytes;
    mem.write_slice(&data, vm_memory::GuestAddress(0)).unwrap();
    d.set_vcpu_count(1);
    d.set_reclaim_policy(vmm::memory::reclaim::ReclaimPolicy::new(guest_abi::Reclaim::Data, &mem, fuzzing::RECLAIM_PROTECTED.to_vec()));
    d.write(0, guest_abi::port::STATS, RECLAIM_STATS_AT as u32);
    d.write(0, guest_abi::port::RECLAIM, RECORD_AT as u32);
    let accepted: u64 = mem.read_obj(vm_memory::GuestAddress(RECORD_AT as u64 + 16)).unwrap();
    assert_eq!(accepted, 0b01, "{:?}", d.reclaim_stats());
}
