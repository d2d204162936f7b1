//! cgroup v2 ids -> paths. A cgroup's id is the inode number of its directory in the unified
//! (v2) hierarchy, so the path is found by walking that hierarchy's mount, and only that one:
//! on a hybrid host the v1 hierarchies are mounted beside it, and every hierarchy's root is
//! inode 1 too. Results are cached and the walk is rate-limited.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const MOUNTINFO: &str = "/proc/self/mountinfo";
const RESCAN_EVERY: Duration = Duration::from_secs(2);
const MAX_DIRS: usize = 100_000;
/// Paths longer than this (in characters) are cut: they come from the traced system.
const MAX_PATH_CHARS: usize = 512;

pub struct CgroupNames {
    /// The cgroup2 mount point, and the path of its root within the hierarchy ("/" unless a
    /// subtree is mounted, as in a container's cgroup namespace). `None`: no cgroup2 mount
    /// (a pure v1 host), so every cgroup is unknown.
    mount: Option<(PathBuf, String)>,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl Default for CgroupNames {
    /// The unified hierarchy as mounted in twtrace's mount namespace.
    fn default() -> Self {
        let mount = fs::read_to_string(MOUNTINFO)
            .ok()
            .and_then(|m| cgroup2_mount(&m));
        if mount.is_none() {
            log::info!("no cgroup2 mount in {MOUNTINFO}: cgroups are shown as unknown");
        }
        Self {
            mount,
            by_id: HashMap::new(),
            last_scan: None,
        }
    }
}

impl CgroupNames {
    /// A hierarchy mounted at `root`.
    pub fn with_root(root: &Path) -> Self {
        Self {
            mount: Some((root.to_path_buf(), "/".into())),
            by_id: HashMap::new(),
            last_scan: None,
        }
    }

    /// The name every view shows for cgroup `id` (see [`name`]); `None` when unknown.
    pub fn display(&mut self, id: u64) -> Option<String> {
        self.path(id).map(name)
    }

