//! The arithmetic of a density run's footprint, free of I/O so it is
//! unit-tested: the host-wide sums of one ramp step, the per-VM breakdown
//! derived from them, and the extrapolation to the whole host.

use crate::host::KernelMemory;
use serde::Serialize;

/// The host kernel's counters ([`KernelMemory`]) per VM at a step: their
/// rise from the strategy's baseline divided by the VMs, in bytes (negative
/// if something else on the host gave memory back). Next to the userspace
/// figures, this is "KVM + kernel" measured rather than a remainder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KernelPerVm {
    pub vmalloc_used: f64,
    pub slab: f64,
    pub slab_unreclaimable: f64,
    pub kernel_stack: f64,
    pub page_tables: f64,
    pub sec_page_tables: f64,
    /// `vmalloc_used + slab + kernel_stack + page_tables + sec_page_tables`,
    /// without `kernel_stack` where the stacks are vmalloc'd (they are in
    /// `vmalloc_used` already).
    pub total: f64,
}

impl KernelPerVm {
    /// `(now − base) / vms` for each counter; `None` with no VMs.
    pub fn from_delta(base: &KernelMemory, now: &KernelMemory, vms: u64) -> Option<KernelPerVm> {
        if vms == 0 {
            return None;
        }
        let d = |a: u64, b: u64| (b as f64 - a as f64) / vms as f64;
        let mut k = KernelPerVm {
            vmalloc_used: d(base.vmalloc_used, now.vmalloc_used),
            slab: d(base.slab, now.slab),
            slab_unreclaimable: d(base.slab_unreclaimable, now.slab_unreclaimable),
            kernel_stack: d(base.kernel_stack, now.kernel_stack),
            page_tables: d(base.page_tables, now.page_tables),
            sec_page_tables: d(base.sec_page_tables, now.sec_page_tables),
            total: 0.0,
        };
        let stacks = if now.stacks_in_vmalloc { 0.0 } else { k.kernel_stack };
        k.total = k.vmalloc_used + k.slab + stacks + k.page_tables + k.sec_page_tables;
        Some(k)
    }
}

/// Tasks per VM at a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TasksPerVm {
    /// The VMM processes' threads (`/proc/PID/status` `Threads`), KVM's
    /// `kvm-nx-lpage-re` worker included (it sits in the VMM's thread group).
    pub vmm_threads: f64,
    /// Of those, KVM's workers (`/proc/PID/task/*/comm` = `kvm-*`), on up
    /// to 16 VMs of the step.
    pub kvm_tasks: Option<f64>,
    /// The host's task count (`/proc/loadavg`) rise from the strategy's
    /// baseline per VM: everything the VMs cost in tasks, however named
    /// (noisy on a shared host).
    pub host_delta: Option<f64>,
}

/// Host-wide sums measured at one ramp step, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepSums {
    /// VMs running and measured.
    pub vms: u64,
    /// `MemAvailable` at the strategy's baseline minus now (may be negative
    /// if something else on the host freed memory).
    pub mem_available_drop: i64,
    /// Sum of the VMM processes' PSS, guest RAM excluded.
    pub vmm_pss: u64,
    /// Sum of the VMM processes' RSS, guest RAM excluded (informative).
    pub vmm_rss: u64,
    /// Sum of guest RAM resident on the host.
    pub guest_ram_resident: u64,
    /// Sum of the guests' memmap resident on the host (part of guest RAM).
    pub memmap_resident: u64,
    /// Sum of what the guests' workloads hold (part of guest RAM).
    pub workload: u64,
    /// Sum of the VMM processes' page tables (`VmPTE`; part of the kernel
    /// share below, shown for information).
    pub page_tables: u64,
    /// Sum of the VMM processes' threads.
    pub threads: u64,
    /// Sums of the processes' `smaps_rollup` `Rss`, `Pss` and `Anonymous`,
    /// guest RAM included (taken the same way for a peer).
    pub proc_rss: u64,
    pub proc_pss: u64,
    pub proc_anon: u64,
    /// Sum of the VMMs' estimates of KVM's memslot metadata.
    pub kvm_memslot_estimate: u64,
    /// Sum of guest RAM registered with KVM.
    pub kvm_registered: u64,
    /// Sum of the bytes the VMMs discarded on the guests' free page reports.
    pub reclaim_discarded: u64,
    /// The fleet's memory cgroup's rise from the strategy's baseline (see
    /// `cgroup`): everything the host charged to the VMs' processes, their
    /// kernel memory included. `None` without a fleet cgroup.
    pub cgroup_rise: Option<i64>,
    /// Of that, kernel memory (cgroup v1's kmem, v2's `kernel`).
    pub cgroup_kernel_rise: Option<i64>,
}

