//! NDJSON: one object per finished TIME_WAIT or TIME_WAIT-less close. The fields are documented
//! in the README; names are stable.

use std::net::IpAddr;

use serde::Serialize;

use super::{TimeBase, tcp_state_name};
use crate::{
    aggregate::{PortFailureRecord, Record},
    cgroup::CgroupNames,
    event::{CloseKind, EndReason, Endpoints, Family, NoTwReason, Process, Role, Substate},
};

#[derive(Serialize)]
struct Identity<'a> {
    /// RFC 3339: when the TIME_WAIT entered, or when the close happened.
    ts: String,
    netns: u32,
    family: Family,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    /// In twtrace's pid namespace; `null` when unknown or outside it (see `host_pid`).
    pid: Option<u32>,
    tid: Option<u32>,
    /// In the initial pid namespace.
    host_pid: Option<u32>,
    comm: Option<&'a str>,
    uid: Option<u32>,
    cgroup: Option<String>,
    cgroup_id: Option<u64>,
    /// The cgroup's name in every view: container or unit when its path shows one, else the
    /// path ([`crate::cgroup::name`]).
    container: Option<String>,
    role: Role,
    close: CloseKind,
}

#[derive(Serialize)]
struct TimeWaitJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(flatten)]
    id: Identity<'a>,
    substate: Substate,
    lifetime_ms: f64,
    end: EndReason,
    ended: String,
    reused_by_pid: Option<u32>,
    reused_by_comm: Option<&'a str>,
    rescheduled: u32,
    preexisting: bool,
    /// Its start was recovered by the sweep (`entered` is an estimate).
    recovered: bool,
    /// No kernel program reported its end: the end check found it gone once its timer was
    /// due (`ended` is when it was due).
    end_recovered: bool,
}

#[derive(Serialize)]
struct NoTimeWaitJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(flatten)]
    id: Identity<'a>,
    reason: NoTwReason,
    oldstate: &'static str,
}

/// A pid in twtrace's namespace: 0 is none there.
fn ns_pid(pid: u32) -> Option<u32> {
    (pid != 0).then_some(pid)
}

fn identity<'a>(
    ts_ns: u64,
    conn: &Endpoints,
    closer: Option<&'a Process>,
    role: Role,
    close: CloseKind,
    tb: &TimeBase,
    cgroups: &mut CgroupNames,
) -> Identity<'a> {
    Identity {
        ts: tb
            .utc(ts_ns)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        netns: conn.netns,
        family: conn.family,
        laddr: conn.laddr,
        lport: conn.lport,
        raddr: conn.raddr,
        rport: conn.rport,
        pid: closer.and_then(|p| ns_pid(p.pid)),
        tid: closer.and_then(|p| ns_pid(p.tid)),
        host_pid: closer.and_then(|p| p.host_pid),
        comm: closer.map(|p| p.comm.as_ref()),
        uid: closer.map(|p| p.uid),
        cgroup: closer.and_then(|p| cgroups.path(p.cgroup_id).map(str::to_string)),
        cgroup_id: closer.map(|p| p.cgroup_id).filter(|&id| id != 0),
        container: closer.and_then(|p| cgroups.display(p.cgroup_id)),
        role,
        close,
    }
}

#[derive(Serialize)]
struct PortFailureJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    ts: String,
    errno: i32,
    error: &'static str,
    pid: Option<u32>,
    tid: Option<u32>,
    host_pid: Option<u32>,
    comm: &'a str,
    uid: u32,
    cgroup: Option<String>,
    cgroup_id: Option<u64>,
    container: Option<String>,
    netns: u32,
    family: Family,
    #[serde(skip_serializing_if = "Option::is_none")]
    raddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    laddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lport: Option<u16>,
    time_wait_holding: u32,
}

