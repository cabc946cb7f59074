//! Entry points for the fuzz targets (`fuzz/`) and the property tests
//! (`vmm/tests/properties.rs`): each takes raw bytes, the way a hostile
//! guest or image file hands them over, and runs the real code on them. Not
//! an API: hidden from the documentation, kept small.

use crate::devices::paravirt::Paravirt;
use crate::devices::Devices;
use crate::loader::{self, Image, LoadError};
use crate::memory::reclaim::{ReclaimPolicy, ReclaimStats};
use crate::report::guest::{self, GuestReportError};
use crate::timings::Timings;
use guest_abi::{
    port, Reclaim, ReclaimRecord, StatsBlock, Strategy, ABI_VERSION, MAX_RECLAIM_RANGES, PAGE_SIZE, RECLAIM_MAGIC,
};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM of the stats-block target: two regions with a hole between,
/// so ranges can straddle a region's end.
pub const STATS_RAM: [(u64, usize); 2] = [(0, 1 << 20), (2 << 20, 1 << 20)];

/// What the stats-block target saw: the block read, and the verdict.
pub struct StatsOutcome {
    pub block: Option<StatsBlock>,
    pub verdict: Result<Strategy, GuestReportError>,
    pub mem: GuestMemoryMmap,
}

/// Fills small guest RAM with `data` (from address 0), then reads the stats
/// block at the address in its first 4 bytes (as the guest announces it on
/// `port::STATS`) and validates it for a VM with `data[4]` vCPUs.
pub fn stats_block(data: &[u8]) -> StatsOutcome {
    let mem = GuestMemoryMmap::<()>::from_ranges(&STATS_RAM.map(|(a, l)| (GuestAddress(a), l))).expect("fixed layout");
    let n = data.len().min(STATS_RAM[0].1);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("fits the first region");
    let word = |o: usize| data.get(o..o + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let gpa = GuestAddress(u64::from(word(0)));
    let vcpus = data.get(4).copied().unwrap_or(1);
    match guest::read_snapshot(&mem, gpa) {
        Ok(b) => StatsOutcome { block: Some(b), verdict: guest::validate(&b, &mem, vcpus), mem },
        Err(e) => StatsOutcome { block: None, verdict: Err(e), mem },
    }
}

/// Runs `data` as a sequence of port accesses against a VM's devices (16 MiB
/// of RAM, the paravirtual device, a UART whose output is thrown away).
/// Each access is 6 bytes: a control byte (bit 0: write, bit 1: vCPU 1
/// instead of 0, bits 2..4: size 1, 2 or 4), then a port byte (folded onto
/// the ports the devices own), then up to 4 data bytes. Reads that would
/// block a vCPU until the controller answers (`WAIT`, an AP's `AP_PARK`)
/// are made as `POLL` and by vCPU 0. A control byte of `0xff` instead queues
/// a guest command, as the controller does.
pub fn port_io(data: &[u8]) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("fixed layout");
    let (tx, rx) = crate::events::channel();
    // No controller: events go nowhere (and nothing queues up).
    drop(rx);
    let console = crate::devices::serial::ConsoleOut::writer(Box::new(std::io::sink()));
    let d = Devices::new(mem, Some(console), true, tx, Arc::new(Timings::new()), Arc::default());
    if let Some(pv) = d.paravirt() {
        pv.set_vcpu_count(2);
    }
    let ports: Vec<u16> = (port::PV_BASE..port::PV_END).chain(0x3f8..0x400).chain([0x60, 0x64, 0x80, 0x1234]).collect();
    for op in data.chunks(6) {
        let [ctl, p, rest @ ..] = op else { break };
        let value = rest.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if *ctl == 0xff {
            if let (Some(pv), Some(cmd)) = (d.paravirt(), guest_abi::Command::decode(u32::from(*p))) {
                let _ = pv.submit(cmd, u64::from(value), 0);
            }
            continue;
        }
        let mut port = ports[usize::from(*p) % ports.len()];
        let mut cpu = (ctl >> 1) & 1;
        let size = [1usize, 2, 4, 4][usize::from((ctl >> 2) & 3)];
        if ctl & 1 != 0 {
            let _ = d.port_out(cpu, port, &value.to_le_bytes()[..size]);
        } else {
            if port == port::WAIT {
                port = port::POLL;
            }
            if port == port::AP_PARK {
                cpu = 0;
            }
            let mut buf = [0u8; 4];
            let _ = d.port_in(cpu, port, &mut buf[..size]);
        }
    }
}

