//! `twtrace serve`: Prometheus metrics from the same aggregator as every other view.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use twtrace::{
    aggregate::{Aggregator, MonotonicClock},
    cgroup::CgroupNames,
    cli::ServeArgs,
    event::Event,
    metrics::Exporter,
    source::LiveSource,
};

use super::Stop;
use twtrace::kernel::hz;

struct State {
    agg: Aggregator<MonotonicClock>,
    exporter: Exporter,
}

const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: &ServeArgs, verbose: bool) -> anyhow::Result<()> {
    let filters = args.filter.filters()?;
    let ring = super::ring_bytes(args.ring_mib)?;
    // Before attaching: a signal from the moment twtrace says it is tracing ends it cleanly.
    let mut stop = Stop::new(args.duration)?;
    let mut source = LiveSource::start(&filters, verbose, ring, true)?;
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let mut cgroups = CgroupNames::default();
    let state = Arc::new(Mutex::new(State {
        agg: Aggregator::new(MonotonicClock, hz()),
        exporter: Exporter::new(Box::new(move |id| cgroups.display(id))),
    }));
    eprintln!("twtrace: serving metrics on http://{}/metrics", args.listen);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut events = Vec::new();
    let mut records = Vec::new();
    loop {
        tokio::select! {
            r = source.read(&mut events) => r.context("reading kernel events")?,
            _ = tick.tick() => lock(&state).agg.tick(),
            conn = listener.accept() => {
                match conn {
                    Ok((stream, _)) => {
                        let state = state.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_one(stream, &state).await {
                                log::debug!("metrics request: {e}");
                            }
                        });
                    }
                    Err(e) => log::warn!("accepting a metrics connection: {e}"),
                }
            }
            _ = stop.requested() => return Ok(()),
        }
        let mut s = lock(&state);
        let State { agg, exporter } = &mut *s;
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

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding the lock would be a bug; the data is still the best we have.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Answers one HTTP/1.x request: GET /metrics, GET / or an error status.
async fn serve_one(mut stream: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > MAX_REQUEST {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if head.is_err() {
        return Ok(()); // too slow: drop it
    }
    let request = String::from_utf8_lossy(&buf);
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        _ if buf.len() > MAX_REQUEST => (
            "431 Request Header Fields Too Large",
            "text/plain",
            String::new(),
        ),
        ("GET", "/metrics") => {
            let mut s = lock(state);
            let State { agg, exporter } = &mut *s;
            let loss = agg.loss().clone();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                exporter.render(agg, &loss),
            )
        }
        ("GET", "/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "twtrace: TIME_WAIT metrics at /metrics\n".into(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
