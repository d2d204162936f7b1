//! The privileges twtrace uses: which capabilities this process has (its effective set),
//! which the kernel's settings make necessary, and what is degraded without each. Root has them
//! all; a service can run with exactly these (see dist/twtrace.service). `twtrace check` prints
//! the table, and loading refuses in one line that names what is missing.

use std::{fs, io, path::Path};

use rustix::thread::{CapabilitySet, capabilities};
use serde::Serialize;

use super::tracefs;

/// The kernel settings that decide whether /proc/kallsyms shows addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KallsymsSettings {
    /// `kernel.kptr_restrict` (0, 1 or 2).
    pub kptr_restrict: i64,
    /// `kernel.perf_event_paranoid` (-1 to 4 on some distributions).
    pub perf_event_paranoid: i64,
}

impl KallsymsSettings {
    /// Read from /proc/sys/kernel; an unreadable value counts as the strictest usual one.
    pub fn read() -> Self {
        let num = |key: &str, strict: i64| {
            fs::read_to_string(Path::new("/proc/sys/kernel").join(key))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(strict)
        };
        Self {
            kptr_restrict: num("kptr_restrict", 1),
            perf_event_paranoid: num("perf_event_paranoid", 2),
        }
    }

    /// Whether kallsyms shows addresses to everyone (the kernel's `kallsyms_show_value`):
    /// `kptr_restrict=0` with `perf_event_paranoid <= 1`.
    pub fn open_to_all(&self) -> bool {
        self.kptr_restrict == 0 && self.perf_event_paranoid <= 1
    }

    /// `kptr_restrict=2` hides them from every process, root included.
    pub fn hidden_from_all(&self) -> bool {
        self.kptr_restrict >= 2
    }

    /// Why kallsyms hides addresses from a process without CAP_SYSLOG, and what to do: one
    /// clause, for [`super::kallsyms::KallsymsError::Hidden`].
    pub fn why_hidden(&self, has_syslog: bool) -> String {
        let Self {
            kptr_restrict: k,
            perf_event_paranoid: p,
        } = *self;
        if self.hidden_from_all() {
            format!(
                "kernel.kptr_restrict={k} hides them from every process, root included: set it to 1 (sysctl -w kernel.kptr_restrict=1) and run twtrace as root or with CAP_SYSLOG"
            )
        } else if has_syslog {
            format!(
                "kernel.kptr_restrict={k} and kernel.perf_event_paranoid={p} should show them to CAP_SYSLOG, which twtrace has; a security module may hide them"
            )
        } else if k == 1 {
            "kernel.kptr_restrict=1 shows them only to CAP_SYSLOG, which twtrace lacks: run it as root or grant it CAP_SYSLOG".to_string()
        } else {
            format!(
                "kernel.perf_event_paranoid={p} (2 or more) shows them only to CAP_SYSLOG, which twtrace lacks: run it as root or grant it CAP_SYSLOG"
            )
        }
    }
}

/// A capability twtrace may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cap {
    Bpf,
    Perfmon,
    Syslog,
    SysAdmin,
    SysPtrace,
    DacReadSearch,
    NetAdmin,
}

impl Cap {
    pub const ALL: [Cap; 7] = [
        Cap::Bpf,
        Cap::Perfmon,
        Cap::Syslog,
        Cap::SysAdmin,
        Cap::SysPtrace,
        Cap::DacReadSearch,
        Cap::NetAdmin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cap::Bpf => "CAP_BPF",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Syslog => "CAP_SYSLOG",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::NetAdmin => "CAP_NET_ADMIN",
        }
    }

    fn set(self) -> CapabilitySet {
        match self {
            Cap::Bpf => CapabilitySet::BPF,
            Cap::Perfmon => CapabilitySet::PERFMON,
            Cap::Syslog => CapabilitySet::SYSLOG,
            Cap::SysAdmin => CapabilitySet::SYS_ADMIN,
            Cap::SysPtrace => CapabilitySet::SYS_PTRACE,
            Cap::DacReadSearch => CapabilitySet::DAC_READ_SEARCH,
            Cap::NetAdmin => CapabilitySet::NET_ADMIN,
        }
    }
}

/// This process's effective capabilities.
#[derive(Clone, Copy, Debug)]
pub struct Effective(CapabilitySet);

