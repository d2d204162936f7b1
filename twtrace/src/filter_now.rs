//! Filters that can match nothing on this host now: a network namespace no one holds, a pid
//! no process has. They are not errors (the namespace or the process may appear, and a
//! namespace held only by a socket cannot be seen), but tracing nothing without a word looks
//! like "no TIME_WAITs": each gets a one-line warning saying what to do.

use std::path::Path;

use crate::{
    filter::Filters,
    kernel::{netns, pidns},
};

/// One warning per filter of `f` that matches nothing now.
pub fn warnings(f: &Filters) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(n) = f.netns
        && !netns::enumerate().iter().any(|ns| ns.inode == n)
    {
        out.push(format!(
            "--netns {n}: no network namespace with that inode is reachable now (not in `ip netns`, nor any process's): nothing is traced until one appears; `lsns -t net` lists them"
        ));
    }
    if let Some(pid) = f.pid
        && pidns::proc_is_own()
        && !Path::new(&format!("/proc/{pid}")).exists()
    {
        out.push(format!(
            "-p {pid}: no process has that pid now (pids are as seen in twtrace's pid namespace): nothing is traced unless one starts with it; `pgrep NAME` finds a pid, or use --comm NAME"
        ));
    }
    out
}

/// Prints [`warnings`] on stderr, one line each.
pub fn warn(f: &Filters) {
    for w in warnings(f) {
        eprintln!("twtrace: warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_only_of_filters_that_match_nothing() {
        let ok = Filters {
            pid: Some(std::process::id()),
            netns: netns::own(),
            ..Filters::default()
        };
        assert_eq!(warnings(&ok), Vec::<String>::new());
        assert!(warnings(&Filters::default()).is_empty());
        // Pids above pid_max's ceiling (2^22) never exist.
        let none = Filters {
            pid: Some(4_194_305),
            ..Filters::default()
        };
        let w = warnings(&none);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("-p 4194305: no process"), "{w:?}");
    }
}
