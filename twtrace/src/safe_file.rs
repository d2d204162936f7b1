//! Files twtrace creates, safely when run as root in a directory a user can write.
//!
//! `sudo twtrace record -o ~/out.twt` writes into a directory its user controls, who may plant
//! symbolic links or swap names at any moment. So:
//! - the directory is opened once, component by component with `O_NOFOLLOW`; a symbolic link
//!   on the way is followed only where nobody but root (or whoever runs twtrace) could have put
//!   it; every later step is relative to that directory's fd, so renaming or replacing the
//!   directory afterwards changes nothing;
//! - a file is created with `O_CREAT|O_EXCL|O_NOFOLLOW`: never through a link, never an
//!   existing file; an existing name is refused, or with [`Existing::Replace`] a new file is
//!   created under a random name and renamed over it (atomic; a hard link elsewhere to the
//!   old file keeps the old contents);
//! - owner (`SUDO_UID`/`SUDO_GID` under sudo) and mode 0600 are set on the open fd, never by
//!   path;
//! - rotation renames within the directory fd: `rename` moves or replaces names, links
//!   included, and follows none.

use std::{
    ffi::{OsStr, OsString},
    fs::File,
    io,
    os::{fd::OwnedFd, unix::ffi::OsStrExt},
    path::{Component, Path},
};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};

/// What to do when the output name exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse it ([`SafeFileError::Exists`]).
    Refuse,
    /// Replace it atomically (a regular file only; never a symbolic link).
    Replace,
}

/// Owner for the files created: `(uid, gid)`, or `None` to keep the creator's.
pub type Owner = Option<(u32, u32)>;

#[derive(Debug, thiserror::Error)]
pub enum SafeFileError {
    #[error("{path} exists: choose another path, or pass --force to replace it")]
    Exists { path: String },
    #[error(
        "{path} is a symbolic link: twtrace does not write through links, not even with --force; remove it or choose another path"
    )]
    Symlink { path: String },
    #[error("{path} exists and is not a regular file: choose another path")]
    NotAFile { path: String },
    #[error(
        "{path}: {link} is a symbolic link in a directory others can write, which twtrace does not follow: give the path without it (see `realpath`)"
    )]
    LinkInPath { path: String, link: String },
    #[error("{path}: not a file name")]
    NoName { path: String },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
}

impl SafeFileError {
    /// A choice the user can correct (another path, --force), not a failure of the system.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }
}

/// Symbolic links followed while opening a directory, at most (the kernel's limit).
const MAX_LINKS: u32 = 40;
/// Attempts at a fresh temporary name before giving up.
const TEMP_TRIES: u32 = 16;

/// A file to create: its directory, opened once, and its name in it.
pub struct Target {
    dir: OwnedFd,
    name: OsString,
    /// The path as the user gave it, for messages.
    shown: String,
}

impl Target {
    /// Opens the directory of `path` (see the module's rules); creates nothing yet.
    pub fn new(path: &Path) -> Result<Self, SafeFileError> {
        let shown = path.display().to_string();
        let name = match path.components().next_back() {
            Some(Component::Normal(n)) if !path.as_os_str().as_bytes().ends_with(b"/") => {
                n.to_os_string()
            }
            _ => return Err(SafeFileError::NoName { path: shown }),
        };
        let parent = path.parent().unwrap_or(Path::new(""));
        let start = open_dir(CWD, if path.is_absolute() { "/" } else { "." })
            .map_err(|e| io_error(&shown, e))?;
        let mut links = MAX_LINKS;
        let dir = walk(start, parent, &mut links, &shown)?;
        Ok(Self { dir, name, shown })
    }

    /// Whether creating with `existing` would be refused now (a check before slow work;
    /// [`Target::create`] checks again as it creates).
    pub fn check(&self, existing: Existing) -> Result<(), SafeFileError> {
        match self.kind(&self.name)? {
            None => Ok(()),
            Some(FileType::Symlink) => Err(SafeFileError::Symlink {
                path: self.shown.clone(),
            }),
            Some(FileType::RegularFile) if existing == Existing::Replace => Ok(()),
            Some(FileType::RegularFile) => Err(SafeFileError::Exists {
                path: self.shown.clone(),
            }),
            Some(_) => Err(SafeFileError::NotAFile {
                path: self.shown.clone(),
            }),
        }
    }

