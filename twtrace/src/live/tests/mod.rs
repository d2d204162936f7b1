//! Rendering tests: aggregator states built in memory, drawn on ratatui's TestBackend.

use std::net::IpAddr;

use ratatui::{Terminal, backend::TestBackend, style::Color};

use super::{
    model::{Model, Table, ViewState},
    ui::draw,
};
use crate::{
    aggregate::{
        Aggregator, ReplayClock,
        tests::{end, enter},
    },
    event::{
        CloseKind, EndReason, Endpoints, Event, Family, NetnsSettings, NoTimeWait, NoTwReason,
        Process, Role, Substate, TwKey,
    },
    kernel::tracer::Loss,
};

const S: u64 = 1_000_000_000;

fn state() -> (Aggregator<ReplayClock>, ReplayClock) {
    let clock = ReplayClock::default();
    let mut agg = Aggregator::new(clock.clone(), 250);
    let mut out = vec![];
    agg.ingest(
        Event::Settings {
            ts_ns: 0,
            netns: 1,
            settings: NetnsSettings {
                tcp_tw_reuse: 2,
                tcp_tw_reuse_delay_ms: Some(1000),
                tcp_max_tw_buckets: 131072,
                tcp_fin_timeout: 60,
                tcp_timestamps: 1,
                tcp_rfc1337: 0,
                port_range: (40000, 40009),
                reserved_ports: vec![],
            },
        },
        &mut out,
    );
    for i in 0..8u64 {
        agg.ingest(
            enter(TwKey::Cookie(i + 1), S + i, Substate::TimeWait),
            &mut out,
        );
    }
    agg.ingest(end(TwKey::Cookie(1), 3 * S, EndReason::Reused), &mut out);
    clock.set(4 * S);
    (agg, clock)
}

fn render(agg: &Aggregator<ReplayClock>, v: &mut ViewState) -> (String, ratatui::buffer::Buffer) {
    let m = model(agg, v);
    draw_at(&m, v, 140, 40)
}

fn model(agg: &Aggregator<ReplayClock>, v: &mut ViewState) -> Model {
    v.model(agg, "host1", "6.18", 0, None, &mut |_| {
        "/system.slice/app.service".into()
    })
}

/// `m` drawn on a `w`x`h` terminal: its text, a line per row, and the buffer.
fn draw_at(m: &Model, v: &ViewState, w: u16, h: u16) -> (String, ratatui::buffer::Buffer) {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| draw(f, m, v, None)).unwrap();
    let buf = term.backend().buffer().clone();
    let text: String = (0..buf.area.height)
        .map(|y| {
            (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol().to_string())
                .collect::<String>()
                + "\n"
        })
        .collect();
    (text, buf)
}

#[test]
fn shows_alive_count_processes_and_settings() {
    let (agg, _) = state();
    let mut v = ViewState::default();
    let (text, _) = render(&agg, &mut v);
    assert!(text.contains("TIME_WAIT alive 7"), "{text}");
    assert!(text.contains("client"), "{text}");
    assert!(text.contains("/system.slice/app.service"), "{text}");
    assert!(text.contains("tcp_tw_reuse=2"), "{text}");
    assert!(text.contains("ip_local_port_range=40000-40009"), "{text}");
    assert!(text.contains("reused 1"), "{text}");
}

#[test]
fn destination_table_shows_pressure() {
    let (agg, _) = state();
    let mut v = ViewState {
        table: Table::Destinations,
        ..ViewState::default()
    };
    let (text, _) = render(&agg, &mut v);
    // 7 TIME_WAITs on ephemeral port 40000 towards 127.0.0.1:8080 of 10 usable ports.
    assert!(text.contains("127.0.0.1:8080"), "{text}");
    assert!(text.contains("70.0% of 10"), "{text}");
}

#[test]
fn loss_is_red_when_not_zero() {
    let (mut agg, _) = state();
    let mut v = ViewState::default();
    let (text, buf) = render(&agg, &mut v);
    let row = text.lines().position(|l| l.contains("lost:")).unwrap() as u16;
    assert_ne!(buf[(0, row)].bg, Color::Red);
    agg.ingest(
        Event::Snapshot {
            ts_ns: 5 * S,
            passive_closes: vec![],
            loss: Loss {
                ringbuf_full: 3,
                ..Loss::default()
            },
        },
        &mut vec![],
    );
    let (text, buf) = render(&agg, &mut v);
    assert!(text.contains("lost: 3 ring buffer full"), "{text}");
    assert!(text.contains("0 starts recovered"), "{text}");
    assert_eq!(buf[(0, row)].bg, Color::Red);
    // A start the sweep found is counted as such.
    let Event::TwEnter(mut e) = enter(TwKey::Cookie(99), 5 * S, Substate::TimeWait) else {
        unreachable!()
    };
    e.recovered = Some(crate::event::Recovered::Alive);
    agg.ingest(Event::TwEnter(e), &mut vec![]);
    let (text, _) = render(&agg, &mut v);
    assert!(text.contains("1 start recovered"), "{text}");
}

