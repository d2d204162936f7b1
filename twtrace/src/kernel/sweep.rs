//! The sweep: TIME_WAIT starts no kernel program saw, found afterwards.
//!
//! Sometimes the kernel runs no tracing program where a TIME_WAIT starts (on some VMs, softirq
//! work on top of the VM agent's threads; see the README's limits), and a full ring buffer
//! drops the start's record. Either way the connection its closer closed stays in the kernel's
//! `CONNS` map, because only a start that was reported takes it out. Once a second, entries
//! older than [`SETTLE_NS`] are looked up by address and cookie with sock_diag:
//! - a TIME_WAIT found there becomes a recovered start, with the closer, role and close kind
//!   the map kept;
//! - a connection that is gone is reported too: it was a TIME_WAIT only if its end was seen
//!   (the aggregator decides);
//! - a connection still open (FIN_WAIT2 waiting for its peer) is looked at again later, less
//!   and less often.

use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData};
use twtrace_ebpf::{
    Closing,
    closing_flag::{CLOSER_SET, IGNORED},
};

use super::sock_diag::{self, Lookup};
use crate::{
    aggregate::TIMEWAIT_LEN_NS,
    decode,
    event::{CloseKind, Endpoints, Event, Recovered, Role, Substate, TwEnter, TwKey},
    filter::Filters,
};

/// How old a close must be before its TIME_WAIT counts as missed: on loopback the start
/// follows close() within microseconds, and a reported start takes the entry out at once.
pub const SETTLE_NS: u64 = 1_000_000_000;
/// How often the map is swept.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// A connection still open is looked at again after 2 s, then 4, 8... up to this.
const MAX_RECHECK_NS: u64 = 64_000_000_000;
/// Lookups per sweep at most (each is a netlink round trip of a few microseconds).
const MAX_LOOKUPS: usize = 4096;
/// Map keys visited per sweep at most: deletions under churn make the kernel restart the walk.
const MAX_STEPS: usize = 65_536;

/// What the sweep decided about one entry.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Report this event and forget the entry.
    Report(Box<Event>),
    /// Look again later.
    Later,
    /// Not twtrace's to report (a filter excludes it): forget the entry.
    Forget,
}

/// The decisions, apart from the kernel: which entries to look up, and what a lookup means.
pub struct Sweep {
    jiffy_ns: u64,
    filters: Filters,
    /// Open connections: when to look again, and the delay after that.
    recheck: HashMap<u64, (u64, u64)>,
}

impl Sweep {
    pub fn new(hz: u32, filters: Filters) -> Self {
        Self {
            jiffy_ns: 1_000_000_000 / u64::from(hz.max(1)),
            filters,
            recheck: HashMap::new(),
        }
    }

    /// The entries worth a lookup now: closed first by a task twtrace reports, with an
    /// address, long enough ago, and not waiting for a recheck.
    pub fn due(&mut self, entries: &[(u64, Closing)], now_ns: u64) -> Vec<(u64, Closing)> {
        // Entries the kernel settled since need no recheck.
        let present: std::collections::HashSet<u64> = entries.iter().map(|(c, _)| *c).collect();
        self.recheck.retain(|c, _| present.contains(c));
        entries
            .iter()
            .filter(|(cookie, c)| {
                c.flags & CLOSER_SET != 0
                    && c.flags & IGNORED == 0
                    && c.conn.family != 0
                    && *cookie != 0
                    && now_ns.saturating_sub(c.ts_ns) >= SETTLE_NS
                    && self.recheck.get(cookie).is_none_or(|(at, _)| now_ns >= *at)
            })
            .take(MAX_LOOKUPS)
            .copied()
            .collect()
    }

