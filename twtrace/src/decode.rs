//! Ring-buffer records -> [`Event`]s. The record layouts are the `#[repr(C)]` structs of
//! `twtrace_ebpf`, the same definitions the kernel programs write.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use twtrace_ebpf::{
    AF_INET, AF_INET6, COMM_LEN, Conn, EndReason as KEnd, EventHeader, EventKind, NoTw,
    NoTwReason as KNoTw, OPEN_ATTRIBUTED, PortFail, Task, TwOpen, TwUpdate, port_op,
};

use crate::FastMap;
use crate::event::{
    CloseKind, EndReason, Endpoints, Event, Family, NoTimeWait, NoTwReason, PortFailure, PortOp,
    Process, Role, Substate, TwEnd, TwEnter, TwKey, TwResched,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} record has {got} bytes, expected {want}")]
    Size {
        kind: EventKind,
        got: usize,
        want: usize,
    },
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown {what} code {code}")]
    Code { what: &'static str, code: u8 },
}

/// Reads a `T` from the front of `bytes`, which must be exactly `size_of::<T>()` long.
fn read_exact<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let want = size_of::<T>();
    if bytes.len() != want {
        return Err(DecodeError::Size {
            kind,
            got: bytes.len(),
            want,
        });
    }
    // SAFETY: the length is checked; T is a plain #[repr(C)] struct valid for any bytes.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let kind = EventKind::from_u8(bytes[0]).ok_or(DecodeError::UnknownKind(bytes[0]))?;
    Ok(match kind {
        EventKind::TwEnter => {
            let r: TwOpen = read_exact(bytes, kind)?;
            Event::TwEnter(TwEnter {
                ts_ns: r.hdr.ts_ns,
                cpu: r.hdr.cpu,
                key: TwKey::new(r.cookie, r.tw),
                conn: endpoints(&r.conn)?,
                closer: (r.flags & OPEN_ATTRIBUTED != 0).then(|| process(&r.closer)),
                role: Role::from_raw(r.role),
                close: CloseKind::from_raw(r.close),
                substate: Substate::from_tcp_state(r.substate),
                timeout_jiffies: r.timeout_jiffies,
                recovered: None,
            })
        }
        EventKind::TwResched => {
            let r: TwUpdate = read_exact(bytes, kind)?;
            Event::TwResched(TwResched {
                ts_ns: r.hdr.ts_ns,
                cpu: r.hdr.cpu,
                key: TwKey::new(r.cookie, r.tw),
                substate: Substate::from_tcp_state(r.substate),
                timeout_jiffies: r.timeout_jiffies,
                addr: (r.cookie != 0).then_some(r.tw),
            })
        }
        EventKind::TwEnd => {
            let r: TwUpdate = read_exact(bytes, kind)?;
            let k = KEnd::from_u8(r.end).ok_or(DecodeError::Code {
                what: "end reason",
                code: r.end,
            })?;
            let end = EndReason::from_kernel(k);
            Event::TwEnd(TwEnd {
                ts_ns: r.hdr.ts_ns,
                cpu: r.hdr.cpu,
                key: TwKey::new(r.cookie, r.tw),
                end,
                substate: Substate::from_tcp_state(r.substate),
                by: (end == EndReason::Reused).then(|| process(&r.by)),
                addr: (r.cookie != 0).then_some(r.tw),
                recovered: false,
            })
        }
        EventKind::NoTw => {
            let r: NoTw = read_exact(bytes, kind)?;
            let k = KNoTw::from_u8(r.reason).ok_or(DecodeError::Code {
                what: "no-TIME_WAIT reason",
                code: r.reason,
            })?;
            Event::NoTimeWait(NoTimeWait {
                ts_ns: r.hdr.ts_ns,
                cpu: r.hdr.cpu,
                cookie: r.cookie,
                conn: endpoints(&r.conn)?,
                closer: (r.closer.pid != 0 || r.closer.comm[0] != 0).then(|| process(&r.closer)),
                role: Role::from_raw(r.role),
                close: CloseKind::from_raw(r.close),
                reason: NoTwReason::from_kernel(k),
                oldstate: r.oldstate,
            })
        }
        EventKind::PortFail => {
            let r: PortFail = read_exact(bytes, kind)?;
            let op = match r.op {
                port_op::CONNECT => PortOp::Connect,
                port_op::BIND => PortOp::Bind,
                code => {
                    return Err(DecodeError::Code {
                        what: "port operation",
                        code,
                    });
                }
            };
            Event::PortFailure(PortFailure {
                ts_ns: r.hdr.ts_ns,
                cpu: r.hdr.cpu,
                op,
                errno: r.errno,
                conn: endpoints(&r.conn)?,
                process: process(&r.task),
            })
        }
    })
}

