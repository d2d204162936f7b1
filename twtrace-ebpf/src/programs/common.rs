//! What every hook family shares: the load-time configuration, the maps, kernel reads, the
//! filters and the records they submit.
//!
//! The BPF stack is 512 bytes, and before 6.13 that limit holds for a whole chain of
//! BPF-to-BPF calls, not for each frame. So nothing large lives on it: the socket block, the
//! connection read from it, the task and the closing record are built in per-CPU [`SCRATCH`]
//! (one slot per program, as programs can nest on a CPU) or straight in the map value or
//! ring-buffer record they go to.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_pidns_info},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_ns_current_pid_tgid,
            bpf_get_smp_processor_id, bpf_get_socket_cookie, bpf_ktime_get_ns,
        },
    },
    macros::map,
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use twtrace_ebpf::{
    AF_INET, AF_INET6, COMM_LEN, Closing, Config, Conn, EventHeader, EventKind, NoTw, NoTwReason,
    PortFail, SKC_BLOCK, Task, TwUpdate, close_kind,
    closing_flag::{CLOSER_SET, IGNORED},
    conn_key, counter, feature,
};

/// Filled in by userspace at load time (offsets from BTF, addresses from kallsyms, filters).
#[unsafe(no_mangle)]
pub static CONFIG: Config = unsafe { core::mem::zeroed() };

/// Reads one field of [`CONFIG`]; volatile so the compiler keeps the load-time value.
macro_rules! conf {
    ($($field:tt)+) => {
        unsafe { core::ptr::read_volatile(&$crate::programs::common::CONFIG.$($field)+) }
    };
}
pub(crate) use conf;

/// Whether this kernel offers a [`feature`]; a constant to the verifier.
#[inline(always)]
pub fn has(f: u32) -> bool {
    (unsafe { read_volatile(&CONFIG.features) } & f) != 0
}

/// Per-CPU LRU lists: no global lock shared by every CPU's connect() and close().
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Connections this host closed first (or reset), by socket cookie, from the close to the
/// TIME_WAIT or the CLOSE that settles them.
#[map]
pub static CONNS: LruHashMap<u64, Closing> =
    LruHashMap::with_max_entries(262_144, BPF_F_NO_COMMON_LRU);

/// Passive closes (LAST_ACK->CLOSE) per network namespace: with the active closes (TIME_WAITs
/// and closes without one) they make "connections closed", which normalises rates.
#[map]
pub static PASSIVE_CLOSES: LruPerCpuHashMap<u32, u64> = LruPerCpuHashMap::with_max_entries(4096, 0);

/// bind() calls on TCP sockets in flight, by pid_tgid: what was asked, for the exit to report.
#[map]
pub static BINDS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(4096, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// A program's working memory, off the stack.
#[repr(C)]
pub struct Scratch {
    /// The start of the socket [`read_conn`] read last.
    pub block: [u8; SKC_BLOCK],
    /// The connection [`read_conn`] read last.
    pub conn: Conn,
    /// A closing record being built before it is remembered.
    pub closing: Closing,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(Slot::COUNT, 0);

/// Which [`SCRATCH`] entry a program uses: different programs can nest on one CPU (an
/// interrupt during another program), one program never nests within itself.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Slot {
    SetState = 0,
    SendReset = 1,
    TimerStart = 2,
    TimerCancel = 3,
    TimerExpire = 4,
    Bind = 5,
    /// The connecting socket a timer cancel compares its TIME_WAIT with.
    Connect = 6,
    ReceiveReset = 7,
}

impl Slot {
    const COUNT: u32 = 8;
}

#[inline(always)]
pub fn scratch(slot: Slot) -> Option<&'static mut Scratch> {
    SCRATCH.get_ptr_mut(slot as u32).map(|p| unsafe { &mut *p })
}

/// Waking the reader on every record costs an interrupt and a context switch per event, more
/// than the rest of a program. Wake it only once a batch has built up; it also drains on a
/// short timer, so quiet periods lose nothing but a little latency.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= conf!(wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn read<T>(addr: u64) -> Option<T> {
    match unsafe { bpf_probe_read_kernel(addr as *const T) } {
        Ok(v) => Some(v),
        Err(_) => {
            count(counter::READ_FAIL);
            None
        }
    }
}

