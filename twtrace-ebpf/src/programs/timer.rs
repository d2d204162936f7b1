//! The TIME_WAIT socket itself, through its timer (`tw->tw_timer`): start = entered (or pushed
//! back), expire_entry = expired, cancel without either = killed early.
//!
//! A cancel cannot tell expiry, re-arm, reuse, SYN recycle and RST assassination apart on its
//! own: the first three are followed on the same CPU by the event that settles them
//! (expire_entry, start, or the listener arming a request socket's timer), a re-arm even under
//! the same lock. So such a cancel is parked in a per-CPU stash, with what its context says (the
//! cancelling task was connecting to the same peer: reuse), and settled by what follows; a stash
//! nothing settled is flushed by the next timer event on that CPU. Kills whose cause is plain at
//! cancel time (netns purge, a RST the TIME_WAIT just sent) are emitted at once.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_jiffies64},
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
};
use aya_log_ebpf::info;
use twtrace_ebpf::{
    Conn, EndReason, EventKind, OPEN_ATTRIBUTED, Task, TwOpen, close_kind,
    closing_flag::{CLOSER_SET, IGNORED},
    counter, feature, role, tcp_state,
};

use super::common::{
    CONNS, EVENTS, Slot, block_field, clear_task, conf, conn_passes, count, fill_task, has, header,
    init_closing, load, now_ns, read, read_conn, scratch, submit_update, task_passes, tw_key,
    wakeup_flags,
};

