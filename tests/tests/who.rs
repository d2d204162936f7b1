//! Root tests of how twtrace names who closed and which filters it accepts: a cgroup v2
//! group made by the test, named alike in trace's JSON and in /metrics, and filters that can
//! match nothing (a warning) or cannot be used at all (an error). Host only: the guests
//! mount no cgroup2.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use twtrace_integration::{Netns, Serve, Trace, can_run, http_get, twtrace_bin, with_port};

/// The cgroup2 mount point, read from mountinfo without twtrace's parser.
fn cgroup2_mount() -> Option<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| {
            l.split_once(" - ")
                .is_some_and(|(_, t)| t.starts_with("cgroup2 "))
        })
        .and_then(|l| l.split(' ').nth(4).map(PathBuf::from))
}

/// A cgroup v2 group made for one test; removed on drop (once its processes are gone).
struct Group(PathBuf);

impl Drop for Group {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

#[test]
fn a_cgroup_v2_group_is_named_alike_in_json_and_metrics() {
    if !can_run() {
        return;
    }
    let Some(mount) = cgroup2_mount() else {
        eprintln!("skipped: no cgroup2 mount on this host");
        return;
    };
    let name = format!("twtrace-it-{}", std::process::id());
    let group = Group(mount.join(&name));
    fs::create_dir(&group.0).expect("mkdir the test's cgroup");
    let want = format!("/{name}");

    let mut ns = Netns::new("cgroup");
    let t = Trace::start(&ns, &[]);
    let serve = Serve::start(&ns, &[], None);
    // A server that closes first once told to, moved into the group before it closes.
    let mut load = ns.twload_spawn(&["server-first-on-input"]);
    let mut line = String::new();
    BufReader::new(load.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&line).expect("twload's report");
    fs::write(group.0.join("cgroup.procs"), load.id().to_string()).expect("join the cgroup");
    load.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert!(load.wait().unwrap().success());

    // /metrics counts the TIME_WAIT as it enters, labelled with the group's path.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let label = format!("container=\"{want}\"");
    let text = loop {
        let text = http_get(&serve.addr, "/metrics").unwrap();
        if text.lines().any(|l| {
            l.starts_with("twtrace_time_wait_entered_total{")
                && l.contains("comm=\"twload\"")
                && l.contains(&label)
        }) {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no series labelled {label}: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!text.contains("container=\"/unified\""), "{text}");

    // trace shows it when the namespace's purge ends it.
    ns.delete();
    let port = report["client_port"].as_u64().unwrap();
    let recs = t.wait_for("the group's TIME_WAIT", Duration::from_secs(20), |r| {
        !with_port(r, "time_wait", port).is_empty()
    });
    let r = with_port(&recs, "time_wait", port)[0];
    assert_eq!(r["comm"], "twload", "{r}");
    assert_eq!(r["cgroup"], want.as_str(), "{r}");
    assert_eq!(r["container"], want.as_str(), "{r}");
    t.stop();
    drop(serve);
}

/// `twtrace trace` with `args`, 1 s: exit status and stderr.
fn trace(args: &[&str]) -> (bool, String) {
    let out = Command::new(twtrace_bin())
        .args(["trace", "--json", "--duration", "1", "--no-existing"])
        .args(args)
        .output()
        .expect("twtrace");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("twtrace: warning:"))
        .collect()
}

#[test]
fn filters_that_match_nothing_warn_and_unusable_ones_fail() {
    if !can_run() {
        return;
    }
    let ns = Netns::new("filters");
    // Filters that match something: no warning.
    let mine = std::process::id().to_string();
    let (ok, err) = trace(&["--netns", &ns.name, "-p", &mine]);
    assert!(ok, "{err}");
    assert_eq!(warnings(&err), Vec::<&str>::new(), "{err}");
    let inode = ns.inode.to_string();
    let (ok, err) = trace(&["--netns", &inode]);
    assert!(ok, "{err}");
    assert_eq!(warnings(&err), Vec::<&str>::new(), "{err}");

    // A namespace inode no one holds: one line, saying what to do.
    let unused = (12345..)
        .find(|n| {
            !twtrace::kernel::netns::enumerate()
                .iter()
                .any(|ns| ns.inode == *n)
        })
        .unwrap()
        .to_string();
    let (ok, err) = trace(&["--netns", &unused]);
    assert!(ok, "{err}");
    let w = warnings(&err);
    assert_eq!(w.len(), 1, "{err}");
    assert!(
        w[0].contains(&unused) && w[0].contains("lsns -t net"),
        "{err}"
    );

    // A pid no process has.
    let free = (999_999..)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap()
        .to_string();
    let (ok, err) = trace(&["-p", &free]);
    assert!(ok, "{err}");
    let w = warnings(&err);
    assert_eq!(w.len(), 1, "{err}");
    assert!(
        w[0].contains(&format!("-p {free}")) && w[0].contains("pgrep"),
        "{err}"
    );

    // A file that is no network namespace: an error, nothing traced.
    for bad in ["/etc/passwd", "/proc/self/ns/pid"] {
        let (ok, err) = trace(&["--netns", bad]);
        assert!(!ok, "--netns {bad} was accepted: {err}");
        assert!(
            err.contains(bad) && !err.contains("tracing TIME_WAIT"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
