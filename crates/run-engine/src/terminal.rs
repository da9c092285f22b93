//! Showing text that came from a story (its output, in the run log) on a terminal safely.
//!
//! A story's output is stored byte for byte, so it may hold control characters: ANSI escape
//! sequences that move the cursor, clear the screen, retitle the window or set the clipboard,
//! a bell, backspaces that overwrite what was shown. Printed raw to a terminal, they act on it.
//! [`escape_controls`] makes such text harmless: colour and style (SGR sequences, `ESC [ … m`)
//! are kept as colour, every other control character is shown as a visible escape (`\x07`,
//! `\x1b[2J`), so what a line says is what a person sees. [`strip_controls`] drops them instead,
//! colour included, for places that show no colour.

use std::fmt::Write;

/// The escape character that starts an ANSI sequence.
const ESC: char = '\u{1b}';

/// `line` with every control character but tab shown as a visible escape (`\x07`, `\x1b`,
/// `\x08`), except colour and style sequences (`ESC [ <digits and ;> m`), which are kept so the
/// terminal shows the colour; a line that set any style ends with a reset, so no colour leaks
/// into the next line.
///
/// ```
/// use run_engine::terminal::escape_controls;
/// assert_eq!(escape_controls("ok\u{7}\u{8}"), "ok\\x07\\x08");
/// assert_eq!(escape_controls("\u{1b}[2Jgone"), "\\x1b[2Jgone");
/// assert_eq!(escape_controls("\u{1b}[31mred"), "\u{1b}[31mred\u{1b}[0m");
/// ```
pub fn escape_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut styled = false;
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if c == ESC
            && let Some(len) = sgr_len(rest)
        {
            out.push_str(rest.get(..len).unwrap_or_default());
            styled = true;
            rest = rest.get(len..).unwrap_or_default();
            continue;
        }
        if c.is_control() && c != '\t' {
            let code = u32::from(c);
            if code <= 0xff {
                let _ = write!(out, "\\x{code:02x}");
            } else {
                let _ = write!(out, "\\u{{{code:x}}}");
            }
        } else {
            out.push(c);
        }
        rest = rest.get(c.len_utf8()..).unwrap_or_default();
    }
    if styled {
        out.push_str("\u{1b}[0m");
    }
    out
}

/// `line` without colour and style sequences, and with every other control character but tab
/// shown as a visible escape, as [`escape_controls`] does: for output that shows no colour.
///
/// ```
/// use run_engine::terminal::strip_controls;
/// assert_eq!(strip_controls("\u{1b}[1;32mpassed\u{1b}[0m\u{7}"), "passed\\x07");
/// ```
pub fn strip_controls(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if c == ESC
            && let Some(len) = sgr_len(rest)
        {
            rest = rest.get(len..).unwrap_or_default();
            continue;
        }
        plain.push(c);
        rest = rest.get(c.len_utf8()..).unwrap_or_default();
    }
    // No SGR sequence is left, so `escape_controls` adds no reset.
    escape_controls(&plain)
}

/// Whether `text` holds a character that [`escape_controls`] would change.
pub fn has_controls(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\t')
}

/// The byte length of the SGR sequence (`ESC [ <digits and ;>* m`) at the start of `text`, if
/// one is there (also what the web view turns into colour).
pub(crate) fn sgr_len(text: &str) -> Option<usize> {
    let body = text.strip_prefix(ESC)?.strip_prefix('[')?;
    let params = body
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b';')
        .count();
    // A sequence of absurd length is not a colour: show it escaped.
    if params > 64 || body.as_bytes().get(params) != Some(&b'm') {
        return None;
    }
    Some(ESC.len_utf8() + 1 + params + 1)
}

#[cfg(test)]
mod tests {
    use super::{escape_controls, has_controls, strip_controls};

    #[test]
    fn controls_that_act_on_a_terminal_are_shown_not_obeyed() {
        // Clear screen, cursor home, window title (OSC), bell, backspace, carriage return.
        let nasty = "a\u{1b}[2J\u{1b}[H\u{1b}]0;pwned\u{7}b\u{8}\u{8}c\rd";
        let shown = escape_controls(nasty);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(
            shown,
            "a\\x1b[2J\\x1b[H\\x1b]0;pwned\\x07b\\x08\\x08c\\x0dd"
        );
    }

    #[test]
    fn colour_is_kept_and_reset_at_the_end_of_the_line() {
        let shown = escape_controls("\u{1b}[1;31merror\u{1b}[0m: x");
        assert_eq!(shown, "\u{1b}[1;31merror\u{1b}[0m: x\u{1b}[0m");
        assert_eq!(escape_controls("plain\ttext é"), "plain\ttext é");
        assert!(!has_controls("plain\ttext"));
        assert!(has_controls("bell\u{7}"));
    }

    #[test]
    fn an_unfinished_or_overlong_sequence_is_escaped() {
        assert_eq!(escape_controls("\u{1b}[31"), "\\x1b[31");
        let long = format!("\u{1b}[{}m", "1;".repeat(40));
        assert!(escape_controls(&long).starts_with("\\x1b["));
        assert_eq!(strip_controls("\u{1b}[31mred\u{1b}[m"), "red");
        assert_eq!(escape_controls("\u{85}\u{9b}"), "\\x85\\x9b");
    }
}
