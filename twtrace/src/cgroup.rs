//! cgroup v2 ids -> paths. A cgroup's id is the inode number of its directory, so the path is
//! found by walking /sys/fs/cgroup; results are cached and the walk is rate-limited.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const ROOT: &str = "/sys/fs/cgroup";
const RESCAN_EVERY: Duration = Duration::from_secs(2);
const MAX_DIRS: usize = 100_000;

pub struct CgroupNames {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl Default for CgroupNames {
    fn default() -> Self {
        Self::with_root(Path::new(ROOT))
    }
}

impl CgroupNames {
    pub fn with_root(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            by_id: HashMap::new(),
            last_scan: None,
        }
    }

    /// The container or unit of cgroup `id` if its path shows one, else its path.
    pub fn display(&mut self, id: u64) -> Option<String> {
        let path = self.path(id)?;
        Some(container_of(path).unwrap_or_else(|| path.to_string()))
    }

    /// The path of cgroup `id` below the cgroup root ("/system.slice/nginx.service"), if known.
    pub fn path(&mut self, id: u64) -> Option<&str> {
        if id == 0 {
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
        let mut stack = vec![self.root.clone()];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                break;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let rel = dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
            let path = crate::text::printable_bytes(rel.as_os_str().as_encoded_bytes());
            self.by_id.insert(meta.ino(), format!("/{path}"));
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
        fs::remove_dir_all(&dir).unwrap();
    }
}
