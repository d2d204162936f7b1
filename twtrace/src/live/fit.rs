//! Fitting text to the terminal's width without cutting a number: a line that does not fit
//! loses whole fields (least important first) or wraps between them, never mid-word. Only
//! names (comm, cgroup) are shortened, with a visible `…`.

use ratatui::{
    style::Style,
    text::{Line, Span},
};
use unicode_width::{UnicodeWidthChar as _, UnicodeWidthStr as _};

/// Least important priority: fields of this priority go first.
pub const LEAST: u8 = 4;

/// Columns a string takes on the terminal (wide characters count two).
pub fn width(s: &str) -> usize {
    s.width()
}

/// `s` cut to `max` columns with a trailing `…`; for names only, never for numbers.
pub fn ellipsize(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_string();
    }
    let mut out = String::new();
    let mut w = 0;
    for c in s.chars() {
        let cw = c.width().unwrap_or(0);
        if w + cw + 1 > max {
            break;
        }
        w += cw;
        out.push(c);
    }
    if max > 0 {
        out.push('…');
    }
    out
}

/// `n` and `word`, in the plural unless `n` is 1 ("1 TIME_WAIT", "2 TIME_WAITs").
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Words of `text` on lines of at most `width` columns; `indent` starts every line after the
/// first. A word wider than a line (a hostile name) is the only thing ever broken.
pub fn wrap_words(text: &str, width: usize, indent: &str) -> Vec<String> {
    let cols = width.max(1);
    let mut lines = Vec::new();
    let mut cur = String::new();
    for mut word in text.split_whitespace() {
        loop {
            let lead = match (cur.is_empty(), lines.is_empty()) {
                (false, _) => " ",
                (true, true) => "",
                (true, false) => indent,
            };
            if self::width(&cur) + self::width(lead) + self::width(word) <= cols {
                cur.push_str(lead);
                cur.push_str(word);
                break;
            }
            if !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
                continue;
            }
            let cut = split_at_width(word, cols.saturating_sub(self::width(lead)).max(1));
            cur.push_str(lead);
            cur.push_str(&word[..cut]);
            lines.push(std::mem::take(&mut cur));
            word = &word[cut..];
            if word.is_empty() {
                break;
            }
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// The byte index where `s` reaches `cols` columns (at least one character).
fn split_at_width(s: &str, cols: usize) -> usize {
    let mut w = 0;
    for (i, c) in s.char_indices() {
        w += c.width().unwrap_or(0);
        if w > cols {
            return if i == 0 { c.len_utf8() } else { i };
        }
    }
    s.len()
}

/// One field of a header line: shown while the fitting keeps fields up to `prio`, and, for
/// a short form standing in for dropped ones, only while it keeps fewer than `until`.
#[derive(Clone, Debug)]
pub struct Field {
    pub text: String,
    /// Written before the field unless it starts a line.
    pub sep: &'static str,
    pub prio: u8,
    pub until: u8,
    pub style: Style,
}

impl Field {
    pub fn new(text: impl Into<String>, sep: &'static str, prio: u8) -> Self {
        Self {
            text: text.into(),
            sep,
            prio,
            until: LEAST + 1,
            style: Style::default(),
        }
    }

    pub fn style(mut self, style: Style) -> Self {
        self.style = style;
        self
    }

    /// Shown only while fields of priority `until` and beyond are dropped.
    pub fn instead_below(mut self, until: u8) -> Self {
        self.until = until;
        self
    }

    fn kept(&self, keep: u8) -> bool {
        self.prio <= keep && keep < self.until
    }
}

/// The fields of one line kept at `keep`, laid out on lines of `width` columns: wrapped
/// between fields (continuation lines indented by two), a field wider than a line wrapped
/// between its words.
pub fn pack(fields: &[Field], keep: u8, width: usize) -> Vec<Line<'static>> {
    const INDENT: &str = "  ";
    let mut lines: Vec<Line<'static>> = Vec::new();
    let mut cur: Vec<Span<'static>> = Vec::new();
    let mut used = 0;
    for f in fields.iter().filter(|f| f.kept(keep)) {
        let w = self::width(&f.text);
        let sep = if cur.is_empty() { "" } else { f.sep };
        if !cur.is_empty() && used + self::width(sep) + w > width {
            lines.push(Line::from(std::mem::take(&mut cur)));
            used = 0;
        }
        let lead = if cur.is_empty() {
            if lines.is_empty() { "" } else { INDENT }
        } else {
            f.sep
        };
        if used + self::width(lead) + w <= width {
            cur.push(Span::styled(format!("{lead}{}", f.text), f.style));
            used += self::width(lead) + w;
            continue;
        }
        // Wider than a line: its words, on lines of their own.
        for (i, l) in wrap_words(&f.text, width.saturating_sub(INDENT.len()), "")
            .into_iter()
            .enumerate()
        {
            if i > 0 || !cur.is_empty() {
                lines.push(Line::from(std::mem::take(&mut cur)));
            }
            let lead = if lines.is_empty() { "" } else { INDENT };
            used = self::width(lead) + self::width(&l);
            cur.push(Span::styled(format!("{lead}{l}"), f.style));
        }
    }
    if !cur.is_empty() {
        lines.push(Line::from(cur));
    }
    lines
}

/// Lines of fields in at most `budget` terminal lines of `width`: the most fields that fit,
/// dropping the least important first. With only the most important left, all of them.
pub fn fit(rows: &[Vec<Field>], width: usize, budget: usize) -> Vec<Line<'static>> {
    let lay =
        |keep| -> Vec<Line<'static>> { rows.iter().flat_map(|r| pack(r, keep, width)).collect() };
    for keep in (1..=LEAST).rev() {
        let lines = lay(keep);
        if lines.len() <= budget {
            return lines;
        }
    }
    lay(0)
}

/// The fields that fit on one line of `width`, as text (for block titles and the status
/// line); the most important field is shortened if even it alone is too wide.
pub fn fit_one(fields: &[Field], width: usize) -> String {
    for keep in (0..=LEAST).rev() {
        let lines = pack(fields, keep, width);
        if lines.len() <= 1 {
            return lines.first().map(line_text).unwrap_or_default();
        }
    }
    let first: Vec<&str> = fields
        .iter()
        .filter(|f| f.kept(0))
        .map(|f| f.text.as_str())
        .collect();
    ellipsize(&first.join(" "), width)
}

pub fn line_text(l: &Line) -> String {
    l.spans.iter().map(|s| s.content.as_ref()).collect()
}

/// `s` cut to `max` columns from the start, `…` first: for paths, whose end names the unit.
pub fn ellipsize_start(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_string();
    }
    let mut tail: Vec<char> = Vec::new();
    let mut w = 0;
    for c in s.chars().rev() {
        let cw = c.width().unwrap_or(0);
        if w + cw + 1 > max {
            break;
        }
        w += cw;
        tail.push(c);
    }
    std::iter::once('…').chain(tail.into_iter().rev()).collect()
}
