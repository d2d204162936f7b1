//! What the running kernel lets twtrace do, as `twtrace check --json` reports it: the same
//! test runs on the host and inside every kernel-matrix guest, and prints what is degraded
//! there, so each kernel's log says what it lacks.

use serde_json::Value;
use twtrace_integration::{can_run, twtrace_bin};

/// Capabilities every kernel from 5.10 on must offer in full: the variants twtrace picks at
/// load time cover what moved between versions.
const EVERYWHERE: &[&str] = &[
    "TIME_WAIT lifecycle (start, re-arm, end, lifetime)",
    "closer attribution (pid, comm, cgroup, role, close kind)",
    "end: expired",
    "end: reused by connect (with the reusing task)",
    "end: recycled by an inbound SYN",
    "end: purged with its namespace",
    "overflow (tcp_max_tw_buckets)",
    "aborts and peer resets (closes without TIME_WAIT)",
    "failed connect (EADDRNOTAVAIL)",
    "failed bind (EADDRINUSE)",
    "start-up scan of existing TIME_WAITs (sock_diag)",
];

#[test]
fn check_attaches_and_names_what_this_kernel_lacks() {
    if !can_run() {
        return;
    }
    let out = std::process::Command::new(twtrace_bin())
        .args(["check", "--json"])
        .output()
        .expect("run twtrace check");
    let text = String::from_utf8_lossy(&out.stdout);
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "check --json: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{doc:#}");
    assert_eq!(doc["attached"], true, "{doc:#}");
    let caps = doc["capabilities"].as_array().expect("capabilities");
    for c in caps {
        let name = c["name"].as_str().unwrap_or_default();
        let status = c["status"].as_str().unwrap_or_default();
        if status != "available" {
            println!("{} on {}: {name}: {}", status, doc["kernel"], c["why"]);
        }
        if EVERYWHERE.contains(&name) {
            assert_eq!(status, "available", "{name} on {}: {c}", doc["kernel"]);
        }
    }
    for name in EVERYWHERE {
        assert!(
            caps.iter().any(|c| c["name"] == *name),
            "{name} missing from {doc:#}"
        );
    }
    for v in doc["variants"].as_array().expect("variants") {
        println!(
            "variant on {}: {}: {}",
            doc["kernel"], v["choice"], v["variant"]
        );
    }
    // The RST mark depends on the kernel: where it is inferred, that is said.
    let reset = caps
        .iter()
        .find(|c| c["name"] == "end: reset")
        .expect("reset");
    match reset["status"].as_str() {
        Some("available") => {}
        Some("degraded") => assert!(
            reset["why"]
                .as_str()
                .unwrap_or_default()
                .contains("inferred"),
            "{reset}"
        ),
        other => panic!("end: reset is {other:?}"),
    }
}

/// With the kernel's config hidden (Debian's kernels have no /proc/config.gz, and containers
/// no /boot), CONFIG_HZ is measured from the jiffies counter, and agrees with the config.
#[test]
fn config_hz_is_measured_when_the_config_is_hidden() {
    if !can_run() {
        return;
    }
    let hz_line = |hide: bool| -> String {
        let mut cmd = std::process::Command::new(twtrace_bin());
        cmd.arg("check");
        if hide {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
            let paths: Vec<std::ffi::CString> = [
                "/proc/config.gz".to_string(),
                format!("/boot/config-{}", release.trim()),
            ]
            .into_iter()
            .filter(|p| std::path::Path::new(p).exists())
            .map(|p| std::ffi::CString::new(p).unwrap())
            .collect();
            use std::os::unix::process::CommandExt as _;
            // SAFETY: between fork and exec only async-signal-safe system calls, on the
            // child's own new mount namespace.
            unsafe {
                cmd.pre_exec(move || {
                    let null = c"/dev/null";
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            std::ptr::null(),
                            c"/".as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    for p in &paths {
                        let flags = libc::MS_BIND;
                        if libc::mount(
                            null.as_ptr(),
                            p.as_ptr(),
                            std::ptr::null(),
                            flags,
                            std::ptr::null(),
                        ) != 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let out = cmd.output().expect("run twtrace check");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with("CONFIG_HZ"))
            .unwrap_or_else(|| panic!("no CONFIG_HZ line: {text}"))
            .to_string()
    };
    let plain = hz_line(false);
    let hidden = hz_line(true);
    println!("{plain}\n{hidden}");
    assert!(hidden.contains("measured"), "{hidden}");
    let value = |l: &str| l.split_whitespace().nth(1).map(str::to_string);
    assert_eq!(value(&plain), value(&hidden), "{plain} / {hidden}");
}
