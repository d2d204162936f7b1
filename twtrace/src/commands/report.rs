//! `twtrace report`: the aggregator, run offline over recordings.

use anyhow::{Context as _, bail};
use twtrace::{
    cli::{ReportArgs, parse_offset},
    output::report_text,
    record::{self, Trace},
    report::{self, Window},
};

/// Reads trace files, warning about damage on stderr.
pub fn load(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<(String, Trace)>> {
    let mut out = Vec::new();
    for f in files {
        let started = std::time::Instant::now();
        let t = record::read(f)?;
        log::info!(
            "read {} ({} frames) in {:.2} s",
            f.display(),
            t.frames.len(),
            started.elapsed().as_secs_f64()
        );
        for w in &t.warnings {
            eprintln!("twtrace: warning: {w}");
        }
        out.push((f.display().to_string(), t));
    }
    Ok(out)
}

/// `--from`/`--to`: RFC 3339, or an offset from the first event.
fn resolve(spec: &str, traces: &[(String, Trace)]) -> anyhow::Result<u64> {
    let first = traces
        .iter()
        .filter_map(|(_, t)| t.first_ts_ns())
        .min()
        .unwrap_or(0);
    if let Some(off) = parse_offset(spec) {
        return Ok(first + off);
    }
    let t = chrono::DateTime::parse_from_rfc3339(spec).with_context(|| {
        format!("{spec:?} is neither RFC 3339 (2026-11-21T10:00:00Z) nor an offset (30s, 5m)")
    })?;
    let offset = traces.first().map_or(0, |(_, t)| t.header.clock_offset_ns);
    let unix_ns = t.timestamp_nanos_opt().unwrap_or(0) as i128;
    Ok((unix_ns - offset).max(0) as u64)
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let traces = load(&args.files)?;
    let window = Window {
        from_ns: args
            .from
            .as_deref()
            .map(|s| resolve(s, &traces))
            .transpose()?,
        to_ns: args
            .to
            .as_deref()
            .map(|s| resolve(s, &traces))
            .transpose()?,
    };
    if let (Some(f), Some(t)) = (window.from_ns, window.to_ns)
        && f > t
    {
        bail!("--from is after --to");
    }
    let started = std::time::Instant::now();
    let r = report::build(&traces, &args.filter.filters()?, window);
    log::info!(
        "aggregated {} events in {:.2} s",
        r.events,
        started.elapsed().as_secs_f64()
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report_text::report(&r));
    }
    Ok(())
}