/// A plain load through a pointer the verifier knows by its BTF type: a tracepoint's argument
/// (`struct sock *`, `struct timer_list *`) or a pointer field loaded through one. The offset is
/// a constant of the frozen CONFIG, so the verifier checks it against the type and makes the
/// load fault-safe (a fault reads 0). Much cheaper than a `bpf_probe_read_kernel` call, which
/// the hot paths of programs that run on every state change and timer cannot afford.
#[inline(always)]
pub fn load<T>(addr: u64) -> T {
    unsafe { read_volatile(addr as *const T) }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn header(kind: EventKind, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u8,
        _pad: [0; 3],
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns,
    }
}

/// The current task's ids as twtrace sees them: (tgid, tid) in twtrace's pid namespace, or
/// (0, 0) when it has none there, and its tgid in the initial namespace. Where twtrace runs
/// in the initial namespace (`pidns_ino` 0) every task has its pid there. Elsewhere the
/// kernel answers only for tasks whose own namespace is twtrace's: one outside it, or in a
/// namespace nested inside it, gets (0, 0).
#[inline(always)]
pub fn current_ids() -> (u32, u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let host = (pid_tgid >> 32) as u32;
    let ino = conf!(pidns_ino);
    if ino == 0 {
        return (host, pid_tgid as u32, host);
    }
    let dev = conf!(pidns_dev);
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    let size = core::mem::size_of::<bpf_pidns_info>() as u32;
    if unsafe { bpf_get_ns_current_pid_tgid(dev, ino, &mut ns, size) } != 0 {
        return (0, 0, host);
    }
    (ns.tgid, ns.pid, host)
}

/// Writes the current task into `t` (a map value or a record), comm included, in place.
#[inline(always)]
pub fn fill_task(t: &mut Task) {
    let (pid, tid, host_pid) = current_ids();
    t.pid = pid;
    t.tid = tid;
    t.host_pid = host_pid;
    t.uid = bpf_get_current_uid_gid() as u32;
    t.cgroup = unsafe { bpf_get_current_cgroup_id() };
    if unsafe { bpf_get_current_comm(t.comm.as_mut_ptr().cast(), COMM_LEN as u32) } != 0 {
        t.comm = [0; COMM_LEN];
    }
}

#[inline(always)]
pub fn clear_task(t: &mut Task) {
    t.pid = 0;
    t.tid = 0;
    t.uid = 0;
    t.host_pid = 0;
    t.cgroup = 0;
    t.comm = [0; COMM_LEN];
}

/// Whether the current task is twtrace itself, whose own traffic is not traced: its tgid in
/// twtrace's pid namespace is its `getpid()`.
#[inline(always)]
pub fn is_self() -> bool {
    current_ids().0 == conf!(self_pid)
}

/// Identity of a `sock_common`, read into `slot`'s scratch. `sport_be_off`, when not 0, is
/// where to read the big-endian local port: a full socket's `inet_sport` survives CLOSE, while
/// `skc_num` is zeroed when the port is released. One read of the block that holds every
/// `sock_common` field (userspace checks their offsets fit) costs about what one small read
/// does.
#[inline(never)]
pub fn read_conn(skc: u64, sport_be_off: u32, slot: Slot) -> Option<&'static mut Conn> {
    let s = scratch(slot)?;
    if unsafe { bpf_probe_read_kernel_buf(skc as *const u8, &mut s.block) }.is_err() {
        count(counter::READ_FAIL);
        return None;
    }
    let b = &s.block;
    let c = &mut s.conn;
    let family = u16_at(b, conf!(off.skc_family));
    c.family = family;
    c._pad = [0; 6];
    c.rport = u16::from_be(u16_at(b, conf!(off.skc_dport)));
    c.lport = if sport_be_off != 0 {
        u16::from_be(read::<u16>(skc + sport_be_off as u64)?)
    } else {
        u16_at(b, conf!(off.skc_num))
    };
    if family == AF_INET {
        c.raddr = [0; 16];
        c.laddr = [0; 16];
        copy_at(b, conf!(off.skc_daddr), &mut c.raddr, 4);
        copy_at(b, conf!(off.skc_rcv_saddr), &mut c.laddr, 4);
    } else if family == AF_INET6 {
        copy_at(b, conf!(off.skc_v6_daddr), &mut c.raddr, 16);
        copy_at(b, conf!(off.skc_v6_rcv_saddr), &mut c.laddr, 16);
    } else {
        return None;
    }
    let net: u64 = block_at(b, conf!(off.skc_net)).unwrap_or(0);
    c.netns = if net != 0 {
        read(net + conf!(off.net_inum) as u64).unwrap_or(0)
    } else {
        0
    };
    Some(c)
}

