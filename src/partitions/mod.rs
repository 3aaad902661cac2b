//! Partition re-read in userspace: parse GPT (else DOS/MBR) from the whole device, diff
//! with the kernel's view in sysfs, and apply BLKPG delete/resize/add — what `partx -u`
//! does. This host's kernel has no partition-table parsers (BLKRRPART fails with EINVAL),
//! and unlike BLKRRPART this also works while an unchanged partition is mounted.
//!
//! - [`rescan`]: the one entry point with side effects (root, `CAP_SYS_ADMIN`).
//! - [`list`]: the kernel's partitions now, annotated from the table; changes nothing.
//! - [`read_table`], [`plan`]: pure, unit-tested.
//! - A disk without any table (blank, or a whole-disk filesystem) has no partitions: a
//!   rescan then deletes every kernel partition, as a kernel rescan would.
//! - A corrupt table (GPT with both headers bad, cyclic EBR chain, overlaps, …) is
//!   `InvalidArgs` and changes nothing.
//! - The DOS extended container is exposed like Linux does: a 1 KiB (2-sector)
//!   partition at its start (see `mbr.rs`); [`Partition::size`] is that kernel size.

pub mod blkpg;
pub mod gpt;
pub mod mbr;
mod sysfs;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{kind_of_errno, Classify, Kind};

/// How long to retry a contended flock on the device before answering `Busy`.
const LOCK_WAIT: Duration = Duration::from_millis(1000);
/// How long to wait for devtmpfs to create the partition nodes.
const NODE_WAIT: Duration = Duration::from_millis(2000);
const POLL: Duration = Duration::from_millis(20);

/// Which kind of table a device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Label {
    Gpt,
    Dos,
}

/// A parsed partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub label: Label,
    /// GPT disk GUID, or the DOS disk id as 8 hex digits ("" when 0).
    pub id: String,
    /// Sorted by number.
    pub parts: Vec<TablePart>,
}

/// One partition of a table, with the extent the kernel should show for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePart {
    pub number: u32,
    /// Bytes from the start of the device.
    pub start: u64,
    /// Bytes (for a DOS extended container: the 1 KiB the kernel shows).
    pub size: u64,
    /// GPT: type GUID (lowercase); DOS: `0x83` style.
    pub part_type: String,
    /// GPT partition name; "" for DOS.
    pub name: String,
    /// GPT unique GUID; DOS: `<disk id>-<nn>` like blkid's PARTUUID ("" when the id is 0).
    pub uuid: String,
}

/// A partition as the kernel has it (from sysfs), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPart {
    pub number: u32,
    pub start: u64,
    pub size: u64,
}

/// One BLKPG step. Offsets and sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Delete { number: u32 },
    Resize { number: u32, start: u64, size: u64 },
    Add { number: u32, start: u64, size: u64 },
}

impl Op {
    pub fn number(&self) -> u32 {
        match *self {
            Op::Delete { number } | Op::Resize { number, .. } | Op::Add { number, .. } => number,
        }
    }
}

/// A partition after a rescan: what the bus returns as `(uttssssuu)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub number: u32,
    /// Bytes from the start of the disk.
    pub start: u64,
    /// Bytes, as the kernel node has it (a DOS extended container: 1 KiB).
    pub size: u64,
    pub part_type: String,
    pub name: String,
    pub uuid: String,
    /// `/dev/loop3p1`.
    pub node: PathBuf,
    pub major: u32,
    pub minor: u32,
}

