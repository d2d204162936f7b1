//! Offline analysis: recorded events replayed through the same aggregator as the live views,
//! on a clock driven by the events' own timestamps.
//!
//! A window (`--from`/`--to`) is replayed from the start of the recording, so that the
//! TIME_WAITs alive when it opens are known; every count starts again when it opens
//! ([`Aggregator::restart_counts`]) and stops when it closes.

mod chain;
pub mod timeline;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    advice::{self, Advice, Evidence},
    aggregate::{Aggregator, Pressure, Record, ReplayClock, Totals},
    event::{EndReason, Event, NetnsSettings, NoTwReason, PortOp, Role},
    filter::{EventFilter, Filters},
    kernel::tracer::Loss,
    reconcile::NetnsCheck,
    record::{Frames, RecordError},
    stats::Lifetimes,
};

const SECOND: u64 = 1_000_000_000;
/// Port pressure is sampled this often (trace time) for its peaks.
const PRESSURE_SAMPLE_NS: u64 = 10 * SECOND;
const TOP: usize = 20;
/// Seconds stepped one at a time across a gap between events: past every TIME_WAIT's timer,
/// a tick changes nothing more.
const MAX_IDLE_TICKS: u64 = 3600;

/// Which part of the recording to look at, in event time (CLOCK_MONOTONIC ns).
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    pub from_ns: Option<u64>,
    pub to_ns: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(
        "the window given (--from/--to) is outside the recording, which spans {from} to {to} ({span_s:.1} s): give offsets from its start within it, e.g. --from 0s --to {whole}s",
        whole = span_s.ceil()
    )]
    OutsideWindow {
        from: String,
        to: String,
        span_s: f64,
    },
    #[error(
        "{later} is {} {earlier} in their rotation: give the files oldest first: {order}",
        if *same { "the same file as" } else { "newer than" }
    )]
    OutOfOrder {
        earlier: String,
        later: String,
        same: bool,
        order: String,
    },
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

/// A destination's highest port pressure, and when it was.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PressurePeak {
    #[serde(flatten)]
    pub pressure: Pressure,
    /// RFC 3339.
    pub at: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub files: Vec<String>,
    pub hostname: String,
    pub kernel: String,
    /// What the recording kernel could not show (its `twtrace check`), one line each.
    pub degraded: Vec<String>,
    /// RFC 3339: the part of the recording looked at (the window, within the recording).
    pub from: Option<String>,
    pub to: Option<String>,
    pub span_s: f64,
    /// Events looked at: in the window, through the filters.
    pub events: u64,
    pub totals: Totals,
    /// TIME_WAITs alive when the counts began: at `--from`, or those a rotated file
    /// carried over.
    pub alive_at_start: usize,
    /// Connections closed in the window (through the filters): actively, and passively when
    /// the filters allow them to be known (see `passive_closes`).
    pub connections_closed: u64,
    /// Passive closes in the window; `None` under filters on process, port or IP version,
    /// which the kernel's per-namespace count cannot follow.
    pub passive_closes: Option<u64>,
    pub time_waits_per_1000_closed: Option<f64>,
    pub alive_peak: usize,
    pub alive_mean: f64,
    /// TIME_WAITs still alive when the window closed: alive at the start (found, carried
    /// over or begun before the window) + entered - ended - given up on.
    pub alive_at_end: usize,
    pub lifetime: Lifetimes,
    pub ends: Vec<EndShare>,
    pub reused_pct: f64,
    pub recycled_pct: f64,
    pub reset_per_min: f64,
    pub overflow_per_min: f64,
    pub abort_per_min: f64,
    pub failures: FailureRates,
    /// Length of a timeline bucket: 60 s, longer for recordings of more than a day.
    pub timeline_bucket_s: u64,
    /// The buckets with something in them.
    pub timeline: Vec<timeline::Row>,
    /// RFC 3339: the first and the last failed connect/bind or overflow.
    pub trouble_from: Option<String>,
    pub trouble_to: Option<String>,
    pub processes: Vec<ProcessRow>,
    pub destinations: Vec<DestinationRow>,
    pub pressure_peaks: Vec<PressurePeak>,
    pub settings: BTreeMap<String, NetnsSettings>,
    /// Namespace with the most TIME_WAITs: whose settings a comparison looks at.
    pub busiest_netns: Option<u32>,
    pub advice: Vec<Advice>,
    pub loss: Loss,
    /// Ends of TIME_WAITs never seen starting (see `Aggregator::ends_without_start`).
    pub ends_without_start: u64,
    /// twtrace's counts against each namespace's own counters (see [`crate::reconcile`]);
    /// None when the recording or the report filtered by anything but the namespace.
    pub kernel_checks: Option<Vec<NetnsCheck>>,
    pub warnings: Vec<String>,
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// The replay's state: the aggregator, its clock, and what is measured while the window is
/// open.
struct Replay {
    clock: ReplayClock,
    agg: Aggregator<ReplayClock>,
    window: Window,
    /// When the window opened (its counts began), once it has.
    open_ns: Option<u64>,
    last_ns: u64,
    next_tick: u64,
    next_sample: u64,
    events: u64,
    alive_at_start: usize,
    alive_peak: usize,
    alive_sum: u64,
    alive_samples: u64,
    peaks: HashMap<(u32, IpAddr, IpAddr, u16), (Pressure, u64)>,
    dests: HashMap<(u32, IpAddr, u16), (u64, u64)>,
    tw_by_netns: HashMap<u32, u64>,
    timeline: timeline::Timeline,
    trouble: Option<(u64, u64)>,
    records: Vec<Record>,
}