    /// Creates the file, mode 0600, owned by `owner`: new (`O_EXCL`), or with
    /// [`Existing::Replace`] renamed over a regular file of that name.
    pub fn create(&self, existing: Existing, owner: Owner) -> Result<File, SafeFileError> {
        self.check(existing)?;
        if existing == Existing::Refuse {
            return match self.create_exclusive(&self.name, owner) {
                Err(SafeFileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    // Planted since the check: say what is there.
                    self.check(existing)?;
                    Err(SafeFileError::Exists {
                        path: self.shown.clone(),
                    })
                }
                r => r,
            };
        }
        let (file, temp) = self.create_temp(owner)?;
        self.commit(&temp, &self.name)?;
        Ok(file)
    }

    /// Starts a new file and moves the current one to NAME.1, NAME.1 to NAME.2 and so on,
    /// dropping NAME.`keep` (with `keep` 0 the current one is dropped). Returns the new file.
    pub fn rotate(&self, keep: u32, owner: Owner) -> Result<File, SafeFileError> {
        let (file, temp) = self.create_temp(owner)?;
        let numbered = |i: u32| {
            let mut n = self.name.clone();
            n.push(format!(".{i}"));
            n
        };
        if keep > 0 {
            // Best effort, as a missing or odd older file must not stop the recording: each
            // rename or unlink acts on a name in our directory and follows no link.
            let _ = rustix::fs::unlinkat(&self.dir, numbered(keep).as_os_str(), AtFlags::empty());
            for i in (1..keep).rev() {
                let _ = rustix::fs::renameat(
                    &self.dir,
                    numbered(i).as_os_str(),
                    &self.dir,
                    numbered(i + 1).as_os_str(),
                );
            }
            match rustix::fs::renameat(
                &self.dir,
                self.name.as_os_str(),
                &self.dir,
                numbered(1).as_os_str(),
            ) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => {
                    let _ = rustix::fs::unlinkat(&self.dir, &temp, AtFlags::empty());
                    return Err(io_error(&self.shown, e));
                }
            }
        }
        self.commit(&temp, &self.name)?;
        Ok(file)
    }

    /// Renames `temp` over `name` (replacing whatever is there, a link included, without
    /// following it); removes `temp` if that fails.
    fn commit(&self, temp: &OsStr, name: &OsStr) -> Result<(), SafeFileError> {
        rustix::fs::renameat(&self.dir, temp, &self.dir, name).map_err(|e| {
            let _ = rustix::fs::unlinkat(&self.dir, temp, AtFlags::empty());
            io_error(&self.shown, e)
        })
    }

    /// A new file under a random name beside the target: `.NAME.XXXXXXXXXXXXXXXX`.
    fn create_temp(&self, owner: Owner) -> Result<(File, OsString), SafeFileError> {
        let mut last = None;
        for _ in 0..TEMP_TRIES {
            let mut bytes = [0u8; 8];
            rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())
                .map_err(|e| io_error(&self.shown, e))?;
            let mut temp = OsString::from(".");
            temp.push(&self.name);
            temp.push(format!(".{:016x}", u64::from_ne_bytes(bytes)));
            match self.create_exclusive(&temp, owner) {
                Ok(f) => return Ok((f, temp)),
                Err(SafeFileError::Io { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    last = Some(source)
                }
                Err(e) => return Err(e),
            }
        }
        Err(SafeFileError::Io {
            path: self.shown.clone(),
            source: last.unwrap_or_else(|| io::Error::other("no free temporary name")),
        })
    }

    /// `O_CREAT|O_EXCL|O_NOFOLLOW` in our directory, then owner and mode through the fd.
    fn create_exclusive(&self, name: &OsStr, owner: Owner) -> Result<File, SafeFileError> {
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::RUSR | Mode::WUSR,
        )
        .map_err(|e| io_error(&self.shown, e))?;
        let set = || -> rustix::io::Result<()> {
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(
                    &fd,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )?;
            }
            // After the chown, and whatever the umask took away.
            rustix::fs::fchmod(&fd, Mode::RUSR | Mode::WUSR)
        };
        if let Err(e) = set() {
            drop(fd);
            let _ = rustix::fs::unlinkat(&self.dir, name, AtFlags::empty());
            return Err(io_error(&self.shown, e));
        }
        Ok(File::from(fd))
    }

    /// What `name` is in our directory, without following a link.
    fn kind(&self, name: &OsStr) -> Result<Option<FileType>, SafeFileError> {
        match rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(io_error(&self.shown, e)),
        }
    }
}

