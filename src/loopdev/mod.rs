//! Loop devices: attach regular files (given as fds), detach, and read the kernel's view.
//!
//! The kernel calls live in [`ioctl`] (see its header for the traps); sparse image files
//! owned by the daemon live in [`images`]. Nothing here resolves a caller-written path:
//! backing files arrive as fds (from the caller, or from [`images::ImageStore::open`]).
//!
//! Every device we bind carries `lo_file_name = "dindhelper:<label>"` ([`LABEL_PREFIX`]),
//! so a restarted daemon can recognise devices it attached even when its state file was
//! not written (e.g. `kill -9` between attach and save). The real backing path is in
//! sysfs (`/sys/block/loopN/loop/backing_file`), which is what [`LoopInfo::backing_file`]
//! reports; `losetup -l` also prefers sysfs, so the label does not hide anything.

pub mod images;
pub mod ioctl;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::error::{Classify, Kind};
use crate::names::NameError;

/// Prefix of `lo_file_name` on every device attached by dindhelper.
pub const LABEL_PREFIX: &str = "dindhelper:";
/// Offsets, size limits and image sizes are multiples of this.
pub const SECTOR: u64 = 512;
/// How often GET_FREE + CONFIGURE is tried when another process takes the free device.
pub const ATTACH_ATTEMPTS: u32 = 16;
/// How long to wait for `/dev/loopN` to appear after GET_FREE created it.
const NODE_WAIT: Duration = Duration::from_secs(1);
/// How long detach waits for the kernel to unbind before reporting `Deferred`.
const DETACH_WAIT: Duration = Duration::from_millis(100);

const LOOP_CONTROL: &str = "/dev/loop-control";

/// Errors of the loop-device and image module.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("invalid argument: {what}")]
    InvalidArgs { what: String },
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} is busy: {why}")]
    Busy { what: String, why: String },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("limit for uid {uid} exceeded: {why}")]
    LimitExceeded { uid: u32, why: String },
    #[error("not supported on this host: {what}")]
    NotSupported { what: String },
    #[error("no free loop device after {attempts} attempts: each was taken by another process")]
    NoFreeDevice { attempts: u32 },
    #[error("{op} on {target} failed: {source}")]
    Sys {
        op: &'static str,
        target: String,
        #[source]
        source: Errno,
    },
    #[error("{op} {} failed: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// LOOP_CTL_GET_FREE handed out a number the caller still holds a record for (the
    /// device was unbound behind its back): nothing was bound; the caller settles the
    /// record first (see [`attach_file_avoiding`]).
    #[error("/dev/loop{number} is free in the kernel but still recorded")]
    Recorded { number: u32 },
    #[error("{source}; undoing it also failed: {cleanup}")]
    Rollback {
        #[source]
        source: Box<LoopError>,
        cleanup: Box<LoopError>,
    },
}

impl Classify for LoopError {
    fn kind(&self) -> Kind {
        match self {
            LoopError::InvalidArgs { .. } | LoopError::Name(_) => Kind::InvalidArgs,
            LoopError::LimitExceeded { .. } => Kind::InvalidArgs,
            LoopError::NotFound { .. } => Kind::NotFound,
            LoopError::Busy { .. } | LoopError::NoFreeDevice { .. } => Kind::Busy,
            LoopError::Conflict { .. } => Kind::Conflict,
            LoopError::NotSupported { .. } => Kind::NotSupported,
            LoopError::Sys { source, .. } => match source {
                Errno::EBUSY => Kind::Busy,
                Errno::ENOSYS | Errno::ENOTTY => Kind::NotSupported,
                _ => Kind::Failed,
            },
            LoopError::Io { .. } | LoopError::Recorded { .. } => Kind::Failed,
            LoopError::Rollback { source, .. } => source.kind(),
        }
    }
}

type Result<T, E = LoopError> = std::result::Result<T, E>;

fn invalid(what: impl Into<String>) -> LoopError {
    LoopError::InvalidArgs { what: what.into() }
}

