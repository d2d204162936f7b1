//! `sudo twtrace` (the live view) and `twtrace replay` (the same view over a recording).

use std::{
    io::{self, IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use crossterm::event::{self, Event as TermEvent, KeyEventKind};
use twtrace::{
    aggregate::{Aggregator, Clock, MonotonicClock, ReplayClock},
    cgroup::CgroupNames,
    cli::{LiveArgs, ReplayArgs},
    event::Event,
    live::{
        keys,
        model::{Model, ViewState},
        time::clock_time,
        ui,
    },
    output::TimeBase,
    record::{Frames as _, Reader},
    source::LiveSource,
};

use super::Stop;
use twtrace::kernel::hz;

/// Where the view's events come from.
trait Feed {
    /// Waits for events and appends them.
    async fn read(&mut self, out: &mut Vec<Event>) -> anyhow::Result<()>;
    /// The aggregator's housekeeping, about once a second.
    fn tick<C: Clock>(&self, agg: &mut Aggregator<C>);
}

impl Feed for LiveSource {
    async fn read(&mut self, out: &mut Vec<Event>) -> anyhow::Result<()> {
        LiveSource::read(self, out)
            .await
            .context("reading kernel events")
    }

    fn tick<C: Clock>(&self, agg: &mut Aggregator<C>) {
        LiveSource::tick(self, agg);
    }
}

/// A recording played back at `speed`, driving the aggregator's clock.
struct Playback {
    reader: Reader,
    /// What is left of the frame being played.
    frame: std::vec::IntoIter<Event>,
    next: Option<Event>,
    clock: ReplayClock,
    first_ns: u64,
    started: Instant,
    speed: f64,
}

impl Feed for Playback {
    /// Cancel-safe (the view's select! drops it whenever a key or refresh comes first): the
    /// next event is only taken once it is due.
    async fn read(&mut self, out: &mut Vec<Event>) -> anyhow::Result<()> {
        let Some(next_ts) = self.next.as_ref().map(Event::ts_ns) else {
            // The end: hold the last picture until the user quits.
            std::future::pending::<()>().await;
            return Ok(());
        };
        let (started, first, speed) = (self.started, self.first_ns, self.speed);
        let due = move |ts: u64| {
            started + Duration::from_secs_f64(ts.saturating_sub(first) as f64 / 1e9 / speed)
        };
        tokio::time::sleep_until(due(next_ts).into()).await;
        let now = Instant::now();
        while let Some(ev) = self.next.take() {
            if due(ev.ts_ns()) > now {
                self.next = Some(ev);
                break;
            }
            self.clock.set(ev.ts_ns().max(self.clock.now_ns()));
            out.push(ev);
            self.next = self.next_event()?;
        }
        Ok(())
    }

    /// Housekeeping only: the end checks made while recording are in the recording.
    fn tick<C: Clock>(&self, agg: &mut Aggregator<C>) {
        agg.tick();
    }
}

impl Playback {
    /// The next recorded event, reading the next frame when this one is played out.
    fn next_event(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(e) = self.frame.next() {
                return Ok(Some(e));
            }
            match self.reader.next_frame()? {
                Some(f) => self.frame = f.into_iter(),
                None => {
                    for w in self.reader.warnings() {
                        log::warn!("{w}");
                    }
                    return Ok(None);
                }
            }
        }
    }
}

/// What the view shows about where it runs.
struct Identity {
    /// The namespace the view starts on (`--netns`).
    netns: Option<u32>,
    /// All of each namespace's traffic is traced (or was, in the recording played).
    whole_namespaces: bool,
    host: String,
    kernel: String,
    started_ns: u64,
    replay: Option<String>,
    tb: TimeBase,
}

pub async fn run(args: &LiveArgs, verbose: bool) -> anyhow::Result<()> {
    let filters = args.filter.filters()?;
    twtrace::filter_now::warn(&filters);
    let ring = super::ring_bytes(args.ring_mib)?;
    if args.interval < 0.1 {
        bail!("--interval must be at least 0.1 s");
    }
    // The signals first: from attaching on, SIGINT, SIGTERM and SIGHUP end the view cleanly.
    let stop = Stop::new(args.duration)?;
    // Start tracing before taking over the terminal, so errors print as one plain line.
    let source = LiveSource::start(&filters, verbose, ring, true)?;
    let agg = Aggregator::new(MonotonicClock, hz());
    let id = Identity {
        netns: filters.netns,
        whole_namespaces: filters.whole_namespaces(),
        host: super::read_proc("/proc/sys/kernel/hostname"),
        kernel: super::read_proc("/proc/sys/kernel/osrelease"),
        started_ns: MonotonicClock.now_ns(),
        replay: None,
        tb: TimeBase::now(),
    };
    let interval = Duration::from_secs_f64(args.interval);
    if !io::stdout().is_terminal() {
        return plain(source, agg, interval, stop).await;
    }
    view(source, agg, &id, interval, stop).await
}

pub async fn replay(args: &ReplayArgs) -> anyhow::Result<()> {
    if args.speed.is_nan() || args.speed <= 0.0 {
        bail!("--speed must be above 0");
    }
    if !io::stdout().is_terminal() {
        bail!("replay draws the live view and needs a terminal; for text, use `twtrace report`");
    }
    let mut reader = Reader::open(&args.file)?;
    let clock = ReplayClock::default();
    let first_ns = reader.first_ts_ns()?.unwrap_or(0);
    clock.set(first_ns);
    let header = reader.header.clone();
    let agg = Aggregator::new(clock.clone(), header.hz);
    let id = Identity {
        netns: None,
        whole_namespaces: twtrace::cli::recorded_whole_namespaces(&header.command_line)
            == Some(true),
        host: header.hostname.clone(),
        kernel: header.kernel.clone(),
        started_ns: first_ns,
        replay: Some(format!("{} at {}x", args.file.display(), args.speed)),
        tb: TimeBase::with_offset_ns(header.clock_offset_ns),
    };
    let mut feed = Playback {
        reader,
        frame: Vec::new().into_iter(),
        next: None,
        clock,
        first_ns,
        started: Instant::now(),
        speed: args.speed,
    };
    feed.next = feed.next_event()?;
    let stop = Stop::new(None)?;
    view(
        feed,
        agg,
        &id,
        Duration::from_secs_f64(args.interval / args.speed),
        stop,
    )
    .await
}

/// The full-screen view. The terminal is restored on return, error or panic.
async fn view<C: Clock, F: Feed>(
    mut feed: F,
    mut agg: Aggregator<C>,
    id: &Identity,
    interval: Duration,
    mut stop: Stop,
) -> anyhow::Result<()> {
    let mut term = ratatui::try_init().context("cannot take over the terminal")?;
    let result = async {
        let mut v = ViewState {
            netns: id.netns,
            whole_namespaces: id.whole_namespaces,
            ..ViewState::default()
        };
        let mut cgroups = CgroupNames::default();
        let mut refresh = tokio::time::interval(interval);
        let mut keys = tokio::time::interval(Duration::from_millis(50));
        let mut input: Option<String> = None;
        let mut events = Vec::new();
        let mut records = Vec::new();
        let fmt = |ns: u64| clock_time(&id.tb, ns);
        let mut model: Option<Model> = None;
        loop {
            let mut redraw = false;
            tokio::select! {
                r = feed.read(&mut events) => r?,
                _ = refresh.tick() => {
                    feed.tick(&mut agg);
                    if !v.paused || model.is_none() {
                        model = Some(v.model(
                            &agg,
                            &id.host,
                            &id.kernel,
                            id.started_ns,
                            id.replay.as_deref(),
                            &mut |cg| cgroup_name(&agg, &mut cgroups, cg),
                        ));
                    }
                    redraw = true;
                }
                _ = keys.tick() => {
                    while event::poll(Duration::ZERO)? {
                        match event::read()? {
                            TermEvent::Key(k) if k.kind != KeyEventKind::Release => {
                                match keys::on_key(&mut v, &mut input, k) {
                                    keys::Action::Quit => return Ok(()),
                                    keys::Action::NextNetns => v.next_netns(&agg),
                                    keys::Action::Redraw => {}
                                }
                                // Show the effect of a key at once, not at the next refresh.
                                if !v.paused || model.is_none() {
                                    model = Some(v.model(&agg, &id.host, &id.kernel, id.started_ns, id.replay.as_deref(), &mut |cg| cgroup_name(&agg, &mut cgroups, cg)));
                                }
                                redraw = true;
                            }
                            TermEvent::Resize(..) => redraw = true,
                            _ => {}
                        }
                    }
                }
                _ = stop.requested() => return Ok(()),
            }
            for e in events.drain(..) {
                agg.ingest(e, &mut records);
            }
            for r in records.drain(..) {
                v.note(&r, fmt);
            }
            if redraw && let Some(m) = &model {
                term.draw(|f| ui::draw(f, m, &v, input.as_deref()))?;
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

/// When stdout is not a terminal: a plain summary every interval.
async fn plain(
    mut source: LiveSource,
    mut agg: Aggregator<MonotonicClock>,
    interval: Duration,
    mut stop: Stop,
) -> anyhow::Result<()> {
    eprintln!(
        "twtrace: stdout is not a terminal: printing a summary every {interval:?} (use `twtrace trace` for events)"
    );
    let mut refresh = tokio::time::interval(interval);
    let mut v = ViewState::default();
    let mut events = Vec::new();
    let mut sink = Vec::new();
    let mut out = io::stdout().lock();
    let tb = TimeBase::now();
    loop {
        tokio::select! {
            r = source.read(&mut events) => r.context("reading kernel events")?,
            _ = refresh.tick() => {
                source.tick(&mut agg);
                let m = v.model(&agg, "", "", 0, None, &mut |_| String::new());
                let top: Vec<String> = m.procs.iter().take(3).map(|p| format!("{}({}) {}", p.comm, p.pid, p.alive)).collect();
                let r = &m.rates;
                let line = format!(
                    "{} alive {} entered {:.1}/s ended/s expired {:.1} reused {:.1} recycled {:.1} reset {:.1} purged {:.1} | overflow {:.1}/s abort {:.1}/s | failed connect {:.1}/s bind {:.1}/s | lost {} | top {}",
                    twtrace::live::time::clock_time(&tb, agg.now_ns()),
                    m.alive, r.entered, r.expired, r.reused, r.recycled, r.reset, r.purged,
                    r.overflow, r.abort, r.connect_failed, r.bind_failed,
                    m.loss.ringbuf_full + m.loss.recursion_misses,
                    top.join(", ")
                );
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    return Ok(()); // reader gone
                }
            }
            _ = stop.requested() => return Ok(()),
        }
        for e in events.drain(..) {
            agg.ingest(e, &mut sink);
        }
        sink.clear();
    }
}

/// The CGROUP column: a replay names cgroups as its recording did, live tracing as this host
/// does now; both through [`twtrace::cgroup::name`], as every other view.
fn cgroup_name<C: Clock>(agg: &Aggregator<C>, cgroups: &mut CgroupNames, id: u64) -> String {
    agg.cgroup_path(id)
        .map(twtrace::cgroup::name)
        .or_else(|| cgroups.display(id))
        .unwrap_or_else(|| "-".into())
}
