//! The aggregator: the one place where events become TIME_WAIT lifetimes and totals. Every view
//! (trace lines, JSON, and later the live view, recordings and reports) reads from it.
//!
//! It is pure Rust and clock-injected: it never reads a clock itself, so tests drive time.

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    FastMap,
    alive::AliveSet,
    reconcile::{
        self, Counted, Counting, KernelCounts, NetnsCheck, NetnsReadings, OurCounts, OurSpan,
        Recent,
    },
    stats::{ProcKey, Stats},
};

use crate::event::{
    CloseKind, Dest, EndReason, Endpoints, Event, NetnsSettings, NoTimeWait, NoTwReason,
    PortFailure, PortOp, Process, Recovered, Role, SeenTw, Substate, TwEnd, TwEnter, TwExisting,
    TwKey,
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

impl AliveTw {
    /// How a rotated file restates it at its top, as of `now_ns`: as the start-up scan
    /// would (which older readers understand), with what the recording knew of it besides.
    pub fn restate(&self, now_ns: u64) -> TwExisting {
        let left = self
            .armed_ns
            .saturating_add(self.timeout_ns)
            .saturating_sub(now_ns)
            / 1_000_000;
        TwExisting {
            conn: self.conn,
            cookie: match self.key {
                TwKey::Cookie(c) => c,
                TwKey::Addr(_) => 0,
            },
            substate: self.substate,
            remaining_ms: left.min(u64::from(u32::MAX)) as u32,
            seen: Some(SeenTw {
                key: self.key,
                closer: self.closer.clone(),
                role: self.role,
                close: self.close,
                entered_ns: self.entered_ns,
                armed_ns: self.armed_ns,
                timeout_ns: self.timeout_ns,
                rescheduled: self.rescheduled,
                preexisting: self.preexisting,
                recovered: self.recovered,
            }),
        }
    }
}

/// A finished TIME_WAIT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TimeWaitRecord {
    #[serde(flatten)]
    pub tw: AliveTw,
    pub ended_ns: u64,
    pub end: EndReason,
    pub reused_by: Option<Process>,
    /// No kernel program reported its end: the end check found it gone once due.
    pub end_recovered: bool,
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
    /// growing, or when connect() may reuse the TIME_WAITs (then they never run it out).
    pub exhaustion_s: Option<f64>,
    /// connect() may reuse these TIME_WAITs (tcp_tw_reuse applies towards it).
    pub reusable: bool,
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

/// Running totals since the start (or since [`Aggregator::restart_counts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
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
    /// Of `peer_reset`: resets from a peer on this host, whose own close is counted too.
    pub peer_reset_local: u64,
    /// Of `ended`: ends no kernel program reported, found by the end check once the timer
    /// was due (the TIME_WAIT was gone).
    pub ends_recovered: u64,
    /// TIME_WAITs given up on: their timer should have ended them long ago, and no end check
    /// found them gone (offline, or the lookups failed).
    pub overdue_dropped: u64,
    /// TIME_WAITs alive when a rotated file began, restated from the files before it (not
    /// counted in `entered`: they entered there).
    pub carried: u64,
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
    /// Passive closes and loss at [`Aggregator::restart_counts`]: snapshots carry them
    /// cumulative, so counts since then subtract these.
    base_passive: HashMap<u32, u64>,
    base_loss: crate::kernel::tracer::Loss,
    cgroup_paths: HashMap<u64, String>,
    /// TIME_WAITs handed to the end check, and when they may be asked about again.
    end_checks: FastMap<TwKey, u64>,
    /// Each namespace's kernel counters with twtrace's counts beside them, and when the
    /// kernel counts TIME_WAITs once a reading told (see [`crate::reconcile`]).
    readings: FastMap<u32, NetnsReadings>,
    recent: FastMap<u32, Recent>,
    counting: Option<Counting>,
    /// Each namespace's cookie by inode, and the inodes of namespaces gone: what is known
    /// under an inode is forgotten when another namespace turns up under it.
    netns_cookies: FastMap<u32, Option<u64>>,
    netns_gone: std::collections::HashSet<u32>,
    /// The kernel checks of namespaces gone, as they stood when they went (the last 64).
    gone_checks: std::collections::VecDeque<NetnsCheck>,
}

/// Namespaces gone whose kernel check is kept.
const MAX_GONE_CHECKS: usize = 64;

