//! Debian cloud kernels: which ones, and fetching their vmlinuz from Debian's archive.
//!
//! Each suite gets an apt configuration of its own under target/kernels/apt/<suite>/ (sources
//! list, package lists, cache), so the host's apt state is never touched and each suite's
//! candidate is that suite's newest kernel. The mirrors are the host's. Only the vmlinuz is
//! kept, in target/kernels/<suite>/: once it is there, nothing is downloaded again.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// A kernel of the matrix: the newest cloud kernel of one Debian suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// What `--kernels` calls it, and the version prefix its package must have.
    pub name: &'static str,
    pub suite: &'static str,
    /// Also searched: the suite's security archive (bullseye's kernel updates come from it).
    pub security: bool,
}

pub const ALL: [Kernel; 4] = [
    Kernel {
        name: "5.10",
        suite: "bullseye",
        security: true,
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        security: false,
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
        security: false,
    },
    Kernel {
        name: "7",
        suite: "forky",
        security: false,
    },
];

impl Kernel {
    /// `--kernels` accepts the name (5.10, 6.1, 6.12, 7; also 7.x or 7.2 for the newest 7),
    /// or the suite (bullseye, bookworm, trixie, forky).
    fn matches(&self, token: &str) -> bool {
        token == self.name
            || token == self.suite
            || (self.name == "7" && (token == "7.x" || token.starts_with("7.")))
    }

    /// Whether a Debian package version (e.g. 6.1.176-1) is of this kernel line.
    fn version_fits(&self, version: &str) -> bool {
        version
            .strip_prefix(self.name)
            .is_some_and(|rest| rest.starts_with('.'))
    }
}

/// What `--kernels LIST` selects: the host test suite and which guests.
#[derive(Debug, PartialEq, Eq)]
pub struct Selection {
    pub host: bool,
    pub guests: Vec<Kernel>,
}

