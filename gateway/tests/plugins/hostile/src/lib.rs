//! Test plugin that hands the gateway more than it takes. What, by params:
//! - `{"in": "headers"}`: every `pick` adds 10,000 response headers;
//! - `{"in": "reject-body"}`: every `pick` rejects with a 100 MB body;
//! - `{"in": "kv-bomb"}`: every `pick` writes 1,000 new keys of 1 KiB each (forever);
//! - `{"in": "counter-bomb"}`: every `pick` makes 1,000 new counters;
//! - `{"in": "log-flood"}`: every `pick` writes 1,000 log lines (`flood N`, warn);
//! - `{"in": "answer"}`: every `pick` answers what the request's `x-answer` header
//!   spells (hex; see [`answer`]), valid or not: the answer fuzzer's plugin.
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
    LogFlood,
    Answer,
}

impl Strategy for Hostile {
    fn configure(&mut self, params: &str) -> Result<(), String> {
        self.mode = if params.contains("\"reject-body\"") {
            Mode::RejectBody
        } else if params.contains("\"kv-bomb\"") {
            Mode::KvBomb
        } else if params.contains("\"counter-bomb\"") {
            Mode::CounterBomb
        } else if params.contains("\"log-flood\"") {
            Mode::LogFlood
        } else if params.contains("\"answer\"") {
            Mode::Answer
        } else {
            Mode::Headers
        };
        Ok(())
    }

    fn pool_changed(&mut self, _generation: u64, backends: Vec<Backend>) {
        self.pool = Pool::new(backends);
    }

    fn pick(&mut self, req: &dyn Request, exclude: &[u32]) -> Decision {
        let turn = host::counter_add("turn", 1) as u64;
        let next = || self.pool.healthy_nth(turn, exclude).map_or_else(Decision::no_backend, Decision::backend);
        match self.mode {
            Mode::Answer => {
                req.header("x-answer").and_then(|hex| answer(&hex)).unwrap_or_else(|| Decision::reject(599, ""))
            }
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
            Mode::LogFlood => {
                for i in 0..1_000 {
                    host::log(host::level::WARN, &format!("flood {turn}-{i}"));
                }
                next()
            }
        }
    }
}

/// The decision that `hex` spells: its bytes are a kind (0: backend, 1: reject), a u32
/// (the backend index, or the status, which is cut to u16), a u32 reject body length (the
/// body is that many `r`s), a u16 header count, then for each header a u16 name length,
/// the name, a u16 value length and the value (UTF-8). Integers are little-endian.
fn answer(hex: &str) -> Option<Decision> {
    let bytes: Vec<u8> =
        (0..hex.len() / 2).map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect::<Option<_>>()?;
    let mut at = 0;
    let mut take = |n: usize| {
        let b = bytes.get(at..at + n)?;
        at += n;
        Some(b)
    };
    let kind = take(1)?[0];
    let number = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let body = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let mut d = match kind {
        0 => Decision::backend(number),
        _ => Decision::reject(number as u16, "r".repeat(body)),
    };
    let count = u16::from_le_bytes(take(2)?.try_into().ok()?);
    for _ in 0..count {
        let n = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let name = String::from_utf8(take(n)?.to_vec()).ok()?;
        let n = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let value = String::from_utf8(take(n)?.to_vec()).ok()?;
        d = d.with_header(name, value);
    }
    Some(d)
}

gateway_sdk::export_strategy!(Hostile);