pub(crate) fn endpoints(c: &Conn) -> Result<Endpoints, DecodeError> {
    let (family, laddr, raddr) = match c.family {
        AF_INET => {
            let l: [u8; 4] = c.laddr[..4].try_into().unwrap_or_default();
            let r: [u8; 4] = c.raddr[..4].try_into().unwrap_or_default();
            (
                Family::Ipv4,
                IpAddr::V4(Ipv4Addr::from(l)),
                IpAddr::V4(Ipv4Addr::from(r)),
            )
        }
        AF_INET6 => (
            Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(c.laddr)),
            IpAddr::V6(Ipv6Addr::from(c.raddr)),
        ),
        f => return Err(DecodeError::Family(f)),
    };
    Ok(Endpoints {
        netns: c.netns,
        family,
        laddr,
        lport: c.lport,
        raddr,
        rport: c.rport,
    })
}

pub(crate) fn process(t: &Task) -> Process {
    Process {
        pid: t.pid,
        tid: t.tid,
        host_pid: (t.host_pid != 0).then_some(t.host_pid),
        uid: t.uid,
        comm: comm(&t.comm),
        cgroup_id: t.cgroup,
    }
}

/// Distinct comms seen, shared by every event that names one: no allocation per event.
const COMM_CACHE_MAX: usize = 4096;

thread_local! {
    static COMMS: std::cell::RefCell<FastMap<[u8; COMM_LEN], Arc<str>>> =
        std::cell::RefCell::new(FastMap::default());
}

fn comm(raw: &[u8; COMM_LEN]) -> Arc<str> {
    let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    shared_comm(&raw[..n])
}

/// The shared copy of a comm (the kernel's are at most 15 bytes; longer names, from a
/// recording, are not cached).
pub fn shared_comm(name: &[u8]) -> Arc<str> {
    let Some(key) = (name.len() <= COMM_LEN).then(|| {
        let mut k = [0u8; COMM_LEN];
        k[..name.len()].copy_from_slice(name);
        k
    }) else {
        return crate::text::printable_bytes(name).into();
    };
    COMMS.with_borrow_mut(|cache| {
        if let Some(c) = cache.get(&key) {
            return c.clone();
        }
        if cache.len() >= COMM_CACHE_MAX {
            cache.clear();
        }
        let c: Arc<str> = crate::text::printable_bytes(name).into();
        cache.insert(key, c.clone());
        c
    })
}

/// Encoders for tests: the inverse of [`decode`], writing the kernel's layouts.
#[cfg(test)]
pub(crate) mod encode {
    use super::*;

    pub fn bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: T is a plain #[repr(C)] struct; reading its bytes is sound.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    pub fn task(pid: u32, comm: &str) -> Task {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        Task {
            pid,
            tid: pid,
            uid: 0,
            host_pid: pid + 100_000,
            cgroup: 7,
            comm: c,
        }
    }

    pub fn conn4(l: [u8; 4], lport: u16, r: [u8; 4], rport: u16, netns: u32) -> Conn {
        let mut c = Conn {
            family: AF_INET,
            lport,
            rport,
            netns,
            ..Conn::default()
        };
        c.laddr[..4].copy_from_slice(&l);
        c.raddr[..4].copy_from_slice(&r);
        c
    }
}

#[cfg(test)]
mod tests {
    use twtrace_ebpf::{EventHeader, close_kind, role, tcp_state};

    use super::{encode::*, *};

    fn hdr(kind: EventKind, ts: u64) -> EventHeader {
        EventHeader {
            kind: kind as u8,
            _pad: [0; 3],
            cpu: 1,
            ts_ns: ts,
        }
    }

    #[test]
    fn round_trips_enter() {
        let raw = TwOpen {
            hdr: hdr(EventKind::TwEnter, 42),
            cookie: 99,
            tw: 0xffff_8880_0000_1000,
            conn: conn4([127, 0, 0, 1], 40000, [127, 0, 0, 2], 80, 4026531840),
            closer: task(1234, "curl"),
            role: role::CLIENT,
            close: close_kind::ACTIVE,
            substate: tcp_state::TIME_WAIT,
            flags: OPEN_ATTRIBUTED,
            timeout_jiffies: 15000,
        };
        let Event::TwEnter(e) = decode(&bytes(&raw)).unwrap() else {
            panic!("wrong kind")
        };
        assert_eq!(e.ts_ns, 42);
        assert_eq!(e.key, TwKey::Cookie(99));
        assert_eq!(e.conn.laddr.to_string(), "127.0.0.1");
        assert_eq!(e.conn.rport, 80);
        assert_eq!(e.conn.netns, 4026531840);
        let p = e.closer.unwrap();
        assert_eq!((p.pid, p.comm.as_ref(), p.cgroup_id), (1234, "curl", 7));
        assert_eq!(p.host_pid, Some(101_234));
        assert_eq!(e.role, Role::Client);
        assert_eq!(e.close, CloseKind::Active);
        assert_eq!(e.substate, Substate::TimeWait);
    }

