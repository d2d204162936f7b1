//! The aggregator: the one place where events become TIME_WAIT lifetimes and totals. Every view
//! (trace lines, JSON, and later the live view, recordings and reports) reads from it.
//!
//! It is pure Rust and clock-injected: it never reads a clock itself, so tests drive time.

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    FastMap,
    alive::AliveSet,
    stats::{ProcKey, Stats},
};

use crate::event::{
    CloseKind, Dest, EndReason, Endpoints, Event, NetnsSettings, NoTimeWait, NoTwReason,
    PortFailure, PortOp, Process, Recovered, Role, Substate, TwEnd, TwEnter, TwExisting, TwKey,
};

/// TCP_TIMEWAIT_LEN: a true TIME_WAIT's timer.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;
/// An end that arrives before its enter waits this long: another CPU's record overtook it,
/// or its start was lost and the sweep will report it (as gone, when the namespace was
/// deleted meanwhile; a sweep under load can take seconds). As long as a TIME_WAIT lives.
const EARLY_END_TTL_NS: u64 = 65_000_000_000;
/// Cookies of ended TIME_WAITs are remembered this long, so a start-up scan that raced with
/// their end does not bring them back; after the scan's result, or this long after the first
/// end when no scan comes, nothing more is remembered.
const RECENT_END_TTL_NS: u64 = 30_000_000_000;
/// A TIME_WAIT whose timer should have fired this long ago, with no end seen, is given up.
const OVERDUE_GRACE_NS: u64 = 30_000_000_000;

/// The row a TIME_WAIT counts in: its closer, or "?" when unknown.
pub fn proc_key(p: &Option<Process>) -> ProcKey {
    match p {
        Some(p) => ProcKey {
            pid: p.pid,
            comm: p.comm.clone(),
        },
        None => ProcKey {
            pid: 0,
            comm: "?".into(),
        },
    }
}

fn cgroup_of(p: &Option<Process>) -> u64 {
    p.as_ref().map_or(0, |p| p.cgroup_id)
}

/// Source of CLOCK_MONOTONIC nanoseconds, the clock the kernel stamps events with.
pub trait Clock {
    fn now_ns(&self) -> u64;
}

pub struct MonotonicClock;

/// A clock that reads what it was last set to: replays drive it from the events' own stamps.
#[derive(Clone, Default)]
pub struct ReplayClock(std::rc::Rc<std::cell::Cell<u64>>);

impl ReplayClock {
    pub fn set(&self, ns: u64) {
        self.0.set(ns);
    }
}

impl Clock for ReplayClock {
    fn now_ns(&self) -> u64 {
        self.0.get()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
}

/// A TIME_WAIT socket that is alive now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AliveTw {
    pub key: TwKey,
    pub conn: Endpoints,
    pub closer: Option<Process>,
    pub role: Role,
    pub close: CloseKind,
    pub substate: Substate,
    /// When it entered (CLOCK_MONOTONIC ns). Estimated for pre-existing ones.
    pub entered_ns: u64,
    /// When its timer was last armed, and for how long.
    pub armed_ns: u64,
    pub timeout_ns: u64,
    pub rescheduled: u32,
    /// Found by the start-up scan rather than seen entering.
    pub preexisting: bool,
    /// Its start was recovered by the sweep: `entered_ns` is an estimate.
    pub recovered: bool,
}

/// A finished TIME_WAIT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimeWaitRecord {
    #[serde(flatten)]
    pub tw: AliveTw,
    pub ended_ns: u64,
    pub end: EndReason,
    pub reused_by: Option<Process>,
}

impl TimeWaitRecord {
    pub fn lifetime_ns(&self) -> u64 {
        self.ended_ns.saturating_sub(self.tw.entered_ns)
    }
}

/// A failed connect() or bind(), with the TIME_WAITs that stood in its way at that moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortFailureRecord {
    #[serde(flatten)]
    pub failure: PortFailure,
    /// connect: TIME_WAITs towards the same remote address and port. bind: TIME_WAITs on the
    /// port asked for (on the same address, or any when binding the wildcard address).
    pub time_wait_holding: u32,
}

/// What the aggregator hands to views as it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    TimeWait(TimeWaitRecord),
    NoTimeWait(NoTimeWait),
    PortFailure(PortFailureRecord),
}

/// Local ports held towards one destination against what connect() may use.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pressure {
    #[serde(flatten)]
    pub dest: Dest,
    /// TIME_WAITs towards it on ephemeral local ports.
    pub time_wait: u32,
    /// Live connections towards it on ephemeral local ports (last scan).
    pub live: u32,
    pub held: u32,
    /// ip_local_port_range less ip_local_reserved_ports.
    pub usable: u32,
    pub percent: f64,
    /// TIME_WAITs entering and ending per second towards it, over the last
    /// [`RATE_WINDOW_S`] seconds.
    pub entered_per_s: f64,
    pub ended_per_s: f64,
    /// At the current net growth, seconds until every usable port is held; `None` when not
    /// growing.
    pub exhaustion_s: Option<f64>,
}

/// Seconds over which per-destination rates are averaged.
pub const RATE_WINDOW_S: u64 = 10;

/// Entries and ends per second for the last [`RATE_WINDOW_S`] seconds.
#[derive(Clone, Debug, Default)]
struct RateWindow {
    /// Second (of event time) that `slots[sec % N]` counts.
    secs: [u64; RATE_WINDOW_S as usize],
    entered: [u32; RATE_WINDOW_S as usize],
    ended: [u32; RATE_WINDOW_S as usize],
}

impl RateWindow {
    fn slot(&mut self, ts_ns: u64) -> usize {
        let sec = ts_ns / 1_000_000_000;
        let i = (sec % RATE_WINDOW_S) as usize;
        if self.secs[i] != sec {
            self.secs[i] = sec;
            self.entered[i] = 0;
            self.ended[i] = 0;
        }
        i
    }

