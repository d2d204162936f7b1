//! What the live view shows, computed from the aggregator: plain data, so rendering is a pure
//! function and tests need no terminal and no root.

use std::collections::{HashMap, VecDeque};

use super::fit::count;
use crate::{
    advice::{self, Advice, Evidence},
    aggregate::{Aggregator, Clock, Pressure, Record, Totals, proc_key},
    event::{NetnsSettings, PortOp, Role},
    kernel::tracer::Loss,
    stats::ProcKey,
};

/// Which table is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Table {
    #[default]
    Processes,
    Destinations,
}

/// Process table columns, in order; the sort key.
pub const PROC_COLUMNS: [&str; 10] = [
    "PID", "COMM", "CGROUP", "ALIVE", "NEW/s", "CLIENT", "SERVER", "REUSE%", "MEAN", "P99",
];
pub const DEST_COLUMNS: [&str; 8] = [
    "NETNS",
    "LOCAL",
    "REMOTE",
    "TW",
    "LIVE",
    "PRESSURE",
    "TW/s",
    "EXHAUSTED IN",
];

#[derive(Clone, Debug, PartialEq)]
pub struct ProcRow {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub alive: u64,
    pub new_per_s: f64,
    pub client: u64,
    pub server: u64,
    pub reuse_pct: f64,
    pub mean_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Rates over the last refresh.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    pub entered: f64,
    pub expired: f64,
    pub reused: f64,
    pub recycled: f64,
    pub reset: f64,
    pub purged: f64,
    pub overflow: f64,
    pub abort: f64,
    pub connect_failed: f64,
    pub bind_failed: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub host: String,
    pub kernel: String,
    /// Seconds since the trace started.
    pub uptime_s: f64,
    pub replay: Option<String>,
    pub netns: Option<u32>,
    pub settings: Option<(u32, NetnsSettings)>,
    /// TIME_WAITs alive in the namespace whose settings are shown (against tcp_max_tw_buckets).
    pub settings_fill: u64,
    pub loss: Loss,
    /// Ends of TIME_WAITs never seen starting (see [`Aggregator::ends_without_start`]).
    pub ends_without_start: u64,
    pub alive: u64,
    pub rates: Rates,
    /// The counts of the namespace shown (of all when none is picked).
    pub totals: Totals,
    /// Of the whole trace: starts recovered by the sweep, TIME_WAITs whose end was never seen.
    pub recovered: u64,
    pub end_lost: u64,
    /// twtrace's counts against the kernel's for the namespace shown (all when none is
    /// picked): None when not made, else whether they agree and what to say.
    pub kernel_check: Option<(bool, String)>,
    pub connect_failed: u64,
    pub bind_failed: u64,
    pub procs: Vec<ProcRow>,
    pub dests: Vec<Pressure>,
    /// (label, count) bins of the lifetime distribution.
    pub lifetimes: Vec<(&'static str, u64)>,
    pub advice: Vec<Advice>,
    pub log: Vec<String>,
}

/// Default sort columns: TIME_WAITs alive, and port pressure.
pub const PROC_SORT: usize = 3;
pub const DEST_SORT: usize = 5;

/// The view's own state: what is selected, and what the last refresh saw (for rates).
pub struct ViewState {
    pub table: Table,
    pub sort: usize,
    pub reverse: bool,
    pub filter: String,
    /// Index into the namespaces seen; `None` = all.
    pub netns: Option<u32>,
    pub paused: bool,
    pub help: bool,
    /// The filters pass all of each namespace's traffic: counts answer to the kernel's.
    pub whole_namespaces: bool,
    /// What the last refresh saw, for rates.
    pub prev: Previous,
}

#[derive(Default)]
pub struct Previous {
    totals: Option<(Totals, u64, u64, u64)>,
    entered: HashMap<ProcKey, u64>,
    log: VecDeque<LogEntry>,
}

/// A log line and how often it came: a failure storm repeats the same line, shown once with
/// ` x N` and the time of the latest.
struct LogEntry {
    time: String,
    text: String,
    times: u64,
}

impl LogEntry {
    fn show(&self) -> String {
        match self.times {
            1 => format!("{} {}", self.time, self.text),
            n => format!("{} {} x {n}", self.time, self.text),
        }
    }
}

impl Default for ViewState {
    fn default() -> Self {
        Self {
            table: Table::Processes,
            sort: PROC_SORT,
            reverse: false,
            filter: String::new(),
            netns: None,
            paused: false,
            help: false,
            whole_namespaces: false,
            prev: Previous::default(),
        }
    }
}

impl ViewState {
    fn kernel_check<C: Clock>(&self, agg: &Aggregator<C>) -> Option<(bool, String)> {
        if !self.whole_namespaces {
            return None;
        }
        let checks: Vec<_> = agg
            .kernel_checks()
            .into_iter()
            .filter(|c| self.netns.is_none_or(|n| n == c.netns))
            .collect();
        Some(match checks.iter().find(|c| !c.agrees()) {
            Some(c) => (false, crate::reconcile::describe(c)),
            None if checks.is_empty() => (true, "kernel check: no two readings yet".into()),
            None => (
                true,
                format!(
                    "kernel check: agrees ({} namespace{})",
                    checks.len(),
                    if checks.len() == 1 { "" } else { "s" }
                ),
            ),
        })
    }

