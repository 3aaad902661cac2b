//! Sparse image files under a directory the daemon owns: `<root>/<uid>/<name>.img`,
//! root = `<state>/images`.
//!
//! Callers pass names, never paths: every name passes `names::check_file_name`, and every
//! open goes through `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` relative to an fd of
//! the per-uid directory (itself opened the same way relative to an fd of root), so a
//! planted symlink or `..` cannot lead outside. Directories are 0700 root, files 0600 owned
//! by the image's uid.
//!
//! Sizes: from 1 MiB ([`MIN_SIZE`]) to `Limits::max_size`, and a multiple of 512. A size
//! that is not a multiple is rejected rather than rounded, so the image is exactly what the
//! caller asked for. Per-uid limits count images and their apparent sizes (not the blocks
//! actually allocated; the files are sparse). Limit checks and creation are serialized by a
//! mutex in the store (one store per daemon).

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, ftruncate, unlinkat, Uid, UnlinkatFlags};

use super::{invalid, io_err, sys, LoopError, Result, SECTOR};
use crate::names::check_file_name;

/// Smallest image.
pub const MIN_SIZE: u64 = 1 << 20;
const SUFFIX: &str = ".img";

/// Limits on images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest single image, bytes.
    pub max_size: u64,
    /// Images per uid.
    pub max_count: u32,
    /// Sum of image sizes per uid, bytes.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size: 64 << 30,
            max_count: 32,
            max_total_bytes: 256 << 30,
        }
    }
}

/// One image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub uid: u32,
    pub name: String,
    /// Apparent size, bytes.
    pub size: u64,
    /// Blocks actually allocated, bytes.
    pub allocated: u64,
    /// (st_dev, st_ino): compare with `LoopInfo::{backing_dev, backing_inode}`.
    pub dev: u64,
    pub inode: u64,
    /// For display and state only; never opened by path.
    pub path: PathBuf,
}

/// Count and bytes of one uid's images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub count: u32,
    pub bytes: u64,
}

/// Check a requested image size against the limits. Pure.
pub fn check_size(size: u64, limits: &Limits) -> Result<()> {
    if size < MIN_SIZE {
        return Err(invalid(format!(
            "image size {size} is below the minimum of {MIN_SIZE} bytes (1 MiB)"
        )));
    }
    if size > limits.max_size {
        return Err(invalid(format!(
            "image size {size} is above the maximum of {} bytes",
            limits.max_size
        )));
    }
    if size % SECTOR != 0 {
        return Err(invalid(format!(
            "image size {size} is not a multiple of 512 bytes"
        )));
    }
    Ok(())
}

/// Check per-uid limits for one more image of `size`. Pure.
pub fn check_quota(uid: u32, usage: Usage, size: u64, limits: &Limits) -> Result<()> {
    if usage.count >= limits.max_count {
        return Err(LoopError::LimitExceeded {
            uid,
            why: format!(
                "{} images exist, the limit is {}",
                usage.count, limits.max_count
            ),
        });
    }
    if usage.bytes.saturating_add(size) > limits.max_total_bytes {
        return Err(LoopError::LimitExceeded {
            uid,
            why: format!(
                "{} bytes in images plus {size} would exceed the limit of {} bytes",
                usage.bytes, limits.max_total_bytes
            ),
        });
    }
    Ok(())
}

fn file_of(name: &str) -> String {
    format!("{name}{SUFFIX}")
}

/// Suffix of an image being made (see [`ImageStore::create`]).
const PARTIAL_SUFFIX: &str = ".img.part";

/// `.<name>.img.part`: the temp name of an image being made; never listed as an image.
fn partial_of(name: &str) -> String {
    format!(".{name}{PARTIAL_SUFFIX}")
}

fn beneath(flags: OFlag, mode: Mode) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(mode)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

fn openat2_err(op: &'static str, target: String) -> impl FnOnce(Errno) -> LoopError {
    move |e| match e {
        Errno::ENOSYS => LoopError::NotSupported {
            what: "openat2 (Linux 5.6+) is required".into(),
        },
        Errno::ELOOP | Errno::EXDEV | Errno::ENOTDIR => LoopError::InvalidArgs {
            what: format!(
                "{target} is a symbolic link, not a directory, or leaves the image directory"
            ),
        },
        e => sys(op, target)(e),
    }
}

