//! The pinned nightly that builds the kernel programs (twtrace-ebpf/rust-toolchain.toml).
//!
//! A fresh machine gets exactly that nightly with `rustup toolchain install`. A machine whose
//! floating `nightly` is that very build (same manifest date) reuses it under the pinned name,
//! so nothing is downloaded twice; if the floating nightly later moves, the link is replaced by
//! a real install.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The file that pins it, relative to the workspace root.
pub const PIN_FILE: &str = "twtrace-ebpf/rust-toolchain.toml";

/// The pinned channel and components, read from [`PIN_FILE`].
pub struct Pin {
    pub channel: String,
    pub components: Vec<String>,
}

pub fn pin() -> anyhow::Result<Pin> {
    let text = fs::read_to_string(PIN_FILE).with_context(|| format!("reading {PIN_FILE}"))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .with_context(|| format!("parsing {PIN_FILE}"))?;
    let channel = doc["toolchain"]["channel"]
        .as_str()
        .with_context(|| format!("{PIN_FILE} has no toolchain.channel"))?
        .to_string();
    let components = doc["toolchain"]["components"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    Ok(Pin {
        channel,
        components,
    })
}

fn rustup_home() -> PathBuf {
    env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".rustup")))
        .unwrap_or_else(|| PathBuf::from("/root/.rustup"))
}

fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(String::from))
        .context("rustc -vV printed no host")
}

/// The `date` of a toolchain's channel manifest (the nightly's dist date).
fn manifest_date(dir: &Path) -> Option<String> {
    let text = fs::read_to_string(dir.join("lib/rustlib/multirust-channel-manifest.toml")).ok()?;
    let doc: toml_edit::DocumentMut = text.parse().ok()?;
    doc["date"].as_str().map(String::from)
}

/// Makes the pinned nightly and its components available.
pub fn ensure() -> anyhow::Result<Pin> {
    let pin = pin()?;
    let Some(date) = pin.channel.strip_prefix("nightly-") else {
        bail!(
            "{PIN_FILE}: channel {:?} is not a dated nightly",
            pin.channel
        );
    };
    let host = host_triple()?;
    let toolchains = rustup_home().join("toolchains");
    let pinned = toolchains.join(format!("{}-{host}", pin.channel));
    let floating = toolchains.join(format!("nightly-{host}"));
    let is_link = fs::symlink_metadata(&pinned).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && manifest_date(&pinned).as_deref() != Some(date) {
        eprintln!(
            "xtask: the nightly linked as {} moved on; installing it",
            pin.channel
        );
        fs::remove_file(&pinned).with_context(|| format!("removing {}", pinned.display()))?;
    }
    if !pinned.exists() && manifest_date(&floating).as_deref() == Some(date) {
        eprintln!(
            "xtask: the installed nightly is {}: reusing it under that name",
            pin.channel
        );
        std::os::unix::fs::symlink(&floating, &pinned)
            .with_context(|| format!("linking {}", pinned.display()))?;
    }
    if !pinned.exists() {
        let mut args = vec!["toolchain", "install", &pin.channel, "--profile", "minimal"];
        for c in &pin.components {
            args.extend(["--component", c]);
        }
        crate::sh("rustup", &args)?;
    }
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &pin.channel,
        ])
        .output()
        .context("rustup component list")?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    for c in &pin.components {
        if !installed
            .lines()
            .any(|l| l == c || l.starts_with(&format!("{c}-")))
        {
            crate::sh(
                "rustup",
                &["component", "add", c, "--toolchain", &pin.channel],
            )?;
        }
    }
    Ok(pin)
}