    /// Tab: the other table, sorted by its default column.
    pub fn switch_table(&mut self) {
        (self.table, self.sort) = match self.table {
            Table::Processes => (Table::Destinations, DEST_SORT),
            Table::Destinations => (Table::Processes, PROC_SORT),
        };
        self.reverse = false;
    }

    /// s: the next column of the table shown.
    pub fn next_sort(&mut self) {
        let n = match self.table {
            Table::Processes => PROC_COLUMNS.len(),
            Table::Destinations => DEST_COLUMNS.len(),
        };
        self.sort = (self.sort + 1) % n;
    }
}

const LOG_LINES: usize = 50;
const LIFETIME_BINS: [(&str, f64); 8] = [
    ("<10ms", 10.0),
    ("<100ms", 100.0),
    ("<1s", 1_000.0),
    ("<10s", 10_000.0),
    ("<59s", 59_000.0),
    ("59-61s", 61_000.0),
    ("61-63s", 63_000.0),
    (">63s", f64::INFINITY),
];

impl ViewState {
    /// Keeps the failures and closes without TIME_WAIT for the scrolling log.
    pub fn note(&mut self, r: &Record, fmt_time: impl Fn(u64) -> String) {
        let (ts, text) = match r {
            Record::PortFailure(f) => {
                let p = &f.failure;
                let (what, addr, port) = match p.op {
                    PortOp::Connect => ("connect EADDRNOTAVAIL", p.conn.raddr, p.conn.rport),
                    PortOp::Bind => ("bind EADDRINUSE", p.conn.laddr, p.conn.lport),
                };
                (
                    p.ts_ns,
                    format!(
                        "{what} {addr}:{port} by {} ({}), {} holding",
                        p.process.comm,
                        p.process.pid,
                        count(f.time_wait_holding as u64, "TIME_WAIT", "TIME_WAITs")
                    ),
                )
            }
            Record::NoTimeWait(n) => (
                n.ts_ns,
                format!(
                    "no TIME_WAIT ({}) {}:{} -> {}:{} by {}",
                    n.reason.as_str(),
                    n.conn.laddr,
                    n.conn.lport,
                    n.conn.raddr,
                    n.conn.rport,
                    n.closer.as_ref().map_or("?", |p| p.comm.as_ref())
                ),
            ),
            Record::TimeWait(_) => return,
        };
        let log = &mut self.prev.log;
        let times = match log.iter().position(|e| e.text == text) {
            Some(i) => log.remove(i).map_or(1, |e| e.times + 1),
            None => 1,
        };
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(LogEntry {
            time: fmt_time(ts),
            text,
            times,
        });
    }

    /// Cycles the namespace shown through "all" and those seen.
    pub fn next_netns<C: Clock>(&mut self, agg: &Aggregator<C>) {
        let mut seen: Vec<u32> = agg.alive().map(|t| t.conn.netns).collect();
        seen.extend(agg.settings().keys());
        seen.sort_unstable();
        seen.dedup();
        self.netns = match self.netns {
            None => seen.first().copied(),
            Some(cur) => seen.iter().copied().find(|&n| n > cur),
        };
        // Rates start again from the next refresh, against the new namespace's counts.
        self.prev.totals = None;
    }

    fn matches(&self, fields: &[&str]) -> bool {
        self.filter.is_empty() || fields.iter().any(|f| f.contains(self.filter.as_str()))
    }

