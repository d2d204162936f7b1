//! `twtrace trace`: streams finished TIME_WAITs and TIME_WAIT-less closes.

use std::{
    io::{self, BufWriter, Write as _},
    time::Duration,
};

use super::Stop;
use anyhow::Context as _;
use twtrace::{
    advice::{self, Evidence},
    aggregate::{Aggregator, MonotonicClock, Record},
    cgroup::CgroupNames,
    cli::TraceArgs,
    kernel::{hz, tracer::Loss},
    output::{TimeBase, json, lines},
    reconcile,
    source::LiveSource,
};

pub async fn run(args: &TraceArgs, verbose: bool) -> anyhow::Result<()> {
    let filters = args.filter.filters()?;
    twtrace::filter_now::warn(&filters);
    let ring = super::ring_bytes(args.ring_mib)?;
    // Before attaching: a signal from the moment twtrace says it is tracing ends it cleanly.
    let mut stop = Stop::new(args.duration)?;
    let mut source = LiveSource::start(&filters, verbose, ring, !args.no_existing)?;
    let mut agg = Aggregator::new(MonotonicClock, hz());
    let mut printer = Printer {
        json: args.json,
        tb: TimeBase::now(),
        cgroups: CgroupNames::default(),
        // Large writes: a line per TIME_WAIT at the host's churn rate.
        out: BufWriter::with_capacity(1 << 16, io::stdout().lock()),
        records: Vec::new(),
        line: String::new(),
        advised: std::collections::HashSet::new(),
    };
    if !args.json {
        writeln!(printer.out, "{}", lines::HEADER)?;
        printer.out.flush()?;
        // The lines' TIME is local: say in which zone, once (JSON times are UTC).
        let now = twtrace::aggregate::Clock::now_ns(&MonotonicClock);
        eprintln!(
            "twtrace: TIME is local time ({})",
            twtrace::live::time::zone(&printer.tb, now)
        );
    }
    eprintln!("twtrace: tracing TIME_WAIT; Ctrl-C to stop");

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    let mut events = Vec::new();
    let mut reported = Loss::default();

    loop {
        tokio::select! {
            r = source.read(&mut events) => r.context("reading kernel events")?,
            _ = tick.tick() => {
                source.tick(&mut agg);
                reported = warn_new_loss(source.loss(), &reported);
                ticks += 1;
                if ticks.is_multiple_of(PRESSURE_EVERY_S)
                    && printer.pressure(&agg, args.pressure_pct)?
                {
                    return Ok(());
                }
            }
            _ = stop.requested() => break,
        }
        if printer.emit(&mut agg, &mut events)? {
            return Ok(()); // the reader went away (e.g. `| head`)
        }
    }
    // What the kernel wrote before we stopped still counts.
    source.drain(&mut events);
    printer.emit(&mut agg, &mut events)?;
    // Advice that came to hold since the last pressure tick (a trace shorter than one, say).
    let last = printer.new_advice(&agg, &agg.pressure());
    printer.write(&last)?;
    let mut stdout = printer.out;
    let loss = source.loss();
    if args.json {
        // A last object with the totals, so a consumer knows what the stream covered and lost.
        let mut summary = json::summary(
            &agg,
            &loss,
            source.decode_errors(),
            filters.whole_namespaces(),
        );
        summary["degraded"] = source.degraded().into();
        let _ = writeln!(stdout, "{summary}").and_then(|_| stdout.flush());
    }
    drop(stdout);
    summary(
        &agg,
        &loss,
        source.decode_errors(),
        filters.whole_namespaces(),
    );
    for d in source.degraded() {
        eprintln!("twtrace: {d}");
    }
    Ok(())
}

/// How often port pressure above `--pressure-pct` is printed.
const PRESSURE_EVERY_S: u64 = 10;

/// Prints the aggregator's records as they come.
struct Printer<W: io::Write> {
    json: bool,
    tb: TimeBase,
    cgroups: CgroupNames,
    out: W,
    records: Vec<Record>,
    /// Reused for every line.
    line: String,
    /// Advice already printed, by (rule, subject): each is printed once, when it first holds.
    advised: std::collections::HashSet<(&'static str, String)>,
}

impl<W: io::Write> Printer<W> {
    /// Feeds events to the aggregator and prints its records. Returns true on a broken pipe.
    fn emit(
        &mut self,
        agg: &mut Aggregator<MonotonicClock>,
        events: &mut Vec<twtrace::event::Event>,
    ) -> anyhow::Result<bool> {
        let mut failed = false;
        for e in events.drain(..) {
            failed |= matches!(e, twtrace::event::Event::PortFailure(_));
            agg.ingest(e, &mut self.records);
        }
        if self.records.is_empty() {
            return Ok(false);
        }
        let mut write = || -> io::Result<()> {
            for r in self.records.drain(..) {
                self.line.clear();
                if self.json {
                    self.line
                        .push_str(&json::line(&r, &self.tb, &mut self.cgroups));
                } else {
                    lines::write_line(&mut self.line, &r, &self.tb);
                }
                self.line.push('\n');
                self.out.write_all(self.line.as_bytes())?;
            }
            self.out.flush()
        };
        if let Some(done) = broken_pipe(write())? {
            return Ok(done);
        }
        let advice = if failed {
            self.new_advice(agg, &agg.pressure())
        } else {
            Vec::new()
        };
        self.write(&advice)
    }

