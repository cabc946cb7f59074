//! The arithmetic of the density experiment, free of I/O so it is unit-tested:
//! the seeded workload spread, percentiles, the per-VM footprint breakdown
//! derived from host-wide sums, and the extrapolation to the whole host.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// The workload each VM is given once ready: a fixed size, or a size drawn
/// per VM from an inclusive range with a seeded generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AllocSpec {
    /// Every VM allocates this many MiB.
    Fixed { mib: u64 },
    /// VM `i` allocates a size drawn uniformly from `lo..=hi` MiB.
    Range { lo: u64, hi: u64 },
}

/// Why an `--alloc-mib` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocSpecError {
    /// Not `M` or `A..B` with whole numbers.
    #[error("expected MIB or LO..HI (whole MiB), not {0:?}")]
    Syntax(String),
    /// `A..B` with `A > B`.
    #[error("the range {0}..{1} is empty")]
    Empty(u64, u64),
}

impl FromStr for AllocSpec {
    type Err = AllocSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |t: &str| t.trim().parse::<u64>().map_err(|_| AllocSpecError::Syntax(s.to_string()));
        match s.split_once("..") {
            None => Ok(AllocSpec::Fixed { mib: num(s)? }),
            Some((a, b)) => {
                let (lo, hi) = (num(a)?, num(b.strip_prefix('=').unwrap_or(b))?);
                if lo > hi {
                    return Err(AllocSpecError::Empty(lo, hi));
                }
                Ok(AllocSpec::Range { lo, hi })
            }
        }
    }
}

impl fmt::Display for AllocSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocSpec::Fixed { mib } => write!(f, "{mib}"),
            AllocSpec::Range { lo, hi } => write!(f, "{lo}..{hi}"),
        }
    }
}

impl AllocSpec {
    /// The workload of VM number `index` (0-based, the same in every
    /// strategy, so strategies compare on the same workloads).
    pub fn mib_for(&self, seed: u64, index: u64) -> u64 {
        match *self {
            AllocSpec::Fixed { mib } => mib,
            AllocSpec::Range { lo, hi } => {
                let span = hi - lo + 1;
                // The modulo bias is below 2^-40 for any span a VM can have.
                lo + splitmix64(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % span
            }
        }
    }

    /// The largest workload any VM can get.
    pub fn max_mib(&self) -> u64 {
        match *self {
            AllocSpec::Fixed { mib } => mib,
            AllocSpec::Range { hi, .. } => hi,
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed, stable
/// generator, so a seed means the same workloads in every version.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Nearest-rank percentile of `sorted` (ascending): the smallest value with
/// at least `p`% of the values at or below it. `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A distribution's summary, in the unit of its samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Distribution {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Distribution {
    /// Summarizes `samples` (any order); `None` when empty.
    pub fn of(samples: &[f64]) -> Option<Distribution> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        Some(Distribution {
            count: s.len(),
            min: *s.first()?,
            p50: percentile(&s, 50.0)?,
            p90: percentile(&s, 90.0)?,
            p99: percentile(&s, 99.0)?,
            max: *s.last()?,
            mean: s.iter().sum::<f64>() / s.len() as f64,
        })
    }
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
    fn alloc_specs_parse_and_print() {
        assert_eq!("64".parse::<AllocSpec>(), Ok(AllocSpec::Fixed { mib: 64 }));
        assert_eq!("32..256".parse::<AllocSpec>(), Ok(AllocSpec::Range { lo: 32, hi: 256 }));
        assert_eq!("32..=256".parse::<AllocSpec>(), Ok(AllocSpec::Range { lo: 32, hi: 256 }));
        assert_eq!("8..8".parse::<AllocSpec>(), Ok(AllocSpec::Range { lo: 8, hi: 8 }));
        assert_eq!("9..8".parse::<AllocSpec>(), Err(AllocSpecError::Empty(9, 8)));
        for bad in ["", "x", "1..", "..2", "-1", "1.5"] {
            assert!(matches!(bad.parse::<AllocSpec>(), Err(AllocSpecError::Syntax(_))), "{bad}");
        }
        assert_eq!(AllocSpec::Range { lo: 1, hi: 2 }.to_string(), "1..2");
    }

    #[test]
    fn spread_is_seeded_in_range_and_repeatable() {
        let r = AllocSpec::Range { lo: 32, hi: 256 };
        let a: Vec<u64> = (0..1000).map(|i| r.mib_for(7, i)).collect();
        let b: Vec<u64> = (0..1000).map(|i| r.mib_for(7, i)).collect();
        let c: Vec<u64> = (0..1000).map(|i| r.mib_for(8, i)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|&m| (32..=256).contains(&m)));
        // Both ends are reachable and the mean is near the middle.
        assert!(a.contains(&32) || a.contains(&33));
        let mean = a.iter().sum::<u64>() as f64 / a.len() as f64;
        assert!((mean - 144.0).abs() < 10.0, "{mean}");
        assert_eq!(AllocSpec::Fixed { mib: 5 }.mib_for(1, 99), 5);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 90.0), Some(90.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        let d = Distribution::of(&[5.0, 1.0, 3.0, f64::NAN]).unwrap();
        assert_eq!((d.count, d.min, d.p50, d.max, d.mean), (3, 1.0, 3.0, 5.0, 3.0));
        assert!(Distribution::of(&[]).is_none());
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
        };
        let b = Breakdown::from_sums(&s).unwrap();
        let mib = |v: f64| v / f64::from(1u32 << 20);
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
