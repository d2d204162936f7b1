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

/// Runs the shipped binary's `serve` under `strace -f -c` until it has answered a scrape, and
/// checks that every system call it made is one the unit's `SystemCallFilter=` allows (the
/// filter would kill it with EPERM otherwise). Returns how many distinct calls it made.
pub fn syscalls_within_filter(root: &Path, binary: &Path, scratch: &Path) -> anyhow::Result<usize> {
    let unit = fs::read_to_string(root.join("dist/twtrace.service"))?;
    let filter: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("SystemCallFilter="))
        .context("the unit has no SystemCallFilter=")?
        .split_whitespace()
        .collect();
    let groups = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager"])
        .output()
        .context("systemd-analyze syscall-filter")?;
    let allowed = expand_filter(&String::from_utf8_lossy(&groups.stdout), &filter);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let counts = scratch.join("serve-syscalls.txt");
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-c", "-o"])
        .arg(&counts)
        .arg(binary)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--duration",
            "8",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("strace (apt-get install strace)")?;
    let scraped = scrape(port, std::time::Duration::from_secs(20));
    let status = child.wait()?;
    let metrics = scraped?;
    if !status.success() || !metrics.contains("twtrace_build_info") {
        bail!("twtrace serve under strace failed ({status}) or served no metrics");
    }
    let text = fs::read_to_string(&counts)?;
    let used: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let first = f.first()?;
            (f.len() >= 5 && first.starts_with(|c: char| c.is_ascii_digit()))
                .then(|| *f.last().unwrap())
        })
        .filter(|s| *s != "total")
        .collect();
    let refused: Vec<&str> = used
        .iter()
        .filter(|s| !allowed.contains(**s))
        .copied()
        .collect();
    if used.is_empty() || !refused.is_empty() {
        bail!(
            "twtrace serve made system calls the unit's SystemCallFilter= refuses: {} (of {} made)",
            refused.join(", "),
            used.len()
        );
    }
    eprintln!(
        "xtask: the {} system calls serve makes are all within the unit's SystemCallFilter=",
        used.len()
    );
    Ok(used.len())
}

/// GET /metrics once `serve` listens (it loads the programs first).
fn scrape(port: u16, within: std::time::Duration) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let until = std::time::Instant::now() + within;
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            return Ok(body);
        }
        if std::time::Instant::now() > until {
            bail!("twtrace serve did not listen on port {port} within {within:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The system calls a `SystemCallFilter=` allow list names, its groups expanded from
/// `systemd-analyze syscall-filter` (which lists each group's members, groups included).
fn expand_filter(groups: &str, filter: &[&str]) -> std::collections::BTreeSet<String> {
    let mut members: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut current = None;
    for line in groups.lines() {
        if line.starts_with('@') {
            current = line.split_whitespace().next();
            members.entry(current.unwrap_or_default()).or_default();
        } else if let Some(g) = current {
            let item = line.trim();
            if !item.is_empty() && !item.starts_with('#') {
                members.entry(g).or_default().push(item);
            }
        }
    }
    let mut out = std::collections::BTreeSet::new();
    let mut todo: Vec<&str> = filter.to_vec();
    let mut seen = std::collections::HashSet::new();
    while let Some(item) = todo.pop() {
        if !seen.insert(item) {
            continue;
        }
        if item.starts_with('@') {
            todo.extend(members.get(item).into_iter().flatten());
        } else {
            out.insert(item.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn filter_groups_expand_recursively() {
        let groups = "@a\n    # A\n    read\n    @b\n\n@b\n    # B\n    write\n    @a\n";
        let got = super::expand_filter(groups, &["@a", "bpf"]);
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            ["bpf", "read", "write"]
        );
    }
}
