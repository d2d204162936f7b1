//! The header lines (who and where, settings, loss, kernel check, rates), as fields with
//! priorities so a narrow terminal drops the least useful ones instead of cutting numbers.

use ratatui::{
    style::{Color, Modifier, Style},
    text::Line,
};

use super::{
    fit::{Field, count, fit},
    model::{Model, ViewState},
};

/// The header in at most `budget` lines of `width` columns (more only if its most important
/// fields need them).
pub fn header(m: &Model, v: &ViewState, width: usize, budget: usize) -> Vec<Line<'static>> {
    let rows = [
        identity(m, v),
        settings(m),
        loss(m),
        kernel_check(m),
        rates(m),
        failures(m),
    ];
    fit(&rows, width, budget)
}

fn identity(m: &Model, v: &ViewState) -> Vec<Field> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut f = vec![
        Field::new("twtrace", "", 0).style(bold),
        Field::new(m.host.clone(), " ", 2),
        Field::new(format!("kernel {}", m.kernel), "  ", 3),
        Field::new(format!("up {:.0}s", m.uptime_s), "  ", 3),
    ];
    match (v.netns, &m.settings) {
        (Some(n), _) => f.push(Field::new(format!("netns {n}"), "  ", 0)),
        (None, settings) => {
            f.push(Field::new("all netns", "  ", 1));
            if let Some((n, _)) = settings {
                f.push(Field::new(
                    format!("(settings of {n}, the busiest)"),
                    " ",
                    3,
                ));
            }
        }
    }
    match (&m.replay, v.paused) {
        (Some(file), _) => {
            f.push(Field::new("REPLAY", "  ", 0).style(bold));
            f.push(Field::new(file.clone(), " ", 2));
        }
        (None, true) => f.push(Field::new("PAUSED", "  ", 0).style(bold)),
        _ => {}
    }
    f
}

fn settings(m: &Model) -> Vec<Field> {
    let Some((_, s)) = &m.settings else {
        return vec![Field::new("settings: not read yet", "", 1)];
    };
    let mut f = vec![
        Field::new(format!("tcp_tw_reuse={}", s.tcp_tw_reuse), "", 1),
        Field::new(
            format!(
                "delay={}",
                s.tcp_tw_reuse_delay_ms
                    .map_or("-".into(), |d| format!("{d}ms"))
            ),
            " ",
            3,
        ),
        Field::new(
            format!("tcp_max_tw_buckets={}", s.tcp_max_tw_buckets),
            "  ",
            1,
        ),
    ];
    if s.tcp_max_tw_buckets > 0 {
        f.push(Field::new(
            format!(
                "({} used, {:.1}%)",
                m.settings_fill,
                m.settings_fill as f64 * 100.0 / s.tcp_max_tw_buckets as f64
            ),
            " ",
            2,
        ));
    }
    f.extend([
        Field::new(
            format!("ip_local_port_range={}-{}", s.port_range.0, s.port_range.1),
            "  ",
            1,
        ),
        Field::new(format!("tcp_fin_timeout={}", s.tcp_fin_timeout), "  ", 4),
        Field::new(format!("tcp_timestamps={}", s.tcp_timestamps), "  ", 3),
    ]);
    f
}

/// Lost-event counters: any that is not zero is kept to the last; zeros go first, and when
/// all are zero and dropped, "none" stands for them.
fn loss(m: &Model) -> Vec<Field> {
    let l = &m.loss;
    let lost = l.ringbuf_full
        + l.recursion_misses
        + l.read_fail
        + l.conn_map_fail
        + m.ends_without_start
        + m.end_lost;
    let style = if lost > 0 {
        Style::default().fg(Color::White).bg(Color::Red)
    } else {
        Style::default().fg(Color::Green)
    };
    let parts = [
        (
            format!("{} ring buffer full", l.ringbuf_full),
            l.ringbuf_full,
        ),
        (
            count(l.recursion_misses, "recursion miss", "recursion misses"),
            l.recursion_misses,
        ),
        (
            count(l.read_fail, "failed read", "failed reads"),
            l.read_fail,
        ),
        (format!("{} map full", l.conn_map_fail), l.conn_map_fail),
        (
            count(m.recovered, "start recovered", "starts recovered"),
            m.recovered,
        ),
        (
            count(
                m.ends_without_start,
                "end never seen starting",
                "ends never seen starting",
            ),
            m.ends_without_start,
        ),
        (
            count(m.end_lost, "end never seen", "ends never seen"),
            m.end_lost,
        ),
    ];
    let mut f = vec![Field::new("lost:", "", 0)];
    if lost == 0 {
        f.push(Field::new("none", " ", 0).instead_below(3));
    }
    for (i, (text, n)) in parts.into_iter().enumerate() {
        let sep = match i {
            0 => " ",
            4 => "; ",
            _ => ", ",
        };
        f.push(Field::new(text, sep, if n > 0 { 0 } else { 3 }));
    }
    f.into_iter().map(|f| f.style(style)).collect()
}

fn kernel_check(m: &Model) -> Vec<Field> {
    let Some((agrees, text)) = &m.kernel_check else {
        return vec![];
    };
    let style = if *agrees {
        Style::default().fg(Color::Green)
    } else {
        Style::default().fg(Color::White).bg(Color::Red)
    };
    // describe() joins one comparison per counter with ", ": each is a field of its own.
    text.split(", ")
        .map(|part| Field::new(part, ", ", if *agrees { 1 } else { 0 }).style(style))
        .collect()
}

fn rates(m: &Model) -> Vec<Field> {
    let r = &m.rates;
    let bold = Style::default().add_modifier(Modifier::BOLD);
    vec![
        Field::new(format!("TIME_WAIT alive {}", m.alive), "", 0).style(bold),
        Field::new(format!("entered {:.1}/s", r.entered), "   ", 0),
        Field::new("ended/s:", "   ", 2),
        Field::new(format!("expired {:.1}", r.expired), " ", 2),
        Field::new(format!("reused {:.1}", r.reused), " ", 2),
        Field::new(format!("recycled {:.1}", r.recycled), " ", 3),
        Field::new(format!("reset {:.1}", r.reset), " ", 2),
        Field::new(format!("purged {:.1}", r.purged), " ", 3),
    ]
}

fn failures(m: &Model) -> Vec<Field> {
    let r = &m.rates;
    let bad = r.overflow + r.abort + r.connect_failed + r.bind_failed > 0.0;
    let style = if bad {
        Style::default().fg(Color::Yellow)
    } else {
        Style::default()
    };
    let p = |rate: f64| if rate > 0.0 { 0 } else { 1 };
    let fail = if r.connect_failed + r.bind_failed > 0.0 {
        0
    } else {
        1
    };
    let none = if r.overflow + r.abort > 0.0 { 0 } else { 1 };
    vec![
        Field::new("no TIME_WAIT/s:", "", none),
        Field::new(format!("overflow {:.1}", r.overflow), " ", p(r.overflow)),
        Field::new(format!("abort {:.1}", r.abort), " ", p(r.abort)),
        Field::new("failed/s:", "   ", fail),
        Field::new(
            format!("connect {:.1}", r.connect_failed),
            " ",
            p(r.connect_failed),
        ),
        Field::new(format!("bind {:.1}", r.bind_failed), " ", p(r.bind_failed)),
        Field::new(
            format!(
                "(totals: overflow {} abort {} connect {} bind {})",
                m.totals.overflow, m.totals.abort, m.connect_failed, m.bind_failed
            ),
            "   ",
            4,
        ),
    ]
    .into_iter()
    .map(|f| f.style(style))
    .collect()
}
