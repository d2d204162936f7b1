//! `cargo xtask fuzz`: coverage-guided fuzzing of the recording reader (cargo-fuzz, libFuzzer),
//! seeded with real recordings and damaged ones (fuzz/seeds). The test suite runs it bounded
//! in time; any crash, hang (an input over `TIMEOUT_S`) or an input taking more memory than the
//! reader's documented bound fails it, leaving the input in fuzz/artifacts.

use std::path::Path;

use anyhow::{Context as _, bail};

use crate::{ok, sh};

/// Per input: a report over one 64 KiB input takes milliseconds; this is a hang.
const TIMEOUT_S: u32 = 10;
/// The reader's bound with no worker threads (one frame in flight: 16 MiB of compressed
/// frame, 16 MiB of text and its events) plus the report's state and libFuzzer's own, with
/// room: any input above it is a failure (README, Security).
pub const RSS_LIMIT_MB: u32 = 512;
/// Inputs up to this size: a few frames, or one decompression bomb of a thousand times that.
const MAX_LEN: u32 = 64 << 10;

/// Installs cargo-fuzz when missing, then fuzzes for `seconds`.
pub fn run(root: &Path, seconds: u32) -> anyhow::Result<()> {
    if !ok("cargo", &["fuzz", "--help"]) {
        sh("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    let corpus = root.join("target/fuzz/corpus/recording");
    std::fs::create_dir_all(&corpus).context("the fuzz corpus directory")?;
    let corpus = corpus.display().to_string();
    let target_dir = root.join("target/fuzz").display().to_string();
    let (time, rss, timeout, len) = (
        format!("-max_total_time={seconds}"),
        format!("-rss_limit_mb={RSS_LIMIT_MB}"),
        format!("-timeout={TIMEOUT_S}"),
        format!("-max_len={MAX_LEN}"),
    );
    // Without a sanitizer: the bound measured is the reader's own memory, not ASan's shadow
    // (the reader's only unsafe block is a checked UTF-8 slice).
    // cargo-fuzz needs a nightly: the one pinned for the kernel programs (setup installed it).
    let nightly = format!("+{}", crate::toolchain::pin()?.channel);
    let started = std::time::Instant::now();
    let status = std::process::Command::new("cargo")
        .args([nightly.as_str(), "fuzz", "run", "--fuzz-dir", "fuzz"])
        .args([
            "--target-dir",
            &target_dir,
            "--sanitizer",
            "none",
            "recording",
        ])
        .args([corpus.as_str(), "fuzz/seeds/recording", "--"])
        .args([&time, &rss, &timeout, &len, "-print_final_stats=1"])
        .status()
        .context("starting cargo fuzz")?;
    if !status.success() {
        bail!(
            "fuzzing the recording reader failed ({status}): the input is in fuzz/artifacts/recording; replay it with `cargo {nightly} fuzz run --fuzz-dir fuzz recording FILE`"
        );
    }
    eprintln!(
        "xtask: fuzzed the recording reader for {:.0} s: no crash, no hang, under {RSS_LIMIT_MB} MB",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
