//! Capture files under the daemon's state directory: `<state>/captures/<uid>/<name>.pcap`.
//!
//! Kernel interfaces: `openat2(2)` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, `mkdirat`,
//! `fchown`, `fchmod`.
//!
//! Traps: the state directory is trusted (the daemon's own); everything below it is resolved
//! with openat2 so a symlink planted there (by anyone who could write there) is refused, never
//! followed. The file is created with O_EXCL: an existing name is a Conflict, never truncated.
//! The per-uid directory is root-owned 0711 (the owner reaches its files by name but cannot
//! list, rename or replace them); files are owned by the caller, mode 0600 (nobody else,
//! not even the caller's primary group, reads them). Deleting goes through the daemon
//! (DeleteCapture), which is what frees the per-uid byte quota.
//!
//! Modes are set with fchmod after every mkdirat/openat2, never left to the umask: the
//! shipped unit runs with `UMask=0077`, which made `mkdirat(…, 0711)` a 0700 directory and
//! locked owners out of their own captures.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use super::CaptureError;

fn how(flags: OFlag, mode: u32) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
}

fn open_dir_beneath(parent: &OwnedFd, name: &str, path: &Path) -> Result<OwnedFd, CaptureError> {
    open_dir_beneath_how(parent, name, path, true)
}

fn open_dir_beneath_how(
    parent: &OwnedFd,
    name: &str,
    path: &Path,
    create: bool,
) -> Result<OwnedFd, CaptureError> {
    let err = |source| CaptureError::File {
        path: path.to_owned(),
        source,
    };
    if create {
        match nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o711)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(err(e)),
        }
    }
    let fd = openat2(
        parent.as_fd(),
        name,
        how(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0),
    )
    .map_err(err)?;
    if create {
        // Explicit, whatever the umask (and repairs a directory an older version left 0700).
        nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(0o711)).map_err(err)?;
    }
    Ok(fd)
}

/// Create `<state>/captures/<uid>/<name>.pcap` for writing (O_EXCL), owned by uid:gid, 0600.
pub fn create_capture_file(
    state_dir: &Path,
    uid: u32,
    gid: u32,
    name: &str,
) -> Result<(File, PathBuf), CaptureError> {
    crate::names::check_file_name("capture name", name)?;
    let state = nix::fcntl::open(
        state_dir,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| CaptureError::File {
        path: state_dir.to_owned(),
        source,
    })?;
    let caps_path = state_dir.join("captures");
    let caps = open_dir_beneath(&state, "captures", &caps_path)?;
    let uid_s = uid.to_string();
    let dir_path = caps_path.join(&uid_s);
    let dir = open_dir_beneath(&caps, &uid_s, &dir_path)?;
    let file_name = format!("{name}.pcap");
    let path = dir_path.join(&file_name);
    let err = |source| CaptureError::File {
        path: path.clone(),
        source,
    };
    let fd = openat2(
        dir.as_fd(),
        file_name.as_str(),
        how(OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY, 0o600),
    )
    .map_err(err)?;
    let cleanup = |e| {
        let _ = nix::unistd::unlinkat(
            dir.as_fd(),
            file_name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        err(e)
    };
    nix::unistd::fchown(fd.as_fd(), Some(uid.into()), Some(gid.into())).map_err(cleanup)?;
    nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(0o600)).map_err(cleanup)?;
    Ok((File::from(fd), path))
}

/// Delete `<state>/captures/<uid>/<name>.pcap` (resolved beneath the state dir, never
/// through a symlink). Returns the path; ENOENT when there is no such capture.
pub fn delete_capture_file(
    state_dir: &Path,
    uid: u32,
    name: &str,
) -> Result<PathBuf, CaptureError> {
    crate::names::check_file_name("capture name", name)?;
    let state = nix::fcntl::open(
        state_dir,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|source| CaptureError::File {
        path: state_dir.to_owned(),
        source,
    })?;
    let caps_path = state_dir.join("captures");
    let caps = open_dir_beneath_how(&state, "captures", &caps_path, false)?;
    let uid_s = uid.to_string();
    let dir_path = caps_path.join(&uid_s);
    let dir = open_dir_beneath_how(&caps, &uid_s, &dir_path, false)?;
    let file_name = format!("{name}.pcap");
    let path = dir_path.join(&file_name);
    nix::unistd::unlinkat(
        dir.as_fd(),
        file_name.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    )
    .map_err(|source| CaptureError::File {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
