//! Rate-limited logging: one line per kind of error per interval, whatever a client or the
//! system throws at the server (840,000 identical accept warnings in 8 s otherwise), with the
//! number of lines left out said in the next one.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// Kinds tracked at most; kinds are static strings and errnos, so this is never reached in
/// practice, and past it new kinds share one slot.
const MAX_KINDS: usize = 64;
const OVERFLOW: &str = "other errors";

#[derive(Debug)]
pub struct RateLog {
    interval: Duration,
    kinds: HashMap<String, Kind>,
}

#[derive(Debug)]
struct Kind {
    last: Instant,
    suppressed: u64,
}

impl RateLog {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: HashMap::new(),
        }
    }

    /// Notes one occurrence of `kind` at `now`: `Some(n)` if a line should be logged now, `n`
    /// being the occurrences left out since the last line of this kind.
    pub fn note(&mut self, kind: &str, now: Instant) -> Option<u64> {
        let kind = if self.kinds.contains_key(kind) || self.kinds.len() < MAX_KINDS - 1 {
            kind
        } else {
            OVERFLOW
        };
        match self.kinds.get_mut(kind) {
            Some(k) if now.duration_since(k.last) < self.interval => {
                k.suppressed += 1;
                None
            }
            Some(k) => {
                k.last = now;
                Some(std::mem::take(&mut k.suppressed))
            }
            None => {
                self.kinds.insert(
                    kind.to_string(),
                    Kind {
                        last: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// Logs `message` at `level` under `kind`, if its interval allows.
    pub fn log(&mut self, level: log::Level, kind: &str, message: std::fmt::Arguments<'_>) {
        if !log::log_enabled!(level) {
            return;
        }
        match self.note(kind, Instant::now()) {
            Some(0) => log::log!(level, "{message}"),
            Some(n) => log::log!(
                level,
                "{message} ({n} more like it in the last {} s)",
                self.interval.as_secs()
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_with_the_count_left_out() {
        let mut r = RateLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.note("accept: EMFILE", t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(
                r.note("accept: EMFILE", t0 + Duration::from_millis(i)),
                None
            );
        }
        // Another kind is not held back by the first.
        assert_eq!(r.note("header timeout", t0), Some(0));
        assert_eq!(
            r.note("accept: EMFILE", t0 + Duration::from_secs(10)),
            Some(1000)
        );
        assert_eq!(r.note("accept: EMFILE", t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn kinds_are_bounded() {
        let mut r = RateLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..10_000 {
            r.note(&format!("kind {i}"), t0);
        }
        assert!(r.kinds.len() <= MAX_KINDS);
    }
}
