//! Decoded events: what the kernel said, in userspace types. This is the aggregator's input,
//! whether it comes from the ring buffer, from sock_diag at start-up, or from a recording.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use twtrace_ebpf::{EndReason as KEnd, NoTwReason as KNoTw, close_kind, role, tcp_state};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Server,
    Unknown,
}

impl Role {
    pub fn from_raw(v: u8) -> Self {
        match v {
            role::CLIENT => Self::Client,
            role::SERVER => Self::Server,
            _ => Self::Unknown,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseKind {
    Active,
    Simultaneous,
    Unknown,
}

impl CloseKind {
    pub fn from_raw(v: u8) -> Self {
        match v {
            close_kind::ACTIVE => Self::Active,
            close_kind::SIMULTANEOUS => Self::Simultaneous,
            _ => Self::Unknown,
        }
    }
}

/// A TIME_WAIT socket's substate: a true TIME_WAIT (60 s), or an orphaned FIN_WAIT2 waiting for
/// the peer's FIN (tcp_fin_timeout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Substate {
    TimeWait,
    FinWait2,
}

impl Substate {
    pub fn from_tcp_state(v: u8) -> Self {
        if v == tcp_state::FIN_WAIT2 {
            Self::FinWait2
        } else {
            Self::TimeWait
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    Expired,
    Reused,
    Recycled,
    Reset,
    Purged,
}

impl EndReason {
    pub fn from_kernel(k: KEnd) -> Self {
        match k {
            KEnd::Expired => Self::Expired,
            KEnd::Reused => Self::Reused,
            KEnd::Recycled => Self::Recycled,
            KEnd::Reset => Self::Reset,
            KEnd::Purged => Self::Purged,
        }
    }

    pub const ALL: [EndReason; 5] = [
        Self::Expired,
        Self::Reused,
        Self::Recycled,
        Self::Reset,
        Self::Purged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::Reused => "reused",
            Self::Recycled => "recycled",
            Self::Reset => "reset",
            Self::Purged => "purged",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoTwReason {
    Overflow,
    Abort,
    PeerReset,
}

impl NoTwReason {
    pub fn from_kernel(k: KNoTw) -> Self {
        match k {
            KNoTw::Overflow => Self::Overflow,
            KNoTw::Abort => Self::Abort,
            KNoTw::PeerReset => Self::PeerReset,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Overflow => "overflow",
            Self::Abort => "abort",
            Self::PeerReset => "peer_reset",
        }
    }
}

/// Reads a comm into the decoder's cache of shared comms: a recording of millions of events
/// names a handful of processes.
fn shared_comm<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::sync::Arc<str>, D::Error> {
    let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
    Ok(crate::decode::shared_comm(s.as_bytes()))
}

/// A task as the kernel saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Process {
    /// In twtrace's pid namespace; 0 when the process has none there (it runs outside that
    /// namespace, or in one nested inside it).
    pub pid: u32,
    pub tid: u32,
    /// In the initial pid namespace; `None` when unknown (recordings before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_pid: Option<u32>,
    pub uid: u32,
    /// Shared: a busy host has few distinct comms and many TIME_WAITs holding one.
    #[serde(deserialize_with = "shared_comm")]
    pub comm: std::sync::Arc<str>,
    /// cgroup v2 id; 0 when unknown.
    pub cgroup_id: u64,
}

/// A pid for columns: `-` when the process has none in twtrace's pid namespace.
pub fn pid_text(pid: u32) -> String {
    if pid == 0 {
        "-".into()
    } else {
        pid.to_string()
    }
}

/// A connection's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoints {
    pub netns: u32,
    pub family: Family,
    pub laddr: IpAddr,
    pub lport: u16,
    pub raddr: IpAddr,
    pub rport: u16,
}

impl Endpoints {
    /// The IP version of the traffic: IPv4 for an IPv4 peer of a dual-stack (`::`) socket,
    /// whose addresses are IPv4-mapped (`::ffff:a.b.c.d`).
    pub fn ip_family(&self) -> Family {
        match self.raddr {
            IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Family::Ipv4,
            _ => self.family,
        }
    }

    /// Whether the peer is on this host, in this namespace (loopback, or this socket's own
    /// address): the other end of the connection is traced here too.
    pub fn peer_is_local(&self) -> bool {
        self.raddr.to_canonical().is_loopback() || self.raddr == self.laddr
    }
}

/// How the aggregator knows one TIME_WAIT socket across events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TwKey {
    /// The socket cookie, inherited from the closing socket: unique for the boot.
    Cookie(u64),
    /// The kernel address, when no cookie was ever assigned; valid only while the socket lives.
    Addr(u64),
}

impl TwKey {
    pub fn new(cookie: u64, tw: u64) -> Self {
        if cookie != 0 {
            Self::Cookie(cookie)
        } else {
            Self::Addr(tw)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwEnter {
    pub ts_ns: u64,
    pub cpu: u32,
    pub key: TwKey,
    pub conn: Endpoints,
    /// The task that closed first, when its close() was seen.
    pub closer: Option<Process>,
    pub role: Role,
    pub close: CloseKind,
    pub substate: Substate,
    pub timeout_jiffies: u32,
    /// Set when no kernel program saw this start and the sweep found it afterwards; `ts_ns`
    /// is then an estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovered>,
}

/// How the sweep learnt of a TIME_WAIT whose start no kernel program saw (see
/// `kernel::sweep`): from the connection its closer closed, still remembered by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recovered {
    /// The kernel still has the TIME_WAIT.
    Alive,
    /// The connection is gone: it was a TIME_WAIT only if its end was seen.
    Gone,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwResched {
    pub ts_ns: u64,
    pub cpu: u32,
    pub key: TwKey,
    pub substate: Substate,
    pub timeout_jiffies: u32,
    /// The TIME_WAIT socket's kernel address where the event also has a cookie: a start that
    /// had none is keyed by its address, and a cookie assigned while it lives (a sock_diag
    /// dump such as `ss` assigns them where tracing programs cannot) must still find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwEnd {
    pub ts_ns: u64,
    pub cpu: u32,
    pub key: TwKey,
    pub end: EndReason,
    pub substate: Substate,
    /// For `Reused`: the task whose connect() took the 4-tuple.
    pub by: Option<Process>,
    /// The TIME_WAIT socket's kernel address where the event also has a cookie: a start that
    /// had none is keyed by its address, and a cookie assigned while it lives (a sock_diag
    /// dump such as `ss` assigns them where tracing programs cannot) must still find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<u64>,
    /// No kernel program reported this end: the end check found the TIME_WAIT gone once its
    /// timer was due (`ts_ns` is when it was due, `end` the best-known reason).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoTimeWait {
    pub ts_ns: u64,
    pub cpu: u32,
    pub cookie: u64,
    pub conn: Endpoints,
    pub closer: Option<Process>,
    pub role: Role,
    pub close: CloseKind,
    pub reason: NoTwReason,
    /// TCP state left for CLOSE.
    pub oldstate: u8,
}

/// A TIME_WAIT found by the start-up scan (sock_diag).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwExisting {
    pub conn: Endpoints,
    pub cookie: u64,
    pub substate: Substate,
    /// Time left on its timer when scanned.
    pub remaining_ms: u32,
    /// What the recording knew of it, when a rotated file restates the TIME_WAITs alive at
    /// its start (a scan knows none of it). Absent in scans and in older recordings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<SeenTw>,
}

/// A TIME_WAIT as the aggregator knew it at a rotation: with it, a report of the newer files
/// alone still knows each one's closer, role and start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenTw {
    pub key: TwKey,
    pub closer: Option<Process>,
    pub role: Role,
    pub close: CloseKind,
    pub entered_ns: u64,
    pub armed_ns: u64,
    pub timeout_ns: u64,
    pub rescheduled: u32,
    pub preexisting: bool,
    pub recovered: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortOp {
    /// connect() found no free local port (EADDRNOTAVAIL).
    Connect,
    /// bind() found its address and port taken (EADDRINUSE).
    Bind,
}

/// A connect() or bind() that failed for want of a port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFailure {
    pub ts_ns: u64,
    pub cpu: u32,
    pub op: PortOp,
    pub errno: i32,
    /// connect: the destination in `raddr`/`rport`. bind: the address asked for in
    /// `laddr`/`lport`.
    pub conn: Endpoints,
    pub process: Process,
}

/// A network namespace's TIME_WAIT-related settings, read inside it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsSettings {
    pub tcp_tw_reuse: i64,
    /// Absent before Linux 6.14.
    pub tcp_tw_reuse_delay_ms: Option<i64>,
    pub tcp_max_tw_buckets: i64,
    pub tcp_fin_timeout: i64,
    pub tcp_timestamps: i64,
    pub tcp_rfc1337: i64,
    /// ip_local_port_range, inclusive.
    pub port_range: (u16, u16),
    /// ip_local_reserved_ports, inclusive ranges.
    pub reserved_ports: Vec<(u16, u16)>,
}

impl NetnsSettings {
    /// Whether connect() may take over a TIME_WAIT towards `raddr` (tcp_tw_reuse, which needs
    /// timestamps): such TIME_WAITs hold ports that new connections can still get.
    pub fn reuse_applies(&self, raddr: std::net::IpAddr) -> bool {
        self.tcp_timestamps != 0
            && match self.tcp_tw_reuse {
                1 => true,
                2 => raddr.to_canonical().is_loopback(),
                _ => false,
            }
    }

    pub fn in_ephemeral_range(&self, port: u16) -> bool {
        (self.port_range.0..=self.port_range.1).contains(&port)
            && !self
                .reserved_ports
                .iter()
                .any(|&(a, b)| (a..=b).contains(&port))
    }

    /// Ports connect() may pick: the range less the reserved ports inside it.
    pub fn usable_ports(&self) -> u32 {
        let (lo, hi) = self.port_range;
        if hi < lo {
            return 0;
        }
        let reserved: u32 = self
            .reserved_ports
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                if b >= a { u32::from(b - a) + 1 } else { 0 }
            })
            .sum();
        (u32::from(hi - lo) + 1).saturating_sub(reserved)
    }
}

/// Where local ports are spent: a local address towards one remote address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dest {
    pub netns: u32,
    pub laddr: IpAddr,
    pub raddr: IpAddr,
    pub rport: u16,
}