    /// What the kernel's answer about one entry means.
    pub fn outcome(
        &mut self,
        cookie: u64,
        c: &Closing,
        conn: &Endpoints,
        found: Lookup,
        now_ns: u64,
    ) -> Outcome {
        let closer = decode::process(&c.closer);
        if !self.filters.matches_conn(conn) || !self.filters.matches_process(Some(&closer)) {
            return Outcome::Forget;
        }
        let mut key = TwKey::Cookie(cookie);
        let (recovered, substate, ts_ns, ends_ns) = match found {
            Lookup::Open => {
                let delay = self
                    .recheck
                    .get(&cookie)
                    .map_or(2 * SETTLE_NS, |(_, d)| (d * 2).min(MAX_RECHECK_NS));
                self.recheck.insert(cookie, (now_ns + delay, delay));
                return Outcome::Later;
            }
            Lookup::TimeWait {
                substate,
                remaining_ms,
                cookie: found,
            } => {
                // Its end will carry the cookie it has now (assigned by the lookup when the
                // entry's key was a 4-tuple hash).
                if found != 0 {
                    key = TwKey::Cookie(found);
                }
                let remaining = u64::from(remaining_ms) * 1_000_000;
                // A TIME_WAIT is armed for 60 s; how long a FIN_WAIT2 one was armed for is
                // unknown, so it counts from the close.
                let armed = match substate {
                    Substate::TimeWait => {
                        now_ns.saturating_sub(TIMEWAIT_LEN_NS - remaining.min(TIMEWAIT_LEN_NS))
                    }
                    Substate::FinWait2 => c.ts_ns,
                };
                (
                    Recovered::Alive,
                    substate,
                    armed.max(c.ts_ns),
                    now_ns + remaining,
                )
            }
            Lookup::Gone => (
                Recovered::Gone,
                Substate::TimeWait,
                c.ts_ns,
                c.ts_ns + TIMEWAIT_LEN_NS,
            ),
        };
        self.recheck.remove(&cookie);
        Outcome::Report(Box::new(Event::TwEnter(TwEnter {
            ts_ns,
            cpu: 0,
            key,
            conn: *conn,
            closer: Some(closer),
            role: Role::from_raw(c.role),
            close: CloseKind::from_raw(c.close),
            substate,
            timeout_jiffies: (ends_ns.saturating_sub(ts_ns) / self.jiffy_ns) as u32,
            recovered: Some(recovered),
        })))
    }
}

/// The sweep with its kernel map.
pub struct Sweeper {
    map: BpfHashMap<MapData, u64, Closing>,
    sweep: Sweep,
}

impl Sweeper {
    pub fn new(map: BpfHashMap<MapData, u64, Closing>, hz: u32, filters: Filters) -> Self {
        Self {
            map,
            sweep: Sweep::new(hz, filters),
        }
    }

    /// One sweep (blocking: map reads and netlink): the recovered starts.
    pub fn run(&mut self) -> Vec<Event> {
        let now = crate::aggregate::Clock::now_ns(&crate::aggregate::MonotonicClock);
        let entries = self.entries();
        let due = self.sweep.due(&entries, now);
        if due.is_empty() {
            return Vec::new();
        }
        let mut conns = Vec::new();
        for (cookie, c) in due {
            match decode::endpoints(&c.conn) {
                Ok(conn) => conns.push((cookie, c, conn)),
                Err(_) => self.forget(cookie),
            }
        }
        let found = sock_diag::lookup_each(conns, |(k, _, c)| (*k, *c), "sweep");
        let mut out = Vec::new();
        for ((cookie, c, conn), lookup) in found {
            match self.sweep.outcome(cookie, &c, &conn, lookup, now) {
                Outcome::Later => {}
                Outcome::Report(e) => {
                    self.forget(cookie);
                    out.push(*e);
                }
                Outcome::Forget => self.forget(cookie),
            }
        }
        out
    }