#[inline(always)]
fn u16_at(b: &[u8; SKC_BLOCK], off: u32) -> u16 {
    block_at(b, off).unwrap_or(0)
}

/// A value at `off` in a socket block; `None` past its end (userspace checks offsets fit).
#[inline(always)]
pub fn block_at<T: Copy>(b: &[u8; SKC_BLOCK], off: u32) -> Option<T> {
    let o = off as usize;
    if o + core::mem::size_of::<T>() <= SKC_BLOCK {
        Some(unsafe { core::ptr::read_unaligned(b.as_ptr().add(o) as *const T) })
    } else {
        None
    }
}

/// Copies `n` bytes (4 or 16) of an address from the block, register by register.
#[inline(always)]
fn copy_at(b: &[u8; SKC_BLOCK], off: u32, out: &mut [u8; 16], n: usize) {
    let o = off as usize;
    if n == 4 {
        if let Some(v) = block_at::<[u8; 4]>(b, off) {
            out[..4].copy_from_slice(&v);
        }
    } else if o + 16 <= SKC_BLOCK {
        let lo: u64 = block_at(b, off).unwrap_or(0);
        let hi: u64 = block_at(b, off + 8).unwrap_or(0);
        out[..8].copy_from_slice(&lo.to_ne_bytes());
        out[8..].copy_from_slice(&hi.to_ne_bytes());
    }
}

/// A field of the block [`read_conn`] last read into `slot`: a TIME_WAIT's cookie and substate
/// come with its addresses, in the same read.
#[inline(always)]
pub fn block_field<T: Copy>(slot: Slot, off: u32) -> Option<T> {
    block_at(&scratch(slot)?.block, off)
}

/// The key of a socket in `CONNS`: its cookie, which the helper assigns if the socket has
/// none and its TIME_WAIT copies; where tracing programs cannot call the helper (before
/// 5.12), [`conn_key`] of its connection, read into `slot`.
#[inline(always)]
pub fn sock_key(sk: *mut core::ffi::c_void, slot: Slot) -> Option<u64> {
    if has(feature::SOCKET_COOKIE) {
        Some(unsafe { bpf_get_socket_cookie(sk) })
    } else {
        read_conn(sk as u64, conf!(off.inet_sport), slot).map(|c| conn_key(c))
    }
}

/// The key of a TIME_WAIT whose block and connection `read_conn` just read into `slot`, and
/// the cookie to report for it (0 where the kernel programs cannot assign cookies: then
/// userspace knows it by its address, which stays put while it lives, and finds it by that
/// address again should a sock_diag dump such as `ss` give it a cookie meanwhile).
#[inline(always)]
pub fn tw_key(conn: &Conn, slot: Slot) -> (u64, u64) {
    let cookie = block_field(slot, conf!(off.skc_cookie)).unwrap_or(0);
    if has(feature::SOCKET_COOKIE) {
        (cookie, cookie)
    } else {
        (conn_key(conn), cookie)
    }
}

