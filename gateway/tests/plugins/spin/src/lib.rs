//! Test plugin that loops forever; only the gateway's deadline stops it. Where, by params:
//! - `{}` (default): in `pick`;
//! - `{"in": "pool-changed"}`: in every `pool-changed` (it then picks in turn);
//! - `{"in": "pool-changed-when-degraded"}`: in `pool-changed` while any backend is down;
//! - `{"in": "configure"}`: in `configure`, so no instance is ever ready;
//! - `{"in": "pick-memory"}`: in `pick`, allocating memory until the limit stops it.
use gateway_sdk::{Backend, Decision, Request, Strategy, host};

#[derive(Default)]
pub struct Spin {
    mode: Mode,
    healthy: Vec<u32>,
    turn: usize,
}

#[derive(Default, PartialEq)]
enum Mode {
    #[default]
    Pick,
    PoolChanged,
    WhenDegraded,
    PickMemory,
}

fn spin() {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(host::random_u64() | 1));
        if n == 0 {
            return;
        }
    }
}

impl Strategy for Spin {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        if params.contains("\"configure\"") {
            spin();
        }
        self.mode = if params.contains("\"pick-memory\"") {
            Mode::PickMemory
        } else if params.contains("\"pool-changed-when-degraded\"") {
            Mode::WhenDegraded
        } else if params.contains("\"pool-changed\"") {
            Mode::PoolChanged
        } else {
            Mode::Pick
        };
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        let degraded = backends.iter().any(|b| !b.healthy);
        if self.mode == Mode::PoolChanged || (self.mode == Mode::WhenDegraded && degraded) {
            spin();
        }
        self.healthy = backends.iter().enumerate().filter(|(_, b)| b.healthy).map(|(i, _)| i as u32).collect();
    }

    fn pick(&mut self, _req: &dyn Request, _exclude: &[u32]) -> Decision {
        if self.mode == Mode::PickMemory {
            let mut hog: Vec<Vec<u8>> = Vec::new();
            loop {
                hog.push(std::hint::black_box(vec![1u8; 1 << 20]));
            }
        }
        if self.mode == Mode::Pick || self.healthy.is_empty() {
            spin();
            return Decision::backend(0);
        }
        self.turn = self.turn.wrapping_add(1);
        Decision::backend(self.healthy[self.turn % self.healthy.len()])
    }
}

gateway_sdk::export_strategy!(Spin);