fn sys(op: &'static str, target: impl std::fmt::Display) -> impl FnOnce(Errno) -> LoopError {
    let target = target.to_string();
    move |source| LoopError::Sys { op, target, source }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> LoopError {
    let path = path.into();
    move |source| LoopError::Io { op, path, source }
}

/// Options for [`attach_file`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// Make the device read-only (forced anyway when the fd is opened `O_RDONLY`).
    pub read_only: bool,
    /// Set `LO_FLAGS_PARTSCAN` (this host has no in-kernel partition parsers; see
    /// `partitions` for the userspace re-read).
    pub partscan: bool,
    /// Start of the device in the file, bytes, multiple of 512.
    pub offset: u64,
    /// Device size in bytes, multiple of 512; 0 = up to the end of the file.
    pub size_limit: u64,
    /// Free text stored after [`LABEL_PREFIX`] in `lo_file_name` (63 bytes in total).
    pub label: String,
}

/// The kernel's view of one bound loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    pub number: u32,
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// From sysfs; ends in " (deleted)" when the file was unlinked.
    pub backing_file: PathBuf,
    /// `st_dev` of the backing file (userspace encoding, comparable with `fstat`).
    pub backing_dev: u64,
    pub backing_inode: u64,
    pub offset: u64,
    /// 0 = up to the end of the file.
    pub size_limit: u64,
    /// Size of the block device in bytes as the kernel sees it.
    pub size: u64,
    pub read_only: bool,
    pub partscan: bool,
    pub autoclear: bool,
    /// `lo_file_name`: `dindhelper:<label>` for devices we attached, else whatever the
    /// attaching tool wrote (losetup writes the path).
    pub label: String,
}

impl LoopInfo {
    /// Whether dindhelper attached this device (by its label).
    pub fn is_ours(&self) -> bool {
        self.label.starts_with(LABEL_PREFIX)
    }
}

/// Result of [`detach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// The device is unbound now.
    Cleared,
    /// The device is still open elsewhere (mounted, held by a process). The kernel has set
    /// autoclear and unbinds it at the last close.
    Deferred,
}

/// `/dev/loopN`.
pub fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

/// Parse `/dev/loopN` or `loopN` into N. Anything else is InvalidArgs.
pub fn parse_device(s: &str) -> Result<u32> {
    let bad = || {
        invalid(format!(
            "{s:?} is not a loop device (expected /dev/loopN or loopN)"
        ))
    };
    let rest = s
        .strip_prefix("/dev/loop")
        .or_else(|| s.strip_prefix("loop"))
        .ok_or_else(bad)?;
    if rest.is_empty()
        || !rest.bytes().all(|b| b.is_ascii_digit())
        || (rest.len() > 1 && rest.starts_with('0'))
    {
        return Err(bad());
    }
    rest.parse::<u32>().map_err(|_| bad())
}

/// Check offset and size limit against the backing file size. Pure.
pub fn check_geometry(file_size: u64, offset: u64, size_limit: u64) -> Result<u64> {
    if offset % SECTOR != 0 {
        return Err(invalid(format!("offset {offset} is not a multiple of 512")));
    }
    if size_limit % SECTOR != 0 {
        return Err(invalid(format!(
            "size {size_limit} is not a multiple of 512"
        )));
    }
    if file_size < SECTOR {
        return Err(invalid(format!(
            "the backing file is empty or smaller than one 512-byte sector ({file_size} bytes)"
        )));
    }
    if offset >= file_size {
        return Err(invalid(format!(
            "offset {offset} is not below the file size {file_size}"
        )));
    }
    let avail = file_size - offset;
    let size = if size_limit == 0 { avail } else { size_limit };
    if size > avail {
        return Err(invalid(format!(
            "offset {offset} + size {size_limit} exceeds the file size {file_size}"
        )));
    }
    if size < SECTOR {
        return Err(invalid(format!(
            "the device would be smaller than one 512-byte sector (file size {file_size}, offset {offset})"
        )));
    }
    Ok(size)
}

/// Name of a non-regular file type, for messages. Pure.
pub fn file_type_name(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFLNK => "a symbolic link",
        _ => "of an unknown type",
    }
}

