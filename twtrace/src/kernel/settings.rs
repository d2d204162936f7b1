//! A network namespace's TIME_WAIT-related sysctls. Read on a thread that has joined that
//! namespace (`netns::run_in`): /proc/sys/net shows the caller's namespace.

use std::{fs, io, os::fd::FromRawFd as _};

use crate::event::NetnsSettings;

fn read_sysctl(key: &str) -> io::Result<String> {
    Ok(fs::read_to_string(format!("/proc/sys/net/{key}"))?
        .trim()
        .to_string())
}

fn number(key: &str) -> io::Result<i64> {
    read_sysctl(key)?
        .parse()
        .map_err(|e| io::Error::other(format!("{key}: {e}")))
}

/// The settings of the namespace the calling thread is in.
pub fn read() -> io::Result<NetnsSettings> {
    Ok(NetnsSettings {
        tcp_tw_reuse: number("ipv4/tcp_tw_reuse")?,
        tcp_tw_reuse_delay_ms: number("ipv4/tcp_tw_reuse_delay").ok(),
        tcp_max_tw_buckets: number("ipv4/tcp_max_tw_buckets")?,
        tcp_fin_timeout: number("ipv4/tcp_fin_timeout")?,
        tcp_timestamps: number("ipv4/tcp_timestamps")?,
        tcp_rfc1337: number("ipv4/tcp_rfc1337")?,
        port_range: parse_range(&read_sysctl("ipv4/ip_local_port_range")?)
            .ok_or_else(|| io::Error::other("bad ip_local_port_range"))?,
        reserved_ports: parse_reserved(&read_sysctl("ipv4/ip_local_reserved_ports")?),
    })
}

/// The kernel's TIME_WAIT counters of the calling thread's namespace. /proc/net is the
/// thread-group leader's namespace, not this thread's: the thread's own is under thread-self.
pub fn time_wait_counters() -> io::Result<std::collections::BTreeMap<String, u64>> {
    Ok(parse_tcp_ext(&fs::read_to_string(
        "/proc/thread-self/net/netstat",
    )?))
}

/// `SO_NETNS_COOKIE` (Linux 5.14): a namespace's cookie, unique for the boot where an inode
/// number is reused once the namespace is gone.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The calling thread's namespace's cookie; None where the kernel has none (before 5.14).
pub fn netns_cookie() -> Option<u64> {
    // SAFETY: a plain socket(2); the fd is owned from here on and closed on drop.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `len` says its size.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (r == 0 && len as usize == std::mem::size_of::<u64>()).then_some(cookie)
}

const COUNTERS: [&str; 4] = ["TW", "TWKilled", "TWRecycled", "TCPTimeWaitOverflow"];

fn parse_tcp_ext(netstat: &str) -> std::collections::BTreeMap<String, u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Default::default();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(n, _)| COUNTERS.contains(n))
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

fn parse_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// "1000,2000-2005" -> [(1000, 1000), (2000, 2005)].
fn parse_reserved(s: &str) -> Vec<(u16, u16)> {
    s.split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => {
                    let p = part.parse().ok()?;
                    Some((p, p))
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!(parse_range("32768\t60999"), Some((32768, 60999)));
        assert_eq!(parse_range("bogus"), None);
        assert_eq!(parse_reserved(""), vec![]);
        assert_eq!(
            parse_reserved("1000,2000-2005"),
            vec![(1000, 1000), (2000, 2005)]
        );
    }

    #[test]
    fn usable_ports_subtract_reserved_inside_the_range() {
        let s = NetnsSettings {
            port_range: (40000, 40099),
            reserved_ports: vec![(39990, 40004), (40050, 40050), (50000, 50010)],
            ..NetnsSettings::default()
        };
        assert_eq!(s.usable_ports(), 100 - 5 - 1);
        assert!(!s.in_ephemeral_range(40002));
        assert!(s.in_ephemeral_range(40005));
        assert!(!s.in_ephemeral_range(39000));
    }

    #[test]
    fn picks_time_wait_counters() {
        let t = "TcpExt: SyncookiesSent TW TWRecycled TWKilled TCPTimeWaitOverflow\n\
                 TcpExt: 0 12 3 4 5\nIpExt: x\nIpExt: 1\n";
        let c = parse_tcp_ext(t);
        assert_eq!(c["TW"], 12);
        assert_eq!(c["TWKilled"], 4);
        assert_eq!(c["TCPTimeWaitOverflow"], 5);
        assert!(!c.contains_key("SyncookiesSent"));
    }

    #[test]
    fn reads_this_namespace() {
        let s = read().expect("sysctls readable");
        assert!(s.port_range.0 <= s.port_range.1);
        assert!(s.tcp_max_tw_buckets >= 0);
    }
}
