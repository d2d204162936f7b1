//! The user's filters: compiled into the kernel's `Filter`, and applied in userspace to what
//! the kernel cannot filter (TIME_WAITs found by the start-up scan).

use twtrace_ebpf::{AF_INET, AF_INET6, COMM_LEN, Filter, MAX_PORT_FILTERS};

use std::collections::HashSet;

use crate::event::{Endpoints, Event, Family, Process, TwKey};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub lports: Vec<u16>,
    pub rports: Vec<u16>,
    pub family: Option<Family>,
    pub netns: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("at most {MAX_PORT_FILTERS} local and {MAX_PORT_FILTERS} remote ports can be filtered")]
    TooManyPorts,
    #[error("--comm {0:?} is longer than the kernel's {max} bytes", max = COMM_LEN - 1)]
    CommTooLong(String),
}

impl Filters {
    /// Whether what passes is all of a namespace's traffic (or all namespaces'): only then do
    /// twtrace's counts answer to the kernel's own counters.
    pub fn whole_namespaces(&self) -> bool {
        self.pid.is_none()
            && self.comm.is_none()
            && self.lports.is_empty()
            && self.rports.is_empty()
            && self.family.is_none()
    }

    pub fn to_kernel(&self) -> Result<Filter, FilterError> {
        if self.lports.len() > MAX_PORT_FILTERS || self.rports.len() > MAX_PORT_FILTERS {
            return Err(FilterError::TooManyPorts);
        }
        let mut f = Filter {
            pid: self.pid.unwrap_or(0),
            netns: self.netns.unwrap_or(0),
            family: match self.family {
                Some(Family::Ipv4) => AF_INET,
                Some(Family::Ipv6) => AF_INET6,
                None => 0,
            },
            n_lports: self.lports.len() as u8,
            n_rports: self.rports.len() as u8,
            ..Filter::default()
        };
        f.lports[..self.lports.len()].copy_from_slice(&self.lports);
        f.rports[..self.rports.len()].copy_from_slice(&self.rports);
        if let Some(c) = &self.comm {
            if c.len() >= COMM_LEN {
                return Err(FilterError::CommTooLong(c.clone()));
            }
            f.comm[..c.len()].copy_from_slice(c.as_bytes());
            f.comm_len = c.len() as u32;
        }
        Ok(f)
    }

    /// Whether any filter needs to know who closed (which a pre-existing TIME_WAIT cannot say).
    pub fn on_process(&self) -> bool {
        self.pid.is_some() || self.comm.is_some()
    }

    /// Whether passive closes can be counted under these filters: the kernel counts them per
    /// namespace only, with no process, port or address family.
    pub fn passive_closes_known(&self) -> bool {
        !self.on_process()
            && self.lports.is_empty()
            && self.rports.is_empty()
            && self.family.is_none()
    }

    /// The filters on a connection's identity.
    pub fn matches_conn(&self, c: &Endpoints) -> bool {
        self.netns.is_none_or(|n| n == c.netns)
            && self.family.is_none_or(|f| f == c.ip_family())
            && (self.lports.is_empty() || self.lports.contains(&c.lport))
            && (self.rports.is_empty() || self.rports.contains(&c.rport))
    }
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn matches_process(&self, p: Option<&Process>) -> bool {
        if !self.on_process() {
            return true;
        }
        p.is_some_and(|p| {
            self.pid.is_none_or(|pid| pid == p.pid)
                && self.comm.as_ref().is_none_or(|c| **c == *p.comm)
        })
    }
}

/// Applies [`Filters`] to recorded events, as the kernel would have: a TIME_WAIT's later
/// events follow its entry.
pub struct EventFilter {
    f: Filters,
    admitted: HashSet<TwKey>,
}

impl EventFilter {
    pub fn new(f: Filters) -> Self {
        Self {
            f,
            admitted: HashSet::new(),
        }
    }

