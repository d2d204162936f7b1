//! Sockets as sock_diag (the netlink interface `ss` uses) lists them, inside one network
//! namespace: the TIME_WAITs that exist before twtrace starts, and the live connections that
//! hold local ports, for port pressure.
//!
//! Asking sock_diag for a socket's cookie makes the kernel assign one and store it in the
//! TIME_WAIT socket, so the timer events that later end it carry the same cookie.

use std::{collections::HashMap, io, mem, net::IpAddr, path::Path};

use super::{netns, settings};
use crate::event::{Dest, Endpoints, Event, Family, NetnsSettings, Substate, TwExisting};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_TIME_WAIT: u8 = 6;
/// Every state that holds a local port for a connection: all but TIME_WAIT, CLOSE, LISTEN.
const LIVE_STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// The TIME_WAIT sockets of the namespace at `path`.
pub fn time_waits_in(path: &Path, netns: u32) -> io::Result<Vec<TwExisting>> {
    netns::run_in(path, move || {
        let mut out = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            out.extend(
                dump(family, 1 << TCP_TIME_WAIT, netns)?
                    .into_iter()
                    .map(|m| TwExisting {
                        conn: m.conn,
                        cookie: m.cookie,
                        substate: Substate::from_tcp_state(m.state),
                        remaining_ms: m.expires_ms,
                        seen: None,
                    }),
            );
        }
        Ok(out)
    })
}

/// Whether sock_diag answers for TCP here (it is a module, tcp_diag, on many distributions'
/// kernels): the start-up scan and the sweep depend on it. `Err` says why not.
pub fn probe() -> io::Result<()> {
    let path = Path::new("/proc/self/ns/net");
    let inode = std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
    time_waits_in(path, inode as u32).map(drop)
}

/// The TIME_WAIT sockets of every namespace twtrace can join (optionally only one).
pub fn snapshot(only: Option<u32>) -> Vec<TwExisting> {
    netns::joinable()
        .into_iter()
        .filter(|n| only.is_none_or(|o| o == n.inode))
        .flat_map(|n| match time_waits_in(&n.path, n.inode) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("cannot list TIME_WAIT sockets in netns {}: {e}", n.inode);
                Vec::new()
            }
        })
        .collect()
}

/// Reads a namespace's cookie, settings and kernel TIME_WAIT counters, and counts its live
/// connections on ephemeral local ports per destination, as four events.
pub fn port_state_in(path: &Path, netns: u32, ts_ns: u64) -> io::Result<[Event; 4]> {
    netns::run_in(path, move || {
        let cookie = settings::netns_cookie();
        let s = settings::read()?;
        let counts = live_counts(&s, netns)?;
        let clock = crate::aggregate::MonotonicClock;
        let read_ns = crate::aggregate::Clock::now_ns(&clock);
        let counters = settings::time_wait_counters()?;
        let until_ns = Some(crate::aggregate::Clock::now_ns(&clock));
        Ok([
            Event::Netns {
                ts_ns,
                netns,
                cookie,
            },
            Event::KernelCounters {
                ts_ns: read_ns,
                netns,
                counters,
                until_ns,
            },
            Event::Settings {
                ts_ns,
                netns,
                settings: s,
            },
            Event::LiveConnections {
                ts_ns,
                netns,
                counts,
            },
        ])
    })
}

/// Live connections per destination whose local port connect() picked (ephemeral range).
fn live_counts(s: &NetnsSettings, netns: u32) -> io::Result<Vec<(Dest, u32)>> {
    let mut counts: HashMap<Dest, u32> = HashMap::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for m in dump(family, LIVE_STATES, netns)? {
            if s.in_ephemeral_range(m.conn.lport) {
                *counts.entry(Dest::of(&m.conn)).or_default() += 1;
            }
        }
    }
    Ok(counts.into_iter().collect())
}