/// The image directory.
pub struct ImageStore {
    root: PathBuf,
    root_fd: OwnedFd,
    limits: Limits,
    lock: Mutex<()>,
}

impl ImageStore {
    /// Open (creating it 0700 if missing) the image root, e.g. `<state>/images`.
    pub fn new(root: PathBuf, limits: Limits) -> Result<Self> {
        if !root.exists() {
            std::fs::create_dir_all(&root).map_err(io_err("create directory", &root))?;
            std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io_err("chmod", &root))?;
        }
        let root_fd = nix::fcntl::open(
            &root,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(sys("open", root.display()))?;
        Ok(ImageStore {
            root,
            root_fd,
            limits,
            lock: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// `<root>/<uid>/<name>.img`, for display and state only.
    pub fn path_of(&self, uid: u32, name: &str) -> PathBuf {
        self.root.join(uid.to_string()).join(file_of(name))
    }

    /// Open `<root>/<uid>` (create it 0700 when `create`). None if missing and not created.
    fn uid_dir(&self, uid: u32, create: bool) -> Result<Option<OwnedFd>> {
        let rel = uid.to_string();
        if create {
            match mkdirat(
                self.root_fd.as_fd(),
                rel.as_str(),
                Mode::from_bits_truncate(0o700),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys("mkdirat", self.root.join(&rel).display())(e)),
            }
        }
        let how = beneath(OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty());
        match openat2(self.root_fd.as_fd(), rel.as_str(), how) {
            Ok(fd) => {
                if create {
                    fchmod(fd.as_fd(), Mode::from_bits_truncate(0o700))
                        .map_err(sys("fchmod", self.root.join(&rel).display()))?;
                }
                Ok(Some(fd))
            }
            Err(Errno::ENOENT) if !create => Ok(None),
            Err(e) => Err(openat2_err(
                "openat2",
                self.root.join(&rel).display().to_string(),
            )(e)),
        }
    }

    fn not_found(&self, uid: u32, name: &str) -> LoopError {
        LoopError::NotFound {
            what: format!("image {name:?} of uid {uid}"),
        }
    }

    fn info_of(&self, uid: u32, name: &str, fd: impl AsFd) -> Result<ImageInfo> {
        let st = fstat(fd.as_fd()).map_err(sys("fstat", self.path_of(uid, name).display()))?;
        Ok(ImageInfo {
            uid,
            name: name.to_owned(),
            size: st.st_size as u64,
            allocated: st.st_blocks as u64 * 512,
            dev: st.st_dev,
            inode: st.st_ino,
            path: self.path_of(uid, name),
        })
    }

    /// Create a sparse image of `size` bytes owned by `uid` (mode 0600).
    pub fn create(&self, uid: u32, name: &str, size: u64) -> Result<ImageInfo> {
        check_file_name("image name", name)?;
        check_size(size, &self.limits)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        check_quota(uid, self.usage(uid)?, size, &self.limits)?;
        let dir = self.uid_dir(uid, true)?.expect("created");
        let file = file_of(name);
        let path = self.path_of(uid, name);
        if fstatat(dir.as_fd(), file.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
            return Err(LoopError::Conflict {
                what: format!("image {name:?} of uid {uid}"),
            });
        }
        // Made complete under a temp name, then renamed into place (RENAME_NOREPLACE): a
        // daemon killed half-way leaves only a temp file, which `remove_partial` deletes
        // at start, never a size-0 or root-owned `<name>.img` that reconcile would adopt.
        // Creates are serialized by the store's mutex, so a temp file found here is a
        // leftover of a killed daemon.
        let tmp = partial_of(name);
        let how = beneath(
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::from_bits_truncate(0o600),
        );
        let fd = match openat2(dir.as_fd(), tmp.as_str(), how) {
            Err(Errno::EEXIST) => {
                unlinkat(dir.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir).map_err(sys(
                    "unlink",
                    self.root.join(uid.to_string()).join(&tmp).display(),
                ))?;
                openat2(dir.as_fd(), tmp.as_str(), how)
            }
            r => r,
        }
        .map_err(|e| openat2_err("create", path.display().to_string())(e))?;
        let setup = (|| {
            ftruncate(fd.as_fd(), size as i64).map_err(sys("ftruncate", path.display()))?;
            fchown(fd.as_fd(), Some(Uid::from_raw(uid)), None)
                .map_err(sys("fchown", path.display()))?;
            fchmod(fd.as_fd(), Mode::from_bits_truncate(0o600))
                .map_err(sys("fchmod", path.display()))?;
            let info = self.info_of(uid, name, &fd)?;
            nix::fcntl::renameat2(
                dir.as_fd(),
                tmp.as_str(),
                dir.as_fd(),
                file.as_str(),
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .map_err(|e| match e {
                Errno::EEXIST => LoopError::Conflict {
                    what: format!("image {name:?} of uid {uid}"),
                },
                e => sys("rename", path.display())(e),
            })?;
            Ok(info)
        })();
        match setup {
            Ok(info) => Ok(info),
            Err(e) => match unlinkat(dir.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) => Err(e),
                Err(c) => Err(LoopError::Rollback {
                    source: Box::new(e),
                    cleanup: Box::new(sys("unlink", path.display())(c)),
                }),
            },
        }
    }

    /// Delete the temp files of creates a killed daemon left half-done (`.<name>.img.part`
    /// in every uid directory). Call at start, before anything creates images. Returns
    /// the paths removed.
    pub fn remove_partial(&self) -> Result<Vec<PathBuf>> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut removed = Vec::new();
        for ent in std::fs::read_dir(&self.root).map_err(io_err("read_dir", &self.root))? {
            let ent = ent.map_err(io_err("read_dir", &self.root))?;
            let Some(u) = ent.file_name().to_str().and_then(canonical_uid) else {
                continue;
            };
            let Some(dir) = self.uid_dir(u, false)? else {
                continue;
            };
            let fd_path = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&dir)
            ));
            for e in std::fs::read_dir(&fd_path)
                .map_err(io_err("read_dir", self.root.join(u.to_string())))?
                .flatten()
            {
                let Some(f) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let is_partial = f
                    .strip_prefix('.')
                    .and_then(|r| r.strip_suffix(PARTIAL_SUFFIX))
                    .is_some_and(|n| check_file_name("image name", n).is_ok());
                if is_partial {
                    let p = self.root.join(u.to_string()).join(&f);
                    unlinkat(dir.as_fd(), f.as_str(), UnlinkatFlags::NoRemoveDir)
                        .map_err(sys("unlink", p.display()))?;
                    removed.push(p);
                }
            }
        }
        Ok(removed)
    }

    /// Open an image (read-only or read-write). NotFound when it does not exist.
    pub fn open(&self, uid: u32, name: &str, read_only: bool) -> Result<File> {
        check_file_name("image name", name)?;
        let dir = self
            .uid_dir(uid, false)?
            .ok_or_else(|| self.not_found(uid, name))?;
        let acc = if read_only {
            OFlag::O_RDONLY
        } else {
            OFlag::O_RDWR
        };
        let fd = openat2(
            dir.as_fd(),
            file_of(name).as_str(),
            beneath(acc, Mode::empty()),
        )
        .map_err(|e| match e {
            Errno::ENOENT => self.not_found(uid, name),
            e => openat2_err("open", self.path_of(uid, name).display().to_string())(e),
        })?;
        let st = fstat(fd.as_fd()).map_err(sys("fstat", self.path_of(uid, name).display()))?;
        if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
            return Err(LoopError::InvalidArgs {
                what: format!(
                    "{} is {}, not a regular file",
                    self.path_of(uid, name).display(),
                    super::file_type_name(st.st_mode)
                ),
            });
        }
        Ok(File::from(fd))
    }

    /// Delete an image. Busy while a loop device is bound to it.
    pub fn delete(&self, uid: u32, name: &str) -> Result<()> {
        check_file_name("image name", name)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self
            .uid_dir(uid, false)?
            .ok_or_else(|| self.not_found(uid, name))?;
        let file = file_of(name);
        let st = match fstatat(dir.as_fd(), file.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Err(self.not_found(uid, name)),
            Err(e) => return Err(sys("fstatat", self.path_of(uid, name).display())(e)),
        };
        if let Some(l) = super::list_attached()?
            .into_iter()
            .find(|l| l.backing_dev == st.st_dev && l.backing_inode == st.st_ino)
        {
            return Err(LoopError::Busy {
                what: format!("image {name:?} of uid {uid}"),
                why: format!("attached to {}; detach it first", l.device.display()),
            });
        }
        unlinkat(dir.as_fd(), file.as_str(), UnlinkatFlags::NoRemoveDir).map_err(|e| match e {
            Errno::ENOENT => self.not_found(uid, name),
            e => sys("unlink", self.path_of(uid, name).display())(e),
        })
    }

    /// Images of one uid (or all), sorted by uid then name. Entries that are not
    /// `<valid name>.img` regular files are ignored.
    pub fn list(&self, uid: Option<u32>) -> Result<Vec<ImageInfo>> {
        let uids: Vec<u32> = match uid {
            Some(u) => vec![u],
            None => {
                let mut v = Vec::new();
                for ent in std::fs::read_dir(&self.root).map_err(io_err("read_dir", &self.root))? {
                    let ent = ent.map_err(io_err("read_dir", &self.root))?;
                    if let Some(u) = ent.file_name().to_str().and_then(canonical_uid) {
                        v.push(u);
                    }
                }
                v.sort_unstable();
                v
            }
        };
        let mut out = Vec::new();
        for u in uids {
            let dir = match self.uid_dir(u, false) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) if uid.is_none() => {
                    tracing::warn!(uid = u, error = %e, "skipping image directory");
                    continue;
                }
                Err(e) => return Err(e),
            };
            // The directory was opened safely; list it through its fd.
            let fd_path = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&dir)
            ));
            let mut names = Vec::new();
            for ent in std::fs::read_dir(&fd_path)
                .map_err(io_err("read_dir", self.root.join(u.to_string())))?
            {
                let ent = ent.map_err(io_err("read_dir", self.root.join(u.to_string())))?;
                let Some(fname) = ent.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Some(name) = fname.strip_suffix(SUFFIX) else {
                    continue;
                };
                if check_file_name("image name", name).is_err() {
                    continue;
                }
                names.push(name.to_owned());
            }
            names.sort();
            for name in names {
                let st = match fstatat(
                    dir.as_fd(),
                    file_of(&name).as_str(),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                ) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(sys("fstatat", self.path_of(u, &name).display())(e)),
                };
                if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
                    continue;
                }
                out.push(ImageInfo {
                    uid: u,
                    size: st.st_size as u64,
                    allocated: st.st_blocks as u64 * 512,
                    dev: st.st_dev,
                    inode: st.st_ino,
                    path: self.path_of(u, &name),
                    name,
                });
            }
        }
        Ok(out)
    }

    /// Count and apparent bytes of one uid's images.
    pub fn usage(&self, uid: u32) -> Result<Usage> {
        let imgs = self.list(Some(uid))?;
        Ok(Usage {
            count: imgs.len() as u32,
            bytes: imgs.iter().map(|i| i.size).sum(),
        })
    }

    /// The image a loop device is bound to, by (st_dev, st_ino).
    pub fn find_by_identity(&self, dev: u64, inode: u64) -> Result<Option<ImageInfo>> {
        Ok(self
            .list(None)?
            .into_iter()
            .find(|i| i.dev == dev && i.inode == inode))
    }
}

