//! Strings from the traced system (comm, cgroup paths) are hostile: a process can name itself
//! with escape sequences or a newline. They are made printable once, where they enter twtrace,
//! so no view prints them raw.

use std::borrow::Cow;

/// `n` and its noun, which agrees with it: "1 TIME_WAIT", "2 TIME_WAITs".
pub fn count(n: u64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// `n` and the noun's form that agrees with it, for nouns not plural in -s.
pub fn count_as(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `s` with every control character (C0, DEL, C1) written as an escape (`\n`, `\t`, `\x1b`,
/// `\u{9b}`). Idempotent, so a recording read back shows the same names: a backslash is left
/// as it is (a name spelling `\x1b` looks like an escaped one, and is as harmless). Invalid
/// UTF-8 has already become U+FFFD by then (`String::from_utf8_lossy`).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Bytes from the kernel or a file as printable text.
pub fn printable_bytes(b: &[u8]) -> String {
    printable(&String::from_utf8_lossy(b)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_cannot_reach_the_terminal() {
        assert_eq!(printable("nginx"), "nginx");
        assert!(matches!(printable("curl"), Cow::Borrowed(_)));
        assert_eq!(printable("\x1b[2Jx"), "\\x1b[2Jx");
        assert_eq!(printable("a\nFORGED"), "a\\nFORGED");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        let once = printable("\x1b[31mred\n").into_owned();
        assert_eq!(printable(&once), once, "idempotent");
        assert_eq!(printable("\x7f"), "\\x7f");
        assert_eq!(
            printable_bytes(b"\xff\xfeok\x07"),
            "\u{fffd}\u{fffd}ok\\x07"
        );
        for c in printable_bytes(b"\x1b]0;title\x07\r\n\x00").chars() {
            assert!(!c.is_control(), "{c:?}");
        }
    }
}
