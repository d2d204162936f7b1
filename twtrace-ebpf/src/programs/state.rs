//! `inet_sock_set_state`: who closed first, whether it was a client or a server, closes that
//! left no TIME_WAIT, connects that found no port, and passive closes.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use twtrace_ebpf::{
    EADDRNOTAVAIL, NoTwReason, close_kind,
    closing_flag::{CLOSED, CLOSER_SET, IGNORED, RST_RECEIVED, RST_SENT},
    counter, feature, port_op, role, tcp_state,
};

use super::{
    common::{
        CONNS, PASSIVE_CLOSES, Slot, closed_by_current, conf, conn_passes, count, fill_task, has,
        init_closing, is_self, load, now_ns, read, read_conn, remember, scratch, sock_key,
        submit_no_tw, submit_port_fail, task_passes,
    },
    timer::note_connect,
};

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
        note_connect(skc, bpf_get_current_pid_tgid());
        return;
    }
    let Some(key) = sock_key(sk, Slot::SetState) else {
        return;
    };
    match (old, new) {
        (FIN_WAIT1, CLOSING) => {
            if let Some(info) = CONNS.get_ptr_mut(key) {
                unsafe { (*info).close = close_kind::SIMULTANEOUS };
            }
        }
        (_, FIN_WAIT1) => on_fin_wait1(sk, key),
        (SYN_SENT, CLOSE) => {
            // connect() found no local port: the port search (inet_hash_connect) failed before
            // one was assigned, and the socket goes back to CLOSE still without one.
            if read::<u16>(skc + conf!(off.inet_sport) as u64) == Some(0) && !is_self() {
                connect_failed(skc);
            }
            on_close(skc, key, old);
        }
        (_, CLOSE) => on_close(skc, key, old),
        _ => {}
    }
}

/// The cookie a NoTw record reports: the key itself where it is one.
#[inline(always)]
pub fn reported_cookie(sk: u64, key: u64) -> u64 {
    if has(feature::SOCKET_COOKIE) {
        key
    } else {
        read(sk + conf!(off.skc_cookie) as u64).unwrap_or(0)
    }
}

#[inline(never)]
fn connect_failed(skc: u64) {
    if let Some(conn) = read_conn(skc, 0, Slot::SetState)
        && conn_passes(conn)
    {
        submit_port_fail(conn, port_op::CONNECT, EADDRNOTAVAIL);
    }
}

/// close() or shutdown(): process context, the current task is the closer.
#[inline(never)]
fn on_fin_wait1(sk: *mut c_void, key: u64) {
    let skc = sk as u64;
    let Some(s) = scratch(Slot::SetState) else {
        return;
    };
    if is_self() {
        let info = &mut s.closing;
        init_closing(info, role::UNKNOWN);
        info.flags = CLOSER_SET | IGNORED;
        remember(key, info);
        return;
    }
    // The connection and the time let userspace find its TIME_WAIT should the kernel run no
    // program where it starts. Filtered out here, it is never remembered.
    let Some(conn) = read_conn(skc, conf!(off.inet_sport), Slot::SetState) else {
        return;
    };
    if !conn_passes(conn) {
        return;
    }
    let info = &mut s.closing;
    init_closing(info, role_of(skc));
    fill_task(&mut info.closer);
    if !task_passes(&info.closer) {
        return;
    }
    info.conn = s.conn;
    info.ts_ns = now_ns();
    info.close = close_kind::ACTIVE;
    info.flags = CLOSER_SET;
    let info = &s.closing;
    // Usually new; one lookup only when a RST was seen first.
    if CONNS.insert(key, info, BPF_NOEXIST).is_err() {
        match CONNS.get_ptr_mut(key) {
            Some(old) => unsafe {
                if (*old).flags & CLOSER_SET == 0 {
                    (*old).closer = info.closer;
                    (*old).close = close_kind::ACTIVE;
                    (*old).flags |= CLOSER_SET;
                }
                (*old).conn = info.conn;
                (*old).ts_ns = info.ts_ns;
            },
            None => count(counter::CONN_MAP_FAIL),
        }
    }
}

/// `BPF_MAP_UPDATE_ELEM` flag: only if the key is new.
const BPF_NOEXIST: u64 = 1;

/// Whether this host is the connection's server. An accept()ed socket is a clone of its
/// listener and keeps its accept backlog size; a socket that connect()ed never listened. Read
/// when the connection closes, so opening a connection costs no map update (and connections
/// opened before twtrace started have a role too). A listener with a backlog of 0 makes clients.
#[inline(always)]
pub fn role_of(skc: u64) -> u8 {
    if load::<u32>(skc + conf!(off.sk_max_ack_backlog) as u64) != 0 {
        role::SERVER
    } else {
        role::CLIENT
    }
}

