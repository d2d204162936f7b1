//! Types shared by twtrace's kernel programs and its userspace.
//!
//! Every record the kernel writes to the ring buffer starts with an [`EventHeader`] whose `kind`
//! says which fixed-size payload struct follows. All structs are `#[repr(C)]` with explicit
//! padding so both sides agree on the layout byte for byte; the userspace decoder checks sizes.
//! Kernel struct offsets are not here: they are read from the running kernel's BTF at load time
//! and handed to the programs in [`Config`].
#![no_std]

/// Length of `task_struct.comm`.
pub const COMM_LEN: usize = 16;

/// Kernel TCP state numbers (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// What a ring-buffer record is. The discriminant is `EventHeader::kind`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TIME_WAIT socket armed its timer for the first time: it exists. Payload [`TwOpen`].
    TwEnter = 1,
    /// An armed TIME_WAIT timer was pushed back (FIN, ACK or out-of-window segment). [`TwUpdate`].
    TwResched = 2,
    /// A TIME_WAIT socket ended; `TwUpdate::end` says how. [`TwUpdate`].
    TwEnd = 3,
    /// A connection this host closed first ended without a TIME_WAIT. [`NoTw`].
    NoTw = 4,
    /// connect() found no free local port, or bind() found its port taken. [`PortFail`].
    PortFail = 5,
}

impl EventKind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::TwEnter),
            2 => Some(Self::TwResched),
            3 => Some(Self::TwEnd),
            4 => Some(Self::NoTw),
            5 => Some(Self::PortFail),
            _ => None,
        }
    }
}

/// How a TIME_WAIT ended (`TwUpdate::end`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// Its timer ran out.
    Expired = 1,
    /// Killed early by an outbound connect() taking its 4-tuple (tcp_tw_reuse).
    Reused = 2,
    /// Killed early by an inbound SYN that a listener accepted on the same 4-tuple.
    Recycled = 3,
    /// Killed by a RST: one it sent (late SYN or data) or one it received (assassination).
    Reset = 4,
    /// Destroyed with its network namespace.
    Purged = 5,
}

impl EndReason {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Expired),
            2 => Some(Self::Reused),
            3 => Some(Self::Recycled),
            4 => Some(Self::Reset),
            5 => Some(Self::Purged),
            _ => None,
        }
    }
}

/// Why a close this host started did not leave a TIME_WAIT (`NoTw::reason`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoTwReason {
    /// tcp_max_tw_buckets was full (TcpExtTCPTimeWaitOverflow).
    Overflow = 1,
    /// This host reset the connection: SO_LINGER 0, close with unread data, TCP_LINGER2 < 0,
    /// FIN_WAIT2 timeout.
    Abort = 2,
    /// The peer reset the connection after this host had sent its FIN.
    PeerReset = 3,
}

impl NoTwReason {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Overflow),
            2 => Some(Self::Abort),
            3 => Some(Self::PeerReset),
            _ => None,
        }
    }
}

/// Which side opened the connection, learnt at CLOSE->SYN_SENT or LISTEN->SYN_RECV.
pub mod role {
    pub const UNKNOWN: u8 = 0;
    pub const CLIENT: u8 = 1;
    pub const SERVER: u8 = 2;
}

/// How this host closed: first (active) or at the same time as the peer (CLOSING).
pub mod close_kind {
    pub const UNKNOWN: u8 = 0;
    pub const ACTIVE: u8 = 1;
    pub const SIMULTANEOUS: u8 = 2;
}

