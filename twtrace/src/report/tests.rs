//! Reports of synthetic recordings with known figures: windows, filters, the timeline.

use super::*;
use crate::{
    aggregate::tests::{end, enter},
    event::{Event, NoTimeWait, Substate, TwKey},
    record::{Header, InMemory},
};

fn trace(events: Vec<Event>) -> (String, InMemory) {
    (
        "t".into(),
        InMemory {
            header: Header {
                kernel: "k".into(),
                ..Header::new("h", 250)
            },
            frames: vec![events].into(),
            warnings: vec![],
        },
    )
}

fn run(evs: &[Event], filters: &Filters, from_s: Option<u64>, to_s: Option<u64>) -> Report {
    try_run(evs, filters, from_s, to_s).unwrap()
}

fn try_run(
    evs: &[Event],
    filters: &Filters,
    from_s: Option<u64>,
    to_s: Option<u64>,
) -> Result<Report, ReportError> {
    let w = Window {
        from_ns: from_s.map(|s| s * SECOND),
        to_ns: to_s.map(|s| s * SECOND),
    };
    build(&mut [trace(evs.to_vec())], filters, w)
}

/// A TIME_WAIT closed by `pid` in `netns`.
fn enter_by(key: u64, ts: u64, netns: u32, pid: u32) -> Event {
    let Event::TwEnter(mut e) = enter(TwKey::Cookie(key), ts, Substate::TimeWait) else {
        unreachable!()
    };
    e.conn.netns = netns;
    if let Some(p) = e.closer.as_mut() {
        p.pid = pid;
    }
    Event::TwEnter(e)
}

/// A close that skipped TIME_WAIT, by `pid` in `netns`.
fn no_tw(ts: u64, netns: u32, pid: u32, reason: NoTwReason) -> Event {
    let Event::TwEnter(e) = enter_by(0, ts, netns, pid) else {
        unreachable!()
    };
    Event::NoTimeWait(NoTimeWait {
        ts_ns: ts,
        cpu: 0,
        cookie: 0,
        conn: e.conn,
        closer: e.closer,
        role: e.role,
        close: e.close,
        reason,
        oldstate: 1,
    })
}

fn snapshot(ts: u64, passive: Vec<(u32, u64)>) -> Event {
    Event::Snapshot {
        ts_ns: ts,
        passive_closes: passive,
        loss: Default::default(),
    }
}

#[test]
fn a_timestamp_at_the_end_of_time_is_not_stepped_through() {
    // A damaged or hostile recording: one event at u64::MAX ns (584 years in).
    let evs = vec![
        enter(TwKey::Cookie(1), SECOND, Substate::TimeWait),
        end(TwKey::Cookie(1), u64::MAX, EndReason::Expired),
    ];
    let started = std::time::Instant::now();
    let r = run(&evs, &Filters::default(), None, None);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(r.totals.entered, 1);
    assert!(r.timeline.len() <= timeline::MAX_BUCKETS);
}

#[test]
fn summarises_a_replay() {
    let mut evs = vec![];
    for i in 0..10u64 {
        let k = TwKey::Cookie(i + 1);
        evs.push(enter(k, i * SECOND, Substate::TimeWait));
        let reason = if i < 3 {
            EndReason::Reused
        } else {
            EndReason::Expired
        };
        evs.push(end(k, i * SECOND + (i + 1) * SECOND, reason));
    }
    evs.sort_by_key(Event::ts_ns);
    let r = run(&evs, &Filters::default(), None, None);
    assert_eq!(r.totals.entered, 10);
    assert_eq!(r.totals.ended, 10);
    assert_eq!(r.reused_pct, 30.0);
    assert_eq!(r.processes[0].comm, "client");
    assert_eq!(r.processes[0].entered, 10);
    assert_eq!(r.lifetime.count, 10);
    assert!((r.lifetime.max_ms.unwrap() - 10_000.0).abs() < 1.0);
    // Alive: one more each second until the first ends at 2 s... at most 5 at once.
    assert_eq!(r.alive_peak, 5);
    assert_eq!(r.destinations[0].time_waits, 10);
    assert_eq!(r.time_waits_per_1000_closed, Some(1000.0));
    assert_eq!(r.span_s, 19.0);
    assert_eq!(r.timeline.len(), 1);
    assert_eq!(r.timeline[0].counts.entered, 10);
}