    fn add(&mut self, ts_ns: u64, entered: bool) {
        let i = self.slot(ts_ns);
        if entered {
            self.entered[i] += 1;
        } else {
            self.ended[i] += 1;
        }
    }

    /// (entered/s, ended/s) over the window ending at `now_ns`.
    fn rates(&self, now_ns: u64) -> (f64, f64) {
        let now = now_ns / 1_000_000_000;
        let (mut e, mut d) = (0u64, 0u64);
        for i in 0..RATE_WINDOW_S as usize {
            if now.saturating_sub(self.secs[i]) < RATE_WINDOW_S && self.secs[i] <= now {
                e += u64::from(self.entered[i]);
                d += u64::from(self.ended[i]);
            }
        }
        let w = RATE_WINDOW_S as f64;
        (e as f64 / w, d as f64 / w)
    }

    fn is_empty(&self, now_ns: u64) -> bool {
        self.rates(now_ns) == (0.0, 0.0)
    }
}

/// Failed connect() and bind() calls.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Failures {
    pub connect_eaddrnotavail: u64,
    pub bind_eaddrinuse: u64,
    /// The most recent failures, newest last.
    #[serde(skip)]
    pub recent: std::collections::VecDeque<PortFailureRecord>,
}

const RECENT_FAILURES: usize = 100;

/// Running totals since the start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub entered: u64,
    pub preexisting: u64,
    pub rescheduled: u64,
    pub ended: u64,
    pub expired: u64,
    pub reused: u64,
    pub recycled: u64,
    pub reset: u64,
    pub purged: u64,
    pub overflow: u64,
    pub abort: u64,
    pub peer_reset: u64,
    /// TIME_WAITs entered by the side that opened the connection.
    pub client: u64,
    pub server: u64,
    /// Ends never matched to a TIME_WAIT (entered before an event was lost, or filtered).
    pub unmatched_ends: u64,
    /// Of `entered`: starts no kernel program saw, found afterwards by the sweep.
    pub recovered: u64,
    /// TIME_WAITs given up on: their timer should have ended them long ago.
    pub overdue_dropped: u64,
}

impl Totals {
    /// TIME_WAITs that ended this way.
    pub fn ended_by(&self, end: EndReason) -> u64 {
        match end {
            EndReason::Expired => self.expired,
            EndReason::Reused => self.reused,
            EndReason::Recycled => self.recycled,
            EndReason::Reset => self.reset,
            EndReason::Purged => self.purged,
        }
    }

    fn count_end(&mut self, end: EndReason) {
        self.ended += 1;
        *match end {
            EndReason::Expired => &mut self.expired,
            EndReason::Reused => &mut self.reused,
            EndReason::Recycled => &mut self.recycled,
            EndReason::Reset => &mut self.reset,
            EndReason::Purged => &mut self.purged,
        } += 1;
    }

    fn count_no_tw(&mut self, r: NoTwReason) {
        *match r {
            NoTwReason::Overflow => &mut self.overflow,
            NoTwReason::Abort => &mut self.abort,
            NoTwReason::PeerReset => &mut self.peer_reset,
        } += 1;
    }
}

pub struct Aggregator<C: Clock> {
    clock: C,
    jiffy_ns: u64,
    alive: AliveSet,
    early_ends: FastMap<TwKey, (TwEnd, u64)>,
    /// Starts the sweep recovered for connections already gone, with when they arrived: a
    /// TIME_WAIT only if its end is seen, which may come later (a namespace's purge of
    /// thousands of TIME_WAITs takes a while). Kept as long as a TIME_WAIT can live.
    gone_starts: FastMap<TwKey, (TwEnter, u64)>,
    recent_ends: FastMap<u64, u64>,
    /// Event time of the first end, and whether the start-up scan's result came: ends are
    /// remembered in `recent_ends` only while a scan may still race with them.
    first_end_ns: Option<u64>,
    scan_seen: bool,
    totals: Totals,
    /// The same counts per namespace (for a view of one), with its failed connects and binds.
    by_netns: FastMap<u32, (Totals, u64, u64)>,
    settings: HashMap<u32, NetnsSettings>,
    /// Rates of TIME_WAITs per destination; entries go once idle.
    rates: FastMap<Dest, RateWindow>,
    /// TIME_WAITs alive per (netns, remote address, remote port): what a connect() to there
    /// competes with.
    by_remote: FastMap<(u32, std::net::IpAddr, u16), u32>,
    live: HashMap<u32, Vec<(Dest, u32)>>,
    failures: Failures,
    /// Aborts and server-side TIME_WAITs per command, for advice.
    aborts_by_comm: FastMap<std::sync::Arc<str>, u64>,
    server_tw_by_comm: FastMap<std::sync::Arc<str>, u64>,
    stats: Stats,
    /// Latest kernel TIME_WAIT counters per namespace.
    kernel_counters: HashMap<u32, std::collections::BTreeMap<String, u64>>,
    /// Latest passive closes per namespace (cumulative since twtrace attached).
    passive_closes: HashMap<u32, u64>,
    loss: crate::kernel::tracer::Loss,
    cgroup_paths: HashMap<u64, String>,
}

impl<C: Clock> Aggregator<C> {
    /// `hz` is the kernel's CONFIG_HZ, which timer lengths in events are counted in.
    pub fn new(clock: C, hz: u32) -> Self {
        Self {
            clock,
            jiffy_ns: 1_000_000_000 / u64::from(hz.max(1)),
            alive: AliveSet::default(),
            early_ends: FastMap::default(),
            gone_starts: FastMap::default(),
            recent_ends: FastMap::default(),
            first_end_ns: None,
            scan_seen: false,
            totals: Totals::default(),
            by_netns: FastMap::default(),
            settings: HashMap::new(),
            rates: FastMap::default(),
            by_remote: FastMap::default(),
            live: HashMap::new(),
            failures: Failures::default(),
            aborts_by_comm: FastMap::default(),
            server_tw_by_comm: FastMap::default(),
            stats: Stats::default(),
            kernel_counters: HashMap::new(),
            passive_closes: HashMap::new(),
            loss: Default::default(),
            cgroup_paths: HashMap::new(),
        }
    }