impl Replay {
    fn new(hz: u32, window: Window) -> Self {
        let clock = ReplayClock::default();
        Self {
            agg: Aggregator::new(clock.clone(), hz),
            clock,
            window,
            open_ns: None,
            last_ns: 0,
            next_tick: 0,
            next_sample: 0,
            events: 0,
            alive_at_start: 0,
            alive_peak: 0,
            alive_sum: 0,
            alive_samples: 0,
            peaks: HashMap::new(),
            dests: HashMap::new(),
            tw_by_netns: HashMap::new(),
            timeline: timeline::Timeline::new(0),
            trouble: None,
            records: Vec::new(),
        }
    }

    /// The counts begin: what is alive now was alive when the window opened.
    fn open(&mut self, ts_ns: u64) {
        let at = self.window.from_ns.map_or(ts_ns, |f| f.min(ts_ns));
        self.agg.restart_counts();
        self.open_ns = Some(at);
        self.alive_at_start = self.agg.alive_count();
        self.alive_peak = self.alive_at_start;
        self.timeline = timeline::Timeline::new(at);
        self.next_sample = at;
    }

    /// Moves the clock to `ts_ns`, ticking the aggregator once per second of event time on
    /// the way (the alive count is sampled at each tick inside the window).
    fn advance(&mut self, ts_ns: u64) {
        self.last_ns = self.last_ns.max(ts_ns);
        self.clock.set(self.last_ns);
        if self.next_tick == 0 {
            self.next_tick = (ts_ns - ts_ns % SECOND).saturating_add(SECOND);
        }
        let mut steps = 0;
        while ts_ns >= self.next_tick {
            self.agg.tick();
            let sampled = self.open_ns.is_some_and(|o| self.next_tick >= o);
            if sampled {
                let n = self.agg.alive_count();
                self.alive_peak = self.alive_peak.max(n);
                self.alive_sum += n as u64;
                self.alive_samples += 1;
            }
            self.next_tick = self.next_tick.saturating_add(SECOND);
            steps += 1;
            if self.next_tick == u64::MAX {
                break;
            }
            if steps == MAX_IDLE_TICKS && ts_ns >= self.next_tick {
                // A gap longer than any TIME_WAIT (or a damaged timestamp): nothing is left
                // to expire second by second, so the rest of it is one step.
                let rest = (ts_ns - self.next_tick) / SECOND + 1;
                self.agg.tick();
                if sampled {
                    self.alive_sum += self.agg.alive_count() as u64 * rest;
                    self.alive_samples += rest;
                }
                self.next_tick = self.next_tick.saturating_add(rest.saturating_mul(SECOND));
            }
        }
    }

