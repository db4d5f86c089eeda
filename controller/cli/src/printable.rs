//! Text from agents, made safe to print on an operator's terminal.
//!
//! Hostnames, labels, inventory, drive models and serials, reasons and event messages come from the
//! nodes, and the controller keeps them as sent. Printed raw, an escape sequence in one of them
//! could retitle the operator's terminal (`ESC ] 0 ; … BEL`), clear it (`ESC [ 2 J`), move the
//! cursor to overwrite earlier lines, or (bidi overrides) make a line read differently from its
//! bytes. Every table and line shoalctl prints goes through [`printable`]; JSON output is left as
//! the API sent it (serde_json escapes C0 controls there, and programs, not terminals, read it).

use std::borrow::Cow;

/// Whether `c` is shown escaped: C0 controls (tab and newline included: a table cell or a line must
/// stay one), DEL, C1 controls, the bidirectional formatting characters, line and paragraph
/// separators, and the invisible zero-width characters that make look-alike names.
fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{61c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `s` with every unsafe character written as a visible escape: `\x1b` below U+0100, `\u{202e}`
/// above. Text without any is returned as it is.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !is_unsafe(c) {
            out.push(c);
        } else if (c as u32) < 0x100 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// `println!` for anything that may hold agent-supplied text: the whole line goes through
/// [`printable`].
macro_rules! say {
    () => {
        println!()
    };
    ($($arg:tt)*) => {
        println!("{}", $crate::printable::printable(&format!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_escaped_and_plain_text_is_untouched() {
        assert!(matches!(
            printable("node-7 Samsung SSD 980 500GB"),
            Cow::Borrowed(_)
        ));
        assert_eq!(printable("h\x1b]0;pwn\x07"), "h\\x1b]0;pwn\\x07");
        assert_eq!(printable("\x1b[2J\x1b[H"), "\\x1b[2J\\x1b[H");
        assert_eq!(printable("a\nb\tc\rd\0"), "a\\x0ab\\x09c\\x0dd\\x00");
        assert_eq!(
            printable("\u{7f}\u{9b}31m"),
            "\\x7f\\x9b31m",
            "DEL and the C1 CSI"
        );
        assert_eq!(
            printable("abc\u{202e}fdp.exe"),
            "abc\\u{202e}fdp.exe",
            "right-to-left override"
        );
        assert_eq!(
            printable("\u{2066}x\u{2069}\u{200f}\u{61c}\u{2028}"),
            "\\u{2066}x\\u{2069}\\u{200f}\\u{61c}\\u{2028}"
        );
        assert_eq!(printable("no\u{200b}de\u{feff}"), "no\\u{200b}de\\u{feff}");
        // Ordinary non-ASCII stays as it is.
        assert_eq!(printable("Grüße, 東京, é"), "Grüße, 東京, é");
    }

    #[test]
    fn no_output_of_printable_contains_an_unsafe_character() {
        // Every char below U+3000, around each a little plain text.
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            let s = format!("a{c}b");
            let p = printable(&s);
            assert!(!p.chars().any(is_unsafe), "U+{:04X} -> {p:?}", c as u32);
        }
    }
}
