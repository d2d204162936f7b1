//! Distributions and per-process counts the aggregator keeps for views and reports.

use serde::Serialize;

use crate::FastMap;

use crate::event::{EndReason, Role};

/// Sub-buckets per power of two: about 9% precision.
const SUB: u32 = 8;
const BUCKETS: usize = 40 * SUB as usize;

/// A log-scale histogram of durations, in microseconds: fixed size, mergeable, exact count,
/// sum, min and max; quantiles to within one bucket (~9%).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogHistogram {
    /// u64: at a million TIME_WAITs a second a bucket fills for 500,000 years.
    counts: Box<[u64; BUCKETS]>,
    pub count: u64,
    pub sum_us: u64,
    pub min_us: u64,
    pub max_us: u64,
}

impl Default for LogHistogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            count: 0,
            sum_us: 0,
            min_us: u64::MAX,
            max_us: 0,
        }
    }
}

fn bucket(us: u64) -> usize {
    if us < 2 {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros();
    let frac = ((us << SUB.trailing_zeros()) >> octave) as u32 - SUB;
    ((octave * SUB + frac) as usize).min(BUCKETS - 1)
}

/// Lower bound of bucket `i`, in microseconds.
fn lower(i: usize) -> u64 {
    if i < 2 * SUB as usize {
        // The first octaves are exact or nearly: index as value.
        return if i < 2 { i as u64 } else { lower_general(i) };
    }
    lower_general(i)
}

fn lower_general(i: usize) -> u64 {
    let octave = i as u32 / SUB;
    let frac = i as u32 % SUB;
    ((u64::from(SUB) + u64::from(frac)) << octave) >> SUB.trailing_zeros()
}

impl LogHistogram {
    pub fn record(&mut self, ns: u64) {
        let us = ns / 1000;
        self.counts[bucket(us)] += 1;
        self.count += 1;
        // Saturating: a hostile recording's lifetimes may be centuries long.
        self.sum_us = self.sum_us.saturating_add(us);
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn mean_ms(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_us as f64 / self.count as f64 / 1000.0)
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        if q >= 1.0 {
            return Some(self.max_us as f64 / 1000.0);
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && seen + c >= rank {
                // Interpolated by rank within the bucket, the bucket cut to what was seen (the
                // exact min and max): quantiles then agree with the exact mean and max, as a
                // bucket's middle did not (all at 61.0 s gave p99 60.8 s under a mean of 61.0).
                let lo = (lower(i) as f64).max(self.min_us as f64);
                let hi = (lower(i + 1) as f64).min(self.max_us as f64).max(lo);
                let within = (rank - seen) as f64 / c as f64;
                return Some((lo + (hi - lo) * within) / 1000.0);
            }
            seen += c;
        }
        Some(self.max_us as f64 / 1000.0)
    }

    /// (upper bound in ms, count) for each non-empty bucket, in order: for drawing.
    pub fn buckets_ms(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, &c)| (lower(i + 1) as f64 / 1000.0, c))
    }
}

/// Lifetime quantiles as reports show them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Lifetimes {
    pub count: u64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl From<&LogHistogram> for Lifetimes {
    fn from(h: &LogHistogram) -> Self {
        Self {
            count: h.count,
            mean_ms: h.mean_ms(),
            p50_ms: h.quantile_ms(0.5),
            p90_ms: h.quantile_ms(0.9),
            p99_ms: h.quantile_ms(0.99),
            max_ms: h.quantile_ms(1.0),
        }
    }
}

/// Who closed first, as the tables group it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ProcKey {
    pub pid: u32,
    pub comm: std::sync::Arc<str>,
}

#[derive(Clone, Debug, Default)]
pub struct ProcStats {
    pub cgroup_id: u64,
    pub entered: u64,
    pub client: u64,
    pub server: u64,
    pub ended: u64,
    pub reused: u64,
    pub recycled: u64,
    pub lifetimes: LogHistogram,
}

/// Processes beyond this many are folded into one row ("other"), so memory stays bounded.
pub const MAX_PROCESSES: usize = 4096;

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub lifetimes: LogHistogram,
    pub by_process: FastMap<ProcKey, ProcStats>,
}