/// 200 TIME_WAITs begun at 1..2 s, 12 more at 6 s, none ended before 61 s.
fn two_hundred_then_twelve() -> Vec<Event> {
    let mut evs: Vec<Event> = (0..200)
        .map(|i| enter_by(i + 1, SECOND + i * 5_000_000, 1, 10))
        .collect();
    evs.extend((0..12).map(|i| enter_by(1000 + i, 6 * SECOND + i, 1, 10)));
    evs.push(snapshot(9 * SECOND, vec![]));
    evs
}

#[test]
fn alive_at_peak_in_a_window_counts_time_waits_begun_before_it() {
    let evs = two_hundred_then_twelve();
    let r = run(&evs, &Filters::default(), Some(5), Some(8));
    assert_eq!(r.totals.entered, 12, "entered in the window");
    assert_eq!(r.alive_at_start, 200);
    assert_eq!(r.alive_peak, 212, "every TIME_WAIT alive in the window");
    assert_eq!(
        r.alive_mean,
        (200.0 + 212.0 + 212.0) / 3.0,
        "sampled at 6, 7 and 8 s"
    );
    assert_eq!(r.span_s, 3.0);
    assert_eq!(r.from.as_deref(), Some("1970-01-01T00:00:05.000Z"));
    assert_eq!(r.timeline.len(), 1);
    assert_eq!(r.timeline[0].counts.entered, 12);
    // A window that begins before the recording counts from the recording's start: no
    // seconds of nothing in the mean.
    let later: Vec<Event> = evs
        .iter()
        .cloned()
        .map(|mut e| {
            match &mut e {
                Event::TwEnter(t) => t.ts_ns += 1000 * SECOND,
                Event::Snapshot { ts_ns, .. } => *ts_ns += 1000 * SECOND,
                _ => unreachable!(),
            }
            e
        })
        .collect();
    let whole = run(&later, &Filters::default(), None, Some(1008));
    let from_before = run(&later, &Filters::default(), Some(0), Some(1008));
    assert_eq!(from_before.span_s, 7.0);
    assert_eq!(from_before.alive_mean, whole.alive_mean);
    assert!(from_before.alive_mean > 100.0, "{}", from_before.alive_mean);
    // A window with no event of its own still sees what was alive.
    let quiet = run(&evs, &Filters::default(), Some(3), Some(4));
    assert_eq!(quiet.events, 0);
    assert_eq!(quiet.totals.entered, 0);
    assert_eq!(quiet.alive_peak, 200);
    assert!(quiet.warnings.is_empty(), "{:?}", quiet.warnings);
}

