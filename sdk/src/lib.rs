//! Write a backend-selection strategy for the gateway.
//!
//! A strategy is a type that implements [`Strategy`], plus one line that exports it:
//!
//! ```ignore
//! use gateway_sdk::{Backend, Decision, Pool, Request, Strategy, host};
//!
//! #[derive(Default)]
//! struct RoundRobin { pool: Pool }
//!
//! impl Strategy for RoundRobin {
//!     fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
//!         self.pool = Pool::new(backends);
//!     }
//!     fn pick(&mut self, _req: &dyn Request, exclude: &[u32]) -> Decision {
//!         let turn = host::counter_add("turn", 1) - 1;
//!         self.pool.healthy_nth(turn as u64, exclude).map_or_else(Decision::no_backend, Decision::backend)
//!     }
//! }
//!
//! gateway_sdk::export_strategy!(RoundRobin);
//! ```
//!
//! Helpers most strategies need: [`params`] (read the JSON params with errors an operator
//! can act on), [`hash`] (a hash that is the same on every replica, for consistent
//! hashing), [`weights`] (gcd reduction, cumulative weights, unbiased random ranges) and
//! [`Pool`] (healthy backends, exclusion on retries).
//!
//! Build it for `wasm32-unknown-unknown` (no WASI) and wrap it as a component; the
//! gateway's build does this for everything under `plugins/`. On a native target the
//! same code compiles against an in-process [`host`] so strategies can be unit tested
//! without Wasm (see [`TestRequest`]).
#![deny(missing_docs)]
// wit-bindgen's export glue is `unsafe` by necessity; our own code uses none.
#![allow(unsafe_code)]

mod pool;
mod request;

pub mod hash;
pub mod host;
pub mod params;
pub mod weights;

pub use pool::Pool;
pub use request::{Request, TestRequest};

/// Bindings generated from `wit/selector.wit`. Plugin code rarely needs them directly.
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "selector",
        pub_export_macro: true,
        export_macro_name: "__export_selector",
        default_bindings_module: "gateway_sdk::bindings",
        generate_all,
    });
}

pub use bindings::gateway::selector::types::{Backend, BackendStats};

/// A strategy's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Where the request goes.
    pub target: Target,
    /// Headers added to the response the client gets (e.g. `set-cookie`).
    pub response_headers: Vec<(String, String)>,
    /// Why, in a few words (see [`Decision::with_reason`]).
    pub reason: Option<String>,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The backend at this index of the list last given to [`Strategy::pool_changed`].
    Backend(u32),
    /// Answer the client directly with this status and body.
    Reject(u16, String),
    /// No opinion: the next strategy of the upstream's chain decides (after the last
    /// one, the gateway's round robin).
    Pass,
}

impl Decision {
    /// Send the request to the backend at `index` (into the list of the last `pool_changed`).
    pub fn backend(index: u32) -> Self {
        Decision { target: Target::Backend(index), response_headers: Vec::new(), reason: None }
    }

    /// Answer the client directly with `status` and `body`.
    pub fn reject(status: u16, body: impl Into<String>) -> Self {
        Decision { target: Target::Reject(status, body.into()), response_headers: Vec::new(), reason: None }
    }

    /// `503`: no healthy backend that this request has not already tried.
    pub fn no_backend() -> Self {
        Self::reject(503, "no healthy backend available")
    }

    /// No opinion on this request: the next strategy of the chain decides
    /// (`strategy: [{plugin: a}, {plugin: b}]`), or the gateway's round robin after the
    /// last one.
    pub fn pass() -> Self {
        Decision { target: Target::Pass, response_headers: Vec::new(), reason: None }
    }

    /// Adds a header to the response the client receives (e.g. `set-cookie`).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.response_headers.push((name.into(), value.into()));
        self
    }

    /// Says why, in a few words (`"zone eu: 3 healthy"`): the gateway writes it to the
    /// access log and, for a client allowed to ask (`X-Gateway-Debug: 1`), to the
    /// `X-Gateway-Decision` response header. At most 128 bytes are kept. Costs one host
    /// call; leave it out on a hot path that needs no explaining.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The chosen backend's index, if the decision names one.
    pub fn backend_index(&self) -> Option<u32> {
        match self.target {
            Target::Backend(i) => Some(i),
            Target::Reject(..) | Target::Pass => None,
        }
    }

    /// Whether the strategy passed (no opinion).
    pub fn is_pass(&self) -> bool {
        self.target == Target::Pass
    }
}

/// Hands a [`Decision`] to the gateway: headers, a rejection's text and the reason
/// through the request, the target as plain numbers. Used by [`export_strategy!`].
#[doc(hidden)]
pub fn answer(
    req: &bindings::gateway::selector::types::Request,
    decision: Decision,
) -> bindings::gateway::selector::types::Decision {
    use bindings::gateway::selector::types::Decision as Wit;
    for (name, value) in &decision.response_headers {
        req.add_response_header(name, value);
    }
    if let Some(reason) = &decision.reason {
        req.set_reason(reason);
    }
    match decision.target {
        Target::Backend(i) => Wit::Backend(i),
        Target::Reject(status, body) => {
            if !body.is_empty() {
                req.set_reject_body(&body);
            }
            Wit::Reject(status)
        }
        Target::Pass => Wit::Pass,
    }
}