impl Stats {
    fn proc_mut(&mut self, key: ProcKey) -> &mut ProcStats {
        let key = if self.by_process.len() >= MAX_PROCESSES && !self.by_process.contains_key(&key) {
            ProcKey {
                pid: 0,
                comm: "other".into(),
            }
        } else {
            key
        };
        self.by_process.entry(key).or_default()
    }

    pub fn entered(&mut self, key: ProcKey, cgroup_id: u64, role: Role) {
        let p = self.proc_mut(key);
        p.cgroup_id = cgroup_id;
        p.entered += 1;
        match role {
            Role::Client => p.client += 1,
            Role::Server => p.server += 1,
            Role::Unknown => {}
        }
    }

    pub fn ended(&mut self, key: ProcKey, end: EndReason, lifetime_ns: u64) {
        self.lifetimes.record(lifetime_ns);
        let p = self.proc_mut(key);
        p.ended += 1;
        match end {
            EndReason::Reused => p.reused += 1,
            EndReason::Recycled => p.recycled += 1,
            _ => {}
        }
        p.lifetimes.record(lifetime_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for us in [0u64, 1, 2, 3, 7, 8, 100, 1000, 60_000_000, 1 << 38] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            if us >= 16 && b < BUCKETS - 1 {
                assert!(
                    lower(b) <= us && us < lower(b + 1),
                    "{us}: {} {}",
                    lower(b),
                    lower(b + 1)
                );
            }
        }
    }

    #[test]
    fn quantiles_within_a_bucket() {
        let mut h = LogHistogram::default();
        for ms in 1..=1000u64 {
            h.record(ms * 1_000_000);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((p50 - 500.0).abs() / 500.0 < 0.1, "{p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.1, "{p99}");
        assert_eq!(h.quantile_ms(1.0), Some(1000.0));
        assert!((h.mean_ms().unwrap() - 500.5).abs() < 0.01);
        let mut sixty = LogHistogram::default();
        sixty.record(60_500_000_000);
        assert_eq!(sixty.quantile_ms(0.5), Some(60_500.0));
        h.merge(&sixty);
        assert_eq!(h.count, 1001);
        assert_eq!(h.quantile_ms(1.0), Some(60_500.0));
    }

    #[test]
    fn quantiles_agree_with_the_exact_mean_and_max() {
        // TIME_WAITs that all lived about 61 s (a 60 s timer and its slack): a bucket's
        // middle put p99 at 60.8 s under a mean of 61.0 s.
        let mut h = LogHistogram::default();
        for i in 0..100u64 {
            h.record(61_000_000_000 + i * 2_000_000);
        }
        let (mean, max) = (h.mean_ms().unwrap(), h.quantile_ms(1.0).unwrap());
        let q: Vec<f64> = [0.5, 0.9, 0.99]
            .iter()
            .map(|&q| h.quantile_ms(q).unwrap())
            .collect();
        assert!((mean - 61_099.0).abs() < 0.01, "{mean}");
        assert_eq!(max, 61_198.0);
        assert!(q[0] <= q[1] && q[1] <= q[2] && q[2] <= max, "{q:?}");
        assert!(q[0] >= 61_000.0, "p50 {} below every value", q[0]);
        assert!(q[2] >= mean, "p99 {} under the mean {mean}", q[2]);
        // Interpolated by rank between the min and the max here: p50 is the middle.
        assert!((q[0] - 61_099.0).abs() < 1.0, "{}", q[0]);
        let mut same = LogHistogram::default();
        for _ in 0..10 {
            same.record(61_000_000_000);
        }
        assert_eq!(same.quantile_ms(0.99), Some(61_000.0));
        assert_eq!(same.mean_ms(), Some(61_000.0));
    }

    #[test]
    fn processes_are_bounded() {
        let mut s = Stats::default();
        for pid in 0..(MAX_PROCESSES as u32 + 10) {
            s.entered(
                ProcKey {
                    pid: pid + 1,
                    comm: "c".into(),
                },
                0,
                Role::Client,
            );
        }
        assert_eq!(s.by_process.len(), MAX_PROCESSES + 1);
        let other = ProcKey {
            pid: 0,
            comm: "other".into(),
        };
        assert_eq!(s.by_process[&other].entered, 10);
    }
}
