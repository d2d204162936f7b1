//! twtrace's counts against the kernel's own, per namespace.
//!
//! Each namespace's TcpExt counters are read inside it every few seconds
//! (`Event::KernelCounters`). When a reading is ingested, twtrace's own counts for that
//! namespace as of the reading's time are taken beside it: the counts now, less the events
//! already in with a later time ([`Recent`]), so the two are compared at the same moment
//! whatever the reading's age. What is compared is the change since the namespace's first reading:
//! - TcpExtTW + TcpExtTWKilled: TIME_WAITs started, where the kernel counts them when their
//!   timer is armed; TIME_WAITs whose timer ran out, where it counts them then (as 5.10 does).
//!   Which one a kernel does is told by the first reading where the two differ, and kept;
//! - TcpExtTWRecycled: TIME_WAITs reused by a connect();
//! - TcpExtTCPTimeWaitOverflow: closes that skipped TIME_WAIT at `tcp_max_tw_buckets`.
//!
//! Counts of a view that filters by anything but the namespace are a part of the namespace's
//! and are not compared.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The kernel's counters that twtrace's counts answer to, at one reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    /// TcpExtTW + TcpExtTWKilled.
    pub tw: u64,
    pub recycled: u64,
    pub overflow: u64,
}

impl KernelCounts {
    fn less(self, o: KernelCounts) -> KernelCounts {
        KernelCounts {
            tw: self.tw.saturating_sub(o.tw),
            recycled: self.recycled.saturating_sub(o.recycled),
            overflow: self.overflow.saturating_sub(o.overflow),
        }
    }

    /// From a namespace's TcpExt counters; None when the reading lacks one.
    pub fn from_tcp_ext(c: &BTreeMap<String, u64>) -> Option<Self> {
        Some(Self {
            tw: c.get("TW")?.saturating_add(*c.get("TWKilled")?),
            recycled: *c.get("TWRecycled")?,
            overflow: *c.get("TCPTimeWaitOverflow")?,
        })
    }
}

/// twtrace's counts of one namespace at the moment a reading was ingested.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OurCounts {
    /// TIME_WAITs seen starting (not those found at start).
    pub entered: u64,
    /// TIME_WAITs whose timer ran out (any substate), found at start or not.
    pub expired: u64,
    pub reused: u64,
    pub overflow: u64,
}

impl OurCounts {
    fn less(self, o: OurCounts) -> OurCounts {
        OurCounts {
            entered: self.entered.saturating_sub(o.entered),
            expired: self.expired.saturating_sub(o.expired),
            reused: self.reused.saturating_sub(o.reused),
            overflow: self.overflow.saturating_sub(o.overflow),
        }
    }
}

/// What a counted event was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Entered,
    Expired,
    Reused,
    Overflow,
}

/// A namespace's counted events of the last [`RECENT_NS`], by event time (at most
/// [`RECENT_MAX`]): a reading read at `ts` is set against the counts less those after `ts`.
#[derive(Clone, Debug, Default)]
pub struct Recent {
    events: std::collections::VecDeque<(u64, Counted)>,
}

/// Longer than a namespace's reading takes to arrive (a few milliseconds).
pub const RECENT_NS: u64 = 2_000_000_000;
pub const RECENT_MAX: usize = 1 << 16;

impl Recent {
    pub fn push(&mut self, ts_ns: u64, what: Counted) {
        if self.events.len() == RECENT_MAX {
            self.events.pop_front();
        }
        self.events.push_back((ts_ns, what));
    }

    /// Forgets events older than [`RECENT_NS`] before `now_ns`.
    pub fn trim(&mut self, now_ns: u64) {
        let keep = now_ns.saturating_sub(RECENT_NS);
        while self.events.front().is_some_and(|(ts, _)| *ts < keep) {
            self.events.pop_front();
        }
    }

    /// `now` less the events after `ts_ns`.
    pub fn as_of(&self, now: OurCounts, ts_ns: u64) -> OurCounts {
        let mut later = OurCounts::default();
        for (_, what) in self.events.iter().filter(|(ts, _)| *ts > ts_ns) {
            *match what {
                Counted::Entered => &mut later.entered,
                Counted::Expired => &mut later.expired,
                Counted::Reused => &mut later.reused,
                Counted::Overflow => &mut later.overflow,
            } += 1;
        }
        now.less(later)
    }
}

/// When the kernel counts a TIME_WAIT in TcpExtTW / TcpExtTWKilled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counting {
    /// When its timer is armed: the count follows TIME_WAITs started.
    AtStart,
    /// When its timer runs out: the count follows TIME_WAITs expired.
    AtExpiry,
}

/// twtrace's counts as of when a reading began (`lo`) and ended (`hi`): the kernel's counter
/// may or may not include what happened while it was read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OurSpan {
    pub lo: OurCounts,
    pub hi: OurCounts,
}

