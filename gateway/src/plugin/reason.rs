//! The short text a plugin may attach to a decision (`request.set-reason`). A decision
//! without one carries a null pointer: nothing is allocated or copied for it.

use std::fmt;

/// Bytes of a reason kept; longer text is cut at a character boundary.
pub const MAX_DECISION_REASON_BYTES: usize = 128;

/// A decision's reason: at most [`MAX_DECISION_REASON_BYTES`] of UTF-8.
#[derive(Clone, PartialEq, Eq)]
pub struct Reason(Box<str>);

impl Reason {
    /// `text`, cut to [`MAX_DECISION_REASON_BYTES`] at a character boundary.
    pub fn new(text: &str) -> Reason {
        let mut end = text.len().min(MAX_DECISION_REASON_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Reason(text[..end].into())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        assert_eq!(Reason::new("zone eu: 3 healthy").as_str(), "zone eu: 3 healthy");
        let long = format!("{}é and more", "a".repeat(127));
        let cut = Reason::new(&long);
        // `é` is two bytes and would end at 129: it is left out whole.
        assert_eq!(cut.as_str(), "a".repeat(127));
        assert_eq!(Reason::new(&"b".repeat(300)).as_str().len(), MAX_DECISION_REASON_BYTES);
        assert_eq!(Reason::new("").as_str(), "");
    }
}
