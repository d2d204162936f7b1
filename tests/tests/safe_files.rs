//! Root tests of the files `twtrace record` creates: a user who owns the output directory
//! plants symbolic links to a root-owned file, before the recording and while it rotates; the
//! root file must stay as it was. And the file twtrace creates is 0600, owned through the fd by
//! SUDO_UID/SUDO_GID.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use twtrace_integration::{KillOnDrop, Netns, can_run, twtrace_bin};

/// The user who "owns" the home directory in these tests, and whom SUDO_UID names.
const USER: u32 = 65534;

/// A root-only directory holding a root file (the attack's target), and beside it a home
/// directory owned by [`USER`]; removed at the end.
struct Setup {
    base: PathBuf,
    home: PathBuf,
    target: PathBuf,
}

/// What must not change about the target.
#[derive(PartialEq)]
struct Snapshot {
    data: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    ino: u64,
    nlink: u64,
    mtime: (i64, i64),
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = String::from_utf8_lossy(&self.data[..self.data.len().min(40)]);
        write!(
            f,
            "{} bytes {head:?}..., mode {:o}, owner {}:{}, inode {}, {} links, mtime {:?}",
            self.data.len(),
            self.mode,
            self.uid,
            self.gid,
            self.ino,
            self.nlink,
            self.mtime
        )
    }
}

