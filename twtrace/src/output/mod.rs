//! Views that stream the aggregator's records: columns for people, NDJSON for programs.

pub mod json;
pub mod lines;
pub mod report_text;

use chrono::{DateTime, Local, TimeZone as _, Utc};

/// Converts kernel CLOCK_MONOTONIC stamps to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct TimeBase {
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, in nanoseconds, measured once at start.
    offset_ns: i128,
}

impl TimeBase {
    pub fn now() -> Self {
        let read = |clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            unsafe { libc::clock_gettime(clock, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        let mono = read(libc::CLOCK_MONOTONIC);
        let real = read(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real - mono,
        }
    }

    pub fn offset_ns(&self) -> i128 {
        self.offset_ns
    }

    /// For tests and recordings: a fixed offset.
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn utc(&self, mono_ns: u64) -> DateTime<Utc> {
        let ns = mono_ns as i128 + self.offset_ns;
        Utc.timestamp_nanos(ns.clamp(0, i64::MAX as i128) as i64)
    }

    pub fn local(&self, mono_ns: u64) -> DateTime<Local> {
        self.utc(mono_ns).with_timezone(&Local)
    }

    /// Appends `HH:MM:SS.mmm`, local time. The timezone conversion costs more than the rest of
    /// a line, so it is made once per second of stamps (per thread).
    pub fn write_clock(&self, out: &mut String, mono_ns: u64) {
        use std::{cell::RefCell, fmt::Write as _};
        thread_local! {
            static SECOND: RefCell<(i128, String)> = const { RefCell::new((i128::MIN, String::new())) };
        }
        let ns = mono_ns as i128 + self.offset_ns;
        let (sec, ms) = (
            ns.div_euclid(1_000_000_000),
            ns.rem_euclid(1_000_000_000) / 1_000_000,
        );
        SECOND.with_borrow_mut(|(cached, hms)| {
            if *cached != sec {
                hms.clear();
                let _ = write!(hms, "{}", self.local(mono_ns).format("%H:%M:%S"));
                *cached = sec;
            }
            let _ = write!(out, "{hms}.{ms:03}");
        });
    }
}

/// `addr:port`, IPv6 in brackets.
pub fn endpoint(addr: std::net::IpAddr, port: u16) -> String {
    Endpoint(addr, port).to_string()
}

/// [`endpoint`] without the allocation. Not padded: pad after writing.
pub struct Endpoint(pub std::net::IpAddr, pub u16);

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            std::net::IpAddr::V4(a) => write!(f, "{a}:{}", self.1),
            std::net::IpAddr::V6(a) => write!(f, "[{a}]:{}", self.1),
        }
    }
}

/// TCP state names, for the state a TIME_WAIT-less close left.
pub fn tcp_state_name(s: u8) -> &'static str {
    use twtrace_ebpf::tcp_state::*;
    match s {
        ESTABLISHED => "established",
        SYN_SENT => "syn_sent",
        SYN_RECV => "syn_recv",
        FIN_WAIT1 => "fin_wait1",
        FIN_WAIT2 => "fin_wait2",
        TIME_WAIT => "time_wait",
        CLOSE => "close",
        CLOSE_WAIT => "close_wait",
        LAST_ACK => "last_ack",
        LISTEN => "listen",
        CLOSING => "closing",
        _ => "unknown",
    }
}