/// A uid directory name: decimal without leading zeros.
fn canonical_uid(s: &str) -> Option<u32> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, Kind};

    #[test]
    fn sizes() {
        let l = Limits {
            max_size: 8 << 20,
            ..Limits::default()
        };
        assert!(check_size(1 << 20, &l).is_ok());
        assert!(check_size(8 << 20, &l).is_ok());
        for bad in [0, 512, (1 << 20) - 512, (1 << 20) + 1, (8 << 20) + 512] {
            assert_eq!(
                check_size(bad, &l).unwrap_err().kind(),
                Kind::InvalidArgs,
                "{bad}"
            );
        }
    }

    #[test]
    fn quotas() {
        let l = Limits {
            max_size: 1 << 30,
            max_count: 2,
            max_total_bytes: 3 << 20,
        };
        assert!(check_quota(
            5,
            Usage {
                count: 1,
                bytes: 1 << 20
            },
            2 << 20,
            &l
        )
        .is_ok());
        let e = check_quota(5, Usage { count: 2, bytes: 0 }, 1 << 20, &l).unwrap_err();
        assert!(matches!(e, LoopError::LimitExceeded { uid: 5, .. }));
        assert_eq!(e.kind(), Kind::InvalidArgs);
        assert!(check_quota(
            5,
            Usage {
                count: 1,
                bytes: 2 << 20
            },
            2 << 20,
            &l
        )
        .is_err());
        assert!(check_quota(
            5,
            Usage {
                count: 0,
                bytes: u64::MAX
            },
            1 << 20,
            &l
        )
        .is_err());
    }

    #[test]
    fn uid_dirs() {
        assert_eq!(canonical_uid("1000"), Some(1000));
        assert_eq!(canonical_uid("0"), Some(0));
        for bad in ["", "01", "-1", "1a", "99999999999"] {
            assert_eq!(canonical_uid(bad), None, "{bad}");
        }
    }

    // Runs as any user: the store only needs a writable directory (fchown to one's own
    // uid is allowed).
    #[test]
    fn store_create_open_list_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        let store = ImageStore::new(
            tmp.path().join("images"),
            Limits {
                max_size: 16 << 20,
                max_count: 2,
                max_total_bytes: 19 << 20,
            },
        )
        .unwrap();
        let info = store.create(me, "disk-1", 4 << 20).unwrap();
        assert_eq!(info.size, 4 << 20);
        assert!(info.allocated < 1 << 20, "sparse: {}", info.allocated);
        let p = tmp.path().join(format!("images/{me}/disk-1.img"));
        let md = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(md.uid(), me);
        let dmd = std::fs::metadata(p.parent().unwrap()).unwrap();
        assert_eq!(dmd.permissions().mode() & 0o777, 0o700);

        assert_eq!(
            store.create(me, "disk-1", 1 << 20).unwrap_err().kind(),
            Kind::Conflict
        );
        for bad in ["../x", "a/b", ".hidden", ""] {
            assert_eq!(
                store.create(me, bad, 1 << 20).unwrap_err().kind(),
                Kind::InvalidArgs
            );
        }
        assert_eq!(
            store.create(me, "big", 32 << 20).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        // total: 4 + 16 > 19 MiB
        assert!(matches!(
            store.create(me, "d2", 16 << 20).unwrap_err(),
            LoopError::LimitExceeded { .. }
        ));
        store.create(me, "d2", 8 << 20).unwrap();
        // count limit 2
        assert!(matches!(
            store.create(me, "d3", 1 << 20).unwrap_err(),
            LoopError::LimitExceeded { .. }
        ));
        assert!(!tmp.path().join(format!("images/{me}/d3.img")).exists());

        let u = store.usage(me).unwrap();
        assert_eq!(
            u,
            Usage {
                count: 2,
                bytes: 12 << 20
            }
        );
        let names: Vec<_> = store
            .list(None)
            .unwrap()
            .into_iter()
            .map(|i| i.name)
            .collect();
        assert_eq!(names, ["d2", "disk-1"]);

        let f = store.open(me, "disk-1", true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 4 << 20);
        assert_eq!(
            store.open(me, "nope", false).unwrap_err().kind(),
            Kind::NotFound
        );
        assert_eq!(
            store.open(me + 1, "disk-1", false).unwrap_err().kind(),
            Kind::NotFound
        );

        // A planted symlink is refused, not followed.
        std::os::unix::fs::symlink(
            "/etc/passwd",
            tmp.path().join(format!("images/{me}/evil.img")),
        )
        .unwrap();
        assert_eq!(
            store.open(me, "evil", true).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        assert!(!store
            .list(Some(me))
            .unwrap()
            .iter()
            .any(|i| i.name == "evil"));

        // A uid directory that is a symlink is refused too (create and open).
        let other = me.wrapping_add(4242);
        std::os::unix::fs::symlink(tmp.path(), tmp.path().join(format!("images/{other}"))).unwrap();
        assert_eq!(
            store.open(other, "disk-1", true).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        assert_eq!(
            store.create(other, "x", 1 << 20).unwrap_err().kind(),
            Kind::InvalidArgs
        );
        assert!(!tmp.path().join("x.img").exists());

        store.delete(me, "disk-1").unwrap();
        assert!(!p.exists());
        assert_eq!(
            store.delete(me, "disk-1").unwrap_err().kind(),
            Kind::NotFound
        );
    }
}
