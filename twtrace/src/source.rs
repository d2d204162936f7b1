//! Live events: the kernel programs' ring buffer, plus the start-up scan of TIME_WAITs that
//! already existed, the namespaces' state and the starts the sweep recovered, as one stream of
//! [`Event`]s for the aggregator.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, task::JoinHandle};

use crate::{
    aggregate::{Aggregator, Clock, EndCheck},
    decode::decode,
    event::{Event, TwExisting},
    filter::Filters,
    kernel::{
        end_check, netns, sock_diag,
        sweep::{SWEEP_EVERY, Sweeper},
        tracer::{self, Loss, Tracer, TracerError, TracerOptions},
    },
};

pub struct LiveSource {
    tracer: Tracer,
    ring: AsyncFd<RingBuf<MapData>>,
    scan: Option<JoinHandle<Vec<TwExisting>>>,
    drain_timer: tokio::time::Interval,
    snapshot_timer: tokio::time::Interval,
    /// What the background pollers read: namespace state, and starts the sweep recovered.
    polled: tokio::sync::mpsc::Receiver<Vec<Event>>,
    /// TIME_WAITs due with no end seen, for the sweep's end check.
    end_checks: tokio::sync::mpsc::Sender<Vec<EndCheck>>,
    /// Namespaces events came from; one not seen before has the poller read it at once.
    namespaces: std::collections::HashSet<u32>,
    read_namespaces: std::sync::Arc<tokio::sync::Notify>,
    _pollers: [tokio::task::JoinHandle<()>; 2],
    filters: Filters,
    decode_errors: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Tracer(#[from] TracerError),
    #[error("filters: {0}")]
    Filter(#[from] crate::filter::FilterError),
    #[error("ring buffer: {0}")]
    Io(#[from] io::Error),
}

impl LiveSource {
    /// Attaches the kernel programs, then starts the scan for existing TIME_WAITs (after
    /// attaching, so none falls between the two).
    pub fn start(
        filters: &Filters,
        verbose: bool,
        ring_bytes: u32,
        scan_existing: bool,
    ) -> Result<Self, SourceError> {
        let opts = TracerOptions {
            filter: filters.to_kernel()?,
            verbose,
            ring_bytes: Some(ring_bytes),
        };
        let (mut tracer, ring) = Tracer::start(&opts)?;
        run_as_batch();
        // SAFETY: the RingBuf owns its map's fd, open and unchanged until it is dropped.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        let scan = scan_existing.then(|| {
            let only = filters.netns;
            tokio::task::spawn_blocking(move || sock_diag::snapshot(only))
        });
        let mut drain_timer = tokio::time::interval(tracer::DRAIN_EVERY);
        drain_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshot_timer = tokio::time::interval(SNAPSHOT_EVERY);
        snapshot_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (tx, polled) = tokio::sync::mpsc::channel(4);
        let (end_checks, checks) = tokio::sync::mpsc::channel(4);
        let read_namespaces = std::sync::Arc::new(tokio::sync::Notify::new());
        let sweeper = Sweeper::new(tracer.take_closing()?, crate::kernel::hz(), filters.clone());
        let pollers = [
            tokio::spawn(poll_port_state(
                filters.netns,
                read_namespaces.clone(),
                tx.clone(),
            )),
            tokio::spawn(sweep(sweeper, checks, tx)),
        ];
        Ok(Self {
            tracer,
            ring,
            scan,
            drain_timer,
            snapshot_timer,
            polled,
            end_checks,
            namespaces: Default::default(),
            read_namespaces,
            _pollers: pollers,
            filters: filters.clone(),
            decode_errors: 0,
        })
    }

    /// Waits until the kernel wakes us (a batch is waiting), the drain timer fires, or the
    /// start-up scan is done, then appends every available event to `out`.
    pub async fn read(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        let from = out.len();
        self.read_events(out).await?;
        // A namespace's settings are read when it is first seen, not up to 5 s later: one
        // that lives less than that would otherwise have none (or another's, by inode).
        let mut new = false;
        for e in &out[from..] {
            if let Some(ns) = conn_netns(e) {
                new |= self.namespaces.insert(ns);
            }
        }
        if new {
            self.read_namespaces.notify_one();
        }
        Ok(())
    }

    async fn read_events(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        let scan_done = async {
            match self.scan.as_mut() {
                Some(h) => Some(h.await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = self.ring.readable_mut() => {
                let mut guard = guard?;
                Self::drain_ring(guard.get_inner_mut(), out, &mut self.decode_errors);
                guard.clear_ready();
            }
            Some(events) = self.polled.recv() => {
                // Ends already in the ring go first: a recovered start then finds its end.
                Self::drain_ring(self.ring.get_mut(), out, &mut self.decode_errors);
                out.extend(events);
            }
            _ = self.snapshot_timer.tick() => {
                Self::drain_ring(self.ring.get_mut(), out, &mut self.decode_errors);
                out.push(self.snapshot());
            }
            _ = self.drain_timer.tick() => {
                Self::drain_ring(self.ring.get_mut(), out, &mut self.decode_errors);
            }
            scanned = scan_done => {
                self.scan = None;
                // Starts submitted before the scan listed their TIME_WAITs go first, so the
                // scan does not report them as older than twtrace.
                Self::drain_ring(self.ring.get_mut(), out, &mut self.decode_errors);
                let ts_ns = crate::aggregate::Clock::now_ns(&crate::aggregate::MonotonicClock);
                if let Some(Ok(sockets)) = scanned {
                    // Who closed a pre-existing TIME_WAIT is unknown, so process filters
                    // exclude them all.
                    let sockets: Vec<TwExisting> = if self.filters.on_process() {
                        Vec::new()
                    } else {
                        sockets
                            .into_iter()
                            .filter(|s| self.filters.matches_conn(&s.conn))
                            .collect()
                    };
                    out.push(Event::TwExisting {
                        ts_ns,
                        sockets,
                        more: false,
                    });
                }
            }
        }
        Ok(())
    }

    /// The aggregator's housekeeping (call about once a second), then the end check of the
    /// TIME_WAITs it found due: what the check finds comes back through [`Self::read`].
    pub fn tick<C: Clock>(&self, agg: &mut Aggregator<C>) {
        agg.tick();
        let due = agg.ends_due(MAX_END_CHECKS);
        // Full only while the sweep is still on the last ones: these are asked for again.
        if !due.is_empty() {
            let _ = self.end_checks.try_send(due);
        }
    }

    /// Appends whatever the ring buffer holds now, without waiting.
    pub fn drain(&mut self, out: &mut Vec<Event>) {
        Self::drain_ring(self.ring.get_mut(), out, &mut self.decode_errors);
    }

    fn drain_ring(ring: &mut RingBuf<MapData>, out: &mut Vec<Event>, errors: &mut u64) {
        while let Some(item) = ring.next() {
            match decode(&item) {
                Ok(e) => out.push(e),
                Err(e) => {
                    *errors += 1;
                    log::debug!("undecodable record: {e}");
                }
            }
        }
    }

    pub fn loss(&self) -> Loss {
        self.tracer.loss()
    }

    /// What this kernel cannot show, one line each.
    pub fn degraded(&self) -> &[String] {
        self.tracer.degraded()
    }

    /// Counters as of now, as an event (recorded, so reports know closes and losses).
    pub fn snapshot(&self) -> Event {
        Event::Snapshot {
            ts_ns: crate::aggregate::Clock::now_ns(&crate::aggregate::MonotonicClock),
            passive_closes: self.tracer.passive_closes(),
            loss: self.tracer.loss(),
        }
    }

    /// Records the decoder rejected (a kernel/userspace mismatch; should stay 0).
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors
    }

    /// Whether the start-up scan has been delivered.
    pub fn scan_pending(&self) -> bool {
        self.scan.is_some()
    }
}

/// How often counters are snapshotted into the event stream.
pub const SNAPSHOT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often each namespace's settings and live connections are read.
pub const PORT_STATE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The namespace a connection event comes from.
fn conn_netns(e: &Event) -> Option<u32> {
    match e {
        Event::TwEnter(t) => Some(t.conn.netns),
        Event::NoTimeWait(n) => Some(n.conn.netns),
        Event::PortFailure(f) => Some(f.conn.netns),
        _ => None,
    }
}

/// Reads every traced namespace's cookie, settings and live connections, now, every
/// [`PORT_STATE_EVERY`] and when `wake` says a new one was seen, for port pressure, advice and
/// the kernel check; a namespace no longer listed is reported gone.
async fn poll_port_state(
    only: Option<u32>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    tx: tokio::sync::mpsc::Sender<Vec<Event>>,
) {
    let mut every = tokio::time::interval(PORT_STATE_EVERY);
    let mut listed = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = wake.notified() => {}
        }
        let before = std::mem::take(&mut listed);
        let scanned = tokio::task::spawn_blocking(move || {
            let ts_ns = crate::aggregate::Clock::now_ns(&crate::aggregate::MonotonicClock);
            let found: Vec<netns::Netns> = netns::joinable()
                .into_iter()
                .filter(|n| only.is_none_or(|o| o == n.inode))
                .collect();
            let now: std::collections::BTreeSet<u32> = found.iter().map(|n| n.inode).collect();
            let gone = before
                .difference(&now)
                .map(|&netns| Event::NetnsGone { ts_ns, netns });
            let mut events: Vec<Event> = gone.collect();
            let read = found.into_iter().filter_map(|n| {
                match sock_diag::port_state_in(&n.path, n.inode, ts_ns) {
                    Ok(ev) => Some(ev),
                    Err(e) => {
                        // A namespace can vanish between listing and reading it.
                        log::debug!("netns {}: {e}", n.inode);
                        None
                    }
                }
            });
            events.extend(read.flatten());
            (events, now)
        })
        .await;
        match scanned {
            Ok((events, now)) => {
                listed = now;
                if tx.send(events).await.is_err() {
                    return;
                }
            }
            Err(e) => log::warn!("reading namespace settings failed: {e}"),
        }
    }
}

