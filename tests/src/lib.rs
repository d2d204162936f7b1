//! Harness for root integration tests: throwaway network namespaces, the real `twtrace`
//! binary, and the `twload` workloads. Nothing here sends traffic outside a test namespace.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod ns;

/// Root integration tests need root, iproute2 and BTF; without them they say why and pass,
/// except where `TWTRACE_TESTS_REQUIRED` is set (`cargo xtask test`, CI): there a test that
/// cannot run fails.
pub fn can_run() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    if !(root && ip && btf) {
        let why = format!("needs root ({root}), iproute2 ({ip}) and kernel BTF ({btf})");
        assert!(
            std::env::var_os("TWTRACE_TESTS_REQUIRED").is_none(),
            "cannot run: {why}"
        );
        eprintln!("skipped: {why}");
    }
    root && ip && btf
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A binary of this workspace: $VAR, else the release build of `name`.
fn bin(var: &str, name: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/release").join(name));
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test`, which builds it",
        p.display()
    );
    p
}

/// The twtrace binary under test.
pub fn twtrace_bin() -> PathBuf {
    bin("TWTRACE_BIN", "twtrace")
}

/// The twload binary under test.
pub fn twload_bin() -> String {
    bin("TWLOAD_BIN", "twload").display().to_string()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made for one test, with loopback up; removed on drop.
pub struct Netns {
    pub name: String,
    pub inode: u64,
    deleted: bool,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "twt-{}-{}-{}",
            tag,
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        let inode = std::fs::metadata(format!("/run/netns/{name}"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("netns inode");
        Self {
            name,
            inode,
            deleted: false,
        }
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Runs a `twload` scenario inside the namespace; returns what it reported.
    pub fn twload(&self, args: &[&str]) -> Value {
        let bin = twload_bin();
        let mut all = vec!["netns", "exec", &self.name, &bin];
        all.extend_from_slice(args);
        let out = run("ip", &all);
        serde_json::from_str(out.lines().last().unwrap_or("{}")).expect("twload JSON")
    }

    /// Starts a `twload` scenario without waiting for it (stdin and stdout piped).
    pub fn twload_spawn(&self, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, &twload_bin()])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn twload")
    }

    /// The namespace's TcpExt counters (/proc/net/netstat as seen inside it).
    pub fn tcp_ext(&self) -> HashMap<String, u64> {
        let text = run(
            "ip",
            &["netns", "exec", &self.name, "cat", "/proc/net/netstat"],
        );
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
        let (names, values) = (lines[0], lines[1]);
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// Deletes the namespace now (its TIME_WAITs are purged).
    pub fn delete(&mut self) {
        if !self.deleted {
            self.deleted = true;
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A running `twtrace trace --json`, collecting its records.
pub struct Trace {
    child: Child,
    records: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Trace {
    /// Starts tracing one namespace and waits until the programs are attached.
    pub fn start(netns: &Netns, extra: &[&str]) -> Self {
        Self::start_wrapped(&[], netns, extra)
    }

    /// [`Trace::start`] through `wrapper` (a program and its arguments, such as `setpriv ...`,
    /// that ends by executing the command it is given in its own process).
    pub fn start_wrapped(wrapper: &[String], netns: &Netns, extra: &[&str]) -> Self {
        let mut cmd = match wrapper {
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg(twtrace_bin());
                c
            }
            [] => Command::new(twtrace_bin()),
        };
        let mut child = cmd
            .args(["trace", "--json", "--netns", &netns.name])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twtrace");
        let records = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let r = records.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
                r.lock().unwrap().push(v);
            }
        });
        let err = child.stderr.take().unwrap();
        let e = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = e.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let ready = Instant::now() + Duration::from_secs(30);
        while !stderr.lock().unwrap().contains("tracing TIME_WAIT") {
            if let Ok(Some(status)) = child.try_wait() {
                thread::sleep(Duration::from_millis(100));
                panic!("twtrace exited ({status}): {}", stderr.lock().unwrap());
            }
            assert!(
                Instant::now() < ready,
                "twtrace not ready: {}",
                stderr.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            records,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The pid of the process started: twtrace, or its wrapper.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to end by itself (exit status 0); all records and stderr.
    pub fn wait_exit(mut self) -> (Vec<Value>, String) {
        let status = self.child.wait().expect("wait twtrace");
        // Let the reader threads finish.
        thread::sleep(Duration::from_millis(100));
        assert!(
            status.success(),
            "twtrace failed: {status}: {}",
            self.stderr()
        );
        (self.records(), self.stderr())
    }

    /// Sends a signal to twtrace (SIGSTOP/SIGCONT pause its reader; the kernel programs run on).
    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    pub fn records(&self) -> Vec<Value> {
        self.records.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the records so far; panics after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let until = Instant::now() + timeout;
        loop {
            let recs = self.records();
            if pred(&recs) {
                return recs;
            }
            if Instant::now() >= until {
                // Stop twtrace so its totals and loss counters say what happened.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
                thread::sleep(Duration::from_millis(1500));
                panic!(
                    "timed out waiting for {what}; records: {:#?}; stderr: {}",
                    self.records(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops twtrace with SIGINT (as Ctrl-C would); returns all records, the last being the
    /// summary.
    pub fn stop(self) -> (Vec<Value>, String) {
        self.stop_with(libc::SIGINT)
    }

    /// Stops twtrace with `sig`, which must end it cleanly (exit status 0).
    pub fn stop_with(self, sig: i32) -> (Vec<Value>, String) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.wait_exit()
    }
}

/// A test that fails midway leaves no tracer attached.
impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Records of one type whose local or remote port is `port`.
pub fn with_port<'a>(recs: &'a [Value], ty: &str, port: u64) -> Vec<&'a Value> {
    recs.iter()
        .filter(|r| r["type"] == ty && (r["lport"] == port || r["rport"] == port))
        .collect()
}

/// How a kernel counts its TIME_WAITs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TwCounting {
    /// TcpExtTW + TcpExtTWKilled when a TIME_WAIT is armed.
    AtStart,
    /// TcpExtTW + TcpExtTWKilled when its timer runs out, TcpExtTWRecycled when a connect()
    /// reuses it (5.10); one an inbound SYN recycles is counted nowhere.
    AtEnd,
}

/// TIME_WAITs the kernel of `netns` started since its TcpExt counters were `before`, and how
/// the kernel counts them. Where it counts at the end, what started is what is alive now (in
/// either substate) plus what ended and was counted. The counters alone fall short of the
/// TIME_WAITs alive only where they count at the end (in a fresh namespace).
pub fn kernel_started_time_waits(
    netns: &Netns,
    before: &HashMap<String, u64>,
) -> (u64, TwCounting) {
    let now = netns.tcp_ext();
    let delta = |k: &str| now.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let counters = delta("TW") + delta("TWKilled");
    let alive = count_all_time_waits(netns) as u64;
    if counters >= alive {
        (counters, TwCounting::AtStart)
    } else {
        (alive + counters + delta("TWRecycled"), TwCounting::AtEnd)
    }
}

/// TIME_WAIT sockets in `netns` in either substate: one in its FIN_WAIT2 substate is listed
/// as fin-wait-2, with the timewait timer.
pub fn count_all_time_waits(netns: &Netns) -> usize {
    run(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "ss",
            "-Htano",
            "state",
            "time-wait",
            "state",
            "fin-wait-2",
        ],
    )
    .lines()
    .filter(|l| l.contains("timer:(timewait"))
    .count()
}

/// TIME_WAIT sockets in `netns` towards remote port `rport`, as `ss` counts them.
pub fn count_time_waits(netns: &Netns, rport: u16) -> usize {
    time_waits_where(netns, 3, rport)
}

/// TIME_WAIT sockets in `netns` on local port `lport` (those of a server that closed first).
pub fn count_time_waits_local(netns: &Netns, lport: u16) -> usize {
    time_waits_where(netns, 2, lport)
}

/// TIME_WAITs whose `ss` column `col` (2: local, 3: peer) ends in `:port`.
fn time_waits_where(netns: &Netns, col: usize, port: u16) -> usize {
    run(
        "ip",
        &[
            "netns",
            "exec",
            &netns.name,
            "ss",
            "-Htan",
            "state",
            "time-wait",
        ],
    )
    .lines()
    .filter(|l| {
        l.split_whitespace()
            .nth(col)
            .is_some_and(|r| r.ends_with(&format!(":{port}")))
    })
    .count()
}

/// A running `twtrace record` of one namespace.
pub struct Recording {
    child: Child,
}

impl Recording {
    pub fn start(netns: &Netns, file: &str) -> Self {
        Self::start_with(netns, file, &[])
    }

    /// With more options (`--max-size`, `--keep`...).
    pub fn start_with(netns: &Netns, file: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(twtrace_bin())
            .args(["record", "--json", "--netns", &netns.name, "-o", file])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twtrace record");
        let err = child.stderr.take().unwrap();
        let mut lines = BufReader::new(err).lines();
        // Attached once it says it is recording.
        for line in lines.by_ref() {
            let line = line.expect("read twtrace stderr");
            if line.contains("recording TIME_WAIT") {
                break;
            }
        }
        thread::spawn(move || for _ in lines {});
        Self { child }
    }

    /// SIGINT, as Ctrl-C: returns the live totals it printed.
    pub fn stop(&mut self) -> Value {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let mut out = String::new();
        use std::io::Read as _;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(self.child.wait().unwrap().success());
        serde_json::from_str(out.lines().last().unwrap_or("{}")).expect("summary JSON")
    }

    /// SIGKILL: no chance to flush.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// A test that fails midway leaves no recorder attached.
impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from a server on loopback (HTTP/1.0, so the reply is not chunked): the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed when the test ends, passing or not.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A recording's path under /tmp, unique to this test process.
pub fn tmp_trace(tag: &str) -> String {
    format!("/tmp/twtrace-it-{}-{tag}.twt", std::process::id())
}

/// A running `twtrace serve` of one namespace on a free loopback port, its stderr collected;
/// killed on drop.
pub struct Serve {
    child: Child,
    pub addr: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    /// Starts serving and waits until it says so (the programs are attached by then).
    /// `nofile`: an RLIMIT_NOFILE for it (soft and hard).
    pub fn start(netns: &Netns, extra: &[&str], nofile: Option<u64>) -> Self {
        use std::os::unix::process::CommandExt as _;
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(twtrace_bin());
        cmd.args(["serve", "--listen", &addr, "--netns", &netns.name])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            let limit = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn twtrace serve");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().unwrap();
        let e = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                e.lock().unwrap().push(line);
            }
        });
        let serve = Self {
            child,
            addr,
            stderr,
        };
        let ready = Instant::now() + Duration::from_secs(30);
        while !serve
            .stderr_lines()
            .iter()
            .any(|l| l.contains("serving metrics on"))
        {
            assert!(
                Instant::now() < ready,
                "twtrace serve not ready: {:?}",
                serve.stderr_lines()
            );
            thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Open file descriptors.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }

    /// CPU time used so far (utime + stime), seconds.
    pub fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces), from field 3 (state) on.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks as f64 / hz
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that an exposition's loss counters (events lost, program runs missed) are all zero,
/// and that there are some.
pub fn assert_no_loss(exposition: &str) {
    let counters: Vec<&str> = exposition
        .lines()
        .filter(|l| {
            l.starts_with("twtrace_lost_events_total") || l.starts_with("twtrace_recursion_misses")
        })
        .collect();
    assert!(counters.len() >= 3, "no loss counters in: {exposition}");
    for l in counters {
        assert!(l.ends_with(" 0"), "the tracer lost events: {l}");
    }
}
