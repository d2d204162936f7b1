//! Struct offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so the kernel programs cannot ask the loader to fix up
//! field accesses. Instead every offset they need is resolved here, from
//! `/sys/kernel/btf/vmlinux`, and handed to them in `Config`. Nothing is hard-coded.

use std::path::Path;

use btf_rs::{Btf, Type};
use twtrace_ebpf::{Offsets, SKC_BLOCK, feature};

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read kernel BTF from {path}: {source}")]
    Read { path: String, source: btf_rs::Error },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {ty} has no member {path}")]
    NoMember { ty: String, path: String },
    #[error("kernel BTF: {ty}.{path} is a bitfield or goes through a pointer")]
    Unaddressable { ty: String, path: String },
    #[error(
        "this kernel's sock_common puts {field} at byte {offset}, beyond the {max} bytes twtrace reads: unsupported kernel"
    )]
    Layout {
        field: &'static str,
        offset: u32,
        max: usize,
    },
    #[error("kernel BTF is malformed: {0}")]
    Malformed(#[from] btf_rs::Error),
}

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { btf })
    }

    fn find_struct(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| BtfError::NoStruct(name.to_string()))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))
    }

    /// Skips typedefs and qualifiers.
    fn strip(&self, mut t: Type) -> Result<Type, BtfError> {
        loop {
            t = match &t {
                Type::Typedef(x) => self.btf.resolve_chained_type(x)?,
                Type::Const(x) | Type::Volatile(x) | Type::Restrict(x) => {
                    self.btf.resolve_chained_type(x)?
                }
                _ => return Ok(t),
            };
        }
    }

    /// Finds `name` among the members of `s`, looking inside anonymous structs and unions
    /// (the kernel hides many fields there). Returns its bit offset and type.
    fn member(&self, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>, BtfError> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            if mname == name {
                if m.bitfield_size().is_some_and(|b| b != 0) {
                    return Ok(None);
                }
                let t = self.strip(self.btf.resolve_chained_type(m)?)?;
                return Ok(Some((m.bit_offset(), t)));
            }
            if mname.is_empty() {
                let t = self.strip(self.btf.resolve_chained_type(m)?)?;
                if let Type::Struct(inner) | Type::Union(inner) = &t
                    && let Some((off, t)) = self.member(inner, name)?
                {
                    return Ok(Some((m.bit_offset() + off, t)));
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of a dotted member path (`a.b.c`) inside `struct ty`.
    pub fn offset_of(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let mut s = self.find_struct(ty)?;
        let mut bits = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Some((off, t)) = self.member(&s, part)? else {
                return Err(BtfError::NoMember {
                    ty: ty.to_string(),
                    path: path.to_string(),
                });
            };
            bits += off;
            if i + 1 < parts.len() {
                s = match t {
                    Type::Struct(x) | Type::Union(x) => x,
                    _ => {
                        return Err(BtfError::Unaddressable {
                            ty: ty.to_string(),
                            path: path.to_string(),
                        });
                    }
                };
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Unaddressable {
                ty: ty.to_string(),
                path: path.to_string(),
            });
        }
        Ok(bits / 8)
    }

    /// The first of several spellings a field has had across kernel versions.
    pub fn offset_of_any(&self, ty: &str, paths: &[&str]) -> Result<u32, BtfError> {
        let mut last = None;
        for p in paths {
            match self.offset_of(ty, p) {
                Ok(o) => return Ok(o),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| BtfError::NoStruct(ty.to_string())))
    }

    /// Whether the kernel has a function of this name (BTF_KIND_FUNC).
    pub fn has_func(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .is_ok_and(|ts| ts.iter().any(|t| matches!(t, Type::Func(_))))
    }

    /// How many arguments the tracepoint `name` passes to BTF programs (from the
    /// `btf_trace_<name>` typedef, less its leading context pointer); `None` when the kernel
    /// has no such tracepoint.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let types = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .ok()?;
        let Type::Typedef(td) = types.into_iter().find(|t| matches!(t, Type::Typedef(_)))? else {
            return None;
        };
        let Type::Ptr(p) = self.btf.resolve_chained_type(&td).ok()? else {
            return None;
        };
        match self.btf.resolve_chained_type(&p).ok()? {
            Type::FuncProto(f) => Some(f.parameters.len().saturating_sub(1)),
            _ => None,
        }
    }

    /// Every offset the kernel programs use, and what this kernel offers. Offsets every
    /// program needs are errors when missing; one that serves a single feature only turns that
    /// feature off, with the reason.
    pub fn resolve(&self) -> Result<Resolved, BtfError> {
        let skc = |f: &str| self.offset_of("sock_common", f);
        let mut o = Offsets {
            timer_function: self.offset_of("timer_list", "function")?,
            timer_expires: self.offset_of("timer_list", "expires")?,
            tw_timer: self.offset_of("inet_timewait_sock", "tw_timer")?,
            tw_substate: self.offset_of("inet_timewait_sock", "tw_substate")?,
            rsk_timer: self.offset_of("request_sock", "rsk_timer")?,
            skc_daddr: skc("skc_daddr")?,
            skc_rcv_saddr: skc("skc_rcv_saddr")?,
            skc_dport: skc("skc_dport")?,
            skc_num: skc("skc_num")?,
            skc_family: skc("skc_family")?,
            skc_state: skc("skc_state")?,
            skc_net: self.offset_of_any("sock_common", &["skc_net.net", "skc_net"])?,
            skc_v6_daddr: skc("skc_v6_daddr")?,
            skc_v6_rcv_saddr: skc("skc_v6_rcv_saddr")?,
            skc_cookie: skc("skc_cookie")?,
            inet_sport: self.offset_of("inet_sock", "inet_sport")?,
            sk_protocol: self.offset_of("sock", "sk_protocol")?,
            sk_max_ack_backlog: self.offset_of("sock", "sk_max_ack_backlog")?,
            net_inum: self.offset_of("net", "ns.inum")?,
            ..Offsets::default()
        };
        check_block(&o)?;
        let mut r = Resolved {
            off: o,
            features: 0,
            tw_count_bias: 1,
            missing: Vec::new(),
            bind_missing: None,
        };
        let lacks = |r: &mut Resolved, f: u32, why: String| r.missing.push((f, why));
        // The helper that assigns a socket its cookie, callable from tracing programs.
        if self.has_func("bpf_get_socket_ptr_cookie") {
            r.features |= feature::SOCKET_COOKIE;
        } else {
            lacks(
                &mut r,
                feature::SOCKET_COOKIE,
                "tracing programs cannot call bpf_get_socket_cookie (Linux 5.12): connections are keyed by their 4-tuple".into(),
            );
        }
        // `struct net`'s own reference count: 0 while the namespace is destroyed.
        match self.offset_of_any("net", &["ns.__ns_ref", "ns.count", "count"]) {
            Ok(off) => {
                o.net_ns_refcount = off;
                r.features |= feature::NETNS_REFCOUNT;
            }
            Err(e) => lacks(&mut r, feature::NETNS_REFCOUNT, e.to_string()),
        }
        // The TIME_WAIT bucket count: a refcount_t one above the count from 5.17, a plain
        // count before.
        let dr = "ipv4.tcp_death_row";
        let count = self
            .offset_of("net", &format!("{dr}.tw_refcount"))
            .map(|o| (o, 1))
            .or_else(|_| {
                self.offset_of("net", &format!("{dr}.tw_count"))
                    .map(|o| (o, 0))
            });
        let max = self.offset_of("net", &format!("{dr}.sysctl_max_tw_buckets"));
        match (count, max) {
            (Ok((count, bias)), Ok(max)) => {
                o.net_tw_refcount = count;
                o.net_max_tw_buckets = max;
                r.tw_count_bias = bias;
                r.features |= feature::TW_BUCKETS;
            }
            (Err(e), _) | (_, Err(e)) => lacks(&mut r, feature::TW_BUCKETS, e.to_string()),
        }
        // From 6.10 tcp_send_reset has a `reason` and fires for TIME_WAIT sockets too.
        match self.tracepoint_args("tcp_send_reset") {
            Some(n) if n >= 3 => r.features |= feature::TW_RESET_TRACE,
            _ => lacks(
                &mut r,
                feature::TW_RESET_TRACE,
                "tcp_send_reset does not fire for TIME_WAIT sockets (Linux 6.10): a RST a TIME_WAIT sends is inferred from its cancelled timer".into(),
            ),
        }
        // From a file descriptor to its socket, for bind(): only that hook needs them.
        let fd_path: Result<[u32; 7], BtfError> = (|| {
            Ok([
                self.offset_of("task_struct", "files")?,
                self.offset_of("files_struct", "fdt")?,
                self.offset_of("fdtable", "max_fds")?,
                self.offset_of("fdtable", "fd")?,
                self.offset_of("file", "private_data")?,
                self.offset_of("socket", "file")?,
                self.offset_of("socket", "sk")?,
            ])
        })();
        match fd_path {
            Ok([a, b, c, d, e, f, g]) => {
                (o.task_files, o.files_fdt, o.fdtable_max_fds, o.fdtable_fd) = (a, b, c, d);
                (o.file_private_data, o.socket_file, o.socket_sk) = (e, f, g);
            }
            Err(e) => r.bind_missing = Some(e.to_string()),
        }
        r.off = o;
        Ok(r)
    }
}

