//! Test plugin: a working round robin that also imports WASI sockets and filesystem
//! interfaces (calling them when its params say `{"phone-home": true}`), which the
//! gateway must refuse to load.
#![allow(unsafe_code)]
wit_bindgen::generate!({ path: "wit", world: "caps", generate_all });

use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};

#[derive(Default)]
pub struct Caps {
    pool: Pool,
}

impl Strategy for Caps {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        if params.contains("phone-home") {
            let socket = wasi::sockets::tcp::connect("203.0.113.1:80");
            let file = wasi::filesystem::types::open("/etc/passwd");
            host::log(host::level::INFO, &format!("{socket} {file}"));
        }
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        self.pool = Pool::new(backends);
    }

    fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
        let turn = host::counter_add("turn", 1) - 1;
        self.pool.healthy_nth(turn as u64, exclude).map_or_else(Decision::no_backend, Decision::backend)
    }
}

gateway_sdk::export_strategy!(Caps);