    /// Whether to keep `ev`; may trim a start-up scan to what passes.
    pub fn admit(&mut self, ev: &mut Event) -> bool {
        if self.f.is_empty() {
            return true;
        }
        let f = &self.f;
        match ev {
            Event::TwEnter(e) => {
                let ok = f.matches_conn(&e.conn) && f.matches_process(e.closer.as_ref());
                if ok {
                    self.admitted.insert(e.key);
                }
                ok
            }
            Event::TwResched(r) => self.admitted.contains(&r.key),
            Event::TwEnd(e) => self.admitted.remove(&e.key),
            Event::NoTimeWait(n) => f.matches_conn(&n.conn) && f.matches_process(n.closer.as_ref()),
            Event::PortFailure(p) => f.matches_conn(&p.conn) && f.matches_process(Some(&p.process)),
            Event::TwExisting { sockets, .. } => {
                // A rotation's restatement knows each closer; a scan knows none.
                sockets.retain(|s| {
                    f.matches_conn(&s.conn)
                        && match &s.seen {
                            Some(seen) => f.matches_process(seen.closer.as_ref()),
                            None => !f.on_process(),
                        }
                });
                self.admitted.extend(
                    sockets
                        .iter()
                        .map(|s| s.seen.as_ref().map_or(TwKey::new(s.cookie, 0), |x| x.key)),
                );
                true
            }
            Event::Settings { netns, .. }
            | Event::LiveConnections { netns, .. }
            | Event::KernelCounters { netns, .. }
            | Event::Netns { netns, .. }
            | Event::NetnsGone { netns, .. } => f.netns.is_none_or(|n| n == *netns),
            // Passive closes are counted per namespace: only the namespace filter applies.
            Event::Snapshot { passive_closes, .. } => {
                if let Some(n) = f.netns {
                    passive_closes.retain(|&(ns, _)| ns == n);
                }
                true
            }
            Event::Cgroup { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn compiles_to_kernel_filter() {
        let f = Filters {
            pid: Some(5),
            comm: Some("nginx".into()),
            lports: vec![80, 443],
            rports: vec![],
            family: Some(Family::Ipv6),
            netns: Some(9),
        }
        .to_kernel()
        .unwrap();
        assert_eq!((f.pid, f.netns, f.family), (5, 9, AF_INET6));
        assert_eq!((f.n_lports, f.lports[1]), (2, 443));
        assert_eq!(f.comm_len, 5);
        assert_eq!(&f.comm[..6], b"nginx\0");
    }

    #[test]
    fn rejects_what_the_kernel_cannot_hold() {
        let many = Filters {
            lports: (1..=9).collect(),
            ..Default::default()
        };
        assert_eq!(many.to_kernel(), Err(FilterError::TooManyPorts));
        let long = Filters {
            comm: Some("a-very-long-command".into()),
            ..Default::default()
        };
        assert!(matches!(long.to_kernel(), Err(FilterError::CommTooLong(_))));
    }

    #[test]
    fn matches_connections() {
        let c = Endpoints {
            netns: 1,
            family: Family::Ipv4,
            laddr: IpAddr::from([127, 0, 0, 1]),
            lport: 80,
            raddr: IpAddr::from([127, 0, 0, 1]),
            rport: 5000,
        };
        let mut f = Filters::default();
        assert!(f.matches_conn(&c));
        f.lports = vec![80];
        assert!(f.matches_conn(&c));
        f.rports = vec![1];
        assert!(!f.matches_conn(&c));
        f.rports.clear();
        f.family = Some(Family::Ipv6);
        assert!(!f.matches_conn(&c));
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let c = Endpoints {
            netns: 1,
            family: Family::Ipv6,
            laddr: mapped,
            lport: 80,
            raddr: mapped,
            rport: 5000,
        };
        let only = |family| Filters {
            family: Some(family),
            ..Default::default()
        };
        assert!(only(Family::Ipv4).matches_conn(&c));
        assert!(!only(Family::Ipv6).matches_conn(&c));
        let v6 = Endpoints {
            raddr: "2001:db8::1".parse().unwrap(),
            ..c
        };
        assert!(only(Family::Ipv6).matches_conn(&v6));
        assert!(!only(Family::Ipv4).matches_conn(&v6));
        // The kernel's filter agrees.
        let mut k = twtrace_ebpf::Conn {
            family: AF_INET6,
            ..Default::default()
        };
        k.raddr[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!(k.ip_family(), AF_INET);
        k.raddr[0] = 0x20;
        assert_eq!(k.ip_family(), AF_INET6);
    }
}
