//! twtrace's own pid namespace. Pids are shown and filtered as twtrace sees them (`-p` takes
//! what `ps` prints beside it), so inside a container they are the container's pids; the
//! kernel programs translate with `bpf_get_ns_current_pid_tgid`, which needs the namespace's
//! device and inode.

use std::{fs, io, os::unix::fs::MetadataExt};

const OWN: &str = "/proc/self/ns/pid";

/// The initial pid namespace's inode number: a constant of the kernel (`PROC_PID_INIT_INO`,
/// include/linux/proc_ns.h, since 3.8), which systemd's `namespace_is_init()` relies on too.
const INIT_INO: u64 = 0xEFFF_FFFC;

#[derive(Debug, thiserror::Error)]
#[error("cannot read twtrace's pid namespace ({OWN}): {0}; is /proc mounted?")]
pub struct PidNsError(#[from] io::Error);

/// (device, inode) of twtrace's pid namespace as the kernel names them, or `None` in the
/// initial namespace, where every task's tgid is its pid as twtrace sees it.
pub fn own() -> Result<Option<(u64, u64)>, PidNsError> {
    let m = fs::metadata(OWN)?;
    if m.ino() == INIT_INO {
        return Ok(None);
    }
    Ok(Some((kernel_dev(m.dev()), m.ino())))
}

/// A userspace `st_dev` in the kernel's internal encoding (`MKDEV`: major << 20 | minor),
/// which the helper compares with the nsfs superblock's device.
fn kernel_dev(dev: u64) -> u64 {
    (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
}

/// Whether /proc shows twtrace's own pid namespace (it may be another's: `unshare -p`
/// without remounting /proc), so that `/proc/PID` names the process twtrace calls PID.
pub fn proc_is_own() -> bool {
    fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        == Some(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_take_the_kernels_encoding() {
        // Userspace encodes minor bits above 8 high; the kernel keeps 20 bits of minor.
        assert_eq!(kernel_dev(libc::makedev(0, 4)), 4);
        assert_eq!(kernel_dev(libc::makedev(0, 300)), 300);
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
    }
}
