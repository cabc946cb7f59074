//! The workload each VM of a density run is given once ready: a fixed size,
//! or a size per VM drawn from a range with a seeded generator, so that the
//! same VM number gets the same size under every strategy.

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
}
