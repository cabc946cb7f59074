//! The workload each VM of a density run is given once ready: a fixed size,
//! or a size per VM drawn from a range with a seeded generator, so that the
//! same VM number gets the same size under every strategy; or phases that go
//! up and down ([`Phased`], `--workload 'peak:256M,hold:2s,idle:16M'`).

use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

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

/// Longest `hold:` phase accepted: ten minutes.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

/// One phase of a [`Phased`] workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Hold this many MiB (every page written), through `PUT /guest/memory`.
    Peak { mib: u64 },
    /// Keep what is held for this long.
    Hold { ms: u64 },
    /// Go down to this many MiB: the size the VM idles at, fresh and in
    /// steady state.
    Idle { mib: u64 },
}

/// A workload that goes up and down: `peak:SIZE` and `hold:TIME` phases in
/// any order, ending with one `idle:SIZE`, e.g. `peak:256M,hold:2s,idle:16M`.
/// Each VM first comes up holding the idle size (the fresh fleet); then, a
/// few VMs at a time, runs the phases and comes back down to it (the fleet
/// in steady state, once reclaim has settled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phased {
    /// The phases, as given (the last is [`Phase::Idle`]).
    pub phases: Vec<Phase>,
}

/// Why a `--workload` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhasedError {
    /// A phase is not `NAME:VALUE` with a known name.
    #[error("phase {0:?} is not peak:SIZE, hold:TIME or idle:SIZE (e.g. peak:256M,hold:2s,idle:16M)")]
    Phase(String),
    /// A size is not whole MiB or GiB.
    #[error("size {0:?} is not a whole number of MiB or GiB (e.g. 16M, 256M, 1G)")]
    Size(String),
    /// A time is not in ms or s.
    #[error("time {0:?} is not a duration in ms or s (e.g. 500ms, 2s, 1.5s)")]
    Time(String),
    /// A hold is longer than [`MAX_HOLD`].
    #[error("hold {0:?} is longer than {max} s", max = MAX_HOLD.as_secs())]
    TooLong(String),
    /// The phases do not end with exactly one `idle:`.
    #[error("the workload must end with one idle:SIZE phase, and have no other (e.g. peak:256M,hold:2s,idle:16M)")]
    Idle,
    /// No `peak:`, or a peak not above the idle size.
    #[error("the workload needs a peak:SIZE above its idle size (got {0})")]
    Peak(String),
}

/// `16M`, `16MiB`, `1G`, `1GiB` or a plain number of MiB, as MiB.
fn parse_size(v: &str) -> Result<u64, PhasedError> {
    let err = || PhasedError::Size(v.to_string());
    let t = v.trim();
    let (num, unit) = t.find(|c: char| !c.is_ascii_digit()).map_or((t, ""), |i| t.split_at(i));
    let n: u64 = num.parse().map_err(|_| err())?;
    match unit {
        "" | "M" | "MiB" | "m" => Ok(n),
        "G" | "GiB" | "g" => n.checked_mul(1024).ok_or_else(err),
        _ => Err(err()),
    }
}

/// `500ms`, `2s`, `1.5s`, as whole ms.
fn parse_time(v: &str) -> Result<u64, PhasedError> {
    let err = || PhasedError::Time(v.to_string());
    let t = v.trim();
    let ms = if let Some(n) = t.strip_suffix("ms") {
        n.parse::<u64>().map_err(|_| err())?
    } else if let Some(n) = t.strip_suffix('s') {
        let secs: f64 = n.parse().map_err(|_| err())?;
        if !secs.is_finite() || secs < 0.0 || n.starts_with(['+', '-']) {
            return Err(err());
        }
        (secs * 1000.0).round() as u64
    } else {
        return Err(err());
    };
    if ms > MAX_HOLD.as_millis() as u64 {
        return Err(PhasedError::TooLong(v.to_string()));
    }
    Ok(ms)
}

