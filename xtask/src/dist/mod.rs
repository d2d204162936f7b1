//! `cargo xtask dist`: what a user installs, in target/dist/: the static (musl) binary, a .deb
//! (binary in /usr/sbin, the systemd unit, man pages, bash/zsh/fish completions, README and
//! licences) and SHA256SUMS. `cargo xtask test` then installs the .deb in a Debian tree
//! (`chroot`) and checks the unit (`unit`).

pub mod chroot;
pub mod unit;

use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::vm::{MUSL, initramfs};

/// Where the .deb puts each file.
pub const UNIT_PATH: &str = "lib/systemd/system/twtrace.service";
const BASH: &str = "usr/share/bash-completion/completions/twtrace";
const ZSH: &str = "usr/share/zsh/vendor-completions/_twtrace";
const FISH: &str = "usr/share/fish/vendor_completions.d/twtrace.fish";
const MAN: &str = "usr/share/man/man1";
const DOC: &str = "usr/share/doc/twtrace";

/// The workspace's version (workspace.package.version).
pub fn version(root: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(root.join("Cargo.toml")).context("reading Cargo.toml")?;
    let doc: toml_edit::DocumentMut = text.parse().context("parsing Cargo.toml")?;
    doc["workspace"]["package"]["version"]
        .as_str()
        .map(String::from)
        .context("Cargo.toml has no workspace.package.version")
}

/// Builds everything; returns the static binary and the .deb.
pub fn build(root: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let version = version(root)?;
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    eprintln!("xtask: building the static (musl) twtrace");
    let status = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--package",
            "twtrace",
            "--target",
            MUSL,
        ])
        // zstd-sys compiles C for the target.
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .status()
        .context("cargo build (musl)")?;
    if !status.success() {
        bail!("cargo build --target {MUSL} failed ({status})");
    }
    let built = target.join(MUSL).join("release/twtrace");
    if !initramfs::is_static(&built) {
        bail!("{} is not statically linked", built.display());
    }
    let out = target.join("dist");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    fs::create_dir_all(&out)?;
    // What is shipped is stripped (half the size; panics still say where, without symbols).
    let stripped = out.join("twtrace.stripped");
    crate::sh(
        "strip",
        &[
            "-o",
            &stripped.display().to_string(),
            &built.display().to_string(),
        ],
    )?;
    let built = stripped;
    let binary = out.join(format!("twtrace-{version}-x86_64-linux-musl"));
    install(&built, &binary, 0o755)?;

    let staged = target
        .join("dist-stage")
        .join(format!("twtrace_{version}_amd64"));
    if staged.exists() {
        fs::remove_dir_all(&staged)?;
    }
    install(&built, &staged.join("usr/sbin/twtrace"), 0o755)?;
    install(
        &root.join("dist/twtrace.service"),
        &staged.join(UNIT_PATH),
        0o644,
    )?;
    for (shell, path) in [("bash", BASH), ("zsh", ZSH), ("fish", FISH)] {
        let out = run_out(&built, &["completions", shell])?;
        write(&staged.join(path), &out, 0o644)?;
    }
    let man = staged.join(MAN);
    fs::create_dir_all(&man)?;
    run_out(&built, &["man", &man.display().to_string()])?;
    let mut pages = 0;
    for page in fs::read_dir(&man)? {
        let page = page?.path();
        fs::set_permissions(&page, fs::Permissions::from_mode(0o644))?;
        crate::sh("gzip", &["-9n", &page.display().to_string()])?;
        pages += 1;
    }
    if pages < 2 {
        bail!("twtrace man wrote {pages} pages");
    }
    let doc = staged.join(DOC);
    for f in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        install(&root.join(f), &doc.join(f), 0o644)?;
    }
    write(&doc.join("copyright"), copyright(root)?.as_bytes(), 0o644)?;
    let size_kib = fs::metadata(&built)?.len().div_ceil(1024);
    write(
        &staged.join("DEBIAN/control"),
        control(&version, size_kib).as_bytes(),
        0o644,
    )?;
    for script in ["postinst", "postrm"] {
        write(
            &staged.join("DEBIAN").join(script),
            MAINTAINER_SCRIPT.as_bytes(),
            0o755,
        )?;
    }
    fs::remove_file(&built)?;
    let deb = out.join(format!("twtrace_{version}_amd64.deb"));
    crate::sh(
        "dpkg-deb",
        &[
            "--root-owner-group",
            "--build",
            &staged.display().to_string(),
            &deb.display().to_string(),
        ],
    )?;
    let names = [&binary, &deb].map(|p| p.file_name().unwrap().to_string_lossy().into_owned());
    let sums = Command::new("sha256sum")
        .args(&names)
        .current_dir(&out)
        .output()
        .context("sha256sum")?;
    if !sums.status.success() {
        bail!("sha256sum failed ({})", sums.status);
    }
    write(&out.join("SHA256SUMS"), &sums.stdout, 0o644)?;
    eprintln!(
        "xtask: wrote {}, {} and SHA256SUMS",
        binary.display(),
        deb.display()
    );
    Ok((binary, deb))
}

/// Reloads systemd after the unit is installed or removed, where systemd runs. The unit is not
/// enabled: the exporter listens on a port, which the administrator chooses to open.
const MAINTAINER_SCRIPT: &str = "#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then\n\tsystemctl daemon-reload >/dev/null || true\nfi\n";

fn control(version: &str, size_kib: u64) -> String {
    format!(
        "Package: twtrace\n\
         Version: {version}\n\
         Architecture: amd64\n\
         Maintainer: The twtrace developers\n\
         Installed-Size: {size_kib}\n\
         Section: net\n\
         Priority: optional\n\
         Description: eBPF tracer that explains TCP TIME_WAIT\n \
         twtrace tells which process closed first, whether this host was the client or\n \
         the server, how long each TIME_WAIT lived and how it ended (expired, reused,\n \
         recycled, reset, purged), and which closes skipped TIME_WAIT. It needs Linux\n \
         5.8 or later with BTF. Includes a Prometheus exporter (twtrace.service).\n"
    )
}

/// Debian's machine-readable copyright file, with the MIT text and a pointer to the Apache
/// licence Debian ships.
fn copyright(root: &Path) -> anyhow::Result<String> {
    let mit = fs::read_to_string(root.join("LICENSE-MIT")).context("reading LICENSE-MIT")?;
    let mit: String = mit
        .lines()
        .map(|l| {
            if l.is_empty() {
                " .\n".to_string()
            } else {
                format!(" {l}\n")
            }
        })
        .collect();
    Ok(format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: twtrace\n\n\
         Files: *\n\
         Copyright: twtrace developers\n\
         License: MIT or Apache-2.0\n\n\
         License: MIT\n{mit}\n\
         License: Apache-2.0\n \
         On Debian systems the full text of the Apache License 2.0 is in\n \
         /usr/share/common-licenses/Apache-2.0, and in LICENSE-APACHE beside this file.\n"
    ))
}

fn install(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write(to, &data, mode)
}

fn write(to: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(to, data).with_context(|| format!("writing {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Runs the built binary and returns its stdout.
fn run_out(bin: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running twtrace {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "twtrace {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}
