//! twtrace run as an unprivileged user (nobody) with exactly the capabilities the systemd unit
//! grants and the README lists: it traces, with nothing degraded; and with any one of them
//! taken away, what it says names that capability.

use std::{path::PathBuf, process::Command};

use serde_json::Value;
use twtrace_integration::{Netns, Trace, can_run, twtrace_bin};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The unit's AmbientCapabilities=, checked to be the list the README gives.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(workspace().join("dist/twtrace.service")).unwrap();
    let line = unit
        .lines()
        .find(|l| l.starts_with("AmbientCapabilities="))
        .expect("the unit grants AmbientCapabilities=");
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    assert!(
        readme.contains(line),
        "README.md does not list the unit's capabilities: {line}"
    );
    let caps: Vec<String> = line["AmbientCapabilities=".len()..]
        .split_whitespace()
        .map(String::from)
        .collect();
    assert!(caps.len() >= 2, "{line}");
    caps
}

/// setpriv as nobody with exactly `caps` (effective through the ambient set), then the command.
fn as_nobody_with(caps: &[String]) -> Vec<String> {
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!("-all{list}");
    [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps={set}"),
        &format!("--ambient-caps={set}"),
        &format!("--bounding-set={set}"),
    ]
    .map(String::from)
    .to_vec()
}

fn run_as(wrapper: &[String], args: &[&str]) -> std::process::Output {
    Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(twtrace_bin())
        .args(args)
        .output()
        .expect("setpriv")
}

fn summary(records: &[Value]) -> &Value {
    records
        .iter()
        .rev()
        .find(|r| r["type"] == "summary")
        .expect("a summary")
}

#[test]
fn with_the_units_capabilities_nobody_traces_a_namespace_fully() {
    if !can_run() {
        return;
    }
    let caps = unit_capabilities();
    let wrapper = as_nobody_with(&caps);
    // `check` as that user: every capability present, the programs attached.
    let out = run_as(&wrapper, &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for cap in &caps {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("{cap} ")))
            .unwrap_or_else(|| panic!("check lists no {cap}: {text}"));
        assert!(row.contains(" yes "), "{row}");
    }
    assert!(text.contains("programs     loaded and attached"), "{text}");

    let ns = Netns::new("caps");
    // One TIME_WAIT before tracing: the start-up scan finds it only by joining the namespace
    // (CAP_SYS_ADMIN) it reached through /run/netns.
    ns.twload(&["client-first", "127.0.0.1:8080"]);
    let t = Trace::start_wrapped(&wrapper, &ns, &[]);
    ns.twload(&["client-first", "127.0.0.1:8081"]);
    // The new TIME_WAIT's start has been read once the summary counts it.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (records, stderr) = t.stop();
    let s = summary(&records);
    assert_eq!(s["totals"]["preexisting"], 1, "{s:#}");
    assert_eq!(s["totals"]["entered"], 1, "{s:#}");
    assert_eq!(s["totals"]["client"], 1, "{s:#}");
    assert_eq!(s["alive"], 2, "{s:#}");
    assert!(
        !stderr.contains("without CAP_") && !stderr.contains("missing"),
        "nothing is degraded with the unit's capabilities: {stderr}"
    );
    let settings = &s["settings"][ns.inode.to_string()];
    assert!(settings.is_object(), "the namespace's settings: {s:#}");
}

#[test]
fn without_any_one_capability_twtrace_names_it() {
    if !can_run() {
        return;
    }
    let caps = unit_capabilities();
    let paranoid: i64 = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let kptr: i64 = std::fs::read_to_string("/proc/sys/kernel/kptr_restrict")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let tracefs_closed = std::fs::metadata("/sys/kernel/tracing")
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o005 == 0)
        .unwrap_or(false);
    for cap in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let out = run_as(&as_nobody_with(&fewer), &["trace", "--duration", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        let needed = match cap.as_str() {
            "CAP_SYSLOG" => !(kptr == 0 && paranoid <= 1),
            "CAP_DAC_READ_SEARCH" => tracefs_closed,
            _ => true,
        };
        if !needed {
            eprintln!("{cap}: not needed on this machine (twtrace ran without it)");
            assert!(out.status.success(), "without {cap}: {err}");
            assert!(!err.contains(cap.as_str()), "without {cap}: {err}");
            continue;
        }
        let named = err.lines().filter(|l| l.contains(cap.as_str())).count();
        assert!(named >= 1, "without {cap}, nothing names it: {err}");
        assert!(!err.contains("twtrace: twtrace"), "{err}");
        match cap.as_str() {
            // Nothing loads without these: one line, exit status 1.
            "CAP_BPF" | "CAP_PERFMON" | "CAP_SYSLOG" => {
                assert!(!out.status.success(), "without {cap}: {err}");
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(err.contains(&format!("this process lacks {cap}:")), "{err}");
            }
            // Degraded: it traces and says what is missing, as it starts and in the summary.
            _ => {
                assert!(out.status.success(), "without {cap}: {err}");
                assert!(err.contains("TIME_WAITs entered"), "{err}");
            }
        }
    }
}