#[test]
fn log_filter_sort_and_help() {
    let (mut agg, clock) = state();
    let mut v = ViewState::default();
    let mut out = vec![];
    agg.ingest(
        Event::NoTimeWait(NoTimeWait {
            ts_ns: 4 * S,
            cpu: 0,
            cookie: 99,
            conn: Endpoints {
                netns: 1,
                family: Family::Ipv4,
                laddr: IpAddr::from([127, 0, 0, 1]),
                lport: 40001,
                raddr: IpAddr::from([127, 0, 0, 1]),
                rport: 9000,
            },
            closer: Some(Process {
                pid: 77,
                tid: 77,
                host_pid: None,
                uid: 0,
                comm: "proxy".into(),
                cgroup_id: 0,
            }),
            role: Role::Client,
            close: CloseKind::Active,
            reason: NoTwReason::Overflow,
            oldstate: 5,
        }),
        &mut out,
    );
    for r in &out {
        v.note(r, |ns| format!("t{}", ns / S));
    }
    clock.set(5 * S);
    let (text, _) = render(&agg, &mut v);
    assert!(text.contains("t4 no TIME_WAIT (overflow)"), "{text}");
    assert!(!text.contains(" x "), "one line, not folded: {text}");
    assert!(text.contains("tcp_max_tw_buckets"), "{text}");
    // A filter that matches nothing empties the table.
    v.filter = "nomatch".into();
    let (text, _) = render(&agg, &mut v);
    assert!(!text.contains(" client "), "{text}");
    assert!(text.contains("filter: nomatch"), "{text}");
    v.filter.clear();
    v.help = true;
    let (text, _) = render(&agg, &mut v);
    assert!(text.contains("next network namespace"), "{text}");
}

#[test]
fn picking_a_namespace_narrows_the_view() {
    let (mut agg, _) = state();
    let mut out = vec![];
    let mut other = enter(TwKey::Cookie(500), 2 * S, Substate::TimeWait);
    if let Event::TwEnter(e) = &mut other {
        e.conn.netns = 2;
    }
    agg.ingest(other, &mut out);
    let mut v = ViewState::default();
    assert!(render(&agg, &mut v).0.contains("TIME_WAIT alive 8"));
    v.next_netns(&agg);
    assert_eq!(v.netns, Some(1));
    assert!(render(&agg, &mut v).0.contains("TIME_WAIT alive 7"));
    v.next_netns(&agg);
    assert_eq!(v.netns, Some(2));
    assert!(render(&agg, &mut v).0.contains("TIME_WAIT alive 1"));
    v.next_netns(&agg);
    assert_eq!(v.netns, None);
}

/// The rates of one namespace are that namespace's: entered/s and ended/s count its
/// TIME_WAITs alone.
#[test]
fn a_namespace_shows_its_own_rates() {
    let (mut agg, clock) = state();
    let mut v = ViewState {
        netns: Some(2),
        ..ViewState::default()
    };
    let mut out = vec![];
    let _ = v.model(&agg, "h", "k", 0, None, &mut |_| String::new());
    // Over 2 s: 10 TIME_WAITs enter namespace 1, 4 enter namespace 2 and one of them ends.
    for i in 0..14u64 {
        let mut e = enter(TwKey::Cookie(1000 + i), 4 * S + i, Substate::TimeWait);
        if let Event::TwEnter(t) = &mut e {
            t.conn.netns = if i < 10 { 1 } else { 2 };
        }
        agg.ingest(e, &mut out);
    }
    agg.ingest(end(TwKey::Cookie(1010), 5 * S, EndReason::Reset), &mut out);
    clock.set(6 * S);
    let m = v.model(&agg, "h", "k", 0, None, &mut |_| String::new());
    assert_eq!(m.rates.entered, 2.0, "4 in 2 s");
    assert_eq!(m.rates.reset, 0.5);
    assert_eq!(m.rates.reused, 0.0, "the reuse was in namespace 1");
    assert_eq!(m.totals.entered, 4);
    v.netns = None;
    v.next_netns(&agg);
    let _ = v.model(&agg, "h", "k", 0, None, &mut |_| String::new());
    let all = agg.totals();
    assert_eq!(all.entered, 8 + 14);
}

mod fitting;