/// One socket as sock_diag describes it.
struct DiagSock {
    conn: Endpoints,
    state: u8,
    timer: u8,
    cookie: u64,
    expires_ms: u32,
}

fn as_bytes<T>(v: &T) -> &[u8] {
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, mem::size_of::<T>()) }
}

/// Sends one sock_diag request on a new netlink socket, for its replies.
fn request(flags: u16, req: DiagReq) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    #[repr(C)]
    struct Req {
        hdr: NlMsgHdr,
        req: DiagReq,
    }
    let req = Req {
        hdr: NlMsgHdr {
            len: mem::size_of::<Req>() as u32,
            ty: SOCK_DIAG_BY_FAMILY,
            flags: libc::NLM_F_REQUEST as u16 | flags,
            seq: 1,
            pid: 0,
        },
        req,
    };
    let b = as_bytes(&req);
    if unsafe { libc::send(sock.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn recv(sock: &std::os::fd::OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn dump(family: u8, states: u32, netns: u32) -> io::Result<Vec<DiagSock>> {
    let sock = request(
        libc::NLM_F_DUMP as u16,
        DiagReq {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            states,
            ..Default::default()
        },
    )?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(&sock, &mut buf)?;
        if parse(&buf[..n], netns, &mut out)? {
            return Ok(out);
        }
    }
}

/// What the kernel has now for a connection twtrace saw closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Its TIME_WAIT socket, with the time left on its timer.
    TimeWait {
        substate: Substate,
        remaining_ms: u32,
        /// Its cookie (assigned by this lookup if it had none).
        cookie: u64,
    },
    /// Still a full socket (FIN_WAIT2 waiting for the peer, or closing).
    Open,
    /// Neither: the connection and any TIME_WAIT of it are gone.
    Gone,
}

/// `INET_DIAG_NOCOOKIE`: match by address alone.
const INET_DIAG_NOCOOKIE: [u32; 2] = [!0, !0];

/// `idiag_timer` of a TIME_WAIT socket; a full socket in FIN_WAIT2 has another.
const TIMER_TIME_WAIT: u8 = 3;

/// Looks up each item's connection (`conn` gives its cookie and endpoints) in its own
/// namespace, namespace by namespace. A namespace no longer reachable was deleted, and its
/// sockets with it: Gone. The items of a namespace whose lookups failed are left out (said
/// in the debug log as `what`), to be asked about again.
pub fn lookup_each<T>(
    items: Vec<T>,
    conn: impl Fn(&T) -> (u64, Endpoints),
    what: &str,
) -> Vec<(T, Lookup)> {
    let mut by_netns: HashMap<u32, Vec<T>> = HashMap::new();
    for item in items {
        by_netns.entry(conn(&item).1.netns).or_default().push(item);
    }
    let paths: HashMap<u32, std::path::PathBuf> = netns::enumerate()
        .into_iter()
        .map(|n| (n.inode, n.path))
        .collect();
    let mut out = Vec::new();
    for (ns, items) in by_netns {
        let found = match paths.get(&ns) {
            Some(path) => lookup_in(path, items.iter().map(&conn).collect()),
            None => Ok(vec![Lookup::Gone; items.len()]),
        };
        match found {
            Ok(found) => out.extend(items.into_iter().zip(found)),
            Err(e) => log::debug!("{what}: netns {ns}: {e}"),
        }
    }
    out
}

/// Looks up connections by cookie and address (no dump: the kernel finds each in its hash)
/// inside the namespace at `path`; the answers come in the order asked.
pub fn lookup_in(path: &Path, conns: Vec<(u64, Endpoints)>) -> io::Result<Vec<Lookup>> {
    netns::run_in(path, move || {
        let mut buf = vec![0u8; 8 * 1024];
        conns
            .iter()
            .map(|(cookie, c)| lookup(c, *cookie, &mut buf))
            .collect()
    })
}

fn lookup(c: &Endpoints, cookie: u64, buf: &mut [u8]) -> io::Result<Lookup> {
    // A key the kernel programs made from the 4-tuple (no cookie helper) is no cookie: the
    // 4-tuple alone finds the socket.
    let by_cookie = cookie & twtrace_ebpf::SYNTHETIC_KEY == 0;
    let asked = if by_cookie {
        [cookie as u32, (cookie >> 32) as u32]
    } else {
        INET_DIAG_NOCOOKIE
    };
    let mut id = SockId {
        sport: c.lport.to_be_bytes(),
        dport: c.rport.to_be_bytes(),
        cookie: asked,
        ..Default::default()
    };
    let family = match (c.laddr, c.raddr) {
        (IpAddr::V4(l), IpAddr::V4(r)) => {
            id.src[..4].copy_from_slice(&l.octets());
            id.dst[..4].copy_from_slice(&r.octets());
            libc::AF_INET as u8
        }
        (IpAddr::V6(l), IpAddr::V6(r)) => {
            id.src = l.octets();
            id.dst = r.octets();
            libc::AF_INET6 as u8
        }
        _ => return Ok(Lookup::Gone),
    };
    let sock = request(
        0,
        DiagReq {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            states: !0,
            id,
            ..Default::default()
        },
    )?;
    let n = recv(&sock, buf)?;
    let mut found = Vec::new();
    match parse(&buf[..n], c.netns, &mut found) {
        // ENOENT: nothing at that address; ESTALE: another connection (another cookie) is.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)) => Ok(Lookup::Gone),
        Err(e) => Err(e),
        Ok(_) => Ok(match found.first() {
            Some(s) if by_cookie && s.cookie != cookie => Lookup::Gone,
            Some(s) if s.timer == TIMER_TIME_WAIT => Lookup::TimeWait {
                substate: Substate::from_tcp_state(s.state),
                remaining_ms: s.expires_ms,
                cookie: s.cookie,
            },
            Some(_) => Lookup::Open,
            None => Lookup::Gone,
        }),
    }
}

/// Parses one datagram of replies; true when the dump is complete.
fn parse(mut data: &[u8], netns: u32, out: &mut Vec<DiagSock>) -> io::Result<bool> {
    let hdr_len = mem::size_of::<NlMsgHdr>();
    while data.len() >= hdr_len {
        let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
        let len = hdr.len as usize;
        if len < hdr_len || len > data.len() {
            return Err(io::Error::other("truncated sock_diag reply"));
        }
        match hdr.ty {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = data
                    .get(hdr_len..hdr_len + 4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(0);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY if len >= hdr_len + mem::size_of::<DiagMsg>() => {
                let m: DiagMsg =
                    unsafe { std::ptr::read_unaligned(data[hdr_len..].as_ptr().cast()) };
                if let Some(e) = to_sock(&m, netns) {
                    out.push(e);
                }
            }
            _ => {}
        }
        data = &data[(len + 3) & !3..];
    }
    Ok(false)
}

fn to_sock(m: &DiagMsg, netns: u32) -> Option<DiagSock> {
    let (family, laddr, raddr) = if m.family == libc::AF_INET as u8 {
        let s: [u8; 4] = m.id.src[..4].try_into().ok()?;
        let d: [u8; 4] = m.id.dst[..4].try_into().ok()?;
        (Family::Ipv4, IpAddr::from(s), IpAddr::from(d))
    } else {
        (Family::Ipv6, IpAddr::from(m.id.src), IpAddr::from(m.id.dst))
    };
    Some(DiagSock {
        conn: Endpoints {
            netns,
            family,
            laddr,
            lport: u16::from_be_bytes(m.id.sport),
            raddr,
            rport: u16::from_be_bytes(m.id.dport),
        },
        state: m.state,
        timer: m.timer,
        cookie: (m.id.cookie[1] as u64) << 32 | m.id.cookie[0] as u64,
        expires_ms: m.expires,
    })
}
