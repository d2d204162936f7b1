//! twtrace's kernel programs (compiled for the BPF target only), one file per hook family.
//! BTF tracepoints only: they must run where kprobes and fentry/fexit are unavailable.
//!
//! Two sources are joined by the socket cookie, which a TIME_WAIT socket copies from the socket
//! it replaces:
//! - `inet_sock_set_state` ([`state`]) sees who closed first (ESTABLISHED->FIN_WAIT1 runs in the
//!   closer's close()/shutdown()) and, from the socket itself, whether it was accept()ed;
//! - the timer tracepoints ([`timer`]) see the TIME_WAIT socket itself.

mod bind;
mod common;
mod empty;
mod reset;
mod state;
mod timer;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
