//! `tcp_send_reset` and `tcp_receive_reset`: aborts, peer resets, and RSTs a TIME_WAIT sends.

use core::ffi::c_void;

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use twtrace_ebpf::{
    NoTwReason,
    closing_flag::{CLOSED, RST_RECEIVED, RST_SENT},
    feature, tcp_state,
};

use super::{
    common::{
        CONNS, Slot, closed_by_current, conf, has, is_self, load, read, read_conn, remember,
        sock_key, submit_no_tw,
    },
    state::{reported_cookie, role_of},
    timer::mark_tw_reset,
};

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
        // (Only kernels from 6.10 fire this tracepoint for TIME_WAIT sockets.)
        if has(feature::TW_RESET_TRACE) {
            mark_tw_reset(skc);
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
    let Some(key) = sock_key(sk, Slot::SendReset) else {
        return 0;
    };
    match CONNS.get_ptr_mut(key) {
        Some(info) => {
            let (flags, oldstate) = unsafe { ((*info).flags, (*info).oldstate) };
            if flags & CLOSED != 0 {
                // The state went to CLOSE first (tcp_close, tcp_disconnect): an abort.
                if let Some(conn) = read_conn(skc, conf!(off.inet_sport), Slot::SendReset) {
                    submit_no_tw(
                        reported_cookie(skc, key),
                        conn,
                        unsafe { &*info },
                        NoTwReason::Abort,
                        oldstate,
                    );
                }
                let _ = CONNS.remove(key);
            } else {
                unsafe { (*info).flags |= RST_SENT };
            }
        }
        None => {
            // A connection twtrace never saw opening or closing, reset before CLOSE.
            if is_self() {
                return 0;
            }
            if let Some(info) = closed_by_current(Slot::SendReset, role_of(skc), RST_SENT) {
                remember(key, info);
            }
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
    // Only a socket the state program keyed can be in CONNS: its cookie is assigned by then.
    let key = if has(feature::SOCKET_COOKIE) {
        read::<u64>(sk as u64 + conf!(off.skc_cookie) as u64).unwrap_or(0)
    } else {
        sock_key(sk, Slot::ReceiveReset).unwrap_or(0)
    };
    if key != 0
        && let Some(info) = CONNS.get_ptr_mut(key)
    {
        unsafe { (*info).flags |= RST_RECEIVED };
    }
    0
}
