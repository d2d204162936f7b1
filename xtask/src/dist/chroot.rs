//! The .deb on a fresh Debian: a minimal bookworm tree (debootstrap --variant=minbase, cached
//! in target/debian/), the package installed with dpkg inside it, and twtrace run from inside
//! (`--version`, `check`, `trace --duration 2`) with /proc, /sys, tracefs and bpffs bound in.
//! Everything mounted is unmounted again, on failure too, and the package purged, so the
//! cached tree stays as debootstrap made it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// The suite the package is tested on (and the tree's directory under target/debian/).
const SUITE: &str = "bookworm";
/// Present once debootstrap has finished (an interrupted run leaves none and starts over).
const COMPLETE: &str = ".twtrace-debootstrap-complete";

/// The cached tree, made when missing. systemd is included so `systemd-analyze verify` finds
/// the units the service depends on (see `super::unit`).
pub fn tree(target: &Path) -> anyhow::Result<PathBuf> {
    let tree = target.join("debian").join(SUITE);
    if tree.join(COMPLETE).exists() {
        return Ok(tree);
    }
    let partial = target.join("debian").join(format!("{SUITE}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial)?;
    }
    fs::create_dir_all(&partial)?;
    let (mirror, _) = crate::vm::kernels::host_mirrors();
    eprintln!(
        "xtask: debootstrap {SUITE} (minbase) into {} (once; cached)",
        tree.display()
    );
    let started = Instant::now();
    crate::sh(
        "debootstrap",
        &[
            "--variant=minbase",
            "--include=systemd",
            SUITE,
            &partial.display().to_string(),
            &mirror,
        ],
    )?;
    fs::write(partial.join(COMPLETE), b"")?;
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    fs::rename(&partial, &tree)?;
    eprintln!(
        "xtask: debootstrap took {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(tree)
}

/// Mount points made under the tree, unmounted in reverse order when dropped.
struct Mounts {
    points: Vec<PathBuf>,
}

impl Mounts {
    fn mount(&mut self, args: &[&str], point: &Path) -> anyhow::Result<()> {
        let status = Command::new("mount")
            .args(args)
            .arg(point)
            .status()
            .context("mount")?;
        if !status.success() {
            bail!(
                "mount {} {} failed ({status})",
                args.join(" "),
                point.display()
            );
        }
        self.points.push(point.to_path_buf());
        Ok(())
    }

    /// Binds a host mount into the tree if the host has it mounted.
    fn bind_if_mounted(&mut self, tree: &Path, host: &str) -> anyhow::Result<()> {
        let mounted = Command::new("mountpoint")
            .args(["-q", host])
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            let point = tree.join(host.trim_start_matches('/'));
            fs::create_dir_all(&point)?;
            self.mount(&["--bind", host], &point)?;
        }
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.points.iter().rev() {
            let ok = Command::new("umount")
                .arg(p)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Busy (a process still inside): detach it now, freed when the last user goes.
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
    }
}

/// Runs a command inside the tree with a clean environment.
fn inside(tree: &Path, args: &[&str]) -> anyhow::Result<Output> {
    Command::new("chroot")
        .arg(tree)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C")
        .output()
        .with_context(|| format!("chroot {} {}", tree.display(), args.join(" ")))
}

fn inside_ok(tree: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = inside(tree, args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "in the {SUITE} tree, `{}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Installs `deb` in the tree, runs twtrace from inside, checks what the package installed and
/// hands the tree to `check_installed` (the unit's checks) before purging it again.
pub fn test_deb(
    tree: &Path,
    deb: &Path,
    version: &str,
    check_installed: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut mounts = Mounts { points: Vec::new() };
    mounts.mount(&["-t", "proc", "proc"], &tree.join("proc"))?;
    mounts.mount(&["--bind", "/sys"], &tree.join("sys"))?;
    for sub in ["/sys/kernel/tracing", "/sys/kernel/debug", "/sys/fs/bpf"] {
        mounts.bind_if_mounted(tree, sub)?;
    }
    mounts.mount(&["--bind", "/dev"], &tree.join("dev"))?;
    fs::copy(deb, tree.join("tmp/twtrace.deb")).context("copying the .deb into the tree")?;
    let result = (|| {
        inside_ok(tree, &["dpkg", "-i", "/tmp/twtrace.deb"])?;
        let files = inside_ok(tree, &["dpkg", "-L", "twtrace"])?;
        for want in [
            "/usr/sbin/twtrace",
            "/lib/systemd/system/twtrace.service",
            "/usr/share/man/man1/twtrace.1.gz",
            "/usr/share/man/man1/twtrace-trace.1.gz",
            "/usr/share/bash-completion/completions/twtrace",
            "/usr/share/zsh/vendor-completions/_twtrace",
            "/usr/share/fish/vendor_completions.d/twtrace.fish",
            "/usr/share/doc/twtrace/README.md",
            "/usr/share/doc/twtrace/copyright",
        ] {
            if !files.lines().any(|l| l == want) {
                bail!("the package does not install {want}");
            }
        }
        let v = inside_ok(tree, &["twtrace", "--version"])?;
        if v.trim() != format!("twtrace {version}") {
            bail!("twtrace --version printed {v:?}");
        }
        let check = inside_ok(tree, &["twtrace", "check"])?;
        if !check.contains("programs     loaded and attached") {
            bail!("twtrace check inside the tree did not attach: {check}");
        }
        let trace = inside(tree, &["twtrace", "trace", "--duration", "2"])?;
        let err = String::from_utf8_lossy(&trace.stderr);
        if !trace.status.success() || !err.contains("TIME_WAITs entered") {
            bail!(
                "twtrace trace --duration 2 inside the tree failed ({}): {err}",
                trace.status
            );
        }
        check_installed(tree)
    })();
    let purged = inside_ok(tree, &["dpkg", "--purge", "twtrace"]);
    let _ = fs::remove_file(tree.join("tmp/twtrace.deb"));
    drop(mounts);
    result?;
    purged?;
    eprintln!(
        "xtask: the .deb installs and runs on {SUITE} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