    fn entries(&self) -> Vec<(u64, Closing)> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for item in self.map.iter().take(MAX_STEPS) {
            // An entry deleted between the key and its value is simply skipped.
            if let Ok((cookie, c)) = item
                && seen.insert(cookie)
            {
                out.push((cookie, c));
            }
        }
        out
    }

    fn forget(&mut self, cookie: u64) {
        // Already gone if the kernel settled it meanwhile.
        let _ = self.map.remove(&cookie);
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use twtrace_ebpf::{AF_INET, Conn, Task, close_kind, closing_flag::CLOSED, role};

    use super::*;
    use crate::event::Family;

    const S: u64 = 1_000_000_000;

    fn closing(ts_ns: u64, flags: u8, pid: u32) -> Closing {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Closing {
            closer: Task {
                pid,
                tid: pid,
                comm,
                ..Task::default()
            },
            conn: Conn {
                laddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                raddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                netns: 7,
                lport: 40000,
                rport: 8080,
                family: AF_INET,
                _pad: [0; 6],
            },
            ts_ns,
            role: role::CLIENT,
            close: close_kind::ACTIVE,
            flags,
            oldstate: 0,
            _pad: 0,
        }
    }

    fn conn() -> Endpoints {
        let lo = IpAddr::from([127, 0, 0, 1]);
        Endpoints {
            netns: 7,
            family: Family::Ipv4,
            laddr: lo,
            lport: 40000,
            raddr: lo,
            rport: 8080,
        }
    }

    fn enter(o: Outcome) -> TwEnter {
        match o {
            Outcome::Report(e) => match *e {
                Event::TwEnter(t) => t,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_settled_closes_by_reported_tasks_are_looked_up() {
        let mut s = Sweep::new(250, Filters::default());
        let mut no_addr = closing(S, CLOSER_SET, 1);
        no_addr.conn.family = 0;
        let entries = [
            (1, closing(S, CLOSER_SET, 1)),
            (2, closing(S, CLOSER_SET | CLOSED, 1)),
            (3, closing(9 * S / 2, CLOSER_SET, 1)),
            (4, closing(S, CLOSER_SET | IGNORED, 1)),
            (5, closing(S, 0, 1)),
            (6, no_addr),
        ];
        let due: Vec<u64> = s.due(&entries, 5 * S).iter().map(|(c, _)| *c).collect();
        assert_eq!(
            due,
            [1, 2],
            "too recent, twtrace's own, no closer, no address"
        );
    }

    #[test]
    fn a_time_wait_found_is_a_recovered_start_with_its_closer() {
        let mut s = Sweep::new(250, Filters::default());
        let c = closing(10 * S, CLOSER_SET, 42);
        let found = Lookup::TimeWait {
            substate: Substate::TimeWait,
            remaining_ms: 57_000,
            cookie: 9,
        };
        let t = enter(s.outcome(9, &c, &conn(), found, 13 * S + S / 2));
        assert_eq!(t.recovered, Some(Recovered::Alive));
        assert_eq!(t.key, TwKey::Cookie(9));
        assert_eq!(t.ts_ns, 10 * S + S / 2, "60 s armed, 57 s left");
        assert_eq!(t.timeout_jiffies, 60 * 250);
        assert_eq!(
            t.closer.as_ref().map(|p| (p.pid, &*p.comm)),
            Some((42, "curl"))
        );
        assert_eq!((t.role, t.close), (Role::Client, CloseKind::Active));
        // Never before the close itself.
        let t = enter(s.outcome(9, &c, &conn(), found, 12 * S));
        assert_eq!(t.ts_ns, 10 * S);
    }

    #[test]
    fn a_four_tuple_key_takes_the_cookie_the_lookup_found() {
        // Kernels without the cookie helper key closes by a 4-tuple hash; the TIME_WAIT's
        // later events carry the cookie the lookup assigned.
        let mut s = Sweep::new(250, Filters::default());
        let c = closing(10 * S, CLOSER_SET, 42);
        let key = twtrace_ebpf::SYNTHETIC_KEY | 0x1234;
        let found = Lookup::TimeWait {
            substate: Substate::TimeWait,
            remaining_ms: 57_000,
            cookie: 77,
        };
        let t = enter(s.outcome(key, &c, &conn(), found, 13 * S));
        assert_eq!(t.key, TwKey::Cookie(77));
    }

    #[test]
    fn a_gone_connection_is_reported_for_the_aggregator_to_match() {
        let mut s = Sweep::new(100, Filters::default());
        let c = closing(10 * S, CLOSER_SET, 42);
        let t = enter(s.outcome(9, &c, &conn(), Lookup::Gone, 20 * S));
        assert_eq!(t.recovered, Some(Recovered::Gone));
        assert_eq!(t.ts_ns, 10 * S);
    }

    #[test]
    fn an_open_connection_is_looked_at_less_and_less_often() {
        let mut s = Sweep::new(250, Filters::default());
        let c = closing(S, CLOSER_SET, 42);
        let entries = [(9, c)];
        let mut now = 2 * S;
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert_eq!(s.due(&entries, now).len(), 1);
            assert_eq!(s.outcome(9, &c, &conn(), Lookup::Open, now), Outcome::Later);
            let mut t = now;
            while s.due(&entries, t).is_empty() {
                t += S;
            }
            waits.push((t - now) / S);
            now = t;
        }
        assert_eq!(waits, [2, 4, 8, 16, 32, 64, 64, 64]);
        // Once the kernel settles it, its recheck is forgotten.
        assert!(s.due(&[], now).is_empty());
        assert!(s.recheck.is_empty());
    }

    #[test]
    fn filters_apply_to_recovered_starts() {
        let only_pid = Filters {
            pid: Some(7),
            ..Filters::default()
        };
        let found = Lookup::TimeWait {
            substate: Substate::TimeWait,
            remaining_ms: 59_000,
            cookie: 9,
        };
        let c = closing(S, CLOSER_SET, 42);
        assert_eq!(
            Sweep::new(250, only_pid).outcome(9, &c, &conn(), found, 2 * S),
            Outcome::Forget
        );
        let other_port = Filters {
            rports: vec![443],
            ..Filters::default()
        };
        assert_eq!(
            Sweep::new(250, other_port).outcome(9, &c, &conn(), found, 2 * S),
            Outcome::Forget
        );
    }
}
