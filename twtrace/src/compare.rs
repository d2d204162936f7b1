//! Two reports side by side: the settings that differ, then each measure before, after and
//! changed, normalised so traces of different length and load compare, and whether the change
//! is more than noise.

use serde::Serialize;

use crate::report::Report;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SettingDiff {
    pub name: &'static str,
    pub before: String,
    pub after: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Same,
    WithinNoise,
    Changed,
    /// Too few observations to say.
    TooFew,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Measure {
    pub name: &'static str,
    pub before: Option<f64>,
    pub after: Option<f64>,
    pub change: Option<f64>,
    pub change_pct: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub before: Vec<String>,
    pub after: Vec<String>,
    pub settings: Vec<SettingDiff>,
    pub measures: Vec<Measure>,
}

/// |z| below this is noise (about 95%).
const Z: f64 = 2.0;
/// Lifetime quantiles come from log buckets about 9% wide: smaller changes are not measured.
const QUANTILE_PRECISION: f64 = 0.10;
const MIN_SAMPLES: u64 = 20;

fn measure(
    name: &'static str,
    before: Option<f64>,
    after: Option<f64>,
    verdict: Verdict,
) -> Measure {
    let change = before.zip(after).map(|(b, a)| a - b);
    let change_pct = before
        .zip(after)
        .filter(|(b, _)| *b != 0.0)
        .map(|(b, a)| (a - b) * 100.0 / b);
    let verdict = match (before, after) {
        (Some(b), Some(a)) if b == a => Verdict::Same,
        (None, _) | (_, None) => Verdict::TooFew,
        _ => verdict,
    };
    Measure {
        name,
        before,
        after,
        change,
        change_pct,
        verdict,
    }
}

/// Counts over spans (events per minute): two Poisson rates.
fn rate(name: &'static str, n1: u64, t1: f64, n2: u64, t2: f64) -> Measure {
    let (t1, t2) = (t1.max(1.0 / 60.0), t2.max(1.0 / 60.0));
    let (r1, r2) = (n1 as f64 / t1, n2 as f64 / t2);
    let var = n1 as f64 / (t1 * t1) + n2 as f64 / (t2 * t2);
    let verdict = if var == 0.0 || ((r2 - r1) / var.sqrt()).abs() < Z {
        Verdict::WithinNoise
    } else {
        Verdict::Changed
    };
    measure(name, Some(r1), Some(r2), verdict)
}

/// A share (k of n) scaled to `scale` (100 for %, 1000 for per mille): two proportions.
fn share(name: &'static str, k1: u64, n1: u64, k2: u64, n2: u64, scale: f64) -> Measure {
    if n1 == 0 || n2 == 0 {
        let f = |k: u64, n: u64| (n > 0).then(|| k as f64 * scale / n as f64);
        return measure(name, f(k1, n1), f(k2, n2), Verdict::TooFew);
    }
    let (p1, p2) = (k1 as f64 / n1 as f64, k2 as f64 / n2 as f64);
    let p = (k1 + k2) as f64 / (n1 + n2) as f64;
    let se = (p * (1.0 - p) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    let verdict = if n1.min(n2) < MIN_SAMPLES {
        Verdict::TooFew
    } else if se == 0.0 || ((p2 - p1) / se).abs() < Z {
        Verdict::WithinNoise
    } else {
        Verdict::Changed
    };
    measure(name, Some(p1 * scale), Some(p2 * scale), verdict)
}

fn quantile(name: &'static str, b: Option<f64>, nb: u64, a: Option<f64>, na: u64) -> Measure {
    let verdict = match (b, a) {
        _ if nb.min(na) < MIN_SAMPLES => Verdict::TooFew,
        (Some(b), Some(a)) if b > 0.0 && ((a - b) / b).abs() < QUANTILE_PRECISION => {
            Verdict::WithinNoise
        }
        _ => Verdict::Changed,
    };
    measure(name, b, a, verdict)
}

/// A level (TIME_WAITs alive, ports held), treated as a count.
fn level(name: &'static str, b: f64, a: f64) -> Measure {
    let verdict = if b + a == 0.0 || ((a - b) / (a + b).sqrt()).abs() < Z {
        Verdict::WithinNoise
    } else {
        Verdict::Changed
    };
    measure(name, Some(b), Some(a), verdict)
}

fn settings_diff(b: &Report, a: &Report) -> Vec<SettingDiff> {
    let pick = |r: &Report| {
        r.busiest_netns
            .and_then(|n| r.settings.get(&n.to_string()).cloned())
            .or_else(|| r.settings.values().next().cloned())
    };
    let (Some(sb), Some(sa)) = (pick(b), pick(a)) else {
        return Vec::new();
    };
    let rows: [(&'static str, String, String); 8] = [
        (
            "tcp_tw_reuse",
            sb.tcp_tw_reuse.to_string(),
            sa.tcp_tw_reuse.to_string(),
        ),
        (
            "tcp_tw_reuse_delay",
            format!("{:?}", sb.tcp_tw_reuse_delay_ms),
            format!("{:?}", sa.tcp_tw_reuse_delay_ms),
        ),
        (
            "tcp_max_tw_buckets",
            sb.tcp_max_tw_buckets.to_string(),
            sa.tcp_max_tw_buckets.to_string(),
        ),
        (
            "tcp_fin_timeout",
            sb.tcp_fin_timeout.to_string(),
            sa.tcp_fin_timeout.to_string(),
        ),
        (
            "tcp_timestamps",
            sb.tcp_timestamps.to_string(),
            sa.tcp_timestamps.to_string(),
        ),
        (
            "tcp_rfc1337",
            sb.tcp_rfc1337.to_string(),
            sa.tcp_rfc1337.to_string(),
        ),
        (
            "ip_local_port_range",
            format!("{}-{}", sb.port_range.0, sb.port_range.1),
            format!("{}-{}", sa.port_range.0, sa.port_range.1),
        ),
        (
            "ip_local_reserved_ports",
            format!("{:?}", sb.reserved_ports),
            format!("{:?}", sa.reserved_ports),
        ),
    ];
    rows.into_iter()
        .filter(|(_, b, a)| b != a)
        .map(|(name, before, after)| SettingDiff {
            name,
            before,
            after,
        })
        .collect()
}

pub fn compare(b: &Report, a: &Report) -> Comparison {
    let (tb, ta) = (b.span_s / 60.0, a.span_s / 60.0);
    let (bt, at) = (&b.totals, &a.totals);
    let peak = |r: &Report| r.pressure_peaks.first().map_or(0.0, |p| p.percent);
    let measures = vec![
        share(
            "TIME_WAITs per 1000 connections closed",
            bt.entered,
            b.connections_closed,
            at.entered,
            a.connections_closed,
            1000.0,
        ),
        rate(
            "TIME_WAITs entered per minute",
            bt.entered,
            tb,
            at.entered,
            ta,
        ),
        level(
            "TIME_WAITs alive, peak",
            b.alive_peak as f64,
            a.alive_peak as f64,
        ),
        level("TIME_WAITs alive, mean", b.alive_mean, a.alive_mean),
        quantile(
            "lifetime p50 (ms)",
            b.lifetime.p50_ms,
            b.lifetime.count,
            a.lifetime.p50_ms,
            a.lifetime.count,
        ),
        quantile(
            "lifetime p99 (ms)",
            b.lifetime.p99_ms,
            b.lifetime.count,
            a.lifetime.p99_ms,
            a.lifetime.count,
        ),
        share(
            "% reused by connect",
            bt.reused,
            bt.ended,
            at.reused,
            at.ended,
            100.0,
        ),
        share(
            "% recycled by SYN",
            bt.recycled,
            bt.ended,
            at.recycled,
            at.ended,
            100.0,
        ),
        rate("RST kills per minute", bt.reset, tb, at.reset, ta),
        rate("overflows per minute", bt.overflow, tb, at.overflow, ta),
        rate("aborts per minute", bt.abort, tb, at.abort, ta),
        rate(
            "EADDRNOTAVAIL per minute",
            b.failures.connect_eaddrnotavail,
            tb,
            a.failures.connect_eaddrnotavail,
            ta,
        ),
        rate(
            "EADDRINUSE per minute",
            b.failures.bind_eaddrinuse,
            tb,
            a.failures.bind_eaddrinuse,
            ta,
        ),
        level("peak port pressure (%)", peak(b), peak(a)),
    ];
    Comparison {
        before: b.files.clone(),
        after: a.files.clone(),
        settings: settings_diff(b, a),
        measures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_rates() {
        // 100 vs 400 events in a minute each: changed.
        assert_eq!(rate("x", 100, 1.0, 400, 1.0).verdict, Verdict::Changed);
        // 100 vs 110: noise.
        assert_eq!(rate("x", 100, 1.0, 110, 1.0).verdict, Verdict::WithinNoise);
        // Same rate over different spans: normalised, so the same.
        let m = rate("x", 100, 1.0, 300, 3.0);
        assert_eq!(m.verdict, Verdict::Same);
        assert_eq!(m.before, Some(100.0));
    }

    #[test]
    fn proportions() {
        assert_eq!(
            share("x", 0, 1000, 400, 1000, 100.0).verdict,
            Verdict::Changed
        );
        assert_eq!(
            share("x", 50, 1000, 55, 1000, 100.0).verdict,
            Verdict::WithinNoise
        );
        assert_eq!(share("x", 1, 5, 3, 5, 100.0).verdict, Verdict::TooFew);
        let m = share("x", 1, 4, 1, 2, 1000.0);
        assert_eq!(m.before, Some(250.0));
        assert_eq!(m.after, Some(500.0));
    }

    #[test]
    fn quantiles_below_precision_are_noise() {
        assert_eq!(
            quantile("x", Some(60_000.0), 100, Some(61_000.0), 100).verdict,
            Verdict::WithinNoise
        );
        assert_eq!(
            quantile("x", Some(60_000.0), 100, Some(1_500.0), 100).verdict,
            Verdict::Changed
        );
        assert_eq!(
            quantile("x", Some(60_000.0), 5, Some(1_500.0), 100).verdict,
            Verdict::TooFew
        );
    }
}