    /// Destinations at or above `pct`% port pressure, and any advice that newly holds.
    fn pressure(&mut self, agg: &Aggregator<MonotonicClock>, pct: f64) -> anyhow::Result<bool> {
        let now = agg.now_ns();
        let pressure = agg.pressure();
        let mut lines: Vec<String> = pressure
            .iter()
            .filter(|p| p.percent >= pct)
            .map(|p| {
                if self.json {
                    json::pressure_line(p, &self.tb, now)
                } else {
                    lines::pressure_line(p, &self.tb, now)
                }
            })
            .collect();
        lines.extend(self.new_advice(agg, &pressure));
        self.write(&lines)
    }

    fn new_advice(
        &mut self,
        agg: &Aggregator<MonotonicClock>,
        pressure: &[twtrace::aggregate::Pressure],
    ) -> Vec<String> {
        let now = agg.now_ns();
        advice::advise(&Evidence::of(agg, pressure))
            .into_iter()
            .filter(|a| self.advised.insert((a.rule, a.subject.clone())))
            .map(|a| {
                if self.json {
                    json::advice_line(&a, &self.tb, now)
                } else {
                    lines::advice_line(&a, &self.tb, now)
                }
            })
            .collect()
    }

    /// Returns true on a broken pipe.
    fn write(&mut self, lines: &[String]) -> anyhow::Result<bool> {
        if lines.is_empty() {
            return Ok(false);
        }
        let mut write = || -> io::Result<()> {
            for l in lines {
                writeln!(self.out, "{l}")?;
            }
            self.out.flush()
        };
        Ok(broken_pipe(write())?.unwrap_or(false))
    }
}

/// `Some(true)` when the reader went away, an error for any other failure to write.
fn broken_pipe(r: io::Result<()>) -> anyhow::Result<Option<bool>> {
    match r {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(Some(true)),
        Err(e) => Err(e).context("writing output"),
    }
}

/// Never lose data silently: say so as soon as the kernel side drops anything.
pub fn warn_new_loss(now: Loss, before: &Loss) -> Loss {
    if now.ringbuf_full > before.ringbuf_full {
        eprintln!(
            "twtrace: WARNING: {} events lost (ring buffer full); try a larger --ring-mib or a filter",
            now.ringbuf_full - before.ringbuf_full
        );
    }
    if now.recursion_misses > before.recursion_misses {
        eprintln!(
            "twtrace: WARNING: {} program runs skipped by the kernel (recursion misses)",
            now.recursion_misses - before.recursion_misses
        );
    }
    now
}

/// The summary on stderr; `whole` when the filters let all of each namespace's traffic
/// through, so the counts are checked against the kernel's.
pub fn summary(agg: &Aggregator<MonotonicClock>, loss: &Loss, decode_errors: u64, whole: bool) {
    let t = agg.totals();
    eprintln!(
        "twtrace: {} TIME_WAITs entered ({} found at start, {} starts recovered by the sweep), {} ended (expired {}, of which {} found gone by the end check; reused {}, recycled {}, reset {}, purged {}), {} still alive, {} whose end was never seen; closes without TIME_WAIT: overflow {}, abort {}, peer reset {}",
        t.entered,
        t.preexisting,
        t.recovered,
        t.ended,
        t.expired,
        t.ends_recovered,
        t.reused,
        t.recycled,
        t.reset,
        t.purged,
        agg.alive_count(),
        t.overdue_dropped,
        t.overflow,
        t.abort,
        t.peer_reset
    );
    eprintln!(
        "twtrace: lost events: {} (ring buffer full); recursion misses: {}; failed kernel reads: {}; connection map failures: {}; undecodable records: {}; ends of TIME_WAITs never seen starting: {}",
        loss.ringbuf_full,
        loss.recursion_misses,
        loss.read_fail,
        loss.conn_map_fail,
        decode_errors,
        agg.ends_without_start()
    );
    if whole {
        for c in agg.kernel_checks() {
            eprintln!("twtrace: {}", reconcile::describe(&c));
        }
    } else {
        eprintln!(
            "twtrace: kernel check: not made (the filters pass part of each namespace's traffic)"
        );
    }
    for a in advice::advise(&Evidence::of(agg, &agg.pressure())) {
        eprintln!("twtrace: advice: {}", a.text);
    }
}