/// Start of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// An [`EventKind`].
    pub kind: u8,
    pub _pad: [u8; 3],
    /// CPU that wrote the record (`bpf_get_smp_processor_id`).
    pub cpu: u32,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`) of the moment the event describes.
    pub ts_ns: u64,
}

/// Who did something: a task at the moment of a state change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Task {
    /// Process id (kernel tgid) in twtrace's pid namespace; 0 when unknown or when the task
    /// has none there.
    pub pid: u32,
    /// Thread id (kernel pid) in twtrace's pid namespace; 0 likewise.
    pub tid: u32,
    pub uid: u32,
    /// Process id in the initial pid namespace; 0 when unknown.
    pub host_pid: u32,
    /// cgroup v2 id of the task; 0 when unknown.
    pub cgroup: u64,
    pub comm: [u8; COMM_LEN],
}

/// A connection's identity. Addresses are in network byte order; IPv4 uses the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    /// Network namespace inode number.
    pub netns: u32,
    /// Host byte order.
    pub lport: u16,
    /// Host byte order.
    pub rport: u16,
    /// AF_INET or AF_INET6.
    pub family: u16,
    pub _pad: [u8; 6],
}

impl Conn {
    /// The IP version of the traffic: AF_INET for an IPv4 peer of a dual-stack (`::`) socket,
    /// whose addresses are IPv4-mapped (`::ffff:a.b.c.d`).
    #[inline(always)]
    pub fn ip_family(&self) -> u16 {
        let r = &self.raddr;
        // Spelled out byte by byte: no loop for an old verifier to walk.
        let zero = (r[0] | r[1] | r[2] | r[3] | r[4] | r[5] | r[6] | r[7] | r[8] | r[9]) == 0;
        if self.family == AF_INET6 && zero && r[10] == 0xff && r[11] == 0xff {
            AF_INET
        } else {
            self.family
        }
    }
}

/// `TwOpen::flags`: the closer's attribution was carried from its close() call.
pub const OPEN_ATTRIBUTED: u8 = 1;

/// Payload of [`EventKind::TwEnter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwOpen {
    pub hdr: EventHeader,
    /// Socket cookie, shared by the closing socket and its TIME_WAIT; 0 when never assigned.
    pub cookie: u64,
    /// Kernel address of the `inet_timewait_sock`; a key only while it lives.
    pub tw: u64,
    pub conn: Conn,
    /// The task that closed first (close()/shutdown() at ESTABLISHED->FIN_WAIT1).
    pub closer: Task,
    /// A `role` constant.
    pub role: u8,
    /// A `close_kind` constant.
    pub close: u8,
    /// `tw_substate`: TIME_WAIT, or FIN_WAIT2 for an orphaned socket waiting for the peer's FIN.
    pub substate: u8,
    pub flags: u8,
    /// Timer length in jiffies as armed.
    pub timeout_jiffies: u32,
}

/// Payload of [`EventKind::TwResched`] and [`EventKind::TwEnd`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwUpdate {
    pub hdr: EventHeader,
    pub cookie: u64,
    pub tw: u64,
    /// For `Reused`: the connecting task that took the 4-tuple. Otherwise the current task.
    pub by: Task,
    pub substate: u8,
    /// An [`EndReason`] for `TwEnd`; 0 for `TwResched`.
    pub end: u8,
    pub _pad: [u8; 2],
    /// For `TwResched`: the new timer length in jiffies.
    pub timeout_jiffies: u32,
}

/// Payload of [`EventKind::NoTw`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoTw {
    pub hdr: EventHeader,
    pub cookie: u64,
    pub conn: Conn,
    pub closer: Task,
    pub role: u8,
    pub close: u8,
    /// A [`NoTwReason`].
    pub reason: u8,
    /// TCP state the socket left for CLOSE.
    pub oldstate: u8,
    pub _pad: u32,
}

/// A connection this host closed first (or reset), in the kernel's `CONNS` map by socket
/// cookie, from its close until its TIME_WAIT starts or it closes without one. Userspace reads
/// the entries nothing settled: their TIME_WAIT started where the kernel ran no program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closing {
    pub closer: Task,
    /// The connection, read at close(); zero (`family` 0) when only a RST was seen.
    pub conn: Conn,
    /// When close() was seen (CLOCK_MONOTONIC ns); 0 with `conn`.
    pub ts_ns: u64,
    /// A `role` constant.
    pub role: u8,
    /// A `close_kind` constant.
    pub close: u8,
    /// `closing_flag` bits.
    pub flags: u8,
    /// For `closing_flag::CLOSED`: the TCP state the socket left for CLOSE.
    pub oldstate: u8,
    pub _pad: u32,
}

/// `Closing::flags`.
pub mod closing_flag {
    /// `Closing::closer` closed first (close()/shutdown(), or a reset it caused).
    pub const CLOSER_SET: u8 = 1;
    pub const RST_SENT: u8 = 4;
    pub const RST_RECEIVED: u8 = 8;
    /// Went to CLOSE without a TIME_WAIT; a RST sent right after makes it an abort.
    pub const CLOSED: u8 = 16;
    /// Closed by twtrace itself: none of its TIME_WAITs or aborts are reported.
    pub const IGNORED: u8 = 32;
}

