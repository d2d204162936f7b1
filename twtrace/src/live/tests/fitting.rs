//! The view at 80x24 and up: no number cut, the key figures kept, advice wrapped, columns
//! dropped by importance, and the behaviours an SRE leans on at 3 a.m. (Esc, folded log
//! lines, rows that keep their place).

use std::{collections::HashSet, net::IpAddr};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::{S, draw_at, model, state};
use crate::{
    advice::Advice,
    aggregate::{PortFailureRecord, Record, tests::enter},
    event::{Endpoints, Event, Family, PortFailure, PortOp, Process, Substate, TwKey},
    kernel::tracer::Loss,
    live::{
        fit::{Field, fit, pack, wrap_words},
        keys::{Action, on_key},
        model::{Model, PROC_COLUMNS, Table, ViewState},
    },
};

const SIZES: [(u16, u16); 3] = [(80, 24), (120, 40), (200, 50)];

/// The words of `text` with a digit in them ("127.0.0.1:8080", "2000ms", "(70.0%)"),
/// split at blanks, borders and bars, without the punctuation around them.
fn numbers(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || "│┌┐└┘─█▁▂▃▄▅▆▇".contains(c))
        .map(|t| t.trim_matches(|c| ",;()+".contains(c)))
        .filter(|t| t.chars().any(|c| c.is_ascii_digit()))
        .map(str::to_string)
        .collect()
}

/// A busy box: processes with TIME_WAITs, big loss counters, a kernel check that differs,
/// long advice and log lines full of numbers.
fn busy() -> (ViewState, Model) {
    let (mut agg, clock) = state();
    let comms = ["nginx", "envoy", "haproxy", "postgres", "redis-server"];
    let mut out = vec![];
    for i in 0..15u64 {
        let mut e = enter(TwKey::Cookie(100 + i), 4 * S + i, Substate::TimeWait);
        if let Event::TwEnter(t) = &mut e {
            let n = (i % 5) as usize;
            t.closer = Some(Process {
                pid: 7001 + n as u32,
                tid: 7001,
                uid: 0,
                comm: comms[n].into(),
                cgroup_id: 0,
                host_pid: None,
            });
            t.conn.lport = 40001 + i as u16 % 9;
        }
        agg.ingest(e, &mut out);
    }
    // One more for nginx, so it heads the table.
    let mut e = enter(TwKey::Cookie(300), 4 * S + 50, Substate::TimeWait);
    if let Event::TwEnter(t) = &mut e {
        t.closer = Some(Process {
            pid: 7001,
            tid: 7001,
            uid: 0,
            comm: "nginx".into(),
            cgroup_id: 0,
            host_pid: None,
        });
    }
    agg.ingest(e, &mut out);
    clock.set(5 * S);
    let mut v = ViewState::default();
    let mut m = model(&agg, &mut v);
    m.loss = Loss {
        ringbuf_full: 123456,
        recursion_misses: 1,
        conn_map_fail: 77,
        ..Loss::default()
    };
    m.ends_without_start = 2;
    m.recovered = 1;
    m.end_lost = 0;
    m.kernel_check = Some((
        false,
        "kernel check, netns 4026531840: TcpExtTW kernel 98765 twtrace 98760 DIFFERS by 5, \
         TcpExtTWRecycled 0 = 0, TcpExtTCPTimeWaitOverflow 31 = 31"
            .into(),
    ));
    m.rates.entered = 12.5;
    m.rates.expired = 11.25;
    m.rates.connect_failed = 3.5;
    m.rates.overflow = 0.75;
    m.connect_failed = 4242;
    m.advice = vec![Advice {
        rule: "port_pressure",
        netns: Some(1),
        subject: "127.0.0.1:8080".into(),
        text: "127.0.0.1:8080 holds 7 of 10 usable local ports (70.0%) in TIME_WAIT, \
               8.5 new each second: widen ip_local_port_range (now 40000-40009), \
               spread connections over more destination addresses, or keep connections \
               alive and pool them"
            .into(),
    }];
    m.log = vec![
        "23:01:02 UTC connect EADDRNOTAVAIL 10.20.30.40:8443 by curl (4321), 28232 TIME_WAITs holding x 17".into(),
        "23:01:01 UTC no TIME_WAIT (overflow) 127.0.0.1:40001 -> 127.0.0.1:9000 by proxy".into(),
    ];
    (v, m)
}