    /// Paths of cgroups, as recorded (see [`Event::Cgroup`]).
    pub fn cgroup_path(&self, id: u64) -> Option<&str> {
        self.cgroup_paths.get(&id).map(String::as_str)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn kernel_counters(&self) -> &HashMap<u32, std::collections::BTreeMap<String, u64>> {
        &self.kernel_counters
    }

    /// Connections this host closed: actively (TIME_WAITs entered and closes that skipped
    /// TIME_WAIT) and passively (LAST_ACK->CLOSE).
    pub fn connections_closed(&self) -> u64 {
        self.totals.entered
            + self.totals.overflow
            + self.totals.abort
            + self.totals.peer_reset
            + self.passive_closes.values().sum::<u64>()
    }

    /// What the kernel side lost, as of the latest snapshot.
    pub fn loss(&self) -> &crate::kernel::tracer::Loss {
        &self.loss
    }

    pub fn settings(&self) -> &HashMap<u32, NetnsSettings> {
        &self.settings
    }

    pub fn failures(&self) -> &Failures {
        &self.failures
    }

    pub fn aborts_by_comm(&self) -> &FastMap<std::sync::Arc<str>, u64> {
        &self.aborts_by_comm
    }

    pub fn server_tw_by_comm(&self) -> &FastMap<std::sync::Arc<str>, u64> {
        &self.server_tw_by_comm
    }

    /// TIME_WAITs alive in `netns` (what counts against tcp_max_tw_buckets).
    pub fn alive_in(&self, netns: u32) -> usize {
        self.alive.iter().filter(|t| t.conn.netns == netns).count()
    }

    /// Port pressure per destination, highest first. Only namespaces whose settings are known
    /// are covered; only ephemeral local ports count.
    pub fn pressure(&self) -> Vec<Pressure> {
        let now = self.clock.now_ns();
        let mut held: HashMap<Dest, (u32, u32)> = HashMap::new();
        for tw in self.alive.iter() {
            if let Some(s) = self.settings.get(&tw.conn.netns)
                && s.in_ephemeral_range(tw.conn.lport)
            {
                held.entry(Dest::of(&tw.conn)).or_default().0 += 1;
            }
        }
        for counts in self.live.values() {
            for &(d, n) in counts {
                held.entry(d).or_default().1 += n;
            }
        }
        let mut out: Vec<Pressure> = held
            .into_iter()
            .filter_map(|(dest, (time_wait, live))| {
                let usable = self.settings.get(&dest.netns)?.usable_ports();
                let (entered_per_s, ended_per_s) = self
                    .rates
                    .get(&dest)
                    .map(|r| r.rates(now))
                    .unwrap_or_default();
                let held = time_wait + live;
                let growth = entered_per_s - ended_per_s;
                Some(Pressure {
                    dest,
                    time_wait,
                    live,
                    held,
                    usable,
                    percent: if usable == 0 {
                        100.0
                    } else {
                        f64::from(held) * 100.0 / f64::from(usable)
                    },
                    entered_per_s,
                    ended_per_s,
                    exhaustion_s: (growth > 0.0)
                        .then(|| f64::from(usable.saturating_sub(held)) / growth),
                })
            })
            .collect();
        out.sort_by(|a, b| b.percent.total_cmp(&a.percent).then(a.dest.cmp(&b.dest)));
        out
    }

    /// Counts a TIME_WAIT towards its destination (for port pressure and connect failures).
    /// A server's TIME_WAIT holds its listening port, not an ephemeral one, and its "remote
    /// port" is the client's ephemeral port: counting it would only make a destination per
    /// connection.
    fn track(&mut self, tw: &AliveTw, ts_ns: u64, entered: bool) {
        if tw.role == Role::Server {
            return;
        }
        let remote = (tw.conn.netns, tw.conn.raddr, tw.conn.rport);
        if entered {
            *self.by_remote.entry(remote).or_default() += 1;
        } else if let Some(n) = self.by_remote.get_mut(&remote) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_remote.remove(&remote);
            }
        }
        self.rates
            .entry(Dest::of(&tw.conn))
            .or_default()
            .add(ts_ns, entered);
    }

    fn port_failure(&mut self, f: PortFailure, out: &mut Vec<Record>) {
        let time_wait_holding = match f.op {
            PortOp::Connect => self
                .by_remote
                .get(&(f.conn.netns, f.conn.raddr, f.conn.rport))
                .copied()
                .unwrap_or(0),
            PortOp::Bind => self
                .alive
                .iter()
                .filter(|t| {
                    t.conn.netns == f.conn.netns
                        && t.conn.lport == f.conn.lport
                        && (f.conn.laddr.is_unspecified() || t.conn.laddr == f.conn.laddr)
                })
                .count() as u32,
        };
        let ns = self.by_netns.entry(f.conn.netns).or_default();
        match f.op {
            PortOp::Connect => {
                self.failures.connect_eaddrnotavail += 1;
                ns.1 += 1;
            }
            PortOp::Bind => {
                self.failures.bind_eaddrinuse += 1;
                ns.2 += 1;
            }
        }
        let rec = PortFailureRecord {
            failure: f,
            time_wait_holding,
        };
        if self.failures.recent.len() == RECENT_FAILURES {
            self.failures.recent.pop_front();
        }
        self.failures.recent.push_back(rec.clone());
        out.push(Record::PortFailure(rec));
    }

    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// What [`Aggregator::totals`] counts (entered, ended by reason, closes without
    /// TIME_WAIT), and the failed connects and binds, in one namespace: a view of one shows
    /// these. Found-at-start, recovered and lost counts are the trace's, not per namespace.
    pub fn netns_totals(&self, netns: u32) -> (Totals, u64, u64) {
        self.by_netns.get(&netns).cloned().unwrap_or_default()
    }

    pub fn alive(&self) -> impl Iterator<Item = &AliveTw> {
        self.alive.iter()
    }

    pub fn alive_count(&self) -> usize {
        self.alive.len()
    }

    /// Ends of TIME_WAITs never seen starting, including those still waiting for their start.
    /// Without filters on the closing process and with the start-up scan, each one is a
    /// TIME_WAIT whose start the kernel programs never saw.
    pub fn ends_without_start(&self) -> u64 {
        self.totals.unmatched_ends + self.early_ends.len() as u64
    }

    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Feeds one event; finished TIME_WAITs and TIME_WAIT-less closes are pushed to `out`.
    pub fn ingest(&mut self, ev: Event, out: &mut Vec<Record>) {
        match ev {
            Event::TwEnter(e) => self.enter(e, out),
            Event::TwResched(r) => {
                let key = self.alive_key(r.key, r.addr);
                if let Some(tw) = self.alive.get_mut(&key) {
                    tw.substate = r.substate;
                    tw.armed_ns = r.ts_ns;
                    tw.timeout_ns = u64::from(r.timeout_jiffies) * self.jiffy_ns;
                    tw.rescheduled += 1;
                    self.totals.rescheduled += 1;
                }
            }
            Event::TwEnd(e) => self.end(e, out),
            Event::NoTimeWait(n) => {
                self.totals.count_no_tw(n.reason);
                self.by_netns
                    .entry(n.conn.netns)
                    .or_default()
                    .0
                    .count_no_tw(n.reason);
                if n.reason == NoTwReason::Abort
                    && let Some(p) = &n.closer
                {
                    *self.aborts_by_comm.entry(p.comm.clone()).or_default() += 1;
                }
                out.push(Record::NoTimeWait(n));
            }
            Event::PortFailure(f) => self.port_failure(f, out),
            Event::Settings {
                netns, settings, ..
            } => {
                self.settings.insert(netns, settings);
            }
            Event::LiveConnections { netns, counts, .. } => {
                self.live.insert(netns, counts);
            }
            Event::KernelCounters {
                netns, counters, ..
            } => {
                self.kernel_counters.insert(netns, counters);
            }
            Event::Cgroup { id, path, .. } => {
                self.cgroup_paths.insert(id, path);
            }
            Event::Snapshot {
                passive_closes,
                loss,
                ..
            } => {
                self.passive_closes.extend(passive_closes);
                self.loss = loss;
            }
            Event::TwExisting {
                ts_ns,
                sockets,
                more,
            } => {
                for s in sockets {
                    self.existing(ts_ns, s, out);
                }
                // The ends seen before the scan matter until its last part.
                if !more {
                    self.scan_seen = true;
                    self.recent_ends = FastMap::default();
                }
            }
        }
    }

    fn enter(&mut self, e: TwEnter, out: &mut Vec<Record>) {
        match e.recovered {
            // Known already (its start was read after all), or gone without an end seen: then
            // it closed without a TIME_WAIT, or the TIME_WAIT's end is lost too.
            Some(_) if self.alive.contains_key(&e.key) => return,
            Some(Recovered::Gone) if !self.early_ends.contains_key(&e.key) => {
                let now = self.clock.now_ns();
                self.gone_starts.insert(e.key, (e, now));
                return;
            }
            Some(_) => self.totals.recovered += 1,
            None => {
                if let Some(tw) = self.alive.get_mut(&e.key)
                    && tw.recovered
                {
                    // The sweep looked while this start was on its way: one TIME_WAIT, with
                    // the kernel's times.
                    tw.entered_ns = e.ts_ns;
                    tw.armed_ns = e.ts_ns;
                    tw.timeout_ns = u64::from(e.timeout_jiffies) * self.jiffy_ns;
                    tw.recovered = false;
                    self.totals.recovered -= 1;
                    return;
                }
            }
        }
        let tw = AliveTw {
            key: e.key,
            conn: e.conn,
            closer: e.closer,
            role: e.role,
            close: e.close,
            substate: e.substate,
            entered_ns: e.ts_ns,
            armed_ns: e.ts_ns,
            timeout_ns: u64::from(e.timeout_jiffies) * self.jiffy_ns,
            rescheduled: 0,
            preexisting: false,
            recovered: e.recovered.is_some(),
        };
        self.totals.entered += 1;
        let ns = &mut self.by_netns.entry(tw.conn.netns).or_default().0;
        ns.entered += 1;
        match tw.role {
            Role::Client => ns.client += 1,
            Role::Server => ns.server += 1,
            Role::Unknown => {}
        }
        match tw.role {
            Role::Client => self.totals.client += 1,
            Role::Server => {
                self.totals.server += 1;
                if let Some(p) = &tw.closer {
                    *self.server_tw_by_comm.entry(p.comm.clone()).or_default() += 1;
                }
            }
            Role::Unknown => {}
        }
        self.track(&tw, e.ts_ns, true);
        self.stats
            .entered(proc_key(&tw.closer), cgroup_of(&tw.closer), tw.role);
        if let Some(old) = self.alive.insert(tw) {
            self.track(&old, e.ts_ns, false);
            if old.preexisting {
                // The start-up scan listed it before its start was read: it started after
                // twtrace did, and this record, with its closer, replaces the scan's.
                self.totals.preexisting = self.totals.preexisting.saturating_sub(1);
            } else {
                // The old socket's end was lost (for an address key, its memory then reused).
                self.totals.overdue_dropped += 1;
            }
        }
        if let Some((end, _)) = self.early_ends.remove(&e.key) {
            if end.ts_ns >= e.ts_ns {
                self.end(end, out);
            } else {
                self.totals.unmatched_ends += 1;
            }
        }
    }

    /// The key an update finds its TIME_WAIT by: its cookie, or its address when the
    /// TIME_WAIT started before it had a cookie.
    fn alive_key(&self, key: TwKey, addr: Option<u64>) -> TwKey {
        match addr {
            Some(a)
                if !self.alive.contains_key(&key) && self.alive.contains_key(&TwKey::Addr(a)) =>
            {
                TwKey::Addr(a)
            }
            _ => key,
        }
    }

    fn end(&mut self, e: TwEnd, out: &mut Vec<Record>) {
        let key = self.alive_key(e.key, e.addr);
        if !self.alive.contains_key(&key)
            && let Some((start, _)) = self.gone_starts.remove(&key)
        {
            // Its end settles the sweep's doubt: it was a TIME_WAIT.
            self.early_ends.insert(key, (e, self.clock.now_ns()));
            self.enter(start, out);
            return;
        }
        let Some(mut tw) = self.alive.remove(&key) else {
            let now = self.clock.now_ns();
            if self.early_ends.insert(e.key, (e, now)).is_some() {
                self.totals.unmatched_ends += 1;
            }
            return;
        };
        self.totals.count_end(e.end);
        self.by_netns
            .entry(tw.conn.netns)
            .or_default()
            .0
            .count_end(e.end);
        self.track(&tw, e.ts_ns, false);
        self.stats.ended(
            proc_key(&tw.closer),
            e.end,
            e.ts_ns.saturating_sub(tw.entered_ns),
        );
        tw.substate = e.substate;
        let first = *self.first_end_ns.get_or_insert(e.ts_ns);
        if let TwKey::Cookie(c) = e.key
            && !self.scan_seen
            && e.ts_ns.saturating_sub(first) < RECENT_END_TTL_NS
        {
            self.recent_ends.insert(c, e.ts_ns);
        }
        out.push(Record::TimeWait(TimeWaitRecord {
            tw,
            ended_ns: e.ts_ns,
            end: e.end,
            reused_by: e.by,
        }));
    }

    fn existing(&mut self, ts_ns: u64, s: TwExisting, out: &mut Vec<Record>) {
        let key = TwKey::new(s.cookie, 0);
        if s.cookie == 0
            || self.alive.contains_key(&key)
            || self.recent_ends.contains_key(&s.cookie)
        {
            return;
        }
        let remaining = u64::from(s.remaining_ms) * 1_000_000;
        // A true TIME_WAIT was armed for 60 s; without reschedules it entered 60 s - remaining
        // ago. For the FIN_WAIT2 substate the length is unknown: count from the scan.
        let entered_ns = match s.substate {
            Substate::TimeWait => ts_ns.saturating_sub(TIMEWAIT_LEN_NS.saturating_sub(remaining)),
            Substate::FinWait2 => ts_ns,
        };
        let tw = AliveTw {
            key,
            conn: s.conn,
            closer: None,
            role: Role::Unknown,
            close: CloseKind::Unknown,
            substate: s.substate,
            entered_ns,
            armed_ns: ts_ns,
            timeout_ns: remaining,
            rescheduled: 0,
            preexisting: true,
            recovered: false,
        };
        self.totals.preexisting += 1;
        self.track(&tw, ts_ns, true);
        self.alive.insert(tw);
        if let Some((end, _)) = self.early_ends.remove(&key) {
            self.end(end, out);
        }
    }

    /// Housekeeping driven by the injected clock: forgets ends that never found their
    /// TIME_WAIT, and gives up on TIME_WAITs whose timer should have fired long ago (their end
    /// was lost). Call about once a second.
    pub fn tick(&mut self) {
        let now = self.clock.now_ns();
        let before = self.early_ends.len();
        self.early_ends
            .retain(|_, (_, arrived)| now.saturating_sub(*arrived) < EARLY_END_TTL_NS);
        self.totals.unmatched_ends += (before - self.early_ends.len()) as u64;
        self.gone_starts.retain(|_, (_, arrived)| {
            now.saturating_sub(*arrived) < TIMEWAIT_LEN_NS + OVERDUE_GRACE_NS
        });
        self.recent_ends
            .retain(|_, ended| now.saturating_sub(*ended) < RECENT_END_TTL_NS);
        let overdue = self
            .alive
            .extract_if(|tw| now >= tw.armed_ns + tw.timeout_ns + OVERDUE_GRACE_NS);
        for tw in overdue {
            self.track(&tw, now, false);
            self.totals.overdue_dropped += 1;
        }
        let by_remote = &self.by_remote;
        self.rates.retain(|d, r| {
            !r.is_empty(now) || by_remote.contains_key(&(d.netns, d.raddr, d.rport))
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::event::{Family, TwResched};

    const S: u64 = 1_000_000_000;

    fn agg() -> (Aggregator<ReplayClock>, ReplayClock) {
        let c = ReplayClock::default();
        (Aggregator::new(c.clone(), 250), c)
    }

    fn conn(lport: u16) -> Endpoints {
        Endpoints {
            netns: 1,
            family: Family::Ipv4,
            laddr: IpAddr::from([127, 0, 0, 1]),
            lport,
            raddr: IpAddr::from([127, 0, 0, 1]),
            rport: 8080,
        }
    }

    fn proc_(pid: u32, comm: &str) -> Process {
        Process {
            pid,
            tid: pid,
            host_pid: None,
            uid: 0,
            comm: comm.into(),
            cgroup_id: 0,
        }
    }

    pub fn alive_tw(key: TwKey) -> AliveTw {
        AliveTw {
            key,
            conn: conn(40000),
            closer: Some(proc_(10, "client")),
            role: Role::Client,
            close: CloseKind::Active,
            substate: Substate::TimeWait,
            entered_ns: S,
            armed_ns: S,
            timeout_ns: TIMEWAIT_LEN_NS,
            rescheduled: 0,
            preexisting: false,
            recovered: false,
        }
    }

    pub fn enter(key: TwKey, ts: u64, substate: Substate) -> Event {
        Event::TwEnter(TwEnter {
            ts_ns: ts,
            cpu: 0,
            key,
            conn: conn(40000),
            closer: Some(proc_(10, "client")),
            role: Role::Client,
            close: CloseKind::Active,
            substate,
            timeout_jiffies: 15000,
            recovered: None,
        })
    }

    pub fn end(key: TwKey, ts: u64, end: EndReason) -> Event {
        Event::TwEnd(TwEnd {
            ts_ns: ts,
            cpu: 1,
            key,
            end,
            substate: Substate::TimeWait,
            by: (end == EndReason::Reused).then(|| proc_(20, "reuser")),
            addr: None,
        })
    }

    fn only_tw(out: &[Record]) -> &TimeWaitRecord {
        match out {
            [Record::TimeWait(r)] => r,
            other => panic!("expected one TIME_WAIT record, got {other:?}"),
        }
    }

    #[test]
    fn every_end_reason_yields_a_lifetime() {
        for (i, reason) in EndReason::ALL.into_iter().enumerate() {
            let (mut a, _) = agg();
            let key = TwKey::Cookie(i as u64 + 1);
            let mut out = vec![];
            a.ingest(enter(key, 10 * S, Substate::TimeWait), &mut out);
            assert!(out.is_empty());
            assert_eq!(a.alive_count(), 1);
            a.ingest(end(key, 12 * S, reason), &mut out);
            let r = only_tw(&out);
            assert_eq!(r.end, reason);
            assert_eq!(r.lifetime_ns(), 2 * S);
            assert_eq!(&*r.tw.closer.as_ref().unwrap().comm, "client");
            assert_eq!(r.reused_by.is_some(), reason == EndReason::Reused);
            assert_eq!(a.alive_count(), 0);
            assert_eq!(a.totals().ended, 1);
        }
    }

    #[test]
    fn attribution_is_carried_not_taken_from_the_ending_context() {
        // The enter event carries the closer captured at close(); the end happens in softirq
        // under another task, which must not replace it.
        let (mut a, _) = agg();
        let key = TwKey::Cookie(5);
        let mut out = vec![];
        a.ingest(enter(key, S, Substate::FinWait2), &mut out);
        a.ingest(
            Event::TwResched(TwResched {
                ts_ns: 2 * S,
                cpu: 1,
                key,
                substate: Substate::TimeWait,
                timeout_jiffies: 15000,
                addr: None,
            }),
            &mut out,
        );
        a.ingest(end(key, 62 * S, EndReason::Expired), &mut out);
        let r = only_tw(&out);
        assert_eq!(r.tw.closer.as_ref().unwrap().pid, 10);
        assert_eq!(r.tw.rescheduled, 1);
        assert_eq!(r.tw.substate, Substate::TimeWait);
        assert_eq!(r.lifetime_ns(), 61 * S);
    }

    #[test]
    fn address_keys_survive_pointer_reuse() {
        // The same slab address, two TIME_WAITs one after the other: two separate lifetimes.
        let (mut a, _) = agg();
        let key = TwKey::Addr(0xffff_1000);
        let mut out = vec![];
        a.ingest(enter(key, S, Substate::TimeWait), &mut out);
        a.ingest(end(key, 2 * S, EndReason::Reused), &mut out);
        a.ingest(enter(key, 3 * S, Substate::TimeWait), &mut out);
        a.ingest(end(key, 63 * S, EndReason::Expired), &mut out);
        assert_eq!(out.len(), 2);
        let lifetimes: Vec<u64> = out
            .iter()
            .map(|r| match r {
                Record::TimeWait(t) => t.lifetime_ns(),
                _ => 0,
            })
            .collect();
        assert_eq!(lifetimes, vec![S, 60 * S]);
        // A lost end followed by reuse of the address replaces the stale entry.
        a.ingest(enter(key, 70 * S, Substate::TimeWait), &mut out);
        a.ingest(enter(key, 80 * S, Substate::TimeWait), &mut out);
        assert_eq!(a.alive_count(), 1);
        assert_eq!(a.totals().overdue_dropped, 1);
    }

    #[test]
    fn a_cookie_assigned_during_the_time_wait_still_finds_it_by_address() {
        // Before 5.12 the programs cannot assign cookies: a TIME_WAIT starts keyed by its
        // address, and an `ss` dump may give it a cookie before it ends.
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(
            enter(TwKey::Addr(0xffff_1000), S, Substate::TimeWait),
            &mut out,
        );
        let Event::TwEnd(mut e) = end(TwKey::Cookie(44), 61 * S, EndReason::Expired) else {
            unreachable!()
        };
        e.addr = Some(0xffff_2000);
        a.ingest(Event::TwEnd(e.clone()), &mut out);
        assert!(out.is_empty(), "another address finds nothing");
        e.addr = Some(0xffff_1000);
        a.ingest(Event::TwEnd(e), &mut out);
        assert_eq!(only_tw(&out).lifetime_ns(), 60 * S);
        assert_eq!(a.alive_count(), 0);
    }

    #[test]
    fn end_before_enter_across_cpus_is_matched() {
        let (mut a, clock) = agg();
        let key = TwKey::Cookie(9);
        let mut out = vec![];
        a.ingest(end(key, 5 * S, EndReason::Reset), &mut out);
        assert!(out.is_empty());
        clock.set(S / 10);
        a.tick();
        a.ingest(enter(key, 4 * S, Substate::TimeWait), &mut out);
        let r = only_tw(&out);
        assert_eq!(r.end, EndReason::Reset);
        assert_eq!(r.lifetime_ns(), S);
        assert_eq!(a.totals().unmatched_ends, 0);
    }

    #[test]
    fn unmatched_ends_are_forgotten_after_a_while() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        a.ingest(end(TwKey::Cookie(1), S, EndReason::Expired), &mut out);
        clock.set(EARLY_END_TTL_NS + 1);
        a.tick();
        assert_eq!(a.totals().unmatched_ends, 1);
        a.ingest(enter(TwKey::Cookie(1), 2 * S, Substate::TimeWait), &mut out);
        assert!(out.is_empty());
    }

    fn recovered(key: TwKey, ts: u64, how: Recovered) -> Event {
        let Event::TwEnter(mut e) = enter(key, ts, Substate::TimeWait) else {
            unreachable!()
        };
        e.recovered = Some(how);
        Event::TwEnter(e)
    }

    #[test]
    fn a_recovered_start_is_a_time_wait_like_any_other() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(recovered(TwKey::Cookie(1), S, Recovered::Alive), &mut out);
        assert_eq!((a.totals().entered, a.totals().recovered), (1, 1));
        a.ingest(end(TwKey::Cookie(1), 61 * S, EndReason::Expired), &mut out);
        let r = only_tw(&out);
        assert!(r.tw.recovered);
        assert_eq!(r.tw.closer.as_ref().map(|p| p.pid), Some(10));
        assert_eq!(r.lifetime_ns(), 60 * S);
    }

    #[test]
    fn a_recovered_start_already_known_counts_once() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        a.ingest(recovered(TwKey::Cookie(1), S, Recovered::Alive), &mut out);
        assert_eq!((a.totals().entered, a.totals().recovered), (1, 0));
        assert_eq!(a.totals().overdue_dropped, 0);
    }

    #[test]
    fn a_start_read_after_the_sweep_recovered_it_counts_once() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(recovered(TwKey::Cookie(1), S, Recovered::Alive), &mut out);
        a.ingest(enter(TwKey::Cookie(1), 2 * S, Substate::TimeWait), &mut out);
        assert_eq!((a.totals().entered, a.totals().recovered), (1, 0));
        a.ingest(end(TwKey::Cookie(1), 5 * S, EndReason::Reused), &mut out);
        let r = only_tw(&out);
        assert!(!r.tw.recovered);
        assert_eq!(r.lifetime_ns(), 3 * S, "timed from the kernel's start");
        assert_eq!(a.totals().overdue_dropped, 0);
    }

    #[test]
    fn a_gone_connection_is_a_time_wait_only_if_its_end_was_seen() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(recovered(TwKey::Cookie(1), S, Recovered::Gone), &mut out);
        assert_eq!(
            (a.totals().entered, a.alive_count()),
            (0, 0),
            "closed without one"
        );
        a.ingest(end(TwKey::Cookie(2), 3 * S, EndReason::Reused), &mut out);
        assert_eq!(a.ends_without_start(), 1);
        a.ingest(recovered(TwKey::Cookie(2), S, Recovered::Gone), &mut out);
        assert_eq!((a.totals().entered, a.totals().recovered), (1, 1));
        assert_eq!(a.ends_without_start(), 0);
        let r = only_tw(&out);
        assert_eq!((r.end, r.lifetime_ns()), (EndReason::Reused, 2 * S));
    }

    #[test]
    fn an_end_after_the_sweep_found_its_connection_gone_makes_it_a_time_wait() {
        // A namespace deleted with thousands of TIME_WAITs: the sweep reports the starts it
        // missed as gone before the purge's ends come in.
        let (mut a, clock) = agg();
        let mut out = vec![];
        a.ingest(recovered(TwKey::Cookie(3), S, Recovered::Gone), &mut out);
        assert_eq!(a.totals().entered, 0);
        clock.set(40 * S);
        a.tick();
        a.ingest(end(TwKey::Cookie(3), 40 * S, EndReason::Purged), &mut out);
        assert_eq!((a.totals().entered, a.totals().recovered), (1, 1));
        assert_eq!(a.ends_without_start(), 0);
        assert_eq!(only_tw(&out).end, EndReason::Purged);
        // One whose end never comes is forgotten once no TIME_WAIT could still live.
        a.ingest(
            recovered(TwKey::Cookie(4), 41 * S, Recovered::Gone),
            &mut out,
        );
        clock.set(41 * S + TIMEWAIT_LEN_NS + OVERDUE_GRACE_NS);
        a.tick();
        a.ingest(end(TwKey::Cookie(4), 200 * S, EndReason::Purged), &mut out);
        assert_eq!(a.totals().entered, 1);
        assert_eq!(a.ends_without_start(), 1);
    }

    #[test]
    fn ends_without_a_start_are_counted_while_waiting_and_after() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        a.ingest(end(TwKey::Cookie(1), 2 * S, EndReason::Expired), &mut out);
        assert_eq!(a.ends_without_start(), 0);
        a.ingest(end(TwKey::Cookie(2), 2 * S, EndReason::Purged), &mut out);
        assert_eq!(a.ends_without_start(), 1, "still waiting for its start");
        clock.set(EARLY_END_TTL_NS + 3 * S);
        a.tick();
        assert_eq!(a.ends_without_start(), 1, "given up on");
    }

    fn existing(cookie: u64, remaining_ms: u32) -> TwExisting {
        TwExisting {
            conn: conn(1),
            cookie,
            substate: Substate::TimeWait,
            remaining_ms,
        }
    }

    #[test]
    fn preexisting_time_waits_are_tracked_to_their_end() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(
            Event::TwExisting {
                ts_ns: 100 * S,
                sockets: vec![existing(77, 45_000)],
                more: false,
            },
            &mut out,
        );
        assert_eq!(a.alive_count(), 1);
        assert_eq!(a.totals().preexisting, 1);
        a.ingest(
            end(TwKey::Cookie(77), 145 * S, EndReason::Expired),
            &mut out,
        );
        let r = only_tw(&out);
        assert!(r.tw.preexisting);
        // Entered 15 s before the scan (60 s - 45 s left), ended 45 s after it.
        assert_eq!(r.lifetime_ns(), 60 * S);
    }

    #[test]
    fn scan_does_not_duplicate_or_revive() {
        let (mut a, _) = agg();
        let mut out = vec![];
        // Seen entering live, then also found by the scan: one TIME_WAIT.
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        // Ended live before the scan's answer was ingested: must not come back.
        a.ingest(enter(TwKey::Cookie(2), S, Substate::TimeWait), &mut out);
        a.ingest(end(TwKey::Cookie(2), 2 * S, EndReason::Reused), &mut out);
        // Ended before the scan result arrived, and never seen entering.
        a.ingest(end(TwKey::Cookie(3), 2 * S, EndReason::Expired), &mut out);
        out.clear();
        a.ingest(
            Event::TwExisting {
                ts_ns: 3 * S,
                sockets: vec![existing(1, 59_000), existing(2, 59_000), existing(3, 1_000)],
                more: false,
            },
            &mut out,
        );
        assert_eq!(a.alive_count(), 1);
        assert_eq!(a.totals().preexisting, 1);
        // Cookie 3 was found by the scan and its early end applies to it at once.
        let r = only_tw(&out);
        assert_eq!(r.tw.key, TwKey::Cookie(3));
        assert_eq!(r.end, EndReason::Expired);
    }

    #[test]
    fn a_scan_that_overtakes_a_start_yields_one_traced_time_wait() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(
            Event::TwExisting {
                ts_ns: 3 * S,
                sockets: vec![existing(5, 59_000)],
                more: false,
            },
            &mut out,
        );
        a.ingest(enter(TwKey::Cookie(5), 2 * S, Substate::TimeWait), &mut out);
        assert_eq!(a.alive_count(), 1);
        let t = a.totals();
        assert_eq!((t.entered, t.preexisting, t.overdue_dropped), (1, 0, 0));
        assert!(a.alive().all(|tw| !tw.preexisting && tw.closer.is_some()));
    }

    #[test]
    fn only_client_time_waits_count_towards_a_destination() {
        let (mut a, _) = agg();
        let mut out = vec![];
        let with = |c: u64, role: Role, rport: u16| {
            let Event::TwEnter(mut e) = enter(TwKey::Cookie(c), S, Substate::TimeWait) else {
                unreachable!()
            };
            e.role = role;
            e.conn.rport = rport;
            Event::TwEnter(e)
        };
        // A server's TIME_WAITs, each towards another client port.
        for c in 1..=50u64 {
            a.ingest(with(c, Role::Server, 30_000 + c as u16), &mut out);
        }
        a.ingest(with(100, Role::Client, 8080), &mut out);
        a.ingest(with(101, Role::Unknown, 8080), &mut out);
        assert_eq!(a.by_remote.len(), 1);
        assert_eq!(a.rates.len(), 1);
        for c in [1, 100, 101] {
            a.ingest(end(TwKey::Cookie(c), 2 * S, EndReason::Expired), &mut out);
        }
        assert!(a.by_remote.is_empty());
        assert_eq!(a.alive_count(), 49);
    }

    #[test]
    fn ended_cookies_are_remembered_only_while_a_scan_may_race() {
        let (mut a, _) = agg();
        let mut out = vec![];
        for c in 1..=100u64 {
            a.ingest(enter(TwKey::Cookie(c), S, Substate::TimeWait), &mut out);
            a.ingest(end(TwKey::Cookie(c), 2 * S, EndReason::Reused), &mut out);
        }
        assert_eq!(a.recent_ends.len(), 100);
        a.ingest(
            Event::TwExisting {
                ts_ns: 3 * S,
                sockets: vec![],
                more: false,
            },
            &mut out,
        );
        assert!(a.recent_ends.is_empty());
        for c in 101..=200u64 {
            a.ingest(enter(TwKey::Cookie(c), 4 * S, Substate::TimeWait), &mut out);
            a.ingest(end(TwKey::Cookie(c), 5 * S, EndReason::Reused), &mut out);
        }
        assert!(a.recent_ends.is_empty(), "nothing to race with any more");

        // No scan at all (a replay without one): remembered for the first 30 s only.
        let (mut b, _) = agg();
        b.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        b.ingest(end(TwKey::Cookie(1), S, EndReason::Reused), &mut out);
        b.ingest(enter(TwKey::Cookie(2), S, Substate::TimeWait), &mut out);
        b.ingest(end(TwKey::Cookie(2), 40 * S, EndReason::Reused), &mut out);
        assert_eq!(b.recent_ends.len(), 1);
    }

    #[test]
    fn overdue_time_waits_are_dropped_not_kept_forever() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        clock.set(61 * S + OVERDUE_GRACE_NS - 1);
        a.tick();
        assert_eq!(a.alive_count(), 1);
        clock.set(61 * S + OVERDUE_GRACE_NS + 1);
        a.tick();
        assert_eq!(a.alive_count(), 0);
        assert_eq!(a.totals().overdue_dropped, 1);
    }

    #[test]
    fn closes_without_time_wait_are_counted_and_passed_on() {
        let (mut a, _) = agg();
        let mut out = vec![];
        for reason in [
            NoTwReason::Overflow,
            NoTwReason::Abort,
            NoTwReason::Overflow,
        ] {
            a.ingest(
                Event::NoTimeWait(NoTimeWait {
                    ts_ns: S,
                    cpu: 0,
                    cookie: 1,
                    conn: conn(1),
                    closer: Some(proc_(3, "srv")),
                    role: Role::Server,
                    close: CloseKind::Active,
                    reason,
                    oldstate: 5,
                }),
                &mut out,
            );
        }
        assert_eq!(out.len(), 3);
        assert_eq!(a.totals().overflow, 2);
        assert_eq!(a.totals().abort, 1);
        assert_eq!(a.alive_count(), 0);
    }
}
