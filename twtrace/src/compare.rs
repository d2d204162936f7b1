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

/// Which way a measure is better, when one is: fewer failures are, a higher reuse share is
/// only a remedy at work and says nothing by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Lower,
    Neither,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Measure {
    pub name: &'static str,
    pub before: Option<f64>,
    pub after: Option<f64>,
    pub change: Option<f64>,
    pub change_pct: Option<f64>,
    pub verdict: Verdict,
    /// For a change: whether it is for the better (`None` when neither way is).
    pub better: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub before: Vec<String>,
    pub after: Vec<String>,
    pub settings: Vec<SettingDiff>,
    pub measures: Vec<Measure>,
    /// What limits the comparison (a recording too short to say anything, damage read
    /// around), one sentence each.
    pub warnings: Vec<String>,
}

/// |z| below this is noise (about 95%).
const Z: f64 = 2.0;
/// Lifetime quantiles come from log buckets about 9% wide: smaller changes are not measured.
const QUANTILE_PRECISION: f64 = 0.10;
const MIN_SAMPLES: u64 = 20;
/// A recording shorter than this says nothing about a rate.
const MIN_SPAN_S: f64 = 1.0;

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
        better: None,
    }
}

/// Says whether a change of `m` is for the better.
fn judged(mut m: Measure, better: Better) -> Measure {
    m.better = match (m.verdict, better, m.change) {
        (Verdict::Changed, Better::Lower, Some(d)) => Some(d < 0.0),
        _ => None,
    };
    m
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
    let peak = |r: &Report| r.pressure_peaks.first().map_or(0.0, |p| p.pressure.percent);
    use Better::{Lower, Neither};
    let values = vec![
        (
            share(
                "TIME_WAITs per 1000 connections closed",
                bt.entered,
                b.connections_closed,
                at.entered,
                a.connections_closed,
                1000.0,
            ),
            Lower,
        ),
        // Follows the load (more connections made, more TIME_WAITs): per 1000 closed says
        // what the change did.
        (
            rate(
                "TIME_WAITs entered per minute",
                bt.entered,
                tb,
                at.entered,
                ta,
            ),
            Neither,
        ),
        (
            level(
                "TIME_WAITs alive, peak",
                b.alive_peak as f64,
                a.alive_peak as f64,
            ),
            Lower,
        ),
        (
            level("TIME_WAITs alive, mean", b.alive_mean, a.alive_mean),
            Lower,
        ),
        // Shorter is not better by itself: it is TIME_WAIT's protection, cut short.
        (
            quantile(
                "lifetime p50 (ms)",
                b.lifetime.p50_ms,
                b.lifetime.count,
                a.lifetime.p50_ms,
                a.lifetime.count,
            ),
            Neither,
        ),
        (
            quantile(
                "lifetime p99 (ms)",
                b.lifetime.p99_ms,
                b.lifetime.count,
                a.lifetime.p99_ms,
                a.lifetime.count,
            ),
            Neither,
        ),
        (
            share(
                "% reused by connect",
                bt.reused,
                bt.ended,
                at.reused,
                at.ended,
                100.0,
            ),
            Neither,
        ),
        (
            share(
                "% recycled by SYN",
                bt.recycled,
                bt.ended,
                at.recycled,
                at.ended,
                100.0,
            ),
            Neither,
        ),
        (
            rate("RST kills per minute", bt.reset, tb, at.reset, ta),
            Neither,
        ),
        (
            rate("overflows per minute", bt.overflow, tb, at.overflow, ta),
            Lower,
        ),
        (rate("aborts per minute", bt.abort, tb, at.abort, ta), Lower),
        (
            rate(
                "EADDRNOTAVAIL per minute",
                b.failures.connect_eaddrnotavail,
                tb,
                a.failures.connect_eaddrnotavail,
                ta,
            ),
            Lower,
        ),
        (
            rate(
                "EADDRINUSE per minute",
                b.failures.bind_eaddrinuse,
                tb,
                a.failures.bind_eaddrinuse,
                ta,
            ),
            Lower,
        ),
        (level("peak port pressure (%)", peak(b), peak(a)), Lower),
    ];
    let mut warnings = Vec::new();
    let mut too_short = false;
    for (side, r) in [("before", b), ("after", a)] {
        if r.events < MIN_SAMPLES || r.span_s < MIN_SPAN_S {
            too_short = true;
            warnings.push(format!(
                "{side} ({}) covers {:.1} s and {} events: too little to compare; its changes are marked too few to say",
                r.files.join(", "),
                r.span_s,
                r.events
            ));
        }
        warnings.extend(r.warnings.iter().map(|w| format!("{side}: {w}")));
    }
    let measures = values
        .into_iter()
        .map(|(mut m, better)| {
            if too_short && m.verdict == Verdict::Changed {
                m.verdict = Verdict::TooFew;
            }
            judged(m, better)
        })
        .collect();
    Comparison {
        before: b.files.clone(),
        after: a.files.clone(),
        settings: settings_diff(b, a),
        measures,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_judged_better_or_worse_where_one_way_is_better() {
        let fewer = judged(rate("x", 400, 1.0, 100, 1.0), Better::Lower);
        assert_eq!(
            (fewer.verdict, fewer.better),
            (Verdict::Changed, Some(true))
        );
        let more = judged(rate("x", 100, 1.0, 400, 1.0), Better::Lower);
        assert_eq!(more.better, Some(false));
        let neither = judged(rate("x", 100, 1.0, 400, 1.0), Better::Neither);
        assert_eq!(neither.better, None);
        let noise = judged(rate("x", 100, 1.0, 110, 1.0), Better::Lower);
        assert_eq!(noise.better, None);
    }

    #[test]
    fn a_baseline_too_short_to_compare_is_said_and_changes_nothing() {
        use crate::{
            aggregate::tests::enter,
            event::{Substate, TwKey},
            record::{Header, InMemory},
            report::{Window, build},
        };
        let report = |n: u64| {
            let evs = (0..n)
                .map(|i| {
                    enter(
                        TwKey::Cookie(i + 1),
                        (i + 1) * 1_000_000_000,
                        Substate::TimeWait,
                    )
                })
                .collect();
            let mut t = [(
                format!("{n}.twt"),
                InMemory {
                    header: Header::new("h", 250),
                    frames: vec![evs].into(),
                    warnings: vec![],
                },
            )];
            build(&mut t, &Default::default(), Window::default()).unwrap()
        };
        let c = compare(&report(1), &report(60));
        assert!(
            c.warnings[0].starts_with("before (1.twt) covers 0.0 s and 1 events"),
            "{:?}",
            c.warnings
        );
        assert!(c.measures.iter().all(|m| m.verdict != Verdict::Changed));
        let fair = compare(&report(40), &report(60));
        assert!(fair.warnings.is_empty(), "{:?}", fair.warnings);
    }

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
