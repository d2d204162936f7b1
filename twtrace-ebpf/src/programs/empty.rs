//! The hooks alone, with programs that return at once. Never attached by twtrace: the bench
//! attaches these in place of the real programs, on the same tracepoints, to measure what the
//! hooks cost before any program does work.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};

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
