//! Draws a [`Model`]: a pure function of what to show, so it renders the same on a terminal
//! and on ratatui's TestBackend.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Bar, BarChart, BarGroup, Block, Clear, Paragraph, Row, Table as TableWidget, Wrap},
};

use super::model::{DEST_COLUMNS, Model, PROC_COLUMNS, Table, ViewState};

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 10_000.0 => format!("{:.1}s", v / 1000.0),
        Some(v) => format!("{v:.0}ms"),
    }
}

fn header(m: &Model, v: &ViewState) -> Vec<Line<'static>> {
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let shown = match (v.netns, &m.settings) {
        (Some(n), _) => format!("netns {n}"),
        (None, Some((n, _))) => format!("all netns (settings of {n}, the busiest)"),
        (None, None) => "all netns".into(),
    };
    let mode = match (&m.replay, v.paused) {
        (Some(f), _) => format!("  REPLAY {f}"),
        (None, true) => "  PAUSED".into(),
        _ => String::new(),
    };
    let mut lines = vec![Line::from(vec![
        Span::styled("twtrace ", bold),
        Span::raw(format!(
            "{}  kernel {}  up {:.0}s  {shown}{mode}",
            m.host, m.kernel, m.uptime_s
        )),
    ])];
    lines.push(Line::from(match &m.settings {
        Some((_, s)) => {
            let fill = if s.tcp_max_tw_buckets > 0 {
                format!(
                    " ({} used, {:.1}%)",
                    m.settings_fill,
                    m.settings_fill as f64 * 100.0 / s.tcp_max_tw_buckets as f64
                )
            } else {
                String::new()
            };
            format!(
                "tcp_tw_reuse={} delay={}ms  tcp_max_tw_buckets={}{fill}  ip_local_port_range={}-{}  tcp_fin_timeout={}  tcp_timestamps={}",
                s.tcp_tw_reuse,
                s.tcp_tw_reuse_delay_ms.map_or("-".into(), |d| d.to_string()),
                s.tcp_max_tw_buckets,
                s.port_range.0,
                s.port_range.1,
                s.tcp_fin_timeout,
                s.tcp_timestamps
            )
        }
        None => "settings: not read yet".into(),
    }));
    let l = &m.loss;
    let lost = l.ringbuf_full
        + l.recursion_misses
        + l.read_fail
        + l.conn_map_fail
        + m.ends_without_start
        + m.end_lost;
    let loss_style = if lost > 0 {
        Style::default().fg(Color::White).bg(Color::Red)
    } else {
        Style::default().fg(Color::Green)
    };
    lines.push(Line::from(vec![Span::styled(
        format!(
            "lost: {} ring buffer full, {} recursion misses, {} failed reads, {} map full; {} starts recovered, {} ends never seen starting, {} ends never seen",
            l.ringbuf_full,
            l.recursion_misses,
            l.read_fail,
            l.conn_map_fail,
            m.recovered,
            m.ends_without_start,
            m.end_lost
        ),
        loss_style,
    )]));
    if let Some((agrees, text)) = &m.kernel_check {
        let style = if *agrees {
            Style::default().fg(Color::Green)
        } else {
            Style::default().fg(Color::White).bg(Color::Red)
        };
        lines.push(Line::from(Span::styled(text.clone(), style)));
    }
    let r = &m.rates;
    lines.push(Line::from(vec![
        Span::styled(format!("TIME_WAIT alive {}", m.alive), bold),
        Span::raw(format!(
            "   entered {:.1}/s   ended/s: expired {:.1} reused {:.1} recycled {:.1} reset {:.1} purged {:.1}",
            r.entered, r.expired, r.reused, r.recycled, r.reset, r.purged
        )),
    ]));
    let bad = r.overflow + r.abort + r.connect_failed + r.bind_failed > 0.0;
    lines.push(Line::from(Span::styled(
        format!(
            "no TIME_WAIT/s: overflow {:.1} abort {:.1}   failed/s: connect {:.1} bind {:.1}   (totals: overflow {} abort {} connect {} bind {})",
            r.overflow,
            r.abort,
            r.connect_failed,
            r.bind_failed,
            m.totals.overflow,
            m.totals.abort,
            m.connect_failed,
            m.bind_failed
        ),
        if bad {
            Style::default().fg(Color::Yellow)
        } else {
            Style::default()
        },
    )));
    lines
}

fn titled(title: String) -> Block<'static> {
    Block::bordered().title(title)
}

/// A table's column titles, the sort column marked with its direction.
fn column_titles(columns: &[&str], v: &ViewState) -> Row<'static> {
    let sort = v.sort.min(columns.len() - 1);
    let arrow = if v.reverse { "^" } else { "v" };
    Row::new(columns.iter().enumerate().map(|(i, c)| {
        if i == sort {
            format!("{c}{arrow}")
        } else {
            c.to_string()
        }
    }))
    .style(Style::default().add_modifier(Modifier::REVERSED))
}

