//! The per-VM memory report: the guest's own figures ([`super::guest`]),
//! validated, next to what the host measures itself ([`super::host`], and
//! `mincore()` over the memmap ranges and all of guest RAM).

use super::guest::{memmap_ranges, memmap_resident, read_snapshot, validate, GuestReportError};
use super::host::{kvm_memslot_estimate, vmm_own_memory, KVM_ESTIMATE_NOTE};
use crate::memory;
use crate::memory::reclaim::ReclaimStats;
use guest_abi::{stats_flags, StatsBlock, PAGE_SIZE};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Inputs the report needs besides guest memory.
pub struct ReportContext<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub stats_gpa: Option<GuestAddress>,
    pub vcpus: u8,
    pub tsc_khz: Option<u32>,
    pub workload_bytes: u64,
    /// Guest RAM registered with KVM now.
    pub registered_bytes: u64,
    /// The registered ranges `[start, end)`, where the VMM tracks them
    /// (`None`: all of RAM is registered). Only they can hold guest pages
    /// (the guest cannot touch the rest, and the VMM writes only there), so
    /// residency is measured over them alone: `mincore` over all of a
    /// 2 GiB guest takes about 0.8 ms, over an idle guest's 10 MiB a few µs.
    pub registered_ranges: Option<Vec<(u64, u64)>>,
    /// The reclaim mode the VM runs with.
    pub reclaim_mode: api::Reclaim,
    /// What the guest's reclaim reports did.
    pub reclaim: ReclaimStats,
    /// KVM memslots deleted because the guest took their memory offline.
    pub memslots_unregistered: u64,
    /// The boot timings, taken *before* `stats_gpa`: the guest announces
    /// its stats block before its first phase, so a report whose timings
    /// show a phase always finds the block too.
    pub timings: api::BootTimings,
}

fn cycles_to_us(cycles: u64, khz: Option<u32>) -> Option<f64> {
    khz.filter(|k| *k > 0).map(|k| cycles as f64 * 1000.0 / f64::from(k))
}

/// The report before the VM is built (`GET /memory` before
/// `InstanceStart`): `valid: false`, no guest view, no guest RAM yet; the
/// VMM's own memory is measured all the same.
pub fn not_started_report(timings: api::BootTimings) -> api::MemoryReport {
    let (rss, pss) = super::host::own_memory(&[]).map_or((0, None), |s| (s.rss, Some(s.pss)));
    api::MemoryReport {
        valid: false,
        invalid_reason: Some("the VM is not started: no guest memory yet".into()),
        strategy: None,
        guest: None,
        host: api::HostMemoryView {
            guest_ram_bytes: 0,
            kvm_registered_bytes: 0,
            guest_ram_resident_bytes: 0,
            guest_ram_shared_bytes: None,
            memmap_resident_bytes: 0,
            memmap_range_bytes: 0,
            vmm_rss_bytes: rss,
            vmm_pss_bytes: pss,
            kvm_memslot_bytes_estimate: 0,
            kvm_estimate_note: KVM_ESTIMATE_NOTE.to_string(),
        },
        timings,
        reclaim: api::ReclaimView::default(),
    }
}

/// The VMM's side of the reclaim figures; the guest's are filled in once
/// its block validates ([`guest_reclaim`]).
fn reclaim_view(ctx: &ReportContext<'_>) -> api::ReclaimView {
    let r = &ctx.reclaim;
    api::ReclaimView {
        mode: Some(ctx.reclaim_mode),
        events: r.events,
        ranges_accepted: r.ranges_accepted,
        ranges_rejected: r.ranges_rejected,
        accepted_bytes: r.accepted_bytes,
        discarded_bytes: r.discarded_bytes(),
        discarded_data_bytes: r.data_bytes,
        discarded_memmap_bytes: r.memmap_bytes,
        offline_bytes: r.offline_bytes,
        memslots_unregistered: ctx.memslots_unregistered,
        guest_reported_bytes: None,
        guest_events: None,
        chunks_deinitialized: None,
        delay_ms: None,
    }
}

/// Checks the guest's reclaim counts against the VMM's own (the guest
/// updates its counts after the VMM, so they may lag, never lead), and
/// fills them in.
fn guest_reclaim(b: &StatsBlock, view: &mut api::ReclaimView) -> Result<(), String> {
    if b.reclaim_reported_bytes > view.accepted_bytes {
        return Err(format!(
            "the guest says {} bytes were reclaimed; the VMM accepted {}",
            b.reclaim_reported_bytes, view.accepted_bytes
        ));
    }
    if b.reclaim_events > view.events {
        return Err(format!("the guest says it made {} reclaim reports; the VMM saw {}", b.reclaim_events, view.events));
    }
    view.guest_reported_bytes = Some(b.reclaim_reported_bytes);
    view.guest_events = Some(b.reclaim_events);
    view.chunks_deinitialized = Some(b.chunks_deinitialized);
    view.delay_ms = Some(b.reclaim_delay_ms);
    Ok(())
}

