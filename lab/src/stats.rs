//! The lab's statistics, in one place so that every experiment means the same
//! thing by "median" or "p90": samples sorted once ([`Sorted`]), one
//! percentile definition ([`Sorted::percentile`]), a distribution's summary
//! ([`Distribution`]) and the ratio of two optional figures ([`ratio`]).
//!
//! The percentile interpolates linearly between the two closest ranks
//! (Hyndman and Fan's type 7, the default of R and NumPy): the median of an
//! even count is the mean of the middle two, every percentile lies between
//! the smallest and the largest sample, and it grows with `p`. That serves a
//! benchmark's median of a few repetitions (no rounding to one sample) and a
//! density run's p50/p90/p99 of hundreds of launch latencies alike.

use serde::Serialize;

/// Finite samples in ascending order (NaN and infinities are dropped).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sorted(Vec<f64>);

impl Sorted {
    /// Sorts the finite values of `samples` (any order).
    pub fn new(samples: impl IntoIterator<Item = f64>) -> Sorted {
        let mut v: Vec<f64> = samples.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        Sorted(v)
    }

    /// How many finite samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `p`th percentile (`0..=100`), interpolating linearly between the
    /// closest ranks; `None` when empty or `p` is out of range.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.0.is_empty() || !(0.0..=100.0).contains(&p) {
            return None;
        }
        let pos = p / 100.0 * (self.0.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        Some(self.0[lo] + (self.0[hi] - self.0[lo]) * (pos - lo as f64))
    }

    /// The 50th percentile.
    pub fn median(&self) -> Option<f64> {
        self.percentile(50.0)
    }

    /// The smallest sample.
    pub fn min(&self) -> Option<f64> {
        self.0.first().copied()
    }

    /// The largest sample.
    pub fn max(&self) -> Option<f64> {
        self.0.last().copied()
    }

    /// The arithmetic mean.
    pub fn mean(&self) -> Option<f64> {
        (!self.0.is_empty()).then(|| self.0.iter().sum::<f64>() / self.0.len() as f64)
    }
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
    /// Summarizes the finite values of `samples` (any order); `None` when
    /// there are none.
    pub fn of(samples: impl IntoIterator<Item = f64>) -> Option<Distribution> {
        let s = Sorted::new(samples);
        Some(Distribution {
            count: s.len(),
            min: s.min()?,
            p50: s.percentile(50.0)?,
            p90: s.percentile(90.0)?,
            p99: s.percentile(99.0)?,
            max: s.max()?,
            mean: s.mean()?,
        })
    }
}

/// `a / b`, when both exist, `a` is finite and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn median(xs: &[f64]) -> Option<f64> {
        Sorted::new(xs.iter().copied()).median()
    }

    fn percentile(xs: &[f64], p: f64) -> Option<f64> {
        Sorted::new(xs.iter().copied()).percentile(p)
    }

    #[test]
    fn medians_interpolate_between_the_middle_two() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 2.0, f64::INFINITY]), Some(2.0));
    }

    #[test]
    fn percentiles_interpolate_linearly_between_closest_ranks() {
        let five = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(percentile(&five, 0.0), Some(1.0));
        assert_eq!(percentile(&five, 25.0), Some(2.0));
        assert_eq!(percentile(&five, 100.0), Some(5.0));
        assert_eq!(percentile(&[0.0, 10.0], 90.0), Some(9.0));
        assert_eq!(percentile(&[1.0], 101.0), None);
        assert_eq!(percentile(&[1.0], -1.0), None);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 50.0), Some(50.5));
        assert!((percentile(&hundred, 90.0).unwrap() - 90.1).abs() < 1e-9);
        assert!((percentile(&hundred, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
    }

    #[test]
    fn percentiles_grow_with_p_and_stay_within_the_samples() {
        let xs = [7.0, 1.0, 9.5, 3.25, 3.25, 100.0, 0.5];
        let mut last = f64::MIN;
        for p in 0..=100 {
            let v = percentile(&xs, f64::from(p)).unwrap();
            assert!(v >= last && (0.5..=100.0).contains(&v), "p{p} = {v}");
            last = v;
        }
    }

    #[test]
    fn a_distribution_summarizes_the_finite_samples() {
        let d = Distribution::of([5.0, 1.0, 3.0, f64::NAN]).unwrap();
        assert_eq!((d.count, d.min, d.p50, d.max, d.mean), (3, 1.0, 3.0, 5.0, 3.0));
        assert!(d.p50 <= d.p90 && d.p90 <= d.p99 && d.p99 <= d.max);
        assert!((d.p90 - 4.6).abs() < 1e-9, "{d:?}");
        assert!(Distribution::of([]).is_none());
        assert!(Distribution::of([f64::NAN]).is_none());
        let s = Sorted::new([2.0, 1.0]);
        assert_eq!((s.len(), s.is_empty(), s.min(), s.max(), s.mean()), (2, false, Some(1.0), Some(2.0), Some(1.5)));
        assert_eq!(Sorted::default().mean(), None);
    }

    #[test]
    fn ratios_need_both_sides_and_a_positive_denominator() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(Some(f64::NAN), Some(1.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(1.0), None), None);
    }
}