/// Makes a panic's message reach the operator: installs (once per instance) a panic
/// hook that writes `panicked at FILE:LINE:COLUMN: MESSAGE` with [`host::log`] at
/// [`host::level::ERROR`] before the panic aborts. The gateway attaches the last error
/// logged in a call to the trap that ends it, so the failure's log line reads
/// `pick: wasm trap: ...; the plugin said: panicked at src/lib.rs:42:9: ...`.
///
/// [`export_strategy!`] calls it from `configure`, which the gateway always calls first
/// on a new instance: no cost per `pick`. On a native target (unit tests) it does
/// nothing, so the test harness reports panics as usual.
#[doc(hidden)]
pub fn install_panic_hook() {
    #[cfg(target_family = "wasm")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| std::panic::set_hook(Box::new(|info| host::log(host::level::ERROR, &panic_text(info)))));
    }
}

/// `panicked at FILE:LINE:COLUMN: MESSAGE`, as Rust's default hook words it (on one line).
#[cfg_attr(not(target_family = "wasm"), allow(dead_code))]
fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    let message = info.payload_as_str().unwrap_or("(a panic payload that is not text)");
    match info.location() {
        Some(at) => format!("panicked at {}:{}:{}: {message}", at.file(), at.line(), at.column()),
        None => format!("panicked: {message}"),
    }
}

/// A backend-selection strategy. One value lives in each plugin instance; the gateway
/// keeps one instance per worker thread, so state that must be shared or must survive a
/// hot swap belongs in [`host`] (counters, key-value store), not in `self`.
pub trait Strategy: Default {
    /// Receives the route's params as JSON (`{}` when none). Return `Err` with a message
    /// an operator can act on to refuse bad params.
    fn configure(&mut self, params: &str) -> Result<(), String> {
        let _ = params;
        Ok(())
    }

    /// The upstream's backends changed. Precompute here what `pick` needs.
    fn pool_changed(&mut self, generation: u64, backends: Vec<Backend>);

    /// Choose a backend for `req`, avoiding the indexes in `exclude` (already tried),
    /// or [`Decision::pass`] to let the next strategy of a chain decide.
    fn pick(&mut self, req: &dyn Request, exclude: &[u32]) -> Decision;
}

/// Exports a [`Strategy`] type as the plugin's `policy`. Use it once per plugin crate.
///
/// A panic in the strategy traps the call (the gateway's fallback answers that request),
/// and its message reaches the gateway's log: `configure` installs a panic hook that
/// writes `panicked at FILE:LINE:COLUMN: MESSAGE` with [`host::log`] at error level,
/// which the gateway attaches to the trap's message.
#[macro_export]
macro_rules! export_strategy {
    ($ty:ty) => {
        const _: () = {
            ::std::thread_local! {
                static STRATEGY: ::core::cell::RefCell<$ty> =
                    ::core::cell::RefCell::new(<$ty as ::core::default::Default>::default());
            }

            // Natively (unit tests) nothing is exported, so `Export` is only type-checked.
            #[allow(dead_code)]
            struct Export;

            impl $crate::bindings::exports::gateway::selector::policy::Guest for Export {
                fn configure(params: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                    // Once per instance, before any of the strategy's code runs.
                    $crate::install_panic_hook();
                    STRATEGY.with(|s| $crate::Strategy::configure(&mut *s.borrow_mut(), &params))
                }

                fn pool_changed(generation: u64, backends: ::std::vec::Vec<$crate::Backend>) {
                    STRATEGY.with(|s| $crate::Strategy::pool_changed(&mut *s.borrow_mut(), generation, backends))
                }

                fn pick(
                    req: &$crate::bindings::gateway::selector::types::Request,
                    tried: u32,
                ) -> $crate::bindings::gateway::selector::types::Decision {
                    // The list crosses only on a retry: a first attempt costs no copy.
                    let exclude = if tried == 0 { ::std::vec::Vec::new() } else { req.tried() };
                    let decision = STRATEGY.with(|s| $crate::Strategy::pick(&mut *s.borrow_mut(), req, &exclude));
                    $crate::answer(req, decision)
                }
            }

            // Only a Wasm build exports the glue: on a native target the symbol names
            // (`cabi_post_gateway:selector/policy@0.3.0#configure`, ...) are not valid in a
            // linker version script, so a `cdylib` plugin crate would fail to link for
            // its unit tests.
            #[cfg(target_family = "wasm")]
    $crate::bindings::__export_selector!(Export with_types_in $crate::bindings);
        };
    };
}