/// Why a table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error("{device}: no such block device: {source}")]
    NotFound {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{device} is not a block device")]
    NotBlockDevice { device: PathBuf },
    #[error("{device} is a partition; rescan the whole disk")]
    IsPartition { device: PathBuf },
    #[error(
        "{device} has partition scanning off: attach it with partscan (partitions added \
         without it would outlive the loop device's detach)"
    )]
    PartscanOff { device: PathBuf },
    #[error(
        "{device} is locked by another process (flock still held after {waited_ms} ms, \
         e.g. a partitioning tool or udev); try again"
    )]
    Locked { device: PathBuf, waited_ms: u64 },
    #[error("{device}: corrupt partition table: {reason}")]
    CorruptTable { device: PathBuf, reason: String },
    #[error(
        "{device}: the table has partition {number}, but the kernel allows numbers below {limit}"
    )]
    TooManyPartitions {
        device: PathBuf,
        number: u32,
        limit: u64,
    },
    #[error(
        "{device}: partition {number} ({node}) is in use (mounted or open) and would be \
         {action}; unmount or close it first ({applied} of {total} changes were applied)"
    )]
    PartitionBusy {
        device: PathBuf,
        number: u32,
        node: PathBuf,
        action: &'static str,
        applied: usize,
        total: usize,
    },
    #[error("{device}: {what}: {source}")]
    Io {
        device: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{device}: {what}: {source}")]
    Ioctl {
        device: PathBuf,
        what: String,
        #[source]
        source: Errno,
    },
    #[error("{device}: after syncing, the kernel shows {kernel:?} but the table says {table:?}")]
    Mismatch {
        device: PathBuf,
        kernel: Vec<KernelPart>,
        table: Vec<KernelPart>,
    },
}

impl Classify for PartError {
    fn kind(&self) -> Kind {
        match self {
            PartError::NotFound { .. } => Kind::NotFound,
            PartError::NotBlockDevice { .. }
            | PartError::IsPartition { .. }
            | PartError::CorruptTable { .. }
            | PartError::TooManyPartitions { .. } => Kind::InvalidArgs,
            PartError::PartscanOff { .. } => Kind::NotSupported,
            PartError::Locked { .. } | PartError::PartitionBusy { .. } => Kind::Busy,
            PartError::Io { .. } | PartError::Mismatch { .. } => Kind::Failed,
            PartError::Ioctl { source, .. } => kind_of_errno(*source),
        }
    }
}

