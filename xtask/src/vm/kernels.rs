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

/// Modules the tests need that the cloud kernels build as modules (=m), in load order:
/// sock_diag's TCP (and UDP) handlers, which twtrace and `ss` list sockets with.
pub const MODULES: [&str; 3] = ["inet_diag", "tcp_diag", "udp_diag"];

/// Bumped when what is cached per kernel changes, so that older caches are fetched again.
const LAYOUT: &str = "layout 2";

/// A kernel ready to boot.
pub struct Fetched {
    pub vmlinuz: PathBuf,
    /// Its config (for /boot/config-RELEASE in the guest: twtrace reads CONFIG_HZ there).
    pub config: Option<PathBuf>,
    /// Uncompressed modules from [`MODULES`] (those the package has), in load order.
    pub modules: Vec<PathBuf>,
    /// `uname -r` of the kernel, e.g. 6.1.0-50-cloud-amd64.
    pub release: String,
    /// The Debian package version, e.g. 6.1.176-1.
    pub version: String,
    /// Where this kernel's files are cached (target/kernels/SUITE).
    pub dir: PathBuf,
}

/// The cached kernel of `k`, downloading it first if there is none (or if `refresh`).
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
    // Up to trixie the image package has everything; from forky on it depends on
    // linux-binary-* (vmlinuz), linux-modules-* and linux-base-* (config) of the same release.
    let mut queue = vec![image.clone()];
    let mut done = Vec::new();
    while let Some(package) = queue.pop() {
        apt.extract(&package, &work)?;
        for dep in apt.depends(&package)? {
            if dep.starts_with("linux-")
                && dep.ends_with(&release)
                && !done.contains(&dep)
                && !queue.contains(&dep)
                && dep != package
            {
                queue.push(dep);
            }
        }
        done.push(package);
    }
    let found = find_files(&work);
    let vmlinuz = found
        .vmlinuz
        .with_context(|| format!("no vmlinuz in {}", done.join(", ")))?;
    let dest = dir.join(format!("vmlinuz-{release}"));
    fs::copy(&vmlinuz, &dest).with_context(|| format!("copying {}", vmlinuz.display()))?;
    let config = match found.config {
        Some(c) => {
            let to = dir.join(format!("config-{release}"));
            fs::copy(&c, &to)?;
            Some(to)
        }
        None => {
            eprintln!("xtask: no kernel config in {}", done.join(", "));
            None
        }
    };
    let mdir = dir.join("modules");
    let _ = fs::remove_dir_all(&mdir);
    fs::create_dir_all(&mdir)?;
    let mut modules = Vec::new();
    for name in MODULES {
        let Some(src) = found.modules.iter().find(|p| module_name(p) == Some(name)) else {
            // Built in, or not built at all: either way nothing to load.
            continue;
        };
        let to = mdir.join(format!("{name}.ko"));
        decompress(src, &to)?;
        modules.push(to);
    }
    fs::remove_dir_all(&work)?;
    // The packages themselves (all modules included) are not needed any more.
    let _ = fs::remove_dir_all(apt.debs());
    let names: Vec<&str> = modules
        .iter()
        .filter_map(|m| m.file_stem()?.to_str())
        .collect();
    fs::write(
        &meta,
        format!(
            "{release}\n{meta_version}\n{LAYOUT}\nmodules {}\n",
            names.join(" ")
        ),
    )?;
    eprintln!(
        "xtask: kernel {} ({}): {release} ({meta_version}) saved in {} (modules: {})",
        k.name,
        k.suite,
        dir.display(),
        names.join(" ")
    );
    Ok(Fetched {
        vmlinuz: dest,
        config,
        modules,
        release,
        version: meta_version,
        dir,
    })
}

fn cached(dir: &Path, meta: &Path) -> Option<Fetched> {
    let text = fs::read_to_string(meta).ok()?;
    let mut lines = text.lines();
    let release = lines.next()?.to_string();
    let version = lines.next()?.to_string();
    if lines.next()? != LAYOUT {
        return None;
    }
    let modules: Vec<PathBuf> = lines
        .next()?
        .strip_prefix("modules")?
        .split_whitespace()
        .map(|m| dir.join("modules").join(format!("{m}.ko")))
        .collect();
    let vmlinuz = dir.join(format!("vmlinuz-{release}"));
    let config = Some(dir.join(format!("config-{release}"))).filter(|c| c.exists());
    (vmlinuz.exists() && modules.iter().all(|m| m.exists())).then_some(Fetched {
        vmlinuz,
        config,
        modules,
        release,
        version,
        dir: dir.to_path_buf(),
    })
}

/// "tcp_diag" for .../tcp_diag.ko, .ko.xz, .ko.zst or .ko.gz.
fn module_name(p: &Path) -> Option<&str> {
    let name = p.file_name()?.to_str()?;
    let (stem, rest) = name.split_once(".ko")?;
    ["", ".xz", ".zst", ".gz"].contains(&rest).then_some(stem)
}

fn decompress(src: &Path, to: &Path) -> anyhow::Result<()> {
    let name = src.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        fs::copy(src, to)?;
        return Ok(());
    };
    let out = fs::File::create(to)?;
    let status = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .stdout(out)
        .status()
        .with_context(|| format!("{tool} -dc"))?;
    if !status.success() {
        bail!("{tool} -dc {name} failed: {status}");
    }
    Ok(())
}

/// The host's Debian mirrors: (main archive, security archive), from its apt sources.
pub(crate) fn host_mirrors() -> (String, String) {
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

    /// Downloads and unpacks a package into `into`.
    fn extract(&self, package: &str, into: &Path) -> anyhow::Result<()> {
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
        Ok(())
    }
}

#[derive(Default)]
struct Found {
    vmlinuz: Option<PathBuf>,
    config: Option<PathBuf>,
    modules: Vec<PathBuf>,
}

/// The kernel's files in unpacked packages: boot/vmlinuz-* and boot/config-* (up to trixie),
/// or usr/lib/modules/RELEASE/{vmlinuz,config} (forky), and the modules of [`MODULES`].
fn find_files(root: &Path) -> Found {
    let mut found = Found::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let parent = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let in_modules = dir
                .parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n == "modules");
            if (parent == "boot" && name.starts_with("vmlinuz-"))
                || (in_modules && name == "vmlinuz")
            {
                found.vmlinuz = Some(p);
            } else if (parent == "boot" && name.starts_with("config-"))
                || (in_modules && name == "config")
            {
                found.config = Some(p);
            } else if module_name(&p).is_some_and(|m| MODULES.contains(&m)) {
                found.modules.push(p);
            }
        }
    }
    found
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
    fn module_names() {
        assert_eq!(module_name(Path::new("a/tcp_diag.ko.xz")), Some("tcp_diag"));
        assert_eq!(module_name(Path::new("inet_diag.ko")), Some("inet_diag"));
        assert_eq!(module_name(Path::new("inet_diag.koo")), None);
    }

    #[test]
    fn versions() {
        assert!(ALL[1].version_fits("6.1.176-1"));
        assert!(!ALL[1].version_fits("6.12.117-1"));
        assert!(ALL[3].version_fits("7.2.12-1"));
        assert!(ALL[0].version_fits("5.10.262-1"));
    }
}
