//! What twtrace can show on the running kernel: each capability available, degraded (and why)
//! or missing (and why), from what [`super::btf::KernelBtf::resolve`] found. `twtrace check`
//! prints the table; every tracing command warns of what is not available.

use serde::Serialize;
use twtrace_ebpf::feature;

use super::btf::Resolved;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "why", rename_all = "lowercase")]
pub enum Status {
    Available,
    Degraded(String),
    Missing(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Capability {
    pub name: &'static str,
    #[serde(flatten)]
    pub status: Status,
}

/// The program variants chosen for this kernel, as (choice, variant) pairs.
pub fn variants(r: &Resolved) -> Vec<(&'static str, &'static str)> {
    let on = |f: u32| r.features & f != 0;
    vec![
        (
            "connection key",
            if on(feature::SOCKET_COOKIE) {
                "socket cookie (bpf_get_socket_cookie)"
            } else {
                "4-tuple and namespace hash (no cookie helper for tracing programs)"
            },
        ),
        (
            "RST sent by a TIME_WAIT",
            if on(feature::TW_RESET_TRACE) {
                "seen (tcp_send_reset fires for TIME_WAIT sockets)"
            } else {
                "inferred from the cancelled timer"
            },
        ),
        (
            "TIME_WAIT bucket count",
            match (on(feature::TW_BUCKETS), r.tw_count_bias) {
                (false, _) => "not found",
                (true, 1) => "tcp_death_row.tw_refcount (refcount, one above the count)",
                (true, _) => "tcp_death_row.tw_count",
            },
        ),
        (
            "namespace teardown",
            if on(feature::NETNS_REFCOUNT) {
                "struct net reference count"
            } else {
                "not found"
            },
        ),
    ]
}

fn why(r: &Resolved, f: u32) -> String {
    r.missing
        .iter()
        .find(|(m, _)| *m == f)
        .map(|(_, w)| w.clone())
        .unwrap_or_default()
}

/// Every capability, for this kernel. `bind_missing`: why bind() cannot be traced, if not;
/// `sock_diag`: why the kernel's socket lists cannot be read, if not.
pub fn capabilities(
    r: &Resolved,
    bind_missing: Option<&str>,
    sock_diag: Option<&str>,
) -> Vec<Capability> {
    use Status::*;
    let on = |f: u32| r.features & f != 0;
    let cap = |name, status| Capability { name, status };
    let diag = || match sock_diag {
        None => Available,
        Some(w) => Missing(format!("sock_diag: {w} (load the tcp_diag module)")),
    };
    vec![
        cap(
            "TIME_WAIT lifecycle (start, re-arm, end, lifetime)",
            Available,
        ),
        // Without the cookie helper the 4-tuple key (see `variants`) joins a close to its
        // TIME_WAIT as well: a 4-tuple has one connection at a time.
        cap(
            "closer attribution (pid, comm, cgroup, role, close kind)",
            Available,
        ),
        cap("end: expired", Available),
        cap("end: reused by connect (with the reusing task)", Available),
        cap("end: recycled by an inbound SYN", Available),
        cap(
            "end: reset",
            if on(feature::TW_RESET_TRACE) {
                Available
            } else {
                Degraded(why(r, feature::TW_RESET_TRACE))
            },
        ),
        cap(
            "end: purged with its namespace",
            if on(feature::NETNS_REFCOUNT) {
                Available
            } else {
                Degraded(format!(
                    "{}: purges are reported as resets",
                    why(r, feature::NETNS_REFCOUNT)
                ))
            },
        ),
        cap(
            "overflow (tcp_max_tw_buckets)",
            if on(feature::TW_BUCKETS) {
                Available
            } else {
                Missing(why(r, feature::TW_BUCKETS))
            },
        ),
        cap(
            "aborts and peer resets (closes without TIME_WAIT)",
            Available,
        ),
        cap("failed connect (EADDRNOTAVAIL)", Available),
        cap(
            "failed bind (EADDRINUSE)",
            match bind_missing {
                None => Available,
                Some(w) => Missing(w.to_string()),
            },
        ),
        cap("start-up scan of existing TIME_WAITs (sock_diag)", diag()),
        cap(
            "sweep for starts and ends no program saw (sock_diag)",
            match diag() {
                Available if !on(feature::SOCKET_COOKIE) => Degraded(
                    "without the cookie helper, a missed start whose connection is gone when the sweep looks is not paired with its end (counted as an end never seen starting)".into(),
                ),
                other => other,
            },
        ),
    ]
}

/// One line for each capability that is not fully available here (for this kernel, or for
/// these privileges).
pub fn degraded(r: &Resolved, bind_missing: Option<&str>, sock_diag: Option<&str>) -> Vec<String> {
    capabilities(r, bind_missing, sock_diag)
        .into_iter()
        .filter_map(|c| match c.status {
            Status::Available => None,
            Status::Degraded(w) => Some(format!("degraded here: {}: {w}", c.name)),
            Status::Missing(w) => Some(format!("missing here: {}: {w}", c.name)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(features: u32) -> Resolved {
        let all = [
            feature::SOCKET_COOKIE,
            feature::NETNS_REFCOUNT,
            feature::TW_BUCKETS,
            feature::TW_RESET_TRACE,
        ];
        Resolved {
            off: Default::default(),
            features,
            tw_count_bias: 1,
            missing: all
                .iter()
                .filter(|f| features & **f == 0)
                .map(|f| (*f, format!("lacks {f}")))
                .collect(),
            bind_missing: None,
        }
    }

    #[test]
    fn a_full_kernel_degrades_nothing() {
        let r = resolved(15);
        assert!(degraded(&r, None, None).is_empty());
        assert_eq!(capabilities(&r, None, None).len(), 13);
    }

    #[test]
    fn each_missing_feature_degrades_its_capability_alone() {
        // A 5.10-like kernel: no cookie helper, no TIME_WAIT RST trace.
        let r = resolved(feature::NETNS_REFCOUNT | feature::TW_BUCKETS);
        let d = degraded(&r, Some("tracefs is not mounted"), None);
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(
            d[0],
            format!(
                "degraded here: end: reset: lacks {}",
                feature::TW_RESET_TRACE
            )
        );
        assert_eq!(
            d[1],
            "missing here: failed bind (EADDRINUSE): tracefs is not mounted"
        );
        assert!(d[2].starts_with("degraded here: sweep"), "{}", d[2]);
        assert!(d[2].contains("cookie helper"));
        let r = resolved(15 & !feature::TW_BUCKETS);
        let d = degraded(&r, None, None);
        assert_eq!(d.len(), 1);
        assert!(d[0].starts_with("missing here: overflow"));
    }

    #[test]
    fn without_sock_diag_the_scan_and_the_sweep_are_missing() {
        let d = degraded(&resolved(15), None, Some("No such file or directory"));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d.iter().all(|l| l.contains("load the tcp_diag module")));
    }

    #[test]
    fn variants_name_the_count_spelling() {
        let mut r = resolved(15);
        assert!(variants(&r)[2].1.contains("tw_refcount"));
        r.tw_count_bias = 0;
        assert_eq!(variants(&r)[2].1, "tcp_death_row.tw_count");
    }
}