fn port_failure(r: &PortFailureRecord, tb: &TimeBase, cgroups: &mut CgroupNames) -> String {
    let f = &r.failure;
    let connect = f.op == crate::event::PortOp::Connect;
    serde_json::to_string(&PortFailureJson {
        ty: if connect {
            "connect_failed"
        } else {
            "bind_failed"
        },
        ts: tb
            .utc(f.ts_ns)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        errno: f.errno,
        error: if connect {
            "EADDRNOTAVAIL"
        } else {
            "EADDRINUSE"
        },
        pid: ns_pid(f.process.pid),
        tid: ns_pid(f.process.tid),
        host_pid: f.process.host_pid,
        comm: &f.process.comm,
        uid: f.process.uid,
        cgroup: cgroups.path(f.process.cgroup_id).map(str::to_string),
        cgroup_id: Some(f.process.cgroup_id).filter(|&id| id != 0),
        container: cgroups.display(f.process.cgroup_id),
        netns: f.conn.netns,
        family: f.conn.family,
        raddr: connect.then_some(f.conn.raddr),
        rport: connect.then_some(f.conn.rport),
        laddr: (!connect).then_some(f.conn.laddr),
        lport: (!connect).then_some(f.conn.lport),
        time_wait_holding: r.time_wait_holding,
    })
    .expect("records serialize")
}

/// The last object of a stream: totals, settings, pressure, advice and what was lost.
pub fn summary<C: crate::aggregate::Clock>(
    agg: &crate::aggregate::Aggregator<C>,
    loss: &crate::kernel::tracer::Loss,
    undecodable: u64,
    whole_namespaces: bool,
) -> serde_json::Value {
    let pressure = agg.pressure();
    // Only where all of each namespace's traffic was traced do the counts answer to its own.
    let kernel_check = whole_namespaces.then(|| agg.kernel_checks());
    let advice = crate::advice::advise(&crate::advice::Evidence::of(agg, &pressure));
    let settings: std::collections::BTreeMap<String, _> = agg
        .settings()
        .iter()
        .map(|(n, s)| (n.to_string(), s))
        .collect();
    serde_json::json!({
        "type": "summary",
        "totals": agg.totals(),
        "alive": agg.alive_count(),
        "connections_closed": agg.connections_closed(),
        "failures": agg.failures(),
        "settings": settings,
        "pressure": pressure.iter().take(10).collect::<Vec<_>>(),
        "advice": advice,
        "loss": loss,
        "undecodable": undecodable,
        "kernel_check": kernel_check,
    })
}