/// End checks per tick at most: each is a netlink round trip of a few microseconds.
const MAX_END_CHECKS: usize = 4096;

/// Runs the sweep every [`SWEEP_EVERY`] (see [`crate::kernel::sweep`]), and the end checks
/// asked for since (see [`end_check`]): recovered starts go first, so their ends find them.
async fn sweep(
    mut sweeper: Sweeper,
    mut checks: tokio::sync::mpsc::Receiver<Vec<EndCheck>>,
    tx: tokio::sync::mpsc::Sender<Vec<Event>>,
) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let jiffy_ns = 1_000_000_000 / u64::from(crate::kernel::hz().max(1));
    loop {
        every.tick().await;
        let mut due = Vec::new();
        while let Ok(c) = checks.try_recv() {
            due.extend(c);
        }
        let Ok((back, events)) = tokio::task::spawn_blocking(move || {
            let mut events = sweeper.run();
            if !due.is_empty() {
                let now = crate::aggregate::MonotonicClock.now_ns();
                events.extend(end_check::run(due, now, jiffy_ns));
            }
            (sweeper, events)
        })
        .await
        else {
            log::warn!("the sweep for missed TIME_WAIT starts stopped");
            return;
        };
        sweeper = back;
        if !events.is_empty() && tx.send(events).await.is_err() {
            return;
        }
    }
}

/// The reader works in bursts, a batch per wake-up. Under the normal policy each wake-up
/// preempts whatever runs on that CPU, often the very connections being traced, and on a busy
/// host that costs them far more than the reader's CPU time. SCHED_BATCH never preempts on
/// wake-up (it waits for the running task's slice) yet keeps its fair share of CPU, so the
/// reader still keeps up. Threads started later inherit it.
fn run_as_batch() {
    // Zeroed rather than a literal: musl's sched_param has more fields. The system call
    // itself rather than libc's wrapper: musl's sched_setscheduler is a stub (ENOSYS).
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    for tid in tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse::<i32>().ok()) {
        let param: *const libc::sched_param = &param;
        if unsafe { libc::syscall(libc::SYS_sched_setscheduler, tid, libc::SCHED_BATCH, param) }
            != 0
        {
            log::debug!(
                "SCHED_BATCH for thread {tid}: {}",
                io::Error::last_os_error()
            );
        }
    }
}