/// Validate a backing fd: regular file, readable, geometry. Returns whether the device
/// must be read-only (asked, or the fd is `O_RDONLY`) and the fd's access mode.
fn validate_backing(file: &File, opts: &AttachOptions) -> Result<(bool, OFlag)> {
    let st = fstat(file.as_fd()).map_err(sys("fstat", "backing fd"))?;
    let fmt = st.st_mode & SFlag::S_IFMT.bits();
    if fmt != SFlag::S_IFREG.bits() {
        return Err(invalid(format!(
            "the backing fd is {}; only regular files can be attached",
            file_type_name(st.st_mode)
        )));
    }
    let fl = OFlag::from_bits_truncate(
        fcntl(file.as_fd(), FcntlArg::F_GETFL).map_err(sys("fcntl(F_GETFL)", "backing fd"))?,
    );
    if fl.contains(OFlag::O_PATH) {
        return Err(invalid(
            "the backing fd was opened with O_PATH; open it for reading",
        ));
    }
    let acc = fl & OFlag::O_ACCMODE;
    if acc == OFlag::O_WRONLY {
        return Err(invalid(
            "the backing fd is write-only; a loop device needs read access",
        ));
    }
    check_geometry(st.st_size as u64, opts.offset, opts.size_limit)?;
    Ok((opts.read_only || acc == OFlag::O_RDONLY, acc))
}

fn kernel_release() -> &'static str {
    static R: OnceLock<String> = OnceLock::new();
    R.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned()
    })
}

/// Set once LOOP_CONFIGURE proved missing: later attaches go straight to the fallback.
static CONFIGURE_MISSING: AtomicBool = AtomicBool::new(false);
/// Serializes GET_FREE + bind inside this process (GET_FREE gives every concurrent caller
/// the same number; the retry loop is for other processes).
static ATTACH_LOCK: Mutex<()> = Mutex::new(());
static BUSY_RETRIES: AtomicU64 = AtomicU64::new(0);

/// Skip LOOP_CONFIGURE and use LOOP_SET_FD + LOOP_SET_STATUS64 from now on in this
/// process (what happens by itself on kernels before 5.8). For tests of the fallback.
#[doc(hidden)]
pub fn use_legacy_attach(on: bool) {
    CONFIGURE_MISSING.store(on, Ordering::Relaxed);
}

/// How many times, since the process started, a free device was taken by someone else
/// between GET_FREE and the bind (diagnostics).
pub fn busy_retries_total() -> u64 {
    BUSY_RETRIES.load(Ordering::Relaxed)
}

fn open_control() -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LoopError::NotSupported {
                what: format!("{LOOP_CONTROL} is missing (loop driver not loaded?)"),
            },
            _ => LoopError::Io {
                op: "open",
                path: LOOP_CONTROL.into(),
                source: e,
            },
        })
}

