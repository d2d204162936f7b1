//! `twtrace report`: the aggregator, run offline over recordings.

use anyhow::{Context as _, bail};
use twtrace::{
    cli::{ReportArgs, parse_offset},
    output::report_text,
    record::{Frames, Reader},
    report::{self, Window},
};

/// Opens trace files: each header is read now, the frames as the report goes.
pub fn open(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<(String, Reader)>> {
    files
        .iter()
        .map(|f| Ok((f.display().to_string(), Reader::open(f)?)))
        .collect()
}

/// Builds the report of `traces`, then warns on stderr about the damage reading them found
/// (the report itself lists it among its warnings too).
pub fn build(
    traces: &mut [(String, Reader)],
    filters: &twtrace::filter::Filters,
    window: Window,
) -> anyhow::Result<report::Report> {
    let started = std::time::Instant::now();
    let r = report::build(traces, filters, window)?;
    log::info!(
        "aggregated {} events in {:.2} s",
        r.events,
        started.elapsed().as_secs_f64()
    );
    for w in traces.iter().flat_map(|(_, t)| t.warnings()) {
        eprintln!("twtrace: warning: {w}");
    }
    Ok(r)
}

/// `--from`/`--to`: RFC 3339, or an offset from the first event.
fn resolve(spec: &str, traces: &mut [(String, Reader)]) -> anyhow::Result<u64> {
    let mut first = None::<u64>;
    for (_, t) in traces.iter_mut() {
        if let Some(ts) = t.first_ts_ns()? {
            first = Some(first.map_or(ts, |f| f.min(ts)));
        }
    }
    let first = first.unwrap_or(0);
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
    let mut traces = open(&args.files)?;
    let window = Window {
        from_ns: args
            .from
            .as_deref()
            .map(|s| resolve(s, &mut traces))
            .transpose()?,
        to_ns: args
            .to
            .as_deref()
            .map(|s| resolve(s, &mut traces))
            .transpose()?,
    };
    if let (Some(f), Some(t)) = (window.from_ns, window.to_ns)
        && f > t
    {
        bail!("--from is after --to");
    }
    let r = build(&mut traces, &args.filter.filters()?, window)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", report_text::report(&r));
    }
    Ok(())
}
