//! The backend list as most strategies need it.

use crate::Backend;

/// The upstream's backends plus the precomputed list of healthy ones, rebuilt on every
/// `pool_changed` so that `pick` only indexes into it.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    backends: Vec<Backend>,
    healthy: Vec<u32>,
}

impl Pool {
    /// Builds the pool from the list given to `pool_changed`.
    pub fn new(backends: Vec<Backend>) -> Self {
        let healthy = backends.iter().enumerate().filter(|(_, b)| b.healthy).map(|(i, _)| i as u32).collect();
        Pool { backends, healthy }
    }

    /// All backends, healthy or not, in index order.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Indexes of the healthy backends, ascending.
    pub fn healthy(&self) -> &[u32] {
        &self.healthy
    }

    /// The `n`-th healthy backend (wrapping), skipping any in `exclude`; `None` when every
    /// healthy backend is excluded or none is healthy.
    pub fn healthy_nth(&self, n: u64, exclude: &[u32]) -> Option<u32> {
        let len = self.healthy.len();
        if len == 0 {
            return None;
        }
        let start = (n % len as u64) as usize;
        (0..len).map(|k| self.healthy[(start + k) % len]).find(|i| !exclude.contains(i))
    }

    /// True when the backend at `index` exists and is healthy.
    pub fn is_healthy(&self, index: u32) -> bool {
        self.backends.get(index as usize).is_some_and(|b| b.healthy)
    }

    /// How many healthy backends are not in `exclude` (duplicates in `exclude` count
    /// once). Costs O(`exclude.len()`²), not O(pool size): `exclude` holds the few
    /// backends a retry already tried.
    pub fn available(&self, exclude: &[u32]) -> usize {
        let excluded =
            exclude.iter().enumerate().filter(|&(k, &i)| self.is_healthy(i) && !exclude[..k].contains(&i)).count();
        self.healthy.len() - excluded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(healthy: bool) -> Backend {
        Backend { id: String::new(), address: String::new(), weight: 1, zone: String::new(), labels: vec![], healthy }
    }

    #[test]
    fn healthy_nth_wraps_and_skips_unhealthy_and_excluded() {
        let pool = Pool::new(vec![backend(true), backend(false), backend(true), backend(true)]);
        assert_eq!(pool.healthy(), &[0, 2, 3]);
        let picks: Vec<_> = (0..4).map(|n| pool.healthy_nth(n, &[]).unwrap()).collect();
        assert_eq!(picks, [0, 2, 3, 0]);
        assert_eq!(pool.healthy_nth(1, &[2]), Some(3));
        assert_eq!(pool.healthy_nth(0, &[0, 2, 3]), None);
        assert_eq!(Pool::default().healthy_nth(5, &[]), None);
    }

    #[test]
    fn available_counts_healthy_backends_not_excluded() {
        let pool = Pool::new(vec![backend(true), backend(false), backend(true)]);
        assert!(pool.is_healthy(0) && !pool.is_healthy(1) && !pool.is_healthy(9));
        assert_eq!(pool.available(&[]), 2);
        assert_eq!(pool.available(&[1, 9]), 2, "unhealthy or unknown: no effect");
        assert_eq!(pool.available(&[0, 0]), 1, "duplicates count once");
        assert_eq!(pool.available(&[2, 0]), 0);
    }
}