impl Effective {
    /// From capget(2); an error leaves the set empty (the kernel's refusals then say more).
    pub fn current() -> Self {
        Self(
            capabilities(None)
                .map(|s| s.effective)
                .unwrap_or(CapabilitySet::empty()),
        )
    }

    /// A set made of these capabilities (tests).
    pub fn of(caps: &[Cap]) -> Self {
        Self(caps.iter().fold(CapabilitySet::empty(), |s, c| s | c.set()))
    }

    pub fn has(&self, c: Cap) -> bool {
        self.0.contains(c.set())
    }
}

/// How much twtrace depends on one privilege here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Need {
    /// Nothing traces without it.
    Required,
    /// Something is degraded without it (said in `without`).
    Degrades,
    /// This kernel's settings or layout make it unnecessary.
    NotNeeded,
}

/// One row of `twtrace check`'s privilege table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Privilege {
    pub name: &'static str,
    pub present: bool,
    pub need: Need,
    /// What it is used for.
    pub used_for: String,
    /// What happens without it (empty when nothing does).
    pub without: String,
}

impl Privilege {
    /// Missing where it is needed.
    pub fn lacking(&self) -> bool {
        !self.present && self.need != Need::NotNeeded
    }
}

/// What the process can do with tracefs (where the bind() tracepoints are described).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracefsAccess {
    Readable,
    /// Mounted, but its directory (mode 0700, root's) is closed to this user.
    Closed,
    /// Not mounted (twtrace mounts it when it may).
    NotMounted,
}

impl TracefsAccess {
    pub fn probe() -> Self {
        match fs::metadata(Path::new(tracefs::ROOT).join("events")) {
            Ok(m) if m.is_dir() => Self::Readable,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Self::Closed,
            _ if tracefs::is_mounted() => Self::Closed,
            _ => Self::NotMounted,
        }
    }
}

/// What this machine is like, for [`privileges`]: measured once, passed in so the table can be
/// tested.
#[derive(Clone, Debug)]
pub struct Context {
    pub caps: Effective,
    pub kallsyms: KallsymsSettings,
    pub tracefs: TracefsAccess,
    /// Whether the kernel knows CAP_BPF and CAP_PERFMON (5.8+, `kernel.cap_last_cap` >= 39);
    /// before, CAP_SYS_ADMIN loads and attaches programs.
    pub split_caps: bool,
}

/// CAP_BPF's number: the last of the capabilities that split CAP_SYS_ADMIN's BPF powers.
const CAP_BPF_NUMBER: u32 = 39;

impl Context {
    pub fn current() -> Self {
        let last_cap = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        Self {
            caps: Effective::current(),
            kallsyms: KallsymsSettings::read(),
            tracefs: TracefsAccess::probe(),
            split_caps: last_cap.is_none_or(|n| n >= CAP_BPF_NUMBER),
        }
    }
}

