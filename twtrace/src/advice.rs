//! Advice computed from what was measured. Every item cites its numbers; a rule with no
//! evidence says nothing.

use crate::text::{count, count_as};
use std::{collections::HashMap, net::IpAddr};

use serde::Serialize;

use crate::{
    aggregate::{Aggregator, Clock, Failures, PortFailureRecord, Pressure, Totals},
    event::{NetnsSettings, PortOp},
    output::endpoint,
};

/// Port pressure from which a destination is worth a word.
pub const PRESSURE_WARN_PCT: f64 = 50.0;
/// Server-side TIME_WAITs worth a word: at least this many, and this share of all.
const SERVER_TW_MIN: u64 = 100;
const SERVER_TW_SHARE: f64 = 0.5;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Advice {
    /// Stable name of the rule.
    pub rule: &'static str,
    pub netns: Option<u32>,
    /// What it is about (a destination, a port, a command).
    pub subject: String,
    pub text: String,
}

/// What the rules look at, borrowed from the aggregator.
pub struct Evidence<'a> {
    pub totals: &'a Totals,
    pub settings: &'a HashMap<u32, NetnsSettings>,
    pub pressure: &'a [Pressure],
    pub failures: &'a Failures,
    pub aborts_by_comm: &'a crate::FastMap<std::sync::Arc<str>, u64>,
    pub server_tw_by_comm: &'a crate::FastMap<std::sync::Arc<str>, u64>,
}

impl<'a> Evidence<'a> {
    pub fn of<C: Clock>(agg: &'a Aggregator<C>, pressure: &'a [Pressure]) -> Self {
        Self {
            totals: agg.totals(),
            settings: agg.settings(),
            pressure,
            failures: agg.failures(),
            aborts_by_comm: agg.aborts_by_comm(),
            server_tw_by_comm: agg.server_tw_by_comm(),
        }
    }
}

fn top(counts: &crate::FastMap<std::sync::Arc<str>, u64>) -> Option<(&str, u64)> {
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(k, v)| (k.as_ref(), *v))
}

/// What to do about client ports held in TIME_WAIT towards `raddr`, given the settings.
fn reuse_remedy(s: &NetnsSettings, raddr: IpAddr) -> String {
    if s.tcp_timestamps == 0 {
        return "tcp_timestamps=0 makes TIME_WAIT reuse impossible: enable net.ipv4.tcp_timestamps, or pool connections".into();
    }
    if s.reuse_applies(raddr) {
        return format!(
            "reuse is already allowed (tcp_tw_reuse={}): widen net.ipv4.ip_local_port_range (now {}-{}), or pool connections",
            s.tcp_tw_reuse, s.port_range.0, s.port_range.1
        );
    }
    match s.tcp_tw_reuse {
        2 => {
            "tcp_tw_reuse=2 reuses TIME_WAIT only towards loopback: set net.ipv4.tcp_tw_reuse=1, or pool connections".into()
        }
        n => format!("set net.ipv4.tcp_tw_reuse=1 (now {n}), or pool connections"),
    }
}

