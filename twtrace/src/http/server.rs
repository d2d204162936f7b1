//! The accept loop and one connection's life, on the HTTP thread's own runtime.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use hyper::{
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;

use super::{
    ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, HEADER_TIMEOUT, LISTEN_BACKLOG, LOG_INTERVAL,
    MAX_CONNECTION_AGE, MAX_CONNECTIONS, MAX_HEAD_BYTES, MAX_HEADERS, MAX_REQUESTS_PER_CONNECTION,
    SEND_BUFFER, WRITE_TIMEOUT, auth::BasicAuth, deadline::WriteDeadline, ratelog::RateLog, routes,
    snapshot::Reader, web_config::WebConfig,
};

/// The HTTP threads run at this nice value, below the tracer's.
const NICE: i32 = 10;

/// Binds `addr` with the server's listen backlog. Called within a tokio runtime (any: the
/// socket is handed over to the server's own).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    // Accepted sockets inherit it: a client that does not read backs the response up into
    // twtrace's write (and its deadline) instead of the kernel buffering megabytes for it.
    socket.set_send_buffer_size(SEND_BUFFER)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// Serves `listener` on a thread of its own, with its own runtime, until the process ends.
pub fn spawn(
    listener: std::net::TcpListener,
    web: WebConfig,
    reader: Reader,
) -> io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("twtrace-http")
        // bcrypt checks, one at a time (auth::MAX_CONCURRENT_CHECKS).
        .max_blocking_threads(2)
        .on_thread_start(lower_priority)
        .build()?;
    std::thread::Builder::new()
        .name("twtrace-http".into())
        .spawn(move || {
            lower_priority();
            runtime.block_on(serve(listener, web, reader));
        })
}

/// HTTP never competes with the tracer on equal terms.
fn lower_priority() {
    // The nice value is per thread on Linux; failing to lower it changes nothing else.
    let _ = rustix::process::setpriority_process(None, NICE);
}

struct Shared {
    tls: Option<TlsAcceptor>,
    auth: Option<BasicAuth>,
    reader: Reader,
    log: Mutex<RateLog>,
}

impl Shared {
    fn log(&self, level: log::Level, kind: &str, message: std::fmt::Arguments<'_>) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log(level, kind, message);
    }
}

/// Growing delays after accept errors: EMFILE or ENFILE would otherwise fail again at once
/// (the pending connection stays in the backlog) and spin a core.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: ACCEPT_BACKOFF_MIN,
        }
    }

    fn reset(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(ACCEPT_BACKOFF_MAX);
        d
    }
}

async fn serve(listener: std::net::TcpListener, web: WebConfig, reader: Reader) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("metrics server: cannot use the listening socket: {e}");
            return;
        }
    };
    let shared = Arc::new(Shared {
        tls: web.tls.map(TlsAcceptor::from),
        auth: web.auth,
        reader,
        log: Mutex::new(RateLog::new(LOG_INTERVAL)),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = Backoff::new();
    loop {
        // At the cap, connections wait in the kernel's backlog, not in twtrace.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    backoff.reset();
                    break stream;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let kind = format!("accept errno {}", e.raw_os_error().unwrap_or(0));
                    shared.log(
                        log::Level::Warn,
                        &kind,
                        format_args!(
                            "metrics server: cannot accept a connection: {e}; retrying in {} ms",
                            delay.as_millis()
                        ),
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            connection(stream, &shared).await;
            drop(slot);
        });
    }
}

async fn connection(stream: TcpStream, shared: &Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let io = WriteDeadline::new(stream, WRITE_TIMEOUT);
    let Some(acceptor) = &shared.tls else {
        return http(TokioIo::new(io), shared).await;
    };
    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => http(TokioIo::new(tls), shared).await,
        Ok(Err(e)) => shared.log(
            log::Level::Debug,
            "tls handshake",
            format_args!("metrics connection: TLS handshake failed: {e}"),
        ),
        Err(_) => shared.log(
            log::Level::Debug,
            "tls handshake timeout",
            format_args!("metrics connection: no TLS handshake within the header timeout"),
        ),
    }
}