/// Every number on screen is one the model has, whole with its unit: none was cut at the
/// edge of a line, a cell or a title. The whole ones are those of a terminal too wide to cut.
fn assert_no_cut_number(m: &Model, v: &ViewState, w: u16, h: u16) {
    let (full, _) = draw_at(m, v, 400, 120);
    let known: HashSet<String> = numbers(&full).into_iter().collect();
    for n in [
        "123456",
        "4026531840:",
        "98765",
        "tcp_max_tw_buckets=131072",
        "40000-40009",
        "28232",
        "12.5/s",
    ] {
        assert!(known.contains(n), "{n} not in the model's words: {known:?}");
    }
    let (text, _) = draw_at(m, v, w, h);
    for n in numbers(&text) {
        assert!(known.contains(&n), "{n} is cut at {w}x{h}:\n{text}");
    }
}

#[test]
fn no_number_is_cut_at_any_size() {
    let (mut v, m) = busy();
    let sweep = (60..=200).step_by(7).flat_map(|w| [(w, 24), (w, 40)]);
    for (w, h) in SIZES.into_iter().chain(sweep) {
        for table in [Table::Processes, Table::Destinations] {
            v.table = table;
            assert_no_cut_number(&m, &v, w, h);
        }
    }
}

#[test]
fn key_figures_are_visible_at_80x24() {
    let (v, m) = busy();
    let (text, _) = draw_at(&m, &v, 80, 24);
    assert!(
        text.contains(&format!("TIME_WAIT alive {}", m.alive)),
        "{text}"
    );
    assert!(text.contains("entered 12.5/s"), "{text}");
    assert!(
        text.contains("lost:") && text.contains("123456 ring buffer full"),
        "{text}"
    );
    assert!(text.contains("77 map full"), "{text}");
    assert!(text.contains("DIFFERS by 5"), "{text}");
    assert!(text.contains("connect 3.5"), "{text}");
    // The top process, with its count, on its row.
    let top = &m.procs[0];
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("│{} ", top.pid)))
        .unwrap_or_else(|| panic!("no row of the top process:\n{text}"));
    assert!(
        row.contains(&top.comm) && row.contains(&format!(" {} ", top.alive)),
        "{row}"
    );
    // Titles are shortened at a word, never mid-word ("TIME_" of a cut title).
    assert_eq!(
        text.matches("TIME_").count(),
        text.matches("TIME_WAIT").count(),
        "{text}"
    );
    // And everything at the wider sizes.
    for (w, h) in &SIZES[1..] {
        let (text, _) = draw_at(&m, &v, *w, *h);
        assert!(
            text.contains("TIME_WAIT alive") && text.contains("lost:"),
            "{text}"
        );
    }
}