#[test]
fn per_1000_closed_is_windowed_and_filtered() {
    let mut evs = vec![];
    // Before the window: 10 TIME_WAITs in netns 1 (pid 10), 10 in netns 2 (pid 20); passive
    // closes so far 30 and 100.
    evs.extend((0..10).map(|i| enter_by(i + 1, SECOND + i, 1, 10)));
    evs.extend((0..10).map(|i| enter_by(100 + i, SECOND + 100 + i, 2, 20)));
    evs.push(snapshot(2 * SECOND, vec![(1, 30), (2, 100)]));
    // In the window (5..8 s): 4 TIME_WAITs and 2 aborts by pid 10 in netns 1; passive closes
    // 6 more in netns 1, 50 more in netns 2.
    evs.extend((0..4).map(|i| enter_by(200 + i, 6 * SECOND + i, 1, 10)));
    evs.extend((0..2).map(|i| no_tw(6 * SECOND + 10 + i, 1, 10, NoTwReason::Abort)));
    evs.push(snapshot(7 * SECOND, vec![(1, 36), (2, 150)]));
    // After it.
    evs.push(enter_by(300, 9 * SECOND, 1, 10));
    evs.push(snapshot(10 * SECOND, vec![(1, 40), (2, 160)]));

    let all = Filters::default();
    let r = run(&evs, &all, Some(5), Some(8));
    assert_eq!(r.totals.entered, 4);
    assert_eq!(r.totals.abort, 2);
    assert_eq!(r.passive_closes, Some(56));
    assert_eq!(r.connections_closed, 4 + 2 + 56);
    assert_eq!(r.time_waits_per_1000_closed, Some(4000.0 / 62.0));

    let netns1 = Filters {
        netns: Some(1),
        ..Filters::default()
    };
    let r = run(&evs, &netns1, Some(5), Some(8));
    assert_eq!(r.passive_closes, Some(6));
    assert_eq!(r.connections_closed, 12);
    assert_eq!(r.time_waits_per_1000_closed, Some(4000.0 / 12.0));

    // Passive closes have no process: under -p the figure is not given, never a wrong one.
    let pid = Filters {
        pid: Some(10),
        ..Filters::default()
    };
    let r = run(&evs, &pid, Some(5), Some(8));
    assert_eq!(r.totals.entered, 4);
    assert_eq!(r.passive_closes, None);
    assert_eq!(r.connections_closed, 6);
    assert_eq!(r.time_waits_per_1000_closed, None);
    assert!(
        r.warnings.iter().any(|w| w.contains("not given under -p")),
        "{:?}",
        r.warnings
    );

    // The whole file.
    let r = run(&evs, &all, None, None);
    assert_eq!(r.totals.entered, 25);
    assert_eq!(r.connections_closed, 25 + 2 + 200);
    assert_eq!(r.time_waits_per_1000_closed, Some(25_000.0 / 227.0));
}

#[test]
fn a_window_outside_the_recording_is_an_error() {
    let evs = two_hundred_then_twelve();
    for (from, to) in [(Some(20), None), (Some(10), Some(12)), (None, Some(0))] {
        let e = try_run(&evs, &Filters::default(), from, to).expect_err("refused");
        assert!(matches!(e, ReportError::OutsideWindow { .. }), "{e}");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("spans 1970-01-01T00:00:01.000Z to 1970-01-01T00:00:09.000Z (8.0 s)"),
            "{msg}"
        );
        assert!(msg.contains("--from 0s --to 8s"), "{msg}");
    }
    // Overlapping the end is a window.
    assert!(try_run(&evs, &Filters::default(), Some(8), Some(100)).is_ok());
}

#[test]
fn trouble_is_placed_in_time() {
    let mut evs = two_hundred_then_twelve();
    evs.push(no_tw(125 * SECOND, 1, 10, NoTwReason::Overflow));
    evs.push(no_tw(190 * SECOND, 1, 10, NoTwReason::Overflow));
    evs.push(no_tw(191 * SECOND, 1, 10, NoTwReason::Abort));
    let r = run(&evs, &Filters::default(), None, None);
    assert_eq!(r.timeline_bucket_s, 60);
    let rows: Vec<(String, u64, u64)> = r
        .timeline
        .iter()
        .map(|row| (row.start.clone(), row.counts.entered, row.counts.overflows))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("1970-01-01T00:00:01.000Z".into(), 212, 0),
            ("1970-01-01T00:02:01.000Z".into(), 0, 1),
            ("1970-01-01T00:03:01.000Z".into(), 0, 1),
        ]
    );
    assert_eq!(r.trouble_from.as_deref(), Some("1970-01-01T00:02:05.000Z"));
    assert_eq!(r.trouble_to.as_deref(), Some("1970-01-01T00:03:10.000Z"));
}

