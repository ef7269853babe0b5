//! File descriptors are the gateway's own resource, not the backends'.
//!
//! At start the soft `RLIMIT_NOFILE` is raised to the hard limit ([`raise_limit`]). From
//! the limit follows a cap on client connections ([`client_slots`]): each proxied
//! connection may need a backend connection too, and [`RESERVE`] descriptors stay free
//! for health checks, the admin API, logs and plugin files. Beyond the cap, new clients
//! wait in the kernel's accept backlog (as at a listener's `max_connections`) instead of
//! taking the descriptors the health checks need. An `EMFILE` or `ENFILE` that still
//! happens is the gateway's shortage ([`is_exhausted`]): the accept loop backs off, a
//! health check keeps the backend's state, a request gets `503`, and no backend is
//! blamed.

use std::sync::{Arc, OnceLock};
use tokio::sync::Semaphore;

/// Descriptors kept free for everything but client connections.
pub const RESERVE: u64 = 100;

/// The smallest cap on client connections, however low the limit.
const MIN_CLIENTS: usize = 8;

/// The open-file limit after [`raise_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// The soft limit before, if it was raised.
    pub raised_from: Option<u64>,
}

impl Limit {
    /// Client connections the gateway serves at once under this limit.
    pub fn client_cap(&self) -> usize {
        usize::try_from(self.soft.saturating_sub(RESERVE) / 2).unwrap_or(usize::MAX).max(MIN_CLIENTS)
    }
}

/// Raises the soft open-file limit to the hard limit (or to the kernel's `nr_open` when
/// the hard limit is unlimited). Returns the limits, or why they could not be read.
pub fn raise_limit() -> std::io::Result<Limit> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes one `rlimit` into the valid, exclusive `lim`.
    #[allow(unsafe_code)]
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (soft, hard) = (lim.rlim_cur, lim.rlim_max);
    let target = if hard == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(soft)
    } else {
        hard
    };
    if target <= soft {
        return Ok(Limit { soft, hard, raised_from: None });
    }
    let raised = libc::rlimit { rlim_cur: target, rlim_max: hard };
    // SAFETY: `setrlimit` only reads the valid `raised`.
    #[allow(unsafe_code)]
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Ok(Limit { soft, hard, raised_from: None });
    }
    Ok(Limit { soft: target, hard, raised_from: Some(soft) })
}

/// Raises the limit, logs it once, and sets the client-connection cap from it.
pub fn init(max_connections: usize) {
    match raise_limit() {
        Ok(limit) => {
            let cap = limit.client_cap();
            let _ = SLOTS.set(Arc::new(Semaphore::new(cap.min(Semaphore::MAX_PERMITS))));
            match limit.raised_from {
                Some(from) => tracing::info!(
                    soft = limit.soft,
                    hard = limit.hard,
                    previous = from,
                    "raised the open-file limit (RLIMIT_NOFILE) from {from} to {}",
                    limit.soft
                ),
                None => tracing::info!(
                    soft = limit.soft,
                    hard = limit.hard,
                    "open-file limit (RLIMIT_NOFILE): {} (the hard limit is {})",
                    limit.soft,
                    limit.hard
                ),
            }
            if cap < max_connections {
                tracing::warn!(
                    soft = limit.soft,
                    client_connections = cap,
                    reserve = RESERVE,
                    "the open-file limit caps client connections at {cap} (listeners allow {max_connections}): each may need a backend connection, and {RESERVE} descriptors stay free for health checks and the admin API; more clients wait in the accept backlog. Raise the hard limit (e.g. LimitNOFILE= in systemd, ulimit -Hn) for more"
                );
            }
        }
        Err(e) => tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE): {e}"),
    }
}

static SLOTS: OnceLock<Arc<Semaphore>> = OnceLock::new();

/// One permit per client connection, process-wide (all listeners), capped by the
/// open-file limit once [`init`] ran; unbounded before.
pub fn client_slots() -> &'static Arc<Semaphore> {
    SLOTS.get_or_init(|| Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)))
}

/// Whether `e` says the process or the system is out of file descriptors.
pub fn is_exhausted(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Rate-limits a repeated warning: at most one per `every`, saying how many were left
/// out since the previous one.
#[derive(Debug)]
pub struct Throttle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl Throttle {
    /// At most one warning per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        Throttle { every, last: None, suppressed: 0 }
    }

    /// `Some(n)` when a warning may be logged now (`n` = occurrences left out since the
    /// last one), `None` when this one is left out.
    pub fn allow(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn client_cap_leaves_the_reserve_and_a_descriptor_per_backend_connection() {
        let lim = |soft| Limit { soft, hard: soft, raised_from: None };
        assert_eq!(lim(400).client_cap(), 150);
        assert_eq!(lim(1024).client_cap(), 462);
        assert_eq!(lim(50).client_cap(), MIN_CLIENTS);
        assert_eq!(lim(1 << 20).client_cap(), ((1 << 20) - 100) / 2);
    }

    #[test]
    fn raising_the_limit_reaches_the_hard_limit() {
        let limit = raise_limit().expect("getrlimit works");
        assert!(limit.soft <= limit.hard || limit.hard == libc::RLIM_INFINITY);
        // Raised once, nothing left to raise.
        assert_eq!(raise_limit().unwrap().raised_from, None);
    }

    #[test]
    fn throttle_counts_what_it_leaves_out() {
        let mut t = Throttle::new(Duration::from_secs(60));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.last = Some(std::time::Instant::now() - Duration::from_secs(61));
        assert_eq!(t.allow(), Some(2));
    }

    #[test]
    fn emfile_and_enfile_are_the_gateways_shortage() {
        assert!(is_exhausted(&std::io::Error::from_raw_os_error(libc::EMFILE)));
        assert!(is_exhausted(&std::io::Error::from_raw_os_error(libc::ENFILE)));
        assert!(!is_exhausted(&std::io::Error::from_raw_os_error(libc::ECONNREFUSED)));
    }
}
