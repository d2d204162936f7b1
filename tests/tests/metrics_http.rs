//! The metrics server under abuse (root): `twtrace serve` with its real tracer attached, and
//! clients that exhaust its fds, never read, dribble their heads, send huge heads or the wrong
//! password. Each time the tracer loses nothing, and a normal scrape is answered afterwards.
//!
//! The limits checked are twtrace::http's (5 s head, 10 s write, 64 connections).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::TcpStream,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use twtrace_integration::{Netns, Serve, assert_no_loss, can_run, http_get};

const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 64;

/// A normal scrape, retried for up to `within` (the server may be shedding an attack): the
/// exposition, loss counters checked.
fn scrape(addr: &str, within: Duration) -> String {
    let until = Instant::now() + within;
    loop {
        match http_get(addr, "/metrics") {
            Ok(text) if text.contains("twtrace_build_info") => {
                assert_no_loss(&text);
                return text;
            }
            other => assert!(
                Instant::now() < until,
                "no scrape answered within {within:?}: {other:?}"
            ),
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// TIME_WAITs the exposition counts as entered by `comm`.
fn entered_by(text: &str, comm: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with("twtrace_time_wait_entered_total")
                && l.contains(&format!("comm=\"{comm}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// An HTTP reply's status code ("" if there is none).
fn status(reply: &str) -> &str {
    reply.split_whitespace().nth(1).unwrap_or("")
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    s
}

/// Whether the server has closed `s` (EOF or reset), without blocking.
fn closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 4096];
    let r = loop {
        match (&*s).read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// Under RLIMIT_NOFILE=64 (about 20 fds left once the tracer is attached), 100 idle
/// connections: accept fails with EMFILE, and the server backs off instead of spinning, logs a
/// line or two, keeps tracing (a workload's TIME_WAITs are all counted), and serves again once
/// the connections go.
#[test]
fn under_an_fd_limit_accept_backs_off_logs_little_and_recovers() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let ns = Netns::new("fdlim");
    let mut serve = Serve::start(&ns, &[], Some(64));
    scrape(&serve.addr, Duration::from_secs(5));
    let fds = serve.fds();
    assert!(fds < 64, "{fds} fds at rest");
    let lines_before = serve.stderr_lines().len();
    let cpu_before = serve.cpu_secs();
    let start = Instant::now();
    let conns: Vec<TcpStream> = (0..100).map(|_| connect(&serve.addr)).collect();
    // The tracer works on meanwhile: 100 connections in the namespace, each a TIME_WAIT.
    let load = ns.twload(&["churn", "127.0.0.1:8080", "20", "100", "50"]);
    let made = load["connections"].as_u64().unwrap();
    thread::sleep(Duration::from_secs(6).saturating_sub(start.elapsed()));
    let cpu = serve.cpu_secs() - cpu_before;
    let secs = start.elapsed().as_secs_f64();
    let logged: Vec<String> = serve.stderr_lines()[lines_before..].to_vec();
    assert!(serve.running(), "twtrace serve died: {logged:?}");
    assert!(
        logged.iter().any(|l| l.contains("Too many open files")),
        "the fd limit was never reached: {logged:?}"
    );
    // One line per kind of error per 10 s.
    assert!(
        logged.len() <= 3,
        "{} lines logged: {logged:?}",
        logged.len()
    );
    assert!(
        cpu < 0.25 * secs,
        "{cpu:.2} s of CPU in {secs:.1} s under the fd limit"
    );
    drop(conns);
    let text = scrape(&serve.addr, Duration::from_secs(5));
    assert!(entered_by(&text, "twload") >= made, "{made} made: {text}");
    eprintln!(
        "fd limit: {} lines logged, {cpu:.2} s CPU in {secs:.1} s, {fds} fds at rest; test took {:.1} s",
        logged.len(),
        t0.elapsed().as_secs_f64()
    );
}

/// 60 connections that pipeline 100 requests each and never read a byte: each loses its
/// connection once a response has waited the write timeout (not before: the requests alone
/// would keep it), the fds all come back, memory stays bounded.
#[test]
fn clients_that_never_read_are_dropped_after_the_write_timeout() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let ns = Netns::new("noread");
    let serve = Serve::start(&ns, &[], None);
    scrape(&serve.addr, Duration::from_secs(5));
    let (fds, rss) = (serve.fds(), serve.rss_kib());
    // As many as a connection may carry: 500 KB of responses, far more than the socket buffers.
    let request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
    let start = Instant::now();
    let conns: Vec<TcpStream> = (0..60)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            // A small window, so that unread responses back up into the server at once.
            s.set_recv_buffer_size(4096).unwrap();
            let addr: std::net::SocketAddr = serve.addr.parse().unwrap();
            s.connect(&addr.into()).unwrap();
            let mut s: TcpStream = s.into();
            s.write_all(request.as_bytes()).unwrap();
            s
        })
        .collect();
    let (mut peak_fds, mut peak_rss) = (0, 0);
    let mut freed = None;
    while start.elapsed() < WRITE_TIMEOUT + Duration::from_secs(5) {
        peak_fds = peak_fds.max(serve.fds());
        peak_rss = peak_rss.max(serve.rss_kib());
        if start.elapsed() > Duration::from_secs(1) && serve.fds() <= fds {
            freed = Some(start.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let freed = freed.unwrap_or_else(|| {
        panic!(
            "{} fds {:?} after the clients stopped reading ({fds} before)",
            serve.fds(),
            start.elapsed()
        )
    });
    assert!(
        peak_fds >= fds + 50,
        "the connections were not held: {peak_fds}"
    );
    assert!(
        freed >= WRITE_TIMEOUT - Duration::from_secs(1),
        "dropped after {freed:?}, before the write timeout"
    );
    let grew = peak_rss.saturating_sub(rss);
    assert!(grew < 16 * 1024, "RSS grew {grew} KiB");
    // The fd count at rest can include a poller's passing socket (a namespace's cookie, a
    // netlink dump): the last connections may close a moment after the count is back.
    let all_closed = Instant::now() + Duration::from_secs(3);
    while !conns.iter().all(closed) && Instant::now() < all_closed {
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        conns.iter().all(closed),
        "{} of 60 connections still open {:?} after the clients stopped reading",
        conns.iter().filter(|c| !closed(c)).count(),
        start.elapsed()
    );
    drop(conns);
    scrape(&serve.addr, Duration::from_secs(2));
    eprintln!(
        "never-reading: {peak_fds} fds at most ({fds} at rest), all back after {freed:?}, RSS +{grew} KiB; test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// 80 connections dribbling a request head a byte at a time: 64 at most are served at once
/// (the rest wait in the kernel's backlog, not in twtrace), each is closed once the head
/// timeout passes, and then the server answers a scrape.
#[test]
fn slowloris_heads_are_closed_at_the_header_timeout_and_connections_are_capped() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let ns = Netns::new("slow");
    let serve = Serve::start(&ns, &[], None);
    scrape(&serve.addr, Duration::from_secs(5));
    let fds = serve.fds();
    let start = Instant::now();
    let mut conns: Vec<(TcpStream, Option<Duration>)> = (0..80)
        .map(|_| {
            let mut s = connect(&serve.addr);
            s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ").unwrap();
            (s, None)
        })
        .collect();
    let mut peak_fds = 0;
    while start.elapsed() < 2 * HEADER_TIMEOUT + Duration::from_secs(4)
        && conns.iter().any(|(_, c)| c.is_none())
    {
        for (s, done) in conns.iter_mut().filter(|(_, c)| c.is_none()) {
            if s.write_all(b"a").is_err() || closed(s) {
                *done = Some(start.elapsed());
            }
        }
        peak_fds = peak_fds.max(serve.fds());
        thread::sleep(Duration::from_millis(250));
    }
    let times: Vec<Duration> = conns
        .iter()
        .map(|(_, c)| c.unwrap_or_else(|| panic!("a dribbling connection still open")))
        .collect();
    let first = *times.iter().min().unwrap();
    let last = *times.iter().max().unwrap();
    assert!(
        first >= HEADER_TIMEOUT - Duration::from_millis(500),
        "closed after {first:?}, before the header timeout"
    );
    assert!(
        last <= 2 * HEADER_TIMEOUT + Duration::from_secs(3),
        "closed after {last:?}"
    );
    assert!(
        peak_fds <= fds + MAX_CONNECTIONS + 2,
        "{peak_fds} fds: over the cap of {MAX_CONNECTIONS} connections ({fds} at rest)"
    );
    let early = times
        .iter()
        .filter(|t| **t < HEADER_TIMEOUT + Duration::from_secs(2))
        .count();
    assert!(early <= MAX_CONNECTIONS, "{early} served at once");
    scrape(&serve.addr, Duration::from_secs(2));
    eprintln!(
        "slowloris: closed between {first:?} and {last:?}, {early} in the first round, {peak_fds} fds at most ({fds} at rest); test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

/// Heads past the bounds (a 1 MiB header, 200 header fields), 20 at once: 431 or closed, and
/// memory stays bounded.
#[test]
fn oversized_heads_get_431_with_bounded_memory() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let ns = Netns::new("big");
    let serve = Serve::start(&ns, &[], None);
    scrape(&serve.addr, Duration::from_secs(5));
    let rss = serve.rss_kib();
    let addr = Arc::new(serve.addr.clone());
    let big = Arc::new(format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    ));
    let many = Arc::new(format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..200)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    ));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let (addr, head) = (
                addr.clone(),
                if i % 2 == 0 {
                    big.clone()
                } else {
                    many.clone()
                },
            );
            thread::spawn(move || {
                let mut s = connect(&addr);
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                // The server may stop reading and close before the whole head is sent.
                let _ = s.write_all(head.as_bytes());
                let mut reply = Vec::new();
                let _ = s.read_to_end(&mut reply);
                String::from_utf8_lossy(&reply).into_owned()
            })
        })
        .collect();
    for c in clients {
        let reply = c.join().unwrap();
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
            "an oversized head was answered: {:?}",
            &reply[..reply.len().min(200)]
        );
    }
    let grew = serve.rss_kib().saturating_sub(rss);
    assert!(grew < 8 * 1024, "RSS grew {grew} KiB");
    scrape(&serve.addr, Duration::from_secs(2));
    eprintln!(
        "oversized heads: RSS +{grew} KiB; test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

mod tls {
    //! A rustls client and a certificate authority made for the test.

    use std::{io::Read as _, io::Write as _, net::TcpStream, sync::Arc, time::Duration};

    use rustls::{
        ClientConfig, ClientConnection, RootCertStore, StreamOwned,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    };

    pub struct Pki {
        pub ca_pem: String,
        pub server_pem: String,
        pub server_key_pem: String,
        ca: CertificateDer<'static>,
        client: (CertificateDer<'static>, Vec<u8>),
    }

    impl Pki {
        pub fn new() -> Self {
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(vec![]).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let leaf = |names: Vec<String>| {
                let key = KeyPair::generate().unwrap();
                let cert = CertificateParams::new(names)
                    .unwrap()
                    .signed_by(&key, &issuer)
                    .unwrap();
                (cert, key)
            };
            let (server, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
            let (client, client_key) = leaf(vec!["prometheus".into()]);
            Self {
                ca_pem: ca.pem(),
                server_pem: server.pem(),
                server_key_pem: server_key.serialize_pem(),
                ca: ca.der().clone(),
                client: (client.der().clone(), client_key.serialize_der()),
            }
        }

        /// A client trusting the CA, presenting its client certificate or not.
        pub fn client(&self, with_cert: bool) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let b = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
            Arc::new(if with_cert {
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.client.1.clone()));
                b.with_client_auth_cert(vec![self.client.0.clone()], key)
                    .unwrap()
            } else {
                b.with_no_client_auth()
            })
        }
    }

    /// GET over TLS (HTTP/1.0): the whole reply, or the error that ended it before any byte.
    pub fn get(
        addr: &str,
        config: Arc<ClientConfig>,
        path: &str,
        auth: Option<(&str, &str)>,
    ) -> std::io::Result<String> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let conn = ClientConnection::new(config, name).map_err(std::io::Error::other)?;
        let mut s = StreamOwned::new(conn, tcp);
        let authorization = auth
            .map(|(u, p)| format!("Authorization: Basic {}\r\n", base64(&format!("{u}:{p}"))))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{authorization}\r\n"
        )?;
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out);
        if out.is_empty() {
            r?;
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn base64(s: &str) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in s.as_bytes().chunks(3) {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn base64_matches_the_rfc() {
        assert_eq!(base64("prom:s3cret"), "cHJvbTpzM2NyZXQ=");
        assert_eq!(base64("ab"), "YWI=");
        assert_eq!(base64("abc"), "YWJj");
    }
}

/// `--web.config.file` with TLS (client certificates verified) and basic auth: the right
/// credentials are served, wrong or missing ones get 401 with WWW-Authenticate, no client
/// certificate or plain HTTP gets nothing; a flood of bad passwords costs about one core
/// (bcrypt checks one at a time) while the tracer loses nothing and a cached scraper is served.
#[test]
fn tls_and_basic_auth_from_a_web_config_file() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let dir = std::env::temp_dir().join(format!("twtrace-web-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = tls::Pki::new();
    std::fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("server.crt"), &pki.server_pem).unwrap();
    std::fs::write(dir.join("server.key"), &pki.server_key_pem).unwrap();
    let hash = bcrypt::hash("s3cret", 10).unwrap();
    let config = dir.join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\nbasic_auth_users:\n  prom: '{hash}'\n"
        ),
    )
    .unwrap();
    let ns = Netns::new("tls");
    let serve = Serve::start(&ns, &["--web.config.file", config.to_str().unwrap()], None);
    assert!(
        serve
            .stderr_lines()
            .iter()
            .any(|l| l.contains(&format!("https://{}/metrics", serve.addr))),
        "{:?}",
        serve.stderr_lines()
    );
    let client = pki.client(true);
    let get = |auth| tls::get(&serve.addr, client.clone(), "/metrics", auth);
    let ok = get(Some(("prom", "s3cret"))).unwrap();
    assert!(status(&ok) == "200", "{ok}");
    assert_no_loss(&ok);
    for auth in [None, Some(("prom", "wrong")), Some(("nobody", "s3cret"))] {
        let r = get(auth).unwrap();
        assert!(status(&r) == "401", "{auth:?}: {r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"twtrace\""),
            "{r}"
        );
        assert!(!r.contains("twtrace_build_info"), "{r}");
    }
    // No client certificate: the handshake fails, nothing is served.
    let r = tls::get(
        &serve.addr,
        pki.client(false),
        "/metrics",
        Some(("prom", "s3cret")),
    );
    assert!(
        r.as_ref().map_or(true, |t| !t.contains("200 OK")),
        "served without a client certificate: {r:?}"
    );
    // Plain HTTP to the TLS port.
    let r = http_get(&serve.addr, "/metrics");
    assert!(
        r.as_ref()
            .map_or(true, |t| !t.contains("twtrace_build_info")),
        "{r:?}"
    );

    // 8 clients sending wrong passwords for 4 s.
    let cpu_before = serve.cpu_secs();
    let start = Instant::now();
    let flood: Vec<_> = (0..8)
        .map(|i| {
            let (addr, client) = (serve.addr.clone(), client.clone());
            thread::spawn(move || {
                let mut n = 0;
                while start.elapsed() < Duration::from_secs(4) {
                    let pw = format!("guess{i}-{n}");
                    if let Ok(r) = tls::get(&addr, client.clone(), "/metrics", Some(("prom", &pw)))
                    {
                        assert!(!r.contains("200 OK"), "{r}");
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    // The scraper's check is cached: it is served in the middle of the flood.
    let asked = Instant::now();
    let during = get(Some(("prom", "s3cret"))).unwrap();
    let latency = asked.elapsed();
    assert!(status(&during) == "200", "{during}");
    assert_no_loss(&during);
    assert!(
        latency < Duration::from_millis(1500),
        "served after {latency:?}"
    );
    let guesses: u64 = flood.into_iter().map(|t| t.join().unwrap()).sum();
    let secs = start.elapsed().as_secs_f64();
    let cpu = serve.cpu_secs() - cpu_before;
    assert!(
        cpu < 1.3 * secs,
        "{cpu:.2} s of CPU in {secs:.1} s of bad passwords"
    );
    let after = get(Some(("prom", "s3cret"))).unwrap();
    assert!(status(&after) == "200", "{after}");
    assert_no_loss(&after);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "tls+auth: {guesses} bad passwords in {secs:.1} s, {cpu:.2} s CPU, a cached scrape in {latency:?}; test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
