//! Block-device ioctls for partition syncing: `BLKPG` (add / delete / resize one
//! partition), `BLKSSZGET` (logical sector size), `BLKGETSIZE64` (size in bytes) and
//! `BLKFLSBUF` (drop the whole device's page cache). See `block/ioctl.c` (`blkpg_do_ioctl`)
//! and `block/partitions/core.c` (`bdev_{add,del,resize}_partition`).
//!
//! Traps (checked on this machine's 6.18 kernel where noted):
//! - `blkpg_partition.start` and `.length` are in BYTES (not sectors) and must be
//!   multiples of the logical sector size, else `EINVAL`. The kernel stores them as
//!   512-byte sectors; sysfs `start`/`size` show those sectors.
//! - `pno` must be ≥ 1 and below `disk_max_parts` (`ext_range` in sysfs, 256): else `EINVAL`.
//! - `BLKPG_DEL_PARTITION` on a partition that is open (mounted, swapped on, or just
//!   held open by any process) fails with `EBUSY`.
//! - `BLKPG_RESIZE_PARTITION` does NOT check openers: resizing a mounted partition
//!   succeeds (that is how online growing works). Callers that must not touch a
//!   partition in use have to check that themselves (an `O_EXCL` open of the partition
//!   node fails with `EBUSY` while it is mounted; see `mod.rs`).
//! - Resize cannot move the start: a different start gives `EINVAL`. A moved partition
//!   is a delete followed by an add.
//! - Add and resize fail with `EBUSY` when the new extent overlaps another partition
//!   the kernel has, and add fails with `EBUSY` when the number is taken: apply deletes
//!   first, then shrinks, then grows, then adds.
//! - All three need `CAP_SYS_ADMIN` (else `EACCES`); a read-only fd is enough.
//! - On a loop device attached WITHOUT partscan, BLKPG still works, but the loop driver
//!   only drops partitions at detach when partscan is on: partitions added to a
//!   non-partscan loop device outlive its detach (seen: `/dev/loop0p1` on a detached
//!   `loop0`). `rescan` therefore refuses such devices.
//! - `BLKRRPART` is useless here: this kernel has no partition-table parsers (`EINVAL`).
//! - linux-raw-sys has the `BLKPG` request number but not `struct blkpg_ioctl_arg`,
//!   `struct blkpg_partition` or the `BLKPG_*` op codes: they are defined below from
//!   `include/uapi/linux/blkpg.h`.

use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{c_char, c_int, c_void};
use linux_raw_sys::ioctl::{BLKFLSBUF, BLKGETSIZE64, BLKPG, BLKSSZGET};
use nix::errno::Errno;

// include/uapi/linux/blkpg.h
const BLKPG_ADD_PARTITION: c_int = 1;
const BLKPG_DEL_PARTITION: c_int = 2;
const BLKPG_RESIZE_PARTITION: c_int = 3;
const BLKPG_DEVNAMELTH: usize = 64;
const BLKPG_VOLNAMELTH: usize = 64;

/// `struct blkpg_ioctl_arg`.
#[repr(C)]
struct BlkpgIoctlArg {
    op: c_int,
    flags: c_int,
    datalen: c_int,
    data: *mut c_void,
}

/// `struct blkpg_partition`.
#[repr(C)]
struct BlkpgPartition {
    start: i64,  // bytes
    length: i64, // bytes
    pno: c_int,
    devname: [c_char; BLKPG_DEVNAMELTH],
    volname: [c_char; BLKPG_VOLNAMELTH],
}

nix::ioctl_write_ptr_bad!(ioctl_blkpg, BLKPG, BlkpgIoctlArg);
nix::ioctl_read_bad!(ioctl_blksszget, BLKSSZGET, c_int);
nix::ioctl_read_bad!(ioctl_blkgetsize64, BLKGETSIZE64, u64);
nix::ioctl_none_bad!(ioctl_blkflsbuf, BLKFLSBUF);

fn blkpg(fd: BorrowedFd<'_>, op: c_int, pno: u32, start: u64, length: u64) -> Result<(), Errno> {
    let pno = c_int::try_from(pno).map_err(|_| Errno::EINVAL)?;
    let start = i64::try_from(start).map_err(|_| Errno::EINVAL)?;
    let length = i64::try_from(length).map_err(|_| Errno::EINVAL)?;
    let mut part = BlkpgPartition {
        start,
        length,
        pno,
        devname: [0; BLKPG_DEVNAMELTH],
        volname: [0; BLKPG_VOLNAMELTH],
    };
    let arg = BlkpgIoctlArg {
        op,
        flags: 0,
        datalen: std::mem::size_of::<BlkpgPartition>() as c_int,
        data: (&mut part as *mut BlkpgPartition).cast(),
    };
    // SAFETY: `arg` points to a valid, initialised blkpg_partition that outlives the call.
    unsafe { ioctl_blkpg(fd.as_raw_fd(), &arg) }.map(|_| ())
}

/// `BLKPG_ADD_PARTITION`: partition `pno` at `start` bytes, `length` bytes long.
pub fn add_partition(fd: BorrowedFd<'_>, pno: u32, start: u64, length: u64) -> Result<(), Errno> {
    blkpg(fd, BLKPG_ADD_PARTITION, pno, start, length)
}

/// `BLKPG_DEL_PARTITION`: `EBUSY` while the partition is open.
pub fn delete_partition(fd: BorrowedFd<'_>, pno: u32) -> Result<(), Errno> {
    blkpg(fd, BLKPG_DEL_PARTITION, pno, 0, 0)
}

/// `BLKPG_RESIZE_PARTITION`: `start` must equal the current start (bytes).
pub fn resize_partition(
    fd: BorrowedFd<'_>,
    pno: u32,
    start: u64,
    length: u64,
) -> Result<(), Errno> {
    blkpg(fd, BLKPG_RESIZE_PARTITION, pno, start, length)
}

/// `BLKSSZGET`: the logical sector size in bytes.
pub fn logical_sector_size(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut v: c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    unsafe { ioctl_blksszget(fd.as_raw_fd(), &mut v) }?;
    u64::try_from(v).map_err(|_| Errno::EINVAL)
}

/// `BLKGETSIZE64`: the device size in bytes.
pub fn size_bytes(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    unsafe { ioctl_blkgetsize64(fd.as_raw_fd(), &mut v) }?;
    Ok(v)
}

/// `BLKFLSBUF`: write back and drop the device's page cache, so a table written to the
/// backing file behind the loop device's back is read fresh.
pub fn flush_buffers(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: BLKFLSBUF takes no argument.
    unsafe { ioctl_blkflsbuf(fd.as_raw_fd()) }.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_layout_matches_uapi() {
        // x86_64 / aarch64: 8 + 8 + 4 + 64 + 64 = 148, padded to 152.
        assert_eq!(std::mem::size_of::<BlkpgPartition>(), 152);
        assert_eq!(std::mem::size_of::<BlkpgIoctlArg>(), 24);
    }
}
