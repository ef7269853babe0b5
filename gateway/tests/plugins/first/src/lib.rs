//! Test plugin: always the first healthy backend not yet tried. Behaves visibly unlike
//! round robin, for hot-swap tests.
use gateway_sdk::{Backend, Decision, Pool, Request, Strategy};

#[derive(Default)]
pub struct First {
    pool: Pool,
}

impl Strategy for First {
    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        self.pool = Pool::new(backends);
    }
    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        self.pool.healthy_nth(0, exclude).map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(First);
