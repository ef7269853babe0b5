//! `round-robin`: each healthy backend in turn, exact across the gateway's worker
//! threads because the turn counter lives in the host.

use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host, params};

#[derive(Default)]
pub struct RoundRobin {
    pool: Pool,
}

impl Strategy for RoundRobin {
    /// Takes no params: refusing unknown ones catches typos such as `wieght`.
    fn configure(&mut self, params: &str) -> Result<(), String> {
        params::expect_none(params)
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        self.pool = Pool::new(backends);
    }

    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        let turn = host::counter_add("turn", 1) - 1;
        self.pool.healthy_nth(turn as u64, exclude).map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_sdk::TestRequest;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                id: format!("b{i}"),
                address: format!("127.0.0.1:{}", 9000 + i),
                weight: 1,
                zone: String::new(),
                labels: vec![],
                healthy: true,
            })
            .collect()
    }

    #[test]
    fn cycles_through_backends_and_skips_excluded() {
        host::reset();
        let mut rr = RoundRobin::default();
        rr.pool_changed(1, backends(3));
        let req = TestRequest::new();
        let picks: Vec<_> = (0..6).map(|_| rr.pick(&req, &[]).backend_index().unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        // Turn 7 would be backend 0; a retry that already tried 0 gets 1.
        assert_eq!(rr.pick(&req, &[0]).backend_index(), Some(1));
        assert_eq!(rr.pick(&req, &[0, 1, 2]).backend_index(), None);
    }

    #[test]
    fn params_are_refused() {
        let mut rr = RoundRobin::default();
        assert!(rr.configure("{}").is_ok());
        assert_eq!(
            rr.configure(r#"{"wieght": 2}"#).unwrap_err(),
            "unknown param 'wieght': this strategy takes no params"
        );
    }
}
