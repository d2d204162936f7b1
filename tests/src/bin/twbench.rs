//! What twtrace costs, side by side with its peers: `cargo xtask bench` runs this (as root).
//!
//! Every measurement runs in a network namespace made for it. Throughput runs are interleaved
//! (the tracer order rotates each round) and repeated; ratios compare medians measured in the
//! same run, because this machine is shared and noisy. Results go to BENCH.md and a JSON file.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use twtrace::kernel::tracer::HooksOnly;
use twtrace_integration::{KillOnDrop, Netns, twtrace_bin};

struct Opts {
    /// Only no tracer and `trace`: the test suite's check that the bench still works.
    smoke: bool,
    rounds: usize,
    seconds: f64,
    threads: u32,
    live_time_waits: u64,
    report_events: u64,
    out: PathBuf,
    /// Run one part and print its figures instead of writing BENCH.md: for profiling.
    only: Option<String>,
    /// Rewrite BENCH.md from the last results (after editing bench/changes.md).
    render: bool,
    /// Throughput only against these tracers (besides none): for profiling.
    tracers: Option<Vec<String>>,
    /// Throughput only on these workloads.
    workloads: Option<Vec<String>>,
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        smoke: false,
        rounds: 9,
        seconds: 3.0,
        threads: 2,
        live_time_waits: 131_072,
        report_events: 10_000_000,
        out: PathBuf::from("."),
        only: None,
        render: false,
        tracers: None,
        workloads: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().context("missing value");
        match a.as_str() {
            "--rounds" => o.rounds = val()?.parse()?,
            "--seconds" => o.seconds = val()?.parse()?,
            "--out" => o.out = PathBuf::from(val()?),
            "--only" => o.only = Some(val()?.clone()),
            "--render" => o.render = true,
            "--tracers" => o.tracers = Some(val()?.split(',').map(String::from).collect()),
            "--workloads" => o.workloads = Some(val()?.split(',').map(String::from).collect()),
            "--quick" => {
                o.rounds = 1;
                o.seconds = 0.5;
                o.live_time_waits = 2_000;
                o.report_events = 30_000;
            }
            "--smoke" => {
                o.smoke = true;
                o.rounds = 1;
                o.seconds = 0.3;
                o.live_time_waits = 300;
                o.report_events = 3_000;
            }
            other => {
                bail!(
                    "unknown option {other}; use --rounds N --seconds S --out DIR --quick --smoke --only PART --tracers A,B --workloads A,B --render"
                )
            }
        }
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Starts `cmd` and waits (30 s at most) for `marker` on its stderr. The lines after it are
/// passed on through the receiver.
fn spawn_ready(
    cmd: &mut Command,
    marker: &str,
) -> anyhow::Result<(KillOnDrop, std::sync::mpsc::Receiver<String>)> {
    let mut child = KillOnDrop(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?);
    let err = child.0.stderr.take().context("stderr")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (rest_tx, rest_rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            match &ready {
                Some(tx) if l.contains(&marker) => {
                    let _ = tx.send(());
                    ready = None;
                }
                Some(_) => {}
                None => {
                    let _ = rest_tx.send(l);
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("the program did not start")?;
    Ok((child, rest_rx))
}

/// A tracer under test, running until dropped.
enum Running {
    Process(#[allow(dead_code)] KillOnDrop),
    Hooks(#[allow(dead_code)] HooksOnly),
}

fn start_tracer(name: &str, out: &Path) -> anyhow::Result<Option<Running>> {
    Ok(Some(Running::Process(match name {
        "none" => return Ok(None),
        // twtrace's tracepoints with empty programs: the floor no program work can remove.
        // `hooks:a+b` hooks only tracepoints a and b (for profiling with --tracers).
        hooks if hooks.starts_with("hooks") => {
            let only: Vec<&str> = hooks
                .strip_prefix("hooks:")
                .map(|l| l.split('+').collect())
                .unwrap_or_default();
            return Ok(Some(Running::Hooks(HooksOnly::attach(&only)?)));
        }
        "trace" => {
            spawn_ready(
                Command::new(twtrace_bin()).arg("trace"),
                "tracing TIME_WAIT",
            )?
            .0
        }
        "record" => {
            spawn_ready(
                Command::new(twtrace_bin())
                    .args(["record", "--force", "-o"])
                    .arg(out.join("bench-record.twt")),
                "recording TIME_WAIT",
            )?
            .0
        }
        "tcplife" | "tcpstates" => {
            // Their header is stuck in stdio's buffer when stdout is a pipe: give them the
            // time they need to attach (well under a second here), then check they live.
            let mut c = Command::new(name)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            std::thread::sleep(Duration::from_millis(2500));
            if let Some(status) = c.try_wait()? {
                bail!("{name} exited at start ({status})");
            }
            KillOnDrop(c)
        }
        other => bail!("unknown tracer {other}"),
    })))
}

fn fresh_netns(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    ns.sysctl("net.ipv4.tcp_max_tw_buckets", "1000000");
    ns
}

/// CPU time spent by the whole machine so far (all CPUs, not idle), in microseconds.
fn busy_us() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal: all but idle and iowait.
        .filter(|(i, _)| !matches!(i, 3 | 4) && *i < 8)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1e6 / hz
}

/// One workload run: its throughput (connections/s or bytes/s) and the machine's CPU time per
/// connection (or per MB), tracer included: a steadier measure of cost than throughput on a
/// machine whose speed varies from run to run.
fn run_workload(workload: &str, o: &Opts) -> anyhow::Result<(f64, f64)> {
    let ns = fresh_netns("bench");
    let busy_before = busy_us();
    let v = match workload {
        // Over 8 destination ports: towards one, the client's TIME_WAITs cap churn at the rate
        // its 64,512 local ports become reusable, whatever the CPU can do.
        "churn-client" => churn(&ns, o.seconds, o.threads, "client", 8),
        "churn-server" => churn(&ns, o.seconds, o.threads, "server", 1),
        "bulk" => ns.twload(&[
            "bulk",
            "127.0.0.1:8080",
            &o.seconds.to_string(),
            &o.threads.to_string(),
        ]),
        other => bail!("unknown workload {other}"),
    };
    let busy = busy_us() - busy_before;
    let (amount, unit) = match (v["connections"].as_f64(), v["bytes"].as_f64()) {
        (Some(n), _) => (n, n),
        (None, Some(b)) => (b, b / 1e6),
        _ => (0.0, 0.0),
    };
    Ok((amount / o.seconds, busy / unit.max(1.0)))
}

fn throughput(o: &Opts, tracers: &[&str]) -> anyhow::Result<Value> {
    let mut out = serde_json::Map::new();
    let all = ["churn-client", "churn-server", "bulk"];
    for workload in all.iter().filter(|w| {
        o.workloads
            .as_ref()
            .is_none_or(|chosen| chosen.iter().any(|c| c == *w))
    }) {
        let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 0..o.rounds {
            for i in 0..tracers.len() {
                let t = tracers[(i + round) % tracers.len()];
                let guard = start_tracer(t, &o.out)?;
                let (rate, cpu_us) = run_workload(workload, o)?;
                drop(guard);
                eprintln!(
                    "twbench: {workload} round {} {t}: {rate:.0}/s, {cpu_us:.1} µs CPU per unit",
                    round + 1
                );
                samples.entry(t).or_default().push(rate);
                cpu.entry(t).or_default().push(cpu_us);
            }
        }
        let base = median(samples["none"].clone());
        let mut w = serde_json::Map::new();
        for (t, s) in &samples {
            let m = median(s.clone());
            w.insert(
                t.to_string(),
                json!({
                    "median_per_s": m,
                    "ratio": m / base,
                    "samples": s,
                    "cpu_us_per_unit": median(cpu[t].clone()),
                    "cpu_samples": cpu[t],
                }),
            );
        }
        out.insert(workload.to_string(), Value::Object(w));
    }
    Ok(Value::Object(out))
}

/// At maximum churn: lost events, and twtrace's count against the kernel's.
fn exactness(o: &Opts) -> anyhow::Result<Value> {
    let ns = fresh_netns("exact");
    let mut t = Command::new(twtrace_bin())
        .args(["trace", "--json", "--netns", &ns.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(t.stderr.take().context("stderr")?).lines();
    for l in lines.by_ref() {
        if l?.contains("tracing TIME_WAIT") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    // Read the event stream while it runs: a full pipe would stall twtrace's reader.
    let stdout = t.stdout.take().context("stdout")?;
    let last_line = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .last()
            .unwrap_or_default()
    });
    let counters = |ns: &Netns| {
        let c = ns.tcp_ext();
        c["TW"] + c["TWKilled"]
    };
    let before = counters(&ns);
    let load = max_churn(&ns, o);
    // Past the sweep, which recovers starts no kernel program saw once their close is 1 s old.
    // Counted after it too: the last clients' TIME_WAITs start when their server's FIN arrives.
    std::thread::sleep(Duration::from_millis(3000));
    let kernel = counters(&ns) - before;
    unsafe { libc::kill(t.id() as i32, libc::SIGINT) };
    let last = last_line.join().unwrap_or_default();
    t.wait()?;
    let summary: Value = serde_json::from_str(if last.is_empty() { "{}" } else { &last })?;
    Ok(json!({
        "connections": load["connections"],
        "kernel_time_waits": kernel,
        "twtrace_time_waits": summary["totals"]["entered"],
        "recovered_starts": summary["totals"]["recovered"],
        "exact": summary["totals"]["entered"].as_u64() == Some(kernel),
        "loss": summary["loss"],
    }))
}

fn status_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Kernel memory of the BPF maps a process holds (fdinfo memlock).
fn map_memory(pid: u32) -> u64 {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return 0;
    };
    fds.flatten()
        .filter_map(|f| fs::read_to_string(f.path()).ok())
        .filter(|s| s.contains("map_type:"))
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// Connections opened and closed as fast as they go for `secs`, from `threads` clients towards
/// `ports` listening ports from 8080; `closer`: client, server or alt(ernate).
fn churn(ns: &Netns, secs: f64, threads: u32, closer: &str, ports: u16) -> Value {
    ns.twload(&[
        "churn",
        "127.0.0.1:8080",
        &secs.to_string(),
        "10000000",
        "0",
        closer,
        &threads.to_string(),
        &ports.to_string(),
    ])
}

/// Churn as fast as it goes, both sides closing first in turn, for at least 2 s.
fn max_churn(ns: &Netns, o: &Opts) -> Value {
    churn(ns, o.seconds.max(2.0), o.threads, "alt", 1)
}

/// Resident memory and kernel map memory with many live TIME_WAITs. With tcp_tw_reuse=0 a
/// port towards one destination stays held for the 60 s of its TIME_WAIT.
fn memory(o: &Opts) -> anyhow::Result<Value> {
    let ns = fresh_netns("memory");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    // The servers' ports must not be ephemeral: a client TIME_WAIT on 8081 would block the
    // second server's bind().
    ns.sysctl("net.ipv4.ip_local_port_range", "10000 65535");
    let (t, _) = spawn_ready(
        Command::new(twtrace_bin()).args(["trace", "--netns", &ns.name]),
        "tracing TIME_WAIT",
    )?;
    let rss_idle = status_kib(t.0.id(), "VmRSS:");
    // Eight destinations at once, each well inside the port range: connect()'s port search
    // stays fast, so every TIME_WAIT is still alive (60 s) when memory is read. A few
    // connections end in a reset instead (accept backlog), hence the margin.
    const DESTS: u16 = 8;
    let each = (o.live_time_waits.div_ceil(u64::from(DESTS)) * 101 / 100).to_string();
    let loads: Vec<_> = (0..DESTS)
        .map(|i| {
            let server = format!("127.0.0.1:{}", 8080 + i);
            ns.twload_spawn(&["churn", &server, "120", &each, "0", "client", "1"])
        })
        .collect();
    for mut l in loads {
        l.wait()?;
    }
    let live: u64 = (0..DESTS)
        .map(|i| twtrace_integration::count_time_waits(&ns, 8080 + i) as u64)
        .sum();
    // Let the drain and the next refresh catch up.
    std::thread::sleep(Duration::from_secs(2));
    let rss = status_kib(t.0.id(), "VmRSS:");
    Ok(json!({
        "live_time_waits": live,
        "rss_kib": rss,
        "rss_idle_kib": rss_idle,
        "map_memory_kib": map_memory(t.0.id()) / 1024,
    }))
}

/// Bytes per event of a recording at churn.
fn recording(o: &Opts) -> anyhow::Result<Value> {
    let ns = fresh_netns("rec");
    let file = o.out.join("bench-rec.twt");
    let (c, rest) = spawn_ready(
        Command::new(twtrace_bin())
            .args(["record", "--force", "--netns", &ns.name, "-o"])
            .arg(&file),
        "recording TIME_WAIT",
    )?;
    max_churn(&ns, o);
    unsafe { libc::kill(c.0.id() as i32, libc::SIGINT) };
    // "recorded N events in B bytes (X bytes/event) to FILE"
    // Ends when twtrace exits and closes its stderr.
    let stats = rest
        .iter()
        .find(|l| l.contains("bytes/event"))
        .unwrap_or_default();
    drop(c);
    let _ = fs::remove_file(&file);
    let word_after = |after: &str| -> Option<f64> {
        stats
            .split(after)
            .nth(1)?
            .split_whitespace()
            .next()?
            .trim_matches('(')
            .parse()
            .ok()
    };
    Ok(json!({
        "events": word_after("recorded "),
        "bytes": word_after(" in "),
        "bytes_per_event": word_after("bytes ("),
    }))
}

/// `twtrace report` over a synthetic recording of `n` events.
fn report_time(o: &Opts) -> anyhow::Result<Value> {
    use twtrace::{
        event::{
            CloseKind, EndReason, Endpoints, Event, Family, Process, Role, Substate, TwEnd,
            TwEnter, TwKey, TwResched,
        },
        record::{Header, Recorder, Rotation},
    };
    let file = o.out.join("bench-report.twt");
    let header = Header::new("bench", 250);
    let mut rec = Recorder::create(
        &file,
        twtrace::safe_file::Existing::Replace,
        header,
        Rotation {
            max_bytes: 0,
            keep: 0,
        },
    )?;
    let per_tw = 3;
    let tws = o.report_events.div_ceil(per_tw);
    let start = Instant::now();
    for i in 0..tws {
        let ts = 1_000_000_000 + i * 20_000; // 50k TIME_WAITs a second
        let key = TwKey::Cookie(i + 1);
        let conn = Endpoints {
            netns: 1,
            family: Family::Ipv4,
            laddr: [127, 0, 0, 1].into(),
            lport: 1024 + (i % 60_000) as u16,
            raddr: [127, 0, 0, 1].into(),
            rport: 8080,
        };
        rec.push(&Event::TwEnter(TwEnter {
            ts_ns: ts,
            cpu: (i % 2) as u32,
            key,
            conn,
            closer: Some(Process {
                pid: 1000 + (i % 7) as u32,
                tid: 1000,
                host_pid: None,
                uid: 0,
                comm: format!("worker{}", i % 7).into(),
                cgroup_id: 1,
            }),
            role: Role::Client,
            close: CloseKind::Active,
            substate: Substate::FinWait2,
            timeout_jiffies: 15000,
            recovered: None,
        }))?;
        rec.push(&Event::TwResched(TwResched {
            ts_ns: ts + 100_000,
            cpu: 0,
            key,
            substate: Substate::TimeWait,
            timeout_jiffies: 15000,
            addr: None,
        }))?;
        rec.push(&Event::TwEnd(TwEnd {
            ts_ns: ts + 1_500_000_000,
            cpu: 1,
            key,
            end: EndReason::Reused,
            substate: Substate::TimeWait,
            by: None,
            addr: None,
            recovered: false,
        }))?;
        if i % 50_000 == 0 {
            rec.flush()?;
        }
    }
    rec.flush()?;
    let written = rec.bytes;
    drop(rec);
    let generated_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let out = Command::new(twtrace_bin())
        .args(["report", "--json"])
        .arg(&file)
        .stdout(Stdio::null())
        .status()?;
    let report_s = start.elapsed().as_secs_f64();
    if o.only.is_none() {
        let _ = fs::remove_file(&file);
    }
    if !out.success() {
        bail!("twtrace report failed");
    }
    Ok(json!({
        "events": tws * per_tw,
        "file_bytes": written,
        "generate_s": generated_s,
        "report_s": report_s,
    }))
}

/// From start to programs attached, median of a few starts.
fn attach_time() -> anyhow::Result<Value> {
    let mut times = vec![];
    for _ in 0..3 {
        let start = Instant::now();
        let c = spawn_ready(
            Command::new(twtrace_bin()).args(["trace", "--no-existing"]),
            "tracing TIME_WAIT",
        )?;
        times.push(start.elapsed().as_secs_f64());
        drop(c);
    }
    Ok(json!({ "median_s": median(times.clone()), "samples": times }))
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() -> anyhow::Result<()> {
    let o = parse()?;
    fs::create_dir_all(&o.out)?;
    if o.render {
        let results: Value =
            serde_json::from_str(&fs::read_to_string(o.out.join("bench-results.json"))?)?;
        fs::write(o.out.join("BENCH.md"), markdown(&results))?;
        return Ok(());
    }
    if !twtrace_integration::can_run() {
        bail!("the bench needs root, iproute2 and kernel BTF");
    }
    let mut tracers = vec!["none", "hooks", "trace"];
    if let Some(chosen) = &o.tracers {
        tracers = std::iter::once("none")
            .chain(chosen.iter().map(String::as_str))
            .collect();
    } else if !o.smoke {
        tracers.push("record");
    }
    for peer in ["tcplife", "tcpstates"]
        .iter()
        .filter(|_| !o.smoke && o.tracers.is_none())
    {
        if which(peer) {
            tracers.push(*peer);
        } else {
            eprintln!("twbench: {peer} not installed (Debian's libbpf-tools): skipped");
        }
    }
    if let Some(part) = &o.only {
        let v = match part.as_str() {
            "throughput" => throughput(&o, &tracers)?,
            "exactness" => exactness(&o)?,
            "memory" => memory(&o)?,
            "recording" => recording(&o)?,
            "report" => report_time(&o)?,
            "attach" => attach_time()?,
            other => bail!(
                "unknown part {other}: throughput, exactness, memory, recording, report or attach"
            ),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let started = chrono_like_now();
    let results = json!({
        "date": started,
        "machine": machine(),
        "options": { "rounds": o.rounds, "seconds": o.seconds, "threads": o.threads },
        "throughput": throughput(&o, &tracers)?,
        "exactness": exactness(&o)?,
        "memory": memory(&o)?,
        "recording": recording(&o)?,
        "report": report_time(&o)?,
        "attach": attach_time()?,
    });
    fs::write(
        o.out.join("bench-results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    fs::write(o.out.join("BENCH.md"), markdown(&results))?;
    eprintln!("twbench: wrote {}", o.out.join("BENCH.md").display());
    Ok(())
}

fn chrono_like_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn markdown(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let history =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/changes.md"))
            .unwrap_or_default();
    let m = &r["machine"];
    let _ = writeln!(
        o,
        "# twtrace benchmarks\n\nMeasured {} on {} CPUs ({}), kernel {}, by `cargo xtask bench` ({} rounds of {} s, {} client threads). Ratios are medians against no tracer, in the same run.\n",
        r["date"].as_str().unwrap_or(""),
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        r["options"]["rounds"],
        r["options"]["seconds"],
        r["options"]["threads"]
    );
    let _ = writeln!(
        o,
        "## Throughput against no tracer\n\nEach round runs every tracer once, back to back; \"per round\" divides a run by the \
         no-tracer run of its round, which shows how noisy the machine was. \"CPU\" is the whole machine's busy time per \
         connection (per MB for bulk), tracer included, median of the rounds, and its difference from no tracer.\n\n\
         | workload | tracer | median | ratio | per round | CPU |\n|---|---|---|---|---|---|"
    );
    if let Some(t) = r["throughput"].as_object() {
        for (w, tracers) in t {
            let unit = if w == "bulk" { "MB/s" } else { "conn/s" };
            let samples = |name: &str| -> Vec<f64> {
                tracers[name]["samples"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            };
            let none = samples("none");
            let cpu = |name: &str| tracers[name]["cpu_us_per_unit"].as_f64();
            for (name, v) in tracers.as_object().into_iter().flatten() {
                let cpu_cell = match (cpu(name), cpu("none")) {
                    (Some(c), _) if name == "none" => format!("{c:.1} µs"),
                    (Some(c), Some(n)) => format!("{c:.1} µs ({:+.1})", c - n),
                    _ => "-".to_string(),
                };
                let med = v["median_per_s"].as_f64().unwrap_or(0.0);
                let med = if w == "bulk" { med / 1e6 } else { med };
                let rounds: Vec<String> = samples(name)
                    .iter()
                    .zip(&none)
                    .map(|(x, n)| format!("{:.2}", x / n))
                    .collect();
                let _ = writeln!(
                    o,
                    "| {w} | {name} | {med:.0} {unit} | {:.3} | {} | {cpu_cell} |",
                    v["ratio"].as_f64().unwrap_or(f64::NAN),
                    rounds.join(" ")
                );
            }
        }
    }
    let e = &r["exactness"];
    let mem = &r["memory"];
    let rec = &r["recording"];
    let rep = &r["report"];
    let ratio = |w: &str, t: &str| r["throughput"][w][t]["ratio"].as_f64().unwrap_or(f64::NAN);
    let churn_min = ["churn-client", "churn-server"]
        .iter()
        .flat_map(|w| [ratio(w, "trace"), ratio(w, "record")])
        .fold(f64::INFINITY, f64::min);
    let hooks_min = ratio("churn-client", "hooks").min(ratio("churn-server", "hooks"));
    let ring_lost = e["loss"]["ringbuf_full"].as_u64().unwrap_or(u64::MAX);
    let skipped = e["loss"]["recursion_misses"].as_u64().unwrap_or(u64::MAX);
    let goal = |ok: bool| if ok { "met" } else { "NOT MET" };
    let rss_mib = mem["rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
    let bpe = rec["bytes_per_event"].as_f64().unwrap_or(f64::NAN);
    let report_s = rep["report_s"].as_f64().unwrap_or(f64::NAN);
    let attach_s = r["attach"]["median_s"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        o,
        "\n## Goals\n\n| goal | measured | |\n|---|---|---|\n\
         | churn ratio >= 0.98 with trace and record | {churn_min:.3} (worst of four; the hooks alone: {hooks_min:.3}) | {} |\n\
         | bulk ratio >= 0.99 | trace {:.3}, record {:.3} | {} |\n\
         | zero lost events and an exact count at maximum churn | {} connections: kernel {} TIME_WAITs, twtrace {} ({} of them recovered by the sweep); {ring_lost} events lost (ring buffer full), {skipped} program runs skipped by the kernel (recursion) | {} |\n\
         | <= 64 MiB resident with 131072 live TIME_WAITs | {rss_mib:.1} MiB with {} live ({} KiB idle), kernel maps {} KiB | {} |\n\
         | <= 24 bytes per event recorded | {bpe:.1} | {} |\n\
         | report over 10 M events in <= 5 s | {report_s:.2} s for {} events | {} |\n\
         | attached within 1 s | {attach_s:.2} s | {} |",
        goal(churn_min >= 0.98),
        ratio("bulk", "trace"),
        ratio("bulk", "record"),
        goal(ratio("bulk", "trace") >= 0.99 && ratio("bulk", "record") >= 0.99),
        e["connections"],
        e["kernel_time_waits"],
        e["twtrace_time_waits"],
        e["recovered_starts"],
        goal(e["exact"] == true && ring_lost == 0 && skipped == 0),
        mem["live_time_waits"],
        mem["rss_idle_kib"],
        mem["map_memory_kib"],
        goal(rss_mib <= 64.0 && mem["live_time_waits"].as_u64().unwrap_or(0) >= 131_072),
        goal(bpe <= 24.0),
        rep["events"],
        goal(report_s <= 5.0 && rep["events"].as_u64().unwrap_or(0) >= 10_000_000),
        goal(attach_s <= 1.0),
    );
    if !history.is_empty() {
        let _ = write!(o, "\n{history}");
    }
    o
}
