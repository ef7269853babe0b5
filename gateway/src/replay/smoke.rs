//! `gateway plugin check --smoke`: a plugin called as traffic would call it, on the
//! replay's pool format, so a plugin that only fails when called fails before it ships.

use super::{build_pool, read_pool};
use crate::plugin::{Binding, Decision, Target};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// The pool `gateway plugin check --smoke` uses when none is given: three healthy
/// backends in two zones, with labels, and one that is down.
const SMOKE_POOL: &str = "\
- { id: b1, address: 10.0.0.1:8080, zone: eu-west, labels: { role: api, canary: \"false\" } }
- { id: b2, address: 10.0.0.2:8080, zone: us-east, weight: 2, labels: { role: api } }
- { id: b3, address: 10.0.0.3:8080, zone: eu-west, labels: { role: static, canary: \"true\" } }
- { id: b4, address: 10.0.0.4:8080, zone: us-east, healthy: false }
";

/// A sample request of the smoke test.
struct Sample {
    method: &'static str,
    path: &'static str,
    client: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

/// Sample requests for the smoke test.
const SMOKE_REQUESTS: [Sample; 4] = [
    Sample {
        method: "GET",
        path: "/",
        client: "203.0.113.7",
        headers: &[("host", "shop.example"), ("user-agent", "curl/8.5")],
    },
    Sample {
        method: "GET",
        path: "/book/dune?user=42&lang=en",
        client: "198.51.100.23",
        headers: &[
            ("host", "shop.example"),
            ("cookie", "session=abc123; lb=b1"),
            ("x-user-id", "42"),
            ("accept", "text/html"),
        ],
    },
    Sample {
        method: "POST",
        path: "/api/orders",
        client: "2001:db8::1",
        headers: &[("host", "api.example"), ("content-type", "application/json"), ("x-tenant", "acme")],
    },
    Sample {
        method: "GET",
        path: "/static/app.js",
        client: "192.0.2.200",
        headers: &[("host", "cdn.example"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")],
    },
];

/// `gateway plugin check --smoke`: pushes a pool (`pool`, or a sample one) to a fresh
/// instance of `binding` (`configure` has run), then asks `pick` for a few sample
/// requests and a retry that excludes the first answer. Returns what it did, line by
/// line, or the first failure with the plugin's own message.
pub fn smoke(binding: &Arc<Binding>, pool: Option<&Path>) -> Result<Vec<String>, String> {
    let backends = match pool {
        Some(path) => read_pool(path).map_err(|e| format!("{e:#}"))?,
        None => serde_yaml::from_str(SMOKE_POOL).expect("the sample pool parses"),
    };
    let (pool, _held) = build_pool(&backends, &[]);
    let mut done = Vec::new();
    binding
        .warm(&pool)
        .map_err(|e| format!("configure/pool-changed with {} backends failed: {e}", pool.members.len()))?;
    done.push(format!("pool-changed: accepted {} backends ({} healthy)", pool.members.len(), pool.healthy_count));
    let describe = |d: &Decision| match &d.target {
        Target::Backend(i) => {
            let m = &pool.members[*i as usize];
            let down = if m.status.healthy() { "" } else { " (which is down: a strategy should skip it)" };
            format!("backend {}{down}", m.entry.id)
        }
        Target::Reject(status, body) => format!("reject {status} {body:?}"),
        Target::Pass => "pass (the next step of a chain, or the round robin, decides)".to_owned(),
    };
    let mut first = None;
    for (n, Sample { method, path, client, headers }) in SMOKE_REQUESTS.iter().enumerate() {
        let mut builder = http::Request::builder().method(*method).uri(*path);
        for (k, v) in *headers {
            builder = builder.header(*k, *v);
        }
        let mut parts = builder.body(()).expect("a valid sample request").into_parts().0;
        let client: IpAddr = client.parse().expect("a valid sample address");
        let what = format!("pick #{} ({method} {path} from {client})", n + 1);
        let d = binding.pick(&mut parts, client, &pool, &[]).map_err(|e| format!("{what} failed: {e}"))?;
        if let (None, Target::Backend(i)) = (&first, &d.target) {
            first = Some((*i, parts.clone(), client));
        }
        let headers: Vec<String> = d.response_headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let headers =
            if headers.is_empty() { String::new() } else { format!(", response headers [{}]", headers.join("; ")) };
        done.push(format!("{what}: {}{headers}", describe(&d)));
    }
    if let Some((index, mut parts, client)) = first {
        let id = &pool.members[index as usize].entry.id;
        let what = format!("retry excluding {id}");
        let d = binding.pick(&mut parts, client, &pool, &[index]).map_err(|e| format!("{what} failed: {e}"))?;
        if d.target == Target::Backend(index) {
            return Err(format!(
                "{what}: picked {id} again; a retry must choose another backend (request.tried lists them)"
            ));
        }
        done.push(format!("{what}: {}", describe(&d)));
    }
    Ok(done)
}
