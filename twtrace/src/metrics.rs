//! Prometheus text exposition (format 0.0.4) of the aggregator, for `twtrace serve`.
//!
//! Label cardinality is bounded, and counters stay monotonic:
//! - the first [`MAX_PROCESS_LABELS`] (comm, container) pairs seen keep their own labels for the
//!   life of the process; later ones are counted under comm="other", container="other";
//! - network namespaces: the first [`MAX_NETNS_LABELS`] seen, the rest under netns="other";
//! - destinations: the [`MAX_DESTINATIONS`] with the highest port pressure at each scrape;
//! - pids are never labels.
//!
//! [`MAX_SERIES`] bounds the whole exposition.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
};

use crate::{
    aggregate::{Aggregator, Clock, Record},
    event::{EndReason, PortOp, Role},
};

pub const MAX_PROCESS_LABELS: usize = 50;
pub const MAX_NETNS_LABELS: usize = 64;
pub const MAX_DESTINATIONS: usize = 20;
/// An upper bound on the number of series, from the limits above (the kernel check adds 9 per
/// namespace label).
pub const MAX_SERIES: usize = 1500 + 9 * MAX_NETNS_LABELS;

const OTHER: &str = "other";
/// Lifetime histogram buckets, seconds: around TCP_TIMEWAIT_LEN (60 s) finely.
const BUCKETS: [f64; 14] = [
    0.001, 0.01, 0.1, 1.0, 5.0, 10.0, 30.0, 59.0, 60.0, 60.5, 61.0, 62.0, 65.0, 120.0,
];

/// Assigns labels first come, first served, up to a limit; the rest share "other".
#[derive(Debug, Default)]
struct Labels<K> {
    kept: HashMap<K, ()>,
    limit: usize,
}

impl<K: std::hash::Hash + Eq + Clone> Labels<K> {
    fn new(limit: usize) -> Self {
        Self {
            kept: HashMap::new(),
            limit,
        }
    }

