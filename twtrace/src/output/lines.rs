//! Columns for a person reading a terminal, one line per finished TIME_WAIT (like tcplife).

use super::{Endpoint, TimeBase, endpoint};
use crate::{aggregate::Record, event::Role};

pub const HEADER: &str = "TIME         PID     COMM             NETNS       ROLE   LADDR:LPORT                RADDR:RPORT                SUBST  LIFE(s)  END";

fn role(r: Role) -> &'static str {
    match r {
        Role::Client => "client",
        Role::Server => "server",
        Role::Unknown => "?",
    }
}

/// Appends one line to `out` (with no newline); the TIME column is when the line's event
/// happened (the end, or the close). `trace` writes one per finished TIME_WAIT at the host's
/// churn rate, so nothing here allocates once `out` has grown.
pub fn write_line(out: &mut String, rec: &Record, tb: &TimeBase) {
    use std::fmt::Write as _;
    let (ts, conn, closer, r) = match rec {
        Record::TimeWait(t) => (t.ended_ns, &t.tw.conn, t.tw.closer.as_ref(), t.tw.role),
        Record::NoTimeWait(n) => (n.ts_ns, &n.conn, n.closer.as_ref(), n.role),
        Record::PortFailure(r) => {
            let f = &r.failure;
            let (what, addr, port) = match f.op {
                crate::event::PortOp::Connect => {
                    ("connect() EADDRNOTAVAIL", f.conn.raddr, f.conn.rport)
                }
                crate::event::PortOp::Bind => ("bind() EADDRINUSE", f.conn.laddr, f.conn.lport),
            };
            let start = out.len();
            tb.write_clock(out, f.ts_ns);
            pad_to(out, start + 12);
            let _ = write!(
                out,
                " {:<7} {:<16} {:<11} FAILED {what} {}, {} holding",
                crate::event::pid_text(f.process.pid),
                f.process.comm,
                f.conn.netns,
                Endpoint(addr, port),
                crate::text::count(r.time_wait_holding.into(), "TIME_WAIT")
            );
            return;
        }
    };
    let start = out.len();
    tb.write_clock(out, ts);
    pad_to(out, start + 12);
    match closer {
        Some(p) => {
            let _ = write!(out, " {:<7} {:<16}", crate::event::pid_text(p.pid), p.comm);
        }
        None => {
            let _ = write!(out, " {:<7} {:<16}", "-", "?");
        }
    }
    let _ = write!(out, " {:<11} {:<6} ", conn.netns, role(r));
    let col = out.len();
    let _ = write!(out, "{}", Endpoint(conn.laddr, conn.lport));
    pad_to(out, col + 26);
    out.push(' ');
    let col = out.len();
    let _ = write!(out, "{}", Endpoint(conn.raddr, conn.rport));
    pad_to(out, col + 26);
    match rec {
        Record::TimeWait(t) => {
            let subst = match t.tw.substate {
                crate::event::Substate::TimeWait => "TW",
                crate::event::Substate::FinWait2 => "FW2",
            };
            let life = t.lifetime_ns() as f64 / 1e9;
            let _ = write!(out, " {subst:<6} {life:>7.3}  {}", t.end.as_str());
            if let Some(p) = &t.reused_by {
                let _ = write!(out, " by {} {}", crate::event::pid_text(p.pid), p.comm);
            }
            if t.tw.preexisting {
                out.push_str(" (pre-existing)");
            }
            if t.tw.recovered {
                out.push_str(" (start recovered)");
            }
            if t.end_recovered {
                out.push_str(" (end recovered)");
            }
            if t.tw.rescheduled > 0 {
                let _ = write!(out, " resched={}", t.tw.rescheduled);
            }
        }
        Record::NoTimeWait(n) => {
            let _ = write!(
                out,
                " {:<6} {:>7}  NO TIME_WAIT: {}",
                "-",
                "-",
                n.reason.as_str()
            );
        }
        Record::PortFailure(_) => {}
    }
}

/// Pads `out` with spaces up to byte `len` (columns here are ASCII).
fn pad_to(out: &mut String, len: usize) {
    while out.len() < len {
        out.push(' ');
    }
}

/// A destination's port pressure.
pub fn pressure_line(p: &crate::aggregate::Pressure, tb: &TimeBase, now_ns: u64) -> String {
    let eta = match p.exhaustion_s {
        _ if p.held >= p.usable => ", all taken".to_string(),
        Some(s) => format!(", exhausted in ~{s:.0} s"),
        None => String::new(),
    };
    format!(
        "{:<12} PRESSURE netns {} {} -> {}: {}/{} ephemeral ports held ({:.1}%: {} TIME_WAIT, {} live), {:.1} TIME_WAITs/s{}",
        tb.local(now_ns).format("%H:%M:%S%.3f"),
        p.dest.netns,
        p.dest.laddr,
        endpoint(p.dest.raddr, p.dest.rport),
        p.held,
        p.usable,
        p.percent,
        p.time_wait,
        p.live,
        p.entered_per_s,
        eta
    )
}

pub fn advice_line(a: &crate::advice::Advice, tb: &TimeBase, now_ns: u64) -> String {
    let ns = a.netns.map(|n| format!(" [netns {n}]")).unwrap_or_default();
    format!(
        "{:<12} ADVICE{ns} {}",
        tb.local(now_ns).format("%H:%M:%S%.3f"),
        a.text
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        aggregate::{TimeWaitRecord, tests::alive_tw},
        event::{EndReason, TwKey},
    };

    #[test]
    fn columns_line_up_with_the_header() {
        let tb = TimeBase::with_offset_ns(1_700_000_000_000_000_000);
        let mut tw = alive_tw(TwKey::new(7, 0));
        tw.rescheduled = 1;
        let rec = Record::TimeWait(TimeWaitRecord {
            ended_ns: tw.entered_ns + 60_250_000_000,
            tw,
            end: EndReason::Expired,
            reused_by: None,
            end_recovered: false,
        });
        let mut l = String::new();
        write_line(&mut l, &rec, &tb);
        let clock = tb.local(61_250_000_000).format("%H:%M:%S%.3f").to_string();
        assert_eq!(
            l,
            format!(
                "{clock} 10      client           1           client 127.0.0.1:40000            127.0.0.1:8080             TW      60.250  expired resched=1"
            )
        );
        for col in ["PID", "COMM", "NETNS", "ROLE", "LADDR", "RADDR", "SUBST"] {
            assert_eq!(
                l.as_bytes()[HEADER.find(col).unwrap() - 1],
                b' ',
                "{col} column starts after a space"
            );
        }
        assert_eq!(&l[HEADER.find("RADDR").unwrap()..][..14], "127.0.0.1:8080");
        // The cached clock moves on with the second and keeps the milliseconds exact.
        let mut s = String::new();
        tb.write_clock(&mut s, 61_999_000_000);
        tb.write_clock(&mut s, 62_001_000_000);
        let expect = |ns| tb.local(ns).format("%H:%M:%S%.3f").to_string();
        assert_eq!(s, expect(61_999_000_000) + &expect(62_001_000_000));
    }
}
