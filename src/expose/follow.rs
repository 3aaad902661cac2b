//! Noticing a partition-table write: inotify IN_CLOSE_WRITE on device nodes.
//!
//! Kernel interface: `inotify_init1(IN_CLOEXEC)`, `inotify_add_watch(IN_CLOSE_WRITE |
//! IN_DONT_FOLLOW)`, `inotify_rm_watch`, `read(2)` of `struct inotify_event` records
//! (through libc: nix's inotify needs a feature this crate does not build).
//!
//! Traps (measured on this kernel, see TESTBED.md):
//! - The event fires on the *node inode* the writer used. A writer inside a container
//!   uses the node the daemon made in the container's /dev, which is a different inode
//!   from the host's `/dev/loopN`: every node made is watched, reached from the host as
//!   `/proc/<pid>/root/dev/<name>` (the container's root through the magic link).
//! - Watching the same inode twice returns the same watch descriptor: the map is
//!   wd → loop number, one entry per inode.
//! - A node that is unlinked (revoke, container gone) gets IN_IGNORED and its watch is
//!   gone by itself; the entry is dropped then.
//! - IN_CLOSE_WRITE means "closed after being opened for writing", not "written": a plain
//!   `open(O_RDWR)` + close also fires. The reader therefore re-reads the table and does
//!   nothing when it did not change. The daemon's own re-read opens read-only
//!   (IN_CLOSE_NOWRITE), so it never triggers itself.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Mutex;

/// One inotify instance for every watched node of every followed device.
pub struct Watcher {
    fd: OwnedFd,
    wds: Mutex<HashMap<i32, u32>>,
}

impl Watcher {
    pub fn new() -> std::io::Result<Watcher> {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Watcher {
            // SAFETY: a new fd we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            wds: Mutex::new(HashMap::new()),
        })
    }

    /// Watch `path` (a device node) for closes after writing; events report `number`.
    pub fn watch(&self, number: u32, path: &Path) -> std::io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: valid fd and NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                libc::IN_CLOSE_WRITE | libc::IN_DONT_FOLLOW,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.wds.lock().unwrap().insert(wd, number);
        Ok(())
    }

    /// Stop watching every node of `number`.
    pub fn unwatch(&self, number: u32) {
        let mut m = self.wds.lock().unwrap();
        m.retain(|wd, n| {
            if *n == number {
                // SAFETY: plain syscall on our fd.
                unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), *wd) };
                false
            } else {
                true
            }
        });
    }

    /// Block until events arrive; return the loop numbers written (deduplicated).
    pub fn wait(&self) -> std::io::Result<Vec<u32>> {
        let mut buf = vec![0u8; 4096];
        let n = loop {
            // SAFETY: reading into our buffer.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut out = Vec::new();
        let mut off = 0;
        let head = std::mem::size_of::<libc::inotify_event>();
        let mut m = self.wds.lock().unwrap();
        while off + head <= n {
            // SAFETY: the kernel wrote whole records; read_unaligned for the header.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[off..].as_ptr() as *const _) };
            off += head + ev.len as usize;
            if ev.mask & libc::IN_IGNORED != 0 {
                m.remove(&ev.wd);
                continue;
            }
            if ev.mask & libc::IN_CLOSE_WRITE != 0 {
                if let Some(&num) = m.get(&ev.wd) {
                    if !out.contains(&num) {
                        out.push(num);
                    }
                }
            }
        }
        Ok(out)
    }
}
