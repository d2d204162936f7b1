//! Reports and comparisons as text for a person.

use std::fmt::Write as _;

use crate::{
    compare::{Comparison, Verdict},
    report::Report,
};

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| {
        if v >= 10_000.0 {
            format!("{:.1}s", v / 1000.0)
        } else {
            format!("{v:.1}ms")
        }
    })
}

pub fn report(r: &Report) -> String {
    let mut o = String::new();
    let t = &r.totals;
    let _ = writeln!(o, "twtrace report: {}", r.files.join(", "));
    let _ = writeln!(
        o,
        "host {} (kernel {}), {} .. {} ({:.1} s, {} events)",
        r.hostname,
        r.kernel,
        r.from.as_deref().unwrap_or("-"),
        r.to.as_deref().unwrap_or("-"),
        r.span_s,
        r.events
    );
    for d in &r.degraded {
        let _ = writeln!(o, "NOTE (recording kernel): {d}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "WARNING: {w}");
    }
    let _ = writeln!(o, "\nTIME_WAIT");
    let _ = writeln!(
        o,
        "  entered {} ({} client, {} server), {} found at start; alive at peak {}, on average {:.0}",
        t.entered, t.client, t.server, t.preexisting, r.alive_peak, r.alive_mean
    );
    if let Some(per) = r.time_waits_per_1000_closed {
        let _ = writeln!(
            o,
            "  {per:.0} TIME_WAITs per 1000 connections closed ({} closed)",
            r.connections_closed
        );
    }
    let l = &r.lifetime;
    let _ = writeln!(
        o,
        "  lifetime: p50 {}  p90 {}  p99 {}  max {}  ({} ended)",
        ms(l.p50_ms),
        ms(l.p90_ms),
        ms(l.p99_ms),
        ms(l.max_ms),
        l.count
    );
    let ends: Vec<String> = r
        .ends
        .iter()
        .map(|e| format!("{} {} ({:.1}%)", e.end.as_str(), e.count, e.percent))
        .collect();
    let _ = writeln!(o, "  ended: {}", ends.join(", "));
    let _ = writeln!(
        o,
        "\nWithout TIME_WAIT: overflow {} ({:.1}/min), abort {} ({:.1}/min), peer reset {}",
        t.overflow, r.overflow_per_min, t.abort, r.abort_per_min, t.peer_reset
    );
    let f = &r.failures;
    let _ = writeln!(
        o,
        "Failures: connect EADDRNOTAVAIL {} ({:.1}/min), bind EADDRINUSE {} ({:.1}/min)",
        f.connect_eaddrnotavail, f.connect_per_min, f.bind_eaddrinuse, f.bind_per_min
    );
    if !r.processes.is_empty() {
        let _ = writeln!(
            o,
            "\nPROCESSES (closed first)\n  {:<8} {:<16} {:<24} {:>9} {:>7} {:>7} {:>8} {:>9} {:>10} {:>10}",
            "PID",
            "COMM",
            "CONTAINER",
            "TW",
            "CLIENT",
            "SERVER",
            "REUSED",
            "RECYCLED",
            "MEAN",
            "P99"
        );
        for p in &r.processes {
            let _ = writeln!(
                o,
                "  {:<8} {:<16} {:<24} {:>9} {:>7} {:>7} {:>7.1}% {:>8.1}% {:>10} {:>10}",
                crate::event::pid_text(p.pid),
                p.comm,
                p.container.as_deref().unwrap_or("-"),
                p.entered,
                p.client,
                p.server,
                p.reused_pct,
                p.recycled_pct,
                ms(p.lifetime.mean_ms),
                ms(p.lifetime.p99_ms)
            );
        }
    }
    if !r.destinations.is_empty() {
        let _ = writeln!(
            o,
            "\nDESTINATIONS (client side)\n  {:<12} {:<40} {:>9} {:>9} {:>14}",
            "NETNS", "REMOTE", "TW ENDED", "FAILED", "PEAK PRESSURE"
        );
        for d in &r.destinations {
            let _ = writeln!(
                o,
                "  {:<12} {:<40} {:>9} {:>9} {:>14}",
                d.netns,
                format!("{}:{}", d.raddr, d.rport),
                d.time_waits,
                d.connect_failures,
                d.peak_pressure_pct
                    .map_or("-".into(), |p| format!("{p:.1}%"))
            );
        }
    }
    if !r.advice.is_empty() {
        let _ = writeln!(o, "\nADVICE");
        for a in &r.advice {
            let _ = writeln!(o, "  - {}", a.text);
        }
    }
    let loss = &r.loss;
    let _ = writeln!(
        o,
        "\nLost while recording: {} events (ring buffer full), {} recursion misses; {} TIME_WAIT starts recovered by the sweep, {} ends never seen starting, {} TIME_WAITs whose end was never seen",
        loss.ringbuf_full,
        loss.recursion_misses,
        t.recovered,
        r.ends_without_start,
        t.overdue_dropped
    );
    o
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 100.0 || v.fract() == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    }
}

pub fn comparison(c: &Comparison) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "before: {}\nafter:  {}",
        c.before.join(", "),
        c.after.join(", ")
    );
    if c.settings.is_empty() {
        let _ = writeln!(o, "\nsettings: the same");
    } else {
        let _ = writeln!(o, "\nsettings that differ:");
        for s in &c.settings {
            let _ = writeln!(o, "  {:<24} {} -> {}", s.name, s.before, s.after);
        }
    }
    // Columns as wide as their widest cell, two spaces apart: a long change never runs into
    // its neighbours.
    let rows: Vec<[String; 5]> = c
        .measures
        .iter()
        .map(|m| {
            let change = match (m.change, m.change_pct) {
                (Some(d), Some(p)) => format!("{} ({p:+.0}%)", signed(d)),
                (Some(d), None) => signed(d),
                _ => "-".into(),
            };
            let verdict = match (m.verdict, m.better) {
                (Verdict::Same, _) => "same",
                (Verdict::WithinNoise, _) => "within noise",
                (Verdict::Changed, Some(true)) => "CHANGED: better",
                (Verdict::Changed, Some(false)) => "CHANGED: worse",
                (Verdict::Changed, None) => "CHANGED",
                (Verdict::TooFew, _) => "too few to say",
            };
            [
                m.name.to_string(),
                num(m.before),
                num(m.after),
                change,
                verdict.to_string(),
            ]
        })
        .collect();
    let head = ["MEASURE", "BEFORE", "AFTER", "CHANGE", "VERDICT"].map(String::from);
    let mut width = [0usize; 5];
    for r in std::iter::once(&head).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let _ = writeln!(o);
    for r in std::iter::once(&head).chain(&rows) {
        let _ = writeln!(
            o,
            "  {:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
        );
    }
    if !c.warnings.is_empty() {
        let _ = writeln!(o);
        for w in &c.warnings {
            let _ = writeln!(o, "warning: {w}");
        }
    }
    o
}

/// A change with its sign.
fn signed(d: f64) -> String {
    let n = num(Some(d.abs()));
    if d > 0.0 {
        format!("+{n}")
    } else if d < 0.0 {
        format!("-{n}")
    } else {
        n
    }
}
