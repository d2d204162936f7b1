//! The guests' userspace: one initramfs (newc cpio, gzip) that boots any of the kernels.
//!
//! It holds busybox (static) for the shell and the basics, the host's iproute2 `ip`/`ss`,
//! procps `sysctl` and util-linux `setpriv` and `unshare` with the shared libraries they load, the static
//! (musl) twtrace, twload and test binaries, and /init (init.sh). The archive is written
//! here rather than by cpio(1) so that /dev/console can be in it without root.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The guest's /init.
const INIT: &str = include_str!("init.sh");

/// Where the binaries under test live in the guest.
pub const GUEST_BIN: &str = "/opt/twtrace/bin";
pub const GUEST_TESTS: &str = "/opt/twtrace/tests";

enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev(u32, u32),
}

#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn dirs_for(&mut self, path: &str) {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for i in 1..parts.len() {
            let dir = format!("/{}", parts[..i].join("/"));
            self.entries.entry(dir).or_insert(Entry::Dir);
        }
    }

    fn add(&mut self, path: &str, e: Entry) {
        self.dirs_for(path);
        self.entries.insert(path.to_string(), e);
    }

    fn dir(&mut self, path: &str) {
        self.add(path, Entry::Dir);
    }

    fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.add(path, Entry::File { data, mode });
    }

    /// A host file, under its own path in the guest unless `at` says otherwise.
    fn host_file(&mut self, host: &Path, at: Option<&str>) -> anyhow::Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        let at = at
            .map(String::from)
            .unwrap_or_else(|| host.display().to_string());
        self.file(&at, data, mode);
        Ok(())
    }

    /// A dynamically linked host program and every library `ldd` says it loads.
    fn host_program(&mut self, host: &Path, at: &str) -> anyhow::Result<()> {
        self.host_file(host, Some(at))?;
        let out = Command::new("ldd").arg(host).output().context("ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; "linux-vdso.so.1 (0x...)" has no file.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/'))
                && !self.entries.contains_key(p)
            {
                self.host_file(Path::new(p), None)?;
            }
        }
        Ok(())
    }

    /// The newc archive.
    fn cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 1u32;
        let mut push = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
            let name = name.trim_start_matches('/');
            let header = format!(
                "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                0,
                0,
                if mode & 0o170000 == 0o040000 { 2 } else { 1 },
                0,
                data.len(),
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            );
            ino += 1;
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (path, e) in &self.entries {
            match e {
                Entry::Dir => push(path, 0o040755, (0, 0), &[]),
                Entry::File { data, mode } => push(path, 0o100000 | mode, (0, 0), data),
                Entry::Symlink(target) => push(path, 0o120777, (0, 0), target.as_bytes()),
                Entry::CharDev(major, minor) => push(path, 0o020600, (*major, *minor), &[]),
            }
        }
        push("TRAILER!!!", 0, (0, 0), &[]);
        out
    }
}

/// What goes into the guest besides the system tools.
pub struct Payload {
    pub twtrace: PathBuf,
    pub twload: PathBuf,
    /// Test binaries by suite name (scenarios, churn).
    pub tests: Vec<(String, PathBuf)>,
}

/// Finds a program on the host PATH (and the sbin directories, which a user PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Whether a host binary is statically linked (busybox must be: it runs before anything).
pub fn is_static(bin: &Path) -> bool {
    Command::new("ldd")
        .arg(bin)
        .output()
        .map(|o| !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("statically"))
        .unwrap_or(false)
}