    /// Computes what to show. `interval_s` is the time since the last call, for rates.
    pub fn model<C: Clock>(
        &mut self,
        agg: &Aggregator<C>,
        host: &str,
        kernel: &str,
        started_ns: u64,
        replay: Option<&str>,
        cgroup_name: &mut dyn FnMut(u64) -> String,
    ) -> Model {
        let now = agg.now_ns();
        // Rates of the namespace shown, or of all.
        let f = agg.failures();
        let (t, connects, binds) = match self.netns {
            Some(n) => agg.netns_totals(n),
            None => (
                agg.totals().clone(),
                f.connect_eaddrnotavail,
                f.bind_eaddrinuse,
            ),
        };
        let (rates, elapsed) = match &self.prev.totals {
            Some((p, connect, bind, at)) if now > *at => {
                let dt = (now - at) as f64 / 1e9;
                let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                (
                    Rates {
                        entered: r(t.entered, p.entered),
                        expired: r(t.expired, p.expired),
                        reused: r(t.reused, p.reused),
                        recycled: r(t.recycled, p.recycled),
                        reset: r(t.reset, p.reset),
                        purged: r(t.purged, p.purged),
                        overflow: r(t.overflow, p.overflow),
                        abort: r(t.abort, p.abort),
                        connect_failed: r(connects, *connect),
                        bind_failed: r(binds, *bind),
                    },
                    dt,
                )
            }
            _ => (Rates::default(), 0.0),
        };
        self.prev.totals = Some((t.clone(), connects, binds, now));

        // Alive TIME_WAITs per closer, in the namespace shown.
        let mut alive_by: HashMap<ProcKey, (u64, u64, u64)> = HashMap::new();
        let mut alive = 0u64;
        for tw in agg.alive() {
            if self.netns.is_some_and(|n| n != tw.conn.netns) {
                continue;
            }
            alive += 1;
            let e = alive_by.entry(proc_key(&tw.closer)).or_default();
            e.0 += 1;
            match tw.role {
                Role::Client => e.1 += 1,
                Role::Server => e.2 += 1,
                Role::Unknown => {}
            }
        }
        let stats = agg.stats();
        let mut procs: Vec<ProcRow> = alive_by
            .keys()
            .chain(stats.by_process.keys())
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .map(|k| {
                let s = stats.by_process.get(k);
                let (a, c, sv) = alive_by.get(k).copied().unwrap_or_default();
                let entered = s.map_or(0, |s| s.entered);
                let prev = self.prev.entered.get(k).copied().unwrap_or(entered);
                let ended = s.map_or(0, |s| s.ended);
                ProcRow {
                    pid: k.pid,
                    comm: k.comm.to_string(),
                    cgroup: cgroup_name(s.map_or(0, |s| s.cgroup_id)),
                    alive: a,
                    new_per_s: if elapsed > 0.0 {
                        entered.saturating_sub(prev) as f64 / elapsed
                    } else {
                        0.0
                    },
                    client: c,
                    server: sv,
                    reuse_pct: s.map_or(0.0, |s| {
                        if ended == 0 {
                            0.0
                        } else {
                            // Taken over by a connect() only: a SYN recycle is the
                            // peer's doing, and has its own count.
                            s.reused as f64 * 100.0 / ended as f64
                        }
                    }),
                    mean_ms: s.and_then(|s| s.lifetimes.mean_ms()),
                    p99_ms: s.and_then(|s| s.lifetimes.quantile_ms(0.99)),
                }
            })
            .filter(|r| r.alive > 0 || r.new_per_s > 0.0)
            .filter(|r| self.matches(&[&r.comm, &r.pid.to_string(), &r.cgroup]))
            .collect();
        self.prev.entered = stats
            .by_process
            .iter()
            .map(|(k, s)| (k.clone(), s.entered))
            .collect();
        let sort = self.sort.min(PROC_COLUMNS.len() - 1);
        procs.sort_by(|a, b| {
            let o = match sort {
                0 => a.pid.cmp(&b.pid),
                1 => a.comm.cmp(&b.comm),
                2 => a.cgroup.cmp(&b.cgroup),
                3 => a.alive.cmp(&b.alive),
                4 => a.new_per_s.total_cmp(&b.new_per_s),
                5 => a.client.cmp(&b.client),
                6 => a.server.cmp(&b.server),
                7 => a.reuse_pct.total_cmp(&b.reuse_pct),
                8 => a
                    .mean_ms
                    .unwrap_or(0.0)
                    .total_cmp(&b.mean_ms.unwrap_or(0.0)),
                _ => a.p99_ms.unwrap_or(0.0).total_cmp(&b.p99_ms.unwrap_or(0.0)),
            };
            // Numbers biggest first by default, names A-Z.
            let o = if matches!(sort, 1 | 2) {
                o
            } else {
                o.reverse()
            };
            let o = if self.reverse { o.reverse() } else { o };
            // Equal keys in a fixed order, or rows swap places at every refresh.
            o.then_with(|| a.pid.cmp(&b.pid))
                .then_with(|| a.comm.cmp(&b.comm))
                .then_with(|| a.cgroup.cmp(&b.cgroup))
        });

        let pressure = agg.pressure();
        let mut dests: Vec<Pressure> = pressure
            .iter()
            .filter(|p| self.netns.is_none_or(|n| n == p.dest.netns))
            .filter(|p| {
                self.matches(&[
                    &p.dest.raddr.to_string(),
                    &p.dest.laddr.to_string(),
                    &p.dest.rport.to_string(),
                ])
            })
            .cloned()
            .collect();
        let dsort = self.sort.min(DEST_COLUMNS.len() - 1);
        dests.sort_by(|a, b| {
            let o = match dsort {
                0 => a.dest.netns.cmp(&b.dest.netns),
                1 => a.dest.laddr.cmp(&b.dest.laddr),
                2 => (a.dest.raddr, a.dest.rport).cmp(&(b.dest.raddr, b.dest.rport)),
                3 => a.time_wait.cmp(&b.time_wait),
                4 => a.live.cmp(&b.live),
                6 => a.entered_per_s.total_cmp(&b.entered_per_s),
                7 => b
                    .exhaustion_s
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&a.exhaustion_s.unwrap_or(f64::INFINITY)),
                _ => a.percent.total_cmp(&b.percent),
            };
            let o = if dsort <= 2 { o } else { o.reverse() };
            let o = if self.reverse { o.reverse() } else { o };
            o.then_with(|| {
                let key = |p: &Pressure| (p.dest.netns, p.dest.laddr, p.dest.raddr, p.dest.rport);
                key(a).cmp(&key(b))
            })
        });