#[inline(always)]
fn port_in(port: u16, list: &[u16; twtrace_ebpf::MAX_PORT_FILTERS], n: u8) -> bool {
    let mut i = 0;
    while i < twtrace_ebpf::MAX_PORT_FILTERS {
        if i < n as usize && list[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// The filters that depend on the connection alone (netns, family, ports).
#[inline(always)]
pub fn conn_passes(c: &Conn) -> bool {
    let netns = conf!(filter.netns);
    if netns != 0 && c.netns != netns {
        return false;
    }
    let family = conf!(filter.family);
    if family != 0 && c.ip_family() != family {
        return false;
    }
    let n_l = conf!(filter.n_lports);
    if n_l != 0 && !port_in(c.lport, &conf!(filter.lports), n_l) {
        return false;
    }
    let n_r = conf!(filter.n_rports);
    if n_r != 0 && !port_in(c.rport, &conf!(filter.rports), n_r) {
        return false;
    }
    true
}

/// The filters on the closing task (pid, comm).
#[inline(always)]
pub fn task_passes(t: &Task) -> bool {
    let pid = conf!(filter.pid);
    if pid != 0 && t.pid != pid {
        return false;
    }
    let len = conf!(filter.comm_len) as usize;
    if len != 0 {
        let mut i = 0;
        while i < COMM_LEN {
            let want = unsafe { read_volatile(&CONFIG.filter.comm[i]) };
            if i < len && t.comm[i] != want {
                return false;
            }
            if i == len && len < COMM_LEN && t.comm[i] != 0 {
                return false;
            }
            i += 1;
        }
    }
    true
}

/// Builds, in `slot`'s scratch, the record of a connection the current task is closing (or
/// resetting) first; `flags` besides CLOSER_SET.
#[inline(always)]
pub fn closed_by_current(slot: Slot, role: u8, flags: u8) -> Option<&'static mut Closing> {
    let info = &mut scratch(slot)?.closing;
    init_closing(info, role);
    fill_task(&mut info.closer);
    info.close = close_kind::ACTIVE;
    info.flags = CLOSER_SET | flags;
    Some(info)
}

/// A closing record that knows nothing yet but the role.
#[inline(always)]
pub fn init_closing(info: &mut Closing, role: u8) {
    clear_task(&mut info.closer);
    info.conn = Conn::default();
    info.ts_ns = 0;
    info.role = role;
    info.close = close_kind::UNKNOWN;
    info.flags = 0;
    info.oldstate = 0;
    info._pad = 0;
}

#[inline(always)]
pub fn remember(key: u64, info: &Closing) {
    if CONNS.insert(key, info, 0).is_err() {
        count(counter::CONN_MAP_FAIL);
    }
}

#[inline(never)]
pub fn submit_no_tw(cookie: u64, conn: &Conn, info: &Closing, reason: NoTwReason, oldstate: u8) {
    if info.flags & IGNORED != 0 || !conn_passes(conn) || !task_passes(&info.closer) {
        return;
    }
    let Some(mut e) = EVENTS.reserve::<NoTw>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    // Field by field into the reserved record: a whole struct would be built on the stack.
    let r = e.as_mut_ptr();
    unsafe {
        (*r).hdr = header(EventKind::NoTw, now_ns());
        (*r).cookie = cookie;
        (*r).conn = *conn;
        (*r).closer = info.closer;
        (*r).role = info.role;
        (*r).close = info.close;
        (*r).reason = reason as u8;
        (*r).oldstate = oldstate;
        (*r)._pad = 0;
    }
    e.submit(wakeup_flags());
}

/// connect() or bind() failed for the current task; the task filters apply to it.
#[inline(always)]
pub fn submit_port_fail(conn: &Conn, op: u8, errno: i32) {
    let Some(mut e) = EVENTS.reserve::<PortFail>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let r = unsafe { &mut *e.as_mut_ptr() };
    fill_task(&mut r.task);
    if !task_passes(&r.task) {
        e.discard(0);
        return;
    }
    r.hdr = header(EventKind::PortFail, now_ns());
    r.conn = *conn;
    r.errno = errno;
    r.op = op;
    r._pad = [0; 3];
    e.submit(wakeup_flags());
}

/// A TIME_WAIT was pushed back or ended. `by`: the task that ended it, when one did.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn submit_update(
    kind: EventKind,
    ts: u64,
    cookie: u64,
    tw: u64,
    by: Option<&Task>,
    substate: u8,
    end: u8,
    timeout_jiffies: u32,
) {
    let Some(mut e) = EVENTS.reserve::<TwUpdate>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let r = unsafe { &mut *e.as_mut_ptr() };
    r.hdr = header(kind, ts);
    r.cookie = cookie;
    r.tw = tw;
    match by {
        Some(t) => r.by = *t,
        None => clear_task(&mut r.by),
    }
    r.substate = substate;
    r.end = end;
    r._pad = [0; 2];
    r.timeout_jiffies = timeout_jiffies;
    e.submit(wakeup_flags());
}
