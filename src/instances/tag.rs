//! Ownership tags on cgroup directories: the extended attribute `trusted.dindhelper` holding
//! the state id of the daemon that made the directory (kernel interface: setxattr(2) /
//! getxattr(2) on cgroupfs, i.e. kernfs `simple_xattr`s).
//!
//! Why: a daemon killed between `mkdir` and the save of its instance record leaves a cgroup
//! that nothing owns. The tag lets the start-up reconcile tell its own directories from
//! another daemon's (another state dir) and from other tools' (untagged), so it removes
//! only its own.
//!
//! Traps:
//! - `trusted.*` needs CAP_SYS_ADMIN (the daemon keeps it); `user.*` would let any process
//!   that can write the cgroup forge a tag.
//! - cgroup v1 historically offered xattrs only with the `xattr` mount option. Measured on
//!   this project's hosts (kernel 6.18, hybrid layout, v1 hierarchies mounted without
//!   `xattr`): `trusted.*` set and read back on every v1 hierarchy (cpu, cpuacct, memory,
//!   pids, blkio, devices, name=systemd) and on cgroup2. Where the kernel refuses
//!   (EOPNOTSUPP/ENOTSUP), [`set`] reports `Unsupported` and the caller relies on its
//!   intent record alone.
//! - Tags live as long as the directory (kernfs node); they are not inherited by children
//!   (runc's container cgroups below an instance are untagged).
//! - The tag is written right after `mkdir`; the gap between the two is covered by the
//!   intent record the operations layer writes before the `mkdir` (see `ops::instances`).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The attribute name.
pub const XATTR: &str = "trusted.dindhelper";

/// Who made a cgroup directory, by its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Tagged with the given state id.
    Tagged(String),
    /// No tag (another tool, a daemon from before tags, or a create killed between
    /// `mkdir` and the tag).
    Untagged,
}

/// Outcome of [`set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    Done,
    /// The filesystem does not keep xattrs here.
    Unsupported,
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Tag `dir` with `state_id`.
pub fn set(dir: &Path, state_id: &str) -> io::Result<Set> {
    let p = cpath(dir)?;
    let name = CString::new(XATTR).expect("no NUL");
    // SAFETY: setxattr(2) with NUL-terminated strings and a buffer we own, with its length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            state_id.as_ptr().cast(),
            state_id.len(),
            0,
        )
    };
    if r == 0 {
        return Ok(Set::Done);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => Ok(Set::Unsupported),
        _ => Err(e),
    }
}

/// Read the tag of `dir`. `Ok(None)`: the directory does not exist.
pub fn get(dir: &Path) -> io::Result<Option<Owner>> {
    let p = cpath(dir)?;
    let name = CString::new(XATTR).expect("no NUL");
    let mut buf = [0u8; 128];
    // SAFETY: getxattr(2) into a buffer we own, with its length.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n >= 0 {
        return Ok(Some(Owner::Tagged(
            String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        )));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(Some(Owner::Untagged)),
        // A longer value is not ours (our ids are short); still someone's tag.
        Some(libc::ERANGE) => Ok(Some(Owner::Tagged(String::new()))),
        Some(libc::ENOENT) => Ok(None),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dir_reads_as_none() {
        assert_eq!(get(Path::new("/nonexistent/dindhelper/x")).unwrap(), None);
    }

    #[test]
    fn tmpfs_or_disk_file_round_trip_or_untagged() {
        // trusted.* needs CAP_SYS_ADMIN; unprivileged test runs only see Untagged/errors.
        let d = tempfile::tempdir().unwrap();
        match set(d.path(), "abc") {
            Ok(Set::Done) => assert_eq!(get(d.path()).unwrap(), Some(Owner::Tagged("abc".into()))),
            Ok(Set::Unsupported) | Err(_) => {
                assert_eq!(get(d.path()).unwrap(), Some(Owner::Untagged))
            }
        }
    }
}