/// Guest RAM the kernel-image target loads into.
pub const LOAD_RAM_BYTES: usize = 4 << 20;

/// Checks `data` as a kernel image, lists its segments, reads its ring-3
/// entry note, loads it into 4 MiB of guest RAM and applies the note there,
/// as the builder does; returns the entry point.
pub fn kernel_image(data: &[u8]) -> Result<GuestAddress, LoadError> {
    loader::check_elf(data).map_err(|why| LoadError::NotElf { name: "fuzz".into(), why })?;
    let image = Image::from_bytes(data.to_vec(), "fuzz");
    let _ = image.segments();
    let ring3 = image.ring3_entry();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LOAD_RAM_BYTES)]).expect("fixed layout");
    let entry = image.load(&mem, false)?;
    if let Ok(e) = ring3 {
        let _ = crate::arch::ring3_entry_state(&mem, kvm_bindings::kvm_sregs::default(), &e);
    }
    Ok(entry)
}

/// Guest RAM of the reclaim target: two regions with a hole between, each
/// two of the smallest chunks (128 KiB) long.
pub const RECLAIM_RAM: [(u64, usize); 2] = [(0, 256 << 10), (512 << 10, 256 << 10)];

/// What the reclaim target protects, as the builder protects the boot data
/// and the kernel: `[start, end)`.
pub const RECLAIM_PROTECTED: [(u64, u64); 2] = [(0, 0x1000), (0x2_0000, 0x3_0000)];

