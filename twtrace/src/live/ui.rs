//! Draws a [`Model`]: a pure function of what to show, so it renders the same on a terminal
//! and on ratatui's TestBackend. Laid out for 80x24 and up: the header gives up fields before
//! the table loses its rows, and nothing is cut mid-number (see [`super::fit`]).

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Bar, BarChart, BarGroup, Block, Clear, Paragraph, Wrap},
};

use super::{
    fit::{Field, fit_one, width, wrap_words},
    header::header,
    model::{Model, ViewState},
    tables::table,
};

/// The table's smallest height: borders, column titles and two rows.
const TABLE_MIN: u16 = 5;
/// Each lifetime bin's label ("59-61s") and room for its count.
const BAR_MIN: u16 = 6;

fn titled(title: String) -> Block<'static> {
    Block::bordered().title(title)
}

/// The lifetime histogram, or false when `area` is too narrow for its bins.
fn lifetimes(f: &mut Frame, area: Rect, m: &Model) -> bool {
    let bins = m.lifetimes.len().max(1) as u16;
    let widest = m
        .lifetimes
        .iter()
        .map(|(l, n)| width(l).max(n.to_string().len()) as u16)
        .max()
        .unwrap_or(0)
        .max(BAR_MIN);
    let bar = (area.width.saturating_sub(2) / bins)
        .saturating_sub(1)
        .min(7);
    if bar < widest {
        return false;
    }
    let bars: Vec<Bar> = m
        .lifetimes
        .iter()
        .map(|(label, n)| Bar::default().label(Line::from(*label)).value(*n))
        .collect();
    let t = &m.totals;
    let ends = [
        Field::new("Lifetimes", "", 0),
        Field::new("| ended:", " ", 1),
        Field::new(format!("expired {}", t.expired), " ", 1),
        Field::new(format!("reused {}", t.reused), " ", 1),
        Field::new(format!("recycled {}", t.recycled), " ", 2),
        Field::new(format!("reset {}", t.reset), " ", 1),
        Field::new(format!("purged {}", t.purged), " ", 2),
    ];
    let title = format!(
        " {} ",
        fit_one(&ends, area.width.saturating_sub(4) as usize)
    );
    f.render_widget(
        BarChart::default()
            .block(titled(title))
            .data(BarGroup::default().bars(&bars))
            .bar_width(bar)
            .bar_gap(1),
        area,
    );
    true
}

/// Entries wrapped to `width` (each starting with `bullet`, continued under its text), as
/// many whole entries as `height` lines hold, newest first; a last line says how many more.
fn entries(items: &[String], bullet: &str, width: usize, height: usize) -> Vec<Line<'static>> {
    let indent = " ".repeat(bullet.len());
    let mut out: Vec<Line<'static>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut lines = wrap_words(&format!("{bullet}{item}"), width, &indent);
        let left = items.len() - i;
        let room = height.saturating_sub(out.len());
        if lines.len() > room || (lines.len() == room && left > 1) {
            if out.is_empty() {
                // Not even the first fits: as much of it as does, at a word.
                lines.truncate(room);
                out.extend(lines.into_iter().map(Line::from));
            } else if room > 0 {
                let them = if left == 1 { "it" } else { "them" };
                let more = [
                    Field::new(format!("+{left} more"), "", 0),
                    Field::new(format!("(a taller terminal shows {them})"), " ", 1),
                ];
                out.push(Line::from(fit_one(&more, width)));
            }
            break;
        }
        out.extend(lines.into_iter().map(Line::from));
    }
    out
}

fn advice_lines(m: &Model) -> Vec<String> {
    if m.advice.is_empty() {
        vec!["nothing to advise: no evidence of a problem".into()]
    } else {
        m.advice.iter().map(|a| a.text.clone()).collect()
    }
}

