//! Reliability suite, fuzzing the validation of a plugin's answer (docs/reliability.md,
//! table 6): a real plugin component (`tests/plugins/hostile` in its `answer` mode)
//! hands the gateway whatever answer the case spells (a backend index in or out of range,
//! one the request already tried, a reject status in or out of 100–599, a reject body
//! around its cap, up to 70 response headers with framing, hop-by-hop, invalid or long
//! names and values), through the real host (`PluginHost`, `Selector`) with no sockets.
//!
//! Properties: the gateway never panics; it takes exactly the valid answers (others are
//! bad answers, and the fallback chooses); and the client never gets a header that
//! sets the response's framing or a hop-by-hop field. Bounded (a few hundred cases,
//! seconds); cases that ever failed are kept in `proptest-regressions/` and run first.

use gateway::config;
use gateway::plugin::{Origin, PluginHost};
use gateway::pool::{BackendEntry, Member, Pool, PoolSnapshot, Source, Status};
use gateway::select::{Choice, Selector, Why};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What the gateway takes from one `pick` (`plugin/bindings.rs`).
const MAX_HEADERS: usize = 64;
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_REJECT_BODY: usize = 64 * 1024;

/// Header names a client must never get from a plugin: they set the framing of the
/// response or belong to one connection (the proxy strips the same from a backend's).
const FRAMING: [&str; 11] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "host",
    "proxy-authenticate",
    "proxy-authorization",
];

/// One host, the hostile plugin compiled once, and a binding per pool size (a plugin
/// instance keeps its pool view; a binding per size keeps generations apart).
fn selector(members: usize) -> &'static (Selector, Arc<PoolSnapshot>) {
    static SELECTORS: OnceLock<Vec<(Selector, Arc<PoolSnapshot>)>> = OnceLock::new();
    &SELECTORS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gateway-fuzz-answers-{}-none", std::process::id()));
        let cfg = config::Plugins {
            dir,
            // A loaded machine must not turn a valid answer into a timeout.
            deadline: Duration::from_secs(10),
            setup_deadline: Duration::from_secs(30),
            // Every case is judged on its own: no quarantine after bad answers in a row.
            quarantine: config::Quarantine { after: 0, ..Default::default() },
            ..Default::default()
        };
        let host = PluginHost::new(&cfg).expect("the plugin engine");
        let path = std::path::Path::new(env!("GATEWAY_TEST_PLUGINS")).join("hostile.wasm");
        let bytes = std::fs::read(&path).expect("the hostile test plugin");
        let plugin = host.compile("hostile", Origin::File(path), &bytes).expect("compile hostile.wasm");
        (1..=5)
            .map(|n| {
                let binding = host
                    .bind(&format!("fuzz-{n}"), plugin.clone(), &serde_json::json!({"in": "answer"}))
                    .expect("bind the answer mode");
                let pool = Pool::with_members(
                    (0..n)
                        .map(|i| {
                            let addr = SocketAddr::from(([10, 0, 0, i as u8], 8080));
                            let entry = BackendEntry::new(format!("b{i}"), addr, String::new(), vec![], Source::Static);
                            Member::new(Arc::new(entry), Status::UP, 1)
                        })
                        .collect(),
                );
                (Selector::new(binding), pool.snapshot())
            })
            .collect::<Vec<_>>()
    })[members - 1]
}

/// An answer as the plugin hands it over.
#[derive(Debug, Clone)]
struct Answer {
    /// A backend index, or (`reject`) a status.
    number: u32,
    reject: bool,
    body: usize,
    headers: Vec<(String, String)>,
}

impl Answer {
    /// The `x-answer` spelling the plugin decodes (see its `answer` function).
    fn hex(&self) -> String {
        let mut b = vec![u8::from(self.reject)];
        b.extend(self.number.to_le_bytes());
        b.extend((self.body as u32).to_le_bytes());
        b.extend((self.headers.len() as u16).to_le_bytes());
        for (n, v) in &self.headers {
            b.extend((n.len() as u16).to_le_bytes());
            b.extend(n.as_bytes());
            b.extend((v.len() as u16).to_le_bytes());
            b.extend(v.as_bytes());
        }
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "x-[a-z0-9-]{1,12}",
        2 => prop::sample::select(FRAMING.to_vec()).prop_map(str::to_owned),
        // The same in other cases.
        1 => prop::sample::select(FRAMING.to_vec()).prop_map(|n| n.to_uppercase()),
        1 => Just("Set-Cookie".to_owned()),
        // Not a header name: empty, spaces, colons, controls, non-ASCII.
        1 => prop_oneof![
            Just(String::new()),
            Just("content-length ".to_owned()),
            Just(" connection".to_owned()),
            Just("x:y".to_owned()),
            Just("x\r\nx-injected".to_owned()),
            "\\PC{1,6}",
        ],
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[ -~]{0,24}",
        // Response splitting and other invalid bytes.
        1 => Just("a\r\nx-injected: 1".to_owned()),
        1 => Just("nul\0byte".to_owned()),
        1 => "\\PC{0,8}",
        // Long: a few of these pass the byte cap.
        1 => (2000usize..9000).prop_map(|n| "v".repeat(n)),
    ]
}