    /// Whether `k` has its own label (giving it one if there is room).
    fn keep(&mut self, k: &K) -> bool {
        if self.kept.contains_key(k) {
            return true;
        }
        if self.kept.len() < self.limit {
            self.kept.insert(k.clone(), ());
            return true;
        }
        false
    }
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.buckets[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// State kept between scrapes: what the aggregator does not count the way metrics need.
pub struct Exporter {
    procs: Labels<(String, String)>,
    netns: Labels<u32>,
    /// TIME_WAITs entered by (role, comm, container).
    entered: BTreeMap<(&'static str, String, String), u64>,
    failures: BTreeMap<(&'static str, i32, String, String), u64>,
    lifetime: Histogram,
    cgroup_name: Box<dyn FnMut(u64) -> Option<String> + Send>,
}

fn role(r: Role) -> &'static str {
    match r {
        Role::Client => "client",
        Role::Server => "server",
        Role::Unknown => "unknown",
    }
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Exporter {
    /// `cgroup_name` turns a cgroup id into a container or unit name.
    pub fn new(cgroup_name: Box<dyn FnMut(u64) -> Option<String> + Send>) -> Self {
        Self {
            procs: Labels::new(MAX_PROCESS_LABELS),
            netns: Labels::new(MAX_NETNS_LABELS),
            entered: BTreeMap::new(),
            failures: BTreeMap::new(),
            lifetime: Histogram::default(),
            cgroup_name,
        }
    }

    fn proc_labels(&mut self, comm: &str, cgroup_id: u64) -> (String, String) {
        let container = (self.cgroup_name)(cgroup_id).unwrap_or_default();
        let k = (comm.to_string(), container);
        if self.procs.keep(&k) {
            k
        } else {
            (OTHER.into(), OTHER.into())
        }
    }

    /// TIME_WAITs entering, seen live (the aggregator's input).
    pub fn entered(&mut self, r: Role, comm: Option<(&str, u64)>) {
        let (comm, container) = match comm {
            Some((c, cg)) => self.proc_labels(c, cg),
            None => ("?".into(), String::new()),
        };
        *self.entered.entry((role(r), comm, container)).or_default() += 1;
    }

    /// The aggregator's output.
    pub fn observe(&mut self, rec: &Record) {
        match rec {
            Record::TimeWait(t) => self.lifetime.observe(t.lifetime_ns() as f64 / 1e9),
            Record::PortFailure(f) => {
                let p = &f.failure.process;
                let (comm, container) = self.proc_labels(&p.comm, p.cgroup_id);
                let op = match f.failure.op {
                    PortOp::Connect => "connect",
                    PortOp::Bind => "bind",
                };
                *self
                    .failures
                    .entry((op, f.failure.errno, comm, container))
                    .or_default() += 1;
            }
            Record::NoTimeWait(_) => {}
        }
    }

    fn netns_label(&mut self, n: u32) -> String {
        if self.netns.keep(&n) {
            n.to_string()
        } else {
            OTHER.into()
        }
    }

    /// The exposition; `whole_namespaces` when the filters let all of each namespace's traffic
    /// through, so twtrace's counts are set against the kernel's (`twtrace_kernel_*`).
    pub fn render<C: Clock>(&mut self, agg: &Aggregator<C>, whole_namespaces: bool) -> String {
        let loss = agg.loss();
        let mut o = String::new();
        let t = agg.totals();
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };

        family(&mut o, "twtrace_build_info", "gauge", "twtrace's version.");
        let _ = writeln!(
            o,
            "twtrace_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        family(
            &mut o,
            "twtrace_time_wait_alive",
            "gauge",
            "TIME_WAIT sockets alive now, by network namespace inode.",
        );
        let mut alive: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_ns: BTreeMap<u32, u64> = BTreeMap::new();
        for tw in agg.alive() {
            *per_ns.entry(tw.conn.netns).or_default() += 1;
        }
        for (n, c) in per_ns {
            *alive.entry(self.netns_label(n)).or_default() += c;
        }
        for (n, c) in &alive {
            let _ = writeln!(o, "twtrace_time_wait_alive{{netns=\"{n}\"}} {c}");
        }

        family(
            &mut o,
            "twtrace_time_wait_entered_total",
            "counter",
            "TIME_WAIT sockets entered, by the side that opened the connection and the command (and container) that closed first.",
        );
        for ((r, comm, container), n) in &self.entered {
            let _ = writeln!(
                o,
                "twtrace_time_wait_entered_total{{role=\"{r}\",comm=\"{}\",container=\"{}\"}} {n}",
                esc(comm),
                esc(container)
            );
        }

        family(
            &mut o,
            "twtrace_time_wait_ended_total",
            "counter",
            "TIME_WAIT sockets ended, by how.",
        );
        for end in EndReason::ALL {
            let n = t.ended_by(end);
            let _ = writeln!(
                o,
                "twtrace_time_wait_ended_total{{reason=\"{}\"}} {n}",
                end.as_str()
            );
        }

        family(
            &mut o,
            "twtrace_time_wait_rescheduled_total",
            "counter",
            "TIME_WAIT timers pushed back (FIN, ACK or out-of-window segment).",
        );
        let _ = writeln!(o, "twtrace_time_wait_rescheduled_total {}", t.rescheduled);

        family(
            &mut o,
            "twtrace_time_wait_starts_recovered_total",
            "counter",
            "TIME_WAIT starts no kernel program reported, found afterwards by the sweep (included in entered).",
        );
        let _ = writeln!(
            o,
            "twtrace_time_wait_starts_recovered_total {}",
            t.recovered
        );
        family(
            &mut o,
            "twtrace_time_wait_ends_without_start",
            "gauge",
            "Ends of TIME_WAITs never seen starting, so far.",
        );
        let _ = writeln!(
            o,
            "twtrace_time_wait_ends_without_start {}",
            agg.ends_without_start()
        );
        family(
            &mut o,
            "twtrace_time_wait_end_lost_total",
            "counter",
            "TIME_WAITs whose end was never seen: given up on once their timer was long overdue (included in entered, not in ended).",
        );
        let _ = writeln!(o, "twtrace_time_wait_end_lost_total {}", t.overdue_dropped);

        family(
            &mut o,
            "twtrace_time_wait_lifetime_seconds",
            "histogram",
            "How long TIME_WAIT sockets lived.",
        );
        for (le, n) in BUCKETS.iter().zip(self.lifetime.buckets) {
            let _ = writeln!(
                o,
                "twtrace_time_wait_lifetime_seconds_bucket{{le=\"{le}\"}} {n}"
            );
        }
        let h = &self.lifetime;
        let _ = writeln!(
            o,
            "twtrace_time_wait_lifetime_seconds_bucket{{le=\"+Inf\"}} {}\ntwtrace_time_wait_lifetime_seconds_sum {}\ntwtrace_time_wait_lifetime_seconds_count {}",
            h.count, h.sum, h.count
        );

        family(
            &mut o,
            "twtrace_closes_without_time_wait_total",
            "counter",
            "Connections this host closed first that skipped TIME_WAIT: overflow (tcp_max_tw_buckets full), abort (reset by this host), peer_reset.",
        );
        for (reason, n) in [
            ("overflow", t.overflow),
            ("abort", t.abort),
            ("peer_reset", t.peer_reset),
        ] {
            let _ = writeln!(
                o,
                "twtrace_closes_without_time_wait_total{{reason=\"{reason}\"}} {n}"
            );
        }

        family(
            &mut o,
            "twtrace_port_failures_total",
            "counter",
            "connect() calls that found no local port (EADDRNOTAVAIL) and bind() calls that found theirs taken (EADDRINUSE).",
        );
        for ((op, errno, comm, container), n) in &self.failures {
            let _ = writeln!(
                o,
                "twtrace_port_failures_total{{op=\"{op}\",errno=\"{errno}\",comm=\"{}\",container=\"{}\"}} {n}",
                esc(comm),
                esc(container)
            );
        }

        let pressure = agg.pressure();
        for (name, help, kind) in [
            (
                "twtrace_port_pressure_ratio",
                "Share of the usable ephemeral ports held towards a destination (TIME_WAIT and live), for the most pressed destinations.",
                "gauge",
            ),
            (
                "twtrace_ports_held",
                "Ephemeral local ports held towards a destination.",
                "gauge",
            ),
        ] {
            family(&mut o, name, kind, help);
            for p in pressure.iter().take(MAX_DESTINATIONS) {
                let v = if name.ends_with("ratio") {
                    p.percent / 100.0
                } else {
                    f64::from(p.held)
                };
                let _ = writeln!(
                    o,
                    "{name}{{netns=\"{}\",laddr=\"{}\",raddr=\"{}\",rport=\"{}\"}} {v}",
                    p.dest.netns, p.dest.laddr, p.dest.raddr, p.dest.rport
                );
            }
        }

        family(
            &mut o,
            "twtrace_lost_events_total",
            "counter",
            "Events the kernel side could not deliver, by cause.",
        );
        for (cause, n) in [
            ("ringbuf_full", loss.ringbuf_full),
            ("read_fail", loss.read_fail),
            ("conn_map_fail", loss.conn_map_fail),
        ] {
            let _ = writeln!(o, "twtrace_lost_events_total{{cause=\"{cause}\"}} {n}");
        }
        family(
            &mut o,
            "twtrace_recursion_misses_total",
            "counter",
            "Program runs the kernel skipped because an interrupt nested inside the same program.",
        );
        for (program, n) in &loss.recursion_misses_by_program {
            let _ = writeln!(
                o,
                "twtrace_recursion_misses_total{{program=\"{program}\"}} {n}"
            );
        }

        let mut settings: Vec<(u32, crate::event::NetnsSettings)> = agg
            .settings()
            .iter()
            .map(|(n, s)| (*n, s.clone()))
            .collect();
        settings.sort_by_key(|(n, _)| *n);
        let settings: Vec<(String, crate::event::NetnsSettings)> = settings
            .into_iter()
            .filter_map(|(n, s)| self.netns.keep(&n).then(|| (n.to_string(), s)))
            .collect();
        type Get = fn(&crate::event::NetnsSettings) -> f64;
        let gauges: [(&str, &str, Get); 7] = [
            ("twtrace_tcp_tw_reuse", "net.ipv4.tcp_tw_reuse.", |s| {
                s.tcp_tw_reuse as f64
            }),
            (
                "twtrace_tcp_tw_reuse_delay_seconds",
                "net.ipv4.tcp_tw_reuse_delay.",
                |s| s.tcp_tw_reuse_delay_ms.unwrap_or(1000) as f64 / 1000.0,
            ),
            (
                "twtrace_tcp_max_tw_buckets",
                "net.ipv4.tcp_max_tw_buckets.",
                |s| s.tcp_max_tw_buckets as f64,
            ),
            (
                "twtrace_tcp_fin_timeout_seconds",
                "net.ipv4.tcp_fin_timeout.",
                |s| s.tcp_fin_timeout as f64,
            ),
            ("twtrace_tcp_timestamps", "net.ipv4.tcp_timestamps.", |s| {
                s.tcp_timestamps as f64
            }),
            ("twtrace_tcp_rfc1337", "net.ipv4.tcp_rfc1337.", |s| {
                s.tcp_rfc1337 as f64
            }),
            (
                "twtrace_ephemeral_ports_usable",
                "ip_local_port_range less ip_local_reserved_ports.",
                |s| f64::from(s.usable_ports()),
            ),
        ];
        for (name, help, get) in gauges {
            family(&mut o, name, "gauge", help);
            for (n, s) in &settings {
                let _ = writeln!(o, "{name}{{netns=\"{n}\"}} {}", get(s));
            }
        }
        if whole_namespaces {
            self.kernel_checks(&mut o, agg);
        }
        o
    }

    /// Each namespace's kernel counters against twtrace's counts, changes since twtrace
    /// first read them: `twtrace_kernel_tcpext_change` and the count twtrace has for it.
    fn kernel_checks<C: Clock>(&mut self, o: &mut String, agg: &Aggregator<C>) {
        let checks: Vec<_> = agg
            .kernel_checks()
            .into_iter()
            // Namespaces alive now: a gone one's inode may be another's already (one series).
            .filter(|c| !c.gone && self.netns.keep(&c.netns))
            .collect();
        let rows = |o: &mut String, name: &str, pick: fn(&crate::reconcile::Check) -> u64| {
            for c in &checks {
                for x in &c.checks {
                    let _ = writeln!(
                        o,
                        "{name}{{netns=\"{}\",counter=\"{}\"}} {}",
                        c.netns,
                        x.counter,
                        pick(x)
                    );
                }
            }
        };
        let _ = writeln!(
            o,
            "# HELP twtrace_kernel_tcpext_change The namespace's own TcpExt counter (TW+TWKilled, TWRecycled, TCPTimeWaitOverflow), change since twtrace first read it.\n# TYPE twtrace_kernel_tcpext_change gauge"
        );
        rows(o, "twtrace_kernel_tcpext_change", |x| x.kernel);
        let _ = writeln!(
            o,
            "# HELP twtrace_kernel_tcpext_twtrace What twtrace counted over the same span for the same counter (TIME_WAITs entered, or expired where the kernel counts at expiry; reused; overflows).\n# TYPE twtrace_kernel_tcpext_twtrace gauge"
        );
        rows(o, "twtrace_kernel_tcpext_twtrace", |x| x.twtrace);
        let _ = writeln!(
            o,
            "# HELP twtrace_kernel_check_agrees 1 when twtrace's count equals the kernel's counter over the same span.\n# TYPE twtrace_kernel_check_agrees gauge"
        );
        rows(o, "twtrace_kernel_check_agrees", |x| u64::from(x.agrees));
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        aggregate::{
            ReplayClock,
            tests::{end, enter, tcp_ext},
        },
        event::{Event, NetnsSettings, Substate, TwKey},
    };

    #[test]
    fn kernel_counters_are_set_against_twtraces_counts_only_for_whole_namespaces() {
        let mut agg = Aggregator::new(ReplayClock::default(), 250);
        let mut x = Exporter::new(Box::new(|_| None));
        let mut out = vec![];
        agg.ingest(tcp_ext(1, 0, 100), &mut out);
        for i in 0..2u64 {
            agg.ingest(enter(TwKey::Cookie(i + 1), i, Substate::TimeWait), &mut out);
        }
        agg.ingest(tcp_ext(1, 5, 103), &mut out);
        let text = x.render(&agg, true);
        assert!(
            text.contains("twtrace_kernel_tcpext_change{netns=\"1\",counter=\"TW+TWKilled\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("twtrace_kernel_tcpext_twtrace{netns=\"1\",counter=\"TW+TWKilled\"} 2")
        );
        assert!(
            text.contains("twtrace_kernel_check_agrees{netns=\"1\",counter=\"TW+TWKilled\"} 0")
        );
        assert!(text.contains("twtrace_kernel_check_agrees{netns=\"1\",counter=\"TWRecycled\"} 1"));
        assert!(!x.render(&agg, false).contains("twtrace_kernel_"));
    }

    fn series(text: &str) -> usize {
        text.lines().filter(|l| !l.starts_with('#')).count()
    }

    #[test]
    fn exposes_counts_and_a_consistent_histogram() {
        let clock = ReplayClock::default();
        let mut agg = Aggregator::new(clock.clone(), 250);
        let mut x = Exporter::new(Box::new(|_| Some("web.service".into())));
        let mut out = vec![];
        for i in 0..3u64 {
            agg.ingest(enter(TwKey::Cookie(i + 1), i, Substate::TimeWait), &mut out);
            x.entered(Role::Client, Some(("client", 5)));
        }
        agg.ingest(
            end(TwKey::Cookie(1), 60_200_000_000, EndReason::Expired),
            &mut out,
        );
        for r in &out {
            x.observe(r);
        }
        let text = x.render(&agg, true);
        assert!(text.contains(
            "twtrace_time_wait_entered_total{role=\"client\",comm=\"client\",container=\"web.service\"} 3"
        ));
        assert!(text.contains("twtrace_time_wait_ended_total{reason=\"expired\"} 1"));
        assert!(text.contains("twtrace_time_wait_alive{netns=\"1\"} 2"));
        assert!(text.contains("twtrace_time_wait_lifetime_seconds_bucket{le=\"60\"} 0"));
        assert!(text.contains("twtrace_time_wait_lifetime_seconds_bucket{le=\"60.5\"} 1"));
        assert!(text.contains("twtrace_time_wait_lifetime_seconds_count 1"));
    }

    #[test]
    fn cardinality_stays_bounded_and_counters_monotonic() {
        let clock = ReplayClock::default();
        let mut agg = Aggregator::new(clock, 250);
        let mut x = Exporter::new(Box::new(|id| Some(format!("c{id}"))));
        let mut out = vec![];
        for i in 0..2000u64 {
            let comm = format!("p{i}");
            x.entered(Role::Client, Some((&comm, i)));
            let mut e = enter(TwKey::Cookie(i + 1), i, Substate::TimeWait);
            if let Event::TwEnter(t) = &mut e {
                t.conn.netns = i as u32;
                t.conn.rport = (i % 500) as u16;
                t.conn.raddr = IpAddr::from([10, 0, (i / 256) as u8, i as u8]);
            }
            agg.ingest(e, &mut out);
            agg.ingest(
                Event::Settings {
                    ts_ns: i,
                    netns: i as u32,
                    settings: NetnsSettings {
                        port_range: (1, 65535),
                        ..NetnsSettings::default()
                    },
                },
                &mut out,
            );
            for _ in 0..2 {
                agg.ingest(tcp_ext(i as u32, i, 1), &mut out);
            }
        }
        let text = x.render(&agg, true);
        assert!(series(&text) <= MAX_SERIES, "{} series", series(&text));
        let other =
            "twtrace_time_wait_entered_total{role=\"client\",comm=\"other\",container=\"other\"}";
        let line = text.lines().find(|l| l.starts_with(other)).unwrap();
        assert!(
            line.ends_with(&format!(" {}", 2000 - MAX_PROCESS_LABELS)),
            "{line}"
        );
        assert!(!text.contains("pid"));
        // A comm seen first keeps its label later; a latecomer stays in "other".
        x.entered(Role::Client, Some(("p0", 0)));
        x.entered(Role::Client, Some(("p1999", 1999)));
        let again = x.render(&agg, true);
        assert!(again.contains("comm=\"p0\",container=\"c0\"} 2"));
        let line = again.lines().find(|l| l.starts_with(other)).unwrap();
        assert!(
            line.ends_with(&format!(" {}", 2001 - MAX_PROCESS_LABELS)),
            "{line}"
        );
        assert!(
            again
                .lines()
                .filter(|l| l.starts_with("twtrace_time_wait_alive"))
                .count()
                <= MAX_NETNS_LABELS + 1
        );
    }
}