/// Runs `data` as a guest's stats block and reclaim reports against the
/// paravirtual device, and checks what the device did. The first region of
/// RAM holds `data`; the second a pattern, so that a discard shows. Header:
/// bytes 0..4 the stats block's address (announced on `port::STATS`), byte
/// 4 the vCPU count, byte 5 the reclaim mode (`Reclaim` as `u32`, modulo
/// 3), byte 6 the number of reports (1 + the byte modulo 4), and from byte
/// 8 one 4-byte record address per report (written to `port::RECLAIM`).
///
/// After each report, every accepted range must be page-aligned, inside one
/// region of RAM, clear of [`RECLAIM_PROTECTED`] and of the record's other
/// accepted ranges, and read as zeros; every other byte of RAM must be as it
/// was, but the record's `accepted` field; and the device's counters must
/// agree. Each record is then reported a second time at once, which may
/// discard more (a range first refused as overlapping one that is now
/// gone) but must count as discarded only memory the host still had:
/// every page counts once, and the first report (which found all RAM
/// resident) counts all it accepted. `Err` says which rule broke.
pub fn reclaim_report(data: &[u8]) -> Result<(), String> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&RECLAIM_RAM.map(|(a, l)| (GuestAddress(a), l))).expect("fixed layout");
    let n = data.len().min(RECLAIM_RAM[0].1);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("fits the first region");
    let (a1, l1) = RECLAIM_RAM[1];
    mem.write_slice(&vec![0x5a; l1], GuestAddress(a1)).expect("the second region");
    let byte = |o: usize| data.get(o).copied().unwrap_or(0);
    let word = |o: usize| u32::from_le_bytes([byte(o), byte(o + 1), byte(o + 2), byte(o + 3)]);
    let (tx, rx) = crate::events::channel();
    // No controller: events go nowhere (and nothing queues up).
    drop(rx);
    let d = Paravirt::new(mem.clone(), tx, Arc::new(Timings::new()), Arc::default());
    d.set_vcpu_count(u32::from(byte(4)));
    let mode = Reclaim::decode(u32::from(byte(5)) % 3).expect("three modes");
    d.set_reclaim_policy(ReclaimPolicy::new(mode, &mem, RECLAIM_PROTECTED.to_vec()));
    d.write(0, port::STATS, word(0));
    let snapshot = |mem: &GuestMemoryMmap| -> Vec<Vec<u8>> {
        RECLAIM_RAM
            .iter()
            .map(|&(a, l)| {
                let mut v = vec![0u8; l];
                mem.read_slice(&mut v, GuestAddress(a)).expect("RAM");
                v
            })
            .collect()
    };
    let size = core::mem::size_of::<ReclaimRecord>() as u64;
    let accepted_at = core::mem::offset_of!(ReclaimRecord, accepted) as u64;
    for r in 0..1 + usize::from(byte(6) % 4) {
        let gpa = u64::from(word(8 + 4 * r));
        // Reading every byte maps every page of RAM (a page never written
        // maps the host's zero page), so all of it is resident now.
        let before = snapshot(&mem);
        let stats_before = d.reclaim_stats();
        // Where the VMM may write `accepted`, and the record as it was.
        let placed = gpa.is_multiple_of(8) && guest::range_in_ram(&mem, gpa, size);
        let read_record = || -> Option<ReclaimRecord> { placed.then(|| mem.read_obj(GuestAddress(gpa)).expect("in RAM")) };
        let read_accepted = || if placed { mem.read_obj::<u64>(GuestAddress(gpa + accepted_at)).expect("in RAM") } else { 0 };
        let record = read_record();
        d.write(0, port::RECLAIM, gpa as u32);
        let stats = d.reclaim_stats();
        let accepted = read_accepted();
        let taken = accepted_ranges(r, record, accepted)?;
        if mode == Reclaim::Off && !taken.is_empty() {
            return Err(format!("report {r}: ranges accepted with reclaim off"));
        }
        // The same record again, at once: nothing in it was touched since
        // but the record's own pages, so it may release (and count) only
        // those, and what the first report did not discard.
        let record_pages: Vec<u64> = (gpa & !(PAGE_SIZE - 1)..gpa.saturating_add(size)).step_by(PAGE_SIZE as usize).collect();
        let again = read_record();
        d.write(0, port::RECLAIM, gpa as u32);
        let stats_again = d.reclaim_stats();
        let accepted_again = read_accepted();
        let taken_again = accepted_ranges(r, again, accepted_again)?;
        let after = snapshot(&mem);

        // Zero inside what was accepted, unchanged elsewhere: what RAM must
        // hold now, compared as a whole (fast under the fuzzer's
        // instrumentation), then byte by byte only to say where.
        let field = placed.then_some((gpa + accepted_at, gpa + accepted_at + 8));
        for (((&(a, l), old), new), region) in RECLAIM_RAM.iter().zip(&before).zip(&after).zip(0..) {
            let mut want = old.clone();
            let end = a + l as u64;
            let local = |(s, e): (u64, u64)| (s.clamp(a, end) - a) as usize..(e.clamp(a, end) - a) as usize;
            for &t in taken.iter().chain(&taken_again) {
                want[local(t)].fill(0);
            }
            if let Some(f) = field {
                let f = local(f);
                want[f.clone()].copy_from_slice(&new[f]);
            }
            if want != *new {
                let off = want.iter().zip(new).position(|(w, v)| w != v).unwrap_or(0);
                let addr = a + off as u64;
                let (o, v) = (old[off], new[off]);
                return Err(format!("report {r}: byte {addr:#x} (region {region}) was {o:#x}, now {v:#x}, should be {:#x}", want[off]));
            }
        }
        let ranges = good_ranges(record);
        check_counters(r, &stats_before, &stats, accepted, &taken, ranges.len())?;
        check_counters(r, &stats, &stats_again, accepted_again, &taken_again, good_ranges(again).len())?;
        // The first report found every page resident, so it released all
        // it accepted; the repeat released at least what the first did not
        // discard, and at most that and the record's pages.
        let bytes = |t: &[(u64, u64)]| t.iter().map(|&(s, e)| e - s).sum::<u64>();
        let first = stats.discarded_bytes() - stats_before.discarded_bytes();
        if first != bytes(&taken) {
            return Err(format!("report {r}: {first} bytes counted as discarded, {} accepted, all resident", bytes(&taken)));
        }
        let pages = |t: &[(u64, u64)]| -> Vec<u64> { t.iter().flat_map(|&(s, e)| (s..e).step_by(PAGE_SIZE as usize)).collect() };
        let gone = pages(&taken);
        let repeat = pages(&taken_again);
        let fresh = repeat.iter().filter(|p| !gone.contains(p)).count() as u64;
        let touched = repeat.iter().filter(|p| gone.contains(p) && record_pages.contains(p)).count() as u64;
        let second = stats_again.discarded_bytes() - stats.discarded_bytes();
        if second < fresh * PAGE_SIZE || second > (fresh + touched) * PAGE_SIZE {
            return Err(format!(
                "report {r} again: {second} bytes counted as discarded; {fresh} pages not discarded before, {touched} of the record's pages"
            ));
        }
    }
    Ok(())
}

