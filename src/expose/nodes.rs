//! Block nodes inside a container's /dev: make, replace, remove.
//!
//! Kernel interfaces: `setns(CLONE_NEWNS)` via `crate::netns`, `openat2`, `mknodat`,
//! `fstatat`, `fstat`, `unlinkat`, `getdents` (readdir on a dup'ed fd).
//!
//! Traps:
//! - Everything here runs on the dedicated thread `netns::run_in` made, which first
//!   `unshare(CLONE_FS)` (else `setns` fails with EINVAL); that also gives the thread a
//!   private umask, set to 0 so `mknodat` creates exactly 0660. After `setns` "/" is the
//!   container's root.
//! - The container owns its /dev: it may have replaced entries with symlinks. /dev is
//!   opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, every node is handled with `*at`
//!   calls without following links, and only block devices are ever removed — and on
//!   revocation only those whose device number is the one that was exposed.
//! - A container started with `-v /dev:/dev` shares the host's devtmpfs: a node made or
//!   removed there is made or removed on the host. Detected by comparing the `st_dev` of
//!   the container's /dev with the host's /dev (taken before entering); refused (Conflict).
//! - The container's /proc does not show this thread, so /dev is listed through its fd.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, mknodat, Mode, SFlag};

use super::{DeviceNode, ExposeError};

/// What a node sync did.
#[derive(Debug, Default)]
pub struct NodeSync {
    pub created: Vec<String>,
    pub replaced: Vec<String>,
    pub unchanged: Vec<String>,
    /// Nodes removed (with the device they pointed at).
    pub removed: Vec<DeviceNode>,
}

fn nerr(op: &'static str, name: &str) -> impl FnOnce(Errno) -> ExposeError {
    let name = name.to_owned();
    move |source| ExposeError::Node { op, name, source }
}

/// `st_dev` of the host's /dev (call before entering the container).
pub fn host_dev_id() -> Result<u64, ExposeError> {
    nix::sys::stat::stat("/dev")
        .map(|s| s.st_dev)
        .map_err(nerr("stat", "/dev on the host"))
}

/// Open the container's /dev (inside its mount namespace); Conflict when it is the host's.
fn open_dev(host_dev: u64) -> Result<OwnedFd, ExposeError> {
    let root = nix::fcntl::open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nerr("open", "/"))?;
    let dev: OwnedFd = openat2(
        root.as_fd(),
        "dev",
        OpenHow::new()
            .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS),
    )
    .map_err(nerr("open", ""))?;
    let st = fstat(dev.as_fd()).map_err(nerr("stat", ""))?;
    if st.st_dev == host_dev {
        return Err(ExposeError::HostDev);
    }
    Ok(dev)
}

/// Names in a directory given by fd.
fn list_dir(dir: &OwnedFd) -> Result<Vec<String>, Errno> {
    let fd = nix::unistd::dup(dir)?;
    // SAFETY: fdopendir takes ownership of the dup'ed fd; closedir releases both.
    unsafe {
        let d = libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(fd));
        if d.is_null() {
            return Err(Errno::last());
        }
        let mut names = Vec::new();
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr());
            names.push(name.to_string_lossy().into_owned());
        }
        libc::closedir(d);
        Ok(names)
    }
}

fn is_blk(mode: u32) -> bool {
    SFlag::from_bits_truncate(mode) & SFlag::S_IFMT == SFlag::S_IFBLK
}

fn rdev_of(n: &DeviceNode) -> u64 {
    nix::sys::stat::makedev(n.major as u64, n.minor as u64)
}

/// Runs inside the container's mount namespace. Make every `wanted` node exist exactly
/// (block, rdev, 0660); remove block nodes named in `stale_names` or matching
/// `is_stale(name)` that are not wanted.
pub fn sync(
    host_dev: u64,
    wanted: &[DeviceNode],
    is_stale: &dyn Fn(&str) -> bool,
) -> Result<NodeSync, ExposeError> {
    nix::sys::stat::umask(Mode::empty());
    let dev = open_dev(host_dev)?;
    let mut out = NodeSync::default();
    let want_names: BTreeSet<&str> = wanted.iter().map(|n| n.name.as_str()).collect();
    for name in list_dir(&dev).map_err(nerr("readdir", ""))? {
        if !is_stale(&name) || want_names.contains(name.as_str()) {
            continue;
        }
        let st = fstatat(dev.as_fd(), name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(nerr("stat", &name))?;
        if !is_blk(st.st_mode) {
            continue; // not ours to remove
        }
        nix::unistd::unlinkat(
            dev.as_fd(),
            name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(nerr("unlink", &name))?;
        out.removed.push(DeviceNode {
            name,
            major: nix::sys::stat::major(st.st_rdev) as u32,
            minor: nix::sys::stat::minor(st.st_rdev) as u32,
        });
    }
    for n in wanted {
        let rdev = rdev_of(n);
        let mut replaced = false;
        match fstatat(dev.as_fd(), n.name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                if is_blk(st.st_mode) && st.st_rdev == rdev && st.st_mode & 0o7777 == 0o660 {
                    out.unchanged.push(n.name.clone());
                    continue;
                }
                nix::unistd::unlinkat(
                    dev.as_fd(),
                    n.name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(nerr("unlink", &n.name))?;
                replaced = true;
            }
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(nerr("stat", &n.name)(e)),
        }
        mknodat(
            dev.as_fd(),
            n.name.as_str(),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            rdev,
        )
        .map_err(nerr("mknod", &n.name))?;
        if replaced {
            out.replaced.push(n.name.clone());
        } else {
            out.created.push(n.name.clone());
        }
    }
    Ok(out)
}

/// Runs inside the container's mount namespace. Remove each node that is still a block
/// device with the recorded device number (a node the container replaced by something
/// else is left alone: it no longer reaches the device). Returns the names removed.
pub fn remove(host_dev: u64, nodes: &[DeviceNode]) -> Result<Vec<String>, ExposeError> {
    let dev = open_dev(host_dev)?;
    let mut removed = Vec::new();
    for n in nodes {
        match fstatat(dev.as_fd(), n.name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_blk(st.st_mode) && st.st_rdev == rdev_of(n) => {
                match nix::unistd::unlinkat(
                    dev.as_fd(),
                    n.name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                ) {
                    Ok(()) | Err(Errno::ENOENT) => removed.push(n.name.clone()),
                    Err(e) => return Err(nerr("unlink", &n.name)(e)),
                }
            }
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(nerr("stat", &n.name)(e)),
        }
    }
    Ok(removed)
}

/// Runs inside the container's mount namespace: is `name` under /dev taken by a node that
/// is not the device `(major, minor)`? (For the `as` option.)
pub fn name_taken(host_dev: u64, name: &str, major: u32, minor: u32) -> Result<bool, ExposeError> {
    let dev = open_dev(host_dev)?;
    match fstatat(dev.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(!(is_blk(st.st_mode)
            && st.st_rdev == nix::sys::stat::makedev(major as u64, minor as u64))),
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(nerr("stat", name)(e)),
    }
}