/// Read exactly `len` bytes at `offset`.
pub(crate) fn read_at<R: Read + Seek>(r: &mut R, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    r.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Every extent non-empty, inside the device, and no two overlapping.
pub(crate) fn check_extents(parts: &[TablePart], dev_size: u64) -> Result<(), String> {
    let mut v: Vec<&TablePart> = parts.iter().collect();
    v.sort_by_key(|p| p.start);
    for p in &v {
        if p.size == 0 || p.start.checked_add(p.size).is_none_or(|end| end > dev_size) {
            return Err(format!(
                "partition {} (bytes {}+{}) reaches beyond the end of the device ({dev_size} bytes)",
                p.number, p.start, p.size
            ));
        }
    }
    for w in v.windows(2) {
        if w[0].start + w[0].size > w[1].start {
            return Err(format!(
                "partitions {} and {} overlap",
                w[0].number, w[1].number
            ));
        }
    }
    Ok(())
}

/// Parse the device's table: GPT first (as Linux does), else DOS. `Ok(None)`: no table.
pub fn read_table<R: Read + Seek>(
    r: &mut R,
    sector_size: u64,
    dev_size: u64,
) -> Result<Option<Table>, ParseError> {
    if let Some(t) = gpt::parse(r, sector_size, dev_size)? {
        return Ok(Some(t));
    }
    mbr::parse(r, sector_size, dev_size)
}

/// The BLKPG steps that turn the kernel's view into the table's: delete partitions that
/// are gone or moved (a start cannot change in place), resize those with the same start
/// and another size (shrinks before grows, so a grow never overlaps a partition that is
/// about to shrink), then add new and moved ones. Each group is sorted by number.
pub fn plan(kernel: &[KernelPart], table: &[TablePart]) -> Vec<Op> {
    let want: HashMap<u32, &TablePart> = table.iter().map(|t| (t.number, t)).collect();
    let have: HashMap<u32, &KernelPart> = kernel.iter().map(|k| (k.number, k)).collect();
    let mut deletes = Vec::new();
    let mut shrinks = Vec::new();
    let mut grows = Vec::new();
    let mut adds = Vec::new();
    for k in kernel {
        match want.get(&k.number) {
            None => deletes.push(Op::Delete { number: k.number }),
            Some(t) if t.start != k.start => deletes.push(Op::Delete { number: k.number }),
            Some(t) if t.size < k.size => shrinks.push(Op::Resize {
                number: k.number,
                start: t.start,
                size: t.size,
            }),
            Some(t) if t.size > k.size => grows.push(Op::Resize {
                number: k.number,
                start: t.start,
                size: t.size,
            }),
            Some(_) => {}
        }
    }
    for t in table {
        let present = have.get(&t.number).is_some_and(|k| k.start == t.start);
        if !present {
            adds.push(Op::Add {
                number: t.number,
                start: t.start,
                size: t.size,
            });
        }
    }
    let mut ops = Vec::new();
    for mut group in [deletes, shrinks, grows, adds] {
        group.sort_by_key(Op::number);
        ops.extend(group);
    }
    ops
}

/// Re-read `device`'s partition table (GPT, else DOS) and make the kernel's partitions
/// equal to it with BLKPG; return every partition of the table.
///
/// Holds an exclusive `flock` on the device meanwhile (the udev convention for
/// partitioning tools); if another process holds it for longer than a second: `Locked`
/// (Busy). Partitions that are in use (mounted, or opened exclusively) are checked before
/// anything is changed: if one of them would be deleted, moved or resized,
/// `PartitionBusy` is returned and nothing is applied. A partition that is merely held
/// open (not exclusively) is only detected when its delete fails with EBUSY; the ops
/// applied before it (deletes run first, then resizes, then adds) leave the kernel with a
/// subset of the old and new partitions and no overlaps, and the error says how many were
/// applied: a later rescan completes the sync. An unchanged partition may be mounted.
pub fn rescan(device: &Path) -> Result<Vec<Partition>, PartError> {
    let Disk {
        dev,
        file,
        disk_dir,
    } = open_disk(device)?;
    let io_err = |what: &'static str| {
        let dev = dev.clone();
        move |source: io::Error| PartError::Io {
            device: dev,
            what,
            source,
        }
    };
    if sysfs::disk_attr(&disk_dir, "partscan") == Some(0) {
        return Err(PartError::PartscanOff { device: dev });
    }
    let limit = sysfs::disk_attr(&disk_dir, "ext_range").unwrap_or(256);

    let file = lock(file, &dev)?;
    let fd = file.as_fd();
    if let Err(e) = blkpg::flush_buffers(fd) {
        tracing::warn!(device = %dev.display(), "BLKFLSBUF failed: {e}; the table may be read from a stale cache");
    }
    let table = read_disk_table(&dev, &file)?;
    let table_parts = table.map(|t| t.parts).unwrap_or_default();
    if let Some(p) = table_parts.iter().find(|p| u64::from(p.number) >= limit) {
        return Err(PartError::TooManyPartitions {
            device: dev,
            number: p.number,
            limit,
        });
    }

    let before = sysfs::partitions(&disk_dir).map_err(io_err("reading sysfs"))?;
    let kernel: Vec<KernelPart> = before.iter().map(|s| s.part).collect();
    let ops = plan(&kernel, &table_parts);
    tracing::debug!(device = %dev.display(), ?ops, "partition sync plan");
    let names: HashMap<u32, &sysfs::SysPart> = before.iter().map(|s| (s.part.number, s)).collect();

    // Pre-flight: nothing in use may be deleted, moved or resized. Resized partitions stay
    // claimed (O_EXCL) until the end, so nobody mounts them in between.
    let mut claims = Vec::new();
    for op in &ops {
        let (number, action) = match *op {
            Op::Delete { number } => {
                let moved = table_parts.iter().any(|t| t.number == number);
                (number, if moved { "moved" } else { "deleted" })
            }
            Op::Resize { number, .. } => (number, "resized"),
            Op::Add { .. } => continue,
        };
        let Some(sp) = names.get(&number) else {
            continue;
        };
        let node = Path::new("/dev").join(&sp.name);
        match claim(&node, sp) {
            Ok(Some(f)) => {
                if matches!(op, Op::Resize { .. }) {
                    claims.push(f);
                }
            }
            Ok(None) => {}
            Err(Errno::EBUSY) => {
                return Err(PartError::PartitionBusy {
                    device: dev,
                    number,
                    node,
                    action,
                    applied: 0,
                    total: ops.len(),
                })
            }
            Err(e) => {
                tracing::warn!(node = %node.display(), "exclusive open for the in-use check failed: {e}");
            }
        }
    }

    for (i, op) in ops.iter().enumerate() {
        let r = match *op {
            Op::Delete { number } => blkpg::delete_partition(fd, number),
            Op::Resize {
                number,
                start,
                size,
            } => blkpg::resize_partition(fd, number, start, size),
            Op::Add {
                number,
                start,
                size,
            } => blkpg::add_partition(fd, number, start, size),
        };
        match r {
            Ok(()) => tracing::info!(device = %dev.display(), ?op, "BLKPG applied"),
            Err(Errno::EBUSY) if matches!(op, Op::Delete { .. }) => {
                let number = op.number();
                let node = names
                    .get(&number)
                    .map(|s| Path::new("/dev").join(&s.name))
                    .unwrap_or_default();
                return Err(PartError::PartitionBusy {
                    device: dev,
                    number,
                    node,
                    action: "deleted",
                    applied: i,
                    total: ops.len(),
                });
            }
            Err(source) => {
                return Err(PartError::Ioctl {
                    device: dev,
                    what: format!("BLKPG {op:?} (after {i} of {} changes)", ops.len()),
                    source,
                })
            }
        }
    }
    drop(claims);

    let after = sysfs::partitions(&disk_dir).map_err(io_err("reading sysfs"))?;
    let kernel_after: Vec<KernelPart> = after.iter().map(|s| s.part).collect();
    let want: Vec<KernelPart> = table_parts
        .iter()
        .map(|t| KernelPart {
            number: t.number,
            start: t.start,
            size: t.size,
        })
        .collect();
    if kernel_after != want {
        return Err(PartError::Mismatch {
            device: dev,
            kernel: kernel_after,
            table: want,
        });
    }

    let mut out = Vec::new();
    for (t, s) in table_parts.into_iter().zip(after) {
        let node = Path::new("/dev").join(&s.name);
        out.push(Partition {
            number: t.number,
            start: t.start,
            size: t.size,
            part_type: t.part_type,
            name: t.name,
            uuid: t.uuid,
            node,
            major: s.major,
            minor: s.minor,
        });
    }
    wait_for_nodes(&out);
    Ok(out)
}

