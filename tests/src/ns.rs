//! Namespaces and processes as tests see them from the host: running code inside a test's
//! network namespace, and finding the host pid of a process in a pid namespace a test made.

use std::{fs, os::fd::AsRawFd as _, thread};

use crate::Netns;

/// Runs `f` on a thread that has joined `netns` (a network namespace is per thread).
pub fn in_netns<T: Send + 'static>(netns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", netns.name);
    thread::spawn(move || {
        let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an open nsfs file descriptor; it changes only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the test's netns")
}

/// Host pids of the processes whose parent is `ppid`.
pub fn children(ppid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // The comm (in parentheses) may hold spaces: fields follow its end.
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(ppid)
        })
        .collect()
}

/// A process's pids from the host's namespace inwards (`NSpid` of /proc/PID/status).
pub fn ns_pids(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let l = s.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            Some(
                l.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect(),
            )
        })
        .unwrap_or_default()
}

/// Host pids of every process whose command line holds each of `words`.
pub fn pids_with_args(words: &[&str]) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                words.iter().all(|w| args.contains(&w.as_bytes()))
            })
        })
        .collect()
}