#[test]
fn filters_apply() {
    let evs = vec![
        enter(TwKey::Cookie(1), SECOND, Substate::TimeWait),
        end(TwKey::Cookie(1), 2 * SECOND, EndReason::Expired),
        enter(TwKey::Cookie(2), 10 * SECOND, Substate::TimeWait),
    ];
    let r = run(&evs, &Filters::default(), Some(5), None);
    assert_eq!(r.totals.entered, 1);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let only_other = Filters {
        comm: Some("nobody".into()),
        ..Filters::default()
    };
    let r = run(&evs, &only_other, None, None);
    assert_eq!(r.totals.entered, 0);
    assert_eq!(
        r.totals.unmatched_ends, 0,
        "the filtered TIME_WAIT's end is dropped too"
    );
}

#[test]
fn a_hostile_restatement_is_read_without_overflow() {
    // A rotated file's restated TIME_WAIT with times at the ends of the clock.
    let Event::TwEnter(e) = enter_by(1, SECOND, 1, 10) else {
        unreachable!()
    };
    let seen = crate::event::SeenTw {
        key: TwKey::Cookie(7),
        closer: e.closer.clone(),
        role: Role::Client,
        close: crate::event::CloseKind::Active,
        entered_ns: 0,
        armed_ns: u64::MAX,
        timeout_ns: u64::MAX,
        rescheduled: u32::MAX,
        preexisting: false,
        recovered: false,
    };
    let evs = vec![
        Event::TwExisting {
            ts_ns: SECOND,
            sockets: vec![crate::event::TwExisting {
                conn: e.conn,
                cookie: 7,
                substate: Substate::TimeWait,
                remaining_ms: u32::MAX,
                seen: Some(seen),
            }],
            more: false,
        },
        end(TwKey::Cookie(7), u64::MAX, EndReason::Expired),
        enter(TwKey::Cookie(8), 0, Substate::TimeWait),
        end(TwKey::Cookie(8), u64::MAX, EndReason::Expired),
    ];
    let mut evs = evs;
    evs.push(snapshot(2 * SECOND, vec![(1, u64::MAX), (2, u64::MAX)]));
    let r = run(&evs, &Filters::default(), None, None);
    assert_eq!(r.connections_closed, u64::MAX, "saturated, not wrapped");
    let t = &r.totals;
    assert_eq!((t.carried, t.entered), (1, 1));
    // Whatever the times make of them, every TIME_WAIT is accounted for once.
    assert_eq!(
        t.carried + t.entered - t.ended - t.overdue_dropped,
        r.alive_at_end as u64
    );
    assert_eq!(r.alive_at_end, 0);
}

#[test]
fn older_recordings_out_of_order_are_refused_by_their_times() {
    // Files without a `chain` (recorded before it existed) of one boot of one host.
    let named = |name: &str, evs: Vec<Event>| {
        let (_, mut t) = trace(evs);
        t.header.boot_time = "2026-12-01T00:00:00Z".into();
        (name.to_string(), t)
    };
    let a = || named("r.twt.1", vec![enter_by(1, SECOND, 1, 10)]);
    let b = || {
        named(
            "r.twt",
            vec![end(TwKey::Cookie(1), 10 * SECOND, EndReason::Expired)],
        )
    };
    let e = build(&mut [b(), a()], &Filters::default(), Window::default()).expect_err("refused");
    assert!(matches!(e, ReportError::OutOfOrder { .. }), "{e}");
    assert!(
        e.to_string()
            .ends_with("oldest first: r.twt.1 before r.twt"),
        "{e}"
    );
    let r = build(&mut [a(), b()], &Filters::default(), Window::default()).unwrap();
    assert_eq!((r.totals.entered, r.totals.ended), (1, 1));
    // Another boot's recording is another clock: not compared.
    let mut other = a();
    other.1.header.boot_time = "2026-12-02T00:00:00Z".into();
    assert!(build(&mut [b(), other], &Filters::default(), Window::default()).is_ok());
}
