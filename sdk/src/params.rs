//! Reading a strategy's params (the JSON object given to `configure`) with error
//! messages an operator can act on.
//!
//! Take each known param once, then call [`Params::finish`]: any param left over is
//! reported as unknown, together with the list of accepted ones.
//!
//! ```
//! use gateway_sdk::params::Params;
//!
//! fn configure(json: &str) -> Result<(String, u64), String> {
//!     let mut p = Params::parse(json)?;
//!     let cookie = p.string("cookie")?.unwrap_or_else(|| "lb".into());
//!     let ttl = p.positive_u64("ttl_s")?.unwrap_or(3600);
//!     p.finish()?;
//!     Ok((cookie, ttl))
//! }
//!
//! assert_eq!(configure(r#"{"ttl_s": 60}"#).unwrap(), ("lb".into(), 60));
//! assert_eq!(
//!     configure(r#"{"ttl_s": "1h"}"#).unwrap_err(),
//!     "param 'ttl_s': expected a positive integer, got the string \"1h\""
//! );
//! assert_eq!(
//!     configure(r#"{"ttl": 60}"#).unwrap_err(),
//!     "unknown param 'ttl' (accepted: cookie, ttl_s)"
//! );
//! ```

use serde_json::{Map, Value};

/// The params of one `configure` call. See the [module docs](self).
#[derive(Debug)]
pub struct Params {
    map: Map<String, Value>,
    accepted: Vec<&'static str>,
}

impl Params {
    /// Parses `json`, which must be a JSON object (an empty string or `null` counts as
    /// `{}`).
    pub fn parse(json: &str) -> Result<Self, String> {
        let trimmed = json.trim();
        let value = if trimmed.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(trimmed).map_err(|e| format!("params are not valid JSON: {e}"))?
        };
        let map = match value {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => {
                return Err(format!("params must be a JSON object of name: value, got {}", describe(&other)));
            }
        };
        Ok(Params { map, accepted: Vec::new() })
    }

    /// Removes and returns the raw value of `name` (`None` when absent or `null`).
    pub fn take(&mut self, name: &'static str) -> Option<Value> {
        self.accepted.push(name);
        self.map.remove(name).filter(|v| !v.is_null())
    }

    /// A string param.
    pub fn string(&mut self, name: &'static str) -> Result<Option<String>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(expected(name, "a string", &other)),
        }
    }

    /// A string param that must not be empty (after trimming spaces, which are removed).
    pub fn non_empty_string(&mut self, name: &'static str) -> Result<Option<String>, String> {
        match self.string(name)? {
            Some(s) if s.trim().is_empty() => Err(format!("param '{name}': expected a non-empty string, got \"{s}\"")),
            s => Ok(s.map(|s| s.trim().to_owned())),
        }
    }

    /// A string param that must be one of `allowed`.
    pub fn one_of(&mut self, name: &'static str, allowed: &[&str]) -> Result<Option<String>, String> {
        match self.string(name)? {
            Some(s) if !allowed.contains(&s.as_str()) => {
                Err(format!("param '{name}': expected one of {}, got \"{s}\"", quoted_list(allowed)))
            }
            s => Ok(s),
        }
    }

    /// A non-negative integer param.
    pub fn u64(&mut self, name: &'static str) -> Result<Option<u64>, String> {
        self.integer(name, 0, "a non-negative integer")
    }

    /// An integer param of at least 1.
    pub fn positive_u64(&mut self, name: &'static str) -> Result<Option<u64>, String> {
        self.integer(name, 1, "a positive integer")
    }

    fn integer(&mut self, name: &'static str, min: u64, what: &str) -> Result<Option<u64>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v >= min => Ok(Some(v)),
                _ => Err(format!("param '{name}': expected {what}, got {n}")),
            },
            Some(other) => Err(expected(name, what, &other)),
        }
    }

    /// An object param whose values are all strings, as `(key, value)` pairs sorted by
    /// key.
    pub fn string_map(&mut self, name: &'static str) -> Result<Option<Vec<(String, String)>>, String> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Object(map)) => map
                .into_iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k, s)),
                    other => {
                        Err(format!("param '{name}': the value of \"{k}\" must be a string, got {}", describe(&other)))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(other) => Err(expected(name, "an object of string values, e.g. {\"key\": \"value\"}", &other)),
        }
    }

    /// Fails if any param was not taken, naming it and listing the accepted ones.
    pub fn finish(self) -> Result<(), String> {
        let Some(unknown) = self.map.keys().next() else {
            return Ok(());
        };
        if self.accepted.is_empty() {
            return Err(format!("unknown param '{unknown}': this strategy takes no params"));
        }
        Err(format!("unknown param '{unknown}' (accepted: {})", self.accepted.join(", ")))
    }
}