impl Setup {
    fn new(tag: &str) -> Self {
        let base = PathBuf::from(format!("/tmp/twtrace-it-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir(&base).unwrap();
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        let root = base.join("root");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let target = root.join("precious");
        fs::write(&target, b"root's configuration\n").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let home = base.join("home");
        fs::create_dir(&home).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        lchown(&home, Some(USER), Some(USER)).unwrap();
        Self { base, home, target }
    }

    fn snapshot(&self) -> Snapshot {
        let m = fs::symlink_metadata(&self.target).unwrap();
        Snapshot {
            data: fs::read(&self.target).unwrap(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            ino: m.ino(),
            nlink: m.nlink(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }

    /// A symbolic link at `name` in the home to the target, made the user's.
    fn plant(&self, name: &str) -> std::io::Result<()> {
        let p = self.home.join(name);
        symlink(&self.target, &p)?;
        lchown(&p, Some(USER), Some(USER))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// `twtrace record ARGS` as `sudo` would run it for [`USER`].
fn record(args: &[&str]) -> Command {
    let mut c = Command::new(twtrace_bin());
    c.arg("record")
        .args(args)
        .env("SUDO_UID", USER.to_string())
        .env("SUDO_GID", USER.to_string());
    c
}

fn assert_users_0600_trace(p: &Path) {
    let m = fs::symlink_metadata(p).unwrap();
    assert!(m.is_file(), "{}: {:?}", p.display(), m.file_type());
    assert_eq!(m.mode() & 0o7777, 0o600, "{}", p.display());
    assert_eq!((m.uid(), m.gid()), (USER, USER), "{}", p.display());
    let t = twtrace::record::Reader::open(p).unwrap();
    assert_eq!(t.header.format, twtrace::record::FORMAT);
}

#[test]
fn record_refuses_a_planted_symlink_and_leaves_its_target_alone() {
    if !can_run() {
        return;
    }
    let s = Setup::new("link");
    s.plant("out.twt").unwrap();
    let before = s.snapshot();
    let out = s.home.join("out.twt");
    for force in [&[][..], &["--force"][..]] {
        let r = record(&["--duration", "1", "-o", out.to_str().unwrap()])
            .args(force)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(r.status.code(), Some(2), "{force:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.contains("is a symbolic link") && err.contains("not even with --force"),
            "{err}"
        );
    }
    assert_eq!(s.snapshot(), before);
    assert!(fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
}

#[test]
fn record_refuses_an_existing_file_and_force_replaces_it_atomically_as_the_users_0600() {
    if !can_run() {
        return;
    }
    let s = Setup::new("owner");
    let ns = Netns::new("owner");
    let out = s.home.join("out.twt");
    let out_s = out.to_str().unwrap();
    // An earlier recording, with a second name (evidence kept elsewhere).
    fs::write(&out, b"earlier recording").unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
    let kept = s.home.join("kept.twt");
    fs::hard_link(&out, &kept).unwrap();

    let r = record(&["--netns", &ns.name, "--duration", "1", "-o", out_s])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim(),
        format!("twtrace: {out_s} exists: choose another path, or pass --force to replace it")
    );
    assert_eq!(fs::read(&out).unwrap(), b"earlier recording");

    let r = record(&[
        "--netns",
        &ns.name,
        "--duration",
        "1",
        "--force",
        "-o",
        out_s,
    ])
    .output()
    .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_users_0600_trace(&out);
    assert_eq!(fs::read(&kept).unwrap(), b"earlier recording");
    assert_eq!(fs::metadata(&kept).unwrap().mode() & 0o777, 0o644);

    // A new name: created 0600 and the user's, through the fd.
    let fresh = s.home.join("fresh.twt");
    let r = record(&["--netns", &ns.name, "--duration", "1", "-o"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_users_0600_trace(&fresh);
    // Nothing else left behind (no temporary files).
    let mut names: Vec<_> = fs::read_dir(&s.home)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["fresh.twt", "kept.twt", "out.twt"]);
}

#[test]
fn links_planted_while_record_rotates_are_never_followed() {
    if !can_run() {
        return;
    }
    let s = Arc::new(Setup::new("rotate"));
    let ns = Netns::new("rotate");
    let before = s.snapshot();
    let out = s.home.join("r.twt");
    let mut child = KillOnDrop(
        record(&[
            "--netns",
            &ns.name,
            "--duration",
            "9",
            "--max-size",
            "1",
            "--keep",
            "2",
            "-o",
            out.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let ready = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines.next().expect("twtrace exited").unwrap();
        if line.contains("recording TIME_WAIT") {
            break;
        }
        assert!(Instant::now() < ready, "not recording: {line}");
    }
    let stderr = thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    // Events every second, so every flush rotates.
    let _load = KillOnDrop(ns.twload_spawn(&["churn", "127.0.0.1:8080", "7", "100000", "100"]));

    // The user plants links at every name the rotation renames from or to, over and over, for
    // 5 s (bounded in count too), replacing what is there every few rounds.
    let stop = Arc::new(AtomicBool::new(false));
    let planted = Arc::new(AtomicU64::new(0));
    let planter = {
        let (s, stop, planted) = (s.clone(), stop.clone(), planted.clone());
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(5);
            let names = ["r.twt", "r.twt.1", "r.twt.2", "r.twt.3"];
            for round in 0..2_000_000u64 {
                if Instant::now() >= until || stop.load(Ordering::Relaxed) {
                    break;
                }
                for n in names {
                    if round % 64 == 0 && n != "r.twt" {
                        let _ = fs::remove_file(s.home.join(n));
                    }
                    if s.plant(n).is_ok() {
                        planted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    planter.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let status = child.0.wait().unwrap();
    let stderr = stderr.join().unwrap().join("\n");
    assert!(status.success(), "{status}: {stderr}");
    let planted = planted.load(Ordering::Relaxed);
    eprintln!("links planted: {planted}");
    assert!(planted > 100, "the race ran: {planted} links planted");

    assert_eq!(s.snapshot(), before, "the target is untouched");
    // The rotations after the planting stopped left the user's own 0600 files.
    assert_users_0600_trace(&out);
    assert_users_0600_trace(&s.home.join("r.twt.1"));
    for e in fs::read_dir(&s.home).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        assert!(
            m.file_type().is_symlink() || (m.uid() == USER && m.mode() & 0o777 == 0o600),
            "{}: {:o} uid {}",
            e.path().display(),
            m.mode(),
            m.uid()
        );
        assert!(
            !e.file_name().to_string_lossy().starts_with('.'),
            "temporary file left: {:?}",
            e.file_name()
        );
    }
}