/// The partitions the kernel has now, each with the table's type, name and uuid when
/// the table (read without changing anything) has the same number at the same extent;
/// otherwise those three are empty. For the Loop objects' `Partitions` property.
pub fn list(device: &Path) -> Result<Vec<Partition>, PartError> {
    let Disk {
        dev,
        file,
        disk_dir,
    } = open_disk(device)?;
    let table = match read_disk_table(&dev, &file) {
        Ok(t) => t.map(|t| t.parts).unwrap_or_default(),
        Err(e) => {
            tracing::warn!("{e}");
            Vec::new()
        }
    };
    let kernel = sysfs::partitions(&disk_dir).map_err(|source| PartError::Io {
        device: dev.clone(),
        what: "reading sysfs",
        source,
    })?;
    Ok(kernel
        .into_iter()
        .map(|s| {
            let t = table.iter().find(|t| {
                t.number == s.part.number && t.start == s.part.start && t.size == s.part.size
            });
            Partition {
                number: s.part.number,
                start: s.part.start,
                size: s.part.size,
                part_type: t.map(|t| t.part_type.clone()).unwrap_or_default(),
                name: t.map(|t| t.name.clone()).unwrap_or_default(),
                uuid: t.map(|t| t.uuid.clone()).unwrap_or_default(),
                node: Path::new("/dev").join(&s.name),
                major: s.major,
                minor: s.minor,
            }
        })
        .collect())
}