impl Dest {
    pub fn of(c: &Endpoints) -> Self {
        Self {
            netns: c.netns,
            laddr: c.laddr,
            raddr: c.raddr,
            rport: c.rport,
        }
    }
}

/// The aggregator's input, and what a recording stores: one JSON object per line, tagged by
/// `ev`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    TwEnter(TwEnter),
    TwResched(TwResched),
    TwEnd(TwEnd),
    NoTimeWait(NoTimeWait),
    PortFailure(PortFailure),
    /// Pre-existing TIME_WAITs, as of `ts_ns`. A recording splits a large scan into parts
    /// (its frames are bounded): each but the last says `more`.
    TwExisting {
        ts_ns: u64,
        sockets: Vec<TwExisting>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// A namespace's settings as read at `ts_ns`.
    Settings {
        ts_ns: u64,
        netns: u32,
        settings: NetnsSettings,
    },
    /// Live (not TIME_WAIT, not listening) connections of a namespace using an ephemeral
    /// local port, counted per destination, as of `ts_ns`.
    LiveConnections {
        ts_ns: u64,
        netns: u32,
        counts: Vec<(Dest, u32)>,
    },
    /// The kernel's own TIME_WAIT counters of a namespace (TcpExt TW, TWKilled, TWRecycled,
    /// TCPTimeWaitOverflow), as of `ts_ns`.
    KernelCounters {
        ts_ns: u64,
        netns: u32,
        counters: std::collections::BTreeMap<String, u64>,
        /// When the read that began at `ts_ns` ended: what happened in between may be in
        /// the counters or not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until_ns: Option<u64>,
    },
    /// The namespace at inode `netns`, as of `ts_ns`, with its cookie where the kernel gives
    /// one (5.14): an inode is reused once a namespace is gone, and a new cookie under a known
    /// inode means what was known under it belonged to another namespace.
    Netns {
        ts_ns: u64,
        netns: u32,
        cookie: Option<u64>,
    },
    /// A namespace no longer found (deleted): its settings no longer hold.
    NetnsGone {
        ts_ns: u64,
        netns: u32,
    },
    /// The path of a cgroup id, recorded the first time the id appears, so a report on
    /// another host can name containers.
    Cgroup {
        ts_ns: u64,
        id: u64,
        path: String,
    },
    /// Once a second: passive closes so far per namespace, and what was lost so far.
    Snapshot {
        ts_ns: u64,
        passive_closes: Vec<(u32, u64)>,
        loss: crate::kernel::tracer::Loss,
    },
}