/// A TIME_WAIT whose timer was due a while ago and whose end no event reported: the live
/// source looks it up in the kernel (see `kernel::end_check`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndCheck {
    pub key: TwKey,
    pub conn: Endpoints,
    pub substate: Substate,
    /// When its timer was due (CLOCK_MONOTONIC ns).
    pub due_ns: u64,
}

/// How late after its due time a TIME_WAIT is looked up. The timer wheel rounds a timeout up
/// to its level's granularity, at most an eighth of it (7.5 s for 60 s), and softirqs run late
/// under load: a second more.
pub fn end_check_slack_ns(timeout_ns: u64) -> u64 {
    timeout_ns / 8 + 1_000_000_000
}

/// A TIME_WAIT still there when looked up (or a lookup that failed) is asked about again no
/// sooner than this.
const END_CHECK_AGAIN_NS: u64 = 5_000_000_000;

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
            base_passive: HashMap::new(),
            base_loss: Default::default(),
            cgroup_paths: HashMap::new(),
            end_checks: FastMap::default(),
            readings: FastMap::default(),
            recent: FastMap::default(),
            counting: None,
            netns_cookies: FastMap::default(),
            netns_gone: Default::default(),
            gone_checks: Default::default(),
        }
    }

    /// Starts every count again from zero, keeping what is alive and known (TIME_WAITs,
    /// settings, live connections, cgroups): a report's window counts from its start, yet
    /// knows the TIME_WAITs that began before it.
    pub fn restart_counts(&mut self) {
        self.totals = Totals::default();
        self.by_netns = FastMap::default();
        self.stats = Stats::default();
        self.failures = Failures::default();
        self.aborts_by_comm = FastMap::default();
        self.server_tw_by_comm = FastMap::default();
        self.base_passive = self.passive_closes.clone();
        self.base_loss = self.loss.clone();
        // The kernel check spans the counts: from the window's first reading on.
        self.readings = FastMap::default();
        self.recent = FastMap::default();
        self.gone_checks.clear();
    }

    /// Forgets every alive TIME_WAIT without counting an end: at a gap in a recording (a
    /// missing file), whose ends are unknown. Returns how many.
    pub fn forget_alive(&mut self) -> usize {
        let gone = self.alive.extract_if(|_| true);
        for tw in &gone {
            self.track(tw, tw.armed_ns, false);
        }
        gone.len()
    }

    /// Passive closes per namespace since twtrace attached, as the latest snapshot said.
    pub fn passive_closes_total(&self) -> &HashMap<u32, u64> {
        &self.passive_closes
    }

    /// What the kernel side lost since twtrace attached, as of the latest snapshot.
    pub fn loss_total(&self) -> &crate::kernel::tracer::Loss {
        &self.loss
    }

    /// Paths of cgroups, as recorded (see [`Event::Cgroup`]).
    pub fn cgroup_path(&self, id: u64) -> Option<&str> {
        self.cgroup_paths.get(&id).map(String::as_str)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// twtrace's counts against the kernel's, per namespace with a reading: those alive, then
    /// those gone (as they stood when they went).
    pub fn kernel_checks(&self) -> Vec<NetnsCheck> {
        let mut v: Vec<NetnsCheck> = self
            .readings
            .iter()
            .filter_map(|(ns, r)| reconcile::check(*ns, r, self.counting))
            .collect();
        v.sort_by_key(|c| c.netns);
        v.extend(self.gone_checks.iter().map(|c| NetnsCheck {
            gone: true,
            ..c.clone()
        }));
        v
    }

    /// Notes a counted event for the kernel check of its namespace.
    fn counted(&mut self, netns: u32, ts_ns: u64, what: Counted) {
        self.recent.entry(netns).or_default().push(ts_ns, what);
    }

    /// What is known of the namespace under inode `netns`, for another namespace to start
    /// afresh under it; TIME_WAITs alive there are the kernel's to end (a purge).
    fn forget_netns(&mut self, netns: u32) {
        self.settings.remove(&netns);
        self.readings.remove(&netns);
        self.kernel_counters.remove(&netns);
        self.live.remove(&netns);
        self.passive_closes.remove(&netns);
        self.by_netns.remove(&netns);
        self.recent.remove(&netns);
    }

    pub fn kernel_counters(&self) -> &HashMap<u32, std::collections::BTreeMap<String, u64>> {
        &self.kernel_counters
    }

    /// Connections this host closed: actively (TIME_WAITs entered and closes that skipped
    /// TIME_WAIT) and passively (LAST_ACK->CLOSE, counted by the kernel programs only where
    /// the peer is not on this host). A connection with both ends here counts once: by the
    /// end that closed first, or that sent the reset.
    pub fn connections_closed(&self) -> u64 {
        // Saturating: a hostile recording's snapshots may say anything.
        [
            self.totals.entered,
            self.totals.overflow,
            self.totals.abort,
            self.totals
                .peer_reset
                .saturating_sub(self.totals.peer_reset_local),
            self.passive_closed(),
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add)
    }

    /// Passive closes (LAST_ACK->CLOSE) since the counts started.
    pub fn passive_closed(&self) -> u64 {
        self.passive_closes
            .iter()
            .map(|(ns, &n)| n.saturating_sub(self.base_passive.get(ns).copied().unwrap_or(0)))
            .fold(0, u64::saturating_add)
    }

    /// What the kernel side lost since the counts started, as of the latest snapshot.
    pub fn loss(&self) -> crate::kernel::tracer::Loss {
        self.loss.since(&self.base_loss)
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
                let s = self.settings.get(&dest.netns)?;
                let usable = s.usable_ports();
                let reusable = s.reuse_applies(dest.raddr);
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
                    exhaustion_s: (growth > 0.0 && !reusable)
                        .then(|| f64::from(usable.saturating_sub(held)) / growth),
                    reusable,
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
        self.track_held(tw, entered);
        self.rates
            .entry(Dest::of(&tw.conn))
            .or_default()
            .add(ts_ns, entered);
    }

    /// Counts a TIME_WAIT towards what holds its destination's ports, not towards the rate
    /// of TIME_WAITs entering: one found at start is not new.
    fn track_held(&mut self, tw: &AliveTw, entered: bool) {
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
                    self.end_checks.remove(&key);
                }
            }
            Event::TwEnd(e) => self.end(e, out),
            Event::NoTimeWait(n) => {
                self.totals.count_no_tw(n.reason);
                if n.reason == NoTwReason::PeerReset && n.conn.peer_is_local() {
                    self.totals.peer_reset_local += 1;
                }
                self.by_netns
                    .entry(n.conn.netns)
                    .or_default()
                    .0
                    .count_no_tw(n.reason);
                if n.reason == NoTwReason::Overflow {
                    self.counted(n.conn.netns, n.ts_ns, Counted::Overflow);
                }
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
                netns,
                counters,
                ts_ns,
                until_ns,
            } => {
                if let Some(k) = KernelCounts::from_tcp_ext(&counters) {
                    let ns = self.by_netns.get(&netns).map(|n| &n.0);
                    let now = ns.map_or_else(OurCounts::default, |t| OurCounts {
                        entered: t.entered,
                        expired: t.expired,
                        reused: t.reused,
                        overflow: t.overflow,
                    });
                    let as_of = |t: u64| match self.recent.get(&netns) {
                        Some(r) => r.as_of(now, t),
                        None => now,
                    };
                    let ours = OurSpan {
                        lo: as_of(ts_ns),
                        hi: as_of(until_ns.unwrap_or(ts_ns).max(ts_ns)),
                    };
                    let r = self.readings.entry(netns).or_default();
                    r.push(k, ours);
                    self.counting = self.counting.or_else(|| r.counting());
                }
                self.kernel_counters.insert(netns, counters);
            }
            Event::Netns { netns, cookie, .. } => {
                let known = self.netns_cookies.insert(netns, cookie);
                let changed = matches!((known, cookie), (Some(Some(a)), Some(b)) if a != b);
                if self.netns_gone.remove(&netns) || changed {
                    self.forget_netns(netns);
                }
            }
            Event::NetnsGone { netns, .. } => {
                if let Some(c) = self
                    .readings
                    .get(&netns)
                    .and_then(|r| reconcile::check(netns, r, self.counting))
                {
                    if self.gone_checks.len() == MAX_GONE_CHECKS {
                        self.gone_checks.pop_front();
                    }
                    self.gone_checks.push_back(c);
                }
                // Its settings and counts stay its own until another namespace takes the inode.
                self.readings.remove(&netns);
                self.netns_gone.insert(netns);
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
        self.counted(tw.conn.netns, e.ts_ns, Counted::Entered);
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
        self.end_checks.remove(&key);
        match e.end {
            EndReason::Expired => self.counted(tw.conn.netns, e.ts_ns, Counted::Expired),
            EndReason::Reused => self.counted(tw.conn.netns, e.ts_ns, Counted::Reused),
            _ => {}
        }
        self.totals.count_end(e.end);
        let ns = &mut self.by_netns.entry(tw.conn.netns).or_default().0;
        ns.count_end(e.end);
        if e.recovered {
            ns.ends_recovered += 1;
            self.totals.ends_recovered += 1;
        }
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
            end_recovered: e.recovered,
        }));
    }

    fn existing(&mut self, ts_ns: u64, s: TwExisting, out: &mut Vec<Record>) {
        if let Some(seen) = s.seen {
            return self.carried(s.conn, s.substate, seen, out);
        }
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
        self.track_held(&tw, true);
        self.alive.insert(tw);
        if let Some((end, _)) = self.early_ends.remove(&key) {
            self.end(end, out);
        }
    }

    /// TIME_WAITs whose timer was due [`end_check_slack_ns`] ago with no end seen, at most
    /// `max`, for the live source to look up; each is asked about again at most every
    /// [`END_CHECK_AGAIN_NS`] until its end comes or it is given up on (see [`Self::tick`]).
    pub fn ends_due(&mut self, max: usize) -> Vec<EndCheck> {
        let now = self.clock.now_ns();
        let mut out = Vec::new();
        for tw in self.alive.iter() {
            let due_ns = tw.armed_ns.saturating_add(tw.timeout_ns);
            if now < due_ns.saturating_add(end_check_slack_ns(tw.timeout_ns))
                || self.end_checks.get(&tw.key).is_some_and(|&next| now < next)
            {
                continue;
            }
            self.end_checks.insert(tw.key, now + END_CHECK_AGAIN_NS);
            out.push(EndCheck {
                key: tw.key,
                conn: tw.conn,
                substate: tw.substate,
                due_ns,
            });
            if out.len() >= max {
                break;
            }
        }
        out
    }

    /// A TIME_WAIT a rotated file restates: known already when the file before it was read,
    /// else alive since before this file began, with all the recording knew of it.
    fn carried(&mut self, conn: Endpoints, substate: Substate, s: SeenTw, out: &mut Vec<Record>) {
        if self.alive.contains_key(&s.key) {
            return;
        }
        let tw = AliveTw {
            key: s.key,
            conn,
            closer: s.closer,
            role: s.role,
            close: s.close,
            substate,
            entered_ns: s.entered_ns,
            armed_ns: s.armed_ns,
            timeout_ns: s.timeout_ns,
            rescheduled: s.rescheduled,
            preexisting: s.preexisting,
            recovered: s.recovered,
        };
        self.totals.carried += 1;
        // It holds its port; it is not entering now.
        self.track_held(&tw, true);
        let key = tw.key;
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
        let overdue = self.alive.extract_if(|tw| {
            now >= tw
                .armed_ns
                .saturating_add(tw.timeout_ns)
                .saturating_add(OVERDUE_GRACE_NS)
        });
        for tw in overdue {
            self.track(&tw, now, false);
            self.end_checks.remove(&tw.key);
            self.totals.overdue_dropped += 1;
            self.by_netns
                .entry(tw.conn.netns)
                .or_default()
                .0
                .overdue_dropped += 1;
        }
        for r in self.recent.values_mut() {
            r.trim(now);
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

    /// A loopback connection of netns 1 from `lport` to port 8080.
    pub fn conn(lport: u16) -> Endpoints {
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
            recovered: false,
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
            seen: None,
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
    fn a_time_wait_whose_end_never_came_is_checked_once_due_and_ended_as_recovered() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        let due = 61 * S;
        let slack = end_check_slack_ns(TIMEWAIT_LEN_NS);
        clock.set(due + slack - 1);
        assert_eq!(a.ends_due(10), vec![]);
        clock.set(due + slack);
        let checks = a.ends_due(10);
        assert_eq!(
            checks,
            vec![EndCheck {
                key: TwKey::Cookie(1),
                conn: conn(40000),
                substate: Substate::TimeWait,
                due_ns: due,
            }]
        );
        // Asked for once: not again until the check had time to answer.
        assert_eq!(a.ends_due(10), vec![]);
        clock.set(due + slack + END_CHECK_AGAIN_NS);
        assert_eq!(a.ends_due(10).len(), 1);
        let mut e = match end(TwKey::Cookie(1), due, EndReason::Expired) {
            Event::TwEnd(e) => e,
            _ => unreachable!(),
        };
        e.recovered = true;
        a.ingest(Event::TwEnd(e), &mut out);
        let r = only_tw(&out);
        assert!(r.end_recovered);
        assert_eq!(r.lifetime_ns(), 60 * S);
        let t = a.totals();
        assert_eq!(
            (t.ended, t.expired, t.ends_recovered, a.alive_count()),
            (1, 1, 1, 0)
        );
        assert_eq!(a.netns_totals(1).0.ends_recovered, 1);
        clock.set(due + 10 * OVERDUE_GRACE_NS);
        a.tick();
        assert_eq!(a.totals().overdue_dropped, 0);
        assert!(a.end_checks.is_empty());
    }

    #[test]
    fn a_time_wait_found_still_there_is_checked_again_after_its_new_timeout() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        let first = 61 * S + end_check_slack_ns(TIMEWAIT_LEN_NS);
        clock.set(first);
        assert_eq!(a.ends_due(10).len(), 1);
        // The check found it with 2 s left (500 jiffies at HZ=250).
        a.ingest(
            Event::TwResched(TwResched {
                ts_ns: first,
                cpu: 0,
                key: TwKey::Cookie(1),
                substate: Substate::TimeWait,
                timeout_jiffies: 500,
                addr: None,
            }),
            &mut out,
        );
        let again = first + 2 * S + end_check_slack_ns(2 * S);
        clock.set(again - 1);
        assert_eq!(a.ends_due(10), vec![]);
        clock.set(again);
        assert_eq!(a.ends_due(10)[0].due_ns, first + 2 * S);
        // Past the grace of its new timer, with no answer: given up on, and counted.
        clock.set(first + 2 * S + OVERDUE_GRACE_NS);
        a.tick();
        assert_eq!((a.alive_count(), a.totals().overdue_dropped), (0, 1));
        assert_eq!(a.netns_totals(1).0.overdue_dropped, 1);
    }

    #[test]
    fn ends_due_hands_out_at_most_the_limit_and_the_rest_later() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        for k in 1..=5 {
            a.ingest(enter(TwKey::Cookie(k), S, Substate::TimeWait), &mut out);
        }
        clock.set(61 * S + end_check_slack_ns(TIMEWAIT_LEN_NS));
        let mut asked: Vec<TwKey> = a.ends_due(3).into_iter().map(|c| c.key).collect();
        assert_eq!(asked.len(), 3);
        asked.extend(a.ends_due(3).into_iter().map(|c| c.key));
        asked.sort();
        assert_eq!(asked, (1..=5).map(TwKey::Cookie).collect::<Vec<_>>());
    }

    fn netns_seen(netns: u32, cookie: Option<u64>) -> Event {
        Event::Netns {
            ts_ns: 0,
            netns,
            cookie,
        }
    }

    fn settings_reuse(netns: u32, tcp_tw_reuse: i64) -> Event {
        Event::Settings {
            ts_ns: 0,
            netns,
            settings: NetnsSettings {
                tcp_tw_reuse,
                ..NetnsSettings::default()
            },
        }
    }

    /// A reading of a namespace's TcpExt counters, all but TcpExtTW at 0.
    pub fn tcp_ext(netns: u32, ts_ns: u64, tw: u64) -> Event {
        Event::KernelCounters {
            ts_ns,
            netns,
            counters: [
                ("TW", tw),
                ("TWKilled", 0),
                ("TWRecycled", 0),
                ("TCPTimeWaitOverflow", 0),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            until_ns: None,
        }
    }

    #[test]
    fn a_namespace_under_a_reused_inode_does_not_inherit_the_old_ones_settings() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(netns_seen(1, Some(10)), &mut out);
        a.ingest(settings_reuse(1, 2), &mut out);
        // The same namespace read again: kept.
        a.ingest(netns_seen(1, Some(10)), &mut out);
        assert_eq!(a.settings()[&1].tcp_tw_reuse, 2);
        // Another cookie under the inode: another namespace.
        a.ingest(netns_seen(1, Some(11)), &mut out);
        assert!(!a.settings().contains_key(&1));
        // Where the kernel has no cookies (before 5.14): gone, then seen again.
        a.ingest(settings_reuse(1, 2), &mut out);
        a.ingest(Event::NetnsGone { ts_ns: 0, netns: 1 }, &mut out);
        // A namespace gone keeps its own settings for the views.
        assert_eq!(a.settings()[&1].tcp_tw_reuse, 2);
        a.ingest(netns_seen(1, None), &mut out);
        assert!(!a.settings().contains_key(&1));
    }

    #[test]
    fn a_namespace_gone_keeps_its_kernel_check_as_it_stood() {
        let (mut a, _) = agg();
        let mut out = vec![];
        a.ingest(tcp_ext(1, 0, 5), &mut out);
        a.ingest(enter(TwKey::Cookie(1), S, Substate::TimeWait), &mut out);
        a.ingest(tcp_ext(1, 2 * S, 6), &mut out);
        a.ingest(Event::NetnsGone { ts_ns: 0, netns: 1 }, &mut out);
        let checks = a.kernel_checks();
        assert_eq!(checks.len(), 1);
        assert!(checks[0].gone && checks[0].agrees(), "{checks:?}");
        // A reading read before a start that is already in does not count it.
        let (mut b, _) = agg();
        b.ingest(tcp_ext(2, 0, 5), &mut out);
        let mut late = enter(TwKey::Cookie(9), 3 * S, Substate::TimeWait);
        if let Event::TwEnter(t) = &mut late {
            t.conn.netns = 2;
        }
        b.ingest(late, &mut out);
        b.ingest(tcp_ext(2, 2 * S, 5), &mut out);
        assert!(b.kernel_checks()[0].agrees(), "{:?}", b.kernel_checks());
        assert_eq!(
            (checks[0].checks[0].kernel, checks[0].checks[0].twtrace),
            (1, 1)
        );
        // A new namespace under the inode starts its own check.
        a.ingest(netns_seen(1, None), &mut out);
        a.ingest(tcp_ext(1, 3 * S, 100), &mut out);
        let checks = a.kernel_checks();
        assert_eq!(checks.len(), 2);
        assert!(!checks[0].gone && checks[0].checks[0].kernel == 0);
    }

    #[test]
    fn pressure_counts_time_waits_found_at_start_as_held_not_as_entering() {
        let (mut a, clock) = agg();
        let mut out = vec![];
        let mut s = NetnsSettings {
            port_range: (40000, 40099),
            tcp_timestamps: 1,
            ..NetnsSettings::default()
        };
        a.ingest(
            Event::Settings {
                ts_ns: 0,
                netns: 1,
                settings: s.clone(),
            },
            &mut out,
        );
        clock.set(10 * S);
        a.ingest(
            Event::TwExisting {
                ts_ns: 10 * S,
                sockets: (0..5)
                    .map(|i| TwExisting {
                        conn: conn(40050 + i as u16),
                        ..existing(100 + i, 30_000)
                    })
                    .collect(),
                more: false,
            },
            &mut out,
        );
        let p = &a.pressure()[0];
        assert_eq!(
            (p.time_wait, p.entered_per_s, p.exhaustion_s),
            (5, 0.0, None)
        );
        // Two new ones within the window: 0.2/s, and the other 93 ports run out at that rate.
        for k in 1..=2 {
            a.ingest(
                enter(TwKey::Cookie(k), 10 * S, Substate::TimeWait),
                &mut out,
            );
        }
        let p = &a.pressure()[0];
        assert_eq!((p.time_wait, p.entered_per_s), (7, 0.2));
        assert_eq!(p.exhaustion_s, Some(93.0 / 0.2));
        // Where connect() may reuse them, TIME_WAITs never run the ports out.
        s.tcp_tw_reuse = 1;
        a.ingest(
            Event::Settings {
                ts_ns: 10 * S,
                netns: 1,
                settings: s,
            },
            &mut out,
        );
        let p = &a.pressure()[0];
        assert!(p.reusable);
        assert_eq!(p.exhaustion_s, None);
    }

    #[test]
    fn a_connection_with_both_ends_here_is_closed_once() {
        let (mut a, _) = agg();
        let mut out = vec![];
        let no_tw = |reason, raddr: [u8; 4]| {
            let mut c = conn(40000);
            c.raddr = IpAddr::from(raddr);
            Event::NoTimeWait(NoTimeWait {
                ts_ns: S,
                cpu: 0,
                cookie: 1,
                conn: c,
                closer: None,
                role: Role::Client,
                close: CloseKind::Unknown,
                reason,
                oldstate: 1,
            })
        };
        // SO_LINGER 0 on loopback: the abort, and the reset its peer gets, here too.
        a.ingest(no_tw(NoTwReason::Abort, [127, 0, 0, 1]), &mut out);
        a.ingest(no_tw(NoTwReason::PeerReset, [127, 0, 0, 1]), &mut out);
        assert_eq!(a.connections_closed(), 1);
        // A reset from another host: a connection of its own.
        a.ingest(no_tw(NoTwReason::PeerReset, [10, 0, 0, 9]), &mut out);
        assert_eq!(a.connections_closed(), 2);
        assert_eq!(a.totals().peer_reset, 2);
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