/// A whole-disk block device, opened read-only.
struct Disk {
    dev: PathBuf,
    file: File,
    /// `/sys/devices/…/block/loop3`
    disk_dir: PathBuf,
}

fn open_disk(device: &Path) -> Result<Disk, PartError> {
    let dev = device.to_path_buf();
    let file = OpenOptions::new()
        .read(true)
        .open(device)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ENOENT | libc::ENXIO | libc::ENODEV) => PartError::NotFound {
                device: dev.clone(),
                source,
            },
            _ => PartError::Io {
                device: dev.clone(),
                what: "opening the device",
                source,
            },
        })?;
    let meta = file.metadata().map_err(|source| PartError::Io {
        device: dev.clone(),
        what: "fstat",
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(PartError::NotBlockDevice { device: dev });
    }
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let disk_dir =
        sysfs::disk_dir(Path::new("/sys"), major, minor).map_err(|source| PartError::NotFound {
            device: dev.clone(),
            source,
        })?;
    if disk_dir.join("partition").exists() {
        return Err(PartError::IsPartition { device: dev });
    }
    Ok(Disk {
        dev,
        file,
        disk_dir,
    })
}

/// Sector size, device size, and the table (`None`: no table).
fn read_disk_table(dev: &Path, file: &File) -> Result<Option<Table>, PartError> {
    let fd = file.as_fd();
    let ioctl_err = |what: &str| {
        let what = what.to_string();
        move |source: Errno| PartError::Ioctl {
            device: dev.to_path_buf(),
            what,
            source,
        }
    };
    let ssz = blkpg::logical_sector_size(fd).map_err(ioctl_err("BLKSSZGET"))?;
    let dev_size = blkpg::size_bytes(fd).map_err(ioctl_err("BLKGETSIZE64"))?;
    let mut reader: &File = file;
    read_table(&mut reader, ssz, dev_size).map_err(|e| match e {
        ParseError::Corrupt(reason) => PartError::CorruptTable {
            device: dev.to_path_buf(),
            reason,
        },
        ParseError::Io(source) => PartError::Io {
            device: dev.to_path_buf(),
            what: "reading the partition table",
            source,
        },
    })
}

/// Exclusive flock with a short bounded retry.
fn lock(file: File, dev: &Path) -> Result<Flock<File>, PartError> {
    let started = Instant::now();
    let mut file = file;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((f, Errno::EWOULDBLOCK)) if started.elapsed() < LOCK_WAIT => {
                file = f;
                std::thread::sleep(POLL);
            }
            Err((_, Errno::EWOULDBLOCK)) => {
                return Err(PartError::Locked {
                    device: dev.to_path_buf(),
                    waited_ms: LOCK_WAIT.as_millis() as u64,
                })
            }
            Err((_, source)) => {
                return Err(PartError::Ioctl {
                    device: dev.to_path_buf(),
                    what: "flock".into(),
                    source,
                })
            }
        }
    }
}

/// Open the partition node exclusively (fails with EBUSY while it is mounted, swapped on
/// or claimed by another O_EXCL opener). `Ok(None)`: no trustworthy node to check.
fn claim(node: &Path, sp: &sysfs::SysPart) -> Result<Option<File>, Errno> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(node)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
    };
    let rdev = f.metadata().map(|m| m.rdev()).unwrap_or(0);
    if !f.metadata().is_ok_and(|m| m.file_type().is_block_device())
        || (libc::major(rdev), libc::minor(rdev)) != (sp.major, sp.minor)
    {
        return Ok(None);
    }
    Ok(Some(f))
}