    fn sample_pressure(&mut self) {
        let now = self.agg.now_ns();
        for p in self.agg.pressure() {
            let k = (p.dest.netns, p.dest.laddr, p.dest.raddr, p.dest.rport);
            if self
                .peaks
                .get(&k)
                .is_none_or(|(old, _)| p.percent > old.percent)
            {
                self.peaks.insert(k, (p, now));
            }
        }
    }

    /// One admitted event.
    fn ingest(&mut self, ev: Event) {
        let ts = ev.ts_ns();
        let open = self.open_ns.is_some();
        if open {
            self.events += 1;
            if ts >= self.next_sample {
                self.sample_pressure();
                self.next_sample = ts.saturating_add(PRESSURE_SAMPLE_NS);
            }
        }
        let entered = self.agg.totals().entered;
        self.agg.ingest(ev, &mut self.records);
        if !open {
            self.records.clear();
            return;
        }
        let entered = self.agg.totals().entered.saturating_sub(entered);
        if entered > 0 {
            self.timeline.at(ts).entered += entered;
        }
        self.alive_peak = self.alive_peak.max(self.agg.alive_count());
        let mut trouble = false;
        for r in self.records.drain(..) {
            match r {
                Record::TimeWait(t) => {
                    *self.tw_by_netns.entry(t.tw.conn.netns).or_default() += 1;
                    if t.tw.role != Role::Server {
                        self.dests
                            .entry((t.tw.conn.netns, t.tw.conn.raddr, t.tw.conn.rport))
                            .or_default()
                            .0 += 1;
                    }
                }
                Record::PortFailure(f) => {
                    let c = &f.failure.conn;
                    let bucket = self.timeline.at(f.failure.ts_ns);
                    if f.failure.op == PortOp::Connect {
                        bucket.connect_failures += 1;
                        self.dests.entry((c.netns, c.raddr, c.rport)).or_default().1 += 1;
                    } else {
                        bucket.bind_failures += 1;
                    }
                    trouble = true;
                }
                Record::NoTimeWait(n) if n.reason == NoTwReason::Overflow => {
                    self.timeline.at(n.ts_ns).overflows += 1;
                    trouble = true;
                }
                Record::NoTimeWait(_) => {}
            }
        }
        if trouble {
            self.trouble = Some(
                self.trouble
                    .map_or((ts, ts), |(a, b)| (a.min(ts), b.max(ts))),
            );
        }
    }
}