/// One VM's average host footprint at a step as seen from outside any VMM,
/// in bytes: the figures taken the same way for our VMs and a peer's, so
/// they compare side by side (a peer has no memory report to split the
/// footprint by owner as [`Breakdown`] does).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostPerVm {
    /// `MemAvailable` drop per VM.
    pub total: f64,
    /// The VMM process's `Rss`, guest RAM included.
    pub process_rss: f64,
    /// Its `Pss`, guest RAM included.
    pub process_pss: f64,
    /// Its anonymous memory (heap, stacks, guest RAM).
    pub process_anon: f64,
    /// `total − process_pss`: what no process's PSS holds (KVM and the
    /// host kernel, mostly).
    pub outside_process: f64,
    /// The fleet cgroup's rise per VM: the host's own charge for these
    /// processes, which other tenants do not move (`None` without one).
    pub cgroup: Option<f64>,
    /// Of that, kernel memory.
    pub cgroup_kernel: Option<f64>,
}

impl HostPerVm {
    /// Per-VM averages from host-wide sums; `None` with no VMs.
    pub fn from_sums(s: &StepSums) -> Option<HostPerVm> {
        if s.vms == 0 {
            return None;
        }
        let n = s.vms as f64;
        let total = s.mem_available_drop as f64 / n;
        let process_pss = s.proc_pss as f64 / n;
        Some(HostPerVm {
            total,
            process_rss: s.proc_rss as f64 / n,
            process_pss,
            process_anon: s.proc_anon as f64 / n,
            outside_process: total - process_pss,
            cgroup: s.cgroup_rise.map(|b| b as f64 / n),
            cgroup_kernel: s.cgroup_kernel_rise.map(|b| b as f64 / n),
        })
    }
}

/// One VM's average host footprint at a step, in bytes, split by owner. The
/// five parts add up to `total` exactly (see [`Breakdown::from_sums`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Breakdown {
    /// The host kernel's share: KVM (VM, vCPU, memslot rmap, shadow page
    /// tables) plus the process's own kernel objects (page tables, kernel
    /// stacks, files). What `MemAvailable` lost that no userspace figure
    /// accounts for.
    pub kvm_kernel: f64,
    /// The VMM process itself (PSS, guest RAM excluded).
    pub vmm: f64,
    /// Guest RAM resident that is neither memmap nor workload: the guest
    /// kernel's image, stacks, page tables and boot structures.
    pub guest_kernel: f64,
    /// The guest's memmap resident on the host.
    pub memmap: f64,
    /// What the guest workload holds.
    pub workload: f64,
    /// `MemAvailable` drop per VM.
    pub total: f64,
}

impl Breakdown {
    /// Per-VM averages from host-wide sums; `None` with no VMs.
    ///
    /// total = drop / n; vmm = ΣPSS / n; memmap = Σmemmap / n;
    /// workload = Σworkload / n; guest_kernel = (Σguest resident − Σmemmap −
    /// Σworkload) / n; kvm_kernel = (drop − ΣPSS − Σguest resident) / n.
    pub fn from_sums(s: &StepSums) -> Option<Breakdown> {
        if s.vms == 0 {
            return None;
        }
        let n = s.vms as f64;
        let guest = s.guest_ram_resident as f64;
        let drop = s.mem_available_drop as f64;
        Some(Breakdown {
            kvm_kernel: (drop - s.vmm_pss as f64 - guest) / n,
            vmm: s.vmm_pss as f64 / n,
            guest_kernel: (guest - s.memmap_resident as f64 - s.workload as f64) / n,
            memmap: s.memmap_resident as f64 / n,
            workload: s.workload as f64 / n,
            total: drop / n,
        })
    }