fn answer(members: usize) -> impl Strategy<Value = Answer> {
    let number = prop_oneof![
        6 => 0u32..(members as u32 + 2),
        1 => Just(u32::MAX),
        4 => prop::sample::select(vec![0u32, 99, 100, 200, 302, 403, 429, 503, 599, 600, 999, 65535, 65536 + 200]),
    ];
    let body = prop_oneof![
        4 => 0usize..64,
        1 => prop::sample::select(vec![MAX_REJECT_BODY - 1, MAX_REJECT_BODY, MAX_REJECT_BODY + 1, 200_000]),
    ];
    let headers = prop_oneof![
        8 => prop::collection::vec((header_name(), header_value()), 0..8),
        1 => prop::collection::vec((header_name(), "[a-z]{0,4}"), 60..70),
    ];
    (number, any::<bool>(), body, headers).prop_map(|(number, reject, body, headers)| Answer {
        number,
        reject,
        body,
        headers,
    })
}

/// A single strategy decided and gave no reason.
fn decided() -> Why {
    Why::Step { step: 0, reason: None }
}

/// What the gateway must make of `a` for a request that already tried `tried`: the
/// choice, or None for a bad answer (the fallback chooses).
fn expected(a: &Answer, members: usize, tried: &[u32]) -> Option<Choice> {
    let bytes: usize = a.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    if a.headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return None;
    }
    let kept: Vec<(String, String)> =
        a.headers.iter().filter(|(n, _)| !FRAMING.iter().any(|f| n.eq_ignore_ascii_case(f))).cloned().collect();
    if a.reject {
        // The WIT status is a u16.
        let status = a.number as u16;
        if !(100..=599).contains(&status) || a.body > MAX_REJECT_BODY {
            return None;
        }
        return Some(Choice::Reject { status, text: "r".repeat(a.body), response_headers: kept, why: decided() });
    }
    if a.number as usize >= members || tried.contains(&a.number) {
        return None;
    }
    Some(Choice::Backend { index: a.number as usize, response_headers: kept, fallback: false, why: decided() })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn the_gateway_takes_exactly_the_valid_answers_and_never_forwards_a_framing_header(
        (members, a, tried) in (1usize..=5).prop_flat_map(|m| (Just(m), answer(m), prop::collection::vec(0..m as u32, 0..2)))
    ) {
        let (sel, snap) = selector(members);
        let mut tried = tried;
        tried.dedup();
        if tried.len() >= members {
            tried.pop();
        }
        let mut parts = http::Request::get("/").header("x-answer", a.hex()).body(()).unwrap().into_parts().0;
        let failures = sel.binding().failures();
        let client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let got = sel.choose(&mut parts, client, snap, &tried);
        let bad_answer = sel.binding().failures() > failures;
        match expected(&a, members, &tried) {
            Some(want) => {
                prop_assert!(!bad_answer, "a valid answer was refused: {a:?}");
                prop_assert_eq!(&got, &want);
            }
            None => {
                let fell_back = matches!(got, Choice::Backend { fallback: true, ref response_headers, .. } if response_headers.is_empty());
                prop_assert!(fell_back, "an invalid answer was taken: {a:?} -> {got:?}");
                // Out-of-range indexes and caps are counted as failures; an index the
                // request already tried is refused by the selector, counted apart.
                if !tried.contains(&a.number) || a.reject {
                    prop_assert!(bad_answer, "not counted as a bad answer: {a:?}");
                }
            }
        }
        // What the client would get (the proxy adds the headers that are valid HTTP).
        let headers = match &got {
            Choice::Backend { response_headers, .. } | Choice::Reject { response_headers, .. } => response_headers.clone(),
            Choice::NoBackend => Vec::new(),
        };
        for (n, v) in headers {
            if let (Ok(n), Ok(_)) = (http::HeaderName::try_from(n), http::HeaderValue::try_from(v)) {
                prop_assert!(!FRAMING.contains(&n.as_str()), "{n} reached the client");
            }
        }
    }
}
