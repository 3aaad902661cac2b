//! Loop-device ioctls, written by hand over `nix` + `linux-raw-sys` (no bindgen).
//!
//! Kernel interface: `drivers/block/loop.c`, uapi `<linux/loop.h>`:
//! - `LOOP_CTL_GET_FREE` on `/dev/loop-control`: returns the number of an unbound device,
//!   creating `loopN` if none is free.
//! - `LOOP_CONFIGURE` (5.8+) on `/dev/loopN`: binds the backing fd and sets offset,
//!   size limit, flags and `lo_file_name` in one step (`struct loop_config`).
//! - `LOOP_SET_FD` + `LOOP_SET_STATUS64`: the pre-5.8 two-step bind (fallback only).
//! - `LOOP_CLR_FD`: unbind. `LOOP_GET_STATUS64`: read the binding (`struct loop_info64`).
//!
//! Traps:
//! - **Free-device race.** `GET_FREE` only *names* a free device; another process can bind
//!   it before our `LOOP_CONFIGURE`, which then fails with `EBUSY`. The caller retries
//!   `GET_FREE` + `CONFIGURE` a bounded number of times (see `super::ATTACH_ATTEMPTS`).
//!   `GET_FREE` hands every concurrent caller the same lowest number, so inside this process
//!   attaches are serialized by a mutex; the retry covers other processes (losetup, udisks).
//! - **Is LOOP_CONFIGURE supported?** A kernel without it answers the unknown command with
//!   `EINVAL` (loop.c `lo_simple_ioctl` default case) or `ENOTTY` (block layer), but
//!   `EINVAL` is also its answer to bad arguments. We fall back to `SET_FD` + `SET_STATUS64`
//!   only when the answer is `ENOTTY`, or `EINVAL` on a kernel older than 5.8 (from
//!   `/proc/sys/kernel/osrelease`). On 5.8+ `EINVAL` is a real argument error and is
//!   reported (arguments are validated before, so it means a kernel-side refusal).
//!   In the fallback, read-only cannot be requested by a flag (`SET_STATUS64` ignores
//!   `LO_FLAGS_READ_ONLY`): it follows the backing fd's mode, so the caller reopens the
//!   file read-only first.
//! - **Read-only also follows the open mode of `/dev/loopN`.** `LOOP_CONFIGURE` forces
//!   `LO_FLAGS_READ_ONLY` when the loop device itself was opened without write access, so
//!   the device is opened `O_RDWR` for attaching.
//! - **Detach is lazy.** Since 5.x `LOOP_CLR_FD` does not fail with `EBUSY` while the device
//!   is open elsewhere (mounted, held by a process): it sets `LO_FLAGS_AUTOCLEAR` and
//!   returns 0, and the kernel unbinds at the last close. When we are the only opener the
//!   unbind happens when our fd is closed (task work at syscall exit, i.e. before `close`
//!   returns). `super::detach` therefore checks afterwards and reports
//!   `Detached::Deferred` when the device is still bound to the same file.
//! - **Looking is opening.** `LOOP_GET_STATUS64` (the only source of the backing file's
//!   dev/inode and of `lo_file_name`) needs an open fd, and an open fd counts as an opener:
//!   a `LOOP_CLR_FD` by anyone at that moment becomes the lazy kind and completes at our
//!   close, microseconds later. `super::info`/`list_attached` keep the fd only for the
//!   read; `detach` waits briefly (100 ms) before calling a detach `Deferred`.
//! - **O_APPEND backing fds are harmless** (checked on 6.18: writes through the device land
//!   at their offset; the loop driver builds its own kiocb flags).
//! - **Device nodes may lag.** `GET_FREE` can create a new `loopN`; devtmpfs creates the node
//!   synchronously, but without devtmpfs (a container's tmpfs `/dev`) it never appears.
//!   `super` waits briefly for `/dev/loopN` and then reports NotSupported.

use std::os::fd::{AsRawFd, BorrowedFd};

use linux_raw_sys::loop_device as ld;
use nix::errno::Errno;

pub use ld::{loop_config, loop_info64};

/// `LO_FLAGS_READ_ONLY`.
pub const LO_FLAGS_READ_ONLY: u32 = ld::LO_FLAGS_READ_ONLY as u32;
/// `LO_FLAGS_AUTOCLEAR`.
pub const LO_FLAGS_AUTOCLEAR: u32 = ld::LO_FLAGS_AUTOCLEAR as u32;
/// `LO_FLAGS_PARTSCAN`.
pub const LO_FLAGS_PARTSCAN: u32 = ld::LO_FLAGS_PARTSCAN as u32;
/// Size of `lo_file_name` including the terminating NUL.
pub const LO_NAME_SIZE: usize = ld::LO_NAME_SIZE as usize;

mod raw {
    use super::ld;
    nix::ioctl_none_bad!(ctl_get_free, ld::LOOP_CTL_GET_FREE);
    nix::ioctl_none_bad!(clr_fd, ld::LOOP_CLR_FD);
    nix::ioctl_write_int_bad!(set_fd, ld::LOOP_SET_FD);
    nix::ioctl_write_ptr_bad!(configure, ld::LOOP_CONFIGURE, ld::loop_config);
    nix::ioctl_write_ptr_bad!(set_status64, ld::LOOP_SET_STATUS64, ld::loop_info64);
    nix::ioctl_read_bad!(get_status64, ld::LOOP_GET_STATUS64, ld::loop_info64);
}