/// Open `/dev/loopN`, waiting up to [`NODE_WAIT`] for the node to appear.
fn open_device_wait(number: u32, write: bool) -> Result<File> {
    let path = device_path(number);
    let deadline = std::time::Instant::now() + NODE_WAIT;
    loop {
        match OpenOptions::new().read(true).write(write).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if std::time::Instant::now() >= deadline {
                    return Err(LoopError::NotSupported {
                        what: format!(
                            "{} did not appear within {NODE_WAIT:?} (no devtmpfs on /dev?)",
                            path.display()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("open", path)(e)),
        }
    }
}

enum BindError {
    /// The device was taken by someone else: try another.
    Taken,
    Fail(LoopError),
}

/// Bind `backing` to the opened device. On error nothing stays bound.
fn bind(
    dev: &File,
    number: u32,
    backing: &File,
    read_only: bool,
    acc: OFlag,
    opts: &AttachOptions,
) -> Result<(), BindError> {
    let target = device_path(number).display().to_string();
    let mut cfg = ioctl::empty_config();
    cfg.fd = std::os::fd::AsRawFd::as_raw_fd(backing) as u32;
    cfg.info.lo_offset = opts.offset;
    cfg.info.lo_sizelimit = opts.size_limit;
    cfg.info.lo_flags = if read_only {
        ioctl::LO_FLAGS_READ_ONLY
    } else {
        0
    } | if opts.partscan {
        ioctl::LO_FLAGS_PARTSCAN
    } else {
        0
    };
    ioctl::set_file_name(&mut cfg.info, &format!("{LABEL_PREFIX}{}", opts.label));

    if !CONFIGURE_MISSING.load(Ordering::Relaxed) {
        match ioctl::configure(dev.as_fd(), &cfg) {
            Ok(()) => return Ok(()),
            Err(Errno::EBUSY) => return Err(BindError::Taken),
            Err(e) if ioctl::configure_unsupported(e, kernel_release()) => {
                tracing::warn!(
                    errno = %e, release = kernel_release(),
                    "LOOP_CONFIGURE unsupported; using LOOP_SET_FD + LOOP_SET_STATUS64"
                );
                CONFIGURE_MISSING.store(true, Ordering::Relaxed);
            }
            Err(Errno::EINVAL) => {
                return Err(BindError::Fail(invalid(format!(
                    "the kernel refused LOOP_CONFIGURE on {target} (EINVAL): the file or its \
                     filesystem cannot back a loop device with these options"
                ))))
            }
            Err(e) => return Err(BindError::Fail(sys("LOOP_CONFIGURE", &target)(e))),
        }
    }

    // Fallback (pre-5.8). Read-only follows the backing fd's mode here.
    let reopened;
    let fd_for_kernel = if read_only && acc != OFlag::O_RDONLY {
        let p = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(backing));
        reopened = File::open(&p).map_err(|e| BindError::Fail(io_err("reopen read-only", p)(e)))?;
        &reopened
    } else {
        backing
    };
    match ioctl::set_fd(dev.as_fd(), fd_for_kernel.as_fd()) {
        Ok(()) => {}
        Err(Errno::EBUSY) => return Err(BindError::Taken),
        Err(e) => return Err(BindError::Fail(sys("LOOP_SET_FD", &target)(e))),
    }
    let mut info = cfg.info;
    info.lo_flags &= !ioctl::LO_FLAGS_READ_ONLY;
    if let Err(e) = ioctl::set_status64(dev.as_fd(), &info) {
        let err = sys("LOOP_SET_STATUS64", &target)(e);
        return Err(BindError::Fail(match ioctl::clr_fd(dev.as_fd()) {
            Ok(()) => err,
            Err(c) => LoopError::Rollback {
                source: Box::new(err),
                cleanup: Box::new(sys("LOOP_CLR_FD", &target)(c)),
            },
        }));
    }
    Ok(())
}

/// Attach a regular file to a free loop device.
///
/// The fd is validated first (see [`AttachOptions`]); the device is read-only when asked or
/// when the fd is `O_RDONLY`. On any failure after the bind the device is cleared again.
pub fn attach_file(file: &File, opts: &AttachOptions) -> Result<LoopInfo> {
    attach_file_avoiding(file, opts, &|_| false)
}

/// [`attach_file`], but when LOOP_CTL_GET_FREE names a number for which `recorded(n)` is
/// true, nothing is bound and [`LoopError::Recorded`] is returned: a record the caller
/// still holds for a free number means the device was unbound behind its back (a
/// container may issue LOOP_CLR_FD on a node it was given), and whatever that record
/// granted must be settled before anything else is bound to the number.
pub fn attach_file_avoiding(
    file: &File,
    opts: &AttachOptions,
    recorded: &dyn Fn(u32) -> bool,
) -> Result<LoopInfo> {
    let (read_only, acc) = validate_backing(file, opts)?;
    let st = fstat(file.as_fd()).map_err(sys("fstat", "backing fd"))?;
    let ctl = open_control()?;
    for _ in 0..ATTACH_ATTEMPTS {
        let (number, dev) = {
            let _g = ATTACH_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            let number =
                ioctl::ctl_get_free(ctl.as_fd()).map_err(sys("LOOP_CTL_GET_FREE", LOOP_CONTROL))?;
            if recorded(number) {
                return Err(LoopError::Recorded { number });
            }
            let dev = open_device_wait(number, true)?;
            match bind(&dev, number, file, read_only, acc, opts) {
                Ok(()) => (number, dev),
                Err(BindError::Taken) => {
                    BUSY_RETRIES.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(
                        number,
                        "free loop device taken by another process; retrying"
                    );
                    continue;
                }
                Err(BindError::Fail(e)) => return Err(e),
            }
        };
        // Bound. Read it back while we still hold the device open (so it cannot be
        // unbound and rebound meanwhile); anything wrong -> clear it again.
        let checked = read_info(number, &dev).and_then(|info| match info {
            Some(i) if i.backing_dev == st.st_dev && i.backing_inode == st.st_ino => Ok(i),
            other => Err(LoopError::Busy {
                what: device_path(number).display().to_string(),
                why: format!("bound to another file right after attaching ({other:?})"),
            }),
        });
        return match checked {
            Ok(info) => Ok(info),
            Err(e) => match ioctl::clr_fd(dev.as_fd()) {
                Ok(()) | Err(Errno::ENXIO) => Err(e),
                Err(c) => Err(LoopError::Rollback {
                    source: Box::new(e),
                    cleanup: Box::new(sys("LOOP_CLR_FD", device_path(number).display())(c)),
                }),
            },
        };
    }
    Err(LoopError::NoFreeDevice {
        attempts: ATTACH_ATTEMPTS,
    })
}

/// Identity (st_dev, st_ino) of the file bound to loopN (LOOP_GET_STATUS64), or None
/// when unbound/absent.
pub fn bound_identity(number: u32) -> Result<Option<(u64, u64)>> {
    let dev = match OpenOptions::new().read(true).open(device_path(number)) {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENXIO)) => {
            return Ok(None)
        }
        Err(e) => return Err(io_err("open", device_path(number))(e)),
    };
    match ioctl::get_status64(dev.as_fd()) {
        Ok(i) => Ok(Some((i.lo_device, i.lo_inode))),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(sys("LOOP_GET_STATUS64", device_path(number).display())(e)),
    }
}