/// A bordered list of `items`, its title shortened at a word to fit the border.
fn pane(f: &mut Frame, area: Rect, title: &[&'static str], items: &[String], bullet: &str) {
    let title: Vec<Field> = title
        .iter()
        .enumerate()
        .map(|(i, t)| Field::new(*t, " ", i.min(1) as u8))
        .collect();
    let title = fit_one(&title, area.width.saturating_sub(4) as usize);
    let inner = (
        area.width.saturating_sub(2) as usize,
        area.height.saturating_sub(2) as usize,
    );
    let lines = entries(items, bullet, inner.0, inner.1);
    f.render_widget(
        Paragraph::new(lines).block(titled(format!(" {title} "))),
        area,
    );
}

const ADVICE: &[&str] = &["Advice"];
/// The log's title: its first word alone when the pane is narrow.
const LOG: &[&str] = &["Failures", "and closes without TIME_WAIT"];

/// Lines the log keeps at least, under the advice.
const LOG_MIN: u16 = 4;

/// The advice and the log: above each other beside the histogram (the advice as tall as it
/// needs), side by side without it.
fn side(f: &mut Frame, area: Rect, m: &Model, stacked: bool) {
    let (adv, log) = if stacked {
        let need = advice_need(m, area.width) + 2;
        let adv_h = need.min(area.height.saturating_sub(LOG_MIN));
        let [a, l] = Layout::vertical([Constraint::Length(adv_h), Constraint::Min(0)]).areas(area);
        (a, l)
    } else {
        let [a, l] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
            .areas(area);
        (a, l)
    };
    pane(f, adv, ADVICE, &advice_lines(m), "- ");
    pane(f, log, LOG, &m.log, "");
}

/// Lines the advice takes wrapped in a pane `width` wide.
fn advice_need(m: &Model, width: u16) -> u16 {
    let inner = width.saturating_sub(2) as usize;
    advice_lines(m)
        .iter()
        .map(|a| wrap_words(&format!("- {a}"), inner, "  ").len() as u16)
        .sum()
}

/// Wide enough for the histogram beside the advice and the log.
fn wide(area: Rect) -> bool {
    area.width >= 120 && area.height >= 36
}

const HELP: &str = "q quit   Esc close this help, the filter input, or quit\n\
Tab switch table   s next sort column   S reverse sort\n\
/ filter (comm, pid, cgroup, port, address; Enter applies, Esc clears)\n\
n next network namespace (all, then each)   p pause   ? this help";

/// The bottom's height: room for the advice wrapped whole (and the log under it when
/// stacked), within what the header and the table leave.
fn bottom_height(m: &Model, area: Rect, head: u16) -> u16 {
    let room = area.height.saturating_sub(head + TABLE_MIN + 1);
    let need = if wide(area) {
        (advice_need(m, area.width / 2) + 2 + LOG_MIN).max(12)
    } else {
        (advice_need(m, area.width * 55 / 100) + 2).clamp(5, 12)
    };
    need.min(room)
}

pub fn draw(f: &mut Frame, m: &Model, v: &ViewState, input: Option<&str>) {
    let area = f.area();
    // A short terminal keeps its header to 7 lines, so the table still shows rows.
    let budget = if area.height < 30 {
        7
    } else {
        area.height as usize / 3
    };
    let head = header(m, v, area.width as usize, budget);
    let head_h = (head.len() as u16).min(area.height.saturating_sub(TABLE_MIN + 1));
    let bottom_h = bottom_height(m, area, head_h);
    let [top, middle, bottom, status] = Layout::vertical([
        Constraint::Length(head_h),
        Constraint::Min(TABLE_MIN),
        Constraint::Length(bottom_h),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(head), top);
    table(f, middle, m, v);
    if bottom.height > 0 {
        let [hist, right] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(bottom);
        if wide(area) && lifetimes(f, hist, m) {
            side(f, right, m, true);
        } else {
            side(f, bottom, m, false);
        }
    }
    let status_line = match input {
        Some(text) => format!("filter: {text}_  (Enter applies, Esc cancels)"),
        None => fit_one(
            &[
                Field::new("q quit", "", 0),
                Field::new("Tab table", "  ", 1),
                Field::new("s/S sort", "  ", 1),
                Field::new("/ filter", "  ", 1),
                Field::new("n netns", "  ", 2),
                Field::new("p pause", "  ", 2),
                Field::new("? help", "  ", 0),
            ],
            area.width as usize,
        ),
    };
    f.render_widget(
        Paragraph::new(status_line).style(Style::default().add_modifier(Modifier::REVERSED)),
        status,
    );
    if v.help {
        let w = area.width.min(76);
        let h = 7.min(area.height);
        let popup = Rect::new(
            area.x + (area.width - w) / 2,
            area.y + 3.min(area.height - h),
            w,
            h,
        );
        f.render_widget(Clear, popup);
        f.render_widget(
            Paragraph::new(HELP)
                .wrap(Wrap { trim: true })
                .block(titled(" Keys ".into())),
            popup,
        );
    }
}