fn table(f: &mut Frame, area: Rect, m: &Model, v: &ViewState) {
    let filter = if v.filter.is_empty() {
        String::new()
    } else {
        format!(" filter: {}", v.filter)
    };
    match v.table {
        Table::Processes => {
            let head = column_titles(&PROC_COLUMNS, v);
            let rows = m.procs.iter().map(|p| {
                Row::new(vec![
                    crate::event::pid_text(p.pid),
                    p.comm.clone(),
                    p.cgroup.clone(),
                    p.alive.to_string(),
                    format!("{:.1}", p.new_per_s),
                    p.client.to_string(),
                    p.server.to_string(),
                    format!("{:.0}%", p.reuse_pct),
                    ms(p.mean_ms),
                    ms(p.p99_ms),
                ])
            });
            let widths = [
                Constraint::Length(8),
                Constraint::Length(16),
                Constraint::Min(12),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(8),
                Constraint::Length(8),
            ];
            f.render_widget(
                TableWidget::new(rows, widths)
                    .header(head)
                    .block(titled(format!(
                        " Processes that closed first (Tab: destinations){filter} "
                    ))),
                area,
            );
        }
        Table::Destinations => {
            let head = column_titles(&DEST_COLUMNS, v);
            let rows = m.dests.iter().map(|d| {
                let style = if d.percent >= 80.0 {
                    Style::default().fg(Color::Red)
                } else if d.percent >= 50.0 {
                    Style::default().fg(Color::Yellow)
                } else {
                    Style::default()
                };
                Row::new(vec![
                    d.dest.netns.to_string(),
                    d.dest.laddr.to_string(),
                    format!("{}:{}", d.dest.raddr, d.dest.rport),
                    d.time_wait.to_string(),
                    d.live.to_string(),
                    format!("{:.1}% of {}", d.percent, d.usable),
                    format!("{:.1}", d.entered_per_s),
                    match d.exhaustion_s {
                        _ if d.held >= d.usable => "now".into(),
                        Some(s) => format!("{s:.0}s"),
                        None => "-".into(),
                    },
                ])
                .style(style)
            });
            let widths = [
                Constraint::Length(11),
                Constraint::Length(16),
                Constraint::Min(22),
                Constraint::Length(7),
                Constraint::Length(7),
                Constraint::Length(16),
                Constraint::Length(7),
                Constraint::Length(13),
            ];
            f.render_widget(
                TableWidget::new(rows, widths)
                    .header(head)
                    .block(titled(format!(
                        " Destinations: local ports held (Tab: processes){filter} "
                    ))),
                area,
            );
        }
    }
}

fn lifetimes(f: &mut Frame, area: Rect, m: &Model) {
    let bars: Vec<Bar> = m
        .lifetimes
        .iter()
        .map(|(label, n)| Bar::default().label(Line::from(*label)).value(*n))
        .collect();
    let t = &m.totals;
    let ends = format!(
        " Lifetimes | ended: expired {} reused {} recycled {} reset {} purged {} ",
        t.expired, t.reused, t.recycled, t.reset, t.purged
    );
    f.render_widget(
        BarChart::default()
            .block(titled(ends))
            .data(BarGroup::default().bars(&bars))
            .bar_width(7)
            .bar_gap(1),
        area,
    );
}

fn side(f: &mut Frame, area: Rect, m: &Model) {
    let [adv, log] =
        Layout::vertical([Constraint::Percentage(45), Constraint::Percentage(55)]).areas(area);
    let advice: Vec<Line> = if m.advice.is_empty() {
        vec![Line::from("nothing to advise: no evidence of a problem")]
    } else {
        m.advice
            .iter()
            .map(|a| Line::from(format!("- {}", a.text)))
            .collect()
    };
    f.render_widget(
        Paragraph::new(advice)
            .wrap(Wrap { trim: true })
            .block(titled(" Advice ".into())),
        adv,
    );
    let lines: Vec<Line> = m.log.iter().map(|l| Line::from(l.clone())).collect();
    f.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(titled(" Failures and closes without TIME_WAIT ".into())),
        log,
    );
}

const HELP: &str = "q/Esc quit   Tab switch table   s next sort column   S reverse sort\n\
/ filter (comm, pid, cgroup, port, address; Enter applies, Esc clears)\n\
n next network namespace (all, then each)   p pause   ? this help";

pub fn draw(f: &mut Frame, m: &Model, v: &ViewState, input: Option<&str>) {
    let area = f.area();
    let head = header(m, v);
    let [top, middle, bottom, status] = Layout::vertical([
        Constraint::Length(head.len() as u16),
        Constraint::Min(6),
        Constraint::Length(12),
        Constraint::Length(1),
    ])
    .areas(area);
    f.render_widget(Paragraph::new(head), top);
    table(f, middle, m, v);
    let [hist, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    lifetimes(f, hist, m);
    side(f, right, m);
    let status_line = match input {
        Some(text) => format!("filter: {text}_"),
        None => "q quit  Tab table  s/S sort  / filter  n netns  p pause  ? help".into(),
    };
    f.render_widget(
        Paragraph::new(status_line).style(Style::default().add_modifier(Modifier::REVERSED)),
        status,
    );
    if v.help {
        let w = area.width.min(76);
        let popup = Rect::new(area.x + (area.width - w) / 2, area.y + 3, w, 6);
        f.render_widget(Clear, popup);
        f.render_widget(Paragraph::new(HELP).block(titled(" Keys ".into())), popup);
    }
}
