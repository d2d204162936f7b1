//! Columns for a person reading a terminal, one line per finished TIME_WAIT (like tcplife).

use super::{TimeBase, endpoint};
use crate::{aggregate::Record, event::Role};

pub const HEADER: &str = "TIME         PID     COMM             NETNS       ROLE   LADDR:LPORT                RADDR:RPORT                SUBST  LIFE(s)  END";

fn role(r: Role) -> &'static str {
    match r {
        Role::Client => "client",
        Role::Server => "server",
        Role::Unknown => "?",
    }
}

/// One line; the TIME column is when the line's event happened (the end, or the close).
pub fn line(rec: &Record, tb: &TimeBase) -> String {
    let (ts, conn, closer, r, subst, life, end) = match rec {
        Record::TimeWait(t) => {
            let subst = match t.tw.substate {
                crate::event::Substate::TimeWait => "TW",
                crate::event::Substate::FinWait2 => "FW2",
            };
            let mut end = t.end.as_str().to_string();
            if let Some(p) = &t.reused_by {
                end.push_str(&format!(" by {} {}", p.pid, p.comm));
            }
            if t.tw.preexisting {
                end.push_str(" (pre-existing)");
            }
            if t.tw.rescheduled > 0 {
                end.push_str(&format!(" resched={}", t.tw.rescheduled));
            }
            (
                t.ended_ns,
                &t.tw.conn,
                t.tw.closer.as_ref(),
                t.tw.role,
                subst,
                format!("{:.3}", t.lifetime_ns() as f64 / 1e9),
                end,
            )
        }
        Record::PortFailure(r) => {
            let f = &r.failure;
            let (what, at) = match f.op {
                crate::event::PortOp::Connect => (
                    "connect() EADDRNOTAVAIL",
                    endpoint(f.conn.raddr, f.conn.rport),
                ),
                crate::event::PortOp::Bind => {
                    ("bind() EADDRINUSE", endpoint(f.conn.laddr, f.conn.lport))
                }
            };
            return format!(
                "{:<12} {:<7} {:<16} {:<11} FAILED {what} {at}, {} TIME_WAITs holding",
                tb.local(f.ts_ns).format("%H:%M:%S%.3f"),
                f.process.pid,
                f.process.comm,
                f.conn.netns,
                r.time_wait_holding
            );
        }
        Record::NoTimeWait(n) => (
            n.ts_ns,
            &n.conn,
            n.closer.as_ref(),
            n.role,
            "-",
            "-".to_string(),
            format!("NO TIME_WAIT: {}", n.reason.as_str()),
        ),
    };
    let (pid, comm) = closer
        .map(|p| (p.pid.to_string(), p.comm.as_ref()))
        .unwrap_or(("-".into(), "?"));
    format!(
        "{:<12} {:<7} {:<16} {:<11} {:<6} {:<26} {:<26} {:<6} {:>7}  {}",
        tb.local(ts).format("%H:%M:%S%.3f"),
        pid,
        comm,
        conn.netns,
        role(r),
        endpoint(conn.laddr, conn.lport),
        endpoint(conn.raddr, conn.rport),
        subst,
        life,
        end
    )
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