/// Reports a close that left no TIME_WAIT and forgets the connection.
#[inline(never)]
fn finish(skc: u64, key: u64, reason: NoTwReason, old: u8) {
    if let Some(info) = CONNS.get_ptr(key)
        && let Some(conn) = read_conn(skc, conf!(off.inet_sport), Slot::SetState)
    {
        submit_no_tw(
            reported_cookie(skc, key),
            conn,
            unsafe { &*info },
            reason,
            old,
        );
    }
    let _ = CONNS.remove(key);
}

#[inline(always)]
fn on_close(skc: u64, key: u64, old: u8) {
    use tcp_state::*;
    let Some(p) = CONNS.get_ptr_mut(key) else {
        // Untracked connection reset by close() (SO_LINGER 0, unread data): the RST follows
        // this state change, so remember the closer for tcp_send_reset.
        if matches!(old, ESTABLISHED | SYN_RECV | FIN_WAIT1)
            && !is_self()
            && let Some(info) = closed_by_current(Slot::SetState, role_of(skc), CLOSED)
        {
            info.oldstate = old;
            remember(key, info);
        }
        return;
    };
    // In place: the map value is this program's to change until it is removed.
    let i = unsafe { &mut *p };
    let closed_first = i.flags & CLOSER_SET != 0;
    let live = matches!(
        old,
        ESTABLISHED | SYN_RECV | FIN_WAIT1 | FIN_WAIT2 | CLOSING
    );
    if i.flags & RST_SENT != 0 && live {
        if !closed_first {
            fill_task(&mut i.closer);
            i.close = close_kind::ACTIVE;
        }
        finish(skc, key, NoTwReason::Abort, old);
    } else if closed_first && i.flags & RST_RECEIVED != 0 {
        finish(skc, key, NoTwReason::PeerReset, old);
    } else if closed_first && matches!(old, FIN_WAIT2 | CLOSING) && tw_buckets_full(skc) {
        finish(skc, key, NoTwReason::Overflow, old);
    } else if live {
        // A RST may follow (tcp_close with unread data, SO_LINGER 0, TCP_LINGER2 < 0).
        if !closed_first {
            if is_self() {
                let _ = CONNS.remove(key);
                return;
            }
            fill_task(&mut i.closer);
            i.close = close_kind::ACTIVE;
            i.flags |= CLOSER_SET;
        }
        i.flags |= CLOSED;
        i.oldstate = old;
    } else {
        let _ = CONNS.remove(key);
    }
}

#[inline(never)]
fn count_passive_close(skc: u64) {
    // Its peer's close, on this host too, is counted already (as a TIME_WAIT or a close that
    // skipped one): one connection, counted once.
    if peer_is_local(skc) {
        return;
    }
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

/// Whether the socket's peer is on this host, in its namespace: a loopback address (IPv4,
/// IPv6 or IPv4-mapped) or the socket's own address. Read with the helper (the addresses sit
/// in unions a typed load may not reach into), in the byte order of x86-64.
#[inline(always)]
fn peer_is_local(skc: u64) -> bool {
    let family: u16 = load(skc + conf!(off.skc_family) as u64);
    if family == twtrace_ebpf::AF_INET {
        // One read at a time: a pattern over both leaves the second value undefined on the
        // path where the first failed, which older verifiers refuse (`!read_ok`).
        let Some(d) = read::<u32>(skc + conf!(off.skc_daddr) as u64) else {
            return false;
        };
        let Some(s) = read::<u32>(skc + conf!(off.skc_rcv_saddr) as u64) else {
            return false;
        };
        // Network order: the first octet is the lowest byte.
        return d == s || d & 0xff == 127;
    }
    if family != twtrace_ebpf::AF_INET6 {
        return false;
    }
    let Some([d0, d1]) = read::<[u64; 2]>(skc + conf!(off.skc_v6_daddr) as u64) else {
        return false;
    };
    let Some([s0, s1]) = read::<[u64; 2]>(skc + conf!(off.skc_v6_rcv_saddr) as u64) else {
        return false;
    };
    // ::1, and ::ffff:127.x.y.z.
    let loopback =
        d0 == 0 && (d1 == 1 << 56 || (d1 & 0xffff_ffff == 0xffff_0000 && (d1 >> 32) & 0xff == 127));
    loopback || (d0, d1) == (s0, s1)
}

/// The test `inet_twsk_alloc` makes before giving up on a TIME_WAIT (`refs - bias >= max`).
#[inline(always)]
fn tw_buckets_full(skc: u64) -> bool {
    if !has(feature::TW_BUCKETS) {
        return false;
    }
    let net: u64 = load(skc + conf!(off.skc_net) as u64);
    if net == 0 {
        return false;
    }
    let refs: i32 = load(net + conf!(off.net_tw_refcount) as u64);
    let max: i32 = load(net + conf!(off.net_max_tw_buckets) as u64);
    i64::from(refs) - i64::from(conf!(tw_count_bias)) >= i64::from(max)
}