    /// The parts in plot order, with their names.
    pub fn parts(&self) -> [(&'static str, f64); 5] {
        [
            ("KVM + kernel", self.kvm_kernel),
            ("VMM process", self.vmm),
            ("guest kernel", self.guest_kernel),
            ("memmap", self.memmap),
            ("workload", self.workload),
        ]
    }
}

/// One VM's average footprint at a step, in bytes: the host's view
/// (`MemAvailable` drop per VM, which other tenants of the host move too)
/// and what the VMs report of themselves (`mincore` on guest RAM, the VMM's
/// PSS, KVM's memslot metadata), which nothing else on the host moves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VmFootprint {
    /// `MemAvailable` drop per VM.
    pub host_total: f64,
    /// `guest_ram_resident + vmm_pss + kvm_memslot_estimate` per VM.
    pub reported: f64,
    /// The fleet cgroup's rise per VM (`None` without one).
    pub cgroup: Option<f64>,
    pub guest_ram_resident: f64,
    pub memmap_resident: f64,
    pub kvm_registered: f64,
}

impl VmFootprint {
    /// Per-VM averages from a step's sums; `None` with no VMs.
    pub fn from_sums(s: &StepSums) -> Option<VmFootprint> {
        if s.vms == 0 {
            return None;
        }
        let n = s.vms as f64;
        Some(VmFootprint {
            host_total: s.mem_available_drop as f64 / n,
            reported: (s.guest_ram_resident + s.vmm_pss + s.kvm_memslot_estimate) as f64 / n,
            cgroup: s.cgroup_rise.map(|b| b as f64 / n),
            guest_ram_resident: s.guest_ram_resident as f64 / n,
            memmap_resident: s.memmap_resident as f64 / n,
            kvm_registered: s.kvm_registered as f64 / n,
        })
    }
}

/// The fleet after its phases, once reclaim has settled, against the same
/// fleet fresh (every VM just ready, holding the idle size): the claim
/// "a VM that peaked and came back down costs what a fresh idle VM costs".
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SteadyState {
    /// VMs measured fresh (the ramp's last step) and in steady state (those
    /// that ran their phases; the rest were stopped).
    pub fresh_vms: u64,
    pub vms: u64,
    /// Whether the VMs' reclaim counters and residency stopped moving
    /// before the deadline (`--steady-timeout-s`).
    pub settled: bool,
    /// From the end of the phases to the measurement, s.
    pub waited_s: f64,
    pub fresh: VmFootprint,
    pub steady: VmFootprint,
    /// `steady.host_total / fresh.host_total` (`None` unless both are
    /// positive).
    pub ratio: Option<f64>,
    /// `steady.reported / fresh.reported`.
    pub reported_ratio: Option<f64>,
    /// `steady.cgroup / fresh.cgroup`: the host's own charge, which other
    /// tenants do not move.
    pub cgroup_ratio: Option<f64>,
    /// Bytes discarded per VM on the guests' reports.
    pub discarded_per_vm: f64,
}

impl SteadyState {
    /// Compares the steady-state step's sums with the fresh one's; `None`
    /// if either measured no VM.
    pub fn compare(fresh: &StepSums, steady: &StepSums, settled: bool, waited_s: f64) -> Option<SteadyState> {
        let (f, s) = (VmFootprint::from_sums(fresh)?, VmFootprint::from_sums(steady)?);
        let ratio = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
        Some(SteadyState {
            fresh_vms: fresh.vms,
            vms: steady.vms,
            settled,
            waited_s,
            fresh: f,
            steady: s,
            ratio: ratio(s.host_total, f.host_total),
            reported_ratio: ratio(s.reported, f.reported),
            cgroup_ratio: s.cgroup.zip(f.cgroup).and_then(|(s, f)| ratio(s, f)),
            discarded_per_vm: steady.reclaim_discarded as f64 / steady.vms as f64,
        })
    }
}