/// Replays `traces` (in order) through an aggregator and summarises. Each is read frame by
/// frame: the report holds the aggregator's state, never the recording.
pub fn build<F: Frames>(
    traces: &mut [(String, F)],
    filters: &Filters,
    window: Window,
) -> Result<Report, ReportError> {
    let order = chain::check(traces)?;
    let hz = traces.first().map_or(250, |(_, t)| t.header().hz);
    let mut r = Replay::new(hz, window);
    let mut filter = EventFilter::new(filters.clone());
    let mut notes = Vec::new();
    // A file a rotation began counts from what the files before it had counted.
    if let Some((name, t)) = traces.first()
        && let Some(chain) = &t.header().chain
        && let Some(c) = &chain.carried
    {
        let mut ev = Event::Snapshot {
            ts_ns: c.ts_ns,
            passive_closes: c.passive_closes.clone(),
            loss: c.loss.clone(),
        };
        if filter.admit(&mut ev) {
            r.agg.ingest(ev, &mut r.records);
        }
        notes.push(format!(
            "{name} is part {} of a rotated recording: it starts with the {} alive then (counted as carried over, not entered); {} entered in the files before it, which this report leaves out",
            chain.sequence,
            crate::text::count(c.alive, "TIME_WAIT"),
            c.totals.entered
        ));
    }
    // Every event's time, in the window or not: the recording's span.
    let mut span: Option<(u64, u64)> = None;
    let mut prev_first = None;
    for i in 0..traces.len() {
        if order.gaps_before.contains(&i) {
            // The next file restates what is alive after the gap.
            r.agg.forget_alive();
        }
        let (done, rest) = traces.split_at_mut(i);
        let (name, trace) = &mut rest[0];
        if let (Some((prev_name, prev)), Some(prev_first)) = (done.last(), prev_first) {
            chain::older_in_order((prev_name, prev, prev_first), (name, trace))?;
        }
        prev_first = trace.first_ts_ns()?;
        while let Some(frame) = trace.next_frame()? {
            for mut ev in frame {
                let ts = ev.ts_ns();
                span = Some(span.map_or((ts, ts), |(a, b)| (a.min(ts), b.max(ts))));
                if window.to_ns.is_some_and(|t| ts > t) {
                    continue;
                }
                if r.open_ns.is_none() && window.from_ns.is_none_or(|f| ts >= f) {
                    // At --from, or at the recording's start when --from is before it.
                    let first = span.map_or(ts, |s| s.0);
                    let at = window.from_ns.map_or(ts, |f| f.max(first).min(ts));
                    r.advance(at);
                    r.open(at);
                }
                r.advance(ts);
                if filter.admit(&mut ev) {
                    r.ingest(ev);
                }
            }
        }
    }
    let Some((rec_first, rec_last)) = span else {
        return Ok(finish(traces, filters, r, None, order.warnings, notes));
    };
    if window.from_ns.is_some_and(|f| f > rec_last) || window.to_ns.is_some_and(|t| t < rec_first) {
        let offset = traces
            .first()
            .map_or(0, |(_, t)| t.header().clock_offset_ns);
        return Err(ReportError::OutsideWindow {
            from: rfc(offset, rec_first),
            to: rfc(offset, rec_last),
            span_s: (rec_last - rec_first) as f64 / 1e9,
        });
    }
    if r.open_ns.is_none() {
        // A window with no event of its own (the next one is past it).
        let at = window.from_ns.unwrap_or(rec_first);
        r.advance(at);
        r.open(at);
    }
    let start = window.from_ns.map_or(rec_first, |f| f.max(rec_first));
    let end = window.to_ns.map_or(rec_last, |t| t.min(rec_last));
    // The seconds of the window after its last event are alive-time too.
    r.advance(end);
    r.alive_peak = r.alive_peak.max(r.agg.alive_count());
    r.sample_pressure();
    Ok(finish(
        traces,
        filters,
        r,
        Some((start, end.max(start))),
        order.warnings,
        notes,
    ))
}