        // The namespace whose settings head the screen: the one picked, else the busiest.
        let shown = self.netns.or_else(|| {
            let mut counts: HashMap<u32, u64> = HashMap::new();
            for tw in agg.alive() {
                *counts.entry(tw.conn.netns).or_default() += 1;
            }
            counts
                .into_iter()
                .filter(|(n, _)| agg.settings().contains_key(n))
                .max_by_key(|&(n, c)| (c, n))
                .map(|(n, _)| n)
                .or_else(|| agg.settings().keys().min().copied())
        });
        let settings = shown.and_then(|n| agg.settings().get(&n).map(|s| (n, s.clone())));
        let settings_fill = shown.map_or(0, |n| agg.alive_in(n) as u64);

        let mut lifetimes: Vec<(&'static str, u64)> =
            LIFETIME_BINS.iter().map(|(l, _)| (*l, 0)).collect();
        for (upper_ms, count) in stats.lifetimes.buckets_ms() {
            let i = LIFETIME_BINS
                .iter()
                .position(|(_, lim)| upper_ms <= *lim)
                .unwrap_or(LIFETIME_BINS.len() - 1);
            lifetimes[i].1 += count;
        }

        Model {
            host: host.to_string(),
            kernel: kernel.to_string(),
            uptime_s: now.saturating_sub(started_ns) as f64 / 1e9,
            replay: replay.map(str::to_string),
            netns: self.netns,
            settings,
            settings_fill,
            loss: agg.loss(),
            ends_without_start: agg.ends_without_start(),
            alive,
            rates,
            connect_failed: connects,
            bind_failed: binds,
            recovered: agg.totals().recovered,
            end_lost: agg.totals().overdue_dropped,
            kernel_check: self.kernel_check(agg),
            totals: t,
            procs,
            dests,
            lifetimes,
            advice: advice::advise(&Evidence::of(agg, &pressure)),
            log: self.prev.log.iter().rev().map(LogEntry::show).collect(),
        }
    }
}
