//! tracefs: where classic tracepoints (here syscalls:sys_*_bind) are named and described. BTF
//! tracepoints do not need it; only the bind() failure hooks do.

use std::{fs, io, path::Path};

pub const ROOT: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted at {ROOT} and twtrace could not mount it ({0}); as root, run: mount -t tracefs nodev {ROOT}"
    )]
    NotMounted(io::Error),
    #[error(
        "tracefs at {ROOT} is closed to this user (mode 0700, root's): run twtrace as root or grant it CAP_DAC_READ_SEARCH"
    )]
    Closed,
    #[error("cannot read tracepoint format {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("tracepoint {event} has no field {field}")]
    NoField { event: String, field: String },
}

/// The `f_type` of a tracefs mount.
const TRACEFS_MAGIC: u64 = 0x7472_6163;

/// Whether tracefs is mounted at [`ROOT`] (statfs needs no access to the directory itself).
pub fn is_mounted() -> bool {
    rustix::fs::statfs(ROOT).is_ok_and(|s| s.f_type as u64 == TRACEFS_MAGIC)
}

/// Makes sure tracefs is mounted and readable, mounting it if it is not (as root may).
pub fn ensure_mounted() -> Result<(), TracefsError> {
    match fs::metadata(Path::new(ROOT).join("events")) {
        Ok(m) if m.is_dir() => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(TracefsError::Closed),
        _ if is_mounted() => return Err(TracefsError::Closed),
        _ => {}
    }
    let src = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::NotMounted(io::Error::last_os_error()));
    }
    Ok(())
}

/// Byte offset of `field` in the records of tracepoint `category/event`.
pub fn field_offset(category: &str, event: &str, field: &str) -> Result<u32, TracefsError> {
    let path = format!("{ROOT}/events/{category}/{event}/format");
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    parse_offset(&text, field).ok_or_else(|| TracefsError::NoField {
        event: format!("{category}/{event}"),
        field: field.to_string(),
    })
}

fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        l.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))
            .and_then(|v| v.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTER: &str = "name: sys_enter_bind\nID: 2238\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;\n\
        \tfield:struct sockaddr * umyaddr;\toffset:24;\tsize:8;\tsigned:0;\n";

    #[test]
    fn finds_field_offsets() {
        assert_eq!(parse_offset(ENTER, "fd"), Some(16));
        assert_eq!(parse_offset(ENTER, "umyaddr"), Some(24));
        assert_eq!(parse_offset(ENTER, "common_type"), Some(0));
        assert_eq!(parse_offset(ENTER, "ret"), None);
    }
}