/// Every privilege twtrace uses, whether this process has it, and what it changes here.
pub fn privileges(cx: &Context) -> Vec<Privilege> {
    let row = |cap: Cap, need, used_for: &str, without: String| Privilege {
        name: cap.name(),
        present: cx.caps.has(cap),
        need,
        used_for: used_for.to_string(),
        without,
    };
    let k = cx.kallsyms;
    let syslog_need = if k.open_to_all() {
        Need::NotNeeded
    } else {
        Need::Required
    };
    let syslog_without = match syslog_need {
        Need::NotNeeded => format!(
            "nothing here: kernel.kptr_restrict=0 and kernel.perf_event_paranoid={} show kernel addresses to every process",
            k.perf_event_paranoid
        ),
        _ => format!("nothing traces: {}", k.why_hidden(false)),
    };
    let tracefs_need = match cx.tracefs {
        TracefsAccess::Closed => Need::Degrades,
        _ => Need::NotNeeded,
    };
    let tracefs_without = match cx.tracefs {
        TracefsAccess::Closed => format!(
            "failed bind() (EADDRINUSE) is not traced: {} is mode 0700, root's",
            tracefs::ROOT
        ),
        TracefsAccess::Readable => format!("nothing here: {} is readable", tracefs::ROOT),
        TracefsAccess::NotMounted => format!(
            "nothing here: tracefs is not mounted; twtrace mounts it at {} when it has CAP_SYS_ADMIN",
            tracefs::ROOT
        ),
    };
    // Before 5.8, CAP_SYS_ADMIN is what loads programs, and CAP_BPF and CAP_PERFMON do not
    // exist.
    let (split, split_without) = if cx.split_caps {
        (Need::Required, "nothing traces".to_string())
    } else {
        (
            Need::NotNeeded,
            "nothing: this kernel predates it (Linux 5.8); CAP_SYS_ADMIN loads programs here"
                .into(),
        )
    };
    let (admin_need, admin_without) = if cx.split_caps {
        (
            Need::Degrades,
            "TIME_WAITs are traced in every namespace, but only twtrace's own is scanned at start, swept for missed starts, and shown with its settings".to_string(),
        )
    } else {
        (
            Need::Required,
            "nothing traces: before Linux 5.8 it is what loads eBPF programs".into(),
        )
    };
    vec![
        row(
            Cap::Bpf,
            split,
            "creating the eBPF maps and loading the programs (Linux 5.8+; before, CAP_SYS_ADMIN did this)",
            split_without.clone(),
        ),
        row(
            Cap::Perfmon,
            split,
            "tracing programs that read kernel memory, and attaching them to tracepoints",
            split_without,
        ),
        row(
            Cap::Syslog,
            syslog_need,
            "reading kernel addresses (tw_timer_handler) from /proc/kallsyms",
            syslog_without,
        ),
        row(
            Cap::SysAdmin,
            admin_need,
            "joining other network namespaces (setns) to list their TIME_WAITs and read their settings",
            admin_without,
        ),
        row(
            Cap::SysPtrace,
            Need::Degrades,
            "opening the network namespace of another user's process (/proc/PID/ns/net)",
            "namespaces held only by other users' processes (containers) are not scanned or swept; those named by `ip netns` are".into(),
        ),
        row(
            Cap::DacReadSearch,
            tracefs_need,
            "reading tracefs, where the bind() tracepoints are described",
            tracefs_without,
        ),
        row(
            Cap::NetAdmin,
            Need::NotNeeded,
            "not used: sock_diag lists TIME_WAITs without it (it adds only socket marks, which twtrace does not read)",
            String::new(),
        ),
    ]
}

/// The settings behind the table, one line each: (name, value and what it means here).
pub fn settings(cx: &Context) -> Vec<(&'static str, String)> {
    let k = cx.kallsyms;
    let kallsyms = if k.hidden_from_all() {
        "hidden from every process".to_string()
    } else if k.open_to_all() {
        "shown to every process".to_string()
    } else {
        "shown only to CAP_SYSLOG".to_string()
    };
    let tracefs = match cx.tracefs {
        TracefsAccess::Readable => "readable",
        TracefsAccess::Closed => "closed to this user (mode 0700)",
        TracefsAccess::NotMounted => "not mounted",
    };
    vec![
        (
            "kallsyms",
            format!(
                "kernel.kptr_restrict={} kernel.perf_event_paranoid={}: addresses {kallsyms}",
                k.kptr_restrict, k.perf_event_paranoid
            ),
        ),
        ("tracefs", format!("{}: {tracefs}", tracefs::ROOT)),
    ]
}

/// The required privileges this process lacks (empty when it can trace).
pub fn missing_required(cx: &Context) -> Vec<&'static str> {
    privileges(cx)
        .into_iter()
        .filter(|p| p.need == Need::Required && !p.present)
        .map(|p| p.name)
        .collect()
}

/// One line per privilege whose absence degrades what twtrace shows here. CAP_DAC_READ_SEARCH
/// is left out: the failed-bind capability's own line names it (see [`tracefs::TracefsError`]).
pub fn degraded(cx: &Context) -> Vec<String> {
    privileges(cx)
        .into_iter()
        .filter(|p| p.need == Need::Degrades && !p.present)
        .filter(|p| p.name != Cap::DacReadSearch.name())
        .map(|p| format!("without {}: {}", p.name, p.without))
        .collect()
}