/// Parses a comma-separated list: `all` (host and every guest; the default), `host`, `vms`
/// (every guest), `none`, or guest names (see [`Kernel::matches`]).
pub fn select(list: &str) -> anyhow::Result<Selection> {
    let mut sel = Selection {
        host: false,
        guests: Vec::new(),
    };
    let add = |k: Kernel, guests: &mut Vec<Kernel>| {
        if !guests.contains(&k) {
            guests.push(k);
        }
    };
    for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match token {
            "all" => {
                sel.host = true;
                ALL.iter().for_each(|k| add(*k, &mut sel.guests));
            }
            "vms" | "guests" => ALL.iter().for_each(|k| add(*k, &mut sel.guests)),
            "host" => sel.host = true,
            "none" => {}
            _ => match ALL.iter().find(|k| k.matches(token)) {
                Some(k) => add(*k, &mut sel.guests),
                None => bail!(
                    "unknown kernel {token:?}: use all, host, vms, none, or any of {}",
                    ALL.iter()
                        .map(|k| format!("{} ({})", k.name, k.suite))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
    // Run in matrix order, oldest first.
    sel.guests
        .sort_by_key(|k| ALL.iter().position(|a| a == k).unwrap_or(usize::MAX));
    Ok(sel)
}

/// A kernel ready to boot.
pub struct Fetched {
    pub vmlinuz: PathBuf,
    /// `uname -r` of the kernel, e.g. 6.1.0-50-cloud-amd64.
    pub release: String,
    /// The Debian package version, e.g. 6.1.176-1.
    pub version: String,
}

/// The cached vmlinuz of `k`, downloading it first if there is none (or if `refresh`).
pub fn fetch(kernels_dir: &Path, k: Kernel, refresh: bool) -> anyhow::Result<Fetched> {
    let dir = kernels_dir.join(k.suite);
    let meta = dir.join("kernel.txt");
    if !refresh && let Some(f) = cached(&dir, &meta) {
        eprintln!(
            "xtask: kernel {} ({}): cached {} ({})",
            k.name,
            k.suite,
            f.release,
            f.vmlinuz.display()
        );
        return Ok(f);
    }
    let apt = Apt::new(kernels_dir, k)?;
    apt.update()?;
    let (meta_version, image) = apt.newest_image()?;
    if !k.version_fits(&meta_version) {
        bail!(
            "{}: the newest linux-image-cloud-amd64 is {meta_version}, not a {} kernel",
            k.suite,
            k.name
        );
    }
    let release = image
        .strip_prefix("linux-image-")
        .context("image package name")?
        .to_string();
    let work = dir.join("extract");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mut vmlinuz = apt.extract(&image, &work)?;
    if vmlinuz.is_none() {
        // From forky on, the image package only depends on linux-binary-*, which has the
        // kernel itself.
        let binary = apt
            .depends(&image)?
            .into_iter()
            .find(|d| d.starts_with("linux-binary-"))
            .with_context(|| format!("{image} has no vmlinuz and no linux-binary dependency"))?;
        vmlinuz = apt.extract(&binary, &work)?;
    }
    let vmlinuz = vmlinuz.with_context(|| format!("no vmlinuz in {image}"))?;
    let dest = dir.join(format!("vmlinuz-{release}"));
    fs::copy(&vmlinuz, &dest).with_context(|| format!("copying {}", vmlinuz.display()))?;
    fs::remove_dir_all(&work)?;
    // The packages themselves (modules included) are not needed any more.
    let _ = fs::remove_dir_all(apt.debs());
    fs::write(&meta, format!("{release}\n{meta_version}\n"))?;
    eprintln!(
        "xtask: kernel {} ({}): {release} ({meta_version}) saved as {}",
        k.name,
        k.suite,
        dest.display()
    );
    Ok(Fetched {
        vmlinuz: dest,
        release,
        version: meta_version,
    })
}

fn cached(dir: &Path, meta: &Path) -> Option<Fetched> {
    let text = fs::read_to_string(meta).ok()?;
    let mut lines = text.lines();
    let release = lines.next()?.to_string();
    let version = lines.next()?.to_string();
    let vmlinuz = dir.join(format!("vmlinuz-{release}"));
    vmlinuz.exists().then_some(Fetched {
        vmlinuz,
        release,
        version,
    })
}

/// The host's Debian mirrors: (main archive, security archive), from its apt sources.
fn host_mirrors() -> (String, String) {
    let mut uris = Vec::new();
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sources")
                && let Ok(text) = fs::read_to_string(&path)
            {
                for line in text.lines() {
                    if let Some(rest) = line.trim().strip_prefix("URIs:") {
                        uris.extend(rest.split_whitespace().map(String::from));
                    }
                }
            }
        }
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"deb") {
                // deb [options] URI suite components
                if let Some(uri) = words[1..].iter().find(|w| w.contains("://")) {
                    uris.push(uri.to_string());
                }
            }
        }
    }
    let trim = |u: &String| u.trim_end_matches('/').to_string();
    let security = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("debian-security"))
        .map(trim)
        .unwrap_or_else(|| "http://deb.debian.org/debian-security".into());
    let main = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .map(trim)
        .unwrap_or_else(|| "http://deb.debian.org/debian".into());
    (main, security)
}