    #[test]
    fn unattributed_enter_has_no_closer_and_pointer_key() {
        let raw = TwOpen {
            hdr: hdr(EventKind::TwEnter, 1),
            cookie: 0,
            tw: 0xdead,
            conn: conn4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, 1),
            substate: tcp_state::FIN_WAIT2,
            ..TwOpen::default()
        };
        let Event::TwEnter(e) = decode(&bytes(&raw)).unwrap() else {
            panic!()
        };
        assert_eq!(e.key, TwKey::Addr(0xdead));
        assert!(e.closer.is_none());
        assert_eq!(e.substate, Substate::FinWait2);
        assert_eq!(e.role, Role::Unknown);
    }

    #[test]
    fn round_trips_every_end_reason() {
        for (code, want) in [
            (KEnd::Expired, EndReason::Expired),
            (KEnd::Reused, EndReason::Reused),
            (KEnd::Recycled, EndReason::Recycled),
            (KEnd::Reset, EndReason::Reset),
            (KEnd::Purged, EndReason::Purged),
        ] {
            let raw = TwUpdate {
                hdr: hdr(EventKind::TwEnd, 5),
                cookie: 3,
                tw: 4,
                by: task(77, "client"),
                substate: tcp_state::TIME_WAIT,
                end: code as u8,
                _pad: [0; 2],
                timeout_jiffies: 0,
            };
            let Event::TwEnd(e) = decode(&bytes(&raw)).unwrap() else {
                panic!()
            };
            assert_eq!(e.end, want);
            assert_eq!(e.by.is_some(), want == EndReason::Reused);
        }
    }

    #[test]
    fn round_trips_no_time_wait_ipv6() {
        let mut conn = Conn {
            family: AF_INET6,
            lport: 5,
            rport: 6,
            netns: 9,
            ..Conn::default()
        };
        conn.laddr[15] = 1;
        conn.raddr[15] = 1;
        let raw = NoTw {
            hdr: hdr(EventKind::NoTw, 8),
            cookie: 11,
            conn,
            closer: task(5, "srv"),
            role: role::SERVER,
            close: close_kind::ACTIVE,
            reason: KNoTw::Overflow as u8,
            oldstate: tcp_state::FIN_WAIT2,
            _pad: 0,
        };
        let Event::NoTimeWait(e) = decode(&bytes(&raw)).unwrap() else {
            panic!()
        };
        assert_eq!(e.conn.family, Family::Ipv6);
        assert_eq!(e.conn.laddr.to_string(), "::1");
        assert_eq!(e.reason, NoTwReason::Overflow);
        assert_eq!(e.role, Role::Server);
    }

    #[test]
    fn round_trips_port_failures() {
        for (op, want) in [
            (port_op::CONNECT, PortOp::Connect),
            (port_op::BIND, PortOp::Bind),
        ] {
            let raw = PortFail {
                hdr: hdr(EventKind::PortFail, 3),
                conn: conn4([127, 0, 0, 1], 0, [127, 0, 0, 2], 80, 5),
                task: task(9, "wget"),
                errno: 99,
                op,
                _pad: [0; 3],
            };
            let Event::PortFailure(e) = decode(&bytes(&raw)).unwrap() else {
                panic!()
            };
            assert_eq!((e.op, e.errno, e.conn.rport), (want, 99, 80));
            assert_eq!(&*e.process.comm, "wget");
        }
    }

    #[test]
    fn rejects_malformed_records() {
        assert_eq!(decode(&[1, 2, 3]), Err(DecodeError::Short(3)));
        let mut b = vec![0u8; 16];
        b[0] = 200;
        assert_eq!(decode(&b), Err(DecodeError::UnknownKind(200)));
        b[0] = EventKind::TwEnter as u8;
        assert!(matches!(decode(&b), Err(DecodeError::Size { .. })));
        let raw = TwUpdate {
            hdr: hdr(EventKind::TwEnd, 5),
            end: 99,
            ..TwUpdate::default()
        };
        assert!(matches!(
            decode(&bytes(&raw)),
            Err(DecodeError::Code { .. })
        ));
        let mut open = TwOpen {
            hdr: hdr(EventKind::TwEnter, 1),
            ..TwOpen::default()
        };
        open.conn.family = 1;
        assert_eq!(decode(&bytes(&open)), Err(DecodeError::Family(1)));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = decode(&data);
        }
    }
}
