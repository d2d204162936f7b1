//! `twtrace record`: every event of the aggregator's input, to a file.

use std::{collections::BTreeMap, io::Write as _, time::Duration};

use anyhow::Context as _;
use twtrace::{
    aggregate::{Aggregator, MonotonicClock},
    cgroup::CgroupNames,
    cli::RecordArgs,
    event::Event,
    kernel::{hz, netns, settings},
    output::{TimeBase, json},
    record::{Header, Recorder, Rotation, Session},
    safe_file::Existing,
    source::LiveSource,
};

use super::{
    Stop,
    trace::{summary, warn_new_loss},
};

pub async fn run(args: &RecordArgs, verbose: bool) -> anyhow::Result<()> {
    let filters = args.filter.filters()?;
    twtrace::filter_now::warn(&filters);
    let ring = super::ring_bytes(args.ring_mib)?;
    let existing = if args.force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    // Refuse the output path before attaching (create checks again as it creates).
    Recorder::check(&args.output, existing)?;
    // Before attaching: a signal from the moment twtrace says it is tracing ends it cleanly.
    let mut stop = Stop::new(args.duration)?;
    let mut source = LiveSource::start(&filters, verbose, ring, !args.no_existing)?;
    let hz = hz();
    let header = Header {
        kernel: super::read_proc("/proc/sys/kernel/osrelease"),
        boot_time: boot_time(),
        twtrace_version: env!("CARGO_PKG_VERSION").into(),
        command_line: std::env::args().collect(),
        clock_offset_ns: TimeBase::now().offset_ns(),
        settings: start_settings(filters.netns),
        degraded: source.degraded().to_vec(),
        ..Header::new(super::read_proc("/proc/sys/kernel/hostname"), hz)
    };
    let rec = Recorder::create(
        &args.output,
        existing,
        header,
        Rotation {
            max_bytes: args.max_size.unwrap_or(0),
            keep: args.keep,
        },
    )?;
    // The aggregator sees every event written: the summary at the end, and what each rotated
    // file restates at its top, come from it.
    let mut rec = Session::new(rec, Aggregator::new(MonotonicClock, hz));
    eprintln!(
        "twtrace: recording TIME_WAIT to {}; Ctrl-C to stop",
        args.output.display()
    );

    // A frame a second: a crash loses at most the frame being built.
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    let mut events = Vec::new();
    let mut reported = Default::default();
    let mut cgroups = CgroupNames::default();
    let mut seen_cgroups = std::collections::HashSet::new();
    loop {
        tokio::select! {
            r = source.read(&mut events) => r.context("reading kernel events")?,
            _ = flush.tick() => {
                rec.flush()?;
                source.tick(&mut rec.agg);
                reported = warn_new_loss(source.loss(), &reported);
            }
            _ = stop.requested() => break,
        }
        for e in events.drain(..) {
            if let Some(id) = e.cgroup_id()
                && seen_cgroups.insert(id)
                && let Some(path) = cgroups.path(id)
            {
                rec.push(Event::Cgroup {
                    ts_ns: e.ts_ns(),
                    id,
                    path: path.to_string(),
                })?;
            }
            rec.push(e)?;
        }
    }
    source.drain(&mut events);
    events.push(source.snapshot());
    for e in events.drain(..) {
        rec.push(e)?;
    }
    rec.rec.flush()?;
    let agg = &rec.agg;
    let loss = source.loss();
    eprintln!(
        "twtrace: recorded {} events in {} bytes ({:.1} bytes/event) to {}",
        rec.rec.events,
        rec.rec.bytes,
        rec.rec.bytes as f64 / rec.rec.events.max(1) as f64,
        args.output.display()
    );
    summary(
        agg,
        &loss,
        source.decode_errors(),
        filters.whole_namespaces(),
    );
    if args.json {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            json::summary(
                agg,
                &loss,
                source.decode_errors(),
                filters.whole_namespaces()
            )
        )?;
    }
    Ok(())
}

/// Boot time from /proc/stat's btime, RFC 3339.
fn boot_time() -> String {
    let btime = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<i64>().ok())
        })
        .unwrap_or(0);
    chrono::DateTime::from_timestamp(btime, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_default()
}

/// The settings of each traced namespace as the recording starts.
fn start_settings(only: Option<u32>) -> BTreeMap<String, twtrace::event::NetnsSettings> {
    netns::joinable()
        .into_iter()
        .filter(|n| only.is_none_or(|o| o == n.inode))
        .filter_map(|n| {
            let s = netns::run_in(&n.path, settings::read).ok()?;
            Some((n.inode.to_string(), s))
        })
        .collect()
}
