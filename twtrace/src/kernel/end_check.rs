//! The end check: TIME_WAITs whose end no kernel program reported, looked up once their timer
//! was due.
//!
//! A program run the kernel skipped, or a record a full ring buffer dropped, would leave a
//! TIME_WAIT alive in the aggregator forever. The aggregator hands out those whose timer was
//! due a while ago ([`crate::aggregate::Aggregator::ends_due`]); each is looked up with
//! sock_diag by cookie and 4-tuple in its namespace:
//! - gone: it ended, reported as expired when its timer was due, marked `recovered`;
//! - still a TIME_WAIT: its timer was pushed back unseen, reported as a reschedule with the
//!   time it has left;
//! - the lookup failed: nothing is said, and it is asked about again later.

use super::{sock_diag, sock_diag::Lookup};
use crate::{
    aggregate::EndCheck,
    event::{EndReason, Event, TwEnd, TwKey, TwResched},
};

/// What the lookup of one due TIME_WAIT found means.
pub fn outcome(c: &EndCheck, found: Lookup, now_ns: u64, jiffy_ns: u64) -> Event {
    match found {
        Lookup::TimeWait {
            substate,
            remaining_ms,
            ..
        } => Event::TwResched(TwResched {
            ts_ns: now_ns,
            cpu: 0,
            key: c.key,
            substate,
            timeout_jiffies: (u64::from(remaining_ms) * 1_000_000 / jiffy_ns.max(1)) as u32,
            addr: None,
        }),
        // A full socket on the 4-tuple is a later connection: this TIME_WAIT is gone too.
        Lookup::Gone | Lookup::Open => Event::TwEnd(TwEnd {
            ts_ns: c.due_ns.min(now_ns),
            cpu: 0,
            key: c.key,
            end: EndReason::Expired,
            substate: c.substate,
            by: None,
            addr: None,
            recovered: true,
        }),
    }
}

/// The cookie a lookup asks for: a TIME_WAIT known only by its address is found by 4-tuple.
fn lookup_cookie(key: TwKey) -> u64 {
    match key {
        TwKey::Cookie(c) => c,
        TwKey::Addr(_) => twtrace_ebpf::SYNTHETIC_KEY,
    }
}

/// Looks up `due` (blocking: netlink in each namespace) and returns what the answers mean.
pub fn run(due: Vec<EndCheck>, now_ns: u64, jiffy_ns: u64) -> Vec<Event> {
    sock_diag::lookup_each(due, |c| (lookup_cookie(c.key), c.conn), "end check")
        .iter()
        .map(|(c, found)| outcome(c, *found, now_ns, jiffy_ns))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{aggregate::tests::conn, event::Substate};

    const S: u64 = 1_000_000_000;

    fn check() -> EndCheck {
        EndCheck {
            key: TwKey::Cookie(7),
            conn: conn(40000),
            substate: Substate::TimeWait,
            due_ns: 70 * S,
        }
    }

    #[test]
    fn a_due_time_wait_that_is_gone_expired_when_due() {
        for found in [Lookup::Gone, Lookup::Open] {
            let Event::TwEnd(e) = outcome(&check(), found, 80 * S, 4_000_000) else {
                panic!("not an end");
            };
            assert_eq!(
                (e.key, e.ts_ns, e.end, e.recovered),
                (TwKey::Cookie(7), 70 * S, EndReason::Expired, true)
            );
        }
    }

    #[test]
    fn a_due_time_wait_still_there_was_pushed_back() {
        let found = Lookup::TimeWait {
            substate: Substate::TimeWait,
            remaining_ms: 2_000,
            cookie: 7,
        };
        let Event::TwResched(r) = outcome(&check(), found, 80 * S, 4_000_000) else {
            panic!("not a reschedule");
        };
        // 2 s at HZ=250.
        assert_eq!((r.ts_ns, r.timeout_jiffies), (80 * S, 500));
    }

    #[test]
    fn an_address_key_is_looked_up_by_four_tuple() {
        assert_eq!(lookup_cookie(TwKey::Cookie(9)), 9);
        assert_ne!(
            lookup_cookie(TwKey::Addr(0xffff_8880_0000_0000)) & twtrace_ebpf::SYNTHETIC_KEY,
            0
        );
    }
}