/// A namespace's first and latest readings, each with twtrace's counts beside it.
#[derive(Clone, Debug, Default)]
pub struct NetnsReadings {
    first: Option<(KernelCounts, OurSpan)>,
    last: Option<(KernelCounts, OurSpan)>,
}

/// Changes between two readings: the kernel's, and the range twtrace's can be in.
#[derive(Clone, Copy, Debug)]
struct Deltas {
    k: KernelCounts,
    lo: OurCounts,
    hi: OurCounts,
}

impl Deltas {
    /// twtrace's change in one count: the kernel's when it is within the range, else the
    /// nearer bound.
    fn ours(&self, kernel: u64, pick: fn(&OurCounts) -> u64) -> (u64, bool) {
        let (lo, hi) = (pick(&self.lo), pick(&self.hi));
        (kernel.clamp(lo, hi.max(lo)), (lo..=hi).contains(&kernel))
    }
}

impl NetnsReadings {
    /// A reading read in an instant (tests, and readings without an end time).
    pub fn push_exact(&mut self, k: KernelCounts, ours: OurCounts) {
        self.push(k, OurSpan { lo: ours, hi: ours });
    }

    pub fn push(&mut self, k: KernelCounts, ours: OurSpan) {
        self.first.get_or_insert((k, ours));
        self.last = Some((k, ours));
    }

    /// Changes since the first reading.
    fn deltas(&self) -> Option<Deltas> {
        let ((k0, o0), (k1, o1)) = (self.first?, self.last?);
        Some(Deltas {
            k: k1.less(k0),
            lo: o1.lo.less(o0.hi),
            hi: o1.hi.less(o0.lo),
        })
    }

    /// What this namespace's readings say about when the kernel counts, if they tell.
    pub fn counting(&self) -> Option<Counting> {
        let d = self.deltas()?;
        match (
            d.ours(d.k.tw, |o| o.entered).1,
            d.ours(d.k.tw, |o| o.expired).1,
        ) {
            (true, false) => Some(Counting::AtStart),
            (false, true) => Some(Counting::AtExpiry),
            _ => None,
        }
    }
}

/// One comparison: the kernel's counter and twtrace's count, changes over the same span.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The kernel's counter (TcpExt names).
    pub counter: &'static str,
    /// What twtrace counted against it.
    pub versus: &'static str,
    pub kernel: u64,
    pub twtrace: u64,
    pub agrees: bool,
}

/// A namespace's comparisons, over the span between its first and latest readings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetnsCheck {
    pub netns: u32,
    /// The namespace is gone: its check as it stood then.
    pub gone: bool,
    /// How the kernel counts TIME_WAITs, once some reading told.
    pub counting: Option<Counting>,
    pub checks: Vec<Check>,
}

impl NetnsCheck {
    pub fn agrees(&self) -> bool {
        self.checks.iter().all(|c| c.agrees)
    }
}

/// The comparisons for one namespace; `counting` is what the kernel is known to do (from any
/// namespace's readings). None before a second reading.
pub fn check(netns: u32, r: &NetnsReadings, counting: Option<Counting>) -> Option<NetnsCheck> {
    let d = r.deltas()?;
    let counting = counting.or_else(|| r.counting());
    let entered = d.ours(d.k.tw, |o| o.entered);
    let expired = d.ours(d.k.tw, |o| o.expired);
    let (versus, (ours, agrees)) = match counting {
        Some(Counting::AtExpiry) => ("expired", expired),
        Some(Counting::AtStart) => ("entered", entered),
        // Not told yet: either may be what it counts.
        None => ("entered", (entered.0, entered.1 || expired.1)),
    };
    let reused = d.ours(d.k.recycled, |o| o.reused);
    let overflow = d.ours(d.k.overflow, |o| o.overflow);
    Some(NetnsCheck {
        netns,
        gone: false,
        counting,
        checks: vec![
            Check {
                counter: "TW+TWKilled",
                versus,
                kernel: d.k.tw,
                twtrace: ours,
                agrees,
            },
            Check {
                counter: "TWRecycled",
                versus: "reused",
                kernel: d.k.recycled,
                twtrace: reused.0,
                agrees: reused.1,
            },
            Check {
                counter: "TCPTimeWaitOverflow",
                versus: "overflow",
                kernel: d.k.overflow,
                twtrace: overflow.0,
                agrees: overflow.1,
            },
        ],
    })
}