impl FromStr for Phased {
    type Err = PhasedError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut phases = Vec::new();
        for part in s.split(',') {
            let (name, value) = part.split_once(':').ok_or_else(|| PhasedError::Phase(part.to_string()))?;
            phases.push(match name.trim() {
                "peak" => Phase::Peak { mib: parse_size(value)? },
                "hold" => Phase::Hold { ms: parse_time(value)? },
                "idle" => Phase::Idle { mib: parse_size(value)? },
                _ => return Err(PhasedError::Phase(part.to_string())),
            });
        }
        let idles = phases.iter().filter(|p| matches!(p, Phase::Idle { .. })).count();
        let Some(&Phase::Idle { mib: idle }) = phases.last() else { return Err(PhasedError::Idle) };
        if idles != 1 {
            return Err(PhasedError::Idle);
        }
        let w = Phased { phases };
        if w.peak_mib() <= idle {
            return Err(PhasedError::Peak(s.to_string()));
        }
        Ok(w)
    }
}

impl fmt::Display for Phased {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.phases.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match p {
                Phase::Peak { mib } => write!(f, "peak:{mib}M")?,
                Phase::Hold { ms } => write!(f, "hold:{ms}ms")?,
                Phase::Idle { mib } => write!(f, "idle:{mib}M")?,
            }
        }
        Ok(())
    }
}

impl Phased {
    /// The largest size any phase holds, MiB.
    pub fn peak_mib(&self) -> u64 {
        self.phases
            .iter()
            .map(|p| match p {
                Phase::Peak { mib } | Phase::Idle { mib } => *mib,
                Phase::Hold { .. } => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// The size the VM idles at, fresh and after its phases, MiB.
    pub fn idle_mib(&self) -> u64 {
        match self.phases.last() {
            Some(Phase::Idle { mib }) => *mib,
            _ => 0,
        }
    }

    /// What one VM at its peak may cost the host on top of its idle size,
    /// bytes: the pages, their memmap (1/64) and KVM's metadata (1/512)
    /// with room to spare (1/32), and 4 MiB for page tables and noise.
    pub fn peak_cost_bytes(&self) -> u64 {
        ((self.peak_mib() - self.idle_mib()) << 20) + ((self.peak_mib() << 20) / 32) + (4 << 20)
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
    fn phased_workloads_parse_print_and_refuse_what_makes_no_sense() {
        let w: Phased = "peak:256M,hold:2s,idle:16M".parse().unwrap();
        assert_eq!(w.phases, vec![Phase::Peak { mib: 256 }, Phase::Hold { ms: 2000 }, Phase::Idle { mib: 16 }]);
        assert_eq!((w.peak_mib(), w.idle_mib()), (256, 16));
        assert_eq!(w.to_string(), "peak:256M,hold:2000ms,idle:16M");
        assert_eq!(w.to_string().parse::<Phased>().unwrap(), w);
        let w: Phased = "peak:1G,hold:500ms,peak:64MiB,hold:1.5s,idle:0".parse().unwrap();
        assert_eq!((w.peak_mib(), w.idle_mib(), w.phases[3]), (1024, 0, Phase::Hold { ms: 1500 }));
        assert_eq!("peak:8,idle:4".parse::<Phased>().unwrap().phases.len(), 2);
        for (bad, want) in [
            ("", "phase"),
            ("peak256M,idle:1M", "phase"),
            ("top:1M,idle:0", "phase"),
            ("peak:1.5M,idle:0", "size"),
            ("peak:1T,idle:0", "size"),
            ("peak:-1M,idle:0", "size"),
            ("peak:2M,hold:2,idle:0", "time"),
            ("peak:2M,hold:-1s,idle:0", "time"),
            ("peak:2M,hold:601s,idle:0", "longer"),
            ("peak:2M,hold:1s", "end with one idle"),
            ("idle:1M,peak:2M,idle:1M", "end with one idle"),
            ("hold:1s,idle:16M", "needs a peak"),
            ("peak:16M,idle:16M", "needs a peak"),
        ] {
            let e = bad.parse::<Phased>().expect_err(bad).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