/// "A", "A and B", "A, B and C".
pub fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx(caps: &[Cap], kptr: i64, paranoid: i64, tracefs: TracefsAccess) -> Context {
        Context {
            caps: Effective::of(caps),
            kallsyms: KallsymsSettings {
                kptr_restrict: kptr,
                perf_event_paranoid: paranoid,
            },
            tracefs,
            split_caps: true,
        }
    }

    #[test]
    fn before_5_8_cap_sys_admin_is_what_loads() {
        let mut c = cx(&[Cap::SysAdmin, Cap::Syslog], 0, 2, TracefsAccess::Readable);
        c.split_caps = false;
        assert!(missing_required(&c).is_empty());
        c.caps = Effective::of(&[Cap::Syslog]);
        assert_eq!(missing_required(&c), ["CAP_SYS_ADMIN"]);
    }

    #[test]
    fn syslog_is_required_exactly_when_kallsyms_hides_addresses() {
        let base = [Cap::Bpf, Cap::Perfmon, Cap::SysAdmin];
        let c = cx(&base, 0, 2, TracefsAccess::Readable);
        assert_eq!(missing_required(&c), ["CAP_SYSLOG"]);
        let why = &privileges(&c)[2].without;
        assert!(why.contains("perf_event_paranoid=2"), "{why}");
        let c = cx(&base, 0, 1, TracefsAccess::Readable);
        assert!(missing_required(&c).is_empty());
        let c = cx(&base, 1, -1, TracefsAccess::Readable);
        assert_eq!(missing_required(&c), ["CAP_SYSLOG"]);
        assert!(privileges(&c)[2].without.contains("kptr_restrict=1"));
    }

    #[test]
    fn each_required_capability_is_named_when_missing() {
        let c = cx(&[], 0, 2, TracefsAccess::Readable);
        assert_eq!(
            missing_required(&c),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYSLOG"]
        );
        let all = cx(&Cap::ALL, 0, 2, TracefsAccess::Closed);
        assert!(missing_required(&all).is_empty());
        assert!(degraded(&all).is_empty());
    }

    #[test]
    fn optional_capabilities_say_what_is_degraded() {
        let c = cx(&[Cap::Bpf, Cap::Perfmon], 0, 1, TracefsAccess::Closed);
        let d = degraded(&c);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].starts_with("without CAP_SYS_ADMIN: "), "{}", d[0]);
        assert!(d[1].starts_with("without CAP_SYS_PTRACE: "), "{}", d[1]);
        // The table says what CAP_DAC_READ_SEARCH gives where tracefs is closed, and that it
        // changes nothing where tracefs is open.
        let dac = |t| privileges(&cx(&[], 0, 1, t))[5].clone();
        assert_eq!(dac(TracefsAccess::Closed).need, Need::Degrades);
        assert!(
            dac(TracefsAccess::Closed)
                .without
                .starts_with("failed bind()")
        );
        assert_eq!(dac(TracefsAccess::Readable).need, Need::NotNeeded);
    }

    #[test]
    fn kptr_restrict_2_is_a_setting_to_change_not_a_capability() {
        let k = KallsymsSettings {
            kptr_restrict: 2,
            perf_event_paranoid: 2,
        };
        assert!(k.hidden_from_all());
        assert!(
            k.why_hidden(true)
                .contains("sysctl -w kernel.kptr_restrict=1")
        );
    }

    #[test]
    fn settings_say_who_sees_kernel_addresses() {
        let s = settings(&cx(&[], 0, 2, TracefsAccess::Closed));
        assert_eq!(
            s[0].1,
            "kernel.kptr_restrict=0 kernel.perf_event_paranoid=2: addresses shown only to CAP_SYSLOG"
        );
        assert!(s[1].1.ends_with("closed to this user (mode 0700)"));
        let s = settings(&cx(&[], 0, 1, TracefsAccess::Readable));
        assert!(s[0].1.ends_with("shown to every process"));
    }

    #[test]
    fn lists_read_as_english() {
        assert_eq!(and_list(&["A"]), "A");
        assert_eq!(and_list(&["A", "B"]), "A and B");
        assert_eq!(and_list(&["A", "B", "C"]), "A, B and C");
    }

    #[test]
    fn reads_this_process() {
        // Whatever runs the tests, the set is read without error and the table is complete.
        let c = Context::current();
        assert_eq!(privileges(&c).len(), Cap::ALL.len());
    }
}