/// One line per namespace for a text view: `agrees` or what differs.
pub fn describe(c: &NetnsCheck) -> String {
    let mut s = format!(
        "kernel check, netns {}{}: ",
        c.netns,
        if c.gone { " (gone)" } else { "" }
    );
    let parts: Vec<String> = c
        .checks
        .iter()
        .map(|x| {
            if x.agrees {
                format!("{} ({}) {} = {}", x.counter, x.versus, x.kernel, x.twtrace)
            } else {
                format!(
                    "{} ({}) kernel {} twtrace {} DIFFERS by {}",
                    x.counter,
                    x.versus,
                    x.kernel,
                    x.twtrace,
                    x.kernel.abs_diff(x.twtrace)
                )
            }
        })
        .collect();
    s.push_str(&parts.join(", "));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(tw: u64, recycled: u64, overflow: u64) -> KernelCounts {
        KernelCounts {
            tw,
            recycled,
            overflow,
        }
    }

    fn o(entered: u64, expired: u64, reused: u64, overflow: u64) -> OurCounts {
        OurCounts {
            entered,
            expired,
            reused,
            overflow,
        }
    }

    #[test]
    fn a_reading_is_set_against_the_counts_as_of_its_time() {
        let mut r = Recent::default();
        r.push(10, Counted::Entered);
        r.push(20, Counted::Entered);
        r.push(30, Counted::Expired);
        // Two entered and one expired are in; a reading read at 15 saw only the first.
        assert_eq!(r.as_of(o(2, 1, 0, 0), 15), o(1, 0, 0, 0));
        assert_eq!(r.as_of(o(2, 1, 0, 0), 30), o(2, 1, 0, 0));
        r.trim(RECENT_NS + 25);
        assert_eq!(r.events.len(), 1);
    }

    #[test]
    fn what_happened_while_the_counters_were_read_may_be_in_them_or_not() {
        let span = |lo, hi| OurSpan {
            lo: o(lo, 0, 0, 0),
            hi: o(hi, 0, 0, 0),
        };
        let mut r = NetnsReadings::default();
        r.push(k(0, 0, 0), span(0, 0));
        // One TIME_WAIT entered while the second reading was read: 2 or 3 both agree.
        r.push(k(3, 0, 0), span(2, 3));
        let c = check(1, &r, Some(Counting::AtStart)).unwrap();
        assert!(c.agrees(), "{c:?}");
        assert_eq!(c.checks[0].twtrace, 3);
        r.push(k(4, 0, 0), span(2, 3));
        let c = check(1, &r, Some(Counting::AtStart)).unwrap();
        assert!(!c.agrees());
        assert_eq!(c.checks[0].twtrace, 3);
    }

    #[test]
    fn counters_are_parsed_from_tcp_ext_and_a_missing_one_is_none() {
        let mut m: BTreeMap<String, u64> = [("TW", 5), ("TWKilled", 2), ("TWRecycled", 1)]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b))
            .collect();
        assert_eq!(KernelCounts::from_tcp_ext(&m), None);
        m.insert("TCPTimeWaitOverflow".into(), 3);
        assert_eq!(KernelCounts::from_tcp_ext(&m), Some(k(7, 1, 3)));
    }

    #[test]
    fn a_kernel_counting_at_start_agrees_with_entered() {
        let mut r = NetnsReadings::default();
        r.push_exact(k(1000, 0, 0), o(0, 0, 0, 0));
        r.push_exact(k(1100, 2, 1), o(100, 30, 2, 1));
        assert_eq!(r.counting(), Some(Counting::AtStart));
        let c = check(7, &r, None).unwrap();
        assert!(c.agrees(), "{c:?}");
        assert_eq!((c.checks[0].kernel, c.checks[0].twtrace), (100, 100));
    }

    #[test]
    fn a_kernel_counting_at_expiry_agrees_with_expired() {
        let mut r = NetnsReadings::default();
        r.push_exact(k(50, 0, 0), o(10, 0, 0, 0));
        r.push_exact(k(80, 0, 0), o(110, 30, 0, 0));
        assert_eq!(r.counting(), Some(Counting::AtExpiry));
        assert!(check(7, &r, None).unwrap().agrees());
    }

    #[test]
    fn a_difference_is_flagged_with_its_size() {
        let mut r = NetnsReadings::default();
        r.push_exact(k(0, 0, 0), o(0, 0, 0, 0));
        r.push_exact(k(100, 0, 4), o(97, 0, 0, 3));
        // Once the kernel is known to count at start, 97 is 3 short.
        let c = check(7, &r, Some(Counting::AtStart)).unwrap();
        assert!(!c.agrees());
        let line = describe(&c);
        assert!(
            line.contains("kernel 100 twtrace 97 DIFFERS by 3"),
            "{line}"
        );
        assert!(line.contains("kernel 4 twtrace 3 DIFFERS by 1"), "{line}");
        // Not told yet, and matching neither: flagged too.
        assert!(!check(7, &r, None).unwrap().agrees());
    }

    #[test]
    fn no_reading_compares_nothing_and_one_an_empty_span() {
        let mut r = NetnsReadings::default();
        assert_eq!(check(1, &r, None), None);
        r.push_exact(k(5, 0, 0), o(0, 0, 0, 0));
        let c = check(1, &r, None).unwrap();
        // The first reading against itself: nothing changed, and that agrees.
        assert!(c.agrees());
    }
}
