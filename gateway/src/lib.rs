//! A load-balancing gateway whose per-request backend choice is made by WebAssembly
//! components. The modules follow the request path:
//! `server` (listeners) → `router` → `upstream` → `select` (→ `plugin`) → `proxy`,
//! with `pool` the shared state that `health` and `discovery` write and everything else reads.

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod config;
pub mod debounce;
pub mod demo;
pub mod discovery;
pub mod fds;
pub mod gateway;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod plugin;
pub mod pool;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod replay;
pub mod router;
pub mod scaffold;
pub mod select;
pub mod server;
pub mod upstream;
pub mod view;
