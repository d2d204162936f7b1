//! Booting one guest under qemu (TCG: KVM is broken on this machine) and reading its serial
//! console: saved to a log, echoed with a prefix, parsed for the verdict and libtest's results.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

pub struct Guest<'a> {
    /// Short name for the prefix and the log file (e.g. 6.1).
    pub label: &'a str,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    /// Extra kernel command line (twtrace.args=... etc.).
    pub append: String,
    pub timeout: Duration,
    pub log: PathBuf,
    pub memory_mb: u32,
    /// One host thread per guest CPU (else both guest CPUs take turns on one thread).
    pub mttcg: bool,
}

/// What a guest did.
#[derive(Default, Debug)]
pub struct Outcome {
    /// The verdict line's words after TWTRACE-VM-VERDICT, if it printed one.
    pub verdict: Option<String>,
    pub passed: bool,
    pub timed_out: bool,
    pub panicked: bool,
    /// From qemu's start to the init's first line.
    pub boot: Option<Duration>,
    pub total: Duration,
    /// Per test binary: name, how long it ran, its exit code.
    pub suites: Vec<(String, Duration, Option<i32>)>,
    pub tests_passed: u64,
    pub tests_failed: u64,
    pub tests_ignored: u64,
    /// The first failing test and the first line of its panic message (or a preflight failure).
    pub first_failure: Option<String>,
    /// `twtrace check`'s exit code and last line, as the guest ran it before the tests.
    pub check: Option<String>,
    /// The lines of `twtrace check -vv` that say why the kernel refused (when it did).
    pub check_detail: Vec<String>,
    pub qemu_status: Option<String>,
}

fn command(g: &Guest) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let accel = if g.mttcg {
        "tcg,thread=multi"
    } else {
        "tcg,thread=single"
    };
    c.args(["-accel", accel, "-cpu", "max", "-smp", "2"])
        .arg("-m")
        .arg(g.memory_mb.to_string())
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .args(["-device", "virtio-rng-pci"])
        .arg("-kernel")
        .arg(g.vmlinuz)
        .arg("-initrd")
        .arg(g.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 random.trust_cpu=on {}",
            g.append
        ));
    c
}

/// An interactive guest: the console is this terminal (Ctrl-A X quits qemu).
pub fn interactive(g: &Guest) -> anyhow::Result<()> {
    eprintln!("xtask: booting {} interactively (Ctrl-A X quits)", g.label);
    let status = command(g).status().context("qemu-system-x86_64")?;
    eprintln!("xtask: qemu exited ({status})");
    Ok(())
}

/// Boots the guest, streams its console, and waits for it to power off (or the timeout).
pub fn run(g: &Guest) -> anyhow::Result<Outcome> {
    if let Some(dir) = g.log.parent() {
        fs::create_dir_all(dir)?;
    }
    let mut log = fs::File::create(&g.log).with_context(|| format!("{}", g.log.display()))?;
    let start = Instant::now();
    let mut child = command(g)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    let readers = [
        thread::spawn(move || pump(stdout, tx)),
        thread::spawn(move || pump(stderr, tx2)),
    ];
    let mut out = Outcome::default();
    let mut suite_start: Option<(String, Instant)> = None;
    let mut in_failure: Option<(String, bool)> = None;
    let deadline = start + g.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let raw = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                out.timed_out = true;
                let msg = format!(
                    "xtask: {} timed out after {:?}: killing qemu",
                    g.label, g.timeout
                );
                eprintln!("{msg}");
                let _ = writeln!(log, "{msg}");
                let _ = child.kill();
                break;
            }
        };
        let _ = log.write_all(&raw);
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end_matches(['\n', '\r']).trim_start_matches('\r');
        println!("[{}] {line}", g.label);
        // The init's markers may follow the firmware's terminal escapes on the same line.
        let line = line.find("TWTRACE-VM-").map_or(line, |i| &line[i..]);
        if line.starts_with("TWTRACE-VM-BOOTED") && out.boot.is_none() {
            out.boot = Some(start.elapsed());
        } else if let Some(v) = line.strip_prefix("TWTRACE-VM-VERDICT ") {
            out.passed = v.starts_with("pass");
            out.verdict = Some(v.to_string());
        } else if let Some(name) = line.strip_prefix("TWTRACE-VM-SUITE start ") {
            suite_start = Some((name.to_string(), Instant::now()));
        } else if let Some(rest) = line.strip_prefix("TWTRACE-VM-SUITE end ") {
            let rc = rest
                .split_once("rc=")
                .and_then(|(_, rc)| rc.trim().parse().ok());
            if let Some((name, at)) = suite_start.take() {
                out.suites.push((name, at.elapsed(), rc));
            }
        } else if let Some(c) = line.strip_prefix("TWTRACE-VM-CHECK ") {
            out.check = Some(c.to_string());
        } else if let Some(d) = line.strip_prefix("TWTRACE-VM-CHECK-DETAIL ") {
            out.check_detail.push(d.to_string());
        } else if let Some(why) = line.strip_prefix("TWTRACE-VM-PREFLIGHT fail: ") {
            out.first_failure
                .get_or_insert_with(|| format!("preflight: {why}"));
        } else if line.contains("Kernel panic") {
            out.panicked = true;
            out.first_failure.get_or_insert_with(|| line.to_string());
        } else if let Some(r) = line.trim().strip_prefix("test result: ") {
            // test result: FAILED. 3 passed; 17 failed; 1 ignored; 0 measured; 0 filtered out; ...
            for part in r.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => out.tests_passed += n,
                    "failed" => out.tests_failed += n,
                    "ignored" => out.tests_ignored += n,
                    _ => {}
                }
            }
        } else if out.first_failure.is_none() {
            // libtest: "---- name stdout ----", then "thread 'name' panicked at FILE:LINE:",
            // then the message.
            if let Some(name) = line
                .strip_prefix("---- ")
                .and_then(|l| l.strip_suffix(" stdout ----"))
            {
                in_failure = Some((name.to_string(), false));
            } else if let Some((name, seen_panic)) = &mut in_failure {
                if line.contains("panicked at") {
                    *seen_panic = true;
                } else if *seen_panic && !line.trim().is_empty() {
                    out.first_failure = Some(format!("{name}: {line}"));
                }
            }
        }
    }
    let status = child.wait().ok();
    for r in readers {
        let _ = r.join();
    }
    out.total = start.elapsed();
    out.qemu_status = status.map(|s| s.to_string());
    if out.verdict.is_none() {
        out.passed = false;
    }
    Ok(out)
}

/// Sends the reader's lines (raw bytes, newline included) until end of file.
fn pump(r: impl std::io::Read, tx: mpsc::Sender<Vec<u8>>) {
    let mut r = BufReader::new(r);
    loop {
        let mut buf = Vec::new();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if tx.send(buf).is_err() {
                    return;
                }
            }
        }
    }
}