/// The kernel programs read the start of a socket in one go; every `skc_*` field they use must
/// lie in these first bytes (checked at load time). It reaches past `sock_common` (136 bytes on
/// 6.18) to a TIME_WAIT's `tw_substate`, read from the same block when it fits.
pub const SKC_BLOCK: usize = 144;

/// `PortFail::op`.
pub mod port_op {
    pub const CONNECT: u8 = 1;
    pub const BIND: u8 = 2;
}

pub const EADDRINUSE: i32 = 98;
pub const EADDRNOTAVAIL: i32 = 99;

/// Payload of [`EventKind::PortFail`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortFail {
    pub hdr: EventHeader,
    /// connect: the destination (`raddr`, `rport`), local port 0. bind: the address asked for
    /// (`laddr`, `lport`).
    pub conn: Conn,
    pub task: Task,
    /// Positive errno: EADDRNOTAVAIL or EADDRINUSE.
    pub errno: i32,
    /// A `port_op` constant.
    pub op: u8,
    pub _pad: [u8; 3],
}

/// Indices into the per-CPU `COUNTERS` array: things the kernel side could not do.
pub mod counter {
    /// `bpf_ringbuf_reserve` failed: an event was dropped.
    pub const RINGBUF_FULL: u32 = 0;
    /// A connection could not be remembered (map update failed).
    pub const CONN_MAP_FAIL: u32 = 1;
    /// A kernel read (`bpf_probe_read_kernel`) failed.
    pub const READ_FAIL: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Kernel struct offsets and symbol addresses, read from BTF and /proc/kallsyms at load time,
/// plus the in-kernel filters. Passed as the read-only global `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Address of `tw_timer_handler`: identifies TIME_WAIT timers.
    pub tw_timer_handler: u64,
    /// Address of `reqsk_timer_handler`: a request socket's SYN-ACK timer.
    pub reqsk_timer_handler: u64,
    pub off: Offsets,
    pub filter: Filter,
    /// Wake the reader once this many bytes are waiting in the ring buffer.
    pub wakeup_bytes: u64,
    /// twtrace's own process id in its pid namespace, whose activity is ignored.
    pub self_pid: u32,
    /// Non-zero: emit aya-log diagnostics.
    pub verbose: u32,
    /// [`feature`] bits: what this kernel offers, resolved from its BTF at load time. A
    /// branch on a bit the kernel lacks is pruned by the verifier (the global is frozen).
    pub features: u32,
    /// How much `net_tw_refcount` counts beyond the live TIME_WAITs: 1 for the `refcount_t`
    /// `tw_refcount` (5.17 on), 0 for the `atomic_t` `tw_count` before it.
    pub tw_count_bias: u32,
    /// twtrace's pid namespace (device and inode of its nsfs file), in which pids are
    /// reported and filtered; both 0 when it is the initial namespace.
    pub pidns_dev: u64,
    pub pidns_ino: u64,
}

/// `Config::features`.
pub mod feature {
    /// Tracing programs may call `bpf_get_socket_cookie` (5.12 on). Without it the programs
    /// key closing connections by [`crate::conn_key`] and report the cookie the socket has.
    pub const SOCKET_COOKIE: u32 = 1;
    /// `net_ns_refcount` was found: TIME_WAITs purged with their namespace are told apart.
    pub const NETNS_REFCOUNT: u32 = 2;
    /// `net_tw_refcount` and `net_max_tw_buckets` were found: closes that overflowed
    /// `tcp_max_tw_buckets` are told apart.
    pub const TW_BUCKETS: u32 = 4;
    /// `tcp_send_reset` fires for TIME_WAIT sockets (6.10 on, when it gained its `reason`):
    /// a RST a TIME_WAIT sends marks its end at once instead of being inferred.
    pub const TW_RESET_TRACE: u32 = 8;
}

/// Set in a `CONNS` key made by [`conn_key`]: real socket cookies count up from 1 and never
/// reach it.
pub const SYNTHETIC_KEY: u64 = 1 << 63;

