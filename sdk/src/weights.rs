//! Helpers for backend weights: reducing them to small integers and drawing from them.
//!
//! Backends' weights are at least 1 (the gateway guarantees it; these helpers treat 0 as
//! 1 anyway so that a bad weight can never divide by zero or starve a backend).

/// Greatest common divisor (`gcd(0, n) = n`).
pub fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The smallest integer weights with the same ratios as `weights` (each divided by their
/// gcd), scaled down proportionally when their sum exceeds `max_total`. Every result is
/// at least 1, so with more than `max_total` weights the sum is the number of weights.
///
/// Strategies use this to bound tables whose size is the sum of weights (a smooth
/// weighted round-robin cycle, for example).
///
/// ```
/// use gateway_sdk::weights::reduce;
/// assert_eq!(reduce(&[40, 10, 10], 1000), [4, 1, 1]);
/// assert_eq!(reduce(&[3001, 1000], 100), [75, 25]); // no common divisor: scaled
/// ```
pub fn reduce(weights: &[u32], max_total: u64) -> Vec<u32> {
    let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w.max(1)))).max(1);
    let reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w.max(1)) / g).collect();
    let total: u64 = reduced.iter().sum();
    if total <= max_total.max(1) {
        return reduced.into_iter().map(|w| w as u32).collect();
    }
    // Proportional scaling, rounding to nearest; never below 1.
    let max_total = u128::from(max_total.max(1));
    let total = u128::from(total);
    reduced.into_iter().map(|w| ((u128::from(w) * max_total + total / 2) / total).max(1) as u32).collect()
}

/// Maps a uniformly random `r` to `0..n` without modulo bias worth mentioning (Lemire's
/// multiply-shift). `n` must be at least 1.
///
/// ```
/// use gateway_sdk::weights::below;
/// assert_eq!(below(0, 10), 0);
/// assert_eq!(below(u64::MAX, 10), 9);
/// ```
pub fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// Cumulative weights for weighted random choice: build once when the pool changes, then
/// [`Cumulative::pick`] is a binary search.
///
/// ```
/// use gateway_sdk::weights::Cumulative;
/// let c = Cumulative::new([3, 1]);
/// assert_eq!(c.total(), 4);
/// assert_eq!(c.pick(0), 0); // a random u64 near 0 falls in the first 3/4
/// assert_eq!(c.pick(u64::MAX), 1);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Cumulative {
    /// `ends[i]` = sum of weights `0..=i`.
    ends: Vec<u64>,
}

impl Cumulative {
    /// From weights in order (0 counts as 1).
    pub fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut sum = 0u64;
        let ends = weights
            .into_iter()
            .map(|w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Cumulative { ends }
    }

    /// Sum of all weights.
    pub fn total(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// Number of weights.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when built from no weights.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The position chosen by the uniformly random `r`, with probability proportional to
    /// its weight. Panics when empty.
    pub fn pick(&self, r: u64) -> usize {
        let point = below(r, self.total());
        self.ends.partition_point(|&end| end <= point)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcd_basics() {
        assert_eq!(gcd(12, 18), 6);
        assert_eq!(gcd(0, 5), 5);
        assert_eq!(gcd(7, 0), 7);
        assert_eq!(gcd(1, 1_000_000), 1);
    }

    #[test]
    fn reduce_divides_by_gcd_and_caps_the_sum() {
        assert_eq!(reduce(&[100, 100, 100], 10), [1, 1, 1]);
        assert_eq!(reduce(&[0, 2], 10), [1, 2], "0 counts as 1");
        assert_eq!(reduce(&[], 10), Vec::<u32>::new());
        let big = reduce(&[1_000_000, 1, 999_999], 10_000);
        assert!(big.iter().sum::<u32>() <= 10_001, "{big:?}");
        assert_eq!(big[1], 1, "never below 1");
        assert_eq!(reduce(&[1; 50], 10), [1; 50], "more weights than the cap");
    }

    #[test]
    fn cumulative_picks_in_proportion() {
        let c = Cumulative::new([1, 0, 2]);
        assert_eq!((c.total(), c.len()), (4, 3));
        let mut counts = [0u32; 3];
        let steps = 4_000u64;
        for i in 0..steps {
            // Evenly spread values (the middle of each of `steps` slices) stand in for
            // random ones.
            let r = ((2 * u128::from(i) + 1) << 64) / (2 * u128::from(steps));
            counts[c.pick(r as u64)] += 1;
        }
        assert_eq!(counts, [1000, 1000, 2000]);
    }
}
