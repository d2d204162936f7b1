//! twtrace's kernel programs (compiled for the BPF target only). BTF tracepoints only: this must run where kprobes and
//! fentry/fexit are unavailable.
//!
//! Two sources are joined by the socket cookie, which a TIME_WAIT socket copies from the socket
//! it replaces:
//! - `inet_sock_set_state` sees who closed first (ESTABLISHED->FIN_WAIT1 runs in the closer's
//!   close()/shutdown()) and, from the socket itself, whether it was accept()ed (see `role_of`).
//! - the timer tracepoints see the TIME_WAIT socket itself, through `tw->tw_timer`: start =
//!   entered (or pushed back), expire_entry = expired, cancel without either = killed early.
//!
//! A cancel cannot tell expiry, re-arm, reuse, SYN recycle and RST assassination apart on its
//! own: the first three are followed on the same CPU by the event that settles them
//! (expire_entry, start, or the listener arming a request socket's timer), a re-arm even under
//! the same lock. So such a cancel is parked in a per-CPU stash, with what its context says (the
//! cancelling task was connecting to the same peer: reuse), and settled by what follows; a stash
//! nothing settles is flushed by the next timer event on that CPU. Kills whose cause is plain at
//! cancel time (netns purge, a RST the TIME_WAIT just sent) are emitted at once.

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf, bpf_probe_read_user,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_task, bpf_get_smp_processor_id,
            bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_ns,
        },
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
    programs::TracePointContext,
};
use aya_log_ebpf::info;
use twtrace_ebpf::{
    AF_INET, AF_INET6, COMM_LEN, Closing, Config, Conn, EADDRINUSE, EADDRNOTAVAIL, EndReason,
    EventHeader, EventKind, NoTw, NoTwReason, OPEN_ATTRIBUTED, PortFail, SKC_BLOCK, Task, TwOpen,
    TwUpdate, close_kind,
    closing_flag::{CLOSED, CLOSER_SET, IGNORED, RST_RECEIVED, RST_SENT},
    counter, port_op, role, tcp_state,
};

/// Filled in by userspace at load time (offsets from BTF, addresses from kallsyms, filters).
#[unsafe(no_mangle)]
static CONFIG: Config = unsafe { core::mem::zeroed() };

/// Reads one field of [`CONFIG`]; volatile so the compiler keeps the load-time value.
macro_rules! conf {
    ($($field:tt)+) => {
        unsafe { read_volatile(&CONFIG.$($field)+) }
    };
}

/// Per-CPU LRU lists: no global lock shared by every CPU's connect() and close().
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Connections this host closed first (or reset), by socket cookie, from the close to the
/// TIME_WAIT or the CLOSE that settles them.
#[map]
static CONNS: LruHashMap<u64, Closing> = LruHashMap::with_max_entries(262_144, BPF_F_NO_COMMON_LRU);

/// Where `on_fin_wait1` builds the record it remembers (only `set_state` uses it, and the
/// kernel never nests a program within itself).
#[map]
static CLOSING: PerCpuArray<Closing> = PerCpuArray::with_max_entries(1, 0);

#[map]
static PERCPU: PerCpuArray<PerCpu> = PerCpuArray::with_max_entries(1, 0);

/// Where `read_conn` puts the block it reads (too big for the 512-byte BPF stack). One slot per
/// program: different programs can nest on a CPU (an interrupt during another program).
#[map]
static SCRATCH: PerCpuArray<[u8; SKC_BLOCK]> = PerCpuArray::with_max_entries(Slot::COUNT, 0);

#[derive(Clone, Copy)]
#[repr(u32)]
enum Slot {
    SetState = 0,
    SendReset = 1,
    TimerStart = 2,
    TimerCancel = 3,
    TimerExpire = 4,
    Bind = 5,
}

impl Slot {
    const COUNT: u32 = 6;
}

/// Passive closes (LAST_ACK->CLOSE) per network namespace: with the active closes (TIME_WAITs
/// and closes without one) they make "connections closed", which normalises rates.
#[map]
static PASSIVE_CLOSES: LruPerCpuHashMap<u32, u64> = LruPerCpuHashMap::with_max_entries(4096, 0);

