//! The kernel matrix: the root integration scenarios inside qemu guests that boot Debian's
//! cloud kernels (5.10, 6.1, 6.12 and the newest 7.x), one after another.
//!
//! - kernels.rs: which kernels, and fetching their vmlinuz from Debian (cached).
//! - initramfs.rs + init.sh: the guests' userspace (static twtrace and test binaries).
//! - qemu.rs: booting a guest and reading its console.

pub(crate) mod initramfs;
pub mod kernels;
mod qemu;

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::ok;
use kernels::Kernel;

pub(crate) const MUSL: &str = "x86_64-unknown-linux-musl";
/// The scenario the guests leave out (see `run`).
const GUEST_SKIPPED: &str = "starts_lost_to_a_full_ring_buffer_are_recovered_by_the_sweep";
/// The test binaries (tests/tests/*.rs) the guests run, in this order.
const SUITES: [&str; 3] = ["kernel", "scenarios", "churn"];

/// Options of the guests, shared by `cargo xtask test` and `cargo xtask vm`.
#[derive(clap::Args, Debug, Clone)]
pub struct GuestOptions {
    /// Minutes a guest may run (boot and all its tests) before qemu is killed.
    #[arg(long, default_value_t = 20)]
    pub vm_timeout: u64,
    /// Guests run at the same time (each keeps one host CPU busy).
    #[arg(long, default_value_t = 2)]
    pub vm_jobs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub vm_memory: u32,
    /// Look up the newest kernel of each suite again instead of using the cached one.
    #[arg(long)]
    pub refresh_kernels: bool,
    /// Multi-threaded TCG (one host thread per guest CPU). Off by default: with it, a 7.2
    /// guest once died of an unexpected int3 in code the kernel was patching (the syscall
    /// tracepoints twtrace attaches), a race between TCG's vCPU threads.
    #[arg(long)]
    pub vm_mttcg: bool,
    /// Which test binaries run in the guests (comma-separated; default kernel,scenarios,churn).
    #[arg(long, default_value = "kernel,scenarios,churn")]
    pub suites: String,
}