/// Checks the params of a strategy that takes none: `{}`, `null` or nothing is accepted;
/// anything else is an error naming the first param.
///
/// It does not use a JSON parser, so a strategy without params does not carry one in
/// its Wasm (about 50 KB).
pub fn expect_none(json: &str) -> Result<(), String> {
    let t = json.trim();
    if t.is_empty() || t == "null" {
        return Ok(());
    }
    let Some(body) = t.strip_prefix('{').and_then(|b| b.strip_suffix('}')) else {
        return Err(format!("params must be a JSON object of name: value, got {t}"));
    };
    let body = body.trim_start();
    if body.is_empty() {
        return Ok(());
    }
    // The first key: a JSON string at the start of the object's body.
    let name = body
        .strip_prefix('"')
        .and_then(|rest| {
            let mut escaped = false;
            rest.find(|c| {
                let end = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                end
            })
            .map(|end| &rest[..end])
        })
        .unwrap_or(body);
    Err(format!("unknown param '{name}': this strategy takes no params"))
}

fn expected(name: &str, what: &str, got: &Value) -> String {
    format!("param '{name}': expected {what}, got {}", describe(got))
}

/// `the string "x"`, `the number 3`, `an object`, ...
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{s}\""),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn quoted_list(items: &[&str]) -> String {
    items.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_null_mean_no_params() {
        for json in ["", "  ", "{}", " { } ", "null"] {
            assert!(expect_none(json).is_ok(), "{json:?}");
        }
        assert_eq!(
            expect_none(r#"{ "a\"b": 1, "c": 2}"#).unwrap_err(),
            r#"unknown param 'a\"b': this strategy takes no params"#
        );
        assert_eq!(expect_none("[1]").unwrap_err(), "params must be a JSON object of name: value, got [1]");
    }

    #[test]
    fn non_objects_and_bad_json_are_refused() {
        assert_eq!(Params::parse("[1]").unwrap_err(), "params must be a JSON object of name: value, got an array");
        assert!(Params::parse("{").unwrap_err().starts_with("params are not valid JSON"));
    }

    #[test]
    fn unknown_params_are_named() {
        assert_eq!(
            expect_none(r#"{"weight": 3}"#).unwrap_err(),
            "unknown param 'weight': this strategy takes no params"
        );
        let mut p = Params::parse(r#"{"a": "x", "zz": 1}"#).unwrap();
        p.string("a").unwrap();
        p.u64("b").unwrap();
        assert_eq!(p.finish().unwrap_err(), "unknown param 'zz' (accepted: a, b)");
    }

    #[test]
    fn typed_getters_check_types_and_ranges() {
        let mut p =
            Params::parse(r#"{"s": 1, "n": -3, "z": 0, "f": 1.5, "e": " ", "o": "c", "m": {"k": 2}, "x": null}"#)
                .unwrap();
        assert_eq!(p.string("s").unwrap_err(), "param 's': expected a string, got the number 1");
        assert_eq!(p.u64("n").unwrap_err(), "param 'n': expected a non-negative integer, got -3");
        assert_eq!(p.positive_u64("z").unwrap_err(), "param 'z': expected a positive integer, got 0");
        assert_eq!(p.positive_u64("f").unwrap_err(), "param 'f': expected a positive integer, got 1.5");
        assert_eq!(p.non_empty_string("e").unwrap_err(), "param 'e': expected a non-empty string, got \" \"");
        assert_eq!(p.one_of("o", &["a", "b"]).unwrap_err(), "param 'o': expected one of \"a\", \"b\", got \"c\"");
        assert_eq!(p.string_map("m").unwrap_err(), "param 'm': the value of \"k\" must be a string, got the number 2");
        assert_eq!(p.string("x").unwrap(), None, "null counts as absent");
        assert_eq!(p.string("absent").unwrap(), None);
        p.finish().unwrap();
    }

    #[test]
    fn values_come_back() {
        let mut p =
            Params::parse(r#"{"s": "v", "n": 7, "o": "b", "m": {"k1": "v1", "k2": "v2"}, "e": " x "}"#).unwrap();
        assert_eq!(p.string("s").unwrap().as_deref(), Some("v"));
        assert_eq!(p.positive_u64("n").unwrap(), Some(7));
        assert_eq!(p.one_of("o", &["a", "b"]).unwrap().as_deref(), Some("b"));
        assert_eq!(p.non_empty_string("e").unwrap().as_deref(), Some("x"));
        let m = p.string_map("m").unwrap().unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.contains(&("k1".into(), "v1".into())));
        p.finish().unwrap();
    }
}
