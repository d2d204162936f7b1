//! Offline analysis: recorded events replayed through the same aggregator as the live views,
//! on a clock driven by the events' own timestamps.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    advice::{self, Advice, Evidence},
    aggregate::{Aggregator, Pressure, Record, ReplayClock, Totals},
    event::{EndReason, NetnsSettings, PortOp, Role},
    filter::{EventFilter, Filters},
    kernel::tracer::Loss,
    record::{Frames, RecordError},
    stats::Lifetimes,
};

const SECOND: u64 = 1_000_000_000;
/// Port pressure is sampled this often (trace time) for its peaks.
const PRESSURE_SAMPLE_NS: u64 = 10 * SECOND;
const TOP: usize = 20;

/// Which part of the recording to look at, in event time (CLOCK_MONOTONIC ns).
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    pub from_ns: Option<u64>,
    pub to_ns: Option<u64>,
}

impl Window {
    fn contains(&self, ts: u64) -> bool {
        self.from_ns.is_none_or(|f| ts >= f) && self.to_ns.is_none_or(|t| ts <= t)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndShare {
    pub end: EndReason,
    pub count: u64,
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessRow {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub container: Option<String>,
    pub entered: u64,
    pub client: u64,
    pub server: u64,
    pub reused_pct: f64,
    pub recycled_pct: f64,
    pub lifetime: Lifetimes,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRow {
    pub netns: u32,
    pub raddr: IpAddr,
    pub rport: u16,
    /// Client-side TIME_WAITs towards it that ended in the window.
    pub time_waits: u64,
    pub connect_failures: u64,
    pub peak_pressure_pct: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FailureRates {
    pub connect_eaddrnotavail: u64,
    pub bind_eaddrinuse: u64,
    pub connect_per_min: f64,
    pub bind_per_min: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub files: Vec<String>,
    pub hostname: String,
    pub kernel: String,
    /// What the recording kernel could not show (its `twtrace check`), one line each.
    pub degraded: Vec<String>,
    /// RFC 3339, first and last event looked at.
    pub from: Option<String>,
    pub to: Option<String>,
    pub span_s: f64,
    pub events: u64,
    pub totals: Totals,
    pub connections_closed: u64,
    pub time_waits_per_1000_closed: Option<f64>,
    pub alive_peak: usize,
    pub alive_mean: f64,
    pub lifetime: Lifetimes,
    pub ends: Vec<EndShare>,
    pub reused_pct: f64,
    pub recycled_pct: f64,
    pub reset_per_min: f64,
    pub overflow_per_min: f64,
    pub abort_per_min: f64,
    pub failures: FailureRates,
    pub processes: Vec<ProcessRow>,
    pub destinations: Vec<DestinationRow>,
    pub pressure_peaks: Vec<Pressure>,
    pub settings: BTreeMap<String, NetnsSettings>,
    /// Namespace with the most TIME_WAITs: whose settings a comparison looks at.
    pub busiest_netns: Option<u32>,
    pub advice: Vec<Advice>,
    pub loss: Loss,
    /// Ends of TIME_WAITs never seen starting (see `Aggregator::ends_without_start`).
    pub ends_without_start: u64,
    pub warnings: Vec<String>,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// Replays `traces` (in order) through an aggregator and summarises. Each is read frame by
/// frame: the report holds the aggregator's state, never the recording.
pub fn build<F: Frames>(
    traces: &mut [(String, F)],
    filters: &Filters,
    window: Window,
) -> Result<Report, RecordError> {
    let clock = ReplayClock::default();
    let hz = traces.first().map_or(250, |(_, t)| t.header().hz);
    let mut agg = Aggregator::new(clock.clone(), hz);
    let mut filter = EventFilter::new(filters.clone());
    let mut records = Vec::new();
    let (mut first, mut last) = (None::<u64>, 0u64);
    let (mut next_tick, mut next_sample) = (0u64, 0u64);
    let (mut alive_peak, mut alive_sum, mut alive_samples) = (0usize, 0u64, 0u64);
    let mut peaks: HashMap<(u32, IpAddr, IpAddr, u16), Pressure> = HashMap::new();
    let mut dests: HashMap<(u32, IpAddr, u16), (u64, u64)> = HashMap::new();
    let mut tw_by_netns: HashMap<u32, u64> = HashMap::new();
    let mut events = 0u64;
    // Every event's time, in the window or not: to say where the recording is when the window
    // holds nothing.
    let mut span: Option<(u64, u64)> = None;

    let sample = |agg: &Aggregator<ReplayClock>, peaks: &mut HashMap<_, Pressure>| {
        for p in agg.pressure() {
            let k = (p.dest.netns, p.dest.laddr, p.dest.raddr, p.dest.rport);
            if peaks.get(&k).is_none_or(|old| p.percent > old.percent) {
                peaks.insert(k, p);
            }
        }
    };

    /// Seconds stepped one at a time across a gap between events: past every TIME_WAIT's
    /// timer, a tick changes nothing more.
    const MAX_IDLE_TICKS: u64 = 3600;
    for (_, trace) in traces.iter_mut() {
        while let Some(frame) = trace.next_frame()? {
            for mut ev in frame {
                let ts = ev.ts_ns();
                span = Some(span.map_or((ts, ts), |(a, b)| (a.min(ts), b.max(ts))));
                if !window.contains(ts) {
                    continue;
                }
                if !filter.admit(&mut ev) {
                    continue;
                }
                events += 1;
                first.get_or_insert(ts);
                last = last.max(ts);
                clock.set(last);
                if next_tick == 0 {
                    next_tick = (ts - ts % SECOND).saturating_add(SECOND);
                    next_sample = ts + PRESSURE_SAMPLE_NS;
                }
                let mut steps = 0;
                while ts >= next_tick {
                    agg.tick();
                    let n = agg.alive_count();
                    alive_peak = alive_peak.max(n);
                    alive_sum += n as u64;
                    alive_samples += 1;
                    next_tick = next_tick.saturating_add(SECOND);
                    steps += 1;
                    if next_tick == u64::MAX {
                        break;
                    }
                    if steps == MAX_IDLE_TICKS && ts >= next_tick {
                        // A gap longer than any TIME_WAIT (or a damaged timestamp): nothing is
                        // left to expire second by second, so the rest of it is one step.
                        let rest = (ts - next_tick) / SECOND + 1;
                        agg.tick();
                        let n = agg.alive_count() as u64;
                        alive_sum += n * rest;
                        alive_samples += rest;
                        next_tick = next_tick.saturating_add(rest.saturating_mul(SECOND));
                    }
                }
                if ts >= next_sample {
                    sample(&agg, &mut peaks);
                    next_sample = ts + PRESSURE_SAMPLE_NS;
                }
                agg.ingest(ev, &mut records);
                for r in records.drain(..) {
                    match r {
                        Record::TimeWait(t) => {
                            *tw_by_netns.entry(t.tw.conn.netns).or_default() += 1;
                            if t.tw.role != Role::Server {
                                dests
                                    .entry((t.tw.conn.netns, t.tw.conn.raddr, t.tw.conn.rport))
                                    .or_default()
                                    .0 += 1;
                            }
                        }
                        Record::PortFailure(f) if f.failure.op == PortOp::Connect => {
                            let c = &f.failure.conn;
                            dests.entry((c.netns, c.raddr, c.rport)).or_default().1 += 1;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    alive_peak = alive_peak.max(agg.alive_count());
    sample(&agg, &mut peaks);

    let span_s = first.map_or(0.0, |f| (last - f) as f64 / 1e9);
    let minutes = (span_s / 60.0).max(1.0 / 60.0);
    let per_min = |n: u64| n as f64 / minutes;
    let t = agg.totals().clone();
    let closed = agg.connections_closed();
    let offset = traces
        .first()
        .map_or(0, |(_, t)| t.header().clock_offset_ns);
    let rfc = |ns: u64| {
        crate::output::TimeBase::with_offset_ns(offset)
            .utc(ns)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };

    let mut processes: Vec<ProcessRow> = agg
        .stats()
        .by_process
        .iter()
        .map(|(k, p)| ProcessRow {
            pid: k.pid,
            comm: k.comm.to_string(),
            cgroup_id: p.cgroup_id,
            cgroup: agg.cgroup_path(p.cgroup_id).map(str::to_string),
            container: agg.cgroup_path(p.cgroup_id).map(crate::cgroup::name),
            entered: p.entered,
            client: p.client,
            server: p.server,
            reused_pct: pct(p.reused, p.ended),
            recycled_pct: pct(p.recycled, p.ended),
            lifetime: Lifetimes::from(&p.lifetimes),
        })
        .collect();
    processes.sort_by(|a, b| b.entered.cmp(&a.entered).then(a.pid.cmp(&b.pid)));
    processes.truncate(TOP);

    let mut pressure_peaks: Vec<Pressure> = peaks.into_values().collect();
    pressure_peaks.sort_by(|a, b| b.percent.total_cmp(&a.percent).then(a.dest.cmp(&b.dest)));
    let mut destinations: Vec<DestinationRow> = dests
        .into_iter()
        .map(|((netns, raddr, rport), (tws, fails))| DestinationRow {
            netns,
            raddr,
            rport,
            time_waits: tws,
            connect_failures: fails,
            peak_pressure_pct: pressure_peaks
                .iter()
                .filter(|p| p.dest.netns == netns && p.dest.raddr == raddr && p.dest.rport == rport)
                .map(|p| p.percent)
                .max_by(f64::total_cmp),
        })
        .collect();
    destinations.sort_by(|a, b| {
        (b.time_waits + b.connect_failures)
            .cmp(&(a.time_waits + a.connect_failures))
            .then(a.rport.cmp(&b.rport))
    });
    destinations.truncate(TOP);
    pressure_peaks.truncate(10);

    let advice = advice::advise(&Evidence::of(&agg, &pressure_peaks));
    let f = agg.failures();
    let mut warnings: Vec<String> = traces.iter().flat_map(|(_, t)| t.warnings()).collect();
    let loss = agg.loss().clone();
    if let (0, Some((a, b))) = (events, span)
        && (window.from_ns.is_some() || window.to_ns.is_some())
    {
        warnings.push(format!(
            "no event in the window given (--from/--to): the recording's events span {} to {}",
            rfc(a),
            rfc(b)
        ));
    }
    if t.overdue_dropped > 0 {
        warnings.push(format!(
            "{} TIME_WAITs have no end in the recording: given up on once their timer was long overdue",
            t.overdue_dropped
        ));
    }
    if !loss.is_zero() {
        warnings.push(format!(
            "the recording lost events: {} (ring buffer full), {} recursion misses ({} TIME_WAIT starts recovered by the sweep)",
            loss.ringbuf_full, loss.recursion_misses, t.recovered
        ));
    }
    Ok(Report {
        files: traces.iter().map(|(n, _)| n.clone()).collect(),
        hostname: traces
            .first()
            .map(|(_, t)| t.header().hostname.clone())
            .unwrap_or_default(),
        kernel: traces
            .first()
            .map(|(_, t)| t.header().kernel.clone())
            .unwrap_or_default(),
        degraded: traces
            .first()
            .map(|(_, t)| {
                t.header()
                    .degraded
                    .iter()
                    .map(|d| crate::text::printable(d).into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        from: first.map(rfc),
        to: first.map(|_| rfc(last)),
        span_s,
        events,
        connections_closed: closed,
        time_waits_per_1000_closed: (closed > 0).then(|| t.entered as f64 * 1000.0 / closed as f64),
        alive_peak,
        alive_mean: if alive_samples == 0 {
            agg.alive_count() as f64
        } else {
            alive_sum as f64 / alive_samples as f64
        },
        lifetime: Lifetimes::from(&agg.stats().lifetimes),
        ends: EndReason::ALL
            .iter()
            .map(|&end| {
                let count = t.ended_by(end);
                EndShare {
                    end,
                    count,
                    percent: pct(count, t.ended),
                }
            })
            .collect(),
        reused_pct: pct(t.reused, t.ended),
        recycled_pct: pct(t.recycled, t.ended),
        reset_per_min: per_min(t.reset),
        overflow_per_min: per_min(t.overflow),
        abort_per_min: per_min(t.abort),
        failures: FailureRates {
            connect_eaddrnotavail: f.connect_eaddrnotavail,
            bind_eaddrinuse: f.bind_eaddrinuse,
            connect_per_min: per_min(f.connect_eaddrnotavail),
            bind_per_min: per_min(f.bind_eaddrinuse),
        },
        processes,
        destinations,
        pressure_peaks,
        settings: agg
            .settings()
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect(),
        busiest_netns: tw_by_netns
            .into_iter()
            .max_by_key(|&(n, c)| (c, n))
            .map(|(n, _)| n),
        advice,
        loss,
        ends_without_start: agg.ends_without_start(),
        warnings,
        totals: t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::tests::{end, enter},
        event::{Event, Substate, TwKey},
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

    #[test]
    fn a_timestamp_at_the_end_of_time_is_not_stepped_through() {
        // A damaged or hostile recording: one event at u64::MAX ns (584 years in).
        let evs = vec![
            enter(TwKey::Cookie(1), SECOND, Substate::TimeWait),
            end(TwKey::Cookie(1), u64::MAX, EndReason::Expired),
        ];
        let started = std::time::Instant::now();
        let r = build(&mut [trace(evs)], &Filters::default(), Window::default()).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert_eq!(r.totals.entered, 1);
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
        let r = build(&mut [trace(evs)], &Filters::default(), Window::default()).unwrap();
        assert_eq!(r.totals.entered, 10);
        assert_eq!(r.totals.ended, 10);
        assert_eq!(r.reused_pct, 30.0);
        assert_eq!(r.processes[0].comm, "client");
        assert_eq!(r.processes[0].entered, 10);
        assert_eq!(r.lifetime.count, 10);
        assert!((r.lifetime.max_ms.unwrap() - 10_000.0).abs() < 1.0);
        assert!(r.alive_peak >= 5);
        assert_eq!(r.destinations[0].time_waits, 10);
        assert_eq!(r.time_waits_per_1000_closed, Some(1000.0));
    }

    #[test]
    fn window_and_filters_apply() {
        let evs = vec![
            enter(TwKey::Cookie(1), SECOND, Substate::TimeWait),
            end(TwKey::Cookie(1), 2 * SECOND, EndReason::Expired),
            enter(TwKey::Cookie(2), 10 * SECOND, Substate::TimeWait),
        ];
        let w = Window {
            from_ns: Some(5 * SECOND),
            to_ns: None,
        };
        let r = build(&mut [trace(evs.clone())], &Filters::default(), w).unwrap();
        assert_eq!(r.totals.entered, 1);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        // Past the end: said, with where the events are.
        let past = Window {
            from_ns: Some(20 * SECOND),
            to_ns: None,
        };
        let r = build(&mut [trace(evs.clone())], &Filters::default(), past).unwrap();
        assert_eq!(r.events, 0);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.starts_with("no event in the window given")),
            "{:?}",
            r.warnings
        );
        let only_other = Filters {
            comm: Some("nobody".into()),
            ..Filters::default()
        };
        let r = build(&mut [trace(evs)], &only_other, Window::default()).unwrap();
        assert_eq!(r.totals.entered, 0);
        assert_eq!(
            r.totals.unmatched_ends, 0,
            "the filtered TIME_WAIT's end is dropped too"
        );
    }
}