/// A zeroed `loop_info64`.
pub fn empty_info() -> loop_info64 {
    // SAFETY: plain-old-data struct of integers and byte arrays; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// A zeroed `loop_config`.
pub fn empty_config() -> loop_config {
    // SAFETY: as above.
    unsafe { std::mem::zeroed() }
}

/// Copy `label` into `lo_file_name` (truncated, always NUL-terminated).
pub fn set_file_name(info: &mut loop_info64, label: &str) {
    info.lo_file_name = [0; LO_NAME_SIZE];
    let n = label.len().min(LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&label.as_bytes()[..n]);
}

/// `lo_file_name` as a string (up to the first NUL, lossy).
pub fn file_name(info: &loop_info64) -> String {
    let end = info
        .lo_file_name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(LO_NAME_SIZE);
    String::from_utf8_lossy(&info.lo_file_name[..end]).into_owned()
}

/// `LOOP_CTL_GET_FREE` on an fd of `/dev/loop-control`.
pub fn ctl_get_free(ctl: BorrowedFd<'_>) -> Result<u32, Errno> {
    // SAFETY: no argument; the fd is valid for the call.
    let n = unsafe { raw::ctl_get_free(ctl.as_raw_fd()) }?;
    Ok(n as u32)
}

/// `LOOP_CONFIGURE`.
pub fn configure(dev: BorrowedFd<'_>, cfg: &loop_config) -> Result<(), Errno> {
    // SAFETY: cfg points to a valid loop_config for the duration of the call.
    unsafe { raw::configure(dev.as_raw_fd(), cfg) }.map(drop)
}

/// `LOOP_SET_FD` (fallback path).
pub fn set_fd(dev: BorrowedFd<'_>, backing: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: both fds are valid for the call; the kernel takes its own file reference.
    unsafe { raw::set_fd(dev.as_raw_fd(), backing.as_raw_fd()) }.map(drop)
}

/// `LOOP_SET_STATUS64` (fallback path).
pub fn set_status64(dev: BorrowedFd<'_>, info: &loop_info64) -> Result<(), Errno> {
    // SAFETY: info points to a valid loop_info64 for the duration of the call.
    unsafe { raw::set_status64(dev.as_raw_fd(), info) }.map(drop)
}

/// `LOOP_GET_STATUS64`. `ENXIO` means the device is not bound.
pub fn get_status64(dev: BorrowedFd<'_>) -> Result<loop_info64, Errno> {
    let mut info = empty_info();
    // SAFETY: info is a valid, writable loop_info64.
    unsafe { raw::get_status64(dev.as_raw_fd(), &mut info) }?;
    Ok(info)
}

/// `LOOP_CLR_FD`. `ENXIO` means the device was not bound. Lazy while open elsewhere.
pub fn clr_fd(dev: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: no argument.
    unsafe { raw::clr_fd(dev.as_raw_fd()) }.map(drop)
}

/// Whether an error from `LOOP_CONFIGURE` means "this kernel does not know the command".
/// `release` is the kernel release string (`uname -r`).
pub fn configure_unsupported(err: Errno, release: &str) -> bool {
    match err {
        Errno::ENOTTY => true,
        Errno::EINVAL => !kernel_at_least(release, 5, 8),
        _ => false,
    }
}

/// Parse the leading `MAJOR.MINOR` of a kernel release and compare. Unparseable -> true
/// (assume a modern kernel: then EINVAL is reported, not papered over).
pub fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let maj = it.next().and_then(|s| s.parse::<u32>().ok());
    let min = it.next().and_then(|s| s.parse::<u32>().ok());
    match (maj, min) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_uapi() {
        // <linux/loop.h>: loop_info64 is 232 bytes, loop_config 8 + 232 + 64.
        assert_eq!(std::mem::size_of::<loop_info64>(), 232);
        assert_eq!(std::mem::size_of::<loop_config>(), 304);
        assert_eq!(LO_FLAGS_READ_ONLY, 1);
        assert_eq!(LO_FLAGS_AUTOCLEAR, 4);
        assert_eq!(LO_FLAGS_PARTSCAN, 8);
        assert_eq!(ld::LOOP_CONFIGURE, 0x4C0A);
        assert_eq!(ld::LOOP_CTL_GET_FREE, 0x4C82);
    }

    #[test]
    fn file_name_roundtrip_and_truncation() {
        let mut i = empty_info();
        set_file_name(&mut i, "dindhelper:1000:disk");
        assert_eq!(file_name(&i), "dindhelper:1000:disk");
        let long = "x".repeat(100);
        set_file_name(&mut i, &long);
        assert_eq!(file_name(&i), "x".repeat(63));
        assert_eq!(i.lo_file_name[63], 0);
    }

    #[test]
    fn kernel_versions() {
        assert!(kernel_at_least("6.18.44-fc-v669", 5, 8));
        assert!(kernel_at_least("5.8.0", 5, 8));
        assert!(!kernel_at_least("5.7.19", 5, 8));
        assert!(!kernel_at_least("4.18.0-553.el8", 5, 8));
        assert!(kernel_at_least("garbage", 5, 8));
    }

    #[test]
    fn fallback_decision() {
        assert!(configure_unsupported(Errno::ENOTTY, "6.1.0"));
        assert!(!configure_unsupported(Errno::EINVAL, "6.1.0"));
        assert!(configure_unsupported(Errno::EINVAL, "5.4.0"));
        assert!(!configure_unsupported(Errno::EBUSY, "5.4.0"));
    }
}
