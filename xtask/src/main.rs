//! Project tasks: `cargo xtask run`, `cargo xtask test`, `cargo xtask vm`, `cargo xtask dist`,
//! `cargo xtask fuzz`,
//! `cargo xtask setup`.
//!
//! A fresh machine has none of the eBPF toolchain, so every task first installs what is
//! missing: the pinned nightly with rust-src (for `-Z build-std`; see [`toolchain`]), LLVM 22's
//! development files and a bpf-linker built against them (it must match the nightly's LLVM),
//! the musl target, and every tool the tests run.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod dist;
mod fuzz;
mod toolchain;
mod vm;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain if it is missing.
    Setup,
    /// Set up, build release, and run twtrace (as root) with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Formatting and clippy (-D warnings) for userspace and for the kernel programs.
    Lint,
    /// Write target/dist/: the static (musl) binary, a .deb (binary, systemd unit, man pages,
    /// shell completions, README, licences) and SHA256SUMS.
    Dist {
        /// Then install the .deb in a minimal Debian tree, run it there and verify its unit
        /// (root; what `cargo xtask test` does).
        #[arg(long)]
        check: bool,
    },
    /// Measure what twtrace costs against no tracer and its peers (root; several minutes):
    /// writes BENCH.md and bench-results.json.
    Bench {
        /// Options for twbench (--rounds N, --seconds S, --quick, --only PART, --render).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the whole test suite: lint, unit tests and root integration tests,
    /// the .deb installed in a Debian tree and its unit verified (with the host), then in qemu
    /// guests booting other kernels (`cargo xtask vm`).
    Test {
        /// Where the tests run, comma-separated: all (default), host, vms (every guest),
        /// none, or guest kernels: 5.10, 6.1, 6.12, 7 (also 7.x, or the Debian suite name).
        #[arg(long, default_value = "all")]
        kernels: String,
        #[command(flatten)]
        guest: vm::GuestOptions,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the recording reader (cargo-fuzz) for a bounded time; the test suite runs 60 s.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Run the root integration tests (scenarios, churn) only in qemu guests, one per kernel.
    Vm {
        /// Guest kernels, comma-separated: vms (default: all of them), 5.10, 6.1, 6.12, 7.
        #[arg(long, default_value = "vms")]
        kernels: String,
        /// Boot the (single) kernel with a shell on this terminal instead of running tests.
        #[arg(long)]
        shell: bool,
        #[command(flatten)]
        guest: vm::GuestOptions,
        /// Arguments for the test binaries (libtest options and a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "--package", "twtrace"])?;
            let bin = root.join("target/release/twtrace");
            let status = as_root(&bin, &args).status().context("starting twtrace")?;
            if !status.success() {
                bail!("twtrace exited with {status}");
            }
            Ok(())
        }
        Task::Bench { args } => {
            setup()?;
            if !ok("tcplife", &["-h"]) && !Path::new("/usr/sbin/tcplife").exists() {
                // The peers measured alongside: libbpf-tools' tcplife and tcpstates.
                as_root_sh("apt-get", &["install", "-y", "-qq", "libbpf-tools"])?;
            }
            cargo(&["build", "--release", "--workspace", "--bins"])?;
            let mut full = vec!["--out".to_string(), root.display().to_string()];
            full.extend(args);
            let status = as_root(&root.join("target/release/twbench"), &full)
                .status()
                .context("starting twbench")?;
            if !status.success() {
                bail!("twbench failed ({status})");
            }
            Ok(())
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Fuzz { seconds } => {
            setup()?;
            fuzz::run(&root, seconds)
        }
        Task::Dist { check } => {
            setup()?;
            if check {
                package_tests(&root)
            } else {
                dist::build(&root).map(drop)
            }
        }
        Task::Vm {
            kernels,
            shell,
            guest,
            args,
        } => {
            let sel = vm::kernels::select(&kernels)?;
            if sel.host {
                bail!("`cargo xtask vm` runs guests only: use `cargo xtask test --kernels host`");
            }
            setup()?;
            if shell {
                let [k] = sel.guests[..] else {
                    bail!("--shell boots one kernel: pick one with --kernels");
                };
                return vm::shell(&root, k, &guest);
            }
            vm::run(&root, &sel.guests, &guest, &args)
        }
        Task::Test {
            kernels,
            guest,
            args,
        } => {
            let sel = vm::kernels::select(&kernels)?;
            setup()?;
            lint()?;
            let host = if sel.host {
                let tests = host_tests(&args);
                // The package and the fuzzing are checked even when a test failed: their
                // checks are independent.
                let package = package_tests(&root);
                if let Err(e) = &package {
                    eprintln!("xtask: package tests failed: {e:#}");
                }
                let fuzzed = fuzz::run(&root, 60);
                if let Err(e) = &fuzzed {
                    eprintln!("xtask: fuzzing failed: {e:#}");
                }
                tests.and(package).and(fuzzed)
            } else {
                Ok(())
            };
            let guests = vm::run(&root, &sel.guests, &guest, &args);
            if let Err(e) = &host {
                eprintln!("xtask: host tests failed: {e:#}");
            }
            host.and(guests)
        }
    }
}

/// The whole workspace's tests on this machine's kernel.
fn host_tests(args: &[String]) -> anyhow::Result<()> {
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let mut test = vec!["test", "--release", "--workspace", "--"];
    // The root scenarios mostly wait (one waits 60 s for a real expiry): run them side by
    // side, but not so many that their tracers (each attached to every kernel timer event)
    // crowd the two CPUs.
    if args.is_empty() {
        test.push("--test-threads=4");
    }
    test.extend(args.iter().map(String::as_str));
    // As root (and in CI), a root test that cannot run fails rather than passing unseen.
    let required = euid() == 0 || env::var_os("CI").is_some();
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(&test);
    if required {
        cmd.env("TWTRACE_TESTS_REQUIRED", "1");
    }
    let status = cmd
        .status()
        .with_context(|| format!("cargo {}", test.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", test.join(" "));
    }
    Ok(())
}

/// The .deb built, installed in a minimal Debian tree and run there, and its unit verified.
/// Needs root (chroot, mounts); without it, says so and skips.
fn package_tests(root: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (binary, deb) = dist::build(root)?;
    if euid() != 0 {
        eprintln!("xtask: skipped: the .deb install test needs root (debootstrap, chroot, mount)");
        return Ok(());
    }
    let target = vm::target_dir(root);
    let tree = dist::chroot::tree(&target)?;
    let version = dist::version(root)?;
    dist::chroot::test_deb(&tree, &deb, &version, |tree| {
        dist::unit::check(root, tree).map(drop)
    })?;
    dist::unit::syscalls_within_filter(root, &binary, &target.join("dist-stage"))?;
    eprintln!(
        "xtask: package tests passed in {:.0} s (static binary, .deb, unit)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The kernel programs only exist for the BPF target, built by the pinned nightly.
    let pin = toolchain::pin()?;
    sh(
        "rustup",
        &[
            "run",
            &pin.channel,
            "cargo",
            "clippy",
            "--package",
            "twtrace-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
    )
}

fn as_root(bin: &Path, args: &[String]) -> Command {
    if euid() == 0 {
        let mut c = Command::new(bin);
        c.args(args);
        c
    } else {
        let mut c = Command::new("sudo");
        c.arg(bin).args(args);
        c
    }
}

fn euid() -> u32 {
    // From /proc, to keep xtask free of unsafe code and extra crates.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .status()
        .with_context(|| format!("cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd} {}", args.join(" "));
    let status = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("running {cmd}"))?;
    if !status.success() {
        bail!("{cmd} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

/// The LLVM major version bpf-linker must be built against: the nightly's.
const LLVM: &str = "22";

fn setup() -> anyhow::Result<()> {
    toolchain::ensure()?;
    let linker = cargo_bin("bpf-linker");
    let linker_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !linker_ok {
        let prefix = format!("/usr/lib/llvm-{LLVM}");
        if !Path::new(&prefix).join("bin/llvm-config").exists() {
            as_root_sh("apt-get", &["update", "-qq"])?;
            as_root_sh(
                "apt-get",
                &[
                    "install",
                    "-y",
                    "-qq",
                    &format!("llvm-{LLVM}-dev"),
                    &format!("libpolly-{LLVM}-dev"),
                    "libzstd-dev",
                    "zlib1g-dev",
                ],
            )?;
        }
        eprintln!("xtask: building bpf-linker against LLVM {LLVM} (about a minute)");
        let status = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM}"),
            ])
            .env("LLVM_PREFIX", &prefix)
            .status()
            .context("cargo install bpf-linker")?;
        if !status.success() {
            bail!("cargo install bpf-linker failed ({status})");
        }
    }
    host_tools()
}

/// Every tool the host tests and the package tests run, installed from Debian when missing;
/// and the musl target (the static binary). The guests' own tools: `vm::ensure_tools`.
fn host_tools() -> anyhow::Result<()> {
    let found = |cmd: &str| vm::initramfs::which(cmd).is_some();
    let checks: [(&str, bool); 13] = [
        // ip netns, ss: every scenario.
        ("iproute2", ok("ip", &["-V"]) && ok("ss", &["-V"])),
        // The live view and the replay, driven through a terminal.
        ("tmux", ok("tmux", &["-V"])),
        // setpriv: the privilege tests; mount, mountpoint, chroot helpers.
        (
            "util-linux",
            ok("setpriv", &["--version"]) && found("mountpoint"),
        ),
        ("procps", found("sysctl")),
        // The metrics are checked with promtool and scraped by a real Prometheus.
        ("prometheus", found("prometheus") && found("promtool")),
        // The static binary (zstd-sys compiles C for musl), stripped.
        ("musl-tools", found("musl-gcc")),
        ("binutils", found("strip")),
        // The .deb: built with dpkg-deb, installed in a debootstrapped tree, unit verified.
        ("dpkg", found("dpkg-deb")),
        ("debootstrap", found("debootstrap")),
        (
            "debian-archive-keyring",
            Path::new("/usr/share/keyrings/debian-archive-keyring.gpg").exists(),
        ),
        ("systemd", found("systemd-analyze")),
        // The shipped binary's system calls, against the unit's SystemCallFilter=.
        ("strace", found("strace")),
        // systemd-analyze verify looks up the unit's man:twtrace(1) with man.
        ("man-db", found("man")),
    ];
    let missing: Vec<&str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
    apt_install(&missing)?;
    rust_target(vm::MUSL)?;
    // The Prometheus scenario checks the metrics with promtool and has a Prometheus server
    // scrape them (Debian's prometheus package has both).
    if !ok("promtool", &["--version"]) || !ok("prometheus", &["--version"]) {
        as_root_sh("apt-get", &["update", "-qq"])?;
        as_root_sh(
            "apt-get",
            &[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "prometheus",
            ],
        )?;
    }
    Ok(())
}

/// Installs Debian `packages` (none: nothing to do), updating the package lists only when
/// the first try fails.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(packages);
    if as_root_sh("apt-get", &install).is_err() {
        as_root_sh("apt-get", &["update", "-qq"])?;
        as_root_sh("apt-get", &install)?;
    }
    Ok(())
}

/// Adds a rustup target when it is missing.
fn rust_target(target: &str) -> anyhow::Result<()> {
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup target list")?;
    if !String::from_utf8_lossy(&targets.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        sh("rustup", &["target", "add", target])?;
    }
    Ok(())
}

fn as_root_sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    if euid() == 0 {
        sh(cmd, args)
    } else {
        let mut all = vec![cmd];
        all.extend_from_slice(args);
        sh("sudo", &all)
    }
}
