//! Quarantine of a plugin whose calls keep failing: after `after` failures in a row the
//! upstream is served by the fallback for a backoff, then the plugin is tried again
//! (half-open, as a circuit breaker does); a failure then doubles the backoff up to
//! `max`, a success ends the quarantine.
//!
//! Shared by every worker thread: two relaxed loads on the request path while the
//! plugin is healthy, a clock read only while it is quarantined.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How quarantine behaves (`plugins.quarantine` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failures in a row that start a quarantine; 0 = never quarantine.
    pub after: u32,
    /// The first quarantine's length.
    pub backoff: Duration,
    /// The longest quarantine.
    pub max_backoff: Duration,
}

/// What a call's outcome changed, to be logged once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The plugin failed `failures` times in a row: quarantined for `length`.
    Quarantined {
        /// Failures in a row.
        failures: u32,
        /// How long the fallback serves.
        length: Duration,
    },
    /// The try after a quarantine failed: quarantined again, for `length`.
    Extended {
        /// How long the fallback serves now.
        length: Duration,
    },
    /// A call succeeded after a quarantine: the plugin serves again.
    Recovered,
}

/// One binding's quarantine state.
#[derive(Debug)]
pub struct Quarantine {
    policy: Policy,
    streak: AtomicU32,
    /// Milliseconds since `epoch` when the quarantine ends; 0: not quarantined.
    until_ms: AtomicU64,
    /// Length of the next quarantine, in milliseconds.
    next_ms: AtomicU64,
    /// Quarantines since start.
    count: AtomicU64,
    epoch: Instant,
}

impl Quarantine {
    /// Not quarantined.
    pub fn new(policy: Policy) -> Self {
        Quarantine {
            policy,
            streak: AtomicU32::new(0),
            until_ms: AtomicU64::new(0),
            next_ms: AtomicU64::new(millis(policy.backoff)),
            count: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        // +1: 0 means "not quarantined".
        millis(self.epoch.elapsed()) + 1
    }

    /// Whether the plugin may be called now: not quarantined, or its backoff is over
    /// (the next call is the try).
    #[inline]
    pub fn admits(&self) -> bool {
        let until = self.until_ms.load(Relaxed);
        until == 0 || self.now_ms() >= until
    }

    /// When the current quarantine ends (none: the plugin serves).
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.until_ms.load(Relaxed);
        (until != 0).then(|| Duration::from_millis(until.saturating_sub(self.now_ms())))
    }

    /// Quarantines since start.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// A call succeeded.
    #[inline]
    pub fn succeeded(&self) -> Option<Transition> {
        if self.streak.load(Relaxed) != 0 {
            self.streak.store(0, Relaxed);
        }
        let until = self.until_ms.load(Relaxed);
        if until != 0 && self.until_ms.compare_exchange(until, 0, Relaxed, Relaxed).is_ok() {
            self.next_ms.store(millis(self.policy.backoff), Relaxed);
            return Some(Transition::Recovered);
        }
        None
    }

    /// A call failed (trap, timeout, bad answer, failed setup).
    pub fn failed(&self) -> Option<Transition> {
        let streak = self.streak.fetch_add(1, Relaxed).saturating_add(1);
        if self.policy.after == 0 {
            return None;
        }
        let until = self.until_ms.load(Relaxed);
        let now = self.now_ms();
        if until != 0 {
            // Quarantined: only the try after the backoff can extend it.
            if now < until {
                return None;
            }
            let length = self.next_ms.load(Relaxed);
            if self.until_ms.compare_exchange(until, now + length, Relaxed, Relaxed).is_err() {
                return None;
            }
            self.next_ms.store((length * 2).min(millis(self.policy.max_backoff)), Relaxed);
            self.count.fetch_add(1, Relaxed);
            return Some(Transition::Extended { length: Duration::from_millis(length) });
        }
        if streak < self.policy.after {
            return None;
        }
        let length = self.next_ms.load(Relaxed);
        if self.until_ms.compare_exchange(0, now + length, Relaxed, Relaxed).is_err() {
            return None;
        }
        self.next_ms.store((length * 2).min(millis(self.policy.max_backoff)), Relaxed);
        self.count.fetch_add(1, Relaxed);
        Some(Transition::Quarantined { failures: streak, length: Duration::from_millis(length) })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX / 4)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff_ms: u64, max_ms: u64) -> Policy {
        Policy { after: 3, backoff: Duration::from_millis(backoff_ms), max_backoff: Duration::from_millis(max_ms) }
    }

    #[test]
    fn failures_in_a_row_quarantine_and_a_success_between_them_resets_the_count() {
        let q = Quarantine::new(policy(60_000, 60_000));
        assert_eq!((q.failed(), q.failed()), (None, None));
        assert_eq!(q.succeeded(), None);
        assert_eq!((q.failed(), q.failed()), (None, None));
        assert!(q.admits());
        assert_eq!(q.failed(), Some(Transition::Quarantined { failures: 3, length: Duration::from_secs(60) }));
        assert!(!q.admits(), "quarantined: the fallback serves");
        assert!(q.remaining().is_some_and(|r| r > Duration::from_secs(59)));
        // Failures reported by calls that were already running change nothing.
        assert_eq!(q.failed(), None);
        assert_eq!(q.count(), 1);
    }

    #[test]
    fn the_try_after_the_backoff_doubles_it_up_to_the_cap_or_ends_the_quarantine() {
        let q = Quarantine::new(policy(20, 50));
        for _ in 0..2 {
            q.failed();
        }
        assert!(matches!(q.failed(), Some(Transition::Quarantined { .. })));
        std::thread::sleep(Duration::from_millis(30));
        assert!(q.admits(), "the backoff is over: the plugin is tried again");
        assert_eq!(q.failed(), Some(Transition::Extended { length: Duration::from_millis(40) }));
        assert!(!q.admits());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(q.failed(), Some(Transition::Extended { length: Duration::from_millis(50) }), "capped");
        std::thread::sleep(Duration::from_millis(60));
        assert!(q.admits());
        assert_eq!(q.succeeded(), Some(Transition::Recovered));
        assert_eq!((q.remaining(), q.succeeded()), (None, None));
        // The next quarantine starts from the first backoff again.
        for _ in 0..2 {
            q.failed();
        }
        assert_eq!(q.failed(), Some(Transition::Quarantined { failures: 3, length: Duration::from_millis(20) }));
    }

    #[test]
    fn after_zero_never_quarantines() {
        let q = Quarantine::new(Policy { after: 0, ..policy(10, 10) });
        for _ in 0..100 {
            assert_eq!(q.failed(), None);
        }
        assert!(q.admits());
    }
}