impl Event {
    /// Parses one recorded line. serde reads an internally tagged enum by first buffering the
    /// whole object into a generic tree; the per-connection events, nearly every line of a
    /// recording, are parsed straight into their struct instead (the writer puts the tag
    /// first, and the struct ignores it). Anything else takes the generic path.
    pub fn from_json(line: &str) -> serde_json::Result<Event> {
        let tag = line
            .strip_prefix(r#"{"ev":""#)
            .and_then(|r| r.split_once('"').map(|(tag, _)| tag));
        match tag {
            Some("tw_enter") => serde_json::from_str(line).map(Event::TwEnter),
            Some("tw_end") => serde_json::from_str(line).map(Event::TwEnd),
            Some("tw_resched") => serde_json::from_str(line).map(Event::TwResched),
            Some("no_time_wait") => serde_json::from_str(line).map(Event::NoTimeWait),
            Some("port_failure") => serde_json::from_str(line).map(Event::PortFailure),
            _ => serde_json::from_str(line),
        }
    }

    /// The cgroup of the process an event names, if any.
    pub fn cgroup_id(&self) -> Option<u64> {
        let p = match self {
            Event::TwEnter(e) => e.closer.as_ref(),
            Event::NoTimeWait(n) => n.closer.as_ref(),
            Event::PortFailure(f) => Some(&f.process),
            _ => None,
        };
        p.map(|p| p.cgroup_id).filter(|&id| id != 0)
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::TwEnter(e) => e.ts_ns,
            Event::TwResched(e) => e.ts_ns,
            Event::TwEnd(e) => e.ts_ns,
            Event::NoTimeWait(e) => e.ts_ns,
            Event::PortFailure(e) => e.ts_ns,
            Event::TwExisting { ts_ns, .. }
            | Event::Settings { ts_ns, .. }
            | Event::LiveConnections { ts_ns, .. }
            | Event::KernelCounters { ts_ns, .. }
            | Event::Netns { ts_ns, .. }
            | Event::NetnsGone { ts_ns, .. }
            | Event::Cgroup { ts_ns, .. }
            | Event::Snapshot { ts_ns, .. } => *ts_ns,
        }
    }
}