/// Writes the initramfs to `out` (gzip-compressed newc cpio).
pub fn build(payload: &Payload, out: &Path) -> anyhow::Result<()> {
    let mut t = Tree::default();
    for d in [
        "/bin", "/sbin", "/dev", "/proc", "/sys", "/run", "/tmp", "/root", "/etc", "/newroot",
        "/var",
    ] {
        t.dir(d);
    }
    t.add("/dev/console", Entry::CharDev(5, 1));
    t.add("/dev/null", Entry::CharDev(1, 3));
    t.add("/var/run", Entry::Symlink("/run".into()));
    t.file("/init", INIT.as_bytes().to_vec(), 0o755);
    t.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
        0o644,
    );
    t.file(
        "/etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    );
    t.file(
        "/etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    );

    let busybox = which("busybox").context("busybox not found")?;
    if !is_static(&busybox) {
        bail!(
            "{} is not static: install busybox-static",
            busybox.display()
        );
    }
    t.host_file(&busybox, Some("/bin/busybox"))?;
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    // The real tools: iproute2's ip (busybox's has no netns) and ss, procps' sysctl,
    // util-linux's setpriv and unshare, and Prometheus (server and promtool) for its scenario. They go
    // to fixed places, which come first on PATH; init.sh calls them by path, since Debian's
    // busybox-static runs its own applets before anything on PATH.
    let real = [
        ("ip", "/usr/sbin"),
        ("ss", "/usr/bin"),
        ("sysctl", "/usr/sbin"),
        ("setpriv", "/usr/bin"),
        ("unshare", "/usr/bin"),
        ("promtool", "/usr/bin"),
        ("prometheus", "/usr/bin"),
    ];
    for (name, dir) in real {
        let p = which(name).with_context(|| format!("{name} not found on the host"))?;
        t.host_program(&p, &format!("{dir}/{name}"))?;
    }
    let have: Vec<&str> = real.iter().map(|r| r.0).collect();
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        let at = format!("/bin/{applet}");
        if applet != "busybox" && !have.contains(&applet) && !t.entries.contains_key(&at) {
            t.add(&at, Entry::Symlink("busybox".into()));
        }
    }

    t.host_file(&payload.twtrace, Some(&format!("{GUEST_BIN}/twtrace")))?;
    t.host_file(&payload.twload, Some(&format!("{GUEST_BIN}/twload")))?;
    for (suite, bin) in &payload.tests {
        t.host_file(bin, Some(&format!("{GUEST_TESTS}/{suite}")))?;
    }

    let cpio = t.cpio();
    let gz = gzip(&cpio)?;
    fs::write(out, &gz).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "xtask: initramfs {} ({:.1} MB, {:.1} MB unpacked)",
        out.display(),
        gz.len() as f64 / 1e6,
        cpio.len() as f64 / 1e6
    );
    Ok(())
}

/// The initrd of one kernel: the common initramfs followed by a second archive (the kernel
/// unpacks one after the other) with that kernel's config and modules:
/// /boot/config-RELEASE and /lib/modules/RELEASE/twtrace/{NAME.ko,order}.
pub fn for_kernel(common: &Path, k: &super::kernels::Fetched) -> anyhow::Result<PathBuf> {
    let mut t = Tree::default();
    if let Some(c) = &k.config {
        t.host_file(c, Some(&format!("/boot/config-{}", k.release)))?;
    }
    let dir = format!("/lib/modules/{}/twtrace", k.release);
    let mut order = String::new();
    for m in &k.modules {
        let name = m
            .file_stem()
            .and_then(|n| n.to_str())
            .context("module name")?;
        t.host_file(m, Some(&format!("{dir}/{name}.ko")))?;
        order.push_str(name);
        order.push('\n');
    }
    t.file(&format!("{dir}/order"), order.into_bytes(), 0o644);
    let mut all = fs::read(common).with_context(|| format!("reading {}", common.display()))?;
    all.extend(gzip(&t.cpio())?);
    let out = k.dir.join("initrd.cpio.gz");
    fs::write(&out, all).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("gzip")?;
    let mut stdin = child.stdin.take().context("gzip stdin")?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer panicked"))??;
    if !out.status.success() {
        bail!("gzip failed: {}", out.status);
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cargo test -p xtask -- --ignored fake`, then boot target/kernels/fake.cpio.gz by hand:
    /// checks init.sh without the long musl build.
    #[test]
    #[ignore = "writes target/kernels/fake.cpio.gz"]
    fn fake_initramfs() {
        let dir = std::env::temp_dir().join("twtrace-vm-fake");
        fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.join(name);
            fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let ok = "echo \"args: $*\"; echo 'test result: ok. 2 passed; 0 failed; 1 ignored; \
                  0 measured; 0 filtered out; finished in 0.01s'";
        let payload = Payload {
            twtrace: script("twtrace", "echo twtrace"),
            twload: script("twload", "echo twload"),
            tests: vec![
                ("scenarios".into(), script("scenarios", ok)),
                (
                    "churn".into(),
                    script("churn", "ip netns add x && ip netns exec x ip link; exit 3"),
                ),
            ],
        };
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kernels/fake.cpio.gz");
        build(&payload, &out).unwrap();
    }
}
