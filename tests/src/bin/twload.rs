//! Workloads for the integration tests and benchmarks, run inside a test network namespace.
//! Each prints one JSON object on stdout with what the test needs to check (its pid, ports).
//!
//! Usage: twload SCENARIO [ARGS]. Every loop is bounded in count and time.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Socket, Type};

const SERVER: &str = "127.0.0.1:8080";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn listener(addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr.parse()?;
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// One connection to a server listening on `listen`, made to `to`; the server closes first
/// (a server TIME_WAIT). Reports the client's port.
fn server_first(listen: &str, to: &str) -> anyhow::Result<()> {
    let l = listener(listen)?;
    let (c, s) = pair(&l, to)?;
    let port = c.local_addr()?.port();
    drop(s);
    thread::sleep(ms(50));
    drop(c);
    thread::sleep(ms(50));
    report(serde_json::json!({ "client_port": port }));
    Ok(())
}

/// Connects and accepts one connection: (client, server side).
fn pair(l: &TcpListener, to: &str) -> anyhow::Result<(TcpStream, TcpStream)> {
    let c = TcpStream::connect(to).context("connect")?;
    let (s, _) = l.accept().context("accept")?;
    Ok((c, s))
}

/// A client bound to a fixed local port with SO_REUSEADDR.
fn bound_client(local: &str, to: &str) -> anyhow::Result<TcpStream> {
    let local: SocketAddr = local.parse()?;
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&local.into())?;
    s.connect(&to.parse::<SocketAddr>()?.into())?;
    Ok(s.into())
}