async fn http<I>(io: I, shared: &Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let served = AtomicU32::new(0);
    let sh = shared.clone();
    let service = service_fn(move |req| {
        let last = served.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REQUESTS_PER_CONNECTION;
        let sh = sh.clone();
        async move {
            let mut resp = routes::respond(req, &sh.auth, &sh.reader).await;
            if last {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            conn.as_mut().graceful_shutdown();
            // The response in flight is bounded by the write deadline.
            tokio::time::timeout(WRITE_TIMEOUT + HEADER_TIMEOUT, conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        let kind = error_kind(&e);
        shared.log(
            log::Level::Debug,
            kind,
            format_args!("metrics connection: {kind}: {e}"),
        );
    }
}

/// A connection error's kind, for the rate-limited log.
fn error_kind(e: &hyper::Error) -> &'static str {
    let io_kind = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .map(io::Error::kind);
    if e.is_timeout() {
        "request head not received in time"
    } else if io_kind == Some(io::ErrorKind::TimedOut) {
        "response not read in time"
    } else if e.is_parse_too_large() {
        "request head too large"
    } else if e.is_parse() {
        "malformed request"
    } else if e.is_incomplete_message() {
        "closed mid-request"
    } else {
        "connection error"
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;
    use crate::http::snapshot;

    /// A plain server on a loopback port, with a renderer answering every request for a fresh
    /// exposition; runs until the test process ends.
    fn server() -> SocketAddr {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(async { bind("127.0.0.1:0".parse().unwrap()) })
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut publisher, reader) = snapshot::channel("twtrace_up 1\n".into());
        std::thread::spawn(move || {
            rt.block_on(async move {
                tokio::spawn(async move {
                    loop {
                        publisher.wanted().await;
                        publisher.publish("twtrace_up 1\n".into());
                    }
                });
                serve(listener, WebConfig::default(), reader).await
            })
        });
        addr
    }

    /// Sends `request` and reads until the server closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn routes_get_and_head_and_refuses_the_rest() {
        let addr = server();
        let ok = exchange(addr, b"GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200 OK"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.ends_with("\r\n\r\ntwtrace_up 1\n"), "{ok}");
        let head = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.0 200 OK") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let missing = exchange(addr, b"GET /x HTTP/1.0\r\n\r\n");
        assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");
        let post = exchange(
            addr,
            b"POST /metrics HTTP/1.0\r\nContent-Length: 1\r\n\r\nx",
        );
        assert!(
            post.starts_with("HTTP/1.0 405") && post.contains("allow: GET, HEAD"),
            "{post}"
        );
        let junk = exchange(addr, b"\x16\x03\x01\x00\xff garbage\r\n\r\n");
        assert!(
            junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
            "{junk}"
        );
    }

    #[test]
    fn heads_past_the_bounds_get_431() {
        let addr = server();
        let long = format!(
            "GET /metrics HTTP/1.1\r\nX-Long: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let r = exchange(addr, long.as_bytes());
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
        let many = format!(
            "GET /metrics HTTP/1.1\r\n{}\r\n",
            (0..=MAX_HEADERS)
                .map(|i| format!("X-{i}: v\r\n"))
                .collect::<String>()
        );
        let r = exchange(addr, many.as_bytes());
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    }

    #[test]
    fn a_keep_alive_connection_is_closed_after_its_last_request() {
        let addr = server();
        let requests =
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(MAX_REQUESTS_PER_CONNECTION as usize + 5);
        let replies = exchange(addr, requests.as_bytes());
        let n = replies.matches("HTTP/1.1 200 OK").count();
        assert_eq!(n, MAX_REQUESTS_PER_CONNECTION as usize, "{replies}");
        let last = replies.rsplit("HTTP/1.1 200 OK").next().unwrap();
        assert!(last.contains("connection: close"), "{last}");
    }

    #[test]
    fn accept_backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], ACCEPT_BACKOFF_MIN);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), ACCEPT_BACKOFF_MAX);
        // 10 failures wait over a second in all: an fd shortage costs a few wake-ups a second.
        assert!(delays.iter().sum::<Duration>() >= Duration::from_secs(1));
        b.reset();
        assert_eq!(b.next_delay(), ACCEPT_BACKOFF_MIN);
    }
}
