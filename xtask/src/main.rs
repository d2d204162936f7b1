//! Project tasks: `cargo xtask run`, `cargo xtask test`, `cargo xtask vm`, `cargo xtask setup`.
//!
//! A fresh machine has none of the eBPF toolchain, so every task first installs what is
//! missing: the nightly's rust-src (for `-Z build-std`), LLVM 22's development files and a
//! bpf-linker built against them (it must match nightly's LLVM).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

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
    /// Measure what twtrace costs against no tracer and its peers (root; several minutes):
    /// writes BENCH.md and bench-results.json.
    Bench {
        /// Options for twbench (--rounds N, --seconds S, --quick, --only PART, --render).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the whole test suite: lint, unit tests and root integration tests,
    /// on this host and then in qemu guests booting other kernels (`cargo xtask vm`).
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
            let host = if sel.host { host_tests(&args) } else { Ok(()) };
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
    cargo(&test)
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
    // The kernel programs only exist for the BPF target.
    sh(
        "rustup",
        &[
            "run",
            "nightly",
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
    if !ok("rustup", &["run", "nightly", "rustc", "--version"]) {
        sh(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("rustup run nightly rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
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
    // The tests use iproute2 (ip netns, ss) and tmux (the live view), and setpriv.
    if !ok("ip", &["-V"])
        || !ok("ss", &["-V"])
        || !ok("tmux", &["-V"])
        || !ok("setpriv", &["--version"])
    {
        as_root_sh("apt-get", &["update", "-qq"])?;
        as_root_sh(
            "apt-get",
            &["install", "-y", "-qq", "iproute2", "tmux", "util-linux"],
        )?;
    }
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

fn as_root_sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    if euid() == 0 {
        sh(cmd, args)
    } else {
        let mut all = vec![cmd];
        all.extend_from_slice(args);
        sh("sudo", &all)
    }
}