fn report(fields: serde_json::Value) {
    let mut v = fields;
    v["pid"] = std::process::id().into();
    println!("{v}");
    std::io::stdout().flush().ok();
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--comm NAME` first: the process renames itself (PR_SET_NAME), hostile names included.
    if args.first().map(String::as_str) == Some("--comm") && args.len() >= 2 {
        let name = std::ffi::CString::new(args[1].clone()).context("--comm")?;
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
        args.drain(..2);
    }
    let scenario = args.first().map(String::as_str).unwrap_or("");
    let server = args.get(1).map(String::as_str).unwrap_or(SERVER);
    match scenario {
        // This host (the client) closes first: client TIME_WAIT.
        "client-first" => {
            let l = listener(server)?;
            let (c, s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            drop(c);
            thread::sleep(ms(50));
            drop(s);
            thread::sleep(ms(50));
            report(serde_json::json!({ "client_port": port }));
        }
        // The server closes first: server TIME_WAIT.
        "server-first" => server_first(server, server)?,
        // Like server-first, with a dual-stack server (listening on [::]) and an IPv4
        // client: the server's TIME_WAIT is an IPv6 socket with IPv4-mapped addresses.
        "dual-stack" => {
            let port: u16 = server
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(8080);
            server_first(&format!("[::]:{port}"), &format!("127.0.0.1:{port}"))?;
        }
        // Like server-first, but the connection stays open until a line (or EOF) on stdin: it
        // can be opened before twtrace starts and closed after.
        "server-first-on-input" => {
            let l = listener(server)?;
            let (c, s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            report(serde_json::json!({ "client_port": port }));
            let _ = std::io::stdin().read_line(&mut String::new());
            drop(s);
            thread::sleep(ms(50));
            drop(c);
            thread::sleep(ms(50));
        }
        // shutdown(SHUT_WR) is the close that counts; close() comes later.
        "shutdown" => {
            let l = listener(server)?;
            let (c, s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            c.shutdown(Shutdown::Write)?;
            thread::sleep(ms(50));
            drop(s);
            thread::sleep(ms(50));
            drop(c);
            report(serde_json::json!({ "client_port": port }));
        }
        // Needs ip_local_port_range "P P": the second connect must take the TIME_WAIT's port.
        "reuse" => {
            let l = listener(server)?;
            let (c, s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            drop(c);
            thread::sleep(ms(50));
            drop(s);
            thread::sleep(ms(1500)); // past tcp_tw_reuse_delay (1 s)
            let (c2, _s2) = pair(&l, server)?;
            if c2.local_addr()?.port() != port {
                bail!("second connect used another port");
            }
            thread::sleep(ms(50));
            report(serde_json::json!({ "client_port": port }));
        }
        // The server closes first; the client reconnects from the same port: its SYN recycles
        // the server's TIME_WAIT.
        "recycle" => {
            let l = listener(server)?;
            let c = bound_client("127.0.0.1:45000", server)?;
            let (s, _) = l.accept()?;
            drop(s);
            thread::sleep(ms(50));
            drop(c);
            thread::sleep(ms(200));
            let _c2 = bound_client("127.0.0.1:45000", server)?;
            let _s2 = l.accept()?;
            thread::sleep(ms(50));
            report(serde_json::json!({ "client_port": 45000 }));
        }
        // The client closes; the server writes to the half-closed connection: the client's
        // FIN_WAIT2-substate TIME_WAIT answers with a RST and dies.
        "rst" => {
            let l = listener(server)?;
            let (c, mut s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            drop(c);
            thread::sleep(ms(100));
            s.write_all(b"late data")?;
            thread::sleep(ms(100));
            report(serde_json::json!({ "client_port": port }));
        }
        // SO_LINGER 0: close() resets, no TIME_WAIT.
        "linger0" => {
            let l = listener(server)?;
            let (c, _s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            let c = Socket::from(c);
            c.set_linger(Some(Duration::ZERO))?;
            drop(c);
            thread::sleep(ms(100));
            report(serde_json::json!({ "client_port": port }));
        }
        // Client first, then the server keeps the connection open for `hold_ms`: with
        // tcp_fin_timeout=1 the client's FIN_WAIT2-substate TIME_WAIT expires meanwhile.
        "hold" => {
            let hold: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3000);
            let l = listener(server)?;
            let (c, s) = pair(&l, server)?;
            let port = c.local_addr()?.port();
            drop(c);
            report(serde_json::json!({ "client_port": port }));
            thread::sleep(ms(hold.min(120_000)));
            drop(s);
        }
        // Needs a two-port ip_local_port_range and tcp_tw_reuse=0: two client-first
        // connections leave both ports in TIME_WAIT, so the third connect() must fail.
        "exhaust" => {
            let l = listener(server)?;
            let mut ports = Vec::new();
            for _ in 0..2 {
                let (c, s) = pair(&l, server)?;
                ports.push(c.local_addr()?.port());
                drop(c);
                thread::sleep(ms(20));
                drop(s);
            }
            thread::sleep(ms(50));
            let err = TcpStream::connect(server).err();
            report(serde_json::json!({
                "ports": ports,
                "errno": err.and_then(|e| e.raw_os_error()),
            }));
        }
        // A server that closes its connection first (server-side TIME_WAIT on its port), then
        // restarts: binds the same port again, with or without SO_REUSEADDR.
        "restart" => {
            let reuse = args.get(2).map(String::as_str) == Some("reuseaddr");
            let addr: SocketAddr = server.parse()?;
            let plain_listener = |reuse: bool| -> std::io::Result<TcpListener> {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
                s.set_reuse_address(reuse)?;
                s.bind(&addr.into())?;
                s.listen(16)?;
                Ok(s.into())
            };
            let l = plain_listener(reuse)?;
            let c = TcpStream::connect(server)?;
            let (s, _) = l.accept()?;
            drop(s); // the server closes first
            thread::sleep(ms(50));
            drop(c);
            drop(l);
            thread::sleep(ms(50));
            let err = plain_listener(reuse).err();
            report(serde_json::json!({ "errno": err.and_then(|e| e.raw_os_error()) }));
        }
        // `n` threads, each with its own name (the kernel's comm), each closing one connection
        // first towards one of 20 ports: many commands and destinations.
        "many-comms" => {
            let n: u32 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or(10)
                .min(500);
            let base: SocketAddr = server.parse()?;
            let listeners: Vec<TcpListener> = (0..20)
                .map(|i| listener(&SocketAddr::new(base.ip(), base.port() + i).to_string()))
                .collect::<anyhow::Result<_>>()?;
            let addrs: Vec<SocketAddr> = listeners
                .iter()
                .map(|l| l.local_addr())
                .collect::<Result<_, _>>()?;
            for i in 0..n {
                let to = addrs[i as usize % addrs.len()];
                // The named thread connects and closes first: the comm is taken at close().
                let t = thread::Builder::new()
                    .name(format!("twc{i}"))
                    .spawn(move || TcpStream::connect(to).map(drop))?;
                t.join().map_err(|_| anyhow::anyhow!("thread failed"))??;
                let (s, _) = listeners[i as usize % listeners.len()].accept()?;
                thread::sleep(ms(2));
                drop(s);
            }
            report(serde_json::json!({ "connections": n }));
        }
        // `n` client-first connections, left in TIME_WAIT on the client side.
        "fill" => {
            let n: u32 = args
                .get(2)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1)
                .min(10_000);
            let l = listener(server)?;
            for _ in 0..n {
                let (c, mut s) = pair(&l, server)?;
                drop(c);
                // The server closes once the client's FIN is in (read gives EOF), never
                // before: a server close racing the FIN would be simultaneous, and leave the
                // server a TIME_WAIT too (seen under a slow emulated CPU).
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
                drop(s);
            }
            thread::sleep(ms(50));
            report(serde_json::json!({ "connections": n }));
        }
        // Connections opened and closed for `secs` seconds (at most `max`), as fast as possible or
        // at `rate` per second; `mode` says who closes first: alt(ernate), client, server;
        // `threads` clients in parallel; `ports` listening ports from the server's, taken in
        // turn (a client's TIME_WAITs pin ports per destination, so more destinations let
        // client-first churn run faster than the local ports can recycle).
        "churn" => {
            let secs: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3.0);
            let max: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(200_000);
            let rate: f64 = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(0.0);
            let mode = match args.get(5).map(String::as_str).unwrap_or("alt") {
                "alt" => Closer::Alternate,
                "client" => Closer::Client,
                "server" => Closer::Server,
                m => bail!("churn mode {m:?}: alt, client or server"),
            };
            let threads: u64 = args
                .get(6)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1)
                .clamp(1, 64);
            let ports: u16 = args
                .get(7)
                .and_then(|a| a.parse().ok())
                .unwrap_or(1)
                .clamp(1, 64);
            let dur = Duration::from_secs_f64(secs.min(600.0));
            let (n, failed) = churn(server, ports, dur, max, rate, mode, threads)?;
            report(serde_json::json!({ "connections": n, "failed": failed, "seconds": secs }));
        }
        // Long-lived streams on loopback for `secs` seconds: `streams` connections writing
        // 64 KiB chunks as fast as they can. TIME_WAIT is rare; timers are armed constantly.
        "bulk" => {
            let secs: f64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3.0);
            let streams: usize = args
                .get(3)
                .and_then(|a| a.parse().ok())
                .unwrap_or(2)
                .clamp(1, 64);
            let bytes = bulk(server, Duration::from_secs_f64(secs.min(600.0)), streams)?;
            report(serde_json::json!({ "bytes": bytes, "seconds": secs }));
        }
        other => bail!("unknown scenario {other:?}"),
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Closer {
    Alternate,
    Client,
    Server,
}

impl Closer {
    fn client_first(self, n: u64) -> bool {
        match self {
            Closer::Client => true,
            Closer::Server => false,
            Closer::Alternate => n.is_multiple_of(2),
        }
    }
}

fn churn(
    server: &str,
    ports: u16,
    dur: Duration,
    max: u64,
    rate: f64,
    mode: Closer,
    threads: u64,
) -> anyhow::Result<(u64, u64)> {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let first: SocketAddr = server.parse()?;
    let mut dests = Vec::new();
    for i in 0..ports {
        let mut addr = first;
        addr.set_port(first.port() + i);
        let l = listener(&addr.to_string())?;
        dests.push(l.local_addr()?);
        // Acceptors until the process exits. The server side of a client-first connection
        // waits for the client's FIN; of a server-first one, closes at once. Which is which: a
        // byte the client sends, 1 = client first.
        for _ in 0..threads {
            let l = l.try_clone()?;
            thread::spawn(move || {
                while let Ok((mut s, _)) = l.accept() {
                    let mut b = [0u8; 1];
                    if s.read(&mut b).is_ok_and(|n| n == 1) && b[0] == 1 {
                        let _ = s.read(&mut b); // EOF: the client closed
                    }
                }
            });
        }
    }
    let dests = Arc::new(dests);
    let stop = Instant::now() + dur;
    let start = Instant::now();
    let made = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    // Connections claimed before connecting, so that threads together never exceed `max`.
    let claimed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (made, failed, claimed, dests) =
                (made.clone(), failed.clone(), claimed.clone(), dests.clone());
            thread::spawn(move || {
                loop {
                    let k = made.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
                    if Instant::now() >= stop || claimed.fetch_add(1, Ordering::Relaxed) >= max {
                        break;
                    }
                    if rate > 0.0 {
                        // Paced: the k-th attempt no earlier than k / rate seconds in.
                        let due = start + Duration::from_secs_f64(k as f64 / rate);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                    }
                    match TcpStream::connect(dests[k as usize % dests.len()]) {
                        Ok(mut c) => {
                            let n = made.fetch_add(1, Ordering::Relaxed);
                            let client_first = mode.client_first(n);
                            let _ = c.write_all(&[u8::from(client_first)]);
                            if !client_first {
                                // The server closes first: wait for its FIN.
                                let _ = c.read(&mut [0u8; 1]);
                            }
                        }
                        Err(_) => {
                            // Out of ports: back off rather than spin, and free the claim.
                            claimed.fetch_sub(1, Ordering::Relaxed);
                            failed.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(ms(1));
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok((made.load(Ordering::Relaxed), failed.load(Ordering::Relaxed)))
}

fn bulk(server: &str, dur: Duration, streams: usize) -> anyhow::Result<u64> {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    let l = listener(server)?;
    let to = l.local_addr()?;
    thread::spawn(move || {
        while let Ok((mut s, _)) = l.accept() {
            thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while s.read(&mut buf).is_ok_and(|n| n > 0) {}
            });
        }
    });
    let stop = Instant::now() + dur;
    let total = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let total = total.clone();
            thread::spawn(move || -> std::io::Result<()> {
                let mut c = TcpStream::connect(to)?;
                let chunk = vec![7u8; 1 << 16];
                while Instant::now() < stop {
                    c.write_all(&chunk)?;
                    total.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
    Ok(total.load(Ordering::Relaxed))
}
