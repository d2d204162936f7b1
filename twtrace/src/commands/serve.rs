//! `twtrace serve`: Prometheus metrics from the same aggregator as every other view.
//!
//! This loop owns the aggregator and renders the exposition; the metrics server runs on a
//! thread and runtime of its own ([`twtrace::http`]) and only ever gets the rendered text, so
//! a slow or hostile client cannot slow the tracer.

use std::time::Duration;

use anyhow::Context as _;
use twtrace::{
    aggregate::{Aggregator, MonotonicClock},
    cgroup::CgroupNames,
    cli::ServeArgs,
    event::Event,
    http::{server, snapshot, web_config::WebConfig},
    metrics::Exporter,
    source::LiveSource,
};

use super::Stop;
use twtrace::kernel::hz;

pub async fn run(args: &ServeArgs, verbose: bool) -> anyhow::Result<()> {
    let filters = args.filter.filters()?;
    twtrace::filter_now::warn(&filters);
    let ring = super::ring_bytes(args.ring_mib)?;
    let web = match &args.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    // Before attaching: a signal from the moment twtrace says it is tracing ends it cleanly.
    let mut stop = Stop::new(args.duration)?;
    let mut source = LiveSource::start(&filters, verbose, ring, true)?;
    let listener =
        server::bind(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut cgroups = CgroupNames::default();
    let mut agg = Aggregator::new(MonotonicClock, hz());
    let mut exporter = Exporter::new(Box::new(move |id| cgroups.display(id)));
    let whole = filters.whole_namespaces();
    let render =
        |exporter: &mut Exporter, agg: &Aggregator<MonotonicClock>| exporter.render(agg, whole);
    let (mut publisher, reader) = snapshot::channel(render(&mut exporter, &agg));
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    server::spawn(listener, web, reader).context("starting the metrics server")?;
    eprintln!(
        "twtrace: serving metrics on {scheme}://{}/metrics",
        args.listen
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut events = Vec::new();
    let mut records = Vec::new();
    loop {
        tokio::select! {
            r = source.read(&mut events) => r.context("reading kernel events")?,
            _ = tick.tick() => {
                source.tick(&mut agg);
                publisher.publish(render(&mut exporter, &agg));
            }
            _ = publisher.wanted() => publisher.publish(render(&mut exporter, &agg)),
            _ = stop.requested() => return Ok(()),
        }
        for e in events.drain(..) {
            if let Event::TwEnter(t) = &e {
                exporter.entered(
                    t.role,
                    t.closer.as_ref().map(|p| (p.comm.as_ref(), p.cgroup_id)),
                );
            }
            agg.ingest(e, &mut records);
        }
        for r in records.drain(..) {
            exporter.observe(&r);
        }
    }
}