/// What [`KernelBtf::resolve`] found.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub off: Offsets,
    /// `twtrace_ebpf::feature` bits.
    pub features: u32,
    pub tw_count_bias: u32,
    /// Features this kernel lacks, each with the reason.
    pub missing: Vec<(u32, String)>,
    /// Why the bind() hook cannot run, when its offsets were not found.
    pub bind_missing: Option<String>,
}

/// The `sock_common` fields the programs read from their one block read, with their sizes.
fn check_block(o: &Offsets) -> Result<(), BtfError> {
    let fields = [
        ("skc_daddr", o.skc_daddr, 4),
        ("skc_rcv_saddr", o.skc_rcv_saddr, 4),
        ("skc_dport", o.skc_dport, 2),
        ("skc_num", o.skc_num, 2),
        ("skc_family", o.skc_family, 2),
        ("skc_net", o.skc_net, 8),
        ("skc_v6_daddr", o.skc_v6_daddr, 16),
        ("skc_v6_rcv_saddr", o.skc_v6_rcv_saddr, 16),
        ("skc_cookie", o.skc_cookie, 8),
    ];
    for (field, offset, size) in fields {
        if offset as usize + size > SKC_BLOCK {
            return Err(BtfError::Layout {
                field,
                offset,
                max: SKC_BLOCK,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF, when this machine has one; tests skip otherwise.
    fn kernel() -> Option<KernelBtf> {
        let p = Path::new("/sys/kernel/btf/vmlinux");
        if !p.exists() {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this machine");
            return None;
        }
        Some(KernelBtf::load(p).expect("BTF parses"))
    }

    #[test]
    fn resolves_every_offset_consistently() {
        let Some(k) = kernel() else { return };
        let r = k.resolve().expect("all offsets resolve");
        let o = r.off;
        // sock_common starts every socket kind: daddr and rcv_saddr are adjacent (addrpair).
        assert_eq!(o.skc_rcv_saddr, o.skc_daddr + 4);
        assert_eq!(o.skc_num, o.skc_dport + 2);
        assert!(o.skc_cookie > o.skc_family);
        // tw_timer lies inside inet_timewait_sock, after its sock_common.
        assert!(o.tw_timer > o.skc_cookie);
        assert!(o.timer_function > o.timer_expires);
    }

    #[test]
    fn fields_beyond_the_block_are_refused() {
        let o = Offsets {
            skc_v6_rcv_saddr: SKC_BLOCK as u32 - 8,
            ..Offsets::default()
        };
        assert!(matches!(
            check_block(&o),
            Err(BtfError::Layout {
                field: "skc_v6_rcv_saddr",
                ..
            })
        ));
        assert!(check_block(&Offsets::default()).is_ok());
    }

    #[test]
    fn unknown_member_is_an_error() {
        let Some(k) = kernel() else { return };
        assert!(matches!(
            k.offset_of("sock_common", "no_such_field"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            k.offset_of("no_such_struct_xyz", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }
}
