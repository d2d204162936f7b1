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
            self.by_id.insert(meta.ino(), format!("/{}", rel.display()));
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

#[cfg(test)]
mod tests {
    use super::*;

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
