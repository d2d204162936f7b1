//! The systemd unit, as the .deb installs it: `systemd-analyze verify` (offline, against the
//! Debian tree the package was installed in, man pages included) and its
//! `systemd-analyze security` exposure, which must be the one the README gives.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

const UNIT: &str = "twtrace.service";

/// Verifies the unit installed in `tree` and returns its exposure score ("3.3").
pub fn check(root: &Path, tree: &Path) -> anyhow::Result<String> {
    let unit = Path::new("/").join(super::UNIT_PATH);
    // man:twtrace(1) in Documentation= is looked up by the host's man, in the tree's pages.
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", tree.display()))
        .arg(&unit)
        .env("MANPATH", tree.join("usr/share/man"))
        .output()
        .context("systemd-analyze verify")?;
    let said = String::from_utf8_lossy(&verify.stderr);
    if !verify.status.success() || said.contains(UNIT) {
        bail!("systemd-analyze verify {}: {said}", unit.display());
    }
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--root={}", tree.display()))
        .arg(UNIT)
        .output()
        .context("systemd-analyze security")?;
    let text = String::from_utf8_lossy(&security.stdout);
    let score = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for twtrace.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .map(String::from)
        .with_context(|| format!("systemd-analyze security printed no overall exposure: {text}"))?;
    let readme = fs::read_to_string(root.join("README.md")).context("reading README.md")?;
    let stated = format!("`systemd-analyze security` exposure of {score}");
    if !readme.contains(&stated) {
        bail!("README.md does not say the unit's measured score: \"{stated}\"");
    }
    eprintln!("xtask: {UNIT} verified; systemd-analyze security exposure {score}");
    Ok(score)
}
