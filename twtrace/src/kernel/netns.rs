//! Network namespaces: naming them, finding them all, and running code inside one.

use std::{
    collections::BTreeMap,
    fs, io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use super::privilege::{Cap, Effective};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "no network namespace {0:?}: give an inode number (see `ls -L -i /proc/PID/ns/net`), a name from `ip netns list`, or a path"
    )]
    NotFound(String),
    #[error(
        "--netns {spec:?}: {why}; give an `ip netns` name, /proc/PID/ns/net or an inode number"
    )]
    NotNetns { spec: String, why: String },
}

/// `ioctl(NS_GET_NSTYPE)` (linux/nsfs.h, `_IO(0xb7, 0x3)`, Linux 4.11): the kind of a
/// namespace file.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

/// A network namespace and a path that opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u32,
    pub path: PathBuf,
}

fn inode_of(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.ino() as u32)
}

/// Inode of the namespace twtrace itself runs in.
pub fn own() -> Option<u32> {
    inode_of(Path::new("/proc/self/ns/net"))
}

/// Resolves `--netns`: an inode number, a name under /run/netns, or a path to an nsfs file.
pub fn resolve(spec: &str) -> Result<u32, NetnsError> {
    if let Ok(n) = spec.parse::<u32>() {
        return Ok(n);
    }
    let named = Path::new("/run/netns").join(spec);
    let path = [named.as_path(), Path::new(spec)]
        .into_iter()
        .find(|p| p.exists())
        .ok_or_else(|| NetnsError::NotFound(spec.to_string()))?;
    net_ns_inode(path).map_err(|why| NetnsError::NotNetns {
        spec: spec.to_string(),
        why,
    })
}

/// The inode of the network namespace file at `path`; why not, when it is none (any file can
/// be named, and its inode would silently filter everything out).
fn net_ns_inode(path: &Path) -> Result<u32, String> {
    let f = fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's file.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE) };
    if kind < 0 {
        return Err("not a namespace file".into());
    }
    if kind != libc::CLONE_NEWNET {
        return Err("a namespace, but not a network namespace".into());
    }
    let m = f.metadata().map_err(|e| e.to_string())?;
    Ok(m.ino() as u32)
}

/// Every network namespace reachable now: the named ones (`ip netns`) and those of running
/// processes. A namespace held only by a socket or a bind mount elsewhere is not found.
pub fn enumerate() -> Vec<Netns> {
    let mut found: BTreeMap<u32, PathBuf> = BTreeMap::new();
    let mut add = |path: PathBuf| {
        if let Some(ino) = inode_of(&path) {
            found.entry(ino).or_insert(path);
        }
    };
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(rd) = fs::read_dir(dir) {
            rd.flatten().for_each(|e| add(e.path()));
        }
    }
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    found
        .into_iter()
        .map(|(inode, path)| Netns { inode, path })
        .collect()
}

/// The namespaces of [`enumerate`] this process can join: all of them with CAP_SYS_ADMIN
/// (setns needs it), else only its own.
pub fn joinable() -> Vec<Netns> {
    let all = enumerate();
    if Effective::current().has(Cap::SysAdmin) {
        return all;
    }
    let own = own();
    all.into_iter().filter(|n| Some(n.inode) == own).collect()
}

/// Runs `f` on a thread that has joined the namespace at `path`; the caller's is untouched.
/// In the caller's own namespace nothing is joined (setns would need CAP_SYS_ADMIN).
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let file = fs::File::open(path)?;
    std::thread::spawn(move || {
        let id = |m: &fs::Metadata| (m.dev(), m.ino());
        let here = fs::metadata("/proc/thread-self/ns/net").map(|m| id(&m));
        let there = file.metadata().map(|m| id(&m));
        let joined = matches!((here, there), (Ok(a), Ok(b)) if a == b);
        if !joined && unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns worker panicked"))?
}

/// Reads a sysctl as seen from the namespace at `path` (e.g. "net/ipv4/tcp_tw_reuse").
pub fn sysctl_in(path: &Path, key: &str) -> io::Result<String> {
    let key = format!("/proc/sys/{key}");
    run_in(path, move || {
        Ok(fs::read_to_string(key)?.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_numbers_and_rejects_unknown_names() {
        assert_eq!(resolve("4026531840").unwrap(), 4026531840);
        assert!(matches!(
            resolve("twtrace-no-such-netns"),
            Err(NetnsError::NotFound(_))
        ));
    }

    #[test]
    fn own_namespace_is_enumerated() {
        let Some(me) = own() else { return };
        assert!(enumerate().iter().any(|n| n.inode == me));
    }
}
