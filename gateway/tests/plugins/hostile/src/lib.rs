//! Test plugin that hands the gateway more than it takes. What, by params:
//! - `{"in": "headers"}`: every `pick` adds 10,000 response headers;
//! - `{"in": "reject-body"}`: every `pick` rejects with a 100 MB body;
//! - `{"in": "kv-bomb"}`: every `pick` writes 1,000 new keys of 1 KiB each (forever);
//! - `{"in": "counter-bomb"}`: every `pick` makes 1,000 new counters.
//!
//! Between its bombs it answers like a round robin, so a request it does answer is
//! served.
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};

#[derive(Default)]
pub struct Hostile {
    mode: Mode,
    pool: Pool,
}

#[derive(Default, PartialEq)]
enum Mode {
    #[default]
    Headers,
    RejectBody,
    KvBomb,
    CounterBomb,
}

impl Strategy for Hostile {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        self.mode = if params.contains("\"reject-body\"") {
            Mode::RejectBody
        } else if params.contains("\"kv-bomb\"") {
            Mode::KvBomb
        } else if params.contains("\"counter-bomb\"") {
            Mode::CounterBomb
        } else {
            Mode::Headers
        };
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        self.pool = Pool::new(backends);
    }

    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        let turn = host::counter_add("turn", 1) as u64;
        let next = || self.pool.healthy_nth(turn, exclude).map_or_else(Decision::no_backend, Decision::backend);
        match self.mode {
            Mode::Headers => {
                let mut d = next();
                for i in 0..10_000 {
                    d = d.with_header(format!("x-bomb-{i}"), "x".repeat(16));
                }
                d
            }
            Mode::RejectBody => Decision::reject(403, "x".repeat(100 << 20)),
            Mode::KvBomb => {
                let value = "v".repeat(1024);
                for i in 0..1_000 {
                    host::kv_set(&format!("bomb-{turn}-{i}"), &value, 0);
                }
                next()
            }
            Mode::CounterBomb => {
                for i in 0..1_000 {
                    host::counter_add(&format!("bomb-{turn}-{i}"), 1);
                }
                next()
            }
        }
    }
}

gateway_sdk::export_strategy!(Hostile);