/// A key for a connection on kernels whose tracing programs cannot ask for its cookie: its
/// namespace and 4-tuple, hashed (FNV-1a over the fields), with [`SYNTHETIC_KEY`] set. The
/// closing socket and its TIME_WAIT share it.
#[inline(always)]
pub fn conn_key(c: &Conn) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |v: u64| {
        h ^= v;
        h = h.wrapping_mul(PRIME);
    };
    let words = |a: &[u8; 16], i: usize| {
        u64::from_ne_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    mix(words(&c.laddr, 0));
    mix(words(&c.laddr, 8));
    mix(words(&c.raddr, 0));
    mix(words(&c.raddr, 8));
    mix(u64::from(c.netns) << 32 | u64::from(c.lport) << 16 | u64::from(c.rport));
    mix(u64::from(c.family));
    h | SYNTHETIC_KEY
}

/// Byte offsets inside kernel structs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// `timer_list.function`.
    pub timer_function: u32,
    /// `timer_list.expires`.
    pub timer_expires: u32,
    /// `inet_timewait_sock.tw_timer`.
    pub tw_timer: u32,
    /// `inet_timewait_sock.tw_substate`.
    pub tw_substate: u32,
    /// `request_sock.rsk_timer`.
    pub rsk_timer: u32,
    /// `sock_common` fields; a `sock`, an `inet_timewait_sock` and a `request_sock` all start
    /// with one.
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_state: u32,
    pub skc_net: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub skc_cookie: u32,
    /// `inet_sock.inet_sport` (big-endian); kept after the port is released at CLOSE.
    pub inet_sport: u32,
    /// `sock.sk_protocol`.
    pub sk_protocol: u32,
    /// `sock.sk_max_ack_backlog`: an accept()ed socket keeps its listener's.
    pub sk_max_ack_backlog: u32,
    /// `net.ns.inum`.
    pub net_inum: u32,
    /// `net.ns` reference count (`__ns_ref` or `count`): 0 while the netns is being destroyed.
    pub net_ns_refcount: u32,
    /// `net.ipv4.tcp_death_row.tw_refcount`.
    pub net_tw_refcount: u32,
    /// `net.ipv4.tcp_death_row.sysctl_max_tw_buckets`.
    pub net_max_tw_buckets: u32,
    /// From a file descriptor to its socket: `task_struct.files`, `files_struct.fdt`,
    /// `fdtable.max_fds`, `fdtable.fd`, `file.private_data`, `socket.file`, `socket.sk`.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_file: u32,
    pub socket_sk: u32,
    /// Field offsets in the syscalls:sys_enter_bind / sys_exit_bind records (tracefs format).
    pub tp_bind_fd: u32,
    pub tp_bind_addr: u32,
    pub tp_exit_ret: u32,
}

/// In-kernel filters; zero means "any".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub pid: u32,
    pub netns: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Number of entries used in `lports` / `rports`.
    pub n_lports: u8,
    pub n_rports: u8,
    pub lports: [u16; MAX_PORT_FILTERS],
    pub rports: [u16; MAX_PORT_FILTERS],
    /// Non-zero length: only closes by tasks with this comm.
    pub comm_len: u32,
    pub comm: [u8; COMM_LEN],
}

pub const MAX_PORT_FILTERS: usize = 8;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these are `#[repr(C)]`, `Copy`, have explicit padding and no pointers, so
    // any byte pattern is a valid value.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TwOpen {}
    unsafe impl aya::Pod for super::TwUpdate {}
    unsafe impl aya::Pod for super::NoTw {}
    unsafe impl aya::Pod for super::PortFail {}
    unsafe impl aya::Pod for super::Closing {}
}

/// Compile-time layout checks: both sides must see the same sizes.
const _: () = {
    assert!(core::mem::size_of::<EventHeader>() == 16);
    assert!(core::mem::size_of::<Task>() == 40);
    assert!(core::mem::size_of::<Conn>() == 48);
    assert!(core::mem::size_of::<TwOpen>() == 128);
    assert!(core::mem::size_of::<TwUpdate>() == 80);
    assert!(core::mem::size_of::<NoTw>() == 120);
    assert!(core::mem::size_of::<PortFail>() == 112);
    assert!(core::mem::size_of::<Filter>() == 64);
    assert!(core::mem::size_of::<Closing>() == 104);
};