/// Detach loopN. NotFound when the device does not exist or nothing is attached.
pub fn detach(number: u32) -> Result<Detached> {
    detach_inner(number, None)
}

/// Detach loopN only if it is still bound to the file with this (st_dev, st_ino): guards
/// against detaching a device that was released and re-used by someone else since the
/// caller looked it up (NotFound then).
pub fn detach_checked(number: u32, backing_dev: u64, backing_inode: u64) -> Result<Detached> {
    detach_inner(number, Some((backing_dev, backing_inode)))
}

fn detach_inner(number: u32, expect: Option<(u64, u64)>) -> Result<Detached> {
    let path = device_path(number);
    let name = path.display().to_string();
    let not_attached = || LoopError::NotFound {
        what: format!("a file attached to {name}"),
    };
    let dev = match OpenOptions::new().read(true).open(&path) {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENXIO)) => {
            return Err(LoopError::NotFound {
                what: format!("loop device {name}"),
            })
        }
        Err(e) => return Err(io_err("open", &path)(e)),
    };
    let before = match ioctl::get_status64(dev.as_fd()) {
        Ok(i) => (i.lo_device, i.lo_inode),
        Err(Errno::ENXIO) => return Err(not_attached()),
        Err(e) => return Err(sys("LOOP_GET_STATUS64", &name)(e)),
    };
    if let Some(exp) = expect {
        if exp != before {
            return Err(LoopError::NotFound {
                what: format!(
                    "{name} bound to the expected file (dev {}, inode {}); it now holds another",
                    exp.0, exp.1
                ),
            });
        }
    }
    match ioctl::clr_fd(dev.as_fd()) {
        Ok(()) => {}
        Err(Errno::ENXIO) => return Err(not_attached()),
        Err(e) => return Err(sys("LOOP_CLR_FD", &name)(e)),
    }
    drop(dev); // last close of ours: the kernel unbinds here unless someone else holds it
    let deadline = std::time::Instant::now() + DETACH_WAIT;
    loop {
        match bound_identity(number)? {
            Some(id) if id == before => {}
            _ => return Ok(Detached::Cleared),
        }
        if std::time::Instant::now() >= deadline {
            return Ok(Detached::Deferred);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sysfs_dir(number: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{number}"))
}

fn read_sysfs(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim_end_matches('\n').to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Read the binding of an opened device: GET_STATUS64 + sysfs. None when unbound.
fn read_info(number: u32, dev: &File) -> Result<Option<LoopInfo>> {
    let name = device_path(number);
    let st = match ioctl::get_status64(dev.as_fd()) {
        Ok(i) => i,
        Err(Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(sys("LOOP_GET_STATUS64", name.display())(e)),
    };
    let sys_dir = sysfs_dir(number);
    let Some(backing) = read_sysfs(&sys_dir.join("loop/backing_file"))? else {
        return Ok(None);
    };
    let sectors = read_sysfs(&sys_dir.join("size"))?
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Some(LoopInfo {
        number,
        device: name,
        backing_file: PathBuf::from(backing),
        backing_dev: st.lo_device,
        backing_inode: st.lo_inode,
        offset: st.lo_offset,
        size_limit: st.lo_sizelimit,
        size: sectors * SECTOR,
        read_only: st.lo_flags & ioctl::LO_FLAGS_READ_ONLY != 0,
        partscan: st.lo_flags & ioctl::LO_FLAGS_PARTSCAN != 0,
        autoclear: st.lo_flags & ioctl::LO_FLAGS_AUTOCLEAR != 0,
        label: ioctl::file_name(&st),
    }))
}

/// The binding of loopN; None when the device does not exist or is unbound.
pub fn info(number: u32) -> Result<Option<LoopInfo>> {
    let path = device_path(number);
    let dev = match OpenOptions::new().read(true).open(&path) {
        Ok(d) => d,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENXIO)) => {
            return Ok(None)
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    if !dev
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false)
    {
        return Err(LoopError::NotSupported {
            what: format!("{} is not a block device", path.display()),
        });
    }
    read_info(number, &dev)
}

/// The size in bytes of loopN from sysfs alone (0 when unbound or gone): one small read,
/// for listings. [`info`] opens the block device and asks the kernel for its status,
/// ~30 µs per device, 32 ms for a ListLoops of 1000 devices.
pub fn size(number: u32) -> u64 {
    read_sysfs(&sysfs_dir(number).join("size"))
        .ok()
        .flatten()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(0, |s| s * SECTOR)
}

/// Every bound loop device (from `/sys/block/loop*` with a `loop/backing_file`), by number.
pub fn list_attached() -> Result<Vec<LoopInfo>> {
    let dir = Path::new("/sys/block");
    let mut numbers = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(io_err("read_dir", dir))? {
        let ent = ent.map_err(io_err("read_dir", dir))?;
        let name = ent.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("loop"))
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if ent.path().join("loop/backing_file").exists() {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    let mut out = Vec::with_capacity(numbers.len());
    for n in numbers {
        if let Some(i) = info(n)? {
            out.push(i);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_device_accepts_both_forms() {
        assert_eq!(parse_device("/dev/loop0").unwrap(), 0);
        assert_eq!(parse_device("loop7").unwrap(), 7);
        assert_eq!(parse_device("/dev/loop123").unwrap(), 123);
    }

    #[test]
    fn parse_device_rejects_everything_else() {
        for bad in [
            "",
            "loop",
            "/dev/loop",
            "loop-1",
            "loop01",
            "loop1p1",
            "/dev/sda",
            "sda",
            "/dev/../dev/loop1",
            "dev/loop1",
            " loop1",
            "loop1 ",
            "/dev/loop99999999999",
            "LOOP1",
            "loop+1",
        ] {
            let e = parse_device(bad).unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidArgs, "{bad:?}");
        }
    }

    #[test]
    fn geometry_rules() {
        let mib = 1 << 20;
        assert_eq!(check_geometry(mib, 0, 0).unwrap(), mib);
        assert_eq!(check_geometry(mib, 4096, 0).unwrap(), mib - 4096);
        assert_eq!(check_geometry(mib, 4096, 8192).unwrap(), 8192);
        assert_eq!(check_geometry(mib, mib - 512, 512).unwrap(), 512);
        for (size, off, lim) in [
            (mib, 100, 0),
            (mib, 0, 100),
            (mib, mib, 0),
            (mib, mib - 512, 1024),
            (mib, 0, mib + 512),
            (0, 0, 0),
            (100, 0, 0),
            (mib, u64::MAX - 511, 0),
        ] {
            let e = check_geometry(size, off, lim).unwrap_err();
            assert_eq!(e.kind(), Kind::InvalidArgs, "{size} {off} {lim}");
        }
    }

    #[test]
    fn file_types_named() {
        assert_eq!(file_type_name(libc::S_IFDIR | 0o755), "a directory");
        assert_eq!(file_type_name(libc::S_IFSOCK), "a socket");
        assert_eq!(file_type_name(libc::S_IFCHR | 0o666), "a character device");
        assert_eq!(file_type_name(libc::S_IFIFO), "a FIFO");
        assert_eq!(file_type_name(libc::S_IFBLK), "a block device");
        assert_eq!(file_type_name(libc::S_IFREG | 0o600), "a regular file");
    }

    #[test]
    fn error_kinds() {
        assert_eq!(LoopError::NoFreeDevice { attempts: 3 }.kind(), Kind::Busy);
        let e = LoopError::Sys {
            op: "LOOP_CLR_FD",
            target: "/dev/loop1".into(),
            source: Errno::EBUSY,
        };
        assert_eq!(e.kind(), Kind::Busy);
        let r = LoopError::Rollback {
            source: Box::new(invalid("x")),
            cleanup: Box::new(e),
        };
        assert_eq!(r.kind(), Kind::InvalidArgs);
        assert!(r.to_string().contains("undoing it also failed"));
    }
}
