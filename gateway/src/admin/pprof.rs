//! CPU profiles on demand, like Go's `net/http/pprof`.

use super::{AdminResponse, error};
use http::StatusCode;

/// `GET /debug/pprof/profile?seconds=N[&format=svg]`.
pub async fn profile(_query: &str) -> AdminResponse {
    error(StatusCode::NOT_IMPLEMENTED, "profiling is not built yet")
}