/// The directory fd: `O_PATH` (needs search permission only), never a link itself.
fn open_dir<Fd: std::os::fd::AsFd>(
    at: Fd,
    name: impl rustix::path::Arg,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        at,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens `path` from `cur` component by component. A symbolic link is followed (its target
/// walked by the same rule) only in a directory that nobody but root or the current user can
/// write: anywhere else someone else could have planted it.
fn walk(
    mut cur: OwnedFd,
    path: &Path,
    links: &mut u32,
    shown: &str,
) -> Result<OwnedFd, SafeFileError> {
    for c in path.components() {
        let name = match c {
            Component::RootDir => {
                cur = open_dir(CWD, "/").map_err(|e| io_error(shown, e))?;
                continue;
            }
            Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(n) => n,
        };
        match open_dir(&cur, name) {
            Ok(fd) => cur = fd,
            Err(e @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) => {
                let st = rustix::fs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io_error(shown, e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                    return Err(io_error(shown, e));
                }
                if !only_we_write(&cur).map_err(|e| io_error(shown, e))? {
                    return Err(SafeFileError::LinkInPath {
                        path: shown.to_string(),
                        link: name.to_string_lossy().into_owned(),
                    });
                }
                if *links == 0 {
                    return Err(io_error(shown, rustix::io::Errno::LOOP));
                }
                *links -= 1;
                let target = rustix::fs::readlinkat(&cur, name, Vec::new())
                    .map_err(|e| io_error(shown, e))?;
                let target = Path::new(OsStr::from_bytes(target.as_bytes())).to_path_buf();
                cur = walk(cur, &target, links, shown)?;
            }
            Err(e) => return Err(io_error(shown, e)),
        }
    }
    Ok(cur)
}

/// The directory is owned by root or by us, and neither its group nor others may write it.
fn only_we_write(dir: &OwnedFd) -> rustix::io::Result<bool> {
    let st = rustix::fs::fstat(dir)?;
    let owner_ok = st.st_uid == 0 || st.st_uid == rustix::process::geteuid().as_raw();
    Ok(owner_ok && st.st_mode & 0o022 == 0)
}

fn io_error(path: &str, e: rustix::io::Errno) -> SafeFileError {
    SafeFileError::Io {
        path: path.to_string(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        fs,
        io::Write,
        os::unix::fs::{MetadataExt, PermissionsExt, symlink},
        path::PathBuf,
    };

    /// A fresh directory for one test, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("twtrace-safe-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
            Self(p)
        }

        fn join(&self, n: &str) -> PathBuf {
            self.0.join(n)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn create(p: &Path, existing: Existing) -> Result<File, SafeFileError> {
        Target::new(p)?.create(existing, None)
    }

    #[test]
    fn creates_a_new_file_mode_0600() {
        let d = TempDir::new("mode");
        let p = d.join("out.twt");
        create(&p, Existing::Refuse)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        let m = fs::symlink_metadata(&p).unwrap();
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        assert_eq!(m.uid(), rustix::process::geteuid().as_raw());
    }

    #[test]
    fn owner_is_set_through_the_fd() {
        let d = TempDir::new("owner");
        let p = d.join("out.twt");
        // Unprivileged, the only owner we may give is our own: the call path is what is tested
        // here; the root test gives another user's.
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        Target::new(&p)
            .unwrap()
            .create(Existing::Refuse, Some(me))
            .unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), me);
    }

    #[test]
    fn an_existing_file_is_refused_and_left_alone() {
        let d = TempDir::new("exists");
        let p = d.join("out.twt");
        fs::write(&p, b"evidence").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = create(&p, Existing::Refuse).err().unwrap();
        assert!(matches!(e, SafeFileError::Exists { .. }), "{e}");
        assert!(e.is_usage());
        assert_eq!(
            e.to_string(),
            format!(
                "{} exists: choose another path, or pass --force to replace it",
                p.display()
            )
        );
        assert_eq!(fs::read(&p).unwrap(), b"evidence");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn a_symlink_is_refused_even_with_replace() {
        let d = TempDir::new("link");
        let target = d.join("precious");
        fs::write(&target, b"root's").unwrap();
        let p = d.join("out.twt");
        symlink(&target, &p).unwrap();
        for existing in [Existing::Refuse, Existing::Replace] {
            let e = create(&p, existing).err().unwrap();
            assert!(matches!(e, SafeFileError::Symlink { .. }), "{e}");
            assert!(e.to_string().contains("not even with --force"), "{e}");
        }
        // A dangling link too: O_CREAT would otherwise create its target.
        let dangling = d.join("dangling.twt");
        symlink(d.join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            create(&dangling, Existing::Refuse),
            Err(SafeFileError::Symlink { .. })
        ));
        assert!(!d.join("nowhere").exists());
        assert_eq!(fs::read(&target).unwrap(), b"root's");
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_symlink());
    }

    #[test]
    fn exclusive_create_refuses_a_link_planted_after_the_check() {
        let d = TempDir::new("race");
        let target = d.join("precious");
        fs::write(&target, b"root's").unwrap();
        let p = d.join("out.twt");
        let t = Target::new(&p).unwrap();
        t.check(Existing::Refuse).unwrap();
        symlink(&target, &p).unwrap();
        assert!(matches!(
            t.create(Existing::Refuse, None),
            Err(SafeFileError::Symlink { .. })
        ));
        assert_eq!(fs::read(&target).unwrap(), b"root's");
    }

    #[test]
    fn replace_is_atomic_and_spares_a_hard_link() {
        let d = TempDir::new("force");
        let p = d.join("out.twt");
        let other = d.join("other-name");
        fs::write(&p, b"old recording").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        fs::hard_link(&p, &other).unwrap();
        let mut f = create(&p, Existing::Replace).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
        assert_eq!(fs::read(&other).unwrap(), b"old recording");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_ne!(
            fs::metadata(&p).unwrap().ino(),
            fs::metadata(&other).unwrap().ino()
        );
        // No temporary file left behind.
        let names: Vec<_> = fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn replace_refuses_what_is_not_a_regular_file() {
        let d = TempDir::new("dir");
        let p = d.join("out.twt");
        fs::create_dir(&p).unwrap();
        assert!(matches!(
            create(&p, Existing::Replace),
            Err(SafeFileError::NotAFile { .. })
        ));
    }

    #[test]
    fn a_link_in_a_directory_others_can_write_is_not_followed() {
        let d = TempDir::new("dirlink");
        let elsewhere = d.join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        let open = d.join("open");
        fs::create_dir(&open).unwrap();
        symlink(&elsewhere, open.join("sub")).unwrap();
        let p = open.join("sub/out.twt");
        // Our own directory, writable by us only: the link is ours to follow.
        create(&p, Existing::Refuse).unwrap();
        assert!(elsewhere.join("out.twt").exists());
        // Anyone may write the directory: anyone could have planted the link.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Target::new(&open.join("sub/new.twt")).err().unwrap();
        assert!(matches!(e, SafeFileError::LinkInPath { .. }), "{e}");
        assert!(!elsewhere.join("new.twt").exists());
    }

    #[test]
    fn rotation_shifts_names_and_replaces_planted_links_without_following_them() {
        let d = TempDir::new("rotate");
        let target = d.join("precious");
        fs::write(&target, b"root's").unwrap();
        let p = d.join("r.twt");
        let t = Target::new(&p).unwrap();
        let mut f = t.create(Existing::Refuse, None).unwrap();
        for round in 1..=4u8 {
            f.write_all(&[b'0' + round]).unwrap();
            // The user who owns the directory plants links where the rotation is about to
            // rename (removing what was there).
            for n in ["r.twt.1", "r.twt.2", "r.twt.3"] {
                let _ = fs::remove_file(d.join(n));
                symlink(&target, d.join(n)).unwrap();
            }
            f = t.rotate(2, None).unwrap();
        }
        f.write_all(b"5").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"root's");
        assert_eq!(fs::read(&p).unwrap(), b"5");
        assert_eq!(fs::read(d.join("r.twt.1")).unwrap(), b"4");
        // r.twt.2 is the link planted at r.twt.1 before the last rotation, moved (not
        // followed); r.twt.3 is the user's own, untouched.
        assert!(
            fs::symlink_metadata(d.join("r.twt.2"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        for n in ["r.twt", "r.twt.1"] {
            let m = fs::symlink_metadata(d.join(n)).unwrap();
            assert!(m.is_file());
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn a_directory_or_empty_name_is_not_a_file_name() {
        for p in ["/", "dir/", "..", "."] {
            assert!(
                matches!(Target::new(Path::new(p)), Err(SafeFileError::NoName { .. })),
                "{p}"
            );
        }
    }
}