/// apt-get and apt-cache with one suite's private configuration.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(kernels_dir: &Path, k: Kernel) -> anyhow::Result<Self> {
        let dir = kernels_dir.join("apt").join(k.suite);
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let (main, security) = host_mirrors();
        let key = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut list = format!("deb [{key}] {main} {} main\n", k.suite);
        if k.security {
            list.push_str(&format!(
                "deb [{key}] {security} {}-security main\n",
                k.suite
            ));
        }
        fs::write(dir.join("sources.list"), list)?;
        Ok(Self { dir })
    }

    fn debs(&self) -> PathBuf {
        self.dir.join("debs")
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "Dir::Etc::Preferences=/dev/null".into(),
            "Dir::Etc::PreferencesParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::State::status=/dev/null".into(),
            "Acquire::Languages=none".into(),
            // Downloads land in our directory, which apt's sandbox user may not write to.
            "APT::Sandbox::User=root".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(self.options());
        c
    }

    fn update(&self) -> anyhow::Result<()> {
        eprintln!(
            "xtask: apt-get update for {}",
            self.dir.join("sources.list").display()
        );
        let status = self
            .command("apt-get")
            .args(["-qq", "update"])
            .status()
            .context("apt-get update")?;
        if !status.success() {
            bail!("apt-get update ({}) failed: {status}", self.dir.display());
        }
        Ok(())
    }

    fn show(&self, package: &str) -> anyhow::Result<String> {
        let out = self
            .command("apt-cache")
            .args(["show", "--no-all-versions", package])
            .output()
            .context("apt-cache show")?;
        if !out.status.success() {
            bail!(
                "apt-cache show {package}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn field(record: &str, name: &str) -> Option<String> {
        record
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    }

    /// Package names a package depends on (first alternative of each).
    fn depends(&self, package: &str) -> anyhow::Result<Vec<String>> {
        let record = self.show(package)?;
        Ok(Self::field(&record, "Depends")
            .unwrap_or_default()
            .split(',')
            .filter_map(|d| d.split_whitespace().next().map(String::from))
            .collect())
    }

    /// The candidate linux-image-cloud-amd64's version, and the image package it pulls in.
    fn newest_image(&self) -> anyhow::Result<(String, String)> {
        let record = self.show("linux-image-cloud-amd64")?;
        let version = Self::field(&record, "Version").context("metapackage version")?;
        let image = Self::field(&record, "Depends")
            .unwrap_or_default()
            .split(',')
            .filter_map(|d| d.split_whitespace().next())
            .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
            .map(String::from)
            .context("linux-image-cloud-amd64 depends on no linux-image-*-cloud-amd64")?;
        Ok((version, image))
    }

    /// Downloads and unpacks a package into `into`; returns the vmlinuz found there, if any.
    fn extract(&self, package: &str, into: &Path) -> anyhow::Result<Option<PathBuf>> {
        let debs = self.debs();
        fs::create_dir_all(&debs)?;
        eprintln!("xtask: apt-get download {package}");
        let status = self
            .command("apt-get")
            .args(["-qq", "download", package])
            .current_dir(&debs)
            .status()
            .context("apt-get download")?;
        if !status.success() {
            bail!("apt-get download {package} failed: {status}");
        }
        let deb = fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("downloaded {package} not found in {}", debs.display()))?;
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(into)
            .status()
            .context("dpkg-deb -x")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed: {status}", deb.display());
        }
        Ok(find_vmlinuz(into))
    }
}

/// boot/vmlinuz-* (up to trixie) or usr/lib/modules/*/vmlinuz (forky's linux-binary).
fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    let in_dir = |dir: PathBuf, pick: &dyn Fn(&str) -> bool| {
        fs::read_dir(dir).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(pick))
        })
    };
    if let Some(p) = in_dir(root.join("boot"), &|n| n.starts_with("vmlinuz")) {
        return Some(p);
    }
    for modules in ["usr/lib/modules", "lib/modules"] {
        if let Ok(d) = fs::read_dir(root.join(modules)) {
            for e in d.flatten() {
                if let Some(p) = in_dir(e.path(), &|n| n.starts_with("vmlinuz")) {
                    return Some(p);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections() {
        let all = select("all").unwrap();
        assert!(all.host);
        assert_eq!(all.guests, ALL.to_vec());
        let some = select("6.12,host,6.1").unwrap();
        assert!(some.host);
        assert_eq!(some.guests, vec![ALL[1], ALL[2]]);
        assert_eq!(select("7.x").unwrap().guests, vec![ALL[3]]);
        assert_eq!(select("7.2").unwrap().guests, vec![ALL[3]]);
        assert_eq!(select("bullseye").unwrap().guests, vec![ALL[0]]);
        let none = select("none").unwrap();
        assert!(!none.host && none.guests.is_empty());
        assert!(select("4.19").is_err());
    }

    #[test]
    fn versions() {
        assert!(ALL[1].version_fits("6.1.176-1"));
        assert!(!ALL[1].version_fits("6.12.117-1"));
        assert!(ALL[3].version_fits("7.2.12-1"));
        assert!(ALL[0].version_fits("5.10.262-1"));
    }
}
