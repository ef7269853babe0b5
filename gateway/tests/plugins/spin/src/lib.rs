//! Test plugin: loops forever in `pick`; only the gateway's deadline stops it.
use gateway_sdk::{Backend, Decision, Request, Strategy, host};

#[derive(Default)]
pub struct Spin;

impl Strategy for Spin {
    fn pool_changed(&mut self, _generation: u64, _backends: Vec<Backend>) {}
    fn pick(&mut self, _req: &dyn Request, _exclude: &[u32]) -> Decision {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(host::random_u64() | 1));
            if n == 0 {
                return Decision::backend(0);
            }
        }
    }
}

gateway_sdk::export_strategy!(Spin);