/// How many VMs of `per_vm` bytes would fit between the baseline and the
/// floor on the whole host: `(MemTotal − floor − baseline used) / per_vm`,
/// where baseline used = `MemTotal − MemAvailable` at the baseline, i.e.
/// `(baseline MemAvailable − floor) / per_vm`. `None` if `per_vm` is not
/// positive.
pub fn extrapolated_fit(mem_total: u64, floor: u64, baseline_available: u64, per_vm: f64) -> Option<u64> {
    if per_vm.is_nan() || per_vm <= 0.0 {
        return None;
    }
    let used = mem_total.saturating_sub(baseline_available);
    let room = mem_total.saturating_sub(floor).saturating_sub(used);
    Some((room as f64 / per_vm).floor() as u64)
}

/// The default floor: the larger of 2 GiB and 10% of `MemTotal`.
pub fn default_floor(mem_total: u64) -> u64 {
    (2u64 << 30).max(mem_total / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_per_vm_are_deltas_over_the_vms() {
        let base = KernelMemory { vmalloc_used: 1000, slab: 500, slab_unreclaimable: 300, kernel_stack: 160, page_tables: 80, sec_page_tables: 0, stacks_in_vmalloc: false };
        let now = KernelMemory { vmalloc_used: 3000, slab: 900, slab_unreclaimable: 500, kernel_stack: 480, page_tables: 60, sec_page_tables: 200, stacks_in_vmalloc: false };
        let k = KernelPerVm::from_delta(&base, &now, 4).unwrap();
        assert_eq!((k.vmalloc_used, k.slab, k.slab_unreclaimable, k.kernel_stack), (500.0, 100.0, 50.0, 80.0));
        assert_eq!((k.page_tables, k.sec_page_tables), (-5.0, 50.0), "a counter may fall");
        assert_eq!(k.total, 500.0 + 100.0 + 80.0 - 5.0 + 50.0, "SUnreclaim is part of Slab, not added twice");
        assert_eq!(KernelPerVm::from_delta(&base, &now, 0), None);
        // vmalloc'd stacks are in VmallocUsed already: not added twice.
        let vmap = KernelMemory { stacks_in_vmalloc: true, ..now };
        let k = KernelPerVm::from_delta(&base, &vmap, 4).unwrap();
        assert_eq!((k.kernel_stack, k.total), (80.0, 500.0 + 100.0 - 5.0 + 50.0));
        assert_eq!(KernelPerVm::from_delta(&base, &now, 0), None);
    }

    #[test]
    fn breakdown_parts_add_up_to_the_drop() {
        let s = StepSums {
            vms: 10,
            mem_available_drop: 400 << 20,
            vmm_pss: 20 << 20,
            vmm_rss: 40 << 20,
            guest_ram_resident: 330 << 20,
            memmap_resident: 300 << 20,
            workload: 10 << 20,
            page_tables: 1 << 20,
            threads: 40,
            proc_rss: 390 << 20,
            proc_pss: 350 << 20,
            proc_anon: 340 << 20,
            ..StepSums::default()
        };
        let h = HostPerVm::from_sums(&s).unwrap();
        let mib = |v: f64| v / f64::from(1u32 << 20);
        assert_eq!((mib(h.total), mib(h.process_rss), mib(h.process_pss), mib(h.process_anon)), (40.0, 39.0, 35.0, 34.0));
        assert_eq!(mib(h.outside_process), 5.0);
        assert!(HostPerVm::from_sums(&StepSums::default()).is_none());
        let b = Breakdown::from_sums(&s).unwrap();
        assert_eq!(mib(b.total), 40.0);
        assert_eq!(mib(b.vmm), 2.0);
        assert_eq!(mib(b.memmap), 30.0);
        assert_eq!(mib(b.workload), 1.0);
        assert_eq!(mib(b.guest_kernel), 2.0);
        assert_eq!(mib(b.kvm_kernel), 5.0);
        let sum: f64 = b.parts().iter().map(|p| p.1).sum();
        assert!((sum - b.total).abs() < 1e-6);
        assert!(Breakdown::from_sums(&StepSums::default()).is_none());
    }

    #[test]
    fn the_steady_state_is_compared_per_vm_with_the_fresh_fleet() {
        let fresh = StepSums {
            vms: 10,
            mem_available_drop: 200 << 20,
            guest_ram_resident: 150 << 20,
            vmm_pss: 10 << 20,
            kvm_memslot_estimate: 5 << 20,
            kvm_registered: 1280 << 20,
            cgroup_rise: Some(180 << 20),
            ..StepSums::default()
        };
        // Four of the ten ran their phases and kept 30 MiB each more.
        let steady = StepSums {
            vms: 4,
            mem_available_drop: 200 << 20,
            guest_ram_resident: 180 << 20,
            vmm_pss: 4 << 20,
            kvm_memslot_estimate: 2 << 20,
            reclaim_discarded: 8 << 20,
            cgroup_rise: Some(90 << 20),
            ..StepSums::default()
        };
        let s = SteadyState::compare(&fresh, &steady, true, 2.5).unwrap();
        let mib = |v: f64| v / f64::from(1u32 << 20);
        assert_eq!((s.fresh_vms, s.vms, s.settled, s.waited_s), (10, 4, true, 2.5));
        assert_eq!((mib(s.fresh.host_total), mib(s.steady.host_total)), (20.0, 50.0));
        assert_eq!((mib(s.fresh.reported), mib(s.steady.reported)), (16.5, 46.5));
        assert_eq!((mib(s.fresh.kvm_registered), mib(s.discarded_per_vm)), (128.0, 2.0));
        assert_eq!(s.ratio, Some(2.5));
        assert!((s.reported_ratio.unwrap() - 46.5 / 16.5).abs() < 1e-12);
        assert_eq!((s.fresh.cgroup.map(mib), s.steady.cgroup.map(mib), s.cgroup_ratio), (Some(18.0), Some(22.5), Some(1.25)));
        // Without a cgroup on either side there is no cgroup ratio.
        let bare = StepSums { cgroup_rise: None, ..steady };
        assert_eq!(SteadyState::compare(&fresh, &bare, true, 0.0).unwrap().cgroup_ratio, None);
        // A drop below zero (another tenant freed memory) gives no ratio.
        let odd = StepSums { mem_available_drop: -5, ..steady };
        assert_eq!(SteadyState::compare(&fresh, &odd, false, 0.0).unwrap().ratio, None);
        assert!(SteadyState::compare(&StepSums::default(), &steady, true, 0.0).is_none());
        assert!(SteadyState::compare(&fresh, &StepSums::default(), true, 0.0).is_none());
    }

    #[test]
    fn extrapolation_uses_the_room_above_the_floor() {
        let gib = 1u64 << 30;
        // 24 GiB host, 1 GiB used at baseline, 2 GiB floor: 21 GiB of room.
        assert_eq!(extrapolated_fit(24 * gib, 2 * gib, 23 * gib, (gib / 100) as f64), Some(2100));
        assert_eq!(extrapolated_fit(24 * gib, 30 * gib, 23 * gib, 1.0), Some(0));
        assert_eq!(extrapolated_fit(24 * gib, 2 * gib, 23 * gib, 0.0), None);
        assert_eq!(extrapolated_fit(24 * gib, 2 * gib, 23 * gib, -5.0), None);
    }

    #[test]
    fn the_default_floor_is_the_larger_of_2_gib_and_a_tenth() {
        assert_eq!(default_floor(8 << 30), 2 << 30);
        assert_eq!(default_floor(40 << 30), 4 << 30);
    }
}