/// A destination's port pressure, as a `port_pressure` object.
pub fn pressure_line(p: &crate::aggregate::Pressure, tb: &TimeBase, now_ns: u64) -> String {
    let mut v = serde_json::to_value(p).expect("pressure serializes");
    v["type"] = "port_pressure".into();
    v["ts"] = tb
        .utc(now_ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .into();
    v.to_string()
}

/// A piece of advice, as an `advice` object.
pub fn advice_line(a: &crate::advice::Advice, tb: &TimeBase, now_ns: u64) -> String {
    let mut v = serde_json::to_value(a).expect("advice serializes");
    v["type"] = "advice".into();
    v["ts"] = tb
        .utc(now_ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .into();
    v.to_string()
}

/// One NDJSON line (without the newline).
pub fn line(rec: &Record, tb: &TimeBase, cgroups: &mut CgroupNames) -> String {
    let v = match rec {
        Record::TimeWait(r) => serde_json::to_string(&TimeWaitJson {
            ty: "time_wait",
            id: identity(
                r.tw.entered_ns,
                &r.tw.conn,
                r.tw.closer.as_ref(),
                r.tw.role,
                r.tw.close,
                tb,
                cgroups,
            ),
            substate: r.tw.substate,
            lifetime_ms: (r.lifetime_ns() as f64 / 1e6 * 1000.0).round() / 1000.0,
            end: r.end,
            ended: tb
                .utc(r.ended_ns)
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            reused_by_pid: r.reused_by.as_ref().and_then(|p| ns_pid(p.pid)),
            reused_by_comm: r.reused_by.as_ref().map(|p| p.comm.as_ref()),
            rescheduled: r.tw.rescheduled,
            preexisting: r.tw.preexisting,
            recovered: r.tw.recovered,
            end_recovered: r.end_recovered,
        }),
        Record::NoTimeWait(n) => serde_json::to_string(&NoTimeWaitJson {
            ty: "no_time_wait",
            id: identity(
                n.ts_ns,
                &n.conn,
                n.closer.as_ref(),
                n.role,
                n.close,
                tb,
                cgroups,
            ),
            reason: n.reason,
            oldstate: tcp_state_name(n.oldstate),
        }),
        Record::PortFailure(r) => return port_failure(r, tb, cgroups),
    };
    v.expect("records serialize")
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::{
        aggregate::{AliveTw, TimeWaitRecord},
        event::{NoTimeWait, TwKey},
    };

    fn conn() -> Endpoints {
        Endpoints {
            netns: 4026532000,
            family: Family::Ipv4,
            laddr: IpAddr::from([127, 0, 0, 1]),
            lport: 40000,
            raddr: IpAddr::from([127, 0, 0, 2]),
            rport: 80,
        }
    }

    fn who(pid: u32, comm: &str) -> Process {
        Process {
            pid,
            tid: pid,
            host_pid: None,
            uid: 1000,
            comm: comm.into(),
            cgroup_id: 0,
        }
    }

    #[test]
    fn time_wait_object_has_the_documented_fields() {
        let rec = Record::TimeWait(TimeWaitRecord {
            tw: AliveTw {
                key: TwKey::Cookie(1),
                conn: conn(),
                closer: Some(who(42, "curl")),
                role: Role::Client,
                close: CloseKind::Active,
                substate: Substate::TimeWait,
                entered_ns: 1_000_000_000,
                armed_ns: 1_000_000_000,
                timeout_ns: 60_000_000_000,
                rescheduled: 1,
                preexisting: false,
                recovered: false,
            },
            ended_ns: 3_500_000_000,
            end: EndReason::Reused,
            reused_by: Some(who(43, "wget")),
            end_recovered: false,
        });
        let tb = TimeBase::with_offset_ns(1_700_000_000_000_000_000);
        let v: serde_json::Value =
            serde_json::from_str(&line(&rec, &tb, &mut CgroupNames::default())).unwrap();
        assert_eq!(v["type"], "time_wait");
        assert_eq!(v["ts"], "2023-11-14T22:13:21.000000Z");
        assert_eq!(v["netns"], 4026532000u32);
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "127.0.0.1");
        assert_eq!(v["lport"], 40000);
        assert_eq!(v["raddr"], "127.0.0.2");
        assert_eq!(v["rport"], 80);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["uid"], 1000);
        assert!(v["cgroup"].is_null());
        assert_eq!(v["role"], "client");
        assert_eq!(v["close"], "active");
        assert_eq!(v["substate"], "time_wait");
        assert_eq!(v["lifetime_ms"], 2500.0);
        assert_eq!(v["end"], "reused");
        assert_eq!(v["reused_by_pid"], 43);
        assert_eq!(v["reused_by_comm"], "wget");
        assert_eq!(v["rescheduled"], 1);
    }

    #[test]
    fn no_time_wait_object() {
        let rec = Record::NoTimeWait(NoTimeWait {
            ts_ns: 0,
            cpu: 0,
            cookie: 1,
            conn: conn(),
            closer: None,
            role: Role::Unknown,
            close: CloseKind::Unknown,
            reason: NoTwReason::Overflow,
            oldstate: 5,
        });
        let v: serde_json::Value = serde_json::from_str(&line(
            &rec,
            &TimeBase::with_offset_ns(0),
            &mut CgroupNames::default(),
        ))
        .unwrap();
        assert_eq!(v["type"], "no_time_wait");
        assert_eq!(v["reason"], "overflow");
        assert_eq!(v["oldstate"], "fin_wait2");
        assert!(v["pid"].is_null());
        assert_eq!(v["role"], "unknown");
    }
}
