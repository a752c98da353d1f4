//! What a peer controls must not control the log: text a client chose
//! (its name, a model name) is escaped and capped before it is logged, and
//! warnings a peer can provoke over and over are rate-limited with a count of
//! what was suppressed. This module must never decide what is logged, only
//! how safely.

use std::fmt;
use std::time::{Duration, Instant};

/// Characters of client text logged at most; the rest is counted.
pub const MAX_LOGGED_CHARS: usize = 128;

/// Client text for a log line: control characters (newlines, escapes, ...)
/// and other non-printing characters escaped, at most
/// [`MAX_LOGGED_CHARS`] characters, then how many more bytes there were.
pub struct Sanitized<'a>(pub &'a str);

impl fmt::Display for Sanitized<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_LOGGED_CHARS {
                return write!(f, "...(+{} bytes)", self.0.len() - i);
            }
            if escaped(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Characters written escaped: control characters, line and paragraph
/// separators, every bidirectional formatting character (embeddings,
/// overrides, isolates and marks, which reorder how a terminal shows the
/// rest of the line), and the backslash that starts an escape.
fn escaped(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\\' | '\u{061c}' | '\u{200e}' | '\u{200f}')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Lets at most `per_second` events through each second; counts the rest.
pub struct RateLimit {
    per_second: u32,
    window: Instant,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(per_second: u32) -> Self {
        RateLimit { per_second, window: Instant::now(), in_window: 0, suppressed: 0 }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were
    /// suppressed since the last one logged; `None` when it is suppressed.
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.in_window = 0;
        }
        if self.in_window < self.per_second {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_capped() {
        let s = Sanitized("evil\nINFO fake line\r\x1b[31m\u{202e}\\").to_string();
        assert_eq!(s, "evil\\nINFO fake line\\r\\u{1b}[31m\\u{202e}\\\\");
        assert!(!s.contains('\n'));
        let long = "x".repeat(10_000);
        let s = Sanitized(&long).to_string();
        assert_eq!(s, format!("{}...(+{} bytes)", "x".repeat(MAX_LOGGED_CHARS), 10_000 - MAX_LOGGED_CHARS));
        assert_eq!(Sanitized("kvcoord-client/42").to_string(), "kvcoord-client/42");
    }

    /// Found by the fuzz targets' log property (`fuzz/regressions/`): only
    /// U+202E of the bidirectional controls was escaped.
    #[test]
    fn every_bidirectional_control_is_escaped() {
        for c in [
            '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{200f}',
            '\u{061c}',
        ] {
            let s = Sanitized(&format!("a{c}b")).to_string();
            assert_eq!(s, format!("a{}b", c.escape_default()));
        }
        assert_eq!(Sanitized("naïve ключ").to_string(), "naïve ключ", "other text is kept");
    }

    #[test]
    fn rate_limit_counts_what_it_suppressed() {
        let mut r = RateLimit::new(2);
        let t = Instant::now();
        assert_eq!(r.allow_at(t), Some(0));
        assert_eq!(r.allow_at(t), Some(0));
        assert_eq!(r.allow_at(t), None);
        assert_eq!(r.allow_at(t), None);
        assert_eq!(r.allow_at(t + Duration::from_millis(1001)), Some(2));
    }
}