fn rfc(offset_ns: i128, ns: u64) -> String {
    crate::output::TimeBase::with_offset_ns(offset_ns)
        .utc(ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The report from the replay of the window `span` (start, end).
fn finish<F: Frames>(
    traces: &[(String, F)],
    filters: &Filters,
    r: Replay,
    span: Option<(u64, u64)>,
    mut warnings: Vec<String>,
    notes: Vec<String>,
) -> Report {
    let agg = &r.agg;
    let span_s = span.map_or(0.0, |(a, b)| (b - a) as f64 / 1e9);
    let minutes = (span_s / 60.0).max(1.0 / 60.0);
    let per_min = |n: u64| n as f64 / minutes;
    let t = agg.totals().clone();
    let offset = traces
        .first()
        .map_or(0, |(_, t)| t.header().clock_offset_ns);
    let rfc = |ns: u64| rfc(offset, ns);
    let passive = filters.passive_closes_known().then(|| agg.passive_closed());
    let closed = agg
        .connections_closed()
        .saturating_sub(agg.passive_closed())
        .saturating_add(passive.unwrap_or(0));

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

    let mut peaks: Vec<(Pressure, u64)> = r.peaks.into_values().collect();
    peaks.sort_by(|a, b| {
        b.0.percent
            .total_cmp(&a.0.percent)
            .then(a.0.dest.cmp(&b.0.dest))
    });
    let mut destinations: Vec<DestinationRow> = r
        .dests
        .into_iter()
        .map(|((netns, raddr, rport), (tws, fails))| DestinationRow {
            netns,
            raddr,
            rport,
            time_waits: tws,
            connect_failures: fails,
            peak_pressure_pct: peaks
                .iter()
                .filter(|(p, _)| {
                    p.dest.netns == netns && p.dest.raddr == raddr && p.dest.rport == rport
                })
                .map(|(p, _)| p.percent)
                .max_by(f64::total_cmp),
        })
        .collect();
    destinations.sort_by(|a, b| {
        (b.time_waits + b.connect_failures)
            .cmp(&(a.time_waits + a.connect_failures))
            .then(a.rport.cmp(&b.rport))
    });
    destinations.truncate(TOP);
    peaks.truncate(10);
    let pressures: Vec<Pressure> = peaks.iter().map(|(p, _)| p.clone()).collect();

    let advice = advice::advise(&Evidence::of(agg, &pressures));
    let f = agg.failures();
    warnings.extend(traces.iter().flat_map(|(_, t)| t.warnings()));
    warnings.extend(notes);
    let loss = agg.loss();
    if t.overdue_dropped > 0 {
        warnings.push(format!(
            "{} {} no end in the recording: given up on once {} timer was long overdue",
            crate::text::count(t.overdue_dropped, "TIME_WAIT"),
            if t.overdue_dropped == 1 {
                "has"
            } else {
                "have"
            },
            if t.overdue_dropped == 1 {
                "its"
            } else {
                "their"
            },
        ));
    }
    let whole = filters.whole_namespaces()
        && traces.iter().all(|(_, t)| {
            crate::cli::recorded_whole_namespaces(&t.header().command_line) == Some(true)
        });
    let kernel_checks = whole.then(|| agg.kernel_checks());
    for c in kernel_checks.iter().flatten().filter(|c| !c.agrees()) {
        warnings.push(crate::reconcile::describe(c));
    }
    if !loss.is_zero() {
        warnings.push(format!(
            "the recording lost events: {} (ring buffer full), {} ({} recovered by the sweep)",
            loss.ringbuf_full,
            crate::text::count_as(loss.recursion_misses, "recursion miss", "recursion misses"),
            crate::text::count(t.recovered, "TIME_WAIT start")
        ));
    }
    if passive.is_none() {
        warnings.push(
            "TIME_WAITs per 1000 connections closed is not given under -p/--comm/-L/-D/-4/-6: the kernel counts passive closes per namespace only".into(),
        );
    }
    let header = traces.first().map(|(_, t)| t.header());
    Report {
        files: traces.iter().map(|(n, _)| n.clone()).collect(),
        hostname: header.map(|h| h.hostname.clone()).unwrap_or_default(),
        kernel: header.map(|h| h.kernel.clone()).unwrap_or_default(),
        degraded: header
            .map(|h| {
                h.degraded
                    .iter()
                    .map(|d| crate::text::printable(d).into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        from: span.map(|(a, _)| rfc(a)),
        to: span.map(|(_, b)| rfc(b)),
        span_s,
        events: r.events,
        alive_at_start: r.alive_at_start,
        connections_closed: closed,
        passive_closes: passive,
        time_waits_per_1000_closed: (closed > 0 && passive.is_some())
            .then(|| t.entered as f64 * 1000.0 / closed as f64),
        alive_peak: r.alive_peak,
        alive_at_end: agg.alive_count(),
        alive_mean: if r.alive_samples == 0 {
            agg.alive_count() as f64
        } else {
            r.alive_sum as f64 / r.alive_samples as f64
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
        timeline_bucket_s: r.timeline.width_s(),
        timeline: r.timeline.rows(rfc),
        trouble_from: r.trouble.map(|(a, _)| rfc(a)),
        trouble_to: r.trouble.map(|(_, b)| rfc(b)),
        processes,
        destinations,
        pressure_peaks: peaks
            .into_iter()
            .map(|(pressure, at)| PressurePeak {
                pressure,
                at: rfc(at),
            })
            .collect(),
        settings: agg
            .settings()
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect(),
        busiest_netns: r
            .tw_by_netns
            .into_iter()
            .max_by_key(|&(n, c)| (c, n))
            .map(|(n, _)| n),
        advice,
        loss,
        ends_without_start: agg.ends_without_start(),
        kernel_checks,
        warnings,
        totals: t,
    }
}

#[cfg(test)]
mod tests;