/// The inside of the bordered pane titled `title`, its lines joined.
fn pane_text(text: &str, title: &str) -> String {
    let lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
    let (top, start) = lines
        .iter()
        .enumerate()
        .find_map(|(y, l)| {
            let s: String = l.iter().collect();
            s.find(&format!("┌ {title} "))
                .map(|b| (y, s[..b].chars().count()))
        })
        .unwrap_or_else(|| panic!("no pane {title}:\n{text}"));
    let end = (start + 1..lines[top].len())
        .find(|&x| lines[top][x] == '┐')
        .unwrap();
    lines[top + 1..]
        .iter()
        .take_while(|l| l[start] != '└')
        .map(|l| l[start + 1..end].iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn advice_is_wrapped_whole_at_80x24() {
    let (v, m) = busy();
    for (w, h) in SIZES {
        let (text, _) = draw_at(&m, &v, w, h);
        let shown = pane_text(&text, "Advice");
        let words: Vec<&str> = shown.split_whitespace().collect();
        let want: Vec<&str> = std::iter::once("-")
            .chain(m.advice[0].text.split_whitespace())
            .collect();
        assert_eq!(words, want, "at {w}x{h}:\n{text}");
    }
}

#[test]
fn narrow_tables_drop_the_least_important_columns_first() {
    let (mut v, m) = busy();
    let titles = |v: &ViewState, w| {
        let (text, _) = draw_at(&m, v, w, 24);
        let row = text
            .lines()
            .find(|l| l.contains("PID"))
            .unwrap_or_else(|| panic!("{text}"))
            .to_string();
        row.trim_matches(|c| c == '│' || c == ' ')
            .split_whitespace()
            .map(|t| t.trim_end_matches(['v', '^']).to_string())
            .collect::<Vec<_>>()
    };
    let wide = titles(&v, 200);
    assert_eq!(wide, PROC_COLUMNS.map(String::from).to_vec());
    let narrow = titles(&v, 60);
    // Whole titles only, in order, the important ones kept.
    for t in &narrow {
        assert!(PROC_COLUMNS.contains(&t.as_str()), "{t} in {narrow:?}");
    }
    for t in ["PID", "COMM", "ALIVE", "NEW/s"] {
        assert!(narrow.contains(&t.to_string()), "{t} dropped: {narrow:?}");
    }
    assert!(!narrow.contains(&"MEAN".to_string()), "{narrow:?}");
    assert!(narrow.len() < wide.len());
    // The sort column stays, whatever its importance.
    v.sort = 8;
    assert!(titles(&v, 60).contains(&"MEAN".to_string()));
}

#[test]
fn hostile_names_are_bounded() {
    let (v, mut m) = busy();
    // Already escaped where it came in (decode.rs): long, but no control character.
    m.procs[0].comm = "\\x1b[2J\\x1b]0;pwned\\x07".repeat(4);
    m.procs[0].cgroup = "/kubepods.slice/".repeat(10) + "cri-containerd-abc.scope";
    let (text, buf) = draw_at(&m, &v, 80, 24);
    assert!(!text.contains(&m.procs[0].comm), "{text}");
    assert!(text.contains('…'), "{text}");
    let pid = m.procs[0].pid.to_string();
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("│{pid} ")))
        .expect("the row");
    assert!(row.contains(&format!(" {} ", m.procs[0].alive)), "{row}");
    for c in buf.content() {
        assert!(!c.symbol().chars().any(char::is_control));
    }
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

#[test]
fn esc_closes_what_is_open_before_it_quits() {
    let mut v = ViewState::default();
    let mut input = None;
    v.help = true;
    assert_eq!(
        on_key(&mut v, &mut input, key(KeyCode::Esc)),
        Action::Redraw
    );
    assert!(!v.help);
    assert_eq!(
        on_key(&mut v, &mut input, key(KeyCode::Char('/'))),
        Action::Redraw
    );
    for c in "q9".chars() {
        assert_eq!(
            on_key(&mut v, &mut input, key(KeyCode::Char(c))),
            Action::Redraw
        );
    }
    assert_eq!(input.as_deref(), Some("q9"), "q is typed into the filter");
    assert_eq!(
        on_key(&mut v, &mut input, key(KeyCode::Esc)),
        Action::Redraw
    );
    assert_eq!(input, None);
    assert!(v.filter.is_empty());
    assert_eq!(on_key(&mut v, &mut input, key(KeyCode::Esc)), Action::Quit);
    v.help = true;
    assert_eq!(
        on_key(&mut v, &mut input, key(KeyCode::Char('q'))),
        Action::Quit
    );
    assert_eq!(
        on_key(&mut v, &mut input, key(KeyCode::Char('n'))),
        Action::NextNetns
    );
}

fn failure(ts_ns: u64, pid: u32, holding: u32) -> Record {
    Record::PortFailure(PortFailureRecord {
        failure: PortFailure {
            ts_ns,
            cpu: 0,
            op: PortOp::Connect,
            errno: -99,
            conn: Endpoints {
                netns: 1,
                family: Family::Ipv4,
                laddr: IpAddr::from([10, 0, 0, 1]),
                lport: 0,
                raddr: IpAddr::from([10, 0, 0, 2]),
                rport: 443,
            },
            process: Process {
                pid,
                tid: pid,
                uid: 0,
                comm: "curl".into(),
                cgroup_id: 0,
                host_pid: None,
            },
        },
        time_wait_holding: holding,
    })
}

#[test]
fn repeated_log_lines_are_folded() {
    let (agg, _) = state();
    let mut v = ViewState::default();
    let t = |ns: u64| format!("t{}", ns / S);
    v.note(&failure(S, 55, 1), t);
    v.note(&failure(2 * S, 66, 1), t);
    v.note(&failure(3 * S, 55, 1), t);
    v.note(&failure(4 * S, 55, 1), t);
    let m = model(&agg, &mut v);
    assert_eq!(
        m.log,
        [
            "t4 connect EADDRNOTAVAIL 10.0.0.2:443 by curl (55), 1 TIME_WAIT holding x 3",
            "t2 connect EADDRNOTAVAIL 10.0.0.2:443 by curl (66), 1 TIME_WAIT holding",
        ]
    );
    v.note(&failure(5 * S, 55, 2), t);
    let m = model(&agg, &mut v);
    assert_eq!(
        m.log[0],
        "t5 connect EADDRNOTAVAIL 10.0.0.2:443 by curl (55), 2 TIME_WAITs holding"
    );
}

#[test]
fn rows_with_equal_keys_keep_their_order() {
    let (mut agg, clock) = state();
    let mut out = vec![];
    for i in 0..12u32 {
        let mut e = enter(TwKey::Cookie(200 + i as u64), 4 * S, Substate::TimeWait);
        if let Event::TwEnter(t) = &mut e {
            t.closer = Some(Process {
                pid: 900 - i,
                tid: 900 - i,
                uid: 0,
                comm: "same".into(),
                cgroup_id: 0,
                host_pid: None,
            });
        }
        agg.ingest(e, &mut out);
    }
    clock.set(5 * S);
    let mut v = ViewState::default();
    let order =
        |v: &mut ViewState| -> Vec<u32> { model(&agg, v).procs.iter().map(|p| p.pid).collect() };
    let first = order(&mut v);
    let ties: Vec<u32> = first.iter().copied().filter(|&p| p > 800).collect();
    let mut sorted = ties.clone();
    sorted.sort_unstable();
    assert_eq!(ties, sorted, "equal ALIVE: by pid");
    for _ in 0..20 {
        assert_eq!(order(&mut v), first);
    }
    v.reverse = true;
    let reversed = order(&mut v);
    for _ in 0..20 {
        assert_eq!(order(&mut v), reversed);
    }
}

#[test]
fn wrapping_never_breaks_a_word_that_fits() {
    let text = "connect EADDRNOTAVAIL 10.20.30.40:8443 by curl (4321), 28232 TIME_WAITs";
    for w in 18..60 {
        let lines = wrap_words(text, w, "  ");
        let words: Vec<&str> = lines.iter().flat_map(|l| l.split_whitespace()).collect();
        assert_eq!(words, text.split_whitespace().collect::<Vec<_>>(), "at {w}");
        assert!(lines.iter().all(|l| l.chars().count() <= w), "{lines:?}");
    }
    // Only a word wider than the line is broken.
    assert_eq!(wrap_words("abcdefgh", 3, ""), ["abc", "def", "gh"]);
}

#[test]
fn fields_go_by_importance_then_wrap_between_them() {
    let rows = [vec![
        Field::new("alive 7", "", 0),
        Field::new("delay=1000ms", "  ", 3),
        Field::new("entered 1.5/s", "  ", 0),
    ]];
    let text = |lines: Vec<ratatui::text::Line>| -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    };
    assert_eq!(
        text(fit(&rows, 40, 1)),
        ["alive 7  delay=1000ms  entered 1.5/s"]
    );
    assert_eq!(text(fit(&rows, 30, 1)), ["alive 7  entered 1.5/s"]);
    assert_eq!(
        text(fit(&rows, 30, 2)),
        ["alive 7  delay=1000ms", "  entered 1.5/s"]
    );
    assert_eq!(text(pack(&rows[0], 0, 16)), ["alive 7", "  entered 1.5/s"]);
    // A field wider than a line wraps between its words.
    assert_eq!(
        text(pack(&rows[0], 0, 12)),
        ["alive 7", "  entered", "  1.5/s"]
    );
}

/// A log too long for its pane shows whole entries, newest first, and says how many more.
#[test]
fn a_full_log_pane_says_how_many_more() {
    let (v, mut m) = busy();
    m.log = (0..30)
        .map(|i| {
            format!(
                "23:01:{i:02} UTC no TIME_WAIT (overflow) 127.0.0.1:{} by proxy",
                40000 + i
            )
        })
        .rev()
        .collect();
    let (text, _) = draw_at(&m, &v, 80, 24);
    let shown = pane_text(&text, "Failures");
    let shown = shown.split_whitespace().collect::<Vec<_>>().join(" ");
    let whole = shown.matches(" by proxy").count();
    assert!(whole >= 1, "{text}");
    assert!(shown.starts_with("23:01:29 UTC"), "newest first: {shown}");
    assert!(shown.ends_with(&format!("+{} more", 30 - whole)), "{text}");
}
