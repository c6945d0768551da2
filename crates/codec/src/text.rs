//! Text that came from a record or a model (a header value, a proto-name, a model's error
//! body), made safe to log and to put in an error record: no control character survives (a
//! newline in a `proto-name` would otherwise start a forged line in the text log), and its
//! length is bounded.

use std::fmt::Write;

/// How many characters of one record- or model-supplied string are kept (header values,
/// proto-names).
pub const MAX_SUPPLIED: usize = 256;

/// `s` with every control character (C0, DEL, C1), line or paragraph separator and bidi
/// control written as a visible escape (`\n`, `\r`, `\t`, `\u{1b}`, ...), cut to its first
/// `max` characters with the number of characters cut said at the end. Backslashes are kept as
/// they are, so cleaning clean text changes nothing.
pub fn printable(s: &str, max: usize) -> String {
    let total = s.chars().count();
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(4)) + 32);
    for c in s.chars().take(max) {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    if total > max {
        let _ = write!(out, "…[{} more chars cut]", total - max);
    }
    out
}

/// Whether `s` would be changed by [`printable`] with this `max`.
pub fn is_printable(s: &str, max: usize) -> bool {
    !s.chars().any(needs_escape) && s.chars().nth(max).is_none()
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible_escapes() {
        assert_eq!(
            printable("a\nb\r\tc\u{1b}[31md\u{0}e\u{7f}\u{85}", 100),
            "a\\nb\\r\\tc\\u{1b}[31md\\u{0}e\\u{7f}\\u{85}"
        );
        assert_eq!(
            printable("x\u{2028}y\u{202e}z\u{feff}", 100),
            "x\\u{2028}y\\u{202e}z\\u{feff}"
        );
        // Clean text is kept as it is (non-ASCII included), and cleaning twice changes nothing.
        assert_eq!(
            printable("no.Such – ünïcode \\n", 100),
            "no.Such – ünïcode \\n"
        );
        let once = printable("a\nb\u{1}", 100);
        assert_eq!(printable(&once, 100), once);
        assert!(is_printable(&once, 100));
        assert!(!is_printable("a\nb", 100));
        // No line of the result starts with the injected text.
        let forged = printable("no.Such\n2026-01-01T00:00:00Z  INFO stopped cleanly", 256);
        assert_eq!(forged.lines().count(), 1);
    }

    #[test]
    fn long_text_is_cut_and_says_how_much() {
        let s = "é".repeat(300);
        let p = printable(&s, 256);
        assert!(p.starts_with(&"é".repeat(256)));
        assert!(p.ends_with("…[44 more chars cut]"), "{p}");
        assert_eq!(printable("abc", 3), "abc");
        assert_eq!(printable("abcd", 3), "abc…[1 more chars cut]");
        assert!(!is_printable("abcd", 3));
        // Escapes count as the one character they replace.
        assert_eq!(printable("\n\n\n\n", 2), "\\n\\n…[2 more chars cut]");
    }
}