    /// The path of cgroup `id` in the unified hierarchy ("/system.slice/nginx.service"), if
    /// known. Printable and bounded.
    pub fn path(&mut self, id: u64) -> Option<&str> {
        if id == 0 || self.mount.is_none() {
            return None;
        }
        if !self.by_id.contains_key(&id)
            && self.last_scan.is_none_or(|t| t.elapsed() >= RESCAN_EVERY)
        {
            self.scan();
        }
        self.by_id.get(&id).map(String::as_str)
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some((root, prefix)) = &self.mount else {
            return;
        };
        // Only directories of the hierarchy itself: nothing mounted inside it.
        let Ok(dev) = fs::symlink_metadata(root).map(|m| m.dev()) else {
            return;
        };
        let mut stack = vec![root.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                break;
            }
            let Ok(meta) = fs::symlink_metadata(&dir) else {
                continue;
            };
            if !meta.is_dir() || meta.dev() != dev {
                continue;
            }
            let rel = dir.strip_prefix(root).unwrap_or(Path::new(""));
            let rel = String::from_utf8_lossy(rel.as_os_str().as_encoded_bytes());
            let path = match (prefix.trim_end_matches('/'), rel.is_empty()) {
                ("", true) => "/".to_string(),
                (p, true) => p.to_string(),
                (p, false) => format!("{p}/{rel}"),
            };
            self.by_id.insert(meta.ino(), bounded(&path));
            if let Ok(rd) = fs::read_dir(&dir) {
                stack.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
}

/// `path` made printable and cut to [`MAX_PATH_CHARS`].
fn bounded(path: &str) -> String {
    let p = crate::text::printable(path);
    if p.chars().count() <= MAX_PATH_CHARS {
        return p.into_owned();
    }
    let mut cut: String = p.chars().take(MAX_PATH_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The cgroup2 mount in a mountinfo table (proc(5)): its mount point and the root of the
/// hierarchy it shows. The first one when there are several.
pub fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut f = before.split(' ');
        let root = unescape(f.nth(3)?);
        let point = unescape(f.next()?);
        Some((PathBuf::from(point), root))
    })
}

/// mountinfo's octal escapes (`\040` for a space, `\134` for a backslash).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The one name every view and output gives a cgroup (trace's `container`, the live view's
/// CGROUP column, reports, metric labels): its container or unit when the path shows one
/// ([`container_of`]), else the path itself.
pub fn name(path: &str) -> String {
    container_of(path).unwrap_or_else(|| path.to_string())
}

/// A short container or unit name for a cgroup path, when the path shows one:
/// `docker:0123456789ab`, `pod:<uid>/containerd:0123456789ab`, `podman:…`, `nginx.service`.
pub fn container_of(path: &str) -> Option<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let short = |id: &str| id.chars().take(12).collect::<String>();
    // Kubernetes: the pod from a kubepods level, the container from the last component.
    let pod = parts.iter().find_map(|p| {
        let p = p.strip_suffix(".slice").unwrap_or(p);
        let uid = p
            .rsplit_once("-pod")
            .map(|(_, u)| u)
            .or_else(|| p.strip_prefix("pod"))?;
        (uid.len() >= 8).then(|| uid.replace('_', "-"))
    });
    let last = parts.last()?;
    let scope = last.strip_suffix(".scope").unwrap_or(last);
    let runtime = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("libpod-", "podman"),
    ]
    .iter()
    .find_map(|(prefix, name)| {
        scope
            .strip_prefix(prefix)
            .map(|id| format!("{name}:{}", short(id)))
    });
    // cgroupfs layouts: /docker/<id>, /kubepods/burstable/pod<uid>/<id>.
    let runtime = runtime.or_else(|| {
        let hex = last.len() >= 32 && last.chars().all(|c| c.is_ascii_hexdigit());
        if !hex {
            return None;
        }
        let parent = parts.iter().rev().nth(1).copied().unwrap_or("");
        Some(match parent {
            "docker" => format!("docker:{}", short(last)),
            _ => format!("container:{}", short(last)),
        })
    });
    match (pod, runtime) {
        (Some(pod), Some(c)) => Some(format!("pod:{pod}/{c}")),
        (Some(pod), None) => Some(format!("pod:{pod}")),
        (None, Some(c)) => Some(c),
        // systemd units: the innermost service (or scope of a user session).
        (None, None) => parts
            .iter()
            .rev()
            .find(|p| p.ends_with(".service"))
            .map(|s| s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_containers_and_units() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            container_of(&format!("/system.slice/docker-{id}.scope")).as_deref(),
            Some("docker:0123456789ab")
        );
        assert_eq!(
            container_of(&format!("/docker/{id}")).as_deref(),
            Some("docker:0123456789ab")
        );
        assert_eq!(
            container_of(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b3c4d_5e6f_7a8b_9c0d_1e2f3a4b5c6d.slice/cri-containerd-{id}.scope"
            ))
            .as_deref(),
            Some("pod:1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d/containerd:0123456789ab")
        );
        assert_eq!(
            container_of(&format!(
                "/kubepods/burstable/pod1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d/{id}"
            ))
            .as_deref(),
            Some("pod:1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d/container:0123456789ab")
        );
        assert_eq!(
            container_of(&format!("/machine.slice/libpod-{id}.scope")).as_deref(),
            Some("podman:0123456789ab")
        );
        assert_eq!(
            container_of("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            container_of("/user.slice/user-1000.slice/session-3.scope"),
            None
        );
        assert_eq!(container_of("/"), None);
    }

    #[test]
    fn resolves_directory_inodes_to_paths() {
        let dir = std::env::temp_dir().join(format!("twtrace-cg-{}", std::process::id()));
        let leaf = dir.join("system.slice/web.service");
        fs::create_dir_all(&leaf).unwrap();
        let id = fs::metadata(&leaf).unwrap().ino();
        let mut names = CgroupNames::with_root(&dir);
        assert_eq!(names.path(id), Some("/system.slice/web.service"));
        assert_eq!(names.path(0), None);
        assert_eq!(names.display(id).as_deref(), Some("web.service"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn finds_the_unified_hierarchy_among_v1_ones() {
        let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into()))
        );
        let container = "50 40 0:27 /kubepods/pod1 /sys/fs/cgroup\\040x ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(container),
            Some((PathBuf::from("/sys/fs/cgroup x"), "/kubepods/pod1".into()))
        );
        let v1_only = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        let mut none = CgroupNames {
            mount: None,
            by_id: HashMap::new(),
            last_scan: None,
        };
        assert_eq!(none.path(1), None);
    }

    #[test]
    fn one_name_for_every_view_and_bounded_paths() {
        assert_eq!(name("/system.slice/nginx.service"), "nginx.service");
        assert_eq!(name("/twtrace-test/leaf"), "/twtrace-test/leaf");
        assert_eq!(name("/"), "/");
        let long = format!("/{}", "a".repeat(2000));
        assert_eq!(bounded(&long).chars().count(), MAX_PATH_CHARS);
        assert_eq!(bounded("/a\x1b[2J"), "/a\\x1b[2J");
    }
}
