//! The processes and destinations tables. Columns are as wide as their widest cell; when the
//! terminal is narrower, whole columns go (least important first) rather than cutting a
//! number. Only names are shortened, with `…`, and always bounded (a comm escaped for the
//! terminal can be four times its 15 bytes).

use ratatui::{
    Frame,
    layout::{Constraint, Rect},
    style::{Color, Modifier, Style},
    widgets::{Block, Row, Table as TableWidget},
};

use super::{
    fit::{Field, ellipsize, ellipsize_start, fit_one, width},
    model::{DEST_COLUMNS, Model, PROC_COLUMNS, Table, ViewState},
};

/// A name column: at least `min` columns or none, at most `cap`; cut from the start
/// (`tail`) for paths.
#[derive(Clone, Copy)]
struct Name {
    min: usize,
    cap: usize,
    tail: bool,
}

/// Importance of each column (0 is kept longest) and, for names, how to bound them.
const PROC_FIT: [(u8, Option<Name>); 10] = [
    (1, None),
    (
        0,
        Some(Name {
            min: 6,
            cap: 24,
            tail: false,
        }),
    ),
    (
        3,
        Some(Name {
            min: 10,
            cap: 40,
            tail: true,
        }),
    ),
    (0, None),
    (0, None),
    (4, None),
    (4, None),
    (2, None),
    (4, None),
    (3, None),
];
const DEST_FIT: [(u8, Option<Name>); 8] = [
    (3, None),
    (2, None),
    (0, None),
    (0, None),
    (2, None),
    (0, None),
    (1, None),
    (1, None),
];
const SPACING: usize = 1;

/// Which columns to show and how wide, for `avail` columns: the widths and the indices kept.
/// The sort column is always kept.
fn layout(
    titles: &[String],
    cells: &[Vec<String>],
    fit: &[(u8, Option<Name>)],
    sort: usize,
    avail: usize,
) -> Vec<(usize, usize)> {
    let natural: Vec<usize> = (0..titles.len())
        .map(|i| {
            cells
                .iter()
                .map(|r| width(&r[i]))
                .chain([width(&titles[i])])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let want = |i: usize| match fit[i].1 {
        Some(n) => natural[i].min(n.cap).max(width(&titles[i])),
        None => natural[i],
    };
    let least = |i: usize| match fit[i].1 {
        Some(n) => want(i).min(n.min.max(width(&titles[i]))),
        None => natural[i],
    };
    let mut kept: Vec<usize> = (0..titles.len()).collect();
    let need = |kept: &[usize]| {
        kept.iter().map(|&i| least(i)).sum::<usize>() + kept.len().saturating_sub(1) * SPACING
    };
    while need(&kept) > avail && kept.len() > 1 {
        let drop = kept
            .iter()
            .enumerate()
            .filter(|&(_, &i)| i != sort)
            .max_by_key(|&(pos, &i)| (fit[i].0, pos))
            .map(|(pos, _)| pos);
        match drop {
            Some(pos) => kept.remove(pos),
            None => break,
        };
    }
    // What is left over widens the names, up to their cap.
    let mut spare = avail.saturating_sub(need(&kept));
    kept.iter()
        .map(|&i| {
            let extra = (want(i) - least(i)).min(spare);
            spare -= extra;
            (i, least(i) + extra)
        })
        .collect()
}

/// Draws `cells` under `titles` in `area`, fitted as [`layout`] says.
fn draw_table(
    f: &mut Frame,
    area: Rect,
    title: String,
    titles: Vec<String>,
    cells: Vec<(Vec<String>, Style)>,
    fit: &[(u8, Option<Name>)],
    sort: usize,
) {
    let inner = area.width.saturating_sub(2) as usize;
    let plain: Vec<Vec<String>> = cells.iter().map(|(c, _)| c.clone()).collect();
    let cols = layout(&titles, &plain, fit, sort, inner);
    let pick = |row: &[String]| -> Vec<String> {
        cols.iter()
            .map(|&(i, w)| match fit[i].1 {
                Some(Name { tail: true, .. }) => ellipsize_start(&row[i], w),
                Some(_) => ellipsize(&row[i], w),
                None => row[i].clone(),
            })
            .collect()
    };
    let head = Row::new(pick(&titles)).style(Style::default().add_modifier(Modifier::REVERSED));
    let rows = cells
        .iter()
        .map(|(row, style)| Row::new(pick(row)).style(*style));
    let widths: Vec<Constraint> = cols
        .iter()
        .map(|&(_, w)| Constraint::Length(w as u16))
        .collect();
    f.render_widget(
        TableWidget::new(rows, widths)
            .header(head)
            .column_spacing(SPACING as u16)
            .block(Block::bordered().title(title)),
        area,
    );
}

/// A table's column titles, the sort column marked with its direction.
fn column_titles(columns: &[&str], sort: usize, v: &ViewState) -> Vec<String> {
    let arrow = if v.reverse { "^" } else { "v" };
    columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i == sort {
                format!("{c}{arrow}")
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The block's title on one line: what the table is, then the filter, then the Tab hint.
fn title(what: &str, other: &str, v: &ViewState, width: usize) -> String {
    let mut fields = vec![Field::new(what, "", 0)];
    if !v.filter.is_empty() {
        fields.push(Field::new(format!("filter: {}", v.filter), " ", 0));
    }
    fields.push(Field::new(format!("(Tab: {other})"), " ", 2));
    format!(" {} ", fit_one(&fields, width.saturating_sub(4)))
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v >= 10_000.0 => format!("{:.1}s", v / 1000.0),
        Some(v) => format!("{v:.0}ms"),
    }
}

pub fn table(f: &mut Frame, area: Rect, m: &Model, v: &ViewState) {
    let w = area.width as usize;
    match v.table {
        Table::Processes => {
            let sort = v.sort.min(PROC_COLUMNS.len() - 1);
            let cells = m
                .procs
                .iter()
                .map(|p| {
                    (
                        vec![
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
                        ],
                        Style::default(),
                    )
                })
                .collect();
            draw_table(
                f,
                area,
                title("Processes that closed first", "destinations", v, w),
                column_titles(&PROC_COLUMNS, sort, v),
                cells,
                &PROC_FIT,
                sort,
            );
        }
        Table::Destinations => {
            let sort = v.sort.min(DEST_COLUMNS.len() - 1);
            let cells = m
                .dests
                .iter()
                .map(|d| {
                    let style = if d.percent >= 80.0 {
                        Style::default().fg(Color::Red)
                    } else if d.percent >= 50.0 {
                        Style::default().fg(Color::Yellow)
                    } else {
                        Style::default()
                    };
                    (
                        vec![
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
                        ],
                        style,
                    )
                })
                .collect();
            draw_table(
                f,
                area,
                title("Destinations: local ports held", "processes", v, w),
                column_titles(&DEST_COLUMNS, sort, v),
                cells,
                &DEST_FIT,
                sort,
            );
        }
    }
}