/// A connect() older than this no longer explains a kill. From CLOSE->SYN_SENT to the port
/// search that may kill a TIME_WAIT takes microseconds, but a virtual CPU the hypervisor
/// stalls in between sees tens of milliseconds pass (a reuse was once reported as a reset
/// under qemu with 10 ms here).
const CONNECTING_MAX_NS: u64 = 100_000_000;
/// A stash nothing settled within this long is flushed by any timer event on its CPU. An
/// expiry's cancel and its expire_entry are microseconds apart, unless the CPU stalls between
/// them: then a hard interrupt's timer would flush the expiry as a reset.
const STASH_MAX_NS: u64 = 20_000_000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PerCpu {
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

#[map]
static PERCPU: PerCpuArray<PerCpu> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn stash() -> Option<&'static mut PerCpu> {
    PERCPU.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// A connect() on this CPU just went CLOSE->SYN_SENT: its port search may kill a TIME_WAIT.
#[inline(always)]
pub fn note_connect(sk: u64, pid_tgid: u64) {
    if let Some(s) = stash() {
        s.connect_sk = sk;
        s.connect_task = pid_tgid;
        s.connect_ts = now_ns();
    }
}

/// The TIME_WAIT `tw` just sent a RST: the cancel that follows on this CPU is its end.
#[inline(always)]
pub fn mark_tw_reset(tw: u64) {
    if let Some(s) = stash() {
        s.rst_tw = tw;
        s.rst_ts = now_ns();
    }
}

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

/// The substate of the TIME_WAIT `read_conn` just read into `slot`, from its block when it
/// reaches that far.
#[inline(always)]
fn tw_substate(tw: u64, slot: Slot) -> u8 {
    match block_field(slot, conf!(off.tw_substate)) {
        Some(s) => s,
        None => read(tw + conf!(off.tw_substate) as u64).unwrap_or(0),
    }
}

#[inline(always)]
fn on_tw_start<C: EbpfContext>(ctx: &C, timer: u64) {
    let tw = tw_of(timer);
    let Some(conn) = read_conn(tw, 0, Slot::TimerStart) else {
        return;
    };
    let (key, cookie) = tw_key(conn, Slot::TimerStart);
    let substate = tw_substate(tw, Slot::TimerStart);
    let Some(stash) = stash() else {
        return;
    };
    if stash.timer == timer && stash.cookie == cookie {
        // cancel + start of the same timer: pushed back (mod_timer_pending). The cancel
        // parked it only if it passed the filters.
        stash.timer = 0;
        submit_update(
            EventKind::TwResched,
            stash.ts,
            cookie,
            tw,
            None,
            substate,
            0,
            timer_left(timer),
        );
        return;
    }
    flush_stash(stash);
    if !conn_passes(conn) {
        return;
    }
    let remembered = CONNS.get_ptr(key).filter(|_| key != 0);
    let info = match remembered {
        Some(p) => unsafe { &*p },
        None => {
            let Some(s) = scratch(Slot::TimerStart) else {
                return;
            };
            init_closing(&mut s.closing, role::UNKNOWN);
            &s.closing
        }
    };
    if info.flags & IGNORED != 0 || !task_passes(&info.closer) {
        if remembered.is_some() {
            let _ = CONNS.remove(key);
        }
        return;
    }
    let flags = if remembered.is_some() && info.flags & CLOSER_SET != 0 {
        OPEN_ATTRIBUTED
    } else {
        0
    };
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
    let r = unsafe { &mut *e.as_mut_ptr() };
    r.hdr = header(EventKind::TwEnter, now_ns());
    r.cookie = cookie;
    r.tw = tw;
    r.conn = *conn;
    r.closer = info.closer;
    r.role = info.role;
    r.close = close;
    r.substate = substate;
    r.flags = flags;
    r.timeout_jiffies = timer_left(timer);
    let pid = info.closer.pid;
    if remembered.is_some() {
        // Its job is done (copied into the record first: a freed entry can be reused at
        // once): the closing socket's CLOSE, next, has nothing left to report.
        let _ = CONNS.remove(key);
    }
    e.submit(wakeup_flags());
    if conf!(verbose) != 0 {
        info!(
            ctx,
            "tw enter cookie={} lport={} rport={} pid={}", cookie, conn.lport, conn.rport, pid
        );
    }
}

#[inline(always)]
fn on_tw_cancel(timer: u64) {
    let tw = tw_of(timer);
    let Some(stash) = stash() else {
        return;
    };
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
    if !conn_passes(conn) {
        return;
    }
    let (_, cookie) = tw_key(conn, Slot::TimerCancel);
    let substate = tw_substate(tw, Slot::TimerCancel);
    let ts = now_ns();
    // Causes that are plain now. Only a reuse names who ended it; in softirq the current
    // task is whoever was interrupted.
    let plain = if netns_dying(Slot::TimerCancel) {
        Some(EndReason::Purged)
    } else if reset {
        Some(EndReason::Reset)
    } else {
        None
    };
    if let Some(end) = plain {
        submit_update(
            EventKind::TwEnd,
            ts,
            cookie,
            tw,
            None,
            substate,
            end as u8,
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
    stash.conn = *conn;
    stash.substate = substate;
    stash.reuse = reused_by_current_connect(stash, ts) as u8;
    if stash.reuse != 0 {
        fill_task(&mut stash.by);
    } else {
        clear_task(&mut stash.by);
    }
}

#[inline(always)]
fn on_tw_expire<C: EbpfContext>(ctx: &C, timer: u64) {
    let tw = tw_of(timer);
    let Some(stash) = stash() else {
        return;
    };
    if stash.timer != timer {
        // Not parked by a cancel of ours (filtered out, or the cancel was missed).
        flush_stash(stash);
        let Some(conn) = read_conn(tw, 0, Slot::TimerExpire) else {
            return;
        };
        if !conn_passes(conn) {
            return;
        }
        let (_, cookie) = tw_key(conn, Slot::TimerExpire);
        let substate = tw_substate(tw, Slot::TimerExpire);
        let end = EndReason::Expired as u8;
        submit_update(
            EventKind::TwEnd,
            now_ns(),
            cookie,
            tw,
            None,
            substate,
            end,
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
        None,
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
    let Some(stash) = stash() else {
        return;
    };
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
            Some(&stash.by),
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
            Some(&stash.by),
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
    if let Some(stash) = stash()
        && stash.timer != 0
        && (stash.reuse != 0 || now_ns().wrapping_sub(stash.ts) > STASH_MAX_NS)
    {
        flush_stash(stash);
    }
}

/// Whether the netns of the socket `read_conn` just read into `slot` is being torn down.
#[inline(always)]
fn netns_dying(slot: Slot) -> bool {
    if !has(feature::NETNS_REFCOUNT) {
        return false;
    }
    match block_field::<u64>(slot, conf!(off.skc_net)) {
        Some(net) if net != 0 => read::<i32>(net + conf!(off.net_ns_refcount) as u64) == Some(0),
        _ => false,
    }
}

/// Whether this CPU's task is inside a connect() to the same peer as the parked TIME_WAIT.
#[inline(always)]
fn reused_by_current_connect(stash: &PerCpu, now: u64) -> bool {
    if stash.connect_sk == 0
        || stash.connect_task != bpf_get_current_pid_tgid()
        || now.wrapping_sub(stash.connect_ts) > CONNECTING_MAX_NS
    {
        return false;
    }
    // The connecting socket is alive (we are inside its connect()); its source port may not
    // be chosen yet, its destination is.
    let tw = &stash.conn;
    match read_conn(stash.connect_sk, 0, Slot::Connect) {
        Some(c) => {
            c.netns == tw.netns
                && c.family == tw.family
                && c.rport == tw.rport
                && c.raddr == tw.raddr
        }
        None => false,
    }
}