/// devtmpfs creates nodes as the kernel adds partitions; wait (bounded) until each node
/// exists with the right numbers. A /dev without devtmpfs only gets a warning.
fn wait_for_nodes(parts: &[Partition]) {
    let deadline = Instant::now() + NODE_WAIT;
    for p in parts {
        loop {
            let ok = std::fs::metadata(&p.node).is_ok_and(|m| {
                m.file_type().is_block_device()
                    && (libc::major(m.rdev()), libc::minor(m.rdev())) == (p.major, p.minor)
            });
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(node = %p.node.display(), "partition node did not appear");
                break;
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Run sfdisk with `script` on `target` (a file or device). Fails loudly without it.
    pub fn sfdisk(target: &Path, script: &str) {
        use std::io::Write;
        let mut child = Command::new("sfdisk")
            .arg("-q")
            .arg("--no-reread")
            .arg("--no-tell-kernel")
            .arg(target)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sfdisk must be installed (package fdisk)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "sfdisk failed on {script}");
    }

    pub fn sfdisk_json(target: &Path) -> serde_json::Value {
        let out = Command::new("sfdisk")
            .arg("--json")
            .arg(target)
            .output()
            .expect("sfdisk must be installed (package fdisk)");
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    const M: u64 = 1 << 20;

    fn k(number: u32, start: u64, size: u64) -> KernelPart {
        KernelPart {
            number,
            start: start * M,
            size: size * M,
        }
    }

    fn t(number: u32, start: u64, size: u64) -> TablePart {
        TablePart {
            number,
            start: start * M,
            size: size * M,
            part_type: "0x83".into(),
            name: String::new(),
            uuid: String::new(),
        }
    }

    fn add(number: u32, start: u64, size: u64) -> Op {
        Op::Add {
            number,
            start: start * M,
            size: size * M,
        }
    }

    fn resize(number: u32, start: u64, size: u64) -> Op {
        Op::Resize {
            number,
            start: start * M,
            size: size * M,
        }
    }

    #[test]
    fn plan_in_sync_is_empty() {
        let kern = [k(1, 1, 8), k(2, 9, 8)];
        assert!(plan(&kern, &[t(1, 1, 8), t(2, 9, 8)]).is_empty());
        assert!(plan(&[], &[]).is_empty());
    }

    #[test]
    fn plan_blank_kernel_adds_everything_in_order() {
        assert_eq!(
            plan(&[], &[t(1, 1, 8), t(5, 20, 4), t(2, 9, 1)]),
            vec![add(1, 1, 8), add(2, 9, 1), add(5, 20, 4)]
        );
    }

    #[test]
    fn plan_no_table_deletes_everything() {
        assert_eq!(
            plan(&[k(3, 1, 1), k(1, 2, 1)], &[]),
            vec![Op::Delete { number: 1 }, Op::Delete { number: 3 }]
        );
    }

    #[test]
    fn plan_moved_partition_is_delete_then_add() {
        assert_eq!(
            plan(&[k(1, 1, 8), k(2, 9, 8)], &[t(1, 1, 8), t(2, 10, 8)]),
            vec![Op::Delete { number: 2 }, add(2, 10, 8)]
        );
    }

    #[test]
    fn plan_same_start_other_size_is_resize() {
        assert_eq!(plan(&[k(1, 1, 8)], &[t(1, 1, 16)]), vec![resize(1, 1, 16)]);
        assert_eq!(plan(&[k(1, 1, 8)], &[t(1, 1, 4)]), vec![resize(1, 1, 4)]);
    }

    #[test]
    fn plan_shrinks_before_grows_and_deletes_first_adds_last() {
        // p1 grows into space p2 gives up; p3 is gone; p4 is new; p2 shrinks.
        let kern = [k(1, 1, 8), k(2, 9, 8), k(3, 17, 8)];
        let table = [t(1, 1, 10), t(2, 11, 2)]; // p2 moved (start 11): delete+add
        assert_eq!(
            plan(&kern, &table),
            vec![
                Op::Delete { number: 2 },
                Op::Delete { number: 3 },
                resize(1, 1, 10),
                add(2, 11, 2),
            ]
        );
        let kern = [k(1, 1, 8), k(2, 9, 8)];
        let table = [t(1, 1, 4), t(2, 9, 12), t(4, 30, 1)];
        assert_eq!(
            plan(&kern, &table),
            vec![resize(1, 1, 4), resize(2, 9, 12), add(4, 30, 1)]
        );
        let kern = [k(1, 1, 4), k(2, 9, 8)];
        let table = [t(1, 1, 10), t(2, 11, 6)];
        let ops = plan(&kern, &table);
        assert_eq!(
            ops,
            vec![Op::Delete { number: 2 }, resize(1, 1, 10), add(2, 11, 6)]
        );
    }

    #[test]
    fn plan_unchanged_partition_is_never_touched() {
        let kern = [k(1, 1, 8), k(2, 9, 8), k(3, 17, 8)];
        let table = [t(1, 1, 4), t(2, 9, 8), t(4, 25, 8)];
        let ops = plan(&kern, &table);
        assert!(ops.iter().all(|o| o.number() != 2), "{ops:?}");
    }

    #[test]
    fn plan_result_never_overlaps_when_applied_in_order() {
        // Simulate the kernel's overlap check on a few layouts.
        let cases: Vec<(Vec<KernelPart>, Vec<TablePart>)> = vec![
            (vec![k(1, 1, 8), k(2, 9, 8)], vec![t(1, 1, 12), t(2, 13, 4)]),
            (vec![k(1, 1, 8), k(2, 9, 8)], vec![t(2, 1, 8), t(1, 9, 8)]),
            (vec![k(1, 1, 4), k(2, 5, 8)], vec![t(1, 1, 8), t(2, 9, 4)]),
            (
                vec![k(1, 1, 8), k(2, 9, 2), k(3, 11, 8)],
                vec![t(1, 1, 9), t(2, 10, 1), t(3, 11, 9)],
            ),
        ];
        for (kern, table) in cases {
            let mut state: Vec<KernelPart> = kern.clone();
            for op in plan(&kern, &table) {
                match op {
                    Op::Delete { number } => state.retain(|p| p.number != number),
                    Op::Resize {
                        number,
                        start,
                        size,
                    }
                    | Op::Add {
                        number,
                        start,
                        size,
                    } => {
                        state.retain(|p| p.number != number);
                        for p in &state {
                            assert!(
                                start + size <= p.start || p.start + p.size <= start,
                                "{op:?} overlaps {p:?}"
                            );
                        }
                        state.push(KernelPart {
                            number,
                            start,
                            size,
                        });
                    }
                }
            }
            state.sort_by_key(|p| p.number);
            let want: Vec<KernelPart> = table
                .iter()
                .map(|t| KernelPart {
                    number: t.number,
                    start: t.start,
                    size: t.size,
                })
                .collect();
            let mut want = want;
            want.sort_by_key(|p| p.number);
            assert_eq!(state, want);
        }
    }

    #[test]
    fn classify_maps_errors() {
        let d = PathBuf::from("/dev/loop9");
        assert_eq!(
            PartError::CorruptTable {
                device: d.clone(),
                reason: "x".into()
            }
            .kind(),
            Kind::InvalidArgs
        );
        assert_eq!(
            PartError::PartitionBusy {
                device: d.clone(),
                number: 2,
                node: "/dev/loop9p2".into(),
                action: "deleted",
                applied: 0,
                total: 1
            }
            .kind(),
            Kind::Busy
        );
        assert_eq!(
            PartError::NotFound {
                device: d.clone(),
                source: io::Error::from_raw_os_error(2)
            }
            .kind(),
            Kind::NotFound
        );
        assert_eq!(
            PartError::Ioctl {
                device: d,
                what: "BLKPG".into(),
                source: Errno::EBUSY
            }
            .kind(),
            Kind::Busy
        );
    }

    #[test]
    fn rescan_of_missing_or_non_block_device_is_classified() {
        let e = rescan(Path::new("/dev/dhq-does-not-exist")).unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound, "{e}");
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = rescan(f.path()).unwrap_err();
        assert_eq!(e.kind(), Kind::InvalidArgs, "{e}");
    }
}
