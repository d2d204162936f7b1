//! A network namespace's TIME_WAIT-related sysctls. Read on a thread that has joined that
//! namespace (`netns::run_in`): /proc/sys/net shows the caller's namespace.

use std::{fs, io};

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
    fn reads_this_namespace() {
        let s = read().expect("sysctls readable");
        assert!(s.port_range.0 <= s.port_range.1);
        assert!(s.tcp_max_tw_buckets >= 0);
    }
}
