//! Struct offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE relocations, so the kernel programs cannot ask the loader to fix up
//! field accesses. Instead every offset they need is resolved here, from
//! `/sys/kernel/btf/vmlinux`, and handed to them in `Config`. Nothing is hard-coded.

use std::path::Path;

use btf_rs::{Btf, Type};
use twtrace_ebpf::{Offsets, SKC_BLOCK};

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

    /// Every offset the kernel programs use.
    pub fn offsets(&self) -> Result<Offsets, BtfError> {
        let skc = |f: &str| self.offset_of("sock_common", f);
        let o = Offsets {
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
            net_ns_refcount: self.offset_of_any("net", &["ns.__ns_ref", "ns.count"])?,
            net_tw_refcount: self.offset_of("net", "ipv4.tcp_death_row.tw_refcount")?,
            net_max_tw_buckets: self
                .offset_of("net", "ipv4.tcp_death_row.sysctl_max_tw_buckets")?,
            task_files: self.offset_of("task_struct", "files")?,
            files_fdt: self.offset_of("files_struct", "fdt")?,
            fdtable_max_fds: self.offset_of("fdtable", "max_fds")?,
            fdtable_fd: self.offset_of("fdtable", "fd")?,
            file_private_data: self.offset_of("file", "private_data")?,
            socket_file: self.offset_of("socket", "file")?,
            socket_sk: self.offset_of("socket", "sk")?,
            // Filled from tracefs when the bind hooks are attached.
            tp_bind_fd: 0,
            tp_bind_addr: 0,
            tp_exit_ret: 0,
        };
        check_block(&o)?;
        Ok(o)
    }
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
        let o = k.offsets().expect("all offsets resolve");
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
