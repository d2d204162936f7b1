//! What happened minute by minute: when trouble started and stopped. Bounded whatever the
//! recording's span: past [`MAX_BUCKETS`] buckets, each bucket doubles in length.

use serde::Serialize;

/// A day of minutes.
pub const MAX_BUCKETS: usize = 1440;
const MINUTE_NS: u64 = 60_000_000_000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub entered: u64,
    pub connect_failures: u64,
    pub bind_failures: u64,
    pub overflows: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.entered += o.entered;
        self.connect_failures += o.connect_failures;
        self.bind_failures += o.bind_failures;
        self.overflows += o.overflows;
    }

    fn is_empty(&self) -> bool {
        *self == Counts::default()
    }

    /// Failures or overflows: trouble.
    pub fn trouble(&self) -> bool {
        self.connect_failures + self.bind_failures + self.overflows > 0
    }
}

/// One bucket with something in it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Event time (CLOCK_MONOTONIC ns) of the bucket's start.
    #[serde(skip)]
    pub start_ns: u64,
    /// RFC 3339.
    pub start: String,
    #[serde(flatten)]
    pub counts: Counts,
}

pub struct Timeline {
    start_ns: u64,
    width_ns: u64,
    buckets: Vec<Counts>,
}

impl Timeline {
    pub fn new(start_ns: u64) -> Self {
        Self {
            start_ns,
            width_ns: MINUTE_NS,
            buckets: Vec::new(),
        }
    }

    /// The bucket of `ts_ns` (an event a little before the start counts in the first).
    pub fn at(&mut self, ts_ns: u64) -> &mut Counts {
        let mut i = ts_ns.saturating_sub(self.start_ns) / self.width_ns;
        while i >= MAX_BUCKETS as u64 {
            self.coarsen();
            i = ts_ns.saturating_sub(self.start_ns) / self.width_ns;
        }
        let i = i as usize;
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, Counts::default());
        }
        &mut self.buckets[i]
    }

    fn coarsen(&mut self) {
        self.width_ns = self.width_ns.saturating_mul(2);
        let merged = self
            .buckets
            .chunks(2)
            .map(|pair| {
                let mut c = pair[0];
                if let Some(b) = pair.get(1) {
                    c.add(b);
                }
                c
            })
            .collect();
        self.buckets = merged;
    }

    pub fn width_s(&self) -> u64 {
        self.width_ns / 1_000_000_000
    }

    /// The buckets with something in them, in order; `rfc` names their start.
    pub fn rows(&self, rfc: impl Fn(u64) -> String) -> Vec<Row> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.is_empty())
            .map(|(i, c)| {
                let start_ns = self
                    .start_ns
                    .saturating_add((i as u64).saturating_mul(self.width_ns));
                Row {
                    start_ns,
                    start: rfc(start_ns),
                    counts: *c,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_minute_and_stays_bounded() {
        let mut t = Timeline::new(10 * MINUTE_NS);
        t.at(10 * MINUTE_NS + 5).entered += 1;
        t.at(12 * MINUTE_NS + 59_000_000_000).connect_failures += 2;
        let rows = t.rows(|ns| ns.to_string());
        assert_eq!(t.width_s(), 60);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].start_ns, 12 * MINUTE_NS);
        assert_eq!(rows[1].counts.connect_failures, 2);
        // A timestamp at the end of time: buckets widen, a few thousand at most.
        t.at(u64::MAX).overflows += 1;
        assert!(t.buckets.len() <= MAX_BUCKETS);
        let rows = t.rows(|ns| ns.to_string());
        assert_eq!(rows.iter().map(|r| r.counts.entered).sum::<u64>(), 1);
        assert_eq!(
            rows.iter().map(|r| r.counts.connect_failures).sum::<u64>(),
            2
        );
        assert_eq!(rows.last().unwrap().counts.overflows, 1);
    }
}