/// bind() calls on TCP sockets in flight, by pid_tgid: what was asked, for the exit to report.
#[map]
static BINDS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(4096, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// A connect() older than this no longer explains a kill. From CLOSE->SYN_SENT to the port
/// search that may kill a TIME_WAIT takes microseconds.
const CONNECTING_MAX_NS: u64 = 10_000_000;
/// A stash nothing settled within this long is flushed by any timer event on its CPU.
const STASH_MAX_NS: u64 = 1_000_000;

#[repr(C)]
#[derive(Clone, Copy)]
struct PerCpu {
    /// Timer of a parked TIME_WAIT cancel; 0 when the stash is empty.
    timer: u64,
    tw: u64,
    cookie: u64,
    ts: u64,
    by: Task,
    conn: Conn,
    substate: u8,
    /// The cancelling task was connecting to this TIME_WAIT's peer: a kill here is a reuse.
    reuse: u8,
    _pad: [u8; 6],
    /// The TIME_WAIT socket that just sent a RST (tcp_send_reset), and when.
    rst_tw: u64,
    rst_ts: u64,
    /// The socket whose connect() just went CLOSE->SYN_SENT on this CPU, its task and when:
    /// right after, the port search may kill a TIME_WAIT towards the same peer (a reuse).
    connect_sk: u64,
    connect_task: u64,
    connect_ts: u64,
}

/// Waking the reader on every record costs an interrupt and a context switch per event, more
/// than the rest of a program. Wake it only once a batch has built up; it also drains on a
/// short timer, so quiet periods lose nothing but a little latency.
#[inline(always)]
fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= conf!(wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
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
fn load<T>(addr: u64) -> T {
    unsafe { read_volatile(addr as *const T) }
}

#[inline(always)]
fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn header(kind: EventKind, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u8,
        _pad: [0; 3],
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns,
    }
}

#[inline(always)]
fn current_task() -> Task {
    let pid_tgid = bpf_get_current_pid_tgid();
    Task {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: bpf_get_current_uid_gid() as u32,
        _pad: 0,
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    }
}

#[inline(always)]
fn is_self() -> bool {
    (bpf_get_current_pid_tgid() >> 32) as u32 == conf!(self_pid)
}

/// Identity of a `sock_common`. `sport_be_off`, when not 0, is where to read the big-endian
/// local port: a full socket's `inet_sport` survives CLOSE, while `skc_num` is zeroed when the
/// port is released. One read of the block that holds every `sock_common` field (userspace checks
/// their offsets fit) costs about what one small read does.
// Not inlined: its temporaries would otherwise share a frame with each caller's and overflow
// the 512-byte BPF stack.
#[inline(never)]
fn read_conn(skc: u64, sport_be_off: u32, slot: Slot) -> Option<Conn> {
    let b = unsafe { &mut *SCRATCH.get_ptr_mut(slot as u32)? };
    if unsafe { bpf_probe_read_kernel_buf(skc as *const u8, b) }.is_err() {
        count(counter::READ_FAIL);
        return None;
    }
    let u16_at = |off: u32| {
        let o = off as usize;
        if o + 2 <= SKC_BLOCK {
            u16::from_ne_bytes([b[o], b[o + 1]])
        } else {
            0
        }
    };
    let bytes_at = |off: u32, out: &mut [u8]| {
        let o = off as usize;
        if o + out.len() <= SKC_BLOCK {
            out.copy_from_slice(&b[o..o + out.len()]);
        }
    };
    let family = u16_at(conf!(off.skc_family));
    let mut c = Conn {
        family,
        rport: u16::from_be(u16_at(conf!(off.skc_dport))),
        ..Conn::default()
    };
    c.lport = if sport_be_off != 0 {
        u16::from_be(read::<u16>(skc + sport_be_off as u64)?)
    } else {
        u16_at(conf!(off.skc_num))
    };
    if family == AF_INET {
        bytes_at(conf!(off.skc_daddr), &mut c.raddr[..4]);
        bytes_at(conf!(off.skc_rcv_saddr), &mut c.laddr[..4]);
    } else if family == AF_INET6 {
        bytes_at(conf!(off.skc_v6_daddr), &mut c.raddr);
        bytes_at(conf!(off.skc_v6_rcv_saddr), &mut c.laddr);
    } else {
        return None;
    }
    let mut net = [0u8; 8];
    bytes_at(conf!(off.skc_net), &mut net);
    let net = u64::from_ne_bytes(net);
    if net != 0 {
        c.netns = read(net + conf!(off.net_inum) as u64).unwrap_or(0);
    }
    Some(c)
}

/// A field of the block [`read_conn`] last read into `slot`: a TIME_WAIT's cookie and substate
/// come with its addresses, in the same read.
#[inline(always)]
fn block_field<T: Copy>(slot: Slot, off: u32) -> Option<T> {
    let b = unsafe { &*SCRATCH.get_ptr(slot as u32)? };
    let o = off as usize;
    if o + core::mem::size_of::<T>() <= SKC_BLOCK {
        Some(unsafe { core::ptr::read_unaligned(b.as_ptr().add(o) as *const T) })
    } else {
        None
    }
}

/// The cookie and substate of the TIME_WAIT `read_conn` just read into `slot`.
#[inline(always)]
fn tw_identity(tw: u64, slot: Slot) -> (u64, u8) {
    let cookie = block_field(slot, conf!(off.skc_cookie)).unwrap_or(0);
    let substate = match block_field(slot, conf!(off.tw_substate)) {
        Some(s) => s,
        None => read(tw + conf!(off.tw_substate) as u64).unwrap_or(0),
    };
    (cookie, substate)
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
fn conn_passes(c: &Conn) -> bool {
    let netns = conf!(filter.netns);
    if netns != 0 && c.netns != netns {
        return false;
    }
    let family = conf!(filter.family);
    if family != 0 && c.family != family {
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
fn task_passes(t: &Task) -> bool {
    let pid = conf!(filter.pid);
    if pid != 0 && t.pid != pid {
        return false;
    }
    let len = conf!(filter.comm_len) as usize;
    if len != 0 {
        let want = conf!(filter.comm);
        let mut i = 0;
        while i < COMM_LEN {
            if i < len && t.comm[i] != want[i] {
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

#[inline(never)]
fn submit_no_tw(cookie: u64, conn: &Conn, info: &Closing, reason: NoTwReason, oldstate: u8) {
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

#[inline(never)]
fn connect_failed(skc: u64) {
    let Some(conn) = read_conn(skc, 0, Slot::SetState) else {
        return;
    };
    let task = current_task();
    if conn_passes(&conn) && task_passes(&task) {
        submit_port_fail(&conn, &task, port_op::CONNECT, EADDRNOTAVAIL);
    }
}

#[inline(always)]
fn submit_port_fail(conn: &Conn, task: &Task, op: u8, errno: i32) {
    let Some(mut e) = EVENTS.reserve::<PortFail>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let r = e.as_mut_ptr();
    unsafe {
        (*r).hdr = header(EventKind::PortFail, now_ns());
        (*r).conn = *conn;
        (*r).task = *task;
        (*r).errno = errno;
        (*r).op = op;
        (*r)._pad = [0; 3];
    }
    e.submit(wakeup_flags());
}

// --- bind() ----------------------------------------------------------------------------------

/// Remembers a bind() on a TCP socket: the address asked for and the socket's netns.
#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    let (fd_off, addr_off) = (
        conf!(off.tp_bind_fd) as usize,
        conf!(off.tp_bind_addr) as usize,
    );
    let fd: u64 = unsafe { ctx.read_at(fd_off) }.unwrap_or(u64::MAX);
    let uaddr: u64 = unsafe { ctx.read_at(addr_off) }.unwrap_or(0);
    if uaddr == 0 || is_self() {
        return 0;
    }
    let Some(sk) = tcp_sock_of_fd(fd) else {
        return 0;
    };
    let Some(mut conn) = read_conn(sk, 0, Slot::Bind) else {
        return 0;
    };
    // What was asked: sockaddr_in / sockaddr_in6 in user memory.
    let Ok(family) = (unsafe { bpf_probe_read_user((uaddr) as *const u16) }) else {
        return 0;
    };
    let Ok(port_be) = (unsafe { bpf_probe_read_user((uaddr + 2) as *const u16) }) else {
        return 0;
    };
    conn.family = family;
    conn.lport = u16::from_be(port_be);
    conn.laddr = [0; 16];
    conn.raddr = [0; 16];
    conn.rport = 0;
    if family == AF_INET {
        if let Ok(a) = unsafe { bpf_probe_read_user((uaddr + 4) as *const [u8; 4]) } {
            conn.laddr[..4].copy_from_slice(&a);
        }
    } else if family == AF_INET6 {
        if let Ok(a) = unsafe { bpf_probe_read_user((uaddr + 8) as *const [u8; 16]) } {
            conn.laddr = a;
        }
    } else {
        return 0;
    }
    let _ = BINDS.insert(bpf_get_current_pid_tgid(), conn, 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(conn) = (unsafe { BINDS.get(key) }).copied() else {
        return 0;
    };
    let _ = BINDS.remove(key);
    let ret_off = conf!(off.tp_exit_ret) as usize;
    let ret: i64 = unsafe { ctx.read_at(ret_off) }.unwrap_or(0);
    if ret == -(EADDRINUSE as i64) {
        let task = current_task();
        if conn_passes(&conn) && task_passes(&task) {
            submit_port_fail(&conn, &task, port_op::BIND, EADDRINUSE);
        }
    }
    0
}

/// The TCP socket behind the current task's file descriptor `fd`, if it is one.
#[inline(always)]
fn tcp_sock_of_fd(fd: u64) -> Option<u64> {
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + conf!(off.task_files) as u64)?;
    let fdt: u64 = read(files + conf!(off.files_fdt) as u64)?;
    let max: u32 = read(fdt + conf!(off.fdtable_max_fds) as u64)?;
    if fd >= max as u64 {
        return None;
    }
    let fds: u64 = read(fdt + conf!(off.fdtable_fd) as u64)?;
    let file: u64 = read(fds + fd * 8)?;
    if file == 0 {
        return None;
    }
    let sock: u64 = read(file + conf!(off.file_private_data) as u64)?;
    // A socket's file points back at it; anything else is not a socket.
    if sock == 0 || read::<u64>(sock + conf!(off.socket_file) as u64)? != file {
        return None;
    }
    let sk: u64 = read(sock + conf!(off.socket_sk) as u64)?;
    if sk == 0 || read::<u16>(sk + conf!(off.sk_protocol) as u64)? != 6 {
        return None;
    }
    Some(sk)
}

#[inline(always)]
fn new_conn_info(role: u8) -> Closing {
    Closing {
        closer: Task::default(),
        conn: Conn::default(),
        ts_ns: 0,
        role,
        close: close_kind::UNKNOWN,
        flags: 0,
        oldstate: 0,
        _pad: 0,
    }
}

/// Whether this host is the connection's server. An accept()ed socket is a clone of its
/// listener and keeps its accept backlog size; a socket that connect()ed never listened. Read
/// when the connection closes, so opening a connection costs no map update (and connections
/// opened before twtrace started have a role too). A listener with a backlog of 0 makes clients.
#[inline(always)]
fn role_of(skc: u64) -> u8 {
    if load::<u32>(skc + conf!(off.sk_max_ack_backlog) as u64) != 0 {
        role::SERVER
    } else {
        role::CLIENT
    }
}

/// A connection the current task is closing (or resetting) first; `flags` besides CLOSER_SET.
#[inline(always)]
fn closed_by_current(skc: u64, flags: u8) -> Closing {
    let mut info = new_conn_info(role_of(skc));
    info.closer = current_task();
    info.close = close_kind::ACTIVE;
    info.flags = CLOSER_SET | flags;
    info
}

#[inline(always)]
fn remember(cookie: u64, info: &Closing) {
    if CONNS.insert(cookie, info, 0).is_err() {
        count(counter::CONN_MAP_FAIL);
    }
}

// --- connection states -----------------------------------------------------------------------

/// One program for every transition. Each program attached here runs on every state change
/// of every TCP socket, and on this kind of machine a run costs about as much as the work of a
/// short one, so a single program keeps the per-connection cost down. What it gives up: a
/// softirq transition that interrupts a process-context run on the same CPU is skipped by the
/// kernel (a recursion miss, counted and shown). The TIME_WAIT itself is seen by the timer
/// programs, so such a miss costs at most a closer or a role.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn set_state(ctx: BtfTracePointContext) -> i32 {
    use tcp_state::*;
    let sk: *mut c_void = ctx.arg(0);
    let oldstate: i32 = ctx.arg(1);
    let newstate: i32 = ctx.arg(2);
    let (old, new) = (oldstate as u8, newstate as u8);
    if new == CLOSE
        || new == FIN_WAIT1
        || (old, new) == (CLOSE, SYN_SENT)
        || (old, new) == (FIN_WAIT1, CLOSING)
    {
        on_set_state(sk, old, new);
    }
    0
}

#[inline(always)]
fn on_set_state(sk: *mut c_void, old: u8, new: u8) {
    use tcp_state::*;
    if sk.is_null() {
        return;
    }
    let skc = sk as u64;
    if load::<u16>(skc + conf!(off.sk_protocol) as u64) != 6 {
        return;
    }
    if (old, new) == (LAST_ACK, CLOSE) {
        // The passive side: it never closed first, so nothing of it was remembered.
        count_passive_close(skc);
        return;
    }
    if (old, new) == (CLOSE, SYN_SENT) {
        if let Some(p) = PERCPU.get_ptr_mut(0) {
            unsafe {
                (*p).connect_sk = skc;
                (*p).connect_task = bpf_get_current_pid_tgid();
                (*p).connect_ts = now_ns();
            }
        }
        return;
    }
    // The helper assigns a cookie if the socket has none; the TIME_WAIT socket copies it.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    match (old, new) {
        (FIN_WAIT1, CLOSING) => {
            if let Some(info) = CONNS.get_ptr_mut(cookie) {
                unsafe { (*info).close = close_kind::SIMULTANEOUS };
            }
        }
        (_, FIN_WAIT1) => on_fin_wait1(skc, cookie),
        (SYN_SENT, CLOSE) => {
            // connect() found no local port: the port search (inet_hash_connect) failed before
            // one was assigned, and the socket goes back to CLOSE still without one.
            if read::<u16>(skc + conf!(off.inet_sport) as u64) == Some(0) && !is_self() {
                connect_failed(skc);
            }
            on_close(skc, cookie, old);
        }
        (_, CLOSE) => on_close(skc, cookie, old),
        _ => {}
    }
}

/// close() or shutdown(): process context, the current task is the closer. Its own frame: the
/// record it builds would not fit beside `on_close`'s on one BPF stack.
#[inline(never)]
fn on_fin_wait1(skc: u64, cookie: u64) {
    if is_self() {
        let mut info = new_conn_info(role::UNKNOWN);
        info.flags = CLOSER_SET | IGNORED;
        remember(cookie, &info);
        return;
    }
    // The connection and the time let userspace find its TIME_WAIT should the kernel run no
    // program where it starts. Filtered out here, it is never remembered.
    let Some(conn) = read_conn(skc, conf!(off.inet_sport), Slot::SetState) else {
        return;
    };
    if !conn_passes(&conn) {
        return;
    }
    // Built in place: a second copy would not fit on the BPF stack.
    let Some(p) = CLOSING.get_ptr_mut(0) else {
        return;
    };
    let info = unsafe { &mut *p };
    info.closer = current_task();
    if !task_passes(&info.closer) {
        return;
    }
    info.conn = conn;
    info.ts_ns = now_ns();
    info.role = role_of(skc);
    info.close = close_kind::ACTIVE;
    info.flags = CLOSER_SET;
    info.oldstate = 0;
    let info: &Closing = info;
    // Usually new; one lookup only when a RST was seen first.
    if CONNS.insert(cookie, info, BPF_NOEXIST).is_err() {
        match CONNS.get_ptr_mut(cookie) {
            Some(old) => unsafe {
                if (*old).flags & CLOSER_SET == 0 {
                    (*old).closer = info.closer;
                    (*old).close = close_kind::ACTIVE;
                    (*old).flags |= CLOSER_SET;
                }
                (*old).conn = conn;
                (*old).ts_ns = info.ts_ns;
            },
            None => count(counter::CONN_MAP_FAIL),
        }
    }
}

/// `BPF_MAP_UPDATE_ELEM` flag: only if the key is new.
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn on_close(skc: u64, cookie: u64, old: u8) {
    use tcp_state::*;
    let Some(info) = CONNS.get_ptr_mut(cookie) else {
        // Untracked connection reset by close() (SO_LINGER 0, unread data): the RST follows
        // this state change, so remember the closer for tcp_send_reset.
        if matches!(old, ESTABLISHED | SYN_RECV | FIN_WAIT1) && !is_self() {
            let mut info = closed_by_current(skc, CLOSED);
            info.oldstate = old;
            remember(cookie, &info);
        }
        return;
    };
    let mut i = unsafe { *info };
    let closed_first = i.flags & CLOSER_SET != 0;
    let finish = |reason: NoTwReason, i: &Closing| {
        if let Some(conn) = read_conn(skc, conf!(off.inet_sport), Slot::SetState) {
            submit_no_tw(cookie, &conn, i, reason, old);
        }
        let _ = CONNS.remove(cookie);
    };
    if i.flags & RST_SENT != 0
        && matches!(
            old,
            ESTABLISHED | SYN_RECV | FIN_WAIT1 | FIN_WAIT2 | CLOSING
        )
    {
        if !closed_first {
            i.closer = current_task();
            i.close = close_kind::ACTIVE;
        }
        finish(NoTwReason::Abort, &i);
    } else if closed_first && i.flags & RST_RECEIVED != 0 {
        finish(NoTwReason::PeerReset, &i);
    } else if closed_first && matches!(old, FIN_WAIT2 | CLOSING) && tw_buckets_full(skc) {
        finish(NoTwReason::Overflow, &i);
    } else if matches!(
        old,
        ESTABLISHED | SYN_RECV | FIN_WAIT1 | FIN_WAIT2 | CLOSING
    ) {
        // A RST may follow (tcp_close with unread data, SO_LINGER 0, TCP_LINGER2 < 0).
        if !closed_first {
            if is_self() {
                let _ = CONNS.remove(cookie);
                return;
            }
            i.closer = current_task();
            i.close = close_kind::ACTIVE;
            i.flags |= CLOSER_SET;
        }
        i.flags |= CLOSED;
        i.oldstate = old;
        unsafe { *info = i };
    } else {
        let _ = CONNS.remove(cookie);
    }
}

#[inline(never)]
fn count_passive_close(skc: u64) {
    let net: u64 = load(skc + conf!(off.skc_net) as u64);
    if net == 0 {
        return;
    }
    let netns: u32 = load(net + conf!(off.net_inum) as u64);
    let f = conf!(filter.netns);
    if f != 0 && f != netns {
        return;
    }
    match PASSIVE_CLOSES.get_ptr_mut(netns) {
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = PASSIVE_CLOSES.insert(netns, 1u64, 0);
        }
    }
}

/// The test `inet_twsk_alloc` makes before giving up on a TIME_WAIT (`refs - 1 >= max`).
#[inline(always)]
fn tw_buckets_full(skc: u64) -> bool {
    let net: u64 = load(skc + conf!(off.skc_net) as u64);
    if net == 0 {
        return false;
    }
    let refs: i32 = load(net + conf!(off.net_tw_refcount) as u64);
    let max: i32 = load(net + conf!(off.net_max_tw_buckets) as u64);
    refs > max
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let skc = sk as u64;
    let state: u8 = load(skc + conf!(off.skc_state) as u64);
    if state == tcp_state::TIME_WAIT {
        // A TIME_WAIT answering a SYN or data with a RST is killed right after, on this CPU.
        if let Some(p) = PERCPU.get_ptr_mut(0) {
            unsafe {
                (*p).rst_tw = skc;
                (*p).rst_ts = now_ns();
            }
        }
        return 0;
    }
    // LAST_ACK: the passive side, whose CLOSE reports nothing.
    if state == tcp_state::NEW_SYN_RECV
        || state == tcp_state::LISTEN
        || state == tcp_state::LAST_ACK
    {
        return 0;
    }
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    match CONNS.get_ptr_mut(cookie) {
        Some(info) => {
            let i = unsafe { *info };
            if i.flags & CLOSED != 0 {
                // The state went to CLOSE first (tcp_close, tcp_disconnect): an abort.
                if let Some(conn) = read_conn(skc, conf!(off.inet_sport), Slot::SendReset) {
                    submit_no_tw(cookie, &conn, &i, NoTwReason::Abort, i.oldstate);
                }
                let _ = CONNS.remove(cookie);
            } else {
                unsafe { (*info).flags |= RST_SENT };
            }
        }
        None => {
            // A connection twtrace never saw opening or closing, reset before CLOSE.
            if is_self() {
                return 0;
            }
            remember(cookie, &closed_by_current(skc, RST_SENT));
        }
    }
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: BtfTracePointContext) -> i32 {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let cookie: u64 = read(sk as u64 + conf!(off.skc_cookie) as u64).unwrap_or(0);
    if cookie != 0
        && let Some(info) = CONNS.get_ptr_mut(cookie)
    {
        unsafe { (*info).flags |= RST_RECEIVED };
    }
    0
}

// --- TIME_WAIT sockets, through their timer --------------------------------------------------

#[btf_tracepoint(function = "timer_start")]
pub fn timer_start(ctx: BtfTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    let Some(func) = timer_function(timer) else {
        return 0;
    };
    if func == conf!(tw_timer_handler) {
        on_tw_start(&ctx, timer);
    } else if func == conf!(reqsk_timer_handler) {
        on_reqsk_start(timer);
    } else {
        flush_stale_stash();
    }
    0
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel(ctx: BtfTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    match timer_function(timer) {
        Some(f) if f == conf!(tw_timer_handler) => on_tw_cancel(timer),
        Some(_) => flush_stale_stash(),
        None => {}
    }
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    match timer_function(timer) {
        Some(f) if f == conf!(tw_timer_handler) => on_tw_expire(&ctx, timer),
        Some(_) => flush_stale_stash(),
        None => {}
    }
    0
}

/// The timer's callback: the first thing every timer program reads, for every kernel timer.
#[inline(always)]
fn timer_function(timer: u64) -> Option<u64> {
    if timer == 0 {
        return None;
    }
    Some(load(timer + conf!(off.timer_function) as u64))
}

#[inline(always)]
fn tw_of(timer: u64) -> u64 {
    timer - conf!(off.tw_timer) as u64
}

#[inline(always)]
fn timer_left(timer: u64) -> u32 {
    // `timer` is the tracepoint's `struct timer_list *`: a plain load, like its callback.
    let expires: u64 = load(timer + conf!(off.timer_expires) as u64);
    let now = unsafe { bpf_jiffies64() };
    expires.saturating_sub(now) as u32
}

#[inline(always)]
fn on_tw_start<C: EbpfContext>(ctx: &C, timer: u64) {
    let tw = tw_of(timer);
    let Some(conn) = read_conn(tw, 0, Slot::TimerStart) else {
        return;
    };
    let (cookie, substate) = tw_identity(tw, Slot::TimerStart);
    let Some(p) = PERCPU.get_ptr_mut(0) else {
        return;
    };
    let stash = unsafe { &mut *p };
    if stash.timer == timer && stash.cookie == cookie {
        // cancel + start of the same timer: pushed back (mod_timer_pending). The cancel
        // parked it only if it passed the filters.
        stash.timer = 0;
        submit_update(
            EventKind::TwResched,
            stash.ts,
            cookie,
            tw,
            &stash.by,
            substate,
            0,
            timer_left(timer),
        );
        return;
    }
    flush_stash(stash);
    if !conn_passes(&conn) {
        return;
    }
    let (info, flags, remembered) = match (unsafe { CONNS.get(cookie) }).copied() {
        Some(info) if cookie != 0 => {
            let attributed = if info.flags & CLOSER_SET != 0 {
                OPEN_ATTRIBUTED
            } else {
                0
            };
            (info, attributed, true)
        }
        _ => (new_conn_info(role::UNKNOWN), 0, false),
    };
    if info.flags & IGNORED != 0 || !task_passes(&info.closer) {
        if remembered {
            let _ = CONNS.remove(cookie);
        }
        return;
    }
    let close =
        if info.close == close_kind::UNKNOWN && substate == tcp_state::TIME_WAIT && flags != 0 {
            close_kind::ACTIVE
        } else {
            info.close
        };
    let Some(mut e) = EVENTS.reserve::<TwOpen>(0) else {
        // The connection stays remembered: userspace's sweep finds this TIME_WAIT by it.
        count(counter::RINGBUF_FULL);
        return;
    };
    if remembered {
        // Its job is done: the closing socket's CLOSE, next, has nothing left to report.
        let _ = CONNS.remove(cookie);
    }
    let r = e.as_mut_ptr();
    unsafe {
        (*r).hdr = header(EventKind::TwEnter, now_ns());
        (*r).cookie = cookie;
        (*r).tw = tw;
        (*r).conn = conn;
        (*r).closer = info.closer;
        (*r).role = info.role;
        (*r).close = close;
        (*r).substate = substate;
        (*r).flags = flags;
        (*r).timeout_jiffies = timer_left(timer);
    }
    e.submit(wakeup_flags());
    if conf!(verbose) != 0 {
        info!(
            ctx,
            "tw enter cookie={} lport={} rport={} pid={}",
            cookie,
            conn.lport,
            conn.rport,
            info.closer.pid
        );
    }
}

#[inline(always)]
fn on_tw_cancel(timer: u64) {
    let tw = tw_of(timer);
    let Some(p) = PERCPU.get_ptr_mut(0) else {
        return;
    };
    let stash = unsafe { &mut *p };
    flush_stash(stash);
    // Taken before the filters: a mark left by a TIME_WAIT that is filtered out would
    // otherwise outlive it, and the next TIME_WAIT at its address would look reset.
    let marked = stash.rst_tw == tw;
    if marked {
        stash.rst_tw = 0;
    }
    let reset = marked && now_ns().wrapping_sub(stash.rst_ts) < STASH_MAX_NS;
    let Some(conn) = read_conn(tw, 0, Slot::TimerCancel) else {
        return;
    };
    if !conn_passes(&conn) {
        return;
    }
    let (cookie, substate) = tw_identity(tw, Slot::TimerCancel);
    let ts = now_ns();
    // Only a reuse names who ended it; in softirq the current task is whoever was interrupted.
    let by = Task::default();
    // Causes that are plain now.
    if netns_dying(Slot::TimerCancel) {
        submit_update(
            EventKind::TwEnd,
            ts,
            cookie,
            tw,
            &by,
            substate,
            EndReason::Purged as u8,
            0,
        );
        return;
    }
    if reset {
        submit_update(
            EventKind::TwEnd,
            ts,
            cookie,
            tw,
            &by,
            substate,
            EndReason::Reset as u8,
            0,
        );
        return;
    }
    // Expiry, re-arm, reuse by connect(), SYN recycle or RST assassination: settled by what
    // follows. A re-arm in softirq on top of a task that just connected to the same peer looks
    // like a reuse until its timer_start arrives, so even a reuse waits for the next event.
    stash.timer = timer;
    stash.tw = tw;
    stash.cookie = cookie;
    stash.ts = ts;
    stash.conn = conn;
    stash.substate = substate;
    stash.reuse = reused_by_current_connect(stash, &conn, ts) as u8;
    stash.by = if stash.reuse != 0 { current_task() } else { by };
}

#[inline(always)]
fn on_tw_expire<C: EbpfContext>(ctx: &C, timer: u64) {
    let tw = tw_of(timer);
    let Some(p) = PERCPU.get_ptr_mut(0) else {
        return;
    };
    let stash = unsafe { &mut *p };
    if stash.timer != timer {
        // Not parked by a cancel of ours (filtered out, or the cancel was missed).
        flush_stash(stash);
        let Some(conn) = read_conn(tw, 0, Slot::TimerExpire) else {
            return;
        };
        if !conn_passes(&conn) {
            return;
        }
        let (cookie, substate) = tw_identity(tw, Slot::TimerExpire);
        submit_update(
            EventKind::TwEnd,
            now_ns(),
            cookie,
            tw,
            &Task::default(),
            substate,
            EndReason::Expired as u8,
            0,
        );
        return;
    }
    stash.timer = 0;
    submit_update(
        EventKind::TwEnd,
        stash.ts,
        stash.cookie,
        tw,
        &Task::default(),
        stash.substate,
        EndReason::Expired as u8,
        0,
    );
    if conf!(verbose) != 0 {
        info!(ctx, "tw expired cookie={}", stash.cookie);
    }
}

/// A listener arming a request socket's timer right after a TIME_WAIT on the same 4-tuple was
/// killed in this softirq: the SYN recycled it.
#[inline(always)]
fn on_reqsk_start(timer: u64) {
    let Some(p) = PERCPU.get_ptr_mut(0) else {
        return;
    };
    let stash = unsafe { &mut *p };
    if stash.timer == 0 {
        return;
    }
    let req = timer - conf!(off.rsk_timer) as u64;
    let Some(c) = read_conn(req, 0, Slot::TimerStart) else {
        flush_stale_stash();
        return;
    };
    let s = &stash.conn;
    if c.netns == s.netns
        && c.lport == s.lport
        && c.rport == s.rport
        && c.raddr == s.raddr
        && c.laddr == s.laddr
    {
        stash.timer = 0;
        submit_update(
            EventKind::TwEnd,
            stash.ts,
            stash.cookie,
            stash.tw,
            &stash.by,
            stash.substate,
            EndReason::Recycled as u8,
            0,
        );
    } else {
        flush_stash(stash);
    }
}

/// Emits a parked cancel that nothing settled: the TIME_WAIT was killed, by the connect() it
/// was parked with, or else by a RST it received.
#[inline(always)]
fn flush_stash(stash: &mut PerCpu) {
    if stash.timer != 0 {
        stash.timer = 0;
        let end = if stash.reuse != 0 {
            EndReason::Reused
        } else {
            EndReason::Reset
        };
        submit_update(
            EventKind::TwEnd,
            stash.ts,
            stash.cookie,
            stash.tw,
            &stash.by,
            stash.substate,
            end as u8,
            0,
        );
    }
}

/// Called on timer events that are not a parked TIME_WAIT's own. A re-arm's timer_start comes
/// right after its cancel (same lock, interrupts off), so anything else settles a parked reuse
/// at once. An expiry's expire_entry may be preceded by a hard interrupt's timers, so other
/// parked cancels wait a little.
#[inline(always)]
fn flush_stale_stash() {
    if let Some(p) = PERCPU.get_ptr_mut(0) {
        let stash = unsafe { &mut *p };
        if stash.timer != 0 && (stash.reuse != 0 || now_ns().wrapping_sub(stash.ts) > STASH_MAX_NS)
        {
            flush_stash(stash);
        }
    }
}

/// Whether the netns of the socket `read_conn` just read into `slot` is being torn down.
#[inline(always)]
fn netns_dying(slot: Slot) -> bool {
    match block_field::<u64>(slot, conf!(off.skc_net)) {
        Some(net) if net != 0 => read::<i32>(net + conf!(off.net_ns_refcount) as u64) == Some(0),
        _ => false,
    }
}

/// Whether this CPU's task is inside a connect() to the same peer as the TIME_WAIT `tw`.
#[inline(always)]
fn reused_by_current_connect(stash: &PerCpu, tw: &Conn, now: u64) -> bool {
    if stash.connect_sk == 0
        || stash.connect_task != bpf_get_current_pid_tgid()
        || now.wrapping_sub(stash.connect_ts) > CONNECTING_MAX_NS
    {
        return false;
    }
    // The connecting socket is alive (we are inside its connect()); its source port may not
    // be chosen yet, its destination is.
    match read_conn(stash.connect_sk, 0, Slot::TimerCancel) {
        Some(c) => {
            c.netns == tw.netns
                && c.family == tw.family
                && c.rport == tw.rport
                && c.raddr == tw.raddr
        }
        None => false,
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn submit_update(
    kind: EventKind,
    ts: u64,
    cookie: u64,
    tw: u64,
    by: &Task,
    substate: u8,
    end: u8,
    timeout_jiffies: u32,
) {
    let Some(mut e) = EVENTS.reserve::<TwUpdate>(0) else {
        count(counter::RINGBUF_FULL);
        return;
    };
    let r = e.as_mut_ptr();
    unsafe {
        (*r).hdr = header(kind, ts);
        (*r).cookie = cookie;
        (*r).tw = tw;
        (*r).by = *by;
        (*r).substate = substate;
        (*r).end = end;
        (*r)._pad = [0; 2];
        (*r).timeout_jiffies = timeout_jiffies;
    }
    e.submit(wakeup_flags());
}

// --- the hooks alone ------------------------------------------------------------------------
// Never attached by twtrace: the bench attaches these in place of the programs above, on the
// same tracepoints, to measure what the hooks cost before any program does work.

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn empty_sys_enter_bind(_ctx: TracePointContext) -> u32 {
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn empty_sys_exit_bind(_ctx: TracePointContext) -> u32 {
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn empty_set_state(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn empty_tcp_send_reset(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn empty_tcp_receive_reset(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_start")]
pub fn empty_timer_start(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn empty_timer_cancel(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn empty_timer_expire_entry(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