/// The ranges of `record` if its header is good (a record with a bad header
/// is rejected whole: none of its ranges count).
fn good_ranges(record: Option<ReclaimRecord>) -> Vec<guest_abi::ReclaimRange> {
    record
        .filter(|rec| rec.magic == RECLAIM_MAGIC && rec.abi_version == ABI_VERSION && rec.count as usize <= MAX_RECLAIM_RANGES)
        .map_or_else(Vec::new, |rec| rec.ranges[..rec.count as usize].to_vec())
}

/// The ranges of `record` that `accepted` names, `[start, end)`, after
/// checking each is page-aligned, inside one region of RAM, clear of
/// [`RECLAIM_PROTECTED`] and of the others, and that nothing is accepted
/// with reclaim off or past the ranges given.
fn accepted_ranges(r: usize, record: Option<ReclaimRecord>, accepted: u64) -> Result<Vec<(u64, u64)>, String> {
    let ranges = good_ranges(record);
    let given = if ranges.len() >= 64 { u64::MAX } else { (1u64 << ranges.len()) - 1 };
    if accepted & !given != 0 {
        return Err(format!("report {r}: accepted {accepted:#x} names ranges past the {} given", ranges.len()));
    }
    let mut taken: Vec<(u64, u64)> = Vec::new();
    for (i, range) in ranges.iter().enumerate().filter(|&(i, _)| accepted & (1 << i) != 0) {
        let (s, e) = (range.start, range.start.checked_add(range.len).ok_or(format!("range {i} wraps"))?);
        if range.len == 0 || !s.is_multiple_of(PAGE_SIZE) || !range.len.is_multiple_of(PAGE_SIZE) {
            return Err(format!("report {r}: range {i} {range:?} accepted, empty or unaligned"));
        }
        if !RECLAIM_RAM.iter().any(|&(a, l)| s >= a && e <= a + l as u64) {
            return Err(format!("report {r}: range {i} {range:?} accepted outside RAM"));
        }
        if RECLAIM_PROTECTED.iter().chain(&taken).any(|&(a, b)| s < b && a < e) {
            return Err(format!("report {r}: range {i} {range:?} accepted over protected or accepted memory"));
        }
        taken.push((s, e));
    }
    Ok(taken)
}

/// The counters of one report, from `was` to `now`: one event, one accepted
/// range per bit of `accepted` and its bytes, a reason kept for any
/// rejection, and never more discarded than accepted.
fn check_counters(
    r: usize,
    was: &ReclaimStats,
    now: &ReclaimStats,
    accepted: u64,
    taken: &[(u64, u64)],
    given: usize,
) -> Result<(), String> {
    let added = now.ranges_accepted - was.ranges_accepted;
    if now.events != was.events + 1 || added != u64::from(accepted.count_ones()) {
        return Err(format!("report {r}: counters {was:?} then {now:?} for accepted {accepted:#x}"));
    }
    let rejected = now.ranges_rejected - was.ranges_rejected;
    if rejected == 0 && added != given as u64 {
        return Err(format!("report {r}: {given} ranges, {added} accepted and none rejected"));
    }
    if rejected > 0 && now.first_rejection.is_none() {
        return Err(format!("report {r}: rejected with no reason kept"));
    }
    let bytes: u64 = taken.iter().map(|&(s, e)| e - s).sum();
    if now.accepted_bytes - was.accepted_bytes != bytes {
        return Err(format!("report {r}: accepted_bytes {} then {}, for {bytes} bytes accepted", was.accepted_bytes, now.accepted_bytes));
    }
    if now.discarded_bytes() - was.discarded_bytes() > bytes || now.discarded_bytes() > now.accepted_bytes {
        return Err(format!("report {r}: more discarded than accepted: {was:?} then {now:?}"));
    }
    Ok(())
}
