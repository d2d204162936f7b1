//! bind(): which calls on TCP sockets failed with EADDRINUSE, and what they asked for.
//! Classic syscall tracepoints, whose record layout comes from tracefs at load time.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_get_current_task},
    macros::tracepoint,
    programs::TracePointContext,
};
use twtrace_ebpf::{AF_INET, AF_INET6, EADDRINUSE, port_op};

use super::common::{BINDS, Slot, conf, conn_passes, is_self, read, read_conn, submit_port_fail};

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
    let Some(conn) = read_conn(sk, 0, Slot::Bind) else {
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
    // By reference: the value stays in scratch, off the stack.
    let conn: &twtrace_ebpf::Conn = conn;
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
    if ret == -(EADDRINUSE as i64) && conn_passes(&conn) {
        submit_port_fail(&conn, port_op::BIND, EADDRINUSE);
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
