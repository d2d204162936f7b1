//! Reports and comparisons as text for a person.

use std::fmt::Write as _;

use crate::{
    compare::{Comparison, Verdict},
    report::Report,
    text::{count, count_as},
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

/// An RFC 3339 time of a report as a person reads it: date, time and zone.
fn when(rfc: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc).map_or_else(
        |_| rfc.to_string(),
        |t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M:%S%.3f UTC")
                .to_string()
        },
    )
}

/// Minute-of-day of a timeline row, with its date.
fn bucket(rfc: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc).map_or_else(
        |_| rfc.to_string(),
        |t| {
            t.with_timezone(&chrono::Utc)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        },
    )
}

/// Timeline rows printed at most; the rest are in `--json`.
const TIMELINE_ROWS: usize = 60;

pub fn report(r: &Report) -> String {
    let mut o = String::new();
    let t = &r.totals;
    let _ = writeln!(o, "twtrace report: {}", r.files.join(", "));
    let _ = writeln!(
        o,
        "host {} (kernel {}), {} .. {} ({:.1} s, {})",
        r.hostname,
        r.kernel,
        r.from.as_deref().map_or("-".into(), when),
        r.to.as_deref().map_or("-".into(), when),
        r.span_s,
        count(r.events, "event")
    );
    for d in &r.degraded {
        let _ = writeln!(o, "NOTE (recording kernel): {d}");
    }
    for w in &r.warnings {
        let _ = writeln!(o, "WARNING: {w}");
    }
    let _ = writeln!(o, "\nTIME_WAIT");
    let mut start = Vec::new();
    if t.preexisting > 0 {
        start.push(format!("{} found at start", t.preexisting));
    }
    if t.carried > 0 {
        start.push(format!("{} carried over from the file before", t.carried));
    }
    if r.alive_at_start > 0 {
        start.push(format!("{} alive when the counts began", r.alive_at_start));
    }
    let _ = writeln!(
        o,
        "  {} entered ({} client, {} server){}; alive at peak {}, on average {:.0}, at the end {}",
        count(t.entered, "TIME_WAIT"),
        t.client,
        t.server,
        if start.is_empty() {
            String::new()
        } else {
            format!(", {}", start.join(", "))
        },
        r.alive_peak,
        r.alive_mean,
        r.alive_at_end
    );
    match r.time_waits_per_1000_closed {
        Some(per) => {
            let _ = writeln!(
                o,
                "  {per:.0} TIME_WAITs per 1000 connections closed ({} closed)",
                r.connections_closed
            );
        }
        None if r.passive_closes.is_none() => {
            let _ = writeln!(
                o,
                "  TIME_WAITs per 1000 connections closed: not known under these filters ({} closed first)",
                r.connections_closed
            );
        }
        None => {}
    }
    let l = &r.lifetime;
    let _ = writeln!(
        o,
        "  lifetime: mean {}  p50 {}  p90 {}  p99 {}  max {}  ({} ended)",
        ms(l.mean_ms),
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
    if let (Some(a), Some(b)) = (&r.trouble_from, &r.trouble_to) {
        let _ = writeln!(
            o,
            "Trouble (failed connects or binds, overflows): first {}, last {}",
            when(a),
            when(b)
        );
    }
    timeline(&mut o, r);
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
    if !r.pressure_peaks.is_empty() {
        let _ = writeln!(o, "\nPORT PRESSURE PEAKS");
        for p in &r.pressure_peaks {
            let q = &p.pressure;
            let _ = writeln!(
                o,
                "  {} netns {} {} -> {}:{}: {}/{} ports held ({:.1}%: {} in TIME_WAIT, {} live)",
                when(&p.at),
                q.dest.netns,
                q.dest.laddr,
                q.dest.raddr,
                q.dest.rport,
                q.held,
                q.usable,
                q.percent,
                q.time_wait,
                q.live
            );
        }
    }
    if !r.settings.is_empty() {
        let _ = writeln!(o, "\nSETTINGS (last read in each namespace)");
        for (ns, s) in &r.settings {
            let _ = writeln!(
                o,
                "  netns {ns}: tcp_tw_reuse {}{}, tcp_max_tw_buckets {}, ip_local_port_range {}-{} ({} usable), tcp_fin_timeout {}, tcp_timestamps {}, tcp_rfc1337 {}",
                s.tcp_tw_reuse,
                s.tcp_tw_reuse_delay_ms
                    .map_or(String::new(), |d| format!(" (delay {d} ms)")),
                s.tcp_max_tw_buckets,
                s.port_range.0,
                s.port_range.1,
                s.usable_ports(),
                s.tcp_fin_timeout,
                s.tcp_timestamps,
                s.tcp_rfc1337
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
        "\nLost while recording: {} (ring buffer full), {}; {} recovered by the sweep, {} never seen starting, {} whose end was never seen",
        count(loss.ringbuf_full, "event"),
        count_as(loss.recursion_misses, "recursion miss", "recursion misses"),
        count(t.recovered, "TIME_WAIT start"),
        count(r.ends_without_start, "end"),
        count(t.overdue_dropped, "TIME_WAIT")
    );
    let _ = writeln!(
        o,
        "{} TIME_WAIT ends found by the end check (gone once due; counted as expired)",
        t.ends_recovered
    );
    match &r.kernel_checks {
        None => {
            let _ = writeln!(
                o,
                "Kernel check: not made (a filter passed part of each namespace's traffic)"
            );
        }
        Some(checks) if checks.is_empty() => {
            let _ = writeln!(
                o,
                "Kernel check: not made (fewer than two readings of the kernel's counters)"
            );
        }
        Some(checks) => {
            for c in checks {
                let _ = writeln!(o, "{}", crate::reconcile::describe(c));
            }
        }
    }
    o
}

/// The timeline: a row per bucket with something in it.
fn timeline(o: &mut String, r: &Report) {
    if r.timeline.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nTIMELINE (per {})\n  {:<22} {:>9} {:>9} {:>9} {:>9}",
        if r.timeline_bucket_s == 60 {
            "minute".to_string()
        } else {
            format!("{} s", r.timeline_bucket_s)
        },
        "FROM",
        "ENTERED",
        "CONNECT",
        "BIND",
        "OVERFLOW"
    );
    let rows = &r.timeline;
    let half = TIMELINE_ROWS / 2;
    for (i, row) in rows.iter().enumerate() {
        if rows.len() > TIMELINE_ROWS && i == half {
            let _ = writeln!(
                o,
                "  ... {} more (--json has them all)",
                rows.len() - TIMELINE_ROWS
            );
        }
        if rows.len() > TIMELINE_ROWS && i >= half && i < rows.len() - half {
            continue;
        }
        let c = &row.counts;
        let _ = writeln!(
            o,
            "  {:<22} {:>9} {:>9} {:>9} {:>9}{}",
            bucket(&row.start),
            c.entered,
            c.connect_failures,
            c.bind_failures,
            c.overflows,
            if c.trouble() { "  <-" } else { "" }
        );
    }
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