pub fn advise(ev: &Evidence) -> Vec<Advice> {
    let mut out = Vec::new();

    for p in ev
        .pressure
        .iter()
        .filter(|p| p.percent >= PRESSURE_WARN_PCT)
    {
        let Some(s) = ev.settings.get(&p.dest.netns) else {
            continue;
        };
        let eta = match p.exhaustion_s {
            _ if p.held >= p.usable => ", all taken".to_string(),
            Some(s) => format!(", exhausted in about {s:.0} s at the current rate"),
            None => String::new(),
        };
        out.push(Advice {
            rule: "client-port-pressure",
            netns: Some(p.dest.netns),
            subject: endpoint(p.dest.raddr, p.dest.rport),
            text: format!(
                "{} of {} usable local ports towards {} are held ({:.0}%: {} in TIME_WAIT, {} live){}: {}",
                p.held,
                p.usable,
                endpoint(p.dest.raddr, p.dest.rport),
                p.percent,
                p.time_wait,
                p.live,
                eta,
                reuse_remedy(s, p.dest.raddr)
            ),
        });
    }

    let connects: Vec<&PortFailureRecord> = ev
        .failures
        .recent
        .iter()
        .filter(|r| r.failure.op == PortOp::Connect)
        .collect();
    if let Some(last) = connects.last() {
        let f = &last.failure;
        let remedy = ev
            .settings
            .get(&f.conn.netns)
            .map(|s| reuse_remedy(s, f.conn.raddr))
            .unwrap_or_else(|| "pool connections or widen ip_local_port_range".into());
        out.push(Advice {
            rule: "connect-eaddrnotavail",
            netns: Some(f.conn.netns),
            subject: endpoint(f.conn.raddr, f.conn.rport),
            text: format!(
                "{} failed with EADDRNOTAVAIL (no free local port); the last, by {} (pid {}) to {}, found {} towards it: {}",
                count_as(ev.failures.connect_eaddrnotavail, "connect() call", "connect() calls"),
                f.process.comm,
                f.process.pid,
                endpoint(f.conn.raddr, f.conn.rport),
                count(last.time_wait_holding.into(), "TIME_WAIT"),
                remedy
            ),
        });
    }

    if let Some(last) = ev
        .failures
        .recent
        .iter()
        .rev()
        .find(|r| r.failure.op == PortOp::Bind && r.time_wait_holding > 0)
    {
        let f = &last.failure;
        out.push(Advice {
            rule: "bind-eaddrinuse",
            netns: Some(f.conn.netns),
            subject: format!("port {}", f.conn.lport),
            text: format!(
                "{} failed with EADDRINUSE; the last, by {} (pid {}) on port {}, was blocked by {} of earlier connections: set SO_REUSEADDR on the listening socket before bind()",
                count_as(ev.failures.bind_eaddrinuse, "bind() call", "bind() calls"),
                f.process.comm,
                f.process.pid,
                f.conn.lport,
                count(last.time_wait_holding.into(), "TIME_WAIT")
            ),
        });
    }

    if ev.totals.overflow > 0 {
        let max: Vec<String> = ev
            .settings
            .values()
            .map(|s| s.tcp_max_tw_buckets.to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let max = if max.is_empty() {
            String::new()
        } else {
            format!(" ({})", max.join(", "))
        };
        out.push(Advice {
            rule: "time-wait-overflow",
            netns: None,
            subject: "tcp_max_tw_buckets".into(),
            text: format!(
                "{} TIME_WAIT because net.ipv4.tcp_max_tw_buckets{} was full: TIME_WAIT's protection against late segments is being dropped; raise it or reduce connection churn",
                count_as(ev.totals.overflow, "close skipped", "closes skipped"),
                max
            ),
        });
    }

    if let Some((comm, n)) = top(ev.aborts_by_comm) {
        out.push(Advice {
            rule: "abortive-close",
            netns: None,
            subject: comm.to_string(),
            text: format!(
                "{} reset instead of closed (SO_LINGER 0 or close with unread data), {} of them by {}: data still in flight can be lost; close gracefully unless that is intended",
                count_as(ev.totals.abort, "connection was", "connections were"),
                n,
                comm
            ),
        });
    }

    let tw = ev.totals.client + ev.totals.server;
    if ev.totals.server >= SERVER_TW_MIN
        && ev.totals.server as f64 >= SERVER_TW_SHARE * tw as f64
        && let Some((comm, n)) = top(ev.server_tw_by_comm)
    {
        out.push(Advice {
            rule: "server-closes-first",
            netns: None,
            subject: comm.to_string(),
            text: format!(
                "{} of {} TIME_WAITs ({:.0}%) are on the server side, {} of them closed by {}: the server closes first; let clients close first (keep-alive, client-side close) so TIME_WAIT lands where ports are plentiful",
                ev.totals.server,
                tw,
                ev.totals.server as f64 * 100.0 / tw as f64,
                n,
                comm
            ),
        });
    }

    if ev.failures.connect_eaddrnotavail == 0
        && ev.pressure.iter().all(|p| p.percent < PRESSURE_WARN_PCT)
    {
        // Nothing depends on reuse, so timestamps don't matter: stay silent.
    } else {
        for (netns, s) in ev.settings {
            if s.tcp_timestamps == 0 {
                out.push(Advice {
                    rule: "no-timestamps",
                    netns: Some(*netns),
                    subject: "tcp_timestamps".into(),
                    text: "ports are running short and tcp_timestamps=0, which makes tcp_tw_reuse impossible: enable net.ipv4.tcp_timestamps".into(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, net::IpAddr};

    use super::*;
    use crate::{
        aggregate::PortFailureRecord,
        event::{Dest, Endpoints, Family, PortFailure, Process},
    };

    fn settings(reuse: i64, timestamps: i64) -> NetnsSettings {
        NetnsSettings {
            tcp_tw_reuse: reuse,
            tcp_tw_reuse_delay_ms: Some(1000),
            tcp_max_tw_buckets: 131072,
            tcp_fin_timeout: 60,
            tcp_timestamps: timestamps,
            tcp_rfc1337: 0,
            port_range: (40000, 40099),
            reserved_ports: vec![],
        }
    }

    fn pressure(pct: f64, raddr: [u8; 4]) -> Pressure {
        Pressure {
            dest: Dest {
                netns: 1,
                laddr: IpAddr::from([10, 0, 0, 1]),
                raddr: IpAddr::from(raddr),
                rport: 443,
            },
            time_wait: pct as u32,
            live: 0,
            held: pct as u32,
            usable: 100,
            percent: pct,
            entered_per_s: 5.0,
            ended_per_s: 1.0,
            exhaustion_s: Some(10.0),
            reusable: false,
        }
    }

    fn failure(op: PortOp, holding: u32) -> PortFailureRecord {
        PortFailureRecord {
            failure: PortFailure {
                ts_ns: 1,
                cpu: 0,
                op,
                errno: if op == PortOp::Connect { 99 } else { 98 },
                conn: Endpoints {
                    netns: 1,
                    family: Family::Ipv4,
                    laddr: IpAddr::from([0, 0, 0, 0]),
                    lport: if op == PortOp::Bind { 8080 } else { 0 },
                    raddr: IpAddr::from([10, 0, 0, 2]),
                    rport: 443,
                },
                process: Process {
                    pid: 42,
                    tid: 42,
                    host_pid: None,
                    uid: 0,
                    comm: "app".into(),
                    cgroup_id: 0,
                },
            },
            time_wait_holding: holding,
        }
    }

    struct World {
        totals: Totals,
        settings: HashMap<u32, NetnsSettings>,
        pressure: Vec<Pressure>,
        failures: Failures,
        aborts: crate::FastMap<std::sync::Arc<str>, u64>,
        server: crate::FastMap<std::sync::Arc<str>, u64>,
    }

    impl World {
        fn new(s: NetnsSettings) -> Self {
            Self {
                totals: Totals::default(),
                settings: HashMap::from([(1, s)]),
                pressure: vec![],
                failures: Failures::default(),
                aborts: Default::default(),
                server: Default::default(),
            }
        }

        fn advise(&self) -> Vec<Advice> {
            advise(&Evidence {
                totals: &self.totals,
                settings: &self.settings,
                pressure: &self.pressure,
                failures: &self.failures,
                aborts_by_comm: &self.aborts,
                server_tw_by_comm: &self.server,
            })
        }

        fn rules(&self) -> Vec<&'static str> {
            self.advise().into_iter().map(|a| a.rule).collect()
        }
    }

    #[test]
    fn silent_without_evidence() {
        let mut w = World::new(settings(0, 0));
        assert!(w.advise().is_empty());
        // Low pressure, a few client TIME_WAITs, some server ones below the threshold.
        w.pressure = vec![pressure(30.0, [10, 0, 0, 2])];
        w.totals.client = 50;
        w.totals.server = 40;
        w.server.insert("nginx".into(), 40);
        assert!(w.advise().is_empty(), "{:?}", w.advise());
    }

    #[test]
    fn pressure_advice_depends_on_reuse_setting() {
        let mut w = World::new(settings(0, 1));
        w.pressure = vec![pressure(80.0, [10, 0, 0, 2])];
        let a = w.advise();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].rule, "client-port-pressure");
        assert!(a[0].text.contains("80 of 100"), "{}", a[0].text);
        assert!(
            a[0].text.contains("tcp_tw_reuse=1 (now 0)"),
            "{}",
            a[0].text
        );
        assert!(a[0].text.contains("about 10 s"), "{}", a[0].text);

        w.settings.insert(1, settings(2, 1));
        assert!(w.advise()[0].text.contains("only towards loopback"));
        // tcp_tw_reuse=2 already covers loopback: the remedy is the range or pooling.
        w.pressure = vec![pressure(80.0, [127, 0, 0, 1])];
        assert!(w.advise()[0].text.contains("widen"));
    }

    #[test]
    fn failed_connect_cites_holding_and_remedy() {
        let mut w = World::new(settings(0, 1));
        w.failures.connect_eaddrnotavail = 3;
        w.failures.recent = VecDeque::from([failure(PortOp::Connect, 2)]);
        let a = w.advise();
        assert_eq!(a[0].rule, "connect-eaddrnotavail");
        assert!(a[0].text.starts_with("3 connect() calls"), "{}", a[0].text);
        assert!(a[0].text.contains("found 2 TIME_WAITs"));
        assert!(a[0].text.contains("tcp_tw_reuse=1"));
    }

    #[test]
    fn failed_bind_suggests_so_reuseaddr_only_when_time_wait_blocked_it() {
        let mut w = World::new(settings(2, 1));
        w.failures.bind_eaddrinuse = 1;
        w.failures.recent = VecDeque::from([failure(PortOp::Bind, 0)]);
        assert!(w.advise().is_empty(), "another listener, not TIME_WAIT");
        w.failures.recent = VecDeque::from([failure(PortOp::Bind, 4)]);
        let a = w.advise();
        assert_eq!(a[0].rule, "bind-eaddrinuse");
        assert!(a[0].text.contains("SO_REUSEADDR") && a[0].text.contains("4 TIME_WAITs"));
    }

    #[test]
    fn overflow_and_aborts() {
        let mut w = World::new(settings(2, 1));
        w.totals.overflow = 7;
        w.totals.abort = 2;
        w.aborts.insert("proxy".into(), 2);
        let a = w.advise();
        assert_eq!(w.rules(), vec!["time-wait-overflow", "abortive-close"]);
        assert!(a[0].text.starts_with("7 closes") && a[0].text.contains("(131072)"));
        assert!(a[1].text.contains("2 of them by proxy"));
    }

    #[test]
    fn server_closing_first() {
        let mut w = World::new(settings(2, 1));
        w.totals.client = 100;
        w.totals.server = 900;
        w.server.insert("nginx".into(), 850);
        w.server.insert("other".into(), 50);
        let a = w.advise();
        assert_eq!(a[0].rule, "server-closes-first");
        assert!(
            a[0].text.contains("900 of 1000") && a[0].text.contains("850 of them closed by nginx")
        );
    }

    #[test]
    fn timestamps_matter_only_when_ports_run_short() {
        let mut w = World::new(settings(1, 0));
        assert!(w.advise().is_empty());
        w.pressure = vec![pressure(90.0, [10, 0, 0, 2])];
        assert_eq!(w.rules(), vec!["client-port-pressure", "no-timestamps"]);
        assert!(w.advise()[0].text.contains("tcp_timestamps=0"));
    }
}