/// Builds the full report: guest view (if valid), host view, timings.
pub fn memory_report(ctx: &ReportContext<'_>) -> api::MemoryReport {
    let mem = ctx.mem;
    let ram = memory::ram::ram_bytes(mem);
    let registered = ctx.registered_bytes;
    let own = vmm_own_memory(mem);
    let (rss, pss) = own.map_or((0, None), |s| (s.rss, Some(s.pss)));
    let mut host = api::HostMemoryView {
        guest_ram_bytes: ram,
        kvm_registered_bytes: registered,
        guest_ram_resident_bytes: match &ctx.registered_ranges {
            Some(ranges) => ranges.iter().map(|&(s, e)| memory::resident_bytes(mem, GuestAddress(s), e.saturating_sub(s))).sum(),
            None => memory::ram_resident_bytes(mem),
        },
        guest_ram_shared_bytes: own.map(|s| s.skipped_file),
        memmap_resident_bytes: 0,
        memmap_range_bytes: 0,
        vmm_rss_bytes: rss,
        vmm_pss_bytes: pss,
        kvm_memslot_bytes_estimate: kvm_memslot_estimate(registered),
        kvm_estimate_note: KVM_ESTIMATE_NOTE.to_string(),
    };
    let mut timings = ctx.timings.clone();
    let snapshot = ctx
        .stats_gpa
        .ok_or(GuestReportError::NotAnnounced)
        .and_then(|gpa| read_snapshot(mem, gpa))
        .and_then(|b| validate(&b, mem, ctx.vcpus).map(|s| (b, s)));
    let mut reclaim = reclaim_view(ctx);
    // A rejected reclaim range, or counts that do not add up, make the
    // guest's report untrustworthy, as a bad stats block does.
    let snapshot = snapshot.map_err(|e| format!("guest report invalid: {e}")).and_then(|(b, s)| {
        if let Some(why) = &ctx.reclaim.first_rejection {
            return Err(format!("guest report invalid: the VMM rejected memory the guest reported ({why})"));
        }
        guest_reclaim(&b, &mut reclaim).map_err(|e| format!("guest report invalid: {e}"))?;
        Ok((b, s))
    });
    let (b, strategy) = match snapshot {
        Ok(v) => v,
        Err(e) => {
            return api::MemoryReport {
                valid: false,
                invalid_reason: Some(e),
                strategy: None,
                guest: None,
                host,
                timings,
                reclaim,
            }
        }
    };
    host.memmap_resident_bytes = memmap_resident(mem, &b);
    host.memmap_range_bytes = memmap_ranges(&b).map(|r| r.len).sum();
    let since_entry = |tsc: u64| (tsc > b.tsc_entry && b.tsc_entry != 0).then(|| cycles_to_us(tsc - b.tsc_entry, ctx.tsc_khz)).flatten();
    timings.guest_init_memmap_us = since_entry(b.tsc_memory_ready);
    timings.guest_init_total_us = since_entry(b.tsc_ready);
    timings.guest_init_full_memmap_us = since_entry(b.tsc_fully_initialized);
    let guest = api::GuestMemoryView {
        pages_total: b.total_pages,
        pages_initialized: b.initialized_pages,
        pages_allocated: b.allocated_pages,
        pages_free: b.free_pages,
        pages_reserved: b.reserved_pages,
        memmap_bytes_reserved: b.memmap_bytes_reserved,
        memmap_bytes_initialized: b.memmap_bytes_initialized,
        chunks_total: b.chunks_total,
        chunks_initialized: b.chunks_initialized,
        chunk_bytes: b.chunk_bytes,
        grow_events: b.grow_events,
        init_cycles: b.init_cycles,
        init_us: cycles_to_us(b.init_cycles, ctx.tsc_khz),
        alloc_failures: b.alloc_failures,
        grow_check_on: b.flags & stats_flags::GROW_CHECK_ON != 0,
        fully_initialized: b.flags & stats_flags::FULLY_INITIALIZED != 0,
        jump_sites_patched: b.flags & stats_flags::JUMP_SITES_PATCHED != 0,
        memmap_on_memory: b.flags & stats_flags::MEMMAP_ON_MEMORY != 0,
        allocated_bytes: b.allocated_pages * PAGE_SIZE,
        workload_bytes: ctx.workload_bytes,
        cpus: b.cpus,
    };
    api::MemoryReport {
        valid: true,
        invalid_reason: None,
        strategy: Some(strategy),
        guest: Some(guest),
        host,
        timings,
        reclaim,
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::{GpaRange, Strategy, ABI_VERSION, STATS_MAGIC};
    use vm_memory::Bytes;

    const STATS_AT: u64 = 0x1000;

    fn context<'a>(mem: &'a GuestMemoryMmap, reclaim: ReclaimStats) -> ReportContext<'a> {
        ReportContext {
            mem,
            stats_gpa: Some(GuestAddress(STATS_AT)),
            vcpus: 1,
            tsc_khz: None,
            workload_bytes: 0,
            registered_bytes: 0,
            registered_ranges: None,
            reclaim_mode: api::Reclaim::Full,
            reclaim,
            memslots_unregistered: 2,
            timings: api::BootTimings::default(),
        }
    }

    fn ram_with_block(reported: u64, events: u64) -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let mut b = StatsBlock {
            magic: STATS_MAGIC,
            abi_version: ABI_VERSION,
            strategy: Strategy::OnDemand as u32,
            chunk_bytes: 2 << 20,
            section_bytes: 128 << 20,
            total_pages: 16384,
            initialized_pages: 512,
            chunks_total: 32,
            chunks_initialized: 1,
            memmap_bytes_reserved: 1 << 20,
            cpus: 1,
            memmap_range_count: 1,
            reclaim: guest_abi::Reclaim::Full as u32,
            reclaim_delay_ms: 2000,
            reclaim_reported_bytes: reported,
            reclaim_events: events,
            chunks_deinitialized: 5,
            ..Default::default()
        };
        b.memmap_ranges[0] = GpaRange { start: 6 << 20, len: 1 << 20 };
        mem.write_obj(b, GuestAddress(STATS_AT)).unwrap();
        mem
    }

    /// The VMM accepted `accepted` bytes, of which the host had half
    /// resident (the guest's count is compared with what was accepted).
    fn stats(accepted: u64, events: u64, rejection: Option<&str>) -> ReclaimStats {
        ReclaimStats {
            events,
            ranges_accepted: 1,
            accepted_bytes: accepted,
            data_bytes: accepted / 2,
            first_rejection: rejection.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn reclaim_figures_come_from_both_sides_and_agree() {
        let mem = ram_with_block(4 << 20, 2);
        let r = memory_report(&context(&mem, stats(4 << 20, 2, None)));
        assert!(r.valid, "{:?}", r.invalid_reason);
        let v = r.reclaim;
        assert_eq!((v.mode, v.events, v.accepted_bytes, v.memslots_unregistered), (Some(api::Reclaim::Full), 2, 4 << 20, 2));
        assert_eq!((v.discarded_bytes, v.discarded_data_bytes), (2 << 20, 2 << 20), "what the host released");
        assert_eq!((v.guest_reported_bytes, v.guest_events, v.chunks_deinitialized, v.delay_ms), (Some(4 << 20), Some(2), Some(5), Some(2000)));
    }

    #[test]
    fn residency_is_measured_over_the_registered_ranges_where_they_are_known() {
        let mem = ram_with_block(4 << 20, 2); // the stats block's page, at 4 KiB
        mem.write_obj(1u64, GuestAddress(40 << 20)).unwrap();
        let all = memory_report(&context(&mem, stats(4 << 20, 2, None))).host.guest_ram_resident_bytes;
        assert_eq!(all, 2 * PAGE_SIZE, "untracked: all of RAM");
        let mut c = context(&mem, stats(4 << 20, 2, None));
        c.registered_ranges = Some(vec![(0, 2 << 20)]);
        assert_eq!(memory_report(&c).host.guest_ram_resident_bytes, PAGE_SIZE, "the page at 40 MiB is outside");
        c.registered_ranges = Some(vec![(0, 2 << 20), (40 << 20, 42 << 20)]);
        assert_eq!(memory_report(&c).host.guest_ram_resident_bytes, all);
    }

    #[test]
    fn a_rejected_range_or_a_guest_count_ahead_of_the_vmm_makes_the_report_invalid() {
        let mem = ram_with_block(4 << 20, 2);
        let r = memory_report(&context(&mem, stats(4 << 20, 2, Some("range 0 rejected: it overlaps the kernel"))));
        assert!(!r.valid && r.guest.is_none());
        assert!(r.invalid_reason.unwrap().contains("overlaps the kernel"));
        assert_eq!((r.reclaim.accepted_bytes, r.reclaim.discarded_bytes), (4 << 20, 2 << 20), "the VMM's own counts are still given");
        assert_eq!(r.reclaim.guest_reported_bytes, None);
        let r = memory_report(&context(&mem, stats(2 << 20, 2, None)));
        assert!(!r.valid && r.invalid_reason.unwrap().contains("reclaimed"));
        let r = memory_report(&context(&mem, stats(4 << 20, 1, None)));
        assert!(!r.valid && r.invalid_reason.unwrap().contains("reports"));
    }
}