fn suites(opts: &GuestOptions) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = opts
        .suites
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if let Some(bad) = list.iter().find(|s| !SUITES.contains(&s.as_str())) {
        bail!("unknown suite {bad:?}: use {}", SUITES.join(","));
    }
    Ok(list)
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// Runs the test binaries in a guest per kernel; `args` go to the test binaries (libtest
/// options and filters). Fails if any guest does not report a pass.
pub fn run(
    root: &Path,
    guests: &[Kernel],
    opts: &GuestOptions,
    args: &[String],
) -> anyhow::Result<()> {
    if guests.is_empty() {
        return Ok(());
    }
    let suites = suites(opts)?;
    let target = target_dir(root);
    let kdir = target.join("kernels");
    fs::create_dir_all(&kdir)?;
    ensure_tools()?;
    // Kernels first: a missing one fails before the long build.
    let mut fetched = Vec::new();
    for k in guests {
        fetched.push(
            kernels::fetch(&kdir, *k, opts.refresh_kernels)
                .with_context(|| format!("kernel {} ({})", k.name, k.suite))?,
        );
    }
    let payload = build_guest_binaries(&target)?;
    let common = kdir.join("initramfs.cpio.gz");
    initramfs::build(&payload, &common)?;

    let mut test_args: Vec<String> = args.to_vec();
    // The two guest CPUs: the root scenarios mostly wait, but each tracer attaches to every
    // kernel timer event and TCG is slow.
    if !test_args.iter().any(|a| a.starts_with("--test-threads")) {
        test_args.insert(0, "--test-threads=2".into());
    }
    // Not yet in the guests: under TCG the reader drains the 1 MiB ring too slowly for the
    // purge's burst of 12,000 ends, and the sweep's starts of gone connections wait for ends
    // that come a minute later; the test passes on the host. Said on every run, and run
    // anyway when asked by name.
    if !args.iter().any(|a| a.contains(GUEST_SKIPPED)) {
        eprintln!(
            "xtask: not run in the guests (too slow under TCG; it runs on the host): {GUEST_SKIPPED}"
        );
        test_args.push("--skip".into());
        test_args.push(GUEST_SKIPPED.into());
    }
    let append = format!(
        "twtrace.args={} twtrace.suites={}",
        base64(
            test_args
                .iter()
                .map(|a| format!("{a}\n"))
                .collect::<String>()
                .as_bytes()
        ),
        suites.join(",")
    );

    // Guests side by side, `vm_jobs` at a time: each single-threaded TCG guest keeps one host
    // CPU busy, and the machine has two.
    let mut prepared = Vec::new();
    for (k, fetched) in guests.iter().zip(fetched) {
        let initrd = initramfs::for_kernel(&common, &fetched)?;
        prepared.push((*k, fetched, initrd));
    }
    let queue = std::sync::Mutex::new(prepared.into_iter().enumerate());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..opts.vm_jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let Some((i, (k, fetched, initrd))) = queue.lock().unwrap().next() else {
                        return;
                    };
                    let r = run_guest(&kdir, k, &fetched, &initrd, &append, opts);
                    results
                        .lock()
                        .unwrap()
                        .push((i, k, fetched.release.clone(), r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    let mut rows = Vec::new();
    for (_, k, release, r) in results {
        let (outcome, log) = r?;
        rows.push((k, release, outcome, log));
    }

    println!();
    println!(
        "{:<6} {:<28} {:<8} {:>7} {:>9} {:>9} {:>6} {:>6} {:>7}",
        "KERNEL", "RELEASE", "VERDICT", "BOOT", "TESTS", "TOTAL", "PASS", "FAIL", "IGNORE"
    );
    for (k, release, o, _) in &rows {
        let verdict = if o.passed {
            "pass"
        } else if o.timed_out {
            "timeout"
        } else if o.panicked {
            "panic"
        } else if o.verdict.is_none() {
            "noverdict"
        } else {
            "fail"
        };
        let tests: Duration = o.suites.iter().map(|s| s.1).sum();
        println!(
            "{:<6} {:<28} {:<8} {:>7} {:>9} {:>9} {:>6} {:>6} {:>7}",
            k.name,
            release,
            verdict,
            o.boot
                .map(|b| format!("{:.1}s", b.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            format!("{:.0}s", tests.as_secs_f64()),
            format!("{:.0}s", o.total.as_secs_f64()),
            o.tests_passed,
            o.tests_failed,
            o.tests_ignored
        );
        for (name, d, rc) in &o.suites {
            let rc = rc.map(|r| r.to_string()).unwrap_or_else(|| "?".into());
            println!("       {name}: {:.0}s, exit {rc}", d.as_secs_f64());
        }
        if let Some(v) = &o.verdict {
            println!("       verdict: {v}");
        }
        if let Some(c) = &o.check {
            println!("       twtrace check: {c}");
        }
        for d in &o.check_detail {
            println!("       twtrace check -vv: {d}");
        }
        if !o.passed
            && let Some(f) = &o.first_failure
        {
            println!("       first failure: {f}");
        }
    }
    for (k, _, _, log) in &rows {
        println!("console log {}: {}", k.name, log.display());
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.2.passed)
        .map(|r| r.0.name)
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Boots one kernel with a shell on the console instead of the tests.
pub fn shell(root: &Path, k: Kernel, opts: &GuestOptions) -> anyhow::Result<()> {
    let target = target_dir(root);
    let kdir = target.join("kernels");
    fs::create_dir_all(&kdir)?;
    ensure_tools()?;
    let payload = build_guest_binaries(&target)?;
    let fetched = kernels::fetch(&kdir, k, opts.refresh_kernels)?;
    let common = kdir.join("initramfs.cpio.gz");
    initramfs::build(&payload, &common)?;
    let initrd = initramfs::for_kernel(&common, &fetched)?;
    qemu::interactive(&qemu::Guest {
        label: k.name,
        vmlinuz: &fetched.vmlinuz,
        initrd: &initrd,
        append: "twtrace.shell=1".into(),
        timeout: Duration::MAX,
        log: PathBuf::new(),
        memory_mb: opts.vm_memory,
        mttcg: opts.vm_mttcg,
    })
}

/// Installs what the guests need when it is missing.
fn ensure_tools() -> anyhow::Result<()> {
    let busybox_ok = initramfs::which("busybox").is_some_and(|b| initramfs::is_static(&b));
    let keyring = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg").exists();
    let mut missing = Vec::new();
    let checks: [(&str, bool); 11] = [
        ("qemu-system-x86", ok("qemu-system-x86_64", &["--version"])),
        ("busybox-static", busybox_ok),
        ("musl-tools", initramfs::which("musl-gcc").is_some()),
        ("gzip", initramfs::which("gzip").is_some()),
        // Decompressing the kernels' modules (.ko.xz since trixie).
        ("xz-utils", initramfs::which("xz").is_some()),
        ("debian-archive-keyring", keyring),
        ("iproute2", ok("ip", &["-V"]) && ok("ss", &["-V"])),
        ("procps", initramfs::which("sysctl").is_some()),
        ("util-linux", ok("setpriv", &["--version"])),
        ("libc-bin", initramfs::which("ldd").is_some()),
        // A scenario checks the metrics with promtool and has a Prometheus server scrape them.
        (
            "prometheus",
            initramfs::which("promtool").is_some() && initramfs::which("prometheus").is_some(),
        ),
    ];
    for (package, present) in checks {
        if !present {
            missing.push(package);
        }
    }
    crate::apt_install(&missing)?;
    crate::rust_target(MUSL)
}

/// Static (musl) twtrace, twload and test binaries: they run on a bare initramfs.
fn build_guest_binaries(target: &Path) -> anyhow::Result<initramfs::Payload> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let musl_cargo = |args: &[&str]| {
        let mut c = Command::new(&cargo);
        c.args(args)
            .args(["--release", "--target", MUSL])
            // zstd-sys and friends compile C for the target.
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc");
        c
    };
    eprintln!("xtask: building the static (musl) binaries for the guests");
    let status = musl_cargo(&[
        "build",
        "-p",
        "twtrace",
        "-p",
        "twtrace-integration",
        "--bins",
    ])
    .status()
    .context("cargo build (musl)")?;
    if !status.success() {
        bail!("cargo build --target {MUSL} failed ({status})");
    }
    let mut test = musl_cargo(&["test", "-p", "twtrace-integration", "--no-run"]);
    for s in SUITES {
        test.args(["--test", s]);
    }
    let out = test
        .arg("--message-format=json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo test --no-run (musl)")?;
    if !out.status.success() {
        bail!(
            "cargo test --no-run --target {MUSL} failed ({})",
            out.status
        );
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if msg["reason"] == "compiler-artifact"
            && is_test
            && SUITES.contains(&name)
            && let Some(exe) = msg["executable"].as_str()
        {
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for s in SUITES {
        if !tests.iter().any(|(n, _)| n == s) {
            bail!("cargo test --no-run printed no executable for the {s} tests");
        }
    }
    let bins = target.join(MUSL).join("release");
    Ok(initramfs::Payload {
        twtrace: bins.join("twtrace"),
        twload: bins.join("twload"),
        tests,
    })
}

/// Standard base64 (the guest's init decodes it with busybox base64 -d).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Boots one guest and waits for its verdict.
fn run_guest(
    kdir: &Path,
    k: Kernel,
    fetched: &kernels::Fetched,
    initrd: &Path,
    append: &str,
    opts: &GuestOptions,
) -> anyhow::Result<(qemu::Outcome, PathBuf)> {
    let log = kdir.join("logs").join(format!("{}.log", k.name));
    let guest = qemu::Guest {
        label: k.name,
        vmlinuz: &fetched.vmlinuz,
        initrd,
        append: append.to_string(),
        timeout: Duration::from_secs(opts.vm_timeout * 60),
        log: log.clone(),
        memory_mb: opts.vm_memory,
        mttcg: opts.vm_mttcg,
    };
    eprintln!(
        "xtask: booting {} ({}) under qemu TCG; console log: {}",
        fetched.release,
        fetched.version,
        log.display()
    );
    let outcome = qemu::run(&guest)?;
    eprintln!(
        "xtask: {} {} in {:.0?}; full console log: {}",
        k.name,
        if outcome.passed { "passed" } else { "FAILED" },
        outcome.total,
        log.display()
    );
    Ok((outcome, log))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(
            super::base64(b"--test-threads=2\nx"),
            "LS10ZXN0LXRocmVhZHM9Mgp4"
        );
    }
}
