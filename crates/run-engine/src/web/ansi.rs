//! ANSI colour in log lines, as HTML: each run of text with its style becomes a `<span>` with
//! classes (`fg-31`, `bold`), escaped by the template; every other control character is shown
//! as a visible escape (`\x07`, see [`crate::terminal::strip_controls`]), never sent raw.

use crate::terminal::sgr_len;
use maud::{Markup, html};

/// The style of a run of text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Foreground colour: 30–37 or 90–97.
    pub fg: Option<u8>,
    /// Background colour: 40–47 or 100–107.
    pub bg: Option<u8>,
    /// Bold.
    pub bold: bool,
    /// Dim.
    pub dim: bool,
    /// Italic.
    pub italic: bool,
    /// Underlined.
    pub underline: bool,
}

impl Style {
    /// The CSS classes, space-separated (empty for plain text).
    pub fn classes(&self) -> String {
        let mut out = Vec::new();
        if let Some(fg) = self.fg {
            out.push(format!("fg-{fg}"));
        }
        if let Some(bg) = self.bg {
            out.push(format!("bg-{bg}"));
        }
        for (on, name) in [
            (self.bold, "bold"),
            (self.dim, "dim"),
            (self.italic, "italic"),
            (self.underline, "underline"),
        ] {
            if on {
                out.push(name.to_owned());
            }
        }
        out.join(" ")
    }

    fn apply(&mut self, params: &str) {
        let codes: Vec<u16> = if params.is_empty() {
            vec![0]
        } else {
            params.split(';').map(|p| p.parse().unwrap_or(0)).collect()
        };
        let mut i = 0;
        while let Some(&code) = codes.get(i) {
            match code {
                0 => *self = Style::default(),
                1 => self.bold = true,
                2 => self.dim = true,
                3 => self.italic = true,
                4 => self.underline = true,
                22 => {
                    self.bold = false;
                    self.dim = false;
                }
                23 => self.italic = false,
                24 => self.underline = false,
                30..=37 | 90..=97 => self.fg = u8::try_from(code).ok(),
                39 => self.fg = None,
                40..=47 | 100..=107 => self.bg = u8::try_from(code).ok(),
                49 => self.bg = None,
                // 256-colour and true-colour: their arguments are skipped, the colour not shown.
                38 | 48 => {
                    i += match codes.get(i + 1) {
                        Some(5) => 2,
                        Some(2) => 4,
                        _ => 0,
                    };
                }
                _ => {}
            }
            i += 1;
        }
    }
}

/// `line` cut into runs of text with their style; control characters other than colour are
/// made visible escapes in the text.
pub fn segments(line: &str) -> Vec<(Style, String)> {
    let mut out: Vec<(Style, String)> = Vec::new();
    let mut style = Style::default();
    let mut text = String::new();
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if c == '\u{1b}'
            && let Some(len) = sgr_len(rest)
        {
            if !text.is_empty() {
                out.push((style, crate::terminal::strip_controls(&text)));
                text.clear();
            }
            style.apply(rest.get(2..len - 1).unwrap_or_default());
            rest = rest.get(len..).unwrap_or_default();
            continue;
        }
        text.push(c);
        rest = rest.get(c.len_utf8()..).unwrap_or_default();
    }
    if !text.is_empty() {
        out.push((style, crate::terminal::strip_controls(&text)));
    }
    out
}

/// `line` as escaped HTML, colours as `<span class="fg-31">`.
pub fn to_html(line: &str) -> Markup {
    html! {
        @for (style, text) in segments(line) {
            @let classes = style.classes();
            @if classes.is_empty() {
                (text)
            } @else {
                span class=(classes) { (text) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_becomes_classes_and_markup_is_escaped() {
        let html = to_html("\u{1b}[1;31mred <b>\u{1b}[0m plain\u{7}").into_string();
        assert_eq!(
            html,
            "<span class=\"fg-31 bold\">red &lt;b&gt;</span> plain\\x07"
        );
    }

    #[test]
    fn other_sequences_are_shown_not_run() {
        let html = to_html("\u{1b}[2Jgone \u{1b}[38;5;208morange").into_string();
        assert_eq!(html, "\\x1b[2Jgone orange");
    }
}
